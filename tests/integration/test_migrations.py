"""Upgrading a database that version 1 of the schema (and its consumer) wrote."""
# Each migration's upgrade of existing rows is checked here: version 2 gives back
# the stock of orders canceled under version 1; version 3 asks to release the money
# of out_of_stock orders still held; version 5 puts back, at 0, the stock row of a
# SKU deleted while movements named it.

from __future__ import annotations

import asyncpg

from intentflow.consumer.migrate import available, migrate
from intentflow.consumer.tools import reconcile
from intentflow.devservices import Services


async def test_upgrading_from_version_1_restores_canceled_stock_and_releases_held_money(
    infra: Services,
) -> None:
    admin = await asyncpg.connect(infra.database_url)
    name = "intentflow_upgrade_v1"
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(infra.database_url.rpartition("/")[0] + f"/{name}")
    try:
        # Version 1, as its consumer left it: pi_1 canceled after its order was
        # placed (3 units of sku-a taken), pi_2 placed and still authorized, pi_3
        # out_of_stock with its money still held.
        first = available()[0]
        assert first.version == 1
        await conn.execute(first.sql)
        await conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now());"
            "INSERT INTO schema_migrations (version, name) VALUES (1, 'initial');"
            "INSERT INTO inventory_levels VALUES ('sku-a', 10), ('sku-gone', 4);"
            "DELETE FROM inventory_levels WHERE sku = 'sku-gone';"
        )
        async with conn.transaction():
            await conn.execute("SET LOCAL intentflow.applying = 'on'")
            await conn.execute(
                """
                INSERT INTO payment_intents (id, status, last_event_id) VALUES
                    ('pi_1', 'canceled', 'evt_cancel'), ('pi_2', 'requires_capture', 'evt_2'),
                    ('pi_3', 'requires_capture', 'evt_3');
                INSERT INTO orders
                    (id, payment_intent_id, cart_id, status, amount, currency, source_event_id)
                VALUES (1, 'pi_1', 'c1', 'placed', 300, 'usd', 'evt_1'),
                       (2, 'pi_2', 'c2', 'placed', 200, 'usd', 'evt_2'),
                       (3, 'pi_3', 'c3', 'out_of_stock', 900, 'usd', 'evt_3');
                INSERT INTO order_items (order_id, sku, quantity, unit_amount)
                VALUES (1, 'sku-a', 3, 100), (2, 'sku-a', 2, 100);
                INSERT INTO inventory_movements (sku, quantity_delta, reason, order_id, event_id)
                VALUES ('sku-a', -3, 'order', 1, 'evt_1'), ('sku-a', -2, 'order', 2, 'evt_2');
                INSERT INTO processed_events (event_id, event_type)
                VALUES ('evt_1', 'a'), ('evt_2', 'a'), ('evt_3', 'a'), ('evt_cancel', 'c');
                UPDATE inventory_levels SET stocked_quantity = 5;
                """
            )

        assert await migrate(conn) == [m.version for m in available()[1:]]

        orders = {r["id"]: tuple(r) for r in await conn.fetch(
            "SELECT id, status, allocation FROM orders ORDER BY id"
        )}  # fmt: skip
        assert orders == {
            1: (1, "canceled", "placed"),
            2: (2, "placed", "placed"),
            3: (3, "out_of_stock", "out_of_stock"),
        }
        outbox = await conn.fetch(
            "SELECT kind, name, payment_intent_id, order_id, payload::text, idempotency_key,"
            " state FROM outbox"
        )
        assert [tuple(r) for r in outbox] == [
            (
                "stripe_action",
                "cancel_payment_intent",
                "pi_3",
                3,
                '{"cancellation_reason": "abandoned"}',
                "intentflow:cancel_payment_intent:pi_3",
                "pending",
            )
        ]
        levels = await conn.fetch("SELECT sku, stocked_quantity FROM inventory_levels ORDER BY 1")
        assert [tuple(r) for r in levels] == [("sku-a", 8), ("sku-gone", 0)]
        back = await conn.fetch(
            "SELECT order_id, quantity_delta, event_id FROM inventory_movements"
            " WHERE reason = 'cancellation'"
        )
        assert [tuple(r) for r in back] == [(1, 3, "evt_cancel")]
        report = await reconcile.check(conn)
        assert report.ok, [c for c in report.checks if c.violations]
        # The trigger recorded the initial stock, nothing for version 2's own change, and
        # what balances the SKU put back.
        external = await conn.fetch(
            "SELECT sku, quantity_delta FROM inventory_movements"
            " WHERE reason IN ('restock', 'adjustment') ORDER BY id"
        )
        assert [tuple(r) for r in external] == [("sku-a", 10), ("sku-gone", 4), ("sku-gone", -4)]
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

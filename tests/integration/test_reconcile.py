"""`order-consumer reconcile` on a database the real consumer wrote, then broken by hand.

The clean state comes from `consumer.store.apply_batch` (placed, canceled after
placing, canceled before authorization, out of stock, needs review); every
breakage below is one an invariant forbids, made with SQL that goes around the
constraint or trigger that would otherwise refuse it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, cast

import asyncpg
import pytest

from intentflow.consumer import tools
from intentflow.consumer.policy import CapturePolicy, ShopPolicy
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.store import apply_batch
from intentflow.consumer.tools import prune, reconcile
from intentflow.devservices import Services
from intentflow.stripekit import events
from tests.integration.store_support import envelope
from tests.support import consumer_env, consumer_settings, seed_cart, seed_stock


async def orders_of_every_kind(db: asyncpg.Connection) -> dict[str, str]:
    """Apply events through the real store; return each intent's authorization event id."""
    await seed_stock(db, {"sku-a": 10, "sku-b": 5})
    placed = await seed_cart(
        db, "cart-0", [("sku-a", 2, 100), ("sku-b", 1, 300), ("sku-a", 1, 100)]
    )
    canceled = await seed_cart(db, "cart-1", [("sku-a", 3, 100)])
    short = await seed_cart(db, "cart-2", [("sku-b", 9, 100)])
    review = await seed_cart(db, "cart-3", [("sku-a", 1, 100)])
    early = await seed_cart(db, "cart-4", [("sku-b", 1, 100)])
    auths = {
        "pi_0": events.intent_event("pi_0", amount=placed, cart_id="cart-0"),
        "pi_1": events.intent_event("pi_1", amount=canceled, cart_id="cart-1"),
        "pi_2": events.intent_event("pi_2", amount=short, cart_id="cart-2"),
        "pi_3": events.intent_event("pi_3", amount=review + 1, cart_id="cart-3"),
    }
    cancel_early = events.intent_event("pi_4", amount=early, cart_id="cart-4", status="canceled")
    first = [*auths.values(), cancel_early]
    await apply_batch(db, [envelope(e, offset) for offset, e in enumerate(first)])
    auths["pi_4"] = events.intent_event("pi_4", amount=early, cart_id="cart-4")
    cancel = events.intent_event("pi_1", amount=canceled, cart_id="cart-1", status="canceled")
    await apply_batch(db, [envelope(cancel, 10), envelope(auths["pi_4"], 11)])
    rows = await db.fetch("SELECT payment_intent_id, status FROM orders")
    statuses = {r["payment_intent_id"]: r["status"] for r in rows}
    assert statuses == {
        "pi_0": "placed",
        "pi_1": "canceled",
        "pi_2": "out_of_stock",
        "pi_3": "needs_review",
        "pi_4": "canceled",
    }
    return {pid: str(e["id"]) for pid, e in auths.items()}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    reconcile.add_parser(parser.add_subparsers())
    return parser.parse_args(["reconcile", *argv])


async def behind_the_triggers(db: asyncpg.Connection, *statements: str) -> None:
    """Run `statements` as the consumer's sessions do: no movement recorded for a level."""
    async with db.transaction():
        await db.execute("SET LOCAL intentflow.applying = 'on'")
        for statement in statements:
            await db.execute(statement)


async def test_a_database_written_by_the_consumer_is_clean_and_exits_0(
    infra: Services, database_url: str, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    await orders_of_every_kind(db)
    settings = consumer_settings(infra, database_url, "unused")

    assert await tools.run("reconcile", parse(), settings) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{name}: OK" for name, _ in reconcile.CHECKS]


async def test_a_level_changed_behind_its_back_and_a_placed_order_on_a_canceled_intent_exit_1(
    infra: Services, database_url: str, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    await orders_of_every_kind(db)
    await behind_the_triggers(
        db,
        "UPDATE inventory_levels SET stocked_quantity = stocked_quantity + 4 WHERE sku = 'sku-a'",
    )
    await db.execute("UPDATE orders SET status = 'placed' WHERE payment_intent_id = 'pi_1'")
    settings = consumer_settings(infra, database_url, "unused")

    assert await tools.run("reconcile", parse(), settings) == 1

    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    # sku-a: 10 stocked, 3 taken by pi_0, 3 taken and given back by pi_1, then +4 by hand.
    assert lines["movements_sum_to_levels"] == "1 violation, e.g. sku=sku-a movements=7 level=11"
    assert lines["order_status_matches_intent"].startswith("1 violation, e.g. order_id=")
    assert (
        "payment_intent_id=pi_1 order_status=placed intent_status=canceled"
        in (lines["order_status_matches_intent"])
    )
    # Its stock came back although it is not canceled any more.
    assert "payment_intent_id=pi_1" in lines["order_stock_matches_items"]
    # And its status is not the one its intent's facts derive.
    assert "expected_status=canceled" in lines["order_mirrors_its_intent"]
    assert {name for name, text in lines.items() if text != "OK"} == {
        "movements_sum_to_levels",
        "order_status_matches_intent",
        "order_stock_matches_items",
        "order_mirrors_its_intent",
    }


# One breakage per check, each making that check fail (others may fail with it).
BREAKAGES: dict[str, list[str]] = {
    "one_order_per_intent": [
        "ALTER TABLE orders DROP CONSTRAINT orders_payment_intent_id_key",
        """INSERT INTO orders (payment_intent_id, cart_id, status, allocation, amount, currency,
                               source_event_id)
           SELECT payment_intent_id, cart_id, 'needs_review', 'needs_review', amount, currency,
                  source_event_id
           FROM orders WHERE payment_intent_id = 'pi_0'""",
    ],
    "one_order_per_event": [
        """UPDATE inventory_movements SET event_id = (SELECT source_event_id FROM orders
                                                     WHERE payment_intent_id = 'pi_0')
           WHERE order_id = (SELECT id FROM orders WHERE payment_intent_id = 'pi_1')""",
    ],
    "one_movement_per_order_sku_reason": [
        "DROP INDEX inventory_movements_once_per_order_idx",
        """INSERT INTO inventory_movements (sku, quantity_delta, reason, order_id, event_id)
           SELECT sku, quantity_delta, reason, order_id, event_id FROM inventory_movements
           WHERE reason = 'cancellation' LIMIT 1""",
    ],
    "order_source_event_in_inbox": [
        """DELETE FROM processed_events WHERE event_id =
           (SELECT source_event_id FROM orders WHERE payment_intent_id = 'pi_2')""",
    ],
    "no_negative_level": [
        "ALTER TABLE inventory_levels DROP CONSTRAINT inventory_levels_stocked_quantity_check",
        "SET LOCAL intentflow.applying = 'on'",
        "UPDATE inventory_levels SET stocked_quantity = -1 WHERE sku = 'sku-b'",
    ],
    "movements_sum_to_levels": [
        """INSERT INTO inventory_movements (sku, quantity_delta, reason)
           VALUES ('sku-c', 2, 'restock')""",
    ],
    "movements_have_their_level": [
        # Past the trigger that refuses it, as a superuser can.
        "ALTER TABLE inventory_levels DISABLE TRIGGER inventory_levels_keep_rows_with_movements",
        "DELETE FROM inventory_levels WHERE sku = 'sku-b'",
    ],
    "movements_have_their_order": [
        """INSERT INTO inventory_movements (sku, quantity_delta, reason, order_id)
           VALUES ('sku-a', -1, 'order', 999999), ('sku-a', 1, 'restock', NULL)""",
    ],
    "order_stock_matches_items": [
        """UPDATE order_items SET quantity = quantity + 1
           WHERE order_id = (SELECT id FROM orders WHERE payment_intent_id = 'pi_0')
             AND sku = 'sku-b'""",
    ],
    "order_status_matches_intent": [
        "DELETE FROM payment_intents WHERE id = 'pi_3'",
    ],
    "order_mirrors_its_intent": [
        # A refund the intent never saw (or one the order missed).
        "UPDATE orders SET amount_refunded = 100 WHERE payment_intent_id = 'pi_0'",
    ],
    "one_live_order_per_cart": [
        # A second live order for pi_0's cart, past the index that refuses it.
        "DROP INDEX orders_one_live_order_per_cart_idx",
        """INSERT INTO orders (payment_intent_id, cart_id, status, allocation, amount, currency,
                               holds_cart)
           SELECT 'pi_again', cart_id, 'placed', 'placed', amount, currency, true
           FROM orders WHERE payment_intent_id = 'pi_0'""",
    ],
    "only_the_shops_payments_are_orders": [
        # An order for an intent that names no cart (a subscription's, another system's).
        """INSERT INTO orders (payment_intent_id, cart_id, status, allocation, status_reason,
                               amount, currency)
           VALUES ('pi_invoice', NULL, 'needs_review', 'needs_review', 'no_cart_id', 900, 'usd')""",
    ],
    "held_money_of_unfillable_order_released": [
        # The cancel that the out_of_stock order's batch asked for, lost.
        "DELETE FROM outbox WHERE kind = 'stripe_action' AND payment_intent_id = 'pi_2'",
    ],
    "captured_money_of_unfillable_order_returned": [
        # The out_of_stock order's money captured (the shop, from its dashboard), and the
        # refund that the batch that learned it would have asked for, missing.
        "UPDATE payment_intents SET status = 'succeeded', amount_received = 900 WHERE id = 'pi_2'",
        "UPDATE orders SET amount_captured = 900 WHERE payment_intent_id = 'pi_2'",
        "DELETE FROM outbox WHERE kind = 'stripe_action' AND payment_intent_id = 'pi_2'",
    ],
    "placed_order_capture_asked": [
        # Nothing to break: pi_0 was placed by a member on CAPTURE_POLICY=never, and the
        # check runs under on_placed (a rolling change of the policy).
    ],
}
# The policy each check runs under in `test_each_check_reports_the_breakage_it_exists_for`.
POLICY = {"placed_order_capture_asked": ShopPolicy(CapturePolicy.ON_PLACED)}


def test_every_check_has_a_breakage_below() -> None:
    assert list(BREAKAGES) == [name for name, _ in reconcile.CHECKS]


@pytest.mark.parametrize("name", list(BREAKAGES))
async def test_each_check_reports_the_breakage_it_exists_for(
    db: asyncpg.Connection, name: str
) -> None:
    await orders_of_every_kind(db)
    assert (await reconcile.check(db)).ok
    async with db.transaction():
        for statement in BREAKAGES[name]:
            await db.execute(statement)

    report = await reconcile.check(db, POLICY.get(name, ShopPolicy()))

    assert not report.ok
    assert report.failed()[name].violations == 1


async def test_every_order_keeps_its_event_between_and_after_batches_of_a_prune(
    db: asyncpg.Connection,
) -> None:
    """Retention deletes the inbox oldest first; what it deleted is not a violation.

    A consumer transaction's rows share one processed_at, the created_at of its
    orders; a batch of prune takes them whole, past its size if need be.
    """
    await orders_of_every_kind(db)  # two transactions: 5 inbox rows, then 2
    everything = await db.fetchval("SELECT now()")

    deleted = []
    async for count in prune.delete_batches(db, everything, batch_size=2):
        deleted.append(count)
        failed = (await reconcile.check(db)).failed()  # the first: a prune stopped half-way
        assert not failed, failed

    assert deleted == [5, 2]


class BreaksAfterFirstCheck:
    """The connection `check` is given, with another session committing between two checks."""

    def __init__(self, conn: asyncpg.Connection, database_url: str, breakage: str) -> None:
        self._conn = conn
        self._database_url = database_url
        self._breakage: str | None = breakage

    def transaction(self, **options: Any) -> Any:
        return self._conn.transaction(**options)

    async def fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        rows = await self._conn.fetch(query, *args)
        if self._breakage is not None:
            other = await asyncpg.connect(self._database_url)
            try:
                await behind_the_triggers(other, self._breakage)
            finally:
                await other.close()
            self._breakage = None
        return rows


async def test_the_checks_see_the_one_snapshot_taken_by_the_first(
    db: asyncpg.Connection, database_url: str
) -> None:
    """A level changed behind its back after the first check is seen by none (REPEATABLE READ)."""
    await orders_of_every_kind(db)
    conn = BreaksAfterFirstCheck(
        db, database_url, "UPDATE inventory_levels SET stocked_quantity = 0 WHERE sku = 'sku-b'"
    )

    during = await reconcile.check(cast(asyncpg.Connection, conn))
    after = await reconcile.check(db)

    assert during.ok
    assert list(after.failed()) == ["movements_sum_to_levels"]


async def command(settings: ConsumerSettings, *argv: str) -> tuple[int, str, str]:
    """`python -m intentflow.consumer reconcile …` as an operator runs it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "intentflow.consumer", "reconcile", *argv,
        env=consumer_env(settings), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_command_prints_one_json_document_and_exits_1_on_a_violation(
    infra: Services, database_url: str, db: asyncpg.Connection
) -> None:
    await orders_of_every_kind(db)
    await behind_the_triggers(
        db, "UPDATE inventory_levels SET stocked_quantity = 0 WHERE sku = 'sku-b'"
    )

    code, out, _ = await command(consumer_settings(infra, database_url, "unused"), "--json")

    assert code == 1
    document = json.loads(out)
    assert document["ok"] is False
    checks = {c["name"]: c for c in document["checks"]}
    assert set(checks) == {name for name, _ in reconcile.CHECKS}
    assert checks["movements_sum_to_levels"]["examples"] == [
        {"sku": "sku-b", "movements": 4, "level": 0}
    ]
    assert [c["name"] for c in document["checks"] if not c["ok"]] == ["movements_sum_to_levels"]


async def test_a_database_that_cannot_be_reached_exits_2_with_one_line(infra: Services) -> None:
    settings = consumer_settings(
        infra, "postgresql://postgres@127.0.0.1:1/nowhere", "unused", db_connect_timeout_s=2
    )

    code, out, err = await command(settings)

    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(
        "order-consumer reconcile: PostgreSQL at postgresql://postgres@127.0.0.1:1/"
    )
    assert err.endswith(": check DATABASE_URL and that the server is up\n")

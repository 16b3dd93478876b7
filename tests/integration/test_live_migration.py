"""Migrating a live database: long work outside the long locks, every lock wait bounded.

The database is at schema version 3, as the last release left it, with a million
orders; a writer does what that release's consumer does (new intents and orders,
orders canceled, stock taken, inbox rows, order events) in short transactions,
each with `lock_timeout = 1s`, while `order-consumer migrate` takes the schema to
the newest version. No write may fail: the longest lock wait a writer saw stays
under a second. The other tests here check the mechanism on small databases: a
step retried while a lock is held, one that gives up with one line, an index
build left invalid and built again.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import pytest

from intentflow.consumer.migrate import LockPolicy, MigrationLocked, available, migrate
from intentflow.devservices import Services
from tests.support import consumer_env, consumer_settings

NEWEST = available()[-1].version
AFTER_3 = [m.version for m in available()[3:]]  # what a database at version 3 is given

ORDERS = 1_000_000
WRITER_LOCK_TIMEOUT = "1s"


@pytest.fixture
async def at_version_3(infra: Services) -> AsyncIterator[str]:
    """A database of its own at schema version 3 (the released one); its URL."""
    name = f"intentflow_live_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(infra.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = infra.database_url.rpartition("/")[0] + f"/{name}"
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in available()[:3]:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
        yield url
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def fill(url: str, orders: int) -> None:
    """`orders` orders of a shop at version 3, one INSERT ... SELECT per table: seven in
    ten still held, one captured, one canceled, one out of stock (its money held); one
    cart in fifty paid twice; a movement for one order in a hundred; an order event
    for one in ten."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            f"""
            SET intentflow.applying = 'on';
            INSERT INTO inventory_levels (sku, stocked_quantity)
            SELECT 'sku-' || g, 1000000 FROM generate_series(0, 99) g;
            INSERT INTO payment_intents (id, status, last_event_id)
            SELECT 'pi_' || g,
                   CASE g % 10 WHEN 7 THEN 'succeeded' WHEN 8 THEN 'canceled'
                               ELSE 'requires_capture' END,
                   'evt_' || g
            FROM generate_series(1, {orders}) g;
            INSERT INTO orders (payment_intent_id, cart_id, status, allocation, amount,
                                amount_authorized, currency, source_event_id)
            SELECT 'pi_' || g, 'cart_' || CASE WHEN g % 50 = 0 THEN g - 1 ELSE g END,
                   CASE g % 10 WHEN 8 THEN 'canceled' WHEN 9 THEN 'out_of_stock'
                               ELSE 'placed' END,
                   CASE g % 10 WHEN 9 THEN 'out_of_stock' ELSE 'placed' END,
                   1500, 1500, 'usd', 'evt_' || g
            FROM generate_series(1, {orders}) g;
            INSERT INTO inventory_movements (sku, quantity_delta, reason, order_id, event_id)
            SELECT 'sku-' || (g % 100), -1, 'order', g, 'evt_' || g
            FROM generate_series(1, {orders}, 100) g;
            INSERT INTO outbox (kind, name, payment_intent_id, order_id, payload, state,
                                outcome, done_at)
            SELECT 'order_event', 'order.placed', 'pi_' || g, g, '{{}}', 'done', 'published',
                   now()
            FROM generate_series(1, {orders}, 10) g;
            ANALYZE;
            """
        )
    finally:
        await conn.close()


@dataclass
class Writes:
    done: int = 0
    refused: list[str] = field(default_factory=list)  # lock waits of a second or more
    slowest_s: float = 0.0


async def write_like_version_3(url: str, stop: asyncio.Event, orders: int) -> Writes:
    """What the version-3 consumer writes, one short transaction at a time, until `stop`."""
    writes = Writes()
    conn = await asyncpg.connect(url)
    try:
        n = orders
        while not stop.is_set():
            n += 1
            old = 1 + (n * 7919) % orders  # an existing order, all over the table
            started = time.monotonic()
            try:
                async with conn.transaction():
                    await conn.execute(
                        f"SET LOCAL lock_timeout = '{WRITER_LOCK_TIMEOUT}';"
                        " SET LOCAL intentflow.applying = 'on'"
                    )
                    await conn.execute(
                        "INSERT INTO processed_events (event_id, event_type, payment_intent_id)"
                        " VALUES ($1, 'payment_intent.amount_capturable_updated', $2)",
                        f"evt_new_{n}",
                        f"pi_{n}",
                    )
                    await conn.execute(
                        "INSERT INTO payment_intents (id, status, last_event_id)"
                        " VALUES ($1, 'requires_capture', $2)",
                        f"pi_{n}",
                        f"evt_new_{n}",
                    )
                    await conn.execute(
                        "INSERT INTO orders (payment_intent_id, cart_id, status, allocation,"
                        " amount, amount_authorized, currency, source_event_id)"
                        " VALUES ($1, $2, 'placed', 'placed', 1500, 1500, 'usd', $3)",
                        f"pi_{n}",
                        f"cart_{n}",
                        f"evt_new_{n}",
                    )
                    await conn.execute(
                        "UPDATE inventory_levels SET stocked_quantity = stocked_quantity - 1"
                        " WHERE sku = $1",
                        f"sku-{n % 100}",
                    )
                    await conn.execute(
                        "UPDATE orders SET status = 'canceled', cancellation_reason = 'abandoned'"
                        " WHERE id = $1",
                        old,
                    )
                    await conn.execute(
                        "UPDATE payment_intents SET status = 'canceled' WHERE id = $1", f"pi_{old}"
                    )
                    await conn.execute(
                        "INSERT INTO outbox (kind, name, payment_intent_id, order_id, payload)"
                        " VALUES ('order_event', 'order.canceled', $1, $2, '{}')",
                        f"pi_{old}",
                        old,
                    )
            except asyncpg.LockNotAvailableError as exc:
                writes.refused.append(str(exc))
            writes.slowest_s = max(writes.slowest_s, time.monotonic() - started)
            writes.done += 1
            # A few hundred a second, as a busy shop: enough to meet every lock the
            # migration takes, without taking the cores it runs on.
            await asyncio.sleep(0.003)
    finally:
        await conn.close()
    return writes


@pytest.mark.timeout(300)
async def test_migrating_a_million_orders_makes_no_writer_wait_a_second_for_a_lock(
    infra: Services, at_version_3: str
) -> None:
    filled = time.monotonic()
    await fill(at_version_3, ORDERS)
    filled_s = time.monotonic() - filled

    stop = asyncio.Event()
    writer = asyncio.create_task(write_like_version_3(at_version_3, stop, ORDERS))
    await asyncio.sleep(0.5)  # writing before the migration starts
    settings = consumer_settings(infra, at_version_3, "unused")
    started = time.monotonic()
    migrating = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "intentflow.consumer", "migrate",
        env={**consumer_env(settings), "LOG_LEVEL": "DEBUG"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await migrating.communicate()
    migrated_s = time.monotonic() - started
    await asyncio.sleep(0.5)  # and after it
    stop.set()
    writes = await writer
    log = stderr.decode()
    assert migrating.returncode == 0, log[-3000:]

    print(  # the numbers behind the claim, for the report (pytest -s)
        f"\nfilled {ORDERS:,} orders in {filled_s:.1f} s; migrated in {migrated_s:.1f} s;"
        f" {writes.done} writer transactions, the slowest {writes.slowest_s * 1000:.0f} ms"
    )
    assert writes.refused == [], writes.refused[:3]
    assert writes.done > 20, writes  # it wrote all along
    assert writes.slowest_s < 1.0, writes.slowest_s

    conn = await asyncpg.connect(at_version_3)
    try:
        assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == NEWEST
        # Every constraint validated, every index valid, the work table gone.
        assert await conn.fetchval("SELECT count(*) FROM pg_constraint WHERE NOT convalidated") == 0
        assert await conn.fetchval("SELECT count(*) FROM pg_index WHERE NOT indisvalid") == 0
        assert await conn.fetchval("SELECT to_regclass('intentflow_0004_cart_holders')") is None
        # One live order per paid cart holds it (the earlier of a cart paid twice), and
        # what was captured is known.
        captured = await conn.fetchval(
            "SELECT count(*) FROM orders WHERE id <= $1 AND amount_captured = 1500"
            " AND cancellation_reason IS NULL",
            ORDERS,
        )
        # Carts the writer canceled an order of (after the holders were read) aside.
        untouched = """
            FROM orders o WHERE o.id <= $1 AND NOT EXISTS (SELECT 1 FROM orders x
                WHERE x.cart_id = o.cart_id AND x.cancellation_reason = 'abandoned')
        """
        held = await conn.fetchval(f"SELECT count(*) {untouched} AND o.holds_cart", ORDERS)
        live = await conn.fetchval(
            f"SELECT count(DISTINCT cart_id) {untouched} AND o.allocation = 'placed'"
            " AND o.status <> 'canceled'",
            ORDERS,
        )
        assert held == live
        assert captured == await conn.fetchval(
            "SELECT count(*) FROM orders o JOIN payment_intents p ON p.id = o.payment_intent_id"
            " WHERE o.id <= $1 AND p.status = 'succeeded' AND o.cancellation_reason IS NULL",
            ORDERS,
        )
    finally:
        await conn.close()


async def test_a_step_waits_out_a_lock_held_by_a_long_transaction(at_version_3: str) -> None:
    """A transaction that holds orders for 1.5 s: the step gives up after its lock_timeout
    (the writers behind it are not held up longer), waits, and tries again."""
    holder = await asyncpg.connect(at_version_3)
    conn = await asyncpg.connect(at_version_3)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("LOCK TABLE orders IN ROW EXCLUSIVE MODE")  # a consumer's batch
        release = asyncio.get_running_loop().call_later(1.5, asyncio.ensure_future,
                                                        transaction.rollback())  # fmt: skip
        locks = LockPolicy(timeout_ms=200, attempts=20, retry_initial_s=0.1, retry_max_s=0.3)
        started = time.monotonic()
        assert await migrate(conn, locks) == AFTER_3
        assert time.monotonic() - started >= 1.5
        release.cancel()
    finally:
        await conn.close()
        await holder.close()


async def test_a_step_that_never_gets_its_lock_gives_up_in_one_line(at_version_3: str) -> None:
    holder = await asyncpg.connect(at_version_3)
    conn = await asyncpg.connect(at_version_3)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE orders IN ROW EXCLUSIVE MODE")
            locks = LockPolicy(timeout_ms=50, attempts=3, retry_initial_s=0.01, retry_max_s=0.02)
            # (Bounded here too: without its lock_timeout, the step would wait for ever.)
            with pytest.raises(MigrationLocked) as refused:
                async with asyncio.timeout(10):
                    await migrate(conn, locks)
        line = str(refused.value)
        assert "0004_money.sql step 1 (transaction)" in line and "3 tries of 50 ms" in line
        assert "\n" not in line
        # What was done stays done, and the lock is free for the next run.
        assert await migrate(conn) == AFTER_3
    finally:
        await conn.close()
        await holder.close()


async def test_an_index_a_cut_short_build_left_invalid_is_built_again(at_version_3: str) -> None:
    conn = await asyncpg.connect(at_version_3)
    try:
        assert await migrate(conn) == AFTER_3
        # What a CREATE INDEX CONCURRENTLY cut short by its lock_timeout leaves behind.
        await conn.execute(
            "UPDATE pg_index SET indisvalid = false"
            " WHERE indexrelid = 'orders_one_live_order_per_cart_idx'::regclass;"
            " DELETE FROM schema_migrations WHERE version = 4"
        )
        assert await migrate(conn) == [4]
        valid = await conn.fetchval(
            "SELECT indisvalid FROM pg_index"
            " WHERE indexrelid = 'orders_one_live_order_per_cart_idx'::regclass"
        )
        assert valid is True
    finally:
        await conn.close()

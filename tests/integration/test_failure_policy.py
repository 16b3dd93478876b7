"""Only bad data is dead-lettered; every other failure is waited out or stops the process.

Each test stages one failure of the environment against the real broker and
PostgreSQL and checks the outcome: every event applied once, nothing in the
dead-letter topic, nothing committed that was not applied.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from intentflow.consumer.dlq import DeadLetterRefused
from intentflow.consumer.migrate import migrate, needed_version
from intentflow.consumer.preflight import StartupError
from intentflow.consumer.worker import Worker
from intentflow.devservices import Services
from intentflow.devservices.topics import create_topics
from intentflow.schemas import dlq_topic
from intentflow.stripekit import events
from tests.support import (
    consumer_settings,
    eventually,
    paid_carts,
    publish,
    read_topic,
    seed_cart,
    seed_stock,
    snapshot,
)


async def order_count(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM orders"))


async def cut_consumer_sessions(db: asyncpg.Connection) -> None:
    """What a failover does to the consumer's connections: the server ends them."""
    await db.execute(
        """
        SELECT pg_terminate_backend(pid) FROM pg_stat_activity
        WHERE application_name = 'order-consumer' AND datname = current_database()
        """
    )


async def dead_letters(infra: Services, topic: str) -> list[Any]:
    return await read_topic(infra.kafka_bootstrap_servers, dlq_topic(topic), 0, timeout_s=1.0)


async def run_until(worker: Worker, done: Any, timeout_s: float = 40) -> Any:
    """Run `worker` until `done()` holds, then stop it; return its stats."""
    running = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: running.done() or done(), timeout_s=timeout_s)
    finally:
        worker.request_stop()
    return await running


async def hold_stock_row(database_url: str, sku: str) -> tuple[asyncpg.Connection, Any]:
    """Another session's open transaction holding `sku`'s stock row: batches wait on it.

    Returns the connection (close it) and the transaction (roll it back to let go).
    """
    blocker = await asyncpg.connect(database_url)
    held = blocker.transaction()
    await held.start()
    await blocker.execute("SELECT 1 FROM inventory_levels WHERE sku = $1 FOR UPDATE", sku)
    return blocker, held


@pytest.fixture
async def empty_database_url(infra: Services) -> AsyncIterator[str]:
    """A database of this test's own with no schema at all: never migrated."""
    name = f"intentflow_empty_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(infra.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield infra.database_url.rpartition("/")[0] + f"/{name}"
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_a_read_only_window_is_waited_out_and_nothing_is_dead_lettered(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """SQLSTATE 25006 is the environment's; a session that was read-only is not reused."""
    await seed_stock(db, {"sku-a": 100})
    carts = await paid_carts(db, 12, [("sku-a", 1, 100)])
    database = await db.fetchval("SELECT current_database()")
    settings = consumer_settings(infra, database_url, topic)

    async with Worker(settings) as worker:
        running = asyncio.create_task(worker.run())
        await eventually(lambda: bool(worker.assignment()))
        await publish(infra, topic, carts[:6])
        await eventually(lambda: worker.stats.events == 6)
        # A failover begins: the database refuses writes and the sessions are cut.
        await db.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
        await cut_consumer_sessions(db)
        await publish(infra, topic, carts[6:])
        await eventually(lambda: worker.stats.retries_by_cause["database_read_only"] >= 3)
        assert await order_count(db) == 6
        # Writes are back, for new sessions only: those opened meanwhile stay read-only.
        await db.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = off')
        await eventually(lambda: worker.stats.events == 12)
        worker.request_stop()
        stats = await running

    assert stats.dead_lettered == 0
    assert await dead_letters(infra, topic) == []
    state = await snapshot(db)
    assert len(state.orders) == 12 and set(state.orders.values()) == {"placed"}
    assert state.levels == {"sku-a": 88}
    assert state.processed == 12


async def test_a_consumer_started_before_its_migration_waits_then_applies_everything(
    infra: Services, empty_database_url: str, topic: str
) -> None:
    """Nothing is dead-lettered or committed while the schema is missing (SQLSTATE 42P01)."""
    carts = [(f"cart-{i}", f"pi_{i}") for i in range(6)]
    await publish(
        infra,
        topic,
        [events.intent_event(pi, amount=100, cart_id=cart) for cart, pi in carts],
    )
    settings = consumer_settings(infra, empty_database_url, topic, startup_timeout_s=60)
    worker = Worker(settings, exit_when_idle_s=3)
    starting = asyncio.create_task(worker.start())
    await asyncio.sleep(2)
    assert not starting.done()  # waiting for the schema, outside the group
    assert await dead_letters(infra, topic) == []

    conn = await asyncpg.connect(empty_database_url)
    try:
        # The schema, then the shop's data, both before the worker runs its first batch.
        await migrate(conn)
        await seed_stock(conn, {"sku-a": 10})
        for cart, _ in carts:
            await seed_cart(conn, cart, [("sku-a", 1, 100)])
        await starting
        try:
            stats = await worker.run()
        finally:
            await worker.stop()
        state = await snapshot(conn)
    finally:
        await conn.close()
    assert stats.events == 6 and stats.dead_lettered == 0
    assert state.orders == {pi: "placed" for _, pi in carts}
    assert state.levels == {"sku-a": 4}
    assert await dead_letters(infra, topic) == []


async def test_a_consumer_that_outwaits_its_start_up_deadline_says_to_migrate(
    infra: Services, empty_database_url: str, topic: str
) -> None:
    settings = consumer_settings(infra, empty_database_url, topic, startup_timeout_s=0.3)
    needs = f"version 0 and this code needs {needed_version()}: run `order-consumer"
    with pytest.raises(StartupError, match=needs):
        async with Worker(settings):
            pass


async def test_a_connection_to_a_database_behind_the_code_is_refused_mid_run(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """The schema check runs on every new connection, not only at start-up."""
    await seed_stock(db, {"sku-a": 10})
    carts = await paid_carts(db, 6, [("sku-a", 1, 100)])
    migrations = await db.fetch("SELECT version, name FROM schema_migrations")
    async with Worker(consumer_settings(infra, database_url, topic)) as worker:
        running = asyncio.create_task(worker.run())
        await eventually(lambda: bool(worker.assignment()))
        await publish(infra, topic, carts[:3])
        await eventually(lambda: worker.stats.events == 3)
        # The consumer reconnects to what looks like an older database (a restore).
        await db.execute("DELETE FROM schema_migrations")
        await cut_consumer_sessions(db)
        await publish(infra, topic, carts[3:])
        await eventually(lambda: worker.stats.retries_by_cause["schema_mismatch"] >= 3)
        assert await order_count(db) == 3
        await db.executemany(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            [tuple(r) for r in migrations],
        )
        await eventually(lambda: worker.stats.events == 6)
        worker.request_stop()
        stats = await running
    assert stats.dead_lettered == 0
    assert len((await snapshot(db)).orders) == 6


@pytest.mark.parametrize(
    ("breakage", "repair", "expected_cause"),
    [
        pytest.param(
            "ALTER TABLE order_items RENAME TO order_items_elsewhere",
            "ALTER TABLE order_items_elsewhere RENAME TO order_items",
            "schema_mismatch",
            id="missing-table-42P01",
        ),
        pytest.param(
            "ALTER TABLE orders RENAME COLUMN source_event_id TO source_event",
            "ALTER TABLE orders RENAME COLUMN source_event TO source_event_id",
            "schema_mismatch",
            id="missing-column-42703",
        ),
        pytest.param(
            "REVOKE INSERT ON orders FROM {role}",
            "GRANT INSERT ON orders TO {role}",
            "database_privileges",
            id="privileges-42501",
        ),
    ],
)
async def test_a_database_that_refuses_for_its_own_reasons_is_waited_out_not_dead_lettered(
    infra: Services,
    database_url: str,
    db: asyncpg.Connection,
    topic: str,
    breakage: str,
    repair: str,
    expected_cause: str,
) -> None:
    await seed_stock(db, {"sku-a": 10})
    carts = await paid_carts(db, 4, [("sku-a", 1, 100)])
    # The consumer logs in as a role of its own, as in production, not as a superuser.
    role = f"intentflow_app_{secrets.token_hex(4)}"
    await db.execute(f'CREATE ROLE "{role}" LOGIN')
    await db.execute(f'GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO "{role}"')
    as_role = database_url.replace("postgres@", f"{role}@", 1)
    assert as_role != database_url
    try:
        await db.execute(breakage.format(role=f'"{role}"'))
        await publish(infra, topic, carts)
        async with Worker(consumer_settings(infra, as_role, topic)) as worker:
            running = asyncio.create_task(worker.run())
            await eventually(lambda: worker.stats.retries_by_cause[expected_cause] >= 3)
            assert await order_count(db) == 0
            await db.execute(repair.format(role=f'"{role}"'))
            await eventually(lambda: worker.stats.events == 4)
            worker.request_stop()
            stats = await running
        assert stats.dead_lettered == 0
        assert await dead_letters(infra, topic) == []
        assert len((await snapshot(db)).orders) == 4
    finally:
        await db.execute(f'DROP OWNED BY "{role}"')
        await db.execute(f'DROP ROLE "{role}"')


async def test_a_batch_that_keeps_timing_out_is_split_until_it_fits(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """SQLSTATE 57014 twice in a row: halves, each in its own transaction, nothing lost."""
    await seed_stock(db, {"sku-a": 100})
    carts = await paid_carts(db, 32, [("sku-a", 1, 100)])
    # Every order row costs 100 ms: a transaction of five or more outlives the timeout.
    await db.execute(
        """
        CREATE FUNCTION slow_order() RETURNS trigger LANGUAGE plpgsql
        AS $$ BEGIN PERFORM pg_sleep(0.1); RETURN NEW; END $$;
        CREATE TRIGGER slow_order BEFORE INSERT ON orders
        FOR EACH ROW EXECUTE FUNCTION slow_order();
        """
    )
    await publish(infra, topic, carts, partition=0)
    settings = consumer_settings(infra, database_url, topic, db_statement_timeout_ms=450)
    async with Worker(settings) as worker:
        stats = await run_until(worker, lambda: worker.stats.events == 32, timeout_s=60)
    assert stats.splits >= 1
    assert stats.retries_by_cause["statement_timeout"] >= 2
    assert stats.dead_lettered == 0
    state = await snapshot(db)
    assert len(state.orders) == 32 and state.levels == {"sku-a": 68}


async def test_a_batch_slower_than_the_rebalance_drain_neither_crashes_nor_doubles(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """Offsets are committed only for partitions still owned; a refused commit is no crash."""
    await seed_stock(db, {"sku-a": 1000})
    carts = await paid_carts(db, 24, [("sku-a", 1, 100)])
    settings = consumer_settings(infra, database_url, topic, rebalance_drain_timeout_s=1.0)
    blocker, held = await hold_stock_row(database_url, "sku-a")

    async def all_orders_placed(count: int) -> bool:
        return await order_count(db) == count

    try:
        async with Worker(settings) as first:
            first_run = asyncio.create_task(first.run())
            await eventually(lambda: bool(first.assignment()))
            await publish(infra, topic, carts)  # over many partitions
            await eventually(lambda: _waits_on_a_lock(db))
            async with Worker(settings) as second:
                second_run = asyncio.create_task(second.run())
                # The rebalance goes on without the slow batch, after the drain timeout.
                await eventually(lambda: bool(second.assignment()), timeout_s=40)
                await held.rollback()  # the slow batch commits now, its partitions moved
                await eventually(lambda: all_orders_placed(24))
                await asyncio.sleep(1)
                second.request_stop()
                first.request_stop()
                await second_run
                await first_run  # no IllegalStateError from committing moved partitions
    finally:
        await blocker.close()
    state = await snapshot(db)
    assert len(state.orders) == 24
    assert state.levels == {"sku-a": 976}
    assert state.order_movements == 24
    assert state.processed == 24
    state.assert_movements_explain_levels()


async def test_a_missing_dead_letter_topic_stops_start_up_and_is_not_created(
    infra: Services, database_url: str
) -> None:
    topic = f"stripe.events.{secrets.token_hex(6)}"
    await create_topics(infra.kafka_bootstrap_servers, topic)  # and no `.dlq`
    settings = consumer_settings(infra, database_url, topic, startup_timeout_s=0.3)
    for _ in range(2):  # asking twice shows that asking did not create it
        with pytest.raises(StartupError, match=rf"topic '{topic}\.dlq' does not exist"):
            async with Worker(settings, exit_when_idle_s=1):
                pass


async def test_a_dead_letter_too_large_for_the_producer_stops_the_worker_and_skips_nothing(
    infra: Services, database_url: str, topic: str
) -> None:
    poison = b"{" + b"x" * 4000  # not JSON, and over the producer's 1 KiB request limit
    await publish(infra, topic, [poison], partition=0, key=b"pi_big")
    small = consumer_settings(infra, database_url, topic, kafka_max_request_bytes=1024)
    async with Worker(small, exit_when_idle_s=2) as worker:
        with pytest.raises(DeadLetterRefused, match="partition 0 offset 0"):
            await worker.run()
    assert await dead_letters(infra, topic) == []
    # Its offset was not committed: with the limit raised, it goes where it belongs.
    async with Worker(consumer_settings(infra, database_url, topic), exit_when_idle_s=2) as again:
        stats = await again.run()
    assert stats.dead_lettered == 1
    [dead] = await read_topic(infra.kafka_bootstrap_servers, dlq_topic(topic), 1, timeout_s=10)
    assert dead.value == poison


async def test_a_stop_during_a_rebalance_is_obeyed_by_the_deadline(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """aiokafka's poll waits out a reassignment whatever its timeout; the stop does not wait.

    The member's batch is stuck on a row lock, so the rebalance a second member
    starts waits in the revoke listener for the (long) drain; meanwhile the
    member is asked to stop, as a rolling update does.
    """
    await seed_stock(db, {"sku-a": 100})
    carts = await paid_carts(db, 12, [("sku-a", 1, 100)])
    slow_drain = consumer_settings(
        infra, database_url, topic, rebalance_drain_timeout_s=60, shutdown_timeout_s=4
    )
    blocker, held = await hold_stock_row(database_url, "sku-a")
    loop = asyncio.get_running_loop()
    try:
        leaving = Worker(slow_drain)
        await leaving.start()
        leaving_run = asyncio.create_task(leaving.run())
        await eventually(lambda: bool(leaving.assignment()))
        await publish(infra, topic, carts)
        await eventually(lambda: _waits_on_a_lock(db))
        joining = Worker(consumer_settings(infra, database_url, topic))
        await joining.start()
        joining_run = asyncio.create_task(joining.run())
        await asyncio.sleep(1.5)  # the group is rebalancing, held up by the drain
        asked = loop.time()
        leaving.request_stop()
        stats = await asyncio.wait_for(leaving_run, 4 + 5)
        await asyncio.wait_for(leaving.stop(), 5)
        assert loop.time() - asked < 4 + 5
        assert stats.abandoned == 1 and stats.events == 0
        await held.rollback()  # the lock goes; the remaining member takes everything
        await eventually(lambda: joining.stats.events >= 12, timeout_s=40)
        joining.request_stop()
        await joining_run
        await joining.stop()
    finally:
        await blocker.close()
    state = await snapshot(db)
    assert len(state.orders) == 12 and state.levels == {"sku-a": 88}
    assert state.processed == 12


async def _waits_on_a_lock(db: asyncpg.Connection) -> bool:
    return bool(
        await db.fetchval(
            """
            SELECT count(*) FROM pg_stat_activity WHERE application_name = 'order-consumer'
            AND datname = current_database() AND wait_event_type = 'Lock'
            """
        )
    )


async def test_a_stop_while_another_member_holds_up_the_rebalance_is_obeyed_by_the_deadline(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """An idle member asked to stop while another one drains a slow batch (a rolling update).

    Its poll is stuck in aiokafka's wait for the new assignment, which only the
    other member can end; the stop cuts it short, and the member closes its
    connections without waiting to leave.
    """
    await seed_stock(db, {"sku-a": 100})
    carts = await paid_carts(db, 12, [("sku-a", 1, 100)])
    settings = consumer_settings(
        infra, database_url, topic, rebalance_drain_timeout_s=60, shutdown_timeout_s=4
    )
    blocker, held = await hold_stock_row(database_url, "sku-a")
    loop = asyncio.get_running_loop()
    workers: list[Worker] = []
    runs: list[asyncio.Task[Any]] = []

    async def join() -> Worker:
        worker = await Worker(settings).start()
        workers.append(worker)
        runs.append(asyncio.create_task(worker.run()))
        return worker

    try:
        draining = await join()
        await eventually(lambda: bool(draining.assignment()))
        await publish(infra, topic, carts)
        await eventually(lambda: _waits_on_a_lock(db))  # its batch holds the next rebalance
        idle = await join()  # joins: the group waits for `draining` to give its partitions back
        await asyncio.sleep(1.5)
        asked = loop.time()
        idle.request_stop()
        await asyncio.wait_for(runs[1], 4 + 5)
        await asyncio.wait_for(idle.stop(), 5)
        assert loop.time() - asked < 4 + 5
        assert idle.stats.events == 0
        await held.rollback()
        await eventually(lambda: draining.stats.events >= 12, timeout_s=60)
    finally:
        for worker in workers:
            worker.request_stop()
        await asyncio.gather(*runs, return_exceptions=True)
        for worker in workers:
            await worker.stop()
        await blocker.close()
    state = await snapshot(db)
    assert len(state.orders) == 12 and state.levels == {"sku-a": 88}

"""Bad input gets a clear reason and loses nothing; a database outage is waited out."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from intentflow.consumer.migrate import migrate, needed_version
from intentflow.consumer.worker import Worker
from intentflow.devservices import Services
from intentflow.devservices.proxy import Proxy
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


async def test_poison_goes_to_the_dead_letter_topic_with_its_reason_and_the_rest_applies(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    await seed_stock(db, {"sku-a": 5})
    total = await seed_cart(db, "cart-1", [("sku-a", 1, 100)])
    good = events.intent_event("pi_good", amount=total, cart_id="cart-1")
    wrong_key = events.intent_event("pi_other", amount=total, cart_id="cart-1")
    # All on one partition, poison between good events, so offsets must advance past it.
    await publish(infra, topic, [b"{not json"], partition=0, key=b"pi_x")
    await publish(infra, topic, [wrong_key], partition=0, key=b"pi_not_the_intent")
    await publish(infra, topic, [good], partition=0, key=b"pi_good")
    settings = consumer_settings(infra, database_url, topic)
    async with Worker(settings, exit_when_idle_s=2) as worker:
        stats = await worker.run()
    assert stats.dead_lettered == 2
    assert (await snapshot(db)).orders == {"pi_good": "placed"}

    dead = await read_topic(
        infra.kafka_bootstrap_servers, dlq_topic(topic), 2, timeout_s=15, settle_s=0.5
    )
    assert dead[0].value == b"{not json"
    headers = [dict(r.headers) for r in dead]
    assert [h["error"] for h in headers] == [b"invalid_json", b"key_mismatch"]
    assert all(h["original-partition"] == b"0" for h in headers)
    assert [h["original-offset"] for h in headers] == [b"0", b"1"]
    assert b"pi_not_the_intent" in headers[1]["error-detail"]
    assert [r.key for r in dead] == [b"pi_x", b"pi_not_the_intent"]

    # Offsets were committed past the poison: a restart reads nothing again.
    async with Worker(settings, exit_when_idle_s=2) as again:
        assert (await again.run()).events == 0


async def test_database_outage_is_waited_out_and_nothing_is_skipped(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    await seed_stock(db, {"sku-a": 100})
    batch = await paid_carts(db, 30, [("sku-a", 1, 100)])
    url = urlsplit(database_url)
    proxy = await Proxy(url.hostname or "127.0.0.1", url.port or 5432).start()
    through_proxy = urlunsplit(url._replace(netloc=f"{url.username}@127.0.0.1:{proxy.port}"))
    settings = consumer_settings(infra, through_proxy, topic)

    async with Worker(settings, exit_when_idle_s=3) as worker:
        run = asyncio.create_task(worker.run())
        await eventually(lambda: bool(worker.assignment()))
        await proxy.cut()  # the pool's connection breaks; new ones are refused
        await publish(infra, topic, batch)
        # Backing off, partitions paused, still a member of the group.
        await eventually(lambda: worker.stats.retries >= 5)
        assert await db.fetchval("SELECT count(*) FROM orders") == 0
        assert not run.done()
        await proxy.restore()
        stats = await run
    await proxy.cut()

    assert stats.events == 30
    state = await snapshot(db)
    assert len(state.orders) == 30 and set(state.orders.values()) == {"placed"}
    assert state.levels == {"sku-a": 70}


async def test_migrate_is_safe_twice_and_from_two_processes_at_once(
    infra: Services,
) -> None:
    admin = await asyncpg.connect(infra.database_url)
    name = "intentflow_migrate_race"
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = infra.database_url.rpartition("/")[0] + f"/{name}"
    try:
        conns = [await asyncpg.connect(url) for _ in range(2)]
        applied = await asyncio.gather(*(migrate(c) for c in conns))
        every = list(range(1, needed_version() + 1))
        assert sorted(applied, key=len) == [[], every]  # exactly one of them did the work
        assert await migrate(conns[0]) == []
        tables = {
            r["tablename"]
            for r in await conns[0].fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        }
        assert {
            "inventory_levels", "carts", "cart_items", "orders", "order_items",
            "inventory_movements", "processed_events", "payment_intents", "schema_migrations",
        } <= tables  # fmt: skip
        for c in conns:
            await c.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_stock_changed_outside_the_consumer_still_gets_a_movement(
    db: asyncpg.Connection,
) -> None:
    """Invariant 4 holds for a storefront's plain INSERT and a manual correction."""
    await seed_stock(db, {"sku-a": 10})
    await db.execute("UPDATE inventory_levels SET stocked_quantity = 7 WHERE sku = 'sku-a'")
    rows = await db.fetch("SELECT quantity_delta, reason FROM inventory_movements ORDER BY id")
    assert [tuple(r) for r in rows] == [(10, "restock"), (-3, "adjustment")]
    state = await snapshot(db)
    state.assert_movements_explain_levels()


async def test_an_event_the_database_rejects_is_isolated_and_dead_lettered(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """Bisection: the rest of the batch applies; the one event goes to the DLQ with the reason."""
    await seed_stock(db, {"sku-a": 10})
    good = await paid_carts(db, 6, [("sku-a", 1, 100)])
    # Valid JSON and a valid event, but PostgreSQL text cannot hold a NUL character.
    bad = events.intent_event("pi_bad", amount=100, cart_id="cart-\x00")
    await publish(infra, topic, [*good[:3], bad, *good[3:]], partition=0)
    async with Worker(consumer_settings(infra, database_url, topic), exit_when_idle_s=2) as w:
        stats = await w.run()
    assert stats.dead_lettered == 1
    state = await snapshot(db)
    assert state.orders == {f"pi_{i}": "placed" for i in range(6)}
    assert state.levels == {"sku-a": 4}
    (dead,) = await read_topic(
        infra.kafka_bootstrap_servers, dlq_topic(topic), 1, timeout_s=15, settle_s=0.5
    )
    headers = dict(dead.headers)
    assert headers["error"] == b"rejected_by_database"
    assert headers["original-offset"] == b"3"
    assert dead.key == b"pi_bad"

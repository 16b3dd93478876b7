"""Exactly once per payment intent, against the real broker and PostgreSQL.

Each test names the mechanism it covers; without that mechanism it would fail.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from intentflow.consumer.worker import Worker
from intentflow.devservices import Services
from intentflow.stripekit import events
from tests.support import (
    ConsumerProcess,
    consumer_settings,
    eventually,
    paid_carts,
    publish,
    seed_cart,
    seed_stock,
    snapshot,
)


class SimulatedCrash(Exception):
    """The process died between the database commit and the offset commit."""


class CrashBeforeOffsetCommit(Worker):
    async def commit_offsets(self, records: Any, *, epoch: int | None = None) -> None:
        raise SimulatedCrash


async def test_one_event_delivered_ten_times_to_two_consumer_processes_gives_one_order(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """Inbox (invariant 2) and UNIQUE payment_intent_id (invariant 1)."""
    await seed_stock(db, {"sku-a": 10})
    total = await seed_cart(db, "cart-1", [("sku-a", 3, 700)])
    evt = events.intent_event("pi_dup", amount=total, cart_id="cart-1")
    # The same event on ten partitions, so both group members see copies at once.
    for partition in range(10):
        await publish(infra, topic, [evt], partition=partition)
    settings = consumer_settings(infra, database_url, topic)
    first, second = ConsumerProcess(settings), ConsumerProcess(settings)
    await asyncio.gather(first.start(), second.start())
    summaries = await asyncio.gather(first.wait(), second.wait())

    assert sum(s["events"] for s in summaries) == 10
    assert sum(s["duplicates"] for s in summaries) == 9
    state = await snapshot(db)
    assert state.orders == {"pi_dup": "placed"}
    assert state.levels == {"sku-a": 7}
    assert state.order_movements == 1
    assert state.processed == 1
    state.assert_movements_explain_levels()


async def test_crash_after_database_commit_replays_with_no_second_effect(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """Offsets after the database commit (invariant 5), replay absorbed by the inbox."""
    await seed_stock(db, {"sku-a": 100})
    await publish(infra, topic, await paid_carts(db, 20, [("sku-a", 2, 100)]))
    settings = consumer_settings(infra, database_url, topic)

    crashing = CrashBeforeOffsetCommit(settings, exit_when_idle_s=3)
    await crashing.start()
    try:
        crashed = False
        try:
            await crashing.run()
        except SimulatedCrash:
            crashed = True
        assert crashed
    finally:
        await crashing.stop()
    after_crash = await snapshot(db)
    assert len(after_crash.orders) > 0  # the database commit happened

    async with Worker(settings, exit_when_idle_s=3) as replay:
        stats = await replay.run()
    state = await snapshot(db)
    assert stats.events >= len(after_crash.orders)  # the uncommitted batch came back
    assert stats.duplicates == len(after_crash.orders)  # ... and changed nothing
    assert len(state.orders) == 20 and set(state.orders.values()) == {"placed"}
    assert state.levels == {"sku-a": 60}
    assert state.order_movements == 20
    state.assert_movements_explain_levels()


async def test_rebalance_mid_run_loses_nothing_and_doubles_nothing(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """Drain-on-revoke listener and inbox: a member joins, then leaves, while events flow."""
    await seed_stock(db, {"sku-a": 10_000, "sku-b": 10_000})
    waves: list[list[dict[str, Any]]] = [[], [], []]
    for i in range(300):
        total = await seed_cart(db, f"cart-{i}", [("sku-a", 1, 100), ("sku-b", 2, 50)])
        auth = events.intent_event(f"pi_{i}", amount=total, cart_id=f"cart-{i}")
        capture = events.intent_event(
            f"pi_{i}", amount=total, cart_id=f"cart-{i}", status="succeeded"
        )
        waves[i % 3] += [auth, capture, auth]  # a duplicate of the authorization too
    settings = consumer_settings(infra, database_url, topic)

    async def orders_placed(at_least: int) -> bool:
        return int(await db.fetchval("SELECT count(*) FROM orders")) >= at_least

    await publish(infra, topic, waves[0])
    # Idle long enough to outlast a session timeout: the broker reassigns the
    # leaver's partitions to the stayer at the latest after that.
    async with Worker(settings, exit_when_idle_s=10) as stayer:
        stayer_run = asyncio.create_task(stayer.run())
        await eventually(lambda: orders_placed(100))
        async with Worker(settings) as visitor:
            visitor_run = asyncio.create_task(visitor.run())
            await eventually(lambda: bool(visitor.assignment()))
            await publish(infra, topic, waves[1])
            await eventually(lambda: orders_placed(200))
            visitor.request_stop()
            visitor_stats = await visitor_run
        await publish(infra, topic, waves[2])
        stayer_stats = await stayer_run

    state = await snapshot(db)
    assert len(state.orders) == 300 and set(state.orders.values()) == {"placed"}
    assert state.levels == {"sku-a": 10_000 - 300, "sku-b": 10_000 - 600}
    assert state.order_movements == 600
    assert state.processed == 600  # distinct event ids: one authorization, one capture each
    assert visitor_stats.events > 0  # the visitor really took part
    assert visitor_stats.events + stayer_stats.events >= 900
    state.assert_movements_explain_levels()
    statuses = await db.fetch("SELECT DISTINCT status FROM payment_intents")
    assert [r["status"] for r in statuses] == ["succeeded"]


async def test_scarce_sku_from_two_consumer_processes_never_oversells(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """Row locks, CHECK (stocked_quantity >= 0), allocation refusing short orders.

    Lock order itself is tested in test_lock_order.py: these carts list SKUs ascending.
    """
    initial = 25
    await seed_stock(db, {"scarce": initial, "plenty": 1_000})
    demand: dict[str, int] = {}
    batch = []
    for i in range(60):
        want = 1 + i % 3
        demand[f"pi_{i}"] = want
        total = await seed_cart(db, f"cart-{i}", [("plenty", 1, 10), ("scarce", want, 100)])
        batch.append(events.intent_event(f"pi_{i}", amount=total, cart_id=f"cart-{i}"))
    settings = consumer_settings(infra, database_url, topic, batch_max_records=8)
    consumers = [ConsumerProcess(settings), ConsumerProcess(settings)]
    await asyncio.gather(*(c.start() for c in consumers))
    await publish(infra, topic, batch)
    await asyncio.gather(*(c.wait() for c in consumers))

    state = await snapshot(db)
    left = state.levels["scarce"]
    placed = [pi for pi, status in state.orders.items() if status == "placed"]
    short = [pi for pi, status in state.orders.items() if status == "out_of_stock"]
    assert len(placed) + len(short) == 60
    assert left >= 0
    assert sum(demand[pi] for pi in placed) == initial - left
    # No refused order could have been filled by what is left.
    assert all(demand[pi] > left for pi in short)
    assert state.levels["plenty"] == 1_000 - len(placed)
    state.assert_movements_explain_levels()


async def test_two_lines_of_one_sku_are_checked_against_stock_as_their_sum(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """Quantities summed per SKU per order before the check (invariant 3)."""
    await seed_stock(db, {"tight": 3, "exact": 4})
    short_total = await seed_cart(db, "cart-short", [("tight", 2, 100), ("tight", 2, 100)])
    fits_total = await seed_cart(db, "cart-fits", [("exact", 2, 100), ("exact", 2, 100)])
    await publish(
        infra,
        topic,
        [
            events.intent_event("pi_short", amount=short_total, cart_id="cart-short"),
            events.intent_event("pi_fits", amount=fits_total, cart_id="cart-fits"),
        ],
    )
    async with Worker(consumer_settings(infra, database_url, topic), exit_when_idle_s=2) as w:
        await w.run()
    state = await snapshot(db)
    assert state.orders == {"pi_short": "out_of_stock", "pi_fits": "placed"}
    assert state.levels == {"tight": 3, "exact": 0}
    movements = await db.fetch(
        "SELECT sku, quantity_delta FROM inventory_movements WHERE reason = 'order'"
    )
    assert [tuple(r) for r in movements] == [("exact", -4)]  # one movement per SKU per order
    state.assert_movements_explain_levels()


async def test_mismatched_or_missing_cart_needs_review_and_a_payment_naming_none_is_no_order(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    await seed_stock(db, {"sku-a": 5})
    total = await seed_cart(db, "cart-1", [("sku-a", 1, 1000)])
    await seed_cart(db, "cart-eur", [("sku-a", 1, 1000)], currency="eur")
    await publish(
        infra,
        topic,
        [
            events.intent_event("pi_amount", amount=total - 1, cart_id="cart-1"),
            events.intent_event("pi_currency", amount=total, cart_id="cart-eur"),
            events.intent_event("pi_missing", amount=total, cart_id="cart-nowhere"),
            events.intent_event("pi_no_cart_id", amount=total, cart_id=None),
        ],
    )
    async with Worker(consumer_settings(infra, database_url, topic), exit_when_idle_s=2) as w:
        await w.run()
    reasons = {
        r["payment_intent_id"]: (r["status"], r["status_reason"])
        for r in await db.fetch("SELECT payment_intent_id, status, status_reason FROM orders")
    }
    assert reasons == {
        "pi_amount": ("needs_review", "amount_mismatch"),
        "pi_currency": ("needs_review", "currency_mismatch"),
        "pi_missing": ("needs_review", "cart_missing"),
    }
    # Not the shop's payment: kept on the intents table, recorded, never an order.
    not_ours = await db.fetchrow(
        "SELECT p.status, e.outcome FROM payment_intents p"
        " JOIN processed_events e ON e.payment_intent_id = p.id WHERE p.id = 'pi_no_cart_id'"
    )
    assert not_ours is not None
    assert tuple(not_ours) == ("requires_capture", "not_an_order")
    state = await snapshot(db)
    assert state.levels == {"sku-a": 5}
    assert state.order_movements == 0


async def test_reordered_events_end_in_the_same_state_and_late_ones_are_recorded_stale(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """Status ranks (invariant 6): a capture that overtook its authorization, and the
    intent's creation, later still. The authorization still teaches something (its
    snapshot is the earliest to hold the money: the one whose metadata names the cart);
    the creation nothing."""
    await seed_stock(db, {"sku-a": 5})
    total = await seed_cart(db, "cart-1", [("sku-a", 1, 1000)])
    capture = events.intent_event("pi_1", amount=total, cart_id="cart-1", status="succeeded")
    auth = events.intent_event("pi_1", amount=total, cart_id="cart-1")
    created = events.intent_event(
        "pi_1", amount=total, cart_id="cart-1", status="requires_payment_method"
    )
    settings = consumer_settings(infra, database_url, topic)
    await publish(infra, topic, [capture])
    async with Worker(settings, exit_when_idle_s=2) as w:
        await w.run()
    await publish(infra, topic, [auth, created])
    async with Worker(settings, exit_when_idle_s=2) as w:
        await w.run()
    state = await snapshot(db)
    assert state.orders == {"pi_1": "placed"}
    assert state.levels == {"sku-a": 4}
    assert await db.fetchval("SELECT status FROM payment_intents WHERE id = 'pi_1'") == "succeeded"
    rows = await db.fetch("SELECT event_id, outcome FROM processed_events")
    outcomes = {r["event_id"]: r["outcome"] for r in rows}
    assert outcomes == {capture["id"]: "applied", auth["id"]: "applied", created["id"]: "stale"}

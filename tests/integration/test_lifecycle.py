"""The whole life of a payment (issue 7), through the real broker, consumer and PostgreSQL.

Each test publishes one story of Stripe events as the bridge would, lets the
consumer apply them, and checks what the database ends with: the order's
status and columns, stock levels, the movement rows and their sum, and each
event's outcome in the inbox. The rules are consumer/lifecycle.py's and
consumer/decisions.py's; here they are checked from the outside.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.worker import Worker
from intentflow.devservices import Services
from intentflow.schemas import contract_headers, encode_key
from intentflow.stripekit import events
from intentflow.stripekit.events import dispute_event, expired_event, refunded_event
from tests.support import (
    consumer_settings,
    eventually,
    publish,
    seed_cart,
    seed_stock,
    snapshot,
)

# Stripe's `created` of the first event of every story: in the past, whole seconds.
T = int(time.time()) - 3600


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(4)}"


def intent_event(
    intent_id: str,
    *,
    cart_id: str | None,
    amount: int,
    status: str,
    at: int,
    held: int | None = None,
    cancellation_reason: str | None = None,
) -> dict[str, Any]:
    """A `payment_intent.*` event sent at `at`; `held` overrides what the card issuer holds."""
    obj = events.payment_intent(intent_id, amount=amount, status=status, cart_id=cart_id, created=T)
    if held is not None:
        obj["amount_capturable"] = held
    obj["cancellation_reason"] = cancellation_reason
    evt = events.event(obj, events.EVENT_TYPE_OF_STATUS[status])
    evt["created"] = at
    return evt


def authorization(intent_id: str, cart_id: str, amount: int, at: int = T) -> dict[str, Any]:
    return intent_event(intent_id, cart_id=cart_id, amount=amount, status="requires_capture", at=at)


def cancellation(
    intent_id: str, cart_id: str, amount: int, at: int, reason: str = "requested_by_customer"
) -> dict[str, Any]:
    return intent_event(
        intent_id,
        cart_id=cart_id,
        amount=amount,
        status="canceled",
        at=at,
        cancellation_reason=reason,
    )


@asynccontextmanager
async def consuming(settings: ConsumerSettings) -> AsyncIterator[Worker]:
    """One consumer-group member running in the background until the block ends."""
    async with Worker(settings) as worker:
        running = asyncio.create_task(worker.run())
        try:
            yield worker
        finally:
            worker.request_stop()
            await running
        assert worker.stats.dead_lettered == 0


async def applied(worker: Worker, count: int) -> None:
    """Wait until `worker` has applied (and committed) `count` events in all."""
    await eventually(lambda: worker.stats.events >= count, timeout_s=20)


async def order_of(db: asyncpg.Connection, intent_id: str) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM orders WHERE payment_intent_id = $1", intent_id)
    assert row is not None, f"no order for {intent_id}"
    return row


async def movements_of(db: asyncpg.Connection, intent_id: str) -> list[tuple[str, int, str]]:
    """The intent's order's movements as (sku, delta, reason), in the order written."""
    rows = await db.fetch(
        """
        SELECT m.sku, m.quantity_delta, m.reason FROM inventory_movements m
        JOIN orders o ON o.id = m.order_id WHERE o.payment_intent_id = $1 ORDER BY m.id
        """,
        intent_id,
    )
    return [(r["sku"], r["quantity_delta"], r["reason"]) for r in rows]


async def outcomes(db: asyncpg.Connection) -> dict[str, str]:
    rows = await db.fetch("SELECT event_id, outcome FROM processed_events")
    return {r["event_id"]: r["outcome"] for r in rows}


async def levels_explained(db: asyncpg.Connection, expected: dict[str, int]) -> None:
    """The levels are `expected`, and the movements sum to every one of them (invariant 4)."""
    state = await snapshot(db)
    assert state.levels == expected
    state.assert_movements_explain_levels()


async def group_caught_up(infra: Services, settings: ConsumerSettings) -> bool:
    """Whether the group has committed every record of the topic (applied them all)."""
    reader = AIOKafkaConsumer(
        bootstrap_servers=infra.kafka_bootstrap_servers,
        group_id=settings.kafka_group_id,
        enable_auto_commit=False,
    )
    await reader.start()
    try:
        await reader.topics()  # fetches the cluster's metadata
        parts = reader.partitions_for_topic(settings.kafka_topic) or set()
        partitions = [TopicPartition(settings.kafka_topic, p) for p in sorted(parts)]
        ends = await reader.end_offsets(partitions)
        for tp in partitions:
            if ends[tp] and (await reader.committed(tp) or 0) < ends[tp]:
                return False
        return True
    finally:
        await reader.stop()


async def publish_received_at(
    infra: Services, topic: str, stamped: list[tuple[dict[str, Any], int]]
) -> None:
    """Publish events in this order to partition 0, each with its own `received-at` (ms).

    Two bridge replicas can publish in the opposite order to the one they
    received in; `stripekit.publish` stamps one time for a whole call.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=infra.kafka_bootstrap_servers,
        acks="all",
        enable_idempotence=infra.kafka_enable_idempotence,
    )
    await producer.start()
    try:
        for evt, received_at_ms in stamped:
            headers = contract_headers(evt["id"], evt["type"], received_at_ms)
            intent = evt["data"]["object"]["id"]
            await producer.send_and_wait(
                topic, events.encode(evt), key=encode_key(intent), headers=headers, partition=0
            )
    finally:
        await producer.stop()


# --- Cancellation ------------------------------------------------------------------


async def test_a_cancel_delivered_three_times_across_a_rebalance_gives_the_stock_back_once(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """Copies before and after a member joins, and while one leaves: one `cancellation` per SKU."""
    pi, cart = new_id("pi"), new_id("cart")
    await seed_stock(db, {"sku-a": 5, "sku-b": 5})
    total = await seed_cart(db, cart, [("sku-a", 2, 300), ("sku-b", 1, 400)])
    auth, cancel = authorization(pi, cart, total), cancellation(pi, cart, total, at=T + 60)
    settings = consumer_settings(infra, database_url, topic)

    first = await Worker(settings).start()
    first_run = asyncio.create_task(first.run())
    try:
        await publish(infra, topic, [auth])
        await applied(first, 1)
        assert (await order_of(db, pi))["status"] == "placed"
        await publish(infra, topic, [cancel])  # copy 1, as the second member joins
        async with Worker(settings) as second:
            second_run = asyncio.create_task(second.run())
            await eventually(lambda: bool(second.assignment()), timeout_s=30)
            await publish(infra, topic, [cancel])  # copy 2, after the rebalance
            first.request_stop()  # the first member leaves mid-way ...
            await publish(infra, topic, [cancel])  # ... and copy 3 comes as it goes
            first_stats = await first_run
            await first.stop()
            await eventually(lambda: group_caught_up(infra, settings), timeout_s=30)
            second.request_stop()
            second_stats = await second_run
    finally:
        first.request_stop()
        await asyncio.gather(first_run, return_exceptions=True)
        await first.stop()

    assert second_stats.events >= 1  # both members took part
    assert first_stats.dead_lettered == second_stats.dead_lettered == 0
    assert first_stats.duplicates + second_stats.duplicates >= 2  # the inbox absorbed copies
    order = await order_of(db, pi)
    assert (order["status"], order["allocation"]) == ("canceled", "placed")
    assert order["cancellation_reason"] == "requested_by_customer"
    assert await movements_of(db, pi) == [
        ("sku-a", -2, "order"),
        ("sku-b", -1, "order"),
        ("sku-a", 2, "cancellation"),
        ("sku-b", 1, "cancellation"),
    ]
    await levels_explained(db, {"sku-a": 5, "sku-b": 5})
    # The authorization and the cancel, once each.
    assert await outcomes(db) == {auth["id"]: "applied", cancel["id"]: "applied"}


async def test_a_cancel_that_arrives_before_the_authorization_gives_a_canceled_order_and_no_stock(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """Chosen behaviour: a `skipped` order, canceled, in a later batch or in the same one."""
    later, same = new_id("pi"), new_id("pi")
    await seed_stock(db, {"sku-a": 1})
    carts = {pi: new_id("cart") for pi in (later, same)}
    totals = {pi: await seed_cart(db, cart, [("sku-a", 1, 1000)]) for pi, cart in carts.items()}
    cancels = {pi: cancellation(pi, carts[pi], totals[pi], at=T + 30) for pi in carts}
    auths = {pi: authorization(pi, carts[pi], totals[pi], at=T) for pi in carts}

    async with consuming(consumer_settings(infra, database_url, topic)) as worker:
        await publish(infra, topic, [cancels[later]])
        await applied(worker, 1)
        await publish(infra, topic, [auths[later], cancels[same], auths[same]])
        await applied(worker, 4)

    for pi in (later, same):
        order = await order_of(db, pi)
        assert (order["status"], order["allocation"]) == ("canceled", "skipped"), pi
        assert order["cancellation_reason"] == "requested_by_customer"
        assert await movements_of(db, pi) == []
    await levels_explained(db, {"sku-a": 1})  # scarce, and nobody took it
    assert set((await outcomes(db)).values()) == {"applied"}


async def test_an_expired_authorization_cancels_the_order_and_gives_the_stock_back_once(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """charge.expired alone, and followed by Stripe's own automatic cancel of the intent."""
    lapsed, canceled = new_id("pi"), new_id("pi")
    await seed_stock(db, {"sku-a": 4})
    carts = {pi: new_id("cart") for pi in (lapsed, canceled)}
    totals = {pi: await seed_cart(db, cart, [("sku-a", 2, 500)]) for pi, cart in carts.items()}
    week = 7 * 24 * 3600

    async with consuming(consumer_settings(infra, database_url, topic)) as worker:
        await publish(infra, topic, [authorization(pi, carts[pi], totals[pi]) for pi in carts])
        await applied(worker, 2)
        await levels_explained(db, {"sku-a": 0})
        await publish(
            infra, topic, [expired_event(pi, amount=totals[pi], created=T + week) for pi in carts]
        )
        await applied(worker, 4)
        # Stripe cancels the intent too; in a later batch, it must not give the stock back again.
        auto = cancellation(canceled, carts[canceled], totals[canceled], T + week + 1, "automatic")
        await publish(infra, topic, [auto])
        await applied(worker, 5)

    reasons = {lapsed: "expired", canceled: "automatic"}  # the latest canceling event's
    for pi, reason in reasons.items():
        known = "SELECT cancellation_reason FROM payment_intents WHERE id = $1"
        assert await db.fetchval(known, pi) == reason, pi
        order = await order_of(db, pi)  # carries the intent's reason, whatever the batches
        assert (order["status"], order["cancellation_reason"]) == ("canceled", reason), pi
        assert await movements_of(db, pi) == [
            ("sku-a", -2, "order"),
            ("sku-a", 2, "cancellation"),
        ], pi
    await levels_explained(db, {"sku-a": 4})
    assert set((await outcomes(db)).values()) == {"applied"}


async def test_canceled_out_of_stock_and_needs_review_orders_give_back_nothing(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """They took nothing, so a cancel moves no stock."""
    short, review = new_id("pi"), new_id("pi")
    await seed_stock(db, {"sku-a": 1})
    short_cart, review_cart = new_id("cart"), new_id("cart")
    short_total = await seed_cart(db, short_cart, [("sku-a", 2, 500)])
    review_total = await seed_cart(db, review_cart, [("sku-a", 1, 1000)])
    wrong_amount = review_total + 1

    async with consuming(consumer_settings(infra, database_url, topic)) as worker:
        await publish(
            infra,
            topic,
            [
                authorization(short, short_cart, short_total),
                authorization(review, review_cart, wrong_amount),
            ],
        )
        await applied(worker, 2)
        assert (await order_of(db, short))["status_reason"] == "short:sku-a"
        assert (await order_of(db, review))["status_reason"] == "amount_mismatch"
        await publish(
            infra,
            topic,
            [
                cancellation(short, short_cart, short_total, at=T + 60),
                cancellation(review, review_cart, wrong_amount, at=T + 60),
            ],
        )
        await applied(worker, 4)

    for pi, allocation in ((short, "out_of_stock"), (review, "needs_review")):
        order = await order_of(db, pi)
        assert (order["status"], order["allocation"]) == ("canceled", allocation)
        assert await movements_of(db, pi) == []
    await levels_explained(db, {"sku-a": 1})


# --- Money: refunds, partial authorizations, disputes -----------------------------


async def test_a_partial_then_a_full_refund_records_the_amount_and_never_restocks(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    pi, cart = new_id("pi"), new_id("cart")
    await seed_stock(db, {"sku-a": 5})
    total = await seed_cart(db, cart, [("sku-a", 2, 500)])
    assert total == 1000
    capture = intent_event(pi, cart_id=cart, amount=total, status="succeeded", at=T + 10)
    partial = refunded_event(pi, amount=total, amount_refunded=300, created=T + 100)
    full = refunded_event(pi, amount=total, amount_refunded=1000, created=T + 200)
    late_copy_of_partial = refunded_event(pi, amount=total, amount_refunded=300, created=T + 100)

    async with consuming(consumer_settings(infra, database_url, topic)) as worker:
        await publish(infra, topic, [authorization(pi, cart, total), capture, partial])
        await applied(worker, 3)
        order = await order_of(db, pi)
        assert (order["status"], order["amount_refunded"]) == ("placed", 300)
        await publish(infra, topic, [full, late_copy_of_partial])
        await applied(worker, 5)

    order = await order_of(db, pi)
    assert (order["status"], order["amount_refunded"]) == ("refunded", 1000)
    assert await movements_of(db, pi) == [("sku-a", -2, "order")]
    await levels_explained(db, {"sku-a": 3})  # a return is the warehouse's decision
    seen = await outcomes(db)
    assert (seen[partial["id"]], seen[full["id"]]) == ("applied", "applied")
    assert seen[late_copy_of_partial["id"]] == "stale"  # a smaller refund changes nothing


async def test_a_partial_authorization_needs_review_and_takes_no_stock(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    pi, cart = new_id("pi"), new_id("cart")
    await seed_stock(db, {"sku-a": 5})
    total = await seed_cart(db, cart, [("sku-a", 2, 500)])
    short = intent_event(
        pi, cart_id=cart, amount=total, status="requires_capture", at=T, held=total - 400
    )

    async with consuming(consumer_settings(infra, database_url, topic)) as worker:
        await publish(infra, topic, [short])
        await applied(worker, 1)

    order = await order_of(db, pi)
    assert (order["status"], order["status_reason"]) == ("needs_review", "authorization_short")
    assert (order["amount"], order["amount_authorized"]) == (1000, 600)
    assert await movements_of(db, pi) == []
    await levels_explained(db, {"sku-a": 5})


async def test_a_dispute_marks_the_order_without_touching_stock_and_a_won_one_clears_it(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    pi, cart = new_id("pi"), new_id("cart")
    await seed_stock(db, {"sku-a": 5})
    total = await seed_cart(db, cart, [("sku-a", 1, 1000)])
    capture = intent_event(pi, cart_id=cart, amount=total, status="succeeded", at=T + 10)
    opened = dispute_event(
        pi, amount=total, status="needs_response", reason="fraudulent", created=T + 500
    )
    won = dispute_event(
        pi,
        amount=total,
        status="won",
        reason="fraudulent",
        created=T + 900,
        event_type="charge.dispute.closed",
    )

    async with consuming(consumer_settings(infra, database_url, topic)) as worker:
        await publish(infra, topic, [authorization(pi, cart, total), capture, opened])
        await applied(worker, 3)
        order = await order_of(db, pi)
        assert order["status"] == "disputed"
        assert (order["dispute_status"], order["dispute_amount"], order["dispute_reason"]) == (
            "needs_response",
            1000,
            "fraudulent",
        )
        await levels_explained(db, {"sku-a": 4})
        await publish(infra, topic, [won])
        await applied(worker, 4)

    order = await order_of(db, pi)
    assert (order["status"], order["dispute_status"]) == ("placed", "won")
    assert await movements_of(db, pi) == [("sku-a", -1, "order")]
    await levels_explained(db, {"sku-a": 4})
    assert set((await outcomes(db)).values()) == {"applied"}


# --- First paid, first served -------------------------------------------------------


async def scarce_pair(db: asyncpg.Connection) -> tuple[dict[str, str], int]:
    """Two intents whose carts want the one unit of `scarce`: their carts, and the price."""
    await seed_stock(db, {"scarce": 1})
    carts = {new_id("pi"): new_id("cart") for _ in range(2)}
    totals = {await seed_cart(db, cart, [("scarce", 1, 1000)]) for cart in carts.values()}
    return carts, totals.pop()


async def assert_won_by(db: asyncpg.Connection, winner: str, loser: str) -> None:
    assert (await order_of(db, winner))["status"] == "placed"
    lost = await order_of(db, loser)
    assert (lost["status"], lost["status_reason"]) == ("out_of_stock", "short:scarce")
    assert await movements_of(db, loser) == []
    await levels_explained(db, {"scarce": 0})


async def test_in_one_batch_the_scarce_unit_goes_to_the_payment_authorized_first(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """Published (offset) order says `late`; the authorizations' `created` says `early`."""
    carts, total = await scarce_pair(db)
    late, early = carts
    await publish(
        infra,
        topic,
        [
            authorization(late, carts[late], total, at=T + 5),
            authorization(early, carts[early], total),
        ],
        partition=0,
    )
    async with consuming(consumer_settings(infra, database_url, topic)) as worker:
        await applied(worker, 2)
    assert worker.stats.batches == 1  # they competed in one batch
    await assert_won_by(db, early, late)


async def test_in_one_batch_authorizations_of_the_same_second_go_by_received_at(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """Same `created`; the bridge received `first` earlier but published it after `second`."""
    carts, total = await scarce_pair(db)
    second, first = carts
    now_ms = int(time.time() * 1000)
    await publish_received_at(
        infra,
        topic,
        [
            (authorization(second, carts[second], total), now_ms),
            (authorization(first, carts[first], total), now_ms - 250),
        ],
    )
    async with consuming(consumer_settings(infra, database_url, topic)) as worker:
        await applied(worker, 2)
    assert worker.stats.batches == 1
    await assert_won_by(db, first, second)

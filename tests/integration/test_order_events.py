"""Order events, from the outbox to the orders topic, through the real broker and PostgreSQL.

Batches are applied with `consumer.store.apply_batch` (which writes an
`order_event` outbox row for every order it creates or changes, in the same
transaction); the relay (consumer/relay.py) publishes them keyed by payment
intent with the `outbox-id` header. Each test reads its own orders topic back
and checks what a reader of it relies on (schemas/orders.py): every event is
there at least once, one intent's events come in outbox-id order with none
missing, and a copy is the same message.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg
import pytest
from aiokafka.errors import KafkaError, KafkaTimeoutError

from intentflow.consumer.bootstrap import build_relay
from intentflow.consumer.claims import Claimed, Mark, claim, record
from intentflow.consumer.connections import create_pool
from intentflow.consumer.decisions import Allocation, OrderStatus
from intentflow.consumer.order_events import OrderEvents
from intentflow.consumer.outbox import Kind, OrderChange, enqueue
from intentflow.consumer.policy import ShopPolicy
from intentflow.consumer.relay import Relay
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.store import apply_batch
from intentflow.devservices import Services
from intentflow.devservices.topics import create_topics
from intentflow.schemas import HEADER_ORDER_EVENT_TYPE, HEADER_OUTBOX_ID, OrderEvent, encode_key
from intentflow.stripekit import events
from intentflow.stripekit.events import dispute_event, refunded_event, stamped
from tests.integration.store_support import envelope
from tests.integration.stripe_support import run_relay, start_consumer
from tests.support import (
    ConsumerProcess,
    consumer_env,
    consumer_settings,
    paid_carts,
    publish,
    read_topic,
    seed_cart,
    seed_stock,
)

ROOT = Path(__file__).resolve().parents[2]
# Stripe's `created` of each story's first event: in the past, whole seconds.
T = int(time.time()) - 3600
_offsets = itertools.count()


class Published(NamedTuple):
    """One record of the orders topic, as a reader sees it."""

    outbox_id: int  # the header
    type: str  # the header
    key: bytes | None
    value: bytes
    event: OrderEvent
    partition: int
    offset: int


async def new_orders_topic(infra: Services) -> str:
    name = f"orders.events.{secrets.token_hex(6)}"
    await create_topics(infra.kafka_bootstrap_servers, name)
    await asyncio.sleep(0.1)  # the broker may answer metadata a moment after creating
    return name


async def relay_settings(infra: Services, database_url: str, **overrides: Any) -> ConsumerSettings:
    """Settings for a relay that publishes to an orders topic of this test's own
    (`settings.orders_topic`) and reads no events topic."""
    orders_topic = await new_orders_topic(infra)
    return consumer_settings(
        infra, database_url, "stripe.events.unused", orders_topic=orders_topic, **overrides
    )


async def published(
    infra: Services, orders_topic: str, expected: int, settle_s: float = 0.5
) -> list[Published]:
    """The orders topic's records, in (partition, offset) order, once `expected` have come
    (or 15 s have passed: what is missing is then the caller's to name)."""
    records = await read_topic(
        infra.kafka_bootstrap_servers, orders_topic, expected, timeout_s=15, settle_s=settle_s
    )
    result = []
    for r in records:
        headers = dict(r.headers)
        assert r.value is not None
        event = OrderEvent.model_validate_json(r.value)
        outbox_id = int(headers[HEADER_OUTBOX_ID])
        assert event.outbox_id == outbox_id, "the body's outbox_id is the header's"
        assert event.type == headers[HEADER_ORDER_EVENT_TYPE].decode()
        assert r.key == encode_key(event.order.payment_intent_id)
        result.append(
            Published(
                outbox_id,
                event.type,
                r.key,
                r.value,
                event,
                r.partition,
                r.offset,
            )
        )
    result.sort(key=lambda p: (p.partition, p.offset))
    return result


def ids_by_intent(records: Sequence[Published]) -> dict[str, list[int]]:
    """Per intent, the outbox ids in the order a reader of the topic receives them."""
    by_intent: dict[str, list[int]] = {}
    partition_of: dict[str, int] = {}
    for p in records:
        pid = p.event.order.payment_intent_id
        # One intent, one partition: otherwise its order on the topic means nothing.
        assert partition_of.setdefault(pid, p.partition) == p.partition
        by_intent.setdefault(pid, []).append(p.outbox_id)
    return by_intent


def without_copies(ids: Sequence[int]) -> list[int]:
    """`ids` with each later copy of an id dropped (a reader skips an id it has seen)."""
    return list(dict.fromkeys(ids))


async def outbox_events(db: asyncpg.Connection) -> dict[str, list[int]]:
    """Per intent, the ids of its order event rows, in id order."""
    rows = await db.fetch(
        "SELECT id, payment_intent_id FROM outbox WHERE kind = 'order_event' ORDER BY id"
    )
    by_intent: dict[str, list[int]] = {}
    for r in rows:
        by_intent.setdefault(r["payment_intent_id"], []).append(r["id"])
    return by_intent


async def pending_by_kind(db: asyncpg.Connection) -> dict[str, int]:
    rows = await db.fetch(
        "SELECT kind, count(*) AS n FROM outbox WHERE state = 'pending' GROUP BY kind"
    )
    return {r["kind"]: r["n"] for r in rows}


def assert_in_order_and_complete(
    on_topic: dict[str, list[int]], in_table: dict[str, list[int]]
) -> None:
    """Per intent: the topic's ids, copies dropped, are the table's rows exactly, in id order."""
    assert set(on_topic) == set(in_table)
    for pid, rows in in_table.items():
        assert without_copies(on_topic[pid]) == rows, f"{pid}: topic {on_topic[pid]} vs {rows}"


async def apply(db: asyncpg.Connection, *evts: dict[str, Any]) -> None:
    """One batch, one transaction, as the worker applies it."""
    await apply_batch(db, [envelope(e, next(_offsets)) for e in evts])


def authorization(pid: str, cart_id: str, amount: int, at: int = T) -> dict[str, Any]:
    intent = events.payment_intent(pid, amount=amount, cart_id=cart_id, created=T)
    return stamped(intent, "payment_intent.amount_capturable_updated", at)


def capture(pid: str, cart_id: str, amount: int, at: int) -> dict[str, Any]:
    intent = events.payment_intent(
        pid, amount=amount, cart_id=cart_id, status="succeeded", created=T
    )
    return stamped(intent, "payment_intent.succeeded", at)


def story(pid: str, cart_id: str, amount: int, step: int) -> dict[str, Any]:
    """Step `step` of an order's life that changes it: placed, refunded in part, then in
    full, then disputed."""
    if step == 0:
        return authorization(pid, cart_id, amount)
    if step == 1:
        return refunded_event(pid, amount=amount, amount_refunded=amount // 4, created=T + 10)
    if step == 2:
        return refunded_event(pid, amount=amount, amount_refunded=amount, created=T + 20)
    return dispute_event(
        pid, amount=amount, status="needs_response", reason="fraudulent", created=T + 30
    )


async def order_stories(db: asyncpg.Connection, intents: Sequence[str], steps: int) -> None:
    """A cart of one sku-a (1000) per intent, then the first `steps` steps of each intent's
    `story`: one batch a step, every intent in it."""
    for pid in intents:
        await seed_cart(db, f"cart-{pid}", [("sku-a", 1, 1000)])
    for step in range(steps):
        await apply(db, *(story(pid, f"cart-{pid}", 1000, step) for pid in intents))


async def test_an_orders_life_is_published_in_order_as_validated_snapshots(
    infra: Services, database_url: str, db: asyncpg.Connection
) -> None:
    settings = await relay_settings(infra, database_url)
    await seed_stock(db, {"sku-a": 10, "sku-b": 10})
    total = await seed_cart(db, "cart-1", [("sku-a", 2, 1000), ("sku-b", 1, 500)])
    pid = "pi_life"

    await apply(db, story(pid, "cart-1", total, 0))
    await apply(db, capture(pid, "cart-1", total, T + 5))  # the money is taken: announced
    assert len((await outbox_events(db))[pid]) == 2
    for step in (1, 2, 3):
        await apply(db, story(pid, "cart-1", total, step))
    stats = await run_relay(settings, timeout_s=60)

    records = await published(infra, settings.orders_topic, expected=5)
    assert (stats.published, stats.publish_failures) == (5, 0)
    assert len(records) == 5, "a clean run publishes each event once"
    ids = [p.outbox_id for p in records]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert ids == (await outbox_events(db))[pid]
    seen = [
        (
            p.event.type,
            p.event.previous_status,
            p.event.order.status,
            p.event.order.payment_status,
            p.event.order.amount_refunded,
            p.event.order.dispute and p.event.order.dispute.model_dump(),
        )
        for p in records
    ]
    assert seen == [
        ("order.placed", None, "placed", "requires_capture", 0, None),
        ("order.updated", "placed", "placed", "succeeded", 0, None),
        ("order.updated", "placed", "placed", "succeeded", 625, None),
        ("order.refunded", "placed", "refunded", "succeeded", 2500, None),
        (
            "order.disputed",
            "refunded",
            "disputed",
            "succeeded",
            2500,
            {"status": "needs_response", "amount": 2500, "reason": "fraudulent"},
        ),
    ]
    for p in records:
        order = p.event.order
        assert p.event.schema_version == 1
        assert order.id == records[0].event.order.id
        assert (order.payment_intent_id, order.cart_id, order.allocation) == (
            pid,
            "cart-1",
            "placed",
        )
        assert (order.amount, order.amount_authorized, order.currency) == (2500, 2500, "usd")
        assert [(i.sku, i.quantity, i.unit_amount) for i in order.items] == [
            ("sku-a", 2, 1000),
            ("sku-b", 1, 500),
        ]
    occurred = [p.event.occurred_at for p in records]
    assert occurred == sorted(occurred)
    assert await pending_by_kind(db) == {}
    outcomes = await db.fetch("SELECT DISTINCT state, outcome, attempts FROM outbox")
    assert [tuple(r) for r in outcomes] == [("done", "published", 1)]


async def test_a_dispute_event_that_changes_nothing_shown_publishes_no_order_event(
    db: asyncpg.Connection,
) -> None:
    # Stripe follows `charge.dispute.created` with `charge.dispute.funds_withdrawn`, and
    # sends `charge.dispute.updated` when evidence is saved: the same status each time.
    await seed_stock(db, {"sku-a": 10})
    await seed_cart(db, "cart-1", [("sku-a", 1, 1000)])
    await apply(db, story("pi_1", "cart-1", 1000, 0))
    await apply(db, story("pi_1", "cart-1", 1000, 3))  # disputed: needs_response
    before = await db.fetchrow("SELECT * FROM orders")

    same_again = [(T + 31, "charge.dispute.funds_withdrawn"), (T + 40, "charge.dispute.updated")]
    for at, event_type in same_again:
        await apply(
            db,
            dispute_event(
                "pi_1",
                amount=1000,
                status="needs_response",
                reason="fraudulent",
                created=at,
                event_type=event_type,
            ),
        )

    after = await db.fetchrow("SELECT * FROM orders")
    assert before is not None and after is not None
    unchanged = {k: v for k, v in dict(after).items() if k != "updated_at"}
    assert unchanged == {k: v for k, v in dict(before).items() if k != "updated_at"}
    names = await db.fetch("SELECT name FROM outbox WHERE kind = 'order_event' ORDER BY id")
    assert [r["name"] for r in names] == ["order.placed", "order.disputed"]


async def test_a_claim_takes_one_event_per_intent_and_skips_rows_another_relay_holds(
    database_url: str, db: asyncpg.Connection
) -> None:
    await seed_stock(db, {"sku-a": 100})
    await order_stories(db, ["pi_a", "pi_b", "pi_c"], steps=2)
    rows = await outbox_events(db)
    (a1, a2), (b1, b2), (c1, _) = rows["pi_a"], rows["pi_b"], rows["pi_c"]
    one = await asyncpg.connect(database_url)
    two = await asyncpg.connect(database_url)
    try:
        async with one.transaction():
            held = await claim(one, Kind.ORDER_EVENT, 2)
            assert [r.id for r in held] == [a1, b1]
            async with two.transaction():
                # a1 and b1 are locked (skipped); a2, b2 and c2 wait for a pending earlier row.
                assert [r.id for r in await claim(two, Kind.ORDER_EVENT, 100)] == [c1]
            await record(one, [Mark(a1, "published"), Mark(b1, "published")])
        async with two.transaction():
            # A later event waits for nothing but its own intent's earlier ones.
            assert [r.id for r in await claim(two, Kind.ORDER_EVENT, 100)] == [c1, a2, b2]
    finally:
        await one.close()
        await two.close()


async def test_two_relays_publish_every_intents_events_in_order_and_complete(
    infra: Services, database_url: str, db: asyncpg.Connection
) -> None:
    # Small claims, so that the two relays take turns on neighbouring rows.
    settings = await relay_settings(infra, database_url, relay_batch_size=3)
    await seed_stock(db, {"sku-a": 1000})
    intents = [f"pi_{i:02d}" for i in range(40)]
    # Four intents at a time through their four steps: one intent's rows are four ids apart.
    for start in range(0, len(intents), 4):
        await order_stories(db, intents[start : start + 4], steps=4)
    in_table = await outbox_events(db)
    assert sum(map(len, in_table.values())) == 160

    async with asyncio.timeout(60):
        async with build_relay(settings) as one, build_relay(settings) as two:
            stats = await asyncio.gather(one.run(exit_when_idle=True), two.run(exit_when_idle=True))

    assert all(s.published > 0 for s in stats), "both relays took part"
    # Each row is marked by exactly one relay: a claimed row is locked until marked.
    assert sum(s.published for s in stats) == 160
    assert sum(s.publish_failures for s in stats) == 0
    records = await published(infra, settings.orders_topic, expected=160)
    assert_in_order_and_complete(ids_by_intent(records), in_table)
    assert await pending_by_kind(db) == {}


class FlakyEvents:
    """The real producer, except that one row fails (not sent) until every other row is
    acknowledged: if the failure held up anything but its own intent, it never ends."""

    def __init__(self, real: OrderEvents, failing_id: int, others: set[int]) -> None:
        self.topic = real.topic
        self._real = real
        self._failing_id = failing_id
        self._others = others
        self.acknowledged: set[int] = set()
        self.failures = 0
        # Every publish, in order: (ids asked, ids acknowledged).
        self.calls: list[tuple[list[int], list[int]]] = []

    async def start(self) -> None:
        await self._real.start()

    async def stop(self) -> None:
        await self._real.stop()

    async def publish(self, rows: Sequence[Claimed]) -> list[KafkaError | None]:
        hold = not self._others <= self.acknowledged
        sent = [r for r in rows if not (hold and r.id == self._failing_id)]
        answers = iter(await self._real.publish(sent))
        results: list[KafkaError | None] = []
        for row in rows:
            if hold and row.id == self._failing_id:
                self.failures += 1
                results.append(KafkaTimeoutError("the test holds this row back"))
            else:
                results.append(next(answers))
        acked = [r.id for r, e in zip(rows, results, strict=True) if e is None]
        self.acknowledged.update(acked)
        self.calls.append(([r.id for r in rows], acked))
        return results


async def test_a_failed_publish_holds_back_only_its_own_intents_later_events(
    infra: Services, database_url: str, db: asyncpg.Connection
) -> None:
    settings = await relay_settings(
        infra, database_url, relay_retry_initial_s=0.1, relay_retry_max_s=0.4
    )
    await seed_stock(db, {"sku-a": 100})
    await order_stories(db, [f"pi_{i}" for i in range(6)], steps=3)
    in_table = await outbox_events(db)
    target = "pi_2"
    failing_id, *later = in_table[target]
    others = {i for pid, ids in in_table.items() if pid != target for i in ids}
    sink: list[FlakyEvents] = []

    def new_events() -> FlakyEvents:
        real = OrderEvents(
            settings,
            settings.orders_topic,
            enable_idempotence=settings.kafka_enable_idempotence,
        )
        sink.append(FlakyEvents(real, failing_id, others))
        return sink[-1]

    relay = Relay(
        settings,
        open_pool=functools.partial(create_pool, settings, 2),
        new_events=new_events,
        stripe=None,
    )
    async with asyncio.timeout(30):  # held-up intents would keep the failing row failing
        async with relay:
            stats = await relay.run(exit_when_idle=True)

    [flaky] = sink
    assert flaky.failures >= 1
    assert (stats.published, stats.publish_failures) == (18, flaky.failures)
    # Nothing of the intent after its failed row was even claimed before that row went out.
    first_success = next(n for n, (_, acked) in enumerate(flaky.calls) if failing_id in acked)
    asked_before = {i for ids, _ in flaky.calls[:first_success] for i in ids}
    assert asked_before.isdisjoint(later)
    assert others <= {i for _, acked in flaky.calls[:first_success] for i in acked}
    records = await published(infra, settings.orders_topic, expected=18)
    assert_in_order_and_complete(ids_by_intent(records), in_table)
    row = await db.fetchrow("SELECT state, outcome, attempts FROM outbox WHERE id = $1", failing_id)
    assert row is not None
    assert tuple(row) == ("done", "published", flaky.failures + 1)
    assert await pending_by_kind(db) == {}


async def run_crashing_relay(settings: ConsumerSettings, when: str) -> list[dict[str, Any]]:
    """Run tests/relay_crash.py to its death; return what it reported, one dict per publish."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.relay_crash",
        when,
        cwd=ROOT,
        env=consumer_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 137, stderr.decode()[-3000:]
    return [json.loads(line) for line in stdout.decode().splitlines()]


@pytest.mark.parametrize("when", ["after_acks", "before_publish"])
async def test_a_relay_killed_mid_batch_leaves_copies_never_gaps(
    infra: Services, database_url: str, db: asyncpg.Connection, when: str
) -> None:
    settings = await relay_settings(infra, database_url, relay_batch_size=5)
    await seed_stock(db, {"sku-a": 100})
    await order_stories(db, [f"pi_{i:02d}" for i in range(12)], steps=2)
    in_table = await outbox_events(db)

    first, last = await run_crashing_relay(settings, when)
    assert last["crash"] == when
    crashed = last["ids"]
    assert len(first["acknowledged"]) == len(crashed) == 5
    assert last["acknowledged"] == (crashed if when == "after_acks" else [])
    left_by_the_crash = await pending_by_kind(db)
    stats = await run_relay(settings, timeout_s=60)

    copies = 2 if when == "after_acks" else 1
    records = await published(infra, settings.orders_topic, expected=24 - 5 + 5 * copies)
    # What a reader relies on first: nothing missing, each intent in order.
    assert_in_order_and_complete(ids_by_intent(records), in_table)
    by_id: dict[int, list[Published]] = {}
    for p in records:
        by_id.setdefault(p.outbox_id, []).append(p)
    # Only the batch acknowledged but never marked comes twice, as the same message.
    assert {i: len(ps) for i, ps in by_id.items() if len(ps) > 1} == dict.fromkeys(
        crashed if copies == 2 else [], 2
    )
    for i in crashed:
        assert len({(p.value, p.type, p.key) for p in by_id[i]}) == 1, "a copy is the same message"
    # The crash left its batch pending (the batch before it was marked); the next relay did it.
    assert left_by_the_crash == {"order_event": 24 - 5}
    assert stats.published == 24 - 5
    assert await pending_by_kind(db) == {}


async def test_relay_command_publishes_and_leaves_stripe_actions_pending_without_a_key(
    infra: Services, database_url: str, db: asyncpg.Connection
) -> None:
    settings = await relay_settings(infra, database_url, stripe_api_key=None)
    await seed_stock(db, {"sku-a": 1, "sku-b": 5})
    await seed_cart(db, "cart-first", [("sku-a", 1, 1000)])
    await seed_cart(db, "cart-second", [("sku-a", 1, 1000)])  # the one unit went to the first
    await seed_cart(db, "cart-other", [("sku-b", 2, 300)])
    await apply(
        db,
        authorization("pi_first", "cart-first", 1000, at=T),
        authorization("pi_second", "cart-second", 1000, at=T + 1),
        authorization("pi_other", "cart-other", 600, at=T + 2),
    )
    statuses = {
        r["payment_intent_id"]: r["status"]
        for r in await db.fetch("SELECT payment_intent_id, status FROM orders")
    }
    assert statuses == {"pi_first": "placed", "pi_second": "out_of_stock", "pi_other": "placed"}

    process = await start_consumer(settings, "relay", "--exit-when-idle")
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)

    assert process.returncode == 0, stderr.decode()[-3000:]
    summary = json.loads(stdout.decode().strip().splitlines()[-1])["outbox"]
    assert (summary["published"], summary["publish_failures"]) == (3, 0)
    assert summary["pending"] == {"stripe_action": 1, "order_event": 0}
    assert summary["actions"] == {}
    assert "stripe_actions_waiting" in stderr.decode()
    action = await db.fetchrow(
        "SELECT name, payment_intent_id, payload::text, state, attempts FROM outbox"
        " WHERE kind = 'stripe_action'"
    )
    assert action is not None
    assert tuple(action) == (
        "cancel_payment_intent",
        "pi_second",
        '{"cancellation_reason": "abandoned"}',
        "pending",
        0,
    )
    records = await published(infra, settings.orders_topic, expected=3)
    assert sorted((p.event.order.payment_intent_id, p.type) for p in records) == [
        ("pi_first", "order.placed"),
        ("pi_other", "order.placed"),
        ("pi_second", "order.out_of_stock"),
    ]
    assert await pending_by_kind(db) == {"stripe_action": 1}


async def test_run_publishes_the_order_events_of_what_it_applied_before_it_exits(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    orders_topic = await new_orders_topic(infra)
    settings = consumer_settings(infra, database_url, topic, orders_topic=orders_topic)
    await seed_stock(db, {"sku-a": 100})
    authorizations = await paid_carts(db, 5, [("sku-a", 1, 700)])
    await publish(infra, topic, authorizations)

    summary = await (await ConsumerProcess(settings, exit_when_idle_s=2.0).start()).wait()

    assert summary["events"] == 5
    assert summary["orders"] == {"placed": 5}
    outbox = summary["outbox"]
    assert (outbox["published"], outbox["publish_failures"]) == (5, 0)
    assert outbox["pending"] == {"stripe_action": 0, "order_event": 0}
    records = await published(infra, orders_topic, expected=5)
    assert sorted(p.outbox_id for p in records) == sorted(
        i for ids in (await outbox_events(db)).values() for i in ids
    )
    assert {p.event.order.payment_intent_id for p in records} == {f"pi_{i}" for i in range(5)}
    assert await pending_by_kind(db) == {}


async def test_a_new_orders_event_built_in_memory_is_the_one_read_back_from_its_rows(
    db: asyncpg.Connection,
) -> None:
    """New orders' events are serialised from the writer's plan (consumer/outbox.py,
    `_enqueue_built`); changed orders' are read back from the rows in SQL
    (`_enqueue_read_back`). For orders of every kind both give the same document."""
    await seed_stock(db, {"sku-a": 3, "sku-b": 1})
    await seed_cart(db, "cart-p", [("sku-a", 2, 500), ("sku-b", 1, 700), ("sku-a", 1, 500)])
    await seed_cart(db, "cart-s", [("sku-b", 5, 100)])
    await seed_cart(db, "cart-c", [("sku-a", 1, 100)])
    payloads = [
        events.intent_event("pi_placed", amount=2200, cart_id="cart-p"),
        events.intent_event("pi_short", amount=500, cart_id="cart-s"),
        events.intent_event("pi_review", amount=999, cart_id="cart-missing"),
        events.intent_event("pi_canceled", amount=100, cart_id="cart-c", status="canceled"),
    ]
    await apply_batch(db, [envelope(p, i) for i, p in enumerate(payloads)])
    await apply_batch(
        db, [envelope(events.intent_event("pi_canceled", amount=100, cart_id="cart-c"), 9)]
    )
    built = {
        r["order_id"]: (r["name"], json.loads(r["payload"]))
        for r in await db.fetch(
            "SELECT order_id, name, payload::text FROM outbox WHERE kind = 'order_event'"
        )
    }
    statuses = {r["status"] for r in await db.fetch("SELECT status FROM orders")}
    assert statuses == {"placed", "out_of_stock", "needs_review", "canceled"}

    async with db.transaction():
        await db.execute("DELETE FROM outbox")
        orders = await db.fetch(
            "SELECT id, payment_intent_id, status, amount, allocation FROM orders"
        )
        changes = [
            OrderChange(
                r["id"],
                r["payment_intent_id"],
                None,
                OrderStatus(r["status"]),
                None,
                r["amount"],
                Allocation(r["allocation"]),
            )
            for r in orders
        ]
        await enqueue(db, changes, ShopPolicy())
        read_back = {
            r["order_id"]: (r["name"], json.loads(r["payload"]))
            for r in await db.fetch(
                "SELECT order_id, name, payload::text FROM outbox WHERE kind = 'order_event'"
            )
        }

    assert len(built) == 4
    assert read_back == built

"""Property-based tests of the payment lifecycle: the real consumer against a reference model.

Hypothesis draws carts and stock (some SKUs scarce) and, per intent, a
plausible Stripe history (failures, 3-D Secure, authorization, partial
authorization, capture, cancel, expiry, refunds, disputes), with `created`
non-decreasing along it and often equal. Every event is delivered one to four
times, shuffled within its intent and across partitions, through the real
`consumer.decode.decode` and `consumer.store.apply_batch` into the real
PostgreSQL. The database must then hold what `tests.lifecycle_model` (an
independent implementation of the rules) predicts, whatever the delivery order
and the batch boundaries, and the invariants must hold.

Allocation of scarce stock between intents depends on which batch each
authorization lands in, hence three properties: one batch (the model predicts
the winners from `created` alone), many batches with abundant stock (the end
state is the same for every order and split), many batches with scarce stock
(the model replays the batches; stock is conserved whoever won).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import astuple, dataclass, field, is_dataclass, replace
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from intentflow.consumer.outbox import OWED, REFUND_FAILED
from intentflow.consumer.owed import CAPTURED_NOT_RETURNED
from intentflow.consumer.store import apply_batch
from intentflow.consumer.tools import reconcile
from tests import lifecycle_model as model
from tests.lifecycle_histories import Delivery, Scenario, deliveries, scenarios

# A deeper search before a release, or after a change to the lifecycle:
#   LIFECYCLE_EXAMPLES=1000 .venv/bin/pytest tests/integration/test_lifecycle_properties.py
EXAMPLES = int(os.environ.get("LIFECYCLE_EXAMPLES", "40"))
PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # The database is per test; every example empties it before seeding its own.
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
    # A failure is saved in .hypothesis/ (which ignores itself in git) and replayed first
    # next time; it also prints a blob that reproduces it anywhere.
    print_blob=True,
)

# A passing run takes seconds; a failing one shrinks its example for minutes.
SHRINK_TIME = pytest.mark.timeout(900)


# ---------------------------------------------------------------------------
# The database: seeding, and what it holds afterwards.


async def reset(db: asyncpg.Connection, scenario: Scenario) -> None:
    """An empty database with this scenario's stock and carts."""
    # DELETE, not TRUNCATE: a few rows per table, and TRUNCATE's file work made one
    # property's 30 examples take 7.6 s instead of 1.8 s (measured). Ids keep counting.
    tables = await db.fetch(
        "SELECT quote_ident(tablename) AS name FROM pg_tables "
        "WHERE schemaname = current_schema() AND tablename <> 'schema_migrations'"
    )
    async with db.transaction():
        for table in tables:
            await db.execute(f"DELETE FROM {table['name']}")
    await db.executemany(
        "INSERT INTO inventory_levels (sku, stocked_quantity) VALUES ($1, $2)",
        list(scenario.stock.items()),
    )
    for cart_id, cart in scenario.carts.items():
        await db.execute("INSERT INTO carts (id, currency) VALUES ($1, $2)", cart_id, cart.currency)
        await db.executemany(
            "INSERT INTO cart_items (cart_id, sku, quantity, unit_amount) VALUES ($1, $2, $3, $4)",
            [(cart_id, *line) for line in cart.lines],
        )


async def deliver(db: asyncpg.Connection, delivery: Delivery) -> None:
    for batch in delivery.batches:
        await apply_batch(db, [c.envelope for c in batch])


@dataclass(frozen=True)
class IntentRow:
    status: str | None
    status_created: int | None
    status_step: int | None
    status_event_id: str | None  # the event whose status won (column last_event_id)
    cancellation_reason: str | None
    charge: tuple[Any, ...] | None  # key, refunded, refunded in full: the latest word
    dispute: tuple[str, str, int, str, int] | None  # id, status, amount, reason, created
    amount_received: int
    capture_before: int | None
    authorization: tuple[Any, ...] | None  # key, amount, currency, held: the latest
    paid_at: int | None
    named_cart: tuple[Any, ...] | None  # key, cart
    session: tuple[Any, ...] | None  # key, cart, subtotal, currency, total, ..., paid


@dataclass(frozen=True)
class RefundRow:
    payment_intent_id: str
    amount: int
    status: str
    status_created: int
    opened: int


def intent_row(intent: model.Intent) -> IntentRow:
    d, a, session = intent.dispute, intent.authorization, intent.session
    return IntentRow(
        intent.status,
        intent.status_created,
        intent.status_step,
        intent.status_event_id,
        intent.cancellation_reason,
        intent.charge,
        (d.id, d.status, d.amount, d.reason, d.created) if d else None,
        intent.amount_received,
        intent.capture_before,
        (a.key, a.amount, a.currency, a.held, a.captured) if a else None,
        intent.paid_at,
        intent.named_cart,
        astuple(session) if session else None,
    )


def refund_rows(facts: dict[str, model.Intent]) -> dict[str, RefundRow]:
    return {
        refund_id: RefundRow(pid, r.amount, r.status, r.status_created, r.opened)
        for pid, intent in facts.items()
        for refund_id, r in intent.refunds.items()
    }


@dataclass
class Seen:
    """The database after delivery, in the model's terms."""

    intents: dict[str, IntentRow]
    refunds: dict[str, RefundRow]
    orders: dict[str, model.Order]
    levels: dict[str, int]
    movements: dict[tuple[str, str], int]  # (reason, sku) -> sum of deltas
    order_movements: dict[tuple[str, str, str], int]  # (intent, reason, sku) -> sum
    processed: int
    order_items: dict[str, Counter[str]] = field(default_factory=dict)
    actions: set[tuple[str, str]] = field(default_factory=set)  # (intent, Stripe action)
    # Intents whose refund row is owed after a refund failed (REFUND_FAILED).
    refund_failed: set[str] = field(default_factory=set)

    def comparable(self, twins: set[str]) -> Seen:
        """What must not depend on delivery order or batch boundaries.

        A canceled order's allocation does (created `skipped` when its cancel came
        in the same batch or before, or as first allocated when the cancel came
        later), and so do movement rows, not their sums per SKU. Of two payments
        for one cart (`twins`), which one is the order and which the duplicate
        depends on which batch came first, and with it their statuses and the
        stock (`in_batches` predicts them exactly, batch by batch).
        """
        orders = comparable_orders(self.orders, twins)
        levels = {} if twins else self.levels
        return Seen(self.intents, self.refunds, orders, levels, {}, {}, self.processed)


def comparable_orders(orders: dict[str, model.Order], twins: set[str]) -> dict[str, model.Order]:
    """The orders with a canceled order's allocation (and its reason) left out, and
    the allocation and status of payments for a shared cart."""
    masked = {}
    for pid, o in orders.items():
        if pid in twins:
            o = replace(o, allocation="?", status="?", status_reason=None)
        elif o.status == "canceled":
            o = replace(o, allocation="?", status_reason=None)
        masked[pid] = o
    return masked


async def observe(db: asyncpg.Connection) -> Seen:
    intents = {r["id"]: stored_intent(r) for r in await db.fetch("SELECT * FROM payment_intents")}
    refunds = {
        r["id"]: RefundRow(
            r["payment_intent_id"], r["amount"], r["status"], r["status_created"], r["opened"]
        )
        for r in await db.fetch("SELECT * FROM refunds")
    }
    orders = {
        r["payment_intent_id"]: model.Order(
            status=r["status"],
            allocation=r["allocation"],
            status_reason=r["status_reason"] if r["allocation"] in model.REASONED else None,
            cart_id=r["cart_id"],
            amount=r["amount"],
            currency=r["currency"],
            amount_authorized=r["amount_authorized"],
            amount_refunded=r["amount_refunded"],
            cancellation_reason=r["cancellation_reason"],
            dispute_status=r["dispute_status"],
            dispute_amount=r["dispute_amount"],
            dispute_reason=r["dispute_reason"],
            amount_captured=r["amount_captured"],
            capture_before=r["capture_before_s"],
            amount_subtotal=r["amount_subtotal"],
            amount_shipping=r["amount_shipping"],
            amount_discount=r["amount_discount"],
            amount_tax=r["amount_tax"],
        )
        for r in await db.fetch(
            "SELECT *, extract(epoch FROM capture_before)::bigint AS capture_before_s FROM orders"
        )
    }
    levels = {
        r["sku"]: r["stocked_quantity"]
        for r in await db.fetch("SELECT sku, stocked_quantity FROM inventory_levels")
    }
    movements = {
        (r["reason"], r["sku"]): r["total"]
        for r in await db.fetch(
            "SELECT reason, sku, sum(quantity_delta)::int AS total "
            "FROM inventory_movements GROUP BY reason, sku"
        )
    }
    order_movements = {
        (r["payment_intent_id"], r["reason"], r["sku"]): r["total"]
        for r in await db.fetch(
            "SELECT o.payment_intent_id, m.reason, m.sku, sum(m.quantity_delta)::int AS total "
            "FROM inventory_movements m JOIN orders o ON o.id = m.order_id "
            "GROUP BY o.payment_intent_id, m.reason, m.sku"
        )
    }
    items: dict[str, Counter[str]] = {}
    for r in await db.fetch(
        "SELECT o.payment_intent_id, i.sku, i.quantity "
        "FROM order_items i JOIN orders o ON o.id = i.order_id"
    ):
        items.setdefault(r["payment_intent_id"], Counter())[r["sku"]] += r["quantity"]
    processed = int(await db.fetchval("SELECT count(*) FROM processed_events"))
    actions = {
        (r["payment_intent_id"], r["name"])
        for r in await db.fetch(
            "SELECT payment_intent_id, name FROM outbox WHERE kind = 'stripe_action'"
        )
    }
    refund_failed = {
        r["payment_intent_id"]
        for r in await db.fetch(
            "SELECT payment_intent_id FROM outbox WHERE kind = 'stripe_action'"
            " AND outcome = 'owed' AND error_code = $1",
            REFUND_FAILED.code,
        )
    }
    return Seen(
        intents,
        refunds,
        orders,
        levels,
        movements,
        order_movements,
        processed,
        items,
        actions,
        refund_failed,
    )


def _keyed(r: asyncpg.Record, prefix: str) -> tuple[Any, ...] | None:
    if r[f"{prefix}_created"] is None:
        return None
    return (r[f"{prefix}_created"], r[f"{prefix}_step"], r[f"{prefix}_event_id"])


def stored_intent(r: asyncpg.Record) -> IntentRow:
    """An intent's row, in the model's terms."""
    dispute = None
    if r["dispute_id"] is not None:
        dispute = (
            r["dispute_id"],
            r["dispute_status"],
            r["dispute_amount"],
            r["dispute_reason"],
            r["dispute_created"],
        )
    charge, auth, named = (_keyed(r, p) for p in ("charge", "auth", "named"))
    session = None
    if r["checkout"] is not None:
        key, _session_id, *fields = json.loads(r["checkout"])
        session = (tuple(key), *fields)
    return IntentRow(
        r["status"],
        r["status_created"],
        r["status_step"],
        r["last_event_id"],
        r["cancellation_reason"],
        None if charge is None else (charge, r["charge_amount_refunded"], r["charge_refunded"]),
        dispute,
        r["amount_received"],
        r["capture_before"],
        None
        if auth is None
        else (auth, r["auth_amount"], r["auth_currency"], r["auth_held"], r["auth_captured"]),
        r["paid_at"],
        None if named is None else (named, r["named_cart_id"]),
        session,
    )


async def broken_invariants(db: asyncpg.Connection) -> list[str]:
    """The invariants `reconcile` checks, asked in SQL of our own (kept beside it)."""
    broken: list[str] = []
    checks = {
        "negative level": "SELECT sku FROM inventory_levels WHERE stocked_quantity < 0",
        "movements do not sum to the level": """
            SELECT l.sku FROM inventory_levels l
            LEFT JOIN (SELECT sku, sum(quantity_delta) AS total FROM inventory_movements
                       GROUP BY sku) m ON m.sku = l.sku
            WHERE coalesce(m.total, 0) <> l.stocked_quantity""",
        "order not canceled on a canceled intent": """
            SELECT o.payment_intent_id FROM orders o
            JOIN payment_intents p ON p.id = o.payment_intent_id
            WHERE p.status = 'canceled' AND o.status <> 'canceled'""",
        "canceled order on an intent that is not canceled": """
            SELECT o.payment_intent_id FROM orders o
            JOIN payment_intents p ON p.id = o.payment_intent_id
            WHERE o.status = 'canceled' AND p.status IS DISTINCT FROM 'canceled'""",
        "an order's stock taken by another event than the one that decided it": """
            SELECT o.payment_intent_id FROM orders o
            JOIN inventory_movements m ON m.order_id = o.id AND m.reason = 'order'
            WHERE m.event_id IS DISTINCT FROM o.source_event_id""",
        "order without an intent": """
            SELECT o.payment_intent_id FROM orders o
            LEFT JOIN payment_intents p ON p.id = o.payment_intent_id WHERE p.id IS NULL""",
        "stock moved by an order that took none": """
            SELECT DISTINCT o.payment_intent_id FROM orders o
            JOIN inventory_movements m ON m.order_id = o.id
            WHERE o.allocation <> 'placed'""",
        "a placed order's cancellation does not give back what it took": """
            SELECT o.payment_intent_id FROM orders o
            JOIN inventory_movements m ON m.order_id = o.id
            WHERE o.allocation = 'placed'
            GROUP BY o.id, o.payment_intent_id, o.status, m.sku
            HAVING sum(m.quantity_delta) FILTER (WHERE m.reason = 'order') >= 0
                OR coalesce(sum(m.quantity_delta) FILTER (WHERE m.reason = 'cancellation'), 0)
                   <> CASE WHEN o.status = 'canceled'
                           THEN -sum(m.quantity_delta) FILTER (WHERE m.reason = 'order')
                           ELSE 0 END""",
    }
    for name, sql in checks.items():
        rows = await db.fetch(sql)
        broken += [f"{name}: {row[0]}" for row in rows]
    return broken


async def reconcile_findings(db: asyncpg.Connection, seen: Seen) -> list[str]:
    """What `order-consumer reconcile` reports: one line per check that found violations,
    but for the refunds left to a person (`seen.refund_failed`, held to the model by
    `assert_state`), which it must report, each once, and nothing more."""
    report = await reconcile.check(db)
    owed = await db.fetch(f"SELECT payment_intent_id, refund FROM ({CAPTURED_NOT_RETURNED}) owed")
    assert {r["payment_intent_id"] for r in owed} <= seen.refund_failed, owed
    assert all(r["refund"] == OWED for r in owed), owed
    return [
        c.line()
        for c in report.checks
        if not c.ok and c.name != "captured_money_of_unfillable_order_returned"
    ]


# ---------------------------------------------------------------------------
# Checks shared by the properties.


def assert_same(
    what: str, seen: Mapping[str, Any], expected: Mapping[str, Any], source: str = "model"
) -> None:
    """Equal mappings, or a message naming each key and field that differs."""
    diffs = []
    for key in sorted(set(seen) | set(expected)):
        got, want = seen.get(key), expected.get(key)
        if got == want:
            continue
        if is_dataclass(got) and is_dataclass(want):
            fields = [
                f"{name}: seen {getattr(got, name)!r}, {source} {value!r}"
                for name, value in want.__dict__.items()
                if getattr(got, name) != value
            ]
            diffs.append(f"{what} {key}: " + "; ".join(fields))
        else:
            diffs.append(f"{what} {key}: seen {got!r}, {source} {want!r}")
    assert not diffs, "\n".join(diffs)


def demand_of(scenario: Scenario, order: model.Order) -> Counter[str]:
    assert order.cart_id is not None
    return scenario.carts[order.cart_id].demand


def assert_state(seen: Seen, state: model.State) -> None:
    """The database holds the model's state: intents, refunds, orders, levels; and every
    order that cannot be filled has asked for its money back, and no other order has."""
    assert_same("intent", seen.intents, {pid: intent_row(i) for pid, i in state.intents.items()})
    assert_same("refund", seen.refunds, refund_rows(state.intents))
    assert_same("order", seen.orders, state.orders)
    assert_same("level", seen.levels, state.levels)
    owed = set(model.money_owed(state).items())
    assert owed <= seen.actions, f"owed, never asked: {sorted(owed - seen.actions)}"
    asked_by = {pid for pid, _ in seen.actions}
    fillable = {pid for pid, o in state.orders.items() if o.allocation not in model.UNFILLABLE}
    assert not asked_by & fillable, f"actions for orders that can be filled: {asked_by & fillable}"
    assert asked_by <= set(state.orders), f"actions for payments with no order: {asked_by}"
    # A refund still owed after one failed is left to a person, and only then.
    left = model.refunds_left_to_a_person(state)
    assert left <= seen.refund_failed, f"refunded again by itself: {left - seen.refund_failed}"
    stopped = model.refund_stopped(state)
    assert seen.refund_failed <= stopped, f"owed, no refund failed: {seen.refund_failed - stopped}"


def assert_stock_follows_allocations(scenario: Scenario, seen: Seen) -> None:
    """Levels and movements are exactly what placed orders took and canceled ones gave back."""
    assert seen.levels == model.levels_after(scenario.stock, seen.orders, scenario.carts)
    assert all(level >= 0 for level in seen.levels.values()), seen.levels
    took: Counter[tuple[str, str]] = Counter()
    for pid, order in seen.orders.items():
        if order.allocation != "placed":
            continue
        demand = demand_of(scenario, order)
        assert seen.order_items.get(pid) == demand, pid
        for sku, qty in demand.items():
            assert seen.order_movements.get((pid, "order", sku)) == -qty, (pid, sku)
            given_back = seen.order_movements.get((pid, "cancellation", sku))
            assert given_back == (qty if order.status == "canceled" else None), (pid, sku)
            took[("order", sku)] -= qty
            if order.status == "canceled":
                took[("cancellation", sku)] += qty
    consumer_moves = {k: v for k, v in seen.movements.items() if k[0] != "restock"}
    assert consumer_moves == {k: v for k, v in took.items() if v}
    restocked = {sku: v for (reason, sku), v in seen.movements.items() if reason == "restock"}
    assert restocked == {sku: q for sku, q in scenario.stock.items() if q}


def tally(seen: Seen) -> None:
    """What the example covered (`pytest --hypothesis-show-statistics` counts these)."""
    for o in seen.orders.values():
        event(f"order allocated {o.allocation}, now {o.status}")
    for _, action in seen.actions:
        event(f"asked {action}")
    for i in seen.intents.values():
        if i.session is not None:
            event("paid through Checkout" if i.session[-1] else "a Checkout session, unpaid")
        if i.authorization is not None and i.authorization[2] and i.charge is not None:
            event("a captured charge")
    for i in seen.intents.values():
        event(f"intent {i.status} {i.cancellation_reason or ''}".rstrip())


async def assert_invariants(db: asyncpg.Connection, scenario: Scenario, seen: Seen) -> None:
    tally(seen)
    assert seen.processed == len(scenario.events)  # one inbox row per event, duplicates none
    assert await broken_invariants(db) == []
    assert await reconcile_findings(db, seen) == []


# ---------------------------------------------------------------------------
# The properties.


@SHRINK_TIME
@PROPERTY_SETTINGS
@given(data=st.data())
async def test_one_batch_in_any_delivery_order_ends_as_the_model_says(
    db: asyncpg.Connection, data: st.DataObject
) -> None:
    """All events, duplicated and shuffled, in one batch: scarce stock goes to the first paid."""
    scenario = data.draw(scenarios(scarce=True), label="scenario")
    expected = model.one_batch(scenario.events, scenario.carts, scenario.stock)
    delivery = data.draw(deliveries(scenario, batches=False), label="delivery")
    await reset(db, scenario)
    await deliver(db, delivery)
    seen = await observe(db)
    assert_state(seen, expected)
    assert_stock_follows_allocations(scenario, seen)
    await assert_invariants(db, scenario, seen)


@SHRINK_TIME
@PROPERTY_SETTINGS
@given(data=st.data())
async def test_many_batches_with_abundant_stock_end_the_same_in_any_order_and_split(
    db: asyncpg.Connection, data: st.DataObject
) -> None:
    """Cut into batches anywhere, delivered twice differently: both runs end in one state."""
    scenario = data.draw(scenarios(scarce=False), label="scenario")
    # What any delivery ends in, but for how a canceled order was allocated.
    everywhere = model.one_batch(scenario.events, scenario.carts, scenario.stock)
    runs: list[Seen] = []
    for label in ("first delivery", "second delivery"):
        delivery = data.draw(deliveries(scenario, batches=True), label=label)
        await reset(db, scenario)
        await deliver(db, delivery)
        seen = await observe(db)
        assert_state(seen, model.in_batches(delivery.for_model(), scenario.carts, scenario.stock))
        twins = scenario.twins
        assert_same(
            "order",
            comparable_orders(seen.orders, twins),
            comparable_orders(everywhere.orders, twins),
        )
        if not twins:
            assert_same("level", seen.levels, everywhere.levels)
        assert_stock_follows_allocations(scenario, seen)
        await assert_invariants(db, scenario, seen)
        runs.append(seen.comparable(twins))
    first, second = runs
    for part in ("intents", "refunds", "orders", "levels"):
        assert_same(
            f"second run, {part[:-1]}", getattr(second, part), getattr(first, part), "first"
        )
    assert first.processed == second.processed


@SHRINK_TIME
@PROPERTY_SETTINGS
@given(data=st.data())
async def test_many_batches_with_scarce_stock_serve_each_batch_first_paid_and_conserve_stock(
    db: asyncpg.Connection, data: st.DataObject
) -> None:
    """Who wins scarce stock depends on the batches, exactly as the rules say; the ledger holds."""
    scenario = data.draw(scenarios(scarce=True), label="scenario")
    delivery = data.draw(deliveries(scenario, batches=True), label="delivery")
    await reset(db, scenario)
    await deliver(db, delivery)
    seen = await observe(db)
    assert_state(seen, model.in_batches(delivery.for_model(), scenario.carts, scenario.stock))
    assert_stock_follows_allocations(scenario, seen)
    await assert_invariants(db, scenario, seen)

"""Apply a batch of decoded events to PostgreSQL in one transaction.

The unit of work (DESIGN.md, "The path of one event"):
  1. claim the events in the inbox; only claimed events are applied (invariant 2);
  2. lock the intents' rows and read their state;
  3. fold each intent's claimed events, in Kafka order, into decisions;
  4. lock the stock rows touched, in SKU order (invariant 8), allocate stock to
     new orders in Kafka order, and write orders, items, movements and levels.
The caller commits Kafka offsets only after this transaction has committed.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from consumer.allocation import Cart, CartLine, OrderPlan, OrderStatus, allocate, skus_wanted
from consumer.decode import Envelope
from consumer.fold import IntentFold, IntentState, Outcome, fold_intent
from schemas import StripeEvent

Connection = asyncpg.Connection | PoolConnectionProxy


class ConcurrentIntentWrite(Exception):
    """Another transaction created one of the batch's intents first (a consumer that
    lost its partitions in a rebalance and is finishing a batch). The batch is
    rolled back and retried; it then finds the rows and waits for their locks."""

    retriable = True  # consumer.errors: the environment's, not the event's
    cause = "conflict"


@dataclass
class BatchResult:
    events: int = 0
    claimed: int = 0
    rejected: int = 0  # refused by the database for their data, and dead-lettered
    outcomes: Counter[str] = field(default_factory=Counter)
    orders: Counter[str] = field(default_factory=Counter)

    @property
    def duplicates(self) -> int:
        return self.events - self.claimed - self.rejected

    def merged(self, other: BatchResult) -> BatchResult:
        return BatchResult(
            events=self.events + other.events,
            claimed=self.claimed + other.claimed,
            rejected=self.rejected + other.rejected,
            outcomes=self.outcomes + other.outcomes,
            orders=self.orders + other.orders,
        )


async def apply_batch(conn: Connection, envelopes: list[Envelope]) -> BatchResult:
    """Apply `envelopes` (in Kafka order) in one transaction on `conn`."""
    result = BatchResult(events=len(envelopes))
    async with conn.transaction():
        await conn.execute("SET LOCAL intentflow.applying = 'on'")
        claimed = await _claim(conn, envelopes)
        result.claimed = len(claimed)
        if not claimed:
            return result
        by_intent: dict[str, list[StripeEvent]] = defaultdict(list)
        for envelope in claimed:
            intent_id = envelope.intent_id
            if intent_id is None:
                result.outcomes[Outcome.IGNORED] += 1
                continue
            by_intent[intent_id].append(envelope.event)
        states = await _lock_intents(conn, sorted(by_intent))
        folds = [fold_intent(states[pid], events) for pid, events in by_intent.items()]
        # Before any order: from here on this transaction holds every intent's row.
        await _write_intents(conn, folds)
        plans = await _place_orders(conn, folds)
        await _write_orders(conn, plans)
        await _record_outcomes(conn, claimed, folds, result)
        for plan in plans:
            result.orders[plan.status] += 1
    return result


async def _claim(conn: Connection, envelopes: list[Envelope]) -> list[Envelope]:
    first: dict[str, Envelope] = {}
    for envelope in envelopes:
        first.setdefault(envelope.event.id, envelope)
    ids = sorted(first)  # one global order for the inbox's row locks
    rows = await conn.fetch(
        """
        INSERT INTO processed_events
            (event_id, event_type, payment_intent_id, kafka_partition, kafka_offset)
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[])
        ON CONFLICT (event_id) DO NOTHING
        RETURNING event_id
        """,
        ids,
        [first[i].event.type for i in ids],
        [first[i].intent_id for i in ids],
        [first[i].partition for i in ids],
        [first[i].offset for i in ids],
    )
    won = {row["event_id"] for row in rows}
    return [e for e in first.values() if e.event.id in won]


async def _lock_intents(conn: Connection, intent_ids: list[str]) -> dict[str, IntentState]:
    """Lock the intents that have a row and read every intent's state.

    Intents with no row yet are inserted by `_write_intents`; a concurrent
    insert of the same intent is detected there and the batch retried.
    """
    rows = await conn.fetch(
        """
        SELECT id, status FROM payment_intents
        WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE
        """,
        intent_ids,
    )
    with_orders = {
        r["payment_intent_id"]
        for r in await conn.fetch(
            "SELECT payment_intent_id FROM orders WHERE payment_intent_id = ANY($1::text[])",
            intent_ids,
        )
    }
    states = {pid: IntentState(pid, None, pid in with_orders, exists=False) for pid in intent_ids}
    for r in rows:
        states[r["id"]] = IntentState(r["id"], r["status"], r["id"] in with_orders, exists=True)
    return states


async def _place_orders(conn: Connection, folds: list[IntentFold]) -> list[OrderPlan]:
    requests = [f.create_order for f in folds if f.create_order is not None]
    if not requests:
        return []
    carts = await _load_carts(conn, sorted({r.cart_id for r in requests if r.cart_id}))
    skus = skus_wanted(requests, carts)
    stock: dict[str, int] = {}
    if skus:
        rows = await conn.fetch(
            """
            SELECT sku, stocked_quantity FROM inventory_levels
            WHERE sku = ANY($1::text[]) ORDER BY sku FOR UPDATE
            """,
            skus,
        )
        stock = {r["sku"]: r["stocked_quantity"] for r in rows}
    plans, _left = allocate(requests, carts, stock)
    return plans


async def _load_carts(conn: Connection, cart_ids: list[str]) -> dict[str, Cart]:
    if not cart_ids:
        return {}
    rows = await conn.fetch(
        """
        SELECT c.id, c.currency, i.sku, i.quantity, i.unit_amount
        FROM carts c LEFT JOIN cart_items i ON i.cart_id = c.id
        WHERE c.id = ANY($1::text[]) ORDER BY c.id, i.id
        """,
        cart_ids,
    )
    lines: dict[str, list[CartLine]] = defaultdict(list)
    currency: dict[str, str] = {}
    for r in rows:
        currency[r["id"]] = r["currency"]
        if r["sku"] is not None:
            lines[r["id"]].append(CartLine(r["sku"], r["quantity"], r["unit_amount"]))
    return {cid: Cart(cid, cur, tuple(lines[cid])) for cid, cur in currency.items()}


async def _write_orders(conn: Connection, plans: list[OrderPlan]) -> None:
    """Insert the planned orders with their items and stock effects."""
    if not plans:
        return
    rows = await conn.fetch(
        """
        INSERT INTO orders
            (payment_intent_id, cart_id, status, status_reason, amount, currency, source_event_id)
        SELECT * FROM unnest(
            $1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[])
        RETURNING id, payment_intent_id
        """,
        [p.request.payment_intent_id for p in plans],
        [p.request.cart_id for p in plans],
        [str(p.status) for p in plans],
        [p.reason for p in plans],
        [p.request.amount for p in plans],
        [p.request.currency for p in plans],
        [p.request.event_id for p in plans],
    )
    order_ids: dict[str, int] = {r["payment_intent_id"]: r["id"] for r in rows}
    items = [
        (order_ids[p.request.payment_intent_id], line)
        for p in plans
        if p.cart is not None
        for line in p.cart.lines
    ]
    if items:
        await conn.execute(
            """
            INSERT INTO order_items (order_id, sku, quantity, unit_amount)
            SELECT * FROM unnest($1::bigint[], $2::text[], $3::int[], $4::bigint[])
            """,
            [oid for oid, _ in items],
            [line.sku for _, line in items],
            [line.quantity for _, line in items],
            [line.unit_amount for _, line in items],
        )
    placed = [p for p in plans if p.status is OrderStatus.PLACED]
    await _take_stock(conn, placed, order_ids)


async def _take_stock(conn: Connection, placed: list[OrderPlan], order_ids: dict[str, int]) -> None:
    movements = [
        (sku, -qty, order_ids[p.request.payment_intent_id], p.request.event_id)
        for p in placed
        for sku, qty in sorted(p.taken.items())
    ]
    if not movements:
        return
    await conn.execute(
        """
        INSERT INTO inventory_movements (sku, quantity_delta, reason, order_id, event_id)
        SELECT sku, delta, 'order', order_id, event_id
        FROM unnest($1::text[], $2::int[], $3::bigint[], $4::text[])
            AS m(sku, delta, order_id, event_id)
        """,
        [m[0] for m in movements],
        [m[1] for m in movements],
        [m[2] for m in movements],
        [m[3] for m in movements],
    )
    taken: Counter[str] = Counter()
    for sku, delta, _, _ in movements:
        taken[sku] -= delta
    skus = sorted(taken)
    await conn.execute(
        """
        UPDATE inventory_levels l
        SET stocked_quantity = l.stocked_quantity - t.qty, updated_at = now()
        FROM unnest($1::text[], $2::int[]) AS t(sku, qty)
        WHERE l.sku = t.sku
        """,
        skus,
        [taken[s] for s in skus],
    )


async def _write_intents(conn: Connection, folds: list[IntentFold]) -> None:
    """Store each changed intent's new state; fail retriably if another writer raced us."""
    changed = sorted((f for f in folds if f.changed), key=lambda f: f.state.payment_intent_id)
    known = [f for f in changed if f.state.exists]
    new = [f for f in changed if not f.state.exists]
    if known:
        await conn.execute(
            """
            UPDATE payment_intents p
            SET status = v.status, last_event_id = v.event_id, updated_at = now()
            FROM unnest($1::text[], $2::text[], $3::text[]) AS v(id, status, event_id)
            WHERE p.id = v.id
            """,
            [f.state.payment_intent_id for f in known],
            [f.state.status for f in known],
            [f.last_event_id for f in known],
        )
    if new:
        inserted = await conn.fetch(
            """
            INSERT INTO payment_intents (id, status, last_event_id)
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
            ON CONFLICT (id) DO NOTHING
            RETURNING id
            """,
            [f.state.payment_intent_id for f in new],
            [f.state.status for f in new],
            [f.last_event_id for f in new],
        )
        if len(inserted) != len(new):
            raise ConcurrentIntentWrite(f"{len(new) - len(inserted)} intents written concurrently")


async def _record_outcomes(
    conn: Connection,
    claimed: list[Envelope],
    folds: list[IntentFold],
    result: BatchResult,
) -> None:
    """Count outcomes; store those other than `applied` (the column's default)."""
    not_applied: list[tuple[str, str]] = [
        (e.event.id, str(Outcome.IGNORED)) for e in claimed if e.intent_id is None
    ]
    for fold in folds:
        for event_id, outcome in fold.outcomes:
            result.outcomes[outcome] += 1
            if outcome is not Outcome.APPLIED:
                not_applied.append((event_id, str(outcome)))
    if not_applied:
        await conn.execute(
            """
            UPDATE processed_events e SET outcome = v.outcome
            FROM unnest($1::text[], $2::text[]) AS v(event_id, outcome)
            WHERE e.event_id = v.event_id
            """,
            [n[0] for n in not_applied],
            [n[1] for n in not_applied],
        )

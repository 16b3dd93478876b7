"""Apply the batch's order decisions: one set-based writer per kind of decision.

Inside the batch's transaction, after the intents' rows are locked and written:
  1. bring every existing order that a decision touched up to date: status,
     amount refunded and captured, cancellation reason, dispute, capture
     deadline (`CancelOrder`, `RecordCancellation`, `RecordRefund`,
     `RecordDispute`, `RecordPayment`); an order canceled here frees its cart
     for this batch's new orders;
  2. collect what canceled orders took (their `order` movements) and what new
     orders want; lock those stock rows in SKU order (invariant 8);
  3. give back what canceled orders took, one `cancellation` movement per SKU
     (`CancelOrder`; the unique index on movements refuses a second one);
  4. allocate stock to new orders in the order their payments were
     authorized (`PlaceOrder`, first paid, first served): an order whose cart
     already has a live order (read from `holds_cart`, or planned earlier in
     the batch) is a `duplicate` and takes nothing; write the orders, their
     items, `order` movements and the levels.
It returns every order it created or changed (`OrderChange`), for the outbox.
An order's status is derived by `consumer.decisions.order_status`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime
from typing import Any

import asyncpg

from intentflow.consumer.allocation import LIVE, Cart, CartLine, OrderPlan, allocate, skus_wanted
from intentflow.consumer.connections import Columns, Connection
from intentflow.consumer.decisions import (
    Allocation,
    CancelOrder,
    Facts,
    OrderStatus,
    PlaceOrder,
    RecordCancellation,
    RecordDispute,
    RecordPayment,
    RecordRefund,
    order_status,
)
from intentflow.consumer.errors import describe
from intentflow.consumer.fold import IntentFold
from intentflow.consumer.outbox import OrderChange

# Decisions about an existing order that re-derive its status and copy the facts.
_REFRESHED_BY = (CancelOrder, RecordCancellation, RecordRefund, RecordDispute, RecordPayment)

# (sku, delta, reason, order id, event id)
Movement = tuple[str, int, str, int, str]


async def write_orders(conn: Connection, folds: list[IntentFold]) -> list[OrderChange]:
    """Apply every order decision of the batch; return the orders it created or changed."""
    places: list[tuple[PlaceOrder, Facts]] = []
    cancels: list[tuple[CancelOrder, IntentFold]] = []
    touched: list[IntentFold] = []
    for fold in folds:
        for decision in fold.decisions:
            if type(decision) is PlaceOrder:
                places.append((decision, fold.state.facts))
            elif type(decision) is CancelOrder:
                cancels.append((decision, fold))
        if fold.state.order is not None and any(type(d) in _REFRESHED_BY for d in fold.decisions):
            touched.append(fold)
    if not places and not touched:
        return []
    # Existing orders first: one canceled in this batch gives back its cart (the
    # index holds a cart only while its order is not canceled), as its stock below.
    refreshed = await _refresh(conn, touched)
    # First paid, first served: the authorization's created, received-at, partition, offset.
    places.sort(key=lambda place: place[0].paid_key)
    to_allocate = [p for p, facts in places if not facts.canceled]
    returns = await _taken_by(conn, cancels)
    # Skipped orders get their cart's lines too: the same order as "authorized, then canceled".
    carts = await _load_carts(conn, sorted({p.cart_id for p, _ in places}))
    holders = await _cart_holders(conn, sorted({p.cart_id for p in to_allocate}))
    skus = sorted(set(skus_wanted(to_allocate, carts)) | {m[0] for m in returns})
    stock = await _lock_stock(conn, skus)
    for sku, delta, *_ in returns:
        stock[sku] = stock.get(sku, 0) + delta
    plans, _left = allocate(to_allocate, carts, stock, holders)
    skipped = [
        OrderPlan(p, carts.get(p.cart_id), Allocation.SKIPPED, None, {})
        for p, facts in places
        if facts.canceled
    ]
    facts_of = {p.payment_intent_id: facts for p, facts in places}
    created = await _insert_orders(conn, plans + skipped, facts_of)
    movements = returns + [
        (sku, -qty, "order", created[p.request.payment_intent_id], p.request.event_id)
        for p in plans
        if p.status is Allocation.PLACED
        for sku, qty in sorted(p.taken.items())
    ]
    await _move_stock(conn, movements)
    changes = []
    for p in plans + skipped:
        pid, amount = p.request.payment_intent_id, p.request.amount
        facts = facts_of[pid]
        status = order_status(p.status, facts, amount)
        snapshot = _snapshot(p, created[pid], status, facts)
        changes.append(_change(created[pid], pid, None, status, facts, amount, p.status, snapshot))
    return changes + refreshed


def _change(
    order_id: int,
    pid: str,
    previous: OrderStatus | None,
    status: OrderStatus,
    facts: Facts,
    amount: int,
    allocation: Allocation,
    snapshot: dict[str, Any] | None = None,
) -> OrderChange:
    return OrderChange(
        order_id,
        pid,
        previous,
        status,
        facts.status,
        amount,
        allocation,
        captured=facts.amount_received,
        refunded=facts.amount_refunded,
        disputed=facts.disputed,
        snapshot=snapshot,
    )


def _snapshot(plan: OrderPlan, order_id: int, status: OrderStatus, facts: Facts) -> dict[str, Any]:
    """A new order as its event shows it (schemas/orders.py), from what was just written."""
    r = plan.request
    d = facts.dispute
    return {
        "id": order_id,
        "payment_intent_id": r.payment_intent_id,
        "cart_id": r.cart_id,
        "status": str(status),
        "allocation": str(plan.status),
        "status_reason": plan.reason,
        "amount": r.amount,
        "amount_authorized": r.amount_authorized,
        "amount_refunded": facts.amount_refunded,
        "amount_captured": facts.amount_received,
        "currency": r.currency,
        "payment_status": facts.status,
        "cancellation_reason": facts.cancellation_reason,
        "capture_before": facts.capture_before,
        "account": facts.account,
        "dispute": d and {"status": d.status, "amount": d.amount, "reason": d.reason},
        "items": [
            {"sku": line.sku, "quantity": line.quantity, "unit_amount": line.unit_amount}
            for line in (plan.cart.lines if plan.cart is not None else ())
        ],
    }


async def _taken_by(
    conn: Connection, cancels: list[tuple[CancelOrder, IntentFold]]
) -> list[Movement]:
    """What each newly canceled, placed order took: the movements that give it back."""
    placed = {
        fold.state.order.id: cancel
        for cancel, fold in cancels
        if fold.state.order is not None and fold.state.order.allocation is Allocation.PLACED
    }
    if not placed:
        return []
    rows = await conn.fetch(
        """
        SELECT order_id, sku, -sum(quantity_delta)::int AS qty FROM inventory_movements
        WHERE order_id = ANY($1::bigint[]) AND reason = 'order'
        GROUP BY order_id, sku ORDER BY order_id, sku
        """,
        sorted(placed),
    )
    return [
        (r["sku"], r["qty"], "cancellation", r["order_id"], placed[r["order_id"]].event_id)
        for r in rows
        if r["qty"] > 0
    ]


async def _cart_holders(conn: Connection, cart_ids: list[str]) -> dict[str, str]:
    """Per cart, the payment intent whose live order holds it (one per cart: the index).

    A concurrent batch may be placing a first order for one of these carts right
    now: then this batch's insert waits on the unique index and fails with
    `ConcurrentCartOrder` once that one commits, and its retry finds the holder.
    """
    if not cart_ids:
        return {}
    rows = await conn.fetch(
        "SELECT cart_id, payment_intent_id FROM orders"
        " WHERE cart_id = ANY($1::text[]) AND holds_cart AND status <> 'canceled'",
        cart_ids,
    )
    return {r["cart_id"]: r["payment_intent_id"] for r in rows}


async def _lock_stock(conn: Connection, skus: list[str]) -> dict[str, int]:
    if not skus:
        return {}
    rows = await conn.fetch(
        """
        SELECT sku, stocked_quantity FROM inventory_levels
        WHERE sku = ANY($1::text[]) ORDER BY sku FOR UPDATE
        """,
        skus,
    )
    return {r["sku"]: r["stocked_quantity"] for r in rows}


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


class ConcurrentCartOrder(Exception):
    """Another transaction gave one of the batch's carts its live order first (two
    payments for one cart, on two partitions, at once). The batch is rolled back and
    retried; it then finds that order and makes this one a duplicate."""

    retriable = True  # consumer.errors: the environment's, not the event's
    cause = "conflict"


# A new order's columns. Most new orders have nothing yet that happened after
# their authorization (a refund, a dispute, a capture, a deadline): they are
# written with `_NEW_ORDER` alone and the rest default.
_NEW_ORDER = Columns.of(
    ("payment_intent_id", "text"),
    ("cart_id", "text"),
    ("status", "text"),
    ("allocation", "text"),
    ("status_reason", "text"),
    ("amount", "bigint"),
    ("currency", "text"),
    ("source_event_id", "text"),
    ("amount_authorized", "bigint"),
    ("holds_cart", "bool"),
)
_COPIED_FACTS = Columns.of(
    ("amount_refunded", "bigint"),
    ("amount_captured", "bigint"),
    ("cancellation_reason", "text"),
    ("dispute_status", "text"),
    ("dispute_amount", "bigint"),
    ("dispute_reason", "text"),
    ("capture_before", "timestamptz"),
    ("account", "text"),
)
_EVENTFUL_ORDER = _NEW_ORDER + _COPIED_FACTS


async def _insert_orders(
    conn: Connection, plans: list[OrderPlan], facts_of: dict[str, Facts]
) -> dict[str, int]:
    """Insert the orders with their items; return each intent's new order id."""
    if not plans:
        return {}
    plain: list[dict[str, Any]] = []
    eventful: list[dict[str, Any]] = []
    for p in plans:
        facts = facts_of[p.request.payment_intent_id]
        row = _order_row(p, facts)
        (plain if _nothing_after(facts) else eventful).append(row)
    rows = []
    try:
        for columns, batch in ((_NEW_ORDER, plain), (_EVENTFUL_ORDER, eventful)):
            if batch:
                rows += await conn.fetch(
                    f"INSERT INTO orders ({columns.listed}) SELECT * FROM {columns.unnest}"
                    " RETURNING id, payment_intent_id",
                    *columns.arrays(batch),
                )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "orders_one_live_order_per_cart_idx":
            raise ConcurrentCartOrder(describe(exc)) from exc
        raise
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
    return order_ids


def _nothing_after(facts: Facts) -> bool:
    """Whether nothing that an order copies has happened to the intent since its authorization."""
    return not (
        facts.amount_refunded
        or facts.charge_refunded
        or facts.dispute
        or facts.canceled
        or facts.amount_received
        or facts.capture_before
        or facts.account
    )


def _order_row(plan: OrderPlan, facts: Facts) -> dict[str, Any]:
    """A new order's row, keyed by `_EVENTFUL_ORDER`'s columns."""
    r = plan.request
    return {
        "payment_intent_id": r.payment_intent_id,
        "cart_id": r.cart_id,
        "status": str(order_status(plan.status, facts, r.amount)),
        "allocation": str(plan.status),
        "status_reason": plan.reason,
        "amount": r.amount,
        "currency": r.currency,
        "source_event_id": r.event_id,
        "amount_authorized": r.amount_authorized,
        "holds_cart": plan.status in LIVE,
        **_copied(facts),
    }


def _copied(facts: Facts) -> dict[str, Any]:
    """What an order copies of its intent's facts, keyed by `_COPIED_FACTS`'s columns."""
    d = facts.dispute
    return {
        "amount_refunded": facts.amount_refunded,
        "amount_captured": facts.amount_received,
        "cancellation_reason": facts.cancellation_reason,
        "dispute_status": d and d.status,
        "dispute_amount": d and d.amount,
        "dispute_reason": d and d.reason,
        "capture_before": _timestamp(facts.capture_before),
        "account": facts.account,
    }


def _timestamp(unix_s: int | None) -> datetime | None:
    return None if unix_s is None else datetime.fromtimestamp(unix_s, UTC)


class StockRowMissing(Exception):
    """Movements for SKUs that have no inventory_levels row: the batch waits for an operator.

    Not the event's fault, so never dead-lettered: the row was removed behind the
    database's refusal (migration 0005), and inserting it again mends the books
    (its trigger records what makes the movements sum to the level put in).
    """

    retriable = True  # consumer.errors: the environment's, not the event's
    cause = "stock_row_missing"

    def __init__(self, skus: list[str]) -> None:
        named = ", ".join(repr(sku) for sku in skus[:5])
        if len(skus) > 5:
            named += f" and {len(skus) - 5} more"
        super().__init__(
            f"no inventory_levels row for SKU {named}, whose stock this batch moves: insert one "
            "with the quantity on hand (its movements are kept); the batch is retried until then"
        )
        self.skus = skus


async def _move_stock(conn: Connection, movements: list[Movement]) -> None:
    """Write the movements and change each level by their sum (rows locked by `_lock_stock`).

    Raises StockRowMissing when a movement's SKU has no level row, which would
    otherwise take the movement into the books and change no level.
    """
    if not movements:
        return
    await conn.execute(
        """
        INSERT INTO inventory_movements (sku, quantity_delta, reason, order_id, event_id)
        SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::bigint[], $5::text[])
        """,
        [m[0] for m in movements],
        [m[1] for m in movements],
        [m[2] for m in movements],
        [m[3] for m in movements],
        [m[4] for m in movements],
    )
    net: Counter[str] = Counter()
    for sku, delta, *_ in movements:
        net[sku] += delta
    skus = sorted(net)
    # One statement, as before: SKUs whose movements cancel out change no level
    # but need their row all the same.
    missing: list[str] = await conn.fetchval(
        """
        WITH t AS (SELECT * FROM unnest($1::text[], $2::int[]) AS t(sku, delta)),
        moved AS (
            UPDATE inventory_levels l
            SET stocked_quantity = l.stocked_quantity + t.delta, updated_at = now()
            FROM t WHERE l.sku = t.sku AND t.delta <> 0
        )
        SELECT coalesce(array_agg(t.sku ORDER BY t.sku), '{}') FROM t
        WHERE NOT EXISTS (SELECT 1 FROM inventory_levels l WHERE l.sku = t.sku)
        """,
        skus,
        [net[s] for s in skus],
    )
    if missing:
        raise StockRowMissing(missing)


_REFRESHED = Columns.of(("id", "bigint"), ("status", "text")) + _COPIED_FACTS


async def _refresh(conn: Connection, touched: list[IntentFold]) -> list[OrderChange]:
    """Re-derive the status and copy the facts of existing orders a decision touched."""
    if not touched:
        return []
    rows: list[dict[str, Any]] = []
    changes: list[OrderChange] = []
    for fold in sorted(touched, key=lambda f: f.state.payment_intent_id):
        order = fold.state.order
        assert order is not None
        facts = fold.state.facts
        status: OrderStatus = order_status(order.allocation, facts, order.amount)
        pid = fold.state.payment_intent_id
        changes.append(
            _change(order.id, pid, order.status, status, facts, order.amount, order.allocation)
        )
        rows.append({"id": order.id, "status": str(status), **_copied(facts)})
    assigned = ", ".join(f"{name} = v.{name}" for name in _REFRESHED.names[1:])
    await conn.execute(
        f"""
        UPDATE orders o SET {assigned}, updated_at = now()
        FROM {_REFRESHED.unnest} AS v({_REFRESHED.listed})
        WHERE o.id = v.id
        """,
        *_REFRESHED.arrays(rows),
    )
    return changes

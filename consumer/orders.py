"""Apply the batch's order decisions: one set-based writer per kind of decision.

Inside the batch's transaction, after the intents' rows are locked and written:
  1. collect what canceled orders took (their `order` movements) and what new
     orders want; lock those stock rows in SKU order (invariant 8);
  2. give back what canceled orders took, one `cancellation` movement per SKU
     (`CancelOrder`; the unique index on movements refuses a second one);
  3. allocate stock to new orders in the order their payments were
     authorized (`PlaceOrder`, first paid, first served), and write the
     orders, their items, `order` movements and the levels;
  4. bring every existing order that a decision touched up to date: status,
     amount refunded, cancellation reason, dispute (`CancelOrder`,
     `RecordCancellation`, `RecordRefund`, `RecordDispute`).
It returns every order it created or changed (`OrderChange`), for the outbox.
An order's status is derived by `consumer.decisions.order_status`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from intentflow.consumer.allocation import Cart, CartLine, OrderPlan, allocate, skus_wanted
from intentflow.consumer.connections import Connection, unnest_columns
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
    # First paid, first served: the authorization's created, received-at, partition, offset.
    places.sort(key=lambda place: place[0].paid_key)
    to_allocate = [p for p, facts in places if not facts.canceled]
    returns = await _taken_by(conn, cancels)
    # Skipped orders get their cart's lines too: the same order as "authorized, then canceled".
    carts = await _load_carts(conn, sorted({p.cart_id for p, _ in places if p.cart_id}))
    skus = sorted(set(skus_wanted(to_allocate, carts)) | {m[0] for m in returns})
    stock = await _lock_stock(conn, skus)
    for sku, delta, *_ in returns:
        stock[sku] = stock.get(sku, 0) + delta
    plans, _left = allocate(to_allocate, carts, stock)
    skipped = [
        OrderPlan(p, carts.get(p.cart_id or ""), Allocation.SKIPPED, None, {})
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
        changes.append(
            OrderChange(
                created[pid], pid, None, status, facts.status, amount, p.status, snapshot=snapshot
            )
        )
    return changes + await _refresh(conn, touched)


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
        "currency": r.currency,
        "payment_status": facts.status,
        "cancellation_reason": facts.cancellation_reason,
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


async def _insert_orders(
    conn: Connection, plans: list[OrderPlan], facts_of: dict[str, Facts]
) -> dict[str, int]:
    """Insert the orders with their items; return each intent's new order id."""
    if not plans:
        return {}
    # Orders with no refund, dispute or cancellation yet (nearly all) are
    # written with the columns they set; the rest default.
    plain: list[OrderPlan] = []
    eventful: list[OrderPlan] = []
    for p in plans:
        facts = facts_of[p.request.payment_intent_id]
        (plain if _nothing_after(facts) else eventful).append(p)
    rows = []
    if plain:
        rows += await conn.fetch(
            f"""
            INSERT INTO orders ({_ORDER_COLUMNS})
            SELECT * FROM unnest(
                $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                $7::text[], $8::text[], $9::bigint[])
            RETURNING id, payment_intent_id
            """,
            *unnest_columns(_order_rows(plain, facts_of), 9),
        )
    if eventful:
        rows += await conn.fetch(
            f"""
            INSERT INTO orders ({_ORDER_COLUMNS}, amount_refunded, cancellation_reason,
                                dispute_status, dispute_amount, dispute_reason)
            SELECT * FROM unnest(
                $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                $7::text[], $8::text[], $9::bigint[], $10::bigint[], $11::text[], $12::text[],
                $13::bigint[], $14::text[])
            RETURNING id, payment_intent_id
            """,
            *unnest_columns(_order_rows(eventful, facts_of), 14),
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
    return order_ids


_ORDER_COLUMNS = """payment_intent_id, cart_id, status, allocation, status_reason, amount,
    currency, source_event_id, amount_authorized"""


def _nothing_after(facts: Facts) -> bool:
    """Whether nothing has happened to the intent after its authorization that an order copies."""
    return not (facts.amount_refunded or facts.charge_refunded or facts.dispute or facts.canceled)


def _order_rows(plans: list[OrderPlan], facts_of: dict[str, Facts]) -> list[tuple[Any, ...]]:
    """One row per order: `_ORDER_COLUMNS`, then the five copied from the intent's facts."""
    rows = []
    for p in plans:
        r = p.request
        facts = facts_of[r.payment_intent_id]
        d = facts.dispute
        rows.append(
            (
                r.payment_intent_id,
                r.cart_id,
                str(order_status(p.status, facts, r.amount)),
                str(p.status),
                p.reason,
                r.amount,
                r.currency,
                r.event_id,
                r.amount_authorized,
                facts.amount_refunded,
                facts.cancellation_reason,
                d and d.status,
                d and d.amount,
                d and d.reason,
            )
        )
    return rows


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


async def _refresh(conn: Connection, touched: list[IntentFold]) -> list[OrderChange]:
    """Re-derive the status and copy the facts of existing orders a decision touched."""
    if not touched:
        return []
    rows: list[tuple[object, ...]] = []
    changes: list[OrderChange] = []
    for fold in sorted(touched, key=lambda f: f.state.payment_intent_id):
        order = fold.state.order
        assert order is not None
        facts = fold.state.facts
        d = facts.dispute
        status: OrderStatus = order_status(order.allocation, facts, order.amount)
        pid = fold.state.payment_intent_id
        changes.append(
            OrderChange(
                order.id, pid, order.status, status, facts.status, order.amount, order.allocation
            )
        )
        rows.append(
            (
                order.id,
                str(status),
                facts.amount_refunded,
                facts.cancellation_reason,
                d and d.status,
                d and d.amount,
                d and d.reason,
            )
        )
    await conn.execute(
        """
        UPDATE orders o
        SET status = v.status, amount_refunded = v.amount_refunded,
            cancellation_reason = v.cancellation_reason, dispute_status = v.dispute_status,
            dispute_amount = v.dispute_amount, dispute_reason = v.dispute_reason,
            updated_at = now()
        FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                    $6::bigint[], $7::text[])
            AS v(id, status, amount_refunded, cancellation_reason, dispute_status,
                 dispute_amount, dispute_reason)
        WHERE o.id = v.id
        """,
        *unnest_columns(rows, 7),
    )
    return changes

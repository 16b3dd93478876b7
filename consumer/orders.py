"""Apply the batch's order decisions: one set-based writer per kind of decision.

Inside the batch's transaction, after the intents' rows are locked and written:
  1. bring every existing order that a decision touched up to date: status,
     what it shows of the intent's facts and terms (`CancelOrder`,
     `RecordCancellation`, `RecordRefund`, `RecordDispute`, `RecordPayment`);
     an order canceled here frees its cart for this batch's new orders;
  2. collect what canceled orders took (their `order` movements) and what new
     orders, and orders decided again (`ReviewOrder`), want; lock those stock
     rows in SKU order (consumer/stock.py, invariant 8);
  3. give back what canceled orders took, one `cancellation` movement per SKU
     (`CancelOrder`; the unique index on movements refuses a second one);
  4. decide new orders (`PlaceOrder`) and orders waiting in needs_review whose
     terms changed (`ReviewOrder`) in the order their payments were made
     (first paid, first served; consumer/allocation.py): an order whose cart
     already has a live order (read from `holds_cart`, or decided earlier in
     the batch) is a `duplicate` and takes nothing; write the orders, their
     items, `order` movements and the levels.
It returns every order it created or changed (`OrderChange`), one per order, for
the outbox. An order's status is derived by `consumer.decisions.order_status`.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import asyncpg

from intentflow.consumer.allocation import LIVE, Cart, CartLine, OrderPlan, allocate, skus_wanted
from intentflow.consumer.connections import Columns, Connection
from intentflow.consumer.decisions import (
    Allocation,
    CancelOrder,
    OrderStatus,
    PlaceOrder,
    RecordCancellation,
    RecordDispute,
    RecordPayment,
    RecordRefund,
    RecordRefundStopped,
    ReviewOrder,
    order_status,
)
from intentflow.consumer.errors import describe
from intentflow.consumer.facts import Facts, Terms, terms
from intentflow.consumer.fold import IntentFold
from intentflow.consumer.outbox import OrderChange
from intentflow.consumer.stock import lock_stock, move_stock, taken_by

# Decisions about an existing order that re-derive its status and copy the facts.
_REFRESHED_BY = (
    CancelOrder,
    RecordCancellation,
    RecordRefund,
    RecordRefundStopped,
    RecordDispute,
    RecordPayment,
    ReviewOrder,
)


class ConcurrentCartOrder(Exception):
    """Another transaction gave one of the batch's carts its live order first (two
    payments for one cart, on two partitions, at once). The batch is rolled back and
    retried; it then finds that order and makes this one a duplicate."""

    retriable = True  # consumer.errors: the environment's, not the event's
    cause = "conflict"


async def write_orders(conn: Connection, folds: list[IntentFold]) -> list[OrderChange]:
    """Apply every order decision of the batch; return the orders it created or changed."""
    places: list[tuple[PlaceOrder, Facts]] = []
    reviews: dict[str, IntentFold] = {}
    canceled: dict[int, str] = {}  # placed orders canceled now -> the canceling event
    touched: list[IntentFold] = []
    for fold in folds:
        order = fold.state.order
        for decision in fold.decisions:
            if type(decision) is PlaceOrder:
                places.append((decision, fold.state.facts))
            elif type(decision) is ReviewOrder:
                reviews[decision.payment_intent_id] = fold
            elif type(decision) is CancelOrder and order and order.allocation is Allocation.PLACED:
                canceled[order.id] = decision.event_id
        if order is not None and any(type(d) in _REFRESHED_BY for d in fold.decisions):
            touched.append(fold)
    if not places and not touched:
        return []
    # Existing orders first: one canceled in this batch gives back its cart (the
    # index holds a cart only while its order is not canceled), as its stock below.
    refreshed = await _refresh(conn, touched, set(reviews))
    # First paid, first served: when the money was held or received, then where it arrived.
    requests: list[PlaceOrder | ReviewOrder] = [p for p, facts in places if not facts.canceled]
    requests += [d for f in reviews.values() for d in f.decisions if type(d) is ReviewOrder]
    requests.sort(key=lambda request: request.paid_key)
    returns = await taken_by(conn, canceled)
    # Skipped orders get their cart's lines too: the same order as "authorized, then canceled".
    carts = await _load_carts(conn, sorted({p.cart_id for p, _ in places} | _carts(reviews)))
    holders = await _cart_holders(conn, sorted({r.cart_id for r in requests}))
    skus = sorted(set(skus_wanted(requests, carts)) | {m[0] for m in returns})
    stock = await lock_stock(conn, skus)
    for sku, delta, *_ in returns:
        stock[sku] = stock.get(sku, 0) + delta
    plans, _left = allocate(requests, carts, stock, holders)
    new_plans = [p for p in plans if type(p.request) is PlaceOrder]
    new_plans += [
        OrderPlan(p, carts.get(p.cart_id), Allocation.SKIPPED, None, {})
        for p, facts in places
        if facts.canceled
    ]
    facts_of = {p.payment_intent_id: facts for p, facts in places}
    created = await _insert_orders(conn, new_plans, facts_of)
    decided = [p for p in plans if type(p.request) is ReviewOrder]
    order_of = {
        pid: fold.state.order.id for pid, fold in reviews.items() if fold.state.order is not None
    }
    decided_status = {
        p.request.payment_intent_id: order_status(
            p.status, reviews[p.request.payment_intent_id].state.facts, p.request.terms.amount
        )
        for p in decided
    }
    await _write_decided(conn, decided, order_of, decided_status, carts)
    ids = {**created, **order_of}
    movements = returns + [
        (sku, -qty, "order", ids[p.request.payment_intent_id], p.request.event_id)
        for p in plans
        if p.status is Allocation.PLACED
        for sku, qty in sorted(p.taken.items())
    ]
    await move_stock(conn, movements)
    changes = []
    for p in new_plans:
        pid, amount = p.request.payment_intent_id, p.request.terms.amount
        facts = facts_of[pid]
        status = order_status(p.status, facts, amount)
        snapshot = _snapshot(p, created[pid], status, facts)
        changes.append(_change(created[pid], pid, None, status, facts, amount, p.status, snapshot))
    for p in decided:
        pid = p.request.payment_intent_id
        order = reviews[pid].state.order
        assert order is not None
        facts, amount = reviews[pid].state.facts, p.request.terms.amount
        status = decided_status[pid]
        changes.append(_change(order.id, pid, order.status, status, facts, amount, p.status))
    return changes + refreshed


def _carts(reviews: dict[str, IntentFold]) -> set[str]:
    return {d.cart_id for f in reviews.values() for d in f.decisions if type(d) is ReviewOrder}


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
        owed_back=facts.owed_back,
        refund_blocked=facts.refund_blocked,
        refund_stopped_at=facts.refund_stopped_at,
        capture_held=facts.capture_held,
        snapshot=snapshot,
    )


def _snapshot(plan: OrderPlan, order_id: int, status: OrderStatus, facts: Facts) -> dict[str, Any]:
    """A new order as its event shows it (schemas/orders.py), from what was just written."""
    r = plan.request
    t = r.terms
    d = facts.dispute
    review, warning = facts.review, facts.fraud_warning
    return {
        "id": order_id,
        "payment_intent_id": r.payment_intent_id,
        "cart_id": r.cart_id,
        "status": str(status),
        "allocation": str(plan.status),
        "status_reason": plan.reason,
        "amount": t.amount,
        "amount_subtotal": t.cart_amount,
        "amount_shipping": t.shipping,
        "amount_discount": t.discount,
        "amount_tax": t.tax,
        "amount_authorized": t.authorized,
        "amount_refunded": facts.amount_refunded,
        "amount_captured": facts.amount_received,
        "currency": t.currency,
        "payment_status": facts.status,
        "cancellation_reason": facts.cancellation_reason,
        "capture_before": facts.capture_before,
        "account": facts.account,
        "checkout_session_id": facts.checkout and facts.checkout.session_id,
        "dispute": d and {"status": d.status, "amount": d.amount, "reason": d.reason},
        "review": review
        and {"open": review.open, "reason": review.reason, "closed_reason": review.closed_reason},
        "fraud_warning": warning
        and {"fraud_type": warning.fraud_type, "actionable": warning.actionable},
        "items": [
            {"sku": line.sku, "quantity": line.quantity, "unit_amount": line.unit_amount}
            for line in (plan.cart.lines if plan.cart is not None else ())
        ],
    }


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


# An order's columns, by name. `_TERMS` are what it was decided on (consumer/facts.py);
# `_COPIED` what it shows of its intent's facts: most new orders have none of those
# yet (no refund, dispute, capture, deadline, review), and are written without them.
_TERMS = Columns.of(
    ("amount", "bigint"),
    ("currency", "text"),
    ("amount_authorized", "bigint"),
    ("amount_subtotal", "bigint"),
    ("amount_shipping", "bigint"),
    ("amount_discount", "bigint"),
    ("amount_tax", "bigint"),
)
_NEW_ORDER = (
    Columns.of(
        ("payment_intent_id", "text"),
        ("cart_id", "text"),
        ("status", "text"),
        ("allocation", "text"),
        ("status_reason", "text"),
        ("source_event_id", "text"),
        ("holds_cart", "bool"),
    )
    + _TERMS
)
_COPIED = Columns.of(
    ("amount_refunded", "bigint"),
    ("amount_captured", "bigint"),
    ("cancellation_reason", "text"),
    ("dispute_status", "text"),
    ("dispute_amount", "bigint"),
    ("dispute_reason", "text"),
    ("dispute_refundable", "bool"),
    ("capture_before", "timestamptz"),
    ("account", "text"),
    ("checkout_session_id", "text"),
    ("review_id", "text"),
    ("review_open", "bool"),
    ("review_reason", "text"),
    ("review_closed_reason", "text"),
    ("fraud_warning_id", "text"),
    ("fraud_warning_type", "text"),
    ("fraud_warning_actionable", "bool"),
)
_EVENTFUL_ORDER = _NEW_ORDER + _COPIED


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
    await _insert_items(conn, [(order_ids[p.request.payment_intent_id], p.cart) for p in plans])
    return order_ids


async def _insert_items(conn: Connection, carts: list[tuple[int, Cart | None]]) -> None:
    """The orders' items, copied from their carts' lines (none when the cart is missing)."""
    items = [(oid, line) for oid, cart in carts if cart is not None for line in cart.lines]
    if not items:
        return
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


def _nothing_after(facts: Facts) -> bool:
    """Whether nothing that an order copies has happened to the intent since it was paid."""
    return not (
        facts.amount_refunded
        or facts.charge
        or facts.dispute
        or facts.canceled
        or facts.amount_received
        or facts.capture_before
        or facts.account
        or facts.checkout
        or facts.review
        or facts.fraud_warning
    )


def _order_row(plan: OrderPlan, facts: Facts) -> dict[str, Any]:
    """A new order's row, keyed by `_EVENTFUL_ORDER`'s columns."""
    r = plan.request
    return {
        "payment_intent_id": r.payment_intent_id,
        "cart_id": r.cart_id,
        "status": str(order_status(plan.status, facts, r.terms.amount)),
        "allocation": str(plan.status),
        "status_reason": plan.reason,
        "source_event_id": r.event_id,
        "holds_cart": plan.status in LIVE,
        **_terms_row(r.terms),
        **_copied(facts),
    }


def _terms_row(t: Terms) -> dict[str, Any]:
    """What an order was decided on, keyed by `_TERMS`'s columns."""
    return {
        "amount": t.amount,
        "currency": t.currency,
        "amount_authorized": t.authorized,
        "amount_subtotal": t.cart_amount,
        "amount_shipping": t.shipping,
        "amount_discount": t.discount,
        "amount_tax": t.tax,
    }


def _copied(facts: Facts) -> dict[str, Any]:
    """What an order copies of its intent's facts, keyed by `_COPIED`'s columns."""
    d, review, warning = facts.dispute, facts.review, facts.fraud_warning
    return {
        "amount_refunded": facts.amount_refunded,
        "amount_captured": facts.amount_received,
        "cancellation_reason": facts.cancellation_reason,
        "dispute_status": d and d.status,
        "dispute_amount": d and d.amount,
        "dispute_reason": d and d.reason,
        "dispute_refundable": d and d.refundable,
        "capture_before": _timestamp(facts.capture_before),
        "account": facts.account,
        "checkout_session_id": facts.checkout and facts.checkout.session_id,
        "review_id": review and review.id,
        "review_open": review and review.open,
        "review_reason": review and review.reason,
        "review_closed_reason": review and review.closed_reason,
        "fraud_warning_id": warning and warning.id,
        "fraud_warning_type": warning and warning.fraud_type,
        "fraud_warning_actionable": warning and warning.actionable,
    }


def _timestamp(unix_s: int | None) -> datetime | None:
    return None if unix_s is None else datetime.fromtimestamp(unix_s, UTC)


_DECIDED = Columns.of(
    ("id", "bigint"),
    ("allocation", "text"),
    ("status_reason", "text"),
    ("holds_cart", "bool"),
    ("status", "text"),
    ("source_event_id", "text"),
)


async def _write_decided(
    conn: Connection,
    plans: list[OrderPlan],
    order_of: dict[str, int],
    statuses: dict[str, OrderStatus],
    carts: dict[str, Cart],
) -> None:
    """Orders decided again: their new allocation, the event whose batch decided it (the
    order's `source_event_id`, as its stock movements name it), and the items of a cart
    that was missing when they were made. Their facts and terms were copied by
    `_refresh`."""
    if not plans:
        return
    rows = []
    for p in plans:
        rows.append(
            {
                "id": order_of[p.request.payment_intent_id],
                "allocation": str(p.status),
                "status_reason": p.reason,
                "holds_cart": p.status in LIVE,
                "status": str(statuses[p.request.payment_intent_id]),
                "source_event_id": p.request.event_id,
            }
        )
    await conn.execute(
        f"""
        UPDATE orders o SET allocation = v.allocation, status_reason = v.status_reason,
            holds_cart = v.holds_cart, status = v.status, source_event_id = v.source_event_id,
            updated_at = now()
        FROM {_DECIDED.unnest} AS v({_DECIDED.listed})
        WHERE o.id = v.id
        """,
        *_DECIDED.arrays(rows),
    )
    without = await conn.fetch(
        "SELECT o.id FROM unnest($1::bigint[]) AS o(id)"
        " WHERE NOT EXISTS (SELECT 1 FROM order_items i WHERE i.order_id = o.id)",
        [r["id"] for r in rows],
    )
    missing = {r["id"] for r in without}
    await _insert_items(
        conn,
        [
            (oid, carts.get(p.request.cart_id))
            for p in plans
            if (oid := order_of[p.request.payment_intent_id]) in missing
        ],
    )


_REFRESHED = Columns.of(("id", "bigint"), ("status", "text")) + _COPIED
_REFRESHED_TERMS = _REFRESHED + _TERMS


async def _refresh(
    conn: Connection, touched: list[IntentFold], reviewed: set[str]
) -> list[OrderChange]:
    """Re-derive the status and copy the facts and terms of existing orders a decision
    touched; return their changes, but for the orders decided again (`reviewed`),
    whose one change `write_orders` makes once they are decided."""
    if not touched:
        return []
    with_terms: list[dict[str, Any]] = []
    without_terms: list[dict[str, Any]] = []
    changes: list[OrderChange] = []
    for fold in sorted(touched, key=lambda f: f.state.payment_intent_id):
        order = fold.state.order
        assert order is not None
        facts = fold.state.facts
        now = terms(facts)
        amount = now.amount if now is not None else order.amount
        status = order_status(order.allocation, facts, amount)
        pid = fold.state.payment_intent_id
        if pid not in reviewed:
            change = _change(order.id, pid, order.status, status, facts, amount, order.allocation)
            quiet = all(type(d) is RecordRefundStopped for d in fold.decisions)
            changes.append(change._replace(announced=not quiet))
        row = {"id": order.id, "status": str(status), **_copied(facts)}
        if now is not None:
            with_terms.append({**row, **_terms_row(now)})
        else:
            without_terms.append(row)  # an order made before its terms were kept
    for columns, rows in ((_REFRESHED_TERMS, with_terms), (_REFRESHED, without_terms)):
        if not rows:
            continue
        assigned = ", ".join(f"{name} = v.{name}" for name in columns.names[1:])
        await conn.execute(
            f"""
            UPDATE orders o SET {assigned}, updated_at = now()
            FROM {columns.unnest} AS v({columns.listed})
            WHERE o.id = v.id
            """,
            *columns.arrays(rows),
        )
    return changes

"""The outbox: what must happen outside PostgreSQL because an order changed, kept with the change.

Written inside the batch's transaction (consumer/store.py), so an order change
and what it causes commit together or not at all (`enqueue`):
  - an order event for every new order and every order whose snapshot changed
    (schemas/orders.py), built here in SQL from the rows the batch just wrote;
  - Stripe actions decided by `stripe_actions_for`: give back the money of an
    order that cannot be filled (`out_of_stock`, `duplicate`): cancel while it
    is held, refund once captured; capture a new `placed` order under
    `CAPTURE_POLICY=on_placed` while it is held. A unique index keeps one row
    per intent and action.
The relay claims, performs and marks them (consumer/claims.py, consumer/relay.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, NamedTuple

import orjson

from intentflow.consumer.allocation import UNFILLABLE
from intentflow.consumer.connections import Connection
from intentflow.consumer.decisions import Allocation, OrderStatus
from intentflow.consumer.policy import CapturePolicy, ShopPolicy
from intentflow.schemas import ORDER_EVENT_SCHEMA_VERSION


class Kind(StrEnum):
    STRIPE_ACTION = "stripe_action"
    ORDER_EVENT = "order_event"


class Action(StrEnum):
    """The Stripe actions, by the name their outbox rows carry (consumer/stripe_actions.py
    holds what each one does)."""

    CANCEL = "cancel_payment_intent"
    CAPTURE = "capture_payment_intent"
    REFUND = "refund_payment_intent"


# Stripe's `cancellation_reason` for an order we cannot fill. Stripe accepts
# duplicate, fraudulent, requested_by_customer or abandoned; none of them says
# "out of stock", and `abandoned` is the one that blames nobody. A duplicate
# says so. Our own reason is on the order (`status_reason`) and in its events.
CANCELLATION_REASON = "abandoned"
_CANCEL_REASON = {Allocation.OUT_OF_STOCK: CANCELLATION_REASON, Allocation.DUPLICATE: "duplicate"}
# A refund's `reason` (Stripe accepts duplicate, fraudulent, requested_by_customer):
# only a duplicate has one that is true; an out-of-stock refund carries none.
_REFUND_REASON = {Allocation.DUPLICATE: "duplicate"}

# The intent's status in which its money is held and can be released or taken,
# and the one in which it was taken and can only be refunded.
HELD = "requires_capture"
CAPTURED = "succeeded"

# A refund intentflow does not make by itself: its row is written failed with the
# outcome `owed` and one of these reasons, for `order-consumer outbox --failed`, the
# owed-refunds gauge and `reconcile`; `order-consumer outbox retry ID` asks for it.
OWED = "owed"


class Owed(NamedTuple):
    code: str
    message: str


# REFUND_UNFILLABLE=false keeps intentflow from refunding.
REFUND_OFF = Owed(
    "refund_unfillable_off",
    "REFUND_UNFILLABLE=false: refund the customer at Stripe, or set it to true and "
    "`order-consumer outbox retry ID`",
)
# A refund of the payment failed or was canceled at Stripe: the money is back in the
# shop's balance. Refunding the same card or account again mostly fails again (closed,
# lost or stolen), so a person decides (https://docs.stripe.com/refunds#failed-refunds).
REFUND_FAILED = Owed(
    "refund_failed",
    "a refund of this payment failed or was canceled at Stripe (the refund's "
    "failure_reason says why): return the money another way, or "
    "`order-consumer outbox retry ID` to refund the payment method again",
)


class OrderChange(NamedTuple):
    """An order the batch created (`previous` None) or whose snapshot it changed."""

    order_id: int
    payment_intent_id: str
    previous: OrderStatus | None
    status: OrderStatus
    intent_status: str | None  # the intent's Stripe status after the batch
    amount: int
    allocation: Allocation
    # Captured money neither refunded nor taken back by a dispute, after the batch; and
    # whether an open dispute keeps Stripe from refunding it (consumer/facts.py).
    owed_back: int = 0
    refund_blocked: bool = False
    # When the latest refund of the intent to fail or be canceled did (Unix seconds, its
    # event's `created`), or None: ours may be among them.
    refund_stopped_at: int | None = None
    # Radar's review is open or the issuer warned of fraud: no capture until it is settled.
    capture_held: bool = False
    # Its readers learn it (an order event); False: only its Stripe action is decided
    # again (a refund that failed without ever counting: consumer/fold.py).
    announced: bool = True
    # A new order's snapshot as its writer built it, without the two timestamps
    # (the transaction's); None: read back from the rows (`_enqueue_read_back`).
    snapshot: dict[str, Any] | None = None

    @property
    def event_type(self) -> str:
        if self.previous is self.status:
            return "order.updated"
        return f"order.{self.status}"


class ActionRow(NamedTuple):
    action: Action
    payment_intent_id: str
    order_id: int
    params: dict[str, Any]
    # Written failed as `owed`, for this reason, instead of pending: a refund
    # REFUND_UNFILLABLE=false forbids, or one asked after a refund failed.
    owed: Owed | None = None
    # A refund of the intent failed or was canceled at this time (Unix seconds): the row
    # is `owed` as REFUND_FAILED, finished then, and reopens a done row finished before.
    stopped_at: int | None = None

    @property
    def idempotency_key(self) -> str:
        return idempotency_key(self.action, self.payment_intent_id)


def idempotency_key(action: Action | str, payment_intent_id: str) -> str:
    """The key of an action's first attempt, by any relay (generation 0; consumer/claims.py
    adds `:<generation>` after an answer Stripe may have saved)."""
    return f"intentflow:{action}:{payment_intent_id}"


def stripe_actions_for(change: OrderChange, policy: ShopPolicy) -> ActionRow | None:
    """The Stripe action an order change calls for, if any (pure: tested on its own).

    An order that cannot be filled (out_of_stock, duplicate) gets its money back
    whenever a change shows it held (cancel) or captured and not all refunded
    (refund), whoever captured it and in whichever batch; asking again is
    harmless (one row per intent and action). A placed order is captured under
    CAPTURE_POLICY=on_placed while its money is held and neither Radar's review is
    open nor the issuer has warned of fraud: a change that settles the review
    (closed `approved`) asks for it then.
    """
    pid, order_id = change.payment_intent_id, change.order_id
    if change.allocation in UNFILLABLE:
        if change.intent_status == HELD:
            params = {"cancellation_reason": _CANCEL_REASON[change.allocation]}
            return ActionRow(Action.CANCEL, pid, order_id, params)
        if change.intent_status == CAPTURED and change.owed_back > 0:
            if change.refund_blocked:
                return None  # an open dispute Stripe would refuse it for: asked once it closes
            return refund_row(
                pid, order_id, change.allocation, policy, stopped_at=change.refund_stopped_at
            )
        return None
    if (
        change.status is OrderStatus.PLACED
        and change.allocation is Allocation.PLACED
        and change.intent_status == HELD
        and policy.capture is CapturePolicy.ON_PLACED
        and not change.capture_held
    ):
        return ActionRow(Action.CAPTURE, pid, order_id, {"amount_to_capture": change.amount})
    return None


def refund_row(
    payment_intent_id: str,
    order_id: int,
    allocation: Allocation,
    policy: ShopPolicy,
    *,
    stopped_at: int | None = None,
) -> ActionRow:
    """The refund of an order that cannot be filled. The relay reads what Stripe captured
    and what is refunded already, refunds the rest, and adds its outbox id to the metadata."""
    params: dict[str, Any] = {
        "metadata": {"intentflow_order_id": str(order_id), "intentflow_reason": str(allocation)}
    }
    if allocation in _REFUND_REASON:
        params["reason"] = _REFUND_REASON[allocation]
    if stopped_at is not None:
        owed: Owed | None = REFUND_FAILED
    else:
        owed = None if policy.refund_unfillable else REFUND_OFF
    return ActionRow(Action.REFUND, payment_intent_id, order_id, params, owed, stopped_at)


async def ask_refunds(conn: Connection, order_ids: Sequence[int], policy: ShopPolicy) -> int:
    """Ask for the refund of these orders that cannot be filled (the relay, when Stripe shows
    one captured before its cancel); return how many rows were added."""
    rows = await conn.fetch(
        "SELECT id, payment_intent_id, allocation FROM orders"
        " WHERE id = ANY($1::bigint[]) AND allocation = ANY($2::text[]) ORDER BY payment_intent_id",
        list(order_ids),
        [str(a) for a in UNFILLABLE],
    )
    wanted = [
        refund_row(r["payment_intent_id"], r["id"], Allocation(r["allocation"]), policy)
        for r in rows
    ]
    return await insert_actions(conn, wanted) if wanted else 0


async def enqueue(conn: Connection, changes: Sequence[OrderChange], policy: ShopPolicy) -> None:
    """Write the outbox rows the batch's order changes cause (in the batch's transaction)."""
    if not changes:
        return
    ordered = sorted(changes, key=lambda c: c.payment_intent_id)
    built = [c for c in ordered if c.snapshot is not None]
    if built:
        await _enqueue_built(conn, built)
    read_back = [c for c in ordered if c.snapshot is None and c.announced]
    if read_back:
        await _enqueue_read_back(conn, read_back)
    actions = [row for c in ordered if (row := stripe_actions_for(c, policy)) is not None]
    if actions:
        await insert_actions(conn, actions)


async def _enqueue_built(conn: Connection, changes: Sequence[OrderChange]) -> None:
    """One order event per new order, from the snapshot its writer built.

    A new order's snapshot is all in memory (the plan, the cart, the facts):
    serialised here with orjson it costs a fraction of reading it back in SQL.
    `_enqueue_read_back` builds the same document: a test holds them equal.
    """
    payloads = []
    for c in changes:
        assert c.snapshot is not None
        event = {
            "schema_version": ORDER_EVENT_SCHEMA_VERSION,
            "type": c.event_type,
            "previous_status": None,
            "order": c.snapshot,
        }
        payloads.append(orjson.dumps(event).decode())
    await conn.execute(
        """
        INSERT INTO outbox (kind, name, payment_intent_id, order_id, payload)
        SELECT 'order_event', * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::json[])
        """,
        [c.event_type for c in changes],
        [c.payment_intent_id for c in changes],
        [c.order_id for c in changes],
        payloads,
    )


async def _enqueue_read_back(conn: Connection, changes: Sequence[OrderChange]) -> None:
    """One order event per change, its snapshot read from the rows as this transaction left them."""
    await conn.execute(
        f"""
        INSERT INTO outbox (kind, name, payment_intent_id, order_id, payload)
        SELECT 'order_event', v.type, o.payment_intent_id, o.id,
            json_build_object(
                'schema_version', {ORDER_EVENT_SCHEMA_VERSION},
                'type', v.type,
                'previous_status', v.previous,
                'order', json_build_object(
                    'id', o.id, 'payment_intent_id', o.payment_intent_id, 'cart_id', o.cart_id,
                    'status', o.status, 'allocation', o.allocation,
                    'status_reason', o.status_reason, 'amount', o.amount,
                    'amount_subtotal', coalesce(o.amount_subtotal, o.amount),
                    'amount_shipping', o.amount_shipping,
                    'amount_discount', o.amount_discount, 'amount_tax', o.amount_tax,
                    'amount_authorized', o.amount_authorized,
                    'amount_refunded', o.amount_refunded,
                    'amount_captured', o.amount_captured, 'currency', o.currency,
                    'payment_status', p.status,
                    'cancellation_reason', o.cancellation_reason,
                    'capture_before', extract(epoch FROM o.capture_before)::bigint,
                    'account', o.account, 'checkout_session_id', o.checkout_session_id,
                    'review', CASE WHEN o.review_id IS NULL THEN NULL ELSE
                        json_build_object('open', o.review_open, 'reason', o.review_reason,
                                          'closed_reason', o.review_closed_reason) END,
                    'fraud_warning', CASE WHEN o.fraud_warning_id IS NULL THEN NULL ELSE
                        json_build_object('fraud_type', o.fraud_warning_type,
                                          'actionable', o.fraud_warning_actionable) END,
                    'dispute', CASE WHEN o.dispute_status IS NULL THEN NULL ELSE
                        json_build_object('status', o.dispute_status,
                                          'amount', o.dispute_amount,
                                          'reason', o.dispute_reason) END,
                    'items', (SELECT coalesce(json_agg(json_build_object(
                                    'sku', i.sku, 'quantity', i.quantity,
                                    'unit_amount', i.unit_amount) ORDER BY i.id), '[]')
                              FROM order_items i WHERE i.order_id = o.id)))
        FROM unnest($1::bigint[], $2::text[], $3::text[]) WITH ORDINALITY
            AS v(order_id, type, previous, n)
        JOIN orders o ON o.id = v.order_id
        JOIN payment_intents p ON p.id = o.payment_intent_id
        ORDER BY v.n
        """,
        [c.order_id for c in changes],
        [c.event_type for c in changes],
        [c.previous and str(c.previous) for c in changes],
    )


async def insert_actions(conn: Connection, rows: Sequence[ActionRow]) -> int:
    """Add Stripe actions (pending, or failed as `owed`); return how many were added or
    asked again. One row per intent and action: one already there is kept as it is,
    unless the new one reopens it (`_REOPEN`)."""
    added = 0
    for refunds in (False, True):
        batch = [r for r in rows if (r.action is Action.REFUND) is refunds]
        if batch:
            added += await _insert(conn, batch, _REOPEN if refunds else "DO NOTHING")
    return added


# What a refund asked again does to the row already there for its intent: a refund
# refused for a dispute that has closed since, or owed under REFUND_UNFILLABLE=false
# and asked now by a member with true, is asked again. A pending one, or a done one
# when a refund failed after the row was done (ours, mostly: the money is back in the
# shop's balance), is reported owed (REFUND_FAILED) instead: a person decides. A
# failure older than a done row (an operator's retry after it) reopens nothing; a
# relay that holds the row waits the consumer out and decides first. The failure's
# time is Stripe's clock and done_at ours: a failure up to CLOCK_SKEW before the row
# counts as after it (at worst a refund on its way is listed owed, and the relay's
# read finds it). Safe: the relay reads the intent's refunds before it refunds
# anything, so a refund that stands is found and nothing is refunded twice.
CLOCK_SKEW = "5 minutes"
_REOPEN = f"""
    DO UPDATE SET state = excluded.state, outcome = excluded.outcome,
        error_code = excluded.error_code, last_error = excluded.last_error,
        done_at = excluded.done_at, due_at = clock_timestamp(), verify_first = true
    WHERE (excluded.error_code = '{REFUND_FAILED.code}'
           AND (outbox.state = 'pending'
                OR (outbox.state = 'done'
                    AND outbox.done_at < excluded.done_at + interval '{CLOCK_SKEW}')))
       OR (outbox.state = 'failed' AND outbox.error_code = 'charge_disputed')
       OR (outbox.outcome = '{OWED}' AND excluded.state = 'pending')
"""


async def _insert(conn: Connection, rows: Sequence[ActionRow], on_conflict: str) -> int:
    result = await conn.execute(
        f"""
        INSERT INTO outbox (kind, name, payment_intent_id, order_id, payload, idempotency_key,
                            state, outcome, error_code, last_error, done_at, verify_first)
        SELECT 'stripe_action', v.name, v.pid, v.order_id, v.payload, v.key,
               CASE WHEN v.code IS NULL THEN 'pending' ELSE 'failed' END,
               CASE WHEN v.code IS NOT NULL THEN $6 END, v.code, v.message,
               CASE WHEN v.stopped_at IS NOT NULL THEN to_timestamp(v.stopped_at)
                    WHEN v.code IS NOT NULL THEN clock_timestamp() END,
               false
        FROM unnest($1::text[], $2::text[], $3::bigint[], $4::json[], $5::text[], $7::text[],
                    $8::text[], $9::bigint[])
            AS v(name, pid, order_id, payload, key, code, message, stopped_at)
        ON CONFLICT (payment_intent_id, name) WHERE kind = 'stripe_action' {on_conflict}
        """,
        [str(r.action) for r in rows],
        [r.payment_intent_id for r in rows],
        [r.order_id for r in rows],
        [json.dumps(r.params) for r in rows],
        [r.idempotency_key for r in rows],
        OWED,
        [r.owed and r.owed.code for r in rows],
        [r.owed and r.owed.message for r in rows],
        [r.stopped_at for r in rows],
    )
    return int(result.rsplit(" ", 1)[1])


async def sweep_needs_review(conn: Connection, older_than_s: float) -> int:
    """Release the money of `needs_review` orders nobody resolved in time; return how many.

    Only orders that name a cart: an order without one (made before version 4,
    when every intent became an order) is another system's payment, never ours to release.
    """
    rows = await conn.fetch(
        """
        SELECT o.id, o.payment_intent_id FROM orders o
        JOIN payment_intents p ON p.id = o.payment_intent_id
        WHERE o.status = 'needs_review' AND o.created_at < now() - make_interval(secs => $1)
          AND o.cart_id IS NOT NULL
          AND p.status = $2
          AND NOT EXISTS (SELECT 1 FROM outbox x WHERE x.kind = 'stripe_action'
                          AND x.payment_intent_id = o.payment_intent_id AND x.name = $3)
        ORDER BY o.payment_intent_id
        """,
        older_than_s,
        HELD,
        str(Action.CANCEL),
    )
    if not rows:
        return 0
    params = {"cancellation_reason": CANCELLATION_REASON}
    return await insert_actions(
        conn, [ActionRow(Action.CANCEL, r["payment_intent_id"], r["id"], params) for r in rows]
    )

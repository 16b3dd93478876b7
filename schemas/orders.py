"""The order events the consumer publishes on `orders.events`: what the rest of the business reads.

One message per change of an order, keyed by payment intent id, in the order
the changes were committed for each intent. The value is the whole order as it
stood after the change (a snapshot, not a diff), so a reader that keeps, per
order, the message with the highest `outbox_id` is correct whatever it missed
in between or received twice. Delivery is at least once: the header
`outbox-id` (the same number as the body's `outbox_id`) names the message, and
a copy carries the same one.

`occurred_at` is the time of the transaction that made the change; the order's
creation time is its first event's (`previous_status` null).

`type` is `order.<status>` when the order was created or its status changed,
and `order.updated` when something else the snapshot shows changed (a capture,
a partial refund, a dispute's status). `previous_status` is null on creation.

Adding a field is compatible; removing or renaming one raises `schema_version`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict

DEFAULT_ORDERS_TOPIC = "orders.events"
HEADER_OUTBOX_ID = "outbox-id"
HEADER_ORDER_EVENT_TYPE = "order-event-type"
ORDER_EVENT_SCHEMA_VERSION = 1

OrderStatusName = Literal[
    "placed", "out_of_stock", "needs_review", "canceled", "refunded", "disputed", "duplicate"
]
ORDER_EVENT_TYPES = frozenset([f"order.{s}" for s in get_args(OrderStatusName)] + ["order.updated"])


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OrderLine(_Frozen):
    sku: str
    quantity: int
    unit_amount: int  # in the currency's smallest unit


class OrderDispute(_Frozen):
    status: str  # Stripe's dispute status
    amount: int
    reason: str | None


class OrderReview(_Frozen):
    """Radar's review of the payment: while `open`, a capture waits (CAPTURE_POLICY=on_placed)."""

    open: bool
    reason: str  # why it was opened (rule, manual, ...), or how it closed
    closed_reason: str | None  # approved, refunded, refunded_as_fraud, disputed, ...


class OrderFraudWarning(_Frozen):
    """The card issuer's early fraud warning: the shop decides (refund, or capture by hand)."""

    fraud_type: str
    actionable: bool  # not yet disputed nor refunded in full


class OrderSnapshot(_Frozen):
    id: int
    payment_intent_id: str
    cart_id: str | None
    status: OrderStatusName
    # What allocation decided when the order was created: placed, out_of_stock,
    # needs_review, duplicate (its cart already had a live order), or skipped
    # (the intent was canceled before it was authorized).
    allocation: Literal["placed", "out_of_stock", "needs_review", "duplicate", "skipped"]
    status_reason: str | None  # why needs_review or out_of_stock, e.g. `authorization_short`
    amount: int  # what the buyer was asked to pay
    # What the cart was checked against (a Checkout Session's subtotal, in the cart's
    # currency), and the rest of `amount`: shipping and tax, less discounts.
    amount_subtotal: int | None
    amount_shipping: int
    amount_discount: int
    amount_tax: int
    amount_authorized: int | None
    amount_refunded: int
    amount_captured: int  # what Stripe captured: what a refund can return
    currency: str
    # The payment intent's Stripe status: `requires_capture` while the money is
    # held, `succeeded` once captured, `canceled` once released.
    payment_status: str | None
    cancellation_reason: str | None  # Stripe's, once the intent is canceled
    # When an uncaptured authorization lapses, Unix time as Stripe gives it (the
    # charge's payment_method_details.card.capture_before); null: not known.
    capture_before: int | None
    # Connect: the connected account of the payment; null for the platform's own.
    account: str | None
    checkout_session_id: str | None  # the Checkout Session that made the payment, if any
    review: OrderReview | None
    fraud_warning: OrderFraudWarning | None
    dispute: OrderDispute | None
    items: tuple[OrderLine, ...]


class OrderEvent(_Frozen):
    schema_version: Literal[1]
    outbox_id: int
    type: str  # one of ORDER_EVENT_TYPES
    previous_status: OrderStatusName | None
    occurred_at: datetime  # the time of the transaction that made the change
    order: OrderSnapshot

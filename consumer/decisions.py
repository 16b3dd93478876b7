"""The vocabulary of what the consumer decides: order statuses and the decisions the store applies.

The fold (consumer/fold.py) turns one intent's events into a new `IntentState`
and a list of decisions; the store (consumer/store.py) applies each kind of
decision with one set-based writer per batch. An order's status is never
stored as a choice of its own: it is derived by `order_status` from what
allocation decided when the order was created and from the intent's facts, so
the same facts give the same status whatever order they arrived in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import NamedTuple


class OrderStatus(StrEnum):
    PLACED = "placed"
    OUT_OF_STOCK = "out_of_stock"
    NEEDS_REVIEW = "needs_review"
    CANCELED = "canceled"  # stock it took given back, once
    REFUNDED = "refunded"  # money returned in full; stock stays where the warehouse puts it
    DISPUTED = "disputed"  # a chargeback is open or lost; stock untouched
    DUPLICATE = "duplicate"  # its cart already had a live order: no stock, money released


class Allocation(StrEnum):
    """What allocation decided when the order was created; never changes afterwards."""

    PLACED = "placed"
    OUT_OF_STOCK = "out_of_stock"
    NEEDS_REVIEW = "needs_review"
    DUPLICATE = "duplicate"  # the cart already had a live order of another intent
    SKIPPED = "skipped"  # the intent was already canceled: no stock was asked for


# A dispute in one of these statuses no longer holds the money against us.
DISPUTE_SETTLED_FOR_US = frozenset({"won", "warning_closed", "prevented", "charge_refunded"})


@dataclass(frozen=True, slots=True)
class Dispute:
    id: str
    status: str
    amount: int
    reason: str
    created: int  # the event's, for ordering snapshots

    @property
    def against_us(self) -> bool:
        return self.status not in DISPUTE_SETTLED_FOR_US


@dataclass(frozen=True, slots=True)
class RefundSnapshot:
    amount: int
    status: str
    created: int


_NO_REFUNDS: Mapping[str, RefundSnapshot] = MappingProxyType({})

# Refund statuses whose money is on its way back, or back; `failed` and `canceled` are not
# (Stripe's refund object: https://docs.stripe.com/api/refunds/object#refund_object-status).
REFUND_COUNTS = frozenset({"pending", "requires_action", "succeeded"})


class Facts(NamedTuple):
    """What is known of one intent, merged from every event seen in any order.

    A NamedTuple, like the other values built per event or per intent on the hot
    path (`PlaceOrder`, `consumer.fold.IntentState`): a frozen dataclass costs
    about 3 µs to build here and a NamedTuple under 1; the fold built three per
    intent and fell 17 % behind the code before it in the consumer bench.
    """

    status: str | None = None
    # The key of the event that set `status`: (created, step, event id); the
    # status's tier leads the key (consumer/lifecycle.py).
    status_created: int | None = None
    status_step: int | None = None
    status_event_id: str | None = None
    cancellation_reason: str | None = None
    charge_amount_refunded: int = 0
    charge_refunded: bool = False
    refunds: Mapping[str, RefundSnapshot] = _NO_REFUNDS
    dispute: Dispute | None = None
    # Connect: the account the intent lives on (the events' `account`); None: the platform's.
    account: str | None = None
    # The most Stripe says it captured: the intent's `amount_received`, a charge's
    # `amount_captured`. What a refund of an order that cannot be filled returns.
    amount_received: int = 0
    # When an uncaptured authorization lapses (the charge's capture_before, Unix time).
    capture_before: int | None = None

    @property
    def canceled(self) -> bool:
        return self.status == "canceled"

    @property
    def amount_refunded(self) -> int:
        counted = sum(r.amount for r in self.refunds.values() if r.status in REFUND_COUNTS)
        return max(self.charge_amount_refunded, counted)

    def refunded_in_full(self, order_amount: int) -> bool:
        return self.charge_refunded or (0 < order_amount <= self.amount_refunded)

    @property
    def disputed(self) -> bool:
        """A dispute holds the money against us (Stripe refuses to refund a disputed charge)."""
        return self.dispute is not None and self.dispute.against_us


def order_status(allocation: Allocation, facts: Facts, order_amount: int) -> OrderStatus:
    """An order's status: canceled, then disputed, then refunded, then its allocation."""
    if facts.canceled or allocation is Allocation.SKIPPED:
        return OrderStatus.CANCELED
    if facts.disputed:
        return OrderStatus.DISPUTED
    if facts.refunded_in_full(order_amount):
        return OrderStatus.REFUNDED
    return OrderStatus(allocation.value)


# --- Decisions -------------------------------------------------------------------


class PlaceOrder(NamedTuple):
    """Create the intent's one order from its first authorization.

    Allocated in `paid_key` order within a batch (first paid, first served);
    created `skipped` (and so canceled) when the intent's facts say it is canceled.
    """

    payment_intent_id: str
    cart_id: str  # under CART_METADATA_KEY: an intent that names none makes no order
    amount: int
    currency: str
    amount_authorized: int
    event_id: str
    # (event created, received-at ms, partition, offset) of the authorization.
    paid_key: tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class CancelOrder:
    """The intent of an existing order was canceled: give back what the order took, once."""

    payment_intent_id: str
    event_id: str


@dataclass(frozen=True, slots=True)
class RecordCancellation:
    """An already canceled intent's cancellation reason changed (`charge.expired`, then
    Stripe's own `automatic` cancel in a later batch): copy it, give nothing back again."""

    payment_intent_id: str


@dataclass(frozen=True, slots=True)
class RecordRefund:
    """The intent's refunded amount changed: copy it to its order and re-derive the status."""

    payment_intent_id: str


@dataclass(frozen=True, slots=True)
class RecordDispute:
    """The intent's dispute changed: copy it to its order and re-derive the status."""

    payment_intent_id: str


@dataclass(frozen=True, slots=True)
class RecordPayment:
    """The intent's Stripe status changed otherwise than to canceled (a capture, mostly):
    nothing of the order's own changes, but its readers learn where the money is."""

    payment_intent_id: str


Decision = (
    PlaceOrder | CancelOrder | RecordCancellation | RecordRefund | RecordDispute | RecordPayment
)

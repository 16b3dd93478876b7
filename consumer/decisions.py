"""The vocabulary of what the consumer decides: order statuses and the decisions the store applies.

The fold (consumer/fold.py) turns one intent's events into a new `IntentState`
and a list of decisions; the store (consumer/store.py) applies each kind of
decision with one set-based writer per batch. An order's status is never
stored as a choice of its own: it is derived by `order_status` from what
allocation decided and from the intent's facts (consumer/facts.py), so the same
facts give the same status whatever order they arrived in.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from intentflow.consumer.facts import Facts, Terms


class OrderStatus(StrEnum):
    PLACED = "placed"
    OUT_OF_STOCK = "out_of_stock"
    NEEDS_REVIEW = "needs_review"
    CANCELED = "canceled"  # stock it took given back, once
    REFUNDED = "refunded"  # money returned in full; stock stays where the warehouse puts it
    DISPUTED = "disputed"  # a chargeback is open or lost; stock untouched
    DUPLICATE = "duplicate"  # its cart already had a live order: no stock, money released


class Allocation(StrEnum):
    """What allocation decided: when the order was created, or when an order waiting in
    needs_review was decided again on new terms (`ReviewOrder`); a decided order
    (placed, out_of_stock, duplicate, skipped) never changes it again."""

    PLACED = "placed"
    OUT_OF_STOCK = "out_of_stock"
    NEEDS_REVIEW = "needs_review"
    DUPLICATE = "duplicate"  # the cart already had a live order of another intent
    SKIPPED = "skipped"  # the intent was already canceled: no stock was asked for


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
    """Create the intent's one order, on the terms its facts give (consumer/facts.py).

    Allocated in `paid_key` order within a batch (first paid, first served);
    created `skipped` (and so canceled) when the intent's facts say it is canceled.
    """

    payment_intent_id: str
    terms: Terms
    event_id: str  # the batch's event that made the order possible (its source)
    # (when the money was first held or received, then where the intent's first event
    # of the batch arrived: received-at ms, partition, offset).
    paid_key: tuple[int, int, int, int]

    @property
    def cart_id(self) -> str:
        return self.terms.cart_id


class ReviewOrder(NamedTuple):
    """An order waiting in needs_review whose terms changed (a session's subtotal, an
    increment of the authorization): decided again, in the batch's first-paid order."""

    payment_intent_id: str
    terms: Terms
    event_id: str
    paid_key: tuple[int, int, int, int]

    @property
    def cart_id(self) -> str:
        return self.terms.cart_id


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
class RecordRefundStopped:
    """A refund of the intent failed or was canceled and the order shows nothing new (it
    never counted): no event for its readers, but its money is decided again (a refund
    it is owed is then left to a person: consumer/outbox.py, REFUND_FAILED)."""

    payment_intent_id: str


@dataclass(frozen=True, slots=True)
class RecordDispute:
    """The intent's dispute changed: copy it to its order and re-derive the status."""

    payment_intent_id: str


@dataclass(frozen=True, slots=True)
class RecordPayment:
    """The intent's Stripe status changed otherwise than to canceled (a capture, mostly),
    or what the order shows of its money did (captured, its deadline, its terms, a
    review or a fraud warning): copy it, and its readers learn it."""

    payment_intent_id: str


Decision = (
    PlaceOrder
    | ReviewOrder
    | CancelOrder
    | RecordCancellation
    | RecordRefund
    | RecordRefundStopped
    | RecordDispute
    | RecordPayment
)

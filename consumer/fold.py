"""Fold one payment intent's new events, in Kafka order, into its new facts and decisions.

Pure code: no I/O. Each event is merged into the intent's `Facts` through the
meanings table (consumer/lifecycle.py); the decisions then follow from what
changed between the facts before the batch and after it:

- the intent's one order is made (`PlaceOrder`) in the batch whose events make
  its terms known (consumer/facts.py, `terms`): its money held or received (an
  authorization, a capture, a paid Checkout Session) and its cart named (the
  intent's metadata under CART_METADATA_KEY, or its session's); an intent whose
  money is held and that names no cart is not the shop's and makes no order
  (its authorizations are `not_an_order`);
- an order waiting in needs_review whose terms changed (the session's
  subtotal arrived, the authorization was incremented) is decided again
  (`ReviewOrder`);
- an existing order whose intent became canceled gives its stock back
  (`CancelOrder`), once; a later change of the reason only is copied
  (`RecordCancellation`);
- an existing order whose intent's refunds or dispute changed is brought up to
  date (`RecordRefund`, `RecordDispute`); a refund that failed without ever
  counting changes nothing shown, but the order's money is decided again
  (`RecordRefundStopped`);
- an existing order whose intent's Stripe status changed otherwise (a capture),
  or what it shows of its money (captured, the deadline, its terms, a review,
  a fraud warning), is brought up to date and announced (`RecordPayment`).

An event that changes no fact is recorded as `stale`; one without a meaning
here as `ignored`. Because facts merge the same way in any order, the final
state does not depend on delivery order (invariant 6).
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple, Protocol

from intentflow.consumer.decisions import (
    Allocation,
    CancelOrder,
    Decision,
    OrderStatus,
    PlaceOrder,
    RecordCancellation,
    RecordDispute,
    RecordPayment,
    RecordRefund,
    RecordRefundStopped,
    ReviewOrder,
)
from intentflow.consumer.facts import Dispute, Facts, Terms, terms
from intentflow.consumer.lifecycle import authorized_amount, meaning_of
from intentflow.consumer.policy import DEFAULT_CART_KEY
from intentflow.schemas import CheckoutSession, StripeEvent


class Outcome(StrEnum):
    APPLIED = "applied"  # changed what is known of the intent (or created its order)
    STALE = "stale"  # a known meaning, but older or no news: recorded, no change
    IGNORED = "ignored"  # carries nothing this consumer acts on: recorded, no change
    # An authorization of an intent that names no cart (CART_METADATA_KEY): not the
    # shop's payment (a subscription invoice, a Terminal sale, another integration).
    # Its facts are kept on the intent; it makes no order and is never acted on.
    NOT_AN_ORDER = "not_an_order"


class OrderView(NamedTuple):
    """The part of an existing order that the fold and the store need."""

    id: int
    allocation: Allocation
    amount: int
    # As stored before the batch; None when not read (the fold does not need it).
    status: OrderStatus | None = None


NOTHING_KNOWN = Facts()


class IntentState(NamedTuple):
    payment_intent_id: str
    facts: Facts = NOTHING_KNOWN
    order: OrderView | None = None
    exists: bool = True  # whether the intent has a row yet (the store's concern)


# Where an event arrived: (received-at ms, partition, offset). Ties between
# payments made in the same second are broken by it (first paid, first served).
Arrival = tuple[int, int, int]
NO_ARRIVAL: Arrival = (0, 0, 0)


class Arrivals(Protocol):
    def __getitem__(self, index: int, /) -> Arrival: ...


class IntentFold(NamedTuple):
    state: IntentState
    decisions: tuple[Decision, ...]
    outcomes: tuple[tuple[str, Outcome], ...]
    # Whether the intent's facts changed (its row must be written): also for an
    # intent that is not an order, whose events are not `applied`.
    changed: bool


def fold_intent(
    state: IntentState,
    events: list[StripeEvent],
    arrivals: Arrivals | None = None,
    cart_key: str = DEFAULT_CART_KEY,
) -> IntentFold:
    """Merge `events` (one intent's, in Kafka order) into `state`; decide what follows.

    `cart_key` is the metadata key naming the shop's cart (CART_METADATA_KEY).
    """
    facts = state.facts
    outcomes: list[tuple[str, Outcome]] = []
    first_arrival: Arrival | None = None
    # The batch's earliest authorizing event, by (created, arrival): where it was paid.
    first_paid: tuple[int, Arrival] | None = None
    source: str | None = None  # the batch's first event that changed the facts
    for i, event in enumerate(events):
        learn = meaning_of(event.type)
        if learn is None:
            outcomes.append((event.id, Outcome.IGNORED))
            continue
        before = facts
        facts = learn(facts, event, cart_key)
        if event.account is not None and facts.account is None:
            facts = facts._replace(account=event.account)
        arrival = arrivals[i] if arrivals is not None else NO_ARRIVAL
        first_arrival = arrival if first_arrival is None else min(first_arrival, arrival)
        if _authorizes(event):
            paid = (event.created, arrival)
            first_paid = paid if first_paid is None else min(first_paid, paid)
        changed = facts is not before
        if changed and source is None:
            source = event.id
        outcomes.append((event.id, Outcome.APPLIED if changed else Outcome.STALE))
    now = terms(facts)
    if state.order is None and now is None and facts.paid:
        # Money held or received, and no cart named: not the shop's payment.
        outcomes = [
            (eid, Outcome.NOT_AN_ORDER if _authorizes(e) else outcome)
            for (eid, outcome), e in zip(outcomes, events, strict=True)
        ]
    # First paid, first served: when the money was first held or received, then where
    # the batch's earliest authorizing event arrived (else the intent's first event of
    # the batch: an order the session's cart completes).
    where = first_paid[1] if first_paid is not None else first_arrival or NO_ARRIVAL
    paid_key = (facts.paid_at or 0, *where)
    decisions = _decide(state, facts, now, source or "", paid_key)
    new_state = IntentState(state.payment_intent_id, facts, state.order, state.exists)
    changed = facts is not state.facts
    return IntentFold(new_state, decisions, tuple(outcomes), changed)


def _authorizes(event: StripeEvent) -> bool:
    """An authorization or capture of the intent, or a paid Checkout Session."""
    if authorized_amount(event) is not None:
        return True
    session = event.data.object
    return type(session) is CheckoutSession and session.payment_status == "paid"


def _decide(
    state: IntentState,
    facts: Facts,
    now: Terms | None,
    source: str,
    paid_key: tuple[int, int, int, int],
) -> tuple[Decision, ...]:
    pid = state.payment_intent_id
    order = state.order
    if order is None:
        return () if now is None else (PlaceOrder(pid, now, source, paid_key),)
    before = state.facts
    decisions: list[Decision] = []
    if facts.canceled and not before.canceled:
        decisions.append(CancelOrder(pid, facts.status_event_id or ""))
    elif facts.canceled and facts.cancellation_reason != before.cancellation_reason:
        decisions.append(RecordCancellation(pid))
    elif facts.status != before.status or _shown_payment(facts) != _shown_payment(before):
        decisions.append(RecordPayment(pid))
    if (
        order.allocation is Allocation.NEEDS_REVIEW
        and not facts.canceled
        and now is not None
        and now != terms(before)
    ):
        decisions.append(ReviewOrder(pid, now, source, paid_key))
    if (facts.amount_refunded, facts.refunded_in_full(order.amount)) != (
        before.amount_refunded,
        before.refunded_in_full(order.amount),
    ):
        decisions.append(RecordRefund(pid))
    elif facts.refund_stopped_at != before.refund_stopped_at:
        decisions.append(RecordRefundStopped(pid))
    if _shown(facts.dispute) != _shown(before.dispute):
        decisions.append(RecordDispute(pid))
    return tuple(decisions)


def _shown_payment(facts: Facts) -> tuple[object, ...]:
    """What an order shows of its money besides the intent's status: what was captured,
    the deadline, its terms, Radar's review and the issuer's warning."""
    review = facts.review
    warning = facts.fraud_warning
    return (
        facts.amount_received,
        facts.capture_before,
        facts.account,
        terms(facts),
        review and (review.id, review.open, review.reason, review.closed_reason),
        warning and (warning.id, warning.actionable, warning.fraud_type),
    )


def _shown(dispute: Dispute | None) -> tuple[str, int, str, bool] | None:
    """What an order shows of its dispute: a newer snapshot that changes none of it
    (`charge.dispute.funds_withdrawn`, mostly) is no news to the order or its readers."""
    if dispute is None:
        return None
    return (dispute.status, dispute.amount, dispute.reason, dispute.refundable)

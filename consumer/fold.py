"""Fold one payment intent's new events, in Kafka order, into its new facts and decisions.

Pure code: no I/O. Each event is merged into the intent's `Facts` through the
meanings table (consumer/lifecycle.py); the decisions then follow from what
changed between the facts before the batch and after it:

- the intent's first authorization that names the shop's cart creates its one
  order (`PlaceOrder`); an intent that names none is not the shop's and makes
  no order (`not_an_order`);
- an existing order whose intent became canceled gives its stock back
  (`CancelOrder`), once; a later change of the reason only is copied
  (`RecordCancellation`);
- an existing order whose intent's refunds or dispute changed is brought up to
  date (`RecordRefund`, `RecordDispute`);
- an existing order whose intent's Stripe status changed otherwise (a capture),
  or what was captured or its deadline, is brought up to date and announced to
  its readers (`RecordPayment`).

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
    Dispute,
    Facts,
    OrderStatus,
    PlaceOrder,
    RecordCancellation,
    RecordDispute,
    RecordPayment,
    RecordRefund,
)
from intentflow.consumer.lifecycle import EVENT_STEP, authorized_amount, meaning_of
from intentflow.consumer.policy import DEFAULT_CART_KEY
from intentflow.schemas import PaymentIntent, StripeEvent


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
# authorizations of the same second are broken by it (first paid, first served).
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

    The order comes from the earliest authorization that names a cart under
    `cart_key`; an authorization of an intent with no order that names none is
    `not_an_order`.
    """
    facts = state.facts
    outcomes: list[tuple[str, Outcome]] = []
    first_auth: StripeEvent | None = None
    held_most = 0
    paid_key: tuple[int, int, int, int] | None = None
    for i, event in enumerate(events):
        learn = meaning_of(event.type)
        held = authorized_amount(event)
        if learn is None and held is None:
            outcomes.append((event.id, Outcome.IGNORED))
            continue
        before = facts
        if learn is not None:
            facts = learn(facts, event)
        if event.account is not None and facts.account is None:
            facts = facts._replace(account=event.account)
        if held is not None and state.order is None:
            intent = event.data.object
            assert type(intent) is PaymentIntent  # authorized_amount checked it
            if intent.cart(cart_key) is None:
                outcomes.append((event.id, Outcome.NOT_AN_ORDER))
                continue
            creates_order = first_auth is None
            arrival = arrivals[i] if arrivals is not None else NO_ARRIVAL
            key = (event.created, *arrival)
            paid_key = key if paid_key is None else min(paid_key, key)
            held_most = max(held_most, held)
            # The order's cart and amount come from the earliest authorization, by
            # the same key as the intent's status, not from whichever came first.
            if first_auth is None or _auth_key(event) < _auth_key(first_auth):
                first_auth = event
        else:
            creates_order = False
        applied = creates_order or facts is not before
        outcomes.append((event.id, Outcome.APPLIED if applied else Outcome.STALE))
    decisions = _decide(state, facts, first_auth, held_most, paid_key, cart_key)
    new_state = IntentState(state.payment_intent_id, facts, state.order, state.exists)
    changed = facts is not state.facts or any(o is Outcome.APPLIED for _, o in outcomes)
    return IntentFold(new_state, decisions, tuple(outcomes), changed)


def _auth_key(event: StripeEvent) -> tuple[int, int, str]:
    return (event.created, EVENT_STEP.get(event.type, 0), event.id)


def _decide(
    state: IntentState,
    facts: Facts,
    first_auth: StripeEvent | None,
    held_most: int,
    paid_key: tuple[int, int, int, int] | None,
    cart_key: str,
) -> tuple[Decision, ...]:
    pid = state.payment_intent_id
    if state.order is None:
        if first_auth is None or paid_key is None:
            return ()
        intent = first_auth.data.object
        assert type(intent) is PaymentIntent  # authorized_amount checked it
        cart_id = intent.cart(cart_key)
        assert cart_id is not None  # fold_intent keeps only authorizations that name one
        place = PlaceOrder(
            payment_intent_id=pid,
            cart_id=cart_id,
            amount=intent.amount,
            currency=intent.currency.lower(),
            amount_authorized=held_most,
            event_id=first_auth.id,
            paid_key=paid_key,
        )
        return (place,)
    before = state.facts
    decisions: list[Decision] = []
    if facts.canceled and not before.canceled:
        decisions.append(CancelOrder(pid, facts.status_event_id or ""))
    elif facts.canceled and facts.cancellation_reason != before.cancellation_reason:
        decisions.append(RecordCancellation(pid))
    elif facts.status != before.status or _payment(facts) != _payment(before):
        decisions.append(RecordPayment(pid))
    if (facts.amount_refunded, facts.charge_refunded) != (
        before.amount_refunded,
        before.charge_refunded,
    ):
        decisions.append(RecordRefund(pid))
    if _shown(facts.dispute) != _shown(before.dispute):
        decisions.append(RecordDispute(pid))
    return tuple(decisions)


def _payment(facts: Facts) -> tuple[int, int | None]:
    """What an order shows of where its money is besides the intent's status."""
    return (facts.amount_received, facts.capture_before)


def _shown(dispute: Dispute | None) -> tuple[str, int, str] | None:
    """What an order shows of its dispute: a newer snapshot that changes none of it
    (`charge.dispute.funds_withdrawn`, mostly) is no news to the order or its readers."""
    return None if dispute is None else (dispute.status, dispute.amount, dispute.reason)

"""Fold one payment intent's new events, in Kafka order, into decisions.

Pure code: no I/O. Stripe does not promise delivery order and `created` has
whole-second resolution, so the intent's status decides what moves it: a
status never moves to a lower rank, and `succeeded` and `canceled` are final.
An event that would move the intent backwards is recorded as `stale` and
changes nothing (invariant 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from schemas import AUTHORIZATION_EVENTS, PaymentIntent, StripeEvent

# Rank of each PaymentIntent status along its life. `requires_capture` outranks
# every earlier status; the two final statuses share the top rank.
STATUS_RANK: dict[str, int] = {
    "requires_payment_method": 0,
    "requires_confirmation": 1,
    "requires_action": 2,
    "processing": 3,
    "requires_capture": 4,
    "succeeded": 5,
    "canceled": 5,
}
FINAL_STATUSES = frozenset({"succeeded", "canceled"})


class Outcome(StrEnum):
    APPLIED = "applied"  # moved the intent's state (and maybe created an order)
    STALE = "stale"  # would have moved the intent backwards: recorded, no change
    IGNORED = "ignored"  # carries nothing this consumer acts on: recorded, no change


@dataclass(frozen=True, slots=True)
class IntentState:
    payment_intent_id: str
    status: str | None = None
    has_order: bool = False
    exists: bool = True  # whether the intent has a row yet (the store's concern, carried along)


@dataclass(frozen=True, slots=True)
class CreateOrder:
    """Turn the intent's cart into an order (subject to cart checks and stock)."""

    payment_intent_id: str
    cart_id: str | None
    amount: int
    currency: str
    event_id: str


@dataclass(frozen=True, slots=True)
class IntentFold:
    state: IntentState
    create_order: CreateOrder | None
    outcomes: tuple[tuple[str, Outcome], ...]
    last_event_id: str | None

    @property
    def changed(self) -> bool:
        return self.last_event_id is not None


def moves_forward(current: str | None, new: str) -> bool:
    """Whether an intent in status `current` may take status `new`."""
    if new not in STATUS_RANK:
        return False
    if current is None:
        return True
    if current in FINAL_STATUSES:
        return False
    return STATUS_RANK[new] >= STATUS_RANK.get(current, -1)


def fold_intent(state: IntentState, events: list[StripeEvent]) -> IntentFold:
    """Apply `events` (one intent's, in Kafka order) to `state`."""
    status, has_order = state.status, state.has_order
    create: CreateOrder | None = None
    outcomes: list[tuple[str, Outcome]] = []
    last_event_id: str | None = None
    for event in events:
        intent = event.data.object
        if type(intent) is not PaymentIntent or intent.status not in STATUS_RANK:
            outcomes.append((event.id, Outcome.IGNORED))
            continue
        if not moves_forward(status, intent.status):
            outcomes.append((event.id, Outcome.STALE))
            continue
        status = intent.status
        last_event_id = event.id
        outcomes.append((event.id, Outcome.APPLIED))
        if event.type in AUTHORIZATION_EVENTS and not has_order:
            has_order = True
            create = CreateOrder(
                payment_intent_id=intent.id,
                cart_id=intent.cart_id,
                amount=intent.amount,
                currency=intent.currency.lower(),
                event_id=event.id,
            )
    return IntentFold(
        state=IntentState(state.payment_intent_id, status, has_order, state.exists),
        create_order=create,
        outcomes=tuple(outcomes),
        last_event_id=last_event_id,
    )

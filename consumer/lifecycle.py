"""What each Stripe event tells about its payment intent: the meanings table.

Pure code: no I/O. Every meaning merges one event into the intent's `Facts`
so that the result depends on the set of events seen, never on their order or
on how often each came (DESIGN.md invariant 6):

- the status is the one of the greatest event by `status_key`: the status's
  tier, then the event's `created`, then the event type's step, then its id.
  Stripe's state machine cycles through the tier-0 statuses (a card that
  failed after 3-D Secure, or a debit that was `processing`, goes back to
  `requires_payment_method`), so within that tier time decides, not the
  status; `requires_capture` outranks all of them, and `canceled` (which an
  expired authorization ends in) is absorbing;
- a charge's `amount_refunded` only grows: the largest seen counts (of a
  captured charge: an uncaptured one "refunds" only the hold it releases);
- what Stripe captured (the intent's `amount_received`, a captured charge's
  `amount_captured`) and the authorization's deadline (an uncaptured charge's
  `payment_method_details.card.capture_before`) keep their largest value;
- a refund or a dispute keeps its greatest snapshot by (event created, the
  rank of its status, id).

Adding a meaning is one function here and one entry in `MEANINGS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from intentflow.consumer.decisions import Dispute as DisputeFact
from intentflow.consumer.decisions import Facts, RefundSnapshot
from intentflow.schemas import Charge, Dispute, PaymentIntent, Refund, StripeEvent

# The tier of each PaymentIntent status; a status moves only to an equal or greater key.
STATUS_TIER: dict[str, int] = {
    "requires_payment_method": 0,
    "requires_confirmation": 0,
    "requires_action": 0,
    "processing": 0,
    "requires_capture": 1,
    "succeeded": 2,
    "canceled": 3,
}

# Order of event types that share a second (`created` has whole-second resolution).
EVENT_STEP: dict[str, int] = {
    "payment_intent.created": 0,
    "payment_intent.requires_action": 1,
    "payment_intent.partially_funded": 1,
    "payment_intent.processing": 2,
    "payment_intent.payment_failed": 3,
    "payment_intent.amount_capturable_updated": 4,
    "payment_intent.authorized": 4,  # not a Stripe event: a synonym some teams use
    "payment_intent.succeeded": 5,
    "payment_intent.canceled": 7,  # after charge.expired: the intent's own reason wins
    "charge.expired": 6,
}

# An authorization: one of these events carrying an intent in one of these statuses.
AUTHORIZATION_EVENTS = frozenset(
    {
        "payment_intent.amount_capturable_updated",
        "payment_intent.authorized",
        "payment_intent.succeeded",
    }
)
AUTHORIZED_STATUSES = frozenset({"requires_capture", "succeeded"})

REFUND_RANK = {"pending": 0, "requires_action": 0, "succeeded": 1, "failed": 2, "canceled": 2}
DISPUTE_RANK = {
    "warning_needs_response": 0,
    "needs_response": 0,
    "warning_under_review": 1,
    "under_review": 1,
    "won": 2,
    "lost": 2,
    "warning_closed": 2,
    "prevented": 2,
    "charge_refunded": 2,
}

# Why an intent ended when `charge.expired` is what says so.
EXPIRED = "expired"

StatusKey = tuple[int, int, int, str]


def status_key(facts: Facts) -> StatusKey | None:
    if facts.status is None:
        return None
    return (
        STATUS_TIER[facts.status],
        facts.status_created or 0,
        facts.status_step or 0,
        facts.status_event_id or "",
    )


def authorized_amount(event: StripeEvent) -> int | None:
    """What an authorization event says is held (or captured) for the intent; None if not one."""
    intent = event.data.object
    if (
        event.type not in AUTHORIZATION_EVENTS
        or type(intent) is not PaymentIntent
        or intent.status not in AUTHORIZED_STATUSES
    ):
        return None
    held = (
        intent.amount_capturable if intent.status == "requires_capture" else intent.amount_received
    )
    return held or 0


def _take_status(facts: Facts, event: StripeEvent, status: str, reason: str | None) -> Facts:
    key = (STATUS_TIER[status], event.created, EVENT_STEP[event.type], event.id)
    current = status_key(facts)
    if current is not None and key <= current:
        return facts
    return facts._replace(
        status=status,
        status_created=event.created,
        status_step=key[2],
        status_event_id=event.id,
        cancellation_reason=reason if status == "canceled" else None,
    )


def learn_intent_status(facts: Facts, event: StripeEvent) -> Facts:
    intent = event.data.object
    if type(intent) is not PaymentIntent or intent.status not in STATUS_TIER:
        return facts
    facts = _captured(facts, intent.amount_received or 0)
    return _take_status(facts, event, intent.status, intent.cancellation_reason)


def learn_charge(facts: Facts, event: StripeEvent) -> Facts:
    charge = event.data.object
    if type(charge) is not Charge:
        return facts
    deadline = charge.capture_before
    if deadline is not None and (facts.capture_before is None or deadline > facts.capture_before):
        facts = _with(facts, capture_before=deadline)
    if not charge.captured:
        return facts
    facts = _captured(facts, charge.amount_captured)
    refunded = max(facts.charge_amount_refunded, charge.amount_refunded)
    in_full = facts.charge_refunded or charge.refunded
    if (refunded, in_full) == (facts.charge_amount_refunded, facts.charge_refunded):
        return facts
    return _with(facts, charge_amount_refunded=refunded, charge_refunded=in_full)


def _captured(facts: Facts, amount: int) -> Facts:
    """What Stripe captured only grows (a later capture of the rest, never less)."""
    return _with(facts, amount_received=amount) if amount > facts.amount_received else facts


def learn_expired(facts: Facts, event: StripeEvent) -> Facts:
    """An uncaptured authorization lapsed: the intent is canceled (Stripe cancels it too)."""
    if type(event.data.object) is not Charge:
        return facts
    return _take_status(learn_charge(facts, event), event, "canceled", EXPIRED)


def learn_refund(facts: Facts, event: StripeEvent) -> Facts:
    refund = event.data.object
    if type(refund) is not Refund or refund.status not in REFUND_RANK:
        return facts
    new = RefundSnapshot(refund.amount, refund.status, event.created)
    old = facts.refunds.get(refund.id)
    if old is not None and _refund_key(new) <= _refund_key(old):
        return facts
    return _with(facts, refunds={**facts.refunds, refund.id: new})


def _refund_key(snapshot: RefundSnapshot) -> tuple[int, int, int]:
    return (snapshot.created, REFUND_RANK[snapshot.status], snapshot.amount)


def learn_dispute(facts: Facts, event: StripeEvent) -> Facts:
    dispute = event.data.object
    if type(dispute) is not Dispute or dispute.status not in DISPUTE_RANK:
        return facts
    new = DisputeFact(dispute.id, dispute.status, dispute.amount, dispute.reason, event.created)
    old = facts.dispute
    if old is not None and _dispute_key(new) <= _dispute_key(old):
        return facts
    return _with(facts, dispute=new)


def _dispute_key(dispute: DisputeFact) -> tuple[int, int, str, int]:
    return (dispute.created, DISPUTE_RANK[dispute.status], dispute.id, dispute.amount)


def _with(facts: Facts, **changes: Any) -> Facts:
    return facts._replace(**changes)


Learn = Callable[[Facts, StripeEvent], Facts]

# Event type → what it tells. Types not here, and not matched by a prefix in
# `_PREFIXES`, have no meaning for the consumer (recorded as `ignored`).
MEANINGS: dict[str, Learn] = {
    **{
        event_type: learn_intent_status
        for event_type in EVENT_STEP
        if event_type.startswith("payment_intent.")
    },
    "charge.expired": learn_expired,
    "charge.refund.updated": learn_refund,
    "refund.created": learn_refund,
    "refund.updated": learn_refund,
    "refund.failed": learn_refund,
}
_PREFIXES: tuple[tuple[str, Learn], ...] = (
    ("charge.dispute.", learn_dispute),
    ("charge.", learn_charge),  # charge.refunded, .succeeded, .captured, .updated, …
)


def meaning_of(event_type: str) -> Learn | None:
    meaning = MEANINGS.get(event_type)
    if meaning is not None:
        return meaning
    for prefix, learn in _PREFIXES:
        if event_type.startswith(prefix):
            return learn
    return None

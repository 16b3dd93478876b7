"""What each Stripe event tells about its payment intent: the meanings table.

Pure code: no I/O. Every meaning merges one event into the intent's `Facts`
so that the result depends on the set of events seen, never on their order or
on how often each came (docs/design.md, invariant 6):

- the status is the one of the greatest event by `status_key`: the status's
  tier, then the event's `created`, then the event type's step, then its id.
  Stripe's state machine cycles through the tier-0 statuses (a card that
  failed after 3-D Secure, or a debit that was `processing`, goes back to
  `requires_payment_method`), so within that tier time decides, not the
  status; `requires_capture` outranks all of them, and `canceled` (which an
  expired authorization ends in) is absorbing;
- the intent's authorization is its latest (event created, step, id): an
  increment or an overcapture moves it; the cart its metadata names
  (CART_METADATA_KEY) is the latest object's that names one; when the money
  was first held or received (`paid_at`) is the earliest such event's;
- a captured charge keeps its latest snapshot by (event created, step, id):
  what it says is refunded falls again when a refund fails, and the rest of a
  partial capture that Stripe released is not counted as refunded (an
  uncaptured charge "refunds" only the hold it releases: not counted at all);
- what Stripe captured (the intent's `amount_received`, a captured charge's
  `amount_captured`) and the authorization's deadline (an uncaptured charge's
  `payment_method_details.card.capture_before`) keep their largest value;
- a refund or a dispute keeps its greatest snapshot by (event created, the
  rank of its status, id); so do the Checkout Session that made the intent
  (`checkout.session.*`, mode `payment`), Radar's review (`review.*`) and the
  issuer's early fraud warning (`radar.early_fraud_warning.*`).

Adding a meaning is one function here and one entry in `MEANINGS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from intentflow.consumer.facts import (
    Authorization,
    ChargeSnapshot,
    Checkout,
    Facts,
    FraudWarning,
    Key,
    Named,
    RefundSnapshot,
)
from intentflow.consumer.facts import Dispute as DisputeFact
from intentflow.consumer.facts import Review as ReviewFact
from intentflow.schemas import (
    Charge,
    CheckoutSession,
    Dispute,
    EarlyFraudWarning,
    PaymentIntent,
    Refund,
    Review,
    StripeEvent,
)

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
# Within one second, where a dispute's status comes. Stripe's appeal of a lost dispute
# (API 2026-10-28: `appeal_needs_response`, `appeal_under_review`) comes after the loss;
# its final `won` or `lost` comes later in time, which ranks first.
DISPUTE_RANK = {
    "warning_needs_response": 0,
    "needs_response": 0,
    "warning_under_review": 1,
    "under_review": 1,
    "lost": 2,
    "appeal_needs_response": 3,
    "appeal_under_review": 4,
    "won": 5,
    "warning_closed": 5,
    "prevented": 5,
    "charge_refunded": 5,
}
# Within one second, where a captured charge's snapshot comes: a refund (charge.refunded)
# comes after the capture, and a later change (a refund that failed: charge.updated with
# less refunded) after that.
CHARGE_STEP = {"charge.succeeded": 0, "charge.captured": 1, "charge.refunded": 2}
CHARGE_LATER = 3  # charge.updated and any other charge.* event
# Within one second, where a Checkout Session's snapshot comes.
CHECKOUT_STEP = {
    "checkout.session.completed": 0,
    "checkout.session.async_payment_succeeded": 1,
    "checkout.session.async_payment_failed": 1,
    "checkout.session.expired": 1,
}
# A review closes after it opens (`review.opened`, then `review.closed`).
REVIEW_STEP = {"review.opened": 0, "review.closed": 1}

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


def _key(event: StripeEvent, step: int) -> Key:
    return (event.created, step, event.id)


class _Keyed(Protocol):
    @property
    def key(self) -> Key: ...


def _newer(key: Key, old: _Keyed | None) -> bool:
    """Whether a snapshot at `key` replaces `old`."""
    return old is None or key > old.key


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


def learn_intent(facts: Facts, event: StripeEvent, cart_key: str) -> Facts:
    """Its status, what it captured, the cart its metadata names, and its authorization."""
    intent = event.data.object
    if type(intent) is not PaymentIntent or intent.status not in STATUS_TIER:
        return facts
    facts = _captured(facts, intent.amount_received or 0)
    key = _key(event, EVENT_STEP[event.type])
    held = authorized_amount(event)
    cart_id = intent.cart(cart_key)
    if cart_id is not None:
        named = Named(key, cart_id, held is not None)
        if named.names_over(facts.named):
            facts = _with(facts, named=named)
    if held is not None:
        captured = intent.status == "succeeded"
        auth = Authorization(key, intent.amount, intent.currency.lower(), held, captured)
        if facts.authorization is None or auth.rank > facts.authorization.rank:
            facts = _with(facts, authorization=auth)
        facts = _paid_at(facts, event.created)
    return _take_status(facts, event, intent.status, intent.cancellation_reason)


def _paid_at(facts: Facts, created: int) -> Facts:
    """The money was first held or received at the earliest such event's `created`."""
    if facts.paid_at is not None and facts.paid_at <= created:
        return facts
    return _with(facts, paid_at=created)


def learn_charge(facts: Facts, event: StripeEvent, cart_key: str) -> Facts:
    charge = event.data.object
    if type(charge) is not Charge:
        return facts
    deadline = charge.capture_before
    if deadline is not None and (facts.capture_before is None or deadline > facts.capture_before):
        facts = _with(facts, capture_before=deadline)
    if not charge.captured:
        return facts  # what an uncaptured charge "refunds" is the hold it releases
    facts = _captured(facts, charge.amount_captured)
    # Before API 2025-03-31.basil a partial capture released the rest as a refund, which
    # the charge counts in amount_refunded: no money went back for it. Since basil the
    # release is no refund ("Changes to balance transaction behavior for partial capture
    # and payment cancellation flows", Stripe support).
    captured = charge.amount_captured
    partial = 0 < captured < charge.amount
    released = charge.amount - captured if partial and _before_basil(event) else 0
    facts = _released(facts, released)
    key = _key(event, CHARGE_STEP.get(event.type, CHARGE_LATER))
    if not _newer(key, facts.charge):
        return facts
    refunded = max(charge.amount_refunded - released, 0)
    return _with(facts, charge=ChargeSnapshot(key, refunded, charge.refunded))


BASIL = "2025-03-31"


def _before_basil(event: StripeEvent) -> bool:
    """Rendered by an API version before 2025-03-31.basil (none given: an old one)."""
    return event.api_version is None or event.api_version < BASIL


# A refund Stripe makes itself to release an uncaptured hold (before basil): not money
# sent back (Refund `reason`, "generated by Stripe internally").
RELEASE = "expired_uncaptured_charge"


def _released(facts: Facts, amount: int) -> Facts:
    """What Stripe released of a partial capture as a refund object: its largest word."""
    return _with(facts, released=amount) if amount > facts.released else facts


def _captured(facts: Facts, amount: int) -> Facts:
    """What Stripe captured only grows (a later capture of the rest, never less)."""
    return _with(facts, amount_received=amount) if amount > facts.amount_received else facts


def learn_expired(facts: Facts, event: StripeEvent, cart_key: str) -> Facts:
    """An uncaptured authorization lapsed: the intent is canceled (Stripe cancels it too)."""
    if type(event.data.object) is not Charge:
        return facts
    return _take_status(learn_charge(facts, event, cart_key), event, "canceled", EXPIRED)


def learn_refund(facts: Facts, event: StripeEvent, cart_key: str) -> Facts:
    refund = event.data.object
    if type(refund) is not Refund or refund.status not in REFUND_RANK or refund.reason == RELEASE:
        return facts
    opened = refund.created if refund.created is not None else event.created
    new = RefundSnapshot(refund.amount, refund.status, event.created, opened)
    old = facts.refunds.get(refund.id)
    if old is not None and _refund_key(new) <= _refund_key(old):
        return facts
    return _with(facts, refunds={**facts.refunds, refund.id: new})


def _refund_key(snapshot: RefundSnapshot) -> tuple[int, int, int, int]:
    return (snapshot.created, REFUND_RANK[snapshot.status], snapshot.amount, snapshot.opened)


def learn_dispute(facts: Facts, event: StripeEvent, cart_key: str) -> Facts:
    dispute = event.data.object
    if type(dispute) is not Dispute or dispute.status not in DISPUTE_RANK:
        return facts
    new = DisputeFact(
        dispute.id,
        dispute.status,
        dispute.amount,
        dispute.reason,
        event.created,
        dispute.is_charge_refundable,
    )
    old = facts.dispute
    if old is not None and _dispute_key(new) <= _dispute_key(old):
        return facts
    return _with(facts, dispute=new)


def _dispute_key(dispute: DisputeFact) -> tuple[int, int, str, int]:
    return (dispute.created, DISPUTE_RANK[dispute.status], dispute.id, dispute.amount)


def learn_checkout(facts: Facts, event: StripeEvent, cart_key: str) -> Facts:
    """The session that made the intent: the cart, the amounts the cart is checked
    against, and whether the money was received (a paid session is as good as a capture)."""
    session = event.data.object
    if type(session) is not CheckoutSession or session.mode != "payment":
        return facts
    key = _key(event, CHECKOUT_STEP.get(event.type, 1))
    paid = session.payment_status == "paid"
    if paid and session.amount_total is not None:
        facts = _paid_at(facts, event.created)
    if not _newer(key, facts.checkout):
        return facts
    totals = session.total_details
    conversion = session.currency_conversion
    # Adaptive Pricing shows the buyer their own currency: the cart is in the shop's,
    # as `currency_conversion` gives the items (its source amounts).
    subtotal = conversion.amount_subtotal if conversion else session.amount_subtotal
    currency = conversion.source_currency if conversion else session.currency
    snapshot = Checkout(
        key,
        session.id,
        session.cart(cart_key),
        subtotal,
        currency.lower() if currency else None,
        session.amount_total,
        session.currency.lower() if session.currency else None,
        totals.amount_shipping if totals else 0,
        totals.amount_discount if totals else 0,
        totals.amount_tax if totals else 0,
        paid,
    )
    return _with(facts, checkout=snapshot)


def learn_review(facts: Facts, event: StripeEvent, cart_key: str) -> Facts:
    review = event.data.object
    if type(review) is not Review:
        return facts
    key = _key(event, REVIEW_STEP.get(event.type, 1 if not review.open else 0))
    if not _newer(key, facts.review):
        return facts
    snapshot = ReviewFact(key, review.id, review.open, review.reason, review.closed_reason)
    return _with(facts, review=snapshot)


def learn_fraud_warning(facts: Facts, event: StripeEvent, cart_key: str) -> Facts:
    warning = event.data.object
    if type(warning) is not EarlyFraudWarning:
        return facts
    key = _key(event, 0)
    if not _newer(key, facts.fraud_warning):
        return facts
    snapshot = FraudWarning(key, warning.id, warning.actionable, warning.fraud_type)
    return _with(facts, fraud_warning=snapshot)


def _with(facts: Facts, **changes: Any) -> Facts:
    return facts._replace(**changes)


# What one event tells; `cart_key` is CART_METADATA_KEY (the metadata key naming the cart).
Learn = Callable[[Facts, StripeEvent, str], Facts]

# Event type → what it tells. Types not here, and not matched by a prefix in
# `_PREFIXES`, have no meaning for the consumer (recorded as `ignored`).
MEANINGS: dict[str, Learn] = {
    **{
        event_type: learn_intent
        for event_type in EVENT_STEP
        if event_type.startswith("payment_intent.")
    },
    "charge.expired": learn_expired,
    "charge.refund.updated": learn_refund,
    "refund.created": learn_refund,
    "refund.updated": learn_refund,
    "refund.failed": learn_refund,
    **{event_type: learn_checkout for event_type in CHECKOUT_STEP},
    "review.opened": learn_review,
    "review.closed": learn_review,
}
_PREFIXES: tuple[tuple[str, Learn], ...] = (
    ("charge.dispute.", learn_dispute),
    ("charge.", learn_charge),  # charge.refunded, .succeeded, .captured, .updated, …
    ("radar.early_fraud_warning.", learn_fraud_warning),
)


def meaning_of(event_type: str) -> Learn | None:
    meaning = MEANINGS.get(event_type)
    if meaning is not None:
        return meaning
    for prefix, learn in _PREFIXES:
        if event_type.startswith(prefix):
            return learn
    return None

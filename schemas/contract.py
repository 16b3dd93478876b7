"""The Kafka contract between the webhook bridge and the consumer.

Topic names, the message key, and the header names are part of the public
contract (docs/design.md, "Contracts other people rely on"): change them only with
a migration plan for every reader.
"""

from __future__ import annotations

from typing import Any

DEFAULT_TOPIC = "stripe.events"

HEADER_EVENT_ID = "stripe-event-id"
HEADER_EVENT_TYPE = "stripe-event-type"
HEADER_RECEIVED_AT = "received-at"
# Set only by `order-consumer backfill` (`backfill`: read from Stripe's Events API, not
# delivered to the webhook endpoint); a message without it came through the bridge.
# The consumer treats both alike: the same key, body and other headers.
HEADER_SOURCE = "source"
SOURCE_BACKFILL = "backfill"

# Added by the consumer when it dead-letters a message.
HEADER_ERROR = "error"
HEADER_ERROR_DETAIL = "error-detail"
HEADER_ORIGINAL_PARTITION = "original-partition"
HEADER_ORIGINAL_OFFSET = "original-offset"
# Added by `order-consumer dlq replay`: the dead letter (`<partition>:<offset>`) it came from.
HEADER_REPLAYED_FROM = "replayed-from"


def dlq_topic(topic: str) -> str:
    """The dead-letter topic that belongs to `topic`."""
    return f"{topic}.dlq"


# Objects that name the payment intent they belong to in `payment_intent` (Stripe's API
# reference, each object's `payment_intent`): a charge, a dispute (since API 2020-03-02),
# a refund, a Checkout Session in payment mode, a Radar review, an early fraud warning.
_NAME_THEIR_INTENT = frozenset(
    {"charge", "dispute", "refund", "checkout.session", "review", "radar.early_fraud_warning"}
)
# Objects that name the charge they belong to in `charge`: their fallback key when they
# name no intent (a charge made without a PaymentIntent).
_NAME_THEIR_CHARGE = frozenset({"dispute", "refund", "review", "radar.early_fraud_warning"})

# What a message's key is, by name: the bridge logs the key under this name, and answers
# `published` for an intent's key, `published_without_intent` for the others.
KEY_PAYMENT_INTENT = "payment_intent_id"
KEY_CHARGE = "charge_id"
KEY_CHECKOUT_SESSION = "checkout_session_id"

# The Checkout Session mode whose sessions are payments (the others: `setup`, `subscription`).
CHECKOUT_PAYMENT_MODE = "payment"

# A message's key and what it is (KEY_*). A plain tuple: it is built on the bridge's hot path.
Route = tuple[str, str]


def route(event: dict[str, Any]) -> Route | None:
    """Where a Stripe event given as parsed JSON goes on the topic: its key, and what the
    key is; None for an event that is not published (it concerns no payment).

    In order: the payment intent the object is or names (`payment_intent_key`); else the
    charge it is or names (`charge_key`); else, for a Checkout Session, the session itself.
    A Checkout Session in `setup` or `subscription` mode is no payment of the shop's: None.

    The consumer's decoding checks an intent's key against the intent it reads from the
    same event (`StripeEvent.payment_intent_id`): the two must agree for every kind
    (tests/unit/test_stripe_shapes.py).
    """
    obj = _object(event)
    if obj is None:
        return None
    kind = obj.get("object")
    if kind == "checkout.session" and obj.get("mode") != CHECKOUT_PAYMENT_MODE:
        return None
    intent_id = _id_of(obj, kind, "payment_intent", _NAME_THEIR_INTENT, "payment_intent")
    if intent_id is not None:
        return (intent_id, KEY_PAYMENT_INTENT)
    charge_id = _id_of(obj, kind, "charge", _NAME_THEIR_CHARGE, "charge")
    if charge_id is not None:
        return (charge_id, KEY_CHARGE)
    if kind == "checkout.session":
        # A session names its intent only once it is confirmed (API 2022-08-01: "a
        # PaymentIntent is created when the Session is confirmed"), so one that expired
        # unpaid names none, nor does a no-cost order. Published under its own id: a 2xx
        # stops Stripe's retries, and an event not published would exist nowhere to replay.
        session_id = obj.get("id")
        if isinstance(session_id, str) and session_id:
            return (session_id, KEY_CHECKOUT_SESSION)
    return None


def payment_intent_key(event: dict[str, Any]) -> str | None:
    """The payment intent a Stripe event given as parsed JSON concerns: its id, or None.

    `payment_intent.*` events carry the intent as `data.object`; the other objects that
    belong to an intent name it in `payment_intent`: the charge (`charge.*`), the dispute
    (`charge.dispute.*`), the refund (`charge.refund.updated`, `refund.*`), the Checkout
    Session (`checkout.session.*`), the review (`review.*`) and the early fraud warning
    (`radar.early_fraud_warning.*`). `route` gives the message key.
    """
    obj = _object(event)
    if obj is None:
        return None
    return _id_of(obj, obj.get("object"), "payment_intent", _NAME_THEIR_INTENT, "payment_intent")


def charge_key(event: dict[str, Any]) -> str | None:
    """The charge a Stripe event that names no payment intent concerns: its id, or None.

    A charge made without a PaymentIntent (the legacy Charges API, a charge created
    from a Source) has `payment_intent: null`, and so do its disputes, refunds, reviews
    and early fraud warnings. Such an event is still published, keyed by the charge id,
    so every event of one charge shares a partition and stays findable: the charge's
    own `id`, or the `charge` the other objects name.
    """
    obj = _object(event)
    if obj is None:
        return None
    return _id_of(obj, obj.get("object"), "charge", _NAME_THEIR_CHARGE, "charge")


def _object(event: dict[str, Any]) -> dict[str, Any] | None:
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    return obj if isinstance(obj, dict) else None


def _id_of(
    obj: dict[str, Any], found: Any, kind: str, naming: frozenset[str], field: str
) -> str | None:
    """The id of the `kind` object that `obj` (of kind `found`) is, or names in `field`."""
    if found == kind:
        value = obj.get("id")
    elif found in naming:
        value = obj.get(field)
    else:
        return None
    return value if isinstance(value, str) and value else None


def encode_key(payment_intent_id: str) -> bytes:
    return payment_intent_id.encode("utf-8")


def contract_headers(
    event_id: str, event_type: str, received_at_ms: int
) -> list[tuple[str, bytes]]:
    """The headers every message on the events topic carries."""
    return [
        (HEADER_EVENT_ID, event_id.encode("utf-8")),
        (HEADER_EVENT_TYPE, event_type.encode("utf-8")),
        (HEADER_RECEIVED_AT, str(received_at_ms).encode("ascii")),
    ]

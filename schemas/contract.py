"""The Kafka contract between the webhook bridge and the consumer.

Topic names, the message key, and the header names are part of the public
contract (DESIGN.md, "Contracts other people rely on"): change them only with
a migration plan for every reader.
"""

from __future__ import annotations

from typing import Any

DEFAULT_TOPIC = "stripe.events"

HEADER_EVENT_ID = "stripe-event-id"
HEADER_EVENT_TYPE = "stripe-event-type"
HEADER_RECEIVED_AT = "received-at"

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


# Objects that name the payment intent they belong to in `payment_intent`.
_NAME_THEIR_INTENT = frozenset({"charge", "dispute", "refund"})
# Objects that name the charge they belong to in `charge`.
_NAME_THEIR_CHARGE = frozenset({"dispute", "refund"})


def payment_intent_key(event: dict[str, Any]) -> str | None:
    """The message key of a Stripe event given as parsed JSON: its payment intent id.

    `payment_intent.*` events carry the intent as `data.object`; `charge.*`
    events name it in `data.object.payment_intent`, on the charge, or on the
    dispute (`charge.dispute.*`) or the refund (`charge.refund.updated`). Events
    that concern no payment intent return None (see `charge_key` for the charge
    events among them).
    """
    return _named(event, "payment_intent", _NAME_THEIR_INTENT, "payment_intent")


def charge_key(event: dict[str, Any]) -> str | None:
    """The fallback key of a charge, dispute or refund event that names no payment intent.

    A charge made without a PaymentIntent (the legacy Charges API, a charge
    created from a Source) has `payment_intent: null`, and so do its disputes
    and refunds. Such an event is still published, keyed by the charge id, so
    every event of one charge shares a partition and stays findable: the
    charge's own `id`, or the `charge` a dispute or refund names. Events that
    name no charge either return None.
    """
    return _named(event, "charge", _NAME_THEIR_CHARGE, "charge")


def _named(event: dict[str, Any], kind: str, naming: frozenset[str], field: str) -> str | None:
    """The id of the `kind` object the event's `data.object` is, or names in `field`."""
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        return None
    found = obj.get("object")
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

"""The topics' contract as an AsyncAPI 3.0 document, generated from this package.

`python -m intentflow.schemas.asyncapi` (`make contract`) prints it; `docs/asyncapi.json`
is the checked-in copy, and a test fails when that copy no longer matches what
the code would write. Three channels: the events topic the bridge writes and
the consumer reads (Stripe's event JSON as the bridge received it, keyed by
payment intent, with the contract headers), its dead-letter topic (the same
bytes, with why), and the orders topic the relay writes (`OrderEvent`).

The payload schemas are the pydantic models' own JSON Schemas: what the
consumer requires of a Stripe event (it ignores every other field), and what
an order event holds. They live under `components/schemas`, one entry per
model, and every `$ref` names one of them: pydantic's own `#/$defs/…` refs
are relative to a model's schema, which AsyncAPI's tools do not treat as a
document of its own (the official parser reported each as `invalid-ref` and
returned no document). tests/unit/test_asyncapi_parser.py runs that parser.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from intentflow.schemas.contract import (
    DEFAULT_TOPIC,
    HEADER_ERROR,
    HEADER_ERROR_DETAIL,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_ORIGINAL_OFFSET,
    HEADER_ORIGINAL_PARTITION,
    HEADER_RECEIVED_AT,
    HEADER_REPLAYED_FROM,
    HEADER_SOURCE,
    SOURCE_BACKFILL,
    dlq_topic,
)
from intentflow.schemas.orders import (
    DEFAULT_ORDERS_TOPIC,
    HEADER_ORDER_EVENT_TYPE,
    HEADER_OUTBOX_ID,
    ORDER_EVENT_TYPES,
    OrderEvent,
)
from intentflow.schemas.stripe import StripeEvent

VERSION = "1.0.0"
SCHEMAS_REF = "#/components/schemas/{model}"


def payload_schemas() -> dict[str, Any]:
    """Every model a payload uses, by name, each `$ref` pointing at `components/schemas`."""
    _, found = models_json_schema(
        [(StripeEvent, "validation"), (OrderEvent, "validation")], ref_template=SCHEMAS_REF
    )
    return dict(found["$defs"])


def _schema_ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": SCHEMAS_REF.format(model=model.__name__)}


def _string(description: str, **more: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **more}


EVENT_HEADERS: dict[str, Any] = {
    "type": "object",
    "required": [HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_RECEIVED_AT],
    "properties": {
        HEADER_EVENT_ID: _string("The Stripe event's id (evt_…), UTF-8."),
        HEADER_EVENT_TYPE: _string("The Stripe event's type, UTF-8."),
        HEADER_RECEIVED_AT: _string(
            "When the bridge received the webhook: Unix time in milliseconds, ASCII digits.",
            pattern="^[0-9]+$",
        ),
        HEADER_REPLAYED_FROM: _string(
            "Set by `order-consumer dlq replay`: the dead letter it came from, "
            "`<partition>:<offset>`."
        ),
        HEADER_SOURCE: _string(
            "Set by `order-consumer backfill` only: `backfill`, the event was read from "
            "Stripe's Events API rather than delivered to the webhook endpoint; then "
            "`received-at` is when the backfill read it. Absent: through the bridge. The "
            "key, the body (the Stripe event) and the other headers are the same either way.",
            enum=[SOURCE_BACKFILL],
        ),
    },
}

DEAD_LETTER_HEADERS: dict[str, Any] = {
    "type": "object",
    "required": [HEADER_ERROR, HEADER_ORIGINAL_PARTITION, HEADER_ORIGINAL_OFFSET],
    "properties": {
        **EVENT_HEADERS["properties"],
        HEADER_ERROR: _string("Why the consumer set it aside, a short code (e.g. invalid_json)."),
        HEADER_ERROR_DETAIL: _string("The detail of that reason, at most 500 characters."),
        HEADER_ORIGINAL_PARTITION: _string(
            "Its partition on the events topic.", pattern="^[0-9]+$"
        ),
        HEADER_ORIGINAL_OFFSET: _string("Its offset there.", pattern="^[0-9]+$"),
    },
}

ORDER_HEADERS: dict[str, Any] = {
    "type": "object",
    "required": [HEADER_OUTBOX_ID, HEADER_ORDER_EVENT_TYPE],
    "properties": {
        HEADER_OUTBOX_ID: _string(
            "The outbox row's id: the same on every copy of one change, so readers can "
            "drop copies.",
            pattern="^[0-9]+$",
        ),
        HEADER_ORDER_EVENT_TYPE: _string("The order event's type.", enum=sorted(ORDER_EVENT_TYPES)),
    },
}


def document() -> dict[str, Any]:
    """The AsyncAPI document, as plain JSON data."""
    events_topic, dead_letters, orders_topic = (
        DEFAULT_TOPIC,
        dlq_topic(DEFAULT_TOPIC),
        DEFAULT_ORDERS_TOPIC,
    )
    intent_key = {
        "type": "string",
        "description": "The payment intent id (pi_…), UTF-8; for a charge, dispute, refund, "
        "review or early fraud warning that names no payment intent, the charge id (ch_…); "
        "for a Checkout Session that names none (one that expired unpaid), the session id "
        "(cs_…). Kafka's default partitioner (murmur2) places it, so every event of one "
        "intent is on one partition, in order.",
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "intentflow topics",
            "version": VERSION,
            "description": "Stripe payment events in, order events out. Generated by "
            "`make contract` from schemas/; do not edit by hand.",
        },
        "defaultContentType": "application/json",
        "channels": {
            "events": {
                "address": events_topic,
                "description": "Every verified Stripe webhook about a payment, of the mode "
                "the bridge serves (STRIPE_LIVEMODE), published by stripe-bridge before it "
                "answers 2xx. Topic name: KAFKA_TOPIC.",
                "messages": {"stripeEvent": {"$ref": "#/components/messages/stripeEvent"}},
            },
            "deadLetters": {
                "address": dead_letters,
                "description": "Records the consumer could not apply, unchanged, with why.",
                "messages": {"deadLetter": {"$ref": "#/components/messages/deadLetter"}},
            },
            "orders": {
                "address": orders_topic,
                "description": "One event per order change, published by the consumer's "
                "relay from its transactional outbox. Topic name: ORDERS_TOPIC.",
                "messages": {"orderEvent": {"$ref": "#/components/messages/orderEvent"}},
            },
        },
        "operations": {
            "publishStripeEvent": {
                "action": "send",
                "channel": {"$ref": "#/channels/events"},
                "summary": "stripe-bridge publishes each verified webhook (acks=all).",
            },
            "applyStripeEvent": {
                "action": "receive",
                "channel": {"$ref": "#/channels/events"},
                "summary": "order-consumer applies each event once per event id.",
            },
            "publishDeadLetter": {
                "action": "send",
                "channel": {"$ref": "#/channels/deadLetters"},
                "summary": "order-consumer sets aside a record it cannot apply.",
            },
            "publishOrderEvent": {
                "action": "send",
                "channel": {"$ref": "#/channels/orders"},
                "summary": "The relay publishes each order change, in order per intent.",
            },
        },
        "components": {
            "schemas": payload_schemas(),
            "messages": {
                "stripeEvent": {
                    "name": "stripeEvent",
                    "title": "A Stripe event, the bytes Stripe sent",
                    "headers": EVENT_HEADERS,
                    "payload": _schema_ref(StripeEvent),
                    "bindings": {"kafka": {"key": intent_key}},
                },
                "deadLetter": {
                    "name": "deadLetter",
                    "title": "A record the consumer could not apply",
                    "headers": DEAD_LETTER_HEADERS,
                    "payload": {"description": "The original record's value, unchanged."},
                    "bindings": {"kafka": {"key": {"description": "The original record's key."}}},
                },
                "orderEvent": {
                    "name": "orderEvent",
                    "title": "A change of one order",
                    "headers": ORDER_HEADERS,
                    "payload": _schema_ref(OrderEvent),
                    "bindings": {
                        "kafka": {
                            "key": {
                                "type": "string",
                                "description": "The order's "
                                "payment intent id, UTF-8: one intent's changes stay in order.",
                            }
                        }
                    },
                },
            },
        },
    }


def render() -> str:
    """The document as the checked-in file holds it: sorted keys, two-space indent."""
    return json.dumps(document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()

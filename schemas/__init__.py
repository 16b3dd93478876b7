"""Value types and the Kafka contract shared by the bridge and the consumer.

Nothing here imports from the rest of the repository.
"""

from schemas.contract import (
    DEFAULT_TOPIC,
    HEADER_ERROR,
    HEADER_ERROR_DETAIL,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_ORIGINAL_OFFSET,
    HEADER_ORIGINAL_PARTITION,
    HEADER_RECEIVED_AT,
    contract_headers,
    dlq_topic,
    encode_key,
    payment_intent_key,
)
from schemas.stripe import (
    AUTHORIZATION_EVENTS,
    Charge,
    EventData,
    OtherObject,
    PaymentIntent,
    StripeEvent,
)

__all__ = [
    "AUTHORIZATION_EVENTS",
    "DEFAULT_TOPIC",
    "HEADER_ERROR",
    "HEADER_ERROR_DETAIL",
    "HEADER_EVENT_ID",
    "HEADER_EVENT_TYPE",
    "HEADER_ORIGINAL_OFFSET",
    "HEADER_ORIGINAL_PARTITION",
    "HEADER_RECEIVED_AT",
    "Charge",
    "EventData",
    "OtherObject",
    "PaymentIntent",
    "StripeEvent",
    "contract_headers",
    "dlq_topic",
    "encode_key",
    "payment_intent_key",
]

"""Value types and the Kafka contract shared by the bridge and the consumer.

Nothing here imports from the rest of the repository.
"""

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
    charge_key,
    contract_headers,
    dlq_topic,
    encode_key,
    payment_intent_key,
)
from intentflow.schemas.orders import (
    DEFAULT_ORDERS_TOPIC,
    HEADER_ORDER_EVENT_TYPE,
    HEADER_OUTBOX_ID,
    ORDER_EVENT_SCHEMA_VERSION,
    ORDER_EVENT_TYPES,
    OrderEvent,
    OrderSnapshot,
)
from intentflow.schemas.stripe import (
    Charge,
    Dispute,
    EventData,
    OtherObject,
    PaymentIntent,
    Refund,
    StripeEvent,
)

__all__ = [
    "DEFAULT_ORDERS_TOPIC",
    "DEFAULT_TOPIC",
    "HEADER_ERROR",
    "HEADER_ERROR_DETAIL",
    "HEADER_EVENT_ID",
    "HEADER_EVENT_TYPE",
    "HEADER_ORDER_EVENT_TYPE",
    "HEADER_ORIGINAL_OFFSET",
    "HEADER_ORIGINAL_PARTITION",
    "HEADER_OUTBOX_ID",
    "HEADER_RECEIVED_AT",
    "HEADER_REPLAYED_FROM",
    "ORDER_EVENT_SCHEMA_VERSION",
    "ORDER_EVENT_TYPES",
    "Charge",
    "Dispute",
    "EventData",
    "OrderEvent",
    "OrderSnapshot",
    "OtherObject",
    "PaymentIntent",
    "Refund",
    "StripeEvent",
    "charge_key",
    "contract_headers",
    "dlq_topic",
    "encode_key",
    "payment_intent_key",
]

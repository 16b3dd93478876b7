"""Publishing order events from the outbox to `orders.events` (schemas/orders.py).

Keyed by payment intent id, so one intent's events share a partition and keep
their order; each carries its outbox id in the `outbox-id` header. The relay
publishes a claimed batch (`OrderEvents.publish`) and then marks the rows the
broker acknowledged (`publish_marks`): a relay that dies in between publishes
them again, with the same outbox ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog
from aiokafka.errors import KafkaError

from intentflow.consumer import errors
from intentflow.consumer.claims import Claimed, Mark
from intentflow.consumer.kafka_producer import Producer
from intentflow.schemas import HEADER_ORDER_EVENT_TYPE, HEADER_OUTBOX_ID, encode_key
from intentflow.schemas.kafka import KafkaConnection

log = structlog.get_logger("relay")


class OrderEvents(Producer):
    """An acks=all producer for the order events topic (`start()`/`stop()`)."""

    def __init__(
        self,
        connection: KafkaConnection,
        topic: str,
        *,
        enable_idempotence: bool,
        max_request_bytes: int = 1024 * 1024,
    ) -> None:
        super().__init__(
            connection,
            topic,
            enable_idempotence=enable_idempotence,
            max_request_bytes=max_request_bytes,
            linger_ms=5,
        )

    async def publish(self, rows: Sequence[Claimed]) -> list[KafkaError | None]:
        """Send every row, in order; return for each None (acknowledged) or why not."""
        return await self.send_all(
            [
                (
                    row.payload.encode(),
                    encode_key(row.payment_intent_id),
                    [
                        (HEADER_OUTBOX_ID, str(row.id).encode()),
                        (HEADER_ORDER_EVENT_TYPE, row.name.encode()),
                    ],
                )
                for row in rows
            ]
        )


def publish_marks(
    rows: Sequence[Claimed],
    results: Sequence[KafkaError | None],
    backoff_s: Callable[[int], float],
) -> list[Mark]:
    """Done for what the broker acknowledged, up to an intent's first failure; the rest later.

    An intent's events after its first failure stay pending even when they were
    acknowledged: they are published again after it, so a reader that keeps the
    highest outbox id per order never ends on an older snapshot. (A claim holds
    one event per intent, so this is a second line of defence.) An event the
    broker refuses for good is `rejected`: its intent's later events, whole
    snapshots, must not wait behind it forever.
    """
    marks: list[Mark] = []
    failed_intents: set[str] = set()
    for row, error in zip(rows, results, strict=True):
        if error is None and row.payment_intent_id not in failed_intents:
            marks.append(Mark(row.id, "published"))
            continue
        if error is None:
            continue  # published, but after an earlier failure of its intent: again later
        failed_intents.add(row.payment_intent_id)
        why = errors.describe(error)
        if errors.classify(error) is errors.Fault.FATAL:  # too large, not authorized
            log.error(
                "order_event_refused",
                outbox_id=row.id,
                error=why,
                hint="fix the cause (KAFKA_MAX_REQUEST_BYTES and the topic's "
                "max.message.bytes, or the ACLs), then `order-consumer outbox retry ID`",
            )
            marks.append(Mark(row.id, "rejected", type(error).__name__, why))
            continue
        retry_in_s = backoff_s(row.attempts)
        log.warning(
            "order_event_not_published",
            outbox_id=row.id,
            error=why,
            retry_in_s=round(retry_in_s, 2),
        )
        marks.append(Mark(row.id, "retry", type(error).__name__, why, retry_in_s))
    return marks

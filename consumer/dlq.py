"""The dead-letter topic: poison goes there with its reason, then its offset may be committed.

Same key and value as the original message, its headers kept, plus `error`,
`error-detail`, `original-partition` and `original-offset` (docs/design.md, "Contracts
other people rely on").

Delivery is at least once. A send that fails is retried for the records the
broker has not acknowledged only, so a retry does not write the acknowledged
ones again; a copy can still appear when an acknowledgement is lost, or when
the consumer stops between the dead-letter send and its offset commit. A reader
deduplicates on (`original-partition`, `original-offset`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiokafka.errors import KafkaError

from intentflow.consumer.kafka_producer import Producer
from intentflow.schemas import (
    HEADER_ERROR,
    HEADER_ERROR_DETAIL,
    HEADER_ORIGINAL_OFFSET,
    HEADER_ORIGINAL_PARTITION,
    dlq_topic,
)
from intentflow.schemas.kafka import KafkaConnection


@dataclass(frozen=True, slots=True)
class Poison:
    """A record that cannot be applied, with the reason it goes to the dead-letter topic."""

    record: Any  # aiokafka ConsumerRecord
    error: str
    detail: str


class DeadLetterRefused(Exception):
    """The broker or the producer refused a dead letter for good (too large, not authorized).

    The record is neither applied nor skipped: the process stops, and its offset
    stays uncommitted until an operator fixes the cause.
    """

    def __init__(self, poison: Poison, error: KafkaError) -> None:
        record = poison.record
        super().__init__(
            f"the dead-letter topic refused the record at partition {record.partition} "
            f"offset {record.offset} ({type(error).__name__}: {error}); fix the cause "
            "(KAFKA_MAX_REQUEST_BYTES and the topic's max.message.bytes for a large record, "
            "the ACLs for an authorization error) and restart: nothing was skipped"
        )


def dead_letter_headers(poison: Poison) -> list[tuple[str, bytes]]:
    record = poison.record
    return [
        *(record.headers or ()),
        (HEADER_ERROR, poison.error.encode()),
        (HEADER_ERROR_DETAIL, poison.detail.encode("utf-8", "replace")),
        (HEADER_ORIGINAL_PARTITION, str(record.partition).encode()),
        (HEADER_ORIGINAL_OFFSET, str(record.offset).encode()),
    ]


class DeadLetters(Producer):
    """An acks=all producer for `<topic>.dlq` (`start()`/`stop()`)."""

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
            dlq_topic(topic),
            enable_idempotence=enable_idempotence,
            max_request_bytes=max_request_bytes,
        )

    async def send(self, poison: list[Poison]) -> list[tuple[Poison, KafkaError]]:
        """Publish every poisoned record; return those the broker did not acknowledge, with why."""
        results = await self.send_all(
            [(p.record.value, p.record.key, dead_letter_headers(p)) for p in poison]
        )
        return [(p, error) for p, error in zip(poison, results, strict=True) if error is not None]

"""The dead-letter topic: poison goes there with its reason, then its offset may be committed.

Same key and value as the original message, its headers kept, plus `error`,
`error-detail`, `original-partition` and `original-offset` (DESIGN.md, "Contracts").
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer

from schemas import (
    HEADER_ERROR,
    HEADER_ERROR_DETAIL,
    HEADER_ORIGINAL_OFFSET,
    HEADER_ORIGINAL_PARTITION,
    dlq_topic,
)


@dataclass(frozen=True, slots=True)
class Poison:
    """A record that cannot be applied, with the reason it goes to the dead-letter topic."""

    record: Any  # aiokafka ConsumerRecord
    error: str
    detail: str


def dead_letter_headers(poison: Poison) -> list[tuple[str, bytes]]:
    record = poison.record
    return [
        *(record.headers or ()),
        (HEADER_ERROR, poison.error.encode()),
        (HEADER_ERROR_DETAIL, poison.detail.encode("utf-8", "replace")),
        (HEADER_ORIGINAL_PARTITION, str(record.partition).encode()),
        (HEADER_ORIGINAL_OFFSET, str(record.offset).encode()),
    ]


class DeadLetters:
    """An acks=all producer for `<topic>.dlq` (`start()`/`stop()`)."""

    def __init__(self, bootstrap_servers: str, topic: str, *, enable_idempotence: bool) -> None:
        self.topic = dlq_topic(topic)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers, acks="all", enable_idempotence=enable_idempotence
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(self, poison: list[Poison]) -> None:
        """Publish every poisoned record and wait until the broker has them all."""
        acks = [
            await self._producer.send(
                self.topic, p.record.value, key=p.record.key, headers=dead_letter_headers(p)
            )
            for p in poison
        ]
        await asyncio.gather(*acks)

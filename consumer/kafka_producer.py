"""The consumer's own Kafka producer: acks=all, sends a list of records and says which landed.

Used for dead letters (consumer/dlq.py) and order events
(consumer/order_events.py). `send_all` sends every record before awaiting any
acknowledgement, so a list goes out in as few requests as the producer can
make, in order per partition; it returns, per record, None (acknowledged) or
the Kafka error that refused it, before sending (too large, no metadata) or
after.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from intentflow.schemas.kafka import KafkaConnection, client_kwargs

# (value, key, headers)
Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


class Producer:
    """An acks=all AIOKafkaProducer for one topic (`start()`/`stop()`)."""

    def __init__(
        self,
        connection: KafkaConnection,
        topic: str,
        *,
        enable_idempotence: bool,
        max_request_bytes: int = 1024 * 1024,
        linger_ms: int = 0,
    ) -> None:
        self.topic = topic
        self._producer = AIOKafkaProducer(
            **client_kwargs(connection),
            acks="all",
            enable_idempotence=enable_idempotence,
            max_request_size=max_request_bytes,
            linger_ms=linger_ms,
        )

    async def start(self) -> None:
        try:
            await self._producer.start()
        except BaseException:
            await self._producer.stop()
            raise

    async def stop(self) -> None:
        await self._producer.stop()

    async def send_all(self, records: Sequence[Record]) -> list[KafkaError | None]:
        """Send every record, in order; return for each None (acknowledged) or why not."""
        sent: list[asyncio.Future[Any] | KafkaError] = []
        for value, key, headers in records:
            try:
                sent.append(await self._producer.send(self.topic, value, key=key, headers=headers))
            except KafkaError as exc:  # refused before sending: too large, no metadata
                sent.append(exc)
        results: list[KafkaError | None] = []
        for outcome in sent:
            if isinstance(outcome, KafkaError):
                results.append(outcome)
                continue
            try:
                await outcome
            except KafkaError as exc:
                results.append(exc)
            else:
                results.append(None)
        return results

"""Publishing order events from the outbox to `orders.events` (schemas/orders.py).

Keyed by payment intent id, so one intent's events share a partition and keep
their order; each carries its outbox id in the `outbox-id` header. The relay
publishes a claimed batch and then marks the rows the broker acknowledged: a
relay that dies in between publishes them again, with the same outbox ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from consumer.outbox import Claimed
from schemas import HEADER_ORDER_EVENT_TYPE, HEADER_OUTBOX_ID, encode_key


class OrderEvents:
    """An acks=all producer for the order events topic (`start()`/`stop()`)."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        *,
        enable_idempotence: bool,
        max_request_bytes: int = 1024 * 1024,
    ) -> None:
        self.topic = topic
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            acks="all",
            enable_idempotence=enable_idempotence,
            max_request_size=max_request_bytes,
            linger_ms=5,
        )

    async def start(self) -> None:
        try:
            await self._producer.start()
        except BaseException:
            await self._producer.stop()
            raise

    async def stop(self) -> None:
        await self._producer.stop()

    async def publish(self, rows: Sequence[Claimed]) -> list[KafkaError | None]:
        """Send every row, in order; return for each None (acknowledged) or why not."""
        sent: list[asyncio.Future[Any] | KafkaError] = []
        for row in rows:
            try:
                ack = await self._producer.send(
                    self.topic,
                    row.payload.encode(),
                    key=encode_key(row.payment_intent_id),
                    headers=[
                        (HEADER_OUTBOX_ID, str(row.id).encode()),
                        (HEADER_ORDER_EVENT_TYPE, row.name.encode()),
                    ],
                )
            except KafkaError as exc:  # refused before sending: too large, no metadata
                sent.append(exc)
            else:
                sent.append(ack)
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

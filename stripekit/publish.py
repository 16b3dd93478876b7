"""Publish Stripe events straight to Kafka, as the webhook bridge would.

Value = the event's JSON bytes, key = the one the bridge gives it (`schemas.route`:
its payment intent id, else its charge's or its Checkout Session's id), the contract
headers, acks=all. For tests, the demo and benchmarks that skip the bridge.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaProducer

from intentflow.schemas import contract_headers, encode_key, route
from intentflow.stripekit import events


async def publish(
    bootstrap_servers: str,
    topic: str,
    payloads: Iterable[dict[str, Any] | bytes],
    *,
    enable_idempotence: bool,
    partition: int | None = None,
    key: bytes | None = None,
) -> int:
    """Publish every payload and wait for the broker's acks; return how many were sent.

    A dict is a Stripe event and gets its intent key and the contract headers;
    bytes are sent as they are (poison, for tests), with `key`.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        acks="all",
        enable_idempotence=enable_idempotence,
        linger_ms=5,
        max_batch_size=256 * 1024,
    )
    await producer.start()
    try:
        futures = []
        received_at_ms = int(time.time() * 1000)
        for payload in payloads:
            if isinstance(payload, bytes):
                value, headers, msg_key = payload, [], key
            else:
                value = events.encode(payload)
                headers = contract_headers(payload["id"], payload["type"], received_at_ms)
                found = route(payload)
                msg_key = key if key is not None else (encode_key(found[0]) if found else None)
            futures.append(
                await producer.send(topic, value, key=msg_key, headers=headers, partition=partition)
            )
        await asyncio.gather(*futures)
        return len(futures)
    finally:
        await producer.stop()

"""Helpers for the bridge tests: run the app in-process, sign, and read the topic back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from loadtest.signing import stripe_signature
from producer.app import WEBHOOK_PATH, create_app
from producer.settings import BridgeSettings

SECRET = "whsec_test_current"


def bridge_settings(
    bootstrap: str, topic: str, idempotence: bool, **overrides: Any
) -> BridgeSettings:
    values: dict[str, Any] = {
        "stripe_webhook_secret": SECRET,
        "kafka_bootstrap_servers": bootstrap,
        "kafka_topic": topic,
        "kafka_enable_idempotence": idempotence,
        "kafka_publish_timeout_s": 2.0,
        **overrides,
    }
    return BridgeSettings(**values)


async def wait_ready(client: httpx.AsyncClient, timeout_s: float = 10.0) -> None:
    """Until /readyz answers 200, as a load balancer would before sending traffic."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (await client.get("/readyz")).status_code != 200:
        assert asyncio.get_running_loop().time() < deadline, "the bridge did not become ready"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_bridge(
    settings: BridgeSettings, ready: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan (producer start/stop) run, behind an in-process client.

    The producer connects in the background; with `ready` this waits for it.
    """
    app = create_app(settings)
    async with (
        app.lifespan(),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bridge", timeout=10
        ) as client,
    ):
        if ready:
            await wait_ready(client)
        yield client


async def post_webhook(
    client: httpx.AsyncClient, body: bytes, secret: str = SECRET, **headers: str
) -> httpx.Response:
    sent = {"stripe-signature": stripe_signature(body, secret), "content-type": "application/json"}
    sent.update(headers)
    return await client.post(WEBHOOK_PATH, content=body, headers=sent)


async def topic_size(bootstrap: str, topic: str) -> int:
    """How many records the topic holds (sum of end offsets)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        await consumer._client._wait_on_metadata(topic)
        parts = consumer.partitions_for_topic(topic) or set()
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in parts])
        return sum(ends.values())
    finally:
        await consumer.stop()

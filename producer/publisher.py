"""Publishing verified events to the events topic, acknowledged by the broker.

One long-lived aiokafka producer with `acks="all"`. The partition is the Java
client's murmur2 (`(murmur2(key) & 0x7fffffff) % partitions`, what aiokafka's
default partitioner computes too), so every Kafka client with a murmur2
partitioner puts an intent's events in the same partition. The bridge computes
it (`schemas.partitioner`) and passes it explicitly: cheaper per message.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from producer.settings import BridgeSettings
from schemas.partitioner import partition

log = structlog.get_logger("bridge")


class PublishError(Exception):
    """The broker did not acknowledge the event; the sender should try again later."""

    retriable = True


class BrokerUnavailable(PublishError):
    """The broker could not be reached, or did not answer within the publish timeout."""


class _AckTimeout(Exception):
    pass


def _expire(ack: asyncio.Future[Any]) -> None:
    # aiokafka skips message futures that are already done when the batch completes.
    if not ack.done():
        ack.set_exception(_AckTimeout())


@dataclass(frozen=True, slots=True)
class Published:
    partition: int
    offset: int


class Publisher:
    """Sends one event at a time and returns once the broker has it (`start()`/`stop()`)."""

    def __init__(self, settings: BridgeSettings) -> None:
        self._settings = settings
        self._topic = settings.kafka_topic
        self._timeout_s = settings.kafka_publish_timeout_s
        self._producer: AIOKafkaProducer | None = None

    @property
    def topic(self) -> str:
        return self._topic

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def start(self) -> None:
        """Connect to the broker now; BrokerUnavailable if it does not answer."""
        settings = self._settings
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            acks="all",
            enable_idempotence=settings.kafka_enable_idempotence,
            linger_ms=settings.kafka_linger_ms,
            max_batch_size=settings.kafka_max_batch_bytes,
            # A batch the broker has not taken within the publish timeout fails
            # instead of lingering: the request was answered 503 and Stripe will
            # send it again, so a late copy would only be a duplicate.
            request_timeout_ms=int(self._timeout_s * 1000),
        )
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise BrokerUnavailable(f"cannot reach {settings.kafka_bootstrap_servers}") from exc
        except asyncio.CancelledError:
            await producer.stop()
            raise
        self._producer = producer

    async def keep_connecting(self, backoff_s: float = 0.5, max_backoff_s: float = 5.0) -> None:
        """`start()` until the broker answers, backing off between attempts; cancel to give up.

        The bridge serves meanwhile: webhooks get 503 (Stripe retries) and
        /readyz says not ready, instead of the process exiting at boot and its
        pod crash-looping while the broker comes up.
        """
        delay_s = backoff_s
        while True:
            try:
                await self.start()
            except BrokerUnavailable as exc:
                log.warning("broker unreachable, retrying", error=str(exc), retry_in_s=delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, max_backoff_s)
            else:
                return

    async def stop(self) -> None:
        """Flush what is buffered and close the connections."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def publish(
        self, key: bytes, value: bytes, headers: list[tuple[str, bytes]]
    ) -> Published:
        """Send one message and wait for the broker's acknowledgement."""
        producer = self._producer
        if producer is None:
            raise BrokerUnavailable("producer not started")
        loop = asyncio.get_running_loop()
        # aiokafka bounds each step by its request timeout (waiting for metadata
        # or buffer space, then the batch's delivery). The deadline is a backstop
        # over the whole, with a margin so that aiokafka's own timeout fires
        # first and expires the batch rather than leaving it in the accumulator.
        # A timer on the ack future rather than asyncio.timeout(): the latter
        # cost a few percent of the CPU per webhook.
        deadline = loop.time() + self._timeout_s + 1.0
        partitions = producer.client.cluster.partitions_for_topic(self._topic)
        # Unknown metadata (first send, or a lost topic): aiokafka waits for it and partitions.
        chosen = partition(key, len(partitions)) if partitions else None
        try:
            ack = await producer.send(
                self._topic, value=value, key=key, partition=chosen, headers=headers
            )
            timer = loop.call_at(deadline, _expire, ack)
            try:
                metadata = await ack
            finally:
                timer.cancel()
        except _AckTimeout as exc:
            raise BrokerUnavailable(f"no acknowledgement within {self._timeout_s}s") from exc
        except KafkaError as exc:
            raise BrokerUnavailable(type(exc).__name__) from exc
        return Published(partition=metadata.partition, offset=metadata.offset)

    async def reachable(self, timeout_s: float = 1.0) -> bool:
        """Whether the broker answers a metadata request now."""
        if self._producer is None:
            return False
        try:
            async with asyncio.timeout(timeout_s):
                return bool(await self._producer.client.force_metadata_update())
        except (TimeoutError, KafkaError):
            return False

"""Publishing verified events to the events topic, acknowledged by the broker.

One long-lived aiokafka producer with `acks="all"`. The partition is the Java
client's murmur2 (`(murmur2(key) & 0x7fffffff) % partitions`, what aiokafka's
default partitioner computes too), so every Kafka client with a murmur2
partitioner puts an intent's events in the same partition. The bridge computes
it (`schemas.partitioner`) and passes it explicitly: cheaper per message.

Failures come in two kinds, told apart by aiokafka's exception class, never by
its message: `BrokerUnavailable` (away, slow, no leader; time fixes it, the
request is answered 503) and `BrokerRefused` (the event or the configuration is
refused for good: too large, not authorized, an invalid topic; an operator must
act, the request is answered 500 and Stripe keeps retrying meanwhile).

Late copies. With `enable_idempotence` (the default for real Kafka) aiokafka
never expires a batch it has begun sending: a retriable error re-enqueues it
until the broker takes it, however long (`Sender._can_retry` ignores the batch's
age when a transaction manager exists, and an idempotent producer has one). The
publish timeout therefore bounds the answer (503), not the record: a batch
answered 503 can still land after the broker returns, beside the copy that
Stripe's retry publishes. Dropping it is not possible without breaking the
producer's sequence numbers. Both copies carry the same bytes and the same
`stripe-event-id`; the consumer's inbox (keyed by event id) applies one. Without
idempotence a request already on the wire when the timeout fires can land too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    InvalidRequiredAcksError,
    InvalidTimestampError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnsupportedCodecError,
    UnsupportedForMessageFormatError,
    UnsupportedVersionError,
)

from intentflow.producer.settings import BridgeSettings
from intentflow.schemas.kafka import client_kwargs
from intentflow.schemas.partitioner import partition

log = structlog.get_logger("bridge")


class PublishError(Exception):
    """The broker did not acknowledge the event; the sender should try again later."""

    retriable = True


class BrokerUnavailable(PublishError):
    """The broker could not be reached, or did not answer within the publish timeout."""


class BrokerRefused(PublishError):
    """The broker, or the producer before sending, refused the event for good.

    Retrying the same event cannot succeed until an operator changes something
    (the topic's max.message.bytes or KAFKA_MAX_REQUEST_BYTES, the ACLs, the
    topic name); `kafka_error` names aiokafka's class for the log line.
    """

    retriable = False

    def __init__(self, error: KafkaError) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.kafka_error = type(error).__name__


# Refusals that no retry fixes: each is not `retriable` in aiokafka. Not every
# non-retriable class is here: aiokafka marks timeouts and a closed producer not
# retriable too, and those are the environment's (503).
_REFUSALS: tuple[type[KafkaError], ...] = (
    MessageSizeTooLargeError,  # over max_request_size (client) or max.message.bytes (broker)
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    InvalidTopicError,
    InvalidRequiredAcksError,
    InvalidTimestampError,
    PolicyViolationError,
    UnsupportedVersionError,
    UnsupportedForMessageFormatError,
    UnsupportedCodecError,
)


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
            **client_kwargs(settings),
            acks="all",
            enable_idempotence=settings.kafka_enable_idempotence,
            linger_ms=settings.kafka_linger_ms,
            # A batch is what the broker checks against max.message.bytes, and
            # aiokafka does not split one it refuses: no batch larger than the
            # largest request, or two large events together could be refused
            # although each alone fits.
            max_batch_size=min(settings.kafka_max_batch_bytes, settings.kafka_max_request_bytes),
            max_request_size=settings.kafka_max_request_bytes,
            # Without idempotence, a batch the broker has not taken within the
            # publish timeout expires instead of lingering (with it, see the
            # module docstring: it is retried until it lands).
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
            except Exception as exc:
                # Not the broker being away: a bug, or a setting aiokafka refuses.
                # Said once, loudly: the bridge answers 503 until it is fixed.
                log.error("producer cannot start", error=f"{type(exc).__name__}: {exc}")
                raise
            else:
                return

    async def stop(self, timeout_s: float | None = None) -> None:
        """Flush what is buffered and close the connections, for at most `timeout_s`.

        aiokafka's `stop()` waits for every buffered batch, which with an
        unreachable broker (and idempotence) is forever. What is dropped when
        the time is up was answered 503 already: Stripe sends it again.
        """
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await producer.stop()
        except TimeoutError:
            log.warning(
                "producer stop abandoned",
                timeout_s=timeout_s,
                reason="batches still unacknowledged are dropped; their requests got 503",
            )

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
        except _REFUSALS as exc:
            raise BrokerRefused(exc) from exc
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

"""The one place that builds a worker's dependencies from the settings.

`bootstrap(settings)` returns a `Dependencies`: the start-up checks
(`consumer.preflight`), how to open the database pool and make the broker
consumer and the dead-letter producer (`consumer.connections`), and the
function that applies a batch in one transaction (`consumer.store.apply_batch`).
Nothing connects here: `Worker.start` runs the checks, then opens and starts the
clients, retrying what time can fix.

The clients are given as factories, not objects, because a client whose
`start()` failed cannot be started again (aiokafka closes it for good): each
attempt gets a fresh one. The Protocols below are the whole of what the worker
uses of each, so a test can hand it ten-line fakes of the same interfaces
(tests/unit/test_worker_fakes.py) while the real-service tests use these.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from intentflow.consumer.connections import (
    abandon_group,
    create_consumer,
    create_dead_letters,
    create_pool,
)
from intentflow.consumer.decode import Envelope
from intentflow.consumer.dlq import Poison
from intentflow.consumer.order_events import OrderEvents
from intentflow.consumer.policy import ShopPolicy
from intentflow.consumer.preflight import check_database, check_topics
from intentflow.consumer.relay import EventSink, Relay, stripe_wait_s
from intentflow.consumer.relay_metrics import RelayMetrics
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.store import BatchResult, apply_batch
from intentflow.consumer.stripe_actions import StripeActions
from intentflow.schemas import dlq_topic


class Pool(Protocol):
    """What the worker uses of an asyncpg pool."""

    def acquire(self, *, timeout: float | None = None) -> AbstractAsyncContextManager[Any]: ...
    async def expire_connections(self) -> None: ...
    async def close(self) -> None: ...
    def terminate(self) -> None: ...


class BrokerConsumer(Protocol):
    """What the worker uses of an AIOKafkaConsumer."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def subscribe(self, topics: list[str], *, listener: ConsumerRebalanceListener) -> None: ...
    def assignment(self) -> set[TopicPartition]: ...
    async def getmany(
        self, *, timeout_ms: int, max_records: int
    ) -> Mapping[TopicPartition, Sequence[Any]]: ...
    async def commit(self, offsets: dict[TopicPartition, int]) -> None: ...
    def pause(self, *partitions: TopicPartition) -> None: ...
    def resume(self, *partitions: TopicPartition) -> None: ...
    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    def highwater(self, partition: TopicPartition) -> int | None: ...
    async def position(self, partition: TopicPartition) -> int: ...
    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...
    async def committed(self, partition: TopicPartition) -> int | None: ...


class DeadLetterSink(Protocol):
    """What the worker uses of `consumer.dlq.DeadLetters`."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def send(self, poison: list[Poison]) -> list[tuple[Poison, KafkaError]]: ...


# The relay's connections: one per loop (order events, Stripe actions), and one for the
# scrapes and probes, which a claim waiting on Stripe would otherwise hold up.
RELAY_POOL_SIZE = 3

# `apply_batch(conn, envelopes)`: one transaction on a connection from the pool.
ApplyBatch = Callable[[Any, list[Envelope]], Awaitable[BatchResult]]
# A start-up check, named for the operator's one line (`until_ready`).
Check = tuple[str, Callable[[], Awaitable[None]]]


@dataclass(frozen=True, slots=True)
class Dependencies:
    """Everything a worker talks to, built by `bootstrap` or, in tests, by hand."""

    checks: Sequence[Check]  # run in order before anything else is opened
    open_pool: Callable[[], Awaitable[Pool]]
    new_consumer: Callable[[], BrokerConsumer]
    new_dead_letters: Callable[[], DeadLetterSink]
    apply_batch: ApplyBatch
    # Closes a consumer whose `stop()` ran out of time, without leaving its group.
    abandon_consumer: Callable[[BrokerConsumer], Awaitable[None]]


def bootstrap(settings: ConsumerSettings) -> Dependencies:
    """The real dependencies: PostgreSQL through asyncpg, the broker through aiokafka."""
    topics = [settings.kafka_topic, dlq_topic(settings.kafka_topic)]
    if settings.relay_enabled:
        topics.append(settings.orders_topic)
    policy = ShopPolicy.from_settings(settings)
    return Dependencies(
        checks=(
            ("database", functools.partial(check_database, settings)),
            ("topics", functools.partial(check_topics, settings, topics)),
        ),
        open_pool=functools.partial(create_pool, settings),
        new_consumer=functools.partial(create_consumer, settings),
        new_dead_letters=functools.partial(create_dead_letters, settings),
        apply_batch=functools.partial(apply_batch, policy=policy),
        abandon_consumer=abandon_group,
    )


def relay_checks(settings: ConsumerSettings) -> list[Check]:
    """What `order-consumer relay` checks before it starts: the database and the orders topic."""
    return [
        ("database", functools.partial(check_database, settings)),
        ("topics", functools.partial(check_topics, settings, [settings.orders_topic])),
    ]


def build_relay(
    settings: ConsumerSettings,
    new_events: Callable[[], EventSink] | None = None,
    metrics: RelayMetrics | None = None,
) -> Relay:
    """The outbox relay, with a pool of its own: one connection per loop, and one for the
    scrapes and probes that read the outbox. `new_events` replaces the order events
    producer (a test that kills the relay mid-publish); `metrics` puts its metrics in a
    registry already served (the worker's, under `run`)."""
    key = settings.stripe_api_key
    stripe = None
    if key is not None:
        stripe = StripeActions(
            key.get_secret_value(),
            api_base=settings.stripe_api_base,
            timeout_s=settings.stripe_timeout_s,
        )
    # A claim's transaction waits for its Stripe requests (a refund: a read of the
    # intent and of its refunds, the refund, and a read on a refusal; a cancel or
    # capture, two at most) or for the broker's acks: the session may be idle in it
    # that long. Ended sooner, Stripe would act, its answer be lost with the
    # session, and the next attempt would have to read before acting again.
    idle_in_transaction_ms = int(
        max(2 * settings.db_statement_timeout_ms, stripe_wait_s(settings) * 1000)
    )
    return Relay(
        settings,
        open_pool=functools.partial(
            create_pool, settings, RELAY_POOL_SIZE, idle_in_transaction_ms=idle_in_transaction_ms
        ),
        new_events=new_events or order_events(settings),
        stripe=stripe,
        metrics=metrics,
    )


def order_events(settings: ConsumerSettings) -> Callable[[], OrderEvents]:
    """How the relay makes its order events producer (a new one per start attempt)."""
    return functools.partial(
        OrderEvents,
        settings,
        settings.orders_topic,
        enable_idempotence=settings.kafka_enable_idempotence,
        max_request_bytes=settings.kafka_max_request_bytes,
    )

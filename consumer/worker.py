"""The consume loop: one member of the consumer group, and the owner of the failure policy.

poll a batch → decode → dead-letter poison → apply in one database transaction
→ commit the batch's offsets (invariant 5). Retriable database errors are
waited out with back-off while the partitions are paused (the member stays in
the group); a batch the database rejects for good is bisected until the one
event it rejects goes to the dead-letter topic with the database's reason.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from consumer.decode import Envelope, Poison, decode
from consumer.settings import ConsumerSettings
from consumer.store import BatchResult, apply_batch, is_retriable
from schemas import (
    HEADER_ERROR,
    HEADER_ERROR_DETAIL,
    HEADER_ORIGINAL_OFFSET,
    HEADER_ORIGINAL_PARTITION,
    dlq_topic,
)

log = structlog.get_logger("consumer")
T = TypeVar("T")


@dataclass
class RunStats:
    """What one worker did, summed over its run."""

    batches: int = 0
    events: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    retries: int = 0  # waits for the database or broker to come back
    outcomes: Counter[str] = field(default_factory=Counter)
    orders: Counter[str] = field(default_factory=Counter)
    batch_latencies_ms: list[float] = field(default_factory=list)

    def add(self, result: BatchResult) -> None:
        self.events += result.events
        self.duplicates += result.duplicates
        self.outcomes.update(result.outcomes)
        self.orders.update(result.orders)


class _DrainOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Let the batch in flight finish and commit before its partitions move."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        try:
            async with asyncio.timeout(self._worker.settings.rebalance_drain_timeout_s):
                async with self._worker.inflight:
                    pass
        except TimeoutError:
            # The batch goes on and may still commit to the database; its offset
            # commit will fail and the new owner replays it harmlessly.
            log.warning("rebalance_drain_timeout", revoked=len(revoked))
        log.info("partitions_revoked", partitions=sorted(tp.partition for tp in revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._worker.last_activity = time.monotonic()  # joining is not idleness
        log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))


class Worker:
    """A consumer-group member that applies Stripe events to PostgreSQL."""

    def __init__(self, settings: ConsumerSettings, *, exit_when_idle_s: float | None = None):
        self.settings = settings
        self.exit_when_idle_s = exit_when_idle_s
        self.stats = RunStats()
        self.inflight = asyncio.Lock()
        self.last_activity = time.monotonic()
        self._stopping = asyncio.Event()
        self._pool: asyncpg.Pool | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> Self:
        s = self.settings
        self._pool = await self._retry("database_connect", self._create_pool)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            acks="all",
            enable_idempotence=s.kafka_enable_idempotence,
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            group_id=s.kafka_group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=s.fetch_max_bytes,
            max_partition_fetch_bytes=s.max_partition_fetch_bytes,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
        )
        await self._consumer.start()
        self._consumer.subscribe([s.kafka_topic], listener=_DrainOnRevoke(self))
        log.info("consumer_started", topic=s.kafka_topic, group=s.kafka_group_id)
        return self

    async def _create_pool(self) -> asyncpg.Pool:
        s = self.settings
        return await asyncpg.create_pool(
            s.database_url,
            min_size=0,  # our retry loop, not the pool, owns reconnecting (and its logs)
            max_size=s.db_pool_size,
            server_settings={"statement_timeout": str(s.db_statement_timeout_ms)},
        )

    async def stop(self) -> None:
        """Leave the group and release connections; the last batch has committed by now."""
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
        if self._pool is not None:
            await self._pool.close()
        self._consumer = self._producer = self._pool = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def assignment(self) -> frozenset[TopicPartition]:
        """The partitions this member owns right now."""
        return frozenset(self._consumer.assignment()) if self._consumer is not None else frozenset()

    def request_stop(self) -> None:
        """Finish the batch in flight, commit it, then return from `run` (SIGTERM)."""
        self._stopping.set()

    # -- the loop ----------------------------------------------------------

    async def run(self) -> RunStats:
        assert self._consumer is not None
        self.last_activity = time.monotonic()
        while not self._stopping.is_set():
            fetched = await self._consumer.getmany(
                timeout_ms=self.settings.poll_timeout_ms,
                max_records=self.settings.batch_max_records,
            )
            records = [r for tp in sorted(fetched) for r in fetched[tp]]
            if not records:
                idle = time.monotonic() - self.last_activity
                if self.exit_when_idle_s is not None and idle >= self.exit_when_idle_s:
                    log.info("idle_exit", idle_s=round(idle, 1))
                    break
                continue
            self.last_activity = time.monotonic()
            async with self.inflight:
                await self.handle(records)
        return self.stats

    async def handle(self, records: list[Any]) -> None:
        """Apply one polled batch and commit its offsets."""
        assert self._consumer is not None
        started = time.perf_counter()
        assigned = self._consumer.assignment()
        records = [r for r in records if TopicPartition(r.topic, r.partition) in assigned]
        if not records:
            return
        envelopes: list[Envelope] = []
        poison: list[Poison] = []
        for record in records:
            decoded = decode(record)
            (poison if isinstance(decoded, Poison) else envelopes).append(decoded)  # type: ignore[arg-type]
        if poison:
            await self._dead_letter(poison)
        result = await self._apply(envelopes)
        await self.commit_offsets(records)
        duration_ms = (time.perf_counter() - started) * 1000
        self.stats.batches += 1
        self.stats.add(result)
        self.stats.batch_latencies_ms.append(duration_ms)
        log.info(
            "batch_applied",
            records=len(records),
            claimed=result.claimed,
            duplicates=result.duplicates,
            dead_lettered=len(poison),
            orders={str(k): v for k, v in result.orders.items()},
            duration_ms=round(duration_ms, 1),
        )

    async def _apply(self, envelopes: list[Envelope]) -> BatchResult:
        if not envelopes:
            return BatchResult()
        try:
            return await self._retry("database_unavailable", lambda: self._apply_once(envelopes))
        except asyncpg.PostgresError as exc:
            if len(envelopes) == 1:
                record = envelopes[0].record
                await self._dead_letter([Poison(record, "rejected_by_database", str(exc)[:500])])
                return BatchResult(events=1, claimed=1)
            log.warning("batch_rejected_bisecting", size=len(envelopes), error=str(exc)[:200])
            middle = len(envelopes) // 2
            first = await self._apply(envelopes[:middle])
            second = await self._apply(envelopes[middle:])
            return _merge(first, second)

    async def _apply_once(self, envelopes: list[Envelope]) -> BatchResult:
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            return await apply_batch(conn, envelopes)

    async def commit_offsets(self, records: Iterable[Any]) -> None:
        """Commit the offset after each partition's last record (after the database commit)."""
        assert self._consumer is not None
        offsets: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
        try:
            await self._retry("offset_commit_failed", lambda: self._consumer_commit(offsets))
        except CommitFailedError as exc:
            # The partitions moved during the batch; the new owner replays it, and
            # the inbox makes the replay harmless.
            log.warning("offset_commit_rejected", error=str(exc)[:200])

    async def _consumer_commit(self, offsets: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None
        await self._consumer.commit(offsets)

    async def _dead_letter(self, poison: list[Poison]) -> None:
        assert self._producer is not None
        producer = self._producer
        topic = dlq_topic(self.settings.kafka_topic)

        async def send_all() -> None:
            futures = []
            for p in poison:
                r = p.record
                headers = [
                    *(r.headers or ()),
                    (HEADER_ERROR, p.error.encode()),
                    (HEADER_ERROR_DETAIL, p.detail.encode("utf-8", "replace")),
                    (HEADER_ORIGINAL_PARTITION, str(r.partition).encode()),
                    (HEADER_ORIGINAL_OFFSET, str(r.offset).encode()),
                ]
                futures.append(await producer.send(topic, r.value, key=r.key, headers=headers))
            await asyncio.gather(*futures)

        await self._retry("dead_letter_failed", send_all)
        self.stats.dead_lettered += len(poison)
        for p in poison:
            log.warning(
                "dead_lettered",
                error=p.error,
                detail=p.detail,
                partition=p.record.partition,
                offset=p.record.offset,
            )

    async def _retry(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` until it succeeds or fails for good, backing off in between."""
        delay = self.settings.retry_initial_s
        while True:
            try:
                return await attempt()
            except Exception as exc:
                if not _retriable(exc):
                    raise
                log.warning(what, error=f"{type(exc).__name__}: {exc}"[:300], retry_in_s=delay)
                self.stats.retries += 1
            await self._keep_alive(delay)
            delay = min(delay * 2, self.settings.retry_max_s)

    async def _keep_alive(self, seconds: float) -> None:
        """Wait, still polling (with every partition paused) so the group keeps us."""
        consumer = self._consumer
        if consumer is None or not consumer.assignment():
            await asyncio.sleep(seconds)
            return
        paused = consumer.assignment()
        consumer.pause(*paused)
        try:
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0:
                await consumer.getmany(timeout_ms=max(1, int(min(left, 1.0) * 1000)))
        finally:
            consumer.resume(*(tp for tp in paused if tp in consumer.assignment()))


def _retriable(exc: BaseException) -> bool:
    if isinstance(exc, CommitFailedError):
        return False
    if isinstance(exc, KafkaError):
        return bool(exc.retriable) or isinstance(exc, asyncio.TimeoutError)
    return is_retriable(exc)


def _merge(a: BatchResult, b: BatchResult) -> BatchResult:
    return BatchResult(
        events=a.events + b.events,
        claimed=a.claimed + b.claimed,
        outcomes=a.outcomes + b.outcomes,
        orders=a.orders + b.orders,
    )

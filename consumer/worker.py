"""The consume loop: one member of the consumer group, and the owner of the failure policy.

poll a batch → decode → dead-letter poison → apply in one database transaction
→ commit the batch's offsets (invariant 5). The next batch is polled and
decoded while the previous one is in the database; batches are applied one at
a time, in poll order, so per-intent Kafka order holds.

Failures: retriable errors (database or broker away, a serialization failure,
a lost race) are waited out with back-off while every partition is paused, so
the member stays in the group; a batch the database rejects for good is
bisected until the one event it rejects goes to the dead-letter topic with the
database's reason. Anything else is a bug and stops the process.
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
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from consumer.deadletter import DeadLetters, Poison
from consumer.decode import Envelope, decode
from consumer.settings import ConsumerSettings
from consumer.store import BatchResult, apply_batch, is_retriable

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


@dataclass
class Batch:
    """One poll's records, decoded, and the rebalance epoch they were polled in."""

    records: list[Any]
    envelopes: list[Envelope]
    poison: list[Poison]
    epoch: int


class _DrainOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Let the batch in flight finish and commit before its partitions move."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        worker = self._worker
        try:
            async with asyncio.timeout(worker.settings.rebalance_drain_timeout_s):
                async with worker.inflight:
                    worker.epoch += 1
        except TimeoutError:
            # The batch goes on and may still commit to the database; its offset
            # commit will fail and the new owner replays it harmlessly.
            worker.epoch += 1
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
        self.inflight = asyncio.Lock()  # held while a batch is applied and committed
        self.epoch = 0  # bumped on every revocation; older batches are not applied
        self.last_activity = time.monotonic()
        self._stopping = asyncio.Event()
        self._poll_lock = asyncio.Lock()
        self._pool: asyncpg.Pool | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._dead_letters: DeadLetters | None = None

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> Self:
        s = self.settings
        self._pool = await self._retry("database_connect", self._create_pool)
        self._dead_letters = DeadLetters(
            s.kafka_bootstrap_servers, s.kafka_topic, enable_idempotence=s.kafka_enable_idempotence
        )
        await self._dead_letters.start()
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
        if self._dead_letters is not None:
            await self._dead_letters.stop()
        if self._pool is not None:
            await self._pool.close()
        self._consumer = self._dead_letters = self._pool = None

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
        """Finish the batches polled so far, commit them, then return from `run` (SIGTERM)."""
        self._stopping.set()

    # -- the loop ----------------------------------------------------------

    async def run(self) -> RunStats:
        in_flight: asyncio.Task[None] | None = None
        self.last_activity = time.monotonic()
        try:
            while not self._stopping.is_set():
                records = await self._poll(self.settings.poll_timeout_ms)
                if in_flight is not None and in_flight.done():
                    done, in_flight = in_flight, None
                    done.result()  # its failure stops the loop here
                if not records:
                    if in_flight is None and self._idle_long_enough():
                        break
                    continue
                self.last_activity = time.monotonic()
                batch = self._decode(records)  # while the previous batch is in the database
                if in_flight is not None:
                    done, in_flight = in_flight, None
                    await done
                in_flight = asyncio.create_task(self._apply_and_commit(batch))
        finally:
            if in_flight is not None:
                await in_flight
        return self.stats

    def _idle_long_enough(self) -> bool:
        idle = time.monotonic() - self.last_activity
        if self.exit_when_idle_s is not None and idle >= self.exit_when_idle_s:
            log.info("idle_exit", idle_s=round(idle, 1))
            return True
        return False

    async def _poll(self, timeout_ms: int, max_records: int | None = None) -> list[Any]:
        assert self._consumer is not None
        async with self._poll_lock:  # the loop and a back-off wait both poll
            fetched = await self._consumer.getmany(
                timeout_ms=timeout_ms, max_records=max_records or self.settings.batch_max_records
            )
        return [r for tp in sorted(fetched) for r in fetched[tp]]

    def _decode(self, records: list[Any]) -> Batch:
        batch = Batch(records, [], [], self.epoch)
        for record in records:
            decoded = decode(record)
            if isinstance(decoded, Poison):
                batch.poison.append(decoded)
            else:
                batch.envelopes.append(decoded)
        return batch

    async def _apply_and_commit(self, batch: Batch) -> None:
        async with self.inflight:
            if batch.epoch != self.epoch:
                # Polled before a rebalance: whoever owns these partitions now
                # reads them again from the committed offsets.
                log.info("batch_dropped_after_rebalance", records=len(batch.records))
                return
            started = time.perf_counter()
            if batch.poison:
                await self._dead_letter(batch.poison)
            result = await self._apply(batch.envelopes)
            await self.commit_offsets(batch.records)
            duration_ms = (time.perf_counter() - started) * 1000
        self.stats.batches += 1
        self.stats.add(result)
        self.stats.batch_latencies_ms.append(duration_ms)
        log.info(
            "batch_applied",
            records=len(batch.records),
            claimed=result.claimed,
            duplicates=result.duplicates,
            dead_lettered=len(batch.poison),
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
            return first.merged(second)

    async def _apply_once(self, envelopes: list[Envelope]) -> BatchResult:
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            return await apply_batch(conn, envelopes)

    async def commit_offsets(self, records: Iterable[Any]) -> None:
        """Commit the offset after each partition's last record (after the database commit)."""
        assert self._consumer is not None
        consumer = self._consumer
        offsets: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
        try:
            await self._retry("offset_commit_failed", lambda: consumer.commit(offsets))
        except CommitFailedError as exc:
            # The partitions moved during the batch; the new owner replays it, and
            # the inbox makes the replay harmless.
            log.warning("offset_commit_rejected", error=str(exc)[:200])

    async def _dead_letter(self, poison: list[Poison]) -> None:
        assert self._dead_letters is not None
        dead_letters = self._dead_letters
        await self._retry("dead_letter_failed", lambda: dead_letters.send(poison))
        self.stats.dead_lettered += len(poison)
        for p in poison:
            log.warning(
                "dead_lettered",
                error=p.error,
                detail=p.detail,
                partition=p.record.partition,
                offset=p.record.offset,
            )

    # -- waiting out failures ----------------------------------------------

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
        """Wait, still polling (every partition paused) so that the group keeps this member."""
        consumer = self._consumer
        if consumer is None or not consumer.assignment():
            await asyncio.sleep(seconds)
            return
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            paused = set(consumer.assignment())
            consumer.pause(*paused)
            try:
                records = await self._poll(max(1, int(min(left, 1.0) * 1000)))
            finally:
                consumer.resume(*(tp for tp in paused if tp in consumer.assignment()))
            # Partitions assigned during the wait were not paused: put back what
            # came from them, so that the loop reads it again.
            firsts: dict[TopicPartition, int] = {}
            for r in records:
                firsts.setdefault(TopicPartition(r.topic, r.partition), r.offset)
            for tp, offset in firsts.items():
                consumer.seek(tp, offset)


def _retriable(exc: BaseException) -> bool:
    if isinstance(exc, CommitFailedError):
        return False
    if isinstance(exc, KafkaError):
        return bool(exc.retriable)
    return is_retriable(exc)

"""The consume loop: one member of the consumer group, and the owner of the failure policy.

poll a batch → decode → dead-letter poison → apply in one database transaction
→ commit the batch's offsets (invariant 5). The next batch is polled and
decoded while the previous one is in the database; batches are applied one at
a time, in poll order, so per-intent Kafka order holds.

Failures, by whose fault they are (`consumer.errors`, invariant 7):
  - the event's data: the batch is bisected until the one event the database
    rejects goes to the dead-letter topic with the database's reason;
  - the environment: the batch is retried with back-off and jitter while every
    partition is paused, so the member stays in the group. A connection that
    reported read-only is discarded; a batch that keeps hitting the statement
    timeout is split in halves; a batch whose partitions were revoked while it
    waited is left to their new owner, uncommitted;
  - anything else (a bug, a broker refusal that retrying cannot fix) stops
    the process.

Stopping (`request_stop`, on SIGTERM or SIGINT): no new batch starts, the batch
in flight may commit until the shutdown deadline or is abandoned uncommitted
(the next owner replays it and the inbox absorbs whatever had committed), then
the member leaves the group; `run` and `stop` together take at most
SHUTDOWN_TIMEOUT_S, whatever the database and the broker are doing.

What the worker talks to (the pool, the broker consumer, the dead-letter
producer, the function that applies a batch) is built by `consumer.bootstrap`
and passed in, so this policy runs unchanged against fakes in unit tests.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError, KafkaTimeoutError

from intentflow.consumer import owed
from intentflow.consumer.backoff import StopRequested, delay_s, sleep_unless_stopped
from intentflow.consumer.bootstrap import (
    BrokerConsumer,
    DeadLetterSink,
    Dependencies,
    Pool,
    bootstrap,
)
from intentflow.consumer.database import within
from intentflow.consumer.decode import Envelope, decode
from intentflow.consumer.dlq import DeadLetterRefused, Poison
from intentflow.consumer.errors import (
    Fault,
    cause,
    classify,
    describe,
    is_read_only,
    is_statement_timeout,
)
from intentflow.consumer.errors import sqlstate as sqlstate_of
from intentflow.consumer.metrics import CONTENT_TYPE, ConsumerMetrics
from intentflow.consumer.preflight import until_ready
from intentflow.consumer.probes import OVERDUE_SLACK_S, STUCK_AFTER_S
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.store import BatchResult

log = structlog.get_logger("consumer")

# A batch that hits the statement timeout this many times in a row is split in
# halves: a smaller transaction holds fewer locks for less time.
SPLIT_AFTER_TIMEOUTS = 2
# How much longer than its own timeout a poll may take before it is cut short.
POLL_MARGIN_S = 1.0
# What a readiness probe waits for the database's answer.
READY_DATABASE_TIMEOUT_S = 2.0
# What a scrape waits for the broker's end and committed offsets.
LAG_READ_TIMEOUT_S = 2.0
OWED_READ_TIMEOUT_S = 2.0
# What one offset commit may take before it is retried as a broker failure.
COMMIT_TIMEOUT_S = 15.0


class Progressing(Protocol):
    """A loop beside the worker whose steps have deadlines (the relay, consumer/relay.py)."""

    def overdue(self, slack_s: float) -> str | None:
        """What step has run longer than its deadline plus `slack_s`, if one has."""


class Superseded(Exception):
    """The batch's partitions were revoked while it waited: their new owner replays it."""


@dataclass
class RunStats:
    """What one worker did, summed over its run."""

    batches: int = 0
    events: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    retries: int = 0  # waits for the database or broker to come back
    retries_by_cause: Counter[str] = field(default_factory=Counter)
    splits: int = 0  # batches split after repeated statement timeouts
    abandoned: int = 0  # batches left uncommitted (stop, rebalance) for the next owner
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
    """Let a transaction in flight commit, and its offsets with it, before its partitions move."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        worker = self._worker
        worker.in_group = False  # rebalancing is not idleness either
        # From now on a batch polled earlier is not started, and one that is
        # waiting out a failure gives up at once: only a running transaction is
        # worth waiting for, and not by a member that is stopping.
        worker.epoch += 1
        for tp in revoked:
            worker._committed.pop(tp, None)
        drained = asyncio.ensure_future(worker.inflight.acquire())
        try:
            await asyncio.wait(
                [drained, worker._stop_waiter()],
                timeout=worker.settings.rebalance_drain_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            if drained.done() and not drained.cancelled():
                worker.inflight.release()
            else:
                drained.cancel()
        if not drained.done() or drained.cancelled():
            # The batch goes on and may still commit to the database; its offsets
            # are then committed only for partitions this member still owns, and
            # the new owner of the others replays it harmlessly.
            why = "stopping" if worker._stopping.is_set() else "drain timeout"
            log.warning("rebalance_without_drain", reason=why, revoked=len(revoked))
        log.info("partitions_revoked", partitions=sorted(tp.partition for tp in revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._worker.last_activity = time.monotonic()  # joining is not idleness
        self._worker.in_group = True
        log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))


class Worker:
    """A consumer-group member that applies Stripe events to PostgreSQL.

    `deps` are what it talks to (`consumer.bootstrap`); by default the real ones.
    """

    def __init__(
        self,
        settings: ConsumerSettings,
        *,
        exit_when_idle_s: float | None = None,
        deps: Dependencies | None = None,
    ):
        self.settings = settings
        self.deps = deps if deps is not None else bootstrap(settings)
        self.exit_when_idle_s = exit_when_idle_s
        self.stats = RunStats()
        self.inflight = asyncio.Lock()  # held while a batch is applied and committed
        self.epoch = 0  # bumped on every revocation; older batches are not applied
        self.last_activity = time.monotonic()
        self.in_group = False  # between an assignment and the next revocation
        self.metrics = ConsumerMetrics()
        self.last_progress: float | None = None  # monotonic: the latest poll or transaction
        self.waiting_out: str | None = None  # the failure a batch is waiting out, if any
        self.beside: list[Progressing] = []  # loops whose stalls the probes report too
        self._attempt_started: float | None = None  # monotonic: the transaction running now
        self._stopping = asyncio.Event()
        self._stop_deadline: float | None = None  # time.monotonic()
        self._poll_lock = asyncio.Lock()
        self._in_flight: asyncio.Task[None] | None = None
        self._stop_future: asyncio.Future[Any] | None = None
        self._pool: Pool | None = None
        self._consumer: BrokerConsumer | None = None
        self._dead_letters: DeadLetterSink | None = None
        # The group's committed offset of each owned partition, as this member last knew it.
        self._committed: dict[TopicPartition, int | None] = {}

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> Self:
        """Check the database, schema, broker and topics (consumer.preflight), then join."""
        s = self.settings
        deadline = asyncio.get_running_loop().time() + s.startup_timeout_s
        ready = functools.partial(
            until_ready, settings=s, stopping=self._stopping, deadline=deadline
        )
        try:
            for what, check in self.deps.checks:
                await ready(what, check)
            self._pool = await self.deps.open_pool()  # connects on demand
            self._dead_letters = await ready("broker", self._start_dead_letters)
            self._consumer = consumer = await ready("broker", self._start_consumer)
        except BaseException:
            await self.stop()
            raise
        consumer.subscribe([s.kafka_topic], listener=_DrainOnRevoke(self))
        log.info("consumer_started", topic=s.kafka_topic, group=s.kafka_group_id)
        if s.rebalance_drain_timeout_s <= s.statement_timeout_s:
            log.warning(
                "drain_shorter_than_statement_timeout",
                hint="a slow but healthy batch will be replayed by the next owner after a "
                "rebalance: make REBALANCE_DRAIN_TIMEOUT_S longer than DB_STATEMENT_TIMEOUT_MS",
            )
        return self

    async def _start_dead_letters(self) -> DeadLetterSink:
        dead_letters = self.deps.new_dead_letters()
        await dead_letters.start()
        return dead_letters

    async def _start_consumer(self) -> BrokerConsumer:
        consumer = self.deps.new_consumer()
        try:
            await consumer.start()
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    async def stop(self) -> None:
        """Leave the group and release connections, within the shutdown deadline."""
        self.request_stop()  # a `run` still going returns
        consumer, dead_letters, pool = self._consumer, self._dead_letters, self._pool
        self._consumer = self._dead_letters = self._pool = None
        if consumer is not None and not await self._within_deadline("leave_group", consumer.stop()):
            # Leaving waits for a rebalance in progress to finish, which other
            # members may hold up: close the connections without it.
            await self._within_deadline(
                "close_broker_connections", self.deps.abandon_consumer(consumer)
            )
        if dead_letters is not None:
            await self._within_deadline("stop_dead_letter_producer", dead_letters.stop())
        if pool is not None and not await self._within_deadline("close_pool", pool.close()):
            pool.terminate()

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
        """Return from `start` or `run` soon, and from `stop` by the deadline (SIGTERM)."""
        self._start_stop_clock()
        self._stopping.set()

    def _start_stop_clock(self) -> None:
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self.settings.shutdown_timeout_s

    def _time_left_s(self) -> float:
        assert self._stop_deadline is not None
        return self._stop_deadline - time.monotonic()

    def _leave_reserve_s(self) -> float:
        """What the deadline keeps back for leaving the group and closing connections."""
        return min(5.0, self.settings.shutdown_timeout_s / 5)

    async def _within_deadline(self, what: str, step: Awaitable[None]) -> bool:
        try:
            async with asyncio.timeout(max(self._time_left_s(), 0.5)):
                await step
            return True
        except TimeoutError:
            log.warning("shutdown_step_abandoned", step=what, reason="shutdown deadline")
            return False

    # -- what the probes read (consumer.probes) -----------------------------

    @property
    def batch_deadline_s(self) -> float:
        """How long one transaction may take, answered or not, before its connection is ended.

        The server's statement timeout ends a slow statement; this ends a connection
        whose packets are dropped, which gives no error and which the server's timeout
        cannot reach: twice the statement timeout (a batch runs several statements)
        plus the time to connect.
        """
        s = self.settings
        return 2 * s.statement_timeout_s + s.db_connect_timeout_s

    def alive(self) -> tuple[bool, str]:
        """Alive while starting, stopping, or polling within its deadlines (long past: stuck)."""
        if self._stopping.is_set():
            return True, "stopping"
        if self.last_progress is None:
            return True, "starting"
        # The loop polls every POLL_TIMEOUT_MS, and while a batch waits out a
        # failure; the longest it waits without polling is one batch's deadline.
        limit_s = self.batch_deadline_s + STUCK_AFTER_S
        quiet_s = time.monotonic() - self.last_progress
        if quiet_s > limit_s:
            return False, f"stalled: the loop has not polled for {quiet_s:.0f} s"
        if (stuck := self._overdue(STUCK_AFTER_S)) is not None:
            return False, f"stuck: {stuck}"
        return True, "alive"

    def _overdue(self, slack_s: float) -> str | None:
        """A transaction, or a step beside the loop, still running `slack_s` past its deadline.

        Its deadline ends its connection (consumer/database.py), which ends the step;
        one that goes on anyway is reported, not restarted, until long past it.
        """
        started = self._attempt_started
        if started is not None:
            running_s = time.monotonic() - started
            if running_s > self.batch_deadline_s + slack_s:
                return (
                    f"a batch has made no progress for {running_s:.0f} s "
                    f"(its deadline is {self.batch_deadline_s:g} s)"
                )
        for other in self.beside:
            if (late := other.overdue(slack_s)) is not None:
                return late
        return None

    async def ready(self) -> tuple[bool, str]:
        """Ready once joined (with partitions or waiting for some) while the database answers."""
        if self._stopping.is_set():
            return False, "stopping"
        pool = self._pool
        if self._consumer is None or pool is None:
            return False, "starting: checking the database, the broker and the topics"
        if (late := self._overdue(OVERDUE_SLACK_S)) is not None:
            return False, late
        if self.waiting_out is not None:
            return False, f"waiting out a failure: {self.waiting_out}"
        if not self.inflight.locked():  # else the batch in flight is the database's answer
            try:
                async with within(pool, READY_DATABASE_TIMEOUT_S, "readiness check") as conn:
                    await conn.fetchval("SELECT 1")
            except Exception as exc:
                return False, f"the database does not answer: {describe(exc, 200)}"
        held = len(self.assignment())
        return True, f"ready: {held} partitions" if held else "ready: waiting for partitions"

    async def exposition(self) -> tuple[bytes, str]:
        """/metrics, with each owned partition's lag and the money owed read now."""
        await self._read_lag()
        await self._read_owed()
        return self.metrics.render(), CONTENT_TYPE

    async def _read_owed(self) -> None:
        """Refunds owed and captures due soon (consumer/owed.py), from the database now.

        Bounded like the lag: a database that does not answer in time leaves the
        gauges at their last reading, and /readyz says why.
        """
        pool = self._pool
        if pool is None:
            return
        try:
            async with within(pool, OWED_READ_TIMEOUT_S, "money owed read") as conn:
                found = await owed.read(conn, self.settings.capture_warning_s)
        except Exception as exc:
            # A scrape is not the consume loop: whatever went wrong, the next one asks again.
            if classify(exc) is Fault.FATAL:
                log.exception("owed_read_failed")
            else:
                log.debug("owed_read_skipped", error=describe(exc, 200))
            return
        self.metrics.set_money(found.refunds, found.captures_due_soon)

    async def _read_lag(self) -> None:
        """Each owned partition's end offset, asked now, minus the offset committed for it.

        Neither the last fetch's high watermark (a paused partition is not
        fetched) nor this member's position (past the records polled but not yet
        applied, up to two batches) would count what is waiting.
        """
        consumer = self._consumer
        owned = sorted(consumer.assignment()) if consumer is not None else []
        lags: dict[tuple[str, int], int] = {}
        if consumer is not None and owned:
            try:
                async with asyncio.timeout(LAG_READ_TIMEOUT_S):
                    ends = await consumer.end_offsets(owned)
                    for tp in owned:
                        if self._committed.get(tp) is None:  # none yet: from where it reads
                            done = await consumer.committed(tp)
                            self._committed[tp] = (
                                done if done is not None else await consumer.position(tp)
                            )
            except (TimeoutError, KafkaError, IllegalStateError):
                ends = {}  # the broker is away or the group is moving: no figure, not a stale one
            for tp in owned:
                end, done = ends.get(tp), self._committed.get(tp)
                if end is not None and done is not None:
                    lags[(tp.topic, tp.partition)] = max(end - done, 0)
        self.metrics.set_lag(lags)

    # -- the loop ----------------------------------------------------------

    async def run(self) -> RunStats:
        self.last_activity = time.monotonic()
        try:
            while not self._stopping.is_set():
                records = await self._poll(self.settings.poll_timeout_ms)
                if self._in_flight is not None and self._in_flight.done():
                    self._settle()  # its failure stops the loop here
                if not records:
                    if self._in_flight is None and self._idle_long_enough():
                        break
                    continue
                self.last_activity = time.monotonic()
                batch = self._decode(records)  # while the previous batch is in the database
                if self._in_flight is not None and not await self._in_flight_done_or_stop():
                    break
                if self._stopping.is_set():
                    break  # not started, so never committed: the next owner reads it
                self._in_flight = asyncio.create_task(self._apply_and_commit(batch))
        except StopRequested:
            pass
        finally:
            await self._finish_in_flight()
        return self.stats

    async def _in_flight_done_or_stop(self) -> bool:
        """Wait for the batch in flight and settle it; False if a stop came first."""
        assert self._in_flight is not None
        await asyncio.wait(
            [self._in_flight, self._stop_waiter()], return_when=asyncio.FIRST_COMPLETED
        )
        if not self._in_flight.done():
            return False
        self._settle()
        return True

    def _settle(self) -> None:
        """Take the finished batch's outcome; re-raise what stops the loop."""
        task, self._in_flight = self._in_flight, None
        assert task is not None
        try:
            task.result()
        except StopRequested:
            self.stats.abandoned += 1
            log.warning("batch_abandoned", reason="stop requested while waiting out a failure")
            raise

    async def _finish_in_flight(self) -> None:
        """Give the batch in flight until the shutdown deadline to commit, else abandon it."""
        task, self._in_flight = self._in_flight, None
        if task is None:
            return
        self._start_stop_clock()
        if not task.done():
            budget_s = self._time_left_s() - self._leave_reserve_s()
            await asyncio.wait([task], timeout=max(budget_s, 0.0))
        if not task.done():
            # Abandoned: its connections are ended rather than asked to cancel, which
            # asyncpg would wait on for as long as the server does not acknowledge it
            # (forever, on a connection whose packets are dropped). Nothing else needs
            # the pool now: `stop` follows.
            if self._pool is not None:
                self._pool.terminate()
            task.cancel()
            await asyncio.wait([task], timeout=1.0)
        try:
            task.result()
        except StopRequested:
            self.stats.abandoned += 1
            log.warning("batch_abandoned", reason="stop requested while waiting out a failure")
        except (asyncio.CancelledError, asyncio.InvalidStateError):
            self.stats.abandoned += 1
            log.warning("batch_abandoned", reason="shutdown deadline; the next owner replays it")

    def _idle_long_enough(self) -> bool:
        if not self.in_group:  # idleness counts only once the group has settled
            self.last_activity = time.monotonic()
            return False
        idle = time.monotonic() - self.last_activity
        if self.exit_when_idle_s is not None and idle >= self.exit_when_idle_s:
            log.info("idle_exit", idle_s=round(idle, 1))
            return True
        return False

    async def _poll(self, timeout_ms: int, max_records: int | None = None) -> list[Any]:
        """One fetch, bounded in time even while the group rebalances; StopRequested on stop.

        aiokafka's `getmany` ignores its timeout while a reassignment is in
        progress (it waits for the next assignment): a stop request, or a
        revocation that a waiting batch must notice, would wait with it.
        Cancelling it is safe: nothing was handed out, so nothing was consumed.
        """
        async with self._poll_lock:  # the loop and a back-off wait both poll
            if self._consumer is None or self._stopping.is_set():
                raise StopRequested
            self.last_progress = time.monotonic()
            fetch = asyncio.ensure_future(
                self._consumer.getmany(
                    timeout_ms=timeout_ms,
                    max_records=max_records or self.settings.batch_max_records,
                )
            )
            stop = self._stop_waiter()
            await asyncio.wait([fetch, stop], timeout=timeout_ms / 1000 + POLL_MARGIN_S,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if not fetch.done():
                fetch.cancel()
                await asyncio.wait([fetch])
                if self._stopping.is_set():
                    raise StopRequested
                return []
            fetched = fetch.result()
        return [r for tp in sorted(fetched) for r in fetched[tp]]

    def _stop_waiter(self) -> asyncio.Future[Any]:
        """One future for the whole run that completes on a stop request."""
        if self._stop_future is None:
            self._stop_future = asyncio.ensure_future(self._stopping.wait())
        return self._stop_future

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
            try:
                if batch.poison:
                    await self._dead_letter(batch.poison, batch.epoch)
                result = await self._apply(batch.envelopes, batch.epoch)
                await self.commit_offsets(batch.records, epoch=batch.epoch)
            except Superseded:
                self.stats.abandoned += 1
                log.info("batch_left_to_new_owner", records=len(batch.records))
                return
            finally:
                self.waiting_out = None
            duration_ms = (time.perf_counter() - started) * 1000
        self.metrics.batch_applied(
            events=result.events + len(batch.poison), duration_s=duration_ms / 1000
        )
        self.stats.batches += 1
        self.stats.add(result)
        self.stats.batch_latencies_ms.append(duration_ms)
        log.info(
            "batch_applied",
            records=len(batch.records),
            claimed=result.claimed,
            duplicates=result.duplicates,
            dead_lettered=len(batch.poison) + result.rejected,
            orders={str(k): v for k, v in result.orders.items()},
            duration_ms=round(duration_ms, 1),
        )

    async def _apply(self, envelopes: list[Envelope], epoch: int) -> BatchResult:
        """Apply `envelopes` in one transaction, by the failure policy (module docstring)."""
        if not envelopes:
            return BatchResult()
        attempt = timeouts = 0
        while True:
            if epoch != self.epoch:
                raise Superseded
            try:
                result = await self._apply_once(envelopes)
                self.metrics.transaction_committed(
                    outcomes=result.outcomes,
                    duplicates=result.duplicates,
                    entered=result.entered,
                    received_at_ms=(e.arrival[0] for e in envelopes),
                )
                return result
            except Exception as exc:
                fault = classify(exc)
                if fault is Fault.FATAL:
                    raise
                if fault is Fault.DATA:
                    return await self._isolate(envelopes, exc, epoch)
                if is_read_only(exc):
                    await self._discard_connections()
                if is_statement_timeout(exc) and len(envelopes) > 1:
                    timeouts += 1
                    if timeouts >= SPLIT_AFTER_TIMEOUTS:
                        self.stats.splits += 1
                        log.warning("batch_split", size=len(envelopes), reason="statement_timeout")
                        return await self._in_halves(envelopes, epoch)
                await self._backoff("database_unavailable", exc, attempt, epoch)
                attempt += 1

    async def _apply_once(self, envelopes: list[Envelope]) -> BatchResult:
        assert self._pool is not None
        # Progress, for alive(): the loop may wait for several of these in a row
        # (a batch bisected or split) without polling, each one bounded here.
        self.last_progress = self._attempt_started = time.monotonic()
        try:
            async with within(self._pool, self.batch_deadline_s, "batch") as conn:
                return await self.deps.apply_batch(conn, envelopes)
        finally:
            self._attempt_started = None

    async def _isolate(
        self, envelopes: list[Envelope], exc: BaseException, epoch: int
    ) -> BatchResult:
        """Bisect a batch the database rejects until the one event is dead-lettered."""
        if len(envelopes) == 1:
            detail = f"SQLSTATE {sqlstate_of(exc)}: {exc}"[:500]
            await self._dead_letter([Poison(envelopes[0].record, "rejected_by_database", detail)],
                                    epoch)  # fmt: skip
            return BatchResult(events=1, rejected=1)
        log.warning("batch_rejected_bisecting", size=len(envelopes), error=describe(exc, 200))
        return await self._in_halves(envelopes, epoch)

    async def _in_halves(self, envelopes: list[Envelope], epoch: int) -> BatchResult:
        middle = len(envelopes) // 2
        first = await self._apply(envelopes[:middle], epoch)
        return first.merged(await self._apply(envelopes[middle:], epoch))

    async def _discard_connections(self) -> None:
        """A read-only session stays read-only: open fresh ones (after a failover: the primary)."""
        if self._pool is not None:
            await self._pool.expire_connections()
            log.info("database_connections_discarded", reason="read-only session")

    async def commit_offsets(self, records: Iterable[Any], *, epoch: int | None = None) -> None:
        """Commit the offset after each partition's last record (after the database commit).

        Only for partitions this member still owns: the new owner of the others
        replays their records, and the inbox makes the replay harmless.
        """
        assert self._consumer is not None
        consumer = self._consumer
        offsets: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
        attempt = 0
        while True:
            owned = consumer.assignment()
            mine = {tp: offset for tp, offset in offsets.items() if tp in owned}
            if len(mine) < len(offsets):
                moved = sorted(tp.partition for tp in offsets if tp not in owned)
                log.info("offsets_left_to_new_owner", partitions=moved)
            if not mine:
                return
            try:
                # aiokafka retries a commit by itself, without end, while the group
                # coordinator is away: bounded here, it is waited out like any other
                # failure (polling, so the member stays alive and says what it waits for).
                async with asyncio.timeout(COMMIT_TIMEOUT_S):
                    await consumer.commit(mine)
                self._committed.update(mine)
                self.metrics.committed()
                return
            except TimeoutError:
                away = KafkaTimeoutError("the group coordinator did not answer the offset commit")
                await self._backoff("offset_commit_failed", away, attempt, epoch)
                attempt += 1
                continue
            except (CommitFailedError, IllegalStateError) as exc:
                log.warning(
                    "offset_commit_refused",
                    reason="the partitions moved; their new owner replays the batch",
                    error=describe(exc),
                )
                return
            except KafkaError as exc:
                if classify(exc) is Fault.FATAL:
                    raise
                await self._backoff("offset_commit_failed", exc, attempt, epoch)
                attempt += 1

    async def _dead_letter(self, poison: list[Poison], epoch: int) -> None:
        """Send to the dead-letter topic; retry only what the broker did not acknowledge."""
        assert self._dead_letters is not None
        remaining, attempt = list(poison), 0
        while remaining:
            failed = await self._dead_letters.send(remaining)
            if not failed:
                break
            for p, exc in failed:
                if classify(exc) is Fault.FATAL:
                    raise DeadLetterRefused(p, exc) from exc
            remaining = [p for p, _ in failed]
            await self._backoff("dead_letter_failed", failed[0][1], attempt, epoch)
            attempt += 1
        self.stats.dead_lettered += len(poison)
        self.metrics.dead_lettered(len(poison))
        for p in poison:
            log.warning(
                "dead_lettered",
                error=p.error,
                detail=p.detail,
                partition=p.record.partition,
                offset=p.record.offset,
            )

    # -- waiting out failures ----------------------------------------------

    async def _backoff(
        self, what: str, exc: BaseException, attempt: int, epoch: int | None
    ) -> None:
        """Log and count one environment failure, then wait before the next attempt."""
        s = self.settings
        wait_s = delay_s(attempt, s.retry_initial_s, s.retry_max_s)
        label = cause(exc)
        self.stats.retries += 1
        self.stats.retries_by_cause[label] += 1
        self.metrics.retried(label)
        self.waiting_out = label
        log.warning(
            what, cause=label, error=describe(exc), attempt=attempt + 1, retry_in_s=round(wait_s, 2)
        )
        await self._keep_alive(wait_s, epoch)

    async def _keep_alive(self, seconds: float, epoch: int | None) -> None:
        """Wait, still polling (every partition paused) so that the group keeps this member.

        Raises StopRequested on a stop request, and Superseded once the batch's
        partitions are being revoked (`epoch` moved on).
        """
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._stopping.is_set():
                raise StopRequested
            if epoch is not None and epoch != self.epoch:
                raise Superseded
            consumer = self._consumer
            if consumer is None or not consumer.assignment():
                await sleep_unless_stopped(self._stopping, min(left, 0.5))
                continue
            paused = set(consumer.assignment())
            consumer.pause(*paused)
            try:
                records = await self._poll(max(1, int(min(left, 0.5) * 1000)))
            finally:
                consumer.resume(*(tp for tp in paused if tp in consumer.assignment()))
            # Partitions assigned during the wait were not paused: put back what
            # came from them, so that the loop reads it again.
            firsts: dict[TopicPartition, int] = {}
            for r in records:
                firsts.setdefault(TopicPartition(r.topic, r.partition), r.offset)
            for tp, offset in firsts.items():
                consumer.seek(tp, offset)

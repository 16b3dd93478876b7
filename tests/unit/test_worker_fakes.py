"""The worker's failure policy end to end through `run`, against ten-line fakes.

The fakes implement the interfaces of `consumer.bootstrap` (pool, broker
consumer, dead letters, apply function) and write what happens to them into
one shared log, in order, so a test can say exactly what was applied, rolled
back, dead-lettered and committed, and when. The same paths run against the
real broker and PostgreSQL in tests/integration/test_failure_policy.py and
test_failures.py; these run in milliseconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import TopicAuthorizationFailedError
from aiokafka.structs import ConsumerRecord

from intentflow.consumer.bootstrap import BrokerConsumer, Dependencies
from intentflow.consumer.decode import Envelope
from intentflow.consumer.dlq import Poison
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.store import BatchResult
from intentflow.consumer.worker import RunStats, Worker
from intentflow.stripekit import events

TOPIC = "stripe.events.fake"
TP = TopicPartition(TOPIC, 0)
Log = list[Any]
Script = Callable[[list[int], int], BaseException | None]  # (offsets, attempt) -> raise this


def record(offset: int, value: bytes | None = None) -> Any:
    """A record at `offset`; a valid event of its own intent unless `value` says otherwise."""
    pi = f"pi_{offset}"
    if value is None:
        value = events.encode(events.intent_event(pi, amount=100, cart_id=f"cart_{offset}"))
    return ConsumerRecord(
        topic=TOPIC, partition=0, offset=offset, timestamp=0, timestamp_type=0,
        key=pi.encode(), value=value, checksum=None, serialized_key_size=len(pi),
        serialized_value_size=len(value), headers=(),
    )  # fmt: skip


class FakeConnection:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.down = False  # what a readiness probe's `SELECT 1` meets

    def terminate(self) -> None:
        self.log.append("terminated")

    async def fetchval(self, query: str) -> int:
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        return 1

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        try:
            yield
        except BaseException:
            self.log.append("rollback")
            raise
        self.log.append("commit")


class FakePool:
    def __init__(self, log: Log) -> None:
        self.conn, self.closed = FakeConnection(log), False

    @asynccontextmanager
    async def acquire(self, *, timeout: float | None = None) -> AsyncIterator[FakeConnection]:  # noqa: ASYNC109
        yield self.conn

    async def expire_connections(self) -> None: ...

    async def close(self) -> None:
        self.closed = True

    def terminate(self) -> None: ...


class FakeConsumer:
    """One partition holding `records`; assigned on the first poll; commits go to the log."""

    def __init__(self, log: Log, records: list[Any], refuse_commit: Exception | None) -> None:
        self.log, self.records, self.refuse_commit = log, records, refuse_commit
        self.next_index, self.paused, self.stopped = 0, False, False
        self.owned: set[Any] = set()
        self.listener: ConsumerRebalanceListener = None

    async def start(self) -> None: ...

    async def stop(self) -> None:
        self.stopped = True

    def subscribe(self, topics: list[str], *, listener: ConsumerRebalanceListener) -> None:
        self.listener = listener

    def assignment(self) -> set[Any]:
        return set(self.owned)

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        if not self.owned:
            self.owned = {TP}
            await self.listener.on_partitions_assigned({TP})
        fetched = [] if self.paused else self.records[self.next_index :][:max_records]
        self.next_index += len(fetched)
        if not fetched:
            await asyncio.sleep(timeout_ms / 1000)
        return {TP: fetched} if fetched else {}

    async def commit(self, offsets: dict[Any, int]) -> None:
        if self.refuse_commit is not None:
            raise self.refuse_commit
        self.log.append(("offsets", offsets[TP]))

    def pause(self, *partitions: Any) -> None:
        self.paused = True

    def resume(self, *partitions: Any) -> None:
        self.paused = False

    def seek(self, partition: Any, offset: int) -> None:
        self.next_index = offset

    def highwater(self, partition: Any) -> int | None:
        return len(self.records)

    async def position(self, partition: Any) -> int:
        return self.next_index

    async def end_offsets(self, partitions: list[Any]) -> dict[Any, int]:
        return {tp: len(self.records) for tp in partitions}

    async def committed(self, partition: Any) -> int | None:
        commits = [
            entry[1] for entry in self.log if isinstance(entry, tuple) and entry[0] == "offsets"
        ]
        return commits[-1] if commits else None


class FakeDeadLetters:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.sent: list[Poison] = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(self, poison: list[Poison]) -> list[tuple[Poison, Any]]:
        self.sent += poison
        self.log.append(("dead_letter", [(p.record.offset, p.error) for p in poison]))
        return []


class ScriptedApply:
    """`apply_batch`: a transaction that takes `took_s`, then raises what `script` says, or not."""

    def __init__(self, log: Log, script: Script, took_s: float) -> None:
        self.log, self.script, self.took_s, self.attempts = log, script, took_s, 0

    async def __call__(self, conn: FakeConnection, envelopes: list[Envelope]) -> BatchResult:
        offsets = [e.offset for e in envelopes]
        async with conn.transaction():
            self.attempts += 1
            self.log.append(("apply", offsets))
            await asyncio.sleep(self.took_s)
            if (exc := self.script(offsets, self.attempts)) is not None:
                raise exc
        return BatchResult(events=len(envelopes), claimed=len(envelopes))


class Harness:
    """A real Worker wired to the fakes above, all writing to `log`."""

    def __init__(
        self,
        records: list[Any],
        script: Script = lambda offsets, attempt: None,
        *,
        refuse_commit: Exception | None = None,
        apply_took_s: float = 0.0,
        **settings: Any,
    ) -> None:
        self.log: Log = []
        self.pool = FakePool(self.log)
        self.consumer = FakeConsumer(self.log, records, refuse_commit)
        self.dead_letters = FakeDeadLetters(self.log)
        self.apply = ScriptedApply(self.log, script, apply_took_s)

        async def abandon(consumer: BrokerConsumer) -> None: ...

        deps = Dependencies(
            checks=(),
            open_pool=self._pool,
            new_consumer=lambda: self.consumer,
            new_dead_letters=lambda: self.dead_letters,
            apply_batch=self.apply,
            abandon_consumer=abandon,
        )
        fast = {"retry_initial_s": 0.001, "retry_max_s": 0.004, "shutdown_timeout_s": 1}
        self.settings = ConsumerSettings(
            kafka_topic=TOPIC, batch_max_records=100, poll_timeout_ms=5, **(fast | settings)
        )
        self.worker = Worker(self.settings, exit_when_idle_s=0.05, deps=deps)

    async def _pool(self) -> FakePool:
        return self.pool

    async def run(self) -> RunStats:
        """Start, run until idle, stop: what `order-consumer run --exit-when-idle` does."""
        async with asyncio.timeout(5), self.worker:
            return await self.worker.run()


async def stop_after_first_attempt(harness: Harness) -> tuple[RunStats, float]:
    """Run until the first transaction has begun, then SIGTERM: stats, and seconds to stop."""
    worker = harness.worker
    async with asyncio.timeout(5):
        await worker.start()
        running = asyncio.create_task(worker.run())
        while harness.apply.attempts == 0:  # noqa: ASYNC110 - the fake has no event to wait on
            await asyncio.sleep(0.001)
        stop_requested = time.monotonic()
        worker.request_stop()
        stats = await running
        await worker.stop()
    return stats, time.monotonic() - stop_requested


def unreachable(offsets: list[int], attempt: int) -> BaseException | None:
    """The database is away for the first three attempts, two ways."""
    if attempt <= 2:
        return ConnectionRefusedError(111, "Connection refused")
    return (
        asyncpg.CannotConnectNowError("the database system is starting up")
        if attempt == 3
        else None
    )


async def test_a_database_outage_is_waited_out_then_the_batch_is_applied_and_committed() -> None:
    harness = Harness([record(i) for i in range(4)], unreachable)
    stats = await harness.run()

    batch = ("apply", [0, 1, 2, 3])
    # The whole batch each time; its offsets only once its transaction committed.
    assert harness.log == [batch, "rollback"] * 3 + [batch, "commit", ("offsets", 4)]
    assert stats.retries_by_cause == {"database_unreachable": 3}
    assert stats.events == 4 and stats.dead_lettered == 0 and stats.batches == 1
    assert harness.consumer.stopped and harness.pool.closed


async def test_an_event_the_database_rejects_is_bisected_out_and_dead_lettered() -> None:
    def reject_offset_2(offsets: list[int], attempt: int) -> BaseException | None:
        return asyncpg.CheckViolationError("violates check constraint") if 2 in offsets else None

    harness = Harness([record(i) for i in range(5)], reject_offset_2)
    stats = await harness.run()

    assert harness.log == [
        ("apply", [0, 1, 2, 3, 4]), "rollback",
        ("apply", [0, 1]), "commit",
        ("apply", [2, 3, 4]), "rollback",
        ("apply", [2]), "rollback",
        ("dead_letter", [(2, "rejected_by_database")]),
        ("apply", [3, 4]), "commit",
        ("offsets", 5),
    ]  # fmt: skip
    [rejected] = harness.dead_letters.sent
    assert rejected.detail == "SQLSTATE 23514: violates check constraint"
    assert stats.dead_lettered == 1 and stats.retries == 0
    assert stats.events == 5 and stats.duplicates == 0


async def test_poison_is_dead_lettered_before_the_rest_of_its_batch_is_applied() -> None:
    records = [record(0), record(1, b"{not json"), record(2), record(3, b'{"id": "evt_1"}')]
    harness = Harness(records)
    stats = await harness.run()

    assert harness.log == [
        ("dead_letter", [(1, "invalid_json"), (3, "invalid_event")]),
        ("apply", [0, 2]),
        "commit",
        ("offsets", 4),
    ]
    assert stats.dead_lettered == 2 and stats.events == 2


async def test_a_bug_in_the_transaction_stops_the_worker_with_nothing_committed() -> None:
    harness = Harness([record(i) for i in range(3)], lambda offsets, attempt: KeyError("bug"))
    with pytest.raises(KeyError, match="bug"):
        await harness.run()

    assert harness.log == [("apply", [0, 1, 2]), "rollback"]  # tried once, never committed
    assert harness.worker.stats.retries == 0
    assert harness.consumer.stopped and harness.pool.closed


async def test_an_offset_commit_the_broker_refuses_for_good_stops_the_worker() -> None:
    refused = TopicAuthorizationFailedError()
    harness = Harness([record(0)], refuse_commit=refused)
    with pytest.raises(TopicAuthorizationFailedError):
        await harness.run()

    assert harness.log == [("apply", [0]), "commit"]  # applied; the replay is harmless
    assert harness.worker.stats.retries == 0


async def test_a_stop_during_back_off_ends_the_run_within_the_deadline_uncommitted() -> None:
    harness = Harness(
        [record(i) for i in range(2)],
        lambda offsets, attempt: ConnectionRefusedError(111, "Connection refused"),
        retry_initial_s=30,
        retry_max_s=30,
        shutdown_timeout_s=2,
    )
    stats, took_s = await stop_after_first_attempt(harness)

    # The worker was waiting 15-30 s before its next attempt when the stop came.
    # It stops at once: the wait is cut short, not cancelled by the deadline's backstop (1.6 s).
    assert took_s < 0.5 < harness.settings.shutdown_timeout_s
    assert harness.log == [("apply", [0, 1]), "rollback"]  # no second attempt, no offsets
    assert stats.abandoned == 1 and stats.retries == 1 and stats.events == 0
    assert harness.consumer.stopped and harness.pool.closed


async def test_a_transaction_that_outlasts_the_stop_deadline_is_abandoned_uncommitted() -> None:
    harness = Harness([record(i) for i in range(2)], apply_took_s=60)
    stats, took_s = await stop_after_first_attempt(harness)

    assert took_s < harness.settings.shutdown_timeout_s
    assert harness.log == [("apply", [0, 1]), "rollback"]  # cancelled; the next owner replays it
    assert stats.abandoned == 1 and stats.events == 0

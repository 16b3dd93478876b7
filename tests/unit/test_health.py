"""What /healthz and /metrics say in the worker's less common moments (fakes).

The clock the worker reads for its health is moved forward by `Clock` (only the
worker module's: the event loop keeps its own), so that "the loop has not polled
for minutes" can be staged in milliseconds: a loop that polls stamps the moved
clock again at once; a loop that does not, stays behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import types
from typing import Any

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from intentflow.consumer import worker as worker_module
from intentflow.consumer.decode import Envelope
from intentflow.consumer.store import BatchResult
from tests.unit.test_worker_fakes import TP, FakeConnection, Harness, record


class Clock:
    """The worker module's `time`, with monotonic() `ahead_s` in the future."""

    def __init__(self) -> None:
        self.ahead_s = 0.0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        shim = types.SimpleNamespace(
            monotonic=lambda: time.monotonic() + self.ahead_s,
            perf_counter=time.perf_counter,
            time=time.time,
        )
        monkeypatch.setattr(worker_module, "time", shim)


async def until(check: Any, timeout_s: float = 3.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():  # noqa: ASYNC110 - the fakes have no event to wait on
            await asyncio.sleep(0.005)


async def test_a_polling_loop_stays_alive_when_the_clock_moves_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The method's control: nothing stuck, the clock 1000 s ahead, still alive."""
    clock = Clock()
    clock.install(monkeypatch)
    harness = Harness([record(0)])
    harness.worker.exit_when_idle_s = None
    worker = harness.worker
    async with asyncio.timeout(5), worker:
        running = asyncio.create_task(worker.run())
        await until(lambda: ("offsets", 1) in harness.log)
        clock.ahead_s = 1000.0
        await asyncio.sleep(0.1)
        assert worker.alive() == (True, "alive")
        worker.request_stop()
        await running


async def test_an_offset_commit_waiting_for_the_broker_keeps_the_member_alive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiokafka's commit() retries by itself, without end, while the group coordinator
    is unreachable (a broker restart or failover). The member is waiting out the
    broker's failure: /healthz must not call it stalled (kubelet would restart a pod
    whose replacement cannot start either, and crash-loop it), and /readyz must say
    what it waits for."""
    clock = Clock()
    clock.install(monkeypatch)
    monkeypatch.setattr(worker_module, "COMMIT_TIMEOUT_S", 0.05, raising=False)  # a fix's bound
    # Two batches: the loop polls the second while the first commits, then waits for it.
    harness = Harness([record(i) for i in range(4)])
    harness.worker.settings = harness.settings.model_copy(update={"batch_max_records": 2})
    harness.worker.exit_when_idle_s = None
    broker_back = asyncio.Event()

    async def commit_while_the_coordinator_is_away(offsets: dict[Any, int]) -> None:
        harness.log.append("commit_waits")
        await broker_back.wait()
        harness.log.append(("offsets", offsets[TP]))

    harness.consumer.commit = commit_while_the_coordinator_is_away  # type: ignore[method-assign]
    worker = harness.worker
    async with asyncio.timeout(5), worker:
        running = asyncio.create_task(worker.run())
        try:
            await until(lambda: "commit_waits" in harness.log)
            await asyncio.sleep(0.1)  # the loop has the second batch and waits for the first
            clock.ahead_s = 1000.0  # as if the broker had been away for 1000 s
            await asyncio.sleep(0.1)
            alive = worker.alive()
            ready = await worker.ready()
        finally:
            broker_back.set()
            worker.request_stop()
            await running
    assert alive[0], alive
    assert not ready[0], ready  # "ready" while no offset can be committed


async def test_what_the_database_committed_is_counted_when_a_rebalance_supersedes_the_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch bisected around an event the database rejects: its first half commits,
    the rejected event is dead-lettered, then the partitions are revoked and the rest
    is left to the new owner. The new owner replays all of it and counts the first
    half as duplicates: unless this member counted them, applied events are never
    counted as applied, and the dead letter it sent is counted by nobody here."""
    harness = Harness([record(i) for i in range(4)])
    revoked: list[asyncio.Task[None]] = []

    async def apply(conn: FakeConnection, envelopes: list[Envelope]) -> BatchResult:
        offsets = [e.offset for e in envelopes]
        if offsets == [2]:  # the rejected event, being isolated: now the group rebalances
            harness.consumer.owned = set()
            revoked.append(asyncio.ensure_future(
                harness.consumer.listener.on_partitions_revoked({TP})
            ))  # fmt: skip
        async with conn.transaction():
            harness.log.append(("apply", offsets))
            await asyncio.sleep(0)
            if 2 in offsets:
                raise asyncpg.CheckViolationError("violates check constraint")
        result = BatchResult(events=len(offsets), claimed=len(offsets))
        result.outcomes["applied"] = len(offsets)
        return result

    harness.worker.deps = dataclasses.replace(harness.worker.deps, apply_batch=apply)
    stats = await harness.run()
    await asyncio.gather(*revoked)

    assert ("apply", [0, 1]) in harness.log and "commit" in harness.log  # in the database
    assert harness.dead_letters.sent  # on the dead-letter topic
    assert stats.abandoned == 1
    events = {
        s.labels["outcome"]: s.value
        for family in text_string_to_metric_families(harness.worker.metrics.render().decode())
        for s in family.samples
        if s.name == "intentflow_consumer_events_total"
    }
    assert (events["applied"], events["dead_lettered"]) == (2, 1), events


def test_every_order_status_is_exported_from_the_start() -> None:
    """An alert on `increase(intentflow_consumer_orders_total{status="needs_review"}[10m]) > 0`
    misses the first such order after every restart when the series is born at 1:
    increase() needs a sample before the change. The outcomes are exported at zero
    for this reason; the statuses, a closed set, are not."""
    from intentflow.consumer.decisions import OrderStatus
    from intentflow.consumer.metrics import ConsumerMetrics

    exported = {
        s.labels["status"]
        for family in text_string_to_metric_families(ConsumerMetrics().render().decode())
        for s in family.samples
        if s.name == "intentflow_consumer_orders_total"
    }
    assert exported == {str(status) for status in OrderStatus}


async def test_a_batch_bisected_by_slow_healthy_transactions_is_not_called_stalled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """alive() allows one transaction's client-side bound (2 x statement timeout +
    connect timeout, + 30 s) without a poll. Bisecting around an event the database
    rejects runs several transactions back to back without polling, while the loop
    waits with the next batch in hand: five of 25 s each (under the 30 s statement
    timeout, so every one is healthy) add up to 125 s, and /healthz calls it stalled."""
    clock = Clock()
    clock.install(monkeypatch)
    harness = Harness([record(i) for i in range(8)])
    harness.worker.settings = harness.settings.model_copy(update={"batch_max_records": 4})
    assert (
        harness.settings.statement_timeout_s == 30 and harness.settings.db_connect_timeout_s == 10
    )
    seen: list[tuple[list[int], tuple[bool, str]]] = []

    async def slow_apply(conn: FakeConnection, envelopes: list[Envelope]) -> BatchResult:
        offsets = [e.offset for e in envelopes]
        async with conn.transaction():
            harness.log.append(("apply", offsets))
            clock.ahead_s += 25.0  # this transaction took 25 s
            seen.append((offsets, harness.worker.alive()))
            if 2 in offsets:
                raise asyncpg.CheckViolationError("violates check constraint")
        return BatchResult(events=len(offsets), claimed=len(offsets))

    harness.worker.deps = dataclasses.replace(harness.worker.deps, apply_batch=slow_apply)
    await harness.run()
    stalled = [(offsets, why) for offsets, (ok, why) in seen if not ok]
    assert not stalled, stalled


async def test_a_batch_past_its_deadline_is_not_ready_and_long_past_it_not_alive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch's deadline ends its connection (consumer/database.py), which ends the
    batch. Should one go on anyway (here the fake's connection ignores its end), /readyz
    says it made no progress once past its deadline, and /healthz fails 30 s later, while
    the loop still polls: a restart is all that is left."""
    clock = Clock()
    clock.install(monkeypatch)
    harness = Harness([record(0)], apply_took_s=3600)
    harness.worker.exit_when_idle_s = None
    worker = harness.worker
    async with asyncio.timeout(5), worker:
        running = asyncio.create_task(worker.run())
        await until(lambda: harness.apply.attempts == 1)
        assert (await worker.ready())[0] is True  # within its deadline
        deadline_s = worker.batch_deadline_s
        assert deadline_s == 2 * 30 + 10

        clock.ahead_s = deadline_s + 2
        await asyncio.sleep(0.05)  # the loop polls on at the moved clock
        ok, why = await worker.ready()
        assert not ok and why.startswith("a batch has made no progress for 72 s"), why
        assert worker.alive() == (True, "alive")

        clock.ahead_s = deadline_s + 32
        await asyncio.sleep(0.05)
        ok, why = worker.alive()
        assert not ok and why.startswith("stuck: a batch has made no progress"), why
        worker.request_stop()
        await running


class LateStep:
    """A loop beside the worker (the relay) with one step past its deadline by `late_s`."""

    def __init__(self, late_s: float) -> None:
        self.late_s = late_s

    def overdue(self, slack_s: float) -> str | None:
        return "the relay's order events claim ran late" if self.late_s > slack_s else None


@pytest.mark.parametrize(
    ("late_s", "ready", "alive"), [(0.5, True, True), (5, False, True), (40, False, False)]
)
async def test_a_relay_claim_past_its_deadline_shows_in_the_workers_probes(
    late_s: float, ready: bool, alive: bool
) -> None:
    harness = Harness([record(0)])
    harness.worker.beside.append(LateStep(late_s))
    worker = harness.worker
    async with asyncio.timeout(5), worker:
        running = asyncio.create_task(worker.run())
        await until(lambda: ("offsets", 1) in harness.log)
        assert (await worker.ready())[0] is ready
        assert worker.alive()[0] is alive
        worker.request_stop()
        await running

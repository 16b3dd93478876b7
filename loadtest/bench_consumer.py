"""Consumer benchmark: intentflow's batch consumer against a one-transaction-per-event baseline.

`python -m intentflow.loadtest.bench_consumer --help`. Services are started once; one
workload is generated; every run of every contender gets a fresh migrated
database seeded with the workload and a fresh 12-partition topic pre-loaded
with all its deliveries (duplicates included). The clock starts when the
consumer has its partitions and stops when it has applied every delivery, so
neither publishing nor group join nor an idle wait is counted; the join time
is printed beside it. After each run the invariants are checked in the
database and printed, so a fast but wrong run shows.

Rates, not totals, are compared: the baseline may run on a slice of the same
workload (its first intents, with stock scaled to match) to keep the bench short.
The ratio is taken between runs of the same process, on the same machine,
interleaved, because the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import platform
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from intentflow.consumer import logs
from intentflow.consumer.runtime import tune_gc
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.worker import Worker
from intentflow.devservices import Services, services
from intentflow.loadtest import scratch
from intentflow.loadtest.baselines.per_event import BaselineConsumer
from intentflow.loadtest.readback import BulkCheck, bulk_check
from intentflow.loadtest.verdict import percentile
from intentflow.loadtest.workload import Workload, generate, slice_workload

INTENTFLOW = "intentflow"
INTENTFLOW_2 = "intentflow-x2"  # two processes in one group, one per core
BASELINE = "baseline"
_POLL_S = 0.002  # how often the clock checks progress; well below any batch
T = TypeVar("T")


@dataclass
class RunResult:
    contender: str
    run: int
    events: int
    orders: int
    join_s: float
    elapsed_s: float
    latencies_ms: list[float]
    check: BulkCheck

    @property
    def events_per_s(self) -> float:
        return self.events / self.elapsed_s

    @property
    def orders_per_s(self) -> float:
        return self.orders / self.elapsed_s


# -- timing ---------------------------------------------------------------------


async def _timed(
    run: Awaitable[object], assigned: Callable[[], bool], done: Callable[[], bool]
) -> tuple[float, float]:
    """Wait for the partitions, then time until `done()`; return (join_s, elapsed_s)."""
    task = asyncio.ensure_future(run)
    started = time.perf_counter()
    while not assigned():
        if task.done():
            task.result()
            raise RuntimeError("the consumer stopped before it got its partitions")
        await asyncio.sleep(_POLL_S)
    clock = time.perf_counter()
    join_s = clock - started
    while not done():
        if task.done():
            task.result()
            raise RuntimeError("the consumer stopped before it applied every delivery")
        await asyncio.sleep(_POLL_S)
    elapsed_s = time.perf_counter() - clock
    return join_s, elapsed_s


def _settings(infra: Services, url: str, topic: str, args: argparse.Namespace) -> ConsumerSettings:
    return ConsumerSettings(
        kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
        kafka_enable_idempotence=infra.kafka_enable_idempotence,
        kafka_topic=topic,
        kafka_group_id=f"bench-{topic}",
        database_url=url,
        batch_max_records=args.batch_max_records,
        # The worker alone is measured: its batches write the outbox rows, and no
        # relay publishes them meanwhile (so no orders topic is needed either).
        relay_enabled=False,
    )


async def run_intentflow(
    infra: Services, url: str, topic: str, workload: Workload, args: argparse.Namespace
) -> tuple[float, float, list[float]]:
    settings = _settings(infra, url, topic, args)
    total = len(workload.deliveries)
    async with Worker(settings) as worker:
        tune_gc()  # as `order-consumer run` does; also freezes this process's workload copy
        run = asyncio.ensure_future(worker.run())
        try:
            join_s, elapsed_s = await _timed(
                run, lambda: bool(worker.assignment()), lambda: worker.stats.events >= total
            )
        finally:
            worker.request_stop()
            await run
    return join_s, elapsed_s, list(worker.stats.batch_latencies_ms)


async def run_baseline(
    infra: Services, url: str, topic: str, workload: Workload, args: argparse.Namespace
) -> tuple[float, float, list[float]]:
    total = len(workload.deliveries)
    async with BaselineConsumer(
        bootstrap_servers=infra.kafka_bootstrap_servers,
        topic=topic,
        group_id=f"bench-{topic}",
        database_url=url,
    ) as baseline:
        tune_gc()  # the same process tuning as intentflow's consumer
        join_s, elapsed_s = await _timed(
            baseline.run(total),
            lambda: bool(baseline.assignment()),
            lambda: baseline.stats.events >= total,
        )
    return join_s, elapsed_s, list(baseline.stats.transaction_latencies_ms)


# Shared with each member process: its assignment time, events applied, end of its last batch.
_ASSIGNED_AT, _EVENTS, _LAST_BATCH_AT = range(3)


def _member(settings_json: str, progress: Any, stop: Any, results: Any) -> None:
    """One consumer-group member in its own process (multiprocessing target)."""
    logs.configure("WARNING", "console")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    settings = ConsumerSettings.model_validate_json(settings_json)
    latencies = _event_loop_run(_member_run(settings, progress, stop))
    results.put(latencies)


async def _member_run(settings: ConsumerSettings, progress: Any, stop: Any) -> list[float]:
    async with Worker(settings) as worker:
        tune_gc()  # as `order-consumer run` does; also freezes this process's workload copy
        run = asyncio.ensure_future(worker.run())
        while not worker.assignment():  # noqa: ASYNC110 - aiokafka has no assignment event
            await asyncio.sleep(_POLL_S)
        progress[_ASSIGNED_AT] = time.time()
        seen = 0
        while not stop.is_set():
            if worker.stats.batches != seen:
                seen = worker.stats.batches
                progress[_EVENTS] = worker.stats.events
                progress[_LAST_BATCH_AT] = time.time()
            await asyncio.sleep(_POLL_S)
        worker.request_stop()
        await run
    return list(worker.stats.batch_latencies_ms)


async def run_intentflow_processes(
    infra: Services, url: str, topic: str, workload: Workload, args: argparse.Namespace
) -> tuple[float, float, list[float]]:
    """Two member processes; the clock runs from the first assignment to the last batch."""
    settings_json = _settings(infra, url, topic, args).model_dump_json()
    total = len(workload.deliveries)
    ctx = multiprocessing.get_context("spawn")
    stop, results = ctx.Event(), ctx.Queue()
    progress = [ctx.Array("d", 3, lock=False) for _ in range(2)]
    members = [
        ctx.Process(target=_member, args=(settings_json, p, stop, results)) for p in progress
    ]
    launched = time.time()
    for m in members:
        m.start()
    try:
        while sum(p[_EVENTS] for p in progress) < total:
            if any(not m.is_alive() for m in members):
                raise RuntimeError("a member process died before every delivery was applied")
            await asyncio.sleep(_POLL_S)
    finally:
        stop.set()
    latencies = [ms for _ in members for ms in await asyncio.to_thread(results.get, True, 60)]
    for m in members:
        await asyncio.to_thread(m.join, 30)
    started = min(p[_ASSIGNED_AT] for p in progress if p[_ASSIGNED_AT])
    finished = max(p[_LAST_BATCH_AT] for p in progress)
    return started - launched, finished - started, latencies


def _event_loop_run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(main)
    return uvloop.run(main)


CONTENDERS = {
    INTENTFLOW: run_intentflow,
    INTENTFLOW_2: run_intentflow_processes,
    BASELINE: run_baseline,
}


async def run_once(
    infra: Services,
    contender: str,
    run: int,
    workload: Workload,
    args: argparse.Namespace,
) -> RunResult:
    token = secrets.token_hex(4)
    name = f"bench_{contender}_{token}"
    topic = f"bench.{contender}.{token}"
    url = await scratch.seeded_database(infra, workload, name)
    await scratch.loaded_topic(infra, topic, workload)
    try:
        join_s, elapsed_s, latencies = await CONTENDERS[contender](
            infra, url, topic, workload, args
        )
        check = await bulk_check(url, workload)
    finally:
        await scratch.drop_database(infra.database_url, name)
        await scratch.drop_topic(infra.kafka_bootstrap_servers, topic)
    return RunResult(
        contender,
        run,
        len(workload.deliveries),
        len(workload.intents),
        join_s,
        elapsed_s,
        latencies,
        check,
    )


# -- report ---------------------------------------------------------------------


def print_context(infra: Services, pg_version: str, args: argparse.Namespace) -> None:
    python = platform.python_version()
    print(f"machine   {os.cpu_count()} cores, {platform.machine()}, Python {python}")
    print(f"kafka     {infra.kafka_origin} at {infra.kafka_bootstrap_servers}, 12 partitions")
    print(f"postgres  {infra.postgres_origin} {pg_version}")
    print(
        f"consumer  batch_max_records={args.batch_max_records}, uvloop; "
        f"{INTENTFLOW} = one process, {INTENTFLOW_2} = two processes in one group"
    )


def print_table(results: list[RunResult]) -> None:
    header = (
        f"{'contender':<13} {'run':>3} {'events':>7} {'events/s':>9} {'orders/s':>9} "
        f"{'p50 batch ms':>12} {'p99 batch ms':>12} {'join s':>6}  invariants"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        verdict = "ok" if r.check.ok else "FAILED: " + "; ".join(r.check.failures)
        print(
            f"{r.contender:<13} {r.run:>3} {r.events:>7} {r.events_per_s:>9,.0f} "
            f"{r.orders_per_s:>9,.0f} {percentile(r.latencies_ms, 50):>12.1f} "
            f"{percentile(r.latencies_ms, 99):>12.1f} {r.join_s:>6.1f}  {verdict}"
        )


def summarize(results: list[RunResult]) -> dict[str, float]:
    return {
        c: statistics.median(r.events_per_s for r in results if r.contender == c)
        for c in CONTENDERS
        if any(r.contender == c for r in results)
    }


# -- entry ------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m intentflow.loadtest.bench_consumer", description=__doc__
    )
    p.add_argument("--intents", type=int, default=20_000, help="payment intents (default 20000)")
    p.add_argument(
        "--baseline-intents",
        type=int,
        default=2_000,
        help="the slice of those intents the baseline consumes (default 2000)",
    )
    p.add_argument("--runs", type=int, default=3, help="runs of each contender (default 3)")
    p.add_argument("--batch-max-records", type=int, default=ConsumerSettings().batch_max_records)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated subset of {', '.join(CONTENDERS)} (default all)",
    )
    return p


async def bench(args: argparse.Namespace) -> int:
    workload = generate(args.intents, seed=args.seed)
    slices = {
        INTENTFLOW: workload,
        INTENTFLOW_2: workload,
        BASELINE: slice_workload(workload, args.baseline_intents),
    }
    contenders = [c for c in args.contenders.split(",") if c]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        raise SystemExit(f"unknown contenders: {', '.join(sorted(unknown))}")
    with services() as infra:
        print_context(infra, await scratch.server_version(infra.database_url), args)
        print(
            f"workload  {args.intents} intents, 3 cart lines, each event delivered 1-3 times: "
            f"{len(workload.deliveries)} deliveries of {workload.distinct_events} events; "
            f"baseline slice {len(slices[BASELINE].intents)} intents, "
            f"{len(slices[BASELINE].deliveries)} deliveries"
        )
        print()
        results = []
        for run in range(1, args.runs + 1):
            for contender in contenders:  # interleaved, so noise hits both alike
                results.append(await run_once(infra, contender, run, slices[contender], args))
                print(
                    f"  {contender} run {run}: {results[-1].events_per_s:,.0f} events/s",
                    file=sys.stderr,
                )
    print()
    print_table(results)
    medians = summarize(results)
    print()
    for contender, rate in medians.items():
        print(f"median {contender:<13} {rate:>9,.0f} events/s")
    for contender in (INTENTFLOW, INTENTFLOW_2):
        if contender in medians and BASELINE in medians:
            ratio = medians[contender] / medians[BASELINE]
            print(f"ratio  {contender} / baseline = {ratio:.1f}x")
    print(
        "batch = one poll applied in one transaction, offsets committed (intentflow); "
        "one event's transaction (baseline). join s = group join, not timed."
    )
    return 0 if all(r.check.ok for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.configure("WARNING", "console")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    return _event_loop_run(bench(args))


if __name__ == "__main__":
    sys.exit(main())

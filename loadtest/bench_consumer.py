"""Consumer benchmark: intentflow's batch consumer against a one-transaction-per-event baseline.

`python -m loadtest.bench_consumer --help`. Services are started once; one
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
import contextlib
import logging
import os
import platform
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from consumer import logs
from consumer.migrate import migrate
from consumer.settings import ConsumerSettings
from consumer.worker import Worker
from devservices import Services, services
from devservices.topics import create_topics
from loadtest import events
from loadtest.baseline import BaselineConsumer
from loadtest.workload import Workload, generate, seed_database
from schemas import contract_headers, dlq_topic, encode_key, payment_intent_key

INTENTFLOW = "intentflow"
BASELINE = "baseline"
_POLL_S = 0.002  # how often the clock checks progress; well below any batch


@dataclass(frozen=True)
class Message:
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


@dataclass
class Check:
    """The invariants after a run, read back from the database."""

    failures: list[str] = field(default_factory=list)
    orders: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class RunResult:
    contender: str
    run: int
    events: int
    orders: int
    join_s: float
    elapsed_s: float
    latencies_ms: list[float]
    check: Check

    @property
    def events_per_s(self) -> float:
        return self.events / self.elapsed_s

    @property
    def orders_per_s(self) -> float:
        return self.orders / self.elapsed_s


# -- workload -----------------------------------------------------------------


def slice_workload(workload: Workload, intents: int) -> Workload:
    """The first `intents` intents of `workload`, their deliveries in the same order.

    Stock per SKU is scaled with the slice, so about as many orders run short.
    """
    if intents >= len(workload.intents):
        return workload
    keep = set(workload.intents[:intents])
    deliveries = [d for d in workload.deliveries if payment_intent_key(d) in keep]
    distinct = len({d["id"] for d in deliveries})
    scale = intents / len(workload.intents)
    stock = {sku: max(1, round(q * scale)) for sku, q in workload.stock.items()}
    return Workload(
        stock, workload.carts[:intents], deliveries, distinct, workload.intents[:intents]
    )


def encode_messages(workload: Workload) -> list[Message]:
    """What the bridge would publish for each delivery: raw JSON, intent key, contract headers."""
    messages = []
    for delivery in workload.deliveries:
        intent = payment_intent_key(delivery)
        messages.append(
            Message(
                encode_key(intent) if intent else None,
                events.encode(delivery),
                contract_headers(delivery["id"], delivery["type"], int(time.time() * 1000)),
            )
        )
    return messages


# -- per-run setup ------------------------------------------------------------


def _with_database(dsn: str, database: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{database}"


async def fresh_database(infra: Services, workload: Workload, name: str) -> str:
    admin = await asyncpg.connect(infra.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = _with_database(infra.database_url, name)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        await seed_database(conn, workload)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return url


async def drop_database(infra: Services, name: str) -> None:
    admin = await asyncpg.connect(infra.database_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def fresh_topic(infra: Services, name: str, messages: list[Message]) -> None:
    await create_topics(infra.kafka_bootstrap_servers, name, dlq_topic(name))
    await asyncio.sleep(0.1)  # the broker may answer metadata for a new topic a moment later
    producer = AIOKafkaProducer(
        bootstrap_servers=infra.kafka_bootstrap_servers,
        acks="all",
        enable_idempotence=infra.kafka_enable_idempotence,
        linger_ms=5,
        max_batch_size=256 * 1024,
    )
    await producer.start()
    try:
        futures = [
            await producer.send(name, m.value, key=m.key, headers=m.headers) for m in messages
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def drop_topic(infra: Services, name: str) -> None:
    """Free the broker's memory; a broker that cannot delete topics keeps them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=infra.kafka_bootstrap_servers)
    await admin.start()
    try:
        with contextlib.suppress(Exception):
            await admin.delete_topics([name, dlq_topic(name)])
    finally:
        await admin.close()


async def check_invariants(url: str, workload: Workload) -> Check:
    conn = await asyncpg.connect(url)
    try:
        check = Check()
        rows = await conn.fetch("SELECT status, count(*) AS n FROM orders GROUP BY status")
        check.orders = {r["status"]: r["n"] for r in rows}
        orders = sum(check.orders.values())
        if orders != len(workload.intents):
            check.failures.append(f"orders {orders} != intents {len(workload.intents)}")
        processed = await conn.fetchval("SELECT count(*) FROM processed_events")
        if processed != workload.distinct_events:
            check.failures.append(
                f"processed_events {processed} != distinct events {workload.distinct_events}"
            )
        negative = await conn.fetchval(
            "SELECT count(*) FROM inventory_levels WHERE stocked_quantity < 0"
        )
        if negative:
            check.failures.append(f"{negative} SKUs below zero")
        unexplained = await conn.fetchval(
            """
            SELECT count(*) FROM inventory_levels l
            LEFT JOIN (SELECT sku, sum(quantity_delta) AS total
                       FROM inventory_movements GROUP BY sku) m ON m.sku = l.sku
            WHERE coalesce(m.total, 0) <> l.stocked_quantity
            """
        )
        if unexplained:
            check.failures.append(f"{unexplained} SKUs whose movements do not sum to the level")
        return check
    finally:
        await conn.close()


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


async def run_intentflow(
    infra: Services, url: str, topic: str, workload: Workload, args: argparse.Namespace
) -> tuple[float, float, list[float]]:
    settings = ConsumerSettings(
        kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
        kafka_enable_idempotence=infra.kafka_enable_idempotence,
        kafka_topic=topic,
        kafka_group_id=f"bench-{topic}",
        database_url=url,
        batch_max_records=args.batch_max_records,
    )
    total = len(workload.deliveries)
    async with Worker(settings) as worker:
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
        join_s, elapsed_s = await _timed(
            baseline.run(total),
            lambda: bool(baseline.assignment()),
            lambda: baseline.stats.events >= total,
        )
    return join_s, elapsed_s, list(baseline.stats.transaction_latencies_ms)


CONTENDERS = {INTENTFLOW: run_intentflow, BASELINE: run_baseline}


async def run_once(
    infra: Services,
    contender: str,
    run: int,
    workload: Workload,
    messages: list[Message],
    args: argparse.Namespace,
) -> RunResult:
    token = secrets.token_hex(4)
    name = f"bench_{contender}_{token}"
    topic = f"bench.{contender}.{token}"
    url = await fresh_database(infra, workload, name)
    await fresh_topic(infra, topic, messages)
    try:
        join_s, elapsed_s, latencies = await CONTENDERS[contender](
            infra, url, topic, workload, args
        )
        check = await check_invariants(url, workload)
    finally:
        await drop_database(infra, name)
        await drop_topic(infra, topic)
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


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def postgres_version(infra: Services) -> str:
    conn = await asyncpg.connect(infra.database_url)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


def print_context(infra: Services, pg_version: str, args: argparse.Namespace) -> None:
    python = platform.python_version()
    print(f"machine   {os.cpu_count()} cores, {platform.machine()}, Python {python}")
    print(f"kafka     {infra.kafka_origin} at {infra.kafka_bootstrap_servers}, 12 partitions")
    print(f"postgres  {infra.postgres_origin} {pg_version}")
    print(f"consumer  batch_max_records={args.batch_max_records}, one process, uvloop")


def print_table(results: list[RunResult]) -> None:
    header = (
        f"{'contender':<12} {'run':>3} {'events':>7} {'events/s':>9} {'orders/s':>9} "
        f"{'p50 batch ms':>12} {'p99 batch ms':>12} {'join s':>6}  invariants"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        verdict = "ok" if r.check.ok else "FAILED: " + "; ".join(r.check.failures)
        print(
            f"{r.contender:<12} {r.run:>3} {r.events:>7} {r.events_per_s:>9,.0f} "
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
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_consumer", description=__doc__)
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
        "--only", choices=sorted(CONTENDERS), help="run one contender (no ratio is printed)"
    )
    return p


async def bench(args: argparse.Namespace) -> int:
    workload = generate(args.intents, seed=args.seed)
    slices = {INTENTFLOW: workload, BASELINE: slice_workload(workload, args.baseline_intents)}
    messages = {c: encode_messages(w) for c, w in slices.items()}
    contenders = [args.only] if args.only else list(CONTENDERS)
    with services() as infra:
        print_context(infra, await postgres_version(infra), args)
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
                results.append(
                    await run_once(
                        infra, contender, run, slices[contender], messages[contender], args
                    )
                )
                print(
                    f"  {contender} run {run}: {results[-1].events_per_s:,.0f} events/s",
                    file=sys.stderr,
                )
    print()
    print_table(results)
    medians = summarize(results)
    print()
    for contender, rate in medians.items():
        print(f"median {contender:<12} {rate:>9,.0f} events/s")
    if len(medians) == 2:
        print(f"ratio  intentflow / baseline = {medians[INTENTFLOW] / medians[BASELINE]:.1f}x")
    print(
        "batch = one poll applied in one transaction, offsets committed (intentflow); "
        "one event's transaction (baseline). join s = group join, not timed."
    )
    return 0 if all(r.check.ok for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.configure("WARNING", "console")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(bench(args))
    return uvloop.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())

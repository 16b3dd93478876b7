"""`make bench`'s comparison: the handler shops write, the same under a lease lock, and intentflow.

`python -m intentflow.loadtest.compare --help`. One workload, one database, one run:
  1. generate the workload (carts over few shared SKUs, stock for a share of
     what the carts ask for, authorizations and captures, each event delivered
     1 to `--max-copies` times) and group every event's copies together;
  2. start the services; create one database: intentflow's schema (migrated)
     and two shop schemas, `naive` and `leased`, each seeded with the same
     stock and carts;
  3. naive: `--senders` concurrent senders hand every copy of an event to
     `loadtest.baselines.naive` at the same moment;
  4. leased: the same deliveries to the same handler inside a lease per payment
     intent (`loadtest.baselines.lease`), Redis when `REDIS_URL` (or
     `--redis-url`) is given, a PostgreSQL lease table otherwise, with a share
     of the handler runs stalling past the TTL;
  5. intentflow: the same deliveries, copies adjacent, on a fresh topic,
     applied by the real consumer (`consumer.worker.Worker`, no relay);
  6. count, in each contender's tables, what `loadtest.baselines.measure`
     defines: duplicate orders, oversold units, stock left against expected,
     missing orders; print one row each.

Throughput is deliveries (copies included) per second, and orders/s counts
payment intents given an order (duplicates not counted twice). The clock of
the baselines runs from the first hand-off to the last return; intentflow's
from the consumer getting its partitions to its last batch (the topic is
pre-loaded, as in the consumer bench). Latency is not the same quantity on
both sides and is labelled: per delivery for the baselines, per batch
transaction for intentflow.

Exit status 0 only if intentflow's row shows no duplicate order, no oversold
unit, no missing order and its stock left equal to expected; the baselines
are expected to fail those, and their numbers are reported, not judged.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import secrets
import sys
from dataclasses import dataclass

import asyncpg
import redis
import uvloop

from intentflow.consumer import logs
from intentflow.consumer.settings import ConsumerSettings
from intentflow.devservices import Services, services
from intentflow.loadtest import scratch
from intentflow.loadtest.baselines import measure
from intentflow.loadtest.baselines.delivery import DeliveryReport, deliver, simultaneous
from intentflow.loadtest.baselines.lease import LeasedShop, PostgresLease, RedisLease
from intentflow.loadtest.baselines.naive import AUTHORIZATIONS, Shop, intent_of
from intentflow.loadtest.bench_consumer import run_intentflow
from intentflow.loadtest.verdict import percentile
from intentflow.loadtest.workload import Workload, generate

NAIVE, LEASED = "naive", "leased"


@dataclass
class Row:
    contender: str
    deliveries: int
    elapsed_s: float
    outcome: measure.Outcome
    p99_ms: float
    p99_of: str
    notes: str = ""

    @property
    def events_per_s(self) -> float:
        return self.deliveries / self.elapsed_s

    @property
    def orders_per_s(self) -> float:
        return self.outcome.intents_with_order / self.elapsed_s


# -- workload -------------------------------------------------------------------


def comparison_workload(args: argparse.Namespace) -> Workload:
    """The generated workload, every event's copies adjacent, stock at `--stock-ratio` of demand."""
    workload = generate(
        args.intents,
        skus=args.skus,
        lines_per_cart=args.lines_per_cart,
        max_copies=args.max_copies,
        capture_ratio=args.capture_ratio,
        cancel_ratio=0.0,
        refund_ratio=0.0,
        seed=args.seed,
        prefix="",
    )
    demand = sum(q for cart in workload.carts for _, q, _ in cart.lines)
    per_sku = max(1, round(args.stock_ratio * demand / len(workload.stock)))
    grouped = [d for group in simultaneous(workload.deliveries) for d in group]
    return dataclasses.replace(
        workload, stock=dict.fromkeys(workload.stock, per_sku), deliveries=grouped
    )


def authorized_intents(workload: Workload) -> set[str]:
    return {intent_of(d)["id"] for d in workload.deliveries if d["type"] in AUTHORIZATIONS}


# -- contenders -----------------------------------------------------------------


async def _shop_row(
    url: str, contender: str, workload: Workload, report: DeliveryReport, notes: str
) -> Row:
    conn = await asyncpg.connect(url)
    try:
        outcome = await measure.measure(
            conn, measure.shop_tables(contender), workload.stock, authorized_intents(workload)
        )
    finally:
        await conn.close()
    notes_ = [notes] if notes else []
    if report.errors:
        failed = ", ".join(f"{n} {name}" for name, n in report.errors.most_common())
        notes_.append(f"attempts failed and retried: {failed}")
    if report.failed:
        notes_.append(f"{report.failed} deliveries failed every attempt")
    return Row(
        contender,
        report.deliveries,
        report.elapsed_s,
        outcome,
        percentile(report.latencies_ms, 99),
        "delivery",
        "; ".join(notes_),
    )


async def run_naive(url: str, workload: Workload, args: argparse.Namespace) -> Row:
    shop = Shop(NAIVE)
    report = await deliver(
        url, shop.handle, simultaneous(workload.deliveries), senders=args.senders
    )
    return await _shop_row(url, NAIVE, workload, report, "")


async def run_leased(
    url: str, workload: Workload, args: argparse.Namespace, redis_url: str | None
) -> Row:
    backend: RedisLease | PostgresLease
    if redis_url:
        backend = RedisLease(redis_url)
    else:
        backend = PostgresLease(LEASED)
        conn = await asyncpg.connect(url)
        try:
            await backend.create(conn)
        finally:
            await conn.close()
    leased = LeasedShop(
        Shop(LEASED),
        backend,
        ttl_ms=args.lease_ttl_ms,
        retry_ms=args.lease_retry_ms,
        slow_share=args.slow_share,
        slow_factor=args.slow_factor,
        seed=args.seed,
        prefix=f"intentflow-compare:{secrets.token_hex(4)}:",
    )
    try:
        report = await deliver(
            url, leased.handle, simultaneous(workload.deliveries), senders=args.senders
        )
    finally:
        if isinstance(backend, RedisLease):
            await backend.close()
    notes = (
        f"lease: {backend.name}, {leased.stalls} holders stalled past the TTL, "
        f"{leased.waits} deliveries waited"
    )
    return await _shop_row(url, LEASED, workload, report, notes)


async def run_intentflow_row(
    infra: Services, url: str, topic: str, workload: Workload, args: argparse.Namespace
) -> Row:
    await scratch.loaded_topic(infra, topic, workload)
    _, elapsed_s, batch_ms = await run_intentflow(infra, url, topic, workload, args)
    conn = await asyncpg.connect(url)
    try:
        outcome = await measure.measure(
            conn, measure.INTENTFLOW, workload.stock, authorized_intents(workload)
        )
    finally:
        await conn.close()
    return Row(
        "intentflow",
        len(workload.deliveries),
        elapsed_s,
        outcome,
        percentile(batch_ms, 99),
        f"batch of <= {args.batch_max_records}",
        f"{len(batch_ms)} batches",
    )


def intentflow_held(row: Row) -> bool:
    o = row.outcome
    return (
        o.duplicate_orders == 0
        and o.oversold_units == 0
        and o.missing_orders == 0
        and o.stock_left == o.expected_stock_left
    )


# -- report ---------------------------------------------------------------------


def print_context(
    infra: Services, pg: str, workload: Workload, args: argparse.Namespace, lease: str
) -> None:
    groups = simultaneous(workload.deliveries)
    doubled = sum(1 for g in groups if len(g) > 1)
    per_sku = next(iter(workload.stock.values()))
    python = platform.python_version()
    print(f"machine   {os.cpu_count()} cores, {platform.machine()}, Python {python}")
    print(f"postgres  {infra.postgres_origin} {pg}; kafka {infra.kafka_origin}")
    print(
        f"workload  {len(workload.intents)} intents, {args.lines_per_cart} lines per cart over "
        f"{len(workload.stock)} SKUs, {per_sku} units per SKU ({args.stock_ratio:.0%} of demand), "
        f"{args.capture_ratio:.0%} captured"
    )
    print(
        f"delivery  {len(workload.deliveries)} deliveries of {workload.distinct_events} events, "
        f"{doubled} events delivered 2-{args.max_copies} times with every copy at once; "
        f"{args.senders} senders"
    )
    print(
        f"lease     backend {lease}, TTL {args.lease_ttl_ms} ms, retry every "
        f"{args.lease_retry_ms} ms, {args.slow_share:.0%} of holders stall "
        f"{args.slow_factor:g} x TTL"
    )


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'contender':<11} {'events':>6} {'events/s':>8} {'orders/s':>8} {'dup orders':>10} "
        f"{'oversold':>8} {'stock left/expected':>19} {'missing':>7} {'p99 ms':>7}  p99 of"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        o = r.outcome
        stock = f"{o.stock_left}/{o.expected_stock_left}"
        print(
            f"{r.contender:<11} {r.deliveries:>6} {r.events_per_s:>8,.0f} {r.orders_per_s:>8,.0f} "
            f"{o.duplicate_orders:>10} {o.oversold_units:>8} {stock:>19} {o.missing_orders:>7} "
            f"{r.p99_ms:>7.1f}  {r.p99_of}"
        )
    for r in rows:
        if r.notes:
            print(f"{r.contender}: {r.notes}")
    print(
        "events = deliveries, copies included; orders/s = intents given an order per second; "
        "oversold = units on orders that took stock beyond the SKU's stock; "
        "expected = initial stock - one order per intent that took stock; "
        "missing = authorized intents without an order."
    )


# -- entry ------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m intentflow.loadtest.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--intents", type=int, default=2000, help="payment intents (default 2000)")
    add("--skus", type=int, default=100, help="SKUs the carts share (default 100)")
    add("--lines-per-cart", type=int, default=3, help="lines in each cart (default 3)")
    add("--max-copies", type=int, default=4, help="each event delivered 1 to K times (default 4)")
    add("--capture-ratio", type=float, default=0.5, help="intents also captured (default 0.5)")
    add(
        "--stock-ratio",
        type=float,
        default=0.8,
        help="stock per SKU as a share of the units the carts ask for (default 0.8)",
    )
    add(
        "--senders", type=int, default=32, help="concurrent senders, a connection each (default 32)"
    )
    add("--lease-ttl-ms", type=int, default=200, help="the lease's time to live (default 200)")
    add("--lease-retry-ms", type=int, default=20, help="a waiting copy retries after (default 20)")
    add("--slow-share", type=float, default=0.02, help="holders that stall (default 0.02)")
    add("--slow-factor", type=float, default=1.5, help="a stall, in TTLs (default 1.5)")
    add(
        "--redis-url",
        default=None,
        help="lease in Redis (default: $REDIS_URL; unset = a PostgreSQL lease table)",
    )
    batch = ConsumerSettings().batch_max_records
    add("--batch-max-records", type=int, default=batch, help=f"intentflow's (default {batch})")
    add("--seed", type=int, default=7, help="of the workload and the stalls (default 7)")
    return p


def _running(contender: str) -> None:
    print(f"  running {contender} ...", file=sys.stderr, flush=True)


async def compare(args: argparse.Namespace, redis_url: str | None) -> int:
    if redis_url:  # before anything starts: a wrong URL fails in a second
        probe = RedisLease(redis_url)
        try:
            await probe.check()
        finally:
            await probe.close()
    workload = comparison_workload(args)
    token = secrets.token_hex(4)
    name, topic = f"compare_{token}", f"compare.{token}"
    with services() as infra:
        url = await scratch.seeded_database(infra, workload, name)
        try:
            conn = await asyncpg.connect(url)
            try:
                for schema in (NAIVE, LEASED):
                    await Shop(schema).create(conn, workload)
            finally:
                await conn.close()
            lease = "redis" if redis_url else "postgres"
            print_context(
                infra, await scratch.server_version(infra.database_url), workload, args, lease
            )
            # One after another, so they do not compete for the cores; intentflow
            # last, as its run tunes this process's garbage collector.
            _running(NAIVE)
            rows = [await run_naive(url, workload, args)]
            _running(LEASED)
            rows.append(await run_leased(url, workload, args, redis_url))
            _running("intentflow")
            rows.append(await run_intentflow_row(infra, url, topic, workload, args))
        finally:
            await scratch.drop_database(infra.database_url, name)
            await scratch.drop_topic(infra.kafka_bootstrap_servers, topic)
    print()
    print_table(rows)
    for row in rows[:2]:
        if row.outcome.duplicate_orders == row.outcome.oversold_units == 0:
            print(f"note: {row.contender} showed neither duplicates nor overselling this run")
    held = intentflow_held(rows[-1])
    print("intentflow: every check held" if held else "intentflow: a check FAILED")
    return 0 if held else 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    redis_url = args.redis_url or os.environ.get("REDIS_URL") or None
    logs.configure("WARNING", "console")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    try:
        return uvloop.run(compare(args, redis_url))
    except redis.RedisError as exc:
        print(f"compare: Redis at {redis_url}: {exc}", file=sys.stderr)
    except (OSError, asyncpg.PostgresError, RuntimeError) as exc:
        print(f"compare: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

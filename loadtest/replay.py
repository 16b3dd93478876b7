"""`replay-duplicates` (`python -m intentflow.loadtest`): Stripe at its worst, via the front door.

Generates a scenario (`--intents` payment intents, their carts, stock that
runs out, each intent's Stripe history), starts the stack (the embedded broker
and PostgreSQL unless KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL are given, the
bridge, `--consumers` consumer processes), delivers every event 1 to
`--duplicates` times, `--reorder` of them out of order, some copies at the
same moment, signed, over HTTP to the bridge (or `--via kafka`), at `--rate`
deliveries/s or as fast as `--senders` concurrent senders go, injects
`--chaos` faults meanwhile, waits for the consumers to catch up, and checks
the database against the histories. Exit status 0 only if every check held.
"""

from __future__ import annotations

try:
    import rich  # noqa: F401 - the 'loadtest' extra; say so in one line when it is missing
except ImportError:  # pragma: no cover - depends on the install
    raise SystemExit(
        "replay-duplicates needs the loadtest extra: pip install 'intentflow[loadtest]'"
    ) from None

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from intentflow.consumer import logs
from intentflow.loadtest import chaos, delivery, readback, report, verdict
from intentflow.loadtest.outage import Mending, Outage, mend
from intentflow.loadtest.progress import Progress
from intentflow.loadtest.stack import PUBLISH_TIMEOUT_S, Stack, StackError, StackOptions
from intentflow.loadtest.workload import Scenario, scenario, seed_scenario


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="replay-duplicates",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--intents", type=int, default=1000, help="payment intents (default 1000)")
    p.add_argument("--seed", type=int, default=7, help="same seed, same scenario (default 7)")
    p.add_argument(
        "--duplicates", type=int, default=3, metavar="K", help="each event 1..K times (default 3)"
    )
    p.add_argument(
        "--reorder", type=float, default=0.2, help="share of events sent late (default 0.2)"
    )
    p.add_argument(
        "--concurrent",
        type=float,
        default=0.3,
        help="share of extra copies sent at the same moment as the first (default 0.3)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=0,
        help="deliveries per second (default 0: as fast as possible)",
    )
    p.add_argument(
        "--senders", type=int, default=32, metavar="C", help="concurrent senders (default 32)"
    )
    p.add_argument(
        "--via", choices=("bridge", "kafka"), default="bridge", help="front door (default bridge)"
    )
    p.add_argument("--consumers", type=int, default=2, metavar="M", help="consumer processes")
    p.add_argument(
        "--chaos",
        nargs="?",
        const=",".join(chaos.DEFAULT_KINDS),
        default=None,
        metavar="KINDS",
        help=f"inject faults, comma-separated from {', '.join(chaos.KINDS)} or 'all' "
        f"(bare --chaos: {', '.join(chaos.DEFAULT_KINDS)})",
    )
    p.add_argument(
        "--chaos-every", type=float, default=3.0, metavar="S", help="seconds between faults"
    )
    p.add_argument(
        "--chaos-down", type=float, default=2.0, metavar="S", help="how long a fault lasts"
    )
    p.add_argument("--report-json", type=Path, metavar="PATH", help="write the report as JSON")
    p.add_argument(
        "--report-html", type=Path, metavar="PATH", help="write the report as one HTML page"
    )
    p.add_argument("--keep-database", action="store_true", help="keep the replay's database")
    return p


def check_options(args: argparse.Namespace) -> tuple[str, ...]:
    """The chaos kinds asked for; ChaosError or OptionError for what cannot run here."""
    for name, low in (("intents", 1), ("duplicates", 1), ("senders", 1), ("consumers", 1)):
        if getattr(args, name) < low:
            raise OptionError(f"--{name} must be at least {low}")
    for name in ("reorder", "concurrent"):
        if not 0 <= getattr(args, name) <= 1:
            raise OptionError(f"--{name} is a share, from 0 to 1")
    if not args.rate >= 0 or not args.chaos_every > 0 or not args.chaos_down >= 0:
        raise OptionError("--rate and --chaos-down must be 0 or more, --chaos-every more than 0")
    kinds = chaos.parse_kinds(args.chaos) if args.chaos is not None else ()
    if args.chaos is not None and not kinds:
        raise OptionError(f"--chaos names no fault; choose from {', '.join(chaos.KINDS)}")
    chaos.check_possible(
        kinds,
        owns_broker="KAFKA_BOOTSTRAP_SERVERS" not in os.environ,
        owns_postgres="DATABASE_URL" not in os.environ,
        via=args.via,
    )
    for path in (args.report_json, args.report_html):
        if path is not None and (path.is_dir() or not path.resolve().parent.is_dir()):
            raise OptionError(f"cannot write {path}: give a file in an existing directory")
    return kinds


class OptionError(ValueError):
    """An option out of range; the message names it."""


async def replay(args: argparse.Namespace, kinds: tuple[str, ...]) -> report.Report:
    world = scenario(args.intents, seed=args.seed)
    plan = delivery.plan(
        world,
        duplicates=args.duplicates,
        reorder=args.reorder,
        concurrent=args.concurrent,
        seed=args.seed,
    )
    consumer_env = {}
    if "consumer-kill" in kinds:
        # A killed member's partitions wait for its session to expire; keep that short.
        consumer_env = {"SESSION_TIMEOUT_MS": "6000", "HEARTBEAT_INTERVAL_MS": "1000"}
    options = StackOptions(
        consumers=args.consumers, consumer_env=consumer_env, keep_database=args.keep_database
    )
    async with Stack(options) as stack:
        conn = await asyncpg.connect(stack.database_url)
        try:
            await seed_scenario(conn, world)
        finally:
            await conn.close()
        print(
            f"replaying {plan.events} events of {args.intents} intents as {plan.deliveries} "
            f"deliveries ({plan.out_of_order} out of order) via {args.via}; "
            f"logs in {stack.logs}",
            file=sys.stderr,
        )
        sender: delivery.Sender
        if args.via == "kafka":
            sender = await delivery.KafkaSender(
                stack.kafka_bootstrap_servers,
                stack.topic,
                enable_idempotence=stack.kafka_enable_idempotence,
            ).start()
        else:
            sender = delivery.HttpSender(
                "127.0.0.1", stack.bridge_port, stack.options.secret, args.senders
            )
        started = time.time()
        tally = delivery.Tally(started=started)
        outage = Outage() if "webhook-outage" in kinds else None
        faults = chaos.Chaos(
            stack, kinds, every_s=args.chaos_every, down_s=args.chaos_down, started=started,
            outage=outage,
        ) if kinds else None  # fmt: skip
        chaos_task = asyncio.ensure_future(faults.run()) if faults else None
        sent = 0
        mending: Mending | None = None

        def on_sent(n: int) -> None:
            nonlocal sent
            sent = n

        with Progress(plan.deliveries, plan.events) as progress:
            watcher = asyncio.ensure_future(_watch(stack, progress, tally, lambda: sent))
            try:
                await delivery.deliver(
                    plan, sender, tally, rate=args.rate, senders=args.senders, on_sent=on_sent,
                    dropped=outage.swallows if outage else None,
                )  # fmt: skip
                await sender.close()
                if faults is not None and chaos_task is not None:
                    faults.load_ended()
                    await chaos_task
                caught_up = await readback.wait_caught_up(stack, tally)
                if outage is not None:
                    mending = await mend(stack, world, tally)
            finally:
                watcher.cancel()
                with contextlib.suppress(BaseException):
                    await watcher
                if chaos_task is not None and not chaos_task.done():
                    chaos_task.cancel()
            applied = await readback.read_applied(stack)
            progress.update(sent, tally.acked, len(applied.ids))
        result = await _judge(args, stack, world, plan, tally, applied, caught_up, faults, mending)
        if result.ok:
            stack.options.keep_logs = False
        return result


async def _watch(
    stack: Stack, progress: Progress, tally: delivery.Tally, sent: Callable[[], int]
) -> None:
    """Move the progress bars; a fault in the database only skips a round."""
    conn: asyncpg.Connection | None = None
    applied = 0
    while True:
        try:
            if conn is None:
                conn = await asyncpg.connect(stack.database_url, timeout=2)
            applied = await readback.applied_count(conn)
        except Exception:  # cosmetic: never let the display end a run
            if conn is not None:
                conn.terminate()
            conn = None
        progress.update(sent(), tally.acked, applied)
        await asyncio.sleep(0.5)


async def _judge(
    args: argparse.Namespace,
    stack: Stack,
    world: Scenario,
    plan: delivery.Plan,
    tally: delivery.Tally,
    applied: verdict.Applied,
    caught_up: bool,
    faults: chaos.Chaos | None,
    mending: Mending | None,
) -> report.Report:
    books = await readback.books(stack, world)
    dead_letters = await readback.dead_lettered(stack)
    reconciled = await readback.reconcile(stack)
    dead = stack.dead_consumers()
    # After a webhook outage, what was never delivered counts too: the backfill's to mend.
    wanted = {e["id"] for e in world.events} if mending else tally.acked_ids
    lost = len(wanted - applied.ids)
    fault_list = faults.faults if faults else []
    for fault in fault_list:
        fault.survived = caught_up and not dead
        if fault.kind == "broker-outage" and not fault.detail.endswith(chaos.AFTER_LOAD):
            back = fault.at_s + fault.duration_s  # the bridge published again afterwards
            fault.survived = fault.survived and any(t >= back for t in tally.acked_per_second)
    checks = verdict.checks(
        books,
        lost=lost,
        dead_letters=dead_letters,
        reconciled=reconciled,
        dead_consumers=dead,
        caught_up=caught_up,
        given_up=tally.given_up,
        ignored=applied.ignored,
        faults_not_survived=[f"{f.kind} at {f.at_s:.1f} s" for f in fault_list if not f.survived],
    ) + (mending.checks() if mending else [])
    started = tally.started
    last_commit = max((c for _, c in applied.times), default=time.time())
    elapsed = max(1e-3, last_commit - started)
    last_ack = max(tally.acked_per_second, default=0) + 1
    latencies = [(c - r) * 1000 for r, c in applied.times]
    return report.Report(
        started_at=datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        config={
            "intents": args.intents,
            "seed": args.seed,
            "duplicates": args.duplicates,
            "reorder": args.reorder,
            "concurrent": args.concurrent,
            "rate": args.rate or "max",
            "senders": args.senders,
            "via": args.via,
            "consumers": args.consumers,
            "chaos": args.chaos or "none",
            "deliveries_planned": plan.deliveries,
            "out_of_order_events": plan.out_of_order,
            "bridge_publish_timeout_s": PUBLISH_TIMEOUT_S,
        },
        services={"kafka": stack.kafka_origin, "postgres": stack.postgres_origin},
        events_distinct=plan.events,
        deliveries=tally.acked,
        attempts=tally.attempts,
        retried=tally.retried,
        # Records the consumers read that did not become an inbox row: the copies.
        duplicates_absorbed=applied.records - len(applied.ids),
        lost_events=lost,
        duplicate_orders=books.duplicate_orders,
        oversold_units=books.oversold_units,
        orders_expected=books.orders_expected,
        orders_found=books.orders_found,
        stock_expected=books.stock_expected,
        stock_found=books.stock_found,
        elapsed_s=elapsed,
        events_per_s=len(applied.ids) / elapsed,
        deliveries_per_s=tally.acked / min(elapsed, last_ack),
        latency_ms=verdict.quantiles(latencies),
        latency_source=applied.source,
        timeline=verdict.timeline(tally, applied, started),
        faults=fault_list,
        checks=checks,
        ok=all(c.ok for c in checks),
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        kinds = check_options(args)
    except (OptionError, chaos.ChaosError) as exc:
        print(f"replay-duplicates: {exc}", file=sys.stderr)
        return 2
    logs.configure("WARNING", "console")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        result = _run(replay(args, kinds))
    except (StackError, chaos.ChaosError) as exc:
        print(f"replay-duplicates: {exc}", file=sys.stderr)
        return 2
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"replay-duplicates: a service did not answer: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("replay-duplicates: stopped; everything it started is stopped", file=sys.stderr)
        return 130
    report.print_summary(result)
    for path, write, what in (
        (args.report_json, report.write_json, "JSON"),
        (args.report_html, report.write_html, "HTML"),
    ):
        if path is not None:
            try:
                write(result, path)
            except OSError as exc:
                print(f"replay-duplicates: cannot write the {what} report: {exc}", file=sys.stderr)
                return 2
            print(f"report ({what}): {path}")
    return 0 if result.ok else 1


def _run(main: Coroutine[Any, Any, report.Report]) -> report.Report:
    """Run `main`; SIGTERM and SIGHUP cancel it like Ctrl-C, so the stack is stopped."""

    async def guarded() -> report.Report:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        stopping = False

        def stop() -> None:  # once: a second signal must not cut the teardown short
            nonlocal stopping
            if not stopping:
                stopping = True
                task.cancel()

        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, stop)
        return await main

    return asyncio.run(guarded())

"""`order-consumer` (also `python -m consumer`): migrate, run a group member, or operate.

Commands: `migrate`, `run`, and the operator's tools `reconcile` (check the
invariants), `dlq` (list and replay dead letters) and `prune` (inbox retention).

Settings are read from the environment once, here, and passed down. What an
operator can fix (a setting, a database or broker that is not there, a missing
topic or migration) ends the process with one line and exit status 2; a record
the dead-letter topic refuses, with one line and 3; a bug, with a traceback
and 1. SIGTERM or SIGINT: `run` returns within SHUTDOWN_TIMEOUT_S and exits 0;
a second signal exits at once with 128 + its number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from importlib.metadata import PackageNotFoundError, version

import asyncpg
import structlog
from pydantic import ValidationError

from consumer import dlq, logs, prune, reconcile
from consumer.backoff import StopRequested
from consumer.bootstrap import bootstrap
from consumer.deadletter import DeadLetterRefused
from consumer.migrate import migrate
from consumer.preflight import StartupError, redact
from consumer.runtime import tune_gc
from consumer.settings import ConsumerSettings
from consumer.worker import Worker
from schemas.config import describe

log = structlog.get_logger("consumer")

EXIT_CANNOT_START = 2
EXIT_REFUSED = 3


def _version() -> str:
    try:
        return version("intentflow")
    except PackageNotFoundError:  # pragma: no cover - run from a checkout without installing
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="order-consumer", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="apply pending database migrations (safe to repeat)")
    run = commands.add_parser("run", help="join the consumer group and apply events")
    run.add_argument(
        "--exit-when-idle",
        type=float,
        metavar="SECONDS",
        help="return 0 once no message has arrived for this long",
    )
    for tool in (reconcile, dlq, prune):
        tool.add_parser(commands)
    return parser


async def _migrate(settings: ConsumerSettings) -> int:
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=settings.db_connect_timeout_s)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.error(
            "cannot_migrate",
            error=f"PostgreSQL at {redact(settings.database_url)} is not usable ({exc}): "
            "check DATABASE_URL and that the server is up",
        )
        return EXIT_CANNOT_START
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    log.info("migrated", applied=applied)
    return 0


async def _run(settings: ConsumerSettings, exit_when_idle_s: float | None) -> int:
    worker = Worker(settings, exit_when_idle_s=exit_when_idle_s, deps=bootstrap(settings))
    _handle_stop_signals(worker, settings.shutdown_timeout_s)
    try:
        async with worker:
            tune_gc()
            stats = await worker.run()
    except StopRequested:
        log.info("consumer_stopped", before="joining the group")
        return 0
    except StartupError as exc:
        log.error("cannot_start", error=str(exc))
        return EXIT_CANNOT_START
    except DeadLetterRefused as exc:
        log.error("stopped", error=str(exc))
        return EXIT_REFUSED
    summary = {
        "batches": stats.batches,
        "events": stats.events,
        "duplicates": stats.duplicates,
        "dead_lettered": stats.dead_lettered,
        "retries": dict(stats.retries_by_cause),
        "splits": stats.splits,
        "abandoned": stats.abandoned,
        "outcomes": dict(stats.outcomes),
        "orders": dict(stats.orders),
    }
    log.info("consumer_stopped", **summary)
    print(json.dumps(summary), flush=True)
    return 0


def _handle_stop_signals(worker: Worker, shutdown_timeout_s: float) -> None:
    """First SIGTERM/SIGINT: stop by the deadline. Second, or the deadline missed: exit now."""
    loop = asyncio.get_running_loop()
    received: list[signal.Signals] = []

    def overdue() -> None:
        log.error("exiting_now", reason=f"shutdown took longer than {shutdown_timeout_s:g} s")
        os._exit(1)

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        if len(received) > 1:
            log.warning("exiting_now", signal=sig.name, reason="second stop signal")
            os._exit(128 + sig)
        log.info("stop_requested", signal=sig.name, deadline_s=shutdown_timeout_s)
        worker.request_stop()
        # A backstop beyond the worker's own deadlines, for whatever none of them covers.
        loop.call_later(shutdown_timeout_s + 2.0, overdue)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = ConsumerSettings()
    except ValidationError as exc:
        print(f"order-consumer: configuration error: {describe(exc)}", file=sys.stderr)
        return EXIT_CANNOT_START
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "migrate":
        return asyncio.run(_migrate(settings))
    tools = {"reconcile": reconcile.main, "dlq": dlq.main, "prune": prune.main}
    if args.command in tools:
        return asyncio.run(tools[args.command](args, settings))
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return asyncio.run(_run(settings, args.exit_when_idle))
    return uvloop.run(_run(settings, args.exit_when_idle))


if __name__ == "__main__":
    sys.exit(main())

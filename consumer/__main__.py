"""`order-consumer` (also `python -m intentflow.consumer`): migrate, run a group member, or operate.

Commands: `migrate`, `run` (a group member, and the outbox relay unless
RELAY_ENABLED=false), `relay` (the relay alone), and the operator's tools
`reconcile` (check the invariants), `dlq` (list and replay dead letters),
`prune` (inbox retention), `outbox` (what the relay has left and did) and
`backfill` (publish what Stripe could not deliver, from its Events API).

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
from typing import Protocol

import asyncpg
import structlog
from pydantic import ValidationError

from intentflow.consumer import database, logs, tools
from intentflow.consumer.backoff import StopRequested
from intentflow.consumer.bootstrap import bootstrap, build_relay, relay_checks
from intentflow.consumer.database import misconfiguration, redact
from intentflow.consumer.dlq import DeadLetterRefused
from intentflow.consumer.errors import Misconfigured
from intentflow.consumer.exits import EXIT_CANNOT, EXIT_REFUSED
from intentflow.consumer.migrate import (
    LockPolicy,
    MigrationLocked,
    SessionRequired,
    migrate,
    require_session,
)
from intentflow.consumer.preflight import StartupError, until_ready
from intentflow.consumer.probes import Health, ProbeServer, ProbeServerError
from intentflow.consumer.relay import Relay, RelayStats
from intentflow.consumer.relay_metrics import RelayHealth, RelayMetrics, WorkerAndRelay
from intentflow.consumer.runtime import tune_gc
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.tools import TOOLS
from intentflow.consumer.worker import RunStats, Worker
from intentflow.schemas.config import describe
from intentflow.schemas.metrics import package_version

log = structlog.get_logger("consumer")

SETTINGS = "its settings: README, `Consumer configuration (environment)`"


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command line, and each subcommand's own parser (its usage for a wrong one)."""
    parser = argparse.ArgumentParser(
        prog="order-consumer",
        description=__doc__.split("\n")[0],
        epilog="Settings come from the environment: README, `Consumer configuration "
        "(environment)`. Exit statuses: README, `Exit statuses`.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "migrate",
        help="apply pending database migrations (safe to repeat)",
        description="Apply the pending schema migrations in steps, under an advisory lock: "
        "safe to repeat, and from several processes at once. Connects with "
        f"MIGRATE_DATABASE_URL, else DATABASE_URL, straight to PostgreSQL; {SETTINGS}.",
    )
    run = commands.add_parser(
        "run",
        help="join the consumer group and apply events",
        description="Join the consumer group KAFKA_GROUP_ID and apply the events topic's "
        "batches to PostgreSQL, with the outbox relay beside it unless RELAY_ENABLED=false; "
        f"/healthz, /readyz and /metrics on CONSUMER_HTTP_PORT; {SETTINGS}.",
    )
    run.add_argument(
        "--exit-when-idle",
        type=float,
        metavar="SECONDS",
        help="return 0 once no message has arrived for this long",
    )
    relay = commands.add_parser(
        "relay",
        help="perform the outbox alone: Stripe actions and order events (`run` does it too)",
        description="Perform the outbox alone: Stripe's actions (with STRIPE_API_KEY) and the "
        f"order events, with /healthz, /readyz and /metrics on CONSUMER_HTTP_PORT; {SETTINGS}.",
    )
    relay.add_argument(
        "--exit-when-idle",
        action="store_true",
        help="return 0 once nothing pending can be done now (rows backing off are waited for)",
    )
    for tool in TOOLS.values():
        tool.add_parser(commands)
    return parser, dict(commands.choices)


async def _migrate(settings: ConsumerSettings) -> int:
    """The migrations, on a session of their own (MIGRATE_DATABASE_URL, else DATABASE_URL)."""
    variable = "MIGRATE_DATABASE_URL" if settings.migrate_database_url else "DATABASE_URL"
    url = settings.migration_url
    try:
        conn = await database.connect(
            settings, name="order-consumer-migrate", url=url, url_variable=variable, pooled=False
        )
    except Misconfigured as exc:
        log.error("cannot_migrate", error=str(exc))
        return EXIT_CANNOT
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.error(
            "cannot_migrate",
            error=f"PostgreSQL at {redact(url)} is not usable ({exc}): "
            f"check {variable} and that the server is up",
        )
        return EXIT_CANNOT
    try:
        await require_session(conn, redact(url), variable)
        applied = await migrate(conn, LockPolicy.from_settings(settings))
    except (SessionRequired, MigrationLocked) as exc:
        log.error("cannot_migrate", error=str(exc))
        return EXIT_CANNOT
    finally:
        await database.close(conn, settings.db_connect_timeout_s)
    log.info("migrated", applied=applied)
    return 0


async def _run(settings: ConsumerSettings, exit_when_idle_s: float | None) -> int:
    worker = Worker(settings, exit_when_idle_s=exit_when_idle_s, deps=bootstrap(settings))
    relay = None
    health: Health = worker
    if settings.relay_enabled:
        # One /metrics: the relay's metrics go in the worker's registry.
        relay = build_relay(settings, metrics=RelayMetrics(worker.metrics.registry))
        health = WorkerAndRelay(worker, relay)
    _handle_stop_signals([worker, *([relay] if relay else [])], settings.shutdown_timeout_s)
    relay_stats: RelayStats | None = None
    probes = ProbeServer(health, settings.consumer_http_host, settings.consumer_http_port)
    try:
        await probes.start()
    except ProbeServerError as exc:
        log.error("cannot_start", error=str(exc))
        return EXIT_CANNOT
    try:
        async with worker:
            tune_gc()
            if relay is None:
                stats = await worker.run()
            else:
                async with relay:
                    stats, relay_stats = await _beside(worker, relay, exit_when_idle_s is not None)
    except StopRequested:
        log.info("consumer_stopped", before="joining the group")
        return 0
    except StartupError as exc:
        log.error("cannot_start", error=str(exc))
        return EXIT_CANNOT
    except DeadLetterRefused as exc:
        log.error("stopped", error=str(exc))
        return EXIT_REFUSED
    except Exception as exc:
        # A setting found not to work once running (a pooler's refusal, prepared
        # statements behind a pooler in transaction mode): one line, not a traceback.
        if (line := misconfiguration(exc, settings.database_url)) is None:
            raise
        log.error("stopped", error=line)
        return EXIT_CANNOT
    finally:
        await probes.stop()
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
    if relay_stats is not None:
        summary["outbox"] = relay_stats.as_dict()
    _summary("consumer_stopped", summary, settings)
    return 0


def _summary(event: str, summary: dict[str, object], settings: ConsumerSettings) -> None:
    """What the process did, once: in JSON logs, one JSON line on stdout for scripts (the
    log line only says it stopped); in console logs, the log line itself, and no JSON."""
    if settings.log_format == "json":
        log.info(event)
        print(json.dumps(summary), flush=True)
    else:
        log.info(event, **summary)


async def _beside(worker: Worker, relay: Relay, drain: bool) -> tuple[RunStats, RelayStats]:
    """The worker, with the relay beside it; a relay that fails for a bug stops the worker.
    The worker's probes report a relay claim that ran out its deadline."""
    worker.beside.append(relay)
    relay_task = asyncio.create_task(relay.run())

    def on_relay_done(task: asyncio.Task[RelayStats]) -> None:
        if not task.cancelled() and task.exception() is not None:
            worker.request_stop()

    relay_task.add_done_callback(on_relay_done)
    try:
        stats = await worker.run()
    finally:
        if drain:
            relay.drain()  # `--exit-when-idle`: finish what the batches left in the outbox
        else:
            relay.request_stop()
    return stats, await relay_task


async def _relay(settings: ConsumerSettings, exit_when_idle: bool) -> int:
    relay = build_relay(settings)
    _handle_stop_signals([relay], settings.shutdown_timeout_s)
    # The same /healthz, /readyz and /metrics as `run`, on the same settings.
    probes = ProbeServer(
        RelayHealth(relay, settings.capture_warning_s),
        settings.consumer_http_host,
        settings.consumer_http_port,
        logger="relay",
    )
    try:
        await probes.start()
    except ProbeServerError as exc:
        log.error("cannot_start", error=str(exc))
        return EXIT_CANNOT
    try:
        return await _relay_alone(settings, relay, exit_when_idle)
    finally:
        await probes.stop()


async def _relay_alone(settings: ConsumerSettings, relay: Relay, exit_when_idle: bool) -> int:
    deadline = asyncio.get_running_loop().time() + settings.startup_timeout_s
    try:
        for what, check in relay_checks(settings):
            await until_ready(
                what, check, settings=settings, stopping=relay.stopping, deadline=deadline
            )
    except StopRequested:
        return 0
    except StartupError as exc:
        log.error("cannot_start", error=str(exc))
        return EXIT_CANNOT
    try:
        async with relay:
            stats = await relay.run(exit_when_idle=exit_when_idle)
    except Exception as exc:
        if (line := misconfiguration(exc, settings.database_url)) is None:
            raise
        log.error("stopped", error=line)
        return EXIT_CANNOT
    _summary("relay_stopped", {"outbox": stats.as_dict()}, settings)
    return 0


class _Stoppable(Protocol):
    def request_stop(self) -> None: ...


def _handle_stop_signals(stoppables: list[_Stoppable], shutdown_timeout_s: float) -> None:
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
        for stoppable in stoppables:
            stoppable.request_stop()
        # A backstop beyond the worker's own deadlines, for whatever none of them covers.
        loop.call_later(shutdown_timeout_s + 2.0, overdue)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


def main(argv: list[str] | None = None) -> int:
    parser, subcommands = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # what argparse would refuse with the top-level usage: the subcommand's
        subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        settings = ConsumerSettings()
    except ValidationError as exc:
        print(f"order-consumer: configuration error: {describe(exc)}", file=sys.stderr)
        return EXIT_CANNOT
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "migrate":
        return asyncio.run(_migrate(settings))
    if args.command in TOOLS:
        return asyncio.run(tools.run(args.command, args, settings))
    if args.command == "relay":
        return asyncio.run(_relay(settings, args.exit_when_idle))
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return asyncio.run(_run(settings, args.exit_when_idle))
    return uvloop.run(_run(settings, args.exit_when_idle))


if __name__ == "__main__":
    sys.exit(main())

"""`order-consumer` (also `python -m consumer`): migrate the database, or run a group member.

Settings are read from the environment once, here, and passed down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

import asyncpg
import structlog

from consumer import logs
from consumer.migrate import migrate
from consumer.runtime import tune_gc
from consumer.settings import ConsumerSettings
from consumer.worker import Worker

log = structlog.get_logger("consumer")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="order-consumer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="apply pending database migrations (safe to repeat)")
    run = commands.add_parser("run", help="join the consumer group and apply events")
    run.add_argument(
        "--exit-when-idle",
        type=float,
        metavar="SECONDS",
        help="return 0 once no message has arrived for this long",
    )
    return parser


async def _migrate(settings: ConsumerSettings) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    log.info("migrated", applied=applied)
    return 0


async def _run(settings: ConsumerSettings, exit_when_idle_s: float | None) -> int:
    worker = Worker(settings, exit_when_idle_s=exit_when_idle_s)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    async with worker:
        tune_gc()
        stats = await worker.run()
    summary = {
        "batches": stats.batches,
        "events": stats.events,
        "duplicates": stats.duplicates,
        "dead_lettered": stats.dead_lettered,
        "outcomes": dict(stats.outcomes),
        "orders": dict(stats.orders),
    }
    log.info("consumer_stopped", **summary)
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = ConsumerSettings()
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "migrate":
        return asyncio.run(_migrate(settings))
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return asyncio.run(_run(settings, args.exit_when_idle))
    return uvloop.run(_run(settings, args.exit_when_idle))


if __name__ == "__main__":
    sys.exit(main())

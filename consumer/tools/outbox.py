"""`order-consumer outbox`: what the relay has left to do, what it did, and a second chance.

  outbox            pending rows by kind, the oldest one's age, finished rows by outcome
  outbox --failed   the rows refused for good (Stripe actions, order events) and the
                    refunds owed (REFUND_UNFILLABLE=false), each with its order and why
  outbox retry ID…  make failed rows pending again (after fixing the cause at Stripe;
                    an owed refund: once a relay has REFUND_UNFILLABLE=true)
`--json` prints one JSON document instead of lines.

A Stripe action made pending again after a call is marked `verify_first`:
Stripe keeps its first answer to a key (a refusal too) for at least 24 h, so the
relay reads the intent first and, if the action is still needed, calls under a
new key generation (consumer/stripe_actions.py).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import asyncpg

from intentflow.consumer import database
from intentflow.consumer.claims import backlog, finished_by_outcome
from intentflow.consumer.exits import EXIT_OK
from intentflow.consumer.outbox import OWED
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.tools import cli
from intentflow.consumer.tools.cli import CannotRun

# What `--failed` prints of each row, tab-separated (`--json` gives every column).
FAILED_COLUMNS = (
    "id",
    "name",
    "payment_intent_id",
    "order_id",
    "outcome",
    "error_code",
    "last_error",
)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "outbox",
        help="show the outbox (Stripe actions and order events) and retry failed rows",
        description="Show pending outbox rows by kind and the oldest one's age, finished rows "
        "by outcome, or (--failed) the rows refused for good and the refunds owed; "
        "`retry ID…` makes them pending again. Guide: docs/operating.md, `The outbox`; "
        "settings: README, `Consumer configuration (environment)`.",
    )
    parser.add_argument(
        "--failed", action="store_true", help="list the rows refused for good and refunds owed"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("retry", nargs="*", metavar="retry ID", help="`retry` then outbox ids")


async def main(args: argparse.Namespace, settings: ConsumerSettings) -> int:
    if args.retry and not _retry_ids(args.retry):
        raise CannotRun("usage: outbox retry ID [ID …] (ids from `outbox --failed`)")
    conn = await cli.connect(settings, "outbox")
    try:
        if args.retry:
            report = await _retry(conn, _retry_ids(args.retry))
        else:
            report = await (_failed(conn) if args.failed else _status(conn))
    except Exception as exc:
        raise cli.unusable(exc, settings) from None
    finally:
        await database.close(conn, settings.db_connect_timeout_s)
    if args.json:
        print(json.dumps(report, default=str))
    else:
        for line in _lines(report):
            print(line)
    if report.get("not_failed"):
        # Asked to retry rows that are not failed: nothing was done to them.
        raise CannotRun(
            f"no failed row {', '.join(map(str, report['not_failed']))}: nothing done to it "
            "(`outbox --failed` lists the failed rows)"
        )
    return EXIT_OK


def _retry_ids(words: list[str]) -> list[int]:
    """The ids of `retry ID …`; empty when the words are not that."""
    if words[0] != "retry" or len(words) < 2 or not all(w.isdigit() for w in words[1:]):
        return []
    return sorted({int(w) for w in words[1:]})


async def _status(conn: asyncpg.Connection) -> dict[str, Any]:
    left = await backlog(conn)
    return {
        "pending": left.pending,
        "oldest_pending_s": (
            None if left.oldest_pending_s is None else round(left.oldest_pending_s, 3)
        ),
        "finished": await finished_by_outcome(conn),
    }


async def _failed(conn: asyncpg.Connection) -> dict[str, Any]:
    rows = await conn.fetch(
        "SELECT id, name, payment_intent_id, order_id, outcome, attempts, error_code,"
        " last_error, done_at FROM outbox WHERE state = 'failed' ORDER BY id"
    )
    return {"failed": [dict(r) for r in rows]}


async def _retry(conn: asyncpg.Connection, ids: list[int]) -> dict[str, list[int]]:
    done = await conn.fetch(
        """
        UPDATE outbox SET state = 'pending', outcome = NULL, done_at = NULL, due_at = now(),
            verify_first = (kind = 'stripe_action' AND attempts > 0 AND outcome <> $2)
        WHERE id = ANY($1::bigint[]) AND state = 'failed' RETURNING id
        """,
        ids,
        OWED,
    )
    again = sorted(r["id"] for r in done)
    return {"pending_again": again, "not_failed": sorted(set(ids) - set(again))}


def _lines(report: dict[str, Any]) -> list[str]:
    if "pending_again" in report:
        again = report["pending_again"]
        return [f"pending again: {', '.join(map(str, again))}"] if again else []
    if "failed" in report:
        return [
            "\t".join(str(r[column]) for column in FAILED_COLUMNS) for r in report["failed"]
        ] or ["no refused rows and no refunds owed"]
    lines = [f"pending {kind}: {n}" for kind, n in sorted(report["pending"].items())]
    oldest = report["oldest_pending_s"]
    lines.append("nothing pending" if oldest is None else f"oldest pending: {oldest:g} s")
    for kind, outcomes in sorted(report["finished"].items()):
        for outcome, n in sorted(outcomes.items()):
            lines.append(f"finished {kind} {outcome}: {n}")
    return lines

"""`order-consumer backfill`: what Stripe could not deliver, read from its Events API and
published to the events topic as the bridge would have.

Stripe retries a failed webhook for up to three days, then gives up; an outage
longer than that, a wrong secret or a disabled endpoint loses events for good. Stripe
keeps every event for 30 days (https://docs.stripe.com/api/events/list), so:
  1. the window, `--since` to `--until` (default now), is cut into slices of
     `--slice`, oldest first. It never starts before the line `order-consumer prune`
     last deleted the inbox before (`inbox_pruned`): an event applied then and sent
     again would be applied twice. A run and each account's progress are rows in
     PostgreSQL (`backfill_runs`, `backfill_progress`, migration 0007): a run cut
     short goes on from its last finished slice (`--resume`, or the same window again);
  2. each slice is read whole, every page, and put in creation order, oldest first
     (consumer/tools/events_api.py);
  3. each event is published as the bridge publishes a webhook (producer/webhook.py):
     keyed by `schemas.route`, with the contract's headers and `source: backfill`;
     one the bridge would not publish is skipped the same way (another mode than
     the key's, a type the endpoint is not asked to send, about no payment). An
     event the inbox already holds is not sent again ("already known"); one sent
     anyway, as a webhook lands meanwhile, is a duplicate the inbox absorbs: a
     backfill over a window the webhooks delivered changes nothing;
  4. a connected account's events (`--account acct_…`, or `all` of them, listed by
     GET /v1/accounts) are read with `Stripe-Account`, and published naming it.
`--dry-run` reads and prints what it would publish, and writes nothing anywhere.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiokafka.errors import KafkaError

from intentflow.consumer import database
from intentflow.consumer.connections import Connection
from intentflow.consumer.errors import describe
from intentflow.consumer.kafka_producer import Producer
from intentflow.consumer.preflight import TopicsMissing, check_topics
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.stripe_reader import StripeReader, StripeRefused, StripeUnavailable
from intentflow.consumer.tools import cli
from intentflow.consumer.tools.backfill_runs import (
    NothingToResume,
    Progress,
    Run,
    finish,
    open_run,
    progress_of,
)
from intentflow.consumer.tools.cli import CannotRun, Refused
from intentflow.consumer.tools.events_api import Record, read_slice, record, slices
from intentflow.consumer.tools.prune import duration, show

STRIPE_KEEPS = timedelta(days=30)
DEFAULT_SLICE = timedelta(hours=1)
# Stripe's clock stamps `created`, the database's the prune line: a margin for the skew.
PRUNE_MARGIN = timedelta(hours=1)
PLATFORM = ""  # the platform's own events, in backfill_progress.account


def when(text: str, now: datetime | None = None) -> datetime:
    """A time (ISO 8601; without a zone, UTC) or a duration before now (`3d`, `36h`)."""
    now = now or datetime.now(UTC)
    if re.fullmatch(r"(?:\d+[dhms])+", text):
        return now - duration(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a time (2026-12-01T08:00Z) nor a duration (3d, 36h)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass
class Tally:
    """What one account's backfill did; `skipped` the bridge would not publish either."""

    read: int = 0
    published: int = 0
    known: int = 0
    skipped: int = 0
    would: list[dict[str, Any]] = field(default_factory=list)  # --dry-run

    def add(self, other: Tally) -> None:
        self.read += other.read
        self.published += other.published
        self.known += other.known
        self.skipped += other.skipped
        self.would.extend(other.would)

    def as_dict(self) -> dict[str, int]:
        return {
            "read": self.read,
            "published": self.published,
            "already_known": self.known,
            "not_published": self.skipped,
        }


class PublishRefused(Exception):
    """The broker did not take an event; the slice stays to do."""


async def inbox_has(conn: Connection, event_ids: Sequence[str]) -> set[str]:
    rows = await conn.fetch(
        "SELECT event_id FROM processed_events WHERE event_id = ANY($1::text[])", list(event_ids)
    )
    return {row["event_id"] for row in rows}


async def backfill_account(
    reader: StripeReader,
    conn: Connection,
    producer: Producer | None,
    run: Run,
    progress: Progress,
    *,
    livemode: bool,
    slice_width: timedelta,
    on_slice: Callable[[str | None, int, Tally], None] | None = None,
) -> Tally:
    """One account's events from its progress to the run's end; `producer` None: dry run."""
    tally = Tally()
    account = progress.account or None
    for gte, lt in slices(progress.done_until, run.until, slice_width):
        # Checked per slice, not once: a run resumed days later, or a prune from cron
        # meanwhile, may have moved either line past where this run stands.
        if (why := await unreadable(conn, datetime.fromtimestamp(gte, UTC))) is not None:
            raise CannotRun(why)
        events = await read_slice(reader, account, gte, lt)
        done = Tally(read=len(events))
        records: list[tuple[dict[str, Any], Record]] = []
        for event in events:
            made = record(event, account, livemode)
            if made is None:
                done.skipped += 1
            else:
                records.append((event, made))
        known = await inbox_has(conn, [event["id"] for event, _ in records]) if records else set()
        fresh = [(event, made) for event, made in records if event["id"] not in known]
        done.known = len(records) - len(fresh)
        if producer is None:
            done.would = [
                {"id": e["id"], "type": e["type"], "key": m[1].decode(), "created": e["created"]}
                for e, m in fresh
            ]
        elif fresh:
            answers = await producer.send_all([made for _, made in fresh])
            refused = [(e["id"], err) for (e, _), err in zip(fresh, answers, strict=True) if err]
            if refused:
                event_id, error = refused[0]
                raise PublishRefused(
                    f"the broker refused {len(refused)} events, {event_id} among them "
                    f"({type(error).__name__}: {error})"
                )
        done.published = 0 if producer is None else len(fresh)
        if producer is not None:
            await progress.advance(conn, datetime.fromtimestamp(lt, UTC), done.as_dict())
        tally.add(done)
        if on_slice is not None:
            on_slice(account, lt, tally)
    return tally


def describe_window(since: datetime, until: datetime) -> str:
    return f"{since.isoformat(timespec='seconds')} to {until.isoformat(timespec='seconds')}"


def too_old(since: datetime, now: datetime) -> str | None:
    """Why a window starting at `since` cannot be read whole, or None."""
    if since < now - STRIPE_KEEPS:
        return (
            f"--since {since.isoformat(timespec='seconds')} is more than "
            f"{show(STRIPE_KEEPS)} ago: Stripe keeps events for {show(STRIPE_KEEPS)}"
        )
    return None


async def unreadable(conn: Connection, start: datetime) -> str | None:
    """Why events created from `start` on cannot be backfilled now, or None: Stripe no
    longer lists them, or the inbox may have lost the rows that make them harmless."""
    now = datetime.now(UTC)
    if (why := too_old(start, now)) is not None:
        return f"{why}: start a new backfill with a later --since"
    pruned = await conn.fetchval("SELECT before FROM inbox_pruned")
    if pruned is not None and start < pruned + PRUNE_MARGIN:
        return past_the_inbox(start, pruned)
    return None


def past_the_inbox(since: datetime, pruned: datetime) -> str:
    return (
        f"--since {since.isoformat(timespec='seconds')} is before "
        f"{(pruned + PRUNE_MARGIN).isoformat(timespec='seconds')}: `order-consumer prune` "
        f"deleted the inbox's rows before {pruned.isoformat(timespec='seconds')} (plus "
        f"{show(PRUNE_MARGIN)} for the clocks' skew), and an event applied before then and "
        "published again would be applied twice; give a later --since"
    )


def progress_bar(run: Run, width: int = 30) -> Callable[[str | None, int, Tally], None]:
    """A bar of the window done, per account, rewritten per slice on a terminal; nothing
    when stderr is not one (a log collector would keep every rewrite)."""
    start, span = run.since.timestamp(), max(1.0, (run.until - run.since).total_seconds())

    def show(account: str | None, lt: int, tally: Tally) -> None:
        if not sys.stderr.isatty():
            return
        done = min(1.0, max(0.0, (lt - start) / span))
        bar = "#" * round(done * width)
        sys.stderr.write(
            f"\r{account or 'platform'} [{bar:<{width}}] {done:4.0%} read {tally.read}, "
            f"published {tally.published}, already known {tally.known}   "
        )
        sys.stderr.flush()

    return show


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "backfill",
        help="publish the events Stripe could not deliver, read from its Events API",
        description="Read Stripe's Events API over a window (Stripe keeps 30 days) and publish "
        "each event the inbox does not hold to the events topic, as the bridge would. "
        "Needs STRIPE_API_KEY. Exit 0 when the window is done; 2 when Stripe, the "
        "database or the broker cannot be used (the progress is kept: --resume); 3 when "
        "the broker refuses an event. Guide: docs/operating.md, `Events Stripe could not "
        "deliver`; settings: README, `Consumer configuration (environment)`.",
    )
    window = parser.add_mutually_exclusive_group(required=True)
    window.add_argument(
        "--since", type=when, metavar="TIME", help="an ISO 8601 time, or a duration ago (3d)"
    )
    window.add_argument(
        "--resume", action="store_true", help="go on with the newest unfinished backfill"
    )
    parser.add_argument("--until", type=when, metavar="TIME", help="default: now")
    parser.add_argument(
        "--account",
        metavar="ACCOUNT",
        help="a connected account's events (acct_…), or `all` connected accounts' "
        "(default: the platform's own)",
    )
    parser.add_argument(
        "--slice", type=duration, default=DEFAULT_SLICE, help="read this much at once (1h)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list what would be published; write nothing"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")


RESUME_HINT = "the progress is kept: `order-consumer backfill --resume` goes on from there"


async def main(args: argparse.Namespace, settings: ConsumerSettings) -> int:
    if settings.stripe_api_key is None:
        raise CannotRun("STRIPE_API_KEY is not set: the Events API is read with it")
    if args.resume and (args.dry_run or args.until or args.account):
        raise CannotRun("--resume takes the run's own window and accounts: give it alone")
    api_key = settings.stripe_api_key.get_secret_value()
    now = datetime.now(UTC)
    since, until = args.since, min(args.until or now, now)
    if since is not None and since >= until:
        raise CannotRun(f"--since {since.isoformat()} is not before --until")
    conn = await cli.connect(settings, "backfill")
    try:
        if since is not None and (why := await unreadable(conn, since)) is not None:
            raise CannotRun(why)
        scope = args.account or "platform"
        if args.dry_run:
            run = Run(0, since, until, scope, resumed=False)
        else:
            run = await open_run(conn, since, until, scope, resume=args.resume)
        async with StripeReader(
            api_key, api_base=settings.stripe_api_base, timeout_s=settings.stripe_timeout_s
        ) as reader:
            livemode = StripeReader.livemode_of(api_key)
            return await _backfill(args, settings, conn, reader, run, livemode)
    except NothingToResume as exc:
        raise CannotRun(str(exc)) from None
    except (CannotRun, Refused):
        raise
    except Exception as exc:
        raise cli.unusable(exc, settings) from None
    finally:
        await database.close(conn, settings.db_connect_timeout_s)


async def _backfill(
    args: argparse.Namespace,
    settings: ConsumerSettings,
    conn: Connection,
    reader: StripeReader,
    run: Run,
    livemode: bool,
) -> int:
    producer = None if args.dry_run else await _producer(settings)
    total = Tally()
    try:
        scope = None if run.scope == "platform" else run.scope
        for found in await reader.accounts(scope):
            account = found or PLATFORM
            if args.dry_run:
                progress = Progress(run.id, account, run.since)
            else:
                progress = await progress_of(conn, run, account)
            total.add(
                await backfill_account(
                    reader,
                    conn,
                    producer,
                    run,
                    progress,
                    livemode=livemode,
                    slice_width=args.slice,
                    on_slice=progress_bar(run),
                )
            )
    except (StripeRefused, StripeUnavailable) as exc:
        kept = "" if args.dry_run else f"; {RESUME_HINT}"
        raise CannotRun(f"Stripe's API: {exc}: check STRIPE_API_KEY and --account{kept}") from None
    except PublishRefused as exc:
        raise Refused(f"{exc}; {RESUME_HINT}") from None
    finally:
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        if producer is not None:
            await producer.stop()
    per_account = {} if args.dry_run else await finish(conn, run)
    _report(args, run, total, per_account, reader)
    return 0


async def _producer(settings: ConsumerSettings) -> Producer:
    try:
        await check_topics(settings, [settings.kafka_topic])
        producer = Producer(
            settings,
            settings.kafka_topic,
            enable_idempotence=settings.kafka_enable_idempotence,
            max_request_bytes=settings.kafka_max_request_bytes,
        )
        await producer.start()
    except (KafkaError, OSError, TimeoutError, TopicsMissing) as exc:
        raise CannotRun(
            f"the broker at {settings.kafka_bootstrap_servers} cannot take events "
            f"({describe(exc, 200)}): check KAFKA_BOOTSTRAP_SERVERS and the topic; {RESUME_HINT}"
        ) from None
    return producer


def _report(
    args: argparse.Namespace,
    run: Run,
    total: Tally,
    per_account: dict[str, dict[str, int]],
    reader: StripeReader,
) -> None:
    window = describe_window(run.since, run.until)
    if args.json:
        document = {
            "run": run.id or None,
            "resumed": run.resumed,
            "since": run.since.isoformat(),
            "until": run.until.isoformat(),
            "scope": run.scope,
            "dry_run": args.dry_run,
            "this_session": total.as_dict(),
            "accounts": per_account,
            "stripe_requests": reader.requests,
            "stripe_waits": reader.waited,
        }
        if args.dry_run:
            document["would_publish"] = total.would
        print(orjson.dumps(document).decode())
        return
    for event in total.would:
        print(f"would publish {event['id']} {event['type']} key={event['key']}")
    verb = "would publish" if args.dry_run else "published"
    print(
        f"order-consumer backfill: {window} ({run.scope}{', resumed' if run.resumed else ''}): "
        f"read {total.read} events, {verb} {len(total.would) if args.dry_run else total.published}"
        f", {total.known} already known, {total.skipped} not the bridge's to publish; "
        f"{reader.requests} requests to Stripe, {reader.waited} waited out"
    )

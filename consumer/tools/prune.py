"""`order-consumer prune`: inbox retention, by age, in small batches beside running consumers.

An inbox row (processed_events) is what makes a redelivered event harmless
(invariant 2): an event whose row is gone is applied a second time if it comes
back. It can come back while Stripe retries it (up to 3 days) and, after that,
for as long as the events topic or its dead-letter topic keeps a copy (a group
reset to earlier offsets, a new group, `order-consumer dlq replay`). So:
  1. `broker_retention`: ask the broker how long each topic keeps a record:
     `retention.ms`, plus `segment.ms` when reported (Kafka deletes whole
     segments, so a record lives until the newest record of its segment has
     expired), and `cleanup.policy`. A broker that does not report
     retention.ms (the embedded Tansu broker reports only what a topic was
     created with) needs `--topic-retention`; a topic that keeps records
     forever refuses pruning;
  2. `minimum`: refuse an `--older-than` shorter than 3 days plus the longer
     of the two retentions;
  3. `record_line`: keep the line in `inbox_pruned`, for `order-consumer backfill`;
  4. `delete_batches`: delete rows processed before (the database's now -
     older_than), oldest first, `batch_size` rows per statement and the rest
     of the last one's consumer transaction (one is never split), each
     statement its own short transaction; then the order events the relay published before the same
     line (`delete_published`).
Beside a consumer, which only inserts new rows (processed_at = now()) and
never locks old ones, the delete never waits on the consumer; the consumer
can wait on a delete only for an event it is re-claiming, which is what
step 2 rules out.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import IncompatibleBrokerVersion, KafkaError, UnsupportedVersionError

from intentflow.consumer import database
from intentflow.consumer.database import Begin
from intentflow.consumer.errors import describe
from intentflow.consumer.preflight import TopicsMissing, check_topics
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.tools import cli
from intentflow.consumer.tools.cli import CannotRun
from intentflow.schemas import dlq_topic
from intentflow.schemas.kafka import client_kwargs

STRIPE_RETRY_WINDOW = timedelta(days=3)
DEFAULT_BATCH_SIZE = 1000

_UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
_DURATION = re.compile(r"(?:\d+[dhms])+")


def duration(text: str) -> timedelta:
    """`10d`, `36h`, `90m`, `45s`, or a sum of them (`3d12h`)."""
    if not _DURATION.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: write it like 10d, 36h, 90m or 3d12h"
        )
    return sum(
        (timedelta(**{_UNITS[unit]: int(n)}) for n, unit in re.findall(r"(\d+)([dhms])", text)),
        timedelta(),
    )


def show(span: timedelta) -> str:
    """A duration as `duration` reads it, largest units first (`3d12h`)."""
    seconds = int(span.total_seconds())
    parts = []
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


class Unsafe(Exception):
    """Pruning would not be safe, or its safety cannot be established: one line to act on."""


# A retention the broker reported: a span, or None for "kept forever".
Retention = timedelta | None


async def broker_retention(settings: ConsumerSettings) -> dict[str, Retention | str]:
    """Each topic's retention as the broker reports it, or the reason it cannot say (a str)."""
    with _quiet("aiokafka", unless=settings.log_level == "DEBUG"):
        return await _describe(settings)


@contextlib.contextmanager
def _quiet(logger: str, *, unless: bool) -> Iterator[None]:
    """Keep a library's error lines off stderr: the command's own one line says it all."""
    library = logging.getLogger(logger)
    level = library.level
    if not unless:
        library.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        library.setLevel(level)


async def _describe(settings: ConsumerSettings) -> dict[str, Retention | str]:
    topics = [settings.kafka_topic, dlq_topic(settings.kafka_topic)]
    # A topic that does not exist has nothing to replay, but neither can a consumer
    # run; and Tansu answers DescribeConfigs for a missing topic with no error.
    await check_topics(settings, topics)
    admin = AIOKafkaAdminClient(**client_kwargs(settings, "prune"))
    await admin.start()
    try:
        # Every config, not only the two named: Tansu closes the connection when a
        # DescribeConfigs request names its keys (Tansu 0.6.0, tried).
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic) for topic in topics]
        )
    except (UnsupportedVersionError, IncompatibleBrokerVersion):
        return dict.fromkeys(topics, "the broker does not support DescribeConfigs")
    finally:
        await admin.close()
    found: dict[str, Retention | str] = {}
    for response in responses:
        for error_code, error_message, _type, name, entries, *_ in response.resources:
            if error_code:
                found[name] = f"the broker refused to describe it ({error_message})"
                continue
            configs = {entry[0]: entry[1] for entry in entries}
            found[name] = _retention(configs)
    return found


def _retention(configs: dict[str, str | None]) -> Retention | str:
    policy = configs.get("cleanup.policy") or "delete"
    if "delete" not in policy.split(","):
        return None  # compaction keeps each key's last record for as long as the topic lives
    value = configs.get("retention.ms")
    if value is None:
        return "the broker does not report its retention.ms"
    if int(value) < 0:
        return None
    return timedelta(milliseconds=int(value) + int(configs.get("segment.ms") or 0))


def minimum(
    reported: dict[str, Retention | str], stated: timedelta | None
) -> tuple[timedelta, timedelta]:
    """(the shortest safe --older-than, the topic retention it counts), or Unsafe.

    `stated` (--topic-retention) stands in for what the broker cannot say, and
    never shortens what it does say: the longer of the two counts.
    """
    longest = stated or timedelta()
    for topic, retention in reported.items():
        if retention is None:
            raise Unsafe(
                f"topic {topic!r} keeps records forever (retention.ms -1 or a compacted "
                "cleanup.policy), so any event can be replayed and needs its inbox row: "
                "give both topics a finite retention.ms to prune"
            )
        if isinstance(retention, str):
            if stated is None:
                raise Unsafe(
                    f"cannot tell how long topic {topic!r} keeps records ({retention}): "
                    "pass --topic-retention DURATION, the longest retention.ms of "
                    + " and ".join(repr(t) for t in reported)
                )
            continue
        longest = max(longest, retention)
    return STRIPE_RETRY_WINDOW + longest, longest


# A batch is every row processed up to the time of the `batch_size`-th oldest,
# that time included. A consumer transaction's rows share its now(), and so does
# the order it creates; reconcile (order_source_event_in_inbox) checks every order
# from the oldest row left on. Cut at exactly batch_size rows, a batch could leave
# a transaction half deleted and its order without its source event until the
# next batch, or run. Whole transactions keep "every row since the oldest left is
# there" true after each batch, for any oldest-first deleter; the other remedy,
# reconcile exempting what prune recorded deleting, would need that record kept
# in step with every batch and would still flag an operator's own DELETE.
# No SKIP LOCKED: only another prune locks old rows (a consumer inserts new rows
# and never locks old ones), and skipping the rows it holds could delete newer
# rows past them, left behind if it rolls back; its short transaction is waited for.
_DELETE_BATCH = """
WITH through AS (
    SELECT max(processed_at) AS processed_at FROM (
        SELECT processed_at FROM processed_events
        WHERE processed_at < $1
        ORDER BY processed_at
        LIMIT $2
    ) oldest
), gone AS (
    DELETE FROM processed_events p USING through t
    WHERE p.processed_at <= t.processed_at
    RETURNING 1
)
SELECT count(*) FROM gone
"""


# Published order events older than the cutoff go too. Stripe actions stay: they
# are the record of what intentflow did to customers' money, one row per order
# at most, and their unique index is what keeps an action from being asked twice.
_DELETE_PUBLISHED = """
WITH doomed AS (
    SELECT id FROM outbox
    WHERE kind = 'order_event' AND state = 'done' AND done_at < $1
    ORDER BY done_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM outbox x USING doomed d WHERE x.id = d.id RETURNING 1
)
SELECT count(*) FROM gone
"""


async def cutoff(conn: asyncpg.Connection, older_than: timedelta) -> datetime:
    """The line to prune before. The database's clock wrote processed_at, so it draws it;
    drawn once per run, so that rows ageing past it meanwhile do not keep a run going."""
    line: datetime = await conn.fetchval("SELECT now() - $1::interval", older_than)
    return line


async def record_line(conn: asyncpg.Connection, before: datetime) -> None:
    """Keep the latest line pruned before, ahead of deleting: `order-consumer backfill`
    reads no event created before it (an event applied then may have lost its row)."""
    async with conn.transaction():
        await conn.execute(
            """
            INSERT INTO inbox_pruned (before) VALUES ($1)
            ON CONFLICT (only_row) DO UPDATE SET before = greatest(inbox_pruned.before, $1)
            """,
            before,
        )


async def delete_batches(
    conn: asyncpg.Connection, before: datetime, batch_size: int
) -> AsyncIterator[int]:
    """Delete inbox rows processed `before`, oldest first; yield each batch's count."""
    while True:
        # A transaction of its own: it sets the statement timeout (consumer/database.py).
        async with conn.transaction():
            count = int(await conn.fetchval(_DELETE_BATCH, before, batch_size))
        if count == 0:
            return
        yield count


async def delete_published(
    conn: asyncpg.Connection, before: datetime, batch_size: int
) -> AsyncIterator[int]:
    """Delete order events published `before`, oldest first; yield each batch's count."""
    while True:
        async with conn.transaction():
            count = int(await conn.fetchval(_DELETE_PUBLISHED, before, batch_size))
        if count == 0:
            return
        yield count


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "prune",
        help="delete inbox rows older than a duration (safe beside running consumers)",
        description="Delete processed_events rows older than DURATION, in small batches. "
        "Refuses a DURATION shorter than Stripe's retry window (3d) plus the longest "
        "retention of the events topic and its dead-letter topic. Guide: docs/operating.md, "
        "`Inbox retention`; settings: README, `Consumer configuration (environment)`.",
    )
    parser.add_argument(
        "--older-than", type=duration, required=True, metavar="DURATION",
        help="delete rows processed longer ago than this (10d, 36h, 90m)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE, metavar="N",
        help="rows per transaction, more to finish the last consumer transaction's rows "
        f"(default {DEFAULT_BATCH_SIZE})",
    )  # fmt: skip
    parser.add_argument(
        "--topic-retention", type=duration, metavar="DURATION",
        help="the longest retention of both topics, when the broker does not report it",
    )  # fmt: skip


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of rows above 0")
    return int(text)


async def main(args: argparse.Namespace, settings: ConsumerSettings) -> int:
    try:
        reported = await broker_retention(settings)
    except (KafkaError, OSError, TimeoutError) as exc:
        raise CannotRun(
            f"the broker at {settings.kafka_bootstrap_servers} did not answer "
            f"({describe(exc, 200)}): check KAFKA_BOOTSTRAP_SERVERS"
        ) from None
    except TopicsMissing as exc:
        raise CannotRun(str(exc)) from None
    try:
        least, retention = minimum(reported, args.topic_retention)
    except Unsafe as exc:
        raise CannotRun(f"refused: {exc}") from None
    if args.older_than < least:
        raise CannotRun(
            f"refused: --older-than {show(args.older_than)} is below the minimum {show(least)} "
            f"(Stripe retries for {show(STRIPE_RETRY_WINDOW)}, the topics keep records for "
            f"{show(retention)}): an event redelivered after its inbox row is gone is applied again"
        )
    begin = Begin(statement_timeout_ms=settings.db_statement_timeout_ms)
    conn = await cli.connect(settings, "prune", begin)
    deleted = batches = published = 0
    try:
        before = await cutoff(conn, args.older_than)
        await record_line(conn, before)
        async for count in delete_batches(conn, before, args.batch_size):
            deleted += count
            batches += 1
        async for count in delete_published(conn, before, args.batch_size):
            published += count
    except Exception as exc:
        # What was deleted stays deleted; a second run goes on from there.
        raise cli.unusable(exc, settings, f"; {deleted} rows were deleted before that") from None
    finally:
        await database.close(conn, settings.db_connect_timeout_s)
    print(
        f"order-consumer prune: deleted {deleted} inbox rows processed before "
        f"{before.isoformat()} in {batches} batches, and {published} published order events"
    )
    return 0

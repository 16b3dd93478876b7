"""`order-consumer dlq`: read the dead-letter topic, and replay chosen dead letters.

  1. `describe_topics`: one metadata request that may not create a topic says
     whether the dead-letter topic (and, to replay, the events topic) exists,
     and lists its partitions;
  2. `read_dead_letters`: a consumer outside any group (partitions assigned by
     hand, nothing ever committed) reads every partition of `<topic>.dlq` from
     its beginning up to its end offset at the time of the call;
  3. `list` prints one line (or one JSON object) per dead letter;
  4. `replay` chooses (`--at`, `--error` or `--all`), keeps one dead letter per
     original record (the dead-letter topic is at least once: a copy is
     possible), and sends each to the events topic with its original key,
     value and headers, the dead-letter headers replaced by `replayed-from`;
     it waits for every acknowledgement.

Replaying is safe to repeat: the consumer's inbox (`processed_events`, keyed
by the Stripe event id) makes an event that was already applied change
nothing. That holds only while the inbox still has the event's id: replay
within the retention that `order-consumer prune` keeps. And only once the
cause is fixed, or the event comes straight back here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError, UnknownTopicOrPartitionError, for_code
from aiokafka.protocol.metadata import MetadataRequest

from intentflow.consumer.errors import Fault, classify, describe
from intentflow.consumer.exits import EXIT_CANNOT, EXIT_REFUSED
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.tools.cli import CannotRun, Refused
from intentflow.schemas import (
    HEADER_ERROR,
    HEADER_ERROR_DETAIL,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_ORIGINAL_OFFSET,
    HEADER_ORIGINAL_PARTITION,
    HEADER_RECEIVED_AT,
    HEADER_REPLAYED_FROM,
    dlq_topic,
)
from intentflow.schemas.kafka import client_kwargs

CLIENT_ROLE = "dlq"  # client.id: KAFKA_CLIENT_ID-dlq
DETAIL_WIDTH = 100
# A partition that yields nothing for this long before reaching its end offset
# (a broker that stopped answering fetches) ends the read with one line.
STALLED_AFTER_S = 30.0

# Written by the consumer with the dead letter (consumer/dlq.py); a
# replay drops them, and any earlier `replayed-from`, before adding its own.
_NOT_REPLAYED = frozenset(
    {
        HEADER_ERROR,
        HEADER_ERROR_DETAIL,
        HEADER_ORIGINAL_PARTITION,
        HEADER_ORIGINAL_OFFSET,
        HEADER_REPLAYED_FROM,
    }
)


class DlqError(Exception):
    """What ends a dlq command early: one line for the operator, and the exit status."""

    def __init__(self, message: str, status: int = EXIT_CANNOT) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of the dead-letter topic, at `partition`:`offset` of that topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @classmethod
    def of(cls, record: Any) -> DeadLetter:
        headers = tuple(record.headers or ())
        return cls(record.partition, record.offset, record.key, record.value, headers)

    @property
    def position(self) -> str:
        return f"{self.partition}:{self.offset}"

    def header(self, name: str) -> str | None:
        """The last value of header `name` (the dead-letter headers come after the original's)."""
        found = [value for key, value in self.headers if key == name]
        return found[-1].decode("utf-8", "replace") if found else None

    @property
    def error(self) -> str | None:
        return self.header(HEADER_ERROR)

    @property
    def original(self) -> str | None:
        """`partition:offset` of the record in the events topic that was dead-lettered."""
        partition = self.header(HEADER_ORIGINAL_PARTITION)
        offset = self.header(HEADER_ORIGINAL_OFFSET)
        return None if partition is None or offset is None else f"{partition}:{offset}"

    def replay_headers(self) -> list[tuple[str, bytes]]:
        kept = [(key, value) for key, value in self.headers if key not in _NOT_REPLAYED]
        return [*kept, (HEADER_REPLAYED_FROM, self.position.encode())]

    def as_json(self) -> dict[str, Any]:
        return {
            "dlq": self.position,
            "original": self.original,
            "event_id": self.header(HEADER_EVENT_ID),
            "event_type": self.header(HEADER_EVENT_TYPE),
            "key": None if self.key is None else self.key.decode("utf-8", "replace"),
            "error": self.error,
            "error_detail": self.header(HEADER_ERROR_DETAIL),
            "received_at": self.header(HEADER_RECEIVED_AT),
            "replayed_from": self.header(HEADER_REPLAYED_FROM),
        }

    def line(self) -> str:
        fields = self.as_json()
        detail = " ".join((fields["error_detail"] or "").split())
        if len(detail) > DETAIL_WIDTH:
            detail = detail[: DETAIL_WIDTH - 1] + "…"
        shown = [
            f"dlq {self.position}",
            f"from {fields['original'] or '-'}",
            fields["event_id"] or "-",
            fields["event_type"] or "-",
            f"key={fields['key'] if fields['key'] is not None else '-'}",
            fields["error"] or "-",
            detail or "-",
        ]
        return "  ".join(shown)


def _position(text: str) -> tuple[int, int]:
    partition, colon, offset = text.partition(":")
    if not (colon and partition.isdigit() and offset.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not PARTITION:OFFSET (as `dlq list` shows)")
    return int(partition), int(offset)


def add_parser(commands: Any) -> None:
    dlq = commands.add_parser(
        "dlq",
        help="list dead letters, or replay them to the events topic",
        description="Read the dead-letter topic without joining a group; replay chosen dead "
        "letters once their cause is fixed. Guide: docs/operating.md, `Dead letters`; "
        "settings: README, `Consumer configuration (environment)`.",
    )
    tools = dlq.add_subparsers(dest="dlq_command", required=True)
    listing = tools.add_parser("list", help="one line per dead letter, with its reason")
    listing.add_argument("--error", metavar="CODE", help="only those with this `error` header")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    replay = tools.add_parser("replay", help="send dead letters back to the events topic")
    chosen = replay.add_mutually_exclusive_group()
    chosen.add_argument(
        "--at", type=_position, nargs="+", action="extend", metavar="PARTITION:OFFSET",
        help="the dead letters at these positions of the dead-letter topic",
    )  # fmt: skip
    chosen.add_argument("--error", metavar="CODE", help="every dead letter with this error")
    chosen.add_argument("--all", action="store_true", help="every dead letter")
    replay.add_argument("--dry-run", action="store_true", help="show what would be replayed")


async def main(args: argparse.Namespace, settings: ConsumerSettings) -> int:
    if settings.log_level != "DEBUG":
        # Every broker failure ends the command with its own line; aiokafka's
        # log lines about the same failure would only bury it.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        if args.dlq_command == "list":
            return await _list(settings, error=args.error, as_json=args.json)
        return await _replay(settings, args)
    except DlqError as exc:
        raise (Refused if exc.status == EXIT_REFUSED else CannotRun)(str(exc)) from None
    except BrokenPipeError:
        # stdout's reader left (`dlq list | head`): not the broker's doing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (KafkaError, OSError) as exc:
        broker = f"the broker at {settings.kafka_bootstrap_servers}"
        if classify(exc) is Fault.ENVIRONMENT:
            line = f"{broker} did not answer ({_reason(exc)}): check KAFKA_BOOTSTRAP_SERVERS"
        else:
            line = f"{broker} refused the request ({_reason(exc)}): check this client's ACLs"
        raise CannotRun(line) from None


def _reason(exc: BaseException) -> str:
    """`describe`, without the class name aiokafka's own messages already start with."""
    text = describe(exc, 200)
    doubled = f"{type(exc).__name__}: "
    return text.removeprefix(doubled) if text.startswith(doubled * 2) else text


async def _list(settings: ConsumerSettings, *, error: str | None, as_json: bool) -> int:
    topic = dlq_topic(settings.kafka_topic)
    # Notices go to stderr under --json, so that stdout stays one object per line.
    notices = sys.stderr if as_json else sys.stdout
    partitions = (await describe_topics(settings, [topic]))[topic]
    if partitions is None:
        print(f"no dead letters (topic {topic} does not exist)", file=notices)
        return 0
    letters = [
        letter
        for letter in await read_dead_letters(settings, topic, partitions)
        if error is None or letter.error == error
    ]
    for letter in letters:
        print(json.dumps(letter.as_json()) if as_json else letter.line())
    which = f" with error {error}" if error is not None else ""
    print(f"{len(letters)} dead letter(s){which} in {topic}", file=notices)
    return 0


async def _replay(settings: ConsumerSettings, args: argparse.Namespace) -> int:
    if not (args.at or args.error or args.all):
        raise DlqError(
            "choose what to replay: --at PARTITION:OFFSET ..., --error CODE or --all "
            "(`order-consumer dlq list` shows them)"
        )
    source = dlq_topic(settings.kafka_topic)
    found = await describe_topics(settings, [settings.kafka_topic, source])
    if found[settings.kafka_topic] is None:
        # Producing would let a broker that auto-creates topics make it with one partition.
        raise DlqError(f"topic {settings.kafka_topic} does not exist: check KAFKA_TOPIC")
    partitions = found[source]
    if partitions is None and not args.at:
        print(f"no dead letters (topic {source} does not exist): nothing to replay")
        return 0
    letters = [] if partitions is None else await read_dead_letters(settings, source, partitions)
    chosen = _choose(letters, at=args.at, error=args.error)
    unique = _one_per_original(chosen)
    copies = len(chosen) - len(unique)
    skipped = f"; {copies} copies of the same original left out" if copies else ""
    if args.dry_run:
        for letter in unique:
            print(letter.line())
        print(f"would replay {len(unique)} dead letter(s) to {settings.kafka_topic}{skipped}")
        return 0
    failed = await send(settings, unique)
    print(f"replayed {len(unique) - len(failed)} dead letter(s) to {settings.kafka_topic}{skipped}")
    if failed:
        letter, exc = failed[0]
        again = " ".join(f.position for f, _ in failed)
        raise DlqError(
            f"the broker refused {len(failed)} of them (dlq {letter.position}: "
            f"{_reason(exc)}): fix the cause, then replay them with --at {again}",
            EXIT_REFUSED,
        )
    return 0


def _choose(
    letters: list[DeadLetter], *, at: list[tuple[int, int]] | None, error: str | None
) -> list[DeadLetter]:
    if at:
        by_position = {(letter.partition, letter.offset): letter for letter in letters}
        missing = [f"{p}:{o}" for p, o in at if (p, o) not in by_position]
        if missing:
            raise DlqError(
                f"no dead letter at {', '.join(missing)}: nothing was replayed "
                "(`order-consumer dlq list` shows the positions)"
            )
        return [by_position[p] for p in dict.fromkeys(at)]
    if error is not None:
        return [letter for letter in letters if letter.error == error]
    return letters


def _one_per_original(letters: Iterable[DeadLetter]) -> list[DeadLetter]:
    """The first dead letter of each original record (deduplicated on its original position)."""
    first: dict[str, DeadLetter] = {}
    for letter in letters:
        first.setdefault(letter.original or f"dlq {letter.position}", letter)
    return list(first.values())


async def describe_topics(
    settings: ConsumerSettings, topics: list[str]
) -> dict[str, list[int] | None]:
    """The partitions of each topic, None for one that does not exist. Creates nothing."""
    client = AIOKafkaClient(**client_kwargs(settings, CLIENT_ROLE))
    try:
        await client.bootstrap()
        request = MetadataRequest(topics, allow_auto_topic_creation=False)
        response = await client.send(client.get_random_node(), request)
    finally:
        await client.close()
    found: dict[str, list[int] | None] = {}
    for error_code, name, *_, partitions in response.topics:
        error = for_code(error_code) if error_code else None
        if error is UnknownTopicOrPartitionError:
            found[name] = None
        elif error is not None:
            raise DlqError(f"topic {name} cannot be described ({error.__name__}): check the ACLs")
        else:
            found[name] = sorted(partition[1] for partition in partitions)
    return found


async def read_dead_letters(
    settings: ConsumerSettings, topic: str, partitions: list[int]
) -> list[DeadLetter]:
    """Every record of `topic` below the end offsets at the time of the call, in position order."""
    consumer = AIOKafkaConsumer(
        **client_kwargs(settings, CLIENT_ROLE),
        group_id=None,  # no group: nothing to join, nothing ever committed
        enable_auto_commit=False,
        # Not only the seek below: the reset that assign() starts in the background
        # would otherwise resolve to the end, sometimes after the seek (seen on Tansu).
        auto_offset_reset="earliest",
        fetch_max_bytes=settings.fetch_max_bytes,
        max_partition_fetch_bytes=settings.max_partition_fetch_bytes,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        pending = {tp for tp in tps if await consumer.position(tp) < ends[tp]}
        letters: list[DeadLetter] = []
        loop = asyncio.get_running_loop()
        progress_at = loop.time()
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=200)
            for tp, records in batch.items():
                letters.extend(DeadLetter.of(r) for r in records if r.offset < ends[tp])
                progress_at = loop.time()
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
            if pending and loop.time() - progress_at > STALLED_AFTER_S:
                stuck = ", ".join(str(tp.partition) for tp in sorted(pending))
                raise DlqError(
                    f"reading {topic} stalled on partition(s) {stuck} for {STALLED_AFTER_S:g} s: "
                    "check the broker, then run the command again"
                )
    finally:
        await consumer.stop()
    return sorted(letters, key=lambda letter: (letter.partition, letter.offset))


async def send(
    settings: ConsumerSettings, letters: list[DeadLetter]
) -> list[tuple[DeadLetter, KafkaError]]:
    """Replay `letters` to the events topic; return those the broker did not acknowledge."""
    # The same producer settings as the consumer's dead-letter producer.
    producer = AIOKafkaProducer(
        **client_kwargs(settings, CLIENT_ROLE),
        acks="all",
        enable_idempotence=settings.kafka_enable_idempotence,
        max_request_size=settings.kafka_max_request_bytes,
    )
    try:
        await producer.start()
        sent: list[tuple[DeadLetter, asyncio.Future[Any]]] = []
        failed: list[tuple[DeadLetter, KafkaError]] = []
        for letter in letters:
            try:
                # The key picks the partition (murmur2, as the bridge does): the
                # intent's partition, where its other events are.
                ack = await producer.send(
                    settings.kafka_topic, letter.value, key=letter.key,
                    headers=letter.replay_headers(),
                )  # fmt: skip
            except KafkaError as exc:  # refused before sending: too large
                failed.append((letter, exc))
            else:
                sent.append((letter, ack))
        for letter, ack in sent:
            try:
                await ack
            except KafkaError as exc:
                failed.append((letter, exc))
    finally:
        await producer.stop()
    return failed

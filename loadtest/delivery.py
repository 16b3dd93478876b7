"""Delivery as Stripe does it at its worst: copies, disorder, bursts, retries after a 503.

`plan` turns a scenario into the sequence of sends: every event 1 to K times,
a share of them later than events Stripe created after them, and some copies
of one event sent at the same moment (Stripe retrying while the first attempt
is still in flight, or two webhook endpoints of one account). `deliver` sends
the plan through a `Sender` at a target rate, or as fast as C concurrent
senders go: over HTTP to the bridge, signed, retrying a 503 with back-off as
Stripe would (`HttpSender`), or straight to Kafka with the bridge's headers
(`KafkaSender`). `Tally` counts what happened, second by second.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from intentflow.loadtest.workload import Scenario
from intentflow.schemas import contract_headers, encode_key
from intentflow.stripekit import events
from intentflow.stripekit.signing import stripe_signature

# Stripe retries for days with growing gaps; the harness compresses that to
# 50 ms doubling up to 1 s, and gives up on one delivery after RETRY_FOR_S.
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0
RETRY_FOR_S = 120.0


@dataclass(frozen=True)
class Send:
    """One moment of the plan: `copies` deliveries of one event, all at once."""

    event_id: str
    intent_id: str
    body: bytes
    copies: int


@dataclass(frozen=True)
class Plan:
    sends: list[Send]
    events: int  # distinct events
    out_of_order: int  # events first sent before an event of their intent created earlier

    @property
    def deliveries(self) -> int:
        return sum(s.copies for s in self.sends)


def plan(
    scenario: Scenario,
    *,
    duplicates: int = 3,
    reorder: float = 0.2,
    concurrent: float = 0.3,
    seed: int = 7,
) -> Plan:
    """The sends for `scenario`: each event 1..`duplicates` times, `reorder` of them late.

    Intents start one after another and each intent's events follow at random
    gaps, interleaved with other intents' events. A reordered event is pushed
    past the next events of its intent. Of an event's extra copies, a share
    `concurrent` goes out at the same moment as the first; the rest arrive
    later, as Stripe's retries do.
    """
    rng = random.Random(seed)
    timed: list[tuple[float, Send]] = []
    for start, history in enumerate(scenario.histories):
        at = float(start)
        for evt in history.events:
            at += rng.uniform(1, 40)
            when = at + (rng.uniform(30, 120) if rng.random() < reorder else 0.0)
            copies = rng.randint(1, max(1, duplicates))
            together = 1 + sum(rng.random() < concurrent for _ in range(copies - 1))
            body = events.encode(evt)
            timed.append((when, Send(evt["id"], history.intent_id, body, together)))
            for _ in range(copies - together):
                retry = Send(evt["id"], history.intent_id, body, 1)
                timed.append((when + rng.uniform(1, 400), retry))
    timed.sort(key=lambda pair: pair[0])
    sends = [s for _, s in timed]
    return Plan(sends, len(scenario.events), _out_of_order(scenario, sends))


def _out_of_order(scenario: Scenario, sends: list[Send]) -> int:
    """How many events were first sent while an earlier event of their intent was not yet."""
    rank = {e["id"]: i for h in scenario.histories for i, e in enumerate(h.events)}
    sent_ranks: dict[str, set[int]] = {}
    late = 0
    seen: set[str] = set()
    for s in sends:
        if s.event_id in seen:
            continue
        seen.add(s.event_id)
        before = sent_ranks.setdefault(s.intent_id, set())
        if len(before) < rank[s.event_id]:  # some earlier event of this intent is still to come
            late += 1
        before.add(rank[s.event_id])
    return late


@dataclass
class Tally:
    """What the senders did, with acknowledgements per second since `started`."""

    started: float = field(default_factory=time.time)
    attempts: int = 0
    acked: int = 0
    retried: int = 0  # attempts answered 503 (or refused by the broker) and tried again
    given_up: int = 0
    answers: Counter[int] = field(default_factory=Counter)  # HTTP status -> count
    acked_ids: set[str] = field(default_factory=set)
    acked_per_second: Counter[int] = field(default_factory=Counter)

    def ack(self, event_id: str) -> None:
        self.acked += 1
        self.acked_ids.add(event_id)
        self.acked_per_second[int(time.time() - self.started)] += 1


async def _until_acknowledged(
    send: Send, tally: Tally, attempt: Callable[[], Awaitable[bool | None]]
) -> None:
    """Repeat `attempt` until it is acknowledged (True). A refusal that may pass later
    (False) is retried with jittered back-off, as Stripe does, for up to RETRY_FOR_S;
    one that will not (None) is given up at once."""
    deadline = time.monotonic() + RETRY_FOR_S
    pause = RETRY_FIRST_S
    while True:
        tally.attempts += 1
        acknowledged = await attempt()
        if acknowledged:
            tally.ack(send.event_id)
            return
        if acknowledged is None or time.monotonic() > deadline:
            tally.given_up += 1
            return
        tally.retried += 1
        await asyncio.sleep(pause * random.uniform(0.5, 1.0))
        pause = min(RETRY_MAX_S, pause * 2)


class Sender(Protocol):
    async def send(self, send: Send, tally: Tally) -> None:
        """Deliver one copy; return once it is acknowledged or given up."""
        ...

    async def close(self) -> None: ...


class HttpSender:
    """Signed POSTs to the bridge over keep-alive connections, one per concurrent sender.

    A minimal HTTP/1.1 client on asyncio streams: the requests are all alike,
    and a general client would spend more CPU per request than the bridge does
    (the harness shares the machine with what it measures).
    """

    def __init__(self, host: str, port: int, secret: str, connections: int) -> None:
        self._host, self._port, self._secret = host, port, secret
        self._idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = (
            asyncio.Queue()
        )
        for _ in range(connections):
            self._idle.put_nowait(None)  # connected on first use

    async def send(self, send: Send, tally: Tally) -> None:
        async def attempt() -> bool | None:
            status = await self._post(send.body)
            tally.answers[status] += 1
            if 200 <= status < 300:
                return True
            return False if status in (0, 503) else None  # 503 or no answer: Stripe retries

        await _until_acknowledged(send, tally, attempt)

    async def _post(self, body: bytes) -> int:
        """The answer's status, or 0 when the connection failed."""
        conn = await self._idle.get()
        try:
            if conn is None:
                conn = await asyncio.open_connection(self._host, self._port)
            reader, writer = conn
            signature = stripe_signature(body, self._secret)
            writer.write(
                b"POST /webhooks/stripe HTTP/1.1\r\nHost: %s\r\n"
                b"Content-Type: application/json\r\nStripe-Signature: %s\r\n"
                b"Content-Length: %d\r\n\r\n%s"
                % (self._host.encode(), signature.encode(), len(body), body)
            )
            status, keep = await _read_response(reader)
            if not keep:
                writer.close()
                conn = None
            return status
        except (OSError, asyncio.IncompleteReadError, ValueError):
            if conn is not None:
                conn[1].transport.abort()
            conn = None
            return 0
        finally:
            self._idle.put_nowait(conn)

    async def close(self) -> None:
        while not self._idle.empty():
            conn = self._idle.get_nowait()
            if conn is not None:
                conn[1].close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, whether the connection stays open), the body read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, keep = 0, True
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            keep = False
    if length:
        await reader.readexactly(length)
    return status, keep


class KafkaSender:
    """Straight to the topic, keyed and stamped as the bridge would (`--via kafka`)."""

    def __init__(self, bootstrap_servers: str, topic: str, *, enable_idempotence: bool) -> None:
        self._topic = topic
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            client_id="replay-duplicates",
            acks="all",
            enable_idempotence=enable_idempotence,
            request_timeout_ms=5000,
        )

    async def start(self) -> KafkaSender:
        await self._producer.start()
        return self

    async def send(self, send: Send, tally: Tally) -> None:
        async def attempt() -> bool:
            headers = contract_headers(send.event_id, _event_type(send), int(time.time() * 1000))
            try:
                await self._producer.send_and_wait(
                    self._topic, send.body, key=encode_key(send.intent_id), headers=headers
                )
            except KafkaError:  # refused or timed out: retried, as the bridge's caller would
                return False
            return True

        await _until_acknowledged(send, tally, attempt)

    async def close(self) -> None:
        await self._producer.stop()


def _event_type(send: Send) -> str:
    # The type sits near the end of the body; parsing it back is cheaper than carrying it.
    tail = send.body[-120:]
    start = tail.rfind(b'"type":"') + 8
    return tail[start : tail.index(b'"', start)].decode()


async def deliver(
    the_plan: Plan,
    sender: Sender,
    tally: Tally,
    *,
    rate: float = 0.0,
    senders: int = 32,
    on_sent: Callable[[int], None] | None = None,
    dropped: Callable[[Send], bool] | None = None,
) -> None:
    """Send every planned copy: at `rate` deliveries/s (0: as fast as possible), at most
    `senders` in flight. Copies of one moment start together; those `dropped` says are
    (a webhook outage) are not sent, and not tried again."""
    slots = asyncio.Semaphore(senders)
    started = time.monotonic()
    sent = 0
    pending: set[asyncio.Task[None]] = set()

    async def one(send: Send) -> None:
        try:
            await sender.send(send, tally)
        finally:
            slots.release()

    for moment in the_plan.sends:
        if rate > 0:
            due = started + sent / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        if dropped is not None and dropped(moment):
            sent += moment.copies
            if on_sent is not None:
                on_sent(sent)
            continue
        # Every copy's sender first, so they leave together (as many as there are senders).
        together = min(moment.copies, senders)
        for _ in range(together):
            await slots.acquire()
        for i in range(moment.copies):
            if i >= together:
                await slots.acquire()
            task = asyncio.ensure_future(one(moment))
            pending.add(task)
            task.add_done_callback(pending.discard)
        sent += moment.copies
        if on_sent is not None:
            on_sent(sent)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*pending)

"""`POST /webhooks/stripe`: one Stripe delivery, from raw bytes to a broker acknowledgement.

The promise: a 2xx means the event is in Kafka. The steps, in order: refuse an
oversized body (413), verify the signature over the raw bytes (400), check the
body is a Stripe event (400), pick the key (no payment intent: 200, not
published), publish the raw bytes unchanged and wait for the ack (200), or
answer 503 so Stripe retries.

It is a plain ASGI app rather than a Starlette endpoint: it is the hot path,
and the framework's request, response and middleware layers cost a measurable
share of the CPU per webhook (see README-bridge.md, bench).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from producer.logs import EventLog
from producer.metrics import BridgeMetrics
from producer.publisher import Publisher, PublishError
from producer.signature import SignatureError, SignatureVerifier
from schemas import contract_headers, encode_key, payment_intent_key

SIGNATURE_HEADER = b"stripe-signature"


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


Answer = tuple[int, dict[str, Any]]

OUTCOMES = (
    "published",
    "ignored",
    "verified",
    "unavailable",
    "bad_signature",
    "bad_body",
    "too_large",
    "disconnected",
)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole body, refusing more than `limit` bytes before reading them all."""
    declared = _header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_event(body: bytes) -> dict[str, Any] | None:
    """The event as a dict when it looks like a Stripe event (`id`, `type`, `data.object`)."""
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict):
        return None
    data = event.get("data")
    if (
        isinstance(event.get("id"), str)
        and isinstance(event.get("type"), str)
        and isinstance(data, dict)
        and isinstance(data.get("object"), dict)
    ):
        return event
    return None


class WebhookEndpoint:
    """The ASGI app for `POST /webhooks/stripe`."""

    def __init__(
        self,
        verifier: SignatureVerifier,
        publisher: Publisher | None,
        metrics: BridgeMetrics,
        max_body_bytes: int,
        log: EventLog,
    ) -> None:
        self._verifier = verifier
        # None only in the bench's baseline: verify and answer, publish nothing.
        self._publisher = publisher
        self._metrics = metrics
        self._max_body_bytes = max_body_bytes
        self._log = log
        # Label lookups resolved once: `labels()` hashes and locks on every call.
        self._outcomes = {outcome: metrics.webhooks.labels(outcome) for outcome in OUTCOMES}

    def _count(self, outcome: str) -> None:
        self._outcomes[outcome].inc()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status, fields = await self.handle(scope, receive)
        payload = orjson.dumps(fields)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def handle(self, scope: Scope, receive: Receive) -> Answer:
        received_at_ms = time.time_ns() // 1_000_000
        try:
            body = await read_body(scope, receive, self._max_body_bytes)
        except BodyTooLarge:
            self._count("too_large")
            self._log.info("webhook", outcome="too_large")
            reason = f"body over {self._max_body_bytes} bytes"
            return 413, {"outcome": "too_large", "reason": reason}
        except ClientGone:
            self._count("disconnected")
            return 400, {"outcome": "disconnected"}

        try:
            self._verifier.verify(body, _header(scope, SIGNATURE_HEADER))
        except SignatureError as exc:
            self._count("bad_signature")
            self._metrics.signature_failures.labels(exc.reason).inc()
            self._log.info("webhook", outcome="bad_signature", reason=exc.reason)
            return 400, {"outcome": "bad_signature", "reason": exc.reason}

        event = parse_event(body)
        if event is None:
            self._count("bad_body")
            self._log.info("webhook", outcome="bad_body")
            return 400, {"outcome": "bad_body", "reason": "not a Stripe event"}
        event_id: str = event["id"]
        event_type: str = event["type"]

        intent_id = payment_intent_key(event)
        if intent_id is None:
            self._count("ignored")
            self._log.info("webhook", outcome="ignored", event_id=event_id, event_type=event_type)
            return 200, {"outcome": "ignored"}

        if self._publisher is None:
            self._count("verified")
            return 200, {"outcome": "verified"}

        started = time.perf_counter()
        try:
            published = await self._publisher.publish(
                encode_key(intent_id),
                body,
                contract_headers(event_id, event_type, received_at_ms),
            )
        except PublishError as exc:
            self._count("unavailable")
            self._log.warning(
                "webhook",
                outcome="unavailable",
                event_id=event_id,
                event_type=event_type,
                payment_intent_id=intent_id,
                error=str(exc),
            )
            return 503, {"outcome": "unavailable", "reason": "event store unavailable, retry later"}
        self._metrics.publish_seconds.observe(time.perf_counter() - started)
        self._count("published")
        self._log.info(
            "webhook",
            outcome="published",
            event_id=event_id,
            event_type=event_type,
            payment_intent_id=intent_id,
            partition=published.partition,
            offset=published.offset,
        )
        return 200, {
            "outcome": "published",
            "partition": published.partition,
            "offset": published.offset,
        }

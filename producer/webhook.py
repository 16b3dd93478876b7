"""`POST /webhooks/stripe`: one Stripe delivery, from raw bytes to a broker acknowledgement.

The promise: a 2xx means the event is in Kafka, or is one the bridge never
publishes (`ignored`, `other_mode`). The steps, in order, the first
two before any of the body is read: refuse a request without a well-formed
Stripe-Signature header (400) or that declares an oversized body (413); read the
body (413 once it grows past the limit); verify the signature over the raw bytes
(400); refuse a thin event (400: it carries no object, the endpoint must send
snapshot payloads); check the body is a Stripe event (400); answer an event of
the mode STRIPE_LIVEMODE does not serve 200 `other_mode`, unpublished; pick the
key (`schemas.route`: the payment intent; for an object of a charge made
without one, the charge id; for a Checkout Session that names none, the session
id; an event about no payment, or a session of another mode than `payment`: 200
`ignored`, unpublished); publish the raw bytes unchanged and wait for the ack
(200), or answer 503 so Stripe retries (the broker away or slow), or 500 when
the broker refuses the event for good (Stripe retries too, while an operator
fixes it).

An answer given before the body was read keeps the connection open only when
the rest is a declared length within the limit: uvicorn then reads and drops it
(within BODY_TIMEOUT_S), and the next request on the connection parses cleanly.
Otherwise (chunked, larger, or announced by `Expect: 100-continue`, whose
client may never send it) the answer says `connection: close`.

It is a plain ASGI app rather than a Starlette endpoint: it is the hot path,
and the framework's request, response and middleware layers cost a measurable
share of the CPU per webhook (docs/benchmarks.md, "Bridge").
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from intentflow.producer.logs import EventLog
from intentflow.producer.metrics import BridgeMetrics
from intentflow.producer.publisher import BrokerRefused, Publisher, PublishError
from intentflow.producer.signature import SignatureError, SignatureVerifier
from intentflow.schemas import (
    KEY_CHARGE,
    KEY_CHECKOUT_SESSION,
    KEY_PAYMENT_INTENT,
    Route,
    contract_headers,
    encode_key,
    route,
)

SIGNATURE_HEADER = b"stripe-signature"


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


# Status, body, and whether to close the connection after it.
Answer = tuple[int, dict[str, Any], bool]

OUTCOMES = (
    "published",
    "published_without_intent",
    "ignored",
    "other_mode",
    "verified",
    "unavailable",
    "rejected_by_broker",
    "bad_signature",
    "bad_body",
    "thin_event",
    "too_large",
    "disconnected",
)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def declares_too_much(scope: Scope, limit: int) -> bool:
    declared = _header(scope, b"content-length")
    return declared is not None and declared.isdigit() and int(declared) > limit


def close_unread(scope: Scope, limit: int) -> bool:
    """Whether to close the connection after answering before reading the body.

    Yes unless the rest is a declared Content-Length within `limit` (or no body
    at all), and yes for any body after `Expect: 100-continue`: such a client
    waits for a 100 before sending it and, answered without one, need not send
    it at all; kept open, the connection would wait for it, or take the
    client's next request for it.
    """
    declared = _header(scope, b"content-length")
    if declared is None:
        return _header(scope, b"transfer-encoding") is not None
    if not declared.isdigit() or int(declared) > limit:
        return True
    expect = _header(scope, b"expect")
    return int(declared) > 0 and expect is not None and expect.lower() == "100-continue"


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole body, refusing more than `limit` bytes before reading them all."""
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


# What an event destination set to `event_payload: thin` sends: the event's id,
# type and a `related_object` reference, no `data.object`. Nothing downstream
# could act on it without calling Stripe back, so it is refused with what to fix.
THIN_EVENT_OBJECT = "v2.core.event"
THIN_EVENT_REASON = (
    "thin event payload (v2.core.event) has no object snapshot: "
    "configure this Stripe event destination to send snapshot (full) payloads"
)


def load_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def is_thin_event(event: dict[str, Any]) -> bool:
    return event.get("object") == THIN_EVENT_OBJECT


def is_snapshot_event(event: dict[str, Any]) -> bool:
    """Whether it looks like a Stripe event with its object (`id`, `type`, `livemode`,
    `data.object`). Stripe sets `livemode` on every event, true or false
    (https://docs.stripe.com/api/events/object): without it, neither mode's."""
    data = event.get("data")
    return (
        isinstance(event.get("id"), str)
        and isinstance(event.get("type"), str)
        and isinstance(event.get("livemode"), bool)
        and isinstance(data, dict)
        and isinstance(data.get("object"), dict)
    )


# The outcome of a published event, by what its key is (schemas.contract.route).
PUBLISHED_AS = {
    KEY_PAYMENT_INTENT: "published",
    KEY_CHARGE: "published_without_intent",
    KEY_CHECKOUT_SESSION: "published_without_intent",
}


class WebhookEndpoint:
    """The ASGI app for `POST /webhooks/stripe`."""

    def __init__(
        self,
        verifier: SignatureVerifier,
        publisher: Publisher | None,
        metrics: BridgeMetrics,
        max_body_bytes: int,
        log: EventLog,
        livemode: bool,
    ) -> None:
        self._verifier = verifier
        # STRIPE_LIVEMODE: the one mode whose events this bridge publishes.
        self._livemode = livemode
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
        status, fields, close = await self.handle(scope, receive)
        payload = orjson.dumps(fields)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def _bad_signature(self, exc: SignatureError, close: bool) -> Answer:
        self._count("bad_signature")
        self._metrics.signature_failures.labels(exc.reason).inc()
        self._log.info("webhook", outcome="bad_signature", reason=exc.reason)
        return 400, {"outcome": "bad_signature", "reason": exc.reason}, close

    def _too_large(self, close: bool) -> Answer:
        self._count("too_large")
        self._log.info("webhook", outcome="too_large")
        reason = f"body over {self._max_body_bytes} bytes"
        return 413, {"outcome": "too_large", "reason": reason}, close

    async def handle(self, scope: Scope, receive: Receive) -> Answer:
        received_at_ms = time.time_ns() // 1_000_000
        try:
            header = self._verifier.check_shape(_header(scope, SIGNATURE_HEADER))
        except SignatureError as exc:
            return self._bad_signature(exc, close_unread(scope, self._max_body_bytes))
        if declares_too_much(scope, self._max_body_bytes):
            return self._too_large(close=True)
        try:
            body = await read_body(scope, receive, self._max_body_bytes)
        except BodyTooLarge:
            return self._too_large(close=True)
        except ClientGone:
            self._count("disconnected")
            return 400, {"outcome": "disconnected"}, True

        try:
            self._verifier.verify_signed(body, header)
        except SignatureError as exc:
            return self._bad_signature(exc, close=False)

        event = load_object(body)
        if event is not None and is_thin_event(event):
            self._count("thin_event")
            # A warning: nothing this endpoint receives is usable until an operator
            # reconfigures it; Stripe retries each refused delivery, still thin.
            self._log.warning(
                "webhook", outcome="thin_event", event_id=event.get("id"), reason=THIN_EVENT_REASON
            )
            return 400, {"outcome": "thin_event", "reason": THIN_EVENT_REASON}, False
        if event is None or not is_snapshot_event(event):
            self._count("bad_body")
            self._log.info("webhook", outcome="bad_body")
            return 400, {"outcome": "bad_body", "reason": "not a Stripe event"}, False
        event_id: str = event["id"]
        event_type: str = event["type"]
        if event["livemode"] is not self._livemode:
            return self._other_mode(event, event_id, event_type)

        where = route(event)
        if where is None:
            self._count("ignored")
            self._log.info("webhook", outcome="ignored", event_id=event_id, event_type=event_type)
            return 200, {"outcome": "ignored"}, False

        if self._publisher is None:
            self._count("verified")
            return 200, {"outcome": "verified"}, False
        return await self._publish(
            self._publisher, body, where, event_id, event_type, received_at_ms
        )

    def _other_mode(self, event: dict[str, Any], event_id: str, event_type: str) -> Answer:
        """A 2xx, so Stripe stops sending it, and nothing published: a live bridge must not
        take a test payment into stock, nor a test bridge a real one. Legitimate on a live
        Connect endpoint, which Stripe also sends the test events of accounts connected in
        live mode (https://support.stripe.com/questions/connect-account-webhook-configurations);
        otherwise a test endpoint's secret is listed beside the live one's, or the other way
        round. A warning either way: the line says which account and which modes."""
        self._count("other_mode")
        self._log.warning(
            "webhook",
            outcome="other_mode",
            event_id=event_id,
            event_type=event_type,
            livemode=event["livemode"],
            stripe_livemode=self._livemode,
            account=event.get("account"),
        )
        return 200, {"outcome": "other_mode"}, False

    async def _publish(
        self,
        publisher: Publisher,
        body: bytes,
        where: Route,
        event_id: str,
        event_type: str,
        received_at_ms: int,
    ) -> Answer:
        key, key_field_name = where
        outcome = PUBLISHED_AS[key_field_name]
        key_field = {key_field_name: key}
        started = time.perf_counter()
        try:
            published = await publisher.publish(
                encode_key(key),
                body,
                contract_headers(event_id, event_type, received_at_ms),
            )
        except BrokerRefused as exc:
            self._count("rejected_by_broker")
            self._log.error(
                "webhook",
                outcome="rejected_by_broker",
                event_id=event_id,
                event_type=event_type,
                **key_field,
                kafka_error=exc.kafka_error,
                body_bytes=len(body),
                error=str(exc),
            )
            # 500, not 503: nothing will change until an operator acts, and 503
            # says "busy, try elsewhere or later" to ingresses and dashboards.
            # Stripe retries any 5xx for days, which is the time to fix it.
            reason = f"the event store refused this event ({exc.kafka_error})"
            return 500, {"outcome": "rejected_by_broker", "reason": reason}, False
        except PublishError as exc:
            self._count("unavailable")
            self._log.warning(
                "webhook",
                outcome="unavailable",
                event_id=event_id,
                event_type=event_type,
                **key_field,
                error=str(exc),
            )
            reason = "event store unavailable, retry later"
            return 503, {"outcome": "unavailable", "reason": reason}, False
        self._metrics.publish_seconds.observe(time.perf_counter() - started)
        self._count(outcome)
        self._log.info(
            "webhook",
            outcome=outcome,
            event_id=event_id,
            event_type=event_type,
            **key_field,
            partition=published.partition,
            offset=published.offset,
        )
        published_fields = {
            "outcome": outcome,
            "partition": published.partition,
            "offset": published.offset,
        }
        return 200, published_fields, False

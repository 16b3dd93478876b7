"""An event read from Stripe's Events API is published as the bridge publishes its webhook:
the same key, the same headers (and `source: backfill`), the same Stripe event; and what
the bridge would not publish, the backfill does not either. Events are Stripe's own
examples (tests/fixtures/stripe.py, from stripe/openapi's fixtures3.json)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import orjson
import pytest

from intentflow.consumer.decode import Envelope, decode
from intentflow.consumer.tools.backfill import when
from intentflow.consumer.tools.events_api import record, slices
from intentflow.producer.logs import EventLog
from intentflow.producer.metrics import BridgeMetrics
from intentflow.producer.publisher import Published, Publisher
from intentflow.producer.signature import SignatureVerifier
from intentflow.producer.webhook import WebhookEndpoint
from intentflow.schemas import HEADER_RECEIVED_AT
from intentflow.schemas.contract import HEADER_SOURCE
from intentflow.stripekit.signing import stripe_signature
from tests.fixtures import stripe as fixtures

SECRET = "whsec_events_api"


@dataclass
class Delivered:
    """The parts of an aiokafka ConsumerRecord that the consumer's decode reads."""

    value: bytes
    key: bytes
    headers: list[tuple[str, bytes]]
    topic: str = "stripe.events"
    partition: int = 0
    offset: int = 0


@dataclass
class Capture:
    sent: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = field(default_factory=list)

    async def publish(
        self, key: bytes, value: bytes, headers: list[tuple[str, bytes]]
    ) -> Published:
        self.sent.append((key, value, headers))
        return Published(partition=0, offset=len(self.sent) - 1)


async def through_the_bridge(evt: dict[str, Any]) -> list[tuple[bytes, bytes, list[Any]]]:
    capture = Capture()
    endpoint = WebhookEndpoint(
        SignatureVerifier([SECRET], tolerance_s=300),
        cast(Publisher, capture),
        BridgeMetrics(),
        max_body_bytes=512 * 1024,
        log=EventLog("bridge"),
        livemode=False,
    )
    body = orjson.dumps(evt, option=orjson.OPT_INDENT_2)  # Stripe's webhooks are indented
    scope = {
        "type": "http",
        "headers": [
            (b"stripe-signature", stripe_signature(body, SECRET).encode()),
            (b"content-length", str(len(body)).encode()),
        ],
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    await endpoint.handle(scope, receive)
    return capture.sent


def example(obj: dict[str, Any], event_type: str, **top: Any) -> dict[str, Any]:
    return fixtures.event(obj, event_type, created=1721948530, **top)


INTENT = fixtures.INTENT_ID
EXAMPLES = [
    example(fixtures.payment_intent(status="requires_capture"), "payment_intent.succeeded"),
    example(fixtures.charge(payment_intent=INTENT), "charge.refunded"),
    example(fixtures.charge(payment_intent=None), "charge.succeeded"),
    example(fixtures.dispute(payment_intent=INTENT), "charge.dispute.created"),
    example(fixtures.refund(payment_intent=INTENT), "refund.failed"),
    example(fixtures.checkout_session(payment_intent=None), "checkout.session.expired"),
    example(fixtures.review(payment_intent=INTENT), "review.opened"),
    example(fixtures.early_fraud_warning(), "radar.early_fraud_warning.created"),
    example(fixtures.payment_intent(), "payment_intent.created", account="acct_1Seller"),
]


@pytest.mark.parametrize("evt", EXAMPLES, ids=[e["type"] for e in EXAMPLES])
async def test_an_event_read_back_is_the_record_its_webhook_became(evt: dict[str, Any]) -> None:
    ((key, body, headers),) = await through_the_bridge(evt)
    made = record(orjson.loads(orjson.dumps(evt)), evt.get("account"), livemode=False)

    assert made is not None
    value, backfill_key, backfill_headers = made
    assert backfill_key == key
    bridge = dict(headers)
    backfilled = dict(backfill_headers)
    assert backfilled.pop(HEADER_SOURCE) == b"backfill"
    assert set(backfilled) == set(bridge)
    del backfilled[HEADER_RECEIVED_AT], bridge[HEADER_RECEIVED_AT]
    assert backfilled == bridge
    assert orjson.loads(value) == orjson.loads(body)
    # And the consumer reads both as one event.
    webhook, backfilled_event = (
        decode(Delivered(body, key, headers)),
        decode(Delivered(value, backfill_key, backfill_headers)),
    )
    assert isinstance(webhook, Envelope) and isinstance(backfilled_event, Envelope)
    assert webhook.event == backfilled_event.event
    assert webhook.intent_id == backfilled_event.intent_id


async def test_an_account_read_with_stripe_account_is_named_as_its_connect_webhook_names_it() -> (
    None
):
    on_the_account = example(fixtures.payment_intent(), "payment_intent.created")
    webhook = dict(on_the_account, account="acct_1Seller")
    ((_, body, _),) = await through_the_bridge(webhook)
    made = record(on_the_account, "acct_1Seller", livemode=False)
    assert made is not None and orjson.loads(made[0]) == orjson.loads(body)


@pytest.mark.parametrize(
    "evt",
    [
        example(fixtures.resource("customer"), "customer.created"),
        example(fixtures.payment_intent(), "payment_intent.created", livemode=True),
        example(fixtures.checkout_session(mode="setup"), "checkout.session.completed"),
    ],
    ids=["no-payment", "other-mode", "setup-session"],
)
async def test_what_the_bridge_does_not_publish_the_backfill_does_not_either(
    evt: dict[str, Any],
) -> None:
    assert await through_the_bridge(evt) == []
    assert record(evt, None, livemode=False) is None


def test_a_window_is_cut_into_whole_second_slices_oldest_first_the_last_one_short() -> None:
    start = datetime(2026, 12, 1, 0, 0, 0, 900_000, tzinfo=UTC)
    until = start + timedelta(hours=2, minutes=30)
    edges = slices(start, until, timedelta(hours=1))
    first = int(start.timestamp())
    assert edges == [
        (first, first + 3600),
        (first + 3600, first + 7200),
        (first + 7200, int(until.timestamp())),
    ]
    assert slices(until, until, timedelta(hours=1)) == []


def test_since_takes_a_time_or_a_duration_before_now_and_refuses_anything_else() -> None:
    now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    assert when("3d12h", now) == now - timedelta(days=3, hours=12)
    assert when("2026-12-01T08:00Z", now) == datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    assert when("2026-12-01", now) == datetime(2026, 12, 1, tzinfo=UTC)
    with pytest.raises(argparse.ArgumentTypeError, match="neither a time"):
        when("last tuesday", now)

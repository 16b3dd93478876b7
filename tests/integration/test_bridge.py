"""The webhook bridge against a real broker: what a 2xx promises, and what is refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import orjson
import pytest
from aiokafka.partitioner import murmur2

from intentflow.devservices import Services
from intentflow.devservices.embedded import EmbeddedKafka, free_port
from intentflow.devservices.topics import create_topics
from intentflow.producer.app import WEBHOOK_PATH
from intentflow.producer.webhook import THIN_EVENT_REASON
from intentflow.schemas import HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_RECEIVED_AT
from intentflow.stripekit.events import charge_event, encode, event, intent_event, new_id
from intentflow.stripekit.signing import stripe_signature
from tests.integration.bridge_support import (
    SECRET,
    bridge_settings,
    post_webhook,
    running_bridge,
    topic_size,
    wait_ready,
)
from tests.support import read_topic


def java_partition(key: bytes, partitions: int = 12) -> int:
    # aiokafka's murmur2 is checked against Kafka's own vectors in tests/unit/test_partition.py.
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


async def test_a_signed_event_lands_with_its_key_raw_body_and_headers(
    infra: Services, topic: str
) -> None:
    settings = bridge_settings(infra.kafka_bootstrap_servers, topic, infra.kafka_enable_idempotence)
    intent = new_id("pi")
    event = intent_event(intent, amount=1999, cart_id="cart_1")
    # Whitespace and key order a re-serialization would lose: the bytes must survive as sent.
    body = b'  {"note":  "kept as sent",' + encode(event)[1:] + b"\n"
    before_ms = time.time_ns() // 1_000_000

    async with running_bridge(settings) as client:
        response = await post_webhook(client, body)

    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == "published"
    [record] = await read_topic(infra.kafka_bootstrap_servers, topic, expected=1)
    assert record.key == intent.encode()
    assert record.value == body
    assert record.partition == java_partition(intent.encode()) == response.json()["partition"]
    headers = dict(record.headers)
    assert headers[HEADER_EVENT_ID] == event["id"].encode()
    assert headers[HEADER_EVENT_TYPE] == b"payment_intent.amount_capturable_updated"
    assert before_ms <= int(headers[HEADER_RECEIVED_AT]) <= time.time_ns() // 1_000_000


async def test_an_intents_events_share_a_partition_in_request_order_with_its_charges(
    infra: Services, topic: str
) -> None:
    settings = bridge_settings(infra.kafka_bootstrap_servers, topic, infra.kafka_enable_idempotence)
    intent = new_id("pi")
    bodies = [
        encode(intent_event(intent, amount=500, cart_id="c", status="requires_capture")),
        encode(intent_event(intent, amount=500, cart_id="c", status="succeeded")),
        encode(charge_event(intent, amount=500, event_type="charge.refunded")),
    ]
    other = encode(intent_event(new_id("pi"), amount=1, cart_id="d"))

    async with running_bridge(settings) as client:
        for body in [bodies[0], other, bodies[1], bodies[2]]:
            assert (await post_webhook(client, body)).status_code == 200

    records = await read_topic(infra.kafka_bootstrap_servers, topic, expected=4)
    mine = [r for r in records if r.key == intent.encode()]
    assert [r.value for r in mine] == bodies
    assert {r.partition for r in mine} == {java_partition(intent.encode())}
    assert [r.offset for r in mine] == sorted(r.offset for r in mine)


async def test_both_secrets_verify_during_rotation(infra: Services, topic: str) -> None:
    settings = bridge_settings(
        infra.kafka_bootstrap_servers,
        topic,
        infra.kafka_enable_idempotence,
        stripe_webhook_secret="whsec_old, " + SECRET,
    )
    old_body = encode(intent_event(new_id("pi"), amount=1, cart_id="c"))
    new_body = encode(intent_event(new_id("pi"), amount=2, cart_id="c"))

    async with running_bridge(settings) as client:
        assert (await post_webhook(client, old_body, secret="whsec_old")).status_code == 200
        assert (await post_webhook(client, new_body, secret=SECRET)).status_code == 200

    records = await read_topic(infra.kafka_bootstrap_servers, topic, expected=2)
    assert sorted(r.value for r in records) == sorted([old_body, new_body])


async def test_an_event_about_no_payment_intent_is_acknowledged_and_not_published(
    infra: Services, topic: str
) -> None:
    settings = bridge_settings(infra.kafka_bootstrap_servers, topic, infra.kafka_enable_idempotence)
    body = encode(event({"object": "customer", "id": "cus_1"}, "customer.created"))
    async with running_bridge(settings) as client:
        response = await post_webhook(client, body)
        metrics = (await client.admin.get("/metrics")).text

    assert (response.status_code, response.json()["outcome"]) == (200, "ignored")
    assert 'intentflow_bridge_webhooks_total{outcome="ignored"} 1.0' in metrics
    await asyncio.sleep(0.3)
    assert await topic_size(infra.kafka_bootstrap_servers, topic) == 0


async def test_a_live_event_at_a_test_bridge_is_acknowledged_and_never_reaches_the_topic(
    infra: Services, topic: str
) -> None:
    """STRIPE_LIVEMODE=false: a live-mode event is answered 200 other_mode and counted; the
    test-mode event after it is the topic's only record."""
    settings = bridge_settings(infra.kafka_bootstrap_servers, topic, infra.kafka_enable_idempotence)
    live = intent_event(new_id("pi"), amount=1999, cart_id="cart_live")
    live["livemode"] = live["data"]["object"]["livemode"] = True
    test_mode = encode(intent_event(new_id("pi"), amount=1999, cart_id="cart_test"))
    async with running_bridge(settings) as client:
        refused = await post_webhook(client, encode(live))
        published = await post_webhook(client, test_mode)
        metrics = (await client.admin.get("/metrics")).text

    assert (refused.status_code, refused.json()) == (200, {"outcome": "other_mode"})
    assert published.json()["outcome"] == "published"
    assert 'intentflow_bridge_webhooks_total{outcome="other_mode"} 1.0' in metrics
    # The test-mode event was acked after the live one was answered: one record is all.
    assert await topic_size(infra.kafka_bootstrap_servers, topic) == 1
    [record] = await read_topic(infra.kafka_bootstrap_servers, topic, expected=1)
    assert record.value == test_mode


async def test_a_dispute_and_a_refund_land_on_their_intents_partition_keyed_by_the_intent(
    infra: Services, topic: str
) -> None:
    """DESIGN: every event of an intent, its disputes and refunds too, shares its partition."""
    settings = bridge_settings(infra.kafka_bootstrap_servers, topic, infra.kafka_enable_idempotence)
    intent, charge = new_id("pi"), new_id("ch")
    dispute = {
        "id": new_id("dp"),
        "object": "dispute",
        "amount": 500,
        "charge": charge,
        "currency": "usd",
        "evidence": {"customer_name": None},
        "payment_intent": intent,
        "reason": "fraudulent",
        "status": "needs_response",
    }
    refund = {
        "id": new_id("re"),
        "object": "refund",
        "amount": 200,
        "charge": charge,
        "currency": "usd",
        "payment_intent": intent,
        "status": "succeeded",
    }
    bodies = [
        encode(intent_event(intent, amount=500, cart_id="c", status="succeeded")),
        encode(event(dispute, "charge.dispute.created")),
        encode(event(refund, "charge.refund.updated")),
    ]

    async with running_bridge(settings) as client:
        answers = [await post_webhook(client, body) for body in bodies]

    assert [(a.status_code, a.json()["outcome"]) for a in answers] == [(200, "published")] * 3
    records = await read_topic(infra.kafka_bootstrap_servers, topic, expected=3)
    assert [r.value for r in records] == bodies
    assert {r.key for r in records} == {intent.encode()}
    assert {r.partition for r in records} == {java_partition(intent.encode())}
    assert [dict(r.headers)[HEADER_EVENT_TYPE] for r in records] == [
        b"payment_intent.succeeded",
        b"charge.dispute.created",
        b"charge.refund.updated",
    ]


async def test_a_charge_without_an_intent_lands_keyed_by_its_charge_id_and_counted_apart(
    infra: Services, topic: str
) -> None:
    """A legacy Charges API charge (`payment_intent: null`) and its dispute stay findable."""
    settings = bridge_settings(infra.kafka_bootstrap_servers, topic, infra.kafka_enable_idempotence)
    charge = new_id("ch")
    charge_payload = charge_event("pi_unused", amount=900, event_type="charge.succeeded")
    charge_payload["data"]["object"].update(id=charge, payment_intent=None)
    dispute = {"id": new_id("dp"), "object": "dispute", "charge": charge, "payment_intent": None}
    bodies = [encode(charge_payload), encode(event(dispute, "charge.dispute.created"))]

    async with running_bridge(settings) as client:
        answers = [await post_webhook(client, body) for body in bodies]
        metrics = (await client.admin.get("/metrics")).text

    assert [a.json()["outcome"] for a in answers] == ["published_without_intent"] * 2
    assert 'intentflow_bridge_webhooks_total{outcome="published_without_intent"} 2.0' in metrics
    records = await read_topic(infra.kafka_bootstrap_servers, topic, expected=2)
    assert [r.value for r in records] == bodies
    assert {r.key for r in records} == {charge.encode()}
    assert {r.partition for r in records} == {java_partition(charge.encode())}


ADMIN_PATHS = ("/healthz", "/readyz", "/metrics")
GOOD = encode(intent_event("pi_refused", amount=1, cart_id="c"))
STALE = stripe_signature(GOOD, SECRET, int(time.time()) - 3600)
# What an event destination set to send thin payloads POSTs: no object snapshot.
THIN = orjson.dumps(
    {
        "id": "evt_test_65R9Ijk8mF0KbtxQsDS16SXfR9nxC0Ia7iKSU0Vyb9U",
        "object": "v2.core.event",
        "type": "v1.payment_intent.succeeded",
        "created": "2025-07-01T12:00:00.000Z",
        "livemode": False,
        "related_object": {
            "id": "pi_thin",
            "type": "payment_intent",
            "url": "/v1/payment_intents/pi_thin",
        },
    }
)


@pytest.mark.parametrize(
    ("method", "body", "headers", "status", "reason"),
    [
        ("POST", GOOD, {"stripe-signature": "forge"}, 400, "malformed"),
        ("POST", GOOD, {"stripe-signature": stripe_signature(GOOD, "whsec_x")}, 400, "forged"),
        ("POST", GOOD, {"stripe-signature": STALE}, 400, "stale"),
        ("POST", GOOD, {}, 400, "missing"),
        ("POST", b"not json", None, 400, "not a Stripe event"),
        ("POST", b'["an array"]', None, 400, "not a Stripe event"),
        ("POST", b'{"id":"evt_1","type":"x"}', None, 400, "not a Stripe event"),
        ("POST", THIN, None, 400, THIN_EVENT_REASON),
        ("POST", b"{" + b" " * (512 * 1024) + b"}", None, 413, "body over 524288 bytes"),
        ("GET", b"", None, 405, None),
        ("PUT", GOOD, None, 405, None),
    ],
    ids=[
        "malformed",
        "forged",
        "stale",
        "missing",
        "not-json",
        "not-object",
        "no-data",
        "thin",
        "oversized",
        "get",
        "put",
    ],
)
async def test_refused_requests_get_their_status_and_publish_nothing(
    infra: Services,
    topic: str,
    method: str,
    body: bytes,
    headers: dict[str, str] | None,
    status: int,
    reason: str | None,
) -> None:
    settings = bridge_settings(infra.kafka_bootstrap_servers, topic, infra.kafka_enable_idempotence)
    sent = {"stripe-signature": stripe_signature(body, SECRET)} if headers is None else headers
    async with running_bridge(settings) as client:
        response = await client.request(method, WEBHOOK_PATH, content=body, headers=sent)

    assert response.status_code == status
    if reason is not None:
        assert response.json()["reason"] == reason
    await asyncio.sleep(0.2)
    assert await topic_size(infra.kafka_bootstrap_servers, topic) == 0


async def test_an_oversized_body_is_refused_while_streaming_without_content_length(
    infra: Services, topic: str
) -> None:
    settings = bridge_settings(infra.kafka_bootstrap_servers, topic, infra.kafka_enable_idempotence)
    chunks_sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal chunks_sent
        for _ in range(64):  # 64 x 64 KiB = 4 MiB offered, no Content-Length
            chunks_sent += 1
            yield b" " * 65536

    async with running_bridge(settings) as client:
        response = await client.post(
            WEBHOOK_PATH, content=chunks(), headers={"stripe-signature": "t=1,v1=00"}
        )

    assert response.status_code == 413
    assert chunks_sent < 64
    assert await topic_size(infra.kafka_bootstrap_servers, topic) == 0


async def test_health_readiness_and_metrics_on_the_admin_port_only(
    infra: Services, topic: str
) -> None:
    settings = bridge_settings(infra.kafka_bootstrap_servers, topic, infra.kafka_enable_idempotence)
    async with running_bridge(settings) as client:
        assert (await client.admin.get("/healthz")).status_code == 200
        assert (await client.admin.get("/readyz")).status_code == 200
        await post_webhook(client, GOOD, secret="whsec_wrong")
        metrics = (await client.admin.get("/metrics")).text
        # The webhook's port answers POST /webhooks/stripe and nothing else.
        public = [(await client.get(path)).status_code for path in ADMIN_PATHS]
        admin_webhook = await client.admin.post(WEBHOOK_PATH, content=GOOD)
    assert 'intentflow_bridge_signature_failures_total{reason="forged"} 1.0' in metrics
    assert SECRET not in metrics
    assert public == [404, 404, 404]
    assert admin_webhook.status_code == 404


async def test_with_the_broker_down_the_bridge_answers_503_and_the_event_lands_at_least_once() -> (
    None
):
    """What a 503 promises: nothing about the attempt, only that a retry will land.

    With KAFKA_ENABLE_IDEMPOTENCE=true (real Kafka's default) aiokafka keeps
    retrying a batch it began sending until the broker takes it, so the copy of
    a request answered 503 can land beside the retry's (producer/publisher.py).
    The embedded broker has no idempotent producer, so this runs with it off;
    what it asserts holds either way: every copy is the same bytes with the same
    event id, which the consumer's inbox applies once.
    """
    port = free_port()
    broker = EmbeddedKafka().start(port=port)
    try:
        topic = f"stripe.events.{new_id('t')}"
        await create_topics(broker.bootstrap_servers, topic)
        settings = bridge_settings(
            broker.bootstrap_servers, topic, False, kafka_publish_timeout_s=1.0
        )
        event = intent_event(new_id("pi"), amount=700, cart_id="c")
        body = encode(event)

        async with running_bridge(settings) as client:
            assert (await post_webhook(client, GOOD)).status_code == 200

            broker.stop()
            started = time.monotonic()
            down = await post_webhook(client, body)
            attempts = 1
            assert (down.status_code, down.json()["outcome"]) == (503, "unavailable")
            assert time.monotonic() - started < 5
            assert (await client.admin.get("/readyz")).status_code == 503

            # Memory-only broker: it comes back empty, so the topic is created again.
            broker.start(port=port)
            await create_topics(broker.bootstrap_servers, topic)
            for _ in range(40):  # Stripe's retries, faster
                retry = await post_webhook(client, body)
                attempts += 1
                if retry.status_code == 200:
                    break
                assert retry.status_code == 503
                await asyncio.sleep(0.25)
            assert retry.status_code == 200
            assert (await client.admin.get("/readyz")).status_code == 200

        # Read on past the publish timeout: a late copy of a 503'd attempt shows by then.
        records = await read_topic(broker.bootstrap_servers, topic, expected=1, settle_s=1.5)
        assert 1 <= len(records) <= attempts
        assert {r.value for r in records} == {body}
        assert {dict(r.headers)[HEADER_EVENT_ID] for r in records} == {event["id"].encode()}
    finally:
        broker.stop()


async def test_with_the_broker_down_at_boot_the_bridge_serves_503_until_it_connects() -> None:
    port = free_port()  # nothing listens here yet
    topic = f"stripe.events.{new_id('t')}"
    settings = bridge_settings(f"127.0.0.1:{port}", topic, False, kafka_publish_timeout_s=1.0)
    body = encode(intent_event(new_id("pi"), amount=900, cart_id="c"))
    broker = EmbeddedKafka()
    try:
        async with running_bridge(settings, ready=False) as client:
            assert (await client.admin.get("/healthz")).status_code == 200
            assert (await client.admin.get("/readyz")).status_code == 503
            refused = await post_webhook(client, body)
            assert (refused.status_code, refused.json()["outcome"]) == (503, "unavailable")

            broker.start(port=port)
            await create_topics(broker.bootstrap_servers, topic)
            await wait_ready(client, timeout_s=15)
            accepted = await post_webhook(client, body)
            assert (accepted.status_code, accepted.json()["outcome"]) == (200, "published")

        records = await read_topic(broker.bootstrap_servers, topic, expected=1)
        assert [r.value for r in records] == [body]
    finally:
        broker.stop()


async def test_an_event_the_broker_refuses_for_good_is_answered_500_and_logged_as_an_error(
    infra: Services, topic: str, capfd: pytest.CaptureFixture[str]
) -> None:
    # A record over the producer's largest request: aiokafka refuses it with the
    # class the broker's RECORD_TOO_LARGE maps to, MessageSizeTooLargeError.
    settings = bridge_settings(
        infra.kafka_bootstrap_servers,
        topic,
        infra.kafka_enable_idempotence,
        kafka_max_request_bytes=2048,
    )
    large = encode(intent_event(new_id("pi"), amount=1, cart_id="c" * 4096))
    small = encode(intent_event(new_id("pi"), amount=1, cart_id="c"))

    async with running_bridge(settings) as client:
        refused = await post_webhook(client, large)
        accepted = await post_webhook(client, small)
        metrics = (await client.admin.get("/metrics")).text
        ready = (await client.admin.get("/readyz")).status_code

    assert (refused.status_code, refused.json()["outcome"]) == (500, "rejected_by_broker")
    assert "MessageSizeTooLargeError" in refused.json()["reason"]
    assert (accepted.status_code, ready) == (200, 200)  # one refused event is not an outage
    assert 'intentflow_bridge_webhooks_total{outcome="rejected_by_broker"} 1.0' in metrics
    [line] = [
        orjson.loads(text)
        for text in capfd.readouterr().err.splitlines()
        if '"rejected_by_broker"' in text
    ]
    assert (line["level"], line["kafka_error"]) == ("error", "MessageSizeTooLargeError")
    records = await read_topic(infra.kafka_bootstrap_servers, topic, expected=1, settle_s=0.5)
    assert [r.value for r in records] == [small]

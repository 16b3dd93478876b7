"""The shapes Stripe really sends: each decodes, and each gets the key its intent needs.

The payloads are Stripe's own example objects (stripe/openapi `openapi/fixtures3.json`,
vendored whole under tests/fixtures/) with ids, amounts, statuses and links set per test,
and a field no model knows, to prove those are ignored. Each goes through the three
readers of a delivery: the bridge's key (`schemas.route`), the consumer's decoding
(`StripeEvent`, `consumer.decode.decode`), and the bridge's endpoint itself; for every
object kind the key the bridge publishes is the one the consumer checks. An event of the
other mode than the bridge's (STRIPE_LIVEMODE) is acknowledged and never published.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import pytest

from intentflow.consumer.decode import Envelope, Poison, decode
from intentflow.producer.logs import EventLog
from intentflow.producer.metrics import BridgeMetrics
from intentflow.producer.publisher import Published, Publisher
from intentflow.producer.signature import SignatureVerifier
from intentflow.producer.webhook import THIN_EVENT_REASON, WebhookEndpoint
from intentflow.schemas import (
    KEY_CHARGE,
    KEY_CHECKOUT_SESSION,
    KEY_PAYMENT_INTENT,
    Charge,
    Dispute,
    PaymentIntent,
    Refund,
    StripeEvent,
    charge_key,
    payment_intent_key,
    route,
)
from intentflow.schemas.stripe import (
    MODELLED_OBJECTS,
    CheckoutSession,
    EarlyFraudWarning,
    Review,
)
from intentflow.stripekit.signing import stripe_signature
from tests.fixtures import stripe as fixtures

# Stripe's examples link to each other by these ids.
INTENT = fixtures.INTENT_ID
CHARGE = fixtures.CHARGE_ID
SESSION = fixtures.SESSION_ID
DISPUTE = fixtures.dispute()["id"]
REFUND = fixtures.refund()["id"]
REVIEW = fixtures.review()["id"]
WARNING = fixtures.early_fraud_warning()["id"]
CREATED = 1721948530
SECRET = "whsec_shapes"


def event(
    obj: dict[str, Any],
    event_type: str,
    *,
    api_version: str = "2024-06-20",
    previous_attributes: dict[str, Any] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """Stripe's example event around `obj`, as a webhook endpoint receives it."""
    evt = fixtures.event(
        obj, event_type, api_version=api_version, created=CREATED, pending_webhooks=1, **top
    )
    if previous_attributes is not None:
        evt["data"]["previous_attributes"] = previous_attributes
    return evt


def charge(payment_intent: str | None = INTENT, **changes: Any) -> dict[str, Any]:
    """Stripe's example charge, captured, of `payment_intent`."""
    values: dict[str, Any] = {
        "amount": 1099,
        "amount_captured": 1099,
        "captured": True,
        "payment_intent": payment_intent,
        "a_field_stripe_adds_next_year": {"nested": [1, 2]},
    }
    return fixtures.charge(**(values | changes))


def payment_intent(**changes: Any) -> dict[str, Any]:
    """Stripe's example intent, authorized for manual capture, naming cart_42."""
    values: dict[str, Any] = {
        "amount": 1099,
        "amount_capturable": 1099,
        "canceled_at": None,
        "capture_method": "manual",
        "last_payment_error": None,
        "latest_charge": CHARGE,
        "metadata": {"cart_id": "cart_42"},
        "next_action": None,
        "processing": None,
        "status": "requires_capture",
    }
    return fixtures.payment_intent(**(values | changes))


def dispute(status: str, payment_intent: str | None = INTENT) -> dict[str, Any]:
    return fixtures.dispute(
        amount=1099, payment_intent=payment_intent, reason="fraudulent", status=status
    )


def refund(
    status: str | None = "succeeded",
    payment_intent: str | None = INTENT,
    charge_id: str | None = CHARGE,
) -> dict[str, Any]:
    return fixtures.refund(
        amount=400, charge=charge_id, payment_intent=payment_intent, status=status
    )


def session(**changes: Any) -> dict[str, Any]:
    """Stripe's example Checkout Session (payment mode, naming its intent)."""
    return fixtures.checkout_session(**changes)


@dataclass
class Record:
    """The parts of an aiokafka ConsumerRecord that decode reads."""

    value: bytes | None
    key: bytes | None
    topic: str = "stripe.events"
    partition: int = 0
    offset: int = 0
    headers: tuple[tuple[str, bytes], ...] = ()


def decoded(payload: dict[str, Any], key: str) -> Envelope:
    """The consumer's reading of `payload` delivered under `key`; fails on poison."""
    result = decode(Record(orjson.dumps(payload), key.encode()))
    assert isinstance(result, Envelope), result
    return result


# --- payment intents ------------------------------------------------------------


def test_an_old_api_intent_with_an_embedded_charges_list_is_keyed_and_read_as_the_intent() -> None:
    """Before API 2022-11-15 an intent carried its charges inline and had no latest_charge."""
    old = payment_intent(
        charges={
            "object": "list",
            "data": [charge(amount_refunded=1099, refunded=True)],
            "has_more": False,
            "total_count": 1,
            "url": f"/v1/charges?payment_intent={INTENT}",
        }
    )
    del old["latest_charge"]
    payload = event(old, "payment_intent.amount_capturable_updated", api_version="2020-08-27")

    assert payment_intent_key(payload) == INTENT
    intent = decoded(payload, INTENT).event.data.object
    assert type(intent) is PaymentIntent
    assert (intent.status, intent.amount_capturable, intent.cart("cart_id")) == (
        "requires_capture",
        1099,
        "cart_42",
    )


def test_latest_charge_as_an_id_or_as_an_expanded_charge_reads_the_same_intent() -> None:
    as_id = event(payment_intent(), "payment_intent.amount_capturable_updated")
    # Expanded, the charge names the intent too: it must not become the event's object.
    expanded_charge = charge(captured=False, amount_captured=0)
    as_object = event(
        payment_intent(latest_charge=expanded_charge), "payment_intent.amount_capturable_updated"
    )

    assert payment_intent_key(as_id) == payment_intent_key(as_object) == INTENT
    by_id, by_object = decoded(as_id, INTENT), decoded(as_object, INTENT)
    assert type(by_object.event.data.object) is PaymentIntent
    assert by_id.event == by_object.event


def test_a_connect_event_is_keyed_by_the_intent_not_the_connected_account() -> None:
    payload = event(
        payment_intent(status="succeeded", amount_capturable=0, amount_received=1099),
        "payment_intent.succeeded",
        account="acct_1PgafTB7WZ01zgkW",
        context="acct_1PgafTB7WZ01zgkW",
    )

    assert payment_intent_key(payload) == INTENT
    envelope = decoded(payload, INTENT)
    assert envelope.intent_id == INTENT
    assert envelope.event.payment_intent_id == INTENT


def test_previous_attributes_are_ignored_and_the_object_is_its_state_after_the_change() -> None:
    payload = event(
        payment_intent(),
        "payment_intent.amount_capturable_updated",
        previous_attributes={"amount_capturable": 0, "status": "requires_confirmation"},
    )

    intent = decoded(payload, INTENT).event.data.object
    assert type(intent) is PaymentIntent
    assert (intent.status, intent.amount_capturable) == ("requires_capture", 1099)


def test_a_stripe_event_validates_from_the_raw_bytes_with_unknown_fields_ignored() -> None:
    payload = event(charge(amount_refunded=400), "charge.refunded")
    parsed = StripeEvent.model_validate_json(orjson.dumps(payload))
    assert type(parsed.data.object) is Charge
    assert parsed.data.object.amount_refunded == 400
    assert not hasattr(parsed.data.object, "a_field_stripe_adds_next_year")


# --- charges without an intent ----------------------------------------------------


def test_a_charge_without_an_intent_is_keyed_by_its_charge_id() -> None:
    """A legacy Charges API charge (Stripe's own fixture has `payment_intent: null`)."""
    payload = event(charge(payment_intent=None), "charge.succeeded")

    assert payment_intent_key(payload) is None
    assert charge_key(payload) == CHARGE


def test_the_consumer_decodes_an_intent_less_charge_under_its_charge_key_as_no_intent() -> None:
    """What the bridge publishes keyed by the charge id is not poison: the key is only
    checked against an intent, and with none the store records the event `ignored`."""
    envelope = decoded(event(charge(payment_intent=None), "charge.refunded"), CHARGE)
    assert envelope.intent_id is None
    assert envelope.event.payment_intent_id is None
    assert type(envelope.event.data.object) is Charge


@pytest.mark.parametrize(
    "obj",
    [dispute("needs_response", payment_intent=None), refund(payment_intent=None)],
    ids=["dispute", "refund"],
)
def test_a_dispute_or_refund_of_an_intent_less_charge_is_keyed_by_that_charge(
    obj: dict[str, Any],
) -> None:
    payload = event(obj, f"charge.{obj['object']}.updated")
    assert payment_intent_key(payload) is None
    assert charge_key(payload) == CHARGE
    assert decoded(payload, CHARGE).intent_id is None


def test_a_refund_naming_neither_intent_nor_charge_has_no_key() -> None:
    payload = event(refund(payment_intent=None, charge_id=None), "charge.refund.updated")
    assert payment_intent_key(payload) is None
    assert charge_key(payload) is None


@pytest.mark.parametrize("kind", ["application_fee", "confirmation_token", "tax.association"])
def test_objects_of_other_kinds_have_no_key_even_naming_a_charge_or_an_intent(kind: str) -> None:
    """Stripe's application fee names the charge it came from, a confirmation token and a
    tax association name an intent: none is an event of the payment's own."""
    payload = event(fixtures.resource(kind), f"{kind}.created")
    assert (payment_intent_key(payload), charge_key(payload), route(payload)) == (None,) * 3
    assert decoded(payload, "any").intent_id is None


# --- disputes and refunds -------------------------------------------------------


@pytest.mark.parametrize(
    ("event_type", "status"),
    [("charge.dispute.created", "needs_response"), ("charge.dispute.closed", "lost")],
)
def test_a_dispute_is_keyed_by_its_intent_and_read_with_amount_reason_and_status(
    event_type: str, status: str
) -> None:
    payload = event(dispute(status), event_type)

    assert payment_intent_key(payload) == INTENT
    envelope = decoded(payload, INTENT)
    assert envelope.intent_id == INTENT
    obj = envelope.event.data.object
    assert type(obj) is Dispute
    assert (obj.id, obj.charge, obj.amount, obj.reason, obj.status) == (
        DISPUTE,
        CHARGE,
        1099,
        "fraudulent",
        status,
    )


def test_a_refund_update_is_keyed_by_its_intent_and_read_with_amount_and_status() -> None:
    payload = event(refund("pending"), "charge.refund.updated")

    assert payment_intent_key(payload) == INTENT
    obj = decoded(payload, INTENT).event.data.object
    assert type(obj) is Refund
    assert (obj.id, obj.charge, obj.amount, obj.status) == (REFUND, CHARGE, 400, "pending")


def test_a_refund_whose_status_is_null_is_read_not_dead_lettered() -> None:
    """Stripe's spec has `refund.status` nullable; a null must not make the event poison."""
    obj = decoded(event(refund(status=None), "charge.refund.updated"), INTENT).event.data.object
    assert type(obj) is Refund
    assert obj.status == ""


def test_a_dispute_delivered_under_another_key_is_poison() -> None:
    """The dispute's intent is checked against the key like an intent's own events."""
    result = decode(Record(orjson.dumps(event(dispute("lost"), "charge.dispute.closed")), b"ch_x"))
    assert isinstance(result, Poison) and result.error == "key_mismatch"


# --- Checkout Sessions ------------------------------------------------------------


@pytest.mark.parametrize(
    "event_type",
    [
        "checkout.session.completed",
        "checkout.session.async_payment_succeeded",
        "checkout.session.async_payment_failed",
        "checkout.session.expired",
    ],
)
def test_a_payment_session_is_keyed_by_the_intent_it_names(event_type: str) -> None:
    payload = event(session(client_reference_id="cart_42", payment_status="paid"), event_type)

    assert route(payload) == (INTENT, KEY_PAYMENT_INTENT)
    envelope = decoded(payload, INTENT)
    assert envelope.intent_id == INTENT
    obj = envelope.event.data.object
    assert type(obj) is CheckoutSession
    assert (obj.id, obj.mode, obj.cart("cart_id")) == (SESSION, "payment", "cart_42")


def test_a_session_that_expired_unpaid_is_keyed_by_its_own_id_and_concerns_no_intent() -> None:
    """Since API 2022-08-01 a session's intent is made only when it is confirmed: one that
    expired unpaid names none."""
    payload = event(session(payment_intent=None, status="expired"), "checkout.session.expired")

    assert payment_intent_key(payload) is None
    assert route(payload) == (SESSION, KEY_CHECKOUT_SESSION)
    assert decoded(payload, SESSION).intent_id is None


@pytest.mark.parametrize("mode", ["setup", "subscription"])
def test_a_session_of_another_mode_is_not_routed(mode: str) -> None:
    # Stripe's setup and subscription sessions name no intent of their own.
    payload = event(session(mode=mode, payment_intent=None), "checkout.session.completed")
    assert route(payload) is None
    assert decoded(payload, SESSION).intent_id is None


# --- Radar: reviews and early fraud warnings ------------------------------------------


@pytest.mark.parametrize(
    ("obj", "event_type"),
    [
        (fixtures.review(payment_intent=INTENT), "review.opened"),
        (
            fixtures.review(payment_intent=INTENT, open=False, closed_reason="approved"),
            "review.closed",
        ),
        (fixtures.early_fraud_warning(payment_intent=INTENT), "radar.early_fraud_warning.created"),
        (fixtures.early_fraud_warning(payment_intent=INTENT), "radar.early_fraud_warning.updated"),
    ],
    ids=["review-opened", "review-closed", "warning-created", "warning-updated"],
)
def test_a_fraud_signal_is_keyed_by_the_intent_it_names(
    obj: dict[str, Any], event_type: str
) -> None:
    payload = event(obj, event_type)

    assert route(payload) == (INTENT, KEY_PAYMENT_INTENT)
    envelope = decoded(payload, INTENT)
    assert envelope.intent_id == INTENT
    assert type(envelope.event.data.object) in (Review, EarlyFraudWarning)


@pytest.mark.parametrize(
    ("obj", "event_type", "charge_id"),
    [
        (fixtures.review(), "review.opened", CHARGE),
        (fixtures.early_fraud_warning(), "radar.early_fraud_warning.created", "ch_1234"),
    ],
    ids=["review", "warning"],
)
def test_a_fraud_signal_naming_no_intent_is_keyed_by_its_charge(
    obj: dict[str, Any], event_type: str, charge_id: str
) -> None:
    """Stripe's own examples of both name only a charge (a charge made without an intent)."""
    payload = event(obj, event_type)
    assert route(payload) == (charge_id, KEY_CHARGE)
    assert decoded(payload, charge_id).intent_id is None


# --- through the bridge's endpoint ----------------------------------------------


@dataclass
class FakePublisher:
    """Publisher.publish's interface; remembers what it was given."""

    sent: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def publish(
        self, key: bytes, value: bytes, headers: list[tuple[str, bytes]]
    ) -> Published:
        self.sent.append((key, value))
        return Published(partition=5, offset=len(self.sent) - 1)


@dataclass
class Bridge:
    endpoint: WebhookEndpoint
    publisher: FakePublisher
    metrics: BridgeMetrics

    def count(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "intentflow_bridge_webhooks_total", {"outcome": outcome}
        )
        return value or 0.0

    async def post(self, body: bytes) -> tuple[int, dict[str, Any]]:
        scope = {
            "type": "http",
            "headers": [
                (b"stripe-signature", stripe_signature(body, SECRET).encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        status, fields, _ = await self.endpoint.handle(scope, receive)
        return status, fields


def new_bridge(livemode: bool = False) -> Bridge:
    """The endpoint with a fake publisher, serving test mode (Stripe's examples are test-mode
    objects) unless told; built in the test, so its log finds the test's stderr."""
    publisher, metrics = FakePublisher(), BridgeMetrics()
    endpoint = WebhookEndpoint(
        SignatureVerifier([SECRET], tolerance_s=300),
        cast(Publisher, publisher),
        metrics,
        max_body_bytes=512 * 1024,
        log=EventLog("bridge"),
        livemode=livemode,
    )
    return Bridge(endpoint, publisher, metrics)


def thin_event() -> dict[str, Any]:
    """What an event destination with `event_payload: thin` POSTs (stripe-python's
    EventNotification): an id, a type and a reference, no object snapshot."""
    return {
        "id": "evt_test_65R9Ijk8mF0KbtxQsDS16SXfR9nxC0Ia7iKSU0Vyb9U",
        "object": "v2.core.event",
        "type": "v1.payment_intent.amount_capturable_updated",
        "livemode": False,
        "created": "2025-07-01T12:00:00.000Z",
        "context": None,
        "reason": {"type": "request", "request": {"id": "req_1", "idempotency_key": "k"}},
        "related_object": {
            "id": INTENT,
            "type": "payment_intent",
            "url": f"/v1/payment_intents/{INTENT}",
        },
    }


async def test_the_bridge_refuses_a_thin_event_saying_to_send_snapshot_payloads() -> None:
    bridge = new_bridge()
    status, answer = await bridge.post(orjson.dumps(thin_event()))

    assert (status, answer["outcome"]) == (400, "thin_event")
    assert answer["reason"] == THIN_EVENT_REASON
    assert "snapshot" in answer["reason"]
    assert bridge.publisher.sent == []
    assert (bridge.count("thin_event"), bridge.count("bad_body")) == (1.0, 0.0)


@pytest.mark.parametrize(
    ("payload", "key", "outcome"),
    [
        (event(payment_intent(), "payment_intent.amount_capturable_updated"), INTENT, "published"),
        (event(dispute("needs_response"), "charge.dispute.created"), INTENT, "published"),
        (event(dispute("won"), "charge.dispute.closed"), INTENT, "published"),
        (event(refund(), "charge.refund.updated"), INTENT, "published"),
        (event(charge(None), "charge.succeeded"), CHARGE, "published_without_intent"),
        (
            event(dispute("lost", payment_intent=None), "charge.dispute.closed"),
            CHARGE,
            "published_without_intent",
        ),
        (event(session(), "checkout.session.completed"), INTENT, "published"),
        (
            event(session(payment_intent=None), "checkout.session.expired"),
            SESSION,
            "published_without_intent",
        ),
        (event(fixtures.review(payment_intent=INTENT), "review.opened"), INTENT, "published"),
        (event(fixtures.review(), "review.closed"), CHARGE, "published_without_intent"),
        (
            event(
                fixtures.early_fraud_warning(payment_intent=INTENT),
                "radar.early_fraud_warning.created",
            ),
            INTENT,
            "published",
        ),
    ],
    ids=[
        "intent",
        "dispute-created",
        "dispute-closed",
        "refund-updated",
        "charge-no-intent",
        "dispute-no-intent",
        "session-completed",
        "session-expired-unpaid",
        "review-opened",
        "review-no-intent",
        "early-fraud-warning",
    ],
)
async def test_the_bridge_publishes_every_payment_event_under_its_key(
    payload: dict[str, Any], key: str, outcome: str
) -> None:
    bridge = new_bridge()
    body = orjson.dumps(payload)
    status, answer = await bridge.post(body)

    assert (status, answer["outcome"]) == (200, outcome)
    assert bridge.publisher.sent == [(key.encode(), body)]
    assert bridge.count(outcome) == 1.0


async def test_the_bridge_logs_an_intent_less_charge_with_its_charge_id(
    capfd: pytest.CaptureFixture[str],
) -> None:
    bridge = new_bridge()
    await bridge.post(orjson.dumps(event(charge(None), "charge.refunded")))

    [line] = [orjson.loads(text) for text in capfd.readouterr().err.splitlines()]
    assert line["outcome"] == "published_without_intent"
    assert line["charge_id"] == CHARGE
    assert "payment_intent_id" not in line


async def test_the_bridge_acknowledges_an_event_naming_no_intent_and_no_charge_unpublished() -> (
    None
):
    bridge = new_bridge()
    payload = event(refund(payment_intent=None, charge_id=None), "charge.refund.updated")
    status, answer = await bridge.post(orjson.dumps(payload))

    assert (status, answer["outcome"]) == (200, "ignored")
    assert bridge.publisher.sent == []


async def test_the_bridge_logs_a_session_without_intent_with_its_session_id(
    capfd: pytest.CaptureFixture[str],
) -> None:
    bridge = new_bridge()
    await bridge.post(orjson.dumps(event(session(payment_intent=None), "checkout.session.expired")))

    [line] = [orjson.loads(text) for text in capfd.readouterr().err.splitlines()]
    assert (line["outcome"], line["checkout_session_id"]) == ("published_without_intent", SESSION)


@pytest.mark.parametrize("mode", ["setup", "subscription"])
async def test_the_bridge_acknowledges_a_session_of_another_mode_unpublished(mode: str) -> None:
    bridge = new_bridge()
    payload = event(session(mode=mode, payment_intent=None), "checkout.session.completed")
    status, answer = await bridge.post(orjson.dumps(payload))

    assert (status, answer["outcome"]) == (200, "ignored")
    assert bridge.publisher.sent == []


# --- live and test kept apart ------------------------------------------------------


@pytest.mark.parametrize(
    ("bridge_livemode", "event_livemode"), [(True, False), (False, True)], ids=["live", "test"]
)
async def test_an_event_of_the_other_mode_is_acknowledged_counted_and_never_published(
    capfd: pytest.CaptureFixture[str], bridge_livemode: bool, event_livemode: bool
) -> None:
    """A live bridge never takes a test payment into stock, nor a test bridge a real one;
    the 200 stops Stripe's retries, the warning names the event and both modes."""
    bridge = new_bridge(livemode=bridge_livemode)
    payload = event(
        payment_intent(livemode=event_livemode),
        "payment_intent.amount_capturable_updated",
        livemode=event_livemode,
        account="acct_1PgafTB7WZ01zgkW",
    )
    status, answer = await bridge.post(orjson.dumps(payload))

    assert (status, answer) == (200, {"outcome": "other_mode"})
    assert bridge.publisher.sent == []
    assert (bridge.count("other_mode"), bridge.count("published")) == (1.0, 0.0)
    [line] = [orjson.loads(text) for text in capfd.readouterr().err.splitlines()]
    assert line["level"] == "warning"
    assert (line["outcome"], line["event_id"], line["event_type"]) == (
        "other_mode",
        payload["id"],
        "payment_intent.amount_capturable_updated",
    )
    assert (line["livemode"], line["stripe_livemode"]) == (event_livemode, bridge_livemode)
    assert line["account"] == "acct_1PgafTB7WZ01zgkW"


async def test_an_event_of_the_other_mode_about_no_payment_is_other_mode_too() -> None:
    """The mode is checked first: every event of the wrong mode shows on the one counter."""
    bridge = new_bridge(livemode=True)
    payload = event(fixtures.resource("customer"), "customer.created")
    assert (await bridge.post(orjson.dumps(payload)))[1]["outcome"] == "other_mode"


@pytest.mark.parametrize("livemode", [None, "false", 0], ids=["absent", "text", "number"])
async def test_an_event_without_a_boolean_livemode_is_not_a_stripe_event(
    livemode: object,
) -> None:
    """Stripe sets `livemode` on every event: one without it belongs to neither mode."""
    bridge = new_bridge()
    payload = event(payment_intent(), "payment_intent.succeeded")
    if livemode is None:
        del payload["livemode"]
    else:
        payload["livemode"] = livemode
    status, answer = await bridge.post(orjson.dumps(payload))

    assert (status, answer["outcome"]) == (400, "bad_body")
    assert bridge.publisher.sent == []


async def test_a_live_bridge_publishes_live_events() -> None:
    bridge = new_bridge(livemode=True)
    obj = payment_intent(livemode=True)
    body = orjson.dumps(event(obj, "payment_intent.succeeded", livemode=True))
    status, answer = await bridge.post(body)
    assert (status, answer["outcome"]) == (200, "published")
    assert bridge.publisher.sent == [(INTENT.encode(), body)]


# --- the bridge's key is the consumer's key -----------------------------------------


def every_kind() -> list[tuple[str, dict[str, Any]]]:
    """An event of each object kind the consumer models, naming its intent, naming only a
    charge, or naming neither (Stripe's examples as they are, or with the links changed),
    and one of a kind it does not model."""
    cases: list[tuple[str, dict[str, Any]]] = [
        ("payment_intent", event(payment_intent(), "payment_intent.succeeded")),
        ("charge", event(charge(), "charge.succeeded")),
        ("charge-no-intent", event(charge(None), "charge.refunded")),
        ("customer", event(fixtures.resource("customer"), "customer.created")),
    ]
    naming = {
        "dispute": "charge.dispute.created",
        "refund": "charge.refund.updated",
        "review": "review.opened",
        "radar.early_fraud_warning": "radar.early_fraud_warning.created",
    }
    for kind, event_type in naming.items():
        cases.append((kind, event(fixtures.resource(kind, payment_intent=INTENT), event_type)))
        cases.append((f"{kind}-no-intent", event(fixtures.resource(kind), event_type)))
        orphan = fixtures.resource(kind, payment_intent=None, charge=None)
        cases.append((f"{kind}-neither", event(orphan, event_type)))
    cases.append(("session", event(session(), "checkout.session.completed")))
    unpaid = session(payment_intent=None, status="expired")
    cases.append(("session-expired-unpaid", event(unpaid, "checkout.session.expired")))
    for mode in ("setup", "subscription"):
        other = session(mode=mode, payment_intent=None)
        cases.append((f"session-{mode}", event(other, "checkout.session.completed")))
    return cases


async def test_for_every_kind_the_bridge_publishes_under_the_key_the_consumer_checks() -> None:
    """What the bridge publishes decodes under the key it was published with (never
    `key_mismatch` poison): an intent's key is the intent the consumer reads from the same
    event, any other key (a charge's, a session's) goes with an event that concerns no
    intent; and what the bridge does not publish, the consumer would tie to no intent."""
    cases = every_kind()
    kinds = {payload["data"]["object"]["object"] for _, payload in cases}
    assert kinds >= MODELLED_OBJECTS  # a kind modelled later needs its case here
    bridge = new_bridge()
    for name, payload in cases:
        body = orjson.dumps(payload)
        status, answer = await bridge.post(body)
        consumer_reads = StripeEvent.model_validate_json(body).payment_intent_id
        if answer["outcome"] == "ignored":
            assert consumer_reads is None, name
            continue
        assert (status, answer["outcome"]) in (
            (200, "published"),
            (200, "published_without_intent"),
        ), name
        key, value = bridge.publisher.sent[-1]
        assert value == body, name
        read = decode(Record(value, key))
        assert isinstance(read, Envelope), (name, read)
        if answer["outcome"] == "published":
            assert read.intent_id == key.decode() == consumer_reads, name
        else:
            assert read.intent_id is None, name

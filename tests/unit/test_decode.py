"""Decoding Kafka records: valid events, and poison with a reason."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import pytest

from intentflow.consumer.decode import Envelope, Poison, decode
from intentflow.schemas import Charge, Dispute, PaymentIntent, Refund, payment_intent_key
from intentflow.schemas.stripe import (
    MODELLED_OBJECTS,
    CheckoutSession,
    EarlyFraudWarning,
    Review,
)
from intentflow.stripekit import events
from tests.fixtures import stripe as fixtures


@dataclass
class Record:
    value: bytes | None
    key: bytes | None
    topic: str = "t"
    partition: int = 3
    offset: int = 7
    headers: tuple[tuple[str, bytes], ...] = ()


def test_payment_intent_event_decodes_with_unknown_fields_ignored() -> None:
    payload = events.intent_event("pi_1", amount=500, cart_id="c1")
    payload["data"]["object"]["brand_new_stripe_field"] = {"nested": [1, 2]}
    result = decode(Record(events.encode(payload), b"pi_1"))
    assert isinstance(result, Envelope)
    assert isinstance(result.event.data.object, PaymentIntent)
    assert result.event.data.object.cart("cart_id") == "c1"
    assert (result.partition, result.offset) == (3, 7)


def test_charge_event_names_its_intent() -> None:
    result = decode(Record(events.encode(events.charge_event("pi_9", amount=1)), b"pi_9"))
    assert isinstance(result, Envelope)
    assert isinstance(result.event.data.object, Charge)
    assert result.event.payment_intent_id == "pi_9"


def test_other_objects_concern_no_intent() -> None:
    payload = events.event({"object": "customer", "id": "cus_1"}, "customer.created")
    result = decode(Record(events.encode(payload), None))
    assert isinstance(result, Envelope)
    assert result.event.payment_intent_id is None
    assert payment_intent_key(payload) is None


def test_not_json_is_poison() -> None:
    result = decode(Record(b"{not json", b"pi_1"))
    assert isinstance(result, Poison) and result.error == "invalid_json"


def test_json_that_is_not_an_event_is_poison_naming_the_field() -> None:
    result = decode(Record(b'{"id": "evt_1", "type": "x"}', b"pi_1"))
    assert isinstance(result, Poison) and result.error == "invalid_event"
    assert "created" in result.detail or "data" in result.detail


def test_payment_intent_missing_amount_is_poison() -> None:
    payload = events.intent_event("pi_1", amount=500, cart_id="c1")
    del payload["data"]["object"]["amount"]
    result = decode(Record(events.encode(payload), b"pi_1"))
    assert isinstance(result, Poison) and "amount" in result.detail


def test_key_must_be_the_events_intent() -> None:
    payload = events.intent_event("pi_1", amount=500, cart_id="c1")
    for key in (b"pi_2", None):
        result = decode(Record(events.encode(payload), key))
        assert isinstance(result, Poison) and result.error == "key_mismatch"


def test_tombstone_is_poison() -> None:
    result = decode(Record(None, b"pi_1"))
    assert isinstance(result, Poison) and result.error == "empty_value"


def test_a_malformed_charge_is_poison_not_an_other_object() -> None:
    payload = events.charge_event("pi_1", amount=100)
    payload["data"]["object"]["payment_intent"] = {"not": "a string"}
    result = decode(Record(events.encode(payload), b"pi_1"))
    assert isinstance(result, Poison) and result.error == "invalid_event"
    assert "payment_intent" in result.detail


def test_ids_and_amounts_beyond_what_stripe_sends_are_poison_not_database_errors() -> None:
    """An event id over 2,704 bytes would fail the inbox's index, an amount the bigint."""
    long_id = events.intent_event("pi_1", amount=100, cart_id="c")
    long_id["id"] = "evt_" + "x" * 6000
    huge = events.intent_event("pi_1", amount=2**63, cart_id="c")
    long_intent = events.intent_event("pi_" + "y" * 300, amount=100, cart_id="c")
    for payload, where in [(long_id, "id"), (huge, "amount"), (long_intent, "id")]:
        key = payload["data"]["object"]["id"].encode()
        poison = decode(Record(events.encode(payload), key))
        assert isinstance(poison, Poison), where
        assert poison.error == "invalid_event" and where in poison.detail


def test_disputes_and_refunds_are_keyed_by_the_intent_they_name() -> None:
    """DESIGN: every charge.* event, disputes and refunds included, belongs on its intent's
    partition; an `ignored` 200 for them would tell Stripe never to send them again."""
    dispute = events.event(
        {"object": "dispute", "id": "dp_1", "charge": "ch_1", "payment_intent": "pi_7"},
        "charge.dispute.created",
    )
    refund = events.event(
        {"object": "refund", "id": "re_1", "charge": "ch_1", "payment_intent": "pi_7"},
        "charge.refund.updated",
    )
    assert payment_intent_key(dispute) == "pi_7"
    assert payment_intent_key(refund) == "pi_7"
    # The consumer reads them (as objects it does not act on yet), keyed by the intent.
    for payload in (dispute, refund):
        assert isinstance(decode(Record(events.encode(payload), b"pi_7")), Envelope)


MODELS = {
    "payment_intent": PaymentIntent,
    "charge": Charge,
    "dispute": Dispute,
    "refund": Refund,
    "checkout.session": CheckoutSession,
    "review": Review,
    "radar.early_fraud_warning": EarlyFraudWarning,
}


def test_every_modelled_kind_has_a_case_below() -> None:
    assert set(MODELS) == MODELLED_OBJECTS


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_stripes_own_example_of_each_kind_decodes_unchanged(kind: str) -> None:
    """Stripe's example object (tests/fixtures/), as it is, in Stripe's example event: read by
    its own model, not dead-lettered. The session's has `total_details.amount_shipping` null,
    which Stripe's spec allows."""
    obj = fixtures.resource(kind)
    payload = fixtures.event(obj, "x.updated")
    intent = obj["id"] if kind == "payment_intent" else obj.get("payment_intent")
    result = decode(Record(orjson.dumps(payload), intent.encode() if intent else None))
    assert isinstance(result, Envelope), result
    assert type(result.event.data.object) is MODELS[kind]

"""The topics' AsyncAPI document (docs/asyncapi.json) is what schemas/ says, never stale."""

from __future__ import annotations

import json
from pathlib import Path

from intentflow.schemas import asyncapi, contract_headers
from intentflow.schemas.stripe import StripeEvent
from intentflow.stripekit import events

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.json"


def test_the_checked_in_document_is_what_the_code_writes() -> None:
    assert DOCUMENT.read_text() == asyncapi.render(), (
        "docs/asyncapi.json is stale: run `make contract` and commit it"
    )


def test_the_document_names_the_topics_the_key_and_the_headers_the_bridge_writes() -> None:
    doc = json.loads(DOCUMENT.read_text())
    assert doc["asyncapi"].startswith("3.")
    assert {c["address"] for c in doc["channels"].values()} == {
        "stripe.events",
        "stripe.events.dlq",
        "orders.events",
    }
    message = doc["components"]["messages"]["stripeEvent"]
    written = [name for name, _ in contract_headers("evt_1", "payment_intent.created", 1)]
    assert sorted(message["headers"]["required"]) == sorted(written)
    assert "key" in message["bindings"]["kafka"]


def test_the_event_schema_is_the_models_own_and_a_real_event_fits_the_model() -> None:
    doc = json.loads(DOCUMENT.read_text())
    payload = doc["components"]["messages"]["stripeEvent"]["payload"]
    assert payload == StripeEvent.model_json_schema()
    assert set(payload["required"]) >= {"id", "type", "created", "data"}
    evt = events.intent_event("pi_doc", amount=100, cart_id="cart_doc")
    assert StripeEvent.model_validate(evt).payment_intent_id == "pi_doc"

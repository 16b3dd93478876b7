"""The topics' AsyncAPI document (docs/asyncapi.json) is what schemas/ says, never stale."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from intentflow.schemas import asyncapi, contract_headers
from intentflow.schemas.orders import OrderEvent
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


def as_components(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's own JSON Schema with its `$defs` moved to `components/schemas`."""
    text = json.dumps({k: v for k, v in schema.items() if k != "$defs"})
    return dict(json.loads(text.replace('"#/$defs/', '"#/components/schemas/')))


@pytest.mark.parametrize("model", [StripeEvent, OrderEvent])
def test_each_payload_schema_is_its_models_own_under_components(model: type[BaseModel]) -> None:
    doc = json.loads(DOCUMENT.read_text())
    schemas = doc["components"]["schemas"]
    assert schemas[model.__name__] == as_components(model.model_json_schema())
    for name, nested in model.model_json_schema().get("$defs", {}).items():
        assert schemas[name] == as_components(nested), name


def test_every_ref_names_a_part_of_the_document() -> None:
    doc = json.loads(DOCUMENT.read_text())
    refs = re.findall(r'"\$ref": "([^"]*)"', DOCUMENT.read_text())
    assert refs
    for ref in refs:
        assert ref.startswith("#/"), ref
        node: Any = doc
        for step in ref[2:].split("/"):
            node = node[step]  # a KeyError names the ref that leads nowhere


def test_the_event_schema_is_the_models_own_and_a_real_event_fits_the_model() -> None:
    doc = json.loads(DOCUMENT.read_text())
    message = doc["components"]["messages"]["stripeEvent"]
    assert message["payload"] == {"$ref": "#/components/schemas/StripeEvent"}
    payload = doc["components"]["schemas"]["StripeEvent"]
    assert set(payload["required"]) >= {"id", "type", "created", "data"}
    evt = events.intent_event("pi_doc", amount=100, cart_id="cart_doc")
    assert StripeEvent.model_validate(evt).payment_intent_id == "pi_doc"

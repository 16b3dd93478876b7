"""dev-stripe's actions (devservices/dev_stripe_actions.py): one Stripe-shaped, consistent
history per intent, which the consumer's meanings read as the step it plays, and a step
the intent's state does not allow refused in one line."""

from __future__ import annotations

from typing import Any

import pytest

from intentflow.consumer.decisions import Allocation, OrderStatus, order_status
from intentflow.consumer.facts import Facts
from intentflow.consumer.lifecycle import STATUS_TIER, meaning_of
from intentflow.devservices.dev_stripe import _parser
from intentflow.devservices.dev_stripe_actions import ACTIONS, WALKS, CannotPlay, Intent, after
from intentflow.schemas import StripeEvent
from tests.unit.test_stripekit_shapes import stripe_problems

AMOUNT = 4200
CART_KEY = "cart_id"  # CART_METADATA_KEY's default
T0 = 1_800_000_000


def history(*names: str, currency: str = "eur") -> tuple[Intent, list[dict[str, Any]]]:
    """The intent after `names` in turn, one second apart, and every event they sent."""
    intent = Intent.for_cart("cart_1", AMOUNT, currency, T0)
    sent: list[dict[str, Any]] = []
    for second, name in enumerate(names):
        done = after(name, intent, T0 + second)
        sent += ACTIONS[name].sends(intent, done, T0 + second)
        intent = done
    return intent, sent


def objects(sent: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [evt["data"]["object"] for evt in sent if evt["data"]["object"]["object"] == kind]


def folded(sent: list[dict[str, Any]]) -> Facts:
    facts = Facts()
    for evt in sent:
        event = StripeEvent.model_validate(evt)
        learn = meaning_of(event.type)
        assert learn is not None, event.type
        facts = learn(facts, event, CART_KEY)
    return facts


WALKED = [("authorize", *steps) for steps in WALKS.values()] + [
    ("authorize", "capture", "dispute"),
    ("authorize", "capture", "refund", "dispute"),
]


@pytest.mark.parametrize("names", WALKED, ids="-".join)
def test_every_event_is_stripes_shape(names: tuple[str, ...]) -> None:
    _, sent = history(*names)
    for evt in sent:
        obj = evt["data"]["object"]
        assert stripe_problems(evt, "event") == []
        assert stripe_problems(obj, obj["object"]) == [], evt["type"]


@pytest.mark.parametrize("names", WALKED, ids="-".join)
def test_one_intent_one_charge_one_customer_across_the_steps(names: tuple[str, ...]) -> None:
    intent, sent = history(*names)
    intents = objects(sent, "payment_intent")
    charge_id = f"ch_{intent.id}"
    assert {pi["id"] for pi in intents} == {intent.id}
    for field in ("customer", "payment_method", "client_secret", "created", "currency"):
        assert len({pi[field] for pi in intents}) == 1, field
    assert intents[0]["latest_charge"] is None  # created, not yet confirmed
    assert {pi["latest_charge"] for pi in intents[1:]} == {charge_id}
    assert {pi["metadata"][CART_KEY] for pi in intents} == {"cart_1"}
    for charge in objects(sent, "charge"):
        assert (charge["id"], charge["payment_intent"], charge["currency"]) == (
            charge_id,
            intent.id,
            "eur",
        )
        assert charge["created"] == T0
    for dispute in objects(sent, "dispute"):
        assert (dispute["charge"], dispute["payment_intent"]) == (charge_id, intent.id)
    assert len({evt["id"] for evt in sent}) == len(sent)
    assert [evt["created"] for evt in sent] == sorted(evt["created"] for evt in sent)


def test_the_money_fields_follow_the_intent() -> None:
    _, sent = history("authorize", "capture", "refund")
    by_type = {evt["type"]: evt["data"]["object"] for evt in sent}
    held = by_type["payment_intent.amount_capturable_updated"]
    assert (held["amount_capturable"], held["amount_received"]) == (AMOUNT, 0)
    captured = by_type["payment_intent.succeeded"]
    assert (captured["amount_capturable"], captured["amount_received"]) == (0, AMOUNT)
    assert by_type["charge.captured"]["amount_captured"] == AMOUNT
    refunded = by_type["charge.refunded"]
    assert (refunded["amount_refunded"], refunded["refunded"], refunded["captured"]) == (
        AMOUNT,
        True,
        True,
    )
    _, sent = history("authorize", "cancel")
    canceled = sent[-1]["data"]["object"]
    assert (canceled["status"], canceled["canceled_at"]) == ("canceled", T0 + 1)


@pytest.mark.parametrize(
    ("names", "status"),
    [
        (("authorize",), OrderStatus.PLACED),
        (("authorize", "capture"), OrderStatus.PLACED),
        (("authorize", "capture", "refund"), OrderStatus.REFUNDED),
        (("authorize", "cancel"), OrderStatus.CANCELED),
        (("authorize", "capture", "dispute"), OrderStatus.DISPUTED),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, tuple) else str(value),
)
def test_the_consumer_reads_each_history_as_the_step_played(
    names: tuple[str, ...], status: OrderStatus
) -> None:
    _, sent = history(*names)
    facts = folded(sent)
    assert facts.authorization is not None and facts.authorization.amount == AMOUNT
    assert order_status(Allocation.PLACED, facts, AMOUNT) is status
    assert facts.amount_received == (AMOUNT if "capture" in names else 0)
    # Any order of arrival tells the same (the consumer's fold is order-free).
    assert folded(sent[::-1]) == facts


@pytest.mark.parametrize("name", sorted(ACTIONS))
@pytest.mark.parametrize("status", sorted(STATUS_TIER))
def test_a_status_an_action_does_not_allow_is_refused_in_one_line(name: str, status: str) -> None:
    intent = Intent("pi_1", "cart_1", AMOUNT, "usd", T0, status)
    if status in ACTIONS[name].allowed:
        assert after(name, intent, T0) != intent
        return
    with pytest.raises(CannotPlay, match=f"^cannot {name} pi_1: it is {status}, and {name} needs "):
        after(name, intent, T0)


@pytest.mark.parametrize(
    ("names", "refused"),
    [
        (("authorize", "capture", "refund", "refund"), "it is refunded already"),
        (("authorize", "capture", "dispute", "dispute"), "it is disputed already"),
        (("authorize", "capture", "dispute", "refund"), "its charge is disputed"),
    ],
)
def test_what_stripe_refuses_beyond_the_status_is_refused(
    names: tuple[str, ...], refused: str
) -> None:
    with pytest.raises(CannotPlay, match=refused):
        history(*names)


def test_every_action_is_a_subcommand_and_an_unknown_one_is_an_error() -> None:
    parser = _parser()
    for name in ACTIONS:
        assert parser.parse_args([name, "x"]).command == name
    assert parser.parse_args(["walk", "--cancel"]).cancel is True
    with pytest.raises(SystemExit):
        parser.parse_args(["void", "pi_1"])
    with pytest.raises(KeyError):
        after("void", Intent.for_cart("cart_1", AMOUNT, "usd", T0), T0)

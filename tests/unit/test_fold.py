"""The pure fold of one intent's events: ordering, finality, one order per intent."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from consumer.fold import IntentState, Outcome, fold_intent, moves_forward
from loadtest import events
from schemas import StripeEvent


def ev(status: str, event_type: str | None = None, **kw: Any) -> StripeEvent:
    payload = events.intent_event(
        "pi_1",
        amount=kw.pop("amount", 1000),
        cart_id="cart-1",
        status=status,
        event_type=event_type,
    )
    return StripeEvent.model_validate(payload)


NEW = IntentState("pi_1")


def test_authorization_creates_one_order_from_the_intent() -> None:
    auth = ev("requires_capture")
    fold = fold_intent(NEW, [auth])
    assert fold.create_order is not None
    assert (fold.create_order.cart_id, fold.create_order.amount) == ("cart-1", 1000)
    assert fold.create_order.event_id == auth.id
    assert fold.state == IntentState("pi_1", "requires_capture", has_order=True)
    assert fold.outcomes == ((auth.id, Outcome.APPLIED),)


@pytest.mark.parametrize(
    "event_type",
    [
        "payment_intent.amount_capturable_updated",
        "payment_intent.authorized",
        "payment_intent.succeeded",
    ],
)
def test_every_authorization_synonym_creates_an_order(event_type: str) -> None:
    status = "succeeded" if event_type.endswith("succeeded") else "requires_capture"
    assert fold_intent(NEW, [ev(status, event_type)]).create_order is not None


def test_an_intent_that_already_has_an_order_gets_no_second_one() -> None:
    existing = IntentState("pi_1", "requires_capture", has_order=True)
    fold = fold_intent(existing, [ev("succeeded")])
    assert fold.create_order is None
    assert fold.state.status == "succeeded"


def test_capture_after_authorization_in_one_batch_is_one_order() -> None:
    fold = fold_intent(NEW, [ev("requires_capture"), ev("succeeded")])
    assert fold.create_order is not None
    assert fold.state.status == "succeeded"
    assert [o for _, o in fold.outcomes] == [Outcome.APPLIED, Outcome.APPLIED]


def test_an_event_that_would_move_the_intent_backwards_is_stale() -> None:
    late_auth = ev("requires_capture")
    fold = fold_intent(IntentState("pi_1", "succeeded", has_order=True), [late_auth])
    assert fold.outcomes == ((late_auth.id, Outcome.STALE),)
    assert fold.state.status == "succeeded"
    assert not fold.changed


def test_canceled_is_final_and_blocks_a_late_authorization() -> None:
    fold = fold_intent(NEW, [ev("canceled"), ev("requires_capture")])
    assert fold.create_order is None
    assert fold.state.status == "canceled"
    assert [o for _, o in fold.outcomes] == [Outcome.APPLIED, Outcome.STALE]


def test_events_without_a_known_intent_status_are_ignored() -> None:
    charge = StripeEvent.model_validate(events.charge_event("pi_1", amount=1000))
    fold = fold_intent(NEW, [charge])
    assert fold.outcomes == ((charge.id, Outcome.IGNORED),)
    assert fold.create_order is None and not fold.changed


LIFE = ["requires_payment_method", "requires_action", "processing", "requires_capture", "succeeded"]


@pytest.mark.parametrize("order", list(itertools.permutations(LIFE)))
def test_final_state_does_not_depend_on_arrival_order(order: tuple[str, ...]) -> None:
    evts = [ev(s) for s in order]
    fold = fold_intent(NEW, evts)
    assert fold.state.status == "succeeded"
    assert fold.create_order is not None  # whichever authorization arrived first made it
    # Folding the same events one at a time, across batches, ends the same way.
    state, orders = NEW, 0
    for e in evts:
        step = fold_intent(state, [e])
        state, orders = step.state, orders + (step.create_order is not None)
    assert state.status == "succeeded" and orders == 1


def test_moves_forward_rules() -> None:
    assert moves_forward(None, "requires_payment_method")
    assert moves_forward("requires_action", "requires_capture")
    assert moves_forward("requires_capture", "requires_capture")
    assert not moves_forward("requires_capture", "processing")
    assert not moves_forward("succeeded", "canceled")
    assert not moves_forward("canceled", "succeeded")
    assert not moves_forward(None, "some_future_status")

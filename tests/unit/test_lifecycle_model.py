"""The reference model of the lifecycle checked on examples worked out by hand from the rules.

The property tests trust `tests.lifecycle_model` to say what the database must
hold; these examples make sure the model itself reads the rules right.
"""

from __future__ import annotations

import itertools
from typing import Any

from tests import lifecycle_model as model


def ev(event_id: str, event_type: str, created: int, obj: dict[str, Any]) -> dict[str, Any]:
    return {"id": event_id, "type": event_type, "created": created, "data": {"object": obj}}


def pi(status: str, intent: str = "pi_1", **fields: Any) -> dict[str, Any]:
    obj = {
        "object": "payment_intent",
        "id": intent,
        "status": status,
        "amount": 1000,
        "currency": "usd",
        "metadata": {"cart_id": f"cart-{intent}"},
        "amount_capturable": 1000 if status == "requires_capture" else 0,
        "amount_received": 1000 if status == "succeeded" else 0,
        "cancellation_reason": None,
    }
    obj.update(fields)
    return obj


def charge(amount_refunded: int = 0, refunded: bool = False) -> dict[str, Any]:
    return {
        "object": "charge",
        "id": "ch_1",
        "payment_intent": "pi_1",
        "amount_refunded": amount_refunded,
        "refunded": refunded,
    }


def refund(refund_id: str, amount: int, status: str) -> dict[str, Any]:
    return {
        "object": "refund",
        "id": refund_id,
        "payment_intent": "pi_1",
        "amount": amount,
        "status": status,
    }


def dispute(status: str) -> dict[str, Any]:
    return {
        "object": "dispute",
        "id": "dp_1",
        "payment_intent": "pi_1",
        "amount": 1000,
        "reason": "fraudulent",
        "status": status,
    }


def auth(intent: str, created: int, event_id: str | None = None) -> dict[str, Any]:
    return ev(
        event_id or f"evt_auth_{intent}",
        "payment_intent.amount_capturable_updated",
        created,
        pi("requires_capture", intent),
    )


def test_a_later_failure_after_3ds_sets_the_status_within_the_first_tier() -> None:
    facts = model.intent_facts(
        [
            ev("evt_1", "payment_intent.requires_action", 10, pi("requires_action")),
            ev("evt_2", "payment_intent.payment_failed", 11, pi("requires_payment_method")),
        ]
    )
    assert facts.status == "requires_payment_method"
    # In the same second the step decides: the failure (3) after the challenge (1).
    facts = model.intent_facts(
        [
            ev("evt_9", "payment_intent.requires_action", 10, pi("requires_action")),
            ev("evt_1", "payment_intent.payment_failed", 10, pi("requires_payment_method")),
        ]
    )
    assert (facts.status, facts.status_step) == ("requires_payment_method", 3)


def test_an_authorization_outranks_a_later_first_tier_event_and_canceled_outranks_all() -> None:
    authorization = auth("pi_1", 10)
    late_failure = ev("evt_2", "payment_intent.payment_failed", 20, pi("requires_payment_method"))
    assert model.intent_facts([authorization, late_failure]).status == "requires_capture"
    capture = ev("evt_3", "payment_intent.succeeded", 30, pi("succeeded"))
    cancel = ev("evt_4", "payment_intent.canceled", 5, pi("canceled", cancellation_reason="x"))
    facts = model.intent_facts([capture, cancel, authorization])
    assert (facts.status, facts.cancellation_reason, facts.status_created) == ("canceled", "x", 5)


def test_in_one_second_the_intents_own_cancel_outranks_an_expiry() -> None:
    expired = ev("evt_b", "charge.expired", 40, charge())
    canceled = ev(
        "evt_a", "payment_intent.canceled", 40, pi("canceled", cancellation_reason="automatic")
    )
    assert model.intent_facts([canceled, expired]).cancellation_reason == "automatic"
    assert model.intent_facts([expired, canceled]).cancellation_reason == "automatic"
    # A later second beats the step.
    later = {**expired, "created": 41}
    assert model.intent_facts([canceled, later]).cancellation_reason == "expired"


def test_in_one_second_and_one_step_the_greater_event_id_wins() -> None:
    first = ev("evt_a", "payment_intent.canceled", 40, pi("canceled", cancellation_reason="x"))
    second = ev("evt_b", "payment_intent.canceled", 40, pi("canceled", cancellation_reason="y"))
    assert model.intent_facts([second, first]).cancellation_reason == "y"
    assert model.intent_facts([first, second]).cancellation_reason == "y"


def test_facts_do_not_depend_on_the_order_or_repetition_of_events() -> None:
    history = [
        ev("evt_1", "payment_intent.created", 1, pi("requires_payment_method")),
        auth("pi_1", 2, "evt_2"),
        ev("evt_3", "payment_intent.succeeded", 2, pi("succeeded")),
        ev("evt_4", "charge.refunded", 3, charge(400)),
        ev("evt_5", "charge.refund.updated", 3, refund("re_1", 400, "succeeded")),
        ev("evt_6", "charge.dispute.created", 4, dispute("needs_response")),
        ev("evt_7", "charge.dispute.closed", 4, dispute("won")),
    ]
    expected = model.intent_facts(history)
    for order in itertools.permutations(history):
        assert model.intent_facts([*order, order[0], order[-1]]) == expected
    assert expected.status == "succeeded" and expected.amount_refunded == 400
    assert expected.dispute is not None and expected.dispute.status == "won"


def test_refunds_count_pending_and_succeeded_but_not_failed_and_the_latest_charge_wins() -> None:
    captured = ev("evt_0", "payment_intent.succeeded", 1, pi("succeeded"))
    facts = model.intent_facts(
        [
            captured,
            ev("evt_1", "charge.refund.updated", 5, refund("re_1", 300, "pending")),
            ev("evt_2", "charge.refund.updated", 5, refund("re_2", 200, "pending")),
            ev("evt_3", "charge.refund.updated", 5, refund("re_2", 200, "failed")),
            ev("evt_4", "charge.refunded", 4, charge(100)),
        ]
    )
    assert facts.amount_refunded == 300
    assert {rid: r.status for rid, r in facts.refunds.items()} == {
        "re_1": "pending",
        "re_2": "failed",
    }
    # The charge's latest word: a refund of 700 that failed since (a later update says 0).
    more = model.intent_facts(
        [
            captured,
            ev("evt_4", "charge.refunded", 4, charge(700)),
            ev("evt_5", "charge.updated", 6, charge()),
        ]
    )
    assert (more.amount_refunded, more.refunded_in_full(1000)) == (0, False)
    # A refund that failed after the charge last spoke, and was made before, stops
    # counting in what the charge said.
    failed = {**refund("re_3", 700, "failed"), "created": 3}
    stale = model.intent_facts(
        [
            captured,
            ev("evt_4", "charge.refunded", 4, charge(700)),
            ev("evt_6", "refund.failed", 8, failed),
        ]
    )
    # Never more than was captured: without a capture, nothing was sent back.
    assert model.intent_facts([ev("evt_4", "charge.refunded", 4, charge(700))]).amount_refunded == 0
    assert (stale.amount_refunded, stale.refunded_in_full(1000)) == (0, False)


def test_a_released_hold_on_an_uncaptured_charge_is_no_refund() -> None:
    released = {**charge(1000, refunded=True), "captured": False}
    facts = model.intent_facts(
        [
            auth("pi_1", 1),
            ev("evt_x", "charge.expired", 9, released),
            ev("evt_r", "charge.refunded", 9, released),
        ]
    )
    assert (facts.amount_refunded, facts.refunded_in_full(1000)) == (0, False)
    assert (facts.status, facts.cancellation_reason) == ("canceled", "expired")


def test_a_charge_refunded_in_full_makes_the_order_refunded_even_below_its_amount() -> None:
    facts = model.intent_facts(
        [auth("pi_1", 1), ev("evt_r", "charge.refunded", 2, charge(600, refunded=True))]
    )
    assert facts.refunded_in_full(1000)
    assert model.order(facts, "placed", None).status == "refunded"


def test_a_dispute_marks_the_order_unless_won_and_the_latest_snapshot_is_kept() -> None:
    opened = ev("evt_1", "charge.dispute.created", 5, dispute("needs_response"))
    review = ev("evt_2", "charge.dispute.updated", 5, dispute("under_review"))
    won = ev("evt_3", "charge.dispute.closed", 9, dispute("won"))
    open_facts = model.intent_facts([review, auth("pi_1", 1), opened])
    assert open_facts.dispute is not None and open_facts.dispute.status == "under_review"
    assert model.order(open_facts, "placed", None).status == "disputed"
    closed = model.intent_facts([won, review, auth("pi_1", 1), opened])
    assert model.order(closed, "placed", None).status == "placed"
    assert model.order(closed, "placed", None).dispute_status == "won"


def test_one_batch_serves_scarce_stock_to_the_earlier_authorization_not_the_earlier_event() -> None:
    carts = {
        "cart-pi_1": model.Cart("usd", (("sku-a", 1, 500), ("sku-a", 1, 500))),
        "cart-pi_2": model.Cart("usd", (("sku-a", 2, 500),)),
    }
    state = model.one_batch([auth("pi_2", 20), auth("pi_1", 10)], carts, {"sku-a": 3})
    assert {pid: o.allocation for pid, o in state.orders.items()} == {
        "pi_1": "placed",
        "pi_2": "out_of_stock",
    }
    assert state.orders["pi_2"].status_reason == "short:sku-a"
    # Two lines of one SKU are one demand of 2.
    assert state.levels == {"sku-a": 1}


def test_one_batch_skips_an_order_canceled_in_it_so_the_next_payment_gets_the_stock() -> None:
    carts = {
        "cart-pi_1": model.Cart("usd", (("sku-a", 1, 1000),)),
        "cart-pi_2": model.Cart("usd", (("sku-a", 1, 1000),)),
    }
    cancel = ev("evt_c", "payment_intent.canceled", 30, pi("canceled", "pi_1"))
    state = model.one_batch([auth("pi_1", 10), auth("pi_2", 20), cancel], carts, {"sku-a": 1})
    assert state.orders["pi_1"].allocation == "skipped"
    assert state.orders["pi_1"].status == "canceled"
    assert state.orders["pi_2"].allocation == "placed"
    assert state.levels == {"sku-a": 0}


def test_review_reasons_are_checked_in_the_rules_order() -> None:
    cart = model.Cart("usd", (("sku-a", 2, 500),))

    def authorized(cart_id: str, amount: int, currency: str, held: int) -> str | None:
        terms = model.Terms(cart_id, amount, currency, held, amount, currency)
        return model.review_reason(terms, {"cart-1": cart, "cart-empty": empty})

    empty = model.Cart("usd", ())
    assert authorized("cart-1", 1000, "usd", 1000) is None
    assert authorized("cart-2", 1000, "usd", 1000) == "cart_missing"
    assert authorized("cart-empty", 1000, "usd", 1000) == "cart_empty"
    # Each reason wins over the ones after it.
    assert authorized("cart-1", 999, "eur", 10) == "currency_mismatch"
    assert authorized("cart-1", 999, "usd", 10) == "amount_mismatch"
    assert authorized("cart-1", 1000, "usd", 999) == "authorization_short"


ONE_EACH = {
    "cart-pi_1": model.Cart("usd", (("sku-a", 1, 1000),)),
    "cart-pi_2": model.Cart("usd", (("sku-a", 1, 1000),)),
}


def at(*events: dict[str, Any], partition: int = 0) -> list[tuple[dict[str, Any], model.Arrival]]:
    """A batch: the events in this order, received one millisecond apart."""
    return [(e, (1000 + n, partition, n)) for n, e in enumerate(events)]


def test_in_batches_of_one_batch_is_one_batch() -> None:
    cancel = ev("evt_c", "payment_intent.canceled", 30, pi("canceled", "pi_1"))
    history = [auth("pi_1", 10), auth("pi_2", 20), cancel]
    assert model.in_batches([at(*history)], ONE_EACH, {"sku-a": 1}) == model.one_batch(
        history, ONE_EACH, {"sku-a": 1}
    )


def test_a_cancel_in_a_later_batch_gives_stock_to_that_batch_s_new_order() -> None:
    cancel = ev("evt_c", "payment_intent.canceled", 30, pi("canceled", "pi_1"))
    released = {**charge(1000, refunded=True), "captured": False}
    release = ev("evt_r", "charge.refunded", 30, released)
    # The cancel's copy and a later event of the intent give nothing back again.
    batches = [at(auth("pi_1", 10)), at(auth("pi_2", 20), cancel), at(cancel, release)]
    state = model.in_batches(batches, ONE_EACH, {"sku-a": 1})
    assert {pid: (o.allocation, o.status) for pid, o in state.orders.items()} == {
        "pi_1": ("placed", "canceled"),
        "pi_2": ("placed", "placed"),
    }
    assert state.levels == {"sku-a": 0}


def test_an_out_of_stock_order_is_not_revisited_when_stock_comes_back() -> None:
    cancel = ev("evt_c", "payment_intent.canceled", 30, pi("canceled", "pi_1"))
    batches = [at(auth("pi_1", 10)), at(auth("pi_2", 20)), at(cancel)]
    state = model.in_batches(batches, ONE_EACH, {"sku-a": 1})
    assert state.orders["pi_2"].allocation == "out_of_stock"
    assert state.levels == {"sku-a": 1}


def test_a_later_payment_in_an_earlier_batch_is_served_first() -> None:
    state = model.in_batches([at(auth("pi_2", 20)), at(auth("pi_1", 10))], ONE_EACH, {"sku-a": 1})
    assert state.orders["pi_2"].allocation == "placed"
    assert state.orders["pi_1"].allocation == "out_of_stock"


def test_in_one_batch_and_one_second_the_earlier_arrival_is_served_first() -> None:
    first, second = auth("pi_2", 10), auth("pi_1", 10)
    state = model.in_batches([at(first, second)], ONE_EACH, {"sku-a": 1})
    assert state.orders["pi_2"].allocation == "placed"
    # A copy counts where it first arrived in the batch; its later copies change nothing.
    state = model.in_batches([at(second, first, second)], ONE_EACH, {"sku-a": 1})
    assert state.orders["pi_1"].allocation == "placed"

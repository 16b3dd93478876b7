"""The pure fold of one intent's events: its facts, its one order, and the decisions that follow."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from intentflow.consumer.decisions import (
    Allocation,
    CancelOrder,
    Decision,
    OrderStatus,
    PlaceOrder,
    RecordCancellation,
    RecordDispute,
    RecordPayment,
    RecordRefund,
    RecordRefundStopped,
)
from intentflow.consumer.facts import Terms
from intentflow.consumer.fold import IntentFold, IntentState, OrderView, Outcome, fold_intent
from intentflow.schemas import StripeEvent
from intentflow.stripekit import events

T0 = 1_790_000_000


def ev(
    status: str,
    event_type: str | None = None,
    *,
    created: int = T0,
    amount: int = 1000,
    capturable: int | None = None,
    reason: str | None = None,
) -> StripeEvent:
    intent = events.payment_intent(
        "pi_1", amount=amount, cart_id="cart-1", status=status, created=created
    )
    if capturable is not None:
        intent["amount_capturable"] = capturable
    intent["cancellation_reason"] = reason
    return StripeEvent.model_validate(
        events.event(intent, event_type or events.EVENT_TYPE_OF_STATUS[status])
    )


def charge_ev(event_type: str, *, created: int = T0, **fields: Any) -> StripeEvent:
    payload = events.charge_event("pi_1", amount=1000, event_type=event_type)
    payload["created"] = created
    payload["data"]["object"].update(fields)
    return StripeEvent.model_validate(payload)


def other_ev(obj: dict[str, Any], event_type: str, *, created: int = T0) -> StripeEvent:
    payload = events.event({"payment_intent": "pi_1", **obj}, event_type)
    payload["created"] = created
    return StripeEvent.model_validate(payload)


def dispute_ev(status: str, *, created: int = T0, dispute_id: str = "dp_1") -> StripeEvent:
    obj = {"object": "dispute", "id": dispute_id, "charge": "ch_1", "amount": 1000}
    return other_ev(
        {**obj, "reason": "fraudulent", "status": status}, "charge.dispute.updated", created=created
    )


def refund_ev(
    status: str, amount: int, *, created: int = T0, refund_id: str = "re_1"
) -> StripeEvent:
    obj = {"object": "refund", "id": refund_id, "charge": "ch_1", "amount": amount}
    return other_ev({**obj, "status": status}, "charge.refund.updated", created=created)


NEW = IntentState("pi_1")
ORDER = OrderView(id=1, allocation=Allocation.PLACED, amount=1000)


def with_order(fold: IntentFold) -> IntentState:
    """The state after `fold`, as the store would read it back once the order exists."""
    return IntentState("pi_1", fold.state.facts, ORDER)


def kinds(decisions: tuple[Decision, ...]) -> list[type]:
    return [type(d) for d in decisions]


def outcomes(fold: IntentFold) -> list[Outcome]:
    return [o for _, o in fold.outcomes]


# Authorization and the one order.


def test_authorization_places_one_order_from_the_intent() -> None:
    auth = ev("requires_capture", capturable=900)
    fold = fold_intent(NEW, [auth], [(5, 2, 7)])
    (place,) = fold.decisions
    terms = Terms("cart-1", 1000, "usd", 900, 1000, "usd")
    assert place == PlaceOrder("pi_1", terms, auth.id, (T0, 5, 2, 7))
    assert fold.state.facts.status == "requires_capture"
    assert outcomes(fold) == [Outcome.APPLIED]


@pytest.mark.parametrize(
    "event_type",
    [
        "payment_intent.amount_capturable_updated",
        "payment_intent.authorized",
        "payment_intent.succeeded",
    ],
)
def test_every_authorization_synonym_places_an_order(event_type: str) -> None:
    status = "succeeded" if event_type.endswith("succeeded") else "requires_capture"
    (place,) = fold_intent(NEW, [ev(status, event_type)]).decisions
    assert isinstance(place, PlaceOrder) and place.terms.authorized == 1000


def test_a_captured_payment_counts_what_was_received() -> None:
    succeeded = ev("succeeded")
    assert succeeded.data.object.amount_received == 1000  # type: ignore[union-attr]
    (place,) = fold_intent(NEW, [succeeded]).decisions
    assert isinstance(place, PlaceOrder) and place.terms.authorized == 1000


def test_an_intent_that_already_has_an_order_gets_no_second_one() -> None:
    existing = with_order(fold_intent(NEW, [ev("requires_capture")]))
    fold = fold_intent(existing, [ev("succeeded", created=T0 + 60)])
    # The capture is announced to the order's readers; no second order.
    assert fold.decisions == (RecordPayment("pi_1"),)
    assert fold.state.facts.status == "succeeded"
    # The same status again is no news.
    again = fold_intent(fold.state, [ev("succeeded", created=T0 + 61)])
    assert again.decisions == ()


def test_capture_after_authorization_in_one_batch_is_one_order() -> None:
    auth, capture = ev("requires_capture"), ev("succeeded", created=T0 + 5)
    fold = fold_intent(NEW, [auth, capture], [(9, 0, 1), (3, 0, 2)])
    (place,) = fold.decisions
    assert isinstance(place, PlaceOrder) and place.event_id == auth.id
    assert place.paid_key == (T0, 9, 0, 1)  # the earliest authorization
    assert fold.state.facts.status == "succeeded"
    assert outcomes(fold) == [Outcome.APPLIED, Outcome.APPLIED]


# Status: Stripe's state machine, not a rank of statuses.


def test_an_older_status_changes_no_status() -> None:
    late_auth = ev("requires_capture")
    state = with_order(fold_intent(NEW, [ev("succeeded", created=T0 + 9)]))
    fold = fold_intent(state, [late_auth])
    # It tells when the money was first held, and nothing else: no decision.
    assert fold.outcomes == ((late_auth.id, Outcome.APPLIED),)
    assert (fold.state.facts.status, fold.state.facts.paid_at) == ("succeeded", T0)
    assert fold.decisions == ()
    again = fold_intent(fold.state, [late_auth])  # its copy (the inbox would drop it)
    assert again.outcomes[0][1] is Outcome.STALE and not again.changed


def test_a_failure_after_3d_secure_in_the_same_second_is_not_stale() -> None:
    challenge = ev("requires_action")
    failed = ev("requires_payment_method", "payment_intent.payment_failed")
    for order in ([challenge, failed], [failed, challenge]):
        fold = fold_intent(NEW, order)
        assert fold.state.facts.status == "requires_payment_method"
    in_order = fold_intent(with_order(fold_intent(NEW, [challenge])), [failed])
    assert outcomes(in_order) == [Outcome.APPLIED]


def test_a_debit_that_was_processing_can_fail_days_later() -> None:
    processing = ev("processing")
    failed = ev("requires_payment_method", "payment_intent.payment_failed", created=T0 + 86400)
    state = fold_intent(NEW, [processing]).state
    fold = fold_intent(state, [failed])
    assert outcomes(fold) == [Outcome.APPLIED]
    assert fold.state.facts.status == "requires_payment_method"
    # Delivered the other way round, the earlier `processing` is what is stale.
    late = fold_intent(fold_intent(NEW, [failed]).state, [processing])
    assert outcomes(late) == [Outcome.STALE]
    assert late.state.facts.status == "requires_payment_method"


def test_a_retry_after_a_failure_can_still_succeed() -> None:
    failed = ev("requires_payment_method", "payment_intent.payment_failed")
    fold = fold_intent(NEW, [ev("succeeded", created=T0 + 30), failed])
    assert fold.state.facts.status == "succeeded"
    assert kinds(fold.decisions) == [PlaceOrder]


def test_the_authorization_outranks_every_earlier_status_of_a_later_second() -> None:
    fold = fold_intent(NEW, [ev("requires_capture"), ev("processing", created=T0 + 1)])
    assert fold.state.facts.status == "requires_capture"


# Cancellation and expiry.


def test_a_cancel_after_the_order_gives_the_stock_back_once() -> None:
    state = with_order(fold_intent(NEW, [ev("requires_capture")]))
    cancel = ev("canceled", created=T0 + 60, reason="requested_by_customer")
    fold = fold_intent(state, [cancel, cancel])
    assert fold.decisions == (CancelOrder("pi_1", cancel.id),)
    assert fold.state.facts.cancellation_reason == "requested_by_customer"
    assert outcomes(fold) == [Outcome.APPLIED, Outcome.STALE]
    again = fold_intent(IntentState("pi_1", fold.state.facts, ORDER), [cancel])
    assert again.decisions == ()


def test_a_cancel_before_the_authorization_makes_the_order_canceled_from_the_start() -> None:
    cancel = ev("canceled", created=T0 + 60, reason="requested_by_customer")
    auth = ev("requires_capture")
    canceled = fold_intent(NEW, [cancel]).state
    assert canceled.facts.canceled
    fold = fold_intent(canceled, [auth])
    (place,) = fold.decisions
    assert isinstance(place, PlaceOrder)
    assert fold.state.facts.canceled  # the store creates it `skipped`: canceled, no stock
    assert outcomes(fold) == [Outcome.APPLIED]


def test_an_expired_authorization_cancels_the_order() -> None:
    state = with_order(fold_intent(NEW, [ev("requires_capture")]))
    expired = charge_ev("charge.expired", created=T0 + 7 * 86400, status="failed")
    fold = fold_intent(state, [expired])
    assert kinds(fold.decisions) == [CancelOrder]
    assert (fold.state.facts.status, fold.state.facts.cancellation_reason) == (
        "canceled",
        "expired",
    )
    # Stripe's own cancellation of the intent that follows changes no stock again,
    # but its reason reaches the order: the same as when both came in one batch.
    automatic = ev("canceled", created=T0 + 7 * 86400, reason="automatic")
    then = fold_intent(IntentState("pi_1", fold.state.facts, ORDER), [automatic])
    assert then.decisions == (RecordCancellation("pi_1"),)
    together = fold_intent(state, [expired, automatic])
    assert together.state.facts == then.state.facts


def test_the_hold_an_expired_authorization_releases_is_not_a_refund() -> None:
    state = with_order(fold_intent(NEW, [ev("requires_capture")]))
    expired = charge_ev(
        "charge.expired", created=T0 + 60, captured=False, amount_refunded=1000, refunded=True
    )
    facts = fold_intent(state, [expired]).state.facts
    assert facts.canceled and facts.amount_refunded == 0 and not facts.refunded_in_full(1000)


# Refunds and disputes.


def test_a_partial_then_a_full_refund_records_each_amount() -> None:
    state = with_order(fold_intent(NEW, [ev("succeeded")]))
    partial = charge_ev("charge.refunded", created=T0 + 10, amount_refunded=300)
    full = charge_ev("charge.refunded", created=T0 + 20, amount_refunded=1000, refunded=True)
    first = fold_intent(state, [partial])
    assert first.decisions == (RecordRefund("pi_1"),)
    assert first.state.facts.amount_refunded == 300
    assert not first.state.facts.refunded_in_full(1000)
    second = fold_intent(IntentState("pi_1", first.state.facts, ORDER), [full, partial])
    assert second.state.facts.amount_refunded == 1000
    assert second.state.facts.refunded_in_full(1000)
    assert outcomes(second) == [Outcome.APPLIED, Outcome.STALE]


def test_a_refund_object_counts_until_it_fails() -> None:
    state = with_order(fold_intent(NEW, [ev("succeeded")]))
    pending = refund_ev("pending", 400, created=T0 + 10)
    failed = refund_ev("failed", 400, created=T0 + 20)
    counted = fold_intent(state, [pending])
    assert counted.state.facts.amount_refunded == 400
    for order in ([pending, failed], [failed, pending]):
        fold = fold_intent(state, order)
        assert fold.state.facts.amount_refunded == 0


def test_a_refund_that_fails_without_ever_counting_decides_the_money_again_quietly() -> None:
    """Its order shows nothing new (no RecordRefund, no event), but the refund it may be
    owed is decided again (RecordRefundStopped); one that counted first is a RecordRefund."""
    state = with_order(fold_intent(NEW, [ev("succeeded")]))
    failed = refund_ev("failed", 400, created=T0 + 20)
    assert fold_intent(state, [failed]).decisions == (RecordRefundStopped("pi_1"),)
    counted = fold_intent(state, [refund_ev("pending", 400, created=T0 + 10)])
    again = fold_intent(IntentState("pi_1", counted.state.facts, ORDER), [failed])
    assert again.decisions == (RecordRefund("pi_1"),)
    assert fold_intent(IntentState("pi_1", again.state.facts, ORDER), [failed]).decisions == ()


def test_a_dispute_marks_the_order_until_it_is_won() -> None:
    state = with_order(fold_intent(NEW, [ev("succeeded")]))
    opened = dispute_ev("needs_response", created=T0 + 10)
    won = dispute_ev("won", created=T0 + 40)
    fold = fold_intent(state, [opened])
    assert fold.decisions == (RecordDispute("pi_1"),)
    dispute = fold.state.facts.dispute
    assert dispute is not None and dispute.against_us and dispute.reason == "fraudulent"
    for order in ([opened, won], [won, opened]):
        final = fold_intent(state, order).state.facts.dispute
        assert final is not None and final.status == "won" and not final.against_us


def test_events_without_a_meaning_are_ignored() -> None:
    customer = StripeEvent.model_validate(
        events.event({"object": "customer", "id": "cus_1"}, "customer.created")
    )
    fold = fold_intent(NEW, [customer])
    assert fold.outcomes == ((customer.id, Outcome.IGNORED),)
    assert fold.decisions == () and not fold.changed


def test_a_charge_that_tells_nothing_new_is_stale() -> None:
    charge = charge_ev("charge.succeeded")
    captured = fold_intent(NEW, [charge])
    # The first copy of a captured charge tells what was captured; a second one, nothing.
    assert captured.outcomes == ((charge.id, Outcome.APPLIED),)
    assert captured.state.facts.amount_received == 1000
    again = charge_ev("charge.succeeded", created=T0 - 1)  # an older word of the charge
    fold = fold_intent(captured.state, [again])
    assert fold.outcomes == ((again.id, Outcome.STALE),)


# Any delivery order, any batching, any duplicates: the same facts and one order.

LIFE = [
    ev("requires_payment_method", "payment_intent.created"),
    ev("requires_action"),
    ev("requires_payment_method", "payment_intent.payment_failed"),
    ev("processing", created=T0 + 1),
    ev("requires_capture", created=T0 + 1),
    ev("succeeded", created=T0 + 2),
    charge_ev("charge.refunded", created=T0 + 3, amount_refunded=1000, refunded=True),
]


@pytest.mark.parametrize("order", list(itertools.permutations(range(len(LIFE))))[::60])
def test_the_final_facts_do_not_depend_on_arrival_order(order: tuple[int, ...]) -> None:
    evts = [LIFE[i] for i in order]
    at_once = fold_intent(NEW, evts)
    assert kinds(at_once.decisions) == [PlaceOrder]
    state, places = NEW, 0
    for e in [*evts, evts[0]]:  # one at a time, across batches, with a duplicate
        step = fold_intent(state, [e])
        places += kinds(step.decisions).count(PlaceOrder)
        order_view = state.order or (ORDER if places else None)
        state = IntentState("pi_1", step.state.facts, order_view)
    assert places == 1
    assert state.facts == at_once.state.facts
    assert state.facts.status == "succeeded"
    assert state.facts.refunded_in_full(1000)


# --- Only the shop's payments are orders (CART_METADATA_KEY) ----------------------------


def no_cart_ev(status: str = "requires_capture", *, created: int = T0) -> StripeEvent:
    intent = events.payment_intent("pi_1", amount=1000, cart_id="x", status=status, created=created)
    intent["metadata"] = {"invoice": "in_1"}  # a subscription's intent: no cart
    return StripeEvent.model_validate(events.event(intent, events.EVENT_TYPE_OF_STATUS[status]))


def test_an_authorization_that_names_no_cart_is_not_an_order() -> None:
    auth = no_cart_ev()
    fold = fold_intent(NEW, [auth])
    assert fold.decisions == ()
    assert fold.outcomes == ((auth.id, Outcome.NOT_AN_ORDER),)
    # Its facts are kept on the intent all the same.
    assert fold.state.facts.status == "requires_capture"


def test_the_cart_key_is_the_shops_setting() -> None:
    auth = ev("requires_capture")  # metadata cart_id=cart-1
    assert kinds(fold_intent(NEW, [auth], cart_key="order_ref").decisions) == []
    intent = events.payment_intent("pi_1", amount=1000, cart_id="x", status="requires_capture")
    intent["metadata"] = {"order_ref": "cart-9"}
    other = StripeEvent.model_validate(
        events.event(intent, "payment_intent.amount_capturable_updated")
    )
    [place] = fold_intent(NEW, [other], cart_key="order_ref").decisions
    assert isinstance(place, PlaceOrder) and place.cart_id == "cart-9"


def test_the_order_comes_from_the_earliest_authorization_that_names_a_cart() -> None:
    """Metadata added after the first authorization: the order exists either way round."""
    without = no_cart_ev("requires_capture", created=T0)
    with_cart = ev("succeeded", created=T0 + 5)
    for order in ([without, with_cart], [with_cart, without]):
        [place] = fold_intent(NEW, order).decisions
        assert isinstance(place, PlaceOrder) and place.cart_id == "cart-1"
    first = fold_intent(NEW, [without])
    [place] = fold_intent(first.state, [with_cart]).decisions
    assert isinstance(place, PlaceOrder) and place.cart_id == "cart-1"


def test_metadata_changed_after_the_authorization_does_not_move_the_cart() -> None:
    """The earliest authorization names the cart (what the buyer paid for); a later
    snapshot naming another cart, in the same batch either way round, does not."""
    held = ev("requires_capture", created=T0)
    later = events.payment_intent(
        "pi_1", amount=1000, cart_id="cart-2", status="succeeded", created=T0
    )
    moved = StripeEvent.model_validate(
        {**events.event(later, "payment_intent.succeeded"), "created": T0 + 60}
    )
    for order in ([held, moved], [moved, held]):
        [place] = fold_intent(NEW, order).decisions
        assert isinstance(place, PlaceOrder) and place.cart_id == "cart-1"


def test_the_connected_account_and_what_was_captured_are_kept() -> None:
    payload = events.event(
        events.payment_intent("pi_1", amount=1000, cart_id="cart-1", status="succeeded"),
        "payment_intent.succeeded",
    )
    payload["account"] = "acct_1"
    payload["data"]["object"]["amount_received"] = 1000
    fold = fold_intent(NEW, [StripeEvent.model_validate(payload)])
    assert (fold.state.facts.account, fold.state.facts.amount_received) == ("acct_1", 1000)


def test_a_capture_deadline_or_a_later_capture_refreshes_an_existing_order() -> None:
    order = OrderView(1, Allocation.PLACED, 1000, OrderStatus.PLACED)
    held = fold_intent(IntentState("pi_1", order=None), [ev("requires_capture")]).state
    state = held._replace(order=order)
    deadline = charge_ev(
        "charge.succeeded",
        captured=False,
        amount_captured=0,
        payment_method_details={"card": {"capture_before": T0 + 7 * 86_400}},
    )
    fold = fold_intent(state, [deadline])
    assert kinds(fold.decisions) == [RecordPayment]
    assert fold.state.facts.capture_before == T0 + 7 * 86_400

"""The outbox's pure rules: which Stripe action an order change calls for, what an order
event is called, and how the relay marks a published batch.

consumer/outbox.py (`stripe_actions_for`, `OrderChange.event_type`) and consumer/relay.py
(`Relay._publish_marks`, no I/O: the relay is built on factories it never calls here).
How the relay reads Stripe's answers and performs each action: test_stripe_answers.py.
The same rules run end to end in tests/integration/test_order_events.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, RequestTimedOutError

from intentflow.consumer.claims import Claimed, Mark
from intentflow.consumer.decisions import Allocation, OrderStatus
from intentflow.consumer.outbox import (
    CANCELLATION_REASON,
    REFUND_FAILED,
    REFUND_OFF,
    Action,
    ActionRow,
    Kind,
    OrderChange,
    idempotency_key,
    stripe_actions_for,
)
from intentflow.consumer.policy import CapturePolicy, ShopPolicy
from intentflow.consumer.relay import Relay
from intentflow.consumer.settings import ConsumerSettings

NEVER = ShopPolicy(CapturePolicy.NEVER)
ON_PLACED = ShopPolicy(CapturePolicy.ON_PLACED)


def change(
    status: OrderStatus,
    *,
    previous: OrderStatus | None = None,
    intent_status: str | None = "requires_capture",
    amount: int = 2500,
    allocation: Allocation | None = None,
    owed_back: int = 0,
    refund_blocked: bool = False,
) -> OrderChange:
    if allocation is None:
        known = {a.value for a in Allocation}
        allocation = Allocation(status.value) if status.value in known else Allocation.PLACED
    return OrderChange(
        7,
        "pi_1",
        previous,
        status,
        intent_status,
        amount,
        allocation,
        owed_back=owed_back,
        refund_blocked=refund_blocked,
    )


NO_REFUNDS = ShopPolicy(refund_unfillable=False)
UNFILLABLE = [Allocation.OUT_OF_STOCK, Allocation.DUPLICATE]


# --- stripe_actions_for -----------------------------------------------------------


@pytest.mark.parametrize("policy", [NEVER, ON_PLACED], ids=["never", "on_placed"])
def test_a_new_out_of_stock_order_while_the_money_is_held_cancels_it(policy: ShopPolicy) -> None:
    row = stripe_actions_for(change(OrderStatus.OUT_OF_STOCK), policy)

    assert row == ActionRow(Action.CANCEL, "pi_1", 7, {"cancellation_reason": CANCELLATION_REASON})
    assert CANCELLATION_REASON == "abandoned"  # one of the four reasons Stripe accepts
    assert row.idempotency_key == "intentflow:cancel_payment_intent:pi_1"


def test_a_duplicate_while_the_money_is_held_is_canceled_as_a_duplicate() -> None:
    row = stripe_actions_for(change(OrderStatus.DUPLICATE), NEVER)
    # Stripe's cancellation_reason accepts `duplicate` (PaymentIntentCancelParams).
    assert row == ActionRow(Action.CANCEL, "pi_1", 7, {"cancellation_reason": "duplicate"})


@pytest.mark.parametrize("allocation", UNFILLABLE)
@pytest.mark.parametrize("previous", [None, OrderStatus.OUT_OF_STOCK], ids=["new", "existing"])
def test_captured_money_of_an_order_that_cannot_be_filled_is_refunded(
    allocation: Allocation, previous: OrderStatus | None
) -> None:
    """Automatic capture, a capture in the same batch, or one in a later batch: a refund."""
    status = OrderStatus(allocation.value)
    row = stripe_actions_for(
        change(
            status,
            previous=previous,
            intent_status="succeeded",
            allocation=allocation,
            owed_back=2000,
        ),
        NEVER,
    )
    assert row is not None and not row.owed
    assert (row.action, row.payment_intent_id, row.order_id) == (Action.REFUND, "pi_1", 7)
    assert row.params["metadata"] == {
        "intentflow_order_id": "7",
        "intentflow_reason": allocation.value,
    }
    # Stripe's refund reasons are duplicate, fraudulent, requested_by_customer: only a
    # duplicate has a true one.
    assert row.params.get("reason") == ("duplicate" if allocation is Allocation.DUPLICATE else None)
    assert row.idempotency_key == "intentflow:refund_payment_intent:pi_1"


def test_with_refunds_off_the_refund_is_written_owed() -> None:
    unfillable = change(OrderStatus.OUT_OF_STOCK, intent_status="succeeded", owed_back=2500)
    row = stripe_actions_for(unfillable, NO_REFUNDS)
    assert row is not None and (row.action, row.owed) == (Action.REFUND, REFUND_OFF)


@pytest.mark.parametrize(
    ("owed_back", "refund_blocked"),
    [(0, False), (2500, True)],
    ids=["nothing owed back", "an open dispute Stripe would refuse it for"],
)
def test_no_refund_when_nothing_is_owed_or_a_dispute_blocks_it(
    owed_back: int, refund_blocked: bool
) -> None:
    unfillable = change(
        OrderStatus.OUT_OF_STOCK,
        intent_status="succeeded",
        owed_back=owed_back,
        refund_blocked=refund_blocked,
    )
    assert stripe_actions_for(unfillable, NEVER) is None


def test_a_refund_still_owed_after_one_failed_is_left_to_a_person() -> None:
    """A refund that failed sent the money back to the shop's balance; refunding the same
    card again mostly fails again, so the row is owed (`refund_failed`), stamped with the
    failure's time, whatever REFUND_UNFILLABLE says; without a stopped refund it is asked."""
    unfillable = change(OrderStatus.OUT_OF_STOCK, intent_status="succeeded", owed_back=10)
    for policy in (NEVER, NO_REFUNDS):
        row = stripe_actions_for(unfillable._replace(refund_stopped_at=1_700_000_000), policy)
        assert row is not None and (row.owed, row.stopped_at) == (REFUND_FAILED, 1_700_000_000)
    row = stripe_actions_for(unfillable, NEVER)
    assert row is not None and (row.owed, row.stopped_at) == (None, None)


def test_a_new_placed_order_under_on_placed_captures_the_order_amount() -> None:
    row = stripe_actions_for(change(OrderStatus.PLACED, amount=4200), ON_PLACED)

    assert row == ActionRow(Action.CAPTURE, "pi_1", 7, {"amount_to_capture": 4200})
    assert row.idempotency_key == idempotency_key(Action.CAPTURE, "pi_1")


def test_a_new_placed_order_under_never_asks_nothing_of_stripe() -> None:
    assert stripe_actions_for(change(OrderStatus.PLACED), NEVER) is None


@pytest.mark.parametrize("status", [OrderStatus.OUT_OF_STOCK, OrderStatus.PLACED])
@pytest.mark.parametrize(
    "intent_status", ["canceled", "processing", "requires_payment_method", None]
)
def test_no_action_while_the_intent_neither_holds_nor_has_taken_the_money(
    status: OrderStatus, intent_status: str | None
) -> None:
    assert stripe_actions_for(change(status, intent_status=intent_status), ON_PLACED) is None


def test_a_placed_order_already_captured_asks_nothing() -> None:
    placed = change(OrderStatus.PLACED, intent_status="succeeded")
    assert stripe_actions_for(placed, ON_PLACED) is None


@pytest.mark.parametrize(
    ("previous", "status"),
    [
        (OrderStatus.PLACED, OrderStatus.REFUNDED),
        (OrderStatus.NEEDS_REVIEW, OrderStatus.DISPUTED),
    ],
)
def test_a_change_to_an_existing_fillable_order_asks_nothing_of_stripe(
    previous: OrderStatus, status: OrderStatus
) -> None:
    assert stripe_actions_for(change(status, previous=previous), ON_PLACED) is None


def test_a_change_to_an_unfillable_order_whose_money_is_held_asks_its_cancel_again() -> None:
    """Harmless (one row per intent and action) and it mends an order made before the rule."""
    existing = change(OrderStatus.OUT_OF_STOCK, previous=OrderStatus.OUT_OF_STOCK)
    row = stripe_actions_for(existing, ON_PLACED)
    assert row is not None and row.action is Action.CANCEL


@pytest.mark.parametrize(
    "status", [OrderStatus.NEEDS_REVIEW, OrderStatus.CANCELED, OrderStatus.DISPUTED]
)
def test_a_new_order_that_is_neither_placed_nor_unfillable_asks_nothing(
    status: OrderStatus,
) -> None:
    # needs_review waits for a person (or the relay's sweep), never for this rule.
    assert stripe_actions_for(change(status), ON_PLACED) is None


# --- OrderChange.event_type ------------------------------------------------------


@pytest.mark.parametrize("status", list(OrderStatus))
def test_a_created_order_is_announced_by_its_status(status: OrderStatus) -> None:
    assert change(status).event_type == f"order.{status.value}"


@pytest.mark.parametrize(
    ("previous", "status", "expected"),
    [
        (OrderStatus.PLACED, OrderStatus.REFUNDED, "order.refunded"),
        (OrderStatus.REFUNDED, OrderStatus.DISPUTED, "order.disputed"),
        (OrderStatus.PLACED, OrderStatus.CANCELED, "order.canceled"),
        (OrderStatus.DISPUTED, OrderStatus.PLACED, "order.placed"),  # a dispute won
        (OrderStatus.PLACED, OrderStatus.PLACED, "order.updated"),  # a partial refund
        (OrderStatus.DISPUTED, OrderStatus.DISPUTED, "order.updated"),  # the dispute moved on
    ],
)
def test_a_changed_order_is_announced_by_its_new_status_or_as_updated(
    previous: OrderStatus, status: OrderStatus, expected: str
) -> None:
    assert change(status, previous=previous).event_type == expected


# --- Relay._publish_marks --------------------------------------------------------


def _relay(**overrides: Any) -> Relay:
    """A relay that is never started: its factories fail if anything asks for I/O."""

    def no_io() -> Any:
        raise AssertionError("the marks are decided without I/O")

    settings = ConsumerSettings(
        relay_retry_initial_s=2.0, relay_retry_max_s=60.0, stripe_api_key=None, **overrides
    )
    return Relay(settings, open_pool=no_io, new_events=no_io, stripe=None)


def claimed(outbox_id: int, pid: str, attempts: int = 0) -> Claimed:
    payload = f'{{"outbox_id": {outbox_id}}}'
    return Claimed(outbox_id, Kind.ORDER_EVENT, "order.updated", pid, payload, None, attempts, None)


def test_every_acknowledged_row_is_marked_published() -> None:
    relay = _relay()
    rows = [claimed(1, "pi_a"), claimed(2, "pi_b"), claimed(3, "pi_c")]

    marks = relay._publish_marks(rows, [None, None, None])

    assert marks == [Mark(1, "published"), Mark(2, "published"), Mark(3, "published")]
    assert (relay.stats.published, relay.stats.publish_failures) == (3, 0)


def test_a_failed_row_is_due_again_after_its_backoff_and_counted() -> None:
    relay = _relay()
    rows = [claimed(1, "pi_a", attempts=3), claimed(2, "pi_b")]

    marks = relay._publish_marks(rows, [KafkaTimeoutError(), None])

    failed, published = marks
    assert published == Mark(2, "published")
    assert (failed.id, failed.outcome, failed.error_code) == (1, "retry", "KafkaTimeoutError")
    # Attempt 3: doubling from 2 s is 16 s, jittered over the upper half.
    assert failed.retry_in_s is not None and 8.0 <= failed.retry_in_s <= 16.0
    assert (relay.stats.published, relay.stats.publish_failures) == (1, 1)


def test_the_backoff_is_capped_by_relay_retry_max_s() -> None:
    relay = _relay()

    [mark] = relay._publish_marks([claimed(1, "pi_a", attempts=30)], [RequestTimedOutError()])

    assert mark.retry_in_s is not None and 30.0 <= mark.retry_in_s <= 60.0


def test_an_intents_rows_after_its_failure_stay_pending_even_when_acknowledged() -> None:
    relay = _relay()
    rows = [
        claimed(1, "pi_a"),
        claimed(2, "pi_b"),
        claimed(3, "pi_a"),
        claimed(4, "pi_b"),  # acknowledged, but pi_b's row 2 was not: published again later
        claimed(5, "pi_b"),  # a second failure of the same intent: counted, due again
        claimed(6, "pi_c"),
    ]

    results = [None, KafkaTimeoutError(), None, None, RequestTimedOutError(), None]

    marks = relay._publish_marks(rows, results)

    assert [(m.id, m.outcome) for m in marks] == [
        (1, "published"),
        (2, "retry"),
        (3, "published"),
        (5, "retry"),
        (6, "published"),
    ]
    assert (relay.stats.published, relay.stats.publish_failures) == (3, 2)


def test_a_row_the_broker_refuses_for_good_is_failed_and_holds_nothing_back() -> None:
    relay = _relay()
    rows = [claimed(1, "pi_a"), claimed(2, "pi_b")]

    marks = relay._publish_marks(rows, [MessageSizeTooLargeError(), None])

    refused, published = marks
    assert (refused.id, refused.outcome, refused.error_code) == (
        1,
        "rejected",
        "MessageSizeTooLargeError",
    )
    assert refused.retry_in_s is None  # recorded `failed`: `outbox retry` after the fix
    assert published == Mark(2, "published")
    assert relay.stats.publish_failures == 1


def test_a_capture_waits_while_radar_reviews_the_payment_or_the_issuer_warned() -> None:
    """An open review or an early fraud warning holds the capture; a change that settles
    the review (closed approved) asks for it, as it would a new order's."""
    held = change(OrderStatus.PLACED)._replace(capture_held=True)
    assert stripe_actions_for(held, ON_PLACED) is None
    approved = change(OrderStatus.PLACED, previous=OrderStatus.PLACED)
    row = stripe_actions_for(approved, ON_PLACED)
    assert row is not None and row.action is Action.CAPTURE

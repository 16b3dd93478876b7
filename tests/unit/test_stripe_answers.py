"""How the relay reads Stripe's answers, and what each action's record decides without I/O.

consumer/stripe_answers.py (`classify`, on errors built as the `stripe` library builds
them: stripe/_api_requestor.py, `specific_v1_api_error`, and its HTTP clients'
`_handle_request_error`), consumer/stripe_actions.py (`ACTIONS`, `spec_of`, `IntentMoney`),
consumer/claims.py (`generation_key`) and consumer/relay.py (`_perform`,
`_action_mark`, `_actions_handled`, on a relay that is never started and a ten-line fake
of the Stripe API). Against a Stripe server: tests/integration/test_stripe_answers.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import stripe

from intentflow.consumer.claims import Claimed, Mark, generation_key
from intentflow.consumer.outbox import REFUND_OFF, Action, Kind
from intentflow.consumer.relay import Relay
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.stripe_actions import ACTIONS, Attempt, IntentMoney, UnknownAction, spec_of
from intentflow.consumer.stripe_answers import Answer, Outcome, classify


def invalid_request(message: str, **fields: Any) -> stripe.InvalidRequestError:
    """A 400/404 as the library raises it (its constructor carries no annotations)."""
    fields.setdefault("param", None)
    fields.setdefault("http_status", 400)
    return stripe.InvalidRequestError(message, **fields)  # type: ignore[no-untyped-call]


def retried(answer: Answer) -> tuple[Outcome, bool]:
    return answer.outcome, answer.verify_first


# --- classify: what may Stripe have saved under the key? ----------------------------


@pytest.mark.parametrize("status", [500, 502, 503])
@pytest.mark.parametrize("should_retry", [None, "true", "false"])
def test_a_server_error_is_retried_after_a_read_whatever_stripe_should_retry_says(
    status: int, should_retry: str | None
) -> None:
    """Stripe saves a 500 under the key and replays it: `false` means "the same key
    would only replay this", not "give up"."""
    headers = {} if should_retry is None else {"Stripe-Should-Retry": should_retry}
    exc = stripe.APIError("Stripe is having a moment", http_status=status, headers=headers)

    assert retried(classify(exc)) == (Outcome.RETRY, True)


@pytest.mark.parametrize(
    "message", ["Request timed out", "Network error: connection reset"], ids=["timeout", "reset"]
)
def test_a_timeout_or_broken_connection_is_retried_after_a_read(message: str) -> None:
    # What HTTPXClient raises for httpx's TimeoutException and other transport errors.
    exc = stripe.APIConnectionError(message, should_retry=True)  # type: ignore[no-untyped-call]

    answer = classify(exc)

    assert retried(answer) == (Outcome.RETRY, True)
    assert answer.message == message


def test_an_idempotency_error_is_retried_after_a_read_under_a_new_key() -> None:
    """The key first used with other parameters (a refund's amount, read again): the key
    will answer the same for its whole life."""
    message = "Keys for idempotent requests can only be used with the same parameters"
    body = {"error": {"type": "idempotency_error", "message": message}}
    exc = stripe.IdempotencyError(message, http_status=400, json_body=body)

    assert retried(classify(exc)) == (Outcome.RETRY, True)


@pytest.mark.parametrize("code", ["lock_timeout", "idempotency_key_in_use"])
def test_a_conflict_is_retried_with_the_same_key(code: str) -> None:
    # A 409 is an APIError to the library, whatever its type: nothing was saved.
    body = {"error": {"type": "invalid_request_error", "code": code, "message": "busy"}}
    exc = stripe.APIError("busy", http_status=409, json_body=body)

    answer = classify(exc)

    assert (answer.outcome, answer.verify_first, answer.code) == (Outcome.RETRY, False, code)


def test_a_rate_limit_is_retried_with_the_same_key_after_stripes_retry_after() -> None:
    exc = stripe.RateLimitError("Too many requests", http_status=429, headers={"Retry-After": "3"})

    assert classify(exc) == Answer(Outcome.RETRY, None, "Too many requests", 3.0)


def test_a_retry_after_that_is_not_seconds_is_ignored() -> None:
    headers = {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}
    exc = stripe.RateLimitError("Too many requests", http_status=429, headers=headers)

    assert classify(exc).retry_after_s is None
    assert classify(exc).outcome is Outcome.RETRY


def test_stripe_should_retry_true_on_a_client_error_retries_with_the_same_key() -> None:
    exc = invalid_request("Try again", headers={"stripe-should-retry": "true"})

    assert retried(classify(exc)) == (Outcome.RETRY, False)


@pytest.mark.parametrize("status", [409, 429, 400])
def test_stripe_should_retry_false_on_a_client_error_is_a_refusal(status: int) -> None:
    exc = stripe.APIError("No", http_status=status, headers={"Stripe-Should-Retry": "false"})

    assert classify(exc).outcome is Outcome.REJECTED


def test_an_unexpected_state_is_rejected_with_stripes_code() -> None:
    exc = invalid_request(
        "This PaymentIntent's status is succeeded", code="payment_intent_unexpected_state"
    )

    assert classify(exc) == Answer(
        Outcome.REJECTED,
        "payment_intent_unexpected_state",
        "This PaymentIntent's status is succeeded",
    )


def test_the_error_type_stands_in_for_a_missing_code() -> None:
    body = {"error": {"type": "invalid_request_error", "message": "No such payment_intent"}}
    exc = invalid_request("No such payment_intent", param="intent", http_status=404, json_body=body)

    assert classify(exc) == Answer(
        Outcome.REJECTED, "invalid_request_error", "No such payment_intent"
    )


@pytest.mark.parametrize(
    "exc",
    [
        stripe.AuthenticationError("Invalid API Key provided: sk_test_****", http_status=401),
        stripe.PermissionError("The provided key does not have access", http_status=403),
        # Blocked even when Stripe says a retry could succeed: only a new key helps.
        stripe.AuthenticationError(
            "Expired", http_status=401, headers={"Stripe-Should-Retry": "true"}
        ),
    ],
    ids=["401", "403", "401-should-retry"],
)
def test_a_refused_key_blocks(exc: stripe.StripeError) -> None:
    assert classify(exc).outcome is Outcome.BLOCKED


def test_a_new_key_generation_is_the_first_key_with_its_number() -> None:
    key = "intentflow:refund_payment_intent:pi_1"

    assert [generation_key(key, g) for g in range(3)] == [key, f"{key}:1", f"{key}:2"]


# --- ACTIONS: one record per action -------------------------------------------------


def test_every_action_has_one_record_under_its_own_name() -> None:
    assert list(ACTIONS) == list(Action)
    assert all(spec.action is action for action, spec in ACTIONS.items())


@pytest.mark.parametrize("name", ["refund_everything", "", "order.placed"])
def test_an_action_no_record_knows_fails_loudly_in_one_line(name: str) -> None:
    with pytest.raises(UnknownAction) as raised:
        spec_of(name)

    assert str(raised.value) == (
        f"no Stripe action is called {name!r} (known: cancel_payment_intent, "
        "capture_payment_intent, refund_payment_intent)"
    )


def answer_of(action: Action, facts: IntentMoney) -> tuple[str, str | None] | None:
    answer = ACTIONS[action].settled(facts)
    return None if answer is None else (str(answer.outcome), answer.code)


@pytest.mark.parametrize(
    ("action", "status", "expected"),
    [
        (Action.CANCEL, "canceled", ("already_done", None)),
        (Action.CANCEL, "succeeded", ("superseded", "payment_intent_captured")),
        (Action.CANCEL, "requires_capture", None),
        (Action.CANCEL, None, None),
        (Action.CAPTURE, "succeeded", ("already_done", None)),
        (Action.CAPTURE, "canceled", ("not_needed", None)),
        (Action.CAPTURE, "requires_capture", None),
        (Action.REFUND, "canceled", ("not_needed", None)),
        (Action.REFUND, "succeeded", None),  # captured, nothing known refunded: read Stripe
    ],
)
def test_what_the_webhooks_already_settle_without_a_call(
    action: Action, status: str | None, expected: tuple[str, str | None] | None
) -> None:
    assert answer_of(action, IntentMoney.from_webhooks(status, 0, 0)) == expected


@pytest.mark.parametrize(
    ("captured", "refunded", "expected"),
    [
        (2500, 2500, ("already_done", None)),
        (2500, 3000, ("already_done", None)),
        (2500, 1000, None),  # partly refunded: Stripe is read for the rest
        (0, 0, None),  # the webhooks have not said what was captured: never "all refunded"
    ],
)
def test_a_refund_the_webhooks_show_complete_needs_no_call(
    captured: int, refunded: int, expected: tuple[str, str | None] | None
) -> None:
    assert answer_of(Action.REFUND, IntentMoney.from_webhooks("succeeded", captured, refunded)) == (
        expected
    )


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (IntentMoney("succeeded", 2500, 0, read=True), None),
        (IntentMoney("succeeded", 2500, 1000, read=True), None),
        (IntentMoney("succeeded", 2500, 2500, read=True), ("already_done", None)),
        (IntentMoney("succeeded", 2500, 100, ours="re_1", read=True), ("already_done", None)),
        (IntentMoney("succeeded", 2500, 0, ours_failed=True, read=True), None),
        (IntentMoney("requires_capture", 0, 0, read=True), ("not_needed", None)),
        (IntentMoney("canceled", 0, 0, read=True), ("not_needed", None)),
    ],
    ids=["none", "part", "all", "ours", "ours-failed", "uncaptured", "canceled"],
)
def test_what_stripes_read_of_the_refunds_settles(
    facts: IntentMoney, expected: tuple[str, str | None] | None
) -> None:
    assert answer_of(Action.REFUND, facts) == expected


# --- The relay: what it claims, settles and records ---------------------------------


class NoStripe:
    """The relay's Stripe API, for decisions that must make no call."""

    def __init__(self) -> None:
        self.calls: list[Attempt] = []

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def perform(self, attempt: Attempt) -> Answer:
        self.calls.append(attempt)
        return Answer(Outcome.SUCCEEDED, generation=attempt.generation)


def relay(stripe_api: NoStripe | None = None, **overrides: Any) -> Relay:
    def no_io() -> Any:
        raise AssertionError("decided without I/O")

    settings = ConsumerSettings(
        relay_retry_initial_s=2.0, relay_retry_max_s=60.0, stripe_api_key=None, **overrides
    )
    return Relay(settings, open_pool=no_io, new_events=no_io, stripe=stripe_api)


def action_row(action: Action, intent_status: str | None = "succeeded", **fields: Any) -> Claimed:
    values: dict[str, Any] = {
        "id": 9,
        "kind": Kind.STRIPE_ACTION,
        "name": str(action),
        "payment_intent_id": "pi_1",
        "payload": '{"metadata": {"intentflow_order_id": "7"}}',
        "idempotency_key": f"intentflow:{action}:pi_1",
        "attempts": 0,
        "intent_status": intent_status,
        "order_id": 7,
    }
    return Claimed(**(values | fields))


@pytest.mark.parametrize(
    ("overrides", "handled"),
    [
        ({}, ["cancel_payment_intent", "refund_payment_intent"]),
        ({"refund_unfillable": False}, ["cancel_payment_intent", "refund_payment_intent"]),
        (
            {"capture_policy": "on_placed"},
            ["cancel_payment_intent", "capture_payment_intent", "refund_payment_intent"],
        ),
    ],
)
def test_a_relay_claims_what_its_own_policy_allows_and_refunds_either_way(
    overrides: dict[str, Any], handled: list[str]
) -> None:
    assert relay(**overrides)._actions_handled() == handled


async def test_a_relay_with_refund_unfillable_false_records_a_refund_owed_without_a_call() -> None:
    stripe_api = NoStripe()
    r = relay(stripe_api, refund_unfillable=False)

    answer = await r._perform(stripe_api, action_row(Action.REFUND))
    mark = r._action_mark(action_row(Action.REFUND), answer)

    assert stripe_api.calls == []
    assert mark == Mark(9, "owed", *REFUND_OFF)


async def test_a_refund_the_webhooks_show_complete_is_done_without_a_call_even_when_owed() -> None:
    stripe_api = NoStripe()
    row = action_row(Action.REFUND, amount_captured=2500, amount_refunded=2500)

    answer = await relay(stripe_api, refund_unfillable=False)._perform(stripe_api, row)

    assert (answer.outcome, stripe_api.calls) == (Outcome.ALREADY_DONE, [])


async def test_a_cancel_the_webhooks_show_captured_is_superseded_without_a_call() -> None:
    stripe_api = NoStripe()

    answer = await relay(stripe_api)._perform(stripe_api, action_row(Action.CANCEL))

    assert (answer.outcome, answer.code, stripe_api.calls) == (
        Outcome.SUPERSEDED,
        "payment_intent_captured",
        [],
    )


async def test_an_attempt_carries_the_rows_key_generation_verify_and_account() -> None:
    stripe_api = NoStripe()
    row = action_row(Action.REFUND, key_generation=2, verify_first=True, account="acct_1Connected")

    await relay(stripe_api)._perform(stripe_api, row)

    assert stripe_api.calls == [
        Attempt(
            9,
            Action.REFUND,
            "pi_1",
            {"metadata": {"intentflow_order_id": "7"}},
            "intentflow:refund_payment_intent:pi_1",
            2,
            True,
            "acct_1Connected",
        )
    ]


def test_a_retry_is_recorded_with_the_key_generation_used_and_whether_to_read_first() -> None:
    r = relay()
    answer = Answer(Outcome.RETRY, "api_error", "boom", verify_first=True, generation=3)

    mark = r._action_mark(action_row(Action.CANCEL, attempts=1), answer)

    assert (mark.outcome, mark.generation, mark.verify_first) == ("retry", 3, True)
    assert mark.retry_in_s is not None and 2.0 <= mark.retry_in_s <= 4.0


def test_a_retry_after_a_failed_read_keeps_the_rows_generation() -> None:
    mark = relay()._action_mark(action_row(Action.REFUND), Answer(Outcome.RETRY, generation=None))

    assert (mark.generation, mark.verify_first) == (None, False)

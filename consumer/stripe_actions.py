"""Performing one Stripe action (cancel or capture a payment intent) and classifying the answer.

Through the `stripe` library's async client, with the library's own retries
off: the relay owns retrying, on the outbox row's schedule, so that a slow or
absent Stripe holds no connection and survives a restart. Every call carries
the row's idempotency key: if an earlier attempt acted and its answer was lost
(the relay died, the connection broke), Stripe replays that first answer.

The answer, as the relay records it (`Answer.outcome`):
  - `succeeded`: Stripe did it on this call (or replayed that it did);
  - `already_done`: Stripe refused, and the intent turns out to be where the
    action would have put it (canceled, or captured): someone got there first,
    or an earlier attempt of ours did and Stripe no longer has its key;
  - `not_needed`: a capture whose intent was canceled or expired meanwhile
    (Stripe refused, or the relay knew from the webhooks and made no call);
  - `rejected`: a permanent refusal for any other reason (the intent was
    captured, so it cannot be canceled; the authorization expired), with
    Stripe's code and message; not retried;
  - `retry`: the network, a 429, a 5xx or a 409 lock; after `retry_after_s`
    when Stripe says how long (`Retry-After`);
  - `blocked`: Stripe refused our key (401, 403): retried slowly, reported,
    never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import stripe

from intentflow.consumer.outbox import Action

# Where each action leaves the intent when it has been done, by anyone.
_GOAL = {Action.CANCEL: "canceled", Action.CAPTURE: "succeeded"}


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    ALREADY_DONE = "already_done"
    NOT_NEEDED = "not_needed"  # a capture whose intent was canceled meanwhile (the relay's call)
    REJECTED = "rejected"
    RETRY = "retry"
    BLOCKED = "blocked"


@dataclass(frozen=True, slots=True)
class Answer:
    outcome: Outcome
    code: str | None = None
    message: str | None = None
    retry_after_s: float | None = None


CAPTURED_FIRST = (
    "the payment intent was captured before its authorization could be released: "
    "refund the customer at Stripe (intentflow never refunds)"
)


def settled_by_webhooks(action: Action, intent_status: str | None) -> Answer | None:
    """The answer an intent's status already gives, without a call: the status our
    webhooks recorded (the relay), or the one Stripe shows after a refusal."""
    if intent_status == _GOAL[action]:
        return Answer(Outcome.ALREADY_DONE, None, f"the payment intent is {intent_status}")
    if action is Action.CAPTURE and intent_status == "canceled":
        # Canceled or expired since the order was placed: its stock came back
        # with the cancellation, and there is nothing left to capture.
        return Answer(Outcome.NOT_NEEDED, None, "the payment intent is canceled")
    if action is Action.CANCEL and intent_status == "succeeded":
        # Captured (by the shop, or automatically) before we could release it.
        return Answer(Outcome.REJECTED, "payment_intent_captured", CAPTURED_FIRST)
    return None


class StripeActions:
    """The Stripe API as the relay uses it (`start()`/`stop()` for the HTTP client)."""

    def __init__(self, api_key: str, *, api_base: str | None = None, timeout_s: float = 30.0):
        self._http = stripe.HTTPXClient(timeout=timeout_s)
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else {},
            max_network_retries=0,
            http_client=self._http,
        )

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def perform(
        self, action: Action, payment_intent_id: str, params: dict[str, Any], idempotency_key: str
    ) -> Answer:
        intents = self._client.v1.payment_intents
        # The params come from the outbox row as written by consumer/outbox.py.
        options: Any = {"idempotency_key": idempotency_key}
        fields: Any = params
        try:
            if action is Action.CANCEL:
                await intents.cancel_async(payment_intent_id, params=fields, options=options)
            else:
                await intents.capture_async(payment_intent_id, params=fields, options=options)
        except stripe.StripeError as exc:
            answer = classify(exc)
            if answer.outcome is Outcome.REJECTED:
                return await self._unless_already_done(action, payment_intent_id, answer)
            return answer
        return Answer(Outcome.SUCCEEDED)

    async def _unless_already_done(
        self, action: Action, payment_intent_id: str, refusal: Answer
    ) -> Answer:
        """A refusal may only mean the work is done: ask Stripe where the intent is."""
        try:
            intent = await self._client.v1.payment_intents.retrieve_async(payment_intent_id)
        except stripe.StripeError as exc:
            checked = classify(exc)
            # Cannot tell yet: try the whole action again later rather than guess.
            if checked.outcome is not Outcome.REJECTED:
                return checked
            return refusal
        # Where Stripe says the intent is, read as our webhooks would be: done, or
        # not needed (canceled before our webhooks said so), keeping Stripe's words.
        settled = settled_by_webhooks(action, intent.status)
        if settled is not None and settled.outcome is not Outcome.REJECTED:
            return Answer(settled.outcome, refusal.code, refusal.message)
        return Answer(
            Outcome.REJECTED,
            refusal.code,
            f"{refusal.message} (the payment intent is {intent.status})",
        )


def classify(exc: stripe.StripeError) -> Answer:
    """What the relay does about one error from the stripe library."""
    code = exc.code or _error_code(exc)
    message = exc.user_message or str(exc) or type(exc).__name__
    headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
    should_retry = headers.get("stripe-should-retry")
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        return Answer(Outcome.BLOCKED, code, message)
    status = exc.http_status
    transient = (
        isinstance(exc, stripe.APIConnectionError | stripe.RateLimitError)
        or status is None
        or status == 429
        or status >= 500
        or (status == 409 and not isinstance(exc, stripe.IdempotencyError))
    )
    if should_retry == "true":
        transient = True
    elif should_retry == "false":
        transient = False
    if transient:
        return Answer(Outcome.RETRY, code, message, _retry_after_s(headers.get("retry-after")))
    return Answer(Outcome.REJECTED, code, message)


def _error_code(exc: stripe.StripeError) -> str | None:
    """Stripe's code (`rate_limit` lives only on the error object), else its error type."""
    error = exc.error
    if error is None:
        return None
    return getattr(error, "code", None) or getattr(error, "type", None)


def _retry_after_s(value: str | None) -> float | None:
    """`Retry-After` in seconds (Stripe sends seconds; an HTTP date is not honoured)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None

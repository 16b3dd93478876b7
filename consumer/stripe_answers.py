"""Reading Stripe's answers: what the relay records for each one, and what it does next.

`classify` turns an error from the `stripe` library into an `Answer`; the
outcomes, as the outbox records them (`outbox.outcome`):
  - `succeeded`: Stripe did it on this call (or replayed that it did);
  - `already_done`: someone got there first, or an earlier attempt of ours did
    and its answer was lost: the intent (or its refunds) shows it done;
  - `not_needed`: nothing left to do (a capture or refund of a canceled intent);
  - `superseded`: a cancel that met a captured intent; a refund replaces it;
  - `owed`: a refund a relay with REFUND_UNFILLABLE=false leaves to an operator;
  - `rejected`: a refusal for good, with Stripe's code and message;
  - `retry`: due again after a back-off. Same key after a 429, a 409 (a lock,
    or the key in use by a request still running) or `Stripe-Should-Retry:
    true`; after a 5xx, a timeout, a broken connection or an `idempotency_error`
    Stripe may have acted and saved its answer under the key, so the row is
    marked `verify_first`: read before acting again, under the next key;
  - `blocked`: Stripe refused our key (401, 403): retried slowly, reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import stripe


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    ALREADY_DONE = "already_done"
    NOT_NEEDED = "not_needed"
    SUPERSEDED = "superseded"
    OWED = "owed"
    REJECTED = "rejected"
    RETRY = "retry"
    BLOCKED = "blocked"


# Finished: the row is `done` (the first four) or `failed` (the last two).
DONE = frozenset({Outcome.SUCCEEDED, Outcome.ALREADY_DONE, Outcome.NOT_NEEDED, Outcome.SUPERSEDED})
FAILED = frozenset({Outcome.REJECTED, Outcome.OWED})


@dataclass(frozen=True, slots=True)
class Answer:
    outcome: Outcome
    code: str | None = None
    message: str | None = None
    retry_after_s: float | None = None
    # Stripe may have acted and saved its answer under the key: read the intent
    # before acting again, and act only under the next key generation.
    verify_first: bool = False
    # The key generation this attempt called Stripe with; None: no call was made.
    generation: int | None = None


def classify(exc: stripe.StripeError) -> Answer:
    """What the relay does about one error from the stripe library.

    Stripe saves the status code and body of the first request made with a key,
    "regardless of whether it succeeds or fails", 500s included, and replays it
    to every retry with that key for at least 24 h; it saves nothing when the
    parameters fail validation or the request conflicts with a concurrent one
    (https://docs.stripe.com/api/idempotent_requests). So a 5xx retried under
    the same key gets the same 5xx for a day, `Stripe-Should-Retry` or not: an
    answer that leaves the outcome unknown is retried under a new key, after a
    read has shown the action still needed (`verify_first`). A 429 comes from
    the rate limiter, which runs before the idempotency layer, and a 409 is a
    lock or the key in use by a request still running: nothing was saved, so
    the same key is safe (https://docs.stripe.com/error-low-level).
    """
    code = exc.code or _error_code(exc)
    message = exc.user_message or str(exc) or type(exc).__name__
    headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
    retry_after_s = _retry_after_s(headers.get("retry-after"))
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        return Answer(Outcome.BLOCKED, code, message)
    status = exc.http_status
    if (
        isinstance(exc, stripe.APIConnectionError | stripe.IdempotencyError)
        or status is None
        or status >= 500
    ):
        # A timeout or a broken connection may come after Stripe acted; a 5xx may
        # be saved under the key whatever `Stripe-Should-Retry` says (stripe-python's
        # `_should_retry` notes it is "false in most cases when a 500 is returned,
        # since our idempotency framework would typically replay it anyway"); an
        # `idempotency_error` (the key first used with other parameters, such as a
        # refund's amount read again) will be answered the same for the key's life.
        return Answer(Outcome.RETRY, code, message, retry_after_s, verify_first=True)
    # stripe-python's `_should_retry` defers to the header before the status code;
    # so do we, for a 4xx: `false` is a refusal, `true` a retry with the same key.
    should_retry = headers.get("stripe-should-retry")
    rate_limited = isinstance(exc, stripe.RateLimitError)  # a 429, or an old 400 `rate_limit`
    if should_retry == "true" or (should_retry is None and (rate_limited or status == 409)):
        return Answer(Outcome.RETRY, code, message, retry_after_s)
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

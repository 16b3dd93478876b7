"""Runs localstripe on 127.0.0.1:PORT with three fixes where our relay meets it.

- Cancel accepts `cancellation_reason`. Real Stripe's `POST
  /v1/payment_intents/{id}/cancel` accepts it (duplicate, fraudulent,
  requested_by_customer or abandoned) and shows it on the intent afterwards;
  localstripe 1.15.10 answers 400 "Unexpected cancellation_reason" to any parameter.
- A refund accepts `reason`. Real Stripe's `POST /v1/refunds` accepts it
  (duplicate, fraudulent or requested_by_customer) and shows it on the refund;
  localstripe answers 400 "Unexpected reason".
- An intent shows `amount_received`, what was captured (the relay refunds what was
  captured less what is refunded); localstripe's intent has no such field.
Each wrapper checks a value as Stripe does and lets localstripe's own code decide
everything else. Nothing else of localstripe is changed, except that its store is
kept in memory only.

    python -m tests.stripe_launch --port 8420

localstripe is GPL-3.0-or-later: it runs only as this separate test process and is
never imported by product code.
"""

from __future__ import annotations

import argparse
from typing import Any

CANCELLATION_REASONS = ("duplicate", "fraudulent", "requested_by_customer", "abandoned")
CANCEL_ROUTE = ("POST", "/v1/payment_intents/{id}/cancel")
REFUND_REASONS = ("duplicate", "fraudulent", "requested_by_customer")


def _accept_cancellation_reason() -> None:
    # Must run before localstripe.server is imported: the server binds each route to the
    # function found in `extra_apis` at import time.
    from localstripe import resources
    from localstripe.errors import UserError

    intent_class = resources.PaymentIntent
    original_cancel = intent_class._api_cancel

    def cancel(id: str, cancellation_reason: str | None = None, **kwargs: Any) -> Any:
        if cancellation_reason is not None and cancellation_reason not in CANCELLATION_REASONS:
            raise UserError(
                400,
                "Invalid cancellation_reason: must be one of " + ", ".join(CANCELLATION_REASONS),
                {"param": "cancellation_reason"},
            )
        intent = original_cancel(id, **kwargs)
        intent.cancellation_reason = cancellation_reason
        return intent

    # A class attribute, so that every intent shows `cancellation_reason: null` until
    # canceled, as on Stripe (localstripe exports every public attribute).
    intent_class.cancellation_reason = None
    intent_class._api_cancel = staticmethod(cancel)
    resources.extra_apis[:] = [
        (method, url, cancel if (method, url) == CANCEL_ROUTE else func)
        for method, url, func in resources.extra_apis
    ]
    _accept_refund_reason(resources, UserError)
    _show_amount_received(resources)
    # localstripe pickles its whole store to /tmp/localstripe.pickle on every write; that
    # file would be shared by every emulator on the machine and is never read back here.
    resources.store.dump_to_disk = lambda: None


def _accept_refund_reason(resources: Any, user_error: Any) -> None:
    refund_class = resources.Refund

    def create(cls: Any, /, reason: str | None = None, **data: Any) -> Any:
        if reason is not None and reason not in REFUND_REASONS:
            raise user_error(
                400,
                "Invalid reason: must be one of " + ", ".join(REFUND_REASONS),
                {"param": "reason"},
            )
        refund = cls(**data)
        refund.reason = reason
        return refund

    # As for cancellation_reason: `reason: null` on every refund made without one.
    refund_class.reason = None
    refund_class._api_create = classmethod(create)


def _show_amount_received(resources: Any) -> None:
    """`amount_received`: the captured amount of the intent's charge. localstripe records a
    partial capture as a refund of the rest, so the amount to capture is kept aside."""
    charge_class = resources.Charge
    original_capture = charge_class._capture

    def capture(charge: Any, amount: Any, on_success: Any = None) -> Any:
        to_capture = charge.amount if amount is None else int(amount)

        def captured() -> None:
            charge._amount_captured = to_capture
            if on_success:
                on_success()

        return original_capture(charge, amount, captured)

    def amount_received(intent: Any) -> int:
        charge = intent.latest_charge
        if charge is None or not charge.captured or charge.status != "succeeded":
            return 0
        return int(getattr(charge, "_amount_captured", charge.amount))

    charge_class._capture = capture
    resources.PaymentIntent.amount_received = property(amount_received)


def main() -> None:
    parser = argparse.ArgumentParser(description="localstripe on loopback, for tests")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    _accept_cancellation_reason()
    from aiohttp import web
    from localstripe import server

    # localstripe's own start() binds [::] on all interfaces; tests stay on loopback.
    web.run_app(server.app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()

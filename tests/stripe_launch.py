"""Runs localstripe on 127.0.0.1:PORT with one fix: cancel accepts `cancellation_reason`.

Real Stripe's `POST /v1/payment_intents/{id}/cancel` accepts `cancellation_reason`
(duplicate, fraudulent, requested_by_customer or abandoned) and shows it on the intent
afterwards; localstripe 1.15.10 answers 400 "Unexpected cancellation_reason" to any
parameter. Our relay sends it, so this launcher wraps that one endpoint: it checks the
reason as Stripe does, lets localstripe's own cancel decide everything else, and stores
the reason on the intent. Nothing else of localstripe is changed, except that its store
is kept in memory only.

    python -m tests.stripe_launch --port 8420

localstripe is GPL-3.0-or-later: it runs only as this separate test process and is
never imported by product code.
"""

from __future__ import annotations

import argparse
from typing import Any

CANCELLATION_REASONS = ("duplicate", "fraudulent", "requested_by_customer", "abandoned")
CANCEL_ROUTE = ("POST", "/v1/payment_intents/{id}/cancel")


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
    # localstripe pickles its whole store to /tmp/localstripe.pickle on every write; that
    # file would be shared by every emulator on the machine and is never read back here.
    resources.store.dump_to_disk = lambda: None


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

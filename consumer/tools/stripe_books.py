"""`order-consumer reconcile --with-stripe`: our books against what Stripe shows.

Per account (`--account`: the platform by default, one connected account, or `all`
connected accounts, read with `Stripe-Account`), against our rows of that account:
  1. list its completed Checkout Sessions (https://docs.stripe.com/api/checkout/sessions/list,
     `status=complete`) and keep the intents whose session, in `payment` mode, names a
     cart (as the consumer reads one: `CheckoutSession.cart`) and that have no order here;
  2. list its payment intents created since `--since`, newest first, each with its latest
     charge expanded (https://docs.stripe.com/api/payment_intents/list,
     https://docs.stripe.com/api/expanding_objects); per page of up to 100, read our orders
     of the page in one query (`= ANY($1)`) and judge each intent (`_judge`).
Only the sessions without an order are kept between pages: a shop's week of intents
(100k) is streamed, never held.

Stripe's words relied on (https://docs.stripe.com/api/payment_intents/object,
https://docs.stripe.com/api/charges/object): an intent's `status`, `metadata`,
`amount_capturable`, `amount_received`, `livemode`, `latest_charge`; the charge's
`captured`, `amount`, `amount_captured`, `amount_refunded` and `disputed` ("Whether the
charge has been disputed", true from the dispute on). An intent younger than `--settle`
seconds, or an order changed (or acted on at Stripe by the relay) within them, is not
judged: its events may still be on their way.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from pydantic import ValidationError

from intentflow.consumer.allocation import UNFILLABLE
from intentflow.consumer.connections import Connection
from intentflow.consumer.errors import describe
from intentflow.consumer.facts import Dispute
from intentflow.consumer.lifecycle import AUTHORIZED_STATUSES
from intentflow.consumer.policy import ShopPolicy
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.stripe_reader import StripeReader, StripeRefused, StripeUnavailable
from intentflow.consumer.tools.backfill import when
from intentflow.consumer.tools.cli import CannotRun
from intentflow.schemas import CheckoutSession, PaymentIntent

PAYMENT_WITHOUT_ORDER = "stripe_payment_without_order"
STATE_DIFFERS = "stripe_state_differs"
UNFILLABLE_MONEY_HELD = "stripe_unfillable_money_held"
CHECKS = (PAYMENT_WITHOUT_ORDER, STATE_DIFFERS, UNFILLABLE_MONEY_HELD)

DEFAULT_SINCE = "7d"
SETTLE_S = 60.0
# A Checkout Session expires at most 24 hours after it was made
# (https://docs.stripe.com/api/checkout/sessions/create, `expires_at`): one made that
# long before `--since` can still have made an intent after it.
SESSION_LASTS = timedelta(hours=24)


class StripeUnreadable(CannotRun):
    """Stripe could not be read: one line for the operator."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--with-stripe",
        action="store_true",
        help="also compare the books with Stripe's payment intents (needs STRIPE_API_KEY)",
    )
    parser.add_argument(
        "--since",
        type=when,
        metavar="TIME",
        help="intents created since: an ISO 8601 time, "
        f"or a duration ago (default {DEFAULT_SINCE})",
    )
    parser.add_argument(
        "--account",
        metavar="ACCOUNT",
        help="a connected account (acct_…), or `all` connected accounts (default: the platform)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        metavar="SECONDS",
        help=f"judge nothing younger (default {SETTLE_S:g})",
    )


def refusal(args: argparse.Namespace, settings: ConsumerSettings) -> str | None:
    """Why the Stripe checks asked for cannot run, in one line; None when they can."""
    given = [f"--{n}" for n in ("since", "account", "settle") if getattr(args, n) is not None]
    if not args.with_stripe:
        return f"{', '.join(given)}: only with --with-stripe" if given else None
    if settings.stripe_api_key is None:
        return "--with-stripe reads Stripe's API with STRIPE_API_KEY, which is not set"
    if args.settle is not None and args.settle < 0:
        return f"--settle {args.settle:g}: give 0 or more seconds"
    return None


@dataclass
class Found:
    """One check's violations: how many, and the first few."""

    keep: int
    violations: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, example: dict[str, Any]) -> None:
        self.violations += 1
        if len(self.examples) < self.keep:
            self.examples.append(example)


@dataclass(frozen=True)
class Window:
    since: int  # intents created at or after (Unix time)
    settled_before: int  # intents created after are not judged
    settle_s: float
    cart_key: str
    livemode: bool  # the key's: an object of the other mode is not this shop's books


async def check(
    conn: Connection, settings: ConsumerSettings, args: argparse.Namespace, examples: int
) -> list[tuple[str, int, list[dict[str, Any]]]]:
    """Each Stripe check's (name, violations, examples), over every account asked for."""
    assert settings.stripe_api_key is not None  # `refusal` said so
    api_key = settings.stripe_api_key.get_secret_value()
    settle_s = SETTLE_S if args.settle is None else args.settle
    since = args.since or when(DEFAULT_SINCE)
    window = Window(
        int(since.timestamp()),
        int(time.time() - settle_s),
        settle_s,
        ShopPolicy.from_settings(settings).cart_key,
        StripeReader.livemode_of(api_key),
    )
    found = {name: Found(examples) for name in CHECKS}
    reader = StripeReader(
        api_key, api_base=settings.stripe_api_base, timeout_s=settings.stripe_timeout_s
    )
    try:
        async with reader:
            for account in await reader.accounts(args.account):
                await compare(conn, reader, account, window, found)
    except (StripeRefused, StripeUnavailable) as exc:
        raise StripeUnreadable(
            f"Stripe's API: {exc}: check STRIPE_API_KEY, STRIPE_API_BASE and --account"
        ) from None
    except ValidationError as exc:  # what the consumer would dead-letter as an event
        raise StripeUnreadable(f"Stripe sent what we cannot read: {describe(exc)}") from None
    return [(name, f.violations, f.examples) for name, f in found.items()]


async def compare(
    conn: Connection,
    reader: StripeReader,
    account: str | None,
    window: Window,
    found: dict[str, Found],
) -> None:
    """One account's intents since `window.since` against our rows of that account."""
    carts = await _checkout_carts(conn, reader, account, window)
    params = {"created": {"gte": window.since}, "expand": ["data.latest_charge"]}
    async for page in reader.pages("payment_intents", params, account):
        mine = [intent for intent in page if intent.get("livemode") == window.livemode]
        ours = await _ours(conn, [intent["id"] for intent in mine], account, window.settle_s)
        for intent in mine:
            _judge(intent, ours.get(intent["id"]), carts, account, window, found)


async def _checkout_carts(
    conn: Connection, reader: StripeReader, account: str | None, window: Window
) -> dict[str, str]:
    """The intents that a completed session in `payment` mode names a cart for, and that
    have no order here: intent id -> cart id (consumer/lifecycle.py, `learn_checkout`)."""
    since = window.since - int(SESSION_LASTS.total_seconds())
    carts: dict[str, str] = {}
    params = {"created": {"gte": since}, "status": "complete"}
    async for page in reader.pages("checkout.sessions", params, account):
        named = dict(_session_carts(page, window))
        if named:
            have = await _ours(conn, list(named), account, window.settle_s)
            carts.update((pid, cart) for pid, cart in named.items() if pid not in have)
    return carts


def _session_carts(page: Iterable[dict[str, Any]], window: Window) -> Iterable[tuple[str, str]]:
    for raw in page:
        if raw.get("mode") != "payment" or raw.get("livemode") != window.livemode:
            continue
        cart = CheckoutSession.model_validate(raw).cart(window.cart_key)
        if cart is not None and isinstance(raw.get("payment_intent"), str):
            yield raw["payment_intent"], cart


async def _ours(
    conn: Connection, intent_ids: list[str], account: str | None, settle_s: float
) -> dict[str, dict[str, Any]]:
    """Our orders of `intent_ids` on `account`, with what their intents recorded."""
    if not intent_ids:
        return {}
    rows = await conn.fetch(
        """
        SELECT o.id AS order_id, o.payment_intent_id, o.allocation, o.amount_refunded,
               p.status AS intent_status, p.dispute_id, p.dispute_status, p.dispute_amount,
               p.dispute_refundable,
               o.updated_at > now() - make_interval(secs => $3)
               OR EXISTS (SELECT 1 FROM outbox x
                          WHERE x.kind = 'stripe_action'
                            AND x.payment_intent_id = o.payment_intent_id
                            AND x.done_at > now() - make_interval(secs => $3)) AS settling
        FROM orders o LEFT JOIN payment_intents p ON p.id = o.payment_intent_id
        WHERE o.payment_intent_id = ANY($1::text[]) AND o.account IS NOT DISTINCT FROM $2
        """,
        intent_ids,
        account,
        settle_s,
    )
    return {row["payment_intent_id"]: dict(row) for row in rows}


def _judge(
    intent: dict[str, Any],
    ours: dict[str, Any] | None,
    carts: dict[str, str],
    account: str | None,
    window: Window,
    found: dict[str, Found],
) -> None:
    if intent["created"] > window.settled_before or (ours is not None and ours["settling"]):
        return
    pid, status = intent["id"], intent["status"]
    where = {"account": account} if account else {}
    if ours is None:
        cart = PaymentIntent.model_validate(intent).cart(window.cart_key) or carts.get(pid)
        if status in AUTHORIZED_STATUSES and cart is not None:
            found[PAYMENT_WITHOUT_ORDER].add(
                {"payment_intent_id": pid, "stripe_status": status, "cart_id": cart, **where}
            )
        return
    charge = intent.get("latest_charge")
    charge = charge if isinstance(charge, dict) else {}
    sent_back = min(_sent_back(charge), intent.get("amount_received") or 0)
    mine = {"order_id": ours["order_id"], "payment_intent_id": pid, **where}
    if differs := _differences(status, sent_back, bool(charge.get("disputed")), ours):
        found[STATE_DIFFERS].add({**mine, **differs})
    if ours["allocation"] in UNFILLABLE and (held := _held(intent, sent_back, charge, ours)):
        found[UNFILLABLE_MONEY_HELD].add(
            {**mine, "allocation": ours["allocation"], "stripe_status": status, "held": held}
        )


def _sent_back(charge: dict[str, Any]) -> int:
    """What the charge gave back to the customer, as the consumer counts it
    (consumer/lifecycle.py, `learn_charge`): nothing for an uncaptured charge (what it
    "refunds" is the hold released), and less the rest of a partial capture, which Stripe
    released as a refund before API 2025-03-31.basil (no money back). As the relay does
    (consumer/stripe_actions.py, `read`), that rest is taken off whichever version made the
    capture: a refund of up to that much after a partial capture made since basil is missed
    rather than a release reported."""
    if not charge.get("captured"):
        return 0
    amount, captured = charge.get("amount") or 0, charge.get("amount_captured") or 0
    rest = amount - captured if 0 < captured < amount else 0
    return max((charge.get("amount_refunded") or 0) - rest, 0)


def _differences(
    status: str, sent_back: int, disputed: bool, ours: dict[str, Any]
) -> dict[str, Any]:
    """What Stripe shows that our books do not: canceled, refunded more, disputed."""
    differs: dict[str, Any] = {}
    if status == "canceled" and ours["intent_status"] != "canceled":
        differs.update(status_here=ours["intent_status"], status_stripe=status)
    if sent_back > ours["amount_refunded"]:
        differs.update(refunded_here=ours["amount_refunded"], refunded_stripe=sent_back)
    if disputed and ours["dispute_id"] is None:
        differs.update(disputed_here=False, disputed_stripe=True)
    return differs


def _held(
    intent: dict[str, Any], sent_back: int, charge: dict[str, Any], ours: dict[str, Any]
) -> int:
    """What Stripe still holds or kept of an order we cannot fill: an authorization not
    released, or money captured and neither refunded nor taken back by a dispute. A dispute
    that keeps the payment from being refunded is waited out, as the consumer does
    (consumer/facts.py, `owed_back`, `refund_blocked`); one Stripe shows and our books do
    not is `stripe_state_differs`'s."""
    if intent["status"] == "requires_capture":
        return int(intent.get("amount_capturable") or 0)
    if intent["status"] != "succeeded" or (charge.get("disputed") and ours["dispute_id"] is None):
        return 0
    kept = 0
    if ours["dispute_id"] is not None:
        recorded = (ours["dispute_status"], ours["dispute_amount"] or 0)
        dispute = Dispute(ours["dispute_id"], *recorded, "", 0, bool(ours["dispute_refundable"]))
        if dispute.blocks_refund:
            return 0
        kept = dispute.holds
    return max(int(intent.get("amount_received") or 0) - sent_back - kept, 0)

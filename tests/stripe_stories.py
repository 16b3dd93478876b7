"""Stripe as shops use it (issue 18), told as stories: the events Stripe sends about one payment.

A story is a function of the payment intent's id that returns every event Stripe sends
a shop about that payment, in the order Stripe sends them, each object Stripe's own
example (tests/fixtures/stripe.py) with the story's ids, amounts and statuses set. The
intent `pid` pays for the cart `cart-<pid>` (`cart_of`): two of SKU at UNIT, seeded with
`CART_LINES`; a Checkout Session adds 500 shipping and 95 tax and takes 300 off, so the
intent asks for TOTAL while the cart totals SUBTOTAL.

Told through the store three ways by tests/integration/test_checkout.py, and through a
running bridge and consumer both ways round by tests/e2e/test_stripe_stories.py; what
each story must end in is said by each test.

Stripe's facts relied on: a Checkout Session names its intent and carries the shop's cart
(`client_reference_id`, `metadata`); its `amount_subtotal` is the items, `total_details`
the shipping, discount and tax, and under Adaptive Pricing `currency_conversion` gives the
shop's own amounts; a delayed payment method completes the session `unpaid` and is
settled by `checkout.session.async_payment_*`; a session names no intent until it is
confirmed, so one that expired unpaid names none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg

from intentflow.stripekit import events
from tests.fixtures import stripe as fixtures

SKU = "sku-mug"
UNIT = 1500
CART_LINES = [(SKU, 2, UNIT)]
SUBTOTAL = 2 * UNIT
SHIPPING, TAX, DISCOUNT = 500, 95, 300
TOTAL = SUBTOTAL + SHIPPING + TAX - DISCOUNT
T0 = 1_790_000_000
DAY = 86_400

Story = Callable[[str], list[dict[str, Any]]]

# What an order shows of its story: compared between deliveries, and with what it expects.
ORDER_FIELDS = (
    "status",
    "allocation",
    "status_reason",
    "amount",
    "currency",
    "amount_subtotal",
    "amount_shipping",
    "amount_discount",
    "amount_tax",
    "amount_authorized",
    "amount_refunded",
    "amount_captured",
    "review_open",
    "fraud_warning_type",
    "dispute_status",
)


def cart_of(pid: str) -> str:
    return f"cart-{pid}"


async def order_of(db: asyncpg.Connection, pid: str) -> dict[str, Any] | None:
    """The intent's order as ORDER_FIELDS show it; None when it has none."""
    row = await db.fetchrow(
        f"SELECT {', '.join(ORDER_FIELDS)} FROM orders WHERE payment_intent_id = $1", pid
    )
    return None if row is None else dict(row)


# --- Stripe's objects, from its examples -------------------------------------------------


def at(obj: dict[str, Any], event_type: str, second: int) -> dict[str, Any]:
    """The event Stripe sends at T0 + `second`; a refund keeps its own `created` (when it
    was made), other objects show the event's."""
    evt = events.stamped(obj, event_type, T0 + second)
    if obj.get("object") == "refund":
        evt["data"]["object"]["created"] = obj["created"]
    return evt


def intent(pid: str, status: str, amount: int, **fields: Any) -> dict[str, Any]:
    """Stripe's example intent, `amount` held while requires_capture, received once succeeded."""
    values: dict[str, Any] = {
        "currency": "usd",
        "amount_capturable": amount if status == "requires_capture" else 0,
        "amount_received": amount if status == "succeeded" else 0,
        "metadata": {},
        "capture_method": "automatic",
        "last_payment_error": None,
        "next_action": None,
        "canceled_at": None,
        "transfer_data": None,
    }
    return fixtures.payment_intent(id=pid, status=status, amount=amount, **(values | fields))


def session(pid: str, cart: str | None, payment_status: str, **fields: Any) -> dict[str, Any]:
    """Stripe's example session for `pid`, the cart in its client_reference_id: the items
    (the cart's total) plus shipping and tax, less a discount."""
    values: dict[str, Any] = {
        "payment_intent": pid,
        "mode": "payment",
        "status": "complete",
        "client_reference_id": cart,
        "metadata": {},
        "amount_subtotal": SUBTOTAL,
        "amount_total": TOTAL,
        "currency": "usd",
        "currency_conversion": None,
        "total_details": {
            "amount_discount": DISCOUNT,
            "amount_shipping": SHIPPING,
            "amount_tax": TAX,
        },
    }
    return fixtures.checkout_session(
        id=f"cs_{pid}", payment_status=payment_status, **(values | fields)
    )


def charge_object(pid: str, captured: int, refunded: int, **fields: Any) -> dict[str, Any]:
    """The intent's captured charge, `refunded` of it sent back so far."""
    return fixtures.charge(
        id=f"ch_{pid}", payment_intent=pid, amount=fields.pop("amount", captured),
        amount_captured=captured, amount_refunded=refunded, captured=True,
        refunded=refunded >= captured, status="succeeded", **fields,
    )  # fmt: skip


def held_charge(pid: str, amount: int) -> dict[str, Any]:
    """The intent's charge while only authorized (charge.succeeded of a manual capture)."""
    return fixtures.charge(
        id=f"ch_{pid}", payment_intent=pid, amount=amount, amount_captured=0,
        amount_refunded=0, captured=False, refunded=False, status="succeeded",
    )  # fmt: skip


def refund_object(pid: str, amount: int, status: str, made: int) -> dict[str, Any]:
    return fixtures.refund(
        id=f"re_{pid}", payment_intent=pid, charge=f"ch_{pid}", amount=amount, status=status,
        created=T0 + made, reason="requested_by_customer", metadata={},
    )  # fmt: skip


def dispute_object(pid: str, status: str) -> dict[str, Any]:
    return fixtures.dispute(
        id=f"dp_{pid}", payment_intent=pid, charge=f"ch_{pid}", amount=SUBTOTAL,
        status=status, reason="product_not_received", is_charge_refundable=False,
    )  # fmt: skip


def review(pid: str, open_: bool, closed_reason: str | None) -> dict[str, Any]:
    return fixtures.review(
        id=f"prv_{pid}", payment_intent=pid, charge=f"ch_{pid}", open=open_,
        reason="rule" if open_ else (closed_reason or ""), closed_reason=closed_reason,
    )  # fmt: skip


def fraud_warning(pid: str, actionable: bool = True) -> dict[str, Any]:
    return fixtures.early_fraud_warning(
        id=f"issfr_{pid}", payment_intent=pid, charge=f"ch_{pid}", actionable=actionable,
        fraud_type="made_with_stolen_card",
    )  # fmt: skip


def _paid_with_cart(pid: str, amount: int = SUBTOTAL) -> list[dict[str, Any]]:
    """A PaymentIntent shop's card payment, captured at once, the cart in its metadata."""
    cart = {"cart_id": cart_of(pid)}
    return [
        at(intent(pid, "requires_payment_method", amount, metadata=cart),
           "payment_intent.created", 0),
        at(charge_object(pid, amount, 0), "charge.succeeded", 0),
        at(intent(pid, "succeeded", amount, metadata=cart), "payment_intent.succeeded", 0),
    ]  # fmt: skip


# --- The stories -------------------------------------------------------------------------


def card_through_checkout(pid: str) -> list[dict[str, Any]]:
    """A card paid through Checkout, captured at once: the intent names no cart (Checkout
    keeps it on the session, in client_reference_id) and asks for the total."""
    return [
        at(intent(pid, "requires_payment_method", TOTAL), "payment_intent.created", 0),
        at(charge_object(pid, TOTAL, 0), "charge.succeeded", 0),
        at(intent(pid, "succeeded", TOTAL), "payment_intent.succeeded", 0),
        at(session(pid, cart_of(pid), "paid"), "checkout.session.completed", 1),
    ]


def cart_copied_onto_the_intent(pid: str) -> list[dict[str, Any]]:
    """Checkout with payment_intent_data.metadata copying the cart (kept in the session's
    metadata) onto the intent, and manual capture: the intent asks for the total, which
    alone does not match the cart; the session completes `unpaid` (only held)."""
    cart = {"cart_id": cart_of(pid)}
    held = intent(pid, "requires_capture", TOTAL, capture_method="manual", metadata=cart)
    made = intent(pid, "requires_payment_method", TOTAL, capture_method="manual", metadata=cart)
    return [
        at(made, "payment_intent.created", 0),
        at(held_charge(pid, TOTAL), "charge.succeeded", 1),
        at(held, "payment_intent.amount_capturable_updated", 1),
        at(session(pid, None, "unpaid", metadata=cart), "checkout.session.completed", 1),
    ]


def delayed_payment(settled: str) -> Story:
    """A bank debit through Checkout, the cart in the session's metadata only: the session
    completes unpaid while the intent is processing, and three days later the debit
    `succeeded` (the money arrived) or `failed`."""

    def story(pid: str) -> list[dict[str, Any]]:
        def settles(payment_status: str) -> dict[str, Any]:
            return session(pid, None, payment_status, metadata={"cart_id": cart_of(pid)})

        told = [
            at(intent(pid, "requires_payment_method", TOTAL), "payment_intent.created", 0),
            at(intent(pid, "processing", TOTAL), "payment_intent.processing", 1),
            at(settles("unpaid"), "checkout.session.completed", 1),
        ]
        if settled == "succeeded":
            return [
                *told,
                at(charge_object(pid, TOTAL, 0), "charge.succeeded", 3 * DAY),
                at(intent(pid, "succeeded", TOTAL), "payment_intent.succeeded", 3 * DAY),
                at(settles("paid"), "checkout.session.async_payment_succeeded", 3 * DAY),
            ]
        return [
            *told,
            at(intent(pid, "requires_payment_method", TOTAL), "payment_intent.payment_failed",
               3 * DAY),
            at(settles("unpaid"), "checkout.session.async_payment_failed", 3 * DAY),
        ]  # fmt: skip

    return story


ADAPTIVE_TOTAL = 2_760  # SUBTOTAL in EUR at 0.92


def adaptive_pricing(pid: str) -> list[dict[str, Any]]:
    """The buyer pays in EUR; `currency_conversion` gives the session's amounts in the
    shop's USD, where the cart is."""
    in_eur = session(
        pid,
        cart_of(pid),
        "paid",
        currency="eur",
        amount_subtotal=ADAPTIVE_TOTAL,
        amount_total=ADAPTIVE_TOTAL,
        total_details={"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        currency_conversion={
            "amount_subtotal": SUBTOTAL,
            "amount_total": SUBTOTAL,
            "fx_rate": "0.92",
            "source_currency": "usd",
        },
    )
    return [
        at(intent(pid, "requires_payment_method", ADAPTIVE_TOTAL, currency="eur"),
           "payment_intent.created", 0),
        at(charge_object(pid, ADAPTIVE_TOTAL, 0, currency="eur"), "charge.succeeded", 0),
        at(intent(pid, "succeeded", ADAPTIVE_TOTAL, currency="eur"),
           "payment_intent.succeeded", 0),
        at(in_eur, "checkout.session.completed", 0),
    ]  # fmt: skip


def incremented_authorization(pid: str) -> list[dict[str, Any]]:
    """A hold for less than the cart, then an increment to the cart's total (the latest
    authorization by `created`)."""
    cart = {"cart_id": cart_of(pid)}
    less = SUBTOTAL - 500
    return [
        at(intent(pid, "requires_payment_method", less, capture_method="manual", metadata=cart),
           "payment_intent.created", 0),
        at(held_charge(pid, less), "charge.succeeded", 0),
        at(intent(pid, "requires_capture", less, capture_method="manual", metadata=cart),
           "payment_intent.amount_capturable_updated", 0),
        at(held_charge(pid, SUBTOTAL), "charge.updated", 30),
        at(intent(pid, "requires_capture", SUBTOTAL, capture_method="manual", metadata=cart),
           "payment_intent.amount_capturable_updated", 30),
    ]  # fmt: skip


def refund_that_fails(charge_says: bool) -> Story:
    """A full refund (refund.created pending, charge.refunded, then succeeded), and days
    later the refund fails: refund.updated and refund.failed, and, with `charge_says`, a
    charge.updated with nothing refunded any more."""

    def story(pid: str) -> list[dict[str, Any]]:
        told = [
            *_paid_with_cart(pid),
            at(refund_object(pid, SUBTOTAL, "pending", 10), "refund.created", 10),
            at(charge_object(pid, SUBTOTAL, SUBTOTAL), "charge.refunded", 10),
            at(refund_object(pid, SUBTOTAL, "succeeded", 10), "charge.refund.updated", 10),
            at(refund_object(pid, SUBTOTAL, "failed", 10), "refund.updated", 4_000),
            at(refund_object(pid, SUBTOTAL, "failed", 10), "refund.failed", 4_000),
        ]
        if charge_says:
            told.append(at(charge_object(pid, SUBTOTAL, 0), "charge.updated", 4_000))
        return told

    return story


PARTLY = 1_800  # captured of SUBTOTAL held; the rest is released


def partial_capture(version: str) -> Story:
    """Capturing 1800 of a 3000 hold: before API basil the charge counts the released 1200
    in amount_refunded (and a refund object says so); since basil it does not."""
    before_basil = version < "2025-03-31"

    def story(pid: str) -> list[dict[str, Any]]:
        cart = {"cart_id": cart_of(pid)}
        manual = {"capture_method": "manual", "metadata": cart}
        taken = intent(pid, "succeeded", SUBTOTAL, amount_received=PARTLY, **manual)
        released = SUBTOTAL - PARTLY
        told = [
            at(intent(pid, "requires_payment_method", SUBTOTAL, **manual),
               "payment_intent.created", 0),
            at(held_charge(pid, SUBTOTAL), "charge.succeeded", 0),
            at(intent(pid, "requires_capture", SUBTOTAL, **manual),
               "payment_intent.amount_capturable_updated", 0),
            at(charge_object(pid, PARTLY, released if before_basil else 0, amount=SUBTOTAL),
               "charge.captured", 50),
            at(taken, "payment_intent.succeeded", 50),
        ]  # fmt: skip
        if before_basil:
            release = refund_object(pid, released, "succeeded", 50) | {"reason": None}
            told.append(at(release, "charge.refund.updated", 50))
        for evt in told:
            evt["api_version"] = version
        return told

    return story


def appealed_dispute(pid: str) -> list[dict[str, Any]]:
    """A dispute lost, then appealed (API 2026-10-28: appeal_needs_response, then
    appeal_under_review)."""
    return [
        *_paid_with_cart(pid),
        at(dispute_object(pid, "needs_response"), "charge.dispute.created", 10),
        at(dispute_object(pid, "needs_response"), "charge.dispute.funds_withdrawn", 10),
        at(dispute_object(pid, "lost"), "charge.dispute.closed", 100),
        at(dispute_object(pid, "appeal_needs_response"), "charge.dispute.updated", 200),
        at(dispute_object(pid, "appeal_under_review"), "charge.dispute.updated", 300),
    ]


def radar_review(pid: str) -> list[dict[str, Any]]:
    """A manual capture Radar reviews as it is authorized; the shop approves it later."""
    cart = {"cart_id": cart_of(pid)}
    manual = {"capture_method": "manual", "metadata": cart}
    return [
        at(intent(pid, "requires_payment_method", SUBTOTAL, **manual),
           "payment_intent.created", 0),
        at(held_charge(pid, SUBTOTAL), "charge.succeeded", 1),
        at(review(pid, True, None), "review.opened", 1),
        at(intent(pid, "requires_capture", SUBTOTAL, **manual),
           "payment_intent.amount_capturable_updated", 1),
        at(review(pid, False, "approved"), "review.closed", 600),
    ]  # fmt: skip


def early_fraud_warning(pid: str) -> list[dict[str, Any]]:
    """A day after a card payment the issuer warns of fraud; a day later the warning is
    no longer actionable (the shop refunded, or the cardholder disputed)."""
    return [
        *_paid_with_cart(pid),
        at(fraud_warning(pid), "radar.early_fraud_warning.created", DAY),
        at(fraud_warning(pid, actionable=False), "radar.early_fraud_warning.updated", 2 * DAY),
    ]


def session_expired_unpaid(pid: str) -> list[dict[str, Any]]:
    """A Checkout Session nobody paid: it expires naming no intent (none was created)."""
    unpaid = session(pid, cart_of(pid), "unpaid", payment_intent=None, status="expired")
    return [at(unpaid, "checkout.session.expired", DAY)]


def subscription_session(pid: str) -> list[dict[str, Any]]:
    """A Checkout Session that starts a subscription: Stripe Billing's, no order of the shop's."""
    subscribed = session(
        pid, cart_of(pid), "paid", mode="subscription", payment_intent=None,
        subscription=f"sub_{pid}",
    )  # fmt: skip
    return [at(subscribed, "checkout.session.completed", 0)]

"""Stripe as shops use it (issue 18), through the real store: each story in any order.

The stories are tests/stripe_stories.py's: every event Stripe sends about one payment,
each object Stripe's own example (stripe/openapi's fixtures3.json) with the story's ids,
amounts and statuses. Each story is applied three ways, each with ids of its own: in one
batch, one event a batch in the order Stripe sent them, and one event a batch in the
reverse order; the three must end in the same order row, which is also what the story
expects. tests/e2e/test_stripe_stories.py sends the same stories through the bridge.
"""

from __future__ import annotations

import itertools
from typing import Any

import asyncpg
import pytest

from intentflow.consumer.outbox import Action
from intentflow.consumer.policy import CapturePolicy, ShopPolicy
from intentflow.consumer.tools.reconcile import check
from tests import stripe_stories as stories
from tests.integration.stripe_support import apply
from tests.stripe_stories import (
    ADAPTIVE_TOTAL,
    CART_LINES,
    PARTLY,
    SKU,
    SUBTOTAL,
    TOTAL,
    Story,
    at,
    cart_of,
    intent,
    order_of,
)
from tests.support import seed_cart, seed_stock

_runs = itertools.count()


async def three_ways(
    db: asyncpg.Connection, story: Story, policy: ShopPolicy | None = None
) -> dict[str, Any]:
    """The order the story ends in, the same in one batch and in either order of batches."""
    policy = policy or ShopPolicy()
    seen = []
    for how in ("one batch", "as sent", "reversed"):
        pid = f"pi_{next(_runs)}"
        await seed_cart(db, cart_of(pid), CART_LINES)
        told = story(pid)
        if how == "one batch":
            await apply(db, *told, policy=policy)
        for evt in told if how == "as sent" else reversed(told) if how == "reversed" else ():
            await apply(db, evt, policy=policy)
        seen.append((how, await order_of(db, pid)))
    (_, first), *others = seen
    for how, order in others:
        assert order == first, f"{how}: {order}\nnot {first}"
    assert (await check(db, policy)).ok
    assert first is not None, "no order"
    return first


@pytest.fixture
async def shop(db: asyncpg.Connection) -> asyncpg.Connection:
    await seed_stock(db, {SKU: 100})
    return db


async def test_a_card_paid_through_checkout_is_placed_on_its_sessions_cart_and_totals(
    shop: asyncpg.Connection,
) -> None:
    """The intent names no cart (Checkout keeps it on the session) and asks for the total
    with shipping and tax; the cart is checked against the subtotal."""
    order = await three_ways(shop, stories.card_through_checkout)
    assert order == {
        "status": "placed",
        "allocation": "placed",
        "status_reason": None,
        "amount": TOTAL,
        "currency": "usd",
        "amount_subtotal": SUBTOTAL,
        "amount_shipping": 500,
        "amount_discount": 300,
        "amount_tax": 95,
        "amount_authorized": TOTAL,
        "amount_refunded": 0,
        "amount_captured": TOTAL,
        "review_open": None,
        "fraud_warning_type": None,
        "dispute_status": None,
    }


async def test_a_cart_copied_onto_the_intent_waits_for_the_session_then_is_placed(
    shop: asyncpg.Connection,
) -> None:
    """payment_intent_data.metadata copies the cart onto the intent, whose amount is the
    total: alone it would not match the cart, so the order waits in needs_review and is
    decided again when the session's subtotal comes; either order ends placed."""
    order = await three_ways(shop, stories.cart_copied_onto_the_intent)
    assert (order["status"], order["amount_subtotal"], order["amount"]) == (
        "placed",
        SUBTOTAL,
        TOTAL,
    )
    # Stock was taken once, by one of the three (9 remain per run of 100... 6 in all).
    taken = await shop.fetchval(
        "SELECT -sum(quantity_delta) FROM inventory_movements WHERE reason = 'order'"
    )
    assert taken == 3 * 2


@pytest.mark.parametrize("settled", ["succeeded", "failed"])
async def test_a_delayed_payment_method_takes_stock_only_once_paid(
    shop: asyncpg.Connection, settled: str
) -> None:
    """A bank debit through Checkout: the session completes unpaid, and days later
    `checkout.session.async_payment_succeeded` (with payment_intent.succeeded) or
    `..._failed` (with payment_intent.payment_failed)."""
    story = stories.delayed_payment(settled)
    if settled == "succeeded":
        assert (await three_ways(shop, story))["status"] == "placed"
        return
    for _ in range(2):
        pid = f"pi_failed_{next(_runs)}"
        await seed_cart(shop, cart_of(pid), CART_LINES)
        for evt in story(pid):
            await apply(shop, evt)
        assert await shop.fetchval("SELECT count(*) FROM orders") == 0
    assert await shop.fetchval("SELECT stocked_quantity FROM inventory_levels") == 100


async def test_under_adaptive_pricing_the_cart_is_checked_in_the_shops_currency(
    shop: asyncpg.Connection,
) -> None:
    """The buyer pays in EUR; `currency_conversion` gives the session's amounts in the
    shop's USD, where the cart is."""
    order = await three_ways(shop, stories.adaptive_pricing)
    assert (order["status"], order["currency"], order["amount"], order["amount_subtotal"]) == (
        "placed",
        "eur",
        ADAPTIVE_TOTAL,
        SUBTOTAL,
    )


async def test_an_incremented_authorization_ends_placed_in_any_order(
    shop: asyncpg.Connection,
) -> None:
    """A hold for less, then an increment to the cart's total (the latest by `created`)."""
    order = await three_ways(shop, stories.incremented_authorization)
    assert (order["status"], order["amount_authorized"]) == ("placed", SUBTOTAL)


@pytest.mark.parametrize("charge_says", [True, False], ids=["charge-updated", "refund-only"])
async def test_a_refund_that_fails_stops_counting_and_the_order_comes_back(
    shop: asyncpg.Connection, charge_says: bool
) -> None:
    """charge.refunded, then `refund.failed` (and a charge.updated with less refunded, or
    not yet): the order was refunded, and is placed again (a failed refund stops counting,
    even in what the charge said before it failed)."""
    order = await three_ways(shop, stories.refund_that_fails(charge_says))
    assert (order["status"], order["amount_refunded"]) == ("placed", 0)


@pytest.mark.parametrize("version", ["2024-06-20", "2025-03-31.basil"])
async def test_a_partial_capture_is_no_refund(shop: asyncpg.Connection, version: str) -> None:
    """Capturing 1800 of a 3000 hold: before API basil the charge counts the released
    1200 in amount_refunded (and a refund object says so); since basil it does not.
    Either way no money went back: the order is placed, 1800 captured, 0 refunded."""
    order = await three_ways(shop, stories.partial_capture(version))
    assert (order["status"], order["amount_captured"], order["amount_refunded"]) == (
        "placed",
        PARTLY,
        0,
    )


async def test_an_order_under_appeal_stays_disputed(shop: asyncpg.Connection) -> None:
    """A lost dispute appealed (API 2026-10-28: appeal_needs_response, appeal_under_review)."""
    order = await three_ways(shop, stories.appealed_dispute)
    assert (order["status"], order["dispute_status"]) == ("disputed", "appeal_under_review")


async def captures(db: asyncpg.Connection, pid: str) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM outbox WHERE kind = 'stripe_action'"
            " AND payment_intent_id = $1 AND name = $2",
            pid,
            str(Action.CAPTURE),
        )
    )


async def test_under_on_placed_a_payment_radar_reviews_is_captured_once_approved(
    shop: asyncpg.Connection,
) -> None:
    on_placed = ShopPolicy(CapturePolicy.ON_PLACED)
    await seed_cart(shop, "cart-r", CART_LINES)
    held = intent(
        "pi_r", "requires_capture", SUBTOTAL, capture_method="manual",
        metadata={"cart_id": "cart-r"},
    )  # fmt: skip
    opened = at(stories.review("pi_r", True, None), "review.opened", 1)
    await apply(shop, at(held, "payment_intent.amount_capturable_updated", 0), opened,
                policy=on_placed)  # fmt: skip
    assert await captures(shop, "pi_r") == 0
    order = await shop.fetchrow("SELECT status, review_open FROM orders WHERE id = 1")
    assert order is not None and tuple(order) == ("placed", True)
    approved = at(stories.review("pi_r", False, "approved"), "review.closed", 600)
    await apply(shop, approved, policy=on_placed)
    assert await captures(shop, "pi_r") == 1


async def test_under_on_placed_a_fraud_warning_holds_the_capture_for_the_shop(
    shop: asyncpg.Connection,
) -> None:
    on_placed = ShopPolicy(CapturePolicy.ON_PLACED)
    await seed_cart(shop, "cart-w", CART_LINES)
    held = intent(
        "pi_w", "requires_capture", SUBTOTAL, capture_method="manual",
        metadata={"cart_id": "cart-w"},
    )  # fmt: skip
    warning = stories.fraud_warning("pi_w")
    await apply(
        shop,
        at(warning, "radar.early_fraud_warning.created", 0),
        at(held, "payment_intent.amount_capturable_updated", 0),
        policy=on_placed,
    )
    assert await captures(shop, "pi_w") == 0
    kept = await shop.fetchval(
        "SELECT fraud_warning_type FROM orders WHERE payment_intent_id = 'pi_w'"
    )
    assert kept == "made_with_stolen_card"


@pytest.mark.parametrize("signal", ["review.opened", "radar.early_fraud_warning.created"])
async def test_under_on_placed_reconcile_accepts_a_capture_radar_holds(
    shop: asyncpg.Connection, signal: str
) -> None:
    """The two tests above hold the capture of a placed order while Radar's review is open
    or after the issuer warned of fraud, as issue 18 asks; `order-consumer reconcile` under
    the same CAPTURE_POLICY must not then report the order as a capture nobody asked for."""
    on_placed = ShopPolicy(CapturePolicy.ON_PLACED)
    await seed_cart(shop, cart_of("pi_h"), CART_LINES)
    manual = {"capture_method": "manual", "metadata": {"cart_id": cart_of("pi_h")}}
    held = intent("pi_h", "requires_capture", SUBTOTAL, **manual)
    radar = (
        stories.review("pi_h", True, None)
        if signal == "review.opened"
        else stories.fraud_warning("pi_h")
    )
    await apply(
        shop,
        at(radar, signal, 0),
        at(held, "payment_intent.amount_capturable_updated", 0),
        policy=on_placed,
    )
    assert await captures(shop, "pi_h") == 0  # held, as it should be
    report = await check(shop, on_placed)
    assert report.ok, [c.line() for c in report.checks if not c.ok]

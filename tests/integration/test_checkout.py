"""Stripe as shops use it (issue 18), through the real store: each story in any order.

Every object is Stripe's own example (tests/fixtures/stripe.py, stripe/openapi's
fixtures3.json) with the ids, amounts and statuses of the story set. Each story is
applied three ways, each with ids of its own: in one batch, one event a batch in the
order Stripe sent them, and one event a batch in the reverse order; the three must end
in the same order row, which is also what the story expects.

Stripe's facts relied on (each cited where used): a Checkout Session names its intent
and carries the shop's cart (`client_reference_id`, `metadata`); its `amount_subtotal`
is the items, `total_details` the shipping, discount and tax, and under Adaptive
Pricing `currency_conversion` gives the shop's own amounts; a delayed payment method
completes the session `unpaid` and is settled by `checkout.session.async_payment_*`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from intentflow.consumer.outbox import Action
from intentflow.consumer.policy import CapturePolicy, ShopPolicy
from intentflow.consumer.reconcile import check
from intentflow.stripekit import events
from tests.fixtures import stripe as fixtures
from tests.integration.stripe_support import apply
from tests.support import seed_cart, seed_stock

SKU = "sku-mug"
UNIT = 1500
T0 = 1_790_000_000
_runs = itertools.count()

Story = Callable[[str], list[dict[str, Any]]]
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


def session(pid: str, cart: str, payment_status: str, **fields: Any) -> dict[str, Any]:
    """Stripe's example session for `pid`, the cart in its client_reference_id: the items
    (the cart's total) plus 500 shipping and 95 tax, less a 300 discount."""
    values: dict[str, Any] = {
        "mode": "payment",
        "status": "complete",
        "client_reference_id": cart,
        "metadata": {},
        "amount_subtotal": 2 * UNIT,
        "amount_total": 2 * UNIT + 500 + 95 - 300,
        "currency": "usd",
        "currency_conversion": None,
        "total_details": {"amount_discount": 300, "amount_shipping": 500, "amount_tax": 95},
    }
    return fixtures.checkout_session(
        id=f"cs_{pid}", payment_intent=pid, payment_status=payment_status, **(values | fields)
    )


TOTAL = 2 * UNIT + 500 + 95 - 300


async def three_ways(
    db: asyncpg.Connection, story: Story, policy: ShopPolicy | None = None
) -> dict[str, Any]:
    """The order the story ends in, the same in one batch and in either order of batches."""
    policy = policy or ShopPolicy()
    seen = []
    for how in ("one batch", "as sent", "reversed"):
        pid = f"pi_{next(_runs)}"
        await seed_cart(db, f"cart-{pid}", [(SKU, 2, UNIT)])
        told = story(pid)
        if how == "one batch":
            await apply(db, *told, policy=policy)
        for evt in told if how == "as sent" else reversed(told) if how == "reversed" else ():
            await apply(db, evt, policy=policy)
        row = await db.fetchrow(
            f"SELECT {', '.join(ORDER_FIELDS)} FROM orders WHERE payment_intent_id = $1", pid
        )
        seen.append((how, None if row is None else dict(row)))
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

    def story(pid: str) -> list[dict[str, Any]]:
        return [
            at(intent(pid, "succeeded", TOTAL), "payment_intent.succeeded", 0),
            at(session(pid, f"cart-{pid}", "paid"), "checkout.session.completed", 1),
        ]

    order = await three_ways(shop, story)
    assert order == {
        "status": "placed",
        "allocation": "placed",
        "status_reason": None,
        "amount": TOTAL,
        "currency": "usd",
        "amount_subtotal": 2 * UNIT,
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

    def story(pid: str) -> list[dict[str, Any]]:
        held = intent(
            pid,
            "requires_capture",
            TOTAL,
            capture_method="manual",
            metadata={"cart_id": f"cart-{pid}"},
        )
        return [
            at(held, "payment_intent.amount_capturable_updated", 0),
            at(session(pid, f"cart-{pid}", "unpaid"), "checkout.session.completed", 1),
        ]

    order = await three_ways(shop, story)
    assert (order["status"], order["amount_subtotal"], order["amount"]) == (
        "placed",
        2 * UNIT,
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

    def story(pid: str) -> list[dict[str, Any]]:
        cart = f"cart-{pid}"
        told = [
            at(intent(pid, "processing", TOTAL), "payment_intent.processing", 0),
            at(session(pid, cart, "unpaid"), "checkout.session.completed", 1),
        ]
        if settled == "succeeded":
            told += [
                at(session(pid, cart, "paid"), "checkout.session.async_payment_succeeded", 90),
                at(intent(pid, "succeeded", TOTAL), "payment_intent.succeeded", 90),
            ]
        else:
            told += [
                at(session(pid, cart, "unpaid"), "checkout.session.async_payment_failed", 90),
                at(
                    intent(pid, "requires_payment_method", TOTAL),
                    "payment_intent.payment_failed",
                    90,
                ),
            ]
        return told

    if settled == "succeeded":
        assert (await three_ways(shop, story))["status"] == "placed"
        return
    for _ in range(2):
        pid = f"pi_failed_{next(_runs)}"
        await seed_cart(shop, f"cart-{pid}", [(SKU, 2, UNIT)])
        for evt in story(pid):
            await apply(shop, evt)
        assert await shop.fetchval("SELECT count(*) FROM orders") == 0
    assert await shop.fetchval("SELECT stocked_quantity FROM inventory_levels") == 100


async def test_under_adaptive_pricing_the_cart_is_checked_in_the_shops_currency(
    shop: asyncpg.Connection,
) -> None:
    """The buyer pays in EUR; `currency_conversion` gives the session's amounts in the
    shop's USD, where the cart is."""

    def story(pid: str) -> list[dict[str, Any]]:
        in_eur = session(
            pid,
            f"cart-{pid}",
            "paid",
            currency="eur",
            amount_subtotal=2_760,
            amount_total=2_760,
            total_details={"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
            currency_conversion={
                "amount_subtotal": 2 * UNIT,
                "amount_total": 2 * UNIT,
                "fx_rate": "0.92",
                "source_currency": "usd",
            },
        )
        return [
            at(intent(pid, "succeeded", 2_760, currency="eur"), "payment_intent.succeeded", 0),
            at(in_eur, "checkout.session.completed", 0),
        ]

    order = await three_ways(shop, story)
    assert (order["status"], order["currency"], order["amount"], order["amount_subtotal"]) == (
        "placed",
        "eur",
        2_760,
        2 * UNIT,
    )


async def test_an_incremented_authorization_ends_placed_in_any_order(
    shop: asyncpg.Connection,
) -> None:
    """A hold for less, then an increment to the cart's total (the latest by `created`)."""

    def story(pid: str) -> list[dict[str, Any]]:
        cart = {"cart_id": f"cart-{pid}"}
        first = intent(pid, "requires_capture", 2 * UNIT - 500, metadata=cart)
        more = intent(pid, "requires_capture", 2 * UNIT, metadata=cart)
        return [
            at(first, "payment_intent.amount_capturable_updated", 0),
            at(more, "payment_intent.amount_capturable_updated", 30),
        ]

    order = await three_ways(shop, story)
    assert (order["status"], order["amount_authorized"]) == ("placed", 2 * UNIT)


def refund_object(pid: str, amount: int, status: str, made: int) -> dict[str, Any]:
    return fixtures.refund(
        id=f"re_{pid}", payment_intent=pid, charge=f"ch_{pid}", amount=amount, status=status,
        created=T0 + made, reason="requested_by_customer", metadata={},
    )  # fmt: skip


def charge_object(pid: str, captured: int, refunded: int, **fields: Any) -> dict[str, Any]:
    return fixtures.charge(
        id=f"ch_{pid}", payment_intent=pid, amount=fields.pop("amount", captured),
        amount_captured=captured, amount_refunded=refunded, captured=True,
        refunded=refunded >= captured, status="succeeded", **fields,
    )  # fmt: skip


@pytest.mark.parametrize("charge_says", [True, False], ids=["charge-updated", "refund-only"])
async def test_a_refund_that_fails_stops_counting_and_the_order_comes_back(
    shop: asyncpg.Connection, charge_says: bool
) -> None:
    """charge.refunded, then `refund.failed` (and a charge.updated with less refunded, or
    not yet): the order was refunded, and is placed again (a failed refund stops counting,
    even in what the charge said before it failed)."""

    def story(pid: str) -> list[dict[str, Any]]:
        cart = {"cart_id": f"cart-{pid}"}
        told = [
            at(intent(pid, "succeeded", 2 * UNIT, metadata=cart), "payment_intent.succeeded", 0),
            at(charge_object(pid, 2 * UNIT, 2 * UNIT), "charge.refunded", 10),
            at(refund_object(pid, 2 * UNIT, "succeeded", 10), "charge.refund.updated", 10),
            at(refund_object(pid, 2 * UNIT, "failed", 10), "refund.failed", 4_000),
        ]
        if charge_says:
            told.append(at(charge_object(pid, 2 * UNIT, 0), "charge.updated", 4_000))
        return told

    order = await three_ways(shop, story)
    assert (order["status"], order["amount_refunded"]) == ("placed", 0)


@pytest.mark.parametrize("version", ["2024-06-20", "2025-03-31.basil"])
async def test_a_partial_capture_is_no_refund(shop: asyncpg.Connection, version: str) -> None:
    """Capturing 1800 of a 3000 hold: before API basil the charge counts the released
    1200 in amount_refunded (and a refund object says so); since basil it does not.
    Either way no money went back: the order is placed, 1800 captured, 0 refunded."""
    before = version < "2025-03-31"

    def story(pid: str) -> list[dict[str, Any]]:
        cart = {"cart_id": f"cart-{pid}"}
        taken = intent(pid, "succeeded", 2 * UNIT, metadata=cart, amount_received=1_800)
        told = [
            at(
                intent(pid, "requires_capture", 2 * UNIT, metadata=cart),
                "payment_intent.amount_capturable_updated",
                0,
            ),
            at(taken, "payment_intent.succeeded", 50),
            at(
                charge_object(pid, 1_800, 1_200 if before else 0, amount=2 * UNIT),
                "charge.captured",
                50,
            ),
        ]
        if before:
            told.append(
                at(
                    refund_object(pid, 1_200, "succeeded", 50) | {"reason": None},
                    "charge.refund.updated",
                    50,
                )
            )
        for evt in told:
            evt["api_version"] = version
        return told

    order = await three_ways(shop, story)
    assert (order["status"], order["amount_captured"], order["amount_refunded"]) == (
        "placed",
        1_800,
        0,
    )


async def test_an_order_under_appeal_stays_disputed(shop: asyncpg.Connection) -> None:
    """A lost dispute appealed (API 2026-10-28: appeal_needs_response, appeal_under_review)."""

    def story(pid: str) -> list[dict[str, Any]]:
        cart = {"cart_id": f"cart-{pid}"}

        def dispute(status: str) -> dict[str, Any]:
            return fixtures.dispute(
                id=f"dp_{pid}", payment_intent=pid, charge=f"ch_{pid}", amount=2 * UNIT,
                status=status, reason="product_not_received", is_charge_refundable=False,
            )  # fmt: skip

        return [
            at(intent(pid, "succeeded", 2 * UNIT, metadata=cart), "payment_intent.succeeded", 0),
            at(dispute("needs_response"), "charge.dispute.created", 10),
            at(dispute("lost"), "charge.dispute.closed", 100),
            at(dispute("appeal_needs_response"), "charge.dispute.updated", 200),
            at(dispute("appeal_under_review"), "charge.dispute.updated", 300),
        ]

    order = await three_ways(shop, story)
    assert (order["status"], order["dispute_status"]) == ("disputed", "appeal_under_review")


def review(pid: str, open_: bool, closed_reason: str | None) -> dict[str, Any]:
    return fixtures.resource(
        "review", id=f"prv_{pid}", payment_intent=pid, charge=f"ch_{pid}", open=open_,
        reason="rule" if open_ else (closed_reason or ""), closed_reason=closed_reason,
    )  # fmt: skip


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
    await seed_cart(shop, "cart-r", [(SKU, 2, UNIT)])
    held = intent(
        "pi_r", "requires_capture", 2 * UNIT, capture_method="manual",
        metadata={"cart_id": "cart-r"},
    )  # fmt: skip
    opened = at(review("pi_r", True, None), "review.opened", 1)
    await apply(shop, at(held, "payment_intent.amount_capturable_updated", 0), opened,
                policy=on_placed)  # fmt: skip
    assert await captures(shop, "pi_r") == 0
    order = await shop.fetchrow("SELECT status, review_open FROM orders WHERE id = 1")
    assert order is not None and tuple(order) == ("placed", True)
    approved = at(review("pi_r", False, "approved"), "review.closed", 600)
    await apply(shop, approved, policy=on_placed)
    assert await captures(shop, "pi_r") == 1


async def test_under_on_placed_a_fraud_warning_holds_the_capture_for_the_shop(
    shop: asyncpg.Connection,
) -> None:
    on_placed = ShopPolicy(CapturePolicy.ON_PLACED)
    await seed_cart(shop, "cart-w", [(SKU, 2, UNIT)])
    held = intent(
        "pi_w", "requires_capture", 2 * UNIT, capture_method="manual",
        metadata={"cart_id": "cart-w"},
    )  # fmt: skip
    warning = fixtures.resource(
        "radar.early_fraud_warning", id="issfr_w", payment_intent="pi_w", charge="ch_w",
        actionable=True, fraud_type="made_with_stolen_card",
    )  # fmt: skip
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

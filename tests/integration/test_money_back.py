"""No customer's money goes silent (issue 17), end to end against localstripe.

Each payment is made on the emulator as a shop's checkout makes it; its events are
built from the emulator's own objects and applied by the real store, in one batch
or in separate batches (the relay running between them); the relay then acts on
the emulator. What each test reads back: the emulator's intent and refunds, the
orders, the stock and the outbox.

localstripe differs from Stripe where these tests touch it, and Stripe wins:
  - it sends no webhooks: the tests build the events from its objects;
  - its intents have no `amount_capturable` and expand `latest_charge`, and its
    charges have no `amount_captured`: `stripe_shaped` adds them as Stripe shows
    them (stripe/openapi's payment_intent and charge objects, tests/fixtures/stripe.py);
  - it keeps no idempotency keys and ignores `Stripe-Account`
    (tests/integration/test_stripe_answers.py covers those against tests/fake_stripe.py).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import asyncpg
import pytest

from intentflow.consumer import owed
from intentflow.consumer.outbox import Action, sweep_needs_review
from intentflow.consumer.policy import ShopPolicy
from intentflow.consumer.tools.reconcile import check
from intentflow.stripekit import events
from tests.integration.stripe_support import (
    SKU,
    UNIT_AMOUNT,
    Shop,
    action_row,
    apply,
    cancels,
    policy_of,
    run_relay,
    shop,
    stripe_directly,
)
from tests.stripe_emulator import (
    create_manual_capture_intent,
    refunds_on,
    retrieve_intent,
)
from tests.support import seed_cart, seed_stock

# The fixture, imported for pytest to find (listed so that ruff sees it used).
__all__ = ["shop"]

SPLITS = ["one batch", "separate batches"]


async def pay(
    shop: Shop,
    *,
    quantity: int = 1,
    capture_method: str = "manual",
    cart_id: str | None = None,
    seed: bool = True,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A confirmed intent on the emulator for `quantity` of SKU; its cart seeded unless told."""
    if seed and cart_id is not None:
        await seed_cart(shop.db, cart_id, [(SKU, quantity, UNIT_AMOUNT)])
    return await create_manual_capture_intent(
        shop.emulator.base_url,
        cart_id=cart_id,
        amount=quantity * UNIT_AMOUNT,
        currency="usd",
        capture_method=capture_method,
        metadata=metadata,
    )


def stripe_shaped(obj: dict[str, Any]) -> dict[str, Any]:
    """An emulator object with the fields Stripe has and localstripe lacks (module docstring)."""
    shaped = dict(obj)
    if obj["object"] == "payment_intent":
        held = obj["status"] == "requires_capture"
        shaped["amount_capturable"] = obj["amount"] if held else 0
        charge = obj.get("latest_charge")
        shaped["latest_charge"] = charge["id"] if isinstance(charge, dict) else charge
        shaped.pop("charges", None)  # gone from Stripe's intent since API 2022-11-15
    elif obj["object"] == "charge":
        shaped["amount_captured"] = obj["amount"] if obj["captured"] else 0
    return shaped


def event_of(obj: dict[str, Any], event_type: str) -> dict[str, Any]:
    return events.event(stripe_shaped(obj), event_type)


def new_cart() -> str:
    return f"cart-{secrets.token_hex(4)}"


async def charge_of(shop: Shop, intent: dict[str, Any]) -> dict[str, Any]:
    """The intent's latest charge as the emulator has it now."""
    now = await retrieve_intent(shop.emulator.base_url, intent["id"])
    charge: dict[str, Any] = now["latest_charge"]  # expanded by localstripe
    return charge


async def deliver(shop: Shop, split: str, *batches: list[dict[str, Any]]) -> None:
    """The batches as one batch, or one after the other with the relay run between."""
    policy = policy_of(shop.settings)
    if split == "one batch":
        await apply(shop.db, *[e for batch in batches for e in batch], policy=policy)
        return
    for batch in batches:
        await apply(shop.db, *batch, policy=policy)
        await run_relay(shop.settings)


async def order_of(shop: Shop, pid: str) -> tuple[str, str, str | None]:
    row = await shop.db.fetchrow(
        "SELECT status, allocation, status_reason FROM orders WHERE payment_intent_id = $1", pid
    )
    assert row is not None, f"no order for {pid}"
    return row["status"], row["allocation"], row["status_reason"]


async def level(shop: Shop) -> int:
    return int(
        await shop.db.fetchval("SELECT stocked_quantity FROM inventory_levels WHERE sku = $1", SKU)
    )


def refunds_calls(shop: Shop) -> list[Any]:
    return shop.proxy.calls("POST", "/v1/refunds")


async def assert_refunded_once(shop: Shop, pid: str, amount: int) -> None:
    """One refund of `amount` on the emulator, made by the relay for the order's refund row."""
    row = await action_row(shop.db, pid, Action.REFUND)
    [refund] = await refunds_on(shop.emulator.base_url, pid)
    assert (refund["amount"], refund["status"]) == (amount, "succeeded")
    assert refund["metadata"]["intentflow_outbox_id"] == str(row["id"])
    assert refund["metadata"]["intentflow_order_id"] == str(row["order_id"])
    assert (row["state"], row["outcome"]) == ("done", "succeeded")
    assert len(refunds_calls(shop)) == 1


@pytest.mark.parametrize("split", SPLITS)
async def test_an_automatic_capture_for_an_order_out_of_stock_is_refunded(
    shop: Shop, split: str
) -> None:
    await seed_stock(shop.db, {SKU: 0})
    intent = await pay(shop, quantity=2, capture_method="automatic", cart_id=new_cart())
    assert (intent["status"], intent["amount_received"]) == ("succeeded", 2 * UNIT_AMOUNT)
    charge = event_of(await charge_of(shop, intent), "charge.succeeded")
    succeeded = event_of(intent, "payment_intent.succeeded")

    await deliver(shop, split, [charge], [succeeded])
    await run_relay(shop.settings)

    assert await order_of(shop, intent["id"]) == ("out_of_stock", "out_of_stock", f"short:{SKU}")
    await assert_refunded_once(shop, intent["id"], 2 * UNIT_AMOUNT)
    assert cancels(shop.proxy, intent["id"]) == []
    # Stripe's charge.refunded comes back: the order says so, and the books hold.
    refunded = event_of(await charge_of(shop, intent), "charge.refunded")
    await apply(shop.db, refunded)
    assert (await order_of(shop, intent["id"]))[0] == "refunded"
    assert (await check(shop.db)).ok


@pytest.mark.parametrize("split", SPLITS)
async def test_a_capture_of_an_order_out_of_stock_is_refunded_not_canceled(
    shop: Shop, split: str
) -> None:
    """The shop captures from its dashboard before the cancel reaches Stripe. In one
    batch the consumer asks the refund; in separate batches the relay, told by Stripe's
    refusal that the intent was captured, asks it first, and the consumer's ask is a no-op."""
    await seed_stock(shop.db, {SKU: 0})
    held = await pay(shop, quantity=1, cart_id=new_cart())
    pid = held["id"]
    authorized = event_of(held, "payment_intent.amount_capturable_updated")
    await stripe_directly(shop.emulator, pid, "capture")
    captured = event_of(
        await retrieve_intent(shop.emulator.base_url, pid), "payment_intent.succeeded"
    )

    await deliver(shop, split, [authorized], [captured])
    await run_relay(shop.settings)

    await assert_refunded_once(shop, pid, UNIT_AMOUNT)
    cancel_asked = split == "separate batches"
    if cancel_asked:
        cancel = await action_row(shop.db, pid, Action.CANCEL)
        assert (cancel["state"], cancel["outcome"], cancel["error_code"]) == (
            "done",
            "superseded",
            "payment_intent_captured",
        )
    actions = await shop.db.fetchval(
        "SELECT count(*) FROM outbox WHERE kind = 'stripe_action' AND payment_intent_id = $1", pid
    )
    assert actions == (2 if cancel_asked else 1)
    assert (await retrieve_intent(shop.emulator.base_url, pid))["status"] == "succeeded"


@pytest.mark.parametrize("split", SPLITS)
async def test_a_cart_paid_twice_is_one_order_and_the_second_payment_is_released(
    shop: Shop, split: str
) -> None:
    """A double-submitted checkout: two PaymentIntents, one cart."""
    await seed_stock(shop.db, {SKU: 5})
    cart_id = new_cart()
    first = await pay(shop, quantity=2, cart_id=cart_id)
    second = await pay(shop, quantity=2, cart_id=cart_id, seed=False)
    auths = [event_of(i, "payment_intent.amount_capturable_updated") for i in (first, second)]

    await deliver(shop, split, auths[:1], auths[1:])
    await run_relay(shop.settings)

    assert await order_of(shop, first["id"]) == ("placed", "placed", None)
    assert await order_of(shop, second["id"]) == (
        "duplicate",
        "duplicate",
        f"duplicate_of:{first['id']}",
    )
    assert await level(shop) == 3  # taken once
    released = await retrieve_intent(shop.emulator.base_url, second["id"])
    assert (released["status"], released["cancellation_reason"]) == ("canceled", "duplicate")
    assert (await retrieve_intent(shop.emulator.base_url, first["id"]))["status"] == (
        "requires_capture"
    )
    assert [c.form for c in cancels(shop.proxy, second["id"])] == [
        {"cancellation_reason": "duplicate"}
    ]
    assert cancels(shop.proxy, first["id"]) == []
    # Stripe's payment_intent.canceled comes back: the duplicate is canceled, nothing moves.
    await apply(shop.db, event_of(released, "payment_intent.canceled"))
    assert await order_of(shop, second["id"]) == (
        "canceled",
        "duplicate",
        f"duplicate_of:{first['id']}",
    )
    assert await level(shop) == 3
    assert (await check(shop.db)).ok


@pytest.mark.parametrize("split", SPLITS)
async def test_another_integrations_hold_is_no_order_and_the_sweep_never_touches_it(
    shop: Shop, split: str
) -> None:
    """A point-of-sale system on the same Stripe account holds money with manual capture.
    The sweep, on, releases the shop's own stale needs_review order beside it, not that."""
    await seed_stock(shop.db, {SKU: 5})
    foreign = await pay(shop, metadata={"pos_ticket": "T-1"})
    mismatched = await pay(shop, cart_id=(cart_id := new_cart()), seed=False)
    await seed_cart(shop.db, cart_id, [(SKU, 2, UNIT_AMOUNT)])  # not what was paid
    created = event_of({**foreign, "status": "requires_payment_method"}, "payment_intent.created")
    held = event_of(foreign, "payment_intent.amount_capturable_updated")
    review = event_of(mismatched, "payment_intent.amount_capturable_updated")
    settings = shop.settings_with(needs_review_cancel_after_s=0.01)
    shop = Shop(shop.db, shop.emulator, shop.proxy, settings)

    await deliver(shop, split, [created, review], [held])
    await run_relay(settings)

    assert (
        await shop.db.fetchval(
            "SELECT count(*) FROM orders WHERE payment_intent_id = $1", foreign["id"]
        )
        == 0
    )
    outcome = await shop.db.fetchval(
        "SELECT outcome FROM processed_events WHERE event_id = $1", held["id"]
    )
    assert outcome == "not_an_order"
    assert (await retrieve_intent(shop.emulator.base_url, foreign["id"]))["status"] == (
        "requires_capture"
    )
    assert [r.path for r in shop.proxy.requests if foreign["id"] in r.path] == []
    # The sweep did run: the shop's own order for review had its money released.
    assert (await order_of(shop, mismatched["id"]))[:2] == ("needs_review", "needs_review")
    assert (await retrieve_intent(shop.emulator.base_url, mismatched["id"]))["status"] == "canceled"


# --- What the gauges read (consumer/owed.py) -------------------------------------------


async def test_a_refund_owed_and_a_capture_due_soon_are_counted_until_settled(
    db: asyncpg.Connection,
) -> None:
    """REFUND_UNFILLABLE=false: the refund is owed and counted until Stripe says it is made.
    A placed order whose authorization lapses within CAPTURE_WARNING_S is counted until
    it is captured; one that lapses later is not."""
    await seed_stock(db, {SKU: 1})
    for cart in ("cart-soon", "cart-later", "cart-short"):
        await seed_cart(db, cart, [(SKU, 1 if cart != "cart-short" else 2, UNIT_AMOUNT)])
    soon = events.intent_event("pi_soon", amount=UNIT_AMOUNT, cart_id="cart-soon")
    later = events.intent_event("pi_later", amount=UNIT_AMOUNT, cart_id="cart-later")
    taken = events.intent_event(
        "pi_short", amount=2 * UNIT_AMOUNT, cart_id="cart-short", status="succeeded"
    )
    now = int(time.time())
    deadlines = [
        deadline_charge("pi_soon", UNIT_AMOUNT, now + 3_600),
        deadline_charge("pi_later", UNIT_AMOUNT, now + 5 * 86_400),
    ]
    no_refunds = ShopPolicy(refund_unfillable=False)
    await apply(db, soon, later, taken, *deadlines, policy=no_refunds)
    assert await statuses(db) == {
        "pi_soon": "placed",
        "pi_later": "out_of_stock",  # the one unit went to pi_soon, paid first
        "pi_short": "out_of_stock",
    }
    # pi_later's money is held (a cancel, not owed); pi_short's was taken: owed.
    assert await owed.read(db, 86_400) == owed.Owed(refunds=1, captures_due_soon=1)
    assert (await check(db)).failed().keys() == {"captured_money_of_unfillable_order_returned"}

    refunded = events.refund_event("pi_short", amount=2 * UNIT_AMOUNT)
    captured = events.intent_event(
        "pi_soon", amount=UNIT_AMOUNT, cart_id="cart-soon", status="succeeded"
    )
    await apply(db, refunded, captured, policy=no_refunds)
    assert await owed.read(db, 86_400) == owed.Owed(refunds=0, captures_due_soon=0)
    assert (await check(db)).ok


def deadline_charge(pid: str, amount: int, capture_before: int) -> dict[str, Any]:
    """charge.succeeded of an uncaptured authorization, as Stripe shows its deadline."""
    evt = events.charge_event(pid, amount=amount)
    evt["data"]["object"].update(
        captured=False,
        amount_captured=0,
        payment_method_details={"type": "card", "card": {"capture_before": capture_before}},
    )
    return evt


async def statuses(db: asyncpg.Connection) -> dict[str, str]:
    rows = await db.fetch("SELECT payment_intent_id, status FROM orders")
    return {r["payment_intent_id"]: r["status"] for r in rows}


async def test_a_connected_accounts_payment_keeps_its_account_on_the_order_and_its_events(
    db: asyncpg.Connection,
) -> None:
    await seed_stock(db, {SKU: 5})
    await seed_cart(db, "cart-c", [(SKU, 1, UNIT_AMOUNT)])
    evt = events.intent_event("pi_c", amount=UNIT_AMOUNT, cart_id="cart-c")
    evt["account"] = "acct_1Connected"
    await apply(db, evt)
    assert await db.fetchval("SELECT account FROM orders WHERE payment_intent_id = 'pi_c'") == (
        "acct_1Connected"
    )
    payload = await db.fetchval(
        "SELECT payload FROM outbox WHERE kind = 'order_event' AND payment_intent_id = 'pi_c'"
    )
    assert json.loads(payload)["order"]["account"] == "acct_1Connected"


async def test_the_sweep_never_releases_an_order_without_a_cart_made_before_version_4(
    db: asyncpg.Connection,
) -> None:
    """Before version 4 every intent became an order: another system's hold became a
    needs_review order with reason no_cart_id. The sweep leaves those alone."""
    for pid in ("pi_legacy", "pi_ours"):
        evt = events.intent_event(pid, amount=UNIT_AMOUNT, cart_id=None)
        await apply(db, evt)  # its intent row, held; no order (version 4)
    await db.execute(
        """
        INSERT INTO orders (payment_intent_id, cart_id, status, allocation, status_reason,
                            amount, currency, created_at)
        VALUES ('pi_legacy', NULL, 'needs_review', 'needs_review', 'no_cart_id', $1, 'usd',
                now() - interval '2 days'),
               ('pi_ours', 'cart-gone', 'needs_review', 'needs_review', 'cart_missing', $1,
                'usd', now() - interval '2 days')
        """,
        UNIT_AMOUNT,
    )
    assert await sweep_needs_review(db, 3_600) == 1
    swept = await db.fetch("SELECT payment_intent_id FROM outbox WHERE kind = 'stripe_action'")
    assert [r["payment_intent_id"] for r in swept] == ["pi_ours"]

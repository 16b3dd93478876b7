"""Customers' money at Stripe's edges: what a review of issue 17 found, held now.

Each test states what Stripe does (with the page that says so) and what intentflow
does then: a refund that fails after it was made, a partial capture and a released
hold before API 2025-03-31.basil, a dispute for part of the money or one Stripe lets
the payment be refunded through, a destination charge, another system's hold swept
under schema version 3, an upgrade with orders that name no cart, and a Connect
account learned late. They reuse the fixtures of tests/integration/test_stripe_answers.py
(the recording fake Stripe) and tests/integration/stripe_support.py.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import pytest

from intentflow.consumer import owed
from intentflow.consumer.migrate import available, migrate
from intentflow.consumer.outbox import Action
from intentflow.consumer.tools.reconcile import check
from intentflow.devservices import Services
from intentflow.stripekit import events
from tests.fake_stripe import fake_stripe
from tests.fixtures import stripe as fixtures
from tests.integration.stripe_support import SKU, apply, outbox_command
from tests.integration.test_stripe_answers import (
    AMOUNT,
    Money,
    money,
    relay,
    row_of,
    unfillable,
)
from tests.support import seed_cart, seed_stock

__all__ = ["fake_stripe", "money"]


def refund_event(
    pid: str, refund_id: str, *, amount: int, status: str, event_type: str, created: int
) -> dict[str, Any]:
    """A `refund.*` / `charge.refund.updated` event carrying Stripe's Refund object."""
    refund = {
        "id": refund_id,
        "object": "refund",
        "amount": amount,
        "charge": f"ch_{pid}",
        "currency": "usd",
        "payment_intent": pid,
        "status": status,
    }
    return events.stamped(refund, event_type, created)


def charge_event(
    pid: str, *, amount_refunded: int, event_type: str, created: int
) -> dict[str, Any]:
    charge = events.charge_object(
        pid, amount=AMOUNT, amount_refunded=amount_refunded, refunded=amount_refunded >= AMOUNT
    )
    return events.stamped(charge, event_type, created)


async def status_of(db: asyncpg.Connection, pid: str) -> str:
    return str(await db.fetchval("SELECT status FROM orders WHERE payment_intent_id = $1", pid))


# --- 1. A refund that fails after it was made ------------------------------------------


@pytest.mark.parametrize("charge_events", [True, False], ids=["with-charge-events", "refunds-only"])
async def test_a_refund_that_fails_after_it_was_made_is_owed_until_a_person_asks_again(
    money: Money, charge_events: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stripe: a refund can fail after it was created (`pending`, even `succeeded`, to
    `failed`: a closed, lost or stolen card); Stripe sends `refund.failed` and
    `charge.refund.updated`, the money goes back to the shop's balance, and the shop
    must return it another way (https://docs.stripe.com/refunds#failed-refunds).

    The customer of an out_of_stock order has then paid and got nothing back. The order
    is no longer `refunded`; its refund row is `failed` as `owed` (`refund_failed`), and
    the gauge and `reconcile` report it. Nothing refunds the same card again by itself
    (it would mostly fail again, each failure asking for one more): `outbox retry` does,
    under a new key (Stripe would replay the first refund under the old one). A failure
    older than that retry reopens nothing when a later change (here the issuer's fraud
    warning) reaches the order before the new refund's events do.
    """
    order = await unfillable(money, "succeeded")
    pid = order.payment_intent_id
    await relay(money.settings)
    [made] = money.stripe.refunds_of(pid)
    assert (await row_of(money.db, pid, Action.REFUND))["state"] == "done"

    # The refund was made two hours ago, Stripe said pending an hour ago, failed since.
    await money.db.execute(
        "UPDATE outbox SET done_at = now() - interval '2 hours' WHERE id = $1",
        (await row_of(money.db, pid, Action.REFUND))["id"],
    )
    t0 = int(time.time()) - 3600
    back = [
        refund_event(
            pid,
            made["id"],
            amount=AMOUNT,
            status="pending",
            event_type="refund.created",
            created=t0,
        ),
    ]
    if charge_events:
        back.append(
            charge_event(pid, amount_refunded=AMOUNT, event_type="charge.refunded", created=t0)
        )
    await apply(money.db, *back)
    assert await status_of(money.db, pid) == "refunded"

    # Later the issuer returns the refund: Stripe marks it failed.
    failed_at = t0 + 1800
    made["status"] = "failed"
    failed = [
        refund_event(
            pid,
            made["id"],
            amount=AMOUNT,
            status="failed",
            event_type=event_type,
            created=failed_at,
        )
        for event_type in ("refund.failed", "charge.refund.updated")
    ]
    if charge_events:
        # The charge no longer counts the failed refund.
        failed.append(
            charge_event(pid, amount_refunded=0, event_type="charge.updated", created=failed_at)
        )
    await apply(money.db, *failed)

    # Nothing went back to the customer: the order is not refunded, and it is reported.
    assert await status_of(money.db, pid) == "out_of_stock"
    row = await row_of(money.db, pid, Action.REFUND)
    assert (row["state"], row["outcome"], row["error_code"]) == ("failed", "owed", "refund_failed")
    await relay(money.settings)
    assert money.stripe.refunds_of(pid) == [made], "the card was refunded again by itself"
    assert (await owed.read(money.db, 86_400)).refunds == 1
    report = await check(money.db)
    assert "captured_money_of_unfillable_order_returned" in report.failed()

    # A person asks again: a new refund, under a new key.
    code, _ = await outbox_command(money.settings, capsys, "retry", str(row["id"]))
    assert code == 0
    await relay(money.settings)
    again = [r for r in money.stripe.refunds_of(pid) if r["status"] != "failed"]
    assert [r["amount"] for r in again] == [AMOUNT]
    keys = [c.idempotency_key for c in money.stripe.calls("POST", "/v1/refunds")]
    assert len(keys) == 2 and keys[0] != keys[1]
    assert (await row_of(money.db, pid, Action.REFUND))["state"] == "done"

    # A change to the order before the new refund's events: the failure it still shows is
    # older than the retry, so the row stays done.
    warning = fixtures.early_fraud_warning(payment_intent=pid, charge=f"ch_{pid}")
    await apply(
        money.db,
        fixtures.event(
            warning, "radar.early_fraud_warning.created", id=f"evt_efw_{pid}", created=failed_at + 1
        ),
    )
    assert (
        await money.db.fetchval(
            "SELECT fraud_warning_id FROM orders WHERE payment_intent_id = $1", pid
        )
        == warning["id"]
    )
    assert (await row_of(money.db, pid, Action.REFUND))["state"] == "done"


async def test_a_refund_made_but_never_heard_of_again_is_reported_after_an_hour(
    money: Money,
) -> None:
    """The relay made the refund (row `done`): the money is on its way until Stripe's
    `charge.refunded` or `refund.*` says it went. If no such event comes (the endpoint
    has them disabled, or a failure was lost), the order is reported after an hour
    rather than trusted for ever."""
    order = await unfillable(money, "succeeded")
    pid = order.payment_intent_id
    await relay(money.settings)
    row = await row_of(money.db, pid, Action.REFUND)
    assert row["state"] == "done"
    assert (await owed.read(money.db, 86_400)).refunds == 0
    await money.db.execute(
        "UPDATE outbox SET done_at = now() - interval '61 minutes' WHERE id = $1", row["id"]
    )
    assert (await owed.read(money.db, 86_400)).refunds == 1
    assert "captured_money_of_unfillable_order_returned" in (await check(money.db)).failed()
    # Stripe's word arrives: nothing owed.
    await apply(
        money.db,
        charge_event(
            pid, amount_refunded=AMOUNT, event_type="charge.refunded", created=int(time.time())
        ),
    )
    assert (await owed.read(money.db, 86_400)).refunds == 0


# --- 2. An upgrade from schema 3 with other systems' holds --------------------------------


async def _database_at_version_3(infra: Services, name: str) -> asyncpg.Connection:
    admin = await asyncpg.connect(infra.database_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(infra.database_url.rpartition("/")[0] + f"/{name}")
    await conn.execute(
        "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for m in available()[:3]:
        await conn.execute(m.sql)
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at)"
            " VALUES ($1, $2, now() - interval '30 days')",
            m.version,
            m.name,
        )
    return conn


async def test_an_upgrade_from_version_3_with_two_orders_without_a_cart_reconciles(
    infra: Services,
) -> None:
    """Before version 4 every intent became an order: a subscription invoice and a Terminal
    sale on the account each became a `needs_review` order with no cart (`no_cart_id`).
    README: such orders are "another system's payment", left alone by the sweep, and
    `only_the_shops_payments_are_orders` exempts them. After the upgrade, on a healthy
    database, `reconcile` must pass; `one_live_order_per_cart` groups every cartless
    order under cart NULL and reports them as one cart paid twice, for ever.
    """
    name = "intentflow_review17_upgrade_v3"
    conn = await _database_at_version_3(infra, name)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL intentflow.applying = 'on'")
            await conn.execute(
                """
                INSERT INTO payment_intents (id, status, last_event_id) VALUES
                    ('pi_invoice', 'succeeded', 'evt_inv'),
                    ('pi_terminal', 'succeeded', 'evt_pos');
                INSERT INTO orders (payment_intent_id, cart_id, status, allocation,
                                    status_reason, amount, currency, source_event_id,
                                    amount_authorized, created_at)
                VALUES ('pi_invoice', NULL, 'needs_review', 'needs_review', 'no_cart_id',
                        900, 'usd', 'evt_inv', 900, now() - interval '40 days'),
                       ('pi_terminal', NULL, 'needs_review', 'needs_review', 'no_cart_id',
                        1200, 'usd', 'evt_pos', 1200, now() - interval '40 days');
                INSERT INTO processed_events (event_id, event_type, processed_at)
                VALUES ('evt_inv', 'payment_intent.succeeded', now() - interval '40 days'),
                       ('evt_pos', 'payment_intent.succeeded', now() - interval '40 days');
                """
            )
        await migrate(conn)
        report = await check(conn)
        assert report.ok, report.failed()
    finally:
        await conn.close()
        admin = await asyncpg.connect(infra.database_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


# --- 3. Connect: the account learned after the order ------------------------------------


async def test_an_account_learned_after_the_order_was_made_reconciles(
    db: asyncpg.Connection,
) -> None:
    """The intent's first events came without `account` (say, to the account endpoint
    before the Connect endpoint was added), a later one with it. The fold keeps the account
    on the intent, and the relay calls with it (claims.py reads coalesce(p.account,
    o.account)), but nothing copies it to the existing order: `reconcile`
    (order_mirrors_its_intent) fails on an otherwise healthy order for ever, and the
    order's events keep saying `account: null`.
    """
    await seed_stock(db, {SKU: 5})
    await seed_cart(db, "cart-c", [(SKU, 1, AMOUNT)])
    await apply(db, events.intent_event("pi_c", amount=AMOUNT, cart_id="cart-c"))
    # charge.updated of the held charge (a description set, say): nothing else changes.
    held = events.charge_object("pi_c", amount=AMOUNT, captured=False)
    later = events.stamped(held, "charge.updated", int(time.time()))
    later["account"] = "acct_1Connected"
    await apply(db, later)
    assert await db.fetchval("SELECT account FROM payment_intents WHERE id = 'pi_c'") == (
        "acct_1Connected"
    )
    report = await check(db)
    assert report.ok, report.failed()
    assert await db.fetchval("SELECT account FROM orders WHERE payment_intent_id = 'pi_c'") == (
        "acct_1Connected"
    )


# --- 4. A partial capture, as Stripe shows it before API version 2025-03-31.basil --------


@pytest.mark.parametrize("relay_between", [False, True], ids=["one-batch", "relay-between"])
async def test_a_partial_capture_of_an_unfillable_order_is_refunded(
    money: Money, relay_between: bool
) -> None:
    """Before 2025-03-31.basil a partial capture creates a Refund for the released rest,
    linked to the payment intent, listed by GET /v1/refunds?payment_intent=…, counted in
    the charge's `amount_refunded`, and announced by `charge.refunded` and
    `charge.refund.updated` (https://docs.stripe.com/changelog/basil/2025-03-31/
    remove-refund-from-partial-capture-and-payment-cancellation-flow). Webhook endpoints
    made before that date keep their API version; the project's events are 2024-06-20.

    The shop captures 1500 of a 3000 authorization of an out_of_stock order (its
    dashboard, before our cancel reaches Stripe). 1500 of the customer's money is taken
    for goods that will not ship. intentflow counts the released 1500 as "refunded" (the
    fold, and the relay's read of the refunds), finds captured (1500) <= refunded (1500),
    and asks for nothing, reports nothing: the 1500 is never returned.
    """
    held, taken = 2 * AMOUNT, AMOUNT
    pid = money.stripe.add_intent(amount=held, status="succeeded", captured=taken)
    reversal = money.stripe.add_refund(pid, held - taken)  # the released rest, pre-basil
    cart = f"cart-{pid}"
    await seed_cart(money.db, cart, [(SKU, 2, AMOUNT)])
    t0 = int(time.time())
    authorized = events.intent_event(pid, amount=held, cart_id=cart)
    authorized["created"] = t0
    succeeded = events.intent_event(pid, amount=held, cart_id=cart, status="succeeded")
    succeeded["created"] = t0 + 60
    succeeded["data"]["object"]["amount_received"] = taken
    charge = events.charge_object(pid, amount=held, amount_refunded=held - taken)
    charge["amount_captured"] = taken
    captured = events.stamped(charge, "charge.captured", t0 + 60)
    refunded = events.stamped(charge, "charge.refunded", t0 + 60)
    released = refund_event(
        pid,
        reversal["id"],
        amount=held - taken,
        status="succeeded",
        event_type="charge.refund.updated",
        created=t0 + 60,
    )
    if relay_between:
        await apply(money.db, authorized)
        await relay(money.settings)  # the cancel meets the captured intent: superseded
        await apply(money.db, succeeded, captured, refunded, released)
    else:
        await apply(money.db, authorized, succeeded, captured, refunded, released)
    await relay(money.settings)

    order = await money.db.fetchrow(
        "SELECT status, allocation, amount_captured, amount_refunded FROM orders"
        " WHERE payment_intent_id = $1",
        pid,
    )
    assert order is not None
    assert dict(order) == {
        "status": "out_of_stock",
        "allocation": "out_of_stock",
        "amount_captured": taken,
        "amount_refunded": 0,  # the released rest is no money sent back
    }
    # The relay reads the refunds, takes the released rest for what it is, and refunds
    # what was captured.
    [asked] = money.stripe.calls("POST", "/v1/refunds")
    assert asked.form["amount"] == str(taken), await _refund_row(money.db, pid)


async def _refund_row(db: asyncpg.Connection, pid: str) -> Any:
    row = await db.fetchrow(
        "SELECT state, outcome, last_error FROM outbox WHERE kind = 'stripe_action'"
        " AND name = 'refund_payment_intent' AND payment_intent_id = $1",
        pid,
    )
    return None if row is None else dict(row)


async def test_the_release_of_a_hold_is_not_a_refund(db: asyncpg.Connection) -> None:
    """Before 2025-03-31.basil, canceling a held payment (ours, the shop's, or Stripe's on
    expiry) also creates a Refund of the hold and sends `charge.refund.updated` (same
    changelog as above). README: "an uncaptured [charge], expired or canceled, reports the
    hold it released as refunded: that is not money sent back" -- the fold honours that for
    the charge's `amount_refunded` but counts the Refund object. A placed order whose
    release is delivered before `payment_intent.canceled` becomes `refunded` (an
    `order.refunded` event for money never taken), and once canceled every such order
    keeps `amount_refunded` = the hold with `amount_captured` 0.
    """
    await seed_stock(db, {SKU: 5})
    await seed_cart(db, "cart-r", [(SKU, 1, AMOUNT)])
    t0 = int(time.time())
    await apply(db, events.intent_event("pi_r", amount=AMOUNT, cart_id="cart-r"))
    released = refund_event(
        "pi_r",
        "re_release",
        amount=AMOUNT,
        status="succeeded",
        event_type="charge.refund.updated",
        created=t0 + 60,
    )
    await apply(db, released)
    order = await db.fetchrow(
        "SELECT status, amount_refunded, amount_captured FROM orders"
        " WHERE payment_intent_id = 'pi_r'"
    )
    assert order is not None
    assert dict(order) == {"status": "placed", "amount_refunded": 0, "amount_captured": 0}


# --- 5. A refund refused while a dispute was open, then the dispute won -----------------


async def test_a_refund_refused_for_a_dispute_is_asked_again_once_the_dispute_is_won(
    money: Money,
) -> None:
    """README's money table: an unfillable order whose captured money a dispute holds gets
    "nothing while the dispute is open or lost ...; asked once it is won". When the dispute
    reaches us after the refund row was written (the usual order: the refund is asked at
    once, the dispute comes days later), Stripe refuses the refund (`charge_disputed`,
    https://docs.stripe.com/api/errors#error_object-code) and the row is `failed`; the
    dispute's later `won` makes the consumer ask again, which ON CONFLICT DO NOTHING drops.
    The money stays with the merchant until an operator reads `outbox --failed`.
    """
    pid = (await unfillable(money, "succeeded")).payment_intent_id
    money.stripe.fail_next(400, path_contains="/v1/refunds", code="charge_disputed")
    await relay(money.settings)
    assert (await row_of(money.db, pid, Action.REFUND))["state"] == "failed"

    t0 = int(time.time())
    await apply(
        money.db,
        events.dispute_event(
            pid, amount=AMOUNT, status="needs_response", reason="product_not_received", created=t0
        ),
    )
    await apply(
        money.db,
        events.dispute_event(
            pid,
            amount=AMOUNT,
            status="won",
            reason="product_not_received",
            created=t0 + 86_400,
            event_type="charge.dispute.closed",
        ),
    )
    await relay(money.settings)
    assert [r["amount"] for r in money.stripe.refunds_of(pid)] == [AMOUNT]


# --- 6. A dispute for part of the money hides the rest ---------------------------------


async def test_a_dispute_for_part_of_the_money_does_not_hide_the_rest_owed(
    db: asyncpg.Connection,
) -> None:
    """A dispute's `amount` is "usually the amount of the charge, but it can differ
    (usually because of currency fluctuation or because only part of the order is
    disputed)" (Stripe's Dispute object, `amount`). The owed-refund gauge and
    `captured_money_of_unfillable_order_returned` drop an unfillable order as soon as any
    dispute holds it, whatever its amount: under REFUND_UNFILLABLE=false an out_of_stock
    order owed 3000 disappears from both when a 1000 dispute opens (or is lost), while
    2000 of the customer's money stays with the merchant and nobody is told.
    """
    from intentflow.consumer.policy import ShopPolicy

    await seed_stock(db, {SKU: 0})
    await seed_cart(db, "cart-d", [(SKU, 2, AMOUNT)])
    taken = events.intent_event("pi_d", amount=2 * AMOUNT, cart_id="cart-d", status="succeeded")
    no_refunds = ShopPolicy(refund_unfillable=False)
    await apply(db, taken, policy=no_refunds)
    assert (await owed.read(db, 86_400)).refunds == 1

    # While the dispute is open (and Stripe says the payment cannot be refunded), the
    # order shows `disputed` and its refund waits: Stripe would refuse it.
    t0 = int(time.time())
    opened = events.dispute_event(
        "pi_d", amount=AMOUNT // 3, status="needs_response", reason="product_not_received",
        created=t0,
    )  # fmt: skip
    await apply(db, opened, policy=no_refunds)
    assert await status_of(db, "pi_d") == "disputed"
    assert (await owed.read(db, 86_400)).refunds == 0
    # Lost: the dispute took its part back; the rest is still owed, and said so.
    lost = events.dispute_event(
        "pi_d", amount=AMOUNT // 3, status="lost", reason="product_not_received",
        created=t0 + 60, event_type="charge.dispute.closed",
    )  # fmt: skip
    await apply(db, lost, policy=no_refunds)
    assert (await owed.read(db, 86_400)).refunds == 1
    assert "captured_money_of_unfillable_order_returned" in (await check(db)).failed()


# --- 7. Connect destination charges: the refund leaves the transfer in place ------------


async def test_the_refund_of_a_destination_charge_reverses_its_transfer(money: Money) -> None:
    """A destination charge (`transfer_data[destination]`) lives on the platform and moves
    its funds to the connected account. Refunding it debits the platform's balance unless
    the refund sets `reverse_transfer=true`, which pulls the transfer back proportionally
    (https://docs.stripe.com/api/refunds/create#create_refund-reverse_transfer,
    https://docs.stripe.com/connect/destination-charges#issue-refunds). For an order the
    marketplace cannot fill, the seller keeps money for goods it never shipped and the
    platform pays the customer back from its own funds. The relay reads the intent (with
    its `transfer_data`) before every refund, and sends no `reverse_transfer`.
    """
    pid = (await unfillable(money, "succeeded")).payment_intent_id
    money.stripe.intent(pid)["transfer_data"] = {"amount": None, "destination": "acct_1Seller"}
    await relay(money.settings)
    [post] = money.stripe.calls("POST", "/v1/refunds")
    assert post.form.get("reverse_transfer") == "true", post.form


async def test_a_refundable_dispute_does_not_keep_the_refund_back(db: asyncpg.Connection) -> None:
    """README: "nothing while the dispute is open or lost (Stripe refuses to refund a
    disputed charge)". Stripe's Dispute has `is_charge_refundable`: "If true, it's still
    possible to refund the disputed payment. After the payment has been fully refunded, no
    further funds are withdrawn from your Stripe account as a result of this dispute"
    (https://docs.stripe.com/api/disputes/object#dispute_object-is_charge_refundable).
    intentflow never answers disputes, so one it does not refund is lost by default: the
    customer's money comes back as a chargeback, with the dispute fee and a mark on the
    merchant's dispute rate, instead of as the refund it is owed.
    """
    await seed_stock(db, {SKU: 0})
    await seed_cart(db, "cart-q", [(SKU, 1, AMOUNT)])
    t0 = int(time.time())
    taken = events.intent_event("pi_q", amount=AMOUNT, cart_id="cart-q", status="succeeded")
    inquiry = events.dispute_event(
        "pi_q",
        amount=AMOUNT,
        status="warning_needs_response",
        reason="product_not_received",
        created=t0,
    )
    inquiry["data"]["object"]["is_charge_refundable"] = True
    await apply(db, inquiry, taken)
    asked = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE kind = 'stripe_action' AND payment_intent_id = 'pi_q'"
        " AND name = $1",
        str(Action.REFUND),
    )
    assert asked == 1


# --- 8. Another system's hold, swept under version 3, released after the upgrade -------


@pytest.mark.parametrize("left", ["pending", "failed"])
async def test_a_cancel_of_another_systems_hold_asked_under_version_3_is_never_performed(
    infra: Services, money: Money, left: str
) -> None:
    """Issue 17, item 3: under version 3 the needs_review sweep asked to cancel other
    systems' holds (orders with no cart, `no_cart_id`). Version 4's promise: an intent
    that names no cart is "never acted on at Stripe"; README: "nothing, ever". But the
    cancel rows the old sweep wrote survive the upgrade, and nothing checks the order's
    cart before acting: a row still pending at the upgrade (the relay was down, or
    backing off) is performed by the first new relay, and one the old relay recorded
    `rejected` after a 5xx (item 4) is performed by the `outbox retry` the runbook
    suggests. Either way another integration's authorization is canceled.
    """
    pos = money.stripe.add_intent(amount=AMOUNT, status="requires_capture")
    money.stripe.intent(pos)["metadata"] = {"pos_ticket": "T-1"}
    name = "intentflow_review17_swept_v3"
    conn = await _database_at_version_3(infra, name)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL intentflow.applying = 'on'")
            await conn.execute(
                "INSERT INTO payment_intents (id, status, last_event_id)"
                " VALUES ($1, 'requires_capture', 'evt_pos')",
                pos,
            )
            order_id = await conn.fetchval(
                """
                INSERT INTO orders (payment_intent_id, cart_id, status, allocation,
                                    status_reason, amount, currency, source_event_id,
                                    amount_authorized, created_at)
                VALUES ($1, NULL, 'needs_review', 'needs_review', 'no_cart_id', $2, 'usd',
                        'evt_pos', $2, now() - interval '3 days')
                RETURNING id
                """,
                pos,
                AMOUNT,
            )
            failed = left == "failed"
            await conn.execute(
                """
                INSERT INTO outbox (kind, name, payment_intent_id, order_id, payload,
                                    idempotency_key, state, outcome, attempts, error_code,
                                    last_error, done_at, created_at)
                VALUES ('stripe_action', 'cancel_payment_intent', $1, $2,
                        '{"cancellation_reason": "abandoned"}',
                        'intentflow:cancel_payment_intent:' || $1,
                        $3, $4, $5, $6, $7, $8, now() - interval '2 days')
                """,
                pos,
                order_id,
                left,
                "rejected" if failed else None,
                1 if failed else 0,
                "api_error" if failed else None,
                "An unknown error occurred" if failed else None,
                None if not failed else await conn.fetchval("SELECT now()"),
            )
        await migrate(conn)
        if failed:  # the operator, after the upgrade that fixed 5xx: retry what failed
            await conn.execute(
                "UPDATE outbox SET state = 'pending', outcome = NULL, done_at = NULL,"
                " due_at = now(), verify_first = true WHERE state = 'failed'"
            )
        url = infra.database_url.rpartition("/")[0] + f"/{name}"
        await relay(money.settings_with(database_url=url))
        assert money.stripe.intent(pos)["status"] == "requires_capture"
        assert money.stripe.calls("POST", f"/v1/payment_intents/{pos}/cancel") == []
    finally:
        await conn.close()
        admin = await asyncpg.connect(infra.database_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

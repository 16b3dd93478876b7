"""Stripe as shops use it (issue 18), end to end: each story signed through a running bridge
to a running consumer, in the order Stripe sends it and in reverse.

The harness's stack (loadtest/stack.py) runs `stripe-bridge` (STRIPE_LIVEMODE=false, as
the harness sets it: these are test-mode events) and one `order-consumer run` as OS
processes on the session's broker and PostgreSQL, started once for all the stories.
Each story of tests/stripe_stories.py is told twice under ids of its own: once in the
order Stripe sends its events, once reversed, each event a signed POST answered before
the next is sent, so that the topic holds them in that order; the tellings go at once.
Once the consumer has applied every published event, the two tellings of a story must
end in the same order row, the one the story expects (`EXPECTED`; a story that makes no
order, none); a session that names no intent is answered and recorded, a
subscription's answered and never published, every other event means something to the
consumer, and `order-consumer reconcile` holds. Between them the stories send every
event type a Checkout shop and a PaymentIntent shop receive in them (`STRIPE_SENDS`).
"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

import asyncpg
import httpx
import pytest

from intentflow.devservices import Services
from intentflow.loadtest import delivery, readback
from intentflow.loadtest.stack import Stack, StackOptions
from intentflow.producer.app import WEBHOOK_PATH
from intentflow.stripekit.events import encode
from intentflow.stripekit.signing import stripe_signature
from tests import stripe_stories as stories
from tests.stripe_stories import (
    ADAPTIVE_TOTAL,
    CART_LINES,
    DISCOUNT,
    PARTLY,
    SHIPPING,
    SKU,
    SUBTOTAL,
    TAX,
    TOTAL,
    Story,
    cart_of,
    order_of,
)
from tests.support import seed_cart, seed_stock

pytestmark = pytest.mark.timeout(120)

STOCK = 1_000

# A PaymentIntent shop's card payment of the cart, captured: every field an order shows.
PAID: dict[str, Any] = {
    "status": "placed",
    "allocation": "placed",
    "status_reason": None,
    "amount": SUBTOTAL,
    "currency": "usd",
    "amount_subtotal": SUBTOTAL,
    "amount_shipping": 0,
    "amount_discount": 0,
    "amount_tax": 0,
    "amount_authorized": SUBTOTAL,
    "amount_refunded": 0,
    "amount_captured": SUBTOTAL,
    "review_open": None,
    "fraud_warning_type": None,
    "dispute_status": None,
}
# The same through Checkout: the buyer was asked for the total, the cart is the subtotal.
THROUGH_CHECKOUT = PAID | {
    "amount": TOTAL,
    "amount_shipping": SHIPPING,
    "amount_discount": DISCOUNT,
    "amount_tax": TAX,
    "amount_authorized": TOTAL,
    "amount_captured": TOTAL,
}
HELD = {"amount_captured": 0}  # a manual capture the shop has not captured yet


class Expected(NamedTuple):
    story: Story
    order: dict[str, Any] | None  # None: the story makes no order


EXPECTED: dict[str, Expected] = {
    "card through Checkout": Expected(stories.card_through_checkout, THROUGH_CHECKOUT),
    "cart copied onto the intent": Expected(
        stories.cart_copied_onto_the_intent, THROUGH_CHECKOUT | HELD
    ),
    "delayed method, paid": Expected(stories.delayed_payment("succeeded"), THROUGH_CHECKOUT),
    "delayed method, failed": Expected(stories.delayed_payment("failed"), None),
    "Adaptive Pricing": Expected(
        stories.adaptive_pricing,
        PAID
        | {
            "amount": ADAPTIVE_TOTAL,
            "currency": "eur",
            "amount_authorized": ADAPTIVE_TOTAL,
            "amount_captured": ADAPTIVE_TOTAL,
        },
    ),
    "incremented authorization": Expected(stories.incremented_authorization, PAID | HELD),
    "partial capture": Expected(
        stories.partial_capture("2025-03-31.basil"), PAID | {"amount_captured": PARTLY}
    ),
    "partial capture before basil": Expected(
        stories.partial_capture("2024-06-20"), PAID | {"amount_captured": PARTLY}
    ),
    "refund that fails": Expected(stories.refund_that_fails(charge_says=True), PAID),
    "dispute appealed": Expected(
        stories.appealed_dispute,
        PAID | {"status": "disputed", "dispute_status": "appeal_under_review"},
    ),
    "Radar review": Expected(stories.radar_review, PAID | HELD | {"review_open": False}),
    "early fraud warning": Expected(
        stories.early_fraud_warning, PAID | {"fraud_warning_type": "made_with_stolen_card"}
    ),
    "session expired unpaid": Expected(stories.session_expired_unpaid, None),
    "subscription session": Expected(stories.subscription_session, None),
}

# Every event type the stories send: a story left out, or cut short, shows here.
STRIPE_SENDS = frozenset(
    {
        "payment_intent.created",
        "payment_intent.processing",
        "payment_intent.payment_failed",
        "payment_intent.amount_capturable_updated",
        "payment_intent.succeeded",
        "charge.succeeded",
        "charge.captured",
        "charge.updated",
        "charge.refunded",
        "charge.refund.updated",
        "refund.created",
        "refund.updated",
        "refund.failed",
        "charge.dispute.created",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.closed",
        "charge.dispute.updated",
        "review.opened",
        "review.closed",
        "radar.early_fraud_warning.created",
        "radar.early_fraud_warning.updated",
        "checkout.session.completed",
        "checkout.session.async_payment_succeeded",
        "checkout.session.async_payment_failed",
        "checkout.session.expired",
    }
)


class Answer(NamedTuple):
    event_id: str
    event_type: str
    status: int
    outcome: str


def pid_of(name: str, how: str) -> str:
    """The intent of one telling of a story: `pi_<story's number><s|r>`."""
    return f"pi_{list(EXPECTED).index(name)}{how[0]}"


async def tell(client: httpx.AsyncClient, secret: str, told: list[dict[str, Any]]) -> list[Answer]:
    """Each event as Stripe delivers it, signed; the next once the bridge has answered."""
    answers = []
    for evt in told:
        body = encode(evt)
        response = await client.post(
            WEBHOOK_PATH,
            content=body,
            headers={
                "stripe-signature": stripe_signature(body, secret),
                "content-type": "application/json",
            },
        )
        outcome = response.json().get("outcome", "") if response.content else ""
        answers.append(Answer(evt["id"], evt["type"], response.status_code, outcome))
    return answers


Key = tuple[str, str]  # (story, "sent" or "reversed")


async def tell_all(
    stack: Stack, tellings: dict[Key, list[dict[str, Any]]]
) -> dict[Key, list[Answer]]:
    """Every telling at once through the stack's bridge, each in its own order."""
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{stack.bridge_port}", timeout=10
    ) as client:
        answered = await asyncio.gather(
            *(
                tell(client, stack.options.secret, told if how == "sent" else told[::-1])
                for (_, how), told in tellings.items()
            )
        )
    return dict(zip(tellings, answered, strict=True))


async def never_applied(
    db: asyncpg.Connection, published: set[str], answers: dict[Key, list[Answer]]
) -> list[Answer]:
    """The published events the consumer has not applied (dead-lettered, or still behind)."""
    applied = {
        r["event_id"]
        for r in await db.fetch(
            "SELECT event_id FROM processed_events WHERE event_id = ANY($1::text[])",
            list(published),
        )
    }
    return [a for told in answers.values() for a in told if a.event_id in published - applied]


async def test_every_story_ends_the_same_through_the_bridge_in_either_order(
    infra: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", infra.kafka_bootstrap_servers)
    monkeypatch.setenv("KAFKA_ENABLE_IDEMPOTENCE", str(infra.kafka_enable_idempotence).lower())
    monkeypatch.setenv("DATABASE_URL", infra.database_url)
    tellings = {
        (name, how): expected.story(pid_of(name, how))
        for name, expected in EXPECTED.items()
        for how in ("sent", "reversed")
    }
    assert {e["type"] for told in tellings.values() for e in told} == STRIPE_SENDS
    async with Stack(StackOptions(consumers=1, keep_logs=False)) as stack:
        db = await asyncpg.connect(stack.database_url)
        try:
            await seed_stock(db, {SKU: STOCK})
            for key in tellings:
                await seed_cart(db, cart_of(pid_of(*key)), CART_LINES)
            answers = await tell_all(stack, tellings)
            published = delivery.Tally()
            for answer in (a for told in answers.values() for a in told):
                assert answer.status == 200, answer
                if answer.outcome.startswith("published"):
                    published.ack(answer.event_id)
            caught_up = await readback.wait_caught_up(stack, published, idle_s=10, timeout_s=60)
            assert caught_up, await never_applied(db, published.acked_ids, answers)

            ends = {key: await order_of(db, pid_of(*key)) for key in tellings}
            for name, expected in EXPECTED.items():
                assert ends[name, "sent"] == ends[name, "reversed"], name
                assert ends[name, "sent"] == expected.order, name

            # A session about no intent is answered 2xx and recorded; a subscription's is
            # answered and never published; every other event means something.
            def ids(name: str) -> set[str]:
                return {a.event_id for how in ("sent", "reversed") for a in answers[name, how]}

            assert {a.outcome for a in answers["session expired unpaid", "sent"]} == {
                "published_without_intent"
            }
            assert {a.outcome for a in answers["subscription session", "sent"]} == {"ignored"}
            inbox: dict[str, str] = {
                r["event_id"]: r["outcome"]
                for r in await db.fetch("SELECT event_id, outcome FROM processed_events")
            }
            assert {e for e, outcome in inbox.items() if outcome == "ignored"} == ids(
                "session expired unpaid"
            )
            assert not ids("subscription session") & set(inbox)

            # Stock went to the placed orders only, two units each: none to a failed debit.
            placed = [o for o in ends.values() if o is not None and o["allocation"] == "placed"]
            left = await db.fetchval("SELECT stocked_quantity FROM inventory_levels")
            assert left == STOCK - 2 * len(placed)
        finally:
            await db.close()
        reconciled, summary = await readback.reconcile(stack)
        assert reconciled, summary

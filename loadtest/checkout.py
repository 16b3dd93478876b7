"""Purchases through Stripe Checkout in the harness's histories: their terms and sessions.

A shop on Checkout (or Payment Links, which make Checkout Sessions) keeps its cart
on the session, in `client_reference_id` or in `metadata`, and copies it onto the
PaymentIntent only if it asks to (`payment_intent_data.metadata`). The session
charges the cart's items (`amount_subtotal`) plus shipping and tax, less a
discount (`total_details`); the intent asks for that total. A card completes the
session `paid` when captured at once, `unpaid` when only held (manual capture); a
delayed payment method (a bank debit) completes it `unpaid` and settles days later
with `checkout.session.async_payment_succeeded` or `..._failed`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from intentflow.stripekit import events

# Of the purchases that may go through Checkout, the share that does; of those paid
# through it, the share paid by a delayed method.
CHECKOUT_SHARE = 0.3
DELAYED_SHARE = 0.25
CART_KEY = "cart_id"  # CART_METADATA_KEY's default: where the shop names its cart


@dataclass(frozen=True)
class Checkout:
    """What one purchase through Checkout asks for, and where its cart rides."""

    subtotal: int  # the items: the cart's total, unless the shop got it wrong
    shipping: int
    discount: int
    tax: int
    by_reference: bool  # the cart in client_reference_id (else in the session's metadata)
    on_intent: bool  # copied onto the intent too (payment_intent_data.metadata)
    delayed: bool  # a delayed payment method: paid (or not) days after the session

    @property
    def total(self) -> int:
        """What the buyer is asked to pay, and so the intent's amount."""
        return self.subtotal + self.shipping + self.tax - self.discount

    def session(
        self,
        intent_id: str,
        cart_id: str,
        payment_status: str,
        event_type: str,
        *,
        event_id: str,
        created: int,
        at: int,
    ) -> dict[str, Any]:
        """The `checkout.session.*` event Stripe sends at `at` about this purchase's session
        (made at `created`)."""
        obj = events.checkout_session(
            f"cs_{intent_id.removeprefix('pi_')}",
            intent_id=intent_id,
            amount_subtotal=self.subtotal,
            amount_total=self.total,
            shipping=self.shipping,
            discount=self.discount,
            tax=self.tax,
            payment_status=payment_status,
            client_reference_id=cart_id if self.by_reference else None,
            metadata=None if self.by_reference else {CART_KEY: cart_id},
            payment_method_types=("us_bank_account",) if self.delayed else ("card",),
            created=created,
        )
        evt = events.event(obj, event_type, event_id=event_id)
        evt["created"] = at
        return evt


def draw(rng: random.Random, subtotal: int, *, paid: bool, delayed: bool) -> Checkout:
    """A purchase through Checkout of items worth `subtotal`: shipping, tax and a discount
    as a shop sets them. `paid`: its money arrives, so a delayed method may pay it;
    `delayed`: it is paid by a delayed method whatever the draw."""
    return Checkout(
        subtotal,
        shipping=rng.choice((0, 0, 490, 990)),
        discount=rng.choice((0, 0, subtotal // 10)),
        tax=rng.choice((0, subtotal * 8 // 100)),
        by_reference=rng.random() < 0.5,
        on_intent=rng.random() < 1 / 3,
        delayed=delayed or (paid and rng.random() < DELAYED_SHARE),
    )

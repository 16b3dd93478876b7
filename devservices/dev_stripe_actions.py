"""What `dev-stripe` plays of Stripe: one payment intent's state and the actions on it.

Pure code, no I/O. `ACTIONS` is the table: one record per Stripe action (the
intent's statuses that allow it, what the intent becomes, the events Stripe
sends for it, and when the order shows it); a new action is one entry, and a
name not in it is a KeyError, never a default. The events are stripekit's
shapes (intentflow.stripekit.events), kept one history:

- one intent id, created once (`created`), with the same customer, payment
  method and client secret in every snapshot (stripekit draws new ones per call);
- one charge, `ch_<intent>` (the id stripekit's charge and dispute objects
  name), which the intent's `latest_charge` names from its authorization on;
  its `captured`, `amount_captured` and `amount_refunded` follow the intent;
- `amount_capturable` while held, `amount_received` once captured; a refund
  or a dispute is told by the charge and the dispute, as Stripe tells them;
- the cart's currency on the intent, the charge and the dispute alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from intentflow.stripekit import events

# Not yet confirmed: the status `authorize` starts from (the intent exists, unsent).
UNCONFIRMED = "requires_confirmation"


class CannotPlay(RuntimeError):
    """What the developer must fix before this can work, in one line."""


@dataclass(frozen=True)
class Intent:
    """Stripe's side of one PaymentIntent with manual capture, and its one charge."""

    id: str
    cart_id: str | None
    amount: int
    currency: str
    created: int
    status: str
    amount_refunded: int = 0
    dispute: str | None = None  # the status of its one dispute
    canceled_at: int | None = None

    @classmethod
    def for_cart(cls, cart_id: str, amount: int, currency: str, created: int) -> Intent:
        """Created with the test card attached, `metadata[cart_id]` naming the cart."""
        return cls(events.new_id("pi"), cart_id, amount, currency, created, UNCONFIRMED)

    @property
    def charge_id(self) -> str:
        return str(events.charge_object(self.id, amount=self.amount)["id"])

    @property
    def captured(self) -> bool:
        return self.status == "succeeded"

    def snapshot(self) -> dict[str, Any]:
        """The PaymentIntent object, as this state's events carry it."""
        obj = events.payment_intent(
            self.id, amount=self.amount, currency=self.currency, status=self.status,
            cart_id=self.cart_id, created=self.created,
        )  # fmt: skip
        # stripekit draws these per snapshot; one intent keeps them all its life.
        stem = hashlib.sha256(self.id.encode()).hexdigest()
        obj.update(
            customer=f"cus_{stem[:14]}",
            payment_method=f"pm_{stem[14:38]}",
            client_secret=f"{self.id}_secret_{stem[38:54]}",
            latest_charge=None if self.status == UNCONFIRMED else self.charge_id,
        )
        if self.status == "canceled":
            obj.update(cancellation_reason="requested_by_customer", canceled_at=self.canceled_at)
        return obj

    def charge(self) -> dict[str, Any]:
        """Its one charge, made at the authorization."""
        charge = events.charge_object(
            self.id, amount=self.amount, amount_refunded=self.amount_refunded,
            refunded=self.amount_refunded >= self.amount, captured=self.captured,
        )  # fmt: skip
        return {**charge, "currency": self.currency, "created": self.created}


def _sent(obj: dict[str, Any], event_type: str, at: int) -> dict[str, Any]:
    """An event of `event_type` carrying `obj` as it is (its own `created`), sent at `at`."""
    evt = events.event(obj, event_type)
    evt["created"] = at
    return evt


def _authorized(before: Intent, after: Intent, at: int) -> list[dict[str, Any]]:
    return [
        _sent(before.snapshot(), "payment_intent.created", at),
        _sent(after.snapshot(), "payment_intent.amount_capturable_updated", at),
    ]


def _captured(before: Intent, after: Intent, at: int) -> list[dict[str, Any]]:
    return [
        _sent(after.charge(), "charge.captured", at),
        _sent(after.snapshot(), "payment_intent.succeeded", at),
    ]


def _canceled(before: Intent, after: Intent, at: int) -> list[dict[str, Any]]:
    return [_sent(after.snapshot(), "payment_intent.canceled", at)]


def _refunded(before: Intent, after: Intent, at: int) -> list[dict[str, Any]]:
    return [_sent(after.charge(), "charge.refunded", at)]


def _disputed(before: Intent, after: Intent, at: int) -> list[dict[str, Any]]:
    assert after.dispute is not None
    evt = events.dispute_event(
        after.id, amount=after.amount, status=after.dispute, reason="fraudulent", created=at
    )
    evt["data"]["object"]["currency"] = after.currency
    return [evt]


@dataclass(frozen=True)
class Order:
    """What the consumer made of the intent: its order row and its cart's stock."""

    status: str
    amount: int
    currency: str
    amount_captured: int
    amount_refunded: int
    dispute_status: str | None
    stock: tuple[tuple[str, int], ...]  # (SKU, level) of each SKU of its cart

    def line(self) -> str:
        stock = "".join(f", stock of {sku} {level}" for sku, level in self.stock)
        return (
            f"order {self.status}, amount {self.amount} {self.currency}, "
            f"captured {self.amount_captured}, refunded {self.amount_refunded}, "
            f"dispute {self.dispute_status or 'none'}{stock}"
        )


def _never(intent: Intent) -> str | None:
    return None


@dataclass(frozen=True)
class Action:
    """One Stripe action on an intent: what allows it (its statuses, then `refusal`, why
    not for another reason), what the intent becomes at a time, the events Stripe sends
    for it (given the intent before and after, and when), and when the order shows it."""

    allowed: frozenset[str]
    becomes: Callable[[Intent, int], Intent]
    sends: Callable[[Intent, Intent, int], list[dict[str, Any]]]
    shows: Callable[[Order, Intent], bool]
    about: str  # its help line
    refusal: Callable[[Intent], str | None] = _never
    on_cart: bool = False  # given a cart, for which it makes the intent; else an intent


def _refund_refusal(intent: Intent) -> str | None:
    if intent.amount_refunded:
        return "it is refunded already"
    return "its charge is disputed" if intent.dispute else None


ACTIONS: dict[str, Action] = {
    "authorize": Action(
        frozenset({UNCONFIRMED}),
        lambda intent, at: replace(intent, status="requires_capture"),
        _authorized,
        lambda order, intent: True,
        "create an intent for the cart's total and authorize it (manual capture)",
        on_cart=True,
    ),
    "capture": Action(
        frozenset({"requires_capture"}),
        lambda intent, at: replace(intent, status="succeeded"),
        _captured,
        lambda order, intent: order.amount_captured >= intent.amount,
        "capture what the intent holds",
    ),
    "cancel": Action(
        frozenset({"requires_capture"}),
        lambda intent, at: replace(intent, status="canceled", canceled_at=at),
        _canceled,
        lambda order, intent: order.status == "canceled",
        "cancel the intent, releasing what it holds",
    ),
    "refund": Action(
        frozenset({"succeeded"}),
        lambda intent, at: replace(intent, amount_refunded=intent.amount),
        _refunded,
        lambda order, intent: order.amount_refunded >= intent.amount_refunded,
        "refund the captured charge in full",
        _refund_refusal,
    ),
    "dispute": Action(
        frozenset({"succeeded"}),
        lambda intent, at: replace(intent, dispute="needs_response"),
        _disputed,
        lambda order, intent: order.dispute_status == intent.dispute,
        "open a chargeback on the captured charge (needs_response)",
        lambda intent: "it is disputed already" if intent.dispute else None,
    ),
}
# `walk`: after `authorize` (and a placed order), these in turn.
WALKS = {False: ("capture", "refund"), True: ("cancel",)}


def after(name: str, intent: Intent, at: int) -> Intent:
    """The intent once `name` is done at `at`; CannotPlay if its state does not allow it."""
    action = ACTIONS[name]
    why = action.refusal(intent)
    if intent.status not in action.allowed:
        why = f"it is {intent.status}, and {name} needs " + " or ".join(sorted(action.allowed))
    if why is not None:
        raise CannotPlay(f"cannot {name} {intent.id}: {why}")
    return action.becomes(intent, at)

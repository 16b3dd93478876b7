"""Realistic Stripe event payloads for tests, the demo and benchmarks.

Shaped like what Stripe sends: whole PaymentIntent, Charge and Checkout Session
objects with the many fields intentflow never reads, so decoding is measured on
the real size and shape. Every field sent is a field of Stripe's object with Stripe's type
(tests/unit/test_stripekit_shapes.py checks them against Stripe's own examples
and stripe-python's types).
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from typing import Any

_counter = itertools.count()

# Each status's usual event type.
EVENT_TYPE_OF_STATUS = {
    "requires_capture": "payment_intent.amount_capturable_updated",
    "succeeded": "payment_intent.succeeded",
    "canceled": "payment_intent.canceled",
    "requires_payment_method": "payment_intent.payment_failed",
    "processing": "payment_intent.processing",
    "requires_action": "payment_intent.requires_action",
}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(6)}{next(_counter):06d}"


def payment_intent(
    intent_id: str,
    *,
    amount: int,
    currency: str = "usd",
    status: str = "requires_capture",
    cart_id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    created = created or int(time.time())
    capturable = amount if status == "requires_capture" else 0
    received = amount if status == "succeeded" else 0
    return {
        "id": intent_id,
        "object": "payment_intent",
        "amount": amount,
        "amount_capturable": capturable,
        "amount_details": {"tip": {}},
        "amount_received": received,
        "application": None,
        "application_fee_amount": None,
        "automatic_payment_methods": None,
        "canceled_at": None,
        "cancellation_reason": None,
        "capture_method": "manual",
        "client_secret": f"{intent_id}_secret_{secrets.token_hex(8)}",
        "confirmation_method": "automatic",
        "created": created,
        "currency": currency,
        "customer": "cus_" + secrets.token_hex(7),
        "description": "Order from the storefront",
        "last_payment_error": None,
        "latest_charge": "ch_" + secrets.token_hex(12),
        "livemode": False,
        "metadata": {"cart_id": cart_id} if cart_id else {},
        "next_action": None,
        "on_behalf_of": None,
        "payment_method": "pm_" + secrets.token_hex(12),
        "payment_method_configuration_details": None,
        "payment_method_options": {
            "card": {
                "installments": None,
                "mandate_options": None,
                "network": None,
                "request_three_d_secure": "automatic",
            }
        },
        "payment_method_types": ["card"],
        "processing": None,
        "receipt_email": "buyer@example.com",
        "review": None,
        "setup_future_usage": None,
        "shipping": {
            "address": {
                "city": "Berlin",
                "country": "DE",
                "line1": "Torstrasse 1",
                "line2": None,
                "postal_code": "10119",
                "state": None,
            },
            "carrier": None,
            "name": "Ada Lovelace",
            "phone": None,
            "tracking_number": None,
        },
        "source": None,
        "statement_descriptor": None,
        "statement_descriptor_suffix": None,
        "status": status,
        "transfer_data": None,
        "transfer_group": None,
    }


def event(obj: dict[str, Any], event_type: str, *, event_id: str | None = None) -> dict[str, Any]:
    return {
        "id": event_id or new_id("evt"),
        "object": "event",
        "api_version": "2024-06-20",
        "created": obj.get("created", int(time.time())),
        "data": {"object": obj, "previous_attributes": {}},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": new_id("req"), "idempotency_key": secrets.token_hex(16)},
        "type": event_type,
    }


def intent_event(
    intent_id: str,
    *,
    amount: int,
    cart_id: str | None,
    status: str = "requires_capture",
    currency: str = "usd",
    event_type: str | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    """A `payment_intent.*` event carrying the intent in `status`."""
    obj = payment_intent(
        intent_id, amount=amount, currency=currency, status=status, cart_id=cart_id
    )
    return event(obj, event_type or EVENT_TYPE_OF_STATUS[status], event_id=event_id)


def charge_event(
    intent_id: str, *, amount: int, event_type: str = "charge.succeeded"
) -> dict[str, Any]:
    charge = {
        "id": new_id("ch"),
        "object": "charge",
        "amount": amount,
        "amount_captured": amount,
        "captured": True,
        "amount_refunded": 0,
        "currency": "usd",
        "paid": True,
        "payment_intent": intent_id,
        "refunded": False,
        "status": "succeeded",
        "created": int(time.time()),
    }
    return event(charge, event_type)


def refund_event(intent_id: str, *, amount: int, refunded: int | None = None) -> dict[str, Any]:
    """`charge.refunded`: the intent's charge with `refunded` of its `amount` given back."""
    evt = charge_event(intent_id, amount=amount, event_type="charge.refunded")
    back = amount if refunded is None else refunded
    evt["data"]["object"].update(amount_refunded=back, refunded=back >= amount)
    return evt


def encode(evt: dict[str, Any]) -> bytes:
    """The bytes Stripe would send: compact-ish JSON."""
    return json.dumps(evt, separators=(",", ":")).encode()


# --- Charges, refunds, expiry and disputes with explicit amounts and times ----------


def charge_object(
    intent_id: str,
    *,
    amount: int,
    amount_refunded: int = 0,
    refunded: bool = False,
    captured: bool = True,
) -> dict[str, Any]:
    """The intent's one charge (`ch_<intent>`), as Stripe shows it on `charge.*` events."""
    return {
        "id": f"ch_{intent_id}",
        "object": "charge",
        "amount": amount,
        "amount_captured": amount if captured else 0,
        "amount_refunded": amount_refunded,
        "captured": captured,
        "currency": "usd",
        "paid": True,
        "payment_intent": intent_id,
        "refunded": refunded,
        "status": "succeeded",
    }


def stamped(obj: dict[str, Any], event_type: str, created: int) -> dict[str, Any]:
    """An event of `event_type` carrying `obj`, sent at `created` (epoch s)."""
    evt = event({**obj, "created": created}, event_type)
    evt["created"] = created
    return evt


def refunded_event(
    intent_id: str, *, amount: int, amount_refunded: int, created: int
) -> dict[str, Any]:
    """`charge.refunded`: the charge with `amount_refunded` returned so far, in full or not."""
    charge = charge_object(
        intent_id,
        amount=amount,
        amount_refunded=amount_refunded,
        refunded=amount_refunded >= amount,
    )
    return stamped(charge, "charge.refunded", created)


def expired_event(intent_id: str, *, amount: int, created: int) -> dict[str, Any]:
    """`charge.expired`: an uncaptured authorization lapsed; Stripe releases it as refunded."""
    charge = charge_object(
        intent_id, amount=amount, amount_refunded=amount, refunded=True, captured=False
    )
    return stamped(charge, "charge.expired", created)


def dispute_event(
    intent_id: str,
    *,
    amount: int,
    status: str,
    reason: str,
    created: int,
    event_type: str = "charge.dispute.created",
) -> dict[str, Any]:
    """A `charge.dispute.*` event: the intent's one dispute (`dp_<intent>`) in `status`."""
    dispute = {
        "id": f"dp_{intent_id}",
        "object": "dispute",
        "amount": amount,
        "charge": f"ch_{intent_id}",
        "currency": "usd",
        "payment_intent": intent_id,
        "reason": reason,
        "status": status,
        "is_charge_refundable": False,
    }
    return stamped(dispute, event_type, created)


# --- Checkout Sessions ---------------------------------------------------------------


def checkout_session(
    session_id: str,
    *,
    intent_id: str | None,
    amount_subtotal: int,
    amount_total: int,
    shipping: int = 0,
    discount: int = 0,
    tax: int = 0,
    currency: str = "usd",
    payment_status: str = "unpaid",
    status: str = "complete",
    client_reference_id: str | None = None,
    metadata: dict[str, str] | None = None,
    payment_method_types: tuple[str, ...] = ("card",),
    created: int | None = None,
) -> dict[str, Any]:
    """A Checkout Session of mode `payment`, as `checkout.session.*` events carry it: the
    items (`amount_subtotal`), shipping and tax on top and a discount off (`total_details`,
    summing to `amount_total`), and the shop's cart in `client_reference_id` or `metadata`.
    `intent_id` is None for a session that names no intent (one that expired unpaid)."""
    created = created or int(time.time())
    return {
        "id": session_id,
        "object": "checkout.session",
        "after_expiration": None,
        "allow_promotion_codes": True,
        "amount_subtotal": amount_subtotal,
        "amount_total": amount_total,
        "billing_address_collection": "auto",
        "cancel_url": "https://shop.example/cart",
        "client_reference_id": client_reference_id,
        "client_secret": None,
        "created": created,
        "currency": currency,
        "currency_conversion": None,
        "customer": None,
        "customer_creation": "if_required",
        "customer_details": {
            "address": {
                "city": "Berlin",
                "country": "DE",
                "line1": "Torstrasse 1",
                "line2": None,
                "postal_code": "10119",
                "state": None,
            },
            "email": "buyer@example.com",
            "name": "Ada Lovelace",
            "phone": None,
            "tax_exempt": "none",
            "tax_ids": [],
        },
        "customer_email": None,
        "expires_at": created + 24 * 3600,
        "invoice": None,
        "livemode": False,
        "locale": None,
        "metadata": metadata or {},
        "mode": "payment",
        "payment_intent": intent_id,
        "payment_link": None,
        "payment_method_collection": "if_required",
        "payment_method_types": list(payment_method_types),
        "payment_status": payment_status,
        "setup_intent": None,
        "shipping_cost": (
            {
                "amount_subtotal": shipping,
                "amount_tax": 0,
                "amount_total": shipping,
                "shipping_rate": "shr_" + secrets.token_hex(12),
            }
            if shipping
            else None
        ),
        "status": status,
        "submit_type": "pay",
        "subscription": None,
        "success_url": "https://shop.example/thanks?session_id={CHECKOUT_SESSION_ID}",
        "total_details": {
            "amount_discount": discount,
            "amount_shipping": shipping,
            "amount_tax": tax,
        },
        "ui_mode": "hosted",
        "url": None,
    }

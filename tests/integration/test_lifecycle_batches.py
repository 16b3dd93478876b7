"""Facts stored by one batch are whole in the next: the order is re-derived from all of them.

Each scenario is applied once in one batch and once an event per batch; both
must end in the same order (status, amount refunded, cart).
"""

from __future__ import annotations

import itertools
from typing import Any

import asyncpg
import pytest

from intentflow.consumer.store import apply_batch
from intentflow.consumer.tools import reconcile
from intentflow.stripekit import events
from tests.integration.store_support import envelope
from tests.support import seed_cart, seed_stock

T0 = 1_790_000_000
_offsets = itertools.count()


def intent(event_type: str, status: str, created: int, **fields: Any) -> dict[str, Any]:
    obj = events.payment_intent("pi_1", amount=1000, cart_id="cart-1", status=status)
    obj.update(fields)
    evt = events.event(obj, event_type)
    evt["created"] = created
    return evt


def refund(refund_id: str, amount: int, status: str, created: int, kind: str) -> dict[str, Any]:
    obj = {"object": "refund", "id": refund_id, "charge": "ch_1", "payment_intent": "pi_1"}
    evt = events.event({**obj, "amount": amount, "status": status, "currency": "usd"}, kind)
    evt["created"] = created
    return evt


def charge_refunded(amount_refunded: int, created: int) -> dict[str, Any]:
    evt = events.refund_event("pi_1", amount=1000, refunded=amount_refunded)
    evt["created"] = created
    return evt


def dispute_won(created: int) -> dict[str, Any]:
    obj = {"object": "dispute", "id": "dp_1", "charge": "ch_1", "payment_intent": "pi_1"}
    body = {**obj, "amount": 1000, "reason": "fraudulent", "status": "won", "currency": "usd"}
    evt = events.event(body, "charge.dispute.closed")
    evt["created"] = created
    return evt


AUTH = ("payment_intent.amount_capturable_updated", "requires_capture")
CAPTURE = ("payment_intent.succeeded", "succeeded")

SCENARIOS: dict[str, tuple[list[dict[str, Any]], tuple[str, int]]] = {
    "a refund before its authorization": (
        [refund("re_1", 1000, "succeeded", T0 + 10, "refund.created"), intent(*CAPTURE, T0)],
        ("refunded", 1000),
    ),
    "a won dispute after a full refund": (
        [
            intent(*CAPTURE, T0),
            refund("re_1", 1000, "succeeded", T0 + 10, "refund.created"),
            dispute_won(T0 + 20),
        ],
        ("refunded", 1000),
    ),
    "an older charge snapshot after two refunds": (
        [
            intent(*CAPTURE, T0),
            refund("re_1", 600, "succeeded", T0 + 10, "charge.refund.updated"),
            refund("re_2", 400, "succeeded", T0 + 11, "charge.refund.updated"),
            charge_refunded(600, T0 + 10),
        ],
        ("refunded", 1000),
    ),
    # Nothing was captured: a refund of an uncaptured charge only releases the hold, and
    # that is no money sent back (amount_refunded never exceeds what was received).
    "a cancel after a refund of the hold": (
        [
            intent(*AUTH, T0),
            refund("re_1", 300, "pending", T0 + 10, "charge.refund.updated"),
            intent("payment_intent.canceled", "canceled", T0 + 20, cancellation_reason="abandoned"),
        ],
        ("canceled", 0),
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("batching", ["one batch", "one event per batch"])
async def test_the_order_is_derived_from_every_fact_however_batched(
    db: asyncpg.Connection, name: str, batching: str
) -> None:
    await seed_stock(db, {"sku-a": 5})
    await seed_cart(db, "cart-1", [("sku-a", 1, 1000)])
    history, expected = SCENARIOS[name]
    batches = [history] if batching == "one batch" else [[e] for e in history]
    for batch in batches:
        await apply_batch(db, [envelope(e, next(_offsets)) for e in batch])
    row = await db.fetchrow("SELECT status, amount_refunded FROM orders")
    assert row is not None
    assert (row["status"], row["amount_refunded"]) == expected
    assert (await reconcile.check(db)).ok


@pytest.mark.parametrize("reverse", [False, True])
async def test_the_cart_is_the_earliest_authorizations_in_any_order(
    db: asyncpg.Connection, reverse: bool
) -> None:
    """Metadata may change on an authorized intent: the earliest authorization names the cart."""
    await seed_stock(db, {"sku-a": 5, "sku-b": 5})
    await seed_cart(db, "cart-1", [("sku-a", 1, 1000)])
    await seed_cart(db, "cart-2", [("sku-b", 1, 1000)])
    earlier = intent(*AUTH, T0)
    later = intent(*CAPTURE, T0 + 60, metadata={"cart_id": "cart-2"})
    pair = [later, earlier] if reverse else [earlier, later]
    await apply_batch(db, [envelope(e, next(_offsets)) for e in pair])
    assert await db.fetchval("SELECT cart_id FROM orders") == "cart-1"
    rows = await db.fetch("SELECT sku, stocked_quantity FROM inventory_levels")
    levels = {r["sku"]: r["stocked_quantity"] for r in rows}
    assert levels == {"sku-a": 4, "sku-b": 5}

"""One authorization event becomes one placed order with its stock taken."""

from __future__ import annotations

import asyncpg

from intentflow.consumer.worker import Worker
from intentflow.devservices import Services
from intentflow.stripekit import events
from tests.support import consumer_settings, publish, seed_cart, seed_stock, snapshot


async def test_authorization_places_order_and_takes_stock(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    await seed_stock(db, {"sku-a": 5, "sku-b": 5})
    total = await seed_cart(db, "cart-1", [("sku-a", 2, 500), ("sku-b", 1, 250)])
    await publish(infra, topic, [events.intent_event("pi_1", amount=total, cart_id="cart-1")])
    async with Worker(consumer_settings(infra, database_url, topic), exit_when_idle_s=2) as worker:
        stats = await worker.run()
    assert stats.orders == {"placed": 1}
    state = await snapshot(db)
    assert state.orders == {"pi_1": "placed"}
    assert state.levels == {"sku-a": 3, "sku-b": 4}
    assert state.order_movements == 2
    state.assert_movements_explain_levels()
    items = await db.fetch("SELECT sku, quantity, unit_amount FROM order_items ORDER BY sku")
    assert [tuple(r) for r in items] == [("sku-a", 2, 500), ("sku-b", 1, 250)]

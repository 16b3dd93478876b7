"""Invariant 4 against ordinary actions on stock rows (issue 17).

A movement the consumer writes for a SKU with no stock row fails its batch as
the environment's fault until the row is back.
"""

from __future__ import annotations

import asyncpg
import pytest

from intentflow.consumer.errors import Fault, cause, classify
from intentflow.consumer.orders import StockRowMissing
from intentflow.consumer.store import apply_batch
from intentflow.stripekit import events
from tests.integration.store_support import envelope
from tests.support import seed_cart, seed_stock, snapshot


async def as_replica(db: asyncpg.Connection, statement: str) -> None:
    """Run `statement` with triggers off, as a superuser can."""
    async with db.transaction():
        await db.execute("SET LOCAL session_replication_role = replica")
        await db.execute(statement)


async def test_a_movement_with_no_stock_row_is_retried_as_the_environments_until_the_row_is_back(
    db: asyncpg.Connection,
) -> None:
    await seed_stock(db, {"sku-a": 10})
    lines = [("sku-a", 2, 100)]
    paid = [await seed_cart(db, f"cart-{i}", lines) for i in (1, 2)]
    await apply_batch(db, [envelope(events.intent_event("pi_1", amount=paid[0], cart_id="cart-1"))])
    await as_replica(db, "DELETE FROM inventory_levels WHERE sku = 'sku-a'")
    # pi_1's stock given back and taken by pi_2: no level would change at all.
    batch = [
        envelope(events.intent_event("pi_1", amount=paid[0], cart_id="cart-1", status="canceled")),
        envelope(events.intent_event("pi_2", amount=paid[1], cart_id="cart-2"), 1),
    ]

    with pytest.raises(StockRowMissing) as failed:
        await apply_batch(db, batch)

    assert (classify(failed.value), cause(failed.value)) == (Fault.ENVIRONMENT, "stock_row_missing")
    assert str(failed.value).startswith("no inventory_levels row for SKU 'sku-a', ")
    state = await snapshot(db)
    assert (state.orders, state.processed) == ({"pi_1": "placed"}, 1)  # all rolled back

    await db.execute("INSERT INTO inventory_levels (sku, stocked_quantity) VALUES ('sku-a', 6)")
    await apply_batch(db, batch)

    state = await snapshot(db)
    assert state.orders == {"pi_1": "canceled", "pi_2": "placed"}
    assert state.levels == {"sku-a": 6}

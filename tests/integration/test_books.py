"""Invariant 4 against ordinary actions on stock rows (issue 17, migration 0005).

A stock row whose SKU has movements cannot be deleted, renamed or truncated
away; a movement the consumer writes for a SKU with no row (one removed past
that refusal) fails its batch as the environment's fault until the row is back;
and writing the row again mends the books.
"""

from __future__ import annotations

import asyncpg
import pytest

from intentflow.consumer.errors import Fault, cause, classify
from intentflow.consumer.stock import StockRowMissing
from intentflow.consumer.store import apply_batch
from intentflow.consumer.tools import reconcile
from intentflow.stripekit import events
from tests.integration.store_support import envelope
from tests.support import seed_cart, seed_stock, snapshot


async def as_replica(db: asyncpg.Connection, statement: str) -> None:
    """Run `statement` with triggers off, as a superuser can (and version 4 allowed)."""
    async with db.transaction():
        await db.execute("SET LOCAL session_replication_role = replica")
        await db.execute(statement)


async def test_a_stock_row_with_movements_is_kept_and_the_error_says_to_set_it_to_0(
    db: asyncpg.Connection,
) -> None:
    await seed_stock(db, {"sku-a": 3, "sku-new": 0})  # sku-new: no movement yet

    refusals = [
        ("DELETE FROM inventory_levels WHERE sku = 'sku-a'", "SKU 'sku-a' cannot be deleted"),
        ("UPDATE inventory_levels SET sku = 'sku-z' WHERE sku = 'sku-a'", "cannot be renamed"),
        ("TRUNCATE inventory_levels", "cannot be truncated: inventory movements name its SKUs "
         "('sku-a' among them)"),
    ]  # fmt: skip
    for statement, expected in refusals:
        with pytest.raises(asyncpg.ForeignKeyViolationError) as refused:
            await db.execute(statement)
        message = str(refused.value)
        assert expected in message
        assert "set its stocked_quantity to 0 instead" in message
        assert "\n" not in message

    await db.execute("DELETE FROM inventory_levels WHERE sku = 'sku-new'")
    # Checked at commit: a transaction may replace a row, or empty both tables.
    async with db.transaction():
        await db.execute("DELETE FROM inventory_levels WHERE sku = 'sku-a'")
        await db.execute("INSERT INTO inventory_levels (sku, stocked_quantity) VALUES ('sku-a', 3)")
    assert (await reconcile.check(db)).ok
    await db.execute("TRUNCATE inventory_levels, inventory_movements")


async def test_writing_a_level_again_mends_books_broken_behind_the_triggers(
    db: asyncpg.Connection,
) -> None:
    """A re-inserted row, and a level set by hand, get the movement that balances them."""
    await seed_stock(db, {"sku-a": 10, "sku-b": 5})
    await db.execute("UPDATE inventory_levels SET stocked_quantity = 7 WHERE sku = 'sku-a'")
    await as_replica(db, "DELETE FROM inventory_levels WHERE sku = 'sku-a'")
    await as_replica(db, "UPDATE inventory_levels SET stocked_quantity = 9 WHERE sku = 'sku-b'")
    broken = (await reconcile.check(db)).failed()
    assert set(broken) == {"movements_sum_to_levels", "movements_have_their_level"}

    await db.execute("INSERT INTO inventory_levels (sku, stocked_quantity) VALUES ('sku-a', 4)")
    await db.execute("UPDATE inventory_levels SET stocked_quantity = 9 WHERE sku = 'sku-b'")

    assert (await reconcile.check(db)).ok
    rows = await db.fetch(
        "SELECT sku, quantity_delta, reason FROM inventory_movements ORDER BY id DESC LIMIT 2"
    )
    assert [tuple(r) for r in rows] == [("sku-b", 4, "restock"), ("sku-a", -3, "adjustment")]


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
    assert (await reconcile.check(db)).ok

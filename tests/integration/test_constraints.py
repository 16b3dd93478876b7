"""Rules only the database enforces, tested by SQL against the migrated schema.

The code above them is written so that they never fire; these tests make sure
they are still there if a migration drops or loosens one (docs/design.md, invariants
1 to 4 and the order statuses of the contract).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import asyncpg
import pytest

import intentflow.consumer.orders
from intentflow.consumer.allocation import Cart, OrderPlan
from intentflow.consumer.decisions import Allocation, OrderStatus, PlaceOrder
from intentflow.consumer.errors import Fault, cause, classify
from intentflow.consumer.orders import ConcurrentCartOrder
from intentflow.consumer.store import apply_batch
from intentflow.stripekit import events
from tests.integration.store_support import envelope
from tests.support import seed_cart, seed_stock, snapshot


async def constraint_def(db: asyncpg.Connection, exc: asyncpg.PostgresError) -> str:
    """The definition of the constraint that refused a statement, as PostgreSQL prints it."""
    name = getattr(exc, "constraint_name", None)
    table = getattr(exc, "table_name", None)
    assert name and table, exc
    definition = await db.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conname = $1 AND conrelid = $2::regclass",
        name,
        table,
    )
    return str(definition)


async def insert_order(db: asyncpg.Connection, pi: str, status: str = "placed") -> None:
    await db.execute(
        "INSERT INTO orders (payment_intent_id, cart_id, status, allocation, amount, currency) "
        "VALUES ($1, 'cart-1', $2, 'placed', 100, 'usd')",
        pi,
        status,
    )


# Invariant 3: stock never goes below zero.


async def test_stock_cannot_be_updated_below_zero(db: asyncpg.Connection) -> None:
    await seed_stock(db, {"sku-a": 2})
    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await db.execute(
            "UPDATE inventory_levels SET stocked_quantity = stocked_quantity - 3 "
            "WHERE sku = 'sku-a'"
        )
    assert await constraint_def(db, refused.value) == "CHECK ((stocked_quantity >= 0))"
    assert await db.fetchval("SELECT stocked_quantity FROM inventory_levels") == 2
    # Down to exactly zero is allowed.
    await db.execute("UPDATE inventory_levels SET stocked_quantity = 0 WHERE sku = 'sku-a'")


async def test_stock_cannot_be_inserted_below_zero_even_by_the_consumer(
    db: asyncpg.Connection,
) -> None:
    """The CHECK holds in the consumer's own transactions too (no movement trigger there)."""
    with pytest.raises(asyncpg.CheckViolationError):
        await seed_stock(db, {"sku-a": -1})
    await seed_stock(db, {"sku-b": 1})
    with pytest.raises(asyncpg.CheckViolationError):
        async with db.transaction():
            await db.execute("SET LOCAL intentflow.applying = 'on'")
            await db.execute("UPDATE inventory_levels SET stocked_quantity = -1")
    assert await db.fetchval("SELECT stocked_quantity FROM inventory_levels") == 1


async def test_an_allocation_that_oversells_is_refused_whole_by_the_database(
    db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CHECK is the backstop behind allocation: the batch rolls back, inbox claims too."""

    def place_everything(
        requests: list[PlaceOrder],
        carts: Mapping[str, Cart],
        stock: Mapping[str, int],
        holders: Mapping[str, str] | None = None,
    ) -> tuple[list[OrderPlan], dict[str, int]]:
        """Allocation with its stock check taken out."""
        plans = []
        for request in requests:
            cart = carts[request.cart_id or ""]
            plans.append(OrderPlan(request, cart, Allocation.PLACED, None, cart.demand()))
        return plans, dict(stock)

    monkeypatch.setattr(intentflow.consumer.orders, "allocate", place_everything)
    await seed_stock(db, {"sku-a": 3})
    batch = []
    for i in range(2):
        total = await seed_cart(db, f"cart-{i}", [("sku-a", 2, 100)])
        batch.append(envelope(events.intent_event(f"pi_{i}", amount=total, cart_id=f"cart-{i}")))
    with pytest.raises(asyncpg.CheckViolationError):
        await apply_batch(db, batch)
    state = await snapshot(db)
    assert state.orders == {}
    assert state.levels == {"sku-a": 3}
    assert state.processed == 0  # the events were not claimed, so a replay applies them
    state.assert_movements_explain_levels()


# Invariant 1: one order per payment intent.


async def test_a_second_order_for_one_payment_intent_is_refused(db: asyncpg.Connection) -> None:
    await insert_order(db, "pi_1")
    with pytest.raises(asyncpg.UniqueViolationError) as refused:
        await insert_order(db, "pi_1", status="needs_review")
    assert "(payment_intent_id)=(pi_1)" in (refused.value.detail or "")
    await insert_order(db, "pi_2")  # another intent is another order
    assert await db.fetchval("SELECT count(*) FROM orders") == 2


# One live order per cart (issue 17): allocation makes a second payment a duplicate;
# behind it, the unique index refuses a second live order, and a batch that meets
# one placed concurrently is retried, not dead-lettered.


async def test_a_second_live_order_for_one_cart_is_refused(db: asyncpg.Connection) -> None:
    live = (
        "INSERT INTO orders (payment_intent_id, cart_id, status, allocation, amount, currency,"
        " holds_cart) VALUES ($1, 'cart-1', $2, 'placed', 100, 'usd', true)"
    )
    await db.execute(live, "pi_1", "placed")
    with pytest.raises(asyncpg.UniqueViolationError) as refused:
        await db.execute(live, "pi_2", "placed")
    assert refused.value.constraint_name == "orders_one_live_order_per_cart_idx"
    # Once the first is canceled, the cart is free for a new payment.
    await db.execute("UPDATE orders SET status = 'canceled' WHERE payment_intent_id = 'pi_1'")
    await db.execute(live, "pi_2", "placed")


async def test_a_cart_placed_by_another_batch_meanwhile_is_a_retriable_conflict(
    db: asyncpg.Connection, database_url: str
) -> None:
    """Two consumers, two partitions, one cart: the batch that finds the other's order
    committed under its feet waits, fails as the environment's (never dead-lettered),
    and its retry makes its order the duplicate."""
    await seed_stock(db, {"sku-a": 5})
    total = await seed_cart(db, "cart-1", [("sku-a", 1, 100)])
    first = envelope(events.intent_event("pi_1", amount=total, cart_id="cart-1"))
    second = envelope(events.intent_event("pi_2", amount=total, cart_id="cart-1"))
    other = await asyncpg.connect(database_url)
    try:
        async with other.transaction():
            await apply_batch(other, [first])  # its own transaction, nested: still open
            racing = asyncio.create_task(apply_batch(db, [second]))
            await asyncio.sleep(0.3)  # it found no holder, and now waits on the index
            assert not racing.done()
        with pytest.raises(ConcurrentCartOrder) as lost:
            await racing
    finally:
        await other.close()
    assert (classify(lost.value), cause(lost.value)) == (Fault.ENVIRONMENT, "conflict")
    await apply_batch(db, [second])  # the retry
    assert (await snapshot(db)).orders == {"pi_1": "placed", "pi_2": "duplicate"}
    assert await db.fetchval("SELECT stocked_quantity FROM inventory_levels") == 4


# Invariant 2: one effect per Stripe event (the inbox).


async def test_an_event_id_is_claimed_in_the_inbox_once(db: asyncpg.Connection) -> None:
    claim = "INSERT INTO processed_events (event_id, event_type) VALUES ($1, 'x')"
    await db.execute(claim, "evt_1")
    with pytest.raises(asyncpg.UniqueViolationError) as refused:
        await db.execute(claim, "evt_1")
    assert "(event_id)=(evt_1)" in (refused.value.detail or "")
    # What the store's claim does: the conflict target must be a unique key on event_id.
    claimed = await db.fetch(
        "INSERT INTO processed_events (event_id, event_type) VALUES ('evt_1', 'x'), ('evt_2', 'x') "
        "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
    )
    assert [r["event_id"] for r in claimed] == ["evt_2"]


async def test_one_row_per_payment_intent_and_per_sku(db: asyncpg.Connection) -> None:
    """The store detects a concurrently created intent by ON CONFLICT (id); stock is one row."""
    intent = "INSERT INTO payment_intents (id, status, last_event_id) VALUES ('pi_1', $1, 'evt_1')"
    await db.execute(intent, "requires_capture")
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(intent, "succeeded")
    await seed_stock(db, {"sku-a": 1})
    with pytest.raises(asyncpg.UniqueViolationError):
        await seed_stock(db, {"sku-a": 5})


# The contract's order statuses.


async def test_orders_take_every_status_the_code_writes_and_no_other(
    db: asyncpg.Connection,
) -> None:
    for i, status in enumerate(OrderStatus):
        await insert_order(db, f"pi_{i}", status=status.value)
    for bad in ("shipped", "PLACED", ""):
        with pytest.raises(asyncpg.CheckViolationError) as refused:
            await insert_order(db, f"pi_{bad}", status=bad)
        assert "status" in await constraint_def(db, refused.value)
    assert await db.fetchval("SELECT count(*) FROM orders") == len(OrderStatus)


async def test_an_order_records_what_allocation_decided_and_nothing_else(
    db: asyncpg.Connection,
) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await db.execute(
            "INSERT INTO orders (payment_intent_id, status, allocation, amount, currency) "
            "VALUES ('pi_x', 'placed', 'shipped', 100, 'usd')"
        )
    assert "allocation" in await constraint_def(db, refused.value)


# Stock is taken once and given back once per order and SKU (the cancellation's backstop).


async def test_a_second_cancellation_movement_for_one_order_and_sku_is_refused(
    db: asyncpg.Connection,
) -> None:
    insert = (
        "INSERT INTO inventory_movements (sku, quantity_delta, reason, order_id, event_id) "
        "VALUES ('sku-a', $1, $2, 7, 'evt_1')"
    )
    await db.execute(insert, -2, "order")
    await db.execute(insert, 2, "cancellation")
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(insert, 2, "cancellation")
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(insert, -2, "order")
    # Movements of no order (restocks, adjustments) are not limited.
    for _ in range(2):
        await db.execute(
            "INSERT INTO inventory_movements (sku, quantity_delta, reason) "
            "VALUES ('sku-a', 5, 'restock')"
        )


# Invariant 4: every change of a level has a movement that says why.


async def test_a_movement_has_a_known_reason_and_moves_something(db: asyncpg.Connection) -> None:
    move = "INSERT INTO inventory_movements (sku, quantity_delta, reason) VALUES ('sku-a', $1, $2)"
    for reason in ("order", "cancellation", "restock", "adjustment"):
        await db.execute(move, -1, reason)
    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await db.execute(move, -1, "gift")
    assert "reason" in await constraint_def(db, refused.value)
    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await db.execute(move, 0, "adjustment")
    assert await constraint_def(db, refused.value) == "CHECK ((quantity_delta <> 0))"


# Carts: what the storefront writes and allocation trusts.


async def test_cart_and_order_lines_need_a_positive_quantity(db: asyncpg.Connection) -> None:
    await db.execute("INSERT INTO carts (id, currency) VALUES ('cart-1', 'usd')")
    line = (
        "INSERT INTO cart_items (cart_id, sku, quantity, unit_amount) "
        "VALUES ('cart-1', 'a', $1, $2)"
    )
    await db.execute(line, 1, 0)
    refusals = [
        (0, 100, "CHECK ((quantity > 0))"),
        (-2, 100, "CHECK ((quantity > 0))"),
        (1, -1, "CHECK ((unit_amount >= 0))"),
    ]
    for quantity, unit_amount, rule in refusals:
        with pytest.raises(asyncpg.CheckViolationError) as refused:
            await db.execute(line, quantity, unit_amount)
        assert await constraint_def(db, refused.value) == rule
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "INSERT INTO order_items (order_id, sku, quantity, unit_amount) VALUES (1, 'a', 0, 100)"
        )

"""The unit of work against a real PostgreSQL, with transactions interleaved by hand."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from intentflow.consumer.intents import ConcurrentIntentWrite
from intentflow.consumer.store import apply_batch
from intentflow.stripekit import events
from tests.integration.store_support import envelope
from tests.support import eventually, seed_cart, seed_stock, snapshot


async def blocked_by(observer: asyncpg.Connection, waiter: int, holder: int) -> bool:
    """Whether the session `waiter` is waiting for a lock that the session `holder` holds."""
    return bool(await observer.fetchval("SELECT $2 = ANY(pg_blocking_pids($1))", waiter, holder))


async def test_an_intent_created_concurrently_is_retried_not_ordered_twice(
    database_url: str, db: asyncpg.Connection
) -> None:
    """A consumer finishing a batch after losing its partitions races the new owner."""
    await seed_stock(db, {"sku-a": 5})
    total = await seed_cart(db, "cart-1", [("sku-a", 1, 100)])
    auth = events.intent_event("pi_1", amount=total, cart_id="cart-1")
    capture = events.intent_event("pi_1", amount=total, cart_id="cart-1", status="succeeded")

    zombie = await asyncpg.connect(database_url)
    owner = await asyncpg.connect(database_url)
    try:
        # The zombie has applied the authorization but not yet committed.
        zombie_tx = zombie.transaction()
        await zombie_tx.start()
        await apply_batch(zombie, [envelope(auth, 0)])  # a savepoint in the open transaction
        racing = asyncio.create_task(apply_batch(owner, [envelope(capture, 1)]))
        # Waiting on the zombie's uncommitted intent row (not merely not scheduled yet).
        pids = owner.get_server_pid(), zombie.get_server_pid()
        await eventually(lambda: blocked_by(db, *pids), timeout_s=15)
        assert not racing.done()
        await zombie_tx.commit()
        with pytest.raises(ConcurrentIntentWrite):
            await racing
        # The retry sees the committed intent and its order.
        result = await apply_batch(owner, [envelope(capture, 1)])
        assert result.claimed == 1 and not result.orders
    finally:
        await zombie.close()
        await owner.close()
    state = await snapshot(db)
    assert state.orders == {"pi_1": "placed"}
    assert state.levels == {"sku-a": 4}
    assert await db.fetchval("SELECT status FROM payment_intents") == "succeeded"


async def test_a_whole_history_applied_again_without_its_inbox_rows_changes_nothing(
    db: asyncpg.Connection,
) -> None:
    """The second mechanism behind "one effect per event": the fold itself is idempotent.

    The inbox absorbs a copy it still holds; once pruned (or for a copy under a
    new event id), the facts merge to the same values and no decision follows.
    """
    await seed_stock(db, {"sku-a": 5, "sku-b": 5})
    history = []
    for i, fate in enumerate(("canceled", "refunded", "placed")):
        total = await seed_cart(db, f"cart-{i}", [("sku-a", 2, 100), ("sku-b", 1, 50)])
        pi = f"pi_{i}"
        history.append(events.intent_event(pi, amount=total, cart_id=f"cart-{i}"))
        if fate == "canceled":
            history.append(
                events.intent_event(pi, amount=total, cart_id=f"cart-{i}", status="canceled")
            )
        if fate == "refunded":
            history.append(
                events.intent_event(pi, amount=total, cart_id=f"cart-{i}", status="succeeded")
            )
            history.append(events.refund_event(pi, amount=total))
    for offset, payload in enumerate(history):
        await apply_batch(db, [envelope(payload, offset)])
    before = await snapshot(db)
    movements = await db.fetchval("SELECT count(*) FROM inventory_movements")
    assert before.orders == {"pi_0": "canceled", "pi_1": "refunded", "pi_2": "placed"}
    assert before.levels == {"sku-a": 1, "sku-b": 3}

    await db.execute("DELETE FROM processed_events")  # as `order-consumer prune` would
    again = await apply_batch(db, [envelope(p, 100 + i) for i, p in enumerate(history)])
    assert again.claimed == len(history) and not again.orders
    assert set(again.outcomes) == {"stale"}
    after = await snapshot(db)
    assert (after.orders, after.levels, after.movements) == (
        before.orders,
        before.levels,
        before.movements,
    )
    assert await db.fetchval("SELECT count(*) FROM inventory_movements") == movements

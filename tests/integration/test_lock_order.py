"""Invariant 8: the unit of work takes its locks in one global order, so sessions never deadlock.

Each kind of lock `apply_batch` takes (inbox claims, intent rows, stock rows) is
staged by hand so that a wrong order deadlocks every time, not by chance:

- two batches that want the same rows in opposite orders queue behind gate
  sessions that hold one row each and let go one after the other, so that each
  batch gets its first row before the other asks for it;
- a session that takes the same locks in the documented order (ascending),
  paused after the first, meets a batch that lists them descending: the batch
  must be waiting for the first, holding none of the others.

PostgreSQL's deadlock counter for the database, and every batch's own result,
must show no deadlock.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from intentflow.consumer.decode import Envelope
from intentflow.consumer.store import BatchResult, apply_batch
from intentflow.stripekit import events
from tests.integration.store_support import deadlocks, envelope, waiting_for_a_lock
from tests.support import eventually, seed_cart, seed_stock, snapshot


@dataclass
class Gate:
    """A session that holds rows (`hold`) until every batch waits, then maybe takes more."""

    hold: str
    args: Sequence[Any] = ()
    then: str | None = None  # run once every batch is waiting, before letting go
    then_args: Sequence[Any] = ()
    release: str = "commit"  # or "rollback": what the gate held was never real


@dataclass
class Race:
    results: list[BatchResult | BaseException]
    deadlocks: int
    gate_errors: list[BaseException] = field(default_factory=list)

    def assert_no_deadlock(self) -> list[BatchResult]:
        """Every batch succeeded, the gates too, and PostgreSQL detected no deadlock."""
        errors = [r for r in self.results if not isinstance(r, BatchResult)]
        assert (errors, self.gate_errors, self.deadlocks) == ([], [], 0)
        return [r for r in self.results if isinstance(r, BatchResult)]


async def race(
    database_url: str,
    observer: asyncpg.Connection,
    gates: list[Gate],
    batches: list[list[Envelope]],
) -> Race:
    """Run `batches` concurrently, each on its own connection, staged by `gates`.

    Each gate holds its rows in an open transaction before the batches start.
    The gates then let go one at a time, in the order given, each only once
    every batch is waiting for a lock.
    """
    sessions = [await asyncpg.connect(database_url) for _ in gates]
    workers = [await asyncpg.connect(database_url) for _ in batches]
    tasks: list[asyncio.Task[BatchResult]] = []
    errors: list[BaseException] = []
    try:
        before = await deadlocks(observer, *sessions, *workers)
        open_gates = []
        for session, gate in zip(sessions, gates, strict=True):
            tx = session.transaction()
            await tx.start()
            await session.execute(gate.hold, *gate.args)
            open_gates.append(tx)
        tasks = [
            asyncio.create_task(apply_batch(w, b)) for w, b in zip(workers, batches, strict=True)
        ]
        for session, gate, tx in zip(sessions, gates, open_gates, strict=True):
            await eventually(lambda: waiting_for_a_lock(observer, *workers), timeout_s=15)
            if gate.then is not None:
                try:
                    await session.execute(gate.then, *gate.then_args)
                except asyncpg.PostgresError as exc:
                    errors.append(exc)
            await (tx.commit() if gate.release == "commit" else tx.rollback())
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        after = await deadlocks(observer, *sessions, *workers)
        return Race(list(results), after - before, errors)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in (*sessions, *workers):
            await conn.close()


async def authorization(
    db: asyncpg.Connection, pi: str, lines: list[tuple[str, int, int]] | None = None
) -> Envelope:
    if lines is None:  # a cart that was never made: an order for review, no stock
        return envelope(events.intent_event(pi, amount=100, cart_id=f"cart-{pi}"))
    total = await seed_cart(db, f"cart-{pi}", lines)
    return envelope(events.intent_event(pi, amount=total, cart_id=f"cart-{pi}"))


LOCK_STOCK = "SELECT 1 FROM inventory_levels WHERE sku = $1 FOR UPDATE"
LOCK_INTENT = "SELECT 1 FROM payment_intents WHERE id = $1 FOR UPDATE"


async def test_batches_whose_carts_list_skus_in_opposite_orders_do_not_deadlock(
    database_url: str, db: asyncpg.Connection
) -> None:
    await seed_stock(db, {"sku-a": 10, "sku-b": 10})
    batches = [
        [await authorization(db, "pi_1", [("sku-a", 1, 100), ("sku-b", 2, 100)])],
        [await authorization(db, "pi_2", [("sku-b", 1, 100), ("sku-a", 2, 100)])],
    ]
    gates = [Gate(LOCK_STOCK, ["sku-a"]), Gate(LOCK_STOCK, ["sku-b"])]
    results = (await race(database_url, db, gates, batches)).assert_no_deadlock()
    assert [r.orders for r in results] == [{"placed": 1}] * 2
    state = await snapshot(db)
    assert state.levels == {"sku-a": 7, "sku-b": 7}
    state.assert_movements_explain_levels()


async def test_a_restock_that_locks_in_sku_order_does_not_deadlock_with_a_batch(
    database_url: str, db: asyncpg.Connection
) -> None:
    """Two consumers that both locked descending would not deadlock each other; this would."""
    await seed_stock(db, {"sku-a": 10, "sku-b": 10})
    batch = [await authorization(db, "pi_1", [("sku-b", 1, 100), ("sku-a", 1, 100)])]
    more = "UPDATE inventory_levels SET stocked_quantity = stocked_quantity + 5 WHERE sku = $1"
    gate = Gate(more, ["sku-a"], then=more, then_args=["sku-b"])
    (result,) = (await race(database_url, db, [gate], [batch])).assert_no_deadlock()
    assert result.orders == {"placed": 1}
    state = await snapshot(db)
    assert state.levels == {"sku-a": 14, "sku-b": 14}
    state.assert_movements_explain_levels()


async def test_batches_with_events_of_two_intents_in_opposite_orders_do_not_deadlock(
    database_url: str, db: asyncpg.Connection
) -> None:
    await apply_batch(db, [await authorization(db, "pi_1"), await authorization(db, "pi_2")])
    captures = [
        envelope(events.intent_event(pi, amount=100, cart_id=None, status="succeeded"))
        for pi in ("pi_1", "pi_2")
    ]
    charges = [envelope(events.charge_event(pi, amount=100)) for pi in ("pi_2", "pi_1")]
    gates = [Gate(LOCK_INTENT, ["pi_1"]), Gate(LOCK_INTENT, ["pi_2"])]
    results = (await race(database_url, db, gates, [captures, charges])).assert_no_deadlock()
    assert [r.claimed for r in results] == [2, 2]
    statuses = await db.fetch("SELECT DISTINCT status FROM payment_intents")
    assert [r["status"] for r in statuses] == ["succeeded"]


async def test_intent_rows_are_locked_in_id_order_not_kafka_order(
    database_url: str, db: asyncpg.Connection
) -> None:
    await apply_batch(db, [await authorization(db, "pi_1"), await authorization(db, "pi_2")])
    batch = [envelope(events.charge_event(pi, amount=100)) for pi in ("pi_2", "pi_1")]
    gate = Gate(LOCK_INTENT, ["pi_1"], then=LOCK_INTENT, then_args=["pi_2"])
    (result,) = (await race(database_url, db, [gate], [batch])).assert_no_deadlock()
    assert result.claimed == 2


async def test_new_intent_rows_are_written_in_id_order_not_kafka_order(
    database_url: str, db: asyncpg.Connection
) -> None:
    """A uniqueness check waits for the uncommitted row: a lock of its own kind."""
    batch = [await authorization(db, "pi_2"), await authorization(db, "pi_1")]
    create = "INSERT INTO payment_intents (id, status, last_event_id) VALUES ($1, 'held', 'held')"
    gate = Gate(create, ["pi_1"], then=create, then_args=["pi_2"], release="rollback")
    (result,) = (await race(database_url, db, [gate], [batch])).assert_no_deadlock()
    assert result.claimed == 2
    assert (await snapshot(db)).orders == {"pi_1": "needs_review", "pi_2": "needs_review"}


async def test_inbox_claims_are_taken_in_event_id_order_not_kafka_order(
    database_url: str, db: asyncpg.Connection
) -> None:
    """A member claiming copies of the same events (a redelivery, a rebalance) in id order."""
    batch = [await authorization(db, "pi_1"), await authorization(db, "pi_2")]
    batch.sort(key=lambda e: e.event.id, reverse=True)  # Kafka order: the larger id first
    smaller, larger = sorted(e.event.id for e in batch)
    claim = "INSERT INTO processed_events (event_id, event_type) VALUES ($1, 'held')"
    gate = Gate(claim, [smaller], then=claim, then_args=[larger], release="rollback")
    (result,) = (await race(database_url, db, [gate], [batch])).assert_no_deadlock()
    assert result.claimed == 2


async def test_many_concurrent_batches_over_shared_skus_and_intents_never_deadlock(
    database_url: str, db: asyncpg.Connection
) -> None:
    """Unstaged: six sessions; new orders over shuffled SKUs, charges of older intents."""
    rng = random.Random(8)
    skus = [f"sku-{c}" for c in "abcde"]
    await seed_stock(db, dict.fromkeys(skus, 1_000))
    sessions = [await asyncpg.connect(database_url) for _ in range(6)]
    older: list[str] = []
    placed = 0
    try:
        before = await deadlocks(db, *sessions)
        for round_ in range(4):
            batches = []
            for s in range(len(sessions)):
                batch = []
                for n in range(3):
                    lines = [(sku, 1, 100) for sku in rng.sample(skus, 4)]
                    batch.append(await authorization(db, f"pi_{round_}_{s}_{n}", lines))
                for pi in rng.sample(older, min(len(older), 4)):
                    batch.append(envelope(events.charge_event(pi, amount=400)))
                rng.shuffle(batch)
                batches.append(batch)
            results = await asyncio.gather(
                *(apply_batch(conn, batch) for conn, batch in zip(sessions, batches, strict=True)),
                return_exceptions=True,
            )
            assert all(isinstance(r, BatchResult) for r in results), results
            placed += sum(r.orders["placed"] for r in results if isinstance(r, BatchResult))
            older += [f"pi_{round_}_{s}_{n}" for s in range(len(sessions)) for n in range(3)]
        assert await deadlocks(db, *sessions) == before
    finally:
        for conn in sessions:
            await conn.close()
    assert placed == 4 * 6 * 3  # every order of every round
    state = await snapshot(db)
    assert sum(state.levels.values()) == 5 * 1_000 - 72 * 4
    state.assert_movements_explain_levels()

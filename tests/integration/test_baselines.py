"""The comparison's baselines fail as they do in shops, and its counts see it (real PostgreSQL).

Small workloads of simultaneous copies over few SKUs with tight stock. The
counts of `loadtest.baselines.measure` are checked against a recount in Python
from the rows, on a hand-made state with known answers, and on intentflow's
own tables after its consumer applied the same workload (all zero).
"""

from __future__ import annotations

from collections import Counter

import asyncpg

from intentflow.consumer.worker import Worker
from intentflow.devservices import Services
from intentflow.loadtest.baselines import measure
from intentflow.loadtest.baselines.delivery import deliver, simultaneous
from intentflow.loadtest.baselines.lease import LeasedShop, PostgresLease
from intentflow.loadtest.baselines.naive import Shop
from intentflow.loadtest.compare import authorized_intents, comparison_workload, parser
from intentflow.loadtest.workload import Workload, seed_database
from tests.support import consumer_settings, publish


def small_workload(intents: int) -> Workload:
    """Few SKUs and stock for half of what the carts ask: copies and last units collide."""
    argv = ["--intents", str(intents), "--skus", "60", "--stock-ratio", "0.5", "--max-copies", "3"]
    return comparison_workload(parser().parse_args(argv))


async def recount(db: asyncpg.Connection, schema: str, initial: dict[str, int]) -> tuple[int, int]:
    """Duplicate orders and oversold units, counted in Python from the shop's rows."""
    orders = await db.fetch(f"SELECT id, payment_intent_id, status FROM {schema}.orders")
    per_intent = Counter(r["payment_intent_id"] for r in orders)
    placed = {r["id"] for r in orders if r["status"] == "placed"}
    sold: Counter[str] = Counter()
    for line in await db.fetch(f"SELECT order_id, sku, quantity FROM {schema}.order_lines"):
        if line["order_id"] in placed:
            sold[line["sku"]] += line["quantity"]
    duplicates = sum(n - 1 for n in per_intent.values())
    oversold = sum(max(0, units - initial.get(sku, 0)) for sku, units in sold.items())
    return duplicates, oversold


async def test_naive_handler_makes_duplicate_orders_from_simultaneous_copies_and_counts_see_them(
    database_url: str, db: asyncpg.Connection
) -> None:
    workload = small_workload(200)
    shop = Shop("naive")
    await shop.create(db, workload)

    await deliver(database_url, shop.handle, simultaneous(workload.deliveries), senders=16)

    outcome = await measure.measure(
        db, measure.shop_tables("naive"), workload.stock, authorized_intents(workload)
    )
    assert outcome.duplicate_orders > 0
    assert (outcome.duplicate_orders, outcome.oversold_units) == await recount(
        db, "naive", workload.stock
    )


async def test_postgres_lease_lets_a_second_copy_in_when_its_holder_stalls_past_the_ttl(
    database_url: str, db: asyncpg.Connection
) -> None:
    workload = small_workload(80)
    shop, backend = Shop("leased"), PostgresLease("leased")
    await shop.create(db, workload)
    await backend.create(db)
    leased = LeasedShop(shop, backend, ttl_ms=50, retry_ms=5, slow_share=0.5, slow_factor=2)

    await deliver(database_url, leased.handle, simultaneous(workload.deliveries), senders=16)

    outcome = await measure.measure(
        db, measure.shop_tables("leased"), workload.stock, authorized_intents(workload)
    )
    assert leased.stalls > 0
    assert outcome.duplicate_orders > 0
    assert (outcome.duplicate_orders, outcome.oversold_units) == await recount(
        db, "leased", workload.stock
    )


async def test_postgres_lease_keeps_one_order_per_intent_while_every_holder_is_quick(
    database_url: str, db: asyncpg.Connection
) -> None:
    """The lease itself works: the duplicates above come from its expiry alone."""
    workload = small_workload(80)
    shop, backend = Shop("leased"), PostgresLease("leased")
    await shop.create(db, workload)
    await backend.create(db)
    leased = LeasedShop(shop, backend, ttl_ms=10_000, retry_ms=5, slow_share=0.0)

    await deliver(database_url, leased.handle, simultaneous(workload.deliveries), senders=16)

    outcome = await measure.measure(
        db, measure.shop_tables("leased"), workload.stock, authorized_intents(workload)
    )
    assert leased.waits > 0  # copies did meet at the lease
    assert outcome.duplicate_orders == 0
    assert outcome.missing_orders == 0


async def test_counts_on_a_hand_made_state(db: asyncpg.Connection) -> None:
    """One duplicate placed order oversells sku-a by one unit; pi_4 has no order."""
    await Shop("hand").create_tables(db)
    await db.execute(
        """
        INSERT INTO hand.inventory VALUES ('sku-a', -1), ('sku-b', 8);
        INSERT INTO hand.orders (id, payment_intent_id, status, amount) OVERRIDING SYSTEM VALUE
        VALUES (1, 'pi_1', 'placed', 0), (2, 'pi_1', 'placed', 0),
               (3, 'pi_2', 'out_of_stock', 0), (4, 'pi_3', 'placed', 0);
        INSERT INTO hand.order_lines VALUES (1, 'sku-a', 3, 100), (2, 'sku-a', 3, 100),
                                            (3, 'sku-b', 2, 100), (4, 'sku-b', 2, 100);
        """
    )
    outcome = await measure.measure(
        db, measure.shop_tables("hand"), {"sku-a": 5, "sku-b": 10}, {"pi_1", "pi_2", "pi_3", "pi_4"}
    )
    assert outcome == measure.Outcome(
        orders=4,
        intents_with_order=3,
        duplicate_orders=1,
        oversold_units=1,  # 6 units of sku-a sold, 5 stocked
        stock_left=7,
        expected_stock_left=15 - 3 - 2,  # pi_1's first order and pi_3's
        missing_orders=1,
    )


async def test_counts_are_zero_where_intentflow_applied_the_same_workload(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    workload = small_workload(200)
    await seed_database(db, workload)
    await publish(infra, topic, workload.deliveries)
    settings = consumer_settings(infra, database_url, topic, relay_enabled=False)
    async with Worker(settings, exit_when_idle_s=1.0) as worker:
        await worker.run()

    outcome = await measure.measure(
        db, measure.INTENTFLOW, workload.stock, authorized_intents(workload)
    )
    assert outcome.orders == len(workload.intents)
    assert outcome.duplicate_orders == 0
    assert outcome.oversold_units == 0
    assert outcome.missing_orders == 0
    assert outcome.stock_left == outcome.expected_stock_left
    assert outcome.stock_left < sum(workload.stock.values())  # stock was taken

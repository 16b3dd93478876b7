"""`make demo`: the whole path on one machine, with no Docker, ending by itself.

Starts the embedded broker and PostgreSQL (or uses TEST_KAFKA_BOOTSTRAP_SERVERS /
TEST_DATABASE_URL when given), migrates a fresh database with
`order-consumer migrate`, seeds stock and carts, publishes a few hundred
payments' events with duplicates straight to Kafka (authorizations, captures,
cancellations, some before their authorization, and refunds), runs two
`order-consumer run` processes in one group until idle, prints what happened,
and ends with `order-consumer reconcile`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg

from devservices import services
from devservices.topics import create_topics
from loadtest import workload
from schemas import dlq_topic
from stripekit.publish import publish


async def run_command(argv: list[str], env: dict[str, str], log: Path) -> str:
    with log.open("ab") as err:
        process = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=err
        )
        stdout, _ = await process.communicate()
    if process.returncode != 0:
        print(stdout.decode(), end="")
        raise SystemExit(f"{' '.join(argv)} failed ({process.returncode}); see {log}")
    return stdout.decode()


async def demo(intents: int, consumers: int, keep_database: bool) -> None:
    with services() as infra:
        print(f"kafka:      {infra.kafka_origin} at {infra.kafka_bootstrap_servers}")
        print(f"postgresql: {infra.postgres_origin}")
        database = f"intentflow_demo_{secrets.token_hex(3)}"
        admin = await asyncpg.connect(infra.database_url)
        await admin.execute(f'CREATE DATABASE "{database}"')
        await admin.close()
        database_url = infra.database_url.rpartition("/")[0] + f"/{database}"
        topic = f"stripe.events.demo-{secrets.token_hex(3)}"
        orders_topic = f"orders.events.demo-{secrets.token_hex(3)}"
        await create_topics(infra.kafka_bootstrap_servers, topic, dlq_topic(topic), orders_topic)
        log = Path(tempfile.gettempdir()) / f"intentflow-demo-{secrets.token_hex(3)}.log"

        env = dict(os.environ)
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=infra.kafka_bootstrap_servers,
            KAFKA_ENABLE_IDEMPOTENCE=str(infra.kafka_enable_idempotence).lower(),
            KAFKA_TOPIC=topic,
            ORDERS_TOPIC=orders_topic,
            KAFKA_GROUP_ID=f"demo-{topic}",
            DATABASE_URL=database_url,
            # Small batches, so cancellations and refunds meet orders placed by earlier ones.
            BATCH_MAX_RECORDS="50",
        )
        consumer_cli = [sys.executable, "-m", "consumer"]
        await run_command([*consumer_cli, "migrate"], env, log)

        # Stock is tight on purpose: some orders must come out out_of_stock.
        work = workload.generate(
            intents,
            skus=40,
            capture_ratio=0.3,
            cancel_ratio=0.2,
            refund_ratio=0.3,
            stock_per_sku=40,
        )
        for evt in work.deliveries[::37]:  # a few payments that do not match their cart
            evt["data"]["object"]["amount"] += 1
        conn = await asyncpg.connect(database_url)
        try:
            await workload.seed_database(conn, work)
            stock_before = sum(work.stock.values())
            await publish(
                infra.kafka_bootstrap_servers,
                topic,
                work.deliveries,
                enable_idempotence=infra.kafka_enable_idempotence,
            )
            print(
                f"published:  {len(work.deliveries)} deliveries of {work.distinct_events} "
                f"events ({_by_type(work)}; {work.duplicates} duplicates) to {topic}"
            )
            runs = [
                run_command([*consumer_cli, "run", "--exit-when-idle", "5"], env, log)
                for _ in range(consumers)
            ]
            summaries = [
                json.loads(out.strip().splitlines()[-1]) for out in await asyncio.gather(*runs)
            ]
            await report(conn, summaries, stock_before, work)
            print()
            print(await run_command([*consumer_cli, "reconcile"], env, log), end="")
        finally:
            await conn.close()
            if not keep_database:
                admin = await asyncpg.connect(infra.database_url)
                await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
                await admin.close()
        print(f"consumer logs: {log}")
        if keep_database:
            print(f"database kept: {database_url}")


def _by_type(work: workload.Workload) -> str:
    seen: dict[str, str] = {}
    for evt in work.deliveries:
        seen[evt["id"]] = evt["type"].rpartition(".")[2]
    return ", ".join(f"{n} {kind}" for kind, n in Counter(seen.values()).most_common())


async def report(
    conn: asyncpg.Connection,
    summaries: list[dict[str, Any]],
    stock_before: int,
    work: workload.Workload,
) -> None:
    for i, s in enumerate(summaries, 1):
        print(
            f"consumer {i}: {s['events']} events in {s['batches']} batches, "
            f"{s['duplicates']} duplicates absorbed, orders {s['orders']}"
        )
    statuses = Counter(
        {
            r["status"]: r["n"]
            for r in await conn.fetch("SELECT status, count(*) AS n FROM orders GROUP BY 1")
        }
    )
    stock_after = await conn.fetchval("SELECT sum(stocked_quantity) FROM inventory_levels")
    sold_out = await conn.fetchval(
        "SELECT count(*) FROM inventory_levels WHERE stocked_quantity = 0"
    )
    unexplained = await conn.fetchval(
        """
        SELECT count(*) FROM inventory_levels l
        LEFT JOIN (SELECT sku, sum(quantity_delta) AS s FROM inventory_movements GROUP BY sku) m
          ON m.sku = l.sku
        WHERE coalesce(m.s, 0) <> l.stocked_quantity
        """
    )
    given_back = await conn.fetchrow(
        "SELECT count(DISTINCT order_id) AS orders, coalesce(sum(quantity_delta), 0) AS units"
        " FROM inventory_movements WHERE reason = 'cancellation'"
    )
    assert given_back is not None  # an aggregate always returns its row
    skipped = await conn.fetchval("SELECT count(*) FROM orders WHERE allocation = 'skipped'")
    processed = await conn.fetchval("SELECT count(*) FROM processed_events")
    absorbed = sum(s["duplicates"] for s in summaries)
    print()
    print(f"events applied once:     {processed} of {work.distinct_events}")
    print(f"duplicates absorbed:     {absorbed} of {work.duplicates} published")
    print("orders by status:        " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    print(f"stock:                   {stock_before} units before, {stock_after} left", end="")
    print(f", {sold_out} SKUs sold out")
    print(
        f"cancellations:           {given_back['units']} units given back by "
        f"{given_back['orders']} canceled orders; {skipped} created canceled (no stock taken)"
    )
    outbox = await conn.fetch(
        "SELECT kind, state, count(*) AS n FROM outbox GROUP BY 1, 2 ORDER BY 1, 2"
    )
    rows = {(r["kind"], r["state"]): r["n"] for r in outbox}
    published = rows.get(("order_event", "done"), 0)
    waiting = rows.get(("stripe_action", "pending"), 0)
    print(f"order events published:  {published} (one per order change, on the orders topic)")
    print(
        f"stripe actions:          {waiting} cancels of out_of_stock authorizations wait for "
        "STRIPE_API_KEY (none given to the demo)"
    )
    print(f"one order per intent:    {sum(statuses.values()) == len(work.intents)}")
    print(f"movements explain stock: {unexplained == 0}")
    ok = (
        processed == work.distinct_events
        and sum(statuses.values()) == len(work.intents)
        and unexplained == 0
        and absorbed == work.duplicates
        and published == sum(n for (kind, _), n in rows.items() if kind == "order_event")
    )
    print(f"\n{'all invariants held' if ok else 'INVARIANT VIOLATED'}")
    if not ok:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.demo", description=__doc__)
    parser.add_argument("--intents", type=int, default=300)
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument(
        "--keep-database", action="store_true", help="keep the demo's database (a given server)"
    )
    args = parser.parse_args()
    asyncio.run(demo(args.intents, args.consumers, args.keep_database))


if __name__ == "__main__":
    main()

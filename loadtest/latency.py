"""Quiet-time latency of the consumer: from an event's `received-at` to its order's transaction.

`python -m loadtest.latency [--events N] [--gap-ms G] [--fetch-max-wait-ms W ...]`
starts the embedded (or given) services, runs one consumer in this process, and
publishes one authorization at a time, G ms apart, each stamped `received-at`
= now as the bridge would stamp it. The latency of each is its order's
`created_at` (the transaction's start, a few ms before its commit) minus that
stamp. One row per FETCH_MAX_WAIT_MS given, each on a fresh topic and database.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from collections.abc import Callable
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer

from consumer.migrate import migrate
from consumer.settings import ConsumerSettings
from consumer.worker import Worker
from devservices import Services, services
from devservices.topics import create_topics
from schemas import contract_headers, dlq_topic, encode_key
from stripekit import events


async def measure(
    infra: Services, events_n: int, gap_ms: float, fetch_max_wait_ms: int
) -> list[float]:
    """Each event's latency in ms, in the order sent."""
    name = f"intentflow_latency_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(infra.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = infra.database_url.rpartition("/")[0] + f"/{name}"
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        await conn.execute("INSERT INTO inventory_levels VALUES ('sku-lat', 1000000)")
        await conn.execute("INSERT INTO carts VALUES ('cart-lat', 'usd')")
        await conn.execute(
            "INSERT INTO cart_items (cart_id, sku, quantity, unit_amount)"
            " VALUES ('cart-lat', 'sku-lat', 1, 100)"
        )
        topic = f"stripe.events.latency-{secrets.token_hex(3)}"
        await create_topics(infra.kafka_bootstrap_servers, topic, dlq_topic(topic))
        settings = ConsumerSettings(
            kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
            kafka_enable_idempotence=infra.kafka_enable_idempotence,
            kafka_topic=topic,
            kafka_group_id=f"latency-{topic}",
            database_url=url,
            relay_enabled=False,
            fetch_max_wait_ms=fetch_max_wait_ms,
        )
        sent = await _run(infra, settings, topic, events_n, gap_ms)
        rows = await conn.fetch(
            "SELECT payment_intent_id, extract(epoch FROM created_at) * 1000 AS at_ms FROM orders"
        )
        at = {r["payment_intent_id"]: float(r["at_ms"]) for r in rows}
        assert len(at) == events_n, f"{len(at)} orders for {events_n} events"
        return [at[pid] - ms for pid, ms in sent.items()]
    finally:
        await conn.close()
        admin = await asyncpg.connect(infra.database_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _run(
    infra: Services, settings: ConsumerSettings, topic: str, events_n: int, gap_ms: float
) -> dict[str, int]:
    producer = AIOKafkaProducer(
        bootstrap_servers=infra.kafka_bootstrap_servers,
        acks="all",
        enable_idempotence=infra.kafka_enable_idempotence,
    )
    await producer.start()
    sent: dict[str, int] = {}
    try:
        async with Worker(settings) as worker:
            run = asyncio.ensure_future(worker.run())
            await until(run, lambda: bool(worker.assignment()))
            await asyncio.sleep(1.0)  # past the first fetches of a fresh assignment
            for i in range(events_n):
                pid = f"pi_latency_{i}"
                evt = events.intent_event(pid, amount=100, cart_id="cart-lat")
                now_ms = int(time.time() * 1000)
                headers = contract_headers(evt["id"], evt["type"], now_ms)
                ack = await producer.send(
                    topic, events.encode(evt), key=encode_key(pid), headers=headers
                )
                await ack
                sent[pid] = now_ms
                await asyncio.sleep(gap_ms / 1000)
            await until(run, lambda: worker.stats.events >= events_n)
            worker.request_stop()
            await run
    finally:
        await producer.stop()
    return sent


async def until(run: asyncio.Future[Any], holds: Callable[[], bool]) -> None:
    """Poll `holds` while the worker runs; a worker that stopped early raises its error."""
    while not holds():
        if run.done():
            run.result()
            raise RuntimeError("the consumer stopped before the probe was done")
        await asyncio.sleep(0.02)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace) -> None:
    with services() as infra:
        print(f"{args.events} events, one at a time, {args.gap_ms:g} ms apart; latency in ms")
        print(f"{'fetch_max_wait_ms':>18} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}")
        for wait_ms in args.fetch_max_wait_ms:
            lat = await measure(infra, args.events, args.gap_ms, wait_ms)
            print(
                f"{wait_ms:>18} {quantile(lat, 0.5):>7.1f} {quantile(lat, 0.95):>7.1f} "
                f"{quantile(lat, 0.99):>7.1f} {max(lat):>7.1f}"
            )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.latency", description=__doc__)
    p.add_argument("--events", type=int, default=300)
    p.add_argument("--gap-ms", type=float, default=5.0)
    p.add_argument("--fetch-max-wait-ms", type=int, nargs="+", default=[500, 50], metavar="MS")
    return p


if __name__ == "__main__":
    asyncio.run(main(parser().parse_args()))

"""Helpers for the integration and end-to-end tests: seeding, publishing, running consumers."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from pydantic import SecretStr

from intentflow.consumer.settings import ConsumerSettings
from intentflow.devservices import Services
from intentflow.stripekit import events
from intentflow.stripekit.publish import publish as publish_events


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout_s: float = 30, interval_s: float = 0.05
) -> None:
    """Poll `check` until it holds; fail with TimeoutError after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await asyncio.sleep(interval_s)


def consumer_settings(
    infra: Services, database_url: str, topic: str, **overrides: Any
) -> ConsumerSettings:
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": infra.kafka_bootstrap_servers,
        "kafka_enable_idempotence": infra.kafka_enable_idempotence,
        "kafka_topic": topic,
        "kafka_group_id": f"group-{topic}",
        "database_url": database_url,
        "retry_initial_s": 0.05,
        "retry_max_s": 0.5,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 500,
        "consumer_http_port": 0,  # several consumers run at once: any free port each
    }
    values.update(overrides)
    return ConsumerSettings(**values)


def consumer_env(settings: ConsumerSettings) -> dict[str, str]:
    """The environment that gives a consumer process `settings` (unset stays unset)."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is None:
            env.pop(name.upper(), None)
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


async def publish(
    infra: Services,
    topic: str,
    payloads: Iterable[dict[str, Any] | bytes],
    *,
    partition: int | None = None,
    key: bytes | None = None,
) -> None:
    """Publish events as the bridge would (see stripekit.publish)."""
    await publish_events(
        infra.kafka_bootstrap_servers,
        topic,
        payloads,
        enable_idempotence=infra.kafka_enable_idempotence,
        partition=partition,
        key=key,
    )


async def seed_stock(db: asyncpg.Connection, levels: dict[str, int]) -> None:
    await db.executemany(
        "INSERT INTO inventory_levels (sku, stocked_quantity) VALUES ($1, $2)", list(levels.items())
    )


async def seed_cart(
    db: asyncpg.Connection, cart_id: str, lines: list[tuple[str, int, int]], currency: str = "usd"
) -> int:
    """Create a cart of (sku, quantity, unit_amount) lines; return its total."""
    await db.execute("INSERT INTO carts (id, currency) VALUES ($1, $2)", cart_id, currency)
    await db.executemany(
        "INSERT INTO cart_items (cart_id, sku, quantity, unit_amount) VALUES ($1, $2, $3, $4)",
        [(cart_id, sku, qty, unit) for sku, qty, unit in lines],
    )
    return sum(qty * unit for _, qty, unit in lines)


async def paid_carts(
    db: asyncpg.Connection, count: int, lines: list[tuple[str, int, int]]
) -> list[dict[str, Any]]:
    """`count` carts of `lines` (cart-0 …) and the authorization that pays each (pi_0 …)."""
    authorizations = []
    for i in range(count):
        total = await seed_cart(db, f"cart-{i}", lines)
        authorizations.append(events.intent_event(f"pi_{i}", amount=total, cart_id=f"cart-{i}"))
    return authorizations


@dataclass
class Snapshot:
    """The database's state, summarised for assertions."""

    orders: dict[str, str]  # payment intent -> status
    levels: dict[str, int]
    movements: dict[str, int]  # sku -> sum of deltas
    order_movements: int  # rows with reason 'order'
    processed: int

    def assert_movements_explain_levels(self) -> None:
        """Invariant 4: for every SKU, the sum of its movements is its level."""
        assert self.movements == {sku: q for sku, q in self.levels.items() if sku in self.movements}
        assert set(self.levels) == set(self.movements)


async def snapshot(db: asyncpg.Connection) -> Snapshot:
    orders = {r["payment_intent_id"]: r["status"] for r in await db.fetch("SELECT * FROM orders")}
    levels = {
        r["sku"]: r["stocked_quantity"]
        for r in await db.fetch("SELECT sku, stocked_quantity FROM inventory_levels")
    }
    movements = {
        r["sku"]: r["total"]
        for r in await db.fetch(
            "SELECT sku, sum(quantity_delta)::int AS total FROM inventory_movements GROUP BY sku"
        )
    }
    order_movements = await db.fetchval(
        "SELECT count(*) FROM inventory_movements WHERE reason = 'order'"
    )
    processed = await db.fetchval("SELECT count(*) FROM processed_events")
    return Snapshot(orders, levels, movements, order_movements, processed)


async def read_topic(
    bootstrap: str, topic: str, expected: int, timeout_s: float = 5.0, settle_s: float = 0.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of `topic`, waiting up to `timeout_s` until at least `expected` arrived.

    With `settle_s`, it reads on that long after reaching `expected`, so that a
    record beyond the expected ones is caught too.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        await consumer._client._wait_on_metadata(topic)
        parts = consumer.partitions_for_topic(topic) or set()
        partitions = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=100)
            for part in batch.values():
                records.extend(part)
            if len(records) >= expected and expected > 0:
                deadline = min(deadline, asyncio.get_running_loop().time() + settle_s)
                expected = 0  # from here on, read until the (settled) deadline
        return records
    finally:
        await consumer.stop()


class ConsumerProcess:
    """`order-consumer run` as a separate OS process, as an operator would start it."""

    def __init__(self, settings: ConsumerSettings, exit_when_idle_s: float = 4.0) -> None:
        self._argv = [
            sys.executable,
            "-m",
            "intentflow.consumer",
            "run",
            "--exit-when-idle",
            str(exit_when_idle_s),
        ]
        self._env = consumer_env(settings)
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> ConsumerProcess:
        self.process = await asyncio.create_subprocess_exec(
            *self._argv, env=self._env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        return self

    async def wait(self, timeout_s: float = 60) -> dict[str, Any]:
        """Wait for the process to exit by itself; return its summary."""
        assert self.process is not None
        stdout, stderr = await asyncio.wait_for(self.process.communicate(), timeout_s)
        assert self.process.returncode == 0, stderr.decode()[-3000:]
        return dict(json.loads(stdout.decode().strip().splitlines()[-1]))

    def terminate(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()

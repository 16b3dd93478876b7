"""A database connection that goes silent: the consumer and the relay alone, as processes.

A failover whose old primary drops packets leaves the connections open at that
moment without an answer and without a reset, while new connections reach the new
server. `Proxy.freeze()` stages it in front of PostgreSQL: the open connections stop
carrying bytes, new ones go through. What must hold: every unit of work ends by its
deadline (its connection closed without waiting for the server), the work is done on
a fresh connection, /readyz says so meanwhile and /healthz does not fail, and
SIGTERM still exits 0 within SHUTDOWN_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from intentflow.devservices import Services
from intentflow.devservices.embedded import free_port
from intentflow.devservices.proxy import Proxy
from tests.e2e.test_consumer_process import Running, json_lines
from tests.support import (
    consumer_env,
    consumer_settings,
    eventually,
    paid_carts,
    publish,
    seed_stock,
)

pytestmark = pytest.mark.timeout(90)

# Small timeouts, so that a deadline (2 x statement timeout + connect timeout: 4 s for
# a batch) passes in seconds; the server ends a session idle in a transaction after 2 s.
FAST = {"db_statement_timeout_ms": 1000, "db_connect_timeout_s": 2.0, "shutdown_timeout_s": 6.0}


@contextlib.asynccontextmanager
async def behind_proxy(database_url: str) -> AsyncIterator[tuple[Proxy, str]]:
    url = urlsplit(database_url)
    proxy = await Proxy(url.hostname or "127.0.0.1", url.port or 5432).start()
    try:
        yield proxy, urlunsplit(url._replace(netloc=f"{url.username}@127.0.0.1:{proxy.port}"))
    finally:
        await proxy.cut()


async def applied(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM processed_events"))


class Probes:
    """Every answer of /healthz and /readyz, each asked every 0.2 s until stopped, as the
    kubelet asks them (deploy/k8s/consumer.yaml): an answer not given within 5 s counts,
    as (0, "no answer within 5 s"), the kubelet's failure."""

    TIMEOUT_S = 5.0

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.health: list[tuple[int, str]] = []
        self.ready: list[tuple[int, str]] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def _watch(self, path: str, seen: list[tuple[int, str]]) -> None:
        async with httpx.AsyncClient(timeout=self.TIMEOUT_S) as client:
            while True:
                try:
                    answer = await client.get(self.base + path)
                    seen.append((answer.status_code, answer.text.strip()))
                except httpx.TimeoutException:
                    seen.append((0, f"no answer within {self.TIMEOUT_S:g} s"))
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)

    def __enter__(self) -> Probes:
        # One loop per probe: a readiness check that hangs does not stop the liveness ones.
        self._tasks = [
            asyncio.create_task(self._watch("/healthz", self.health)),
            asyncio.create_task(self._watch("/readyz", self.ready)),
        ]
        return self

    def __exit__(self, *_: object) -> None:
        for task in self._tasks:
            task.cancel()

    def not_ready(self) -> list[str]:
        """Why /readyz said no: its 503s, and the answers it did not give in time."""
        return [why for code, why in self.ready if code != 200]


async def test_a_consumer_whose_connections_go_silent_applies_on_fresh_ones_and_says_so(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    await seed_stock(db, {"sku-a": 100})
    carts = await paid_carts(db, 8, [("sku-a", 1, 100)])
    port = free_port()
    async with behind_proxy(database_url) as (proxy, through_proxy):
        # A back-off long enough for the probes to see it (0.5 to 1 s at first).
        settings = consumer_settings(
            infra, through_proxy, topic, consumer_http_port=port,
            retry_initial_s=1.0, retry_max_s=2.0, **FAST,
        )  # fmt: skip
        async with contextlib.AsyncExitStack() as stack:
            consumer = await Running(consumer_env(settings), "--exit-when-idle", "120").start()
            stack.push_async_callback(consumer.close)
            await consumer.until_logged("partitions_assigned")
            await publish(infra, topic, carts[:3])
            await eventually(lambda: applied_is(db, 3), timeout_s=30)
            frozen_at = time.monotonic()
            assert proxy.freeze() >= 1  # the pool's connection, and the relay's
            await publish(infra, topic, carts[3:])
            await asyncio.sleep(1)  # the batch is waiting on the silent connection
            with Probes(port) as probes:
                await eventually(lambda: applied_is(db, 8), timeout_s=40)
                took_s = time.monotonic() - frozen_at
                await asyncio.sleep(0.5)
            # Within a batch's deadline (4 s), a back-off and a fresh connection; without
            # the deadline the batch would wait for the kernel (about 15 minutes).
            assert took_s > 3, took_s  # it did wait on the silent connection
            assert took_s < 20, took_s
            assert probes.health and {code for code, _ in probes.health} == {200}, probes.health
            not_ready = [why for code, why in probes.ready if code == 503]
            assert "waiting out a failure: database_unreachable" in not_ready, probes.ready

            sent = consumer.send(signal.SIGTERM)
            assert await consumer.exited(timeout_s=15) == 0, consumer.stderr
            assert time.monotonic() - sent < FAST["shutdown_timeout_s"]
    waits = [e for e in json_lines(consumer.stderr) if e["event"] == "database_unavailable"]
    assert waits and {w["cause"] for w in waits} == {"database_unreachable"}, waits
    assert "NoAnswer" in waits[0]["error"], waits[0]
    assert consumer.summary()["events"] == 8


async def applied_is(db: asyncpg.Connection, count: int) -> bool:
    return await applied(db) >= count


async def test_sigterm_while_a_batch_hangs_on_a_silent_connection_exits_0_on_time(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """The batch's own deadline is a minute away (a 30 s statement timeout): the stop
    alone must end it, and the pools, without waiting for the server."""
    await seed_stock(db, {"sku-a": 100})
    carts = await paid_carts(db, 4, [("sku-a", 1, 100)])
    async with behind_proxy(database_url) as (proxy, through_proxy):
        settings = consumer_settings(
            infra, through_proxy, topic, db_statement_timeout_ms=30_000, shutdown_timeout_s=6.0
        )
        async with contextlib.AsyncExitStack() as stack:
            consumer = await Running(consumer_env(settings), "--exit-when-idle", "120").start()
            stack.push_async_callback(consumer.close)
            await consumer.until_logged("partitions_assigned")
            await publish(infra, topic, carts[:1])
            await eventually(lambda: applied_is(db, 1), timeout_s=30)
            proxy.freeze()
            await publish(infra, topic, carts[1:])
            await asyncio.sleep(2)  # polled, and waiting on the silent connection
            assert await applied(db) == 1
            sent = consumer.send(signal.SIGTERM)
            assert await consumer.exited(timeout_s=20) == 0, consumer.stderr
            took_s = time.monotonic() - sent
    assert took_s < settings.shutdown_timeout_s, (took_s, consumer.stderr[-3000:])
    assert consumer.logged("batch_abandoned"), consumer.stderr[-3000:]
    assert not consumer.logged("exiting_now")


async def test_the_relay_alone_publishes_on_a_fresh_connection_and_stops_on_time(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    async def insert_order_events(first: int, count: int) -> None:
        await db.execute(
            "INSERT INTO outbox (kind, name, payment_intent_id, order_id, payload)"
            " SELECT 'order_event', 'order.placed', 'pi_' || g, g, '{\"order\": {}}'"
            " FROM generate_series($1::int, $2::int) g",
            first,
            first + count - 1,
        )

    async def published(count: int) -> bool:
        done = await db.fetchval("SELECT count(*) FROM outbox WHERE state = 'done'")
        return bool(done >= count)

    port = free_port()
    async with behind_proxy(database_url) as (proxy, through_proxy):
        # A back-off of 1.5 to 3 s: long enough for the probes to see it on a busy
        # machine, where one /readyz can take seconds while the connections are silent.
        settings = consumer_settings(
            infra, through_proxy, topic, relay_poll_interval_s=0.05, consumer_http_port=port,
            retry_initial_s=3.0, retry_max_s=4.0, **FAST,
        )  # fmt: skip
        relay = await Running(consumer_env(settings), command="relay").start()
        try:
            await insert_order_events(1, 2)
            await eventually(lambda: published(2), timeout_s=30)

            frozen_at = time.monotonic()
            assert proxy.freeze() >= 1
            await insert_order_events(3, 3)
            # The relay alone serves the same probes: alive throughout, not ready while
            # it waits out the connection its deadline ended.
            with Probes(port) as probes:
                await eventually(lambda: published(5), timeout_s=40)
                took_s = time.monotonic() - frozen_at
                # Until both probes have answered at least once after the freeze.
                await eventually(
                    lambda: bool(probes.health and probes.ready), timeout_s=2 * Probes.TIMEOUT_S
                )
            assert {code for code, _ in probes.health} == {200}, probes.health
            # When it waited on a silent connection (its pool may instead have opened a new
            # one after the freeze, which passes): not ready meanwhile, said (503), or, while
            # the readiness check itself waited on one, not answered in the kubelet's time.
            assert took_s <= 3 or probes.not_ready(), (took_s, probes.ready)
            # A claim's deadline here: 2 x (statement + connect timeout) + 2 x statement
            # timeout, 8 s; then a back-off and a fresh connection.
            assert took_s < 25, took_s

            proxy.freeze()  # again, with a claim about to hang on it
            await insert_order_events(6, 1)
            await asyncio.sleep(0.5)
            sent = relay.send(signal.SIGTERM)
            assert await relay.exited(timeout_s=15) == 0, relay.stderr
            assert time.monotonic() - sent < FAST["shutdown_timeout_s"]
        finally:
            await relay.close()
    waits = relay.logged("relay_waiting")
    # Each wait it logged was for the silent connections; and it logged one when it took
    # the deadline's time (its pool may have opened a new connection after the freeze).
    assert {w["cause"] for w in waits} <= {"database_unreachable"}, waits
    assert took_s <= 3 or waits, (took_s, waits)
    assert not relay.logged("exiting_now")

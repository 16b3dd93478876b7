"""Processes started as a user would: `make demo`'s entry point and a SIGTERM'd consumer."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys

import asyncpg

from devservices import Services
from tests.support import (
    ConsumerProcess,
    consumer_settings,
    eventually,
    paid_carts,
    publish,
    seed_stock,
    snapshot,
)


async def test_sigterm_drains_commits_and_leaves_so_a_successor_repeats_nothing(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    await seed_stock(db, {"sku-a": 10_000})
    batch = await paid_carts(db, 400, [("sku-a", 1, 100)])
    # Small batches, so that SIGTERM lands while there is still work left.
    settings = consumer_settings(infra, database_url, topic, batch_max_records=10)
    first = await ConsumerProcess(settings, exit_when_idle_s=60).start()
    await publish(infra, topic, batch)

    async def some_orders() -> bool:
        return int(await db.fetchval("SELECT count(*) FROM orders")) >= 20

    await eventually(some_orders)
    assert first.process is not None
    first.process.send_signal(signal.SIGTERM)
    stopped = await first.wait(timeout_s=30)  # exit code 0, with its summary

    successor = await ConsumerProcess(settings, exit_when_idle_s=4).start()
    finished = await successor.wait()
    assert finished["duplicates"] == 0  # everything the first applied was committed
    assert 0 < stopped["events"] < 400  # the signal came mid-run: the successor had work
    assert stopped["events"] + finished["events"] == 400
    state = await snapshot(db)
    assert len(state.orders) == 400
    assert state.levels == {"sku-a": 10_000 - 400}


async def test_demo_runs_to_the_end_and_reports_invariants_held(infra: Services) -> None:
    env = dict(os.environ)
    env["TEST_KAFKA_BOOTSTRAP_SERVERS"] = infra.kafka_bootstrap_servers
    env["TEST_KAFKA_ENABLE_IDEMPOTENCE"] = str(infra.kafka_enable_idempotence).lower()
    env["TEST_DATABASE_URL"] = infra.database_url
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.demo", "--intents", "80",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 90)
    out = stdout.decode()
    assert process.returncode == 0, out + stderr.decode()[-2000:]
    published = re.search(r"deliveries of (\d+) events", out)
    assert published is not None, out
    events = published.group(1)
    assert f"events applied once:     {events} of {events}" in out
    assert "all invariants held" in out
    # The demo ends with `order-consumer reconcile`, which found nothing.
    assert "order_status_matches_intent: OK" in out and "violation" not in out

"""Processes started as a user would: `make demo`'s entry point and a SIGTERM'd consumer."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import asyncpg

from intentflow.devservices import Services
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


async def test_demo_runs_to_the_end_on_given_services_and_every_check_holds(
    infra: Services, tmp_path: Path
) -> None:
    """`make demo`'s entry point, on services given in the environment as an operator's."""
    env = dict(os.environ)
    env["KAFKA_BOOTSTRAP_SERVERS"] = infra.kafka_bootstrap_servers
    env["KAFKA_ENABLE_IDEMPOTENCE"] = str(infra.kafka_enable_idempotence).lower()
    env["DATABASE_URL"] = infra.database_url
    report_json = tmp_path / "demo.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "intentflow.loadtest.demo", "--intents", "150",
        "--report-json", str(report_json), "--report-html", str(tmp_path / "demo.html"),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 90)
    out = stdout.decode()
    assert process.returncode == 0, out + stderr.decode()[-2000:]
    assert "every check held" in out
    report = json.loads(report_json.read_text())
    assert report["services"]["postgres"].startswith("given (DATABASE_URL)")
    assert report["config"]["consumers"] == 2
    reconciled = next(c for c in report["checks"] if c["name"] == "order-consumer reconcile")
    assert reconciled["ok"] and re.fullmatch(r"(\d+) of \1 checks OK", reconciled["found"])
    # The scratch database is gone from the given server.
    admin = await asyncpg.connect(infra.database_url)
    try:
        left = await admin.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'intentflow_replay_%'"
        )
    finally:
        await admin.close()
    assert left == 0

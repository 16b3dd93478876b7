"""`replay-duplicates` run small, as a user runs it: through the bridge, with every fault.

The harness starts its own embedded broker and PostgreSQL (it needs to own
them to cut the bridge off from the broker and to restart the database), the
bridge and two consumers; a few hundred intents' histories are delivered with
duplicates and reordering while one fault of each kind is injected. The
webhook outage loses deliveries for good, so the harness mends it as an
operator would: `reconcile --with-stripe` must see it, `backfill` must publish
exactly the events never delivered, and `reconcile --with-stripe` must then see
nothing. The report must say every check held, with the documented JSON
fields, and the HTML page must hold its charts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(240)

KINDS = {"consumer-kill", "broker-outage", "db-connections", "db-restart", "webhook-outage"}
MENDING = (
    "reconcile --with-stripe sees the outage",
    "backfill publishes the events never delivered",
    "reconcile --with-stripe after the backfill",
)


def test_a_small_replay_with_every_fault_holds_every_check(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "REDIS_URL")
    }
    report_json, report_html = tmp_path / "report.json", tmp_path / "report.html"
    argv = [
        sys.executable, "-m", "intentflow.loadtest",
        "--intents", "300", "--duplicates", "3", "--reorder", "0.2", "--rate", "250",
        "--consumers", "2", "--chaos", "all", "--chaos-every", "1", "--chaos-down", "2",
        "--report-json", str(report_json), "--report-html", str(report_html),
    ]  # fmt: skip
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=220)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "every check held" in run.stdout

    report = json.loads(report_json.read_text())
    assert report["ok"] is True
    assert report["oversold_units"] == 0
    assert report["lost_events"] == 0
    assert report["duplicate_orders"] == 0
    assert report["events_per_s"] > 0
    assert report["latency_ms"]["p99"] > 0
    assert report["latency_ms"]["count"] == report["events_distinct"]
    assert report["config"]["out_of_order_events"] > 0
    # Every event was delivered more than once on average; the copies were absorbed.
    assert report["deliveries"] > report["events_distinct"]
    # (At least: a webhook answered 503 may still have reached the topic, a late copy.)
    assert report["duplicates_absorbed"] >= report["deliveries"] - report["events_distinct"]
    assert all(c["ok"] for c in report["checks"]), report["checks"]
    faults = report["faults"]
    assert {f["kind"] for f in faults} >= KINDS
    assert all(f["survived"] for f in faults)
    # The bridge really was cut off: some webhooks were answered 503 and sent again.
    assert report["retried"] > 0
    assert report["orders_found"].get("canceled", 0) == report["orders_expected"]["canceled"]
    # The outage dropped deliveries; every event was applied in the end, thanks to the backfill.
    (outage,) = [f for f in faults if f["kind"] == "webhook-outage"]
    assert not outage["detail"].startswith("0 deliveries"), outage
    mending = {c["name"]: c for c in report["checks"] if c["name"] in MENDING}
    assert set(mending) == set(MENDING)
    assert mending["backfill publishes the events never delivered"]["expected"] != "0", mending

    page = report_html.read_text()
    for chart in ("chart-throughput", "chart-latency", "chart-orders"):
        assert f'id="{chart}"' in page
    assert "broker-outage" in page
    assert "http://" not in page and "https://" not in page

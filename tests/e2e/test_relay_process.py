"""`order-consumer relay` alone, as an operator runs it: its probes, its metrics, its port.

The relay performs two out_of_stock orders' cancels against the Stripe emulator
(through the recording proxy) and publishes their order events; its /metrics,
scraped while it runs, must count what the outbox and the proxy say happened,
and read the backlog and the money owed from the database at scrape time.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from intentflow.consumer.outbox import Action
from intentflow.consumer.settings import ConsumerSettings
from intentflow.devservices.embedded import free_port
from tests.alert_rules import metrics_used, shipped_groups
from tests.integration.stripe_support import (
    Shop,
    authorize,
    cancels,
    reaped,
    shop,
    start_consumer,
)
from tests.support import consumer_env, eventually, seed_stock

__all__ = ["shop"]

pytestmark = pytest.mark.timeout(60)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_the_relay_alone_serves_probes_and_metrics_that_count_what_it_did(
    shop: Shop,
) -> None:
    await shop.db.execute("DELETE FROM inventory_levels")
    await seed_stock(shop.db, {"sku-mug": 0})
    held = [await authorize(shop, quantity=1) for _ in range(2)]  # both out_of_stock
    port = free_port()
    settings = shop.settings_with(consumer_http_port=port)
    base = f"http://127.0.0.1:{port}"

    async def nothing_pending() -> bool:
        n = await shop.db.fetchval("SELECT count(*) FROM outbox WHERE state = 'pending'")
        return bool(n == 0)

    process = await start_consumer(settings, "relay")
    async with reaped(process), httpx.AsyncClient(base_url=base, timeout=5) as client:

        async def ready() -> bool:
            try:
                return (await client.get("/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(ready, timeout_s=20)
        await eventually(nothing_pending, timeout_s=20)
        done = await client.get("/metrics")
        healthz = await client.get("/healthz")

        # Read at scrape time: a row pending for a minute, and a captured out_of_stock
        # order with no refund asked (owed).
        pid = held[0].payment_intent_id
        await shop.db.execute(
            "UPDATE outbox SET state = 'pending', done_at = NULL,"
            " due_at = now() + interval '1 hour', created_at = now() - interval '60 seconds'"
            " WHERE payment_intent_id = $1 AND name = $2",
            pid,
            str(Action.CANCEL),
        )
        await shop.db.execute(
            "UPDATE payment_intents SET status = 'succeeded' WHERE id = $1;",
            held[1].payment_intent_id,
        )
        await shop.db.execute(
            "UPDATE orders SET amount_captured = amount WHERE payment_intent_id = $1",
            held[1].payment_intent_id,
        )
        later = parse((await client.get("/metrics")).text)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0

    assert healthz.status_code == 200 and healthz.text == "alive\n"
    assert done.headers["content-type"].startswith("text/plain; version=")
    samples = parse(done.text)
    events = await shop.db.fetchval(
        "SELECT count(*) FROM outbox WHERE kind = 'order_event' AND outcome = 'published'"
    )
    assert events >= 2
    answers = {
        (dict(k)["action"], dict(k)["outcome"]): v
        for (n, k), v in samples.items()
        if n == "intentflow_relay_stripe_actions_total" and v
    }
    assert (
        answers
        == {(str(Action.CANCEL), "succeeded"): 2}
        == {
            (str(Action.CANCEL), "succeeded"): sum(
                len(cancels(shop.proxy, h.payment_intent_id)) for h in held
            )
        }
    )
    assert value(samples, "intentflow_relay_order_events_total", outcome="published") == events
    assert value(samples, "intentflow_relay_order_events_total", outcome="rejected") == 0
    pending = {
        (dict(k)["kind"], dict(k)["action"]): v
        for (n, k), v in samples.items()
        if n == "intentflow_relay_pending_rows"
    }
    assert pending and set(pending.values()) == {0.0}
    assert value(samples, "intentflow_relay_oldest_pending_seconds") == 0
    assert value(samples, "intentflow_consumer_refunds_owed") == 0
    [build] = [dict(k) for (n, k), _ in samples.items() if n == "intentflow_build_info"]
    assert build["service"] == "order-consumer"
    assert value(samples, "process_start_time_seconds") > 0

    # Every metric the relay's alert rules read is in the relay alone's scrape.
    names = {name for name, _ in samples}
    relay_rules = [
        r for g in shipped_groups() if g["name"] == "intentflow-relay" for r in g["rules"]
    ]
    assert relay_rules
    for rule in relay_rules:
        assert metrics_used(rule["expr"]) <= names, rule["alert"]

    key = ("stripe_action", str(Action.CANCEL))
    assert value(later, "intentflow_relay_pending_rows", kind=key[0], action=key[1]) == 1
    assert 60 <= value(later, "intentflow_relay_oldest_pending_seconds") < 120
    assert value(later, "intentflow_consumer_refunds_owed") == 1


@pytest.mark.parametrize("command", ["run", "relay"])
async def test_a_consumer_http_port_already_taken_is_one_line_and_exit_2(command: str) -> None:
    """Before anything connects: no database or broker is needed to say it."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        # Nothing listens at these: the port is checked before either is asked.
        settings = ConsumerSettings(
            consumer_http_port=port,
            database_url="postgresql://nobody@127.0.0.1:1/none",
            kafka_bootstrap_servers="127.0.0.1:1",
        )
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "intentflow.consumer", command),
            env=consumer_env(settings),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2, stderr.decode()[-2000:]
    [line] = stderr.decode().splitlines()
    assert '"event": "cannot_start"' in line or '"event":"cannot_start"' in line, line
    assert f"cannot listen on 127.0.0.1:{port}" in line
    assert "set CONSUMER_HTTP_HOST/CONSUMER_HTTP_PORT to a free address" in line

"""/metrics of a running bridge and a running consumer, scraped after a small replay.

The harness's stack (loadtest/stack.py) runs the bridge and a consumer as OS
processes on the test's services; a few dozen intents' histories go through
the bridge with duplicates and reordering. Each counter must have moved by
what the database, the topic and the sender's tally say happened, and the
lag and latency series must be there.
"""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from intentflow.consumer import owed
from intentflow.consumer.decisions import OrderStatus
from intentflow.consumer.settings import ConsumerSettings
from intentflow.devservices import Services
from intentflow.loadtest import delivery, readback
from intentflow.loadtest.stack import Stack, StackOptions
from intentflow.loadtest.workload import scenario, seed_scenario
from tests.alert_rules import HISTOGRAM_SUFFIX, metrics_used, rules, shipped_groups
from tests.support import read_topic

pytestmark = pytest.mark.timeout(180)

PUBLISHED = "SELECT count(*) FROM outbox WHERE kind = 'order_event' AND outcome = 'published'"
PENDING_ACTIONS = (
    "SELECT name, count(*) FROM outbox WHERE kind = 'stripe_action' AND state = 'pending'"
    " GROUP BY name"
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def labelled(samples: Samples, name: str, label: str) -> dict[str, float]:
    """name{label=...} -> value, for every series of `name`."""
    return {dict(key)[label]: v for (n, key), v in samples.items() if n == name}


async def topic_records(bootstrap: str, topic: str, expected: int) -> int:
    """How many records the topic holds, read back (the embedded broker's end offset is the
    last batch's first offset + 1, not the log's end, when the bridge batched records)."""
    return len(await read_topic(bootstrap, topic, expected, timeout_s=10, settle_s=0.5))


async def test_bridge_and_consumer_metrics_move_by_what_a_replay_did(
    infra: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", infra.kafka_bootstrap_servers)
    monkeypatch.setenv("KAFKA_ENABLE_IDEMPOTENCE", str(infra.kafka_enable_idempotence).lower())
    monkeypatch.setenv("DATABASE_URL", infra.database_url)
    world = scenario(40, seed=5)
    # A payment captured, nothing refunded, whose first SKU has no stock: its order is
    # out_of_stock and its refund asked, the owed refund the gauge reads below (whatever
    # the seed draws).
    captured = next(
        h for h in world.histories if h.intent_status == "succeeded" and not h.amount_refunded
    )
    world.stock[captured.cart.lines[0][0]] = 0
    plan = delivery.plan(world, duplicates=2, reorder=0.3, concurrent=0.2, seed=5)
    async with Stack(StackOptions(consumers=1, keep_logs=False)) as stack:
        conn = await asyncpg.connect(stack.database_url)
        try:
            await seed_scenario(conn, world)
            sender = delivery.HttpSender("127.0.0.1", stack.bridge_port, stack.options.secret, 4)
            tally = delivery.Tally()
            await delivery.deliver(plan, sender, tally, senders=4)
            await sender.close()
            assert await readback.wait_caught_up(stack, tally, idle_s=15, timeout_s=90)
            records = await topic_records(
                stack.kafka_bootstrap_servers, stack.topic, plan.deliveries
            )
            inbox: dict[str, int] = {
                outcome: n
                for outcome, n in await conn.fetch(
                    "SELECT outcome, count(*) FROM processed_events GROUP BY 1"
                )
            }
            entered = {
                name.removeprefix("order."): n
                for name, n in await conn.fetch(
                    "SELECT name, count(*) FROM outbox WHERE kind = 'order_event'"
                    " AND name <> 'order.updated' GROUP BY 1"
                )
            }
            # One held order's authorization about to lapse, and one refund owed: the
            # gauges read them at scrape time.
            await conn.execute(
                "UPDATE orders SET capture_before = now() + interval '1 hour' WHERE id = ("
                " SELECT min(o.id) FROM orders o JOIN payment_intents p"
                " ON p.id = o.payment_intent_id"
                " WHERE o.status = 'placed' AND p.status = 'requires_capture')"
            )
            await conn.execute(
                "UPDATE outbox SET state = 'failed', outcome = 'owed', done_at = now()"
                " WHERE id = (SELECT min(id) FROM outbox WHERE name = 'refund_payment_intent')"
            )
            money = await owed.read(conn, ConsumerSettings().capture_warning_s)
            # The relay beside the consumer: no STRIPE_API_KEY, so its actions stay pending.
            published_before = await conn.fetchval(PUBLISHED)
            pending_actions = {r["name"]: r["count"] for r in await conn.fetch(PENDING_ACTIONS)}
            consumer_url = f"http://127.0.0.1:{stack.consumer_ports[0]}"
            async with httpx.AsyncClient() as client:
                bridge_url = f"http://127.0.0.1:{stack.bridge_admin_port}"
                bridge = parse((await client.get(f"{bridge_url}/metrics")).text)
                scraped = await client.get(f"{consumer_url}/metrics")
                consumer = parse(scraped.text)
                healthz = await client.get(f"{consumer_url}/healthz")
                readyz = await client.get(f"{consumer_url}/readyz")
            published_after = await conn.fetchval(PUBLISHED)
        finally:
            await conn.close()

    assert tally.acked == plan.deliveries and tally.given_up == 0
    distinct = sum(inbox.values())
    assert distinct == plan.events
    assert records >= plan.deliveries  # every acknowledged delivery is a record

    # The bridge: one publish per acknowledged delivery, none failed.
    webhooks = labelled(bridge, "intentflow_bridge_webhooks_total", "outcome")
    published = webhooks["published"] + webhooks["published_without_intent"]
    assert published == records
    assert webhooks["unavailable"] == webhooks["rejected_by_broker"] == 0
    assert value(bridge, "intentflow_bridge_publish_seconds_count") == published

    # The consumer: every record once, by the outcome the inbox recorded.
    assert scraped.headers["content-type"].startswith("text/plain; version=")
    events = labelled(consumer, "intentflow_consumer_events_total", "outcome")
    assert {k: events[k] for k in inbox} == inbox
    assert events["duplicate"] == records - distinct > 0
    assert events["dead_lettered"] == 0
    assert sum(events.values()) == records
    orders = labelled(consumer, "intentflow_consumer_orders_total", "status")
    assert {status: n for status, n in orders.items() if n} == entered
    assert set(orders) == {str(status) for status in OrderStatus}  # every one, zeros too
    assert entered.get("placed", 0) > 0
    assert value(consumer, "intentflow_consumer_batch_events_sum") == records
    batches = value(consumer, "intentflow_consumer_batch_events_count")
    assert batches >= 1
    assert value(consumer, "intentflow_consumer_batch_duration_seconds_count") == batches
    # Every record came through the bridge, so each has a received-at to time.
    assert value(consumer, "intentflow_consumer_latency_seconds_count") == records
    assert 0 < value(consumer, "intentflow_consumer_latency_seconds_sum") < 60 * records
    lag = labelled(consumer, "intentflow_consumer_lag_records", "partition")
    assert lag and set(lag.values()) == {0.0}  # caught up, on every partition it owns
    assert value(consumer, "intentflow_consumer_last_commit_timestamp_seconds") > tally.started
    assert money == owed.Owed(refunds=1, captures_due_soon=1)
    assert value(consumer, "intentflow_consumer_refunds_owed") == money.refunds
    assert value(consumer, "intentflow_consumer_captures_due_soon") == money.captures_due_soon

    # The relay's, in the same registry: what it published, what waits, and since when.
    published = value(consumer, "intentflow_relay_order_events_total", outcome="published")
    assert 0 < published_before <= published <= published_after
    assert sum(labelled(consumer, "intentflow_relay_stripe_actions_total", "outcome").values()) == 0
    assert pending_actions, "the replay leaves Stripe actions pending (no STRIPE_API_KEY)"
    for action, n in pending_actions.items():
        found = value(
            consumer, "intentflow_relay_pending_rows", kind="stripe_action", action=action
        )
        assert found == n, action
    assert value(consumer, "intentflow_relay_oldest_pending_seconds") > 0

    # Both: the build, and the process defaults.
    for samples, service in ((bridge, "stripe-bridge"), (consumer, "order-consumer")):
        build = [dict(k) for (n, k), _ in samples.items() if n == "intentflow_build_info"]
        assert [b["service"] for b in build] == [service] and build[0]["version"]
        assert value(samples, "process_cpu_seconds_total") > 0
        assert value(samples, "process_resident_memory_bytes") > 0

    # Every metric an alert rule reads is in a scrape (`up` is Prometheus' own).
    scraped_names = {HISTOGRAM_SUFFIX.sub("", name) for name, _ in {**bridge, **consumer}}
    for rule in rules(shipped_groups()):
        missing = metrics_used(rule["expr"]) - {"up"} - scraped_names
        assert not missing, (rule["alert"], missing)

    assert healthz.status_code == 200 and healthz.text == "alive\n"
    assert readyz.status_code == 200 and readyz.text.startswith("ready: ")

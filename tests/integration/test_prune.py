"""`order-consumer prune` against the real broker and PostgreSQL, beside a running consumer.

The minimum age comes from the broker when it reports the topics' retention
(the embedded Tansu broker reports what a topic was created with, and nothing
for a topic created without settings: then `--topic-retention` is required).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from typing import Any

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from intentflow.consumer import tools
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.tools import prune, reconcile
from intentflow.consumer.worker import Worker
from intentflow.devservices import Services
from intentflow.schemas import dlq_topic
from intentflow.stripekit import events
from tests.support import (
    consumer_env,
    consumer_settings,
    eventually,
    publish,
    seed_cart,
    seed_stock,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    prune.add_parser(parser.add_subparsers())
    return parser.parse_args(["prune", *argv])


async def run(
    settings: ConsumerSettings, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    code = await tools.run("prune", parse(*argv), settings)
    out, err = capsys.readouterr()
    return code, out, err


async def topics_with(infra: Services, configs: dict[str, str]) -> str:
    """An events topic and its dead-letter topic, both created with `configs`."""
    name = f"stripe.events.{secrets.token_hex(6)}"
    admin = AIOKafkaAdminClient(bootstrap_servers=infra.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, 1, 1, topic_configs=configs) for t in (name, dlq_topic(name))]
        )
    finally:
        await admin.close()
    await asyncio.sleep(0.1)  # the broker may answer metadata for a new topic a moment later
    return name


async def inbox_rows(db: asyncpg.Connection, prefix: str, count: int, age: str) -> None:
    """`count` inbox rows `prefix`-1 … processed `age` ago (an interval), each by a
    transaction of its own: a millisecond apart (prune never splits one time's rows)."""
    await db.execute(
        """
        INSERT INTO processed_events (event_id, event_type, processed_at)
        SELECT $1 || g, 'payment_intent.succeeded',
               now() - $3::text::interval - g * interval '1 millisecond'
        FROM generate_series(1, $2) g
        """,
        prefix,
        count,
        age,
    )


async def inbox_ids(db: asyncpg.Connection) -> set[str]:
    return {r["event_id"] for r in await db.fetch("SELECT event_id FROM processed_events")}


async def test_an_age_within_stripe_retries_plus_the_reported_retention_is_refused(
    infra: Services, database_url: str, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = await topics_with(infra, {"retention.ms": str(24 * 3600 * 1000)})
    settings = consumer_settings(infra, database_url, topic)
    await inbox_rows(db, "evt_3d12h_", 4, "3 days 12 hours")
    await inbox_rows(db, "evt_5d_", 3, "5 days")

    code, out, err = await run(settings, capsys, "--older-than", "3d12h")

    assert code == 2
    assert out == ""
    assert err == (
        "order-consumer prune: refused: --older-than 3d12h is below the minimum 4d "
        "(Stripe retries for 3d, the topics keep records for 1d): "
        "an event redelivered after its inbox row is gone is applied again\n"
    )
    assert len(await inbox_ids(db)) == 7

    code, out, _ = await run(settings, capsys, "--older-than", "4d")

    assert code == 0
    assert out.startswith("order-consumer prune: deleted 3 inbox rows processed before ")
    assert await inbox_ids(db) == {f"evt_3d12h_{i}" for i in range(1, 5)}


async def test_a_segment_counts_to_the_retention_as_kafka_deletes_whole_segments(
    infra: Services, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    day_ms = 24 * 3600 * 1000
    topic = await topics_with(infra, {"retention.ms": str(day_ms), "segment.ms": str(day_ms // 2)})
    settings = consumer_settings(infra, database_url, topic)

    code, _, err = await run(settings, capsys, "--older-than", "4d")

    assert code == 2
    assert "below the minimum 4d12h" in err
    assert "the topics keep records for 1d12h" in err


async def test_a_broker_that_does_not_report_retention_needs_topic_retention(
    infra: Services,
    database_url: str,
    db: asyncpg.Connection,
    topic: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = consumer_settings(infra, database_url, topic)
    await inbox_rows(db, "evt_old_", 2, "30 days")

    code, _, err = await run(settings, capsys, "--older-than", "20d")

    assert code == 2
    assert len(err.splitlines()) == 1
    assert f"cannot tell how long topic {topic!r} keeps records" in err
    assert "pass --topic-retention DURATION" in err

    code, _, err = await run(settings, capsys, "--older-than", "9d", "--topic-retention", "7d")

    assert code == 2
    assert "below the minimum 10d" in err
    assert len(await inbox_ids(db)) == 2


@pytest.mark.parametrize(
    "configs", [{"retention.ms": "-1"}, {"cleanup.policy": "compact"}], ids=["forever", "compacted"]
)
async def test_topics_that_keep_records_forever_refuse_pruning_whatever_is_stated(
    infra: Services,
    database_url: str,
    db: asyncpg.Connection,
    capsys: pytest.CaptureFixture[str],
    configs: dict[str, str],
) -> None:
    topic = await topics_with(infra, configs)
    settings = consumer_settings(infra, database_url, topic)
    await inbox_rows(db, "evt_old_", 2, "400 days")

    code, _, err = await run(settings, capsys, "--older-than", "365d", "--topic-retention", "7d")

    assert code == 2
    assert f"refused: topic {topic!r} keeps records forever" in err
    assert "give both topics a finite retention.ms to prune" in err
    assert len(await inbox_ids(db)) == 2


async def test_only_rows_older_than_the_age_are_deleted_in_batches_of_the_given_size(
    infra: Services,
    database_url: str,
    db: asyncpg.Connection,
    topic: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = consumer_settings(infra, database_url, topic)
    await inbox_rows(db, "evt_old_", 23, "11 days")
    await inbox_rows(db, "evt_edge_", 4, "9 days 23 hours")
    await inbox_rows(db, "evt_new_", 6, "1 minute")
    kept = await inbox_ids(db) - {f"evt_old_{i}" for i in range(1, 24)}

    code, out, err = await run(
        settings, capsys, "--older-than", "10d", "--topic-retention", "7d", "--batch-size", "5"
    )

    assert (code, err) == (0, "")
    assert out.startswith("order-consumer prune: deleted 23 inbox rows processed before ")
    assert out.endswith(" in 5 batches, and 0 published order events\n")
    assert await inbox_ids(db) == kept
    # The line is kept for `backfill`, which reads no event from before it.
    line = await db.fetchval("SELECT before FROM inbox_pruned")
    assert (
        out.removeprefix("order-consumer prune: deleted 23 inbox rows processed before ")[:19]
        == line.isoformat()[:19]
    )


async def test_beside_a_running_consumer_nothing_fresh_is_deleted_and_every_event_applies_once(
    infra: Services,
    database_url: str,
    db: asyncpg.Connection,
    topic: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await seed_stock(db, {"sku-a": 1000})
    waves: list[list[dict[str, Any]]] = [[] for _ in range(8)]
    for i in range(240):
        total = await seed_cart(db, f"cart-{i}", [("sku-a", 2, 100)])
        auth = events.intent_event(f"pi_{i}", amount=total, cart_id=f"cart-{i}")
        capture = events.intent_event(
            f"pi_{i}", amount=total, cart_id=f"cart-{i}", status="succeeded"
        )
        waves[i % 8] += [auth, capture]
    # Small batches, so that the consumer commits many transactions while prune runs.
    settings = consumer_settings(infra, database_url, topic, batch_max_records=20)
    fresh_during: list[tuple[int, int]] = []  # fresh inbox rows before and after each prune

    async def fresh() -> int:
        return int(
            await db.fetchval("SELECT count(*) FROM processed_events WHERE event_id LIKE 'evt_%'")
        )

    async def publish_in_waves() -> None:
        for wave in waves:
            await publish(infra, topic, wave)
            await asyncio.sleep(0.1)

    async with Worker(settings) as worker:
        consuming = asyncio.create_task(worker.run())
        await eventually(lambda: bool(worker.assignment()))
        publishing = asyncio.create_task(publish_in_waves())
        async with asyncio.timeout(30):
            runs = 0
            while await fresh() < 480:
                await inbox_rows(db, f"old_{runs}_", 400, "30 days")
                before = await fresh()
                code, _, err = await run(
                    settings, capsys, "--older-than", "10d", "--topic-retention", "7d",
                    "--batch-size", "10",
                )  # fmt: skip
                assert (code, err) == (0, "")
                fresh_during.append((before, await fresh()))
                runs += 1
        await publishing
        worker.request_stop()
        stats = await consuming

    # The consumer committed batches while prune ran (not only between runs).
    assert sum(after > before for before, after in fresh_during) >= 2
    assert (
        await db.fetchval("SELECT count(*) FROM processed_events WHERE event_id LIKE 'old_%'") == 0
    )
    assert await fresh() == 480
    assert (stats.events, stats.duplicates, stats.dead_lettered) == (480, 0, 0)
    rows = await db.fetch("SELECT payment_intent_id, status FROM orders")
    orders = {r["payment_intent_id"]: r["status"] for r in rows}
    assert orders == {f"pi_{i}": "placed" for i in range(240)}
    assert await db.fetchval("SELECT stocked_quantity FROM inventory_levels") == 520
    assert (await reconcile.check(db)).ok


async def command(settings: ConsumerSettings, *argv: str) -> tuple[int, str, str]:
    """`python -m intentflow.consumer prune …` as an operator runs it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "intentflow.consumer", "prune", *argv,
        env=consumer_env(settings), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_an_unreachable_broker_exits_2_with_one_line(infra: Services) -> None:
    settings = consumer_settings(
        infra, infra.database_url, "unused", kafka_bootstrap_servers="127.0.0.1:1"
    )

    code, out, err = await command(settings, "--older-than", "30d", "--topic-retention", "7d")

    assert (code, out) == (2, "")
    assert err.splitlines() == [err.strip()]  # one line
    assert err.startswith("order-consumer prune: the broker at 127.0.0.1:1 did not answer")


@pytest.mark.parametrize("duration", ["10", "ten days", "10y", "1.5d", "3d 12h"])
def test_a_duration_that_is_not_one_is_refused_by_the_parser(duration: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse("--older-than", duration)
    assert exit_.value.code == 2


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10d", 864_000), ("36h", 129_600), ("90m", 5_400), ("45s", 45), ("3d12h", 302_400)],
)
def test_durations_read_as_operators_write_them(text: str, seconds: int) -> None:
    span = prune.duration(text)
    assert span.total_seconds() == seconds
    assert prune.duration(prune.show(span)) == span


async def test_published_order_events_older_than_the_age_go_and_stripe_actions_stay(
    infra: Services,
    database_url: str,
    db: asyncpg.Connection,
    topic: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = consumer_settings(infra, database_url, topic)

    async def row(kind: str, state: str, age: str, name: str) -> int:
        key = f"intentflow:{name}:pi_{age}" if kind == "stripe_action" else None
        return int(
            await db.fetchval(
                """
                INSERT INTO outbox (kind, name, payment_intent_id, order_id, payload,
                                    idempotency_key, state, done_at)
                VALUES ($1, $2, 'pi_' || $3, 1, '{}',
                        $5, $4, CASE WHEN $4 = 'pending' THEN NULL
                                     ELSE now() - $3::interval END)
                RETURNING id
                """,
                kind,
                name,
                age,
                state,
                key,
            )
        )

    old_published = await row("order_event", "done", "11 days", "order.placed")
    kept = {
        await row("order_event", "done", "1 day", "order.placed"),
        await row("order_event", "pending", "12 days", "order.refunded"),
        await row("stripe_action", "done", "13 days", "cancel_payment_intent"),
        await row("stripe_action", "failed", "14 days", "capture_payment_intent"),
    }

    code, out, err = await run(settings, capsys, "--older-than", "10d", "--topic-retention", "7d")

    assert (code, err) == (0, "")
    assert out.endswith(", and 1 published order events\n")
    left = {r["id"] for r in await db.fetch("SELECT id FROM outbox")}
    assert left == kept
    assert old_published not in left

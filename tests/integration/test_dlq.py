"""`order-consumer dlq`: dead letters listed with their reason, replayed once fixed, safely twice.

The command runs as an operator runs it (`python -m intentflow.consumer dlq ...`, its
settings from the environment) against the real broker and PostgreSQL; the
consumer that dead-letters and then applies the replayed event is a Worker in
this process, so the group is joined once per test.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord

from intentflow.consumer.dlq import DeadLetters, Poison
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.worker import Worker
from intentflow.devservices import Services
from intentflow.devservices.embedded import free_port
from intentflow.schemas import contract_headers, dlq_topic
from intentflow.schemas.partitioner import partition
from intentflow.stripekit import events
from tests.support import (
    consumer_env,
    consumer_settings,
    eventually,
    paid_carts,
    publish,
    read_topic,
    seed_cart,
    seed_stock,
    snapshot,
)

# The database refuses any intent whose id starts so: SQLSTATE 23514, the data's fault.
REFUSE = (
    "ALTER TABLE payment_intents ADD CONSTRAINT refused_for_test CHECK (id NOT LIKE 'pi_refused%')"
)
FIX = "ALTER TABLE payment_intents DROP CONSTRAINT refused_for_test"
DEAD_LETTER_HEADERS = {"error", "error-detail", "original-partition", "original-offset"}


@dataclass
class Run:
    status: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines()]


async def dlq(settings: ConsumerSettings, *argv: str) -> Run:
    """`order-consumer dlq ...` as a separate process, settings in its environment."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "intentflow.consumer", "dlq", *argv,
        env=consumer_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


async def order_of(db: asyncpg.Connection, intent_id: str) -> dict[str, Any]:
    """What the database holds for one intent's order: rows counted, so a second copy shows."""
    row = await db.fetchrow(
        """
        SELECT count(DISTINCT o.id) AS orders, count(i.*) AS items,
               (SELECT count(*) FROM inventory_movements m JOIN orders o2 ON o2.id = m.order_id
                 WHERE o2.payment_intent_id = $1) AS movements,
               (SELECT count(*) FROM processed_events WHERE payment_intent_id = $1) AS inbox
        FROM orders o LEFT JOIN order_items i ON i.order_id = o.id
        WHERE o.payment_intent_id = $1
        """,
        intent_id,
    )
    assert row is not None
    return dict(row.items())


async def test_a_refused_event_is_listed_replayed_once_fixed_and_a_second_replay_changes_nothing(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    await seed_stock(db, {"sku-a": 10})
    good = await paid_carts(db, 3, [("sku-a", 1, 100)])
    total = await seed_cart(db, "cart-refused", [("sku-a", 2, 100)])
    refused = events.intent_event("pi_refused_1", amount=total, cart_id="cart-refused")
    await db.execute(REFUSE)
    settings = consumer_settings(infra, database_url, topic)

    async with Worker(settings) as worker:
        running = asyncio.create_task(worker.run())
        try:
            await publish(infra, topic, [*good, refused])
            await eventually(lambda: worker.stats.events == 4 and worker.stats.dead_lettered == 1)
            assert set((await snapshot(db)).orders) == {"pi_0", "pi_1", "pi_2"}

            listed = await dlq(settings, "list")
            assert listed.status == 0, listed.stderr
            (line,) = listed.stdout.splitlines()[:-1]
            assert refused["id"] in line and "key=pi_refused_1" in line
            assert "rejected_by_database" in line and "SQLSTATE 23514" in line
            (letter,) = (await dlq(settings, "list", "--json")).json_lines()
            assert letter["error"] == "rejected_by_database"
            assert "refused_for_test" in letter["error_detail"]
            assert letter["event_type"] == "payment_intent.amount_capturable_updated"

            await db.execute(FIX)  # the cause is fixed
            replay = await dlq(settings, "replay", "--error", "rejected_by_database")
            assert replay.status == 0, replay.stderr
            assert "replayed 1 " in replay.stdout
            await eventually(lambda: worker.stats.events == 5)
            applied = await snapshot(db)
            assert applied.orders["pi_refused_1"] == "placed"
            assert applied.levels == {"sku-a": 10 - 3 - 2}
            once = {"orders": 1, "items": 1, "movements": 1, "inbox": 1}
            assert await order_of(db, "pi_refused_1") == once

            again = await dlq(settings, "replay", "--error", "rejected_by_database")
            assert again.status == 0 and "replayed 1 " in again.stdout
            await eventually(lambda: worker.stats.events == 6)
            assert worker.stats.duplicates == 1
        finally:
            worker.request_stop()
        await running

    assert await snapshot(db) == applied
    assert await order_of(db, "pi_refused_1") == once
    # The commands joined no group and committed nothing: the consumer's group has
    # commits on the events topic only, the dead-letter topic's letters stay unread.
    assert sum((await committed_offsets(infra, settings.kafka_group_id, topic)).values()) == 6
    assert await committed_offsets(infra, settings.kafka_group_id, dlq_topic(topic)) == {}


async def committed_offsets(infra: Services, group: str, topic: str) -> dict[int, int]:
    """What `group` has committed on `topic`'s 12 partitions, asked without joining it."""
    reader = AIOKafkaConsumer(
        bootstrap_servers=infra.kafka_bootstrap_servers, group_id=group, enable_auto_commit=False
    )
    await reader.start()
    try:
        found = {p: await reader.committed(TopicPartition(topic, p)) for p in range(12)}
    finally:
        await reader.stop()
    return {p: offset for p, offset in found.items() if offset is not None}


async def dead_letter(settings: ConsumerSettings, intents: list[str]) -> list[dict[str, Any]]:
    """Write one dead letter per intent with the consumer's own dead-letter producer."""
    writer = DeadLetters(settings, settings.kafka_topic, enable_idempotence=False)
    published = []
    await writer.start()
    try:
        for offset, intent in enumerate(intents):
            event = events.intent_event(intent, amount=100, cart_id="cart-x")
            record = ConsumerRecord(
                topic=settings.kafka_topic, partition=7, offset=offset, timestamp=0,
                timestamp_type=0, key=intent.encode(), value=events.encode(event), checksum=None,
                serialized_key_size=0, serialized_value_size=0,
                headers=contract_headers(event["id"], event["type"], 1_700_000_000_000 + offset),
            )  # fmt: skip
            assert await writer.send([Poison(record, "invalid_event", "data.object: broken")]) == []
            published.append({"intent": intent, "record": record})
    finally:
        await writer.stop()
    return published


async def test_replay_at_sends_exactly_the_named_dead_letters_with_their_original_key_and_headers(
    infra: Services, topic: str
) -> None:
    settings = consumer_settings(infra, "postgresql://unused@127.0.0.1:1/unused", topic)
    written = await dead_letter(settings, ["pi_a", "pi_b", "pi_c"])
    letters = {
        letter["key"]: letter for letter in (await dlq(settings, "list", "--json")).json_lines()
    }
    assert set(letters) == {"pi_a", "pi_b", "pi_c"}
    assert [letters[w["intent"]]["original"] for w in written] == ["7:0", "7:1", "7:2"]

    missing = await dlq(settings, "replay", "--at", letters["pi_a"]["dlq"], "11:999")
    assert missing.status == 2 and "no dead letter at 11:999" in missing.stderr
    dry = await dlq(settings, "replay", "--all", "--dry-run")
    assert dry.status == 0 and "would replay 3 " in dry.stdout
    chosen = await dlq(settings, "replay", "--at", letters["pi_a"]["dlq"], letters["pi_c"]["dlq"])
    assert chosen.status == 0, chosen.stderr
    assert "replayed 2 " in chosen.stdout

    # Neither the refused command nor the dry run sent anything: exactly the two named.
    replayed = await read_topic(infra.kafka_bootstrap_servers, topic, 2, settle_s=0.5)
    assert sorted(r.key for r in replayed) == [b"pi_a", b"pi_c"]
    originals = {w["intent"].encode(): w["record"] for w in written}
    for r in replayed:
        original = originals[r.key]
        assert r.value == original.value
        assert r.partition == partition(r.key, 12)  # the intent's partition, as the bridge keys
        assert list(r.headers) == [
            *original.headers,
            ("replayed-from", letters[r.key.decode()]["dlq"].encode()),
        ]
        assert not DEAD_LETTER_HEADERS & {name for name, _ in r.headers}


async def test_list_without_a_dead_letter_topic_says_so_and_creates_nothing(
    infra: Services,
) -> None:
    never_created = f"stripe.events.{secrets.token_hex(6)}"
    settings = consumer_settings(infra, "postgresql://unused@127.0.0.1:1/unused", never_created)
    listed = await dlq(settings, "list")
    assert listed.status == 0, listed.stderr
    expected = f"no dead letters (topic {dlq_topic(never_created)} does not exist)"
    assert listed.stdout.strip() == expected
    admin = AIOKafkaAdminClient(bootstrap_servers=infra.kafka_bootstrap_servers)
    await admin.start()
    try:
        assert dlq_topic(never_created) not in await admin.list_topics()
    finally:
        await admin.close()


async def test_replay_without_a_selector_is_refused_and_sends_nothing(
    infra: Services, topic: str
) -> None:
    settings = consumer_settings(infra, "postgresql://unused@127.0.0.1:1/unused", topic)
    await dead_letter(settings, ["pi_a"])
    refused = await dlq(settings, "replay")
    assert refused.status == 2
    assert refused.stderr.strip().startswith("order-consumer dlq: choose what to replay")
    assert len(refused.stderr.strip().splitlines()) == 1
    assert await read_topic(infra.kafka_bootstrap_servers, topic, 0, timeout_s=1.0) == []


async def test_an_unreachable_broker_is_one_line_and_exit_status_2(infra: Services) -> None:
    settings = consumer_settings(
        infra, "postgresql://unused@127.0.0.1:1/unused", "stripe.events",
        kafka_bootstrap_servers=f"127.0.0.1:{free_port()}",
    )  # fmt: skip
    for argv in (["list"], ["replay", "--all"]):
        run = await dlq(settings, *argv)
        assert run.status == 2
        (line,) = run.stderr.strip().splitlines()
        assert "did not answer" in line and "check KAFKA_BOOTSTRAP_SERVERS" in line

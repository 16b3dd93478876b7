"""The consumer's HTTP server and metrics, tried as kubelet and Prometheus use them."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from intentflow.consumer.probes import MAX_CLIENTS
from intentflow.devservices import Services
from intentflow.devservices.embedded import free_port
from intentflow.stripekit import events
from tests.e2e.test_consumer_process import Running
from tests.support import (
    consumer_env,
    consumer_settings,
    eventually,
    paid_carts,
    seed_stock,
)

pytestmark = pytest.mark.timeout(60)


def samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {
        frozenset(s.labels.items()): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


async def publish_each(infra: Services, topic: str, evts: list[dict[str, Any]]) -> None:
    """One record per produce request: the embedded broker's end offset counts batches right."""
    producer = AIOKafkaProducer(
        bootstrap_servers=infra.kafka_bootstrap_servers,
        enable_idempotence=infra.kafka_enable_idempotence,
    )
    await producer.start()
    try:
        for evt in evts:
            key = evt["data"]["object"]["id"].encode()
            await producer.send_and_wait(topic, events.encode(evt), key=key, partition=0)
    finally:
        await producer.stop()


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await reader.start()
    try:
        await reader._client._wait_on_metadata(topic)
        parts = [TopicPartition(topic, p) for p in reader.partitions_for_topic(topic) or ()]
        return {tp.partition: n for tp, n in (await reader.end_offsets(parts)).items()}
    finally:
        await reader.stop()


async def test_lag_counts_the_records_that_arrive_while_the_database_is_away(
    infra: Services, database_url: str, topic: str, db: asyncpg.Connection
) -> None:
    """While a batch waits out the database, the records not applied must show as lag.

    Lag as Kafka's tools and KEDA count it: the end offset minus the committed offset.
    The member's position is not the mark: it is past the batch in flight and the batch
    polled behind it (up to 2 x BATCH_MAX_RECORDS), all of it work not done; and the
    fetch's high watermark stops while the partitions are paused for the wait."""
    port = free_port()
    settings = consumer_settings(
        infra, database_url, topic,
        consumer_http_port=port, db_statement_timeout_ms=300, relay_enabled=False,
    )  # fmt: skip
    await seed_stock(db, {"sku-1": 1000})
    carts = await paid_carts(db, 60, [("sku-1", 1, 100)])
    running = await Running(consumer_env(settings)).start()
    base = f"http://127.0.0.1:{port}"
    try:
        await running.until_logged("partitions_assigned")
        await publish_each(infra, topic, carts[:10])

        async def first_ten_applied() -> bool:
            return bool(await db.fetchval("SELECT count(*) FROM processed_events") == 10)

        await eventually(first_ten_applied, timeout_s=20)
        await asyncio.sleep(0.5)  # and their offsets committed, just after
        blocker = await asyncpg.connect(database_url)
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE processed_events IN ACCESS EXCLUSIVE MODE")
        try:
            await publish_each(infra, topic, carts[10:20])
            await running.until_logged("database_unavailable")  # statement timeouts: backing off
            await publish_each(infra, topic, carts[20:60])  # 40 more behind it
            await asyncio.sleep(1.5)  # settled: whatever was fetched was fetched
            lags: list[float] = []  # right at every scrape, not at some
            async with httpx.AsyncClient() as client:
                for _ in range(5):
                    await asyncio.sleep(0.4)
                    text = (await client.get(f"{base}/metrics")).text
                    lag = samples(text, "intentflow_consumer_lag_records")
                    lags.append(lag[frozenset({("topic", topic), ("partition", "0")})])
            ends = await end_offsets(infra.kafka_bootstrap_servers, topic)
        finally:
            await tx.rollback()
            await blocker.close()
        assert ends[0] == 60
        # 10 applied and committed; 50 not applied (the database is locked).
        assert set(lags) == {50.0}, f"lag on partition 0 was {lags} with 50 records not applied"
    finally:
        running.process.send_signal(signal.SIGTERM)
        await running.process.wait()


async def test_sigterm_stops_in_time_while_clients_hold_connections_open(
    infra: Services, database_url: str, topic: str
) -> None:
    port = free_port()
    settings = consumer_settings(
        infra, database_url, topic, consumer_http_port=port, shutdown_timeout_s=3,
        relay_enabled=False,
    )  # fmt: skip
    running = await Running(consumer_env(settings)).start()
    held: list[asyncio.StreamWriter] = []
    try:
        await running.until_logged("partitions_assigned")
        async with httpx.AsyncClient() as client:
            await eventually(lambda: _ok(client, f"http://127.0.0.1:{port}/readyz"), timeout_s=10)
        for i in range(MAX_CLIENTS - 8):  # half a request each, or nothing at all
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            if i % 2:
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            held.append(writer)
        async with httpx.AsyncClient() as client:  # still answers beside them
            assert (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
        started = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(running.process.wait(), 10)
        took = time.monotonic() - started
    finally:
        for w in held:
            w.close()
        if running.process.returncode is None:
            running.process.kill()
    assert running.process.returncode == 0, running.stderr[-2000:]
    assert took < 3 + 1, took
    assert "Traceback" not in running.stderr, running.stderr[-3000:]


async def _ok(client: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await client.get(url)).status_code == 200
    except httpx.HTTPError:
        return False


async def test_a_client_that_resets_its_connection_leaves_no_error_in_the_log(
    infra: Services, database_url: str, topic: str
) -> None:
    """A kubelet probe that timed out, a port scanner: the connection goes away mid-request."""
    import socket
    import struct

    port = free_port()
    settings = consumer_settings(infra, database_url, topic, consumer_http_port=port,
                                 relay_enabled=False)  # fmt: skip
    running = await Running(consumer_env(settings)).start()
    try:
        await running.until_logged("partitions_assigned")
        for request in (b"GET /readyz HTTP/1.1\r\n\r\n", b"GET /metrics HTTP/1.1\r\n\r\n",
                        b"GET /healthz HTTP/1.1\r\n", b""):  # fmt: skip
            for _ in range(5):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(request)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()  # RST
        await asyncio.sleep(1)
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
    finally:
        running.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(running.process.wait(), 30)
    errors = [line for line in running.lines if '"level": "error"' in line]
    assert not errors, "\n".join(errors)[:3000]

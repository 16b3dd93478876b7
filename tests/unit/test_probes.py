"""The consumer's /healthz, /readyz and /metrics: the HTTP server, and what the worker answers.

The server is real (asyncio, on a loopback port); the worker runs against the
fakes of test_worker_fakes, so its health can be read at chosen moments.
"""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from intentflow.consumer.probes import MAX_CLIENTS, ProbeServer, ProbeServerError
from tests.unit.test_worker_fakes import Harness, record


class Stub:
    def __init__(self) -> None:
        self.is_alive, self.is_ready = True, False

    def alive(self) -> tuple[bool, str]:
        return self.is_alive, "alive" if self.is_alive else "stalled"

    async def ready(self) -> tuple[bool, str]:
        return self.is_ready, "ready" if self.is_ready else "starting"

    async def exposition(self) -> tuple[bytes, str]:
        return b"x_total 1.0\n", "text/plain; version=0.0.4; charset=utf-8"


async def raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await reader.read()
    except ConnectionResetError:
        return b""  # closed unanswered
    finally:
        writer.close()


async def test_the_server_answers_each_probe_by_the_health_it_reads() -> None:
    stub = Stub()
    server = await ProbeServer(stub, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{base}/healthz")).status_code == 200
            ready = await client.get(f"{base}/readyz")
            assert (ready.status_code, ready.text) == (503, "starting\n")
            stub.is_ready, stub.is_alive = True, False
            assert (await client.get(f"{base}/readyz")).status_code == 200
            stalled = await client.get(f"{base}/healthz")
            assert (stalled.status_code, stalled.text) == (503, "stalled\n")
            metrics = await client.get(f"{base}/metrics?name=x")  # a query string is ignored
            assert metrics.text == "x_total 1.0\n"
            assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
            assert (await client.get(f"{base}/nope")).status_code == 404
            assert (await client.post(f"{base}/metrics")).status_code == 405
            head = await client.head(f"{base}/metrics")
            assert (head.status_code, head.content) == (200, b"")
        assert (await raw(server.port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        # A request head longer than the server reads is refused, and the server goes on.
        assert (
            await raw(server.port, b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 2000)
        ).startswith(b"HTTP/1.1 400 ")
    finally:
        await server.stop()


async def test_a_port_in_use_is_one_line_naming_the_settings() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ProbeServerError) as refused:
            await ProbeServer(Stub(), "127.0.0.1", port).start()
    message = str(refused.value)
    assert "\n" not in message and f"127.0.0.1:{port}" in message
    assert "CONSUMER_HTTP_PORT" in message


async def test_the_worker_is_starting_then_ready_and_not_ready_once_the_database_is_gone() -> None:
    harness = Harness([record(0)])
    worker = harness.worker
    assert worker.alive() == (True, "starting")
    assert (await worker.ready())[0] is False
    async with asyncio.timeout(5), worker:
        assert await worker.ready() == (True, "ready: waiting for partitions")
        harness.pool.conn.down = True
        ok, why = await worker.ready()
        assert not ok and why.startswith("the database does not answer: ")
        harness.pool.conn.down = False
        await worker.run()
        assert worker.alive() == (True, "alive")
        assert await worker.ready() == (True, "ready: 1 partitions")
        worker.last_progress = time.monotonic() - 1000  # as if the loop had hung
        ok, why = worker.alive()
        assert not ok and why.startswith("stalled: the loop has not polled for ")
    assert worker.alive() == (True, "stopping")
    assert (await worker.ready()) == (False, "stopping")


async def test_a_batch_waiting_out_an_outage_is_not_ready_and_its_retries_are_counted() -> None:
    def away_three_times(offsets: list[int], attempt: int) -> BaseException | None:
        return ConnectionRefusedError(111, "Connection refused") if attempt <= 3 else None

    harness = Harness([record(0), record(1)], away_three_times, retry_initial_s=0.05)
    worker = harness.worker
    seen: set[str] = set()
    async with asyncio.timeout(5), worker:
        running = asyncio.create_task(worker.run())
        while not running.done():
            seen.add((await worker.ready())[1])
            await asyncio.sleep(0.005)
        await running
        after = await worker.ready()
    assert any(why.startswith("waiting out a failure: ") for why in seen), seen
    assert after[0] is True  # the wait is over once the batch went through
    samples = {
        (s.name, s.labels.get("cause")): s.value
        for family in text_string_to_metric_families(worker.metrics.render().decode())
        for s in family.samples
    }
    retries = {cause: v for (name, cause), v in samples.items()
               if name == "intentflow_consumer_retries_total"}  # fmt: skip
    assert sum(retries.values()) == 3
    assert samples[("intentflow_consumer_batch_events_count", None)] == 1
    assert samples[("intentflow_consumer_last_commit_timestamp_seconds", None)] > 0


async def test_connections_beyond_the_cap_are_closed_and_the_probes_still_answer() -> None:
    server = await ProbeServer(Stub(), "127.0.0.1", 0).start()
    held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(MAX_CLIENTS)]
    try:
        await asyncio.sleep(0.05)  # each held connection has a handler waiting for its request
        assert await raw(server.port, b"GET /healthz HTTP/1.1\r\n\r\n") == b""  # closed at once
        for _, writer in held[:2]:
            writer.close()
        await asyncio.sleep(0.05)
        answer = await raw(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ")
    finally:
        for _, writer in held[2:]:
            writer.close()
        await server.stop()

"""Helpers for the bridge tests: run the app in-process or as a process, sign, read back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from intentflow.devservices.embedded import free_port
from intentflow.producer.app import WEBHOOK_PATH, create_app
from intentflow.producer.settings import BridgeSettings
from intentflow.stripekit.signing import stripe_signature

SECRET = "whsec_test_current"


def bridge_settings(
    bootstrap: str, topic: str, idempotence: bool, **overrides: Any
) -> BridgeSettings:
    values: dict[str, Any] = {
        "stripe_webhook_secret": SECRET,
        "stripe_livemode": False,
        "kafka_bootstrap_servers": bootstrap,
        "kafka_topic": topic,
        "kafka_enable_idempotence": idempotence,
        "kafka_publish_timeout_s": 2.0,
        **overrides,
    }
    return BridgeSettings(**values)


class BridgeClient(httpx.AsyncClient):
    """A client of the webhook's port, and `admin`, one of the admin port's
    (/healthz, /readyz, /metrics)."""

    admin: httpx.AsyncClient


async def wait_ready(client: BridgeClient, timeout_s: float = 10.0) -> None:
    """Until /readyz answers 200, as a load balancer would before sending traffic."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (await client.admin.get("/readyz")).status_code != 200:
        assert asyncio.get_running_loop().time() < deadline, "the bridge did not become ready"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_bridge(
    settings: BridgeSettings, ready: bool = True
) -> AsyncIterator[BridgeClient]:
    """The app with its lifespan (producer start/stop) run, behind an in-process client;
    its admin server on a free loopback port, behind `client.admin`.

    The producer connects in the background; with `ready` this waits for it.
    """
    app = create_app(settings.model_copy(update={"bridge_admin_port": 0}))
    async with (
        app.lifespan(),
        BridgeClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bridge", timeout=10
        ) as client,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.admin.port}", timeout=10) as admin,
    ):
        client.admin = admin
        if ready:
            await wait_ready(client)
        yield client


async def post_webhook(
    client: httpx.AsyncClient, body: bytes, secret: str = SECRET, **headers: str
) -> httpx.Response:
    sent = {"stripe-signature": stripe_signature(body, secret), "content-type": "application/json"}
    sent.update(headers)
    return await client.post(WEBHOOK_PATH, content=body, headers=sent)


async def topic_size(bootstrap: str, topic: str) -> int:
    """How many records the topic holds (sum of end offsets)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        await consumer._client._wait_on_metadata(topic)
        parts = consumer.partitions_for_topic(topic) or set()
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in parts])
        return sum(ends.values())
    finally:
        await consumer.stop()


def bridge_env(bootstrap: str, topic: str, idempotence: bool, **overrides: str) -> dict[str, str]:
    """The environment an operator would give `stripe-bridge` (port chosen later)."""
    return {
        **os.environ,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "STRIPE_LIVEMODE": "false",
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPIC": topic,
        "KAFKA_ENABLE_IDEMPOTENCE": str(idempotence).lower(),
        **overrides,
    }


@dataclass
class BridgeProcess:
    """A running `python -m intentflow.producer`, its port, and its stderr lines so far."""

    process: asyncio.subprocess.Process
    port: int  # the webhook's
    admin_port: int  # /healthz, /readyz, /metrics
    lines: list[str] = field(default_factory=list)

    @property
    def logs(self) -> str:
        return "\n".join(self.lines)

    def rss_bytes(self) -> int:
        """VmRSS of the process, from /proc."""
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def admin(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.admin_port}", timeout=10)

    async def metric(self, line_prefix: str) -> float:
        async with self.admin() as client:
            text = (await client.get("/metrics")).text
        for line in text.splitlines():
            if line.startswith(line_prefix):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def wait_exit(self, timeout_s: float) -> int:
        async with asyncio.timeout(timeout_s):
            return await self.process.wait()


@contextlib.asynccontextmanager
async def bridge_process(env: dict[str, str], ready: bool = True) -> AsyncIterator[BridgeProcess]:
    """`stripe-bridge` on free ports; SIGKILLed at the end if it is still running."""
    port, admin_port = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "intentflow.producer",
        env={**env, "BRIDGE_PORT": str(port), "BRIDGE_ADMIN_PORT": str(admin_port)},
        stderr=asyncio.subprocess.PIPE,
    )
    bridge = BridgeProcess(process, port, admin_port)

    async def collect() -> None:
        assert process.stderr is not None
        async for line in process.stderr:
            bridge.lines.append(line.decode(errors="replace").rstrip("\n"))

    collecting = asyncio.create_task(collect())
    try:
        if ready:
            async with bridge.admin() as client:
                for _ in range(150):
                    assert process.returncode is None, f"the bridge exited: {bridge.logs[-2000:]}"
                    with contextlib.suppress(httpx.TransportError):
                        if (await client.get("/readyz")).status_code == 200:
                            break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError(f"the bridge did not become ready: {bridge.logs[-2000:]}")
        yield bridge
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        async with asyncio.timeout(5):
            await collecting


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length, read off a raw connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body

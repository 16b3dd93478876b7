"""`python -m producer` as an operator runs it: a signed webhook over real HTTP lands in Kafka."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import httpx

from devservices import Services
from devservices.embedded import free_port
from loadtest.events import encode, intent_event, new_id
from loadtest.signing import stripe_signature
from tests.support import read_topic

SECRET = "whsec_e2e"


async def wait_ready(client: httpx.AsyncClient, process: asyncio.subprocess.Process) -> None:
    for _ in range(100):
        assert process.returncode is None, "the bridge exited while starting"
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("the bridge did not become ready")


async def test_the_bridge_process_publishes_a_signed_webhook_and_stops_cleanly(
    infra: Services, topic: str
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "KAFKA_BOOTSTRAP_SERVERS": infra.kafka_bootstrap_servers,
        "KAFKA_TOPIC": topic,
        "KAFKA_ENABLE_IDEMPOTENCE": str(infra.kafka_enable_idempotence).lower(),
        "BRIDGE_PORT": str(port),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "producer", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        intent = new_id("pi")
        body = encode(intent_event(intent, amount=4200, cart_id="cart_e2e"))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await wait_ready(client, process)
            response = await client.post(
                "/webhooks/stripe",
                content=body,
                headers={"stripe-signature": stripe_signature(body, SECRET)},
            )
        assert response.status_code == 200, response.text
        [record] = await read_topic(infra.kafka_bootstrap_servers, topic, expected=1)
        assert (record.key, record.value) == (intent.encode(), body)
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            _, stderr = await process.communicate()
    logs = stderr.decode()
    # uvicorn shuts down gracefully, then re-raises the signal so a supervisor sees it.
    assert process.returncode == -signal.SIGTERM, logs
    assert '"event":"bridge stopped"' in logs
    assert '"outcome":"published"' in logs and intent in logs
    assert SECRET not in logs and "cart_e2e" not in logs

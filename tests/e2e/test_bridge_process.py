"""`stripe-bridge` as an operator runs it: configuration, logs, a webhook, and shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import orjson
import pytest

from intentflow.devservices import Services
from intentflow.devservices.embedded import EmbeddedKafka, free_port
from intentflow.devservices.topics import create_topics
from intentflow.producer.app import WEBHOOK_PATH
from intentflow.stripekit.events import encode, intent_event, new_id
from intentflow.stripekit.signing import stripe_signature
from tests.integration.bridge_support import SECRET, bridge_env, bridge_process
from tests.support import read_topic

# An API key pasted where the signing secret belongs: the mistake the check is for.
API_KEY = "sk_live_51HkQ2bFakeKeyThatMustNeverBeLogged"


def run_bridge(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "intentflow.producer", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_the_bridge_process_publishes_a_signed_webhook_and_stops_cleanly(
    infra: Services, topic: str
) -> None:
    env = bridge_env(
        infra.kafka_bootstrap_servers, topic, infra.kafka_enable_idempotence, LOG_LEVEL="info"
    )
    async with bridge_process(env) as bridge:
        intent = new_id("pi")
        body = encode(intent_event(intent, amount=4200, cart_id="cart_e2e"))
        async with bridge.client() as client:
            response = await client.post(
                WEBHOOK_PATH,
                content=body,
                headers={"stripe-signature": stripe_signature(body, SECRET)},
            )
        assert response.status_code == 200, response.text
        [record] = await read_topic(infra.kafka_bootstrap_servers, topic, expected=1)
        assert (record.key, record.value) == (intent.encode(), body)

        # uvicorn's own warning for a request it cannot parse: a library's line.
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        writer.write(b"NOT HTTP\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
        writer.close()

        bridge.process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so a supervisor sees it.
        assert await bridge.wait_exit(15) == -signal.SIGTERM, bridge.logs

    lines = [orjson.loads(line) for line in bridge.lines]  # every line is JSON, ours or not
    events = [line["event"] for line in lines]
    [listening] = [line for line in lines if line["event"] == "listening"]
    assert listening["port"] == bridge.port
    assert {"stop requested", "bridge stopped"} <= set(events)
    [published] = [line for line in lines if line.get("outcome") == "published"]
    assert published["payment_intent_id"] == intent
    [invalid] = [line for line in lines if line.get("logger") == "uvicorn.error"]
    assert (invalid["level"], invalid["event"]) == ("warning", "Invalid HTTP request received.")
    assert "cart_e2e" not in bridge.logs  # the body is never logged


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"STRIPE_WEBHOOK_SECRET": None}, "STRIPE_WEBHOOK_SECRET: Field required"),
        ({"STRIPE_WEBHOOK_SECRET": " , "}, "STRIPE_WEBHOOK_SECRET: is empty"),
        ({"STRIPE_WEBHOOK_SECRET": f"whsec_ok,{API_KEY}"}, "STRIPE_WEBHOOK_SECRET: every secret"),
        (
            {"STRIPE_LIVEMODE": None},
            "STRIPE_LIVEMODE: required: set true for a live-mode endpoint (real payments) "
            "or false for a test-mode one",
        ),
        ({"STRIPE_LIVEMODE": "yes"}, "STRIPE_LIVEMODE: must be true or false: set true"),
        ({"BRIDGE_PORT": "80000"}, "BRIDGE_PORT: Input should be less than or equal to 65535"),
        ({"BRIDGE_PORT": "http"}, "BRIDGE_PORT: Input should be a valid integer"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL: must be one of DEBUG, INFO, WARNING"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT: Input should be 'json' or 'console'"),
        ({"MAX_CONNECTIONS": "0"}, "MAX_CONNECTIONS: Input should be greater than or equal to 1"),
    ],
    ids=[
        "no-secret",
        "empty-secret",
        "api-key",
        "no-mode",
        "mode-not-a-word",
        "port-range",
        "port-text",
        "level",
        "format",
        "cap",
    ],
)
def test_a_setting_that_cannot_work_is_one_line_naming_it_and_exit_2(
    overrides: dict[str, str | None], named: str
) -> None:
    env = {**os.environ, "STRIPE_WEBHOOK_SECRET": SECRET, "STRIPE_LIVEMODE": "false"}
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    done = run_bridge(env)
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("stripe-bridge: configuration error: ") and named in line, line
    assert "Traceback" not in done.stderr and done.stdout == ""
    # Values are never echoed: pydantic's own message would repeat the input.
    assert "sk_live_" not in done.stderr and API_KEY[-16:] not in done.stderr


@pytest.mark.parametrize("taken", ["BRIDGE_PORT", "BRIDGE_ADMIN_PORT"])
def test_a_port_already_taken_is_one_line_naming_its_settings_and_exit_2(taken: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ports = {"BRIDGE_PORT": str(free_port()), "BRIDGE_ADMIN_PORT": str(free_port())}
        done = run_bridge(
            {
                **os.environ,
                "STRIPE_WEBHOOK_SECRET": SECRET,
                "STRIPE_LIVEMODE": "false",
                **ports,
                taken: str(port),
            }
        )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    host_setting = taken.replace("_PORT", "_HOST")
    assert line == (
        f"stripe-bridge: cannot listen on 127.0.0.1:{port} (Address already in use): "
        f"set {host_setting}/{taken} to a free address"
    )


def test_help_and_version_need_no_environment() -> None:
    bare = {"PATH": os.environ.get("PATH", "")}
    helped = run_bridge(bare, "--help")
    assert helped.returncode == 0 and "STRIPE_WEBHOOK_SECRET" in helped.stdout
    assert "STRIPE_LIVEMODE" in helped.stdout
    versioned = run_bridge(bare, "--version")
    assert (versioned.returncode, versioned.stdout.strip()) == (0, "stripe-bridge 0.1.0")


async def test_log_level_is_accepted_in_any_case(infra: Services, topic: str) -> None:
    env = bridge_env(
        infra.kafka_bootstrap_servers, topic, infra.kafka_enable_idempotence, LOG_LEVEL="warning"
    )
    async with bridge_process(env) as bridge:
        assert bridge.process.returncode is None
    assert '"event":"listening"' not in bridge.logs  # info lines are below the level


async def request_in_flight(port: int) -> asyncio.StreamWriter:
    """A signed webhook held in the producer (KAFKA_LINGER_MS): shutdown has to wait for it,
    or give up. (A slow body no longer holds shutdown: it is answered 503 at once.)"""
    event = encode(intent_event(new_id("pi"), amount=5, cart_id="c"))
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /webhooks/stripe HTTP/1.1\r\nHost: bridge\r\nStripe-Signature: "
        + stripe_signature(event, SECRET).encode()
        + b"\r\nContent-Length: %d\r\n\r\n" % len(event)
        + event
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    return writer


async def test_shutdown_ends_by_its_deadline_with_a_request_still_in_flight(
    infra: Services, topic: str
) -> None:
    env = bridge_env(
        infra.kafka_bootstrap_servers,
        topic,
        infra.kafka_enable_idempotence,
        SHUTDOWN_TIMEOUT_S="4",
        KAFKA_LINGER_MS="10000",
    )
    async with bridge_process(env) as bridge:
        writer = await request_in_flight(bridge.port)
        started = time.monotonic()
        bridge.process.send_signal(signal.SIGTERM)
        returncode = await bridge.wait_exit(15)
        elapsed_s = time.monotonic() - started
        writer.close()
    assert returncode == -signal.SIGTERM, bridge.logs
    assert elapsed_s < 4 + 1.5, elapsed_s  # the deadline, and a margin for a loaded machine
    assert '"event":"bridge stopped"' in bridge.logs


async def test_a_second_signal_exits_at_once(infra: Services, topic: str) -> None:
    env = bridge_env(
        infra.kafka_bootstrap_servers,
        topic,
        infra.kafka_enable_idempotence,
        KAFKA_LINGER_MS="10000",
    )
    async with bridge_process(env) as bridge:
        writer = await request_in_flight(bridge.port)
        bridge.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert bridge.process.returncode is None  # waiting for the request in flight
        started = time.monotonic()
        bridge.process.send_signal(signal.SIGINT)
        returncode = await bridge.wait_exit(10)
        elapsed_s = time.monotonic() - started
        writer.close()
    assert returncode == 128 + signal.SIGINT, bridge.logs
    assert elapsed_s < 3, elapsed_s
    assert '"reason":"second stop signal"' in bridge.logs


async def test_shutdown_ends_by_its_deadline_with_the_broker_gone() -> None:
    broker = EmbeddedKafka().start()
    try:
        topic = f"stripe.events.{new_id('t')}"
        await create_topics(broker.bootstrap_servers, topic)
        env = bridge_env(
            broker.bootstrap_servers,
            topic,
            False,
            SHUTDOWN_TIMEOUT_S="6",
            KAFKA_PUBLISH_TIMEOUT_S="1",
        )
        async with bridge_process(env) as bridge:
            broker.stop()
            body = encode(intent_event(new_id("pi"), amount=1, cart_id="c"))
            async with bridge.client() as client:
                response = await client.post(
                    WEBHOOK_PATH,
                    content=body,
                    headers={"stripe-signature": stripe_signature(body, SECRET)},
                )
            assert response.status_code == 503
            started = time.monotonic()
            bridge.process.send_signal(signal.SIGTERM)
            returncode = await bridge.wait_exit(20)
            elapsed_s = time.monotonic() - started
        assert returncode == -signal.SIGTERM, bridge.logs
        assert elapsed_s < 6 + 1.5, (elapsed_s, bridge.logs)
    finally:
        broker.stop()

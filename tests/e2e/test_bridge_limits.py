"""The bridge process protects itself before authentication (producer/guard.py, webhook.py).

Each test runs the real server (`python -m producer`, uvicorn + httptools +
uvloop) on 127.0.0.1 and talks to it over raw sockets, as an attacker would,
while a signed webhook still lands in the real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from devservices import Services
from loadtest.events import encode, intent_event, new_id
from loadtest.signing import stripe_signature
from producer.app import WEBHOOK_PATH
from tests.integration.bridge_support import (
    SECRET,
    BridgeProcess,
    bridge_env,
    bridge_process,
    read_response,
)
from tests.support import read_topic

MiB = 1024 * 1024
PARTIAL_HEADERS = b"POST /webhooks/stripe HTTP/1.1\r\nHost: bridge\r\nStripe-Sig"


async def connect(bridge: BridgeProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", bridge.port)


async def assert_a_webhook_lands(bridge: BridgeProcess, infra: Services, topic: str) -> None:
    body = encode(intent_event(new_id("pi"), amount=100, cart_id="c"))
    async with bridge.client() as client:
        response = await client.post(
            WEBHOOK_PATH, content=body, headers={"stripe-signature": stripe_signature(body, SECRET)}
        )
    assert (response.status_code, response.json()["outcome"]) == (200, "published")
    records = await read_topic(infra.kafka_bootstrap_servers, topic, expected=1)
    assert body in [r.value for r in records]


async def test_slow_headers_and_slow_bodies_are_answered_408_and_closed_after_their_timeouts(
    infra: Services, topic: str
) -> None:
    env = bridge_env(
        infra.kafka_bootstrap_servers,
        topic,
        infra.kafka_enable_idempotence,
        HEADER_TIMEOUT_S="1",
        BODY_TIMEOUT_S="1",
        MAX_CONNECTIONS="400",
    )
    async with bridge_process(env) as bridge:
        stalled = [await connect(bridge) for _ in range(210)]
        for n, (_, writer) in enumerate(stalled):
            if n % 10:  # and every tenth sends nothing at all
                writer.write(PARTIAL_HEADERS)
        slow_body = await connect(bridge)
        slow_body[1].write(
            b"POST /webhooks/stripe HTTP/1.1\r\nHost: bridge\r\nContent-Length: 100\r\n"
            b"Stripe-Signature: t=1,v1=00\r\n\r\n" + b"{" * 10
        )
        started = time.monotonic()

        await assert_a_webhook_lands(bridge, infra, topic)
        # Generous: 1 s timeouts, a loaded 2-core machine.
        async with asyncio.timeout(15):
            answers = await asyncio.gather(*(reader.read() for reader, _ in stalled))
            body_answer = await slow_body[0].read()
        elapsed_s = time.monotonic() - started

        assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers), answers[:3]
        assert body_answer.startswith(b"HTTP/1.1 408 ")
        assert elapsed_s >= 0.5  # closed by the timeout, not at once
        assert await bridge.metric('bridge_connections_refused_total{reason="header_timeout"}') == (
            210
        )
        assert await bridge.metric('bridge_connections_refused_total{reason="body_timeout"}') == 1
        for _, writer in [*stalled, slow_body]:
            writer.close()


async def test_a_header_flood_is_refused_with_memory_bounded_and_a_webhook_still_lands(
    infra: Services, topic: str
) -> None:
    env = bridge_env(infra.kafka_bootstrap_servers, topic, infra.kafka_enable_idempotence)
    async with bridge_process(env) as bridge:
        before = peak = bridge.rss_bytes()
        reader, writer = await connect(bridge)
        writer.write(b"POST /webhooks/stripe HTTP/1.1\r\nHost: bridge\r\nX-Flood: ")
        chunk = b"a" * MiB
        offered = 64 * MiB  # one header line; without the limit the process holds all of it
        sent = 0
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(20):
                while sent < offered:
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)
                    peak = max(peak, bridge.rss_bytes())
        await asyncio.sleep(0.3)
        peak = max(peak, bridge.rss_bytes())
        writer.close()

        assert sent < offered, "the bridge read a 64 MiB header line to the end"
        assert peak - before < 32 * MiB, (before, peak)

        reader, writer = await connect(bridge)
        many = b"".join(b"X-Header-%d: v\r\n" % n for n in range(200))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: bridge\r\n" + many + b"\r\n")
        status, headers, _ = await read_response(reader)
        assert (status, headers["connection"]) == (431, "close")
        assert await reader.read() == b""
        writer.close()

        await assert_a_webhook_lands(bridge, infra, topic)
        refused = 'bridge_connections_refused_total{reason="headers_too_large"}'
        assert await bridge.metric(refused) == 1
        assert (
            await bridge.metric('bridge_connections_refused_total{reason="too_many_headers"}') == 1
        )


async def test_connections_beyond_the_cap_are_answered_503_and_closed(
    infra: Services, topic: str
) -> None:
    env = bridge_env(
        infra.kafka_bootstrap_servers,
        topic,
        infra.kafka_enable_idempotence,
        MAX_CONNECTIONS="20",
        HEADER_TIMEOUT_S="30",
    )
    async with bridge_process(env) as bridge:
        held = [await connect(bridge) for _ in range(20)]
        await asyncio.sleep(0.3)  # the server has taken them all

        reader, writer = await connect(bridge)
        async with asyncio.timeout(5):
            answer = await reader.read()
        assert answer.startswith(b"HTTP/1.1 503 ")
        writer.close()

        for _, held_writer in held[:5]:
            held_writer.close()
        await asyncio.sleep(0.3)
        await assert_a_webhook_lands(bridge, infra, topic)
        refused = 'bridge_connections_refused_total{reason="too_many_connections"}'
        assert await bridge.metric(refused) == 1
        for _, held_writer in held[5:]:
            held_writer.close()


async def test_a_request_without_a_signature_is_answered_before_its_body_is_sent(
    infra: Services, topic: str
) -> None:
    env = bridge_env(infra.kafka_bootstrap_servers, topic, infra.kafka_enable_idempotence)
    async with bridge_process(env) as bridge:
        reader, writer = await connect(bridge)
        writer.write(
            b"POST /webhooks/stripe HTTP/1.1\r\nHost: bridge\r\nContent-Length: 1000\r\n\r\n"
        )
        async with asyncio.timeout(5):  # the body was never sent
            status, headers, body = await read_response(reader)
        assert (status, body) == (400, b'{"outcome":"bad_signature","reason":"missing"}')
        assert "connection" not in headers

        # The unread body is dropped, and the connection parses the next request cleanly.
        event = encode(intent_event(new_id("pi"), amount=5, cart_id="c"))
        writer.write(
            b"{" * 1000
            + b"POST /webhooks/stripe HTTP/1.1\r\nHost: bridge\r\nStripe-Signature: "
            + stripe_signature(event, SECRET).encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(event)
            + event
        )
        async with asyncio.timeout(10):
            status, _, body = await read_response(reader)
        assert (status, body[:24]) == (200, b'{"outcome":"published","')
        writer.close()

        # A body of unknown length is not read either: the connection closes.
        reader, writer = await connect(bridge)
        writer.write(
            b"POST /webhooks/stripe HTTP/1.1\r\nHost: bridge\r\nTransfer-Encoding: chunked\r\n"
            b"Stripe-Signature: forged\r\n\r\n"
        )
        async with asyncio.timeout(5):
            status, headers, body = await read_response(reader)
            assert await reader.read() == b""
        assert (status, headers["connection"]) == (400, "close")
        assert body == b'{"outcome":"bad_signature","reason":"malformed"}'
        writer.close()

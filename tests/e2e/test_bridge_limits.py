"""The bridge process protects itself before authentication (producer/guard.py, webhook.py).

Each test runs the real server (`python -m intentflow.producer`, uvicorn + httptools +
uvloop) on 127.0.0.1 and talks to it over raw sockets, as an attacker would,
while a signed webhook still lands in the real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

from intentflow.devservices import Services
from intentflow.producer.app import WEBHOOK_PATH
from intentflow.stripekit.events import encode, intent_event, new_id
from intentflow.stripekit.signing import stripe_signature
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


def refused_metric(reason: str) -> str:
    return f'intentflow_bridge_connections_refused_total{{reason="{reason}"}}'


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
        assert await bridge.metric(refused_metric("header_timeout")) == (210)
        assert await bridge.metric(refused_metric("body_timeout")) == 1
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
        refused = refused_metric("headers_too_large")
        assert await bridge.metric(refused) == 1
        assert await bridge.metric(refused_metric("too_many_headers")) == 1


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
        # The probes and the metrics are on the admin port, outside the cap: a kubelet
        # sees a live, ready pod under a flood, rather than restarting it.
        async with bridge.admin() as admin:
            probes = [(await admin.get(p)).status_code for p in ("/healthz", "/readyz")]
            assert (await admin.get("/metrics")).status_code == 200
        assert probes == [200, 200]

        for _, held_writer in held[:5]:
            held_writer.close()
        await asyncio.sleep(0.3)
        await assert_a_webhook_lands(bridge, infra, topic)
        refused = refused_metric("too_many_connections")
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


CHUNKED_SIGNED_SHAPE = (
    b"POST /webhooks/stripe HTTP/1.1\r\nHost: bridge\r\nStripe-Signature: t=1,v1=00\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n"
)


async def flood(
    bridge: BridgeProcess, first: bytes, block: bytes, offered: int, before: int
) -> tuple[int, int]:
    """Send `first`, then `block` until `offered` bytes, the bridge closes, or it grows 64 MiB.

    Returns the bytes sent and the peak RSS seen.
    """
    peak = before
    sent = 0
    _, writer = await connect(bridge)
    writer.write(first)
    with contextlib.suppress(ConnectionError, TimeoutError):
        async with asyncio.timeout(15):
            # Stops short of the offer when unguarded too, but then as a failure below.
            while sent < offered and peak - before < 64 * MiB:
                writer.write(block)
                await writer.drain()
                sent += len(block)
                peak = max(peak, bridge.rss_bytes())
    await asyncio.sleep(0.3)
    writer.close()
    return sent, max(peak, bridge.rss_bytes())


async def test_chunked_trailers_are_refused_with_memory_bounded_and_a_webhook_still_lands(
    infra: Services, topic: str
) -> None:
    env = bridge_env(infra.kafka_bootstrap_servers, topic, infra.kafka_enable_idempotence)
    async with bridge_process(env) as bridge:
        # A whole request with one short trailer is refused at once.
        reader, writer = await connect(bridge)
        writer.write(CHUNKED_SIGNED_SHAPE + b"X-Trailer: y\r\n\r\n")
        async with asyncio.timeout(5):
            status, headers, _ = await read_response(reader)
            assert await reader.read() == b""
        assert (status, headers["connection"]) == (431, "close")
        writer.close()

        before = bridge.rss_bytes()
        # Many small trailer fields: each one a header uvicorn would keep.
        sent, peak = await flood(
            bridge, CHUNKED_SIGNED_SHAPE, b"ab:c\r\n" * 20_000, 64 * MiB, before
        )
        assert sent < 64 * MiB, "the bridge read 64 MiB of trailers"
        assert peak - before < 32 * MiB, (before, peak)

        # One endless trailer line: never a complete header, gathered by httptools.
        before = bridge.rss_bytes()
        sent, peak = await flood(
            bridge, CHUNKED_SIGNED_SHAPE + b"X-Trailer: ", b"a" * MiB, 64 * MiB, before
        )
        assert sent < 64 * MiB, "the bridge read a 64 MiB trailer line"
        assert peak - before < 32 * MiB, (before, peak)

        await assert_a_webhook_lands(bridge, infra, topic)
        refused = refused_metric("headers_too_large")
        assert await bridge.metric(refused) == 3


async def test_a_connection_idle_after_a_crlf_is_closed_after_the_header_timeout(
    infra: Services, topic: str
) -> None:
    env = bridge_env(
        infra.kafka_bootstrap_servers,
        topic,
        infra.kafka_enable_idempotence,
        HEADER_TIMEOUT_S="1",
        MAX_CONNECTIONS="20",
    )
    async with bridge_process(env) as bridge:
        held = [await connect(bridge) for _ in range(20)]
        for reader, writer in held:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: bridge\r\n\r\n")
            assert (await read_response(reader))[0] == 404  # the probes are on the admin port
            # Skipped by the parser as the bytes between two requests: no request begins.
            writer.write(b"\r\n")
        started = time.monotonic()
        # Unguarded, uvicorn's keep-alive timer is cancelled by the CRLF and nothing
        # closes them: every connection stays taken, and the webhook below gets 503.
        async with asyncio.timeout(10):
            answers = await asyncio.gather(*(reader.read() for reader, _ in held))
        elapsed_s = time.monotonic() - started

        assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers), answers[:3]
        assert elapsed_s >= 0.5  # closed by the timeout, not at once
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.3)
        await assert_a_webhook_lands(bridge, infra, topic)
        timeouts = refused_metric("header_timeout")
        assert await bridge.metric(timeouts) == 20


async def test_shutdown_answers_slow_clients_503_and_logs_no_traceback(
    infra: Services, topic: str
) -> None:
    env = bridge_env(
        infra.kafka_bootstrap_servers,
        topic,
        infra.kafka_enable_idempotence,
        SHUTDOWN_TIMEOUT_S="10",
        KAFKA_PUBLISH_TIMEOUT_S="2",  # the drain timeout: 4 s
    )
    async with bridge_process(env) as bridge:
        slow_headers = [await connect(bridge) for _ in range(10)]
        for _, writer in slow_headers:
            writer.write(PARTIAL_HEADERS)
        slow_bodies = [await connect(bridge) for _ in range(10)]
        for _, writer in slow_bodies:
            writer.write(
                b"POST /webhooks/stripe HTTP/1.1\r\nHost: bridge\r\nContent-Length: 1000\r\n"
                b"Stripe-Signature: t=1,v1=00\r\n\r\n{"
            )
        await asyncio.sleep(0.5)  # the apps of the slow bodies wait for the rest

        bridge.process.send_signal(signal.SIGTERM)
        assert await bridge.wait_exit(15) == -signal.SIGTERM, bridge.logs
        async with asyncio.timeout(5):
            answers = await asyncio.gather(
                *(reader.read() for reader, _ in [*slow_headers, *slow_bodies])
            )
        for _, writer in [*slow_headers, *slow_bodies]:
            writer.close()

    assert all(answer.startswith(b"HTTP/1.1 503 ") for answer in answers), answers[:3]
    # Unguarded, uvicorn cancels each app waiting for a body at the drain timeout,
    # and logs "Exception in ASGI application" with a CancelledError traceback.
    assert "Exception in ASGI application" not in bridge.logs, bridge.logs[-3000:]
    assert "Traceback" not in bridge.logs, bridge.logs[-3000:]
    assert '"event":"bridge stopped"' in bridge.logs


async def test_a_refusal_before_a_body_announced_with_expect_100_continue_closes(
    infra: Services, topic: str
) -> None:
    # Long enough that only the answer can close the connection within the test.
    env = bridge_env(
        infra.kafka_bootstrap_servers,
        topic,
        infra.kafka_enable_idempotence,
        BODY_TIMEOUT_S="60",
    )
    async with bridge_process(env) as bridge:
        reader, writer = await connect(bridge)
        writer.write(
            b"POST /webhooks/stripe HTTP/1.1\r\nHost: bridge\r\nExpect: 100-continue\r\n"
            b"Content-Length: 100\r\n\r\n"
        )
        # The client was told no before any 100 Continue, so it will not send the body:
        # kept open, the connection would wait for it, or read its next request as it.
        async with asyncio.timeout(5):
            status, headers, body = await read_response(reader)
            assert await reader.read() == b""
        assert (status, headers["connection"]) == (400, "close")
        assert body == b'{"outcome":"bad_signature","reason":"missing"}'
        writer.close()


async def test_a_slow_body_queued_behind_a_pipelined_request_is_closed_without_an_answer(
    infra: Services, topic: str
) -> None:
    env = bridge_env(
        infra.kafka_bootstrap_servers,
        topic,
        infra.kafka_enable_idempotence,
        BODY_TIMEOUT_S="1",
        KAFKA_LINGER_MS="3000",  # the first request stays in flight for 3 s
    )
    async with bridge_process(env) as bridge:
        event = encode(intent_event(new_id("pi"), amount=5, cart_id="c"))
        reader, writer = await connect(bridge)
        writer.write(
            b"POST /webhooks/stripe HTTP/1.1\r\nHost: bridge\r\nStripe-Signature: "
            + stripe_signature(event, SECRET).encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(event)
            + event
            + b"POST /webhooks/stripe HTTP/1.1\r\nHost: bridge\r\nContent-Length: 100\r\n"
            b"Stripe-Signature: t=1,v1=00\r\n\r\n{"
        )
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        # The second request's body times out while the first is still being published:
        # a 408 on the wire now would read as the first request's answer.
        assert answer == b"", answer
        assert await bridge.metric(refused_metric("body_timeout")) == 1
        # The first request's app ends quietly once published, its answer unsent.
        for _ in range(100):
            if '"outcome":"published"' in bridge.logs:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.2)
        assert '"outcome":"published"' in bridge.logs, bridge.logs[-3000:]
        assert "Traceback" not in bridge.logs, bridge.logs[-3000:]

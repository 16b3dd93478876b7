"""A recording, fault-injecting proxy in front of the Stripe emulator, for tests.

`StripeProxy` sits between the code under test and the emulator (tests/stripe_emulator.py):
it records every request with when it arrived (`requests`, `calls`), answers chosen ones
with an injected error instead of forwarding them (`fail_next`), can hold every request
for `delay_s` (a slow Stripe) and tells how many were in its hands at once
(`max_in_flight`), and can run a callback after the emulator acted and then drop the
connection unanswered (`after_forward`). `stripe_proxy` is a fresh one per test.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl

import aiohttp
import pytest
from aiohttp import web

from intentflow.devservices.embedded import free_port
from tests.stripe_emulator import StripeEmulator

# Set per connection by each side; copying them would describe the wrong message.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "content-encoding",
        "host",
        "date",
        "server",
    }
)


@dataclass
class RecordedRequest:
    """One request the proxy received, and what became of it."""

    method: str
    path: str
    query: dict[str, str]
    # Stripe's form fields with their flat names, e.g. {"metadata[cart_id]": "c1"}.
    form: dict[str, str]
    idempotency_key: str | None
    # What the client was answered; None while in flight, or when the proxy dropped it.
    status: int | None = None
    # What the emulator answered; None when the request was not forwarded.
    upstream_status: int | None = None
    injected: bool = False
    dropped: bool = False
    # When the proxy received it, on `time.monotonic()`'s clock.
    received_at_s: float = field(default_factory=time.monotonic)


@dataclass
class _Fault:
    remaining: int
    status: int
    path_contains: str | None
    retry_after_s: float | None
    body: dict[str, Any]


@dataclass
class _AfterForward:
    callback: Callable[[], Awaitable[object] | object]
    path_contains: str


def _stripe_error_body(status: int) -> dict[str, Any]:
    if status == 429:
        error = {
            "type": "invalid_request_error",
            "code": "rate_limit",
            "message": "Too many requests hit the API too quickly (injected by StripeProxy).",
        }
    elif status >= 500:
        error = {"type": "api_error", "message": f"Injected {status} by StripeProxy."}
    else:
        error = {"type": "invalid_request_error", "message": f"Injected {status} by StripeProxy."}
    return {"error": error}


def _matches(path_contains: str | None, path: str) -> bool:
    return path_contains is None or path_contains in path


class StripeProxy:
    """A recording, fault-injecting reverse proxy on loopback in front of `upstream_url`."""

    def __init__(self, upstream_url: str, *, delay_s: float = 0.0) -> None:
        self.upstream_url = upstream_url
        # Every request is held this long before it is answered or forwarded: a slow Stripe.
        self.delay_s = delay_s
        # The most requests received and not yet answered at any one time.
        self.max_in_flight = 0
        self._in_flight = 0
        self.port = 0
        self.requests: list[RecordedRequest] = []
        self._faults: list[_Fault] = []
        self._after_forward: list[_AfterForward] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def calls(self, method: str, path: str) -> list[RecordedRequest]:
        """The recorded requests with this method and exactly this path, oldest first."""
        return [r for r in self.requests if r.method == method.upper() and r.path == path]

    def fail_next(
        self,
        n: int,
        status: int,
        *,
        path_contains: str | None = None,
        retry_after_s: float | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        """Answer the next `n` requests whose path contains `path_contains` with `status`.

        They are not forwarded. The body is Stripe-shaped for the status unless given;
        `retry_after_s` adds a Retry-After header (whole seconds when integral).
        """
        self._faults.append(
            _Fault(n, status, path_contains, retry_after_s, body or _stripe_error_body(status))
        )

    def after_forward(
        self, callback: Callable[[], Awaitable[object] | object], *, path_contains: str
    ) -> None:
        """Once: forward the next matching request, run `callback` (awaited if it returns
        an awaitable) after the emulator answered, then drop the client's connection
        without an answer, as if the caller died between Stripe acting and hearing of it."""
        self._after_forward.append(_AfterForward(callback, path_contains))

    async def start(self) -> Self:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        form = {}
        if request.content_type == "application/x-www-form-urlencoded":
            form = dict(parse_qsl(body.decode(), keep_blank_values=True))
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            form=form,
            idempotency_key=request.headers.get("Idempotency-Key"),
        )
        self.requests.append(record)
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            return await self._answer(request, body, record)
        finally:
            self._in_flight -= 1

    async def _answer(
        self, request: web.Request, body: bytes, record: RecordedRequest
    ) -> web.StreamResponse:
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        fault = self._take_fault(request.path)
        if fault is not None:
            record.injected = True
            record.status = fault.status
            headers = {}
            if fault.retry_after_s is not None:
                headers["Retry-After"] = f"{fault.retry_after_s:g}"
            return web.json_response(fault.body, status=fault.status, headers=headers)

        status, headers, content = await self._forward(request, body)
        record.upstream_status = status
        hook = self._take_after_forward(request.path)
        if hook is not None:
            result = hook.callback()
            if inspect.isawaitable(result):
                await result
            record.dropped = True
            assert request.transport is not None
            request.transport.abort()
            # aiohttp finds the transport closed and writes nothing of this.
            return web.Response(status=status)
        record.status = status
        return web.Response(body=content, status=status, headers=headers)

    async def _forward(
        self, request: web.Request, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with self._session.request(
            request.method,
            self.upstream_url + request.rel_url.raw_path_qs,
            headers=headers,
            data=body,
        ) as upstream:
            content = await upstream.read()
            answer_headers = {
                k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP
            }
            return upstream.status, answer_headers, content

    def _take_fault(self, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.remaining > 0 and _matches(fault.path_contains, path):
                fault.remaining -= 1
                return fault
        return None

    def _take_after_forward(self, path: str) -> _AfterForward | None:
        for hook in self._after_forward:
            if _matches(hook.path_contains, path):
                self._after_forward.remove(hook)
                return hook
        return None


@pytest.fixture
async def stripe_proxy(stripe_emulator: StripeEmulator) -> AsyncIterator[StripeProxy]:
    """A fresh proxy per test: no recorded requests, no pending faults."""
    async with StripeProxy(stripe_emulator.base_url) as proxy:
        yield proxy

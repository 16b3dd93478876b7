"""A Stripe API on loopback for tests: localstripe in a child process, and a proxy in front.

- `StripeEmulator` runs `python -m tests.stripe_launch` (localstripe, in memory) on a free
  loopback port and stops it; `stripe_emulator` is the session-wide fixture.
- `create_payment_method`, `create_manual_capture_intent` and `retrieve_intent` make and
  read state through the emulator's own HTTP API, returning Stripe's JSON as dicts.
- `StripeProxy` sits between the code under test and the emulator: it records every
  request, answers chosen ones with an injected error instead of forwarding them
  (`fail_next`), and can run a callback after the emulator acted and then drop the
  connection unanswered (`after_forward`); `stripe_proxy` is a fresh one per test.

localstripe keeps no idempotency keys: a replayed request acts again.
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl

import aiohttp
import httpx
import pytest
from aiohttp import web

from devservices.embedded import free_port

TEST_API_KEY = "sk_test_emulator"
# 4242… succeeds without authentication. In localstripe 1.15.10, 4000002500003155 and five
# others need 3-D Secure (the intent ends requires_action), 4000000000000341 is declined
# when charged, and any other 16-digit number succeeds.
VISA = "4242424242424242"

_REPO_ROOT = Path(__file__).resolve().parent.parent
_AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
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


class StripeEmulatorError(RuntimeError):
    """The emulator did not start, or refused a request made to set up a test."""


class StripeEmulator:
    """localstripe with `cancellation_reason` support, in a child process on loopback."""

    def __init__(self, *, start_timeout_s: float = 30, stop_timeout_s: float = 5) -> None:
        self.port = 0
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._process: asyncio.subprocess.Process | None = None
        self._output = bytearray()
        self._reader: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Self:
        self.port = free_port()
        self._process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "tests.stripe_launch", "--port", str(self.port)),
            cwd=_REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read_output(self._process))
        try:
            await self._wait_until_answering(self._process)
        except BaseException:
            await self.stop()
            raise
        return self

    async def _read_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while chunk := await process.stdout.read(65536):
            self._output += chunk

    async def _wait_until_answering(self, process: asyncio.subprocess.Process) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout_s
        async with httpx.AsyncClient(timeout=1) as client:
            while loop.time() < deadline:
                if process.returncode is not None:
                    raise StripeEmulatorError(f"exited with {process.returncode}: {self._tail()}")
                try:
                    response = await client.get(f"{self.base_url}/v1/balance", headers=_AUTH)
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
                    continue
                if response.status_code == 200:
                    return
                raise StripeEmulatorError(f"answered {response.status_code}: {response.text}")
        raise StripeEmulatorError(f"not answering after {self._start_timeout_s}s: {self._tail()}")

    def _tail(self) -> str:
        return self._output[-2000:].decode(errors="replace")

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), self._stop_timeout_s)
            except TimeoutError:
                process.kill()
                await process.wait()
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def _call(method: str, url: str, data: dict[str, str] | None = None) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.request(method, url, headers=_AUTH, data=data)
    if response.status_code != 200:
        raise StripeEmulatorError(
            f"{method} {url} answered {response.status_code}: {response.text}"
        )
    result: dict[str, Any] = response.json()
    return result


async def create_payment_method(base_url: str, card_number: str = VISA) -> dict[str, Any]:
    """A card PaymentMethod (`pm_…`) expiring in 12/2030."""
    return await _call(
        "POST",
        f"{base_url}/v1/payment_methods",
        {
            "type": "card",
            "card[number]": card_number,
            "card[exp_month]": "12",
            "card[exp_year]": "2030",
            "card[cvc]": "123",
        },
    )


async def create_manual_capture_intent(
    base_url: str,
    *,
    cart_id: str,
    amount: int = 2000,
    currency: str = "eur",
    payment_method: str | None = None,
) -> dict[str, Any]:
    """A confirmed PaymentIntent with capture_method=manual, amount in the smallest unit.

    With the default card it ends `requires_capture`: authorised, waiting for a capture
    or a cancel. A new Visa PaymentMethod is made unless `payment_method` is given.
    """
    if payment_method is None:
        payment_method = (await create_payment_method(base_url))["id"]
    return await _call(
        "POST",
        f"{base_url}/v1/payment_intents",
        {
            "amount": str(amount),
            "currency": currency,
            "capture_method": "manual",
            "confirm": "true",
            "payment_method": payment_method,
            "metadata[cart_id]": cart_id,
        },
    )


async def retrieve_intent(base_url: str, intent_id: str) -> dict[str, Any]:
    return await _call("GET", f"{base_url}/v1/payment_intents/{intent_id}")


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

    def __init__(self, upstream_url: str) -> None:
        self.upstream_url = upstream_url
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


@pytest.fixture(scope="session")
async def stripe_emulator() -> AsyncIterator[StripeEmulator]:
    """One emulator for the whole session; tests keep apart by their own intent ids."""
    async with StripeEmulator() as emulator:
        yield emulator


@pytest.fixture
async def stripe_proxy(stripe_emulator: StripeEmulator) -> AsyncIterator[StripeProxy]:
    """A fresh proxy per test: no recorded requests, no pending faults."""
    async with StripeProxy(stripe_emulator.base_url) as proxy:
        yield proxy

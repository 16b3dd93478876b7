"""A Stripe API on loopback for tests: localstripe in a child process.

- `StripeEmulator` runs `python -m tests.stripe_launch` (localstripe, in memory) on a free
  loopback port and stops it; `stripe_emulator` is the session-wide fixture.
- `create_payment_method`, `create_manual_capture_intent`, `retrieve_intent` and
  `refunds_on` make and read state through the emulator's own HTTP API, returning
  Stripe's JSON as dicts.
- The recording, fault-injecting proxy that the code under test talks to instead
  lives in tests/stripe_proxy.py.

localstripe keeps no idempotency keys (a replayed request acts again) and ignores
`Stripe-Account`: tests/fake_stripe.py stands in where those matter.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import pytest

from intentflow.devservices.embedded import free_port

TEST_API_KEY = "sk_test_emulator"
# 4242… succeeds without authentication. In localstripe 1.15.10, 4000002500003155 and five
# others need 3-D Secure (the intent ends requires_action), 4000000000000341 is declined
# when charged, and any other 16-digit number succeeds.
VISA = "4242424242424242"

_REPO_ROOT = Path(__file__).resolve().parent.parent
_AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}


class StripeEmulatorError(RuntimeError):
    """The emulator did not start, or refused a request made to set up a test."""


class StripeEmulator:
    """localstripe with tests/stripe_launch.py's fixes, in a child process on loopback."""

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
    cart_id: str | None,
    amount: int = 2000,
    currency: str = "eur",
    payment_method: str | None = None,
    capture_method: str = "manual",
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A confirmed PaymentIntent, amount in the smallest unit, `metadata[cart_id]` unless
    `cart_id` is None (another integration's payment: `metadata` alone).

    With the default card a manual capture ends `requires_capture` (authorised, waiting
    for a capture or a cancel) and `capture_method="automatic"` ends `succeeded`. A new
    Visa PaymentMethod is made unless `payment_method` is given.
    """
    if payment_method is None:
        payment_method = (await create_payment_method(base_url))["id"]
    form = {
        "amount": str(amount),
        "currency": currency,
        "capture_method": capture_method,
        "confirm": "true",
        "payment_method": payment_method,
    }
    tags = dict(metadata or {})
    if cart_id is not None:
        tags["cart_id"] = cart_id
    form.update({f"metadata[{key}]": value for key, value in tags.items()})
    return await _call("POST", f"{base_url}/v1/payment_intents", form)


async def retrieve_intent(base_url: str, intent_id: str) -> dict[str, Any]:
    return await _call("GET", f"{base_url}/v1/payment_intents/{intent_id}")


async def refunds_on(base_url: str, intent_id: str) -> list[dict[str, Any]]:
    """The intent's refunds, newest first (the first page, which holds up to 100)."""
    found = await _call("GET", f"{base_url}/v1/refunds?payment_intent={intent_id}&limit=100")
    refunds: list[dict[str, Any]] = found["data"]
    return refunds


@pytest.fixture(scope="session")
async def stripe_emulator() -> AsyncIterator[StripeEmulator]:
    """One emulator for the whole session; tests keep apart by their own intent ids."""
    async with StripeEmulator() as emulator:
        yield emulator

"""The Stripe test infrastructure itself, driven through the real `stripe` async client.

The emulator (localstripe plus the cancellation_reason shim) and the proxy in front of
it must behave as the relay's tests will rely on: intents that wait for capture, cancel
with a reason, Stripe-shaped refusals, injected 500/429 answers, and a connection that
drops after Stripe acted. The refusals asserted here are localstripe's, which differ from
Stripe's in places (noted per test).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
import stripe

from tests.stripe_emulator import (
    TEST_API_KEY,
    StripeEmulator,
    create_manual_capture_intent,
    retrieve_intent,
)
from tests.stripe_proxy import StripeProxy


@pytest.fixture
async def client(stripe_proxy: StripeProxy) -> AsyncIterator[stripe.StripeClient]:
    """The stripe library's async client, through the proxy, with no retries of its own."""
    http_client = stripe.HTTPXClient(timeout=10)
    yield stripe.StripeClient(
        api_key=TEST_API_KEY,
        base_addresses={"api": stripe_proxy.base_url},
        max_network_retries=0,
        http_client=http_client,
    )
    await http_client.close_async()  # type: ignore[no-untyped-call]  # stripe leaves it bare


async def _intent(emulator: StripeEmulator, amount: int = 2000) -> str:
    intent = await create_manual_capture_intent(
        emulator.base_url, cart_id=f"cart-{secrets.token_hex(4)}", amount=amount
    )
    intent_id: str = intent["id"]
    return intent_id


async def test_manual_capture_intent_waits_for_capture(
    stripe_emulator: StripeEmulator, client: stripe.StripeClient
) -> None:
    made = await create_manual_capture_intent(stripe_emulator.base_url, cart_id="cart-1")

    seen = await client.v1.payment_intents.retrieve_async(made["id"])

    assert made["status"] == "requires_capture"
    assert (seen.status, seen.capture_method, seen.amount) == ("requires_capture", "manual", 2000)
    assert seen.metadata["cart_id"] == "cart-1"
    assert seen.cancellation_reason is None


async def test_cancel_with_reason_shows_on_the_intent_and_is_recorded(
    stripe_emulator: StripeEmulator, stripe_proxy: StripeProxy, client: stripe.StripeClient
) -> None:
    pid = await _intent(stripe_emulator)

    answer = await client.v1.payment_intents.cancel_async(
        pid, params={"cancellation_reason": "abandoned"}, options={"idempotency_key": "k1"}
    )

    assert (answer.status, answer.cancellation_reason) == ("canceled", "abandoned")
    stored = await retrieve_intent(stripe_emulator.base_url, pid)
    assert (stored["status"], stored["cancellation_reason"]) == ("canceled", "abandoned")
    [call] = stripe_proxy.calls("POST", f"/v1/payment_intents/{pid}/cancel")
    assert call.form == {"cancellation_reason": "abandoned"}
    assert call.idempotency_key == "k1"
    assert (call.status, call.upstream_status, call.injected, call.dropped) == (
        200,
        200,
        False,
        False,
    )


async def test_client_sends_an_idempotency_key_on_every_post(
    stripe_emulator: StripeEmulator, stripe_proxy: StripeProxy, client: stripe.StripeClient
) -> None:
    pid = await _intent(stripe_emulator)

    await client.v1.payment_intents.retrieve_async(pid)
    await client.v1.payment_intents.cancel_async(pid)

    [get] = stripe_proxy.calls("GET", f"/v1/payment_intents/{pid}")
    [post] = stripe_proxy.calls("POST", f"/v1/payment_intents/{pid}/cancel")
    assert get.idempotency_key is None
    assert post.idempotency_key  # the library makes one up when none is given
    assert (await retrieve_intent(stripe_emulator.base_url, pid))["cancellation_reason"] is None


async def test_unknown_cancellation_reason_is_refused(
    stripe_emulator: StripeEmulator, client: stripe.StripeClient
) -> None:
    pid = await _intent(stripe_emulator)

    with pytest.raises(stripe.InvalidRequestError) as refused:
        await client.v1.payment_intents.cancel_async(
            pid, params={"cancellation_reason": "automatic"}
        )

    assert (refused.value.http_status, refused.value.param) == (400, "cancellation_reason")
    assert (await retrieve_intent(stripe_emulator.base_url, pid))["status"] == "requires_capture"


async def test_second_cancel_is_refused_without_a_code(
    stripe_emulator: StripeEmulator, client: stripe.StripeClient
) -> None:
    pid = await _intent(stripe_emulator)
    await client.v1.payment_intents.cancel_async(pid, params={"cancellation_reason": "duplicate"})

    with pytest.raises(stripe.InvalidRequestError) as refused:
        await client.v1.payment_intents.cancel_async(
            pid, params={"cancellation_reason": "abandoned"}
        )

    # Stripe itself answers code payment_intent_unexpected_state; localstripe gives none.
    error = refused.value
    assert (error.http_status, error.code, error.user_message) == (400, None, "Bad request")
    stored = await retrieve_intent(stripe_emulator.base_url, pid)
    assert stored["cancellation_reason"] == "duplicate"


async def test_partial_capture_succeeds_and_refunds_the_rest(
    stripe_emulator: StripeEmulator, client: stripe.StripeClient
) -> None:
    pid = await _intent(stripe_emulator, amount=2000)

    answer = await client.v1.payment_intents.capture_async(
        pid, params={"amount_to_capture": 1500}, options={"idempotency_key": f"capture-{pid}"}
    )

    assert answer.status == "succeeded"
    charge = (await retrieve_intent(stripe_emulator.base_url, pid))["latest_charge"]
    assert (charge["captured"], charge["amount"], charge["amount_refunded"]) == (True, 2000, 500)


async def test_state_errors_as_localstripe_answers_them(
    stripe_emulator: StripeEmulator, client: stripe.StripeClient
) -> None:
    captured = await _intent(stripe_emulator)
    await client.v1.payment_intents.capture_async(captured)
    canceled = await _intent(stripe_emulator)
    await client.v1.payment_intents.cancel_async(canceled)

    with pytest.raises(stripe.InvalidRequestError) as capture_again:
        await client.v1.payment_intents.capture_async(captured)
    with pytest.raises(stripe.InvalidRequestError) as cancel_succeeded:
        await client.v1.payment_intents.cancel_async(captured)

    for refused in (capture_again.value, cancel_succeeded.value):
        assert (refused.http_status, refused.code, refused.user_message) == (
            400,
            None,
            "Bad request",
        )
    # Stripe refuses this with 400 payment_intent_unexpected_state; localstripe captures
    # the charge behind the canceled intent and answers 200.
    answer = await client.v1.payment_intents.capture_async(canceled)
    assert answer.status == "canceled"


async def test_injected_500_is_an_api_error_and_is_not_forwarded(
    stripe_emulator: StripeEmulator, stripe_proxy: StripeProxy, client: stripe.StripeClient
) -> None:
    pid = await _intent(stripe_emulator)
    stripe_proxy.fail_next(1, 500, path_contains="/cancel")

    with pytest.raises(stripe.APIError) as failed:
        await client.v1.payment_intents.cancel_async(pid, options={"idempotency_key": "k500"})

    assert type(failed.value) is stripe.APIError
    assert failed.value.http_status == 500
    assert (await retrieve_intent(stripe_emulator.base_url, pid))["status"] == "requires_capture"
    [call] = stripe_proxy.calls("POST", f"/v1/payment_intents/{pid}/cancel")
    assert (call.status, call.upstream_status, call.injected) == (500, None, True)
    assert call.idempotency_key == "k500"
    # One failure only: the retry goes through.
    answer = await client.v1.payment_intents.cancel_async(pid, options={"idempotency_key": "k500"})
    assert answer.status == "canceled"


async def test_faults_match_their_path_and_count(
    stripe_emulator: StripeEmulator, stripe_proxy: StripeProxy, client: stripe.StripeClient
) -> None:
    pid = await _intent(stripe_emulator)
    stripe_proxy.fail_next(2, 503, path_contains="/capture")

    assert (await client.v1.payment_intents.retrieve_async(pid)).status == "requires_capture"
    for _ in range(2):
        with pytest.raises(stripe.APIError):
            await client.v1.payment_intents.capture_async(pid)
    assert (await client.v1.payment_intents.capture_async(pid)).status == "succeeded"

    statuses = [r.status for r in stripe_proxy.requests]
    assert statuses == [200, 503, 503, 200]


async def test_injected_429_is_a_rate_limit_error_with_retry_after(
    stripe_emulator: StripeEmulator, stripe_proxy: StripeProxy, client: stripe.StripeClient
) -> None:
    pid = await _intent(stripe_emulator)
    stripe_proxy.fail_next(1, 429, path_contains=pid, retry_after_s=2)

    with pytest.raises(stripe.RateLimitError) as limited:
        await client.v1.payment_intents.cancel_async(pid)

    error = limited.value
    assert error.http_status == 429
    # The library passes no code to RateLimitError: it is only on the parsed error object.
    assert error.code is None
    assert error.error is not None
    assert error.error.code == "rate_limit"
    # The HTTPX client hands over httpx.Headers, which match names in any case.
    assert isinstance(error.headers, httpx.Headers)
    assert error.headers["Retry-After"] == error.headers["retry-after"] == "2"
    assert (await retrieve_intent(stripe_emulator.base_url, pid))["status"] == "requires_capture"


async def test_after_forward_runs_once_after_stripe_acted_then_drops_the_connection(
    stripe_emulator: StripeEmulator, stripe_proxy: StripeProxy, client: stripe.StripeClient
) -> None:
    pid = await _intent(stripe_emulator)
    victim = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)"
    )
    seen_at_callback: list[str] = []

    def kill_the_caller() -> None:
        # Blocking on purpose, like the relay test's SIGKILL: the emulator is another process.
        status = httpx.get(
            f"{stripe_emulator.base_url}/v1/payment_intents/{pid}",
            headers={"Authorization": f"Bearer {TEST_API_KEY}"},
        ).json()["status"]
        seen_at_callback.append(status)
        os.kill(victim.pid, signal.SIGKILL)

    stripe_proxy.after_forward(kill_the_caller, path_contains="/cancel")
    try:
        with pytest.raises(stripe.APIConnectionError):
            await client.v1.payment_intents.cancel_async(
                pid, params={"cancellation_reason": "abandoned"}
            )
        assert await asyncio.wait_for(victim.wait(), 5) == -signal.SIGKILL
    finally:
        if victim.returncode is None:
            victim.kill()
            await victim.wait()

    assert seen_at_callback == ["canceled"]
    [call] = stripe_proxy.calls("POST", f"/v1/payment_intents/{pid}/cancel")
    assert (call.status, call.upstream_status, call.dropped) == (None, 200, True)
    # Once only: the next call is answered (localstripe refuses the repeated cancel).
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.payment_intents.cancel_async(pid)


async def test_after_forward_awaits_an_async_callback(
    stripe_emulator: StripeEmulator, stripe_proxy: StripeProxy, client: stripe.StripeClient
) -> None:
    pid = await _intent(stripe_emulator)
    seen_at_callback: list[str] = []

    async def look() -> None:
        seen_at_callback.append((await retrieve_intent(stripe_emulator.base_url, pid))["status"])

    stripe_proxy.after_forward(look, path_contains=f"{pid}/capture")
    with pytest.raises(stripe.APIConnectionError):
        await client.v1.payment_intents.capture_async(pid)

    assert seen_at_callback == ["succeeded"]


async def test_emulator_answers_until_stopped() -> None:
    emulator = StripeEmulator()
    async with emulator:
        made = await create_manual_capture_intent(emulator.base_url, cart_id="cart-own")
        assert (await retrieve_intent(emulator.base_url, made["id"]))[
            "status"
        ] == "requires_capture"

    with pytest.raises(httpx.ConnectError):
        await retrieve_intent(emulator.base_url, made["id"])

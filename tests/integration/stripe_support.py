"""What the relay's tests share: a shop, its orders, the relay run, and what each left behind.

- `shop` (a fixture) and `Shop`: one test's database, Stripe (the session's localstripe
  behind a fresh recording, fault-injecting proxy) and the settings a relay runs with.
- Orders, made as the consumer makes them: `hold` creates an intent on the emulator,
  `authorize` then applies its authorization with `consumer.store.apply_batch`, which
  writes the order's Stripe action to the outbox.
- The relay, run in this process (`run_relay`) or as a process (`start_consumer`,
  `relay_process`, `stop_with_sigterm`), never left running after its test (`reaped`).
- What happened, read back: the outbox row of an action (`action_row`, `state_of`), the
  order (`order_status`), the calls the proxy saw (`cancels`, `captures`) and the key
  each should carry (`key_of`); `stripe_directly` acts behind the relay's back, and
  `outbox_command` runs `order-consumer outbox` as an operator would.

Fixtures here reach a test module by import; list them in its `__all__`, as
tests/conftest.py does, so that ruff sees them used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from intentflow.consumer import tools
from intentflow.consumer.bootstrap import build_relay
from intentflow.consumer.outbox import Action
from intentflow.consumer.policy import ShopPolicy
from intentflow.consumer.relay import RelayStats
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.store import BatchResult, apply_batch
from intentflow.consumer.tools import outbox as outbox_tool
from intentflow.devservices import Services
from intentflow.devservices.topics import create_topics
from intentflow.stripekit import events
from tests.integration.store_support import envelope
from tests.stripe_emulator import TEST_API_KEY, StripeEmulator, create_manual_capture_intent
from tests.stripe_proxy import RecordedRequest, StripeProxy
from tests.support import consumer_env, consumer_settings, eventually, seed_cart

SKU = "sku-mug"
UNIT_AMOUNT = 1500
_AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
# An outbox row's (state, outcome, attempts, error_code, last_error).
SUCCEEDED_FIRST_TIME = ("done", "succeeded", 1, None, None)
NEVER_TRIED = ("pending", None, 0, None, None)

Process = asyncio.subprocess.Process


@dataclass
class Shop:
    """One test's database, its Stripe (the emulator behind a fresh proxy), and relay settings."""

    db: asyncpg.Connection
    emulator: StripeEmulator
    proxy: StripeProxy
    settings: ConsumerSettings

    def settings_with(self, **overrides: Any) -> ConsumerSettings:
        values = self.settings.model_dump()
        values.update(overrides)
        return ConsumerSettings(**values)


@dataclass(frozen=True)
class Authorized:
    """An intent held on the emulator, and the authorization event the consumer applied."""

    payment_intent_id: str
    amount: int
    event: dict[str, Any]


@pytest.fixture
async def shop(
    infra: Services,
    database_url: str,
    db: asyncpg.Connection,
    stripe_emulator: StripeEmulator,
    stripe_proxy: StripeProxy,
) -> Shop:
    orders_topic = f"orders.events.{secrets.token_hex(6)}"
    await create_topics(infra.kafka_bootstrap_servers, orders_topic, partitions=1)
    settings = consumer_settings(
        infra,
        database_url,
        # The relay reads no events topic; this one is never created.
        f"stripe.events.{secrets.token_hex(6)}",
        orders_topic=orders_topic,
        stripe_api_key=TEST_API_KEY,
        stripe_api_base=stripe_proxy.base_url,
        stripe_timeout_s=10.0,
        relay_retry_initial_s=0.05,
        relay_retry_max_s=0.5,
        relay_poll_interval_s=0.05,
        startup_timeout_s=20.0,
    )
    return Shop(db, stripe_emulator, stripe_proxy, settings)


# --- Orders ------------------------------------------------------------------------------


async def apply(
    db: asyncpg.Connection, *payloads: dict[str, Any], policy: ShopPolicy | None = None
) -> BatchResult:
    """One batch, as a consumer applies it."""
    batch = [envelope(p, offset=i) for i, p in enumerate(payloads)]
    return await apply_batch(db, batch, policy=policy or ShopPolicy())


async def hold(shop: Shop, *, quantity: int, with_cart: bool = True) -> Authorized:
    """An intent on the emulator paying for `quantity` of SKU (cart seeded unless told not)."""
    cart_id = f"cart-{secrets.token_hex(4)}"
    amount = quantity * UNIT_AMOUNT
    if with_cart:
        await seed_cart(shop.db, cart_id, [(SKU, quantity, UNIT_AMOUNT)])
    made = await create_manual_capture_intent(
        shop.emulator.base_url, cart_id=cart_id, amount=amount, currency="usd"
    )
    assert made["status"] == "requires_capture"
    event = events.intent_event(made["id"], amount=amount, cart_id=cart_id)
    assert (event["type"], event["data"]["object"]["status"]) == (
        "payment_intent.amount_capturable_updated",
        "requires_capture",
    )
    return Authorized(made["id"], amount, event)


def policy_of(settings: ConsumerSettings) -> ShopPolicy:
    """What a consumer with `settings` writes to the outbox (as consumer.bootstrap builds it)."""
    return ShopPolicy.from_settings(settings)


async def authorize(
    shop: Shop,
    *,
    quantity: int,
    with_cart: bool = True,
    settings: ConsumerSettings | None = None,
) -> Authorized:
    """`hold`, then a consumer with `settings` applies the authorization in a batch of its own."""
    held = await hold(shop, quantity=quantity, with_cart=with_cart)
    await apply(shop.db, held.event, policy=policy_of(settings or shop.settings))
    return held


# --- The relay ---------------------------------------------------------------------------


async def run_relay(settings: ConsumerSettings, timeout_s: float = 20) -> RelayStats:
    """The relay as `order-consumer relay --exit-when-idle` runs it, in this process."""
    relay = build_relay(settings)
    async with asyncio.timeout(timeout_s), relay:
        return await relay.run(exit_when_idle=True)


async def start_consumer(settings: ConsumerSettings, *command: str) -> Process:
    """`order-consumer COMMAND…` with `settings` in its environment, its output piped."""
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "intentflow.consumer", *command),
        env=consumer_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@contextlib.asynccontextmanager
async def reaped(process: Process) -> AsyncIterator[Process]:
    """`process`, killed if it is still running when the block ends (a failed test
    leaves no relay behind to call Stripe)."""
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@dataclass(frozen=True)
class Exited:
    returncode: int
    summary: dict[str, Any]  # the `{"outbox": …}` line
    log: list[dict[str, Any]]  # the JSON log lines

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.log if line.get("event") == event]


async def relay_process(settings: ConsumerSettings, timeout_s: float = 30) -> Exited:
    """`order-consumer relay --exit-when-idle` until it exits by itself."""
    async with reaped(await start_consumer(settings, "relay", "--exit-when-idle")) as process:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode is not None
    out_lines = stdout.decode().strip().splitlines()
    log = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    summary = json.loads(out_lines[-1]) if out_lines else {}
    return Exited(process.returncode, summary, log)


async def stop_with_sigterm(
    process: Process, ready: Callable[[], bool], *, ready_within_s: float, exit_within_s: float
) -> tuple[bytes, float]:
    """SIGTERM to `process` once `ready()` holds; its stderr, and the seconds from the
    signal to its exit."""
    async with reaped(process):
        await eventually(ready, ready_within_s)
        loop = asyncio.get_running_loop()
        asked = loop.time()
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), exit_within_s)
        return stderr, loop.time() - asked


# --- What happened -----------------------------------------------------------------------


async def action_row(db: asyncpg.Connection, pid: str, action: Action) -> dict[str, Any]:
    row = await db.fetchrow(
        """
        SELECT id, order_id, state, outcome, attempts, error_code, last_error, idempotency_key
        FROM outbox WHERE kind = 'stripe_action' AND payment_intent_id = $1 AND name = $2
        """,
        pid,
        str(action),
    )
    assert row is not None, f"no {action} row for {pid}"
    return dict(row)


def state_of(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["state"], row["outcome"], row["attempts"], row["error_code"], row["last_error"])


async def order_status(db: asyncpg.Connection, pid: str) -> str:
    return str(await db.fetchval("SELECT status FROM orders WHERE payment_intent_id = $1", pid))


def cancels(proxy: StripeProxy, pid: str) -> list[RecordedRequest]:
    return proxy.calls("POST", f"/v1/payment_intents/{pid}/cancel")


def captures(proxy: StripeProxy, pid: str) -> list[RecordedRequest]:
    return proxy.calls("POST", f"/v1/payment_intents/{pid}/capture")


def key_of(action: Action, pid: str) -> str:
    return f"intentflow:{action}:{pid}"


async def stripe_directly(emulator: StripeEmulator, pid: str, verb: str, **form: str) -> None:
    """Act on an intent behind the relay's back (the shop's dashboard), not through the proxy."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(
            f"{emulator.base_url}/v1/payment_intents/{pid}/{verb}", headers=_AUTH, data=form
        )
    assert response.status_code == 200, response.text


async def outbox_command(
    settings: ConsumerSettings, capsys: pytest.CaptureFixture[str], *words: str
) -> tuple[int, str]:
    """`order-consumer outbox WORDS…` on the test's database: its status and stdout."""
    code, out, _ = await outbox_run(settings, capsys, *words)
    return code, out


async def outbox_run(
    settings: ConsumerSettings, capsys: pytest.CaptureFixture[str], *words: str
) -> tuple[int, str, str]:
    """`order-consumer outbox WORDS…`, parsed as the command parses it: status, out, err."""
    parser = argparse.ArgumentParser()
    outbox_tool.add_parser(parser.add_subparsers(dest="command"))
    capsys.readouterr()
    code = await tools.run("outbox", parser.parse_args(["outbox", *words]), settings)
    captured = capsys.readouterr()
    return code, captured.out, captured.err

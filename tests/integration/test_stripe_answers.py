"""The relay against Stripe's saved answers, refunds and Connect accounts (tests/fake_stripe.py).

What localstripe cannot show (it keeps no idempotency keys and ignores
`Stripe-Account`): a 5xx saved under its key and replayed for ever, an answer lost
after Stripe acted, a relay killed mid-call, refunds made by others or by us, and
connected accounts. Orders are made as the consumer makes them (`apply`), which
asks for the refund of a captured one, or the cancel of a held one. Each test checks
the outbox row, the requests the fake recorded, and the intent and refunds it holds.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
import structlog

from intentflow.consumer.bootstrap import build_relay
from intentflow.consumer.outbox import Action
from intentflow.consumer.policy import ShopPolicy
from intentflow.consumer.relay import RelayStats
from intentflow.consumer.settings import ConsumerSettings
from intentflow.devservices import Services
from intentflow.stripekit import events
from tests.fake_stripe import FakeStripe, Recorded, fake_stripe
from tests.integration.stripe_support import SKU, apply, key_of, outbox_command
from tests.stripe_emulator import TEST_API_KEY
from tests.support import consumer_settings, eventually, seed_cart, seed_stock

# The fixture, imported for pytest to find (listed so that ruff sees it used).
__all__ = ["fake_stripe"]

AMOUNT = 1500
CONNECTED = "acct_1Connected0000"


@dataclass
class Money:
    db: asyncpg.Connection
    stripe: FakeStripe
    settings: ConsumerSettings

    def settings_with(self, **overrides: Any) -> ConsumerSettings:
        return ConsumerSettings(**(self.settings.model_dump() | overrides))


@dataclass(frozen=True)
class Order:
    payment_intent_id: str
    order_id: int


@pytest.fixture
async def money(
    infra: Services, database_url: str, db: asyncpg.Connection, fake_stripe: FakeStripe
) -> Money:
    await seed_stock(db, {SKU: 0})  # every order here cannot be filled
    settings = consumer_settings(
        infra,
        database_url,
        "stripe.events.unused",
        stripe_api_key=TEST_API_KEY,
        stripe_api_base=fake_stripe.base_url,
        stripe_timeout_s=0.5,
        relay_retry_initial_s=0.05,
        relay_retry_max_s=0.2,
        relay_poll_interval_s=0.05,
    )
    return Money(db, fake_stripe, settings)


async def unfillable(
    m: Money,
    status: str,
    *,
    account: str | None = None,
    refund_policy: ShopPolicy | None = None,
) -> Order:
    """An out_of_stock order of an intent on the fake; a captured one gets its refund row."""
    pid = m.stripe.add_intent(amount=AMOUNT, status=status, account=account)
    cart = f"cart-{pid}"
    await seed_cart(m.db, cart, [(SKU, 1, AMOUNT)])
    evt = events.intent_event(pid, amount=AMOUNT, cart_id=cart, status=status)
    if account is not None:
        evt["account"] = account  # as Stripe sends a connected account's events
    await apply(m.db, evt, policy=refund_policy or ShopPolicy())
    assert await m.db.fetchval("SELECT account FROM orders WHERE payment_intent_id = $1", pid) == (
        account
    )
    # The order events are the events loop's: published, so that no broker is needed.
    await m.db.execute(
        "UPDATE outbox SET state = 'done', outcome = 'published', done_at = now()"
        " WHERE kind = 'order_event'"
    )
    order_id = await m.db.fetchval("SELECT id FROM orders WHERE payment_intent_id = $1", pid)
    # The consumer asked for what the order is owed: a cancel while held, a refund once taken.
    asked = await m.db.fetchval(
        "SELECT name FROM outbox WHERE kind = 'stripe_action' AND payment_intent_id = $1", pid
    )
    assert (
        asked
        == {"requires_capture": "cancel_payment_intent", "succeeded": "refund_payment_intent"}[
            status
        ]
    )
    return Order(pid, order_id)


async def relay(settings: ConsumerSettings, timeout_s: float = 10) -> RelayStats:
    r = build_relay(settings)
    async with asyncio.timeout(timeout_s), r:
        return await r.run(exit_when_idle=True)


async def row_of(db: asyncpg.Connection, pid: str, action: Action) -> dict[str, Any]:
    row = await db.fetchrow(
        """
        SELECT id, order_id, state, outcome, attempts, error_code, last_error,
               key_generation, verify_first
        FROM outbox WHERE kind = 'stripe_action' AND payment_intent_id = $1 AND name = $2
        """,
        pid,
        str(action),
    )
    assert row is not None, f"no {action} row for {pid}"
    return dict(row)


def ended(row: dict[str, Any]) -> tuple[Any, ...]:
    """(state, outcome, attempts, key_generation, verify_first)"""
    return tuple(row[k] for k in ("state", "outcome", "attempts", "key_generation", "verify_first"))


def seen(requests: list[Recorded]) -> list[tuple[str, str, str | None]]:
    return [(r.method, r.path, r.idempotency_key) for r in requests]


def intent_path(pid: str, verb: str | None = None) -> str:
    return f"/v1/payment_intents/{pid}" + (f"/{verb}" if verb else "")


# --- Refunds: read first, never twice ------------------------------------------------


async def test_a_refund_reads_stripe_then_returns_what_was_captured_once(money: Money) -> None:
    order = await unfillable(money, "succeeded")
    pid = order.payment_intent_id
    row = await row_of(money.db, pid, Action.REFUND)

    await relay(money.settings)

    key = key_of(Action.REFUND, pid)
    assert seen(money.stripe.requests) == [
        ("GET", intent_path(pid), None),
        ("GET", "/v1/refunds", None),
        ("POST", "/v1/refunds", key),
    ]
    assert money.stripe.requests[1].query == {"payment_intent": pid, "limit": "100"}
    assert money.stripe.requests[2].form == {
        "payment_intent": pid,
        "amount": str(AMOUNT),
        "metadata[intentflow_order_id]": str(order.order_id),
        "metadata[intentflow_reason]": "out_of_stock",
        "metadata[intentflow_outbox_id]": str(row["id"]),
    }
    [refund] = money.stripe.refunds_of(pid)
    assert (refund["amount"], refund["reason"], refund["status"]) == (AMOUNT, None, "succeeded")
    assert ended(await row_of(money.db, pid, Action.REFUND)) == ("done", "succeeded", 1, 0, False)

    await relay(money.settings)
    assert len(money.stripe.requests) == 3


async def test_a_refund_returns_only_what_nobody_else_refunded(money: Money) -> None:
    """The shop refunded part from its dashboard; a refund that failed counts for nothing."""
    pid = (await unfillable(money, "succeeded")).payment_intent_id
    money.stripe.add_refund(pid, 500)
    money.stripe.add_refund(pid, 300, status="failed")

    await relay(money.settings)

    [post] = money.stripe.calls("POST", "/v1/refunds")
    assert post.form["amount"] == str(AMOUNT - 500)
    assert [r["amount"] for r in money.stripe.refunds_of(pid)] == [500, 300, AMOUNT - 500]
    assert ended(await row_of(money.db, pid, Action.REFUND)) == ("done", "succeeded", 1, 0, False)


async def test_a_refund_stripe_already_shows_complete_is_done_without_a_call(
    money: Money,
) -> None:
    pid = (await unfillable(money, "succeeded")).payment_intent_id
    money.stripe.add_refund(pid, AMOUNT)

    await relay(money.settings)

    assert money.stripe.calls("POST", "/v1/refunds") == []
    row = await row_of(money.db, pid, Action.REFUND)
    assert ended(row) == ("done", "already_done", 1, 0, False)
    assert row["last_error"] == f"refunded in full ({AMOUNT} of {AMOUNT})"


async def test_a_refund_whose_answer_was_lost_is_found_by_its_metadata_not_made_again(
    money: Money,
) -> None:
    """Stripe made the refund, the answer never came (a timeout): the next attempt reads
    the refunds, finds the one made for this row, and makes no second call."""
    pid = (await unfillable(money, "succeeded")).payment_intent_id
    money.stripe.time_out_next(path_contains="/v1/refunds", acted=True)

    stats = await relay(money.settings)

    assert dict(stats.actions) == {"retry": 1, "already_done": 1}
    assert len(money.stripe.calls("POST", "/v1/refunds")) == 1
    [refund] = money.stripe.refunds_of(pid)
    row = await row_of(money.db, pid, Action.REFUND)
    assert refund["metadata"]["intentflow_outbox_id"] == str(row["id"])
    assert ended(row) == ("done", "already_done", 2, 0, False)
    assert row["last_error"] == f"refunded by {refund['id']}, made for this row"


async def test_a_relay_killed_mid_refund_and_a_second_relay_never_refund_twice(
    money: Money,
) -> None:
    """A relay stopped while Stripe holds its refund call (acted on) rolls its claim back;
    the next relay reads, finds the refund, and makes no call. Two relays at once share
    the other rows, each refunded once."""
    first = (await unfillable(money, "succeeded")).payment_intent_id
    others = [(await unfillable(money, "succeeded")).payment_intent_id for _ in range(4)]
    money.stripe.time_out_next(path_contains="/v1/refunds", acted=True)
    patient = money.settings_with(stripe_timeout_s=20.0, relay_stripe_concurrency=1)
    killed = build_relay(patient)
    async with killed:
        running = asyncio.create_task(killed.run(exit_when_idle=True))
        await eventually(lambda: bool(money.stripe.calls("POST", "/v1/refunds")), 5)
        killed.request_stop()
        await asyncio.wait_for(running, 5)
    [held] = money.stripe.calls("POST", "/v1/refunds")
    assert held.status is None  # never answered
    claimed = json.loads(held.form["metadata[intentflow_outbox_id]"])
    assert (await money.db.fetchval("SELECT attempts FROM outbox WHERE id = $1", claimed)) == 0

    settings = money.settings_with(relay_stripe_concurrency=2)
    async with asyncio.TaskGroup() as both:  # a failure in one stops the other
        both.create_task(relay(settings))
        both.create_task(relay(settings))

    for pid in [first, *others]:
        assert len(money.stripe.refunds_of(pid)) == 1, pid
        assert (await row_of(money.db, pid, Action.REFUND))["state"] == "done"
    assert len(money.stripe.calls("POST", "/v1/refunds")) == 5


# --- Saved answers: a new key only after a read ----------------------------------------


@pytest.mark.parametrize("should_retry", [None, False], ids=["plain", "should-retry-false"])
async def test_a_500_saved_under_its_key_is_retried_after_a_read_under_the_next_key(
    money: Money, should_retry: bool | None
) -> None:
    """Stripe keeps a 500 under its key, `Stripe-Should-Retry: false` or not: each retry
    reads the intent, then calls under the next generation (a second 500, a third key)."""
    pid = (await unfillable(money, "requires_capture")).payment_intent_id
    for _ in range(2):
        money.stripe.fail_next(500, path_contains="/cancel", should_retry=should_retry)

    stats = await relay(money.settings)

    key = key_of(Action.CANCEL, pid)
    assert dict(stats.actions) == {"retry": 2, "succeeded": 1}
    cancel, read = ("POST", intent_path(pid, "cancel")), ("GET", intent_path(pid), None)
    assert seen(money.stripe.requests) == [
        (*cancel, key),
        read,
        (*cancel, f"{key}:1"),
        read,
        (*cancel, f"{key}:2"),
    ]
    assert [r.status for r in money.stripe.requests] == [500, 200, 500, 200, 200]
    assert money.stripe.intent(pid)["status"] == "canceled"
    assert ended(await row_of(money.db, pid, Action.CANCEL)) == ("done", "succeeded", 3, 2, False)
    # The first key answers its 500 for ever: only a new one could act.
    async with httpx.AsyncClient(base_url=money.stripe.base_url) as client:
        again = await client.post(
            intent_path(pid, "cancel"),
            data={"cancellation_reason": "abandoned"},
            headers={"Authorization": f"Bearer {TEST_API_KEY}", "Idempotency-Key": key},
        )
    assert (again.status_code, again.headers["Idempotent-Replayed"]) == (500, "true")


@pytest.mark.parametrize("fault", ["500", "timeout"])
async def test_an_unknown_outcome_stripe_acted_on_is_read_done_and_not_called_again(
    money: Money, fault: str
) -> None:
    pid = (await unfillable(money, "requires_capture")).payment_intent_id
    if fault == "500":
        money.stripe.fail_next(503, path_contains="/cancel", acted=True)
    else:
        money.stripe.time_out_next(path_contains="/cancel", acted=True)

    stats = await relay(money.settings)

    assert dict(stats.actions) == {"retry": 1, "already_done": 1}
    assert seen(money.stripe.requests) == [
        ("POST", intent_path(pid, "cancel"), key_of(Action.CANCEL, pid)),
        ("GET", intent_path(pid), None),
    ]
    assert ended(await row_of(money.db, pid, Action.CANCEL)) == (
        "done",
        "already_done",
        2,
        0,
        False,
    )


async def test_a_relay_killed_mid_call_under_a_new_generation_retries_that_same_key(
    money: Money,
) -> None:
    """The generation is recorded with the attempt: a claim that rolls back leaves the
    row as the last recorded attempt left it, so the next relay calls with the key the
    killed one used (Stripe answers it, or says it is still in use), never a third."""
    pid = (await unfillable(money, "requires_capture")).payment_intent_id
    key = key_of(Action.CANCEL, pid)
    money.stripe.fail_next(500, path_contains="/cancel")
    money.stripe.time_out_next(path_contains="/cancel", acted=False)
    killed = build_relay(money.settings_with(stripe_timeout_s=20.0))
    async with killed:
        running = asyncio.create_task(killed.run(exit_when_idle=True))
        await eventually(lambda: len(money.stripe.calls("POST", intent_path(pid, "cancel"))) == 2)
        killed.request_stop()
        await asyncio.wait_for(running, 5)
    assert ended(await row_of(money.db, pid, Action.CANCEL)) == ("pending", None, 1, 0, True)

    await relay(money.settings)

    keys = [r.idempotency_key for r in money.stripe.calls("POST", intent_path(pid, "cancel"))]
    assert keys == [key, f"{key}:1", f"{key}:1"]
    assert ended(await row_of(money.db, pid, Action.CANCEL)) == ("done", "succeeded", 2, 1, False)


@pytest.mark.parametrize(
    ("status", "code"),
    [(429, None), (409, "lock_timeout"), (409, "idempotency_key_in_use")],
    ids=["429", "409-lock", "409-key-in-use"],
)
async def test_a_rate_limit_or_conflict_is_retried_with_the_same_key_and_no_read(
    money: Money, status: int, code: str | None
) -> None:
    pid = (await unfillable(money, "requires_capture")).payment_intent_id
    money.stripe.fail_next(status, path_contains="/cancel", code=code)

    await relay(money.settings)

    key = key_of(Action.CANCEL, pid)
    assert seen(money.stripe.requests) == [("POST", intent_path(pid, "cancel"), key)] * 2
    assert [r.status for r in money.stripe.requests] == [status, 200]
    assert ended(await row_of(money.db, pid, Action.CANCEL)) == ("done", "succeeded", 2, 0, False)


# --- Connect ------------------------------------------------------------------------------


async def test_every_call_about_a_connected_accounts_intent_names_the_account(
    money: Money,
) -> None:
    held = (await unfillable(money, "requires_capture", account=CONNECTED)).payment_intent_id
    taken = (await unfillable(money, "succeeded", account=CONNECTED)).payment_intent_id
    platform = (await unfillable(money, "succeeded")).payment_intent_id

    await relay(money.settings)

    by_account = {
        pid: {r.stripe_account for r in money.stripe.requests if pid in r.path + str(r.form)}
        for pid in (held, taken, platform)
    }
    assert by_account == {held: {CONNECTED}, taken: {CONNECTED}, platform: {None}}
    assert len(money.stripe.requests) == 1 + 3 + 3  # a cancel; two refunds, each read first
    assert money.stripe.intent(held, account=CONNECTED)["status"] == "canceled"
    assert len(money.stripe.refunds_of(taken, account=CONNECTED)) == 1
    assert len(money.stripe.refunds_of(platform)) == 1
    for pid, action in ((held, Action.CANCEL), (taken, Action.REFUND), (platform, Action.REFUND)):
        assert (await row_of(money.db, pid, action))["outcome"] == "succeeded"


# --- What the relay does not know, and what it may not do ---------------------------------


async def test_an_action_no_record_knows_is_reported_and_left_pending(money: Money) -> None:
    pid = (await unfillable(money, "requires_capture")).payment_intent_id
    await money.db.execute(
        """
        INSERT INTO outbox (kind, name, payment_intent_id, order_id, payload, idempotency_key)
        SELECT 'stripe_action', 'refund_everything', payment_intent_id, order_id, '{}', 'k'
        FROM outbox WHERE payment_intent_id = $1 AND name = 'cancel_payment_intent'
        """,
        pid,
    )

    with structlog.testing.capture_logs() as logged:
        stats = await relay(money.settings)

    [unknown] = [line for line in logged if line["event"] == "stripe_action_unknown"]
    assert unknown["pending"] == {"refund_everything": 1}
    assert dict(stats.actions) == {"succeeded": 1}  # the cancel
    left = await money.db.fetchrow(
        "SELECT state, attempts FROM outbox WHERE name = 'refund_everything'"
    )
    assert left is not None and tuple(left) == ("pending", 0)
    assert [r.path for r in money.stripe.requests] == [intent_path(pid, "cancel")]


async def test_a_relay_with_refund_unfillable_false_records_refunds_owed_until_retried(
    money: Money, capsys: pytest.CaptureFixture[str]
) -> None:
    order = await unfillable(money, "succeeded")
    pid = order.payment_intent_id

    stats = await relay(money.settings_with(refund_unfillable=False))

    assert (dict(stats.actions), money.stripe.requests) == ({"owed": 1}, [])
    row = await row_of(money.db, pid, Action.REFUND)
    assert ended(row) == ("failed", "owed", 1, 0, False)
    code, out = await outbox_command(money.settings, capsys, "--failed")
    assert code == 0
    assert out.splitlines() == [
        f"{row['id']}\trefund_payment_intent\t{pid}\t{order.order_id}\towed"
        f"\trefund_unfillable_off\t{row['last_error']}"
    ]

    code, out = await outbox_command(money.settings, capsys, "--json", "retry", str(row["id"]))
    assert json.loads(out) == {"pending_again": [row["id"]], "not_failed": []}
    await relay(money.settings)

    assert [r["amount"] for r in money.stripe.refunds_of(pid)] == [AMOUNT]
    # Owed, never called: its first key is still unused.
    [post] = money.stripe.calls("POST", "/v1/refunds")
    assert post.idempotency_key == key_of(Action.REFUND, pid)
    assert (await row_of(money.db, pid, Action.REFUND))["outcome"] == "succeeded"

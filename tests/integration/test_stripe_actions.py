"""The relay's Stripe actions against a Stripe-compatible server (localstripe behind a proxy).

Orders are made as the consumer makes them: an intent is created on the emulator, its
authorization event is applied with `consumer.store.apply_batch`, and the outbox gets
the action the order calls for. The relay then runs in this process (`build_relay`) or
as `order-consumer relay --exit-when-idle`. Each test checks three records of what
happened: the requests the proxy saw, the intent as the emulator keeps it, and the
outbox row (state, outcome, attempts, error code and message). The shop, the orders
and the relay runners these tests share with test_outbox_review.py are in
stripe_support.py.

localstripe differs from Stripe where these tests lean on it: it keeps no idempotency
keys (a repeated cancel is refused with 400 "Bad request" and no code, where Stripe
would replay its first answer), and it refuses any key that does not start with `sk_`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import asyncpg
import pytest

from intentflow.consumer.bootstrap import build_relay
from intentflow.consumer.outbox import Action, ActionRow, insert_actions
from intentflow.consumer.stripe_actions import CAPTURED_FIRST
from intentflow.consumer.tools.reconcile import check
from intentflow.stripekit import events
from tests.integration.stripe_support import (
    NEVER_TRIED,
    SKU,
    SUCCEEDED_FIRST_TIME,
    Authorized,
    Shop,
    action_row,
    apply,
    authorize,
    cancels,
    captures,
    hold,
    key_of,
    order_status,
    outbox_command,
    reaped,
    relay_process,
    run_relay,
    shop,
    start_consumer,
    state_of,
    stop_with_sigterm,
    stripe_directly,
)
from tests.stripe_emulator import StripeEmulator, refunds_on, retrieve_intent
from tests.support import seed_stock

# The fixture, imported for pytest to find (listed so that ruff sees it used).
__all__ = ["shop"]


async def stripe_actions(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM outbox WHERE kind = 'stripe_action'"))


async def canceled_event(emulator: StripeEmulator, held: Authorized) -> dict[str, Any]:
    """`payment_intent.canceled` carrying the intent as the emulator has it now, sent a
    second after the authorization."""
    intent = await retrieve_intent(emulator.base_url, held.payment_intent_id)
    assert intent["status"] == "canceled"
    evt = events.event(intent, "payment_intent.canceled")
    evt["created"] = held.event["created"] + 1
    return evt


async def stock(db: asyncpg.Connection) -> tuple[int, list[tuple[str, int]]]:
    """SKU's level, and its movements (reason, delta) in the order written."""
    level = await db.fetchval("SELECT stocked_quantity FROM inventory_levels WHERE sku = $1", SKU)
    moves = await db.fetch(
        "SELECT reason, quantity_delta FROM inventory_movements WHERE sku = $1 ORDER BY id", SKU
    )
    return int(level), [(m["reason"], m["quantity_delta"]) for m in moves]


# --- Cancel: once, with one key, whoever and however often asks --------------------------


async def test_an_out_of_stock_order_gets_its_authorization_canceled_once_with_its_key(
    shop: Shop,
) -> None:
    await seed_stock(shop.db, {SKU: 1})
    held = await authorize(shop, quantity=2)
    pid = held.payment_intent_id
    assert await order_status(shop.db, pid) == "out_of_stock"
    key = key_of(Action.CANCEL, pid)

    stats = await run_relay(shop.settings)

    assert dict(stats.actions) == {"succeeded": 1}
    intent = await retrieve_intent(shop.emulator.base_url, pid)
    assert (intent["status"], intent["cancellation_reason"]) == ("canceled", "abandoned")
    [call] = cancels(shop.proxy, pid)
    assert (call.form, call.idempotency_key, call.status) == (
        {"cancellation_reason": "abandoned"},
        key,
        200,
    )
    assert shop.proxy.requests == [call]  # no capture, no re-read
    row = await action_row(shop.db, pid, Action.CANCEL)
    assert state_of(row) == SUCCEEDED_FIRST_TIME
    assert row["idempotency_key"] == key

    # The same action asked for again (a replayed batch, the sweep) adds no row and
    # reopens nothing: the relay has nothing more to do for this intent.
    again = ActionRow(Action.CANCEL, pid, row["order_id"], {"cancellation_reason": "abandoned"})
    assert await insert_actions(shop.db, [again]) == 0
    assert await stripe_actions(shop.db) == 1
    await run_relay(shop.settings)
    assert state_of(await action_row(shop.db, pid, Action.CANCEL)) == state_of(row)
    assert shop.proxy.requests == [call]


async def test_two_relays_at_once_cancel_each_intent_exactly_once(shop: Shop) -> None:
    await seed_stock(shop.db, {SKU: 0})
    held = [await hold(shop, quantity=1) for _ in range(10)]
    await apply(shop.db, *(h.event for h in held))
    # A slow Stripe, and few calls per claim: each relay claims while the other's
    # calls are still in Stripe's hands.
    shop.proxy.delay_s = 0.3
    settings = shop.settings_with(relay_stripe_concurrency=3)
    first, second = build_relay(settings), build_relay(settings)

    async with asyncio.timeout(30), first, second:
        stats = await asyncio.gather(
            first.run(exit_when_idle=True), second.run(exit_when_idle=True)
        )

    for h in held:
        pid = h.payment_intent_id
        assert [c.idempotency_key for c in cancels(shop.proxy, pid)] == [key_of(Action.CANCEL, pid)]
        assert (await retrieve_intent(shop.emulator.base_url, pid))["status"] == "canceled"
        assert state_of(await action_row(shop.db, pid, Action.CANCEL)) == SUCCEEDED_FIRST_TIME
    done = [s.actions["succeeded"] for s in stats]
    assert sum(done) == 10
    assert min(done) > 0, f"one relay did all the work ({done})"
    assert len(shop.proxy.requests) == 10
    # Side by side, not one after the other: more calls at once than one relay makes.
    assert shop.proxy.max_in_flight > 3, shop.proxy.max_in_flight


async def test_a_relay_killed_after_stripe_acted_calls_again_with_the_same_key(
    shop: Shop,
) -> None:
    await seed_stock(shop.db, {SKU: 0})
    pid = (await authorize(shop, quantity=1)).payment_intent_id
    key = key_of(Action.CANCEL, pid)
    process: asyncio.subprocess.Process | None = None

    def kill_the_relay() -> None:
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)

    # After the emulator canceled, before the relay hears of it or marks the row.
    shop.proxy.after_forward(kill_the_relay, path_contains="/cancel")
    process = await start_consumer(shop.settings, "relay", "--exit-when-idle")
    async with reaped(process):
        assert await asyncio.wait_for(process.wait(), 30) == -signal.SIGKILL

    assert (await retrieve_intent(shop.emulator.base_url, pid))["status"] == "canceled"
    [killed] = cancels(shop.proxy, pid)
    assert (killed.upstream_status, killed.dropped, killed.idempotency_key) == (200, True, key)
    assert state_of(await action_row(shop.db, pid, Action.CANCEL)) == NEVER_TRIED

    stats = await run_relay(shop.settings)

    assert dict(stats.actions) == {"already_done": 1}
    first, second = cancels(shop.proxy, pid)
    assert first is killed
    # Stripe would replay its first answer for this key; localstripe refuses the
    # second cancel, and the relay finds the intent where the cancel would put it.
    assert (second.idempotency_key, second.status, second.form) == (
        key,
        400,
        {"cancellation_reason": "abandoned"},
    )
    assert len(shop.proxy.calls("GET", f"/v1/payment_intents/{pid}")) == 1
    row = await action_row(shop.db, pid, Action.CANCEL)
    # The refusal is kept with the row, for the record.
    assert state_of(row) == ("done", "already_done", 1, "invalid_request_error", "Bad request")
    intent = await retrieve_intent(shop.emulator.base_url, pid)
    assert (intent["status"], intent["cancellation_reason"]) == ("canceled", "abandoned")


# --- Capture, by policy ------------------------------------------------------------------


async def test_capture_policy_never_leaves_a_placed_orders_authorization_alone(
    shop: Shop,
) -> None:
    await seed_stock(shop.db, {SKU: 5})
    settings = shop.settings_with(capture_policy="never")
    pid = (await authorize(shop, quantity=2, settings=settings)).payment_intent_id
    assert await order_status(shop.db, pid) == "placed"

    stats = await run_relay(settings)

    assert dict(stats.actions) == {}
    assert shop.proxy.requests == []
    assert await stripe_actions(shop.db) == 0
    assert (await retrieve_intent(shop.emulator.base_url, pid))["status"] == "requires_capture"


async def test_capture_policy_on_placed_captures_the_order_amount_once(shop: Shop) -> None:
    await seed_stock(shop.db, {SKU: 5})
    settings = shop.settings_with(capture_policy="on_placed")
    held = await authorize(shop, quantity=2, settings=settings)
    pid = held.payment_intent_id
    assert await order_status(shop.db, pid) == "placed"

    stats = await run_relay(settings)

    assert dict(stats.actions) == {"succeeded": 1}
    [call] = captures(shop.proxy, pid)
    assert (call.form, call.idempotency_key, call.status) == (
        {"amount_to_capture": str(held.amount)},
        key_of(Action.CAPTURE, pid),
        200,
    )
    intent = await retrieve_intent(shop.emulator.base_url, pid)
    charge = intent["latest_charge"]  # localstripe shows no amount_received; its charge does
    assert (intent["status"], charge["captured"], charge["amount"], charge["amount_refunded"]) == (
        "succeeded",
        True,
        held.amount,
        0,
    )
    assert state_of(await action_row(shop.db, pid, Action.CAPTURE)) == SUCCEEDED_FIRST_TIME

    await run_relay(settings)

    assert shop.proxy.requests == [call]


async def test_actions_the_webhooks_settled_first_are_recorded_without_a_call(
    shop: Shop,
) -> None:
    await seed_stock(shop.db, {SKU: 2})
    settings = shop.settings_with(capture_policy="on_placed")
    placed = await authorize(shop, quantity=2, settings=settings)
    unfilled = await authorize(shop, quantity=2, settings=settings)
    # Both canceled from the dashboard, and the webhooks arrive before the relay runs.
    for held in (placed, unfilled):
        await stripe_directly(shop.emulator, held.payment_intent_id, "cancel")
    await apply(
        shop.db,
        await canceled_event(shop.emulator, placed),
        await canceled_event(shop.emulator, unfilled),
    )

    stats = await run_relay(settings)

    # localstripe would even "capture" the canceled intent with a 200: what our
    # webhooks told us is what stops the call.
    assert dict(stats.actions) == {"not_needed": 1, "already_done": 1}
    assert shop.proxy.requests == []
    capture = await action_row(shop.db, placed.payment_intent_id, Action.CAPTURE)
    cancel = await action_row(shop.db, unfilled.payment_intent_id, Action.CANCEL)
    assert state_of(capture) == ("done", "not_needed", 1, None, "the payment intent is canceled")
    assert state_of(cancel) == ("done", "already_done", 1, None, "the payment intent is canceled")
    assert await stock(shop.db) == (2, [("restock", 2), ("order", -2), ("cancellation", 2)])


# --- A cancel that meets captured money ----------------------------------------------------


async def test_a_cancel_of_an_intent_captured_meanwhile_is_superseded_by_one_refund(
    shop: Shop,
) -> None:
    await seed_stock(shop.db, {SKU: 0})
    held = await hold(shop, quantity=1)
    pid = held.payment_intent_id
    # Captured from the dashboard before the authorization event reached us.
    await stripe_directly(shop.emulator, pid, "capture")
    await apply(shop.db, held.event)
    assert await order_status(shop.db, pid) == "out_of_stock"

    stats = await run_relay(shop.settings)

    assert dict(stats.actions) == {"superseded": 1, "succeeded": 1}
    assert stats.refunds_asked == 1
    [refused] = cancels(shop.proxy, pid)
    assert (refused.status, refused.idempotency_key) == (400, key_of(Action.CANCEL, pid))
    cancel = await action_row(shop.db, pid, Action.CANCEL)
    assert state_of(cancel) == ("done", "superseded", 1, "payment_intent_captured", CAPTURED_FIRST)
    refund = await action_row(shop.db, pid, Action.REFUND)
    assert state_of(refund) == SUCCEEDED_FIRST_TIME
    # The refund read what was captured and refunded first, then returned all of it.
    [post] = shop.proxy.calls("POST", "/v1/refunds")
    assert (post.idempotency_key, post.form) == (
        key_of(Action.REFUND, pid),
        {
            "payment_intent": pid,
            "amount": str(held.amount),
            "metadata[intentflow_order_id]": str(refund["order_id"]),
            "metadata[intentflow_reason]": "out_of_stock",
            "metadata[intentflow_outbox_id]": str(refund["id"]),
        },
    )
    assert [(r.method, r.path) for r in shop.proxy.requests] == [
        ("POST", f"/v1/payment_intents/{pid}/cancel"),
        ("GET", f"/v1/payment_intents/{pid}"),
        ("GET", f"/v1/payment_intents/{pid}"),
        ("GET", "/v1/refunds"),
        ("POST", "/v1/refunds"),
    ]
    [made] = await refunds_on(shop.emulator.base_url, pid)
    assert (made["amount"], made["status"], made["metadata"]["intentflow_outbox_id"]) == (
        held.amount,
        "succeeded",
        str(refund["id"]),
    )

    seen = len(shop.proxy.requests)
    await run_relay(shop.settings)
    assert len(shop.proxy.requests) == seen


# --- A refusal for good ------------------------------------------------------------------


async def test_a_cancel_stripe_refuses_for_good_is_failed_until_retried_under_a_new_key(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed_stock(shop.db, {SKU: 0})
    pid = (await authorize(shop, quantity=1)).payment_intent_id
    shop.proxy.fail_next(1, 400, path_contains="/cancel")
    key = key_of(Action.CANCEL, pid)

    stats = await run_relay(shop.settings)

    assert dict(stats.actions) == {"rejected": 1}
    row = await action_row(shop.db, pid, Action.CANCEL)
    refusal = "Injected 400 by StripeProxy. (the payment intent is requires_capture, not canceled)"
    assert state_of(row) == ("failed", "rejected", 1, "invalid_request_error", refusal)
    seen = len(shop.proxy.requests)
    await run_relay(shop.settings)
    assert len(shop.proxy.requests) == seen  # not retried

    code, out = await outbox_command(shop.settings, capsys, "--failed", "--json")
    assert code == 0
    [listed] = json.loads(out)["failed"]
    assert (listed["id"], listed["name"], listed["payment_intent_id"], listed["outcome"]) == (
        row["id"],
        "cancel_payment_intent",
        pid,
        "rejected",
    )
    assert listed["last_error"] == refusal

    code, out = await outbox_command(shop.settings, capsys, "retry", str(row["id"]))
    assert (code, out) == (0, f"pending again: {row['id']}\n")
    assert (await action_row(shop.db, pid, Action.CANCEL))["state"] == "pending"

    # Stripe keeps its refusal under the first key: the retry reads the intent, then
    # calls under the next key.
    stats = await run_relay(shop.settings)
    assert dict(stats.actions) == {"succeeded": 1}
    assert [(c.idempotency_key, c.status) for c in cancels(shop.proxy, pid)] == [
        (key, 400),
        (f"{key}:1", 200),
    ]
    assert len(shop.proxy.calls("GET", f"/v1/payment_intents/{pid}")) == 2
    assert state_of(await action_row(shop.db, pid, Action.CANCEL)) == (
        "done",
        "succeeded",
        2,
        None,
        None,
    )
    assert (await retrieve_intent(shop.emulator.base_url, pid))["status"] == "canceled"


# --- Refusals that time fixes ------------------------------------------------------------


async def test_a_503_is_retried_after_a_read_under_the_next_key_until_stripe_acts(
    shop: Shop,
) -> None:
    """Stripe saves a 5xx under its key (localstripe does not, the proxy answers it):
    the retry reads the intent and calls under the next key generation."""
    await seed_stock(shop.db, {SKU: 0})
    pid = (await authorize(shop, quantity=1)).payment_intent_id
    shop.proxy.fail_next(1, 503, path_contains="/cancel")

    stats = await run_relay(shop.settings)

    assert dict(stats.actions) == {"retry": 1, "succeeded": 1}
    first, second = cancels(shop.proxy, pid)
    assert (first.status, first.injected, second.status, second.injected) == (503, True, 200, False)
    key = key_of(Action.CANCEL, pid)
    assert (first.idempotency_key, second.idempotency_key) == (key, f"{key}:1")
    assert len(shop.proxy.calls("GET", f"/v1/payment_intents/{pid}")) == 1
    assert (await retrieve_intent(shop.emulator.base_url, pid))["status"] == "canceled"
    assert state_of(await action_row(shop.db, pid, Action.CANCEL)) == (
        "done",
        "succeeded",
        2,
        None,
        None,
    )


async def test_a_429_is_retried_no_sooner_than_stripe_says(shop: Shop) -> None:
    await seed_stock(shop.db, {SKU: 0})
    pid = (await authorize(shop, quantity=1)).payment_intent_id
    shop.proxy.fail_next(1, 429, path_contains="/cancel", retry_after_s=1)

    stats = await run_relay(shop.settings)

    assert dict(stats.actions) == {"retry": 1, "succeeded": 1}
    first, second = cancels(shop.proxy, pid)
    assert (first.status, first.injected, second.status) == (429, True, 200)
    assert first.idempotency_key == second.idempotency_key == key_of(Action.CANCEL, pid)
    # RELAY_RETRY_MAX_S is 0.5 s here: only Retry-After explains the wait. It is
    # counted from the claim's start, a few ms before the call (see the next test).
    waited_s = second.received_at_s - first.received_at_s
    assert waited_s >= 0.9, waited_s
    assert (await retrieve_intent(shop.emulator.base_url, pid))["status"] == "canceled"
    assert state_of(await action_row(shop.db, pid, Action.CANCEL)) == (
        "done",
        "succeeded",
        2,
        None,
        None,
    )


async def test_retry_after_counts_from_a_slow_429s_answer(shop: Shop) -> None:
    """A retry's due time counts from Stripe's answer, not from the claim's start: a 429
    that took 0.8 s to come, with Retry-After 1, is retried no sooner than 1 s after it.
    (It was `now()`, the transaction's start, until this test caught it.)"""
    await seed_stock(shop.db, {SKU: 0})
    pid = (await authorize(shop, quantity=1)).payment_intent_id
    shop.proxy.delay_s = 0.8
    shop.proxy.fail_next(1, 429, path_contains="/cancel", retry_after_s=1)

    await run_relay(shop.settings)

    first, second = cancels(shop.proxy, pid)
    answered_at_s = first.received_at_s + shop.proxy.delay_s
    waited_s = second.received_at_s - answered_at_s
    assert waited_s >= 0.95, waited_s


# --- No key, or a refused one ------------------------------------------------------------


async def test_without_a_key_stripe_actions_stay_pending_and_are_reported(shop: Shop) -> None:
    await seed_stock(shop.db, {SKU: 0})
    pid = (await authorize(shop, quantity=1)).payment_intent_id

    exited = await relay_process(shop.settings_with(stripe_api_key=None))

    assert exited.returncode == 0
    assert exited.summary["outbox"]["pending"] == {"stripe_action": 1, "order_event": 0}
    assert exited.summary["outbox"]["actions"] == {}
    [waiting] = exited.logged("stripe_actions_waiting")
    assert waiting["pending"] == 1
    assert "no STRIPE_API_KEY" in waiting["hint"]
    assert shop.proxy.requests == []
    assert state_of(await action_row(shop.db, pid, Action.CANCEL)) == NEVER_TRIED
    assert (await retrieve_intent(shop.emulator.base_url, pid))["status"] == "requires_capture"


async def test_a_key_stripe_refuses_blocks_the_actions_without_dropping_them(
    shop: Shop,
) -> None:
    await seed_stock(shop.db, {SKU: 0})
    pid = (await authorize(shop, quantity=1)).payment_intent_id

    # A publishable key where a secret one belongs: localstripe answers 401, as Stripe does.
    exited = await relay_process(shop.settings_with(stripe_api_key="pk_test_publishable"))

    assert exited.returncode == 0
    assert exited.summary["outbox"]["pending"] == {"stripe_action": 1, "order_event": 0}
    assert exited.summary["outbox"]["actions"] == {"blocked": 1}
    [refused] = exited.logged("stripe_key_refused")
    assert refused["payment_intent_id"] == pid
    [call] = cancels(shop.proxy, pid)
    assert (call.status, call.upstream_status, call.injected) == (401, 401, False)
    assert shop.proxy.requests == [call]
    assert state_of(await action_row(shop.db, pid, Action.CANCEL)) == (
        "pending",
        None,
        1,
        "invalid_request_error",
        "Unauthorized",
    )
    assert (await retrieve_intent(shop.emulator.base_url, pid))["status"] == "requires_capture"


# --- The cancel comes back as a webhook --------------------------------------------------


async def test_our_own_cancel_coming_back_as_a_webhook_moves_no_stock(shop: Shop) -> None:
    await seed_stock(shop.db, {SKU: 1})
    held = await authorize(shop, quantity=2)
    pid = held.payment_intent_id
    await run_relay(shop.settings)
    before = await stock(shop.db)

    result = await apply(shop.db, await canceled_event(shop.emulator, held))

    assert result.claimed == 1
    row = await shop.db.fetchrow(
        "SELECT status, cancellation_reason FROM orders WHERE payment_intent_id = $1", pid
    )
    assert row is not None
    assert (row["status"], row["cancellation_reason"]) == ("canceled", "abandoned")
    assert await stock(shop.db) == before == (1, [("restock", 1)])
    assert (await check(shop.db)).ok
    assert len(cancels(shop.proxy, pid)) == 1


async def test_a_placed_order_the_shop_cancels_gives_its_stock_back_once(shop: Shop) -> None:
    await seed_stock(shop.db, {SKU: 5})
    held = await authorize(shop, quantity=2)
    pid = held.payment_intent_id
    assert await stock(shop.db) == (3, [("restock", 5), ("order", -2)])
    await stripe_directly(shop.emulator, pid, "cancel", cancellation_reason="requested_by_customer")
    canceled = await canceled_event(shop.emulator, held)

    first = await apply(shop.db, canceled)
    redelivered = await apply(shop.db, canceled)
    # Another event saying the same (a new id): still one give-back.
    other = await apply(shop.db, {**canceled, "id": events.new_id("evt")})

    assert (first.claimed, redelivered.claimed, other.claimed) == (1, 0, 1)
    assert await order_status(shop.db, pid) == "canceled"
    assert await stock(shop.db) == (5, [("restock", 5), ("order", -2), ("cancellation", 2)])
    assert (await check(shop.db)).ok
    await run_relay(shop.settings)
    assert shop.proxy.requests == []


# --- The needs_review sweep --------------------------------------------------------------


async def test_the_sweep_releases_needs_review_orders_older_than_the_setting(
    shop: Shop,
) -> None:
    await seed_stock(shop.db, {SKU: 5})
    old = (await authorize(shop, quantity=1, with_cart=False)).payment_intent_id
    young = (await authorize(shop, quantity=1, with_cart=False)).payment_intent_id
    await shop.db.execute(
        "UPDATE orders SET created_at = now() - interval '2 hours' WHERE payment_intent_id = $1",
        old,
    )
    assert [await order_status(shop.db, p) for p in (old, young)] == ["needs_review"] * 2

    stats = await run_relay(shop.settings_with(needs_review_cancel_after_s=3600))

    assert (stats.swept, dict(stats.actions)) == (1, {"succeeded": 1})
    [call] = cancels(shop.proxy, old)
    assert (call.form, call.idempotency_key) == (
        {"cancellation_reason": "abandoned"},
        key_of(Action.CANCEL, old),
    )
    assert shop.proxy.requests == [call]
    intent = await retrieve_intent(shop.emulator.base_url, old)
    assert (intent["status"], intent["cancellation_reason"]) == ("canceled", "abandoned")
    assert (await retrieve_intent(shop.emulator.base_url, young))["status"] == "requires_capture"
    assert state_of(await action_row(shop.db, old, Action.CANCEL)) == SUCCEEDED_FIRST_TIME
    assert await stripe_actions(shop.db) == 1


async def test_without_the_setting_needs_review_orders_keep_their_hold(shop: Shop) -> None:
    pid = (await authorize(shop, quantity=1, with_cart=False)).payment_intent_id
    await shop.db.execute("UPDATE orders SET created_at = now() - interval '30 days'")
    assert await order_status(shop.db, pid) == "needs_review"

    stats = await run_relay(shop.settings)

    assert (stats.swept, dict(stats.actions)) == (0, {})
    assert shop.proxy.requests == []
    assert await stripe_actions(shop.db) == 0
    assert (await retrieve_intent(shop.emulator.base_url, pid))["status"] == "requires_capture"


async def test_a_stop_during_a_hanging_stripe_call_exits_at_once_and_loses_nothing(
    shop: Shop,
) -> None:
    """SIGTERM while Stripe hangs: the relay returns well inside SHUTDOWN_TIMEOUT_S, the
    claim rolls back, and the next relay calls again with the same key."""
    await seed_stock(shop.db, {SKU: 0})
    held = await authorize(shop, quantity=1)
    pid = held.payment_intent_id
    shop.proxy.delay_s = 12.0  # far longer than a stop may take
    settings = shop.settings_with(stripe_timeout_s=60.0, shutdown_timeout_s=25.0)
    process = await start_consumer(settings, "relay", "--exit-when-idle")
    stderr, took_s = await stop_with_sigterm(
        process,
        lambda: bool(shop.proxy.requests),  # the call is in its hands
        ready_within_s=20,
        exit_within_s=10,
    )

    assert process.returncode == 0, stderr.decode()[-2000:]
    assert took_s < 5.0  # not the 12 s call, nor the 25 s deadline and its backstop
    assert state_of(await action_row(shop.db, pid, Action.CANCEL)) == NEVER_TRIED

    shop.proxy.delay_s = 0.0
    await run_relay(shop.settings)

    keys = [c.idempotency_key for c in cancels(shop.proxy, pid)]
    assert keys == [key_of(Action.CANCEL, pid)] * 2
    assert state_of(await action_row(shop.db, pid, Action.CANCEL)) == SUCCEEDED_FIRST_TIME
    assert (await retrieve_intent(shop.emulator.base_url, pid))["status"] == "canceled"

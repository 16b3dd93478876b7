"""`order-consumer reconcile --with-stripe`: our books, written by the real store, against
Stripe's view, served by the fake of its read API (loadtest/stripe_api.py).

Each payment is told as the events Stripe sends about it (tests/stripe_stories.py: Stripe's
own example objects, at T0 and after); the books get the events the consumer saw, the
fake those and whatever happened at Stripe since (`Shop.seen`, `Shop.only_at_stripe`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from pydantic import SecretStr

from intentflow.consumer import tools
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.store import apply_batch
from intentflow.consumer.tools import reconcile, stripe_books
from intentflow.devservices import Services
from intentflow.loadtest.stripe_api import StripeReadApi
from tests import stripe_stories as stories
from tests.integration.store_support import envelope
from tests.stripe_stories import (
    SKU,
    SUBTOTAL,
    UNIT,
    at,
    cart_of,
    charge_object,
    dispute_object,
    held_charge,
    intent,
)
from tests.support import consumer_settings, seed_cart, seed_stock

KEY = "sk_test_intentflow"
GONE = "sku-gone"  # never in stock: its orders are out_of_stock
# The stories happen at T0 and after: the window starts before.
SINCE = datetime.fromtimestamp(stories.T0 - stories.DAY, UTC).isoformat()
INQUIRY = "warning_needs_response"
Event = dict[str, Any]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    reconcile.add_parser(parser.add_subparsers())
    return parser.parse_args(["reconcile", *argv])


def linked(told: list[Event]) -> list[Event]:
    """The intents name their charge (`ch_<pid>`, as the stories' charges are named), so
    that Stripe can expand it."""
    for evt in told:
        obj = evt["data"]["object"]
        if obj["object"] == "payment_intent":
            obj["latest_charge"] = f"ch_{obj['id']}"
    return told


def on(account: str, told: list[Event]) -> list[Event]:
    """The events as a Connect webhook delivers them: naming the connected account."""
    return [{**evt, "account": account} for evt in told]


def cart(pid: str) -> dict[str, Any]:
    return {"metadata": {"cart_id": cart_of(pid)}}


def held(pid: str, second: int = 0) -> list[Event]:
    """A manual capture authorized: SUBTOTAL held for the cart its metadata names."""
    manual = {"capture_method": "manual", **cart(pid)}
    return linked(
        [
            at(held_charge(pid, SUBTOTAL), "charge.succeeded", second),
            at(
                intent(pid, "requires_capture", SUBTOTAL, **manual),
                "payment_intent.amount_capturable_updated",
                second,
            ),
        ]
    )


def paid(pid: str) -> list[Event]:
    """A card payment captured at once, the cart in the intent's metadata."""
    return linked(
        [
            at(charge_object(pid, SUBTOTAL, 0), "charge.succeeded", 0),
            at(intent(pid, "succeeded", SUBTOTAL, **cart(pid)), "payment_intent.succeeded", 0),
        ]
    )


def canceled(pid: str) -> list[Event]:
    gone = intent(pid, "canceled", SUBTOTAL, cancellation_reason="abandoned", **cart(pid))
    return linked([at(gone, "payment_intent.canceled", 100)])


def refunded(pid: str, amount: int) -> list[Event]:
    return [at(charge_object(pid, SUBTOTAL, amount), "charge.refunded", 100)]


def disputed(pid: str) -> list[Event]:
    """The charge as Stripe shows it once disputed (`disputed`: true from then on)."""
    return [at(charge_object(pid, SUBTOTAL, 0, disputed=True), "charge.updated", 100)]


class Shop:
    """One test's books and Stripe: `seen` reaches both, `only_at_stripe` Stripe alone."""

    def __init__(self, db: asyncpg.Connection, api: StripeReadApi, settings: ConsumerSettings):
        self.db, self.api, self.settings = db, api, settings
        self._offset = 0

    async def seen(self, *told: list[Event]) -> None:
        batch = [evt for story in told for evt in story]
        envelopes = [envelope(evt, self._offset + i) for i, evt in enumerate(batch)]
        self._offset += len(batch)
        await apply_batch(self.db, envelopes)
        self.api.add_events(batch)

    def only_at_stripe(self, *told: list[Event]) -> None:
        self.api.add_events(evt for story in told for evt in story)

    async def cart(self, pid: str, sku: str = SKU) -> None:
        await seed_cart(self.db, cart_of(pid), [(sku, 2, UNIT)])  # SUBTOTAL

    async def reconcile(self, *argv: str, settings: ConsumerSettings | None = None) -> int:
        args = parse("--with-stripe", "--since", SINCE, *argv)
        return await tools.run("reconcile", args, settings or self.settings)


@pytest.fixture
async def shop(infra: Services, database_url: str, db: asyncpg.Connection) -> AsyncIterator[Shop]:
    await seed_stock(db, {SKU: 100, GONE: 0})
    async with StripeReadApi(api_key=KEY) as api:
        settings = consumer_settings(
            infra, database_url, "unused", stripe_api_key=KEY, stripe_api_base=api.base_url
        )
        yield Shop(db, api, settings)


def lines_of(capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())


async def test_books_that_agree_with_stripe_exit_0_with_every_check_ok(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the consumer's model says is normal is no difference: the rest of a partial
    capture released as a refund before basil, a dispute we recorded, an order we could not
    fill whose hold was released or whose refund waits for a dispute, and payments that are
    not the shop's."""
    for pid in ("pi_checkout", "pi_partial", "pi_dispute"):
        await shop.cart(pid)
    await shop.cart("pi_short", GONE)
    await shop.cart("pi_short_disputed", GONE)
    await shop.seen(
        linked(stories.card_through_checkout("pi_checkout")),
        # Captured for an order we cannot fill, then an inquiry: it takes no money back,
        # and keeps the payment from being refunded (`is_charge_refundable` false).
        paid("pi_short_disputed"),
        [at(dispute_object("pi_short_disputed", INQUIRY), "charge.dispute.created", 10)],
        linked(stories.partial_capture("2024-06-20")("pi_partial")),
        linked(stories.appealed_dispute("pi_dispute")),
        held("pi_short"),
    )
    await shop.seen(canceled("pi_short"))  # the relay's cancel of the order we cannot fill
    declined = intent("pi_declined", "requires_payment_method", SUBTOTAL, **cart("pi_declined"))
    shop.only_at_stripe(
        disputed("pi_dispute"),
        disputed("pi_short_disputed"),  # the refund waits for the dispute's end
        # Not the shop's: no cart named; a subscription's session; a session never paid.
        linked([at(intent("pi_invoice", "succeeded", 900), "payment_intent.succeeded", 0)]),
        # The shop's, and never paid: a card declined, a hold never made.
        linked([at(declined, "payment_intent.payment_failed", 0)]),
        canceled("pi_abandoned"),
        stories.subscription_session("pi_subscription"),
        stories.session_expired_unpaid("pi_unpaid"),
    )
    short = "SELECT allocation, status FROM orders WHERE payment_intent_id = 'pi_short'"
    assert dict(await shop.db.fetchrow(short) or {}) == {
        "allocation": "out_of_stock",
        "status": "canceled",
    }

    assert await shop.reconcile("--settle", "0") == 0

    lines = lines_of(capsys)
    expected = [name for name, _ in reconcile.CHECKS] + list(stripe_books.CHECKS)
    assert lines == dict.fromkeys(expected, "OK")


async def stripe_moved_on(shop: Shop) -> None:
    """One payment per difference, each what the check named after it exists for."""
    for pid in ("pi_canceled", "pi_refunded", "pi_disputed"):
        await shop.cart(pid)
    for pid in ("pi_held", "pi_kept"):
        await shop.cart(pid, GONE)
    await shop.seen(
        held("pi_canceled"),
        paid("pi_refunded"),
        paid("pi_disputed"),
        held("pi_held"),
        paid("pi_kept"),
    )
    shop.only_at_stripe(
        held("pi_lost"),  # its events never reached us
        linked(stories.card_through_checkout("pi_lost_checkout")),  # its cart on the session
        canceled("pi_canceled"),
        refunded("pi_refunded", 1000),
        disputed("pi_disputed"),
    )


async def test_each_stripe_check_reports_its_difference_and_exits_1(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    await stripe_moved_on(shop)
    rows = await shop.db.fetch("SELECT payment_intent_id, id FROM orders")
    ids = {row["payment_intent_id"]: row["id"] for row in rows}

    assert await shop.reconcile("--settle", "0") == 1

    lines = lines_of(capsys)
    # Newest first, as Stripe lists: the checkout story's intent was made last.
    assert lines["stripe_payment_without_order"] == (
        "2 violations, e.g. payment_intent_id=pi_lost_checkout stripe_status=succeeded "
        "cart_id=cart-pi_lost_checkout; "
        "payment_intent_id=pi_lost stripe_status=requires_capture cart_id=cart-pi_lost"
    )
    differs = lines["stripe_state_differs"]
    assert differs.startswith("3 violations, e.g. ")
    assert (
        f"order_id={ids['pi_canceled']} payment_intent_id=pi_canceled "
        "status_here=requires_capture status_stripe=canceled"
    ) in differs
    assert (
        f"order_id={ids['pi_refunded']} payment_intent_id=pi_refunded "
        "refunded_here=0 refunded_stripe=1000"
    ) in differs
    assert (
        f"order_id={ids['pi_disputed']} payment_intent_id=pi_disputed "
        "disputed_here=False disputed_stripe=True"
    ) in differs
    held_money = lines["stripe_unfillable_money_held"]
    assert held_money.startswith("2 violations, e.g. ")
    for pid, status in (("pi_held", "requires_capture"), ("pi_kept", "succeeded")):
        assert (
            f"order_id={ids[pid]} payment_intent_id={pid} allocation=out_of_stock "
            f"stripe_status={status} held={SUBTOTAL}"
        ) in held_money


async def test_json_carries_the_stripe_checks_like_the_others(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    await stripe_moved_on(shop)

    assert await shop.reconcile("--settle", "0", "--json") == 1

    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is False
    checks = {c["name"]: c for c in document["checks"]}
    assert list(checks)[-3:] == list(stripe_books.CHECKS)
    assert {name: checks[name]["violations"] for name in stripe_books.CHECKS} == {
        "stripe_payment_without_order": 2,
        "stripe_state_differs": 3,
        "stripe_unfillable_money_held": 2,
    }
    refunded_row = next(
        e for e in checks["stripe_state_differs"]["examples"] if "refunded_stripe" in e
    )
    assert refunded_row["payment_intent_id"] == "pi_refunded"
    assert refunded_row["refunded_here"] == 0 and refunded_row["refunded_stripe"] == 1000


async def test_account_compares_a_connected_accounts_intents_with_its_rows(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--account acct_…` reads that account alone, `all` every connected one, neither the
    platform; our orders are matched within their account."""
    for pid in ("pi_a_order", "pi_b_order", "pi_platform_order", "pi_misfiled"):
        await shop.cart(pid)
    await shop.seen(
        on("acct_a", held("pi_a_order")),
        on("acct_b", held("pi_b_order")),
        held("pi_platform_order"),
        held("pi_misfiled"),  # recorded as the platform's, and on acct_a at Stripe
    )
    shop.only_at_stripe(
        on("acct_a", held("pi_a_lost")),
        on("acct_a", held("pi_misfiled")),
        on("acct_b", canceled("pi_b_order")),
        held("pi_platform_lost"),
    )
    shop.api.add_account("acct_quiet")  # nothing there

    assert await shop.reconcile("--settle", "0", "--account", "acct_a", "--json") == 1
    one = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert await shop.reconcile("--settle", "0", "--account", "all", "--json") == 1
    every = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert await shop.reconcile("--settle", "0", "--json") == 1
    platform = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}

    lost = "stripe_payment_without_order"
    assert one[lost]["examples"] == [
        {
            "payment_intent_id": pid,
            "stripe_status": "requires_capture",
            "cart_id": f"cart-{pid}",
            "account": "acct_a",
        }
        for pid in ("pi_misfiled", "pi_a_lost")
    ]
    assert one["stripe_state_differs"]["violations"] == 0
    assert [e["payment_intent_id"] for e in every[lost]["examples"]] == [
        "pi_misfiled",
        "pi_a_lost",
    ]
    assert [
        (e["payment_intent_id"], e["account"], e["status_stripe"])
        for e in every["stripe_state_differs"]["examples"]
    ] == [("pi_b_order", "acct_b", "canceled")]
    assert platform[lost]["examples"] == [
        {
            "payment_intent_id": "pi_platform_lost",
            "stripe_status": "requires_capture",
            "cart_id": "cart-pi_platform_lost",
        }
    ]
    assert platform["stripe_state_differs"]["violations"] == 0
    assert [r.account for r in shop.api.requests if r.path == "/v1/payment_intents"] == [
        "acct_a",
        "acct_a",
        "acct_b",
        "acct_quiet",
        None,
    ]


async def test_what_may_still_be_on_its_way_is_not_judged_until_it_settles(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    """An intent made within `--settle` seconds (default 60), or an order changed within
    them, may have events on their way: neither is reported until then."""
    await shop.cart("pi_short", GONE)
    now = int(time.time())
    fresh = held("pi_fresh")
    for evt in fresh:
        evt["created"] = evt["data"]["object"]["created"] = now - 5
    shop.only_at_stripe(fresh)
    await shop.seen(held("pi_short"))  # out of stock just now: its cancel is on its way

    assert await shop.reconcile() == 0
    assert lines_of(capsys)["stripe_payment_without_order"] == "OK"

    assert await shop.reconcile("--settle", "0") == 1
    lines = lines_of(capsys)
    assert "payment_intent_id=pi_fresh" in lines["stripe_payment_without_order"]
    assert "payment_intent_id=pi_short" in lines["stripe_unfillable_money_held"]


async def test_without_stripe_api_key_it_says_so_in_one_line_and_exits_2(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    keyless = shop.settings.model_copy(update={"stripe_api_key": None})

    assert await shop.reconcile(settings=keyless) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "order-consumer reconcile: --with-stripe reads Stripe's API with STRIPE_API_KEY, "
        "which is not set\n"
    )
    assert shop.api.requests == []


async def test_stripe_options_without_with_stripe_exit_2(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await tools.run("reconcile", parse("--account", "acct_a"), shop.settings) == 2
    assert capsys.readouterr().err == (
        "order-consumer reconcile: --account: only with --with-stripe\n"
    )


@pytest.mark.parametrize(
    ("key", "account", "says"),
    [
        ("sk_test_revoked", None, "HTTP 401: Invalid API Key provided"),
        (KEY, "acct_nobody", "HTTP 403: The provided key"),
    ],
)
async def test_stripe_refusing_is_one_line_and_exit_2(
    shop: Shop, capsys: pytest.CaptureFixture[str], key: str, account: str | None, says: str
) -> None:
    await shop.seen(held("pi_any"))
    settings = shop.settings.model_copy(update={"stripe_api_key": SecretStr(key)})
    argv = ("--account", account) if account else ()

    assert await shop.reconcile(*argv, settings=settings) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"order-consumer reconcile: Stripe's API: {says}")
    assert err.endswith(": check STRIPE_API_KEY, STRIPE_API_BASE and --account\n")

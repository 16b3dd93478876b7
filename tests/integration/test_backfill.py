"""`order-consumer backfill`: Stripe's Events API read back onto the events topic, as an
operator runs it (`python -m intentflow.consumer backfill …`, settings from the
environment), against the real broker and PostgreSQL and a fake of Stripe's read API
(loadtest/stripe_api.py: no emulator serves /v1/events with Stripe's pagination, rate
limits and Connect accounts). The consumer that applies what the backfill publishes is a
Worker in this process.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.worker import Worker
from intentflow.devservices import Services
from intentflow.loadtest.stripe_api import StripeReadApi
from intentflow.schemas import HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_RECEIVED_AT
from intentflow.schemas.contract import HEADER_SOURCE
from intentflow.stripekit import events
from tests.support import (
    consumer_env,
    consumer_settings,
    eventually,
    publish,
    read_topic,
    seed_cart,
    seed_stock,
    snapshot,
)

NOW = int(time.time())
HOUR = 3600
SINCE = datetime.fromtimestamp(NOW - 10 * HOUR, UTC).isoformat()


@dataclass
class Run:
    status: int
    stdout: str
    stderr: str

    def document(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.stdout)
        return loaded


async def backfill(
    settings: ConsumerSettings, api: StripeReadApi | None, *argv: str, key: str | None = None
) -> Run:
    """`order-consumer backfill …` as its own process, reading `api` with its key (or `key`)."""
    env = consumer_env(settings)
    if api is not None:
        env.update(STRIPE_API_KEY=key or api.api_key, STRIPE_API_BASE=api.base_url)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "intentflow.consumer", "backfill", *argv,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


def authorized(pid: str, cart: str, amount: int, created: int) -> dict[str, Any]:
    obj = events.payment_intent(pid, amount=amount, status="requires_capture", cart_id=cart)
    return events.stamped(obj, "payment_intent.amount_capturable_updated", created)


async def carts(db: asyncpg.Connection, count: int) -> list[dict[str, Any]]:
    """`count` carts of one sku-a each, and their authorizations an hour apart."""
    await seed_stock(db, {"sku-a": 10})
    made = []
    for i in range(count):
        total = await seed_cart(db, f"cart-{i}", [("sku-a", 1, 500)])
        made.append(authorized(f"pi_{i}", f"cart-{i}", total, NOW - (9 - i) * HOUR))
    return made


async def test_a_window_the_webhooks_missed_is_published_once_and_a_second_backfill_changes_nothing(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    paid = await carts(db, 4)
    # Besides the shop's payments, what the bridge would not publish either: an event of
    # no payment, one of the other mode, and one created outside the window.
    customer = events.stamped({"id": "cus_1", "object": "customer"}, "customer.created", NOW - HOUR)
    live = authorized("pi_live", "cart-live", 500, NOW - HOUR)
    live["livemode"] = True
    before = authorized("pi_before", "cart-before", 500, NOW - 11 * HOUR)
    settings = consumer_settings(infra, database_url, topic)
    async with StripeReadApi([*paid, customer, live, before]) as api, Worker(settings) as worker:
        running = asyncio.create_task(worker.run())
        try:
            await publish(infra, topic, paid[:1])  # the one webhook that got through
            await eventually(lambda: worker.stats.events == 1)

            first = await backfill(settings, api, "--since", SINCE, "--json")
            assert first.status == 0, first.stderr
            done = first.document()
            assert done["this_session"] == {
                "read": 6, "published": 3, "already_known": 1, "not_published": 2
            }  # fmt: skip
            await eventually(lambda: worker.stats.events == 4)
            books = await snapshot(db)
            assert books.orders == {f"pi_{i}": "placed" for i in range(4)}
            assert books.levels == {"sku-a": 6}

            again = await backfill(settings, api, "--since", SINCE, "--json")
            assert again.status == 0, again.stderr
            assert again.document()["this_session"]["published"] == 0
            assert again.document()["this_session"]["already_known"] == 4
        finally:
            worker.request_stop()
        await running
    assert await snapshot(db) == books
    records = await read_topic(infra.kafka_bootstrap_servers, topic, 4, settle_s=0.5)
    assert len(records) == 4  # the webhook's and the three it lacked; nothing twice
    backfilled = [r for r in records if dict(r.headers).get(HEADER_SOURCE) == b"backfill"]
    assert sorted(r.key for r in backfilled) == [b"pi_1", b"pi_2", b"pi_3"]
    by_id = {e["id"]: e for e in paid}
    for r in backfilled:
        headers = dict(r.headers)
        assert set(headers) == {HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_RECEIVED_AT, "source"}
        event = by_id[headers[HEADER_EVENT_ID].decode()]
        assert orjson.loads(r.value) == event  # Stripe's event, whole, as the API gave it
        assert headers[HEADER_EVENT_TYPE] == event["type"].encode()


async def test_a_backfill_the_broker_refuses_midway_resumes_from_its_last_finished_slice(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    paid = await carts(db, 4)
    # The third authorization is larger than the broker will take from this producer.
    paid[2]["data"]["object"]["metadata"]["note"] = "x" * 3000
    small = consumer_settings(infra, database_url, topic, kafka_max_request_bytes=2048)
    async with StripeReadApi(paid, rate_limit_every=3) as api:
        refused = await backfill(small, api, "--since", SINCE)
        assert refused.status == 3, refused.stderr
        assert paid[2]["id"] in refused.stderr and "--resume" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        progress = await db.fetchrow("SELECT * FROM backfill_progress")
        assert progress is not None and progress["published"] == 2  # pi_0 and pi_1, slice by slice
        assert progress["done_until"] <= datetime.fromtimestamp(paid[2]["created"], UTC)

        settings = consumer_settings(infra, database_url, topic)  # the operator raised the limit
        resumed = await backfill(settings, api, "--resume", "--json")
        assert resumed.status == 0, resumed.stderr
        document = resumed.document()
        assert document["resumed"] and document["this_session"]["published"] == 2
        assert document["accounts"]["platform"]["published"] == 4  # over both sessions
        # Every third request was answered 429 and waited out.
        assert document["stripe_waits"] >= 1
        assert any(r.status == 429 for r in api.requests)
        nothing = await backfill(settings, api, "--resume")
        assert nothing.status == 2 and "no backfill was left unfinished" in nothing.stderr
    async with Worker(settings) as worker:
        running = asyncio.create_task(worker.run())
        try:
            await eventually(lambda: worker.stats.events == 4)
        finally:
            worker.request_stop()
        await running
    assert (await snapshot(db)).orders == {f"pi_{i}": "placed" for i in range(4)}


async def test_a_connected_accounts_events_are_published_naming_it_so_the_relay_acts_there(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    paid = await carts(db, 2)
    paid[1]["account"] = "acct_seller"  # a connected account's payment; the platform's own first
    settings = consumer_settings(infra, database_url, topic)
    async with StripeReadApi(paid) as api:
        platform = await backfill(settings, api, "--since", SINCE, "--json")
        every = await backfill(settings, api, "--since", SINCE, "--account", "all", "--json")
        unknown = await backfill(settings, api, "--since", SINCE, "--account", "acct_nobody")
        requests = list(api.requests)
    assert platform.status == 0 and every.status == 0, platform.stderr + every.stderr
    assert platform.document()["this_session"]["published"] == 1
    assert every.document()["accounts"] == {
        "acct_seller": {"read": 1, "published": 1, "already_known": 0, "not_published": 0}
    }
    assert any(r.account == "acct_seller" and r.path == "/v1/events" for r in requests)
    assert unknown.status == 2 and "acct_nobody" in unknown.stderr, unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    async with Worker(settings) as worker:
        running = asyncio.create_task(worker.run())
        try:
            await eventually(lambda: worker.stats.events == 2)
        finally:
            worker.request_stop()
        await running
    rows = await db.fetch("SELECT id, account FROM payment_intents ORDER BY id")
    accounts = {row["id"]: row["account"] for row in rows}
    assert accounts == {"pi_0": None, "pi_1": "acct_seller"}


async def test_a_dry_run_lists_what_it_would_publish_and_writes_nothing(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    paid = await carts(db, 3)
    settings = consumer_settings(infra, database_url, topic)
    async with StripeReadApi(paid) as api:
        dry = await backfill(settings, api, "--since", SINCE, "--dry-run", "--slice", "1d")
    assert dry.status == 0, dry.stderr
    listed = [line for line in dry.stdout.splitlines() if line.startswith("would publish")]
    assert listed == [
        f"would publish {e['id']} payment_intent.amount_capturable_updated key=pi_{i}"
        for i, e in enumerate(paid)
    ]  # oldest first
    assert "would publish 3," in dry.stdout
    assert await db.fetchval("SELECT count(*) FROM backfill_runs") == 0
    assert await read_topic(infra.kafka_bootstrap_servers, topic, 0, timeout_s=1.0) == []


async def test_what_cannot_run_says_so_in_one_line_with_exit_2(
    infra: Services, database_url: str, topic: str
) -> None:
    settings = consumer_settings(infra, database_url, topic)
    no_key = await backfill(settings, None, "--since", "1d")
    assert no_key.status == 2 and "STRIPE_API_KEY is not set" in no_key.stderr
    old = datetime.fromtimestamp(NOW - 31 * 24 * HOUR, UTC).isoformat()
    async with StripeReadApi() as api:
        too_old = await backfill(settings, api, "--since", old)
        wrong_key = await backfill(settings, api, "--since", "1d", key="sk_test_revoked")
    assert too_old.status == 2 and "Stripe keeps events for 30d" in too_old.stderr
    assert wrong_key.status == 2 and "HTTP 401" in wrong_key.stderr, wrong_key.stderr
    unreachable = consumer_settings(infra, "postgresql://postgres@127.0.0.1:1/none", topic)
    no_db = await backfill(unreachable, api, "--since", "1d")
    assert no_db.status == 2 and "check DATABASE_URL" in no_db.stderr
    for run in (no_key, too_old, wrong_key, no_db):
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert "Traceback" not in run.stderr


async def test_a_window_older_than_the_inbox_prune_kept_is_refused(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    settings = consumer_settings(infra, database_url, topic)
    line = datetime.fromtimestamp(NOW - 5 * HOUR, UTC)
    await db.execute("INSERT INTO inbox_pruned (before) VALUES ($1)", line)
    async with StripeReadApi() as api:
        refused = await backfill(settings, api, "--since", SINCE)
        read_by_refused = len(api.requests)
        later = await backfill(settings, api, "--since", "3h")
    assert refused.status == 2, refused.stderr
    assert "`order-consumer prune` deleted the inbox's rows before" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert read_by_refused == 0  # refused before asking Stripe anything
    assert later.status == 0, later.stderr
    assert len(api.requests) == 3  # one empty page per hour from 3 h ago


async def test_a_resumed_run_is_refused_where_stripe_or_the_inbox_no_longer_reach(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    """The window is checked where the run stands, when it goes on: a run left for weeks
    starts where Stripe lists nothing, and a prune since may have passed it."""
    settings = consumer_settings(infra, database_url, topic)
    started = datetime.fromtimestamp(NOW - 31 * 24 * HOUR, UTC)
    await db.execute(
        "INSERT INTO backfill_runs (since, until, scope) VALUES ($1, $2, 'platform')",
        started, datetime.fromtimestamp(NOW - 30 * 24 * HOUR, UTC),
    )  # fmt: skip
    async with StripeReadApi() as api:
        stale = await backfill(settings, api, "--resume")
        await db.execute("DELETE FROM backfill_progress")
        await db.execute("UPDATE backfill_runs SET since = $1, until = $2",
                         datetime.fromtimestamp(NOW - 10 * HOUR, UTC),
                         datetime.fromtimestamp(NOW - HOUR, UTC))  # fmt: skip
        await db.execute(
            "INSERT INTO inbox_pruned (before) VALUES ($1)",
            datetime.fromtimestamp(NOW - 5 * HOUR, UTC),
        )
        pruned = await backfill(settings, api, "--resume")
        read = len(api.requests)
    assert stale.status == 2 and "start a new backfill with a later --since" in stale.stderr
    assert pruned.status == 2 and "`order-consumer prune` deleted" in pruned.stderr
    assert read == 0, "nothing was read from where it could not be published"

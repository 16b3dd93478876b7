"""Everything an operator runs, through PgBouncer in transaction mode.

The pooler (devservices/pgbouncer.py, Debian's PgBouncer 1.18) gives every client
of a database turns on ONE server session: a setting, a prepared statement or an
advisory lock that one process leaves there meets the next. The consumer applies
a few events and its relay publishes their order events, the relay alone cancels
an authorization at the Stripe emulator, and every operator tool does its job;
what the pooler refuses, and a consumer set up for a direct session behind it,
end in one line and exit 2.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import asyncpg
import pytest

from intentflow.consumer.outbox import Action
from intentflow.devservices import Services
from intentflow.devservices.pgbouncer import PgBouncer
from tests.e2e.test_consumer_process import json_lines, run_to_end, the_one_error
from tests.integration.stripe_support import (
    SUCCEEDED_FIRST_TIME,
    Shop,
    action_row,
    authorize,
    cancels,
    relay_process,
    shop,
    state_of,
)
from tests.support import (
    ConsumerProcess,
    consumer_env,
    consumer_settings,
    paid_carts,
    publish,
    seed_stock,
)

__all__ = ["shop"]

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def pgbouncer(infra: Services) -> Iterator[PgBouncer]:
    host_port = infra.database_url.partition("@")[2].partition("/")[0]
    host, _, port = host_port.rpartition(":")
    with PgBouncer(host, int(port)).start() as pooler:
        yield pooler


async def test_the_consumer_and_its_relay_work_through_a_transaction_pooler(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str, pgbouncer: PgBouncer
) -> None:
    await seed_stock(db, {"sku-a": 4})
    await publish(infra, topic, await paid_carts(db, 6, [("sku-a", 1, 100)]))
    settings = consumer_settings(
        infra, pgbouncer.url(database_url), topic, db_pool_mode="transaction"
    )
    # A client set up for a direct session leaves its prepared statements on the one
    # server session (asyncpg's names: __asyncpg_stmt_1__, ...); a consumer that prepared
    # its own by those names would meet them.
    leaver = await run_to_end(["reconcile"], {**consumer_env(settings), "DB_POOL_MODE": "session"})
    assert leaver.returncode == 0, leaver.stderr
    summary = await ConsumerProcess(settings, exit_when_idle_s=4).start()
    stats = await summary.wait()
    assert stats["events"] == 6 and stats["orders"] == {"placed": 4, "out_of_stock": 2}, stats
    # Its relay published every order event; the cancels wait for a Stripe key.
    assert stats["outbox"]["published"] == 6, stats["outbox"]
    pending = await db.fetch("SELECT kind, count(*) AS n FROM outbox WHERE state = 'pending'"
                             " GROUP BY kind")  # fmt: skip
    assert {r["kind"]: r["n"] for r in pending} == {"stripe_action": 2}


async def test_the_relay_alone_cancels_at_stripe_through_a_transaction_pooler(
    shop: Shop, pgbouncer: PgBouncer
) -> None:
    await seed_stock(shop.db, {"sku-mug": 0})
    pid = (await authorize(shop, quantity=1)).payment_intent_id
    settings = shop.settings_with(
        database_url=pgbouncer.url(shop.settings.database_url), db_pool_mode="transaction"
    )
    exited = await relay_process(settings)
    assert exited.returncode == 0, exited.log[-5:]
    assert state_of(await action_row(shop.db, pid, Action.CANCEL)) == SUCCEEDED_FIRST_TIME
    assert len(cancels(shop.proxy, pid)) == 1


async def test_every_operator_tool_works_through_a_transaction_pooler(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str, pgbouncer: PgBouncer
) -> None:
    await db.execute(
        "INSERT INTO outbox (kind, name, payment_intent_id, order_id, payload, state, outcome,"
        " done_at) VALUES ('order_event', 'order.placed', 'pi_1', 1, '{}', 'failed', 'rejected',"
        " now())"
    )
    pooled = consumer_settings(
        infra, pgbouncer.url(database_url), topic, db_pool_mode="transaction"
    )
    env = consumer_env(pooled)
    # Each twice: the second meets the server session the first used.
    for args in (
        ["reconcile"],
        ["reconcile", "--json"],
        ["outbox"],
        ["outbox", "--failed", "--json"],
        ["prune", "--older-than", "30d", "--topic-retention", "7d"],
        ["dlq", "list"],  # the broker only
    ):
        for _ in range(2):
            done = await run_to_end(args, env)
            assert done.returncode == 0, (args, done.stdout, done.stderr)
            assert "Traceback" not in done.stderr, done.stderr
    retried = await run_to_end(["outbox", "--json", "retry", "1"], env)
    assert json.loads(retried.stdout) == {"pending_again": [1], "not_failed": []}
    assert "reconcile" not in (await run_to_end(["reconcile"], env)).stderr

    # migrate needs a session of its own: through the pooler it refuses, in one line...
    refused = await run_to_end(["migrate"], env)
    error = the_one_error(refused, "cannot_migrate")
    assert "MIGRATE_DATABASE_URL" in error and "pooler" in error, error
    # ...and goes straight to PostgreSQL with MIGRATE_DATABASE_URL, the pooler left for the rest.
    migrated = await run_to_end(["migrate"], {**env, "MIGRATE_DATABASE_URL": database_url})
    assert migrated.returncode == 0, migrated.stderr
    assert [e["event"] for e in json_lines(migrated.stderr)] == ["migrated"]


async def test_what_a_pooler_refuses_is_one_line_and_exit_2(
    infra: Services, database_url: str, topic: str, pgbouncer: PgBouncer
) -> None:
    # A session setting in the URL is a startup parameter: refused at once, not waited out.
    with_parameter = pgbouncer.url(database_url) + "?statement_timeout=5000"
    settings = consumer_settings(
        infra, with_parameter, topic, db_pool_mode="transaction", startup_timeout_s=30
    )
    refused = await run_to_end(["run"], consumer_env(settings))
    error = the_one_error(refused)
    assert "unsupported startup parameter: statement_timeout" in error, error
    assert "DATABASE_URL" in error and "ignore_startup_parameters" in error, error
    assert not [e for e in json_lines(refused.stderr) if e["event"] == "not_ready"]

    # DB_POOL_MODE=session behind it: asyncpg's cached statements outlive the transaction,
    # and the next client on the server session meets them.
    session = consumer_env(consumer_settings(infra, pgbouncer.url(database_url), topic))
    first = await run_to_end(["reconcile"], session)
    assert first.returncode == 0, first.stderr
    second = await run_to_end(["reconcile"], session)
    assert second.returncode == 2, (second.stdout, second.stderr)
    [line] = second.stderr.strip().splitlines()
    assert "set DB_POOL_MODE=transaction" in line and "Traceback" not in line, line

"""deploy/k8s's two database roles: one owns the schema and migrates, the consumer's writes rows.

The owner creates every table, so the consumer's role can touch none of them until
deploy/grants.sql gives it its rows: without it the start-up check stops with a line
naming the file; with it the consumer's checks and writes pass, on the tables there now
and on one a later migration makes.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from intentflow.consumer.migrate import migrate
from intentflow.consumer.preflight import StartupError, check_database, until_ready
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.store import apply_batch
from intentflow.devservices import Services
from intentflow.stripekit import events
from tests.integration.store_support import envelope
from tests.support import seed_cart, seed_stock

GRANTS = Path(__file__).resolve().parents[2] / "deploy" / "grants.sql"


@dataclass(frozen=True)
class Roles:
    owner_url: str
    consumer_url: str
    consumer: str


def as_role(dsn: str, role: str, password: str, database: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}:{password}@{host}", path=f"/{database}"))


@pytest.fixture
async def roles(infra: Services) -> AsyncIterator[Roles]:
    """A database owned by a role of its own, migrated by it, and a second role with no grant."""
    suffix = secrets.token_hex(4)
    owner, consumer, database = f"owner_{suffix}", f"consumer_{suffix}", f"roles_{suffix}"
    password = secrets.token_hex(12)
    admin = await asyncpg.connect(infra.database_url)
    try:
        for role in (owner, consumer):
            await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        await admin.execute(f"CREATE DATABASE {database} OWNER {owner}")
        owner_url = as_role(infra.database_url, owner, password, database)
        conn = await asyncpg.connect(owner_url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield Roles(owner_url, as_role(infra.database_url, consumer, password, database), consumer)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        for role in (consumer, owner):
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


async def start_up_check(settings: ConsumerSettings) -> None:
    """The consumer's database check at start-up, given no time to wait."""
    loop = asyncio.get_running_loop()
    await until_ready(
        "database",
        functools.partial(check_database, settings),
        settings=settings,
        stopping=asyncio.Event(),
        deadline=loop.time(),
    )


async def test_the_consumer_role_needs_grants_sql_and_it_is_enough(roles: Roles) -> None:
    settings = ConsumerSettings(database_url=roles.consumer_url, startup_timeout_s=0)
    with pytest.raises(StartupError, match=r"refused this role .*deploy/grants\.sql"):
        await start_up_check(settings)

    owner = await asyncpg.connect(roles.owner_url)
    consumer = await asyncpg.connect(roles.consumer_url)
    try:
        await owner.execute(GRANTS.read_text().replace("order_consumer", roles.consumer))
        await start_up_check(settings)

        # The consumer's own writes: an order placed, stock taken, the inbox and outbox.
        await seed_stock(owner, {"sku-a": 5})
        amount = await seed_cart(owner, "cart-0", [("sku-a", 2, 100)])
        paid = events.intent_event("pi_0", amount=amount, cart_id="cart-0")
        await apply_batch(consumer, [envelope(paid)])
        assert await consumer.fetchval("SELECT status FROM orders") == "placed"

        # A table a later migration makes (the owner's, again) is the consumer's too.
        await owner.execute(
            "CREATE TABLE later (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, note text)"
        )
        await consumer.execute("INSERT INTO later (note) VALUES ('after an upgrade')")
        assert await consumer.fetchval("SELECT count(*) FROM later") == 1
    finally:
        await consumer.close()
        await owner.close()

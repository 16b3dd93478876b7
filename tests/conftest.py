"""Session-wide services and per-test isolation.

Services come from devservices (environment, then testcontainers, then the
embedded wheels), started once per session. Each test gets its own topic and,
when it asks for one, its own database cloned from a migrated template.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from intentflow.consumer.migrate import migrate
from intentflow.devservices import Services, services
from intentflow.devservices.topics import create_topics
from intentflow.schemas import DEFAULT_ORDERS_TOPIC, dlq_topic
from tests.stripe_emulator import stripe_emulator
from tests.stripe_proxy import stripe_proxy

# Every consumer a test starts serves its probes on a free port of its own, unless the
# test names one: the default (8081) may be taken on the machine, or by another test.
os.environ.setdefault("CONSUMER_HTTP_PORT", "0")

# A Stripe emulator (localstripe) for the whole session, and a recording,
# fault-injecting proxy in front of it per test.
__all__ = ["stripe_emulator", "stripe_proxy"]


@pytest.fixture(scope="session")
def infra() -> Iterator[Services]:
    with services() as found:
        yield found


def _with_database(dsn: str, database: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{database}"


@pytest.fixture(scope="session")
async def template_db(infra: Services) -> AsyncIterator[str]:
    name = f"intentflow_template_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(infra.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        conn = await asyncpg.connect(_with_database(infra.database_url, name))
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield name
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def database_url(infra: Services, template_db: str) -> AsyncIterator[str]:
    """A freshly migrated database of this test's own."""
    name = f"intentflow_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(infra.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
        yield _with_database(infra.database_url, name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
async def topic(infra: Services) -> str:
    """A topic of this test's own, with 12 partitions, and its dead-letter topic."""
    name = f"stripe.events.{secrets.token_hex(6)}"
    # The order events topic too: a consumer process runs the relay, which checks it at start.
    await create_topics(infra.kafka_bootstrap_servers, name, dlq_topic(name), DEFAULT_ORDERS_TOPIC)
    # The broker may answer metadata for a new topic a moment after creating it.
    await asyncio.sleep(0.1)
    return name

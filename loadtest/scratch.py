"""Scratch databases and topics: made fresh for one run on a given server, dropped after it.

Every run of a replay or a benchmark gets its own migrated database (and its
own topics), so runs never see each other's rows and a given server is left
as it was found.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient

from intentflow.consumer.migrate import migrate
from intentflow.devservices import Services
from intentflow.devservices.topics import create_topics
from intentflow.loadtest.workload import Workload, seed_database
from intentflow.schemas import dlq_topic
from intentflow.stripekit.publish import publish


def database_url(server_url: str, name: str) -> str:
    """`server_url` with its database replaced by `name`, its query (sslmode, …) kept."""
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


async def create_database(server_url: str, name: str) -> str:
    """A new database `name`, migrated; its URL."""
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = database_url(server_url, name)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return url


async def drop_database(server_url: str, name: str) -> None:
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def server_version(server_url: str) -> str:
    conn = await asyncpg.connect(server_url)
    try:
        return str(await conn.fetchval("SHOW server_version")).split()[0]
    finally:
        await conn.close()


async def seeded_database(infra: Services, workload: Workload, name: str) -> str:
    """A new migrated database holding `workload`'s stock and carts, analyzed; its URL."""
    url = await create_database(infra.database_url, name)
    conn = await asyncpg.connect(url)
    try:
        await seed_database(conn, workload)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return url


async def loaded_topic(infra: Services, name: str, workload: Workload) -> None:
    """A new topic (and its dead-letter topic) holding every delivery of `workload`."""
    await create_topics(infra.kafka_bootstrap_servers, name, dlq_topic(name))
    await asyncio.sleep(0.1)  # the broker may answer metadata for a new topic a moment later
    await publish(
        infra.kafka_bootstrap_servers,
        name,
        workload.deliveries,
        enable_idempotence=infra.kafka_enable_idempotence,
    )


async def drop_topic(bootstrap_servers: str, name: str) -> None:
    """Free the broker's memory; a broker that cannot delete topics keeps them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        with contextlib.suppress(Exception):
            await admin.delete_topics([name, dlq_topic(name)])
    finally:
        await admin.close()

"""The consumer's connections, built from its settings: the database pool and the Kafka clients.

Every new database connection is made by `consumer.database.connect` (nothing in
the session, keepalives on its socket) and checked against the schema this code
needs (`consumer.migrate.check_schema`), so a connection re-established after a
failover or a restore to an older database fails as the environment's fault,
waited out, instead of writing to tables that are not what the code expects.
Each transaction sets a statement timeout, and an idle-in-transaction timeout so
that a consumer that vanished mid-batch does not hold its row locks for long.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer
from asyncpg.pool import PoolConnectionProxy

from intentflow.consumer import database
from intentflow.consumer.database import Begin
from intentflow.consumer.dlq import DeadLetters
from intentflow.consumer.migrate import check_schema
from intentflow.consumer.settings import ConsumerSettings
from intentflow.schemas.kafka import client_kwargs

# A connection of one's own or one lent by the pool: the store and the tools take either.
Connection = asyncpg.Connection | PoolConnectionProxy


def unnest_columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """The first `width` fields of `rows`, one list per column: the arrays of an `unnest`."""
    return [[row[i] for row in rows] for i in range(width)]


@dataclass(frozen=True, slots=True)
class Columns:
    """Named, typed columns, and the `unnest` over them: the SQL's column list, its
    `unnest($1::text[], …)` and the arrays passed to it all come from this one list,
    so that a value cannot land in its neighbour's column."""

    names: tuple[str, ...]
    types: tuple[str, ...]

    @classmethod
    def of(cls, *columns: tuple[str, str]) -> Columns:
        return cls(tuple(n for n, _ in columns), tuple(t for _, t in columns))

    def __add__(self, other: Columns) -> Columns:
        return Columns(self.names + other.names, self.types + other.types)

    @property
    def listed(self) -> str:
        return ", ".join(self.names)

    @property
    def unnest(self) -> str:
        arrays = ", ".join(f"${i}::{t}[]" for i, t in enumerate(self.types, start=1))
        return f"unnest({arrays})"

    def arrays(self, rows: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
        """One list per column, from rows keyed by column name."""
        return [[row[name] for row in rows] for name in self.names]


async def create_pool(
    settings: ConsumerSettings,
    size: int | None = None,
    idle_in_transaction_ms: int | None = None,
    name: str = "order-consumer",
) -> asyncpg.Pool:
    """A pool that opens connections on demand (the worker's retries own reconnecting)."""
    begin = Begin(
        statement_timeout_ms=settings.db_statement_timeout_ms,
        idle_in_transaction_ms=idle_in_transaction_ms or 2 * settings.db_statement_timeout_ms,
    )

    async def connect_checked(*_: Any, **__: Any) -> database.Connection:
        conn = await database.connect(settings, name=name, begin=begin)
        try:
            # Bounded like every other use (part of connecting): a new connection's first
            # query can meet a black hole too, and asyncpg's close would wait for it.
            with database.deadline(conn, settings.db_connect_timeout_s, "schema check"):
                await check_schema(conn)
        except BaseException:
            conn.terminate()
            raise
        return conn

    return await asyncpg.create_pool(
        settings.database_url,
        min_size=0,
        max_size=size or settings.db_pool_size,
        connect=connect_checked,
        connection_class=database.Connection,
        # Behind a pooler in transaction mode the session is not ours to reset (asyncpg's
        # RESET ALL, UNLISTEN, advisory unlocks would reach whichever server connection
        # the pooler picks); the transaction's own settings end with it anyway.
        reset=_nothing_to_reset if settings.db_pool_mode == "transaction" else None,
    )


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    return None


def create_consumer(settings: ConsumerSettings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        **client_kwargs(settings),
        group_id=settings.kafka_group_id,
        group_instance_id=settings.kafka_group_instance_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=settings.fetch_max_bytes,
        max_partition_fetch_bytes=settings.max_partition_fetch_bytes,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
    )


def create_dead_letters(settings: ConsumerSettings) -> DeadLetters:
    return DeadLetters(
        settings,
        settings.kafka_topic,
        enable_idempotence=settings.kafka_enable_idempotence,
        max_request_bytes=settings.kafka_max_request_bytes,
    )


async def abandon_group(consumer: AIOKafkaConsumer) -> None:
    """Close a consumer whose `stop()` ran out of time, without leaving its group.

    `stop()` leaves the group only once a rebalance in progress has finished,
    which the other members can hold up for as long as their drains take; the
    group then drops this member after its session timeout. These are the steps
    of `stop()` after leaving, on aiokafka 0.14.0's internals (pinned; recheck
    on upgrade): the coordinator's tasks cancelled, the fetcher and the
    connections closed, so that nothing reconnects afterwards.
    """
    coordinator = consumer._coordinator
    tasks = [
        task
        for task in (
            getattr(coordinator, "_coordination_task", None),
            getattr(coordinator, "_heartbeat_task", None),
            getattr(coordinator, "_commit_refresh_task", None),
        )
        if task is not None and not task.done()
    ]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if consumer._fetcher is not None:
        with contextlib.suppress(Exception):
            await consumer._fetcher.close()
    await consumer._client.close()

"""The straightforward consumer that intentflow's is measured against.

One transaction per event: an aiokafka consumer in its own group polls, and for
each record decodes it and applies it alone, then commits the poll's offsets
once every event of the poll has committed in the database (invariant 5).

It applies each event with `consumer.store.apply_batch(conn, [envelope])`, a
batch of one, rather than hand-written per-event SQL. That is the honest
choice for a comparison: the schema, the inbox, the row locks in SKU order,
the fold and the allocation are the same code, so both contenders give the
same guarantees and produce the same rows, and the ratio measures what
batching buys and nothing else. Written by hand, the per-event version would
issue the same statements (claim the event, lock the intent, read the cart,
lock and take the stock, write the order, its items, movements and the
intent) with scalar parameters instead of arrays: the same round trips.

Poison records are counted and skipped here (the benchmark publishes none);
the production consumer dead-letters them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from intentflow.consumer.decode import Envelope, decode
from intentflow.consumer.store import apply_batch


@dataclass
class BaselineStats:
    events: int = 0
    duplicates: int = 0
    poison: int = 0
    orders: int = 0
    # One entry per event: its transaction is this consumer's unit of work.
    transaction_latencies_ms: list[float] = field(default_factory=list)


class BaselineConsumer:
    """Poll, then apply each record in a transaction of its own, then commit offsets."""

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        topic: str,
        group_id: str,
        database_url: str,
        max_records: int = 500,
        poll_timeout_ms: int = 200,
    ) -> None:
        self._bootstrap_servers = bootstrap_servers
        self._topic = topic
        self._group_id = group_id
        self._database_url = database_url
        self._max_records = max_records
        self._poll_timeout_ms = poll_timeout_ms
        self.stats = BaselineStats()
        self._consumer: AIOKafkaConsumer | None = None
        self._conn: asyncpg.Connection | None = None

    async def start(self) -> Self:
        self._conn = await asyncpg.connect(self._database_url)
        self._consumer = AIOKafkaConsumer(
            self._topic,
            bootstrap_servers=self._bootstrap_servers,
            group_id=self._group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await self._consumer.start()
        return self

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self._conn is not None:
            await self._conn.close()
        self._consumer = self._conn = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(self._consumer.assignment()) if self._consumer is not None else frozenset()

    async def run(self, until_events: int) -> BaselineStats:
        """Consume until `until_events` records have been applied."""
        assert self._consumer is not None
        while self.stats.events < until_events:
            fetched = await self._consumer.getmany(
                timeout_ms=self._poll_timeout_ms, max_records=self._max_records
            )
            records = [r for tp in sorted(fetched) for r in fetched[tp]]
            for record in records:
                await self._apply_one(record)
            if records:
                await self._commit(records)
        return self.stats

    async def _apply_one(self, record: Any) -> None:
        assert self._conn is not None
        started = time.perf_counter()
        decoded = decode(record)
        self.stats.events += 1
        if not isinstance(decoded, Envelope):
            self.stats.poison += 1
            return
        result = await apply_batch(self._conn, [decoded])
        self.stats.duplicates += result.duplicates
        self.stats.orders += sum(result.orders.values())
        self.stats.transaction_latencies_ms.append((time.perf_counter() - started) * 1000)

    async def _commit(self, records: list[Any]) -> None:
        assert self._consumer is not None
        offsets: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
        await self._consumer.commit(offsets)

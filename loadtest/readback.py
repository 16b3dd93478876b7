"""What a replay left behind, read back: the inbox, the topic, the group, the books.

Waits until the consumers have caught up (every acknowledged event in the
inbox, every record committed by the group), then reads what `verdict`
judges: each applied event's arrival (the bridge's `received-at` header, read
back from the topic) and commit (its transaction's commit timestamp when the
server tracks them, `track_commit_timestamp`, on in the embedded PostgreSQL;
else the transaction's start), the orders, intents and stock levels, every
out_of_stock decision and stock movement with its transaction, the
dead-letter topic, and `order-consumer reconcile`'s answer. Also the
invariants after a benchmark's bulk run (`bulk_check`).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from intentflow.consumer.tools import reconcile as reconciliation
from intentflow.loadtest.delivery import Tally
from intentflow.loadtest.stack import Stack
from intentflow.loadtest.verdict import Applied, Books, IntentRow, OrderRow, Refusals, reckon
from intentflow.loadtest.workload import Amounts, Scenario, Workload
from intentflow.schemas import HEADER_RECEIVED_AT, dlq_topic


async def applied_count(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM processed_events"))


async def wait_caught_up(
    stack: Stack, tally: Tally, *, idle_s: float = 20.0, timeout_s: float = 300.0
) -> bool:
    """Until every acknowledged event is in the inbox and the group has committed every
    record on the topic, late copies included (True); False once nothing moved for `idle_s`."""
    conn: asyncpg.Connection | None = None
    lag = GroupLag(stack)
    wanted = sorted(tally.acked_ids)
    last: tuple[int, int] = (-1, -1)
    moved = time.monotonic()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                conn = conn or await _connect(stack.database_url)
                found = await conn.fetchval(
                    "SELECT count(*) FROM processed_events WHERE event_id = ANY($1::text[])", wanted
                )
                # The broker is asked only once the inbox holds every event.
                behind = await lag() if found == len(wanted) else -1
            except Exception:
                if conn is not None:
                    conn.terminate()
                conn = None
                if time.monotonic() - moved > idle_s:
                    return False
                await asyncio.sleep(0.25)
                continue
            if behind == 0:
                return True
            if (found, behind) != last:
                last, moved = (found, behind), time.monotonic()
            elif time.monotonic() - moved > idle_s:
                return False
            await asyncio.sleep(0.25)
        return False
    finally:
        if conn is not None:
            conn.terminate()
        await lag.close()


class GroupLag:
    """Records on the events topic that the consumer group has not committed past, asked
    of two clients kept open from one call to the next (started again after a failure)."""

    def __init__(self, stack: Stack) -> None:
        self._stack = stack
        self._clients: tuple[AIOKafkaAdminClient, AIOKafkaConsumer] | None = None

    async def __call__(self) -> int:
        stack = self._stack
        try:
            if self._clients is None:
                self._clients = (
                    AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap_servers),
                    AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap_servers),
                )
                await self._clients[0].start()
                await self._clients[1].start()
            admin, reader = self._clients
            partitions = await _partitions(reader, stack.topic)
            # The partitions named: the embedded broker's answer for "all of them" is one
            # aiokafka cannot read.
            committed = await admin.list_consumer_group_offsets(
                stack.group_id, partitions=partitions
            )
            ends = await reader.end_offsets(partitions)
        except BaseException:
            await self.close()
            raise
        done = {tp: meta.offset for tp, meta in committed.items()}
        return sum(max(0, end - max(0, done.get(tp, 0))) for tp, end in ends.items())

    async def close(self) -> None:
        if self._clients is not None:
            admin, reader = self._clients
            self._clients = None
            with contextlib.suppress(Exception):  # a client that never started
                await reader.stop()
            with contextlib.suppress(Exception):
                await admin.close()


async def _partitions(reader: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    await reader._client.force_metadata_update()
    return [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())]


async def _connect(url: str, timeout_s: float = 60.0) -> asyncpg.Connection:
    """A connection, waiting out a database that is restarting."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await asyncpg.connect(url)
        except (OSError, asyncpg.PostgresError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the database did not answer within {timeout_s:g} s") from exc
            await asyncio.sleep(0.2)


async def read_applied(stack: Stack) -> Applied:
    received = await _received_at(stack)
    conn = await _connect(stack.database_url)
    try:
        applied = Applied()
        try:
            rows = await conn.fetch(
                "SELECT event_id, kafka_partition, kafka_offset,"
                " extract(epoch FROM pg_xact_commit_timestamp(xmin)) AS committed"
                " FROM processed_events"
            )
        except asyncpg.PostgresError:  # track_commit_timestamp is off on this server
            applied.source = "transaction start"
            rows = await conn.fetch(
                "SELECT event_id, kafka_partition, kafka_offset,"
                " extract(epoch FROM processed_at) AS committed FROM processed_events"
            )
        applied.records = len(received)
        applied.ignored = await conn.fetchval(
            "SELECT count(*) FROM processed_events WHERE outcome = 'ignored'"
        )
        for r in rows:
            applied.ids.add(r["event_id"])
            at = received.get((r["kafka_partition"], r["kafka_offset"]))
            if at is not None and r["committed"] is not None:
                applied.times.append((at, float(r["committed"])))
        return applied
    finally:
        await conn.close()


async def _received_at(stack: Stack) -> dict[tuple[int, int], float]:
    """(partition, offset) -> the bridge's received-at, in epoch seconds, for every record."""
    reader = AIOKafkaConsumer(
        bootstrap_servers=stack.kafka_bootstrap_servers, enable_auto_commit=False
    )
    await reader.start()
    try:
        partitions = await _partitions(reader, stack.topic)
        reader.assign(partitions)
        await reader.seek_to_beginning(*partitions)
        ends = await reader.end_offsets(partitions)
        out: dict[tuple[int, int], float] = {}
        remaining = {tp for tp in partitions if ends[tp] > 0}
        while remaining:
            batch = await reader.getmany(*remaining, timeout_ms=1000, max_records=5000)
            for tp, records in batch.items():
                for record in records:
                    for name, value in record.headers or ():
                        if name == HEADER_RECEIVED_AT:
                            out[(tp.partition, record.offset)] = int(value) / 1000
                    if record.offset + 1 >= ends[tp]:
                        remaining.discard(tp)
        return out
    finally:
        await reader.stop()


async def dead_lettered(stack: Stack) -> int:
    reader = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap_servers)
    await reader.start()
    try:
        partitions = await _partitions(reader, dlq_topic(stack.topic))
        ends = await reader.end_offsets(partitions) if partitions else {}
        return sum(ends.values())
    finally:
        await reader.stop()


async def reconcile(stack: Stack) -> tuple[bool, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "intentflow.consumer", "reconcile",
        env=stack.consumer_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await process.communicate()
    lines = [line for line in out.decode().splitlines() if ": " in line]
    held = sum(line.endswith(": OK") for line in lines)
    return process.returncode == 0, f"{held} of {len(lines)} checks OK"


async def books(stack: Stack, scenario: Scenario) -> Books:
    conn = await _connect(stack.database_url)
    try:
        rows = await conn.fetch(
            "SELECT payment_intent_id, status, allocation, amount_refunded, cancellation_reason,"
            " amount, amount_subtotal, amount_shipping, amount_discount, amount_tax FROM orders"
        )
        intents = await conn.fetch("SELECT id, status, cancellation_reason FROM payment_intents")
        refusals = await _refusals(conn)
        levels = {
            r["sku"]: r["stocked_quantity"]
            for r in await conn.fetch("SELECT sku, stocked_quantity FROM inventory_levels")
        }
    finally:
        await conn.close()
    return reckon(
        [_order_row(r) for r in rows],
        {r["id"]: IntentRow(r["status"], r["cancellation_reason"]) for r in intents},
        levels,
        scenario,
        refusals,
    )


def _order_row(r: asyncpg.Record) -> OrderRow:
    kept = Amounts(
        r["amount"],
        r["amount_subtotal"],
        r["amount_shipping"],
        r["amount_discount"],
        r["amount_tax"],
    )
    return OrderRow(
        r["payment_intent_id"], r["status"], r["allocation"], r["amount_refunded"],
        r["cancellation_reason"], kept,
    )  # fmt: skip


async def _refusals(conn: asyncpg.Connection) -> Refusals | None:
    """Read with commit timestamps; None when the server does not track them."""
    try:
        orders = await conn.fetch(
            """
            SELECT o.payment_intent_id, o.status_reason, e.xmin::text AS tx,
                   extract(epoch FROM pg_xact_commit_timestamp(e.xmin)) AS committed
            FROM orders o JOIN processed_events e ON e.event_id = o.source_event_id
            WHERE o.allocation = 'out_of_stock'
            """
        )
        moves = await conn.fetch(
            "SELECT sku, quantity_delta, xmin::text AS tx,"
            " extract(epoch FROM pg_xact_commit_timestamp(xmin)) AS committed"
            " FROM inventory_movements"
        )
    except asyncpg.PostgresError:  # track_commit_timestamp is off
        return None
    movements: dict[str, list[tuple[float, str, int]]] = defaultdict(list)
    for m in moves:
        movements[m["sku"]].append((float(m["committed"]), m["tx"], m["quantity_delta"]))
    for history in movements.values():
        history.sort()
    return Refusals([(r[0], r[1] or "", r[2], float(r[3])) for r in orders], dict(movements))


@dataclass
class BulkCheck:
    """The invariants after a bench run, read back from the database."""

    failures: list[str] = field(default_factory=list)
    orders: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures


async def bulk_check(url: str, workload: Workload) -> BulkCheck:
    """The invariants after a bench run that applied every delivery of `workload`."""
    conn = await asyncpg.connect(url)
    try:
        check = BulkCheck()
        rows = await conn.fetch("SELECT status, count(*) AS n FROM orders GROUP BY status")
        check.orders = {r["status"]: r["n"] for r in rows}
        orders = sum(check.orders.values())
        if orders != len(workload.intents):
            check.failures.append(f"orders {orders} != intents {len(workload.intents)}")
        processed = await conn.fetchval("SELECT count(*) FROM processed_events")
        if processed != workload.distinct_events:
            check.failures.append(
                f"processed_events {processed} != distinct events {workload.distinct_events}"
            )
        negative = await conn.fetchval(
            "SELECT count(*) FROM inventory_levels WHERE stocked_quantity < 0"
        )
        if negative:
            check.failures.append(f"{negative} SKUs below zero")
        unexplained = await conn.fetchval(
            """
            SELECT count(*) FROM inventory_levels l
            LEFT JOIN (SELECT sku, sum(quantity_delta) AS total
                       FROM inventory_movements GROUP BY sku) m ON m.sku = l.sku
            WHERE coalesce(m.total, 0) <> l.stocked_quantity
            """
        )
        if unexplained:
            check.failures.append(f"{unexplained} SKUs whose movements do not sum to the level")
        # And every check `order-consumer reconcile` makes, on the same database.
        report = await reconciliation.check(conn)
        check.failures += [
            f"reconcile: {c.name} {c.violations}" for c in report.checks if c.violations
        ]
        return check
    finally:
        await conn.close()

"""After a replay: wait for the consumers, then compare the database with the histories.

What the histories imply, intent by intent (`loadtest.workload.Fate`): which
intents have an order and in which status (placed or out_of_stock where the
stock decided, canceled, refunded, needs_review), and so how many units each
SKU must have left: its stock less the cart lines of every order that was
placed and still holds its stock (not canceled). Allocation between intents
that compete for the last units depends on arrival, so the database's own
allocation decisions are taken as given; everything else is predicted.

The checks: no event acknowledged by the bridge missing from the consumer's
inbox (lost), one order per intent (duplicates), no SKU selling more units
than it had (oversold), every order's status allowed by its history, every
SKU's stock as the histories imply, nothing dead-lettered, `order-consumer
reconcile` clean, and no consumer process dead that the harness did not kill.

Latency is from the bridge's `received-at` header (read back from the topic)
to the commit of the transaction that applied the event: its commit timestamp
when the server tracks them (`track_commit_timestamp`, on in the embedded
PostgreSQL), else the transaction's start.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from consumer import reconcile as reconciliation
from loadtest.delivery import Tally
from loadtest.report import Check, Second
from loadtest.stack import Stack
from loadtest.workload import History, Scenario, Workload
from schemas import HEADER_RECEIVED_AT, dlq_topic

ALLOCATED = "placed|out_of_stock"


@dataclass
class Applied:
    """Every event in the consumer's inbox, with when it arrived and when it committed."""

    ids: set[str] = field(default_factory=set)
    records: int = 0  # records on the topic: every delivery the bridge published
    ignored: int = 0  # events the consumer recorded as meaning nothing (none should be)
    # (received-at, committed) in epoch seconds, one per applied event whose record was found.
    times: list[tuple[float, float]] = field(default_factory=list)
    source: str = "commit timestamp"


async def applied_count(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM processed_events"))


async def wait_caught_up(
    stack: Stack, tally: Tally, *, idle_s: float = 20.0, timeout_s: float = 300.0
) -> bool:
    """Until every acknowledged event is in the inbox and the group has committed every
    record on the topic, late copies included (True); False once nothing moved for `idle_s`."""
    conn: asyncpg.Connection | None = None
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
                lag = await group_lag(stack)
            except Exception:
                if conn is not None:
                    conn.terminate()
                conn = None
                if time.monotonic() - moved > idle_s:
                    return False
                await asyncio.sleep(0.25)
                continue
            if found == len(wanted) and lag == 0:
                return True
            if (found, lag) != last:
                last, moved = (found, lag), time.monotonic()
            elif time.monotonic() - moved > idle_s:
                return False
            await asyncio.sleep(0.25)
        return False
    finally:
        if conn is not None:
            conn.terminate()


async def group_lag(stack: Stack) -> int:
    """Records on the events topic that the consumer group has not committed past."""
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap_servers)
    reader = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap_servers)
    await admin.start()
    await reader.start()
    try:
        partitions = await _partitions(reader, stack.topic)
        # The partitions named: the embedded broker's answer for "all of them" is one
        # aiokafka cannot read.
        committed = await admin.list_consumer_group_offsets(stack.group_id, partitions=partitions)
        ends = await reader.end_offsets(partitions)
        done = {tp: meta.offset for tp, meta in committed.items()}
        return sum(max(0, end - max(0, done.get(tp, 0))) for tp, end in ends.items())
    finally:
        await reader.stop()
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
        sys.executable, "-m", "consumer", "reconcile",
        env=stack.consumer_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await process.communicate()
    lines = [line for line in out.decode().splitlines() if ": " in line]
    held = sum(line.endswith(": OK") for line in lines)
    return process.returncode == 0, f"{held} of {len(lines)} checks OK"


@dataclass
class Books:
    """The database's orders and stock, read back and set against the histories."""

    orders_expected: dict[str, int]
    orders_found: dict[str, int]
    duplicate_orders: int
    oversold_units: int
    stock_expected: int
    stock_found: int
    skus_off: list[str]  # SKUs whose stock is not what the histories imply
    contradicted: list[str]  # intents whose orders their history does not allow


class OrderRow(NamedTuple):
    payment_intent_id: str
    status: str
    allocation: str
    amount_refunded: int = 0
    cancellation_reason: str | None = None


class IntentRow(NamedTuple):
    status: str
    cancellation_reason: str | None = None


async def books(stack: Stack, scenario: Scenario) -> Books:
    conn = await _connect(stack.database_url)
    try:
        rows = await conn.fetch(
            "SELECT payment_intent_id, status, allocation, amount_refunded, cancellation_reason"
            " FROM orders"
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
        [OrderRow(*r) for r in rows],
        {r["id"]: IntentRow(r["status"], r["cancellation_reason"]) for r in intents},
        levels,
        scenario,
        refusals,
    )


def reckon(
    orders: list[OrderRow],
    intents: dict[str, IntentRow],
    levels: dict[str, int],
    scenario: Scenario,
    refusals: Refusals | None = None,
) -> Books:
    """The database's orders, intents and stock levels set against what the histories imply."""
    histories = {h.intent_id: h for h in scenario.histories}
    by_intent: dict[str, list[OrderRow]] = defaultdict(list)
    for row in orders:
        by_intent[row.payment_intent_id].append(row)

    expected: Counter[str] = Counter()
    for h in scenario.histories:
        statuses = h.fate.statuses()
        if statuses:
            expected[ALLOCATED if len(statuses) > 1 else next(iter(statuses))] += 1
    found = Counter(r.status for r in orders)

    contradicted = [
        f"{intent_id} ({h.fate}: {problem})"
        for intent_id, h in histories.items()
        if (problem := _against_history(h, by_intent.get(intent_id, []), intents.get(intent_id)))
    ]
    contradicted += [f"{i} (no such intent)" for i in by_intent if i not in histories]
    if refusals is not None:
        contradicted += refused_with_stock(refusals, histories)
    else:
        contradicted += _needlessly_short(orders, histories, levels)

    held_now, held_expected = _held(by_intent, histories)
    oversold = sum(max(0, held_now[sku] - initial) for sku, initial in scenario.stock.items())
    oversold += sum(max(0, -level) for level in levels.values())
    left_expected = {sku: q - held_expected[sku] for sku, q in scenario.stock.items()}
    skus_off = [sku for sku, q in left_expected.items() if levels.get(sku) != q]
    return Books(
        orders_expected=dict(expected),
        orders_found=dict(found),
        duplicate_orders=len(orders) - len(by_intent),
        oversold_units=oversold,
        stock_expected=sum(left_expected.values()),
        stock_found=sum(levels.get(sku, 0) for sku in scenario.stock),
        skus_off=skus_off,
        contradicted=contradicted,
    )


def _against_history(h: History, rows: list[OrderRow], intent: IntentRow | None) -> str:
    """What in the database contradicts this intent's history; "" when nothing does."""
    allowed = h.fate.statuses()
    if intent is None:
        return "no payment_intents row"
    if (intent.status, intent.cancellation_reason) != (h.intent_status, h.cancellation_reason):
        return f"intent {intent.status}/{intent.cancellation_reason}"
    if not allowed:
        return f"{len(rows)} orders" if rows else ""
    if len(rows) != 1:
        return f"{len(rows)} orders"
    (order,) = rows
    if order.status not in allowed:
        return f"order {order.status}"
    if order.amount_refunded != h.amount_refunded:
        return f"refunded {order.amount_refunded}, not {h.amount_refunded}"
    if order.status == "canceled" and order.cancellation_reason != h.cancellation_reason:
        return f"order canceled for {order.cancellation_reason}"
    return ""


@dataclass
class Refusals:
    """Every out_of_stock decision and every stock movement, each with its transaction."""

    # (intent, status_reason, transaction id, commit time) of each out_of_stock order
    orders: list[tuple[str, str, str, float]]
    # sku -> [(commit time, transaction id, delta)], in commit order
    movements: dict[str, list[tuple[float, str, int]]]


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


def refused_with_stock(refusals: Refusals, histories: dict[str, History]) -> list[str]:
    """out_of_stock orders whose transaction saw enough of every SKU it named short.

    A batch locks the stock rows of every SKU it wants (FOR UPDATE) until it
    commits, so what it saw of a SKU is the sum of that SKU's movements
    committed before it (the seed's included), less what its own earlier
    orders took. At least that sum less everything its orders took: if even
    that covers the cart's demand for each SKU the reason names, the order
    was refused stock that was there.
    """
    wrong = []
    for intent_id, reason, tx, committed in refusals.orders:
        h = histories.get(intent_id)
        if h is None:
            continue
        demand: Counter[str] = Counter()
        for sku, quantity, _ in h.cart.lines:
            demand[sku] += quantity
        named = [sku for sku in reason.removeprefix("short:").split(",") if sku]
        if not reason.startswith("short:") or not named:
            wrong.append(f"{intent_id} (out_of_stock, reason {reason!r} names no SKU)")
            continue
        seen = {
            sku: sum(
                delta
                for at, by, delta in refusals.movements.get(sku, ())
                if (at < committed and by != tx) or (by == tx and delta < 0)
            )
            for sku in named
        }
        if all(seen[sku] >= demand[sku] for sku in named):
            wrong.append(f"{intent_id} (out_of_stock, saw {seen} for {dict(demand)})")
    return wrong


def _needlessly_short(
    orders: list[OrderRow], histories: dict[str, History], levels: dict[str, int]
) -> list[str]:
    """Without commit timestamps, a weaker test: out_of_stock orders whose every SKU still
    has what the cart asked for, on SKUs whose stock only ever fell (no canceled order
    gave any back): there was enough when they were allocated."""
    given_back = {
        sku
        for row in orders
        if row.allocation == "placed"
        and row.status == "canceled"
        and row.payment_intent_id in histories
        for sku, _, _ in histories[row.payment_intent_id].cart.lines
    }
    short = []
    for row in orders:
        h = histories.get(row.payment_intent_id)
        if row.allocation != "out_of_stock" or h is None:
            continue
        demand: Counter[str] = Counter()
        for sku, quantity, _ in h.cart.lines:
            demand[sku] += quantity
        if all(levels.get(sku, 0) >= n and sku not in given_back for sku, n in demand.items()):
            short.append(f"{row.payment_intent_id} (out_of_stock with stock there)")
    return short


def _held(
    by_intent: dict[str, list[OrderRow]], histories: dict[str, History]
) -> tuple[Counter[str], Counter[str]]:
    """Units per SKU held by placed orders: open in the database, and as the fates imply."""
    now: Counter[str] = Counter()
    expected: Counter[str] = Counter()
    for intent_id, rows in by_intent.items():
        h = histories.get(intent_id)
        if h is None:
            continue
        for row in rows:
            if row.allocation != "placed":
                continue
            for sku, quantity, _ in h.cart.lines:
                if row.status != "canceled":
                    now[sku] += quantity
                if h.fate.keeps_stock:
                    expected[sku] += quantity
    return now, expected


def checks(
    books: Books,
    *,
    lost: int,
    dead_letters: int,
    reconciled: tuple[bool, str],
    dead_consumers: list[int],
    caught_up: bool,
    given_up: int,
    ignored: int,
    faults_not_survived: list[str],
) -> list[Check]:
    def count(name: str, found: int, detail: str = "") -> Check:
        return Check(name, "0", f"{found}{' — ' + detail if detail and found else ''}", found == 0)

    return [
        Check("caught up: every acknowledged event applied, every record committed", "yes",
              "yes" if caught_up else "no", caught_up),
        count("lost events", lost),
        count("duplicate orders", books.duplicate_orders),
        count("oversold units", books.oversold_units),
        count("orders against their history", len(books.contradicted),
              ", ".join(books.contradicted[:3])),
        count("SKUs with unexplained stock", len(books.skus_off),
              ", ".join(books.skus_off[:3])),
        count("events ignored as meaningless", ignored),
        count("dead-lettered events", dead_letters),
        count("deliveries given up", given_up),
        count("consumers that crashed", len(dead_consumers), str(dead_consumers)),
        count("faults not survived", len(faults_not_survived), ", ".join(faults_not_survived)),
        Check("order-consumer reconcile", "exit 0", reconciled[1] or "(no output)", reconciled[0]),
    ]  # fmt: skip


def quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "count": 0}
    ordered = sorted(values)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {
        "p50": q(0.5),
        "p95": q(0.95),
        "p99": q(0.99),
        "max": ordered[-1],
        "count": len(ordered),
    }


def timeline(tally: Tally, applied: Applied, started: float) -> list[Second]:
    per_second: dict[int, list[float]] = defaultdict(list)
    for received, committed in applied.times:
        per_second[int(committed - started)].append((committed - received) * 1000)
    last = max([*tally.acked_per_second, *per_second, 0])
    out = []
    for t in range(last + 1):
        lat = sorted(per_second.get(t, []))
        out.append(
            Second(
                t=t,
                acked=tally.acked_per_second.get(t, 0),
                applied=len(lat),
                latency_p99_ms=quantiles(lat)["p99"] if lat else None,
                latency_p50_ms=statistics.median(lat) if lat else None,
            )
        )
    return out


# --- Benchmarks: a bulk run of `workload.generate`'s deliveries ------------------


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


def percentile(values: list[float], q: float) -> float:
    """The `q`th percentile (0-100) of `values`, nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

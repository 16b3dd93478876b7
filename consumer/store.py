"""Apply a batch of decoded events to PostgreSQL in one transaction.

The unit of work (DESIGN.md, "The path of one event"):
  1. claim the events in the inbox; only claimed events are applied (invariant 2);
  2. lock the intents' rows and read their facts and orders;
  3. fold each intent's claimed events, in Kafka order, into new facts and
     decisions (consumer/fold.py), and write the facts;
  4. lock the stock rows touched, in SKU order (invariant 8); give back what
     canceled orders took; allocate stock to new orders in the order their
     payments were authorized; write orders, items, movements and levels;
  5. bring existing orders up to date (status, refunds, dispute);
  6. write the outbox rows those order changes cause: order events and
     Stripe actions (consumer/outbox.py), for the relay to perform.
The caller commits Kafka offsets only after this transaction has committed.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from intentflow.consumer.connections import Connection, unnest_columns
from intentflow.consumer.decisions import Allocation, Dispute, Facts, OrderStatus, RefundSnapshot
from intentflow.consumer.decode import Envelope
from intentflow.consumer.fold import (
    NOTHING_KNOWN,
    Arrival,
    IntentFold,
    IntentState,
    OrderView,
    Outcome,
    fold_intent,
)
from intentflow.consumer.orders import write_orders
from intentflow.consumer.outbox import enqueue
from intentflow.consumer.policy import DEFAULT_POLICY, ShopPolicy


class ConcurrentIntentWrite(Exception):
    """Another transaction created one of the batch's intents first (a consumer that
    lost its partitions in a rebalance and is finishing a batch). The batch is
    rolled back and retried; it then finds the rows and waits for their locks."""

    retriable = True  # consumer.errors: the environment's, not the event's
    cause = "conflict"


@dataclass
class BatchResult:
    events: int = 0
    claimed: int = 0
    rejected: int = 0  # refused by the database for their data, and dead-lettered
    outcomes: Counter[str] = field(default_factory=Counter)
    orders: Counter[str] = field(default_factory=Counter)  # new orders, by status
    entered: Counter[str] = field(default_factory=Counter)  # statuses orders entered (new or moved)

    @property
    def duplicates(self) -> int:
        return self.events - self.claimed - self.rejected

    def merged(self, other: BatchResult) -> BatchResult:
        return BatchResult(
            events=self.events + other.events,
            claimed=self.claimed + other.claimed,
            rejected=self.rejected + other.rejected,
            outcomes=self.outcomes + other.outcomes,
            orders=self.orders + other.orders,
            entered=self.entered + other.entered,
        )


async def apply_batch(
    conn: Connection, envelopes: list[Envelope], policy: ShopPolicy = DEFAULT_POLICY
) -> BatchResult:
    """Apply `envelopes` (in Kafka order) in one transaction on `conn`."""
    result = BatchResult(events=len(envelopes))
    async with conn.transaction():
        await conn.execute("SET LOCAL intentflow.applying = 'on'")
        claimed = await _claim(conn, envelopes)
        result.claimed = len(claimed)
        if not claimed:
            return result
        by_intent: dict[str, list[Envelope]] = defaultdict(list)
        for envelope in claimed:
            intent_id = envelope.intent_id
            if intent_id is None:
                result.outcomes[Outcome.IGNORED] += 1
                continue
            by_intent[intent_id].append(envelope)
        states = await _lock_intents(conn, sorted(by_intent))
        folds = [
            fold_intent(states[pid], [e.event for e in group], _Arrivals(group))
            for pid, group in by_intent.items()
        ]
        # Before any order: from here on this transaction holds every intent's row.
        await _write_intents(conn, folds)
        await _write_refunds(conn, folds, states)
        changes = await write_orders(conn, folds)
        await enqueue(conn, changes, policy)
        await _record_outcomes(conn, claimed, folds, result)
        result.orders.update(str(c.status) for c in changes if c.previous is None)
        result.entered.update(str(c.status) for c in changes if c.previous is not c.status)
    return result


class _Arrivals:
    """Each envelope's arrival, read from its headers only when the fold asks (authorizations)."""

    __slots__ = ("_envelopes",)

    def __init__(self, envelopes: list[Envelope]) -> None:
        self._envelopes = envelopes

    def __getitem__(self, index: int) -> Arrival:
        return self._envelopes[index].arrival


async def _claim(conn: Connection, envelopes: list[Envelope]) -> list[Envelope]:
    first: dict[str, Envelope] = {}
    for envelope in envelopes:
        first.setdefault(envelope.event.id, envelope)
    ids = sorted(first)  # one global order for the inbox's row locks
    rows = await conn.fetch(
        """
        INSERT INTO processed_events
            (event_id, event_type, payment_intent_id, kafka_partition, kafka_offset)
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[])
        ON CONFLICT (event_id) DO NOTHING
        RETURNING event_id
        """,
        ids,
        [first[i].event.type for i in ids],
        [first[i].intent_id for i in ids],
        [first[i].partition for i in ids],
        [first[i].offset for i in ids],
    )
    won = {row["event_id"] for row in rows}
    return [e for e in first.values() if e.event.id in won]


_INTENT_COLUMNS = """
    id, status, status_created, status_step, last_event_id, cancellation_reason,
    charge_amount_refunded, charge_refunded,
    dispute_id, dispute_status, dispute_amount, dispute_reason, dispute_created
"""


async def _lock_intents(conn: Connection, intent_ids: list[str]) -> dict[str, IntentState]:
    """Lock the intents that have a row and read every intent's facts and order.

    Intents with no row yet are inserted by `_write_intents`; a concurrent
    insert of the same intent is detected there and the batch retried.
    """
    rows = await conn.fetch(
        f"SELECT {_INTENT_COLUMNS} FROM payment_intents"
        " WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
        intent_ids,
    )
    orders = {
        r["payment_intent_id"]: OrderView(
            r["id"], Allocation(r["allocation"]), r["amount"], OrderStatus(r["status"])
        )
        for r in await conn.fetch(
            "SELECT id, payment_intent_id, allocation, amount, status FROM orders"
            " WHERE payment_intent_id = ANY($1::text[])",
            intent_ids,
        )
    }
    # Every intent's refunds, not only those of intents with a refund in this
    # batch: the order's amount refunded is re-derived from all of them whenever
    # any fact changes (a dispute, a cancel, the authorization itself).
    refunds: dict[str, dict[str, RefundSnapshot]] = defaultdict(dict)
    for r in await conn.fetch(
        "SELECT id, payment_intent_id, amount, status, status_created FROM refunds"
        " WHERE payment_intent_id = ANY($1::text[])",
        intent_ids,
    ):
        snapshot = RefundSnapshot(r["amount"], r["status"], r["status_created"])
        refunds[r["payment_intent_id"]][r["id"]] = snapshot
    states = {
        pid: IntentState(pid, NOTHING_KNOWN, orders.get(pid), exists=False) for pid in intent_ids
    }
    for r in rows:
        pid = r["id"]
        states[pid] = IntentState(pid, _facts(r, refunds.get(pid, {})), orders.get(pid))
    return states


def _facts(row: asyncpg.Record, refunds: dict[str, RefundSnapshot]) -> Facts:
    dispute = None
    if row["dispute_id"] is not None:
        dispute = Dispute(
            row["dispute_id"],
            row["dispute_status"],
            row["dispute_amount"],
            row["dispute_reason"],
            row["dispute_created"],
        )
    return Facts(
        status=row["status"],
        status_created=row["status_created"],
        status_step=row["status_step"],
        status_event_id=row["last_event_id"],
        cancellation_reason=row["cancellation_reason"],
        charge_amount_refunded=row["charge_amount_refunded"],
        charge_refunded=row["charge_refunded"],
        refunds=refunds,
        dispute=dispute,
    )


def _intent_rows(folds: list[IntentFold]) -> list[tuple[Any, ...]]:
    """One row per intent, its values in the order of `_INTENT_COLUMNS`."""
    rows = []
    for fold in folds:
        f = fold.state.facts
        d = f.dispute
        rows.append(
            (
                fold.state.payment_intent_id,
                f.status,
                f.status_created,
                f.status_step,
                f.status_event_id,
                f.cancellation_reason,
                f.charge_amount_refunded,
                f.charge_refunded,
                d and d.id,
                d and d.status,
                d and d.amount,
                d and d.reason,
                d and d.created,
            )
        )
    return rows


_UNNEST_INTENTS = """
    unnest($1::text[], $2::text[], $3::bigint[], $4::smallint[], $5::text[], $6::text[],
           $7::bigint[], $8::bool[], $9::text[], $10::text[], $11::bigint[], $12::text[],
           $13::bigint[])
"""


async def _write_intents(conn: Connection, folds: list[IntentFold]) -> None:
    """Store each changed intent's facts; fail retriably if another writer raced us."""
    changed = sorted((f for f in folds if f.changed), key=lambda f: f.state.payment_intent_id)
    known = [f for f in changed if f.state.exists]
    new = [f for f in changed if not f.state.exists]
    if known:
        await conn.execute(
            f"""
            UPDATE payment_intents p
            SET status = v.status, status_created = v.status_created,
                status_step = v.status_step, last_event_id = v.last_event_id,
                cancellation_reason = v.cancellation_reason,
                charge_amount_refunded = v.charge_amount_refunded,
                charge_refunded = v.charge_refunded, dispute_id = v.dispute_id,
                dispute_status = v.dispute_status, dispute_amount = v.dispute_amount,
                dispute_reason = v.dispute_reason, dispute_created = v.dispute_created,
                updated_at = now()
            FROM {_UNNEST_INTENTS} AS v({_INTENT_COLUMNS})
            WHERE p.id = v.id
            """,
            *unnest_columns(_intent_rows(known), 13),
        )
    # Most new intents know only their status: their row is written with the
    # status columns alone (the rest default), which halved this insert's cost.
    status_only = [f for f in new if _status_only(f.state.facts)]
    everything = [f for f in new if not _status_only(f.state.facts)]
    inserted = 0
    if status_only:
        rows = await conn.fetch(
            """
            INSERT INTO payment_intents
                (id, status, status_created, status_step, last_event_id, cancellation_reason)
            SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::smallint[],
                                 $5::text[], $6::text[])
            ON CONFLICT (id) DO NOTHING
            RETURNING id
            """,
            *unnest_columns(_intent_rows(status_only), 6),
        )
        inserted += len(rows)
    if everything:
        rows = await conn.fetch(
            f"""
            INSERT INTO payment_intents ({_INTENT_COLUMNS})
            SELECT * FROM {_UNNEST_INTENTS}
            ON CONFLICT (id) DO NOTHING
            RETURNING id
            """,
            *unnest_columns(_intent_rows(everything), 13),
        )
        inserted += len(rows)
    if inserted != len(new):
        raise ConcurrentIntentWrite(f"{len(new) - inserted} intents written concurrently")


def _status_only(facts: Facts) -> bool:
    return not (facts.charge_amount_refunded or facts.charge_refunded or facts.dispute)


async def _write_refunds(
    conn: Connection, folds: list[IntentFold], states: dict[str, IntentState]
) -> None:
    """Upsert the refund snapshots the batch made newer."""
    rows = []
    for fold in folds:
        pid = fold.state.payment_intent_id
        before = states[pid].facts.refunds
        for refund_id, snapshot in fold.state.facts.refunds.items():
            if before.get(refund_id) != snapshot:
                rows.append((refund_id, pid, snapshot))
    if not rows:
        return
    rows.sort(key=lambda row: row[0])
    await conn.execute(
        """
        INSERT INTO refunds (id, payment_intent_id, amount, status, status_created)
        SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[])
        ON CONFLICT (id) DO UPDATE SET amount = excluded.amount, status = excluded.status,
            status_created = excluded.status_created, updated_at = now()
        """,
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2].amount for r in rows],
        [r[2].status for r in rows],
        [r[2].created for r in rows],
    )


async def _record_outcomes(
    conn: Connection,
    claimed: list[Envelope],
    folds: list[IntentFold],
    result: BatchResult,
) -> None:
    """Count outcomes; store those other than `applied` (the column's default)."""
    not_applied: list[tuple[str, str]] = [
        (e.event.id, str(Outcome.IGNORED)) for e in claimed if e.intent_id is None
    ]
    for fold in folds:
        for event_id, outcome in fold.outcomes:
            result.outcomes[outcome] += 1
            if outcome is not Outcome.APPLIED:
                not_applied.append((event_id, str(outcome)))
    if not_applied:
        await conn.execute(
            """
            UPDATE processed_events e SET outcome = v.outcome
            FROM unnest($1::text[], $2::text[]) AS v(event_id, outcome)
            WHERE e.event_id = v.event_id
            """,
            [n[0] for n in not_applied],
            [n[1] for n in not_applied],
        )

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

from intentflow.consumer.connections import Columns, Connection
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
            fold_intent(states[pid], [e.event for e in group], _Arrivals(group), policy.cart_key)
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


# An intent's row. Most new intents know only their status: those are written
# with `_STATUS` alone (the rest default), which halved the insert's cost.
_STATUS = Columns.of(
    ("id", "text"),
    ("status", "text"),
    ("status_created", "bigint"),
    ("status_step", "smallint"),
    ("last_event_id", "text"),
    ("cancellation_reason", "text"),
)
_INTENT = _STATUS + Columns.of(
    ("charge_amount_refunded", "bigint"),
    ("charge_refunded", "bool"),
    ("dispute_id", "text"),
    ("dispute_status", "text"),
    ("dispute_amount", "bigint"),
    ("dispute_reason", "text"),
    ("dispute_created", "bigint"),
    ("account", "text"),
    ("amount_received", "bigint"),
    ("capture_before", "bigint"),
)


async def _lock_intents(conn: Connection, intent_ids: list[str]) -> dict[str, IntentState]:
    """Lock the intents that have a row and read every intent's facts and order.

    Intents with no row yet are inserted by `_write_intents`; a concurrent
    insert of the same intent is detected there and the batch retried.
    """
    rows = await conn.fetch(
        f"SELECT {_INTENT.listed} FROM payment_intents"
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
        account=row["account"],
        amount_received=row["amount_received"],
        capture_before=row["capture_before"],
    )


def _intent_row(fold: IntentFold) -> dict[str, Any]:
    """One intent's row, keyed by `_INTENT`'s columns."""
    f = fold.state.facts
    d = f.dispute
    return {
        "id": fold.state.payment_intent_id,
        "status": f.status,
        "status_created": f.status_created,
        "status_step": f.status_step,
        "last_event_id": f.status_event_id,
        "cancellation_reason": f.cancellation_reason,
        "charge_amount_refunded": f.charge_amount_refunded,
        "charge_refunded": f.charge_refunded,
        "dispute_id": d and d.id,
        "dispute_status": d and d.status,
        "dispute_amount": d and d.amount,
        "dispute_reason": d and d.reason,
        "dispute_created": d and d.created,
        "account": f.account,
        "amount_received": f.amount_received,
        "capture_before": f.capture_before,
    }


async def _write_intents(conn: Connection, folds: list[IntentFold]) -> None:
    """Store each changed intent's facts; fail retriably if another writer raced us."""
    changed = sorted((f for f in folds if f.changed), key=lambda f: f.state.payment_intent_id)
    known = [_intent_row(f) for f in changed if f.state.exists]
    new = [f for f in changed if not f.state.exists]
    if known:
        assigned = ", ".join(f"{name} = v.{name}" for name in _INTENT.names[1:])
        await conn.execute(
            f"""
            UPDATE payment_intents p SET {assigned}, updated_at = now()
            FROM {_INTENT.unnest} AS v({_INTENT.listed})
            WHERE p.id = v.id
            """,
            *_INTENT.arrays(known),
        )
    status_only = [_intent_row(f) for f in new if _status_only(f.state.facts)]
    everything = [_intent_row(f) for f in new if not _status_only(f.state.facts)]
    inserted = 0
    for columns, rows in ((_STATUS, status_only), (_INTENT, everything)):
        if rows:
            written = await conn.fetch(
                f"INSERT INTO payment_intents ({columns.listed}) SELECT * FROM {columns.unnest}"
                " ON CONFLICT (id) DO NOTHING RETURNING id",
                *columns.arrays(rows),
            )
            inserted += len(written)
    if inserted != len(new):
        raise ConcurrentIntentWrite(f"{len(new) - inserted} intents written concurrently")


def _status_only(facts: Facts) -> bool:
    return not (
        facts.charge_amount_refunded
        or facts.charge_refunded
        or facts.dispute
        or facts.account
        or facts.amount_received
        or facts.capture_before
    )


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

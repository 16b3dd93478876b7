"""Apply a batch of decoded events to PostgreSQL in one transaction.

The unit of work (docs/design.md, "The path of one event"):
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

from intentflow.consumer.connections import Connection
from intentflow.consumer.decode import Envelope
from intentflow.consumer.fold import (
    Arrival,
    IntentFold,
    Outcome,
    fold_intent,
)
from intentflow.consumer.intents import (
    lock_intents,
    write_intents,
    write_refunds,
)
from intentflow.consumer.orders import write_orders
from intentflow.consumer.outbox import enqueue
from intentflow.consumer.policy import DEFAULT_POLICY, ShopPolicy


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
        states = await lock_intents(conn, sorted(by_intent))
        folds = [
            fold_intent(states[pid], [e.event for e in group], _Arrivals(group), policy.cart_key)
            for pid, group in by_intent.items()
        ]
        # Before any order: from here on this transaction holds every intent's row.
        await write_intents(conn, folds)
        await write_refunds(conn, folds, states)
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

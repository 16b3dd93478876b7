"""The relay's side of the outbox: claim due rows, record how each attempt ended, and what is left.

The relay (consumer/relay.py) claims due rows (`claim`, `FOR UPDATE SKIP
LOCKED`), performs them and marks them (`record`) in the claiming
transaction, so a relay that dies leaves its rows pending for the next one.
`backlog`, `pending_actions` and `finished_by_outcome` say what is left and
what was done (the relay's reports, `order-consumer outbox`). The rows are
written by the consumer's side (consumer/outbox.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from intentflow.consumer.connections import Connection, unnest_columns
from intentflow.consumer.outbox import Kind


class Claimed(NamedTuple):
    id: int
    kind: Kind
    name: str
    payment_intent_id: str
    payload: str  # JSON text; an order event's carries its `outbox_id`
    idempotency_key: str | None
    attempts: int
    intent_status: str | None  # for Stripe actions: the intent's status as we know it


async def claim(
    conn: Connection, kind: Kind, limit: int, names: Sequence[str] | None = None
) -> list[Claimed]:
    """Lock up to `limit` due rows of `kind` (of `names` only, when given) that no
    other relay holds (in a transaction).

    An order event is due only when none of its intent's earlier events is
    pending: a relay never publishes an intent's events out of order, even
    while another relay holds the earlier ones.
    """
    rows = await conn.fetch(
        """
        SELECT x.id, x.kind, x.name, x.payment_intent_id,
               CASE WHEN x.kind = 'order_event'
                    -- The event's id and time are the row's own: spliced in front.
                    THEN '{"outbox_id": ' || x.id || ', "occurred_at": '
                         || to_json(x.created_at)::text || ', ' || substr(x.payload::text, 2)
                    ELSE x.payload::text END AS payload,
               x.idempotency_key, x.attempts, p.status AS intent_status
        FROM outbox x LEFT JOIN payment_intents p ON p.id = x.payment_intent_id
        WHERE x.state = 'pending' AND x.kind = $1 AND x.due_at <= now()
          AND ($3::text[] IS NULL OR x.name = ANY($3::text[]))
          AND (x.kind <> 'order_event' OR NOT EXISTS (
                SELECT 1 FROM outbox e
                WHERE e.state = 'pending' AND e.kind = 'order_event'
                  AND e.payment_intent_id = x.payment_intent_id AND e.id < x.id))
        ORDER BY x.id
        LIMIT $2
        FOR UPDATE OF x SKIP LOCKED
        """,
        str(kind),
        limit,
        None if names is None else list(names),
    )
    return [
        Claimed(
            r["id"],
            Kind(r["kind"]),
            r["name"],
            r["payment_intent_id"],
            r["payload"],
            r["idempotency_key"],
            r["attempts"],
            r["intent_status"],
        )
        for r in rows
    ]


class Mark(NamedTuple):
    """How one claimed row ended this attempt."""

    id: int
    outcome: str  # succeeded, already_done, published, rejected, or retry
    error_code: str | None = None
    error: str | None = None
    retry_in_s: float | None = None  # set for a retry


async def record(conn: Connection, marks: Sequence[Mark]) -> None:
    """Mark claimed rows done, failed for good, or due again later (in the claiming transaction)."""
    finished = [m for m in marks if m.retry_in_s is None]
    retries = [m for m in marks if m.retry_in_s is not None]
    if finished:
        await conn.execute(
            """
            UPDATE outbox x
            SET state = CASE WHEN v.outcome = 'rejected' THEN 'failed' ELSE 'done' END,
                outcome = v.outcome, error_code = v.code, last_error = v.error,
                attempts = x.attempts + 1, done_at = clock_timestamp()
            FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[])
                AS v(id, outcome, code, error)
            WHERE x.id = v.id
            """,
            *unnest_columns([(m.id, m.outcome, m.error_code, m.error) for m in finished], 4),
        )
    if retries:
        await conn.execute(
            """
            UPDATE outbox x
            SET attempts = x.attempts + 1, error_code = v.code, last_error = v.error,
                due_at = clock_timestamp() + make_interval(secs => v.delay)
            FROM unnest($1::bigint[], $2::text[], $3::text[], $4::float8[])
                AS v(id, code, error, delay)
            WHERE x.id = v.id
            """,
            *unnest_columns([(m.id, m.error_code, m.error, m.retry_in_s) for m in retries], 4),
        )


class Backlog(NamedTuple):
    """What is left to do, for `--exit-when-idle`, the stats and `order-consumer outbox`."""

    pending: dict[str, int]  # by kind, every kind (0 when none)
    actions: dict[str, int]  # pending Stripe actions by name
    oldest_pending_s: float | None  # age of the oldest pending row; None when none


async def backlog(conn: Connection) -> Backlog:
    rows = await conn.fetch(
        """
        SELECT kind, name, count(*) AS n,
               extract(epoch FROM clock_timestamp() - min(created_at))::float8 AS oldest_s
        FROM outbox WHERE state = 'pending' GROUP BY kind, name
        """
    )
    pending = dict.fromkeys(map(str, Kind), 0)
    for r in rows:
        pending[r["kind"]] += r["n"]
    return Backlog(
        pending=pending,
        actions={r["name"]: r["n"] for r in rows if r["kind"] == Kind.STRIPE_ACTION},
        oldest_pending_s=max((r["oldest_s"] for r in rows), default=None),
    )


async def pending_actions(conn: Connection) -> dict[str, int]:
    """Pending Stripe actions by name: what an idle relay looks at on every poll, so it
    reads the actions alone (through the pending rows' index), not every order event."""
    rows = await conn.fetch(
        "SELECT name, count(*) AS n FROM outbox"
        " WHERE state = 'pending' AND kind = 'stripe_action' GROUP BY name"
    )
    return {r["name"]: r["n"] for r in rows}


async def finished_by_outcome(conn: Connection) -> dict[str, dict[str, int]]:
    """Finished rows by kind and outcome (for `outbox status`)."""
    rows = await conn.fetch(
        "SELECT kind, outcome, count(*) AS n FROM outbox WHERE state <> 'pending'"
        " GROUP BY kind, outcome ORDER BY kind, outcome"
    )
    result: dict[str, dict[str, int]] = {}
    for r in rows:
        result.setdefault(r["kind"], {})[r["outcome"]] = r["n"]
    return result

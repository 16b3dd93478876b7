"""The relay's side of the outbox: claim due rows, record how each attempt ended, and what is left.

The relay (consumer/relay.py) claims due rows (`claim`, `FOR UPDATE SKIP
LOCKED`), performs them and marks them (`record`) in the claiming
transaction, so a relay that dies leaves its rows pending for the next one,
with the key generation and `verify_first` of its last recorded attempt: a
call cut short is made again with the same key. A Stripe action's key is the
row's `idempotency_key` at generation 0 and `<key>:<generation>` after
(`generation_key`). `backlog`, `pending_actions` and `finished_by_outcome`
say what is left and what was done (the relay's reports, `order-consumer
outbox`). The rows are written by the consumer's side (consumer/outbox.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from intentflow.consumer.connections import Connection
from intentflow.consumer.outbox import Kind


def generation_key(idempotency_key: str, generation: int) -> str:
    """The key a Stripe action's attempt calls with: a new generation only after an answer
    Stripe may have saved under the last one (consumer/stripe_actions.py)."""
    return idempotency_key if generation == 0 else f"{idempotency_key}:{generation}"


class Claimed(NamedTuple):
    id: int
    kind: Kind
    name: str
    payment_intent_id: str
    payload: str  # JSON text; an order event's carries its `outbox_id`
    idempotency_key: str | None
    attempts: int
    # For Stripe actions, what the webhooks recorded: the intent's status, and what
    # its order's payment captured and what is refunded (0 captured: not known).
    intent_status: str | None
    order_id: int = 0
    account: str | None = None  # the intent's Connect account; None: the platform's own
    key_generation: int = 0
    verify_first: bool = False
    amount_captured: int = 0
    amount_refunded: int = 0
    # The order names a cart: the shop's. An action on one that names none (written by
    # a version before 4, when every payment became an order) is never performed.
    shops: bool = True
    # What holds a capture back: Radar's review open, or the issuer's fraud warning.
    review_open: bool = False
    fraud_warned: bool = False


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
               x.idempotency_key, x.attempts, p.status AS intent_status, x.order_id,
               coalesce(p.account, o.account) AS account, x.key_generation, x.verify_first,
               coalesce(o.amount_captured, 0) AS amount_captured,
               coalesce(o.amount_refunded, 0) AS amount_refunded,
               o.cart_id IS NOT NULL AS shops, coalesce(o.review_open, false) AS review_open,
               o.fraud_warning_id IS NOT NULL AS fraud_warned
        FROM outbox x
        LEFT JOIN payment_intents p ON p.id = x.payment_intent_id
        LEFT JOIN orders o ON o.id = x.order_id
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
            r["order_id"],
            r["account"],
            r["key_generation"],
            r["verify_first"],
            r["amount_captured"],
            r["amount_refunded"],
            # An order event's row has no order joined to it: nothing to hold back.
            r["shops"] is not False,
            bool(r["review_open"]),
            bool(r["fraud_warned"]),
        )
        for r in rows
    ]


class Mark(NamedTuple):
    """How one claimed row ended this attempt."""

    id: int
    # succeeded, already_done, not_needed, superseded, published (done); rejected,
    # owed (failed); or retry
    outcome: str
    error_code: str | None = None
    error: str | None = None
    retry_in_s: float | None = None  # set for a retry
    generation: int | None = None  # the key generation called with; None: no call, kept
    verify_first: bool = False  # read Stripe before acting again (the outcome is unknown)


# Finished outcomes that leave the row `failed`, for `order-consumer outbox --failed`.
FAILED_OUTCOMES = ("rejected", "owed")

# The `Mark` fields each update writes, with their SQL types: the arrays and the
# names they take in the statement are built from the one list.
_FINISHED = (
    ("id", "bigint"),
    ("outcome", "text"),
    ("error_code", "text"),
    ("error", "text"),
    ("generation", "int"),
)
_RETRIES = (
    ("id", "bigint"),
    ("error_code", "text"),
    ("error", "text"),
    ("retry_in_s", "float8"),
    ("generation", "int"),
    ("verify_first", "bool"),
)


def _unnest(columns: Sequence[tuple[str, str]], first: int = 1) -> str:
    arrays = ", ".join(f"${n}::{sql}[]" for n, (_, sql) in enumerate(columns, first))
    return f"unnest({arrays}) AS v({', '.join(name for name, _ in columns)})"


def _arrays(marks: Sequence[Mark], columns: Sequence[tuple[str, str]]) -> list[list[Any]]:
    return [[getattr(m, name) for m in marks] for name, _ in columns]


async def record(conn: Connection, marks: Sequence[Mark]) -> None:
    """Mark claimed rows done, failed for good, or due again later (in the claiming transaction).

    The key generation called with and `verify_first` are written with the rest: a
    relay that dies before this leaves the row as the last recorded attempt left it.
    """
    finished = [m for m in marks if m.retry_in_s is None]
    retries = [m for m in marks if m.retry_in_s is not None]
    if finished:
        await conn.execute(
            f"""
            UPDATE outbox x
            SET state = CASE WHEN v.outcome = ANY($1::text[]) THEN 'failed' ELSE 'done' END,
                outcome = v.outcome, error_code = v.error_code, last_error = v.error,
                key_generation = coalesce(v.generation, x.key_generation), verify_first = false,
                attempts = x.attempts + 1, done_at = clock_timestamp()
            FROM {_unnest(_FINISHED, first=2)}
            WHERE x.id = v.id
            """,
            list(FAILED_OUTCOMES),
            *_arrays(finished, _FINISHED),
        )
    if retries:
        await conn.execute(
            f"""
            UPDATE outbox x
            SET attempts = x.attempts + 1, error_code = v.error_code, last_error = v.error,
                key_generation = coalesce(v.generation, x.key_generation),
                verify_first = v.verify_first,
                due_at = clock_timestamp() + make_interval(secs => v.retry_in_s)
            FROM {_unnest(_RETRIES)}
            WHERE x.id = v.id
            """,
            *_arrays(retries, _RETRIES),
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

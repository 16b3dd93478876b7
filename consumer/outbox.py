"""The outbox: what must happen outside PostgreSQL because an order changed, kept with the change.

Written inside the batch's transaction (consumer/store.py), so an order change
and what it causes commit together or not at all (`enqueue`):
  - an order event for every new order and every order whose snapshot changed
    (schemas/orders.py), built here in SQL from the rows the batch just wrote;
  - Stripe actions decided by `stripe_actions_for`: cancel the authorization of
    an `out_of_stock` order, and capture a `placed` one under
    `CAPTURE_POLICY=on_placed`, only while the intent is `requires_capture`.
    A unique index keeps one row per intent and action.
The relay (consumer/relay.py) claims due rows (`claim`, `FOR UPDATE SKIP
LOCKED`), performs them and marks them (`mark_done`, `mark_failed`,
`mark_retry`) in the claiming transaction, so a relay that dies leaves its rows
pending for the next one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

import orjson

from intentflow.consumer.connections import Connection, unnest_columns
from intentflow.consumer.decisions import OrderStatus
from intentflow.schemas import ORDER_EVENT_SCHEMA_VERSION


class Kind(StrEnum):
    STRIPE_ACTION = "stripe_action"
    ORDER_EVENT = "order_event"


class Action(StrEnum):
    CANCEL = "cancel_payment_intent"
    CAPTURE = "capture_payment_intent"


class CapturePolicy(StrEnum):
    NEVER = "never"  # the shop captures (at shipping, from its dashboard)
    ON_PLACED = "on_placed"  # capture as soon as the stock is taken


# Stripe's `cancellation_reason` for an order we cannot fill. Stripe accepts
# duplicate, fraudulent, requested_by_customer or abandoned; none of them says
# "out of stock", and `abandoned` is the one that blames nobody. Our own reason
# is on the order (`status_reason`) and in its events.
CANCELLATION_REASON = "abandoned"

# The intent's status in which its money is held and can be released or taken.
HELD = "requires_capture"


@dataclass(frozen=True, slots=True)
class OutboxPolicy:
    """What the batch writes besides order events (consumer settings, same on every member)."""

    capture: CapturePolicy = CapturePolicy.NEVER


DEFAULT_POLICY = OutboxPolicy()


class OrderChange(NamedTuple):
    """An order the batch created (`previous` None) or whose snapshot it changed."""

    order_id: int
    payment_intent_id: str
    previous: OrderStatus | None
    status: OrderStatus
    intent_status: str | None  # the intent's Stripe status after the batch
    amount: int
    # A new order's snapshot as its writer built it, without the two timestamps
    # (the transaction's); None: read back from the rows (`_enqueue_read_back`).
    snapshot: dict[str, Any] | None = None

    @property
    def event_type(self) -> str:
        if self.previous is self.status:
            return "order.updated"
        return f"order.{self.status}"


class ActionRow(NamedTuple):
    action: Action
    payment_intent_id: str
    order_id: int
    params: dict[str, Any]

    @property
    def idempotency_key(self) -> str:
        return idempotency_key(self.action, self.payment_intent_id)


def idempotency_key(action: Action | str, payment_intent_id: str) -> str:
    """The same key for every attempt at one action on one intent, by any relay."""
    return f"intentflow:{action}:{payment_intent_id}"


def stripe_actions_for(change: OrderChange, policy: OutboxPolicy) -> ActionRow | None:
    """The Stripe action a new order calls for, if any (pure: tested on its own)."""
    if change.previous is not None or change.intent_status != HELD:
        return None
    params: dict[str, Any]
    if change.status is OrderStatus.OUT_OF_STOCK:
        params = {"cancellation_reason": CANCELLATION_REASON}
        return ActionRow(Action.CANCEL, change.payment_intent_id, change.order_id, params)
    if change.status is OrderStatus.PLACED and policy.capture is CapturePolicy.ON_PLACED:
        params = {"amount_to_capture": change.amount}
        return ActionRow(Action.CAPTURE, change.payment_intent_id, change.order_id, params)
    return None


async def enqueue(conn: Connection, changes: Sequence[OrderChange], policy: OutboxPolicy) -> None:
    """Write the outbox rows the batch's order changes cause (in the batch's transaction)."""
    if not changes:
        return
    ordered = sorted(changes, key=lambda c: c.payment_intent_id)
    built = [c for c in ordered if c.snapshot is not None]
    if built:
        await _enqueue_built(conn, built)
    read_back = [c for c in ordered if c.snapshot is None]
    if read_back:
        await _enqueue_read_back(conn, read_back)
    actions = [row for c in ordered if (row := stripe_actions_for(c, policy)) is not None]
    if actions:
        await insert_actions(conn, actions)


async def _enqueue_built(conn: Connection, changes: Sequence[OrderChange]) -> None:
    """One order event per new order, from the snapshot its writer built.

    A new order's snapshot is all in memory (the plan, the cart, the facts):
    serialised here with orjson it costs a fraction of reading it back in SQL.
    `_enqueue_read_back` builds the same document: a test holds them equal.
    """
    payloads = []
    for c in changes:
        assert c.snapshot is not None
        event = {
            "schema_version": ORDER_EVENT_SCHEMA_VERSION,
            "type": c.event_type,
            "previous_status": None,
            "order": c.snapshot,
        }
        payloads.append(orjson.dumps(event).decode())
    await conn.execute(
        """
        INSERT INTO outbox (kind, name, payment_intent_id, order_id, payload)
        SELECT 'order_event', * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::json[])
        """,
        [c.event_type for c in changes],
        [c.payment_intent_id for c in changes],
        [c.order_id for c in changes],
        payloads,
    )


async def _enqueue_read_back(conn: Connection, changes: Sequence[OrderChange]) -> None:
    """One order event per change, its snapshot read from the rows as this transaction left them."""
    await conn.execute(
        f"""
        INSERT INTO outbox (kind, name, payment_intent_id, order_id, payload)
        SELECT 'order_event', v.type, o.payment_intent_id, o.id,
            json_build_object(
                'schema_version', {ORDER_EVENT_SCHEMA_VERSION},
                'type', v.type,
                'previous_status', v.previous,
                'order', json_build_object(
                    'id', o.id, 'payment_intent_id', o.payment_intent_id, 'cart_id', o.cart_id,
                    'status', o.status, 'allocation', o.allocation,
                    'status_reason', o.status_reason, 'amount', o.amount,
                    'amount_authorized', o.amount_authorized,
                    'amount_refunded', o.amount_refunded, 'currency', o.currency,
                    'payment_status', p.status,
                    'cancellation_reason', o.cancellation_reason,
                    'dispute', CASE WHEN o.dispute_status IS NULL THEN NULL ELSE
                        json_build_object('status', o.dispute_status,
                                          'amount', o.dispute_amount,
                                          'reason', o.dispute_reason) END,
                    'items', (SELECT coalesce(json_agg(json_build_object(
                                    'sku', i.sku, 'quantity', i.quantity,
                                    'unit_amount', i.unit_amount) ORDER BY i.id), '[]')
                              FROM order_items i WHERE i.order_id = o.id)))
        FROM unnest($1::bigint[], $2::text[], $3::text[]) WITH ORDINALITY
            AS v(order_id, type, previous, n)
        JOIN orders o ON o.id = v.order_id
        JOIN payment_intents p ON p.id = o.payment_intent_id
        ORDER BY v.n
        """,
        [c.order_id for c in changes],
        [c.event_type for c in changes],
        [c.previous and str(c.previous) for c in changes],
    )


async def insert_actions(conn: Connection, rows: Sequence[ActionRow]) -> int:
    """Add Stripe actions; one already there for the same intent and action is kept as it is."""
    result = await conn.execute(
        """
        INSERT INTO outbox (kind, name, payment_intent_id, order_id, payload, idempotency_key)
        SELECT 'stripe_action', * FROM unnest($1::text[], $2::text[], $3::bigint[],
                                              $4::json[], $5::text[])
        ON CONFLICT (payment_intent_id, name) WHERE kind = 'stripe_action' DO NOTHING
        """,
        [str(r.action) for r in rows],
        [r.payment_intent_id for r in rows],
        [r.order_id for r in rows],
        [json.dumps(r.params) for r in rows],
        [r.idempotency_key for r in rows],
    )
    return int(result.rsplit(" ", 1)[1])


async def sweep_needs_review(conn: Connection, older_than_s: float) -> int:
    """Release the money of `needs_review` orders nobody resolved in time; return how many."""
    rows = await conn.fetch(
        """
        SELECT o.id, o.payment_intent_id FROM orders o
        JOIN payment_intents p ON p.id = o.payment_intent_id
        WHERE o.status = 'needs_review' AND o.created_at < now() - make_interval(secs => $1)
          AND p.status = $2
          AND NOT EXISTS (SELECT 1 FROM outbox x WHERE x.kind = 'stripe_action'
                          AND x.payment_intent_id = o.payment_intent_id AND x.name = $3)
        ORDER BY o.payment_intent_id
        """,
        older_than_s,
        HELD,
        str(Action.CANCEL),
    )
    if not rows:
        return 0
    params = {"cancellation_reason": CANCELLATION_REASON}
    return await insert_actions(
        conn, [ActionRow(Action.CANCEL, r["payment_intent_id"], r["id"], params) for r in rows]
    )


# --- The relay's side ---------------------------------------------------------------


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

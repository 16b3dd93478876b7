"""The intents' rows: reading and locking them into `Facts`, and writing the facts back.

Part of the batch's unit of work (consumer/store.py, steps 2 and 3): every
column of `payment_intents` is named once, in `_STATUS` and `_INTENT`, and the
facts map to them by name (`_row`, `_facts`), so a new fact cannot land in its
neighbour's column. The Checkout Session, Radar's review and the early fraud
warning are kept whole, as JSON written as read (`json`); the rest are columns.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, TypeVar

import asyncpg

from intentflow.consumer.connections import Columns, Connection
from intentflow.consumer.decisions import Allocation, OrderStatus
from intentflow.consumer.facts import (
    Authorization,
    ChargeSnapshot,
    Checkout,
    Dispute,
    Facts,
    FraudWarning,
    Key,
    Named,
    RefundSnapshot,
    Review,
)
from intentflow.consumer.fold import NOTHING_KNOWN, IntentFold, IntentState, OrderView


class ConcurrentIntentWrite(Exception):
    """Another transaction created one of the batch's intents first (a consumer that
    lost its partitions in a rebalance and is finishing a batch). The batch is
    rolled back and retried; it then finds the rows and waits for their locks."""

    retriable = True  # consumer.errors: the environment's, not the event's
    cause = "conflict"


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
    ("charge_created", "bigint"),
    ("charge_step", "smallint"),
    ("charge_event_id", "text"),
    ("dispute_id", "text"),
    ("dispute_status", "text"),
    ("dispute_amount", "bigint"),
    ("dispute_reason", "text"),
    ("dispute_created", "bigint"),
    ("dispute_refundable", "bool"),
    ("account", "text"),
    ("amount_received", "bigint"),
    ("capture_before", "bigint"),
    ("released", "bigint"),
    ("auth_created", "bigint"),
    ("auth_step", "smallint"),
    ("auth_event_id", "text"),
    ("auth_amount", "bigint"),
    ("auth_currency", "text"),
    ("auth_held", "bigint"),
    ("auth_captured", "bool"),
    ("paid_at", "bigint"),
    ("named_cart_id", "text"),
    ("named_created", "bigint"),
    ("named_step", "smallint"),
    ("named_event_id", "text"),
    ("named_held", "bool"),
    ("checkout", "json"),
    ("review", "json"),
    ("fraud_warning", "json"),
)


async def lock_intents(conn: Connection, intent_ids: list[str]) -> dict[str, IntentState]:
    """Lock the intents that have a row and read every intent's facts and order.

    Intents with no row yet are inserted by `write_intents`; a concurrent insert
    of the same intent is detected there and the batch retried.
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
        "SELECT id, payment_intent_id, amount, status, status_created, opened FROM refunds"
        " WHERE payment_intent_id = ANY($1::text[])",
        intent_ids,
    ):
        # `opened` NULL: a refund recorded before version 6 (or by a version-5 consumer
        # during the upgrade), made when it was first seen.
        opened = r["status_created"] if r["opened"] is None else r["opened"]
        snapshot = RefundSnapshot(r["amount"], r["status"], r["status_created"], opened)
        refunds[r["payment_intent_id"]][r["id"]] = snapshot
    states = {
        pid: IntentState(pid, NOTHING_KNOWN, orders.get(pid), exists=False) for pid in intent_ids
    }
    for r in rows:
        pid = r["id"]
        states[pid] = IntentState(pid, _facts(r, refunds.get(pid, {})), orders.get(pid))
    return states


def _key(row: asyncpg.Record, prefix: str) -> Key | None:
    created = row[f"{prefix}_created"]
    if created is None:
        return None
    return (created, row[f"{prefix}_step"], row[f"{prefix}_event_id"])


def _facts(row: asyncpg.Record, refunds: dict[str, RefundSnapshot]) -> Facts:
    dispute = None
    if row["dispute_id"] is not None:
        dispute = Dispute(
            row["dispute_id"],
            row["dispute_status"],
            row["dispute_amount"],
            row["dispute_reason"],
            row["dispute_created"],
            row["dispute_refundable"],
        )
    charge_key, auth_key, named_key = (_key(row, p) for p in ("charge", "auth", "named"))
    if charge_key is None and (row["charge_amount_refunded"] or row["charge_refunded"]):
        # What a charge said before version 6 (or through a version-5 consumer during
        # the upgrade), without its key: its latest word, at the lowest key.
        charge_key = (0, 0, "")
    charge = None
    if charge_key is not None:
        charge = ChargeSnapshot(charge_key, row["charge_amount_refunded"], row["charge_refunded"])
    auth = None
    if auth_key is not None:
        auth = Authorization(
            auth_key,
            row["auth_amount"],
            row["auth_currency"],
            row["auth_held"],
            row["auth_captured"],
        )
    named = None
    if named_key is not None:
        named = Named(named_key, row["named_cart_id"], row["named_held"])
    return Facts(
        status=row["status"],
        status_created=row["status_created"],
        status_step=row["status_step"],
        status_event_id=row["last_event_id"],
        cancellation_reason=row["cancellation_reason"],
        charge=charge,
        refunds=refunds,
        dispute=dispute,
        account=row["account"],
        amount_received=row["amount_received"],
        capture_before=row["capture_before"],
        released=row["released"],
        authorization=auth,
        paid_at=row["paid_at"],
        named=named,
        checkout=_load(Checkout, row["checkout"]),
        review=_load(Review, row["review"]),
        fraud_warning=_load(FraudWarning, row["fraud_warning"]),
    )


Snapshot = TypeVar("Snapshot", Checkout, Review, FraudWarning)


def _load(kind: type[Snapshot], stored: str | None) -> Snapshot | None:
    """A snapshot kept whole: its fields as a JSON list, the key (a list) first."""
    if stored is None:
        return None
    key, *fields = json.loads(stored)
    return kind(tuple(key), *fields)


def _dump(snapshot: Checkout | Review | FraudWarning | None) -> str | None:
    return None if snapshot is None else json.dumps(list(snapshot))


def _unkeyed(key: Key | None) -> tuple[int | None, int | None, str | None]:
    return (None, None, None) if key is None else key


def _row(fold: IntentFold) -> dict[str, Any]:
    """One intent's row, keyed by `_INTENT`'s columns."""
    f = fold.state.facts
    d, charge, auth, named = f.dispute, f.charge, f.authorization, f.named
    charge_created, charge_step, charge_event = _unkeyed(charge and charge.key)
    auth_created, auth_step, auth_event = _unkeyed(auth and auth.key)
    named_created, named_step, named_event = _unkeyed(named and named.key)
    return {
        "id": fold.state.payment_intent_id,
        "status": f.status,
        "status_created": f.status_created,
        "status_step": f.status_step,
        "last_event_id": f.status_event_id,
        "cancellation_reason": f.cancellation_reason,
        "charge_amount_refunded": charge.refunded if charge else 0,
        "charge_refunded": charge.in_full if charge else False,
        "charge_created": charge_created,
        "charge_step": charge_step,
        "charge_event_id": charge_event,
        "dispute_id": d and d.id,
        "dispute_status": d and d.status,
        "dispute_amount": d and d.amount,
        "dispute_reason": d and d.reason,
        "dispute_created": d and d.created,
        "dispute_refundable": d and d.refundable,
        "account": f.account,
        "amount_received": f.amount_received,
        "capture_before": f.capture_before,
        "released": f.released,
        "auth_created": auth_created,
        "auth_step": auth_step,
        "auth_event_id": auth_event,
        "auth_amount": auth and auth.amount,
        "auth_currency": auth and auth.currency,
        "auth_held": auth and auth.held,
        "auth_captured": auth and auth.captured,
        "paid_at": f.paid_at,
        "named_cart_id": named and named.cart_id,
        "named_created": named_created,
        "named_step": named_step,
        "named_event_id": named_event,
        "named_held": named and named.held,
        "checkout": _dump(f.checkout),
        "review": _dump(f.review),
        "fraud_warning": _dump(f.fraud_warning),
    }


async def write_intents(conn: Connection, folds: list[IntentFold]) -> None:
    """Store each changed intent's facts; fail retriably if another writer raced us."""
    changed = sorted((f for f in folds if f.changed), key=lambda f: f.state.payment_intent_id)
    known = [_row(f) for f in changed if f.state.exists]
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
    status_only = [_row(f) for f in new if _status_only(f.state.facts)]
    everything = [_row(f) for f in new if not _status_only(f.state.facts)]
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
    """Whether the facts hold nothing `_STATUS` leaves out."""
    return facts == Facts(
        facts.status,
        facts.status_created,
        facts.status_step,
        facts.status_event_id,
        facts.cancellation_reason,
    )


async def write_refunds(
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
        INSERT INTO refunds (id, payment_intent_id, amount, status, status_created, opened)
        SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[],
                             $6::bigint[])
        ON CONFLICT (id) DO UPDATE SET amount = excluded.amount, status = excluded.status,
            status_created = excluded.status_created, opened = excluded.opened,
            updated_at = now()
        """,
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2].amount for r in rows],
        [r[2].status for r in rows],
        [r[2].created for r in rows],
        [r[2].opened for r in rows],
    )

"""Helpers for tests that drive the unit of work (`consumer.store`) on connections of their own."""

from __future__ import annotations

from types import SimpleNamespace

import asyncpg

from intentflow.consumer.decode import Envelope
from intentflow.schemas import StripeEvent


def envelope(payload: dict[str, object], offset: int = 0) -> Envelope:
    """A decoded event as the worker hands it to `apply_batch`."""
    record = SimpleNamespace(
        topic="t", partition=0, offset=offset, key=None, value=None, headers=[]
    )
    event = StripeEvent.model_validate(payload)
    return Envelope(event, record, event.payment_intent_id)


async def waiting_for_a_lock(observer: asyncpg.Connection, *conns: asyncpg.Connection) -> bool:
    """Whether every one of `conns` is blocked by another session's lock right now."""
    pids = [conn.get_server_pid() for conn in conns]
    blocked = await observer.fetchval(
        "SELECT count(*) FROM unnest($1::int[]) AS p(pid) "
        "WHERE cardinality(pg_blocking_pids(pid)) > 0",
        pids,
    )
    return int(blocked) == len(pids)


async def deadlocks(observer: asyncpg.Connection, *sessions: asyncpg.Connection) -> int:
    """How many deadlocks PostgreSQL has detected in this database so far.

    The backend that detects a deadlock counts it in its own memory and
    publishes it when idle, at most once a second (PostgreSQL 15+). Asking each
    of `sessions` to flush makes it publish before its statement returns, so the
    count read afterwards includes every deadlock they took part in.
    """
    for session in sessions:
        await session.execute("SELECT pg_stat_force_next_flush()")
    await observer.execute("SELECT pg_stat_clear_snapshot()")
    count = await observer.fetchval(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    )
    return int(count)

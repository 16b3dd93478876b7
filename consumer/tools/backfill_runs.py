"""A backfill's cursor in PostgreSQL: the run (its window and scope) and, per account,
how far through the window it has gone (migration 0007).

`open_run` starts a run, or goes on with one left unfinished: `--resume` takes the
newest unfinished run, and the same window and scope given again take that run. A
slice counts as done only once its events are acknowledged by the broker
(`Progress.advance`, one short transaction each), so a run cut anywhere reads again
at most the slice it was in: the copies it publishes again are the inbox's to absorb.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from intentflow.consumer.connections import Connection


class NothingToResume(Exception):
    """`--resume` with no unfinished run."""


@dataclass(frozen=True)
class Run:
    id: int
    since: datetime
    until: datetime
    scope: str  # `platform`, an account id, or `all`
    resumed: bool


@dataclass
class Progress:
    run_id: int
    account: str  # "" for the platform
    done_until: datetime

    async def advance(self, conn: Connection, done_until: datetime, done: dict[str, int]) -> None:
        async with conn.transaction():
            await conn.execute(
                """
                UPDATE backfill_progress
                SET done_until = $3, read = read + $4, published = published + $5,
                    known = known + $6, skipped = skipped + $7, updated_at = now()
                WHERE run_id = $1 AND account = $2
                """,
                self.run_id,
                self.account,
                done_until,
                done["read"],
                done["published"],
                done["already_known"],
                done["not_published"],
            )
        self.done_until = done_until


async def open_run(
    conn: Connection,
    since: datetime | None,
    until: datetime | None,
    scope: str,
    *,
    resume: bool,
) -> Run:
    """The run to work on: the newest unfinished one (`resume`), one unfinished with the
    same window and scope, or a new one."""
    if resume:
        row = await conn.fetchrow(
            "SELECT * FROM backfill_runs WHERE finished_at IS NULL ORDER BY id DESC LIMIT 1"
        )
        if row is None:
            raise NothingToResume("no backfill was left unfinished: start one with --since")
    else:
        row = await conn.fetchrow(
            """
            SELECT * FROM backfill_runs
            WHERE finished_at IS NULL AND since = $1 AND until = $2 AND scope = $3
            ORDER BY id DESC LIMIT 1
            """,
            since,
            until,
            scope,
        )
    if row is not None:
        return Run(row["id"], row["since"], row["until"], row["scope"], resumed=True)
    async with conn.transaction():
        run_id = await conn.fetchval(
            "INSERT INTO backfill_runs (since, until, scope) VALUES ($1, $2, $3) RETURNING id",
            since,
            until,
            scope,
        )
    assert since is not None and until is not None
    return Run(run_id, since, until, scope, resumed=False)


async def progress_of(conn: Connection, run: Run, account: str) -> Progress:
    """The account's progress through `run`, from its start if it has none yet."""
    async with conn.transaction():
        await conn.execute(
            """
            INSERT INTO backfill_progress (run_id, account, done_until) VALUES ($1, $2, $3)
            ON CONFLICT (run_id, account) DO NOTHING
            """,
            run.id,
            account,
            run.since,
        )
    done_until = await conn.fetchval(
        "SELECT done_until FROM backfill_progress WHERE run_id = $1 AND account = $2",
        run.id,
        account,
    )
    return Progress(run.id, account, done_until)


async def finish(conn: Connection, run: Run) -> dict[str, dict[str, int]]:
    """Mark `run` finished; what it did over all its sessions, per account."""
    async with conn.transaction():
        await conn.execute("UPDATE backfill_runs SET finished_at = now() WHERE id = $1", run.id)
    rows = await conn.fetch(
        "SELECT * FROM backfill_progress WHERE run_id = $1 ORDER BY account", run.id
    )
    return {
        row["account"] or "platform": {
            "read": row["read"],
            "published": row["published"],
            "already_known": row["known"],
            "not_published": row["skipped"],
        }
        for row in rows
    }

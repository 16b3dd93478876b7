"""Versioned SQL migrations, applied in order, once, on a live database.

A migration is a file `NNNN_name.sql` made of steps (`Step`), each a unit of its own:
  - `transaction` (the default, and the whole of a file without step lines): its
    statements in one transaction;
  - `outside a transaction`: one statement PostgreSQL refuses inside one, such as
    CREATE INDEX CONCURRENTLY (an index build cut short leaves an invalid index
    behind, which is dropped before the step runs again);
  - `in batches`: one statement run again and again, each time in its own short
    transaction, given as $1 what it returned the time before (NULL the first time),
    until it returns NULL: a backfill that never holds many rows' locks for long.
A line `-- step: <kind>` starts a step. Every step waits at most
MIGRATE_LOCK_TIMEOUT_MS for a lock (`lock_timeout`: while a step waits for a
table's lock, every writer of that table queues behind it) and is tried again
after a back-off, up to MIGRATE_LOCK_ATTEMPTS times (`MigrationLocked` after
that). So that a step is quick under its lock, long work goes outside it:
constraints are added NOT VALID and validated by a later step (VALIDATE blocks no
writer), indexes are built CONCURRENTLY, rows are updated in batches. A migration
is recorded when its last step has run (in that step's transaction, when it has
one): a run cut short runs its steps again, so every step must be safe to repeat.
The migrations already applied on real databases (0001-0003) are single
transactions, kept as they were.

`migrate` holds a session advisory lock for its whole run, so running it twice,
or from two processes at once, is safe: the second waits, then finds nothing
left to do. That lock and the steps outside a transaction need every statement
on one server session: `require_session` refuses a pooler's.

The consumer refuses to work on a schema older than the newest migration it
ships (`check_schema`): at start-up, and on every connection it opens later
(a failover, a restore, a DATABASE_URL pointed elsewhere). A newer schema is
accepted, so that a rolling update can migrate before replacing old consumers.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import structlog

from intentflow.consumer.backoff import delay_s
from intentflow.consumer.errors import describe

if TYPE_CHECKING:
    from intentflow.consumer.settings import ConsumerSettings

log = structlog.get_logger("consumer")
T = TypeVar("T")

# Any constant works; it only has to be the same for every migrating process.
_LOCK_KEY = 0x1F7E_4F10_0000_0001
# How often a `migrate` waiting for another one asks for the lock again.
LOCK_POLL_S = 0.2
# A step that takes this long is logged at INFO (progress an operator waits for).
SLOW_STEP_S = 1.0
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_STEP = re.compile(r"^-- step: (.*?)\s*$", re.MULTILINE)
_CONCURRENT_INDEX = re.compile(
    r"\bCREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", re.IGNORECASE
)


class SchemaBehind(Exception):
    """The database's schema is older than this code needs: run `order-consumer migrate`."""

    retriable = True  # the migration may be running right now (consumer.errors)
    cause = "schema_mismatch"

    def __init__(self, found: int, needed: int) -> None:
        super().__init__(
            f"the database schema is at version {found} and this code needs {needed}: "
            "run `order-consumer migrate`"
        )
        self.found = found
        self.needed = needed


class SessionRequired(Exception):
    """`migrate` reached PostgreSQL through a pooler; the message is the operator's one line."""

    retriable = False


# Raised inside the server when the session answering is not the one logged in to.
_ANOTHER_BACKEND = "IF001"


async def require_session(conn: asyncpg.Connection, where: str, variable: str) -> None:
    """Refuse a connection that is not a server session of its own, as a pooler's is.

    The migration's advisory lock spans transactions, and CREATE INDEX CONCURRENTLY
    runs outside one: both need every statement on the one server process. The server
    process that answered the login (its BackendKeyData) is PostgreSQL's own when the
    connection is direct; a pooler answers the login itself, with a process id of its
    own making. Asked with a simple query, which a pooler cannot mix up with another
    client's prepared statements.
    """
    try:
        await conn.execute(
            f"DO $$ BEGIN IF pg_backend_pid() <> {int(conn.get_server_pid())} THEN "
            f"RAISE EXCEPTION 'another server process' USING ERRCODE = '{_ANOTHER_BACKEND}'; "
            "END IF; END $$"
        )
    except asyncpg.PostgresError as exc:
        if getattr(exc, "sqlstate", None) != _ANOTHER_BACKEND:
            raise
        raise SessionRequired(
            f"`migrate` needs a session of its own on PostgreSQL, and {where} answers through "
            f"a pooler: set {variable} to the server itself (MIGRATE_DATABASE_URL, for "
            "`migrate` alone, leaves DATABASE_URL on the pooler)"
        ) from exc


class MigrationLocked(Exception):
    """A step could not take its locks in MIGRATE_LOCK_ATTEMPTS tries; the message is the
    operator's one line."""

    retriable = False


class StepKind(StrEnum):
    TRANSACTION = "transaction"
    OUTSIDE_A_TRANSACTION = "outside a transaction"
    IN_BATCHES = "in batches"


@dataclass(frozen=True)
class Step:
    kind: StepKind
    sql: str
    line: int  # where it starts in its file, for the operator


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def steps(self) -> list[Step]:
        """Its steps: each `-- step: KIND` line starts one; what comes before the first
        is a transaction step (the whole file, when there is no such line)."""
        found: list[Step] = []
        kind, start = StepKind.TRANSACTION, 0
        for match in [*_STEP.finditer(self.sql), None]:
            end = match.start() if match else len(self.sql)
            body = self.sql[start:end]
            if _has_statements(body):
                line = self.sql.count("\n", 0, start) + 1
                found.append(Step(kind, body, line))
            if match is not None:
                try:
                    kind = StepKind(match[1])
                except ValueError:
                    raise ValueError(
                        f"{self.version:04d}_{self.name}.sql: unknown step kind {match[1]!r} "
                        f"(one of: {', '.join(map(str, StepKind))})"
                    ) from None
                start = match.end()
        for step in found:
            code = "\n".join(_statements(step.sql)).strip().rstrip(";")
            if step.kind is not StepKind.TRANSACTION and ";" in code:
                raise ValueError(
                    f"{self.version:04d}_{self.name}.sql:{step.line}: a step {step.kind} is one "
                    "statement"
                )
        return found


def _statements(sql: str) -> list[str]:
    """The lines of `sql` that are neither blank nor comments."""
    return [
        line for line in sql.splitlines() if line.strip() and not line.lstrip().startswith("--")
    ]


def _has_statements(sql: str) -> bool:
    return bool(_statements(sql))


@dataclass(frozen=True)
class LockPolicy:
    """How long a step may wait for a lock, and how often it is tried (consumer/settings.py)."""

    timeout_ms: int = 500
    attempts: int = 40
    retry_initial_s: float = 0.2
    retry_max_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: ConsumerSettings) -> LockPolicy:
        return cls(
            settings.migrate_lock_timeout_ms,
            settings.migrate_lock_attempts,
            settings.retry_initial_s,
            settings.retry_max_s,
        )


def available() -> list[Migration]:
    found = []
    for entry in resources.files("intentflow.consumer.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


@functools.cache
def needed_version() -> int:
    """The newest migration this code ships, which it needs the database to have."""
    return max(m.version for m in available())


async def schema_version(conn: asyncpg.Connection) -> int:
    """The newest migration applied to the database, 0 when none (or not migrated at all)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))


async def check_schema(conn: asyncpg.Connection) -> None:
    """Raise SchemaBehind unless the database has every migration this code ships."""
    found, needed = await schema_version(conn), needed_version()
    if found < needed:
        raise SchemaBehind(found, needed)


async def migrate(conn: asyncpg.Connection, locks: LockPolicy = LockPolicy()) -> list[int]:
    """Apply pending migrations, step by step (module docstring); return the versions applied."""
    if conn.is_in_transaction():
        # Its steps are transactions of their own, and some run outside any.
        raise RuntimeError("migrate() runs its own transactions: call it outside one")
    await _lock(conn)
    try:
        # A backfill or a validation may take longer than a role's statement_timeout.
        await conn.execute(f"SET lock_timeout = {int(locks.timeout_ms)}; SET statement_timeout = 0")
        await _retried(
            conn, locks, "schema_migrations", functools.partial(_in_transaction, conn, _TABLE)
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for migration in available():
            if migration.version not in done:
                await _apply(conn, migration, locks)
                applied.append(migration.version)
        return applied
    finally:
        if not conn.is_closed():
            await conn.execute("RESET lock_timeout; RESET statement_timeout")
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


async def _lock(conn: asyncpg.Connection) -> None:
    """Take the migration's session lock, waiting for another `migrate` that holds it.

    Asked again every LOCK_POLL_S rather than waited for inside a statement: a
    statement waiting for it keeps a snapshot open, which another migration's CREATE
    INDEX CONCURRENTLY waits for in turn (PostgreSQL reports the deadlock).
    """
    waiting = False
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
        if not waiting:
            log.info("migration_waiting_for_another", hint="another `migrate` is running")
            waiting = True
        await asyncio.sleep(LOCK_POLL_S)


_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_RECORD = "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)"


async def _apply(conn: asyncpg.Connection, migration: Migration, locks: LockPolicy) -> None:
    steps = migration.steps
    recorded = False
    for number, step in enumerate(steps, start=1):
        what = f"{migration.version:04d}_{migration.name}.sql step {number} ({step.kind})"
        started = time.monotonic()
        if step.kind is StepKind.IN_BATCHES:
            batches = await _in_batches(conn, locks, what, step.sql)
            log.debug("migration_batches", step=what, batches=batches)
        else:
            if step.kind is StepKind.OUTSIDE_A_TRANSACTION:
                work = functools.partial(_outside, conn, step.sql)
            else:  # the last one records the migration in its own transaction
                recorded = number == len(steps)
                record = (migration.version, migration.name) if recorded else None
                work = functools.partial(_in_transaction, conn, step.sql, record)
            await _retried(conn, locks, what, work)
        took_s = time.monotonic() - started
        # Progress for a long migration; the quick steps (most) only at DEBUG.
        (log.info if took_s >= SLOW_STEP_S else log.debug)(
            "migration_step", step=what, seconds=round(took_s, 3)
        )
    if not recorded:
        record = (migration.version, migration.name)
        await _retried(
            conn, locks, "schema_migrations", functools.partial(_in_transaction, conn, None, record)
        )


async def _in_transaction(
    conn: asyncpg.Connection, sql: str | None, record: tuple[int, str] | None = None
) -> None:
    async with conn.transaction():
        if sql is not None:
            await conn.execute(sql)
        if record is not None:
            await conn.execute(_RECORD, *record)


async def _outside(conn: asyncpg.Connection, sql: str) -> None:
    """One statement outside a transaction; first, an index the last try left invalid."""
    if (index := _CONCURRENT_INDEX.search(sql)) is not None:
        invalid = await conn.fetchval(
            "SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", index[1]
        )
        if invalid:
            await conn.execute(f"DROP INDEX CONCURRENTLY {index[1]}")
    await conn.execute(sql)


async def _in_batches(conn: asyncpg.Connection, locks: LockPolicy, what: str, sql: str) -> int:
    """`sql` in its own transaction, given what it returned the last time, until NULL."""
    last: Any = None
    batches = 0

    async def one() -> Any:
        async with conn.transaction():
            return await conn.fetchval(sql, last)

    while True:
        last = await _retried(conn, locks, what, one)
        batches += 1
        if last is None:
            return batches


async def _retried(
    conn: asyncpg.Connection, locks: LockPolicy, what: str, work: Callable[[], Awaitable[T]]
) -> T:
    """`work`, tried again after a back-off while it cannot get its locks in time."""
    for attempt in range(locks.attempts):
        try:
            return await work()
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as exc:
            if attempt + 1 >= locks.attempts:
                raise MigrationLocked(
                    f"{what} could not take its locks in {locks.attempts} tries of "
                    f"{locks.timeout_ms} ms ({describe(exc, 200)}): a long transaction holds "
                    "them (pg_stat_activity, pg_locks); end it, or run `order-consumer migrate` "
                    "again at a quieter time (what is done stays done)"
                ) from exc
            wait_s = delay_s(attempt, locks.retry_initial_s, locks.retry_max_s)
            log.warning(
                "migration_waiting", step=what, error=describe(exc, 200), attempt=attempt + 1,
                retry_in_s=round(wait_s, 2),
            )  # fmt: skip
            await asyncio.sleep(wait_s)
    raise AssertionError("unreachable: attempts >= 1")

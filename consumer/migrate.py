"""Versioned SQL migrations, applied in order, once.

Every migration runs inside one transaction that holds a transaction-level
advisory lock, so running `migrate` twice, or from two processes at once, is
safe: the second waits, then finds nothing left to do.

The consumer refuses to work on a schema older than the newest migration it
ships (`check_schema`): at start-up, and on every connection it opens later
(a failover, a restore, a DATABASE_URL pointed elsewhere). A newer schema is
accepted, so that a rolling update can migrate before replacing old consumers.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

# Any constant works; it only has to be the same for every migrating process.
_LOCK_KEY = 0x1F7E_4F10_0000_0001
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


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


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


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


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply pending migrations; return the versions applied by this call."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for migration in available():
            if migration.version in done:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied.append(migration.version)
        return applied

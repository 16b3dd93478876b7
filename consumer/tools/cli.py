"""What every operator tool shares: the one-line refusals and the database connection.

A tool raises `CannotRun` (exit 2) or `Refused` (exit 3) with one line that says
what to do; consumer/__main__.py prints it as `order-consumer <tool>: <line>` on
stderr. `connect` opens the tool's session (named `order-consumer-<tool>`) and
checks the schema, turning every failure an operator can fix into `CannotRun`;
`unusable` does the same for a failure met later. Anything else is a bug, and
goes up as a traceback.
"""

from __future__ import annotations

import asyncpg

from intentflow.consumer import database
from intentflow.consumer.database import Begin, Connection, redact
from intentflow.consumer.errors import Fault, Misconfigured, cause, classify, describe
from intentflow.consumer.migrate import SchemaBehind, check_schema
from intentflow.consumer.settings import ConsumerSettings


class CannotRun(Exception):
    """What an operator must fix before the tool can run: one line (exit 2)."""


class Refused(Exception):
    """The broker refused records; what went before stays done: one line (exit 3)."""


# Failures of the database or the session (consumer.errors `cause`), and what to do.
HINTS = {
    "database_unreachable": "check DATABASE_URL and that the server is up",
    "database_login": "check DATABASE_URL's user and password",
    "database_missing": "check DATABASE_URL's database name",
    "database_privileges": "grant this role what deploy/grants.sql grants",
    "database_resources": "retry when the server has capacity again",
    "database_system": "check the server's logs",
    "statement_timeout": "raise statement_timeout for this role (ALTER ROLE ... SET), or, "
    "connected without a pooler, add ?statement_timeout=0 to DATABASE_URL for this run",
}
_DATABASE = (OSError, TimeoutError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError)


def unusable(exc: BaseException, settings: ConsumerSettings, done: str = "") -> CannotRun:
    """The one line for a failure of the database an operator can fix; `exc` itself, raised
    again, for anything else (a bug). `done` says what was done before it."""
    if isinstance(exc, CannotRun):
        return exc
    if isinstance(exc, SchemaBehind | Misconfigured):
        return CannotRun(f"{exc}{done}")
    if (line := database.misconfiguration(exc, settings.database_url)) is not None:
        return CannotRun(f"{line}{done}")
    known = isinstance(exc, Exception) and classify(exc) is Fault.ENVIRONMENT
    if isinstance(exc, _DATABASE) or known:
        which = cause(exc) if isinstance(exc, Exception) else ""
        hint = HINTS.get(which, HINTS["database_unreachable"])
        return CannotRun(
            f"PostgreSQL at {redact(settings.database_url)} is not usable "
            f"({describe(exc, 200)}): {hint}{done}"
        )
    raise exc


async def connect(settings: ConsumerSettings, tool: str, begin: Begin | None = None) -> Connection:
    """The tool's session, on a schema as new as this code: or `CannotRun`."""
    try:
        conn = await database.connect(
            settings, name=f"order-consumer-{tool}", begin=begin or Begin()
        )
    except Exception as exc:
        raise unusable(exc, settings) from None
    try:
        await check_schema(conn)
    except Exception as exc:
        await database.close(conn, settings.db_connect_timeout_s)
        raise unusable(exc, settings) from None
    return conn

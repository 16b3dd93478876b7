"""How every process of the consumer connects to PostgreSQL, directly or through a pooler.

`connect` opens one connection, the same way for the pools (consumer/connections.py),
the start-up check and the operator's tools:
  1. nothing the code needs lives in the session, because a pooler in transaction
     mode (DB_POOL_MODE=transaction: PgBouncer, RDS Proxy, Supabase's and Neon's
     pooled endpoints) hands the server connection to another client between
     transactions. Timeouts (and, behind such a pooler, the application's name) are
     set when each transaction begins, with `SET LOCAL` (`Connection.transaction`);
     no startup parameter is sent that a pooler would refuse (only `application_name`,
     and only in session mode); asyncpg's statement cache is off in transaction mode,
     because a prepared statement stays on the server connection it was made on;
  2. its socket gets TCP keepalives and TCP_USER_TIMEOUT (DB_TCP_KEEPALIVE_S,
     DB_TCP_USER_TIMEOUT_S), so that the kernel ends a connection whose peer went
     silent in seconds rather than after some 15 minutes of retransmissions;
  3. a refusal that no wait will fix (a pooler's refusal of a startup parameter, a
     certificate that does not verify) is raised as `errors.Misconfigured`, whose
     message is the operator's one line.

`within(pool, seconds, what)` is a unit of work on a pooled connection that ends by
`seconds`, answered or not, and `deadline(conn, seconds, what)` the same for a
connection of one's own. Past it the connection is terminated: its socket is
closed at once, so nothing waits for the server to acknowledge a cancel (which a
connection whose packets are dropped never does: asyncpg would wait without end),
and a pool opens a fresh connection next time.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
from asyncpg.transaction import Transaction

from intentflow.consumer import errors
from intentflow.consumer.settings import ConsumerSettings

_SECRET_PARAMETERS = frozenset({"password", "sslpassword"})


def redact(url: str) -> str:
    """A database URL without its passwords (before the host, or as parameters), for a log line."""
    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if k.lower() in _SECRET_PARAMETERS else v) for k, v in pairs], safe="*/"
        )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def misconfiguration(exc: BaseException, url: str, variable: str = "DATABASE_URL") -> str | None:
    """The operator's one line when `exc` (or one in an exception group) is a setting that
    cannot work, found by using it; None when it is anything else."""
    if isinstance(exc, BaseExceptionGroup):
        found = (misconfiguration(inner, url, variable) for inner in exc.exceptions)
        return next((line for line in found if line is not None), None)
    if isinstance(exc, errors.Misconfigured):
        return str(exc)
    problem = errors.configuration_problem(exc, variable)
    return None if problem is None else f"PostgreSQL at {redact(url)} {problem}"


@dataclass(frozen=True, slots=True)
class Begin:
    """What every transaction of a connection sets first (`SET LOCAL`); None: the role's own."""

    statement_timeout_ms: int | None = None
    idle_in_transaction_ms: int | None = None
    application_name: str | None = None

    def sql(self) -> str:
        settings = [
            ("statement_timeout", self.statement_timeout_ms),
            ("idle_in_transaction_session_timeout", self.idle_in_transaction_ms),
            ("application_name", self.application_name),
        ]
        return "; ".join(
            f"SET LOCAL {name} = {_literal(value)}" for name, value in settings if value is not None
        )


def _literal(value: int | str) -> str:
    return str(value) if isinstance(value, int) else "'" + value.replace("'", "''") + "'"


class _Transaction(Transaction):
    """asyncpg's transaction, whose outermost block starts with its connection's `SET LOCAL`s.

    One more round trip per transaction: 33 us on loopback (PostgreSQL 15, BEGIN, SET
    LOCAL, SELECT 1, COMMIT: 111 us against 78 us, measured), where a batch's
    transaction takes tens of milliseconds.
    """

    __slots__ = ("_settings_of",)

    def __init__(self, connection: Connection, isolation: Any, readonly: bool, deferrable: bool):
        super().__init__(connection, isolation, readonly, deferrable)
        self._settings_of = connection

    async def start(self) -> None:
        connection = self._settings_of
        outermost = not connection.is_in_transaction()
        await super().start()
        if outermost and connection.begin_sql:
            try:
                await connection.execute(connection.begin_sql)
            except BaseException:
                # Begun and not entered, so `async with` will not roll it back: a
                # connection that cannot take a SET is not worth keeping anyway.
                connection.terminate()
                raise


class Connection(asyncpg.Connection):
    """An asyncpg connection whose transactions each begin with this process's settings."""

    # Set by `connect`: the `SET LOCAL`s each transaction runs first ("" for none).
    begin_sql: str = ""

    def transaction(self, *, isolation: Any = None, readonly: bool = False,
                    deferrable: bool = False) -> Transaction:  # fmt: skip
        return _Transaction(self, isolation, readonly, deferrable)


async def connect(
    settings: ConsumerSettings,
    *,
    name: str,
    begin: Begin = Begin(),
    url: str | None = None,
    url_variable: str = "DATABASE_URL",
    pooled: bool | None = None,
) -> Connection:
    """One connection to `url` (DATABASE_URL), as `name` (the application name).

    `pooled`: whether a pooler in transaction mode may be in front (DB_POOL_MODE by
    default; `migrate` insists on a direct session). Raises `errors.Misconfigured` for a
    refusal no wait will fix, and what asyncpg raises for anything else.
    """
    url = url or settings.database_url
    if pooled is None:
        pooled = settings.db_pool_mode == "transaction"
    if pooled:
        begin = Begin(begin.statement_timeout_ms, begin.idle_in_transaction_ms, name)
    try:
        conn = await asyncpg.connect(
            url,
            timeout=settings.db_connect_timeout_s,
            connection_class=Connection,
            # A cached statement is prepared on the server connection, which a pooler
            # in transaction mode gives to someone else after the transaction.
            statement_cache_size=0 if pooled else 100,
            # PgBouncer refuses every startup parameter it does not track, in any pool
            # mode; application_name it passes on. Behind a transaction pooler it is set
            # per transaction instead, like the timeouts (`Begin`).
            server_settings={} if pooled else {"application_name": name},
        )
    except Exception as exc:
        line = misconfiguration(exc, url, url_variable)
        if line is not None:
            raise errors.Misconfigured(line) from exc
        raise
    conn.begin_sql = begin.sql()
    try:
        keep_alive(conn, settings)
    except BaseException:
        conn.terminate()
        raise
    return conn


async def close(conn: asyncpg.Connection, seconds: float) -> None:
    """Close `conn` politely within `seconds`, else end it (a server that does not answer)."""
    try:
        await conn.close(timeout=seconds)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        conn.terminate()


def keep_alive(conn: asyncpg.Connection, settings: ConsumerSettings) -> None:
    """TCP keepalives and TCP_USER_TIMEOUT on the connection's socket (not a Unix socket's)."""
    # asyncpg offers no socket options; its transport (asyncpg 0.32, pinned) gives the
    # socket, a real one or uvloop's stand-in, both of which take setsockopt.
    transport = conn._transport  # type: ignore[attr-defined]
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    idle_s = max(1, round(settings.db_tcp_keepalive_s))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle_s // 3))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(
        socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, round(settings.db_tcp_user_timeout_s * 1000)
    )


class NoAnswer(Exception):
    """The database did not finish a unit of work by its deadline: its connection was ended."""

    retriable = True  # consumer.errors: the environment's (a network that drops packets)
    cause = "database_unreachable"

    def __init__(self, what: str, seconds: float) -> None:
        super().__init__(
            f"{what}: no answer from the database within {seconds:g} s; "
            "its connection was closed without waiting for the server"
        )


@contextlib.contextmanager
def deadline(conn: Any, seconds: float, what: str) -> Iterator[None]:
    """End `conn` (terminate: close its socket) if the block is still running after `seconds`.

    Whatever the block awaits on the connection then fails at once, and so does a
    rollback or a pool's reset after it; the block's failure is raised as NoAnswer.
    """
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        # Released to its pool meanwhile (a proxy lent no longer): nothing to end.
        with contextlib.suppress(asyncpg.InterfaceError):
            conn.terminate()

    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        yield
    except Exception as exc:
        if expired:
            raise NoAnswer(what, seconds) from exc
        raise
    finally:
        timer.cancel()


@contextlib.asynccontextmanager
async def within(pool: Any, seconds: float, what: str) -> AsyncIterator[Any]:
    """A connection from `pool` for one unit of work that must end within `seconds`.

    Waiting for a connection (or opening one) counts; so does handing it back.
    Past `seconds` the connection is terminated and NoAnswer raised: the pool will
    not lend it again.
    """
    lent: list[Any] = []
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        for conn in lent:
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()

    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        async with pool.acquire(timeout=seconds) as conn:
            lent.append(conn)
            if expired:  # the deadline passed as the pool handed it over: nothing ends it now
                expire()
                raise NoAnswer(what, seconds)
            yield conn
    except Exception as exc:
        if expired or isinstance(exc, TimeoutError):  # TimeoutError: no connection in time
            raise NoAnswer(what, seconds) from exc
        raise
    finally:
        timer.cancel()

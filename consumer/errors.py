"""Whose fault a failure is, and so what the consume loop does about it (invariant 7).

One place decides, from the exception's class (asyncpg's class per SQLSTATE,
aiokafka's `retriable` flag, our own classes' `retriable` attribute), never from
the text of its message, with one exception: PgBouncer sends every refusal as
SQLSTATE 08P01, the ones a wait fixes and the ones it does not, and only the
message tells them apart (`configuration_problem`).

- DATA, the event's data (SQLSTATE classes 22 and 23, and 54000, a value too
  large for an index entry): the loop isolates the
  event by bisection and dead-letters it. (Undecodable records never get this
  far: `decode` makes them poison.)
- ENVIRONMENT, every other PostgreSQL error, the network, a lost race, a schema
  behind the code, a retriable broker error: the loop waits it out with
  back-off, the member staying in the group, and never dead-letters.
- FATAL, a broker error that retrying cannot fix (a record too large, not
  authorized) and anything unexpected (a bug): the process stops loudly. A
  setting that cannot work (`configuration_problem`: a pooler's refusal, prepared
  statements behind a pooler in transaction mode, a certificate that does not
  verify) is FATAL too, and stops the process with one line and exit 2.

An environment failure also has a `cause`, a short label for logs and counters
(`database_unreachable`, `database_read_only`, `statement_timeout`, …). Our own
exception classes say both with two attributes: `retriable = True` and `cause`.
"""

from __future__ import annotations

import ssl
from enum import StrEnum

import asyncpg
from aiokafka.errors import (
    BrokerNotAvailableError,
    KafkaError,
    KafkaTimeoutError,
    KafkaUnavailableError,
    ReplicaNotAvailableError,
)


class Fault(StrEnum):
    DATA = "data"
    ENVIRONMENT = "environment"
    FATAL = "fatal"


# SQLSTATE classes whose errors are about the values sent, not the database,
# and one code of class 54 that only a value can cause: an index entry too large.
_DATA_CLASSES = frozenset({"22", "23"})
_DATA_CODES = frozenset({"54000"})  # program_limit_exceeded

# Causes of environment failures, by SQLSTATE (exact code first, then class).
_CAUSE_BY_SQLSTATE = {
    "25006": "database_read_only",  # read_only_sql_transaction: a standby, a failover
    "57014": "statement_timeout",  # query_canceled: statement_timeout or a cancel
    "42501": "database_privileges",  # insufficient_privilege
    "42P01": "schema_mismatch",  # undefined_table: not migrated
    "42703": "schema_mismatch",  # undefined_column: code ahead of its migration
    "42883": "schema_mismatch",  # undefined_function
    "40001": "conflict",  # serialization_failure
    "40P01": "conflict",  # deadlock_detected
    "55P03": "conflict",  # lock_not_available
}
_CAUSE_BY_CLASS = {
    "08": "database_unreachable",  # connection exception
    "57": "database_unreachable",  # operator intervention: shutdown, restart
    "53": "database_resources",  # out of memory, disk, connections
    "58": "database_system",  # system error (I/O)
    "XX": "database_internal",
    "0A": "database_feature",  # feature_not_supported
    "28": "database_login",  # invalid authorization: a password rotated under us
    "3D": "database_missing",  # invalid_catalog_name
}


# aiokafka marks these not retriable, yet each says only that the broker did not
# answer in time or was away: the environment's, and worth waiting out.
_TRANSIENT_BROKER_ERRORS = (
    KafkaTimeoutError,
    KafkaUnavailableError,
    BrokerNotAvailableError,
    ReplicaNotAvailableError,
)


class Misconfigured(Exception):
    """A setting that cannot work, found by using it; the message is the operator's one line."""

    retriable = False
    cause = "database_configuration"


# PgBouncer's refusals that no wait fixes (its messages, which all come as 08P01; the
# others, such as "pgbouncer cannot connect to server" or "query_wait_timeout", pass).
_POOLER_REFUSALS = {
    "unsupported startup parameter": "refused a startup parameter ({detail}): a pooler takes "
    "only those it tracks; take it out of {variable} and set it for the role instead "
    "(ALTER ROLE ... SET), or list it in PgBouncer's ignore_startup_parameters",
    "no such database": "does not know the database ({detail}): check {variable} against the "
    "pooler's [databases]",
    "no such user": "does not know the user ({detail}): check {variable} against the "
    "pooler's auth_file or auth_query",
}
# A prepared statement missing, or one of another client's names: asyncpg's statement
# cache behind a pooler that hands server connections around between transactions.
_PREPARED_STATEMENT_CODES = frozenset({"26000", "42P05"})


def configuration_problem(exc: BaseException, variable: str = "DATABASE_URL") -> str | None:
    """What is wrong with the settings, when `exc` says so and no wait would fix it.

    A phrase that follows "PostgreSQL at <url>", naming `variable`, the setting at fault.
    """
    detail = " ".join(str(exc).split())
    if sqlstate(exc) == "08P01":
        for start, problem in _POOLER_REFUSALS.items():
            if detail.startswith(start):
                return problem.format(detail=detail, variable=variable)
    if sqlstate(exc) in _PREPARED_STATEMENT_CODES:
        return (
            f"lost a prepared statement between transactions ({detail}): a pooler in "
            "transaction mode is in front of it; set DB_POOL_MODE=transaction"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"presented a certificate that does not verify ({exc.verify_message}): check "
            f"sslrootcert and the host name in {variable}"
        )
    if isinstance(exc, FileNotFoundError):
        # Only files named in the URL are opened on connecting: sslrootcert, sslcert, ...
        return (
            f"needs a file that is not there ({exc.filename or exc.strerror}): check "
            f"sslrootcert, sslcert and sslkey in {variable}"
        )
    return None


def sqlstate(exc: BaseException) -> str:
    return str(getattr(exc, "sqlstate", None) or "")


def classify(exc: BaseException) -> Fault:
    """Whose fault `exc` is: the event's data, the environment's, or nobody's we can fix."""
    if isinstance(exc, Misconfigured) or configuration_problem(exc) is not None:
        return Fault.FATAL
    if isinstance(exc, asyncpg.PostgresError):
        code = sqlstate(exc)
        data = code[:2] in _DATA_CLASSES or code in _DATA_CODES
        return Fault.DATA if data else Fault.ENVIRONMENT
    if isinstance(exc, KafkaError):
        transient = exc.retriable or isinstance(exc, _TRANSIENT_BROKER_ERRORS)
        return Fault.ENVIRONMENT if transient else Fault.FATAL
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.exceptions.InternalClientError):
        # The connection broke under us (`connection is closed`), or a cached
        # statement went stale after a migration: a fresh connection will do.
        return Fault.ENVIRONMENT
    if isinstance(exc, OSError | TimeoutError):
        return Fault.ENVIRONMENT  # refused, reset, unreachable, connect timeout
    if getattr(exc, "retriable", False) is True:
        return Fault.ENVIRONMENT  # ours: a lost race, a schema behind the code (`cause` says)
    return Fault.FATAL


# Every cause `cause` can name (`stock_row_missing`: consumer/orders.py's own), so that
# the retries counter exports each at zero and an alert's rate over it exists before the
# first retry (tests/e2e/test_metrics.py checks every metric a rule reads is scraped).
CAUSES = frozenset(
    {
        *_CAUSE_BY_SQLSTATE.values(),
        *_CAUSE_BY_CLASS.values(),
        *("database_error", "broker", "other", "stock_row_missing"),
    }
)


def cause(exc: BaseException) -> str:
    """A short label for an environment failure, for logs and counters."""
    own = getattr(exc, "cause", None)
    if isinstance(own, str):
        return own
    if configuration_problem(exc) is not None:
        return "database_configuration"
    if isinstance(exc, asyncpg.PostgresError):
        code = sqlstate(exc)
        return _CAUSE_BY_SQLSTATE.get(code) or _CAUSE_BY_CLASS.get(code[:2], "database_error")
    if isinstance(exc, KafkaError):
        return "broker"
    if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError):
        return "database_unreachable"
    return "other"


def is_read_only(exc: BaseException) -> bool:
    """The connection is in a read-only session (a standby, or a primary being demoted)."""
    return isinstance(exc, asyncpg.ReadOnlySQLTransactionError)


def is_statement_timeout(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.QueryCanceledError)


def describe(exc: BaseException, limit: int = 300) -> str:
    """`ClassName: message`, one line, bounded."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:limit] if text else type(exc).__name__

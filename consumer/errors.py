"""Whose fault a failure is, and so what the consume loop does about it (invariant 7).

One place decides, from the exception's class (asyncpg's class per SQLSTATE,
aiokafka's `retriable` flag, our own classes' `retriable` attribute), never from
the text of its message:

- DATA, the event's data (SQLSTATE classes 22 and 23, and 54000, a value too
  large for an index entry): the loop isolates the
  event by bisection and dead-letters it. (Undecodable records never get this
  far: `decode` makes them poison.)
- ENVIRONMENT, every other PostgreSQL error, the network, a lost race, a schema
  behind the code, a retriable broker error: the loop waits it out with
  back-off, the member staying in the group, and never dead-letters.
- FATAL, a broker error that retrying cannot fix (a record too large, not
  authorized) and anything unexpected (a bug): the process stops loudly.

An environment failure also has a `cause`, a short label for logs and counters
(`database_unreachable`, `database_read_only`, `statement_timeout`, …). Our own
exception classes say both with two attributes: `retriable = True` and `cause`.
"""

from __future__ import annotations

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


def sqlstate(exc: BaseException) -> str:
    return str(getattr(exc, "sqlstate", None) or "")


def classify(exc: BaseException) -> Fault:
    """Whose fault `exc` is: the event's data, the environment's, or nobody's we can fix."""
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

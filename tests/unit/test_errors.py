"""Whose fault a failure is decides retry, dead-letter or stop (consumer/errors.py)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from aiokafka.errors import (
    CommitFailedError,
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    TopicAuthorizationFailedError,
)

from intentflow.consumer.backoff import StopRequested, delay_s, sleep_unless_stopped, unless_stopped
from intentflow.consumer.database import misconfiguration, redact
from intentflow.consumer.errors import Fault, cause, classify, is_read_only, is_statement_timeout
from intentflow.consumer.intents import ConcurrentIntentWrite
from intentflow.consumer.migrate import SchemaBehind
from intentflow.consumer.preflight import TopicsMissing, until_ready
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.stock import StockRowMissing
from intentflow.schemas.config import check_bootstrap_servers


def pg(code: str) -> asyncpg.PostgresError:
    """The exception asyncpg raises for an error with this SQLSTATE."""
    return asyncpg.PostgresError.new({"C": code, "M": f"error {code}", "S": "ERROR"})


@pytest.mark.parametrize(
    "code",
    [
        "22001",  # string_data_right_truncation
        "22003",  # numeric_value_out_of_range
        "22021",  # character_not_in_repertoire (a NUL in text)
        "22P02",  # invalid_text_representation
        "23502",  # not_null_violation
        "23505",  # unique_violation
        "23514",  # check_violation
    ],
)
def test_sqlstate_classes_22_and_23_are_the_events_data(code: str) -> None:
    assert classify(pg(code)) is Fault.DATA


@pytest.mark.parametrize(
    ("code", "expected_cause"),
    [
        ("25006", "database_read_only"),  # a standby, a failover
        ("42P01", "schema_mismatch"),  # not migrated
        ("42703", "schema_mismatch"),  # code ahead of its migration
        ("42501", "database_privileges"),
        ("57014", "statement_timeout"),
        ("57P01", "database_unreachable"),  # admin shutdown
        ("08006", "database_unreachable"),
        ("53200", "database_resources"),  # out of memory
        ("53300", "database_resources"),  # too many connections
        ("40001", "conflict"),
        ("40P01", "conflict"),
        ("0A000", "database_feature"),
        ("58030", "database_system"),  # io_error
        ("XX000", "database_internal"),
        ("28P01", "database_login"),
        ("3D000", "database_missing"),
        ("42601", "database_error"),  # a syntax error is not the event's fault either
        ("P0001", "database_error"),  # raise_exception from a trigger
    ],
)
def test_every_other_postgres_error_is_the_environments(code: str, expected_cause: str) -> None:
    exc = pg(code)
    assert classify(exc) is Fault.ENVIRONMENT
    assert cause(exc) == expected_cause


def test_network_and_connection_failures_are_the_environments() -> None:
    for exc in (
        ConnectionRefusedError(),
        ConnectionResetError(),
        TimeoutError(),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.InterfaceError("connection is closed"),
    ):
        assert classify(exc) is Fault.ENVIRONMENT, exc
        assert cause(exc) == "database_unreachable"


def test_our_own_retriable_errors_carry_their_cause() -> None:
    for exc, expected in (
        (ConcurrentIntentWrite("1 intent"), "conflict"),
        (SchemaBehind(0, 1), "schema_mismatch"),
        (TopicsMissing("topic 'x.dlq' does not exist"), "topic_missing"),
        (StockRowMissing(["sku-a"]), "stock_row_missing"),
    ):
        assert classify(exc) is Fault.ENVIRONMENT
        assert cause(exc) == expected


def test_broker_errors_follow_their_retriable_flag() -> None:
    for retriable in (KafkaConnectionError(), KafkaTimeoutError(), NotLeaderForPartitionError()):
        assert classify(retriable) is Fault.ENVIRONMENT
        assert cause(retriable) == "broker"
    for permanent in (
        MessageSizeTooLargeError(),
        TopicAuthorizationFailedError(),
        CommitFailedError(),
    ):
        assert classify(permanent) is Fault.FATAL


def test_anything_unexpected_is_fatal_not_retried_or_dead_lettered() -> None:
    for bug in (AssertionError(), TypeError("x"), KeyError("k"), ValueError("v")):
        assert classify(bug) is Fault.FATAL


def test_read_only_and_statement_timeout_are_recognised_by_class() -> None:
    assert is_read_only(pg("25006")) and not is_read_only(pg("57014"))
    assert is_statement_timeout(pg("57014")) and not is_statement_timeout(pg("25006"))


def test_back_off_doubles_up_to_the_cap_with_jitter_in_the_upper_half() -> None:
    for attempt, ceiling in [(0, 0.2), (1, 0.4), (2, 0.8), (5, 6.4), (6, 10.0), (500, 10.0)]:
        draws = [delay_s(attempt, 0.2, 10.0) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in draws)
        assert len(set(draws)) > 1  # jittered, not one fixed value


async def test_a_wait_ends_as_soon_as_a_stop_is_requested() -> None:
    stopping = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stopping.set)
    with pytest.raises(StopRequested):
        async with asyncio.timeout(5):
            await sleep_unless_stopped(stopping, 60)


async def test_a_wait_with_no_stop_returns_after_its_time() -> None:
    await sleep_unless_stopped(asyncio.Event(), 0.01)


def test_a_database_url_is_logged_without_its_password() -> None:
    assert (
        redact("postgresql://app:hunter2@db.internal:5432/shop")
        == "postgresql://app:***@db.internal:5432/shop"
    )
    assert redact("postgresql://app@db/shop") == "postgresql://app@db/shop"
    assert (
        redact("postgresql://app@db/shop?sslmode=require&password=hunter2")
        == "postgresql://app@db/shop?sslmode=require&password=***"
    )


async def test_a_step_in_progress_is_cancelled_by_a_stop_request() -> None:
    stopping = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow_connect() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    asyncio.get_running_loop().call_later(0.05, stopping.set)
    with pytest.raises(StopRequested):
        async with asyncio.timeout(5):
            await unless_stopped(stopping, slow_connect())
    assert cancelled.is_set()
    assert await unless_stopped(asyncio.Event(), asyncio.sleep(0, "done")) == "done"


async def test_a_stop_during_a_start_up_check_is_a_stop_not_a_start_up_error() -> None:
    stopping = asyncio.Event()

    async def hanging_connect() -> None:
        await asyncio.sleep(60)  # a server that accepts and never answers

    asyncio.get_running_loop().call_later(0.05, stopping.set)
    settings = ConsumerSettings(retry_initial_s=0.01)
    with pytest.raises(StopRequested):
        async with asyncio.timeout(5):
            await until_ready(
                "database", hanging_connect, settings=settings, stopping=stopping,
                deadline=asyncio.get_running_loop().time() + 60,
            )  # fmt: skip


def test_a_value_too_large_for_an_index_entry_is_the_events_data() -> None:
    assert classify(pg("54000")) is Fault.DATA  # program_limit_exceeded


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("127.0.0.1:9092", True),
        ("kafka-0:9092,kafka-1:9093", True),
        ("kafka", True),  # aiokafka's default port
        ("[::1]:9092", True),
        ("127.0.0.1:notaport", False),
        ("[::1", False),
        ("kafka:0", False),
        ("kafka:70000", False),
        ("a:9092,,b:9092", False),
        (":9092", False),
    ],
)
def test_a_kafka_bootstrap_list_is_checked_before_anything_connects(value: str, ok: bool) -> None:
    if ok:
        assert check_bootstrap_servers(value) == value
    else:
        with pytest.raises(ValueError, match="host"):
            check_bootstrap_servers(value)


def pooler(message: str) -> asyncpg.PostgresError:
    """What PgBouncer sends: every refusal as SQLSTATE 08P01, told apart by its message."""
    return asyncpg.PostgresError.new({"C": "08P01", "M": message, "S": "FATAL"})


@pytest.mark.parametrize(
    ("message", "names"),
    [
        ("unsupported startup parameter: statement_timeout", "ignore_startup_parameters"),
        ("no such database: shop", "[databases]"),
        ("no such user: shop", "auth_file"),
    ],
)
def test_a_poolers_refusal_of_a_setting_is_a_configuration_error(message: str, names: str) -> None:
    refused = pooler(message)
    assert classify(refused) is Fault.FATAL and cause(refused) == "database_configuration"
    line = misconfiguration(refused, "postgresql://u:secret@pooler:6432/shop")
    assert line is not None and names in line and message in line and "secret" not in line
    assert line.startswith("PostgreSQL at postgresql://u:***@pooler:6432/shop ")
    # Found inside an exception group too (the relay's two loops are a TaskGroup).
    assert misconfiguration(ExceptionGroup("loops", [refused]), "postgresql://x/y") is not None


@pytest.mark.parametrize(
    "message", ["pgbouncer cannot connect to server", "query_wait_timeout", "server conn crashed?"]
)
def test_a_poolers_passing_trouble_is_waited_out(message: str) -> None:
    assert classify(pooler(message)) is Fault.ENVIRONMENT
    assert misconfiguration(pooler(message), "postgresql://x/y") is None


@pytest.mark.parametrize("code", ["42P05", "26000"])
def test_prepared_statements_lost_behind_a_pooler_say_to_set_the_pool_mode(code: str) -> None:
    assert classify(pg(code)) is Fault.FATAL
    line = misconfiguration(pg(code), "postgresql://x/y")
    assert line is not None and "set DB_POOL_MODE=transaction" in line

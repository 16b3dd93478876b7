"""What must hold before a consumer joins its group, checked once at start-up.

  1. `check_database`: DATABASE_URL names a database this role can log in to,
     and its schema has every migration this code ships;
  2. `check_topics`: the broker answers, and the events topic and its
     dead-letter topic exist (asked through a metadata request that may not
     create them: a missing dead-letter topic found later would stall a
     partition behind its first poison message).
`until_ready` retries a check that time can fix (the database or the broker
not up yet, a migration or a topic creation still running) until the start-up
deadline, logging each attempt; a check that time cannot fix (a wrong password,
no such database) fails at once. Either way the operator gets a StartupError:
one line that says what is wrong and what to do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import asyncpg
import structlog
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError, UnknownTopicOrPartitionError, for_code
from aiokafka.protocol.metadata import MetadataRequest

from intentflow.consumer import database
from intentflow.consumer.backoff import StopRequested, delay_s, sleep_unless_stopped, unless_stopped
from intentflow.consumer.database import redact
from intentflow.consumer.errors import (
    Fault,
    Misconfigured,
    classify,
    describe,
)
from intentflow.consumer.migrate import SchemaBehind, check_schema
from intentflow.consumer.settings import ConsumerSettings
from intentflow.schemas.kafka import client_kwargs

log = structlog.get_logger("consumer")
T = TypeVar("T")


class StartupError(Exception):
    """The consumer cannot start; the message is the one line an operator reads."""


class TopicsMissing(Exception):
    """A topic the consumer needs is missing, or this client may not describe it."""

    retriable = True  # a topic may be being created right now
    cause = "topic_missing"


async def check_database(settings: ConsumerSettings) -> None:
    """Log in once and check the schema version."""
    try:
        conn = await database.connect(settings, name="order-consumer-preflight")
    except Misconfigured as exc:
        raise StartupError(str(exc)) from exc
    except (
        asyncpg.InvalidAuthorizationSpecificationError,
        asyncpg.InvalidCatalogNameError,
        asyncpg.ClientConfigurationError,
        ValueError,
    ) as exc:
        # Waiting will not change a password, a database name or a URL option.
        raise StartupError(
            f"PostgreSQL at {redact(settings.database_url)} refused the connection "
            f"({describe(exc, 200)}): check DATABASE_URL"
        ) from exc
    try:
        with database.deadline(conn, settings.db_connect_timeout_s, "schema check"):
            await check_schema(conn)
    finally:
        await database.close(conn, settings.db_connect_timeout_s)


async def check_topics(settings: ConsumerSettings, topics: Iterable[str]) -> None:
    """Raise TopicsMissing unless every topic exists and can be described."""
    client = AIOKafkaClient(**client_kwargs(settings, "preflight"))
    try:
        await client.bootstrap()
        request = MetadataRequest(list(topics), allow_auto_topic_creation=False)
        response = await client.send(client.get_random_node(), request)
    finally:
        await client.close()
    problems = []
    for error_code, name, *_ in response.topics:
        if error_code:
            error = for_code(error_code)
            what = "does not exist" if error is UnknownTopicOrPartitionError else error.__name__
            problems.append(f"topic {name!r} {what}")
    if problems:
        raise TopicsMissing(
            "; ".join(problems) + ": create it (and the events topic's `.dlq` topic) first"
        )


async def until_ready(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    *,
    settings: ConsumerSettings,
    stopping: asyncio.Event,
    deadline: float,
) -> T:
    """`attempt` until it succeeds, retrying environment failures until `deadline`.

    `deadline` is on the event loop's clock. Raises StartupError, or
    StopRequested when a stop is requested meanwhile.
    """
    loop = asyncio.get_running_loop()
    tries = 0
    while True:
        try:
            return await unless_stopped(stopping, attempt())
        except (StartupError, StopRequested):
            raise
        except Exception as exc:
            retriable = classify(exc) is Fault.ENVIRONMENT
            if not retriable or loop.time() >= deadline:
                waited = f" (waited {settings.startup_timeout_s:g} s)" if retriable else ""
                raise StartupError(f"{what}: {_hint(exc, settings)}{waited}") from exc
            wait_s = min(delay_s(tries, settings.retry_initial_s, settings.retry_max_s),
                         max(0.0, deadline - loop.time()))  # fmt: skip
            log.warning(
                "not_ready", check=what, error=describe(exc), attempt=tries + 1,
                retry_in_s=round(wait_s, 2),
            )  # fmt: skip
        tries += 1
        await sleep_unless_stopped(stopping, wait_s)


def _hint(exc: BaseException, settings: ConsumerSettings) -> str:
    if isinstance(exc, TopicsMissing | SchemaBehind):
        return str(exc)
    if (line := database.misconfiguration(exc, settings.database_url)) is not None:
        return line
    if isinstance(exc, KafkaError):
        return (
            f"the broker at {settings.kafka_bootstrap_servers} did not answer "
            f"({describe(exc, 200)}): check KAFKA_BOOTSTRAP_SERVERS"
        )
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        # The server is up and took the login: DATABASE_URL's role is missing its grants.
        return (
            f"PostgreSQL at {redact(settings.database_url)} refused this role "
            f"({describe(exc, 200)}): run deploy/grants.sql as the schema's owner"
        )
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError | OSError | TimeoutError):
        return (
            f"PostgreSQL at {redact(settings.database_url)} is not usable "
            f"({describe(exc, 200)}): check DATABASE_URL and that the server is up"
        )
    return describe(exc)

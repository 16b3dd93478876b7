"""Find a Kafka broker and a PostgreSQL server for tests, the demo and benchmarks.

In this order: addresses from the environment (`TEST_KAFKA_BOOTSTRAP_SERVERS`,
`TEST_DATABASE_URL`, each independently), testcontainers when a Docker engine
answers, else the embedded services from pip wheels.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from intentflow.devservices.embedded import EmbeddedKafka, EmbeddedPostgres


@dataclass(frozen=True)
class Services:
    kafka_bootstrap_servers: str
    kafka_enable_idempotence: bool
    database_url: str
    kafka_origin: str
    postgres_origin: str


def docker_available(timeout_s: float = 2.0) -> bool:
    """Whether a Docker engine answers its ping (asked with a plain socket, so nothing leaks)."""
    if os.environ.get("TEST_NO_DOCKER"):
        return False
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = host.removeprefix("unix://")
        elif host.startswith("tcp://"):
            name, _, port = host.removeprefix("tcp://").rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (name, int(port))
        else:
            return False
        with sock:
            sock.settimeout(timeout_s)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = sock.recv(64).split(b"\r\n", 1)[0]
            return status_line.startswith(b"HTTP/1.") and b" 200" in status_line
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _kafka(stack: contextlib.ExitStack, use_docker: bool) -> Iterator[tuple[str, bool, str]]:
    given = os.environ.get("TEST_KAFKA_BOOTSTRAP_SERVERS")
    if given:
        idempotence = os.environ.get("TEST_KAFKA_ENABLE_IDEMPOTENCE", "true").lower() == "true"
        yield given, idempotence, "environment"
    elif use_docker:
        from testcontainers.kafka import KafkaContainer

        container = stack.enter_context(KafkaContainer("confluentinc/cp-kafka:7.6.1"))
        yield container.get_bootstrap_server(), True, "testcontainers"
    else:
        broker = stack.enter_context(EmbeddedKafka().start())
        yield broker.bootstrap_servers, False, "embedded tansu"


@contextlib.contextmanager
def _postgres(stack: contextlib.ExitStack, use_docker: bool) -> Iterator[tuple[str, str]]:
    given = os.environ.get("TEST_DATABASE_URL")
    if given:
        yield given, "environment"
    elif use_docker:
        from testcontainers.postgres import PostgresContainer

        container = stack.enter_context(PostgresContainer("postgres:16", driver=None))
        yield container.get_connection_url(), "testcontainers"
    else:
        server = stack.enter_context(EmbeddedPostgres().start())
        yield server.dsn, "embedded postgres"


@contextlib.contextmanager
def services() -> Iterator[Services]:
    """Yield reachable services; stop whatever was started here on exit."""
    with contextlib.ExitStack() as stack:
        need_docker = not (
            os.environ.get("TEST_KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("TEST_DATABASE_URL")
        )
        use_docker = need_docker and docker_available()
        bootstrap, idempotence, kafka_origin = stack.enter_context(_kafka(stack, use_docker))
        dsn, pg_origin = stack.enter_context(_postgres(stack, use_docker))
        yield Services(bootstrap, idempotence, dsn, kafka_origin, pg_origin)

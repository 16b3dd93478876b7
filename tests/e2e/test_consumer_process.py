"""`order-consumer` as an operator runs it: configuration errors, start-up checks, shutdown.

Every test starts the consumer as a separate OS process and judges it only by
what an operator sees: its exit status, its stderr (JSON lines), its stdout
summary, and the database. Deadlines are asserted with generous margins.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from intentflow.consumer.settings import ConsumerSettings
from intentflow.devservices import Services
from intentflow.devservices.embedded import free_port
from intentflow.devservices.proxy import Proxy
from intentflow.devservices.topics import create_topics
from intentflow.schemas import dlq_topic
from tests.support import (
    ConsumerProcess,
    consumer_env,
    consumer_settings,
    eventually,
    paid_carts,
    publish,
    seed_stock,
    snapshot,
)

EXIT_CANNOT_START = 2
CONSUMER = [sys.executable, "-m", "intentflow.consumer"]
SECRET = "s3cretpassw0rd"
EVENTS = 6  # authorizations published per shutdown test


# -- running the process -----------------------------------------------------


def bare_env(**variables: str) -> dict[str, str]:
    """Only what Python needs to start, and `variables`: no setting leaks in from the tests.

    And a free port for the probes: 8081 may be taken on this machine (tests/conftest.py).
    """
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CONSUMER_HTTP_PORT": "0", **variables}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


async def run_to_end(args: list[str], env: dict[str, str], timeout_s: float = 30) -> Finished:
    process = await asyncio.create_subprocess_exec(
        *CONSUMER, *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Finished(process.returncode, stdout.decode(), stderr.decode())


class Running:
    """`order-consumer run` (or another command) in the background, its stderr read line
    by line as it comes."""

    def __init__(self, env: dict[str, str], *args: str, command: str = "run") -> None:
        self._argv = [*CONSUMER, command, *args]
        self._env = env
        self.lines: list[str] = []
        self.stdout = ""
        self._process: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []

    async def start(self) -> Running:
        self._process = await asyncio.create_subprocess_exec(
            *self._argv, env=self._env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._readers = [
            asyncio.create_task(self._read_stderr()),
            asyncio.create_task(self._read_stdout()),
        ]
        return self

    @property
    def process(self) -> asyncio.subprocess.Process:
        assert self._process is not None
        return self._process

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.lines.append(line.decode().rstrip("\n"))

    async def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        self.stdout = (await self.process.stdout.read()).decode()

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def logged(self, event: str) -> list[dict[str, Any]]:
        found = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("event") == event:
                    found.append(entry)
        return found

    async def until_logged(self, event: str, count: int = 1, timeout_s: float = 30) -> None:
        def seen() -> bool:
            assert self.process.returncode is None, f"exited early:\n{self.stderr[-3000:]}"
            return len(self.logged(event)) >= count

        try:
            await eventually(seen, timeout_s=timeout_s)
        except TimeoutError:
            raise AssertionError(
                f"no {event!r} within {timeout_s} s:\n{self.stderr[-3000:]}"
            ) from None

    def send(self, sig: signal.Signals) -> float:
        """Send `sig`; return when (time.monotonic())."""
        self.process.send_signal(sig)
        return time.monotonic()

    async def exited(self, timeout_s: float) -> int:
        """Wait for the exit, every line read; fail (after killing it) if it takes longer."""
        try:
            await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            raise AssertionError(
                f"still running after {timeout_s} s:\n{self.stderr[-3000:]}"
            ) from None
        await asyncio.wait_for(asyncio.gather(*self._readers), 10)
        return self.process.returncode  # type: ignore[return-value]

    def summary(self) -> dict[str, Any]:
        return dict(json.loads(self.stdout.strip().splitlines()[-1]))

    async def close(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


@contextlib.asynccontextmanager
async def running(env: dict[str, str], *args: str) -> AsyncIterator[Running]:
    consumer = await Running(env, *args).start()
    try:
        yield consumer
    finally:
        await consumer.close()


# -- what the operator reads -------------------------------------------------


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line, parsed; fail on the first one that is not a JSON object."""
    assert "Traceback" not in stderr, stderr
    entries = []
    for line in stderr.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\nin:\n{stderr}") from None
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


def the_one_error(finished: Finished, event: str = "cannot_start") -> str:
    """Exit status 2, every stderr line JSON, exactly one `event` line: its error text."""
    assert finished.returncode == EXIT_CANNOT_START, finished.stderr
    entries = json_lines(finished.stderr)
    errors = [e for e in entries if e.get("event") == event]
    assert len(errors) == 1, finished.stderr
    assert errors[0]["level"] == "error"
    return str(errors[0]["error"])


def the_configuration_error(finished: Finished) -> str:
    """Exit status 2 and one plain line on stderr, before any logging is set up."""
    assert finished.returncode == EXIT_CANNOT_START, finished.stderr
    assert "Traceback" not in finished.stderr, finished.stderr
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1, finished.stderr
    assert lines[0].startswith("order-consumer: configuration error: "), lines[0]
    return lines[0]


# -- the database as the tests see it ----------------------------------------


async def applied_count(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM processed_events"))


async def consumer_waits_on_a_lock(db: asyncpg.Connection) -> bool:
    return bool(
        await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'order-consumer' AND wait_event_type = 'Lock'"
        )
    )


@contextlib.asynccontextmanager
async def row_locked(database_url: str, sku: str) -> AsyncIterator[None]:
    """Hold `sku`'s inventory row FOR UPDATE until the block ends (then roll back)."""
    conn = await asyncpg.connect(database_url)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("SELECT * FROM inventory_levels WHERE sku = $1 FOR UPDATE", sku)
        try:
            yield
        finally:
            await transaction.rollback()
    finally:
        await conn.close()


async def successor_applies_each_event_once(
    settings: ConsumerSettings, db: asyncpg.Connection, stock: int, count: int
) -> None:
    """A fresh consumer in the same group applies all `count` events, each once."""
    async with running(consumer_env(settings), "--exit-when-idle", "120") as successor:

        async def all_applied() -> bool:
            return await applied_count(db) >= count

        try:
            await eventually(all_applied, timeout_s=45)
        except TimeoutError:
            raise AssertionError(f"not all applied:\n{successor.stderr[-3000:]}") from None
        await asyncio.sleep(1)  # room for an extra effect to show
        successor.send(signal.SIGTERM)
        assert await successor.exited(timeout_s=30) == 0, successor.stderr
    summary = successor.summary()
    # The successor found every event unclaimed: its predecessor committed none.
    assert summary["events"] == count and summary["duplicates"] == 0, summary
    state = await snapshot(db)
    assert len(state.orders) == count and set(state.orders.values()) == {"placed"}
    assert state.levels == {"sku-a": stock - count}
    assert state.order_movements == count and state.processed == count
    state.assert_movements_explain_levels()


# -- 1. configuration errors: one line, no traceback, exit status 2 -----------


async def test_help_and_version_work_with_an_empty_environment() -> None:
    helped = await run_to_end(["--help"], bare_env())
    assert helped.returncode == 0 and helped.stderr == "", helped.stderr
    assert helped.stdout.startswith("usage: order-consumer")
    assert "migrate" in helped.stdout and "run" in helped.stdout

    run_help = await run_to_end(["run", "--help"], bare_env())
    assert run_help.returncode == 0 and run_help.stderr == "", run_help.stderr
    assert "--exit-when-idle" in run_help.stdout

    shown = await run_to_end(["--version"], bare_env())
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == f"order-consumer {version('intentflow')}"
    assert re.fullmatch(r"order-consumer \d+\.\d+\.\d+\S*", shown.stdout.strip())


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"LOG_LEVEL": "verbose"}, "LOG_LEVEL"),
        ({"DATABASE_URL": f"mysql://someone:{SECRET}@x/db"}, "DATABASE_URL"),
        ({"DATABASE_URL": f"postgresql://someone:{SECRET}@127.0.0.1:abc/x"}, "DATABASE_URL"),
        ({"SHUTDOWN_TIMEOUT_S": "soon"}, "SHUTDOWN_TIMEOUT_S"),
    ],
    ids=["log-format-xml", "log-level-verbose", "mysql-url", "port-not-a-number", "not-a-number"],
)
async def test_a_bad_setting_is_one_line_naming_it_without_its_value(
    variables: dict[str, str], named: str
) -> None:
    line = the_configuration_error(await run_to_end(["run"], bare_env(**variables)))
    assert f"{named}:" in line
    assert SECRET not in line


@pytest.mark.parametrize("level", ["debug", "DeBuG", "Warning"])
async def test_a_log_level_in_any_case_is_accepted(level: str) -> None:
    """Accepted: the process gets past its settings to its first check (nothing listens)."""
    env = bare_env(
        LOG_LEVEL=level,
        DATABASE_URL=f"postgresql://someone@127.0.0.1:{free_port()}/x",
        STARTUP_TIMEOUT_S="0",
    )
    finished = await run_to_end(["run"], env)
    assert "configuration error" not in finished.stderr
    assert "DATABASE_URL" in the_one_error(finished)


async def test_an_unreachable_database_at_start_is_one_json_line_without_the_password() -> None:
    env = bare_env(
        DATABASE_URL=f"postgresql://someone:{SECRET}@127.0.0.1:{free_port()}/x",
        STARTUP_TIMEOUT_S="1",
    )
    finished = await run_to_end(["run"], env)
    assert SECRET not in finished.stderr + finished.stdout
    error = the_one_error(finished)
    assert "DATABASE_URL" in error and "someone:***@127.0.0.1" in error
    # Retried until the start-up deadline, each attempt logged.
    assert any(e.get("event") == "not_ready" for e in json_lines(finished.stderr))


async def test_a_password_given_as_a_url_parameter_is_not_printed_either() -> None:
    env = bare_env(
        DATABASE_URL=f"postgresql://someone@127.0.0.1:{free_port()}/x?password={SECRET}",
        STARTUP_TIMEOUT_S="0",
    )
    finished = await run_to_end(["run"], env)
    assert "DATABASE_URL" in the_one_error(finished)
    assert SECRET not in finished.stderr + finished.stdout


async def test_a_multi_host_database_url_is_accepted() -> None:
    hosts = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    env = bare_env(
        DATABASE_URL=f"postgresql://someone@{hosts}/x?target_session_attrs=read-write",
        STARTUP_TIMEOUT_S="0",
    )
    finished = await run_to_end(["run"], env)
    assert "configuration error" not in finished.stderr, finished.stderr
    assert "DATABASE_URL" in the_one_error(finished)  # accepted; nothing listens there


async def test_a_broker_address_with_a_bad_port_names_kafka_bootstrap_servers(
    infra: Services, database_url: str, topic: str
) -> None:
    settings = consumer_settings(infra, database_url, topic, startup_timeout_s=1)
    env = {**consumer_env(settings), "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:abc"}
    finished = await run_to_end(["run"], env)
    assert finished.returncode == EXIT_CANNOT_START, finished.stderr
    assert "Traceback" not in finished.stderr
    [line] = finished.stderr.strip().splitlines()
    assert line.startswith("order-consumer: configuration error: KAFKA_BOOTSTRAP_SERVERS")


async def test_a_missing_database_fails_at_once_instead_of_waiting(infra: Services) -> None:
    """Waiting cannot create a database: no retries until STARTUP_TIMEOUT_S."""
    missing = infra.database_url.rpartition("/")[0] + f"/no_such_db_{secrets.token_hex(4)}"
    started = time.monotonic()
    finished = await run_to_end(["run"], bare_env(DATABASE_URL=missing, STARTUP_TIMEOUT_S="60"))
    elapsed_s = time.monotonic() - started
    error = the_one_error(finished)
    assert "DATABASE_URL" in error and "does not exist" in error
    assert elapsed_s < 30, elapsed_s


async def test_an_unreachable_broker_at_start_is_one_line_and_every_line_is_json(
    infra: Services, database_url: str, topic: str
) -> None:
    closed = f"127.0.0.1:{free_port()}"
    settings = consumer_settings(
        infra, database_url, topic, kafka_bootstrap_servers=closed, startup_timeout_s=1
    )
    finished = await run_to_end(["run"], consumer_env(settings))
    error = the_one_error(finished)
    assert "KAFKA_BOOTSTRAP_SERVERS" in error and closed in error
    # aiokafka's own connection errors came out in the same JSON shape.
    entries = json_lines(finished.stderr)
    assert any(e.get("logger", "").startswith("aiokafka") for e in entries), finished.stderr


async def test_a_missing_dead_letter_topic_stops_the_start_and_is_not_created(
    infra: Services, database_url: str
) -> None:
    topic = f"stripe.events.{secrets.token_hex(6)}"
    await create_topics(infra.kafka_bootstrap_servers, topic)  # without its `.dlq`
    settings = consumer_settings(infra, database_url, topic, startup_timeout_s=1)
    finished = await run_to_end(["run"], consumer_env(settings))
    error = the_one_error(finished)
    assert repr(dlq_topic(topic)) in error and "does not exist" in error
    assert repr(topic) not in error  # the events topic is there

    admin = AIOKafkaAdminClient(bootstrap_servers=infra.kafka_bootstrap_servers)
    await admin.start()
    try:
        topics = set(await admin.list_topics())
    finally:
        await admin.close()
    assert topic in topics and dlq_topic(topic) not in topics


async def test_an_unmigrated_database_is_refused_until_migrate_has_run(
    infra: Services, topic: str
) -> None:
    """`run` refuses, committing nothing; `migrate` then lets it apply every event."""
    name = f"intentflow_unmigrated_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(infra.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = infra.database_url.rpartition("/")[0] + f"/{name}"
    try:
        settings = consumer_settings(infra, url, topic, startup_timeout_s=1)
        refused = await run_to_end(["run", "--exit-when-idle", "5"], consumer_env(settings))
        error = the_one_error(refused)
        assert "order-consumer migrate" in error and "version 0" in error

        migrated = await run_to_end(["migrate"], consumer_env(settings))
        assert migrated.returncode == 0, migrated.stderr
        assert [e["event"] for e in json_lines(migrated.stderr)] == ["migrated"]

        db = await asyncpg.connect(url)
        try:
            await seed_stock(db, {"sku-a": 10})
            await publish(infra, topic, await paid_carts(db, 3, [("sku-a", 1, 100)]))
            consumer = await ConsumerProcess(settings, exit_when_idle_s=5).start()
            assert (await consumer.wait())["events"] == 3
            assert (await snapshot(db)).levels == {"sku-a": 7}
        finally:
            await db.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


# -- 2.-5. stopping on time, whatever the process is waiting for -------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
async def test_a_stop_signal_while_waiting_for_the_database_at_start_exits_0_at_once(
    sig: signal.Signals,
) -> None:
    env = bare_env(
        DATABASE_URL=f"postgresql://someone@127.0.0.1:{free_port()}/x",
        STARTUP_TIMEOUT_S="60",
        RETRY_MAX_S="1",
        SHUTDOWN_TIMEOUT_S="5",
    )
    async with running(env) as consumer:
        await consumer.until_logged("not_ready", count=2)
        sent = consumer.send(sig)
        assert await consumer.exited(timeout_s=15) == 0, consumer.stderr
        assert time.monotonic() - sent < 15
    [stopped] = [e for e in json_lines(consumer.stderr) if e["event"] == "consumer_stopped"]
    assert stopped["before"] == "joining the group"


async def test_sigterm_during_a_database_outage_exits_0_on_time_and_commits_nothing(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    await seed_stock(db, {"sku-a": 100})
    authorizations = await paid_carts(db, EVENTS, [("sku-a", 1, 100)])
    url = urlsplit(database_url)
    proxy = await Proxy(url.hostname or "127.0.0.1", url.port or 5432).start()
    through_proxy = urlunsplit(url._replace(netloc=f"{url.username}@127.0.0.1:{proxy.port}"))
    shutdown_timeout_s = 5
    settings = consumer_settings(infra, through_proxy, topic, shutdown_timeout_s=shutdown_timeout_s)
    try:
        async with running(consumer_env(settings), "--exit-when-idle", "120") as consumer:
            await consumer.until_logged("partitions_assigned")
            await proxy.cut()
            await publish(infra, topic, authorizations)
            await consumer.until_logged("database_unavailable", count=3)
            sent = consumer.send(signal.SIGTERM)
            # Without a stop that reaches the back-off wait, it would wait forever.
            assert await consumer.exited(timeout_s=shutdown_timeout_s + 10) == 0, consumer.stderr
            assert time.monotonic() - sent < shutdown_timeout_s + 10
        summary = consumer.summary()
        assert summary["events"] == 0 and summary["abandoned"] >= 1, summary
        assert "batch_abandoned" in {e["event"] for e in json_lines(consumer.stderr)}
        assert await applied_count(db) == 0
    finally:
        await proxy.cut()

    await successor_applies_each_event_once(
        consumer_settings(infra, database_url, topic), db, stock=100, count=EVENTS
    )


# SIGTERM only: SIGINT takes the same handler (the start-up test above sends each), and
# this test's 20 s are the suite's budget.
@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=lambda s: s.name)
async def test_a_batch_that_cannot_commit_by_the_deadline_is_abandoned_uncommitted(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str, sig: signal.Signals
) -> None:
    await seed_stock(db, {"sku-a": 100})
    authorizations = await paid_carts(db, EVENTS, [("sku-a", 1, 100)])
    shutdown_timeout_s = 5
    settings = consumer_settings(infra, database_url, topic, shutdown_timeout_s=shutdown_timeout_s)
    async with (
        running(consumer_env(settings), "--exit-when-idle", "120") as consumer,
        row_locked(database_url, "sku-a"),
    ):
        await consumer.until_logged("partitions_assigned")
        await publish(infra, topic, authorizations)
        await eventually(lambda: consumer_waits_on_a_lock(db), timeout_s=30)
        sent = consumer.send(sig)
        assert await consumer.exited(timeout_s=shutdown_timeout_s + 10) == 0, consumer.stderr
        assert time.monotonic() - sent < shutdown_timeout_s + 10
    summary = consumer.summary()
    assert summary["events"] == 0 and summary["abandoned"] >= 1, summary
    assert "batch_abandoned" in {e["event"] for e in json_lines(consumer.stderr)}
    assert await applied_count(db) == 0

    await successor_applies_each_event_once(settings, db, stock=100, count=EVENTS)


async def test_a_second_signal_exits_at_once_with_128_plus_its_number(
    infra: Services, database_url: str, db: asyncpg.Connection, topic: str
) -> None:
    await seed_stock(db, {"sku-a": 100})
    authorizations = await paid_carts(db, EVENTS, [("sku-a", 1, 100)])
    settings = consumer_settings(infra, database_url, topic, shutdown_timeout_s=30)
    async with (
        running(consumer_env(settings), "--exit-when-idle", "120") as consumer,
        row_locked(database_url, "sku-a"),
    ):
        await consumer.until_logged("partitions_assigned")
        await publish(infra, topic, authorizations)
        await eventually(lambda: consumer_waits_on_a_lock(db), timeout_s=30)
        consumer.send(signal.SIGTERM)
        await consumer.until_logged("stop_requested")
        await asyncio.sleep(1)
        assert consumer.process.returncode is None  # the first one waits for the batch
        sent = consumer.send(signal.SIGTERM)
        # Well before the 30 s the first signal allows.
        assert await consumer.exited(timeout_s=10) == 128 + signal.SIGTERM, consumer.stderr
        assert time.monotonic() - sent < 10
    [now] = consumer.logged("exiting_now")
    assert now["reason"] == "second stop signal" and now["signal"] == "SIGTERM"
    assert await applied_count(db) == 0

    await successor_applies_each_event_once(settings, db, stock=100, count=EVENTS)

"""Every operator subcommand, on every failure of its environment an operator can fix, says
what to do in one line on stderr and exits 2: never a traceback, never a usage message.

Run in-process through `order-consumer`'s own entry point (`main(argv)`, settings from
the environment), against a database that is not migrated, one that does not exist, a
server that does not answer, and a broker that does not.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator

import asyncpg
import pytest

from intentflow.consumer import logs
from intentflow.consumer.__main__ import main
from intentflow.consumer.exits import EXIT_CANNOT
from intentflow.consumer.tools import TOOLS
from intentflow.devservices import Services
from intentflow.devservices.embedded import free_port

# One invocation of each subcommand that reads the database (settings permitting).
ON_THE_DATABASE = {
    "reconcile": ["reconcile"],
    "reconcile --with-stripe": ["reconcile", "--with-stripe", "--json"],
    "outbox": ["outbox"],
    "outbox --failed": ["outbox", "--failed", "--json"],
    "outbox retry": ["outbox", "retry", "1"],
    "backfill": ["backfill", "--since", "1h"],
    "migrate": ["migrate"],
}
# And of each that reads the broker first.
ON_THE_BROKER = {
    "dlq list": ["dlq", "list"],
    "dlq replay": ["dlq", "replay", "--all"],
    "prune": ["prune", "--older-than", "35d", "--topic-retention", "7d"],
}


@pytest.fixture(autouse=True)
def libraries_logging_kept() -> Iterator[None]:
    """A tool quiets aiokafka's logger for its process; here, that process is the session's."""
    quieted = logging.getLogger("aiokafka")
    level = quieted.level
    yield
    quieted.setLevel(level)


@pytest.fixture
def unmigrated(infra: Services) -> Iterator[str]:
    """An empty database of its own: no schema at all."""
    name = f"intentflow_bare_{secrets.token_hex(6)}"

    async def run(sql: str) -> None:
        admin = await asyncpg.connect(infra.database_url)
        try:
            await admin.execute(sql)
        finally:
            await admin.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    base, _, _ = infra.database_url.rpartition("/")
    yield f"{base}/{name}"
    asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def one_line(
    argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> str:  # fmt: skip
    if argv[0] == "migrate":
        # Its line is a log record, and structlog keeps the stderr of its first use: its
        # own process, as a Job runs it.
        done = subprocess.run(
            [sys.executable, "-m", "intentflow.consumer", *argv],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        status, err = done.returncode, done.stderr
    else:
        # The process's logging is the session's to set: configured here, it would write
        # to this test's captured stderr, closed once the test ends, for every later test.
        monkeypatch.setattr(logs, "configure", lambda *_: None)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        status = main(argv)
        err = capsys.readouterr().err
    assert status == EXIT_CANNOT, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "usage:" not in err, err
    return lines[0]


def test_every_tool_is_covered() -> None:
    named = {argv[0] for argv in [*ON_THE_DATABASE.values(), *ON_THE_BROKER.values()]}
    assert set(TOOLS) <= named


def base_env(infra: Services, database_url: str) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": infra.kafka_bootstrap_servers,
        "DATABASE_URL": database_url,
        "STRIPE_API_KEY": "sk_test_errors",
        "STRIPE_API_BASE": f"http://127.0.0.1:{free_port()}",
        "STARTUP_TIMEOUT_S": "1",
        "DB_CONNECT_TIMEOUT_S": "2",
    }


@pytest.mark.parametrize("argv", ON_THE_DATABASE.values(), ids=ON_THE_DATABASE)
def test_an_unmigrated_database_is_one_line_that_says_migrate(
    argv: list[str], infra: Services, unmigrated: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    if argv == ["migrate"]:
        return  # migrating it is what it is for (tests/integration/test_migrations.py)
    line = one_line(argv, base_env(infra, unmigrated), monkeypatch, capsys)
    assert line.startswith(f"order-consumer {argv[0]}: ") and "order-consumer migrate" in line


@pytest.mark.parametrize("argv", ON_THE_DATABASE.values(), ids=ON_THE_DATABASE)
@pytest.mark.parametrize("where", ["no server", "no such database"])
def test_a_database_that_cannot_be_used_is_one_line_that_names_the_setting(
    argv: list[str], where: str, infra: Services,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    base, _, _ = infra.database_url.rpartition("/")
    url = (
        f"postgresql://postgres@127.0.0.1:{free_port()}/none"
        if where == "no server"
        else f"{base}/intentflow_missing_{secrets.token_hex(4)}"
    )
    line = one_line(argv, base_env(infra, url), monkeypatch, capsys)
    # `migrate` runs as a service does (a Job): its one line is a log record.
    opening = '{"error"' if argv == ["migrate"] else f"order-consumer {argv[0]}: "
    assert line.startswith(opening) and "DATABASE_URL" in line, line


@pytest.mark.parametrize("argv", ON_THE_BROKER.values(), ids=ON_THE_BROKER)
def test_a_broker_that_does_not_answer_is_one_line_that_names_the_setting(
    argv: list[str], infra: Services, database_url: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    env = base_env(infra, database_url)
    env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{free_port()}"
    line = one_line(argv, env, monkeypatch, capsys)
    assert line.startswith(f"order-consumer {argv[0]}: ")
    assert "KAFKA_BOOTSTRAP_SERVERS" in line, line

"""Every command line the README and docs/operating.md show that can run on the embedded
services runs, as written, and ends as the page says.

The lines are read from the Markdown: a console block's `$ …` lines, and the README's
list of commands under "Running it". Each runs as an operator runs it (`.venv/bin` on
the PATH, settings from the environment) against the embedded broker and PostgreSQL,
migrated, with the shipped topics' names and retentions, and a fake of Stripe's read
API for the commands that read Stripe. A line ends as the page says when it exits 0,
or, where the page shows its one-line refusal, exits 2 with a line that begins the
same way; never with a usage message or a traceback. What cannot run here is named in
`NOT_HERE`, with why: a line none of its patterns matches and that does not run is a
failure, so a new example is run or explained.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from intentflow.devservices import Services
from intentflow.loadtest.stripe_api import StripeReadApi
from intentflow.schemas import DEFAULT_TOPIC, dlq_topic
from intentflow.schemas.orders import DEFAULT_ORDERS_TOPIC

ROOT = Path(__file__).resolve().parents[2]
PAGES = (ROOT / "README.md", ROOT / "docs" / "operating.md")
DAY_MS = 24 * 3600 * 1000
# The shipped topics' retentions (deploy/k8s/kafka-topics.yaml): what `prune` reads.
RETENTION_MS = {DEFAULT_TOPIC: 7 * DAY_MS, dlq_topic(DEFAULT_TOPIC): 28 * DAY_MS}

# What is not run here, and why.
NOT_HERE = {
    r"^make (demo|test|dev)\b": "the suite itself, or what CI and tests/e2e/test_dev.py run",
    r"^(stripe|kubectl|docker|psql|curl) ": "another program, and Stripe's or a cluster's",
    r"^order-consumer (run|relay)\b(?!.*--exit-when-idle \d)": "a service, not a command",
    r"^stripe-bridge(?! --version)": "a service, not a command",
    r"^echo ": "the shell's",
    r"^order-consumer outbox retry \d": "needs rows refused for good: test_outbox_review runs it",
}
PLACEHOLDER = re.compile(r"[\[\]|…]|\bID\b")


@dataclass(frozen=True)
class Line:
    page: str
    number: int
    command: str
    shown: list[str]  # the output the page shows under it

    def __str__(self) -> str:
        return f"{self.page}:{self.number}: {self.command}"


def documented() -> list[Line]:
    found: list[Line] = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        fence = False
        running_it = False
        for i, text in enumerate(lines):
            if text.startswith("## "):
                running_it = text == "## Running it"
            if re.match(r"^ *```", text):
                fence = not fence
                continue
            if not fence:
                continue
            if text.startswith("$ "):
                shown = []
                for after in lines[i + 1 :]:
                    if after.startswith(("$ ", "```")):
                        break
                    shown.append(after)
                found.append(Line(page.name, i + 1, _bare(text[2:]), shown))
            elif running_it and text.startswith(("order-consumer", "stripe-bridge")):
                found.append(Line(page.name, i + 1, _bare(text), []))
    return found


def _bare(command: str) -> str:
    """The command without its trailing comment, and without a pipe into another program."""
    command = re.split(r"\s{2,}#|\s#\s", command)[0].strip()
    return command.split(" | ")[0].strip()


def not_here(line: Line) -> str | None:
    for pattern, why in NOT_HERE.items():
        if re.search(pattern, line.command):
            return why
    if PLACEHOLDER.search(line.command):
        return "a synopsis with placeholders"
    return None


LINES = documented()
RUN = [line for line in LINES if not_here(line) is None]


def test_the_pages_show_commands_and_most_of_them_run() -> None:
    assert len(RUN) >= 12, [str(line) for line in LINES]
    tools = {line.command.split()[1] for line in RUN if line.command.startswith("order-")}
    assert {"reconcile", "dlq", "outbox", "prune", "backfill", "migrate"} <= tools


@dataclass
class Stack:
    env: dict[str, str]


@pytest.fixture(scope="module")
async def stack(infra: Services, template_db: str) -> AsyncIterator[Stack]:
    """The embedded services, a migrated database of the module's own, the shipped
    topics, and Stripe's read API faked (for `backfill` and `reconcile --with-stripe`)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=infra.kafka_bootstrap_servers)
    await admin.start()
    try:
        for name in (DEFAULT_TOPIC, dlq_topic(DEFAULT_TOPIC), DEFAULT_ORDERS_TOPIC):
            configs = {"retention.ms": str(RETENTION_MS.get(name, 7 * DAY_MS))}
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(name, 12, 1, topic_configs=configs)])
    finally:
        await admin.close()
    name = f"intentflow_docs_{secrets.token_hex(6)}"
    owner = await asyncpg.connect(infra.database_url)
    await owner.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    base, _, _ = infra.database_url.rpartition("/")
    async with StripeReadApi() as api:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "DATABASE_"))}
        env.update(
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            KAFKA_BOOTSTRAP_SERVERS=infra.kafka_bootstrap_servers,
            KAFKA_ENABLE_IDEMPOTENCE=str(infra.kafka_enable_idempotence).lower(),
            DATABASE_URL=f"{base}/{name}",
            STRIPE_API_KEY=api.api_key,
            STRIPE_API_BASE=api.base_url,
        )
        yield Stack(env)
    await owner.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await owner.close()


@pytest.mark.parametrize("line", RUN, ids=str)
async def test_a_documented_command_runs_as_written(stack: Stack, line: Line) -> None:
    process = await asyncio.create_subprocess_exec(
        *shlex.split(line.command), env=stack.env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    stderr = err.decode()
    assert "Traceback" not in stderr and "usage:" not in stderr, stderr
    refusal = next((s for s in line.shown if s.startswith(f"{line.command.split()[0]} ")), None)
    if process.returncode == 2 and refusal is not None:
        # The page shows this refusal: the same command, the same opening words.
        assert stderr.startswith(" ".join(refusal.split()[:3])), (refusal, stderr)
        return
    assert process.returncode == 0, stderr or out.decode()

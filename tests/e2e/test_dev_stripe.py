"""`dev-stripe` as a newcomer runs it: the command `make dev` prints, with no Stripe CLI.

One `make dev` stack for the module (tests/e2e/test_dev.py's `make_dev`); each
test runs the printed `dev-stripe` command line, its environment included, as
a process of its own, and reads what it prints and what the database holds.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shlex
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from tests.e2e.test_dev import READY_WITHIN_S, make_dev
from tests.support import eventually

# Measured: a walk takes about a second, most of it the consumer's batches.
WALK_WITHIN_S = 20


@dataclass
class Printed:
    """The `dev-stripe ... walk` line the banner printed, split into environment and argv."""

    env: dict[str, str]
    argv: list[str]

    async def run(self, *args: str, **env: str) -> tuple[int, str, str]:
        """Run it with `args` in place of `walk`; its status, stdout and stderr."""
        process = await asyncio.create_subprocess_exec(
            *self.argv[:-1], *args,
            env={**os.environ, **self.env, **env},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), WALK_WITHIN_S)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()


@pytest.fixture(scope="module")
async def printed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Printed]:
    log = tmp_path_factory.mktemp("dev") / "dev.log"
    async with make_dev(
        log,
        STRIPE_WEBHOOK_SECRET=f"whsec_devstripe_{secrets.token_hex(8)}",
        BRIDGE_PORT="0",
        BRIDGE_ADMIN_PORT="0",
        CONSUMER_HTTP_PORT="0",
    ) as dev:
        await eventually(
            lambda: (
                any(line.strip().endswith(" walk") for line in dev.lines)
                or dev.process.returncode is not None
            ),
            timeout_s=READY_WITHIN_S,
        )
        (line,) = [line for line in dev.lines if line.strip().endswith(" walk")]
        words = shlex.split(line)
        env = dict(word.split("=", 1) for word in words if re.match(r"^[A-Z_]+=", word))
        yield Printed(env, words[len(env) :])


def states(out: str) -> list[tuple[str, str]]:
    """(step, order status) of each step's order line."""
    return re.findall(r"^(\w+) pi_\w+: order (\w+),", out, flags=re.MULTILINE)


def stock(out: str) -> list[int]:
    return [int(level) for level in re.findall(r"stock of dev-mug (\d+)$", out, re.MULTILINE)]


async def orders_of(database_url: str, cart_id: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT status, amount, amount_captured, amount_refunded FROM orders "
            "WHERE cart_id = $1",
            cart_id,
        )
        return [tuple(row) for row in rows]
    finally:
        await conn.close()


async def test_the_printed_walk_places_captures_and_refunds_one_order(printed: Printed) -> None:
    status, out, err = await printed.run("walk")
    assert status == 0, out + err
    assert err == ""
    assert states(out) == [("authorize", "placed"), ("capture", "placed"), ("refund", "refunded")]
    sent = re.findall(r"^\w+ (pi_\w+): sent ([\w.]+) (evt_\w+)$", out, re.MULTILINE)
    assert [kind for _, kind, _ in sent] == [
        "payment_intent.created",
        "payment_intent.amount_capturable_updated",
        "charge.captured",
        "payment_intent.succeeded",
        "charge.refunded",
    ]
    assert len({intent for intent, _, _ in sent}) == 1
    assert len({event for _, _, event in sent}) == len(sent)
    assert "captured 2500, refunded 2500" in out.splitlines()[-1]
    (cart_id,) = re.findall(r"^seeded cart (\S+):", out, re.MULTILINE)
    assert await orders_of(printed.env["DATABASE_URL"], cart_id) == [("refunded", 2500, 2500, 2500)]
    # Seeded at 10 (a new SKU, or one a test before left); a refund does not restock.
    seeded, *after = stock(out)
    assert after == [seeded - 1] * 3


async def test_the_printed_walk_with_cancel_gives_the_stock_back(printed: Printed) -> None:
    status, out, err = await printed.run("walk", "--cancel")
    assert status == 0, out + err
    assert states(out) == [("authorize", "placed"), ("cancel", "canceled")]
    seeded, placed, canceled = stock(out)
    assert (placed, canceled) == (seeded - 1, seeded)
    (cart_id,) = re.findall(r"^seeded cart (\S+):", out, re.MULTILINE)
    assert await orders_of(printed.env["DATABASE_URL"], cart_id) == [("canceled", 2500, 0, 0)]
    conn = await asyncpg.connect(printed.env["DATABASE_URL"])
    try:
        level = await conn.fetchval(
            "SELECT stocked_quantity FROM inventory_levels WHERE sku = 'dev-mug'"
        )
    finally:
        await conn.close()
    assert level == seeded


async def test_a_step_the_intent_does_not_allow_is_refused_in_one_line(printed: Printed) -> None:
    status, out, _ = await printed.run("walk", "--cancel")
    assert status == 0
    (intent,) = set(re.findall(r"(pi_\w+):", out))
    status, out, err = await printed.run("capture", intent)
    assert (status, out) == (2, "")
    assert err.splitlines() == [
        f"dev-stripe: cannot capture {intent}: it is canceled, and capture needs requires_capture"
    ]


async def test_a_wrong_secret_is_refused_in_one_line_naming_the_fix(printed: Printed) -> None:
    status, out, err = await printed.run("walk", STRIPE_WEBHOOK_SECRET="whsec_not_the_bridges")
    assert status == 2
    assert ": sent " not in out
    lines = err.splitlines()
    assert len(lines) == 1 and "400 bad_signature" in lines[0], err
    assert "STRIPE_WEBHOOK_SECRET" in lines[0]


async def test_an_unreachable_database_is_one_line_not_a_traceback(printed: Printed) -> None:
    status, out, err = await printed.run("walk", DATABASE_URL="postgresql://nobody@127.0.0.1:1/x")
    assert (status, out) == (2, "")
    lines = err.splitlines()
    assert len(lines) == 1 and "does not answer" in lines[0], err

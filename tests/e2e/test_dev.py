"""`make dev` (devservices/dev.py) as a developer runs it: the path works, Ctrl-C leaves nothing.

The stack runs its own embedded broker and PostgreSQL, as `make dev` does; the
test reads the addresses it prints, seeds a cart with `seed-cart`, sends the
signed authorization the Stripe CLI would forward, and then interrupts it as
a terminal's Ctrl-C does (SIGINT to its process group).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx

from intentflow.stripekit.events import encode, intent_event, new_id
from intentflow.stripekit.signing import stripe_signature
from tests.dev_support import payment_of_create, printed_command, run_seed_cart
from tests.support import eventually

# Measured: ready in about 10 s (5 of them the group's first join), stopped in under 2 s.
READY_WITHIN_S = 60
STOPPED_WITHIN_S = 20


@dataclass
class DevProcess:
    process: asyncio.subprocess.Process
    log: Path

    @property
    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def printed(self, pattern: str) -> str:
        for line in self.lines:
            if found := re.search(pattern, line):
                return found.group(1)
        raise AssertionError(f"not printed: {pattern}\n" + "\n".join(self.lines[-40:]))


@contextlib.asynccontextmanager
async def make_dev(log: Path, **env: str) -> AsyncIterator[DevProcess]:
    """`python -m intentflow.devservices.dev` in a process group of its own, its output in `log`.

    A file, not a pipe: a child left behind would hold a pipe open, and asyncio's
    `wait()` waits for its pipes to close too. Whatever happens, nothing is left running.
    """
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "intentflow.devservices.dev",
            env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield DevProcess(process, log)
    finally:
        if process.returncode is None:
            below = descendants(process.pid)
            os.killpg(process.pid, signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), STOPPED_WITHIN_S)
            except TimeoutError:
                os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
            kill_left(below)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of `pid`, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return fields[0], int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, tuple[int, str]]:
    """Every process below `root`: pid -> (start time, command line)."""
    parents: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = (stat[1], stat[2])
    found: dict[int, tuple[int, str]] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, started) in parents.items():
            if ppid == parent and pid not in found:
                with contextlib.suppress(OSError):
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                    found[pid] = (started, cmdline.decode(errors="replace"))
                    frontier.append(pid)
    return found


def still_running(pid: int, started: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[2] == started and stat[0] != "Z"


def kill_left(processes: dict[int, tuple[int, str]]) -> dict[int, str]:
    """SIGKILL those of `processes` still running; their command lines."""
    left = {pid: cmd for pid, (started, cmd) in processes.items() if still_running(pid, started)}
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return left


async def test_dev_places_the_order_of_a_seeded_cart_and_ctrl_c_leaves_no_process(
    tmp_path: Path,
) -> None:
    secret = f"whsec_devtest_{secrets.token_hex(8)}"
    async with make_dev(
        tmp_path / "dev.log",
        STRIPE_WEBHOOK_SECRET=secret,
        BRIDGE_PORT="0",
        BRIDGE_ADMIN_PORT="0",
        CONSUMER_HTTP_PORT="0",
    ) as dev:
        await eventually(
            lambda: (
                any("consumer metrics:" in line for line in dev.lines)
                or dev.process.returncode is not None
            ),
            timeout_s=READY_WITHIN_S,
        )
        forward_url = dev.printed(r"stripe listen --forward-to (\S+)")
        database_url = dev.printed(r"DATABASE_URL=(\S+)")
        children = descendants(dev.process.pid)
        commands = " | ".join(cmd for _, cmd in children.values())
        for part in ("tansu", "postgres -D", "intentflow.producer", "intentflow.consumer run"):
            assert part in commands, commands

        status, out, err = await run_seed_cart(database_url, "--quantity", "2", "--price", "1999")
        assert status == 0, err
        pay = payment_of_create(printed_command(out, "stripe payment_intents create"))
        intent = new_id("pi")
        body = encode(
            intent_event(intent, amount=int(pay["amount"]), cart_id=pay["metadata[cart_id]"])
        )
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                forward_url,
                content=body,
                headers={"stripe-signature": stripe_signature(body, secret)},
            )
        assert answer.status_code == 200, answer.text

        conn = await asyncpg.connect(database_url)
        try:
            order: list[tuple[object, ...]] = []

            async def ordered() -> bool:
                row = await conn.fetchrow(
                    "SELECT status, amount, cart_id FROM orders WHERE payment_intent_id = $1",
                    intent,
                )
                order.extend([] if row is None else [tuple(row)])
                return row is not None

            await eventually(ordered, timeout_s=15)
            assert order[0] == ("placed", 3998, pay["metadata[cart_id]"])
        finally:
            await conn.close()
        # The consumer's /metrics, at the address the banner printed, counted the order.
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(dev.printed(r"consumer metrics: (\S+)"))).text
        assert 'intentflow_consumer_orders_total{status="placed"} 1.0' in metrics

        started = asyncio.get_running_loop().time()
        os.killpg(dev.process.pid, signal.SIGINT)  # what the terminal's Ctrl-C does
        status = await asyncio.wait_for(dev.process.wait(), STOPPED_WITHIN_S)
        stopped_s = asyncio.get_running_loop().time() - started

    left = kill_left(children)  # killed, so that a failure here leaves nothing behind either
    assert left == {}, left
    assert status == 0, "\n".join(dev.lines[-30:])
    assert stopped_s < STOPPED_WITHIN_S


async def test_a_busy_port_is_refused_in_one_line_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        async with make_dev(
            tmp_path / "dev.log", STRIPE_WEBHOOK_SECRET="whsec_x", BRIDGE_PORT=str(port)
        ) as dev:
            status = await asyncio.wait_for(dev.process.wait(), 15)
    errors = [line for line in dev.lines if line.startswith("make dev: ") and "stopped" not in line]
    assert status == 2
    assert len(errors) == 1 and f"port {port}" in errors[0] and "BRIDGE_PORT=" in errors[0]

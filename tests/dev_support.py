"""Helpers for the tests of `seed-cart` and `make dev`: run them, read what they print."""

from __future__ import annotations

import asyncio
import itertools
import os
import shlex
import subprocess
import sys


async def run_seed_cart(database_url: str | None, *args: str) -> tuple[int, str, str]:
    """Run `python -m intentflow.devservices.seed`; its status, stdout and stderr."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "intentflow.devservices.seed", *args,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def printed_command(stdout: str, prefix: str) -> list[str]:
    """The argv of the one printed command line that starts with `prefix`."""
    (line,) = [line.strip() for line in stdout.splitlines() if line.strip().startswith(prefix)]
    return shlex.split(line)


def payment_of_create(argv: list[str]) -> dict[str, str]:
    """What `stripe payment_intents create` would send: its flags and its -d params."""
    sent: dict[str, str] = {}
    for flag, value in itertools.pairwise(argv):
        if flag == "-d":
            key, _, param = value.partition("=")
            sent[key] = param
        elif flag.startswith("--") and not value.startswith("-"):
            sent[flag.removeprefix("--").replace("-", "_")] = value
    return sent


def overrides_of_trigger(argv: list[str]) -> dict[str, str]:
    return dict(
        value.removeprefix("payment_intent:").split("=", 1)
        for flag, value in itertools.pairwise(argv)
        if flag == "--override"
    )

"""Waiting out a failure: exponential back-off with jitter, cut short by a stop request.

Every wait in the consumer (a database or broker away at start-up or mid-run)
goes through here, so that a SIGTERM is obeyed within the shutdown deadline
whatever the process is waiting for.
"""

from __future__ import annotations

import asyncio
import random


class StopRequested(Exception):
    """A stop was requested while waiting; the work in hand is abandoned, uncommitted."""


def delay_s(attempt: int, initial_s: float, max_s: float) -> float:
    """The wait before retry number `attempt` (0-based): doubling, capped, with jitter.

    The jitter (a uniform draw over the upper half) keeps members that failed
    together, on one database outage, from all retrying at the same instant.
    """
    ceiling = min(max_s, initial_s * 2 ** min(attempt, 32))
    return random.uniform(ceiling / 2, ceiling)


async def sleep_unless_stopped(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`; raise StopRequested as soon as `stopping` is set."""
    if stopping.is_set():
        raise StopRequested
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except TimeoutError:
        return
    raise StopRequested

"""Waiting out a failure: exponential back-off with jitter, cut short by a stop request.

Every wait in the consumer (a database or broker away at start-up or mid-run)
goes through here, so that a SIGTERM is obeyed within the shutdown deadline
whatever the process is waiting for.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


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


async def unless_stopped(stopping: asyncio.Event, step: Awaitable[T]) -> T:
    """Await `step`; cancel it and raise StopRequested as soon as `stopping` is set.

    For steps that bound themselves only loosely (a connection attempt, a
    broker bootstrap): a stop request need not wait for their own timeouts.
    """
    if stopping.is_set():
        raise StopRequested
    task = asyncio.ensure_future(step)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait([task], timeout=1.0)
    raise StopRequested

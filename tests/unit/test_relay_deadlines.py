"""The relay's units of work end by their deadlines, and say so when they do not (fakes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from intentflow.consumer.relay import Relay
from intentflow.consumer.settings import ConsumerSettings


class SilentConnection:
    """A connection whose every query hangs; `ends_work`: whether ending it ends them."""

    def __init__(self, ends_work: bool) -> None:
        self.ends_work = ends_work
        self.terminated = 0
        self._ended = asyncio.Event()

    def terminate(self) -> None:
        self.terminated += 1
        if self.ends_work:
            self._ended.set()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield

    async def fetch(self, *_: Any) -> list[Any]:
        await self._ended.wait()
        raise ConnectionResetError("connection was closed in the middle of operation")


class Pool:
    """Lends a new silent connection each time (an ended one is not lent again)."""

    def __init__(self, ends_work: bool) -> None:
        self.ends_work, self.lent, self.terminated = ends_work, list[SilentConnection](), False

    @asynccontextmanager
    async def acquire(self, *, timeout: float | None = None) -> AsyncIterator[SilentConnection]:  # noqa: ASYNC109
        self.lent.append(SilentConnection(self.ends_work))
        yield self.lent[-1]

    async def close(self) -> None:
        if not self.ends_work:
            await asyncio.sleep(3600)  # a lent connection that never comes back

    def terminate(self) -> None:
        self.terminated = True


def relay(ends_work: bool) -> tuple[Relay, Pool]:
    # One statement's deadline: 0.1 s statement timeout + 0.1 s connect; a claim of order
    # events: two of those and two statement timeouts (the producer's start, the acks).
    settings = ConsumerSettings(
        db_statement_timeout_ms=100, db_connect_timeout_s=0.1, shutdown_timeout_s=0.5,
        retry_initial_s=0.05, retry_max_s=0.1, relay_poll_interval_s=0.01,
    )  # fmt: skip
    pool = Pool(ends_work)

    async def open_pool() -> Pool:
        return pool

    def no_events() -> Any:
        raise AssertionError("nothing to publish")

    return Relay(settings, open_pool=open_pool, new_events=no_events, stripe=None), pool


async def test_a_claim_on_a_silent_connection_ends_by_its_deadline_and_is_waited_out() -> None:
    r, pool = relay(ends_work=True)
    async with asyncio.timeout(5), r:
        running = asyncio.create_task(r.run())
        await asyncio.sleep(0.8)
        ended = [c for c in pool.lent if c.terminated]
        assert len(ended) >= 2  # each unit ended at its deadline, and tried again
        assert r.stats.database_waits >= 2
        assert r.overdue(0.1) is None
        r.request_stop()
        await running


async def test_a_unit_that_outlives_its_deadline_is_reported_and_a_stop_does_not_wait() -> None:
    r, pool = relay(ends_work=False)  # a bug's stand-in: a connection's end does not end it
    async with asyncio.timeout(5):
        await r.start()
        running = asyncio.create_task(r.run())
        await asyncio.sleep(0.1)
        assert r.overdue(0.0) is None
        await asyncio.sleep(0.8)
        late = r.overdue(0.1)
        assert late is not None and late.startswith("the relay's "), late
        assert "has made no progress for" in late and "(its deadline is" in late
        started = asyncio.get_running_loop().time()
        r.request_stop()
        await running
        await r.stop()  # the pool's close waits for the lent connection: terminated instead
        assert pool.terminated
        assert asyncio.get_running_loop().time() - started < 1.5

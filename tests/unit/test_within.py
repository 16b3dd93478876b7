"""`within` (consumer/database.py): a unit of work's deadline holds even when the pool hands
over its connection at the very moment the deadline passes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from intentflow.consumer.database import NoAnswer, within


class SilentConnection:
    """A connection whose server never answers: only terminate() ends a query."""

    def __init__(self) -> None:
        self.terminated = asyncio.Event()

    def terminate(self) -> None:
        self.terminated.set()

    async def fetchval(self, _query: str) -> Any:
        await self.terminated.wait()
        raise ConnectionError("terminated")


class LatePool:
    """Hands its connection over `late_s` after being asked, whatever the timeout."""

    def __init__(self, late_s: float) -> None:
        self.late_s = late_s
        self.conn = SilentConnection()

    @contextlib.asynccontextmanager
    async def acquire(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 - asyncpg.Pool.acquire's signature
    ) -> AsyncIterator[SilentConnection]:
        await asyncio.sleep(self.late_s)
        yield self.conn


async def test_a_connection_handed_over_after_the_deadline_is_ended_not_used() -> None:
    pool = LatePool(late_s=0.2)
    with pytest.raises(NoAnswer):
        async with asyncio.timeout(5), within(pool, 0.1, "readiness check") as conn:
            await conn.fetchval("SELECT 1")
    assert pool.conn.terminated.is_set()


async def test_a_query_past_the_deadline_ends_its_connection() -> None:
    pool = LatePool(late_s=0.0)
    with pytest.raises(NoAnswer):
        async with asyncio.timeout(5), within(pool, 0.1, "readiness check") as conn:
            await conn.fetchval("SELECT 1")
    assert pool.conn.terminated.is_set()

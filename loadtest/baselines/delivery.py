"""Concurrent senders that hand every copy of an event to a handler at the same moment.

Stripe retries a delivery whose first attempt is still running (a timeout on
its side), and a shop runs several webhook workers, so the copies of one event
meet in the handler. `simultaneous` groups a workload's deliveries by event id,
in the order of each event's first delivery. `deliver`, for each group in turn:
  1. takes one connection per copy from a pool of `senders` connections (a
     sender = a webhook worker with its own database connection);
  2. starts every copy of the group in the same event-loop turn, and goes on
     to the next group without waiting (so at most `senders` are in flight);
  3. a copy whose handler raises (a deadlock, a lease that timed out) has been
     rolled back: it is handed over again after `retry_s`, as Stripe retries a
     webhook that did not get a 2xx, up to `attempts` times in all.

A delivery's latency runs from handing it to the handler the first time to the
return of the attempt that succeeded (its commit, and a lease's release).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from intentflow.consumer.connections import Connection

Handler = Callable[[Connection, dict[str, Any]], Awaitable[object]]


@dataclass
class DeliveryReport:
    deliveries: int = 0
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # failed attempts, by exception class
    failed: int = 0  # deliveries that failed every attempt

    @property
    def deliveries_per_s(self) -> float:
        return self.deliveries / self.elapsed_s if self.elapsed_s else 0.0


def simultaneous(deliveries: Iterable[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Every delivery of one event in one group, groups in order of first delivery."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for delivery in deliveries:
        groups.setdefault(delivery["id"], []).append(delivery)
    return list(groups.values())


async def deliver(
    database_url: str,
    handler: Handler,
    groups: list[list[dict[str, Any]]],
    *,
    senders: int = 32,
    attempts: int = 3,
    retry_s: float = 0.05,
) -> DeliveryReport:
    """Hand every group's copies to `handler` together; return when all have finished."""
    report = DeliveryReport()
    pool = await asyncpg.create_pool(database_url, min_size=senders, max_size=senders)

    async def one(conn: PoolConnectionProxy, event: dict[str, Any]) -> None:
        started = time.perf_counter()
        for attempt in range(1, attempts + 1):
            try:
                await handler(conn, event)
            except Exception as exc:  # what a webhook endpoint turns into a 500
                report.errors[type(exc).__name__] += 1
                if attempt == attempts:
                    report.failed += 1
                    break
                await pool.release(conn)
                await asyncio.sleep(retry_s)
                conn = await pool.acquire()
            else:
                report.latencies_ms.append((time.perf_counter() - started) * 1000)
                break
        await pool.release(conn)

    try:
        clock = time.perf_counter()
        async with asyncio.TaskGroup() as tasks:
            for group in groups:
                for start in range(0, len(group), senders):  # a group wider than the pool
                    copies = group[start : start + senders]
                    conns = [await pool.acquire() for _ in copies]
                    for conn, event in zip(conns, copies, strict=True):
                        tasks.create_task(one(conn, event))
                report.deliveries += len(group)
        report.elapsed_s = time.perf_counter() - clock
    finally:
        await pool.close()
    return report

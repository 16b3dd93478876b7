"""Faults while a replay runs, each one timestamped.

- `consumer-kill`: SIGKILL one consumer process (round robin), start it again
  after `down_s`. Its uncommitted batch is redelivered to whoever gets its
  partitions; the inbox makes the second application a duplicate.
- `db-connections`: terminate every session of the replay's database, as a
  failover or an operator's `pg_terminate_backend` does. The consumers reconnect.
- `db-restart`: stop PostgreSQL (a clean fast shutdown) and start it again
  after `down_s` (only a server the stack started).
- `broker-outage`: cut the bridge off from Kafka for `down_s` (only a broker
  the stack started); the bridge answers 503 and the senders retry.
- `webhook-outage`: for `down_s`, every delivery is dropped, as Stripe's
  attempts fail at an endpoint that is away (loadtest/outage.py); after the
  load, `order-consumer backfill` mends what never got through.

`Chaos.run` starts one fault `every_s` after the last one started (a fault
that lasts longer delays the next), cycling through the kinds, until the load has
ended and every kind has happened at least once; a fault injected after the
load says so in its detail.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from intentflow.loadtest.outage import Outage
from intentflow.loadtest.report import Fault
from intentflow.loadtest.stack import Stack

# In the order `all` injects them: the outages while the load is still on.
KINDS = ("consumer-kill", "broker-outage", "webhook-outage", "db-connections", "db-restart")
DEFAULT_KINDS = ("consumer-kill", "broker-outage", "db-connections")


class ChaosError(ValueError):
    """A fault was asked for that this stack cannot stage."""


def parse_kinds(text: str) -> tuple[str, ...]:
    """The comma-separated kinds, checked; "all" means every kind."""
    kinds = KINDS if text == "all" else tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ChaosError(f"unknown fault {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    return kinds


# Appended to a fault's detail when it came after the last delivery was acknowledged.
AFTER_LOAD = "(after the load)"


def check_possible(
    kinds: tuple[str, ...], *, owns_broker: bool, owns_postgres: bool, via: str
) -> None:
    """ChaosError for a fault this run could not stage, before anything is started."""
    if "db-restart" in kinds and not owns_postgres:
        raise ChaosError("db-restart needs the embedded PostgreSQL: unset DATABASE_URL")
    if "broker-outage" in kinds and not owns_broker:
        raise ChaosError("broker-outage needs the embedded broker: unset KAFKA_BOOTSTRAP_SERVERS")
    if "broker-outage" in kinds and via != "bridge":
        raise ChaosError("broker-outage cuts the bridge off, which --via kafka does not use")


class Chaos:
    def __init__(
        self,
        stack: Stack,
        kinds: tuple[str, ...],
        *,
        every_s: float = 3.0,
        down_s: float = 2.0,
        started: float | None = None,
        outage: Outage | None = None,
    ) -> None:
        self._stack = stack
        self._outage = outage or Outage()
        self._kinds = kinds
        self._every_s = every_s
        self._down_s = down_s
        self._started = started or time.time()
        self._stop = asyncio.Event()
        self._next_consumer = 0
        self.faults: list[Fault] = []

    def load_ended(self) -> None:
        """From now on, only the kinds that have not happened yet, then stop."""
        self._stop.set()

    async def run(self) -> list[Fault]:
        n = 0
        while True:
            if self._stop.is_set():
                seen = {f.kind for f in self.faults}
                missing = [k for k in self._kinds if k not in seen]
                if not missing:
                    return self.faults
                kind = missing[0]  # after the load, only the kinds not yet seen
            else:
                # every_s after the last one started; a long fault delays the next.
                due = self.faults[-1].at_s + self._started if self.faults else self._started
                due += self._every_s
                try:
                    await asyncio.wait_for(self._stop.wait(), max(0.0, due - time.time()))
                    continue
                except TimeoutError:
                    kind = self._kinds[n % len(self._kinds)]
                    n += 1
            after_load = self._stop.is_set()  # as it began: a fault may outlast the load
            fault = await self._inject(kind)
            if after_load:
                fault.detail = f"{fault.detail} {AFTER_LOAD}"
            self.faults.append(fault)

    async def _inject(self, kind: str) -> Fault:
        at = time.time()
        if kind == "consumer-kill":
            detail = await self._kill_consumer()
        elif kind == "db-connections":
            detail = await self._terminate_sessions()
        elif kind == "db-restart":
            detail = await self._restart_postgres()
        elif kind == "webhook-outage":
            detail = await self._drop_webhooks()
        else:
            detail = await self._cut_bridge()
        duration = time.time() - at
        return Fault(kind, at - self._started, duration, detail, survived=True)

    async def _kill_consumer(self) -> str:
        i = self._next_consumer % len(self._stack.consumers)
        self._next_consumer += 1
        pid = self._stack.kill_consumer(i)
        await asyncio.sleep(self._down_s)
        self._stack.start_consumer(i)
        return f"consumer {i + 1} (pid {pid}) killed -9, started again after {self._down_s:g} s"

    async def _terminate_sessions(self) -> str:
        admin = await asyncpg.connect(self._stack.admin_url)
        try:
            killed = await admin.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))"
                " FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                self._stack.database,
            )
        finally:
            await admin.close()
        return f"{killed} sessions of {self._stack.database} terminated"

    async def _restart_postgres(self) -> str:
        server = self._stack.postgres
        assert server is not None
        await asyncio.to_thread(server.shut_down)
        await asyncio.sleep(self._down_s)
        await asyncio.to_thread(server.start_again)
        return f"PostgreSQL stopped (fast shutdown), started again after {self._down_s:g} s"

    async def _drop_webhooks(self) -> str:
        dropped = self._outage.dropped
        self._outage.down = True
        await asyncio.sleep(self._down_s)
        self._outage.down = False
        return f"{self._outage.dropped - dropped} deliveries dropped in {self._down_s:g} s"

    async def _cut_bridge(self) -> str:
        self._stack.cut_bridge()
        await asyncio.sleep(self._down_s)
        self._stack.restore_bridge()
        return f"the bridge cut off from Kafka for {self._down_s:g} s"

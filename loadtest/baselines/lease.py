"""The naive handler guarded by a lease lock per payment intent, as a workflow engine's lock step.

For each delivery, in order:
  1. take the lease `<prefix><payment intent id>` with a fresh token and a TTL;
     while another holder has it, sleep `retry_ms` and try again (up to `wait_s`,
     then the delivery fails as a timed-out lock step does, and Stripe retries it);
  2. run `naive.Shop.handle`; a share `slow_share` of the runs that find no
     order stall for `slow_factor` x TTL between the handler's check and its
     write (a slow call out, a pause of the process), so their lease expires
     while they work;
  3. release the lease only if this delivery still holds it (its token).

Two backends, as such engines offer: Redis (`SET key token NX PX ttl`, released
by a compare-and-delete script) when a Redis URL is given, otherwise a lease
table in PostgreSQL taken with `INSERT … ON CONFLICT DO UPDATE … WHERE
expires_at < clock_timestamp()`.

The lease does what it promises while every holder finishes within its TTL.
What it cannot do: keep a second copy out once a slow holder's lease has
expired (nothing in the database refuses the second order), or protect stock,
which is shared between intents that hold different leases.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from typing import Any, Protocol

import redis.asyncio

from intentflow.consumer.connections import Connection
from intentflow.loadtest.baselines.naive import Pause, Shop
from intentflow.schemas import payment_intent_key

REDIS, POSTGRES = "redis", "postgres"

# Delete the key only if it still holds our token: a holder whose lease expired
# must not release the lease of the one that took it over.
_RELEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


class LeaseTimeout(Exception):
    """The lease stayed taken for longer than the lock step waits."""


class LeaseBackend(Protocol):
    name: str

    async def acquire(self, conn: Connection, key: str, token: str, ttl_ms: int) -> bool:
        """Take the lease if it is free or expired; True if this token now holds it."""

    async def release(self, conn: Connection, key: str, token: str) -> None:
        """Free the lease if this token still holds it."""


class RedisLease:
    """`SET key token NX PX ttl`, released by compare-and-delete."""

    name = REDIS

    def __init__(self, url: str) -> None:
        self._client = redis.asyncio.Redis.from_url(url)
        self._release = self._client.register_script(_RELEASE_LUA)

    async def check(self) -> None:
        """Fail now, with redis' own error, if the server does not answer."""
        await self._client.ping()

    async def acquire(self, conn: Connection, key: str, token: str, ttl_ms: int) -> bool:
        return bool(await self._client.set(key, token, nx=True, px=ttl_ms))

    async def release(self, conn: Connection, key: str, token: str) -> None:
        await self._release(keys=[key], args=[token])

    async def close(self) -> None:
        await self._client.aclose()


class PostgresLease:
    """A lease table in the shop's schema, on the delivery's own connection (autocommit)."""

    name = POSTGRES

    def __init__(self, schema: str) -> None:
        self._table = f"{Shop(schema).schema}.leases"  # Shop checks the name

    async def create(self, conn: Connection) -> None:
        await conn.execute(
            f"CREATE TABLE {self._table} ("
            " key text PRIMARY KEY, token text NOT NULL, expires_at timestamptz NOT NULL)"
        )

    async def acquire(self, conn: Connection, key: str, token: str, ttl_ms: int) -> bool:
        taken = await conn.fetchval(
            f"""
            INSERT INTO {self._table} AS l (key, token, expires_at)
            VALUES ($1, $2, clock_timestamp() + $3 * interval '1 millisecond')
            ON CONFLICT (key) DO UPDATE
                SET token = excluded.token, expires_at = excluded.expires_at
                WHERE l.expires_at < clock_timestamp()
            RETURNING token
            """,
            key,
            token,
            ttl_ms,
        )
        return bool(taken == token)

    async def release(self, conn: Connection, key: str, token: str) -> None:
        await conn.execute(f"DELETE FROM {self._table} WHERE key = $1 AND token = $2", key, token)


class LeasedShop:
    """`Shop.handle` inside a lease per payment intent, with some holders slower than the TTL."""

    def __init__(
        self,
        shop: Shop,
        backend: LeaseBackend,
        *,
        ttl_ms: int = 200,
        retry_ms: int = 20,
        wait_s: float = 30.0,
        slow_share: float = 0.02,
        slow_factor: float = 1.5,
        seed: int = 7,
        prefix: str = "order-lease:",
    ) -> None:
        self.shop = shop
        self.backend = backend
        self.ttl_ms = ttl_ms
        self.retry_ms = retry_ms
        self.wait_s = wait_s
        self.slow_share = slow_share
        self.slow_factor = slow_factor
        self.prefix = prefix
        self._rng = random.Random(seed)
        self.stalls = 0  # handler runs that stalled past their TTL
        self.waits = 0  # deliveries that found the lease taken at least once

    async def _stall(self) -> None:
        self.stalls += 1
        await asyncio.sleep(self.ttl_ms * self.slow_factor / 1000)

    async def handle(self, conn: Connection, event: dict[str, Any]) -> str:
        key = self.prefix + (payment_intent_key(event) or event["id"])
        token = secrets.token_hex(8)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        waited = False
        while not await self.backend.acquire(conn, key, token, self.ttl_ms):
            if loop.time() >= deadline:
                raise LeaseTimeout(f"lease {key} still taken after {self.wait_s:g} s")
            waited = True
            await asyncio.sleep(self.retry_ms / 1000)
        self.waits += waited
        try:
            pause: Pause | None = self._stall if self._rng.random() < self.slow_share else None
            return await self.shop.handle(conn, event, pause)
        finally:
            await self.backend.release(conn, key, token)

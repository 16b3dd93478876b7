"""How the consumer's connections are made (consumer/database.py), against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import socket
import time
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from intentflow.consumer import database
from intentflow.consumer.connections import create_pool
from intentflow.consumer.database import Begin, NoAnswer, within
from intentflow.devservices import Services
from intentflow.devservices.proxy import Proxy
from tests.support import consumer_settings


def socket_options(conn: asyncpg.Connection) -> tuple[int, int, int, int, int]:
    sock = conn._transport.get_extra_info("socket")  # type: ignore[attr-defined]
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    )


async def test_every_connection_has_keepalives_and_a_user_timeout(
    infra: Services, database_url: str
) -> None:
    settings = consumer_settings(
        infra, database_url, "unused", db_tcp_keepalive_s=9, db_tcp_user_timeout_s=21
    )
    expected = (1, 9, 3, 3, 21_000)
    conn = await database.connect(settings, name="test")  # the tools' and the start-up check's
    try:
        assert socket_options(conn) == expected
    finally:
        await conn.close()
    pool = await create_pool(settings)  # the worker's and the relay's
    try:
        async with pool.acquire() as pooled:
            assert socket_options(pooled._con) == expected  # type: ignore[attr-defined]
    finally:
        await pool.close()


@pytest.mark.parametrize("mode", ["session", "transaction"])
async def test_timeouts_live_in_each_transaction_not_in_the_session(
    infra: Services, database_url: str, mode: str
) -> None:
    settings = consumer_settings(
        infra, database_url, "unused", db_statement_timeout_ms=1234, db_pool_mode=mode
    )
    pool = await create_pool(settings, idle_in_transaction_ms=4321)
    try:
        async with pool.acquire() as conn:
            async with conn.transaction():
                inside = await conn.fetchrow(
                    "SELECT current_setting('statement_timeout') AS statement,"
                    " current_setting('idle_in_transaction_session_timeout') AS idle,"
                    " current_setting('application_name') AS name"
                )
            outside = await conn.fetchrow(
                "SELECT current_setting('statement_timeout') AS statement,"
                " current_setting('application_name') AS name"
            )
            # A nested block is a savepoint of the same transaction: nothing to set again.
            async with conn.transaction(), conn.transaction():
                assert await conn.fetchval("SHOW statement_timeout") == "1234ms"
    finally:
        await pool.close()
    assert inside is not None and outside is not None
    assert (inside["statement"], inside["idle"], inside["name"]) == (
        "1234ms",
        "4321ms",
        "order-consumer",
    )
    assert outside["statement"] == "0"  # the server's own: nothing was set for the session
    # Only behind a pooler in transaction mode is the name, too, the transaction's alone.
    assert outside["name"] == ("" if mode == "transaction" else "order-consumer")


async def test_a_unit_of_work_on_a_silent_connection_ends_by_its_deadline(
    infra: Services, database_url: str
) -> None:
    url = urlsplit(database_url)
    proxy = await Proxy(url.hostname or "127.0.0.1", url.port or 5432).start()
    through = urlunsplit(url._replace(netloc=f"{url.username}@127.0.0.1:{proxy.port}"))
    pool = await create_pool(consumer_settings(infra, through, "unused"))
    try:
        async with within(pool, 2, "warm-up") as conn:
            assert await conn.fetchval("SELECT 1") == 1
        proxy.freeze()
        started = time.monotonic()
        with pytest.raises(NoAnswer, match=r"no answer from the database within 0\.5 s"):
            # (Bounded here too: without the deadline's end, asyncpg would wait for ever.)
            async with asyncio.timeout(5), within(pool, 0.5, "test") as conn, conn.transaction():
                await conn.fetchval("SELECT 2")
        # Not waited for: no cancel acknowledged, no rollback answered.
        assert time.monotonic() - started < 1.0
        async with within(pool, 5, "after") as conn:  # a fresh connection; the old one is gone
            assert await conn.fetchval("SELECT 3") == 3
    finally:
        pool.terminate()
        await proxy.cut()


async def test_a_begin_setting_quotes_what_it_is_given() -> None:
    assert Begin().sql() == ""
    assert Begin(100, None, "it's").sql() == (
        "SET LOCAL statement_timeout = 100; SET LOCAL application_name = 'it''s'"
    )

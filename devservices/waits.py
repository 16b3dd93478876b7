"""Waiting for started processes: the harness and `make dev` go on once each answers.

`until_answering`: an HTTP endpoint (the bridge's /readyz) answers 200.
`until_stable`: a consumer group is Stable with all its members.
`still_running` is called between looks: it raises if a process has exited, so
that the caller says so instead of waiting out the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import httpx
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError


async def until_stable(
    bootstrap_servers: str,
    group_id: str,
    members: int,
    *,
    timeout_s: float,
    still_running: Callable[[], None] = lambda: None,
) -> bool:
    """True once `group_id` is Stable with `members` members; False after `timeout_s`."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            still_running()
            with contextlib.suppress(KafkaError):
                (response,) = await admin.describe_consumer_groups([group_id])
                group = response.groups[0]
                state, joined = group[2], group[5]
                if state == "Stable" and len(joined) == members:
                    return True
            await asyncio.sleep(0.2)
        return False
    finally:
        await admin.close()


async def until_answering(
    url: str, *, timeout_s: float, still_running: Callable[[], None] = lambda: None
) -> bool:
    """True once GET `url` answers 200; False after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with httpx.AsyncClient() as client:
        while loop.time() < deadline:
            still_running()
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return True
            await asyncio.sleep(0.1)
    return False

"""Waiting for a consumer group to settle: the harness and `make dev` start on a running group."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

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
    """True once `group_id` is Stable with `members` members; False after `timeout_s`.

    `still_running` is called between looks: it raises if a member's process
    has exited, so that the caller says so instead of waiting out the timeout.
    """
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

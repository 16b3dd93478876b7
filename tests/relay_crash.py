"""A relay process that dies in the middle of its second batch of order events (a test driver).

`python -m tests.relay_crash after_acks|before_publish`, with the consumer's
settings in the environment (tests/support.py `consumer_env`). It runs the real
relay (consumer/relay.py) with the real producer (consumer/order_events.py),
wrapped so that on the second `publish` the process ends with `os._exit(137)`,
as a SIGKILL or an OOM kill would end it, with no cleanup:
  - `after_acks`: after the broker acknowledged every row of the batch, before
    the relay records the marks (the window the outbox's at-least-once covers);
  - `before_publish`: before anything of the batch is sent.
Every `publish` is reported on stdout as one JSON line, `{"call", "ids",
"acknowledged"}`, flushed before the next step, the last one with `"crash"`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from aiokafka.errors import KafkaError

from intentflow.consumer import logs
from intentflow.consumer.bootstrap import build_relay, order_events
from intentflow.consumer.claims import Claimed
from intentflow.consumer.order_events import OrderEvents
from intentflow.consumer.settings import ConsumerSettings

CRASH_ON_CALL = 2
EXIT_KILLED = 137  # what a shell reports for SIGKILL


def report(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


class DyingEvents:
    """The real order events producer (as `consumer.bootstrap.build_relay` makes it),
    until the call that ends the process."""

    def __init__(self, real: OrderEvents, when: str) -> None:
        self.topic = real.topic
        self._real = real
        self._when = when
        self._calls = 0

    async def start(self) -> None:
        await self._real.start()

    async def stop(self) -> None:
        await self._real.stop()

    async def publish(self, rows: Sequence[Claimed]) -> list[KafkaError | None]:
        self._calls += 1
        ids = [row.id for row in rows]
        if self._calls == CRASH_ON_CALL and self._when == "before_publish":
            report(call=self._calls, ids=ids, acknowledged=[], crash=self._when)
            os._exit(EXIT_KILLED)
        results = await self._real.publish(rows)
        acknowledged = [row.id for row, error in zip(rows, results, strict=True) if error is None]
        if self._calls == CRASH_ON_CALL:
            report(call=self._calls, ids=ids, acknowledged=acknowledged, crash=self._when)
            os._exit(EXIT_KILLED)
        report(call=self._calls, ids=ids, acknowledged=acknowledged)
        return results


async def main(when: str) -> int:
    settings = ConsumerSettings()
    logs.configure(settings.log_level, settings.log_format)  # on stderr: stdout is the report
    real = order_events(settings)
    relay = build_relay(settings, new_events=lambda: DyingEvents(real(), when))
    async with relay:
        await relay.run(exit_when_idle=True)
    report(finished=True)  # the crash never came: too few rows for a second batch
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("after_acks", "before_publish"):
        sys.exit("usage: python -m tests.relay_crash after_acks|before_publish")
    sys.exit(asyncio.run(main(sys.argv[1])))

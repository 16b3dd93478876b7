"""A webhook outage, and its mending from Stripe's Events API (`--chaos webhook-outage`).

While an outage lasts (`Outage.down`), every delivery the plan sends is dropped, as
Stripe's attempts fail at an endpoint that is away; a copy planned after it (one of
Stripe's retries) still gets through. An event whose every copy fell in an outage is
never delivered: lost, as when Stripe gives up after three days.

After the load, `mend` does what an operator does (docs/operating.md, "a webhook
outage"): serves the scenario's events as Stripe's read API (loadtest/stripe_api.py:
the events, and each object's latest snapshot), runs `order-consumer reconcile
--with-stripe` (it must see the outage), `order-consumer backfill` over the
scenario's window, waits for the consumers, and runs `reconcile --with-stripe` again
(it must see nothing the backfill mends).
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from intentflow.loadtest import readback
from intentflow.loadtest.delivery import Send, Tally
from intentflow.loadtest.report import Check
from intentflow.loadtest.stack import Stack
from intentflow.loadtest.stripe_api import StripeReadApi
from intentflow.loadtest.workload import Scenario

# What a backfill mends (docs/operating.md): a payment with no order, an order whose
# intent moved on at Stripe. Money Stripe still holds for an unfillable order is the
# relay's to release, and this harness's relay has no Stripe key.
MENDED_BY_BACKFILL = ("stripe_payment_without_order", "stripe_state_differs")


@dataclass
class Outage:
    down: bool = False
    dropped: int = 0  # deliveries
    dropped_ids: set[str] = field(default_factory=set)

    def swallows(self, send: Send) -> bool:
        """Whether this delivery is dropped, the endpoint being away."""
        if self.down:
            self.dropped += send.copies
            self.dropped_ids.add(send.event_id)
        return self.down


@dataclass
class Mending:
    never_delivered: int  # events none of whose copies got through
    before: dict[str, int]  # reconcile --with-stripe's differences before the backfill
    backfill: dict[str, Any]  # its JSON summary
    after: dict[str, int]
    caught_up: bool
    problems: list[str] = field(default_factory=list)

    def checks(self) -> list[Check]:
        seen = sum(self.before.get(name, 0) for name in MENDED_BY_BACKFILL)
        left = {name: self.after.get(name, 0) for name in MENDED_BY_BACKFILL}
        published = int(self.backfill.get("this_session", {}).get("published", -1))
        return [
            Check(
                "reconcile --with-stripe sees the outage",
                "> 0 differences" if self.never_delivered else "0",
                f"{seen} ({_show(self.before)})",
                seen > 0 if self.never_delivered else seen == 0,
            ),
            Check(
                "backfill publishes the events never delivered",
                str(self.never_delivered),
                str(published) if not self.problems else "; ".join(self.problems),
                published == self.never_delivered and self.caught_up and not self.problems,
            ),
            Check(
                "reconcile --with-stripe after the backfill",
                "0 differences",
                f"{sum(left.values())} ({_show(self.after)})",
                sum(left.values()) == 0 and not self.problems,
            ),
        ]


def _show(found: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(found.items())) or "none"


async def mend(stack: Stack, world: Scenario, tally: Tally) -> Mending:
    never = {e["id"] for e in world.events} - tally.acked_ids
    since = datetime.fromtimestamp(min(e["created"] for e in world.events), UTC).isoformat()
    async with StripeReadApi(world.events) as api:
        env = {**stack.consumer_env(), "STRIPE_API_KEY": api.api_key}
        env["STRIPE_API_BASE"] = api.base_url
        problems: list[str] = []
        before, why = await _with_stripe(env, since)
        problems += why
        code, out, err = await _tool(env, "backfill", "--since", since, "--slice", "1d", "--json")
        backfill: dict[str, Any] = json.loads(out) if code == 0 else {}
        if code != 0:
            problems.append(f"backfill exited {code}: {err.strip()}")
        everything = Tally(acked_ids={e["id"] for e in world.events})
        caught_up = await readback.wait_caught_up(stack, everything)
        after, why = await _with_stripe(env, since)
        problems += why
    return Mending(len(never), before, backfill, after, caught_up, problems)


async def _with_stripe(env: dict[str, str], since: str) -> tuple[dict[str, int], list[str]]:
    """The Stripe checks' violations, by name, of `reconcile --with-stripe`."""
    # The consumers have caught up: nothing is on its way, so everything is judged.
    code, out, err = await _tool(
        env, "reconcile", "--with-stripe", "--since", since, "--settle", "0", "--json"
    )
    if code not in (0, 1):
        return {}, [f"reconcile --with-stripe exited {code}: {err.strip()}"]
    report = json.loads(out)
    return {
        c["name"]: int(c["violations"])
        for c in report["checks"]
        if c["name"].startswith("stripe_") and c["violations"]
    }, []


async def _tool(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "intentflow.consumer", *argv, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()

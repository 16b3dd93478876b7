"""What the relay exports to Prometheus, and the relay alone's /healthz, /readyz and /metrics.

In the process's registry (the worker's under `run`, one of its own under
`relay`), subsystem `intentflow_relay_`:

  stripe_actions_total{action,outcome}   attempts at Stripe actions, by the row's action and
                                         how it ended (consumer/stripe_answers.py, `Outcome`):
                                         Stripe's answer, or the one the webhooks already gave
  order_events_total{outcome}            order events handled: published, retry (not
                                         acknowledged, due again), rejected (refused for good)
  pending_rows{kind,action}              outbox rows pending: Stripe actions by action, order
                                         events as action `publish`; read at scrape time
  oldest_pending_seconds                 age of the oldest pending row (0: none); read at scrape

`OutboxGauges.read` reads the outbox at scrape time (consumer/claims.py,
`backlog`), through the relay's pool, bounded: a database that does not answer
leaves the last reading, and /readyz says why. `RelayHealth` is the admin
server's `Health` (consumer/probes.py) for `order-consumer relay`, which also
exports the money that needs a person (consumer/owed.py, the same gauges
`run` exports).
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from intentflow.consumer import owed
from intentflow.consumer.claims import backlog
from intentflow.consumer.database import within
from intentflow.consumer.errors import Fault, classify, describe
from intentflow.consumer.metrics import CONTENT_TYPE, MoneyGauges
from intentflow.consumer.outbox import Action, Kind
from intentflow.consumer.probes import OVERDUE_SLACK_S, STUCK_AFTER_S
from intentflow.consumer.stripe_answers import Outcome
from intentflow.schemas.metrics import NAMESPACE, service_registry

log = structlog.get_logger("relay")

SCRAPE_READ_TIMEOUT_S = 2.0
READY_DATABASE_TIMEOUT_S = 2.0
PUBLISH = "publish"  # the action of an order event's row, in pending_rows
ORDER_EVENT_OUTCOMES = ("published", "retry", "rejected")


class RelayMetrics:
    """The relay's counters and gauges, in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        ns, sub = NAMESPACE, "relay"
        self.stripe_actions = Counter(
            "stripe_actions",
            "Stripe actions attempted, by action and outcome: Stripe's answer, or the one the "
            "webhooks already gave.",
            ["action", "outcome"], namespace=ns, subsystem=sub, registry=registry,
        )  # fmt: skip
        # Every pair exported from the start, so that a rate over it exists at zero.
        for action in Action:
            for outcome in Outcome:
                self.stripe_actions.labels(str(action), str(outcome))
        self.order_events = Counter(
            "order_events", "Order events handled, by outcome: published, retry, rejected.",
            ["outcome"], namespace=ns, subsystem=sub, registry=registry,
        )  # fmt: skip
        for published in ORDER_EVENT_OUTCOMES:
            self.order_events.labels(published)
        self.pending = Gauge(
            "pending_rows", "Outbox rows pending, by kind and action (order events: publish).",
            ["kind", "action"], namespace=ns, subsystem=sub, registry=registry,
        )  # fmt: skip
        for action in Action:
            self.pending.labels(str(Kind.STRIPE_ACTION), str(action))
        self.pending.labels(str(Kind.ORDER_EVENT), PUBLISH)
        self.oldest_pending = Gauge(
            "oldest_pending_seconds", "Age of the oldest pending outbox row (0: none pending).",
            namespace=ns, subsystem=sub, registry=registry,
        )  # fmt: skip

    def stripe_answered(self, action: str, outcome: str) -> None:
        self.stripe_actions.labels(action, outcome).inc()

    def order_events_marked(self, outcomes: list[str]) -> None:
        for outcome in outcomes:
            self.order_events.labels(outcome).inc()

    async def read(self, pool: Any) -> None:
        """The outbox's pending rows and oldest age, from the database now (bounded)."""
        try:
            async with asyncio.timeout(SCRAPE_READ_TIMEOUT_S), pool.acquire() as conn:
                left = await backlog(conn)
        except Exception as exc:
            _scrape_failed("outbox_read", exc)
            return
        for action in Action:  # every known action, zero when none is pending
            self.pending.labels(str(Kind.STRIPE_ACTION), str(action)).set(0)
        for name, n in left.actions.items():  # an action another version wrote, too
            self.pending.labels(str(Kind.STRIPE_ACTION), name).set(n)
        self.pending.labels(str(Kind.ORDER_EVENT), PUBLISH).set(left.pending[Kind.ORDER_EVENT])
        self.oldest_pending.set(left.oldest_pending_s or 0.0)


def _scrape_failed(what: str, exc: Exception) -> None:
    # A scrape is not the relay's loop: whatever went wrong, the next one asks again.
    if classify(exc) is Fault.FATAL:
        log.exception(f"{what}_failed")
    else:
        log.debug(f"{what}_skipped", error=describe(exc, 200))


class RelayHealth:
    """/healthz, /readyz and /metrics for `order-consumer relay` (consumer/probes.py's `Health`).

    Alive while the process answers and no claim runs long past its deadline (its
    deadline ends its connection: one still running then is stuck); ready once the
    relay's pool is open, no claim has run out its deadline, its loops are not
    waiting out a failure, and the database answers within READY_DATABASE_TIMEOUT_S
    (a connection that does not is ended, as every unit of work's).
    """

    def __init__(self, relay: Any, capture_warning_s: float) -> None:
        self._relay = relay
        self._capture_warning_s = capture_warning_s
        self._money = MoneyGauges(relay.metrics.registry)

    def alive(self) -> tuple[bool, str]:
        if self._relay.stopping.is_set():
            return True, "stopping"
        if (stuck := self._relay.overdue(STUCK_AFTER_S)) is not None:
            return False, f"stuck: {stuck}"
        return True, "alive"

    async def ready(self) -> tuple[bool, str]:
        relay = self._relay
        if relay.stopping.is_set():
            return False, "stopping"
        if relay.pool is None:
            return False, "starting: checking the database and the orders topic"
        if (late := relay.overdue(OVERDUE_SLACK_S)) is not None:
            return False, late
        if relay.waiting_out is not None:
            return False, f"waiting out a failure: {relay.waiting_out}"
        try:
            async with within(relay.pool, READY_DATABASE_TIMEOUT_S, "readiness check") as conn:
                await conn.fetchval("SELECT 1")
        except Exception as exc:
            return False, f"the database does not answer: {describe(exc, 200)}"
        return True, "ready"

    async def exposition(self) -> tuple[bytes, str]:
        relay = self._relay
        if relay.pool is not None:
            await relay.metrics.read(relay.pool)
            try:
                async with asyncio.timeout(SCRAPE_READ_TIMEOUT_S), relay.pool.acquire() as conn:
                    found = await owed.read(conn, self._capture_warning_s)
                self._money.set(found.refunds, found.captures_due_soon)
            except Exception as exc:
                _scrape_failed("owed_read", exc)
        return generate_latest(relay.metrics.registry), CONTENT_TYPE


def relay_registry() -> CollectorRegistry:
    """The registry of `order-consumer relay` run alone: the process defaults, build_info."""
    return service_registry("order-consumer")


class WorkerAndRelay:
    """`order-consumer run`'s `Health` when the relay runs beside the worker: the worker's
    probes, and its /metrics with the relay's outbox gauges read first (same registry)."""

    def __init__(self, worker: Any, relay: Any) -> None:
        self._worker = worker
        self._relay = relay

    def alive(self) -> tuple[bool, str]:
        result: tuple[bool, str] = self._worker.alive()
        return result

    async def ready(self) -> tuple[bool, str]:
        result: tuple[bool, str] = await self._worker.ready()
        return result

    async def exposition(self) -> tuple[bytes, str]:
        if self._relay.pool is not None:
            await self._relay.metrics.read(self._relay.pool)
        result: tuple[bytes, str] = await self._worker.exposition()
        return result

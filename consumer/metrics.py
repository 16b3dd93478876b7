"""The consumer's Prometheus metrics, in a registry of its own per worker.

Names follow Prometheus' conventions: one `intentflow_consumer_` namespace,
base units (seconds, records), `_total` on counters. What each one means:

  events_total{outcome}           events handled: applied, stale, ignored, not_an_order
                                  (the fold's outcomes: an authorization of an intent
                                  that names no cart), duplicate (already in the
                                  inbox), dead_lettered (poison, or refused by the database)
  orders_total{status}            orders that entered a status: created in it, or moved to it
  batch_events                    events per applied batch (histogram)
  batch_duration_seconds          from the batch's start to its offsets' commit (histogram)
  latency_seconds                 from the bridge's receipt (`received-at`) to the database
                                  commit that applied the event, duplicates included
  lag_records{topic,partition}    records after the group's committed offset, per owned
                                  partition (the broker's end offset, asked at scrape time)
  retries_total{cause}            waits for the database or broker to come back
  last_commit_timestamp_seconds   when offsets were last committed (Unix time)
  refunds_owed                    orders that cannot be filled whose captured money is
                                  neither refunded nor on its way back (read at scrape time)
  captures_due_soon               placed orders still uncaptured within CAPTURE_WARNING_S of
                                  their authorization's deadline (read at scrape time)
  intentflow_build_info{service,version}, and the process_* and python_* defaults.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from intentflow.consumer.decisions import OrderStatus
from intentflow.consumer.errors import CAUSES
from intentflow.schemas.metrics import NAMESPACE, service_registry

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Every outcome is exported from the start, so that a rate over it exists at zero.
EVENT_OUTCOMES = (
    "applied", "stale", "ignored", "not_an_order", "duplicate", "dead_lettered"
)  # fmt: skip

# Seconds, from a quiet consumer's tens of milliseconds to a backlog's minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
BATCH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
BATCH_EVENTS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class MoneyGauges:
    """Money that needs a person (consumer/owed.py, read at scrape time): exported by
    `run` (the worker's /metrics) and by `relay` run alone, under the same names."""

    def __init__(self, registry: CollectorRegistry) -> None:
        ns, sub = NAMESPACE, "consumer"
        self.refunds_owed = Gauge(
            "refunds_owed",
            "Orders that cannot be filled whose captured money is neither refunded nor asked "
            "back (REFUND_UNFILLABLE=false, or a refund Stripe refused).",
            namespace=ns, subsystem=sub, registry=registry,
        )  # fmt: skip
        self.captures_due_soon = Gauge(
            "captures_due_soon",
            "Placed orders not yet captured whose authorization lapses within CAPTURE_WARNING_S.",
            namespace=ns, subsystem=sub, registry=registry,
        )  # fmt: skip

    def set(self, refunds_owed: int, captures_due_soon: int) -> None:
        self.refunds_owed.set(refunds_owed)
        self.captures_due_soon.set(captures_due_soon)


class ConsumerMetrics:
    def __init__(self) -> None:
        self.registry = registry = service_registry("order-consumer")
        ns, sub = NAMESPACE, "consumer"
        self.events = Counter(
            "events", "Events handled, by outcome.", ["outcome"],
            namespace=ns, subsystem=sub, registry=registry,
        )  # fmt: skip
        for outcome in EVENT_OUTCOMES:
            self.events.labels(outcome)
        self.orders = Counter(
            "orders", "Orders that entered a status (created in it or moved to it).", ["status"],
            namespace=ns, subsystem=sub, registry=registry,
        )  # fmt: skip
        for status in OrderStatus:  # a closed set: each exported at zero, as the outcomes
            self.orders.labels(str(status))
        self.batch_events = Histogram(
            "batch_events", "Events per applied batch.", buckets=BATCH_EVENTS_BUCKETS,
            namespace=ns, subsystem=sub, registry=registry,
        )  # fmt: skip
        self.batch_seconds = Histogram(
            "batch_duration_seconds", "From a batch's start to its offsets' commit.",
            buckets=BATCH_SECONDS_BUCKETS, namespace=ns, subsystem=sub, registry=registry,
        )  # fmt: skip
        self.latency = Histogram(
            "latency_seconds",
            "From the bridge's receipt of an event (received-at) to the commit that applied it.",
            buckets=LATENCY_BUCKETS, namespace=ns, subsystem=sub, registry=registry,
        )  # fmt: skip
        self.lag = Gauge(
            "lag_records", "Records after the group's committed offset, per owned partition.",
            ["topic", "partition"], namespace=ns, subsystem=sub, registry=registry,
        )  # fmt: skip
        self.retries = Counter(
            "retries", "Waits for the database or the broker to come back, by cause.", ["cause"],
            namespace=ns, subsystem=sub, registry=registry,
        )  # fmt: skip
        for known in CAUSES:
            self.retries.labels(known)
        self.last_commit = Gauge(
            "last_commit_timestamp_seconds", "When offsets were last committed (Unix time).",
            namespace=ns, subsystem=sub, registry=registry,
        )  # fmt: skip
        self.money = MoneyGauges(registry)
        self._lag_series: set[tuple[str, str]] = set()

    def transaction_committed(
        self,
        *,
        outcomes: Mapping[str, int],
        duplicates: int,
        entered: Mapping[str, int],
        received_at_ms: Iterable[int],
    ) -> None:
        """One database transaction committed: count its events, and time them."""
        for outcome, n in outcomes.items():
            self.events.labels(str(outcome)).inc(n)
        self.events.labels("duplicate").inc(duplicates)
        for status, n in entered.items():
            self.orders.labels(str(status)).inc(n)
        now_ms = time.time() * 1000
        for received in received_at_ms:
            if received > 0:  # a record that did not come through the bridge has none
                self.latency.observe(max(now_ms - received, 0.0) / 1000)

    def dead_lettered(self, n: int) -> None:
        """`n` events acknowledged by the dead-letter topic."""
        self.events.labels("dead_lettered").inc(n)

    def batch_applied(self, *, events: int, duration_s: float) -> None:
        """One batch done (database and offsets)."""
        self.batch_events.observe(events)
        self.batch_seconds.observe(duration_s)

    def committed(self) -> None:
        self.last_commit.set_to_current_time()

    def retried(self, cause: str) -> None:
        self.retries.labels(cause).inc()

    def set_lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        """The lag of each partition owned now; series of partitions no longer owned go."""
        current = {(topic, str(partition)) for topic, partition in lags}
        for gone in self._lag_series - current:
            self.lag.remove(*gone)
        for (topic, partition), lag in lags.items():
            self.lag.labels(topic, str(partition)).set(lag)
        self._lag_series = current

    def set_money(self, refunds_owed: int, captures_due_soon: int) -> None:
        """What the database says now of money that needs a person (`consumer.owed`)."""
        self.money.set(refunds_owed, captures_due_soon)

    def render(self) -> bytes:
        return generate_latest(self.registry)

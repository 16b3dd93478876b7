"""The bridge's Prometheus metrics, in a registry of its own per app.

Beside its own (`intentflow_bridge_*`), the registry has what both services
export: `intentflow_build_info` and the process_* and python_* defaults.
"""

from __future__ import annotations

from typing import get_args

from prometheus_client import Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from intentflow.producer.guard import REASONS
from intentflow.producer.signature import Reason
from intentflow.schemas.metrics import NAMESPACE, service_registry

CONTENT_TYPE = CONTENT_TYPE_LATEST


class BridgeMetrics:
    def __init__(self) -> None:
        self.registry = service_registry("stripe-bridge")
        ns = {"namespace": NAMESPACE, "subsystem": "bridge"}
        self.webhooks = Counter(
            "webhooks",
            "Webhook requests by outcome.",
            ["outcome"],
            registry=self.registry,
            **ns,
        )
        self.signature_failures = Counter(
            "signature_failures",
            "Webhooks refused because of their Stripe-Signature, by reason.",
            ["reason"],
            registry=self.registry,
            **ns,
        )
        self.connections_refused = Counter(
            "connections_refused",
            "Connections answered and closed before authentication, by the limit they hit.",
            ["reason"],
            registry=self.registry,
            **ns,
        )
        # Each reason exported at zero from the start, so that an alert's rate over it
        # exists before the first refusal (as the webhooks' outcomes, producer/webhook.py).
        for reason in get_args(Reason):
            self.signature_failures.labels(reason)
        for reason in REASONS:
            self.connections_refused.labels(reason)
        self.publish_seconds = Histogram(
            "publish_seconds",
            "Time from send to broker acknowledgement.",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=self.registry,
            **ns,
        )

    def refused(self, reason: str) -> None:
        self.connections_refused.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

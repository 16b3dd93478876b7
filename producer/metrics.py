"""The bridge's Prometheus metrics, in a registry of its own per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class BridgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.webhooks = Counter(
            "bridge_webhooks",
            "Webhook requests by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.signature_failures = Counter(
            "bridge_signature_failures",
            "Webhooks refused because of their Stripe-Signature, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.connections_refused = Counter(
            "bridge_connections_refused",
            "Connections answered and closed before authentication, by the limit they hit.",
            ["reason"],
            registry=self.registry,
        )
        self.publish_seconds = Histogram(
            "bridge_publish_seconds",
            "Time from send to broker acknowledgement.",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=self.registry,
        )

    def refused(self, reason: str) -> None:
        self.connections_refused.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

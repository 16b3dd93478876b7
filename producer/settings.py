"""The bridge's settings, read once from the environment by `__main__`.

A value that cannot work is refused here, before anything connects, with a
message that names the variable and never echoes its value (`schemas.config.describe` turns
pydantic's error into the one line `__main__` prints).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from intentflow.schemas import DEFAULT_TOPIC
from intentflow.schemas.config import check_log_level
from intentflow.schemas.kafka import KafkaConnection

# Every webhook signing secret Stripe issues (dashboard or `stripe listen`) starts so.
SECRET_PREFIX = "whsec_"
# What STRIPE_LIVEMODE's refusal says: which to choose.
LIVEMODE_CHOICE = (
    "set true for a live-mode endpoint (real payments) or false for a test-mode one "
    "(a sandbox, staging, `stripe listen`)"
)


class BridgeSettings(KafkaConnection, BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    # Comma-separated; during a rotation Stripe signs with both, and either verifies.
    # SecretStr keeps them out of reprs and logs.
    stripe_webhook_secret: Annotated[tuple[SecretStr, ...], NoDecode] = Field(min_length=1)
    stripe_webhook_tolerance_s: int = Field(default=300, ge=1)
    # Which of Stripe's modes this bridge serves: true, live (real payments); false, test
    # (a sandbox, staging). Required: a default would either take test events into live
    # stock or ignore every event of a staging shop. Every event says its mode (`livemode`)
    # and one of the other mode is acknowledged, never published: a live Connect endpoint
    # also receives the test events of accounts connected in live mode, and a test
    # endpoint's secret listed beside the live one would let its events in.
    stripe_livemode: bool = Field(default=None, validate_default=True)

    # KAFKA_BOOTSTRAP_SERVERS, TLS and SASL: schemas/kafka.py, shared with the consumer.
    kafka_topic: str = Field(default=DEFAULT_TOPIC, min_length=1)
    # Real Kafka: on. The embedded Tansu broker has no idempotent producer.
    kafka_enable_idempotence: bool = True
    # Kafka's client.id: the broker's logs and quotas name the bridge by it.
    kafka_client_id: str = Field(default="stripe-bridge", min_length=1)
    # How long a request waits for the broker's acknowledgement before answering 503.
    kafka_publish_timeout_s: float = Field(default=5.0, gt=0)
    # 0 still batches: records that arrive while a produce request is in flight go
    # out together in the next one. Measured against Tansu at 32 concurrent sends,
    # linger_ms=1 halved throughput and doubled p50 (docs/benchmarks.md).
    kafka_linger_ms: int = Field(default=0, ge=0)
    kafka_max_batch_bytes: int = Field(default=1024 * 1024, ge=1024)
    # The producer's largest request (aiokafka checks each record against it before
    # sending). A bigger event is refused for good: 500, `rejected_by_broker`.
    # Keep it at or below the topic's max.message.bytes and above MAX_BODY_BYTES.
    kafka_max_request_bytes: int = Field(default=1024 * 1024, ge=1024)

    # The webhook's port: it answers POST /webhooks/stripe and nothing else.
    bridge_host: str = Field(default="127.0.0.1", min_length=1)
    bridge_port: int = Field(default=8000, ge=0, le=65535)
    # /healthz, /readyz and /metrics (consumer/probes.py's server), apart from the
    # webhook's port: outside MAX_CONNECTIONS and the webhook's limits, so clients
    # holding every webhook connection cannot fail a probe, and the metrics stay
    # off the internet-facing port. In a pod: BRIDGE_ADMIN_HOST=0.0.0.0. Port 0: any
    # free port (logged as `http_listening`).
    bridge_admin_host: str = Field(default="127.0.0.1", min_length=1)
    bridge_admin_port: int = Field(default=8001, ge=0, le=65535)
    max_body_bytes: int = Field(default=512 * 1024, ge=1)
    # Limits enforced before anyone is authenticated (producer/guard.py). Stripe's
    # own requests have about ten headers in well under 2 KiB, and arrive at once.
    # Memory held by clients is at most about MAX_CONNECTIONS x (MAX_HEADER_BYTES +
    # MAX_BODY_BYTES): 132 MiB with the defaults, under a 256 MiB container limit.
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    max_headers: int = Field(default=64, ge=8)
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=256, ge=1)
    # SIGTERM/SIGINT to exit, whatever the broker does: below Kubernetes' default
    # grace period of 30 s.
    shutdown_timeout_s: float = Field(default=25.0, gt=0)
    # Bench only: verify and answer without publishing, to measure the cost of durability.
    bridge_publish: bool = True

    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"

    @field_validator("stripe_webhook_secret", mode="before")
    @classmethod
    def _split_secrets(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
            if not value:
                raise ValueError("is empty: set the endpoint's signing secret (whsec_…)")
        return value

    @field_validator("stripe_webhook_secret")
    @classmethod
    def _signing_secrets(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        # The usual mistake is pasting the API key (sk_live_…) here: refuse it
        # without repeating it.
        if not all(s.get_secret_value().startswith(SECRET_PREFIX) for s in value):
            raise ValueError(f"every secret must be an endpoint signing secret ({SECRET_PREFIX}…)")
        return value

    @field_validator("stripe_livemode", mode="before")
    @classmethod
    def _mode_chosen(cls, value: object) -> object:
        if value is None:
            raise ValueError(f"required: {LIVEMODE_CHOICE}")
        if isinstance(value, bool):
            return value
        # Only the two words: pydantic would also take 1, yes, on, t, and the value
        # decides whose money counts.
        word = value.strip().lower() if isinstance(value, str) else None
        if word not in ("true", "false"):
            raise ValueError(f"must be true or false: {LIVEMODE_CHOICE}")
        return word == "true"

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        return check_log_level(value)

    def secrets(self) -> tuple[str, ...]:
        return tuple(secret.get_secret_value() for secret in self.stripe_webhook_secret)

    @property
    def drain_timeout_s(self) -> float:
        """How long shutdown waits for requests in flight: they end by the publish timeout."""
        return min(self.kafka_publish_timeout_s + 2.0, self.shutdown_timeout_s / 2)

    @property
    def producer_stop_timeout_s(self) -> float:
        """How long shutdown lets the producer flush: the rest, less a second to exit."""
        return max(0.5, self.shutdown_timeout_s - self.drain_timeout_s - 1.0)

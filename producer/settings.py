"""The bridge's settings, read once from the environment by `__main__`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from schemas import DEFAULT_TOPIC


class BridgeSettings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    # Comma-separated; during a rotation Stripe signs with both, and either verifies.
    # SecretStr keeps them out of reprs and logs.
    stripe_webhook_secret: Annotated[tuple[SecretStr, ...], NoDecode] = Field(min_length=1)
    stripe_webhook_tolerance_s: int = Field(default=300, ge=1)

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_topic: str = DEFAULT_TOPIC
    # Real Kafka: on. The embedded Tansu broker has no idempotent producer.
    kafka_enable_idempotence: bool = True
    # How long a request waits for the broker's acknowledgement before answering 503.
    kafka_publish_timeout_s: float = Field(default=5.0, gt=0)
    # 0 still batches: records that arrive while a produce request is in flight go
    # out together in the next one. Measured against Tansu at 32 concurrent sends,
    # linger_ms=1 halved throughput and doubled p50 (README-bridge.md).
    kafka_linger_ms: int = Field(default=0, ge=0)
    kafka_max_batch_bytes: int = Field(default=1024 * 1024, ge=1024)

    bridge_host: str = "127.0.0.1"
    bridge_port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=512 * 1024, ge=1)
    # Bench only: verify and answer without publishing, to measure the cost of durability.
    bridge_publish: bool = True

    log_level: str = "INFO"
    log_format: str = "json"  # json | console

    @field_validator("stripe_webhook_secret", mode="before")
    @classmethod
    def _split_secrets(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    def secrets(self) -> tuple[str, ...]:
        return tuple(secret.get_secret_value() for secret in self.stripe_webhook_secret)

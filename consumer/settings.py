"""The consumer's settings, read once from the environment by `__main__`."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import DEFAULT_TOPIC


class ConsumerSettings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_topic: str = DEFAULT_TOPIC
    kafka_group_id: str = "order-consumer"
    # The dead-letter producer. Real Kafka: on. The embedded Tansu broker has no
    # idempotent producer, so it needs this off.
    kafka_enable_idempotence: bool = True
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"

    batch_max_records: int = Field(default=2000, ge=1)
    poll_timeout_ms: int = Field(default=200, ge=1)
    fetch_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_partition_fetch_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    heartbeat_interval_ms: int = Field(default=2_000, ge=100)

    db_pool_size: int = Field(default=2, ge=1)
    db_statement_timeout_ms: int = Field(default=30_000, ge=100)
    # Back-off while the database (or the broker, for commits) is unreachable.
    retry_initial_s: float = Field(default=0.2, gt=0)
    retry_max_s: float = Field(default=10.0, gt=0)
    # How long a rebalance waits for the batch in flight before letting go of it.
    rebalance_drain_timeout_s: float = Field(default=20.0, gt=0)

    log_level: str = "INFO"
    log_format: str = "json"  # json | console

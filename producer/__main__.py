"""`stripe-bridge` (also `python -m intentflow.producer`): serve the Stripe webhook bridge.

Settings are read from the environment once, here, and passed down. A setting
that cannot work ends the process before anything listens, with one line that
names the variable and exit status 2; so does a port that is taken (the
webhook's or the admin one: both are bound here, before uvicorn starts, which
would print its raw `[Errno 98]` and exit 3). `--help` and `--version` need no
environment. Once it listens, the bridge logs both addresses.

SIGTERM or SIGINT: uvicorn stops accepting, closes idle connections and waits
for the requests in flight (they end by the publish timeout); the app's lifespan
then stops the producer, dropping what the broker has not taken by the rest of
SHUTDOWN_TIMEOUT_S (those requests were answered 503). The process then dies of
the signal it got, as uvicorn re-raises it, so a supervisor sees why it ended. A
second signal exits at once with 128 + its number; a shutdown still running at
SHUTDOWN_TIMEOUT_S exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
from datetime import UTC, datetime
from types import FrameType

import orjson
import structlog
import uvicorn
from pydantic import ValidationError

from intentflow.consumer.probes import ProbeServerError, listen
from intentflow.producer import logs
from intentflow.producer.app import ADMIN_SETTINGS, WEBHOOK_SETTINGS, create_app
from intentflow.producer.guard import ConnectionLimits, protocol_class
from intentflow.producer.settings import BridgeSettings
from intentflow.schemas.config import describe
from intentflow.schemas.metrics import package_version

log = structlog.get_logger("bridge")

EXIT_CANNOT_START = 2
EXIT_OVERDUE = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stripe-bridge",
        description="Serve POST /webhooks/stripe: verified Stripe events into Kafka.",
        epilog="Configured by environment variables (README, 'Bridge configuration'); "
        "STRIPE_WEBHOOK_SECRET and STRIPE_LIVEMODE (true or false) are required.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    return parser


def _write_now(event: str, **fields: object) -> None:
    """One JSON line straight to fd 2: safe in a signal handler or another thread,
    where a buffered stream that may be mid-write is not."""
    stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    line = {**fields, "event": event, "level": "warning", "timestamp": stamp}
    # A closed stderr (a pipe whose reader quit) must not cost the stop it reports.
    with contextlib.suppress(OSError):
        os.write(2, orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))


class BridgeServer(uvicorn.Server):
    """uvicorn's server, plus the shutdown deadline, the second signal, and its address logged.

    Relies on uvicorn 0.54's `Server.handle_exit(sig, frame)` being the handler it
    installs for SIGTERM and SIGINT, and on `startup()` filling `servers`.
    """

    def __init__(self, config: uvicorn.Config, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self._shutdown_timeout_s = shutdown_timeout_s
        self._stopping = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        name = signal.Signals(sig).name
        if self._stopping:
            _write_now("exiting now", signal=name, reason="second stop signal")
            os._exit(128 + sig)
        self._stopping = True
        _write_now("stop requested", signal=name, deadline_s=self._shutdown_timeout_s)
        # A thread, not the event loop: it fires even if the loop is stuck.
        overdue = threading.Timer(self._shutdown_timeout_s, self._overdue)
        overdue.daemon = True
        overdue.start()
        super().handle_exit(sig, frame)

    def _overdue(self) -> None:
        _write_now("exiting now", reason=f"shutdown took over {self._shutdown_timeout_s:g} s")
        os._exit(EXIT_OVERDUE)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        for server in getattr(self, "servers", ()):
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                log.info("listening", host=host, port=port, url=f"http://{host}:{port}")


def main(argv: list[str] | None = None) -> int:
    _parser().parse_args(argv)
    try:
        settings = BridgeSettings()
    except ValidationError as exc:
        print(f"stripe-bridge: configuration error: {describe(exc)}", file=sys.stderr)
        return EXIT_CANNOT_START
    try:
        webhook_socket = listen(settings.bridge_host, settings.bridge_port, WEBHOOK_SETTINGS)
        try:
            admin_socket = listen(
                settings.bridge_admin_host, settings.bridge_admin_port, ADMIN_SETTINGS
            )
        except ProbeServerError:
            webhook_socket.close()
            raise
    except ProbeServerError as exc:
        print(f"stripe-bridge: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    logs.configure(settings.log_level, settings.log_format)
    app = create_app(settings, admin_socket)
    config = uvicorn.Config(
        app,
        host=settings.bridge_host,
        port=settings.bridge_port,
        loop="uvloop",
        http=protocol_class(ConnectionLimits.from_settings(settings), app.metrics.refused),
        ws="none",
        lifespan="on",
        access_log=False,
        # Nothing reads the client address, so X-Forwarded-* rewriting is a
        # middleware layer per request for nothing; no product banner either.
        proxy_headers=False,
        server_header=False,
        # uvicorn's lines go to the root handler (producer/logs.py), as JSON.
        log_config=None,
        log_level=logs.library_level(settings.log_level),
        timeout_graceful_shutdown=settings.drain_timeout_s,  # type: ignore[arg-type]
    )
    BridgeServer(config, settings.shutdown_timeout_s).run(sockets=[webhook_socket])
    return 0


if __name__ == "__main__":
    sys.exit(main())

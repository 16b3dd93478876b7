"""The bridge's ASGI app, its admin server, and the producer's lifespan.

`create_app(settings)` builds every dependency; nothing is built at import time.
The webhook's port answers `POST /webhooks/stripe` and nothing else: it goes
straight to the webhook endpoint, and a small Starlette app answers the rest
(404 and 405) and runs the lifespan. /healthz, /readyz and /metrics are served
by the admin server (consumer/probes.py, BRIDGE_ADMIN_HOST/PORT), which the
lifespan starts first and stops last: outside the webhook's connection cap and
limits, so that slow clients holding every webhook connection fail no probe
(a kubelet would restart a pod under attack, not broken), and the metrics are
not on the internet-facing port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import structlog
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from intentflow.consumer.probes import ProbeServer
from intentflow.producer.logs import EventLog
from intentflow.producer.metrics import CONTENT_TYPE, BridgeMetrics
from intentflow.producer.publisher import Publisher
from intentflow.producer.settings import BridgeSettings
from intentflow.producer.signature import SignatureVerifier
from intentflow.producer.webhook import WebhookEndpoint

log = structlog.get_logger("bridge")

WEBHOOK_PATH = "/webhooks/stripe"
ADMIN_SETTINGS = "BRIDGE_ADMIN_HOST/BRIDGE_ADMIN_PORT"
WEBHOOK_SETTINGS = "BRIDGE_HOST/BRIDGE_PORT"


class BridgeHealth:
    """What the admin server answers (consumer/probes.py's `Health`)."""

    def __init__(self, publisher: Publisher | None, metrics: BridgeMetrics) -> None:
        self._publisher = publisher
        self._metrics = metrics

    def alive(self) -> tuple[bool, str]:
        return True, "alive"

    async def ready(self) -> tuple[bool, str]:
        """Ready while the producer is up and the broker answers a metadata request."""
        if self._publisher is None or await self._publisher.reachable():
            return True, "ready"
        return False, "broker unreachable"

    async def exposition(self) -> tuple[bytes, str]:
        return self._metrics.render(), CONTENT_TYPE


class BridgeApp:
    """Sends webhook deliveries to the endpoint directly, the rest through Starlette."""

    def __init__(
        self,
        webhook: WebhookEndpoint,
        rest: Starlette,
        lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]],
        metrics: BridgeMetrics,
        admin: ProbeServer,
    ) -> None:
        self.metrics = metrics
        self.admin = admin  # its `port` is the bound one once the lifespan started
        self._webhook = webhook
        self._rest = rest
        self._lifespan = lifespan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == WEBHOOK_PATH:
            await self._webhook(scope, receive, send)
        else:
            await self._rest(scope, receive, send)

    def lifespan(self) -> AbstractAsyncContextManager[None]:
        """Connect (in the background) and stop the producer, without an ASGI server."""
        return self._lifespan(self._rest)


def create_app(settings: BridgeSettings, admin_socket: socket.socket | None = None) -> BridgeApp:
    """The app; its lifespan serves the admin port on `admin_socket` (bound by `__main__`,
    which says in one line when the port is taken) or binds BRIDGE_ADMIN_HOST/PORT itself."""
    metrics = BridgeMetrics()
    verifier = SignatureVerifier(settings.secrets(), settings.stripe_webhook_tolerance_s)
    publisher = Publisher(settings) if settings.bridge_publish else None
    event_log = EventLog("bridge", settings.log_level, settings.log_format)
    endpoint = WebhookEndpoint(
        verifier, publisher, metrics, settings.max_body_bytes, event_log, settings.stripe_livemode
    )
    admin = ProbeServer(
        BridgeHealth(publisher, metrics),
        settings.bridge_admin_host,
        settings.bridge_admin_port,
        settings=ADMIN_SETTINGS,
        sock=admin_socket,
        logger="bridge",
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The probes answer before the first webhook can, and until the process ends.
        await admin.start()
        # Serve at once and connect in the background: until the producer is
        # up, webhooks get 503 and /readyz is not ready (no crash loop at boot).
        connecting = None if publisher is None else asyncio.create_task(publisher.keep_connecting())
        log.info(
            "bridge started",
            topic=settings.kafka_topic,
            publish=settings.bridge_publish,
            secrets=len(settings.stripe_webhook_secret),
            stripe_livemode=settings.stripe_livemode,
        )
        try:
            yield
        finally:
            if connecting is not None:
                connecting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connecting
            if publisher is not None:
                # What is left of the shutdown deadline after draining requests.
                await publisher.stop(timeout_s=settings.producer_stop_timeout_s)
            await admin.stop()
            log.info("bridge stopped")

    # Only the webhook: any other path is 404, another method on it 405.
    rest = Starlette(routes=[Route(WEBHOOK_PATH, endpoint, methods=["POST"])], lifespan=lifespan)
    return BridgeApp(endpoint, rest, lifespan, metrics, admin)

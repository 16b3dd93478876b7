"""The bridge's ASGI app: routes, health, metrics, and the producer's lifespan.

`create_app(settings)` builds every dependency; nothing is built at import time.
`POST /webhooks/stripe` goes straight to the webhook endpoint; everything else
(health, metrics, lifespan, 404 and 405 answers) is a small Starlette app.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from intentflow.producer.logs import EventLog
from intentflow.producer.metrics import CONTENT_TYPE, BridgeMetrics
from intentflow.producer.publisher import Publisher
from intentflow.producer.settings import BridgeSettings
from intentflow.producer.signature import SignatureVerifier
from intentflow.producer.webhook import WebhookEndpoint

log = structlog.get_logger("bridge")

WEBHOOK_PATH = "/webhooks/stripe"


class BridgeApp:
    """Sends webhook deliveries to the endpoint directly, the rest through Starlette."""

    def __init__(
        self,
        webhook: WebhookEndpoint,
        rest: Starlette,
        lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]],
        metrics: BridgeMetrics,
    ) -> None:
        self.metrics = metrics
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


def create_app(settings: BridgeSettings) -> BridgeApp:
    metrics = BridgeMetrics()
    verifier = SignatureVerifier(settings.secrets(), settings.stripe_webhook_tolerance_s)
    publisher = Publisher(settings) if settings.bridge_publish else None
    event_log = EventLog("bridge", settings.log_level, settings.log_format)
    endpoint = WebhookEndpoint(
        verifier, publisher, metrics, settings.max_body_bytes, event_log, settings.stripe_livemode
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
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
            log.info("bridge stopped")

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        if publisher is None or await publisher.reachable():
            return PlainTextResponse("ready")
        return PlainTextResponse("broker unreachable", status_code=503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    rest = Starlette(
        routes=[
            Route(WEBHOOK_PATH, endpoint, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    return BridgeApp(endpoint, rest, lifespan, metrics)

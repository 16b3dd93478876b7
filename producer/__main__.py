"""`stripe-bridge` (also `python -m producer`): serve the Stripe webhook bridge.

Settings are read from the environment once, here, and passed down. uvicorn
owns graceful shutdown: on SIGTERM/SIGINT it stops accepting, lets in-flight
requests finish, then the app's lifespan flushes and stops the producer.
"""

from __future__ import annotations

import uvicorn

from producer import logs
from producer.app import create_app
from producer.settings import BridgeSettings

GRACEFUL_SHUTDOWN_S = 10


def main() -> None:
    settings = BridgeSettings()
    logs.configure(settings.log_level, settings.log_format)
    uvicorn.run(
        create_app(settings),
        host=settings.bridge_host,
        port=settings.bridge_port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        # Nothing reads the client address, so X-Forwarded-* rewriting is a
        # middleware layer per request for nothing; no product banner either.
        proxy_headers=False,
        server_header=False,
        log_level="warning",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


if __name__ == "__main__":
    main()

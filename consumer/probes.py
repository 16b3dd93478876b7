"""The processes' admin HTTP server, beside their work: /healthz, /readyz, /metrics.

`order-consumer run` serves it for the worker, `order-consumer relay` for the
relay alone, and `stripe-bridge` on its admin port (BRIDGE_ADMIN_HOST/PORT),
apart from the webhook's port, its connection cap and its limits, so that
clients holding the webhook's connections cannot fail a probe.

A few GET requests a minute from a kubelet and a Prometheus: asyncio's own
server on the process's event loop is enough, and it leaves the process's
signal handling to its `__main__`. Each request is one line and a few
headers, bounded in size and time; each answer closes its connection.
`listen` binds a port or says in one line which settings to change: both
processes bind every port they serve through it before they start.

  /healthz   200 while the loop is alive (starting, polling, waiting out a
             failure, stopping); 503 once it has stopped making progress.
  /readyz    200 once the member has joined (with partitions, or waiting for
             some) and the database answers; 503 with the reason otherwise.
  /metrics   the Prometheus text format (consumer.metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

# How far past its deadline a batch or a relay claim may run before /readyz says it
# made no progress: the deadline ends its connection, and unwinding takes a moment.
OVERDUE_SLACK_S = 1.0
# How far past every deadline a step may run before /healthz calls the loop stuck.
STUCK_AFTER_S = 30.0

MAX_REQUEST_BYTES = 8192
# Connections served at once; more are closed unanswered (a probe or a scrape retries).
# Each is cut after READ_TIMEOUT_S without a request: this bounds the descriptors a
# flood can take from the process's Kafka and database connections.
MAX_CLIENTS = 128
READ_TIMEOUT_S = 5.0
TEXT = "text/plain; charset=utf-8"


class Health(Protocol):
    def alive(self) -> tuple[bool, str]: ...

    async def ready(self) -> tuple[bool, str]: ...

    async def exposition(self) -> tuple[bytes, str]: ...


class ProbeServerError(Exception):
    """The server cannot listen (the message says what to change)."""


CONSUMER_SETTINGS = "CONSUMER_HTTP_HOST/CONSUMER_HTTP_PORT"


def listen(host: str, port: int, settings: str) -> socket.socket:
    """A listening TCP socket on host:port (0: any free port), or ProbeServerError naming
    `settings` (the variables that choose the address) in one line."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise ProbeServerError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): set {settings} "
            "to an address of this host"
        ) from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and asyncio do
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ProbeServerError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): set {settings} "
            "to a free address"
        ) from exc
    sock.setblocking(False)
    return sock


Answer = tuple[int, bytes, str]
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           503: "Service Unavailable"}  # fmt: skip


class ProbeServer:
    def __init__(
        self,
        health: Health,
        host: str,
        port: int,
        *,
        settings: str = CONSUMER_SETTINGS,
        sock: socket.socket | None = None,
        logger: str = "consumer",
    ) -> None:
        self.health = health
        self.host = host
        self.port = port  # the bound port once started (PORT=0 picks a free one)
        self._settings = settings  # the variables an operator sets to move it
        self._sock = sock  # bound already (`listen`), or bound by `start`
        self._log = structlog.get_logger(logger)  # the process's own logger name
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._routes: dict[str, Callable[[], Awaitable[Answer]]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
        }

    async def start(self) -> ProbeServer:
        sock = self._sock or listen(self.host, self.port, self._settings)
        self._sock = None
        self._server = await asyncio.start_server(self._serve, sock=sock, limit=MAX_REQUEST_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        self._log.info("http_listening", host=self.host, port=self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            self._server = None
        # Connections still open (a client that sent half a request, or nothing):
        # closed here, so that each handler ends by itself instead of being
        # cancelled at the loop's end (Python 3.11 logs that as an error).
        for writer in self._clients.values():
            writer.transport.abort()
        if self._clients:
            await asyncio.wait(list(self._clients), timeout=1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= MAX_CLIENTS:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._clients[task] = writer
        try:
            method, path = await self._read_request(reader)
            if method is None:
                answer: Answer = (400, b"bad request\n", TEXT)
            elif path not in self._routes:
                answer = (404, b"not found: try /healthz, /readyz or /metrics\n", TEXT)
            elif method not in ("GET", "HEAD"):
                answer = (405, b"only GET\n", TEXT)
            else:
                answer = await self._routes[path]()
            if writer.is_closing():
                return  # the client reset the connection (uvloop refuses a write then)
            self._write(writer, answer, head_only=method == "HEAD")
            await writer.drain()
        except (ConnectionError, TimeoutError):
            pass  # the client went away or never finished its request
        finally:
            self._clients.pop(task, None)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str | None, str]:
        """The request's method and path; (None, "") for anything this server will not read."""
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return None, ""  # cut short, or longer than MAX_REQUEST_BYTES
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return None, ""
        return parts[0], parts[1].split("?", 1)[0]

    @staticmethod
    def _write(writer: asyncio.StreamWriter, answer: Answer, head_only: bool) -> None:
        status, body, content_type = answer
        head = (
            f"HTTP/1.1 {status} {REASONS[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + (b"" if head_only else body))

    async def _healthz(self) -> Answer:
        ok, why = self.health.alive()
        return (200 if ok else 503), f"{why}\n".encode(), TEXT

    async def _readyz(self) -> Answer:
        ok, why = await self.health.ready()
        return (200 if ok else 503), f"{why}\n".encode(), TEXT

    async def _metrics(self) -> Answer:
        body, content_type = await self.health.exposition()
        return 200, body, content_type

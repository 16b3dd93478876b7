"""A loopback TCP proxy that can be cut and restored, to stage an outage.

In front of PostgreSQL it stages a database outage (tests), or, with `freeze()`,
a black hole: the connections open at that moment stop carrying bytes in either
direction, without a reset or a close (what a failover whose old primary drops
packets does to them), while new connections go through. In front of the
embedded broker, which then advertises the proxy's port so every client's
connections pass through it, it can also cut one Kafka client alone: the
first request on each connection names its `client.id` (every Kafka request
header carries it, in the same place in every version), so
`cut(client_id="stripe-bridge")` breaks the bridge's connections and refuses
its new ones while consumers go on. `python -m intentflow.devservices.proxy` runs one in
a process of its own (SIGUSR1 cuts the client named on its command line,
SIGUSR2 restores it), so its copying does not share a core's event loop with
the process that drives the load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import struct
from typing import cast

from intentflow.devservices.embedded import free_port

# Request size (int32), api key (int16), api version (int16), correlation id
# (int32), then client.id as a nullable string: int16 length, then bytes.
_CLIENT_ID_AT = 4 + 2 + 2 + 4


class Proxy:
    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self._server: asyncio.Server | None = None
        # Every open pair of connections, with the Kafka client.id the client gave.
        self._pairs: dict[asyncio.StreamWriter, tuple[asyncio.StreamWriter, str | None]] = {}
        self._cut_clients: set[str] = set()
        self.kafka = False
        # Connections frozen by `freeze()`: their bytes stay where they are until closed.
        self._frozen: set[asyncio.StreamWriter] = set()
        self._cut = asyncio.Event()  # set by a full `cut()`: frozen pipes may end

    async def start(self, *, kafka: bool = False) -> Proxy:
        """Listen; with `kafka`, read each connection's client.id so one client can be cut."""
        self.kafka = kafka or self.kafka
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def cut(self, client_id: str | None = None) -> None:
        """Refuse new connections and break every open one (of `client_id` alone, if given)."""
        if client_id is not None:
            self._cut_clients.add(client_id)
            for writer, (upstream, who) in list(self._pairs.items()):
                if who == client_id:
                    writer.transport.abort()
                    upstream.transport.abort()
            return
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer, (upstream, _) in list(self._pairs.items()):
            writer.transport.abort()
            upstream.transport.abort()
        self._pairs.clear()
        self._cut.set()

    def freeze(self) -> int:
        """Hold the bytes of every open connection, both ways, without closing it; new
        connections go through. Returns how many connections were frozen."""
        for writer, (upstream, _) in self._pairs.items():
            self._frozen.update((writer, upstream))
            # Nothing more is read from either socket: what was sent stays in the
            # kernel's buffers, unacknowledged by the reader, as on a dead network.
            for end in (writer, upstream):
                cast(asyncio.Transport, end.transport).pause_reading()
        return len(self._pairs)

    async def restore(self, client_id: str | None = None) -> None:
        if client_id is not None:
            self._cut_clients.discard(client_id)
        elif self._server is None:
            await self.start()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = b""
        client_id = None
        if self.kafka:
            try:
                first, client_id = await _first_request_head(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                writer.transport.abort()
                return
            if client_id in self._cut_clients:
                writer.transport.abort()
                return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._pairs[writer] = (up_writer, client_id)
        up_writer.write(first)
        await asyncio.gather(
            self._pipe(reader, up_writer, writer), self._pipe(up_reader, writer, up_writer)
        )
        self._pairs.pop(writer, None)
        self._frozen.difference_update((writer, up_writer))

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, own: asyncio.StreamWriter
    ) -> None:
        """Copy `reader` (the socket of `own`) to `writer` until either end closes; a
        frozen connection keeps what it read and waits, holding it, until it is cut."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if own in self._frozen:
                    # A chunk read just before the freeze: held until the proxy is cut.
                    await self._cut.wait()
                    break
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


async def _first_request_head(reader: asyncio.StreamReader) -> tuple[bytes, str | None]:
    """The bytes of a Kafka request up to and including its client.id, and that id."""
    head = await reader.readexactly(_CLIENT_ID_AT + 2)
    (length,) = struct.unpack_from(">h", head, _CLIENT_ID_AT)
    if length < 0:
        return head, None
    name = await reader.readexactly(length)
    return head + name, name.decode("utf-8", "replace")


async def _serve_forever(args: argparse.Namespace) -> None:
    proxy = Proxy("127.0.0.1", args.target_port, args.port)
    await proxy.start(kafka=args.cuttable_client is not None)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    if args.cuttable_client is not None:
        client = args.cuttable_client
        loop.add_signal_handler(
            signal.SIGUSR1, lambda: loop.create_task(proxy.cut(client_id=client))
        )
        loop.add_signal_handler(
            signal.SIGUSR2, lambda: loop.create_task(proxy.restore(client_id=client))
        )
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m intentflow.devservices.proxy", description=__doc__
    )
    parser.add_argument("--port", type=int, required=True, help="the loopback port to listen on")
    parser.add_argument("--target-port", type=int, required=True, help="127.0.0.1:PORT behind it")
    parser.add_argument(
        "--cuttable-client", help="a Kafka client.id that SIGUSR1 cuts and SIGUSR2 restores"
    )
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_serve_forever(args))
    else:
        uvloop.run(_serve_forever(args))


if __name__ == "__main__":
    main()

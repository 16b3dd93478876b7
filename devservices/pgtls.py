"""PostgreSQL's TLS for tests, in front of a server built without it (the embedded wheel's).

The embedded PostgreSQL (devservices/embedded.py) is compiled without OpenSSL ("SSL
is not supported by this build"), so its TLS is done here, the way the server does
it: a client's SSLRequest is answered `S`, the TLS handshake made with the given
certificate and key, and the protocol inside relayed, in the clear over loopback, to
the server. A client that does not ask for TLS is refused, as a `hostssl`-only
pg_hba.conf would. What is checked is the client's side: that it asks for TLS,
verifies the certificate against its CA and the host name, and says why when not.
Each handshake's protocol version is kept in `handshakes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from pathlib import Path
from typing import Self

from intentflow.devservices.embedded import free_port

# The 8-byte requests a client may send before its startup message (protocol 3.0).
_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104


class PostgresTls:
    def __init__(self, target_host: str, target_port: int, cert: Path, key: Path) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert, key)
        self._server: asyncio.Server | None = None
        self.handshakes: list[str] = []  # the TLS version of each connection made
        self.refused = 0  # connections that did not ask for TLS

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length, code = struct.unpack("!ii", await reader.readexactly(8))
                if code == _GSSENC_REQUEST:
                    writer.write(b"N")  # no GSSAPI: the client asks for TLS next
                    continue
                if length != 8 or code != _SSL_REQUEST:
                    self.refused += 1  # a plain startup message: TLS only here
                    writer.transport.abort()
                    return
                writer.write(b"S")
                await writer.drain()
                await writer.start_tls(self._context)
                break
        except (asyncio.IncompleteReadError, ssl.SSLError, ConnectionError):
            writer.transport.abort()  # a client that refused our certificate, say
            return
        tls = writer.get_extra_info("ssl_object")
        self.handshakes.append(tls.version() if tls is not None else "?")
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError, ssl.SSLError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()

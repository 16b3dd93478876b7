"""PostgreSQL over TLS with `sslmode=verify-full`, against a certificate this test makes.

The embedded PostgreSQL's build has no TLS, so the server side of the handshake is
devservices/pgtls.py, in front of it, with a certificate for 127.0.0.1 that a CA of
this module signed; it takes no connection that does not ask for TLS. The consumer's
connections, the pool and the tools, given `?sslmode=verify-full&sslrootcert=<the
CA>`, ask for it and check whom they reach; a certificate that does not verify
(another CA, another host name) or a CA file that is not there is one line and exit
2, never waited out.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from intentflow.consumer import database
from intentflow.consumer.connections import create_pool
from intentflow.devservices import Services
from intentflow.devservices.pgtls import PostgresTls
from tests.support import consumer_env, consumer_settings

pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class TlsServer:
    tls: PostgresTls
    database: str  # a migrated database of this test's own, behind it
    ca: Path  # the CA that signed the certificate
    other_ca: Path  # a CA that did not

    def url(self, query: str, host: str = "127.0.0.1") -> str:
        return f"postgresql://postgres@{host}:{self.tls.port}/{self.database}?{query}"


@pytest.fixture
async def tls_server(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TlsServer]:
    files = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")  # an IP address in subjectAltName, as verify-full wants
    issued.cert_chain_pems[0].write_to_path(str(files / "server.crt"))
    issued.private_key_pem.write_to_path(str(files / "server.key"))
    ca.cert_pem.write_to_path(str(files / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(files / "other-ca.pem"))
    host_port, _, name = database_url.partition("@")[2].partition("/")
    host, _, port = host_port.rpartition(":")
    tls = await PostgresTls(host, int(port), files / "server.crt", files / "server.key").start()
    try:
        yield TlsServer(tls, name, files / "ca.pem", files / "other-ca.pem")
    finally:
        await tls.stop()


async def test_every_connection_asks_for_tls_and_checks_whom_it_reaches(
    infra: Services, tls_server: TlsServer
) -> None:
    url = tls_server.url(f"sslmode=verify-full&sslrootcert={tls_server.ca}")
    settings = consumer_settings(infra, url, "unused")
    conn = await database.connect(settings, name="test")  # the tools' and start-up's
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    pool = await create_pool(settings)  # the worker's and the relay's (schema checked)
    try:
        async with pool.acquire() as pooled, pooled.transaction():
            assert await pooled.fetchval("SELECT count(*) FROM orders") == 0
    finally:
        await pool.close()
    # And as an operator runs it, under uvloop: `reconcile` over TLS.
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "intentflow.consumer", "reconcile"],
        env=consumer_env(settings), capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(tls_server.tls.handshakes) >= 3
    assert set(tls_server.tls.handshakes) == {"TLSv1.3"}
    assert tls_server.tls.refused == 0  # none came in the clear


@pytest.mark.parametrize(
    ("query", "host", "says"),
    [
        ("sslmode=verify-full&sslrootcert={other_ca}", "127.0.0.1", "does not verify"),
        # The certificate names 127.0.0.1, not localhost: verify-full checks the name too.
        ("sslmode=verify-full&sslrootcert={ca}", "localhost", "does not verify"),
        ("sslmode=verify-full&sslrootcert={ca}.missing", "127.0.0.1", "is not there"),
    ],
    ids=["another-ca", "another-host-name", "no-ca-file"],
)
async def test_a_certificate_that_does_not_verify_is_one_line_and_exit_2(
    infra: Services, tls_server: TlsServer, query: str, host: str, says: str
) -> None:
    files = {"ca": tls_server.ca, "other_ca": tls_server.other_ca}
    url = tls_server.url(query.format(**files), host)
    env = consumer_env(consumer_settings(infra, url, "unused", startup_timeout_s=30))
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "intentflow.consumer", "run"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    [line] = [entry for entry in done.stderr.splitlines() if '"cannot_start"' in entry]
    assert says in line and "DATABASE_URL" in line and "Traceback" not in done.stderr, line
    assert '"not_ready"' not in done.stderr  # refused at once, not waited out

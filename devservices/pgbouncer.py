"""PgBouncer in transaction mode in front of a PostgreSQL, for tests: Debian's package.

`PgBouncer(host, port).start()` runs it on a free loopback port, in front of every
database of the server at host:port, with `pool_mode = transaction` and ONE server
connection per database and user: every client of a database takes its turns on
the same server session, so anything one of them leaves in the session (a setting,
a prepared statement, an advisory lock) meets the next. Authentication is `trust`
(loopback, tests only). Debian 12's package is PgBouncer 1.18, which knows nothing
of prepared statements, and refuses every startup parameter it does not track.

`ensure_installed()` finds the binary, or installs the package with apt-get when
running as root (as the Makefile's test target does), or says how to.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Self

from intentflow.devservices.embedded import (
    EmbeddedServiceError,
    _Process,
    _unprivileged_user,
    free_port,
)

DEBIAN_BINARY = Path("/usr/sbin/pgbouncer")


def ensure_installed() -> Path:
    """The pgbouncer binary, installed from Debian's package if it is missing."""
    found = shutil.which("pgbouncer") or (str(DEBIAN_BINARY) if DEBIAN_BINARY.exists() else None)
    if found:
        return Path(found)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise EmbeddedServiceError(
            "pgbouncer is not installed: `make test` installs it (apt-get install pgbouncer)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "pgbouncer"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)
    return DEBIAN_BINARY


class PgBouncer(_Process):
    name = "pgbouncer"

    def __init__(self, target_host: str, target_port: int, *, users: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.target = (target_host, target_port)
        self.users = ("postgres", *users)

    def start(self) -> Self:
        binary = ensure_installed()
        # It refuses to run as root, like PostgreSQL.
        user = _unprivileged_user() if os.geteuid() == 0 else None
        self._dir = Path(tempfile.mkdtemp(prefix="intentflow-pgbouncer-"))
        self.port = free_port()
        host, port = self.target
        (self._dir / "users.txt").write_text("".join(f'"{u}" ""\n' for u in self.users))
        (self._dir / "pgbouncer.ini").write_text(
            f"""[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self._dir / "users.txt"}
pool_mode = transaction
default_pool_size = 1
max_client_conn = 500
"""
        )
        if user is not None:
            entry = pwd.getpwnam(user)
            for path in (self._dir, *self._dir.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._spawn([str(binary), str(self._dir / "pgbouncer.ini")], user=user)
        return self

    def url(self, database_url: str) -> str:
        """`database_url` (a database of the target server) reached through this pooler."""
        scheme, _, rest = database_url.partition("://")
        userinfo, at, hostpart = rest.rpartition("@")
        database = hostpart.partition("/")[2]
        return f"{scheme}://{userinfo}{at}127.0.0.1:{self.port}/{database}"

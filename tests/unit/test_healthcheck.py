"""The image's HEALTHCHECK (`python -m intentflow.healthcheck`) against real local HTTP servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from intentflow import healthcheck

VARIABLES = ("BRIDGE_ADMIN_HOST", "BRIDGE_ADMIN_PORT", "CONSUMER_HTTP_HOST", "CONSUMER_HTTP_PORT")


class Server:
    """An HTTP server on 127.0.0.1 whose /healthz answers `status`; it counts what it was asked."""

    def __init__(self) -> None:
        self.status = 200
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.paths.append(self.path)
                self.send_response(server.status if self.path == "/healthz" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.http.server_address[1]


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server()
    thread = threading.Thread(target=running.http.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield running
    running.http.shutdown()
    running.http.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The probe as the image runs it: its own process, this environment plus `env`."""
    base = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    return subprocess.run(
        [sys.executable, "-m", "intentflow.healthcheck", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_bridge_answering_200_is_healthy_as_the_image_configures_it(server: Server) -> None:
    image = {"BRIDGE_ADMIN_HOST": "0.0.0.0", "CONSUMER_HTTP_HOST": "0.0.0.0"}
    done = run(**image, BRIDGE_ADMIN_PORT=str(server.port), CONSUMER_HTTP_PORT=str(closed_port()))
    assert done.returncode == 0, done.stdout
    done = run("bridge", **image, BRIDGE_ADMIN_PORT=str(server.port))
    assert done.returncode == 0, done.stdout
    assert server.paths == ["/healthz", "/healthz"]


def test_a_consumer_answering_200_is_healthy_and_the_bridge_name_asks_only_the_bridge(
    server: Server,
) -> None:
    ports = {"BRIDGE_ADMIN_PORT": str(closed_port()), "CONSUMER_HTTP_PORT": str(server.port)}
    assert run(**ports).returncode == 0
    assert run("consumer", **ports).returncode == 0
    asked = len(server.paths)
    done = run("bridge", **ports)
    assert done.returncode == 1
    assert len(server.paths) == asked
    assert done.stdout.startswith("unhealthy: bridge at http://127.0.0.1:")
    assert "refused" in done.stdout


def test_an_answer_other_than_200_is_unhealthy_and_says_what_it_was(server: Server) -> None:
    server.status = 503
    done = run(BRIDGE_ADMIN_PORT=str(closed_port()), CONSUMER_HTTP_PORT=str(server.port))
    assert done.returncode == 1
    assert f"consumer at http://127.0.0.1:{server.port}/healthz: answered 503" in done.stdout
    assert "bridge at http://127.0.0.1:" in done.stdout


def test_nothing_listening_is_unhealthy() -> None:
    done = run(BRIDGE_ADMIN_PORT=str(closed_port()), CONSUMER_HTTP_PORT=str(closed_port()))
    assert done.returncode == 1
    assert done.stdout.count("refused") == 2


def test_unset_variables_mean_each_process_defaults() -> None:
    assert healthcheck.address("bridge", {}) == ("127.0.0.1", 8001)
    assert healthcheck.address("consumer", {}) == ("127.0.0.1", 8081)
    assert healthcheck.address("bridge", {"BRIDGE_ADMIN_HOST": "::"}) == ("127.0.0.1", 8001)
    assert healthcheck.address("bridge", {"BRIDGE_ADMIN_HOST": "[::1]"}) == ("::1", 8001)
    assert healthcheck.address("consumer", {"CONSUMER_HTTP_HOST": "10.1.2.3"})[0] == "10.1.2.3"


def test_a_port_that_is_no_port_is_unhealthy_naming_the_variable() -> None:
    done = run("consumer", CONSUMER_HTTP_PORT="80a")
    assert done.returncode == 1
    assert "CONSUMER_HTTP_PORT='80a' is not a port" in done.stdout
    done = run("nobody")
    assert done.returncode == 1
    assert "unknown process 'nobody'" in done.stdout


def test_a_server_that_accepts_and_never_answers_is_unhealthy_within_the_timeout() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        started = time.monotonic()
        reason = healthcheck.probe("127.0.0.1", listener.getsockname()[1], timeout=0.3)
        assert reason == "no answer within 0.3s"
        assert time.monotonic() - started < 2

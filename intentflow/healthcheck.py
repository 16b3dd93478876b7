"""`python -m intentflow.healthcheck [bridge|consumer]`: exit 0 if the process answers GET /healthz.

The image's HEALTHCHECK. One image runs either process and its slim base has no
curl, so this asks with the standard library alone: the bridge on its admin
port, BRIDGE_ADMIN_HOST:BRIDGE_ADMIN_PORT (its webhook port answers only
webhooks), the consumer at CONSUMER_HTTP_HOST:CONSUMER_HTTP_PORT
(each process's defaults where unset; an address that listens on every
interface is asked on 127.0.0.1). Named, only that process is asked. With no
name both are, and a 200 from either is healthy: a container runs one of them,
so the other's port is closed.

Exit 1 (unhealthy, as Docker reads it) with one line that says what each
address answered, or why it did not.
"""

from __future__ import annotations

import http.client
import os
import sys
from collections.abc import Mapping, Sequence

TIMEOUT_S = 3.0

# Each process: its host variable, its port variable, and their defaults.
SERVICES = {
    "bridge": ("BRIDGE_ADMIN_HOST", "BRIDGE_ADMIN_PORT", 8001),
    "consumer": ("CONSUMER_HTTP_HOST", "CONSUMER_HTTP_PORT", 8081),
}
EVERY_INTERFACE = {"", "0.0.0.0", "::"}


def address(service: str, env: Mapping[str, str]) -> tuple[str, int]:
    """Where `service` listens by `env`; ValueError naming the variable if its port is no port."""
    host_name, port_name, default_port = SERVICES[service]
    host = env.get(host_name, "127.0.0.1").strip().strip("[]")
    if host in EVERY_INTERFACE:
        host = "127.0.0.1"
    raw = env.get(port_name, "").strip() or str(default_port)
    if not (raw.isascii() and raw.isdigit() and 0 < int(raw) < 65536):
        raise ValueError(f"{port_name}={raw!r} is not a port")
    return host, int(raw)


def probe(host: str, port: int, timeout: float = TIMEOUT_S) -> str | None:
    """None if http://host:port/healthz answers 200; otherwise what went wrong, in a few words."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        response.read()
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except (OSError, http.client.HTTPException) as exc:
        return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    finally:
        connection.close()
    return None if response.status == 200 else f"answered {response.status}"


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    names = list(sys.argv[1:] if argv is None else argv) or list(SERVICES)
    env = os.environ if env is None else env
    failures = []
    for name in names:
        if name not in SERVICES:
            print(f"healthcheck: unknown process {name!r}: name bridge, consumer, or neither")
            return 1
        try:
            host, port = address(name, env)
        except ValueError as exc:
            failures.append(f"{name}: {exc}")
            continue
        reason = probe(host, port)
        if reason is None:
            return 0
        failures.append(f"{name} at http://{host}:{port}/healthz: {reason}")
    print("unhealthy: " + "; ".join(failures))
    return 1


if __name__ == "__main__":
    sys.exit(main())

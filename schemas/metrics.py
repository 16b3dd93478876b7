"""What both services' /metrics share: the namespace, the process defaults, `build_info`."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Info,
    disable_created_metrics,
)

NAMESPACE = "intentflow"

# No `_created` series beside each counter and histogram: Prometheus does not use them
# in the text format, and they double what an operator scrolls through. (Process-wide.)
disable_created_metrics()  # type: ignore[no-untyped-call]


def package_version() -> str:
    try:
        return version("intentflow")
    except PackageNotFoundError:  # pragma: no cover - run from a checkout without installing
        return "unknown"


def service_registry(service: str) -> CollectorRegistry:
    """A registry with the process_* and python_* defaults and `intentflow_build_info`.

    One registry per app or worker (not the global one), so that tests can run
    several in one process; the defaults describe the process, whichever holds them.
    """
    registry = CollectorRegistry(auto_describe=True)
    for default in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(default)
    build = Info(f"{NAMESPACE}_build", "The running build.", ["service"], registry=registry)
    build.labels(service).info({"version": package_version(), "python": platform.python_version()})
    return registry

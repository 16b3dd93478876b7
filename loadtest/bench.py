"""`make bench`: every benchmark part in one run, each printing its own table.

Parts run one after another so they do not compete for the two cores.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from loadtest import bench_consumer

# (name, entry) in the order they run; each entry takes argv and returns an exit code.
PARTS: list[tuple[str, Callable[[list[str]], int]]] = [
    ("consumer", bench_consumer.main),
]


def main(argv: list[str] | None = None) -> int:
    status = 0
    for name, entry in PARTS:
        print(f"== {name} ==", flush=True)
        status = max(status, entry(list(argv or [])))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

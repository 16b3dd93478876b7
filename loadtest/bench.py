"""`make bench`: every benchmark part in one run, each printing its own table.

Parts run one after another so they do not compete for the two cores, each
with its own defaults; run a part's module with `--help` for its options.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from intentflow.loadtest import bench_bridge, bench_consumer, compare

# (name, entry) in the order they run; each entry takes argv and returns an exit code.
PARTS: list[tuple[str, Callable[[list[str]], int]]] = [
    ("consumer", bench_consumer.main),
    ("bridge", bench_bridge.main),
    ("compare", compare.main),
]


def main(argv: list[str] | None = None) -> int:
    """Run the parts named in argv (all when none is named)."""
    wanted = set(argv or []) or {name for name, _ in PARTS}
    status = 0
    for name, entry in PARTS:
        if name in wanted:
            print(f"== {name} ==", flush=True)
            status = max(status, entry([]))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

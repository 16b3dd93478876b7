"""Process-wide tuning for a consumer process.

The garbage collector: a batch allocates tens of thousands of short-lived
objects (records, events, rows), and with CPython's default thresholds the
collector's young-generation passes, and the full passes they trigger over
everything the process holds, cost more than the batch's own decoding
(measured with loadtest/bench_consumer: see the README). Long-lived objects
made at start-up are frozen out of the collector's view, and collections run
less often. Cycles are still collected.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Call once start-up is done (imports, connections), before the first batch."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)

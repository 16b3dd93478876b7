"""`make demo`: the whole path on one machine, with no Docker, ending by itself.

A replay (`replay-duplicates`) of 2,500 payment intents' Stripe histories:
the embedded broker and PostgreSQL (or KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL
when given), the bridge, two consumer processes in one group; every event
delivered 1-3 times, a fifth of them out of order, signed, over HTTP; then the
consumers' catch-up, `order-consumer reconcile`, the checks against the
histories, the report in the terminal, and the report as JSON and as one HTML
page whose paths it prints. Any other `replay-duplicates` option may follow.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from intentflow.loadtest import replay

DEFAULTS = ["--intents", "2500", "--consumers", "2", "--duplicates", "3", "--reorder", "0.2"]


def main(argv: list[str] | None = None) -> int:
    out = Path(tempfile.gettempdir())
    reports = [
        "--report-json", str(out / "intentflow-demo-report.json"),
        "--report-html", str(out / "intentflow-demo-report.html"),
    ]  # fmt: skip
    return replay.main([*DEFAULTS, *reports, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

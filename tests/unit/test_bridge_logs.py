"""The bridge's per-webhook log line: the same JSON as structlog's chain, filtered by level."""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import structlog

from producer import logs


def lines(stream: io.BytesIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], io.BytesIO]]:
    """Call it in the test (pytest sets its own capture back after fixtures run)."""
    texts: list[io.TextIOWrapper] = []

    def redirect() -> io.BytesIO:
        buffer = io.BytesIO()
        texts.append(io.TextIOWrapper(buffer))
        monkeypatch.setattr(sys, "stderr", texts[-1])
        return buffer

    saved = structlog.get_config()
    try:
        yield redirect
    finally:
        structlog.configure(**saved)
        for text in texts:
            text.detach()


def test_a_webhook_line_has_structlogs_keys_in_its_order(
    stderr: Callable[[], io.BytesIO],
) -> None:
    out = stderr()
    logs.configure("INFO", "json")
    structlog.get_logger("bridge").info("webhook", outcome="published", partition=3)
    logs.EventLog("bridge").info("webhook", outcome="published", partition=3)

    from_structlog, ours = lines(out)
    assert list(ours) == list(from_structlog)
    assert {k: v for k, v in ours.items() if k != "timestamp"} == {
        k: v for k, v in from_structlog.items() if k != "timestamp"
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", str(ours["timestamp"]))
    stamped = datetime.strptime(str(ours["timestamp"]), "%Y-%m-%dT%H:%M:%S.%fZ")
    assert abs(stamped.replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(seconds=5)


def test_lines_below_the_level_are_not_written(stderr: Callable[[], io.BytesIO]) -> None:
    out = stderr()
    log = logs.EventLog("bridge", level="WARNING")
    log.info("webhook", outcome="published")
    log.warning("webhook", outcome="unavailable")

    [line] = lines(out)
    assert (line["outcome"], line["level"]) == ("unavailable", "warning")

"""The bridge's log lines: the per-webhook line and the libraries' share structlog's JSON."""

from __future__ import annotations

import io
import logging
import re
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import structlog

from intentflow.producer import logs


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
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield redirect
    finally:
        structlog.configure(**saved)
        root.handlers, root.level = handlers, level
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


def test_the_libraries_lines_are_json_like_ours_at_warning_and_up(
    stderr: Callable[[], io.BytesIO],
) -> None:
    out = stderr()
    logs.configure("INFO", "json")
    logging.getLogger("aiokafka").info("below the libraries' level")
    logging.getLogger("aiokafka").warning("Got error produce response: %s", "KafkaTimeoutError")
    logging.getLogger("uvicorn.error").error("Exception in ASGI application")
    sys.stderr.flush()

    aiokafka, uvicorn = lines(out)
    assert (aiokafka["logger"], aiokafka["level"]) == ("aiokafka", "warning")
    assert aiokafka["event"] == "Got error produce response: KafkaTimeoutError"
    assert (uvicorn["logger"], uvicorn["level"]) == ("uvicorn.error", "error")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", str(uvicorn["timestamp"]))


def test_at_debug_the_libraries_log_everything(stderr: Callable[[], io.BytesIO]) -> None:
    out = stderr()
    logs.configure("DEBUG", "json")
    logging.getLogger("aiokafka").debug("Sending request")
    sys.stderr.flush()

    [line] = lines(out)
    assert (line["logger"], line["level"], line["event"]) == (
        "aiokafka",
        "debug",
        "Sending request",
    )

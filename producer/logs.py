"""Structured logging for the bridge process: JSON lines on stderr by default."""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, BinaryIO

import orjson
import structlog


def configure(level: str = "INFO", fmt: str = "json") -> None:
    if fmt == "json":
        renderer: structlog.types.Processor = structlog.processors.JSONRenderer(
            serializer=orjson.dumps
        )
        factory: structlog.types.WrappedLogger = structlog.BytesLoggerFactory(
            file=sys.stderr.buffer
        )
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


class _UtcStamp:
    """ISO 8601 UTC with microseconds, formatting the date and time once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self) -> str:
        second, nanos = divmod(time.time_ns(), 1_000_000_000)
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{nanos // 1000:06d}Z"


class EventLog:
    """The bridge's one line per webhook, cheap enough for the hot path.

    With JSON output the line is rendered here, in the shape structlog's JSON
    chain gives (the fields, then `event`, `level`, `timestamp`), and written
    and flushed like structlog's `BytesLogger` does. structlog's processor
    chain cost three times as much CPU per line, about a tenth of the bridge's
    CPU per webhook (README-bridge.md). Console output goes through structlog.
    """

    def __init__(self, name: str, level: str = "INFO", fmt: str = "json") -> None:
        self._min_level = logging.getLevelNamesMapping()[level]
        self._out: BinaryIO | None = sys.stderr.buffer if fmt == "json" else None
        self._structlog = structlog.get_logger(name)
        self._stamp = _UtcStamp()

    def info(self, event: str, **fields: Any) -> None:
        if self._min_level <= logging.INFO:
            self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        if self._min_level <= logging.WARNING:
            self._emit("warning", event, fields)

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        out = self._out
        if out is None:
            getattr(self._structlog, level)(event, **fields)
            return
        fields["event"] = event
        fields["level"] = level
        fields["timestamp"] = self._stamp()
        out.write(orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE))
        out.flush()

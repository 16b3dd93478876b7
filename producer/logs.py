"""Structured logging for the bridge process: JSON lines on stderr by default.

Our own lines go through structlog (or `EventLog`, the per-webhook line); the
libraries' (aiokafka, asyncio, uvicorn) go through the standard `logging`
module, whose root handler renders them with the same processors, so every line
on stderr has one shape. The libraries log at WARNING and above, or everything
at DEBUG.
"""

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
        # The stdlib handler needs text: the same JSON, as str.
        foreign: structlog.types.Processor = structlog.processors.JSONRenderer(
            serializer=_json_text
        )
    else:
        renderer = foreign = structlog.dev.ConsoleRenderer(colors=False)
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                stamp,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                foreign,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(library_level(level))


def _json_text(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def library_level(level: str) -> int:
    """The libraries' threshold: WARNING, or everything when we log at DEBUG."""
    return logging.DEBUG if level == "DEBUG" else logging.WARNING


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
    CPU per webhook (docs/benchmarks.md). Console output goes through structlog.
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

    def error(self, event: str, **fields: Any) -> None:
        if self._min_level <= logging.ERROR:
            self._emit("error", event, fields)

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

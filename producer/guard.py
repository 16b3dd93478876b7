"""What a client may cost the bridge before it is authenticated: its HTTP protocol.

A Stripe signature can be checked only once the whole request is in, so until
then any client holds a connection and memory for free. This protocol bounds
both in the process itself (an ingress may add its own limits in front):

- bytes of a request that are not its body (MAX_HEADER_BYTES): the request line
  and headers, then a chunked body's framing; 431, close;
- trailers of a chunked body: refused (431, close), as nothing reads them;
- headers per request (MAX_HEADERS): 431, close;
- time from the connection, or from a later request's first byte (a bare CRLF
  included), to the end of its headers (HEADER_TIMEOUT_S): 408, close;
- time from the end of the headers to the end of the body (BODY_TIMEOUT_S): 408,
  or only the close when an answer was already sent (an early 400 or 413) or an
  earlier pipelined request's answer is still to come;
- open connections (MAX_CONNECTIONS): one more is answered 503 and closed at once;
- at shutdown, a client still sending its headers or body: 503, close (the app
  waiting for that body sees a disconnect and ends, rather than being cancelled
  at the drain timeout with a traceback per client).

uvicorn 0.54 with httptools has none of these: `limit_concurrency` is checked only
once a request's headers are complete, `timeout_keep_alive` runs only between
requests (never before a connection's first byte, and a CRLF between requests
cancels it for good: llhttp skips it without `on_message_begin`), and httptools
gathers a header line in memory without limit (a 192 MiB line grew the process
by 250 MiB) and hands every trailer to `on_header` (one connection sending small
trailers reached 2.4 GiB).

Non-body bytes are counted on the raw reads, before the parser sees them: in the
headers, a read that would go past the budget is fed only up to it, and the rest
only if the headers ended within; in the body, a read is counted whole and
`on_body` gives its body bytes back, so a trailer line or chunk framing past the
budget is cut after that read. Two approximations: bytes of a request pipelined
behind another in the same read are not counted, and a body's non-body bytes
are checked after the read; either may exceed the limit by at most one read
(uvloop reads 256 KiB at most). Refusals are counted by reason
(`intentflow_bridge_connections_refused_total`), not logged: a flood would otherwise flood
the log too.

Cost on the hot path: per read, two comparisons and a subtraction; per request,
four wrapped or replaced parser callbacks (`on_header`, per header, is uvicorn's
own with one comparison more); one timer per connection, and one more only for
a request whose headers or body span reads, or for bytes between requests.

This is uvicorn's `HttpToolsProtocol` with `data_received` replaced (the same
steps as uvicorn's, plus the refusals) and a few callbacks wrapped. What it
relies on from uvicorn 0.54.0 (pinned in pyproject.toml), to recheck on upgrade:

- the constructor `(config, server_state, app_state, _loop)`, and uvicorn calling
  `config.http_protocol_class` as given (`uvicorn.Config(http=<class>)`);
- attributes `parser` (httptools' request parser), `transport`, `loop`, `logger`,
  `connections` (the server's set of open connections, which `connection_made`
  adds to), `headers` (the current request's), `expect_100_continue`, `pipeline`
  (the cycles queued behind one in flight; the current cycle is queued exactly
  when it is not empty), and `cycle` (the latest `RequestResponseCycle`:
  `response_started`, `response_complete`, `more_body`, `disconnected`,
  `message_event`);
- the parser callbacks `on_message_begin`, `on_headers_complete` (which starts
  the ASGI task or queues it), `on_body` and `on_message_complete`, and the
  helpers `_unset_keepalive_if_required`, `send_400_response`, `_should_upgrade`,
  `handle_websocket_upgrade`, `_unsupported_upgrade_warning`;
- `on_header`'s body, which `GuardedProtocol.on_header` repeats rather than calls;
- `shutdown()`, called by the server on each open connection when it stops, and
  `RequestResponseCycle.receive` returning `http.disconnect` without waiting
  once `disconnected` is set;
- `on_body` and `on_message_complete` dropping body bytes once the cycle's
  response is complete: what keeps a connection usable after an early answer;
- httptools (0.9) stopping `feed_data` and raising `HttpParserCallbackError`, with
  the callback's exception as its `__context__`, when a callback raises, and
  calling `on_header` for trailers (after `on_headers_complete`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from intentflow.producer.settings import BridgeSettings

REASONS = (
    "too_many_connections",
    "headers_too_large",
    "too_many_headers",
    "header_timeout",
    "body_timeout",
    "shutting_down",
)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: BridgeSettings) -> ConnectionLimits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_connections=settings.max_connections,
        )


def _answer(status: int, text: bytes) -> bytes:
    return (
        STATUS_LINE[status]
        + b"content-type: text/plain; charset=utf-8\r\n"
        + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(text)
        + text
    )


_ANSWERS = {
    "too_many_connections": _answer(503, b"too many connections, retry later"),
    "headers_too_large": _answer(431, b"request headers too large"),
    "too_many_headers": _answer(431, b"too many request headers"),
    "header_timeout": _answer(408, b"request headers not received in time"),
    "body_timeout": _answer(408, b"request body not received in time"),
    "shutting_down": _answer(503, b"shutting down, retry later"),
}

# Where the current request is: between requests (or before the first), in its
# headers, or in its body.
_IDLE, _HEADERS, _BODY = 0, 1, 2


class _Refused(Exception):
    """Raised from a parser callback to stop parsing the rest of the read."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above; see `protocol_class`."""

    limits: ClassVar[ConnectionLimits]
    on_refused: ClassVar[Callable[[str], None]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _IDLE
        self._header_budget = self.limits.max_header_bytes
        self._deadline: asyncio.TimerHandle | None = None
        # The request that pipelined ones wait for, once one was queued behind it.
        self._in_flight: RequestResponseCycle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport  # what connection_lost needs, nothing else
            self._refuse("too_many_connections")
            return
        super().connection_made(transport)
        # From the connection on: one that never sends a byte is closed too.
        self._deadline = self.loop.call_later(
            self.limits.header_timeout_s, self._too_slow, "header_timeout"
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        budget = self._header_budget - len(data)
        if budget < 0 and self._phase != _BODY:
            self._feed_past_budget(data)
        else:
            # In a body the budget goes below zero before the feed, and on_body
            # gives the body's bytes back.
            self._header_budget = budget
            self._feed(data)
        if self._header_budget < 0:
            # Only in a body: more than the budget was chunk framing or a trailer line.
            if not self.transport.is_closing():
                self._refuse("headers_too_large")
            return
        if self._deadline is None and (
            self._phase != _IDLE or self.cycle is None or self.cycle.response_complete
        ):
            # Also between requests once the last answer is out: a client that
            # sends only CRLFs (llhttp skips them without on_message_begin) has
            # just cancelled uvicorn's keep-alive timer in _feed.
            self._arm()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._phase = _HEADERS
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._phase == _BODY:
            # A chunked body's trailer: nothing reads trailers, and uvicorn would
            # append each to the request's headers (2.4 GiB from one connection).
            raise _Refused("headers_too_large")
        # uvicorn's on_header, inlined: wrapping it with super() cost 0.8 µs per
        # request of seven headers, this comparison 0.04 µs.
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._disarm()
        if len(self.headers) > self.limits.max_headers:
            raise _Refused("too_many_headers")
        self._phase = _BODY
        previous = self.cycle
        super().on_headers_complete()
        if len(self.pipeline) == 1:  # queued behind `previous`, whose answer is to come
            self._in_flight = previous

    def on_body(self, body: bytes) -> None:
        self._header_budget += len(body)  # body bytes do not count, see data_received
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._phase = _IDLE
        self._header_budget = self.limits.max_header_bytes
        super().on_message_complete()

    # The limits

    def _feed(self, data: bytes | memoryview) -> None:
        """uvicorn's `data_received`, plus a refusal raised from a callback."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _Refused):
                self._refuse(exc.__context__.reason)
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _feed_past_budget(self, data: bytes) -> None:
        """Feed a read that is longer than what is left of the header budget.

        Only up to the budget while the headers are incomplete; the rest once
        they are complete (and counted again if a next request starts in it).
        """
        view = memoryview(data)
        while view:
            if self._phase == _BODY or len(view) <= self._header_budget:
                self._header_budget -= len(view)
                self._feed(view)
                return
            room = self._header_budget
            self._header_budget = 0  # on_message_complete sets it back
            self._feed(view[:room])
            if self.transport.is_closing():
                return
            if self._phase != _BODY and self._header_budget == 0:
                self._refuse("headers_too_large")
                return
            view = view[room:]

    def _arm(self) -> None:
        if self.transport.is_closing():
            return
        if self._phase == _BODY:
            timeout_s, reason = self.limits.body_timeout_s, "body_timeout"
        else:
            timeout_s, reason = self.limits.header_timeout_s, "header_timeout"
        self._deadline = self.loop.call_later(timeout_s, self._too_slow, reason)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self, reason: str) -> None:
        self._deadline = None
        self._refuse(reason)

    def _refuse(self, reason: str) -> None:
        """Answer (when no other answer is due first) and close the connection."""
        self._disarm()
        cycle = self.cycle
        if self._phase == _BODY:
            # The current request's own cycle: answer unless the app has begun
            # to, or the request is queued behind a pipelined one whose answer
            # is still to come (this one would be read as that one's).
            answer = not cycle.response_started and not self.pipeline
        else:
            # A previous request's cycle, if any: an answer now would read as its.
            answer = cycle is None or cycle.response_complete
        if answer:
            self.transport.write(_ANSWERS[reason])
        # What connection_lost will do, now: the app's next send writes nothing,
        # and a receive it waits in returns `http.disconnect`. Also for the
        # request a queued one waits for (connection_lost would miss it): its
        # send would otherwise raise on the closed transport, with a traceback.
        for silenced in (cycle, self._in_flight if self.pipeline else None):
            if silenced is not None and not silenced.response_complete:
                silenced.disconnected = True
                silenced.message_event.set()
        self.transport.close()
        type(self).on_refused(reason)

    # uvicorn's server calls this on every open connection when it stops.

    def shutdown(self) -> None:
        """uvicorn's, except that a client still sending a request is answered 503.

        uvicorn would leave it open until its drain timeout and then cancel the
        app waiting for the body, logging a traceback per slow client. Marked
        disconnected instead, the app's `receive` returns at once and it ends.
        """
        cycle = self.cycle
        if self._phase == _HEADERS:
            # Unless an earlier request is in flight: uvicorn closes after its answer.
            sending = cycle is None or cycle.response_complete
        else:
            sending = self._phase == _BODY and cycle.more_body and not cycle.response_complete
        if sending:
            self._refuse("shutting_down")
        else:
            super().shutdown()


def protocol_class(
    limits: ConnectionLimits, on_refused: Callable[[str], None]
) -> type[GuardedProtocol]:
    """The protocol class to give uvicorn (`http=`), with these limits and counter."""
    return type(
        "GuardedProtocol",
        (GuardedProtocol,),
        {"limits": limits, "on_refused": staticmethod(on_refused)},
    )

"""A fake of Stripe's read API, built from Stripe event objects: `StripeReadApi`.

It plays Stripe for `order-consumer backfill` (GET /v1/events) and `order-consumer
reconcile --with-stripe` (the payment intents, checkout sessions, charges and refunds
the events carry), in `replay-duplicates` and in integration tests. An aiohttp server on
127.0.0.1 (`start()`/`stop()`, `async with`), like tests/fake_stripe.py for the write side.

A request goes through, in order: recorded (`requests`), an injected fault (`fail_next`,
then every `rate_limit_every`th request), the API key, the `Stripe-Account` scope, the
query's parameters, then the endpoint. Objects are the latest snapshot of each
(account, object type, id) among the events' `data.object`, by event `created` (ties:
the later added wins). Stripe's behaviour as documented, cited where relied on:
  - lists: https://docs.stripe.com/api/pagination (newest first, `limit` 1..100 default
    10, `starting_after` and `ending_before` exclusive, `{"object": "list", ...}`);
  - events: https://docs.stripe.com/api/events/list (30 days back; `type` with `*`
    wildcards, or `types`, up to 20, never both; `created[...]`; `delivery_success`);
  - errors: https://docs.stripe.com/api/errors (types) and https://docs.stripe.com/error-codes
    (`rate_limit`, `account_invalid`, `resource_missing`, `parameter_unknown`, ...).
"""

from __future__ import annotations

import base64
import copy
import itertools
import operator
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from intentflow.devservices.embedded import free_port

Obj = dict[str, Any]
Params = dict[str, list[str]]  # `x[]=` and `x[0]=` folded into `x`; `created[gte]` kept

EVENTS_KEPT_S = 30 * 24 * 3600
PAGE = frozenset({"limit", "starting_after", "ending_before", "expand"})
COMPARE = {
    "eq": operator.eq,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}
CREATED_OPS = frozenset(COMPARE) - {"eq"}


@dataclass(frozen=True)
class Listing:
    """A list endpoint over one object type: its equality filters and accepted extras."""

    object: str
    filters: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()  # accepted, as Stripe does, and not applied here


# Stripe's own parameters per list (https://docs.stripe.com/api/payment_intents/list etc.).
LISTINGS = {
    "/v1/payment_intents": Listing("payment_intent", ignored=("customer",)),
    "/v1/checkout/sessions": Listing(
        "checkout.session",
        ("payment_intent", "status"),
        ("customer", "customer_details", "payment_link", "subscription"),
    ),
    "/v1/charges": Listing("charge", ("payment_intent",), ("customer", "transfer_group")),
    "/v1/refunds": Listing("refund", ("payment_intent", "charge")),
}
EVENT_PARAMS = PAGE | {"created", "type", "types", "delivery_success"}


@dataclass
class ReadRequest:
    method: str
    path: str
    query: dict[str, list[str]]  # as sent: {"created[gte]": ["1700000000"]}
    account: str | None  # the Stripe-Account header
    status: int = 0  # 0: not answered yet


class StripeError(Exception):
    """A Stripe error answer: `{"error": {"type", "message", "code"?, "param"?}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error: Obj = {"type": kind, "message": message}
        if code is not None:
            self.error["code"] = code
            self.error["doc_url"] = f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
        if param is not None:
            self.error["param"] = param


def invalid(message: str, param: str, code: str = "parameter_invalid_integer") -> StripeError:
    return StripeError(400, message, code=code, param=param)


def injected(status: int) -> StripeError:
    if status == 429:
        # Stripe's 429 is an invalid_request_error with code `rate_limit`; clients pick
        # their rate-limit error from the status (https://docs.stripe.com/rate-limits).
        message = (
            "Request rate limit exceeded. Learn more about rate limits here "
            "https://stripe.com/docs/rate-limits."
        )
        return StripeError(429, message, code="rate_limit")
    kind = "api_error" if status >= 500 else "invalid_request_error"
    return StripeError(status, f"Injected {status} by StripeReadApi.", kind=kind)


class StripeReadApi:
    """Stripe's read API over the events given (`add_events`), recording every request."""

    def __init__(
        self,
        events: Iterable[Obj] = (),
        *,
        api_key: str = "sk_test_intentflow",
        now: float | None = None,
        rate_limit_every: int = 0,
    ) -> None:
        self.api_key = api_key
        self.now = now
        self.rate_limit_every = rate_limit_every
        self.port = 0
        self.requests: list[ReadRequest] = []
        self._seq = itertools.count()
        self._events: list[tuple[int, Obj]] = []  # (insertion, event), as given
        self._objects: dict[tuple[str | None, str, str], tuple[tuple[int, int], Obj]] = {}
        self._accounts: set[str] = set()
        self._failures: list[int] = []
        # Orders computed once per read until the next add_events: a backfill pages
        # through tens of thousands of events, and each page would sort them all again.
        self._ordered: dict[tuple[str | None, str], list[Obj]] = {}
        self._runner: web.AppRunner | None = None
        self.add_events(events)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_events(self, events: Iterable[Obj]) -> None:
        for given in events:
            event, seq = copy.deepcopy(given), next(self._seq)
            self._events.append((seq, event))
            account = event.get("account")
            if account is not None:
                self._accounts.add(account)
            obj = event["data"]["object"]
            key = (account, obj["object"], obj["id"])
            when = (event["created"], seq)
            if key not in self._objects or self._objects[key][0] <= when:
                self._objects[key] = (when, obj)
        self._ordered.clear()

    def add_account(self, account_id: str) -> None:
        self._accounts.add(account_id)

    def fail_next(self, count: int = 1, status: int = 429) -> None:
        self._failures.extend([status] * count)

    # --- Lifecycle -----------------------------------------------------------------------

    async def start(self) -> Self:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- Requests ------------------------------------------------------------------------

    async def _serve(self, request: web.Request) -> web.Response:
        query = {k: request.query.getall(k) for k in request.query}
        account = request.headers.get("Stripe-Account")
        recorded = ReadRequest(request.method, request.path, query, account)
        self.requests.append(recorded)
        try:
            status, body = 200, self._answer(request, account)
        except StripeError as error:
            status, body = error.status, {"error": error.error}
        recorded.status = status
        headers = {"Request-Id": f"req_{secrets.token_hex(7)}"}
        return web.json_response(body, status=status, headers=headers)

    def _answer(self, request: web.Request, account: str | None) -> Obj:
        if self._failures:
            raise injected(self._failures.pop(0))
        if self.rate_limit_every > 0 and len(self.requests) % self.rate_limit_every == 0:
            raise injected(429)
        self._authorize(request.headers.get("Authorization", ""))
        if account is not None and account not in self._accounts:
            # Stripe: 403, code account_invalid, "The account ID provided as a value for
            # the Stripe-Account header is invalid" (https://docs.stripe.com/error-codes).
            message = (
                f"The provided key '{_masked(self.api_key)}' does not have access to account "
                f"'{account}' (or that account does not exist). Application access may have "
                "been revoked."
            )
            raise StripeError(403, message, code="account_invalid")
        path, params = request.path.rstrip("/"), _params(request.query.items())
        if request.method == "GET":
            if path == "/v1/events":
                return self._list_events(account, params)
            if path == "/v1/accounts":
                _check(params, PAGE | {"created"})
                # "If you're not a platform, the list is empty"
                # (https://docs.stripe.com/api/accounts/list): a connected account is not.
                found = [] if account else [{"id": a, "object": "account"} for a in self._accounts]
                return _page(sorted(found, key=lambda a: a["id"]), path, params, "account")
            if path in LISTINGS:
                return self._list(account, path, LISTINGS[path], params)
            head, _, ident = path.rpartition("/")
            if head in LISTINGS or head == "/v1/events":
                _check(params, frozenset({"expand"}))
                return self._retrieve(account, head, ident, params)
        raise StripeError(404, f"Unrecognized request URL ({request.method}: {request.path}).")

    def _authorize(self, header: str) -> None:
        scheme, _, credentials = header.partition(" ")
        key = credentials.strip()
        if scheme.lower() == "basic":  # curl -u KEY: sends the key as the user name
            try:
                key = base64.b64decode(key).decode().partition(":")[0]
            except ValueError:
                key = ""
        elif scheme.lower() != "bearer":
            key = ""
        if not key:
            message = (
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                "YOUR_SECRET_KEY')."
            )
            raise StripeError(401, message)
        if key != self.api_key:
            raise StripeError(401, f"Invalid API Key provided: {_masked(key)}")

    def _list_events(self, account: str | None, params: Params) -> Obj:
        _check(params, EVENT_PARAMS)
        if "type" in params and "types" in params:
            message = "You may pass either type or types, but not both."
            raise invalid(message, "types", "parameters_exclusive")
        types = params.get("types")
        if types is not None and len(types) > 20:
            raise invalid("You may pass up to 20 types.", "types", "parameter_invalid_string")
        wildcard = _wildcard(params["type"][-1]) if "type" in params else None
        within = _created_filter(params)
        since = (self.now if self.now is not None else time.time()) - EVENTS_KEPT_S
        delivered = params.get("delivery_success", [])
        settled = _bool(delivered[-1]) if delivered else None

        def keep(event: Obj) -> bool:
            return (
                event["created"] >= since
                and within(event["created"])
                and (wildcard is None or wildcard.fullmatch(event["type"]) is not None)
                and (types is None or event["type"] in types)
                and (settled is None or (event.get("pending_webhooks", 0) == 0) == settled)
            )

        page = _page(self._ordered_events(account), "/v1/events", params, "event", keep)
        page["data"] = [_as_listed(e) for e in page["data"]]
        return page

    def _list(self, account: str | None, path: str, listing: Listing, params: Params) -> Obj:
        _check(params, PAGE | {"created", *listing.filters, *listing.ignored})
        within = _created_filter(params)
        wanted = {f: params[f][-1] for f in listing.filters if f in params}

        def keep(obj: Obj) -> bool:
            return within(obj.get("created", 0)) and all(obj.get(f) == v for f, v in wanted.items())

        page = _page(self._of(account, listing.object), path, params, listing.object, keep)
        page["data"] = [copy.deepcopy(o) for o in page["data"]]
        if "data.latest_charge" in params.get("expand", []):
            page["data"] = [self._expanded(account, o) for o in page["data"]]
        return page

    def _retrieve(self, account: str | None, head: str, ident: str, params: Params) -> Obj:
        if head == "/v1/events":
            found = [e for _, e in self._events if e["id"] == ident and e.get("account") == account]
            if found:
                return _as_listed(found[-1])
            kind = "event"
        else:
            kind = LISTINGS[head].object
            entry = self._objects.get((account, kind, ident))
            if entry is not None:
                obj = copy.deepcopy(entry[1])
                return (
                    self._expanded(account, obj)
                    if "latest_charge" in params.get("expand", [])
                    else obj
                )
        raise StripeError(404, f"No such {kind}: '{ident}'", code="resource_missing", param="id")

    def _ordered_events(self, account: str | None) -> list[Obj]:
        """The account's events, newest first by `created`, ties: the later added first."""
        if (account, "event") not in self._ordered:
            mine = [(e["created"], s, e) for s, e in self._events if e.get("account") == account]
            self._ordered[account, "event"] = [e for *_, e in sorted(mine, reverse=True)]
        return self._ordered[account, "event"]

    def _of(self, account: str | None, kind: str) -> list[Obj]:
        """The account's `kind` objects, newest first by their own `created`, ties by id."""
        if (account, kind) not in self._ordered:
            mine = [o for (a, k, _), (_, o) in self._objects.items() if (a, k) == (account, kind)]
            mine.sort(key=lambda o: (o.get("created", 0), o["id"]), reverse=True)
            self._ordered[account, kind] = mine
        return self._ordered[account, kind]

    def _expanded(self, account: str | None, intent: Obj) -> Obj:
        charge = self._objects.get((account, "charge", str(intent.get("latest_charge"))))
        if charge is not None:  # unknown: the id stays, as an unexpandable reference would
            intent["latest_charge"] = copy.deepcopy(charge[1])
        return intent


# --- Query and pages -------------------------------------------------------------------


def _params(query: Iterable[tuple[str, str]]) -> Params:
    """Stripe's form-encoded arrays, `expand[]=a` and `expand[0]=a`, folded into `expand`."""
    params: Params = {}
    for raw, value in query:
        name = re.sub(r"\[\d*\]$", "", raw)
        params.setdefault(name, []).append(value)
    return params


def _check(params: Params, allowed: frozenset[str]) -> None:
    for name in params:
        base, _, op = name.partition("[")
        if base not in allowed or (op and (base != "created" or op.rstrip("]") not in CREATED_OPS)):
            raise invalid(f"Received unknown parameter: {name}", name, "parameter_unknown")


def _created_filter(params: Params) -> Callable[[int], bool]:
    bounds: list[tuple[str, int]] = []
    for name, values in params.items():
        if name == "created" or name.startswith("created["):
            op = name.partition("[")[2].rstrip("]") or "eq"
            bounds.append((op, _int(values[-1], name)))
    return lambda created: all(COMPARE[op](created, bound) for op, bound in bounds)


def _page(
    ordered: list[Obj],
    url: str,
    params: Params,
    kind: str,
    keep: Callable[[Obj], bool] = lambda _: True,
) -> Obj:
    """One page of `ordered` (newest first): cursors are placed among all the account's
    objects of the kind, filtered or not, then the filters apply."""
    limit = _int(params.get("limit", ["10"])[-1], "limit")
    if not 1 <= limit <= 100:
        raise invalid("This value must be between 1 and 100.", "limit")
    after, before = (
        params.get("starting_after", [None])[-1],
        params.get("ending_before", [None])[-1],
    )
    if after is not None and before is not None:
        message = "You may only specify one of these parameters: ending_before, starting_after."
        raise invalid(message, "ending_before", "parameters_exclusive")
    ids = [o["id"] for o in ordered]
    for param, cursor in (("starting_after", after), ("ending_before", before)):
        if cursor is not None and cursor not in ids:
            raise invalid(f"No such {kind}: '{cursor}'", param, "resource_missing")
    # Only the page and one more are filtered: enough to tell `has_more`.
    if before is not None:  # the page just before the cursor, still newest first
        earlier = (o for o in reversed(ordered[: ids.index(before)]) if keep(o))
        shown = list(itertools.islice(earlier, limit + 1))[::-1]
        data = shown[-limit:]
    else:
        start = ids.index(after) + 1 if after is not None else 0
        later = (o for o in ordered[start:] if keep(o))
        shown = list(itertools.islice(later, limit + 1))
        data = shown[:limit]
    return {"object": "list", "url": url, "has_more": len(shown) > limit, "data": data}


def _as_listed(event: Obj) -> Obj:
    # Stripe documents an event's top-level `account` for Connect webhooks only: listed
    # through the API with Stripe-Account it is absent, so the backfill must set it itself.
    return {k: copy.deepcopy(v) for k, v in event.items() if k != "account"}


def _wildcard(pattern: str) -> re.Pattern[str]:
    """`charge.*` matches every type under `charge.`, `charge.dispute.created` included."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


def _int(value: str, param: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise invalid(f"Invalid integer: {value}", param) from None


def _bool(value: str) -> bool:
    if value not in ("true", "false"):
        raise invalid(f"Invalid boolean: {value}", "delivery_success", "parameter_invalid_boolean")
    return value == "true"


def _masked(key: str) -> str:
    return f"{key[:8]}{'*' * max(len(key) - 12, 0)}{key[-4:]}"

"""Reading Stripe's lists page by page, for the operator's tools (`backfill`, `reconcile
--with-stripe`), waiting out what Stripe asks to be waited out.

`StripeReader.pages(resource, params, account)` yields each page of a list endpoint
(`events`, `payment_intents`, `checkout.sessions`, `accounts`, ...), newest first as
Stripe lists, following `has_more` with `starting_after`
(https://docs.stripe.com/api/pagination). Each page is the raw JSON Stripe sent: an
event is published as Stripe rendered it (in its own `api_version`,
https://docs.stripe.com/api/events/list), never through a model of ours.

A read is safe to repeat, so a 429 (Stripe's rate limits, which ask for exponential
back-off: https://docs.stripe.com/rate-limits), a 5xx, a connection lost or a timeout
is tried again after a doubling wait with jitter, up to `tries` times; then
`StripeUnavailable`. A refusal (a key Stripe does not know, an account the key
cannot reach, a parameter) is `StripeRefused` at once, with Stripe's own message:
waiting does not mend it. The stripe library's own retries are off (it does not
retry a 429): one policy, here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Self

import orjson
import stripe

from intentflow.consumer.backoff import delay_s

PAGE = 100  # the most Stripe lists at once


class StripeRefused(Exception):
    """Stripe refused a read for good (401, 403, 400, 404): a key, an account, a parameter."""


class StripeUnavailable(Exception):
    """Stripe could not be read after every try (429, 5xx, no connection)."""


def _retriable(exc: stripe.StripeError) -> bool:
    if isinstance(exc, stripe.RateLimitError | stripe.APIConnectionError):
        return True
    status = exc.http_status or 0
    return status == 429 or status >= 500 or status == 409


def _why(exc: stripe.StripeError) -> str:
    status = f"HTTP {exc.http_status}: " if exc.http_status else ""
    return f"{status}{exc.user_message or exc._message or type(exc).__name__}"


class StripeReader:
    """Stripe's read API with back-off (`start()`/`stop()`, or `async with`)."""

    def __init__(
        self,
        api_key: str,
        *,
        api_base: str | None = None,
        timeout_s: float = 20.0,
        tries: int = 8,
        first_wait_s: float = 0.5,
        max_wait_s: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._http = stripe.HTTPXClient(timeout=timeout_s)
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else {},
            max_network_retries=0,
            http_client=self._http,
        )
        self._tries = tries
        self._first_wait_s = first_wait_s
        self._max_wait_s = max_wait_s
        self._sleep = sleep
        self.requests = 0
        self.waited = 0  # requests answered 429, 5xx or not at all, and tried again

    @staticmethod
    def livemode_of(api_key: str) -> bool:
        """The mode a secret or restricted key reads: `sk_live_…`/`rk_live_…` live."""
        return api_key.split("_")[1:2] == ["live"]

    async def start(self) -> Self:
        return self

    async def stop(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _service(self, resource: str) -> Any:
        service: Any = self._client.v1
        for part in resource.split("."):
            service = getattr(service, part)
        return service

    async def page(
        self, resource: str, params: dict[str, Any], account: str | None = None
    ) -> dict[str, Any]:
        """One page of `resource`'s list as Stripe sent it (`data`, `has_more`)."""
        options: Any = {"stripe_account": account} if account else {}
        service = self._service(resource)
        for attempt in range(self._tries):
            self.requests += 1
            try:
                listed = await service.list_async(params=dict(params), options=options)
            except stripe.StripeError as exc:
                if not _retriable(exc):
                    raise StripeRefused(_why(exc)) from None
                if attempt + 1 == self._tries:
                    raise StripeUnavailable(f"{_why(exc)}, {self._tries} times in a row") from None
                self.waited += 1
                await self._sleep(delay_s(attempt, self._first_wait_s, self._max_wait_s))
                continue
            body: dict[str, Any] = orjson.loads(listed.last_response.body)
            return body
        raise AssertionError("unreachable")  # pragma: no cover

    async def pages(
        self, resource: str, params: dict[str, Any], account: str | None = None
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Every page of `resource`'s list under `params`, newest first."""
        params = {"limit": PAGE, **params}
        while True:
            body = await self.page(resource, params, account)
            data: list[dict[str, Any]] = body.get("data") or []
            if data:
                yield data
            if not body.get("has_more") or not data:
                return
            params["starting_after"] = data[-1]["id"]

    async def accounts(self, scope: str | None) -> list[str | None]:
        """The accounts `--account` names: None for the platform itself (no `scope`), one
        connected account, or (`all`) every account GET /v1/accounts lists, which are the
        platform's connected accounts (https://docs.stripe.com/api/accounts/list)."""
        if scope is None:
            return [None]
        if scope != "all":
            return [scope]
        return [account["id"] async for page in self.pages("accounts", {}) for account in page]

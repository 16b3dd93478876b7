"""A recording Stripe for what no emulator gives: saved answers per key, Connect accounts, faults.

localstripe (tests/stripe_emulator.py) keeps no idempotency keys (a repeated request
acts again) and ignores `Stripe-Account` (every object lives on one account): the
relay's handling of Stripe's saved answers and of connected accounts cannot be tested
against it. `FakeStripe` is an aiohttp server on 127.0.0.1 serving the requests the
relay makes: `GET /v1/payment_intents/{id}`, `POST /v1/payment_intents/{id}/cancel`
and `/capture`, `POST /v1/refunds`, and `GET /v1/refunds` (Stripe's list shape,
newest first, `limit` and `starting_after`). Its objects are Stripe's own example
objects (tests/fixtures/stripe.py, from stripe/openapi's fixtures3.json) with ids,
amounts, statuses and links set per test (`add_intent`, `add_refund`).

As Stripe does (https://docs.stripe.com/api/idempotent_requests,
https://docs.stripe.com/error-low-level):
  - the first answer to a POST with an `Idempotency-Key` is saved, per account and
    key, a 500 and a refusal included, and replayed to every later request with the
    key, with `Idempotent-Replayed: true`; keys are never pruned here;
  - a key reused with other parameters or on another path: 400 `idempotency_error`;
    a key in use by a request still running: 409 `idempotency_key_in_use`; parameters
    that fail validation, and 429s: answered, never saved;
  - an object of another account than the request's `Stripe-Account` (none: the
    platform): 404 `resource_missing`.
Faults, taken once by the next matching request: `fail_next` (a 5xx saved under the
key, with or without `Stripe-Should-Retry`, before or after acting; a 429 or 409,
not saved) and `time_out_next` (act or not, then hold the answer past the client's
timeout). Every request is recorded (`requests`, `calls`): method, path, query, form,
idempotency key, Stripe-Account, and the status answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl

import pytest
from aiohttp import web

from intentflow.devservices.embedded import free_port
from tests.fixtures import stripe as fixtures

CANCELABLE = (
    "requires_payment_method",
    "requires_capture",
    "requires_confirmation",
    "requires_action",
    "processing",
)
CANCELLATION_REASONS = ("duplicate", "fraudulent", "requested_by_customer", "abandoned")
REFUND_REASONS = ("duplicate", "fraudulent", "requested_by_customer")
REFUND_COUNTS = ("pending", "requires_action", "succeeded")


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]  # flat names: {"metadata[intentflow_order_id]": "7"}
    idempotency_key: str | None
    stripe_account: str | None
    status: int | None = None  # None: still held, or never answered
    replayed: bool = False
    injected: bool = False


@dataclass
class _Fault:
    method: str
    path_contains: str
    status: int | None  # None: a timeout
    acted: bool  # act first, then answer with the fault
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None


@dataclass
class _Saved:
    method: str
    path: str
    form: dict[str, str]
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


class Refusal(Exception):
    """A Stripe error answer; `saved`: Stripe keeps it under the key (the endpoint ran)."""

    def __init__(self, status: int, error: dict[str, Any], *, saved: bool = True) -> None:
        super().__init__(error.get("message"))
        self.status = status
        self.error = {"type": "invalid_request_error", **error}
        self.saved = saved


def invalid(message: str, param: str, code: str = "parameter_invalid_empty") -> Refusal:
    return Refusal(400, {"code": code, "message": message, "param": param}, saved=False)


class FakeStripe:
    """Stripe's API as the relay calls it, recording every request (`start()`/`stop()`)."""

    def __init__(self, *, hold_s: float = 30.0) -> None:
        self.port = 0
        self.requests: list[Recorded] = []
        self.hold_s = hold_s  # how long a timed-out request is held at most
        self._intents: dict[tuple[str | None, str], dict[str, Any]] = {}
        self._charges: dict[tuple[str | None, str], dict[str, Any]] = {}
        self._refunds: dict[str | None, list[dict[str, Any]]] = {}
        self._saved: dict[tuple[str | None, str], _Saved] = {}
        self._running: set[tuple[str | None, str]] = set()
        self._faults: list[_Fault] = []
        self._released = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- Objects -------------------------------------------------------------------------

    def add_intent(
        self,
        *,
        amount: int = 2000,
        status: str = "requires_capture",
        account: str | None = None,
        captured: int | None = None,
    ) -> str:
        """An intent with its one charge; `succeeded` captures `captured` (all by default)."""
        pid = f"pi_{secrets.token_hex(8)}"
        received = (amount if captured is None else captured) if status == "succeeded" else 0
        charge = fixtures.charge(
            id=f"ch_{secrets.token_hex(8)}",
            amount=amount,
            amount_captured=received,
            captured=status == "succeeded",
            payment_intent=pid,
            metadata={},
        )
        charge["refunds"] = {**charge["refunds"], "url": f"/v1/charges/{charge['id']}/refunds"}
        intent = fixtures.payment_intent(
            id=pid,
            amount=amount,
            amount_capturable=amount if status == "requires_capture" else 0,
            amount_received=received,
            canceled_at=None,
            capture_method="manual",
            client_secret=f"{pid}_secret_{secrets.token_hex(8)}",
            last_payment_error=None,
            latest_charge=charge["id"],
            metadata={"cart_id": f"cart-{pid}"},
            next_action=None,
            processing=None,
            status=status,
            transfer_data=None,
        )
        self._intents[account, pid] = intent
        self._charges[account, charge["id"]] = charge
        return pid

    def add_refund(
        self,
        pid: str,
        amount: int,
        *,
        account: str | None = None,
        status: str = "succeeded",
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """A refund made behind the relay's back (the shop's dashboard)."""
        return self._refund(account, self._intents[account, pid], amount, status, metadata or {})

    def intent(self, pid: str, *, account: str | None = None) -> dict[str, Any]:
        return self._intents[account, pid]

    def refunds_of(self, pid: str, *, account: str | None = None) -> list[dict[str, Any]]:
        """The intent's refunds, oldest first."""
        return [r for r in self._refunds.get(account, []) if r["payment_intent"] == pid]

    def calls(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if (r.method, r.path) == (method.upper(), path)]

    # --- Faults --------------------------------------------------------------------------

    def fail_next(
        self,
        status: int,
        *,
        path_contains: str,
        method: str = "POST",
        acted: bool = False,
        should_retry: bool | None = None,
        retry_after_s: int | None = None,
        code: str | None = None,
    ) -> None:
        """Answer the next matching request with `status` (after acting, when `acted`)."""
        headers = {}
        if should_retry is not None:
            headers["Stripe-Should-Retry"] = str(should_retry).lower()
        if retry_after_s is not None:
            headers["Retry-After"] = str(retry_after_s)
        kind = "api_error" if status >= 500 else "invalid_request_error"
        error = {"type": kind, "message": f"Injected {status} by FakeStripe."}
        if code is not None:
            error["code"] = code
        self._faults.append(_Fault(method, path_contains, status, acted, headers, error))

    def time_out_next(self, *, path_contains: str, acted: bool, method: str = "POST") -> None:
        """Hold the next matching request's answer past the client's timeout; act first
        (and save the answer under its key, as Stripe would) when `acted`."""
        self._faults.append(_Fault(method, path_contains, None, acted))

    # --- Lifecycle -----------------------------------------------------------------------

    async def start(self) -> Self:
        app = web.Application()
        app.router.add_get("/v1/payment_intents/{id}", self._get_intent)
        app.router.add_post("/v1/payment_intents/{id}/{verb:cancel|capture}", self._post)
        app.router.add_post("/v1/refunds", self._post)
        app.router.add_get("/v1/refunds", self._list_refunds)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        self._released.set()  # held requests end now
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

    async def _record(self, request: web.Request) -> Recorded:
        form = dict(parse_qsl((await request.read()).decode(), keep_blank_values=True))
        recorded = Recorded(
            request.method,
            request.path,
            dict(request.query),
            form,
            request.headers.get("Idempotency-Key"),
            request.headers.get("Stripe-Account"),
        )
        self.requests.append(recorded)
        return recorded

    def _answer(
        self, recorded: Recorded, status: int, body: dict[str, Any], **headers: str
    ) -> web.Response:
        recorded.status = status
        return web.json_response(body, status=status, headers=headers)

    async def _get_intent(self, request: web.Request) -> web.Response:
        recorded = await self._record(request)
        try:
            self._authorized(request)
            intent = self._find(self._intents, recorded.stripe_account, request.match_info["id"])
        except Refusal as refusal:
            return self._answer(recorded, refusal.status, {"error": refusal.error})
        return self._answer(recorded, 200, intent)

    async def _list_refunds(self, request: web.Request) -> web.Response:
        recorded = await self._record(request)
        try:
            self._authorized(request)
            pid = recorded.query.get("payment_intent")
            limit = int(recorded.query.get("limit", "10"))
            if not 1 <= limit <= 100:
                raise invalid("This value must be between 1 and 100.", "limit")
        except Refusal as refusal:
            return self._answer(recorded, refusal.status, {"error": refusal.error})
        newest_first = [
            r
            for r in reversed(self._refunds.get(recorded.stripe_account, []))
            if pid is None or r["payment_intent"] == pid
        ]
        after = recorded.query.get("starting_after")
        if after is not None:
            ids = [r["id"] for r in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
        page = newest_first[:limit]
        body = {
            "object": "list",
            "data": page,
            "has_more": len(newest_first) > limit,
            "url": "/v1/refunds",
        }
        return self._answer(recorded, 200, body)

    async def _post(self, request: web.Request) -> web.Response:
        recorded = await self._record(request)
        account, key = recorded.stripe_account, recorded.idempotency_key
        try:
            self._authorized(request)
        except Refusal as refusal:
            return self._answer(recorded, refusal.status, {"error": refusal.error})
        if key is not None:
            saved = self._saved.get((account, key))
            if saved is not None:
                if (saved.method, saved.path, saved.form) != (
                    recorded.method,
                    recorded.path,
                    recorded.form,
                ):
                    message = (
                        "Keys for idempotent requests can only be used with the same parameters "
                        f"they were first used with. Try using a key other than '{key}' if you "
                        "meant to execute a different request."
                    )
                    error = {"type": "idempotency_error", "message": message}
                    return self._answer(recorded, 400, {"error": error})
                recorded.replayed = True
                headers = {**saved.headers, "Idempotent-Replayed": "true"}
                return self._answer(recorded, saved.status, saved.body, **headers)
            if (account, key) in self._running:
                message = (
                    "There is currently another in-progress request using this Idempotent Key "
                    "(that probably means you submitted twice, and the other request is still "
                    "going through): " + key + ". Please try again later."
                )
                error = {"type": "idempotency_error", "code": "idempotency_key_in_use"}
                error["message"] = message
                return self._answer(recorded, 409, {"error": error})
        fault = self._take_fault(recorded)
        if fault is not None and fault.status in (409, 429):
            # Before the endpoint runs (the rate limiter, a lock): nothing is saved.
            recorded.injected = True
            return self._answer(recorded, fault.status, {"error": fault.body}, **fault.headers)
        lost = fault is not None and fault.status is None and not fault.acted
        if key is not None and not lost:
            self._running.add((account, key))  # until answered: a second request gets a 409
        try:
            return await self._run(request, recorded, fault)
        finally:
            self._running.discard((account, key or ""))

    async def _run(
        self, request: web.Request, recorded: Recorded, fault: _Fault | None
    ) -> web.Response:
        status, body, headers = 200, {}, {}
        acted = fault is None or fault.acted
        if acted:
            try:
                body = self._act(request, recorded)
            except Refusal as refusal:
                status, body = refusal.status, {"error": refusal.error}
                if not refusal.saved:  # failed validation: the endpoint never ran
                    return self._answer(recorded, status, body)
        if fault is not None and fault.status is not None:
            # The endpoint ran (and acted, or not) and failed: saved as any answer is.
            recorded.injected = True
            status, body, headers = fault.status, {"error": fault.body}, fault.headers
        key = recorded.idempotency_key
        if key is not None and (acted or (fault is not None and fault.status is not None)):
            saved = _Saved(recorded.method, recorded.path, recorded.form, status, body, headers)
            self._saved[recorded.stripe_account, key] = saved
        if fault is not None and fault.status is None:
            # A timeout: acted (and saved) or lost on the way; held past the client's
            # timeout, so the client is gone when this ends.
            recorded.injected = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), self.hold_s)
            return web.Response(status=504)
        return self._answer(recorded, status, body, **headers)

    def _act(self, request: web.Request, recorded: Recorded) -> dict[str, Any]:
        account, form = recorded.stripe_account, recorded.form
        if request.path == "/v1/refunds":
            return self._create_refund(account, form)
        intent = self._find(self._intents, account, request.match_info["id"])
        verb = request.match_info["verb"]
        if verb == "cancel":
            return self._cancel(intent, form)
        return self._capture(account, intent, form)

    def _cancel(self, intent: dict[str, Any], form: dict[str, str]) -> dict[str, Any]:
        _only(form, "cancellation_reason")
        reason = form.get("cancellation_reason")
        if reason is not None and reason not in CANCELLATION_REASONS:
            raise invalid(
                "Invalid cancellation_reason: must be one of " + ", ".join(CANCELLATION_REASONS),
                "cancellation_reason",
                "parameter_invalid_string",
            )
        if intent["status"] not in CANCELABLE:
            raise _unexpected_state(intent, "cancel", CANCELABLE)
        intent.update(
            status="canceled", cancellation_reason=reason, amount_capturable=0, canceled_at=1
        )
        return intent

    def _capture(
        self, account: str | None, intent: dict[str, Any], form: dict[str, str]
    ) -> dict[str, Any]:
        _only(form, "amount_to_capture")
        amount = _positive(
            form.get("amount_to_capture", str(intent["amount"])), "amount_to_capture"
        )
        if intent["status"] != "requires_capture":
            raise _unexpected_state(intent, "capture", ("requires_capture",))
        charge = self._charges[account, intent["latest_charge"]]
        charge.update(captured=True, amount_captured=amount)
        intent.update(status="succeeded", amount_received=amount, amount_capturable=0)
        return intent

    def _create_refund(self, account: str | None, form: dict[str, str]) -> dict[str, Any]:
        metadata = {k[9:-1]: v for k, v in form.items() if k.startswith("metadata[")}
        _only(form, "payment_intent", "amount", "reason", *(f"metadata[{k}]" for k in metadata))
        pid = form.get("payment_intent")
        if not pid:
            raise invalid("You must provide either a charge or a payment_intent.", "payment_intent")
        reason = form.get("reason")
        if reason is not None and reason not in REFUND_REASONS:
            raise invalid(
                "Invalid reason: must be one of " + ", ".join(REFUND_REASONS),
                "reason",
                "parameter_invalid_string",
            )
        intent = self._find(self._intents, account, pid)
        left = intent["amount_received"] - self._refunded(account, pid)
        amount = _positive(form["amount"], "amount") if "amount" in form else left
        if intent["status"] != "succeeded":
            message = f"This PaymentIntent ({pid}) does not have a successful charge to refund."
            raise Refusal(400, {"code": "payment_intent_unexpected_state", "message": message})
        if left <= 0:
            message = f"Charge {intent['latest_charge']} has already been refunded."
            raise Refusal(400, {"code": "charge_already_refunded", "message": message})
        if amount > left:
            message = (
                f"Refund amount ({amount}) is greater than unrefunded amount on charge ({left})"
            )
            raise Refusal(400, {"message": message, "param": "amount"})
        return self._refund(account, intent, amount, "succeeded", metadata, reason)

    def _refund(
        self,
        account: str | None,
        intent: dict[str, Any],
        amount: int,
        status: str,
        metadata: dict[str, str],
        reason: str | None = None,
    ) -> dict[str, Any]:
        refund = fixtures.refund(
            id=f"re_{secrets.token_hex(8)}",
            amount=amount,
            charge=intent["latest_charge"],
            currency=intent["currency"],
            metadata=metadata,
            payment_intent=intent["id"],
            reason=reason,
            status=status,
        )
        self._refunds.setdefault(account, []).append(refund)
        charge = self._charges[account, intent["latest_charge"]]
        refunded = self._refunded(account, intent["id"])
        charge.update(amount_refunded=refunded, refunded=refunded >= charge["amount_captured"])
        return refund

    def _refunded(self, account: str | None, pid: str) -> int:
        return sum(
            r["amount"]
            for r in self.refunds_of(pid, account=account)
            if r["status"] in REFUND_COUNTS
        )

    def _find(
        self, objects: dict[tuple[str | None, str], dict[str, Any]], account: str | None, oid: str
    ) -> dict[str, Any]:
        found = objects.get((account, oid))
        if found is None:
            kind = "payment_intent" if oid.startswith("pi_") else "object"
            error = {"code": "resource_missing", "message": f"No such {kind}: '{oid}'"}
            raise Refusal(404, {**error, "param": "intent" if kind == "payment_intent" else "id"})
        return found

    def _authorized(self, request: web.Request) -> None:
        if not request.headers.get("Authorization", "").startswith("Bearer sk_"):
            raise Refusal(401, {"message": "Invalid API Key provided."}, saved=False)

    def _take_fault(self, recorded: Recorded) -> _Fault | None:
        for fault in self._faults:
            if fault.method == recorded.method and fault.path_contains in recorded.path:
                self._faults.remove(fault)
                return fault
        return None


def _only(form: dict[str, str], *allowed: str) -> None:
    for name in form:
        if name not in allowed:
            raise invalid(f"Received unknown parameter: {name}", name, "parameter_unknown")


def _positive(value: str, param: str) -> int:
    if not value.isdigit() or int(value) <= 0:
        raise invalid("Invalid positive integer", param, "parameter_invalid_integer")
    return int(value)


def _unexpected_state(intent: dict[str, Any], verb: str, allowed: tuple[str, ...]) -> Refusal:
    """Stripe's refusal of a cancel or capture in the wrong status (saved under the key)."""
    status = intent["status"]
    if verb == "cancel":
        said = f"You cannot cancel this PaymentIntent because it has a status of {status}."
        done = "canceled"
    else:
        said = f"This PaymentIntent could not be captured because it has a status of {status}."
        done = "captured"
    message = f"{said} Only a PaymentIntent with one of the following statuses may be {done}: "
    error = {"code": "payment_intent_unexpected_state", "message": message + ", ".join(allowed)}
    return Refusal(400, error | {"payment_intent": intent})


@pytest.fixture
async def fake_stripe() -> AsyncIterator[FakeStripe]:
    async with FakeStripe() as fake:
        yield fake

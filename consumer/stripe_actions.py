"""Stripe's actions on a payment intent, one record each, and performing one attempt.

`ACTIONS` maps each `Action` (the name its outbox rows carry, consumer/outbox.py)
to its `ActionSpec`, the whole of what the relay knows about it:
  - `call`: the request that performs it; `leads_to`: where it leaves the money;
  - `settled(facts)`: the answer the intent's known state already gives, without
    a call: the state our webhooks recorded (`IntentMoney.from_webhooks`, in the
    claim) or what Stripe shows (`StripeActions.read`);
  - `allowed(policy)`: whether a relay performs it under its own policy (cancel
    always; capture only under CAPTURE_POLICY=on_placed; refund only under
    REFUND_UNFILLABLE=true), and `instead`: what a relay that may not records
    (a refund: `owed`; None: the row waits, reported, for a relay that may).
`spec_of` raises `UnknownAction` for a name no record knows: a row written by
another version is reported by the relay (consumer/relay.py), never guessed at.

`StripeActions.perform(attempt)` goes through the `stripe` library's async
client with the library's own retries off: the relay owns retrying, on the
outbox row's schedule, so a slow or absent Stripe holds no connection and
survives a restart. In order:
  1. read first when the action always does (a refund: the intent and every
     refund on it) or when the last answer left the outcome unknown
     (`verify_first`): the read may settle it with no call;
  2. call with the key of the row's generation (`claims.generation_key`), the
     next one after an unknown outcome: Stripe replays its first answer to a
     key, a 500 included, so only a new key can act again, and only the read
     just made can say it must;
  3. on a refusal, read: a refusal may only mean that the work is done.
Every request about an intent on a Connect account carries `Stripe-Account`.
Stripe's answers, and what the relay does about each: consumer/stripe_answers.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import stripe

from intentflow.consumer.claims import generation_key
from intentflow.consumer.facts import REFUND_COUNTS
from intentflow.consumer.lifecycle import RELEASE
from intentflow.consumer.outbox import CAPTURED, REFUND_OFF, Action
from intentflow.consumer.policy import CapturePolicy, ShopPolicy
from intentflow.consumer.stripe_answers import Answer, Outcome, classify

CANCELED = "canceled"
# In the metadata of each refund the relay makes: the outbox row it was made for. A read
# finds it whatever became of the key (pruned after 24 h) or of the answer (lost).
OUTBOX_ID_KEY = "intentflow_outbox_id"
REFUNDS_PAGE = 100  # the most Stripe lists at once

CAPTURED_CODE = "payment_intent_captured"
CAPTURED_FIRST = (
    "the payment intent was captured before its authorization could be released: "
    "its order's refund (refund_payment_intent) returns the money instead"
)


@dataclass(frozen=True, slots=True)
class IntentMoney:
    """What is known of an intent's money: what our webhooks recorded, or what Stripe
    shows now (`read`: then, for a refund, every refund on the intent counted)."""

    status: str | None
    received: int | None = None  # amount_received: captured, what a refund can return
    refunded: int | None = None  # by the refunds that count (REFUND_COUNTS), anyone's
    ours: str | None = None  # the counting refund made for this outbox row, if any
    ours_failed: bool = False  # a refund made for this row failed or was canceled
    read: bool = False
    # A destination charge (Connect: the intent's `transfer_data`): its refund reverses
    # the transfer, so the seller who did not ship pays it back, not the platform.
    transferred: bool = False

    @classmethod
    def from_webhooks(cls, status: str | None, captured: int, refunded: int) -> IntentMoney:
        """The order's amounts as the webhooks left them (0 captured: not known yet)."""
        return cls(status, captured or None, refunded if captured else None)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One outbox row, as the relay hands it to Stripe."""

    outbox_id: int
    action: Action
    payment_intent_id: str
    params: dict[str, Any]  # the row's, as consumer/outbox.py wrote them
    idempotency_key: str  # generation 0's
    generation: int  # the key generation last called with
    verify_first: bool  # the last answer left the outcome unknown: read before acting
    account: str | None = None  # the intent's Connect account; None: the platform's own


Call = Callable[[stripe.StripeClient, Attempt, IntentMoney | None, Any], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class ActionSpec:
    action: Action
    call: Call
    leads_to: str  # what done looks like
    settled: Callable[[IntentMoney], Answer | None]
    allowed: Callable[[ShopPolicy], bool]
    instead: Answer | None = None  # recorded by a relay that may not perform it
    waits_for: str = ""  # who performs it, when this relay may not and records nothing
    reads_first: bool = False  # read Stripe (the refunds too) before every call


async def _cancel(
    client: stripe.StripeClient, a: Attempt, _: IntentMoney | None, options: Any
) -> None:
    fields: Any = a.params  # as consumer/outbox.py wrote them: Stripe's own names
    await client.v1.payment_intents.cancel_async(
        a.payment_intent_id, params=fields, options=options
    )


async def _capture(
    client: stripe.StripeClient, a: Attempt, _: IntentMoney | None, options: Any
) -> None:
    fields: Any = a.params
    await client.v1.payment_intents.capture_async(
        a.payment_intent_id, params=fields, options=options
    )


async def _refund(
    client: stripe.StripeClient, a: Attempt, facts: IntentMoney | None, options: Any
) -> None:
    """What is captured and not yet refunded, by anyone: never more than the customer paid."""
    assert facts is not None and facts.received is not None and facts.refunded is not None
    fields: Any = {
        "payment_intent": a.payment_intent_id,
        "amount": facts.received - facts.refunded,
        "metadata": {**a.params.get("metadata", {}), OUTBOX_ID_KEY: str(a.outbox_id)},
    }
    if "reason" in a.params:
        fields["reason"] = a.params["reason"]
    if facts.transferred:
        # https://docs.stripe.com/api/refunds/create#create_refund-reverse_transfer
        fields["reverse_transfer"] = True
    await client.v1.refunds.create_async(params=fields, options=options)


def _cancel_settled(facts: IntentMoney) -> Answer | None:
    if facts.status == CANCELED:
        return Answer(Outcome.ALREADY_DONE, None, "the payment intent is canceled")
    if facts.status == CAPTURED:
        # Captured (by the shop, or automatically) before the hold could be released:
        # the relay asks for the order's refund in the transaction that records this.
        return Answer(Outcome.SUPERSEDED, CAPTURED_CODE, CAPTURED_FIRST)
    return None


def _capture_settled(facts: IntentMoney) -> Answer | None:
    if facts.status == CAPTURED:
        return Answer(Outcome.ALREADY_DONE, None, "the payment intent is succeeded")
    if facts.status == CANCELED:
        # Canceled or expired since the order was placed: its stock came back with
        # the cancellation, and there is nothing left to capture.
        return Answer(Outcome.NOT_NEEDED, None, "the payment intent is canceled")
    return None


def _refund_settled(facts: IntentMoney) -> Answer | None:
    if facts.status == CANCELED:
        return Answer(Outcome.NOT_NEEDED, None, "the payment intent is canceled: nothing captured")
    if facts.ours is not None:
        return Answer(Outcome.ALREADY_DONE, None, f"refunded by {facts.ours}, made for this row")
    if facts.received and facts.refunded is not None and facts.refunded >= facts.received:
        refunded = f"refunded in full ({facts.refunded} of {facts.received})"
        return Answer(Outcome.ALREADY_DONE, None, refunded)
    if facts.read and not facts.received:
        nothing = f"nothing captured (the payment intent is {facts.status})"
        return Answer(Outcome.NOT_NEEDED, None, nothing)
    return None


ACTIONS: dict[Action, ActionSpec] = {
    Action.CANCEL: ActionSpec(
        Action.CANCEL,
        call=_cancel,
        leads_to=CANCELED,
        settled=_cancel_settled,
        allowed=lambda policy: True,
    ),
    Action.CAPTURE: ActionSpec(
        Action.CAPTURE,
        call=_capture,
        leads_to=CAPTURED,
        settled=_capture_settled,
        allowed=lambda policy: policy.capture is CapturePolicy.ON_PLACED,
        waits_for="a relay with CAPTURE_POLICY=on_placed",
    ),
    Action.REFUND: ActionSpec(
        Action.REFUND,
        call=_refund,
        leads_to="refunded",
        settled=_refund_settled,
        allowed=lambda policy: policy.refund_unfillable,
        instead=Answer(Outcome.OWED, *REFUND_OFF),
        reads_first=True,
    ),
}


class UnknownAction(LookupError):
    """An outbox row names a Stripe action no record in `ACTIONS` knows."""

    def __init__(self, name: str) -> None:
        known = ", ".join(ACTIONS)
        super().__init__(f"no Stripe action is called {name!r} (known: {known})")
        self.name = name


def spec_of(name: str) -> ActionSpec:
    try:
        return ACTIONS[Action(name)]
    except (ValueError, KeyError):
        raise UnknownAction(name) from None


class StripeActions:
    """The Stripe API as the relay uses it (`start()`/`stop()` for the HTTP client)."""

    def __init__(self, api_key: str, *, api_base: str | None = None, timeout_s: float = 30.0):
        self._http = stripe.HTTPXClient(timeout=timeout_s)
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else {},
            max_network_retries=0,
            http_client=self._http,
        )

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def perform(self, attempt: Attempt) -> Answer:
        spec = spec_of(attempt.action)
        generation = attempt.generation
        facts: IntentMoney | None = None
        if spec.reads_first or attempt.verify_first:
            try:
                facts = await self.read(attempt, refunds=spec.reads_first)
            except stripe.StripeError as exc:
                # No call was made: the row keeps its key and what it must verify.
                answer = classify(exc)
                return dataclasses.replace(answer, verify_first=attempt.verify_first)
            settled = spec.settled(facts)
            if settled is not None:
                return settled
            # Still needed. The key's saved answer may be a 500 (verify_first), or our
            # refund that failed after it was made: a new key, or Stripe replays it.
            if attempt.verify_first or facts.ours_failed:
                generation += 1
        options = self._options(attempt, generation_key(attempt.idempotency_key, generation))
        try:
            await spec.call(self._client, attempt, facts, options)
        except stripe.StripeError as exc:
            answer = classify(exc)
            if answer.outcome is Outcome.REJECTED:
                answer = await self._unless_settled(spec, attempt, answer)
            return dataclasses.replace(answer, generation=generation)
        return Answer(Outcome.SUCCEEDED, generation=generation)

    async def read(self, attempt: Attempt, *, refunds: bool) -> IntentMoney:
        """The intent as Stripe has it, and (`refunds`) every refund on it, every page."""
        options = self._options(attempt)
        intent = await self._client.v1.payment_intents.retrieve_async(
            attempt.payment_intent_id, options=options
        )
        if not refunds:
            # Where it is says all a cancel or capture needs.
            return IntentMoney(intent.status, read=True)
        refunded, ours, ours_failed = 0, None, False
        # Before API 2025-03-31.basil Stripe released the rest of a partial capture as a
        # refund object of that amount, listed with the intent's refunds: no money back.
        # One such refund, not ours, is taken for it (if it was the shop's own refund of
        # just that amount, Stripe refuses ours beyond what is left to refund).
        received = intent.amount_received or 0
        rest = intent.amount - received if 0 < received < intent.amount else 0
        params: Any = {"payment_intent": attempt.payment_intent_id, "limit": REFUNDS_PAGE}
        while True:
            page = await self._client.v1.refunds.list_async(params=params, options=options)
            for refund in page.data:
                if getattr(refund, "reason", None) == RELEASE:
                    continue  # a hold Stripe released, named so: no money back
                if (
                    rest
                    and refund.amount == rest
                    and refund.status == "succeeded"
                    and (not refund.metadata or OUTBOX_ID_KEY not in refund.metadata.to_dict())
                ):
                    rest = 0  # the released rest of the partial capture
                    continue
                counts = refund.status in REFUND_COUNTS
                refunded += refund.amount if counts else 0
                metadata = refund.metadata.to_dict() if refund.metadata else {}
                if metadata.get(OUTBOX_ID_KEY) == str(attempt.outbox_id):
                    ours = refund.id if counts else ours
                    ours_failed = ours_failed or not counts
            if not page.has_more or not page.data:
                break
            params["starting_after"] = page.data[-1].id
        return IntentMoney(
            intent.status,
            intent.amount_received,
            refunded,
            ours,
            ours_failed,
            read=True,
            transferred=getattr(intent, "transfer_data", None) is not None,
        )

    async def _unless_settled(self, spec: ActionSpec, attempt: Attempt, refusal: Answer) -> Answer:
        """A refusal may only mean the work is done: ask Stripe where the intent is."""
        try:
            facts = await self.read(attempt, refunds=spec.reads_first)
        except stripe.StripeError as exc:
            checked = classify(exc)
            # Cannot tell yet: try the whole action again later rather than guess. The
            # refusal is saved under the key: nothing more to verify.
            if checked.outcome is not Outcome.REJECTED:
                return dataclasses.replace(checked, verify_first=False)
            return refusal
        settled = spec.settled(facts)
        if settled is None:
            status = f"the payment intent is {facts.status}, not {spec.leads_to}"
            return Answer(Outcome.REJECTED, refusal.code, f"{refusal.message} ({status})")
        if settled.outcome is Outcome.SUPERSEDED:
            return settled
        # Done, or not needed (canceled before our webhooks said so): Stripe's words kept.
        return Answer(settled.outcome, refusal.code, refusal.message)

    @staticmethod
    def _options(attempt: Attempt, idempotency_key: str | None = None) -> Any:
        options: dict[str, str] = {}
        if idempotency_key is not None:
            options["idempotency_key"] = idempotency_key
        if attempt.account is not None:
            # Stripe-Account: a connected account's intent is not found on the platform.
            options["stripe_account"] = attempt.account
        return options

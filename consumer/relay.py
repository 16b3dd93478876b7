"""The relay: performs what the outbox holds, then marks it (`order-consumer relay`, and in `run`).

Two loops, so that a slow Stripe never holds up the order events:
  - order events: claim up to RELAY_BATCH_SIZE due rows, publish them to the
    order events topic, mark what the broker acknowledged; an intent's later
    events wait while an earlier one is backing off (consumer/outbox.py, `claim`);
  - Stripe actions: claim a few due rows of the actions this relay handles
    (consumer/stripe_actions.py, `ACTIONS`: those its own policy allows, and
    refunds, which a relay with REFUND_UNFILLABLE=false records `owed`), settle
    those the webhooks already settled, call Stripe for the rest at once, and
    record each answer; a cancel that met a captured intent is recorded
    `superseded`, and its order's refund asked for in the same transaction
    (consumer/outbox.py, `ask_refunds`). Every RELAY_SWEEP_INTERVAL_S, also ask
    to release the money of `needs_review` orders older than
    NEEDS_REVIEW_CANCEL_AFTER_S, when set.
Each claim is one transaction that holds its rows (`FOR UPDATE SKIP LOCKED`)
until they are marked, so several relays share the work and a relay that dies
leaves its rows pending: a retry may call Stripe again (with the same
idempotency key as the attempt cut short) or publish again (with the same
outbox id), never skip.

A failed action or publish is due again after a back-off (doubling from
RELAY_RETRY_INITIAL_S up to RELAY_RETRY_MAX_S, or Stripe's `Retry-After` when
longer). The database or broker away is waited out. Without STRIPE_API_KEY, or
with a key Stripe refuses, Stripe actions stay pending and are reported, as
are rows whose action no record knows (written by another version).

What it did and what is left are metrics (consumer/relay_metrics.py): each
Stripe answer and each order event's mark is counted as it is recorded; the
pending rows and the oldest one's age are read at scrape time.

With `exit_when_idle`, `run` returns once nothing pending can be done now:
no order event is pending, and no Stripe action is pending that this relay
could perform (rows backing off are waited for).

Every database unit of work has a deadline (`consumer.database.within`): a claim
the time its statements, its Stripe requests or its broker acknowledgements may
take; past it, its connection is ended and the claim waited out like the database
away (its rows stay pending). The broker's calls have their own (the producer's
start, the acknowledgements). `overdue` reports a unit that ran out its deadline
and goes on, for the probes; `stop` ends by the shutdown deadline, whatever the
database does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from aiokafka.errors import KafkaError, KafkaTimeoutError

from intentflow.consumer import errors
from intentflow.consumer.backoff import StopRequested, delay_s, sleep_unless_stopped, unless_stopped
from intentflow.consumer.claims import (
    Backlog,
    Claimed,
    Mark,
    backlog,
    claim,
    pending_actions,
    record,
)
from intentflow.consumer.database import within
from intentflow.consumer.order_events import publish_marks
from intentflow.consumer.outbox import Action, Kind, ask_refunds, sweep_needs_review
from intentflow.consumer.policy import ShopPolicy
from intentflow.consumer.relay_metrics import RelayMetrics, relay_registry
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.stripe_actions import ACTIONS, CAPTURED_CODE, Attempt, IntentMoney, spec_of
from intentflow.consumer.stripe_answers import DONE, Answer, Outcome

log = structlog.get_logger("relay")

# What each step of `stop` may take before what it waits for is abandoned: closing a
# pool, stopping a producer or a client takes milliseconds when their peers answer.
STOP_STEP_S = 2.0


def stripe_wait_s(settings: ConsumerSettings) -> float:
    """How long a claim of Stripe actions may wait for Stripe: its calls run at once, and
    the longest (a refund) makes four requests (a read of the intent and of its refunds,
    the refund, a read after a refusal), each up to STRIPE_TIMEOUT_S, plus 10 s of slack."""
    return 4 * settings.stripe_timeout_s + 10


# A cancel that met a captured intent whose order intentflow does not refund (it can be
# filled: a needs_review order the sweep asked to release, captured by the shop meanwhile).
NOT_REFUNDED = Answer(
    Outcome.SUPERSEDED,
    CAPTURED_CODE,
    "the payment intent was captured before its authorization could be released; "
    "its order is not one intentflow refunds (only out_of_stock and duplicate orders are)",
)


# An action on an order that names no cart: another system's payment, made an order by a
# version before 4. Never performed, whoever asked (the v3 needs_review sweep did).
NOT_THE_SHOPS = Answer(
    Outcome.NOT_NEEDED,
    "not_the_shops",
    "its order names no cart: not the shop's payment; intentflow never acts on it",
)
# A capture while Radar reviews the payment: due again later, until Stripe closes the
# review (`approved`: captured then; refunded or canceled: not needed).
CAPTURE_IN_REVIEW = Answer(
    Outcome.RETRY, "review_open", "Radar's review of the payment is open: the capture waits"
)
# A capture of a payment its card issuer warned of as fraud: the shop decides.
CAPTURE_WARNED = Answer(
    Outcome.REJECTED,
    "early_fraud_warning",
    "the card's issuer warned of fraud: refund the customer, or capture it at Stripe",
)


class EventSink(Protocol):
    """What the relay uses of `consumer.order_events.OrderEvents`."""

    topic: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def publish(self, rows: Sequence[Claimed]) -> list[KafkaError | None]: ...


class StripeApi(Protocol):
    """What the relay uses of `consumer.stripe_actions.StripeActions`."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def perform(self, attempt: Attempt) -> Answer: ...


@dataclass
class RelayStats:
    actions: Counter[str] = field(default_factory=Counter)  # by outcome
    published: int = 0
    publish_failures: int = 0
    swept: int = 0  # needs_review orders whose money the sweep asked to release
    refunds_asked: int = 0  # refunds asked for by cancels that met a captured intent
    database_waits: int = 0
    # At the last look: pending rows by kind, and the age of the oldest (None: none).
    pending: dict[str, int] = field(default_factory=dict)
    oldest_pending_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "actions": dict(self.actions),
            "published": self.published,
            "publish_failures": self.publish_failures,
            "swept": self.swept,
            "refunds_asked": self.refunds_asked,
            "database_waits": self.database_waits,
            "pending": self.pending,
            "oldest_pending_s": (
                None if self.oldest_pending_s is None else round(self.oldest_pending_s, 3)
            ),
        }


class Relay:
    """Runs the outbox's two loops until stopped, or until idle (`start()`/`stop()`)."""

    def __init__(
        self,
        settings: ConsumerSettings,
        *,
        open_pool: Callable[[], Awaitable[Any]],
        new_events: Callable[[], EventSink],
        stripe: StripeApi | None,
        metrics: RelayMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.stats = RelayStats()
        # In the worker's registry under `run`; in one of its own under `relay`.
        self.metrics = metrics if metrics is not None else RelayMetrics(relay_registry())
        self._open_pool = open_pool
        # A factory: a producer whose start() failed cannot be started again.
        self._new_events = new_events
        self._events: EventSink | None = None
        self._stripe = stripe
        # The relay's own policy decides what it performs, whatever the member that
        # asked for an action had (consumer/policy.py).
        self._policy = ShopPolicy.from_settings(settings)
        self._draining = False
        self._pool: Any = None
        # The failure each loop is waiting out, by loop, for /readyz.
        self._waiting: dict[str, str] = {}
        self._stopping = asyncio.Event()
        # On the event loop's clock: until when Stripe's refusal of our key holds
        # the Stripe actions back, when the next sweep and the next backlog report are due.
        self._key_refused_until = 0.0
        self._reported_waiting: int | None = None
        self._reported_unknown: dict[str, int] = {}
        self._next_sweep_at = 0.0
        self._next_report_at = 0.0
        # The units of work running now: (what, started on the loop's clock, deadline).
        self._running: list[tuple[str, float, float]] = []
        self._stop_at: float | None = None  # the loop's clock: when `stop` must be done
        self._lent: set[Any] = set()  # the pool's connections its units hold now

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open the pool (it connects on demand); the producer starts in the events loop."""
        self._pool = await self._open_pool()
        if self._stripe is not None:
            await self._stripe.start()

    async def stop(self) -> None:
        """Stop the producer and the Stripe client and close the pool, by the shutdown deadline.

        A connection still lent (a claim cut short on a connection that does not
        answer) would keep the pool's close waiting: the pool is terminated instead.
        """
        self._start_stop_clock()
        if self._events is not None:
            await self._bounded("stop_order_events_producer", self._events.stop())
        if self._stripe is not None:
            await self._bounded("stop_stripe_client", self._stripe.stop())
        if self._pool is not None and not await self._bounded("close_pool", self._pool.close()):
            self._pool.terminate()

    async def _bounded(self, what: str, step: Awaitable[None]) -> bool:
        assert self._stop_at is not None
        left_s = self._stop_at - asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(min(STOP_STEP_S, max(left_s, 0.2))):
                await step
            return True
        except TimeoutError:
            log.warning("shutdown_step_abandoned", step=what, reason="shutdown deadline")
            return False

    def _start_stop_clock(self) -> None:
        if self._stop_at is None:
            self._stop_at = asyncio.get_running_loop().time() + self.settings.shutdown_timeout_s

    @property
    def pool(self) -> Any:
        """The relay's pool once started (None before): what its scrapes and probes use."""
        return self._pool

    @property
    def waiting_out(self) -> str | None:
        """The failure a loop is waiting out (its cause), if any."""
        return next(iter(self._waiting.values()), None)

    @property
    def stopping(self) -> asyncio.Event:
        """Set by `request_stop`: what the caller's start-up waits watch too."""
        return self._stopping

    def request_stop(self) -> None:
        """Stop soon: a claim under way is cut short (its rows stay pending), and its
        connection ended, so that its rollback waits for no server that does not answer."""
        self._start_stop_clock()
        self._stopping.set()
        for conn in self._lent:
            with contextlib.suppress(Exception):
                conn.terminate()

    def overdue(self, slack_s: float) -> str | None:
        """A unit of work that has run longer than its deadline plus `slack_s` (for the probes)."""
        now = asyncio.get_running_loop().time()
        for what, started, deadline_s in self._running:
            running_s = now - started
            if running_s > deadline_s + slack_s:
                return (
                    f"the relay's {what} has made no progress for {running_s:.0f} s "
                    f"(its deadline is {deadline_s:g} s)"
                )
        return None

    @contextlib.asynccontextmanager
    async def _database(self, what: str, deadline_s: float) -> AsyncIterator[Any]:
        """A pooled connection for one unit of work that ends by `deadline_s` (module docstring)."""
        unit = (what, asyncio.get_running_loop().time(), deadline_s)
        self._running.append(unit)
        try:
            async with within(self._pool, deadline_s, what) as conn:
                self._lent.add(conn)
                try:
                    yield conn
                finally:
                    self._lent.discard(conn)
        finally:
            self._running.remove(unit)

    @property
    def _statement_s(self) -> float:
        """One statement's deadline: the server's statement timeout, and connecting first."""
        return self.settings.statement_timeout_s + self.settings.db_connect_timeout_s

    def drain(self) -> None:
        """Return from `run` once nothing pending can be done (as `exit_when_idle`)."""
        self._draining = True

    async def run(self, *, exit_when_idle: bool = False) -> RelayStats:
        """Both loops; return when stopped, or (with `exit_when_idle`) when nothing can be done."""
        async with asyncio.TaskGroup() as loops:  # a bug in one stops the other
            loops.create_task(self._loop(self._events_step, exit_when_idle))
            loops.create_task(self._loop(self._stripe_step, exit_when_idle))
        if not self._stopping.is_set():  # a stop does not wait for a last count
            await self._refresh_backlog()
        return self.stats

    async def _loop(self, step: Callable[[], Awaitable[bool]], exit_when_idle: bool) -> None:
        with contextlib.suppress(StopRequested):
            await self._repeat(step, exit_when_idle)

    async def _repeat(self, step: Callable[[], Awaitable[bool]], exit_when_idle: bool) -> None:
        """Repeat `step` (True: it did something); sleep when idle; wait out the database."""
        failures = 0
        loop_name = step.__name__
        while not self._stopping.is_set():
            try:
                # A stop cuts a step short: its claim rolls back and its rows stay
                # pending. Safe at any point: a call Stripe already acted on is
                # made again with the same idempotency key, an event published
                # again with the same outbox id.
                busy = await unless_stopped(self._stopping, step())
                failures = 0
                self._waiting.pop(loop_name, None)
            except Exception as exc:
                if errors.classify(exc) is not errors.Fault.ENVIRONMENT:
                    raise
                if self._stopping.is_set():
                    return  # the stop ended its connection (`request_stop`)
                wait_s = delay_s(failures, self.settings.retry_initial_s, self.settings.retry_max_s)
                failures += 1
                self.stats.database_waits += 1
                self._waiting[loop_name] = errors.cause(exc)
                log.warning(
                    "relay_waiting",
                    cause=errors.cause(exc),
                    error=errors.describe(exc),
                    retry_in_s=round(wait_s, 2),
                )
                await sleep_unless_stopped(self._stopping, wait_s)
                continue
            if busy:
                continue
            if (exit_when_idle or self._draining) and await self._idle(step):
                return
            await sleep_unless_stopped(self._stopping, self.settings.relay_poll_interval_s)

    async def _idle(self, step: Callable[[], Awaitable[bool]]) -> bool:
        """Whether nothing this loop could do is pending (rows backing off count as doable)."""
        left = await self._refresh_backlog()
        if left is None:
            return False  # the database is away: not idle, only waiting
        if step == self._events_step:
            return left.pending[Kind.ORDER_EVENT] == 0
        return self._doable(left) == 0

    def _actions_handled(self) -> list[str]:
        """The Stripe actions this relay claims: those its own policy allows (a capture
        only under CAPTURE_POLICY=on_placed, a refund only under REFUND_UNFILLABLE=true),
        and those it records otherwise (a refund, `owed`)."""
        return [
            str(action)
            for action, spec in ACTIONS.items()
            if spec.allowed(self._policy) or spec.instead is not None
        ]

    def _doable(self, left: Backlog) -> int:
        if self._stripe is None or self._key_refused:
            return 0
        handled = self._actions_handled()
        return sum(n for name, n in left.actions.items() if name in handled)

    @property
    def _key_refused(self) -> bool:
        return asyncio.get_running_loop().time() < self._key_refused_until

    async def _refresh_backlog(self) -> Backlog | None:
        try:
            async with self._database("backlog read", self._statement_s) as conn:
                now = await backlog(conn)
        except Exception as exc:
            if errors.classify(exc) is not errors.Fault.ENVIRONMENT:
                raise
            return None
        self.stats.pending = now.pending
        self.stats.oldest_pending_s = now.oldest_pending_s
        return now

    # --- Order events -----------------------------------------------------------------

    async def _events_step(self) -> bool:
        # The claim, the producer's start and the acknowledgements (each bounded by the
        # statement timeout, below), and the marks.
        deadline_s = 2 * self._statement_s + 2 * self.settings.statement_timeout_s
        async with self._database("order events claim", deadline_s) as conn, conn.transaction():
            rows = await claim(conn, Kind.ORDER_EVENT, self.settings.relay_batch_size)
            if not rows:
                return False
            producer = await self._producer()
            try:
                # The claim's transaction waits for the acks: bounded well inside
                # the database's idle-in-transaction timeout (twice this).
                async with asyncio.timeout(self.settings.statement_timeout_s):
                    results = await producer.publish(rows)
            except TimeoutError:
                # Unacknowledged in time: all due again (copies may land; same ids).
                results = [KafkaTimeoutError("no acknowledgement in time")] * len(rows)
            await record(conn, self._publish_marks(rows, results))
        return True

    async def _producer(self) -> EventSink:
        """The order events producer, started on first use within the statement timeout
        (its claim's transaction waits for it); a failure is the broker's, waited out."""
        if self._events is None:
            events = self._new_events()
            try:
                async with asyncio.timeout(self.settings.statement_timeout_s):
                    await events.start()
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(STOP_STEP_S):
                        await events.stop()
                if isinstance(exc, TimeoutError):
                    raise KafkaTimeoutError("the order events producer did not start") from exc
                raise
            self._events = events
        return self._events

    def _publish_marks(
        self, rows: Sequence[Claimed], results: Sequence[KafkaError | None]
    ) -> list[Mark]:
        marks = publish_marks(rows, results, self._backoff_s)
        self.metrics.order_events_marked([m.outcome for m in marks])
        self.stats.published += sum(m.outcome == "published" for m in marks)
        self.stats.publish_failures += sum(m.outcome != "published" for m in marks)
        return marks

    # --- Stripe actions ---------------------------------------------------------------

    async def _stripe_step(self) -> bool:
        await self._report_backlog()
        swept = await self._sweep()
        if self._stripe is None or self._key_refused:
            async with self._database("pending actions read", self._statement_s) as conn:
                await self._report_waiting(await pending_actions(conn))
            return False
        stripe = self._stripe
        # The claim, Stripe's answers, the refunds asked for and the marks.
        deadline_s = 3 * self._statement_s + stripe_wait_s(self.settings)
        async with (
            self._database("Stripe actions claim", deadline_s) as conn,
            conn.transaction(),
        ):
            rows = await claim(
                conn,
                Kind.STRIPE_ACTION,
                self.settings.relay_stripe_concurrency,
                self._actions_handled(),
            )
            if not rows:
                await self._report_waiting(await pending_actions(conn))
                return swept
            answers = await asyncio.gather(*(self._perform(stripe, row) for row in rows))
            superseded = [
                r for r, a in zip(rows, answers, strict=True) if a.outcome is Outcome.SUPERSEDED
            ]
            if superseded:
                refunding = await self._ask_refunds(conn, superseded)
                answers = [
                    a if r not in superseded or r.payment_intent_id in refunding else NOT_REFUNDED
                    for r, a in zip(rows, answers, strict=True)
                ]
            marks = [self._action_mark(r, a) for r, a in zip(rows, answers, strict=True)]
            await record(conn, marks)
        return True

    async def _perform(self, stripe: StripeApi, row: Claimed) -> Answer:
        """The answer the webhooks already give, what this relay records instead of an
        action its policy forbids, or Stripe's."""
        spec = spec_of(row.name)  # claimed by name from ACTIONS: known
        if not row.shops:
            return NOT_THE_SHOPS
        known = IntentMoney.from_webhooks(
            row.intent_status, row.amount_captured, row.amount_refunded
        )
        settled = spec.settled(known)
        if settled is not None:
            return settled
        if spec.action is Action.CAPTURE and (row.review_open or row.fraud_warned):
            return CAPTURE_WARNED if row.fraud_warned else CAPTURE_IN_REVIEW
        if not spec.allowed(self._policy):
            assert spec.instead is not None  # only such actions are claimed
            return spec.instead
        assert row.idempotency_key is not None  # the table's check: every action has one
        attempt = Attempt(
            row.id,
            spec.action,
            row.payment_intent_id,
            json.loads(row.payload),
            row.idempotency_key,
            row.key_generation,
            row.verify_first,
            row.account,
        )
        return await stripe.perform(attempt)

    async def _ask_refunds(self, conn: Any, rows: Sequence[Claimed]) -> set[str]:
        """Cancels that met a captured intent: the orders' refunds are asked for in the
        transaction that records them (written `owed` under this relay's
        REFUND_UNFILLABLE=false). Returns the intents that have a refund row now: an
        order that can be filled (a needs_review one the sweep released) gets none."""
        added = await ask_refunds(conn, [r.order_id for r in rows], self._policy)
        self.stats.refunds_asked += added
        refunding = await conn.fetch(
            "SELECT payment_intent_id FROM outbox WHERE kind = 'stripe_action' AND name = $1"
            " AND payment_intent_id = ANY($2::text[])",
            str(Action.REFUND),
            [r.payment_intent_id for r in rows],
        )
        log.info(
            "refunds_asked",
            added=added,
            payment_intent_ids=[r.payment_intent_id for r in rows],
            refund_unfillable=self._policy.refund_unfillable,
        )
        return {r["payment_intent_id"] for r in refunding}

    def _action_mark(self, row: Claimed, answer: Answer) -> Mark:
        fields = {
            "outbox_id": row.id,
            "action": row.name,
            "payment_intent_id": row.payment_intent_id,
            "code": answer.code,
            "error": answer.message,
        }
        self.stats.actions[answer.outcome] += 1
        self.metrics.stripe_answered(row.name, str(answer.outcome))
        finished = Mark(row.id, str(answer.outcome), answer.code, answer.message)
        if answer.outcome in DONE:
            log.info("stripe_action_done", outcome=str(answer.outcome), **fields)
            return finished._replace(generation=answer.generation)
        if answer.outcome is Outcome.OWED:
            log.warning(
                "stripe_refund_owed",
                order_id=row.order_id,
                hint="REFUND_UNFILLABLE=false on this relay: refund the customer at Stripe, or "
                "set it to true and `order-consumer outbox retry ID`",
                **fields,
            )
            return finished
        if answer.outcome is Outcome.REJECTED:
            log.error("stripe_action_rejected", **fields)
            return finished._replace(generation=answer.generation)
        retry_in_s = max(self._backoff_s(row.attempts), answer.retry_after_s or 0.0)
        if answer.outcome is Outcome.BLOCKED:
            retry_in_s = self.settings.relay_retry_max_s
            self._key_refused_until = asyncio.get_running_loop().time() + retry_in_s
            log.error(
                "stripe_key_refused",
                hint="Stripe refused STRIPE_API_KEY: set a valid secret or restricted key "
                "with write access to PaymentIntents and Refunds; the actions stay pending",
                **fields,
            )
        else:
            log.warning(
                "stripe_action_retry",
                retry_in_s=round(retry_in_s, 2),
                verify_first=answer.verify_first,
                **fields,
            )
        return Mark(
            row.id,
            "retry",
            answer.code,
            answer.message,
            retry_in_s,
            answer.generation,
            answer.verify_first,
        )

    async def _sweep(self) -> bool:
        after_s = self.settings.needs_review_cancel_after_s
        if after_s is None:
            return False
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_sweep_at:
            return False
        self._next_sweep_at = loop.time() + self.settings.relay_sweep_interval_s
        async with self._database("needs_review sweep", self._statement_s) as conn:
            added = await sweep_needs_review(conn, after_s)
        if added:
            self.stats.swept += added
            log.info("needs_review_release_asked", orders=added, older_than_s=after_s)
        return added > 0

    async def _report_backlog(self) -> None:
        """Log the outbox's depth and oldest pending age every RELAY_SWEEP_INTERVAL_S."""
        now = asyncio.get_running_loop().time()
        if now < self._next_report_at:
            return
        self._next_report_at = now + self.settings.relay_sweep_interval_s
        await self._refresh_backlog()
        log.info("outbox_backlog", **self.stats.as_dict())

    async def _report_waiting(self, actions: dict[str, int]) -> None:
        """Say (once per change) how many Stripe actions wait for what this relay lacks,
        and which pending rows name an action no record knows."""
        self._report_unknown({name: n for name, n in actions.items() if _unknown(name)})
        if self._stripe is None or self._key_refused:
            waiting = sum(actions.values())
            why = "Stripe refused STRIPE_API_KEY" if self._key_refused else "no STRIPE_API_KEY"
            hint = f"{why}: the actions stay pending until a usable key is given"
        else:
            handled = self._actions_handled()
            waits = {
                name: n for name, n in actions.items() if name not in handled and not _unknown(name)
            }
            waiting = sum(waits.values())
            hint = "; ".join(
                f"{name} asked for under a policy this relay does not have: it waits for "
                f"{spec_of(name).waits_for}"
                for name in sorted(waits)
            )
        if waiting and waiting != self._reported_waiting:
            log.warning("stripe_actions_waiting", pending=waiting, hint=hint)
        self._reported_waiting = waiting

    def _report_unknown(self, unknown: dict[str, int]) -> None:
        if unknown and unknown != self._reported_unknown:
            log.error(
                "stripe_action_unknown",
                pending=unknown,
                hint="no record in consumer/stripe_actions.py knows these actions (written by "
                "another intentflow version?): they stay pending until a relay that knows "
                "them runs; `order-consumer outbox` counts them",
            )
        self._reported_unknown = unknown

    def _backoff_s(self, attempts: int) -> float:
        s = self.settings
        return delay_s(attempts, s.relay_retry_initial_s, s.relay_retry_max_s)


def _unknown(name: str) -> bool:
    return name not in set(map(str, ACTIONS))

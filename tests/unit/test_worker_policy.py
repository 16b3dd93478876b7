"""The worker's failure policy, with ten-line fakes for the database and the dead-letter topic.

The same paths run against the real services in tests/integration/test_failure_policy.py;
these pin the decisions themselves: what is retried, split, bisected or raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace

import asyncpg
import pytest
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from intentflow.consumer.backoff import StopRequested
from intentflow.consumer.decode import Envelope
from intentflow.consumer.dlq import DeadLetterRefused, Poison
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.store import BatchResult
from intentflow.consumer.worker import Superseded, Worker


def pg(code: str) -> asyncpg.PostgresError:
    return asyncpg.PostgresError.new({"C": code, "M": f"error {code}", "S": "ERROR"})


def envelopes(count: int) -> list[Envelope]:
    records = [
        SimpleNamespace(partition=0, offset=i, key=b"k", value=b"v", headers=())
        for i in range(count)
    ]
    return [Envelope(None, r, f"pi_{i}") for i, r in enumerate(records)]  # type: ignore[arg-type]


class FakeDeadLetters:
    """Acknowledges every record, except those `refuse` returns an error for."""

    def __init__(self, refuse: Callable[[Poison, int], Exception | None]) -> None:
        self.calls: list[list[int]] = []
        self._refuse = refuse

    async def send(self, poison: list[Poison]) -> list[tuple[Poison, Exception]]:
        self.calls.append([p.record.offset for p in poison])
        failed = [(p, self._refuse(p, len(self.calls))) for p in poison]
        return [(p, exc) for p, exc in failed if exc is not None]


class ScriptedWorker(Worker):
    """A worker whose transaction fails as `fail` says, for the batch it is given."""

    def __init__(self, fail: Callable[[list[Envelope], int], Exception | None]) -> None:
        super().__init__(ConsumerSettings(retry_initial_s=0.001, retry_max_s=0.002))
        self.fail = fail
        self.attempts: list[list[int]] = []
        self._dead_letters = FakeDeadLetters(lambda p, n: None)  # type: ignore[assignment]

    async def _apply_once(self, envelopes: list[Envelope]) -> BatchResult:
        offsets = [e.offset for e in envelopes]
        self.attempts.append(offsets)
        exc = self.fail(envelopes, len(self.attempts))
        if exc is not None:
            raise exc
        return BatchResult(events=len(envelopes), claimed=len(envelopes))


async def test_an_environment_failure_is_retried_with_the_whole_batch() -> None:
    worker = ScriptedWorker(lambda batch, n: pg("25006") if n <= 3 else None)
    result = await worker._apply(envelopes(4), epoch=0)
    assert result.claimed == 4
    assert worker.attempts == [[0, 1, 2, 3]] * 4
    assert worker.stats.retries_by_cause == {"database_read_only": 3}
    assert worker.stats.dead_lettered == 0


async def test_a_data_failure_is_bisected_to_the_one_event_and_dead_lettered() -> None:
    def fail(batch: list[Envelope], n: int) -> Exception | None:
        return pg("22021") if any(e.offset == 2 for e in batch) else None

    worker = ScriptedWorker(fail)
    result = await worker._apply(envelopes(4), epoch=0)
    assert result.events == 4
    assert worker.stats.dead_lettered == 1
    assert worker._dead_letters.calls == [[2]]  # type: ignore[union-attr]
    assert worker.stats.retries == 0


async def test_repeated_statement_timeouts_split_the_batch_not_dead_letter_it() -> None:
    worker = ScriptedWorker(lambda batch, n: pg("57014") if len(batch) > 2 else None)
    result = await worker._apply(envelopes(8), epoch=0)
    assert result.claimed == 8
    assert worker.stats.splits == 3  # 8 -> 4 + 4 -> 2 + 2 + 2 + 2
    assert worker.stats.dead_lettered == 0
    assert [a for a in worker.attempts if len(a) <= 2] == [[0, 1], [2, 3], [4, 5], [6, 7]]


async def test_a_single_event_that_times_out_is_retried_not_dead_lettered() -> None:
    worker = ScriptedWorker(lambda batch, n: pg("57014") if n <= 5 else None)
    assert (await worker._apply(envelopes(1), epoch=0)).claimed == 1
    assert worker.stats.retries_by_cause == {"statement_timeout": 5}


async def test_a_bug_is_raised_at_once() -> None:
    worker = ScriptedWorker(lambda batch, n: KeyError("oops"))
    with pytest.raises(KeyError):
        await worker._apply(envelopes(3), epoch=0)
    assert len(worker.attempts) == 1


async def test_a_stop_request_ends_the_wait_and_abandons_the_batch() -> None:
    worker = ScriptedWorker(lambda batch, n: pg("08006"))
    worker.settings = ConsumerSettings(retry_initial_s=30, retry_max_s=30)
    asyncio.get_running_loop().call_later(0.05, worker.request_stop)
    with pytest.raises(StopRequested):
        async with asyncio.timeout(5):
            await worker._apply(envelopes(2), epoch=0)


async def test_a_revocation_while_waiting_leaves_the_batch_to_the_new_owner() -> None:
    worker = ScriptedWorker(lambda batch, n: pg("08006"))
    worker.settings = ConsumerSettings(retry_initial_s=30, retry_max_s=30)

    def revoke() -> None:
        worker.epoch += 1

    asyncio.get_running_loop().call_later(0.05, revoke)
    with pytest.raises(Superseded):
        async with asyncio.timeout(5):
            await worker._apply(envelopes(2), epoch=0)


async def test_a_dead_letter_retry_resends_only_what_was_not_acknowledged() -> None:
    worker = ScriptedWorker(lambda batch, n: None)
    fake = FakeDeadLetters(
        lambda p, call: KafkaTimeoutError() if call == 1 and p.record.offset == 1 else None
    )
    worker._dead_letters = fake  # type: ignore[assignment]
    poison = [Poison(e.record, "invalid_json", "x") for e in envelopes(3)]
    await worker._dead_letter(poison, epoch=0)
    assert fake.calls == [[0, 1, 2], [1]]
    assert worker.stats.dead_lettered == 3


async def test_a_dead_letter_the_broker_refuses_for_good_stops_the_worker() -> None:
    worker = ScriptedWorker(lambda batch, n: None)
    fake = FakeDeadLetters(lambda p, call: MessageSizeTooLargeError())
    worker._dead_letters = fake  # type: ignore[assignment]
    poison = [Poison(e.record, "invalid_json", "x") for e in envelopes(1)]
    with pytest.raises(DeadLetterRefused, match="partition 0 offset 0"):
        await worker._dead_letter(poison, epoch=0)
    assert fake.calls == [[0]]  # not retried
    assert worker.stats.dead_lettered == 0

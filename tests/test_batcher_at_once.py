"""A lone request runs at once: in the engine (``inline``), a request queued with ``at_once`` that the batcher's next
turn would run alone on the loop anyway runs inside ``queue`` and is answered before it returns; in every other case
it is queued as before and the usual rules decide (scheduler.py ``_at_once``)."""
from __future__ import annotations

import asyncio
from typing import List, Optional

import numpy as np
import pytest

from trtserve.server.engine.batcher.request import Ticket
from trtserve.server.engine.batcher.scheduler import DynamicBatcher
from trtserve.server.errors import DeadlineExceeded, Internal, Unavailable
from tests.test_batcher_unit import Clock, FakeBackend, Recorder, spec, x


class Answer(Ticket):
    """A ticket that keeps what it was settled with, and how often."""

    def __init__(self) -> None:
        super().__init__(self._settled)
        self.times = 0

    def _settled(self, ticket: Ticket) -> None:
        self.times += 1


class Counting(Recorder):
    """Also counts the observer's queue reports and batch outcomes."""

    def __init__(self) -> None:
        super().__init__()
        self.queued = 0
        self.ok: List[bool] = []

    def request_queued(self, model, version, priority, count=1):
        super().request_queued(model, version, priority, count)
        self.queued += count

    def batch_done(self, model, version, batch_size, requests, *a, ok=True, **k):
        super().batch_done(model, version, batch_size, requests)
        self.ok.append(ok)


async def measured(inline: bool = True, clock: Optional[Clock] = None, **batching):
    """A started batcher whose model ran one batch already (so it knows the model is short enough for the loop)."""
    backend = FakeBackend()
    rec = Counting()
    b = DynamicBatcher(spec(**batching), backend, rec, clock or Clock(), inline=inline)
    b.start()
    first = await asyncio.wait_for(b.submit(x(), ("y",), 1), 5)
    assert first.batch_size == 1
    return b, backend, rec


def queue(b: DynamicBatcher, value: float = 1.0, at_once: bool = True, deadline: Optional[float] = None) -> Answer:
    t = Answer()
    b.queue(t, x(value=value), ("y",), 1, deadline=deadline, at_once=at_once)
    return t


async def settled(t: Answer) -> Answer:
    for _ in range(500):
        if t.done():
            return t
        await asyncio.sleep(0.01)
    raise AssertionError("the request was never answered")


@pytest.mark.parametrize("preserve_ordering", [False, True])
async def test_a_lone_request_is_answered_before_queue_returns_and_counted_once(preserve_ordering):
    b, backend, rec = await measured(preserve_ordering=preserve_ordering)
    queued_before = rec.queued
    for i in range(3):
        t = queue(b, value=i)
        assert t.done() and t.times == 1 and t.error is None  # answered inside queue()
        np.testing.assert_array_equal(t.result.outputs["y"], np.full((1, 4), 2 * i, np.float32))
        assert t.result.batch_size == 1 and t.result.queue_ns >= 0
        await asyncio.sleep(0)  # the loop's next turn frees the instance
    assert backend.batches == [1, 1, 1, 1] and rec.batches == [1, 1, 1, 1] and rec.ok == [True] * 4
    assert rec.queued == queued_before and rec.pending == 0  # never waited in a queue: never reported as pending
    after = await asyncio.wait_for(b.submit(x(), ("y",), 1), 5)  # the loop serves on as before
    assert after.batch_size == 1
    await b.stop()


async def test_without_at_once_or_outside_the_engine_the_request_waits_for_the_loop():
    b, backend, _ = await measured()
    t = queue(b, at_once=False)
    assert not t.done()
    await settled(t)
    await b.stop()
    b, backend, _ = await measured(inline=False)  # in-process mode: batches run on the instance threads
    t = queue(b)
    assert not t.done()
    assert (await settled(t)).result.batch_size == 1
    await b.stop()


async def test_the_first_request_of_a_model_is_not_run_at_once():
    """Until a batch has run, the batcher does not know whether the model is short enough for the loop."""
    backend = FakeBackend()
    b = DynamicBatcher(spec(), backend, Recorder(), Clock(), inline=True)
    b.start()
    t = queue(b)
    assert not t.done()
    await settled(t)
    assert queue(b).done()  # measured now
    await b.stop()


async def test_a_request_already_queued_is_not_overtaken_and_the_two_share_a_batch():
    b, backend, rec = await measured()
    waiting = queue(b, value=1.0, at_once=False)  # queued; the loop has not turned yet
    t = queue(b, value=2.0)
    assert not t.done() and not waiting.done()
    await settled(t)
    await settled(waiting)
    assert backend.batches[-1] == 2 and t.result.batch_size == 2 and waiting.result.batch_size == 2
    await b.stop()


async def test_a_request_read_in_the_same_turn_finds_the_model_in_use():
    """The instance stays held until the loop's next turn, as after any batch run on the loop: the next request read
    before then is queued (it would have found the first one queued) and counts as one that met another."""
    b, backend, rec = await measured()
    first, second = queue(b, value=1.0), queue(b, value=2.0)
    assert first.done() and not second.done()
    await settled(second)
    np.testing.assert_array_equal(second.result.outputs["y"], np.full((1, 4), 4.0, np.float32))
    assert backend.batches[-2:] == [1, 1]
    assert queue(b).done()  # the loop turned: the model is idle again
    await b.stop()


async def test_a_model_whose_requests_often_meet_is_left_to_the_queue():
    """Half the arrivals meet another: not a lone client's requests, so the request is queued (a request of another
    front end read in the same turn could still join it) and runs on the loop's next turn."""
    b, backend, rec = await measured(max_queue_delay_us=1_000_000)
    for _ in range(8):  # pairs read together: half the arrivals find another queued
        pair = [queue(b, at_once=False), queue(b, at_once=False)]
        for t in pair:
            await settled(t)
    t = queue(b)
    assert not t.done()  # queued, not run inside queue()
    assert (await settled(t)).result.batch_size == 1
    await b.stop()


async def test_a_contended_model_holds_the_request_on_the_queue():
    """Once most arrivals find others queued, a new one waits for those on their way (rule 4), at_once or not."""
    clock = Clock()
    b, backend, rec = await measured(clock=clock, max_queue_delay_us=1_000_000)
    for _ in range(6):  # fours read together: three of each find others queued
        clock.t += 0.001
        four = [queue(b, at_once=False) for _ in range(4)]
        await asyncio.sleep(0.01)
        clock.t += 0.01  # past the hold of those that came contended
        b.poke()
        for t in four:
            await settled(t)
    clock.t += 0.001
    t = queue(b)
    assert not t.done()
    await asyncio.sleep(0.05)
    assert not t.done() and rec.pending == 1  # held: the instance is idle, the batch partial
    clock.t += 0.05  # past a few of the recent gaps
    b.poke()
    assert (await settled(t)).result.batch_size == 1
    await b.stop()


async def test_a_request_past_its_deadline_is_answered_from_the_queue_unexecuted():
    clock = Clock()
    b, backend, _ = await measured(clock=clock)
    runs = len(backend.batches)
    t = queue(b, deadline=clock.t - 0.001)
    await settled(t)
    assert isinstance(t.error, DeadlineExceeded) and t.times == 1 and "in the queue" in str(t.error)
    assert len(backend.batches) == runs
    await b.stop()


async def test_a_failing_batch_at_once_answers_its_request_once_and_the_model_serves_on():
    b, backend, rec = await measured()
    backend.fail_when_rows = 1
    t = queue(b)
    assert t.done() and t.times == 1 and isinstance(t.error, Internal) and "injected failure" in str(t.error)
    assert rec.ok[-1] is False
    backend.fail_when_rows = None
    await asyncio.sleep(0)
    ok = queue(b)
    assert ok.done() and ok.error is None and rec.ok[-1] is True
    await b.stop()


async def test_a_stopping_model_refuses_the_request():
    b, _, _ = await measured()
    await b.stop()
    with pytest.raises(Unavailable):
        queue(b)

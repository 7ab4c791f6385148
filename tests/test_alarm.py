"""The batcher's wake-up (server/process/alarm.py): sub-millisecond delays kept, and no spinning while it waits."""
from __future__ import annotations

import asyncio
import math
import os
import time
from typing import List

import pytest

from tests.test_batcher_unit import FakeBackend, Recorder, spec, x
from trtserve.server.engine.backends.base import BatchResult
from trtserve.server.engine.batcher import scheduler
from trtserve.server.process import alarm as alarm_module, loops
from trtserve.server.process.alarm import Alarm

LOOPS = ["asyncio"] + (["uvloop"] if loops.resolve("auto") == "uvloop" else [])


async def _waits(delay_s: float, count: int) -> List[float]:
    """``count`` waits of ``delay_s`` on one alarm; how long each took."""
    fired = asyncio.Event()
    a = Alarm(fired.set)
    took = []
    try:
        for _ in range(count):
            fired.clear()
            start = time.monotonic()
            a.set(delay_s)
            await fired.wait()
            took.append(time.monotonic() - start)
    finally:
        a.close()
    return took


def _timed_waits(choice: str, delay_s: float, count: int) -> List[float]:
    """``_waits`` on the loop ``choice``; fails if the loop's thread was busy for half the time or more (a spin)."""
    async def body() -> tuple:
        cpu = time.thread_time()
        wall = time.monotonic()
        took = await _waits(delay_s, count)
        return took, time.thread_time() - cpu, time.monotonic() - wall

    took, cpu_s, wall_s = loops.run(body, choice)
    assert cpu_s < 0.5 * wall_s, f"the loop's thread was busy {cpu_s:.4f} s of {wall_s:.4f} s: it spun"
    return took


@pytest.mark.parametrize("choice", LOOPS)
def test_a_sub_millisecond_wait_sleeps_instead_of_spinning(choice: str) -> None:
    # uvloop runs call_later(0.0004) as call_soon: a loop waiting for that moment spun until it came, its thread
    # busy for the whole wait. The alarm's thread sleeps: it uses a small share of the time it waits.
    assert min(_timed_waits(choice, 0.0004, 100)) >= 0.0004  # and never early


def test_the_timerfd_keeps_the_sub_millisecond_part() -> None:
    # asyncio's own timers round a 400 us wait up to about a millisecond; the alarm wakes at 400 us (the median
    # of many waits leaves room for a busy machine: rounded, it would be above a millisecond)
    async def body() -> List[float]:
        return await _waits(0.0004, 101)

    if alarm_module._timerfd() is None:
        pytest.skip("no timerfd on this platform: the alarm rounds up")
    took = sorted(loops.run(body, "asyncio"))
    assert took[0] >= 0.0004
    assert took[50] < 0.00095, f"median wait {took[50] * 1e6:.0f} us for 400 us"


@pytest.mark.parametrize("choice", LOOPS)
def test_cancel_and_set_again(choice: str) -> None:
    async def body() -> List[str]:
        calls: List[str] = []
        a = Alarm(lambda: calls.append("fired"))
        try:
            a.set(0.002)
            a.cancel()
            await asyncio.sleep(0.01)
            calls.append("after cancel")
            a.set(0.05)
            a.set(0.001)  # replaces the first: one call, early
            await asyncio.sleep(0.02)
            calls.append("after set again")
            a.set(0)  # at once, on the next turn
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            a.set(0.001)
            a.close()  # closing cancels
            await asyncio.sleep(0.01)
        finally:
            a.close()
        return calls

    assert loops.run(body, choice) == ["after cancel", "fired", "after set again", "fired"]


@pytest.mark.parametrize("then, expected", [("cancel", ["before the new moment"]),
                                            ("set again", ["before the new moment", "fired"])])
def test_an_expiry_not_read_is_dropped_by_a_cancel_or_a_new_set(then: str, expected: List[str]) -> None:
    # the timer can expire (its descriptor readable) before the loop gets to read it; a cancel drops that expiry, and
    # so must a new set, which re-arms the timer without disarming it first
    async def body() -> List[str]:
        calls: List[str] = []
        a = Alarm(lambda: calls.append("fired"))
        try:
            a.set(0.0001)
            time.sleep(0.002)  # blocks the loop past the expiry
            if then == "cancel":
                a.cancel()
            else:
                a.set(0.05)
            await asyncio.sleep(0.01)
            calls.append("before the new moment")
            await asyncio.sleep(0.08)
        finally:
            a.close()
        return calls

    assert loops.run(body, "asyncio") == expected


class _CountingTimer:
    """Wraps the alarm's timerfd, counting its armings (each one a system call)."""

    def __init__(self, timer) -> None:
        self.timer, self.armed = timer, []
        self.fd = timer.fd

    def arm_at(self, ns: int) -> None:
        self.armed.append(ns)
        self.timer.arm_at(ns)


def test_the_same_moment_asked_for_again_arms_the_timer_once() -> None:
    # the batcher sets the alarm on each turn of its loop and cancels it on each wake-up; for the same moment (the
    # queue delay of the same oldest request) the timer is armed once, and a cancel costs no system call
    async def body() -> tuple:
        calls: List[str] = []
        a = Alarm(lambda: calls.append("fired"))
        if a._timer is None:
            a.close()
            return None, None
        counting = a._timer = _CountingTimer(a._timer)
        try:
            # half a microsecond past a whole one: the float sums below may differ in their last bit, and the
            # moment, rounded up to a microsecond, must come out the same each turn
            now = math.floor(time.monotonic() * 1e6) / 1e6 + 5e-7
            for turn in range(5):  # five turns, each a little later, each asking for the moment 20 ms after now
                a.set(0.02 - 0.001 * turn, since=now + 0.001 * turn)
                a.cancel()
            a.set(0.02, since=now)
            await asyncio.sleep(0.05)
            calls.append("after the moment")
            a.set(0.01)  # a new moment: armed again
            await asyncio.sleep(0.03)
        finally:
            a.close()
        return calls, counting.armed

    calls, armed = loops.run(body, "asyncio")
    if calls is None:
        pytest.skip("no timerfd on this platform")
    assert calls == ["fired", "after the moment", "fired"]
    assert len(armed) == 2 and armed[1] > armed[0]


def test_a_cancelled_alarm_left_armed_never_calls_back() -> None:
    # cancel leaves the timer armed; its expiry is read and dropped, and a later set for another moment fires then,
    # not at the old one
    async def body() -> List[tuple]:
        calls: List[tuple] = []
        a = Alarm(lambda: calls.append(("fired", time.monotonic())))
        try:
            a.set(0.005)
            a.cancel()
            await asyncio.sleep(0.02)  # the old moment passes: nothing fires
            calls.append(("after cancel", time.monotonic()))
            a.set(0.005)
            a.cancel()
            start = time.monotonic()
            a.set(0.03)  # later than the kept arming: armed again for the later moment
            await asyncio.sleep(0.06)
            calls.append(("started", start))
        finally:
            a.close()
        return calls

    calls = loops.run(body, "asyncio")
    assert [c[0] for c in calls] == ["after cancel", "fired", "started"]
    assert calls[1][1] - calls[2][1] >= 0.03  # never early


@pytest.mark.parametrize("timerfd", [True, False])
def test_the_delay_counts_from_since(timerfd: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # a moment already passed fires on the next turn; one still ahead fires then, not a whole delay from the set
    if not timerfd:
        monkeypatch.setattr(alarm_module, "_timerfd", lambda: None)

    async def body() -> tuple:
        calls: List[str] = []
        a = Alarm(lambda: calls.append("fired"))
        try:
            a.set(0.001, since=time.monotonic() - 1.0)
            calls.append("set")
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            fired = asyncio.Event()
            b = Alarm(fired.set)
            start = time.monotonic()
            b.set(1.0, since=start - 0.95)  # 50 ms from now
            await asyncio.wait_for(fired.wait(), 0.5)
            b.close()
            return calls, time.monotonic() - start
        finally:
            a.close()

    calls, took = loops.run(body, "asyncio")
    assert calls == ["set", "fired"]
    assert 0.049 <= took < 0.5  # the fallback rounds in the loop's clock, to its resolution


def test_close_gives_the_descriptor_back() -> None:
    async def body() -> int:
        a = Alarm(lambda: None)
        fd = a._timer.fd if a._timer is not None else -1
        a.close()
        a.close()  # twice is fine
        return fd

    fd = loops.run(body, "asyncio")
    if fd < 0:
        pytest.skip("no timerfd on this platform")
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize("choice", LOOPS)
def test_without_a_timerfd_it_rounds_up_and_still_sleeps(choice: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alarm_module, "_timerfd", lambda: None)
    _timed_waits(choice, 0.0003, 30)


class _FirstInstanceHeld(FakeBackend):
    """Two instances; a batch on instance 0 waits for ``release``, one on instance 1 runs at once."""

    def run(self, instance: int, inputs, outputs):
        if instance == 0:
            self.started.release()
            self.release.wait(10)
        return BatchResult({"y": inputs["x"] * 2}, 1, 2, 3)


@pytest.mark.parametrize("choice", LOOPS)
def test_the_batcher_sleeps_through_a_short_queue_delay(choice: str) -> None:
    # While one batch runs, a lone request waits out max_queue_delay_microseconds (450 us) for company before it
    # takes the free instance: the scheduler's loop sleeps meanwhile (on uvloop it spun: its thread was busy for
    # the whole delay of every request, a core taken from the front ends on a small host)
    async def body() -> tuple:
        backend = _FirstInstanceHeld(instances=2)
        backend.release.clear()
        b = scheduler.DynamicBatcher(spec(batches_per_instance=1, max_queue_delay_us=450), backend, Recorder())
        b.start()
        try:
            first = b.submit(x(), ("y",), 1)
            await asyncio.get_running_loop().run_in_executor(None, backend.started.acquire)
            cpu, wall = time.thread_time(), time.monotonic()
            took = []
            for _ in range(60):
                start = time.monotonic()
                await b.submit(x(), ("y",), 1)
                took.append(time.monotonic() - start)
            cpu, wall = time.thread_time() - cpu, time.monotonic() - wall
            backend.release.set()
            await first
        finally:
            backend.release.set()
            await b.stop()
        return took, cpu, wall

    took, cpu_s, wall_s = loops.run(body, choice)
    assert min(took) >= 0.00045  # each waited out the delay: the wait was there to spin in
    assert cpu_s < 0.6 * wall_s, f"the batcher's loop was busy {cpu_s:.4f} s of {wall_s:.4f} s: it spun"

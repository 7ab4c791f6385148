"""The batcher's rules, deterministically: pure ``policy.plan`` with explicit ``now``, and the
scheduler with an injected clock and a fake backend whose batches are held by an Event."""
from __future__ import annotations

import asyncio
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest

from trtserve.server.engine.backends.base import Backend, BackendConfig, BatchResult, Profile, ShapeRange, TensorSpec
from trtserve.server.engine.batcher import policy as pol
from trtserve.server.engine.batcher.contention import Contention
from trtserve.server.engine.batcher.request import Pending, Split, Ticket
from trtserve.server.engine.batcher.scheduler import DynamicBatcher
from trtserve.server.engine.batcher.shapes import ShapeRules
from trtserve.server.errors import DeadlineExceeded, Internal, InvalidArgument, QueueFull, QueueTimeout
from trtserve.server.events import Observer
from trtserve.server.engine.repository.model_config import BatchingPolicy, ModelSpec, QueuePolicy

# ---------------------------------------------------------------------------------------------
# pure policy


def pend(rows=1, arrival=0.0, level=1, shape=(4,), seq=0) -> Pending:
    loop_ticket = None  # the pure policy never touches the ticket
    return Pending(inputs={}, outputs=("y",), rows=rows, shapes={"x": shape}, level=level, arrival=arrival,
                   ticket=loop_ticket, seq=seq)  # type: ignore[arg-type]


RULES = ShapeRules(batches=True, max_batch_size=8, paddable=frozenset(), profiles=())
ON = BatchingPolicy(enabled=True, max_batch_size=8, max_queue_delay_us=1000)


def test_idle_executor_runs_at_once():
    p = pol.plan([pend(), pend()], now=0.0, policy=ON, rules=RULES, free={0}, busy=False)
    assert len(p.requests) == 2 and p.rows == 2 and p.instance == 0


def test_contended_idle_executor_holds_a_partial_batch_until_hold_or_the_delay():
    """Rule 4: an idle instance given ``hold`` (the model is contended: more requests are on their way) lets a
    partial batch wait until then, never past the queue delay; complete batches run at once."""
    two = [pend(arrival=0.0), pend(arrival=0.0)]
    p = pol.plan(two, now=0.0004, policy=ON, rules=RULES, free={0}, busy=False, hold=0.0007)
    assert not p.requests and p.wait_s == pytest.approx(0.0003)
    p = pol.plan(two, now=0.0007, policy=ON, rules=RULES, free={0}, busy=False, hold=0.0007)
    assert len(p.requests) == 2 and p.instance == 0
    p = pol.plan(two, now=0.0004, policy=ON, rules=RULES, free={0}, busy=False, hold=5.0)
    assert not p.requests and p.wait_s == pytest.approx(0.0006)  # the delay bounds the hold
    p = pol.plan(two, now=0.001, policy=ON, rules=RULES, free={0}, busy=False, hold=5.0)
    assert len(p.requests) == 2
    p = pol.plan([pend(rows=4, seq=i) for i in range(2)], now=0.0, policy=ON, rules=RULES, free={0}, busy=False,
                 hold=5.0)
    assert p.rows == 8  # full: runs at once
    preferred = BatchingPolicy(enabled=True, max_batch_size=8, preferred_batch_sizes=(2,), max_queue_delay_us=1000)
    p = pol.plan([pend(seq=i) for i in range(3)], now=0.0, policy=preferred, rules=RULES, free={0}, busy=False,
                 hold=5.0)
    assert p.rows == 2  # a preferred size: runs at once


def test_contention_holds_only_for_a_contended_model_and_learns_gaps_from_joining_arrivals():
    c = Contention()
    for i in range(50):  # a lone client: never finds its model in use
        c.arrival(queued=False, running=False)
        c.look(float(i))
    assert c.hold_until() is None
    t = 100.0
    for _ in range(10):  # a burst: each read finds others queued, 1 ms apart
        t += 0.001
        c.arrival(queued=True, running=True)
        c.look(t)
    assert c.share >= 0.5
    gap = (c.hold_until() - t) / 2  # two recent gaps past the last arrival
    assert 0.0 < gap < 0.001
    t += 30.0  # a pause, then a request that finds nothing queued: its gap is not learnt
    c.arrival(queued=False, running=True)
    c.look(t)
    assert c.hold_until() == pytest.approx(t + 2 * gap)
    c.look(t + 1.0)  # nothing new since the last look: nothing changes
    assert c.hold_until() == pytest.approx(t + 2 * gap)
    for _ in range(10):  # the burst is over: a lone client again
        t += 1.0
        c.arrival(queued=False, running=False)
        c.look(t)
    assert c.hold_until() is None


def test_contention_learns_the_gap_per_request_however_many_one_look_finds():
    # the same arrivals, 4 requests a millisecond, seen by a loop that looks at each request (polling) and by one
    # that finds the four together (woken once): both learn a quarter of a millisecond, so a loop that sleeps
    # until woken does not hold batches four times as long
    def learnt(per_look: int) -> float:
        c = Contention()
        t = 0.0
        for _ in range(200):
            for i in range(4 // per_look):
                t += 0.001 / (4 // per_look)
                for _ in range(per_look):
                    c.arrival(queued=True, running=True)
                c.look(t)
        hold = c.hold_until()
        assert hold is not None
        return (hold - t) / 2

    assert learnt(1) == pytest.approx(0.00025, rel=0.01)
    assert learnt(4) == pytest.approx(0.00025, rel=0.01)
    c = Contention()  # an entry standing for several requests (a group) counts as that many
    t = 0.0
    for _ in range(200):
        t += 0.001
        c.arrival(queued=True, running=True, count=4)
        c.look(t)
    assert (c.hold_until() - t) / 2 == pytest.approx(0.00025, rel=0.01)


def test_busy_executor_waits_for_queue_delay():
    p = pol.plan([pend(arrival=0.0)], now=0.0004, policy=ON, rules=RULES, free={1}, busy=True)
    assert not p.requests and p.wait_s == pytest.approx(0.0006)
    p = pol.plan([pend(arrival=0.0)], now=0.001, policy=ON, rules=RULES, free={1}, busy=True)
    assert len(p.requests) == 1


def test_full_batch_runs_even_when_busy_and_never_exceeds_max():
    reqs = [pend(rows=3, seq=i) for i in range(4)]  # 12 rows queued, max 8
    p = pol.plan(reqs, now=0.0, policy=ON, rules=RULES, free={1}, busy=True)
    assert not p.requests  # 6 rows (3+3) < 8 and 3 more would overflow: waits for the delay
    reqs = [pend(rows=4, seq=i) for i in range(3)]
    p = pol.plan(reqs, now=0.0, policy=ON, rules=RULES, free={1}, busy=True)
    assert p.rows == 8 and len(p.requests) == 2


def test_preferred_size_cuts_the_largest_preferred_prefix():
    policy = BatchingPolicy(enabled=True, max_batch_size=8, preferred_batch_sizes=(2, 4), max_queue_delay_us=10**6)
    reqs = [pend(seq=i) for i in range(5)]
    p = pol.plan(reqs, now=0.0, policy=policy, rules=RULES, free={1}, busy=True)
    assert p.rows == 4 and len(p.requests) == 4


def test_request_is_never_split():
    reqs = [pend(rows=5), pend(rows=5)]
    p = pol.plan(reqs, now=0.0, policy=ON, rules=RULES, free={0}, busy=False)
    assert p.rows == 5 and len(p.requests) == 1


def group(members: int, each: int = 1, seq: int = 0, splittable: bool = True) -> Pending:
    """An entry standing for ``members`` alike requests of ``each`` rows (engine/group.py)."""
    r = pend(rows=members * each, seq=seq)
    r.count = members
    r.splitter = (lambda ticket, k: None) if splittable else None  # type: ignore[assignment,return-value]
    return r


def test_a_group_that_does_not_fit_whole_gives_the_batch_its_first_members():
    """Rule 2: the batch takes what fits of an entry of several requests (never part of a request), even busy."""
    reqs = [group(5, seq=0), group(6, seq=1), pend(seq=2)]
    p = pol.plan(reqs, now=0.0, policy=ON, rules=RULES, free={1}, busy=True)
    assert p.rows == 8 and [r.seq for r in p.requests] == [0, 1] and p.split == 3  # full: it runs at once
    reqs = [group(3, each=2, seq=0), group(3, each=2, seq=1)]  # 6 rows, then one 2-row member of the next
    p = pol.plan(reqs, now=0.0, policy=ON, rules=RULES, free={0}, busy=False)
    assert p.rows == 8 and p.split == 1
    reqs = [group(3, each=2, seq=0), group(3, each=3, seq=1)]  # 6 rows: no 3-row member fits in the 2 left
    p = pol.plan(reqs, now=0.0, policy=ON, rules=RULES, free={0}, busy=False)
    assert p.rows == 6 and [r.seq for r in p.requests] == [0] and p.split == 0
    reqs = [group(5, seq=0), group(6, seq=1, splittable=False)]  # an entry without an owner's hook: whole or not
    p = pol.plan(reqs, now=0.0, policy=ON, rules=RULES, free={0}, busy=False)
    assert p.rows == 5 and p.split == 0
    p = pol.plan([group(5, seq=0), pend(rows=5, seq=1)], now=0.0, policy=ON, rules=RULES, free={0}, busy=False)
    assert p.rows == 5 and p.split == 0  # a request on its own is never split


def test_a_split_group_counts_its_taken_rows_for_preferred_sizes_and_queueing_behind():
    preferred = BatchingPolicy(enabled=True, max_batch_size=8, preferred_batch_sizes=(4,), max_queue_delay_us=10**6)
    reqs = [group(2, seq=0), group(6, seq=1)]  # whole: 2 + 6; split: 2 + 6 fits, so no split at all
    p = pol.plan(reqs, now=0.0, policy=preferred, rules=RULES, free={1}, busy=True)
    assert p.rows == 8 and p.split == 0
    reqs = [group(3, seq=0), group(6, seq=1)]  # 3 + 5 of 6: the prefix 3 is no preferred size, 8 is full
    p = pol.plan(reqs, now=0.0, policy=preferred, rules=RULES, free={1}, busy=True)
    assert p.rows == 8 and p.split == 5
    reqs = [group(2, each=2, seq=0), group(3, each=3, seq=1)]  # 4 + 3 of 9 rows: 7, not full; 4 is preferred
    p = pol.plan(reqs, now=0.0, policy=preferred, rules=RULES, free={1}, busy=True)
    assert p.rows == 4 and [r.seq for r in p.requests] == [0] and p.split == 0
    p = pol.plan([group(5, seq=0), group(6, seq=1)], now=0.0, policy=ON, rules=RULES, free=set(), busy=True,
                 queueable={0})
    assert p.rows == 8 and p.split == 3 and p.instance == 0  # complete by the split: it queues behind (rule 5)


def test_no_free_instance_means_wait_for_event():
    p = pol.plan([pend()], now=0.0, policy=ON, rules=RULES, free=set(), busy=True)
    assert not p.requests and p.wait_s is None


def test_strict_priority_then_fifo():
    reqs = [pend(level=1, seq=5, shape=(4,)), pend(level=2, seq=1, shape=(4,))]
    p = pol.plan(reqs, now=0.0, policy=ON, rules=RULES, free={0}, busy=False)
    assert [r.seq for r in p.requests] == [5, 1]  # order given = level order; head is level 1


def test_different_shapes_do_not_mix_without_padding():
    reqs = [pend(shape=(4,)), pend(shape=(5,)), pend(shape=(4,))]
    p = pol.plan(reqs, now=0.0, policy=ON, rules=RULES, free={0}, busy=False)
    assert len(p.requests) == 2 and all(r.shapes["x"] == (4,) for r in p.requests)


def _profiles():
    # profile 0: up to 4 rows of length <= 8; profile 1: up to 8 rows of length <= 32
    return (Profile(0, {"x": ShapeRange((1, 1), (4, 8), (4, 8))}, (0,)),
            Profile(1, {"x": ShapeRange((1, 1), (8, 32), (8, 32))}, (1,)))


def test_padding_groups_within_one_profile_and_picks_closest_opt():
    rules = ShapeRules(batches=True, max_batch_size=8, paddable=frozenset({"x"}), profiles=_profiles())
    reqs = [pend(shape=(3,)), pend(shape=(7,)), pend(shape=(20,))]
    p = pol.plan(reqs, now=0.0, policy=ON, rules=rules, free={0, 1}, busy=False)
    assert len(p.requests) == 3 and p.shapes == {"x": (20,)} and p.profile.index == 1 and p.instance == 1
    p = pol.plan(reqs[:2], now=0.0, policy=ON, rules=rules, free={0, 1}, busy=False)
    assert p.shapes == {"x": (7,)} and p.profile.index == 0 and p.instance == 0


def test_never_builds_a_batch_no_profile_accepts():
    rules = ShapeRules(batches=True, max_batch_size=8, paddable=frozenset({"x"}), profiles=_profiles())
    assert not rules.accepts(1, {"x": (33,)})
    assert rules.merge(4, {"x": (8,)}, 4, {"x": (33,)}) is None
    reqs = [pend(rows=4, shape=(30,)), pend(rows=4, shape=(30,)), pend(rows=1, shape=(2,))]
    p = pol.plan(reqs, now=0.0, policy=ON, rules=rules, free={0, 1}, busy=False)
    assert p.rows == 8 and p.profile.index == 1


def test_fitting_profile_busy_runs_head_on_another_fitting_profile():
    rules = ShapeRules(batches=True, max_batch_size=8, paddable=frozenset({"x"}), profiles=_profiles())
    reqs = [pend(rows=2, shape=(4,)), pend(rows=4, shape=(4,))]  # 6 rows only fit profile 1 (busy)
    p = pol.plan(reqs, now=0.0, policy=ON, rules=rules, free={0}, busy=True)
    assert not p.requests and p.wait_s == pytest.approx(0.001)  # partial batch while busy: queue delay
    p = pol.plan(reqs, now=0.002, policy=ON, rules=rules, free={0}, busy=True)
    assert p.rows == 2 and p.instance == 0 and p.profile.index == 0


def test_complete_batch_queues_behind_a_busy_instance():
    """Rule 5: no idle instance, but a complete batch (max_batch_size) goes behind the running one."""
    reqs = [pend(rows=4, seq=i) for i in range(3)]
    p = pol.plan(reqs, now=0.0, policy=ON, rules=RULES, free=set(), busy=True, queueable={0})
    assert p.rows == 8 and len(p.requests) == 2 and p.instance == 0


def test_partial_batch_does_not_queue_behind_it_waits_to_grow():
    p = pol.plan([pend(rows=3)], now=0.0, policy=ON, rules=RULES, free=set(), busy=True, queueable={0})
    assert not p.requests  # could still grow on the queue: no commitment to an instance yet
    p = pol.plan([pend(rows=3)], now=0.5, policy=ON, rules=RULES, free=set(), busy=True, queueable={0})
    assert not p.requests  # even past max_queue_delay: it goes to the first instance that frees up


def test_preferred_prefix_and_unbatched_requests_queue_behind():
    policy = BatchingPolicy(enabled=True, max_batch_size=8, preferred_batch_sizes=(2,), max_queue_delay_us=10**6)
    reqs = [pend(seq=i) for i in range(3)]
    p = pol.plan(reqs, now=0.0, policy=policy, rules=RULES, free=set(), busy=True, queueable={0})
    assert p.rows == 2 and [r.seq for r in p.requests] == [0, 1]
    off = BatchingPolicy(enabled=False, max_batch_size=8)
    p = pol.plan(reqs, now=0.0, policy=off, rules=RULES, free=set(), busy=True, queueable={0})
    assert p.rows == 1 and p.instance == 0


def test_queue_behind_only_on_an_instance_whose_profile_fits():
    rules = ShapeRules(batches=True, max_batch_size=8, paddable=frozenset(), profiles=_profiles())
    reqs = [pend(rows=4, shape=(20,)), pend(rows=4, shape=(20,))]  # 8 rows of 20: profile 1 only
    p = pol.plan(reqs, now=0.0, policy=ON, rules=rules, free=set(), busy=True, queueable={0})
    assert not p.requests
    p = pol.plan(reqs, now=0.0, policy=ON, rules=rules, free=set(), busy=True, queueable={0, 1})
    assert p.rows == 8 and p.instance == 1


def test_idle_instance_is_preferred_over_queueing():
    reqs = [pend(rows=4, seq=i) for i in range(2)]
    p = pol.plan(reqs, now=0.0, policy=ON, rules=RULES, free={1}, busy=True, queueable={0})
    assert p.instance == 1


def test_stack_writes_into_staging_arrays_when_they_match():
    from trtserve.server.engine.batcher import assemble
    a, b = np.ones((2, 4), np.float32), np.full((1, 4), 2, np.float32)
    reqs = [Pending(inputs={"x": a}, outputs=("y",), rows=2, shapes={"x": (4,)}, level=1, arrival=0.0,
                    ticket=None), Pending(inputs={"x": b}, outputs=("y",), rows=1, shapes={"x": (4,)}, level=1,
                                          arrival=0.0, ticket=None)]  # type: ignore[arg-type]
    staging = {"x": np.zeros((3, 4), np.float32)}
    out = assemble.stack(reqs, {"x": (4,)}, {}, True, staging)
    assert out["x"] is staging["x"] and staging["x"].tolist() == [[1.0] * 4, [1.0] * 4, [2.0] * 4]
    wrong = {"x": np.zeros((5, 4), np.float32)}  # not this batch's shape: fresh memory, staging untouched
    out = assemble.stack(reqs, {"x": (4,)}, {}, True, wrong)
    assert out["x"] is not wrong["x"] and not wrong["x"].any() and out["x"].shape == (3, 4)
    padded = {"x": np.zeros((3, 6), np.float32)}
    reqs[1] = Pending(inputs={"x": np.full((1, 6), 3, np.float32)}, outputs=("y",), rows=1, shapes={"x": (6,)},
                      level=1, arrival=0.0, ticket=None)  # type: ignore[arg-type]
    out = assemble.stack(reqs, {"x": (6,)}, {"x": -1.0}, True, padded)
    assert out["x"] is padded["x"] and padded["x"][0].tolist() == [1, 1, 1, 1, -1, -1]
    assert padded["x"][2].tolist() == [3] * 6


def test_pool_depth_counts_batches_per_instance():
    from trtserve.server.engine.executor.pool import ExecutorPool
    pool = ExecutorPool(2, depth=2)
    try:
        pool.acquire(0)
        assert pool.free() == {1} and pool.queueable() == {0} and pool.busy()
        pool.acquire(0)
        assert pool.queueable() == set()
        with pytest.raises(RuntimeError, match="already holds 2"):
            pool.acquire(0)
        pool.release(0)
        pool.release(0)
        with pytest.raises(RuntimeError, match="holds no batch"):
            pool.release(0)
        assert pool.free() == {0, 1} and not pool.busy()
        assert ExecutorPool(1, depth=1).queueable() == set()
    finally:
        pool.shutdown()


def test_completion_threads_run_their_work_in_order_past_a_failure_and_finish_it_at_shutdown(caplog) -> None:
    from trtserve.server.engine.executor.pool import ExecutorPool

    pool = ExecutorPool(2, depth=2, completion=True)
    ran: List[Tuple[int, int, str]] = []
    gate = threading.Event()

    def work(instance: int, k: int) -> None:
        if k == 0:
            assert gate.wait(10)
        if k == 2:
            raise RuntimeError("this one fails")
        ran.append((instance, k, threading.current_thread().name))

    for k in range(5):
        pool.after(0, lambda k=k: work(0, k))
    assert pool.complete(1, lambda: 42).result(10) == 42  # instance 1's thread is not behind instance 0's
    assert not ran
    gate.set()
    pool.shutdown()  # runs what was put before it ends the threads
    assert [k for _, k, _ in ran] == [0, 1, 3, 4]
    assert {name for _, _, name in ran} == {"trtserve-done0"}
    assert "completion work failed" in caplog.text


# ---------------------------------------------------------------------------------------------
# scheduler with a fake backend and an injected clock


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeBackend(Backend):
    """y = 2 * x; batches block until ``release`` is set; records batch sizes; can fail on demand."""

    platform = "fake"

    def __init__(self, instances: int = 1, profiles: Sequence[Profile] = ()) -> None:
        super().__init__(BackendConfig("m", "1", None, "", 8, (), (), instance_count=instances))  # type: ignore
        self.release = threading.Event()
        self.release.set()
        self.batches: List[int] = []
        self.fail_when_rows: Optional[int] = None
        self._profiles = tuple(profiles)
        self.started = threading.Semaphore(0)

    def open(self) -> None:
        pass

    def io(self):
        return (), ()

    def profiles(self):
        return self._profiles

    def run(self, instance: int, inputs: Dict[str, np.ndarray], outputs) -> BatchResult:
        self.started.release()
        self.release.wait(10)
        x = inputs["x"]
        self.batches.append(x.shape[0])
        if self.fail_when_rows is not None and x.shape[0] == self.fail_when_rows:
            raise RuntimeError("injected failure")
        return BatchResult({"y": x * 2}, 1, 2, 3)

    def close(self) -> None:
        pass


class Recorder(Observer):
    def __init__(self) -> None:
        self.pending = 0
        self.batches: List[int] = []

    def request_queued(self, model, version, priority, count=1):
        self.pending += count

    def request_dequeued(self, model, version, priority, count=1):
        self.pending -= count

    def batch_done(self, model, version, batch_size, requests, *a, **k):
        self.batches.append(batch_size)


def spec(batches_per_instance: int = 2, **batching) -> ModelSpec:
    b = dict(enabled=True, max_batch_size=8)
    b.update(batching)
    return ModelSpec(name="m", version="1", platform="fake", max_batch_size=8,
                     inputs=(TensorSpec("x", "FP32", (-1,)),), outputs=(TensorSpec("y", "FP32", (-1,)),),
                     batching=BatchingPolicy(**b), instance_count=1, parameters={},
                     pad_values={}, unpad={}, batches_per_instance=batches_per_instance)


def x(rows=1, n=4, value=1.0):
    return {"x": np.full((rows, n), value, np.float32)}


async def started(backend: FakeBackend) -> None:
    await asyncio.get_running_loop().run_in_executor(None, backend.started.acquire)


async def make(spec_: ModelSpec, backend: FakeBackend, clock=None):
    rec = Recorder()
    b = DynamicBatcher(spec_, backend, rec, clock or Clock())
    b.start()
    return b, rec


async def test_batches_form_while_executor_busy():
    backend = FakeBackend()
    backend.release.clear()
    b, rec = await make(spec(), backend)
    first = b.submit(x(), ("y",), 1)
    await started(backend)  # batch 1 (one row) is running and held
    rest = [b.submit(x(value=i), ("y",), 1) for i in range(5)]
    await asyncio.sleep(0)
    assert rec.pending == 5
    backend.release.set()
    results = await asyncio.gather(first, *rest)
    assert backend.batches == [1, 5]  # the five queued requests ran as one batch
    for i, r in enumerate(results[1:]):
        np.testing.assert_array_equal(r.outputs["y"], np.full((1, 4), 2 * i, np.float32))
        assert r.batch_size == 5
    assert rec.pending == 0
    await b.stop()


class Members(Ticket):
    """A test owner's group: one ticket standing for several one-row requests (``members``: their ids)."""

    def __init__(self, on_settled, members: List[int]) -> None:
        super().__init__(on_settled)
        self.members = members


def split_members(ticket: Members, k: int) -> Split:
    rest = Members(ticket.on_settled, ticket.members[k:])
    ticket.members = ticket.members[:k]
    return Split(rest, None, None, None)


@pytest.mark.parametrize("seed", range(12))
async def test_groups_of_any_size_are_split_to_fill_batches_and_every_member_is_answered_once(seed: int):
    """Groups of 1-8 one-row members queue behind a held batch; batches of 8 take what fits of the next group and
    the rest go first in the batch after. Each member's answer carries its own row, exactly once."""
    rng = np.random.default_rng(seed)
    backend = FakeBackend()
    backend.release.clear()
    b, rec = await make(spec(), backend)
    answers: Dict[int, np.ndarray] = {}

    def settled(t: Ticket) -> None:
        assert t.error is None and not t.cancelled
        y = t.result.outputs["y"]
        assert y.shape[0] == len(t.members)
        for member, row in zip(t.members, y):
            assert member not in answers, f"member {member} answered twice"
            answers[member] = row

    first = b.submit(x(value=-1.0), ("y",), 1)
    await started(backend)
    ids = 0
    for _ in range(int(rng.integers(3, 12))):
        n = int(rng.integers(1, 9))
        members = list(range(ids, ids + n))
        ids += n
        data = np.repeat(np.array(members, np.float32)[:, None], 4, axis=1)
        b.queue(Members(settled, members), {"x": data}, ("y",), n, count=n, splitter=split_members)
    backend.release.set()
    await first
    for _ in range(200):
        if len(answers) == ids:
            break
        await asyncio.sleep(0.01)
    assert sorted(answers) == list(range(ids))
    for member, row in answers.items():
        np.testing.assert_array_equal(row, np.full(4, 2.0 * member, np.float32))
    queued = backend.batches[1:]
    assert sum(queued) == ids and all(rows == 8 for rows in queued[:-1])  # full until the queue ran out
    assert rec.pending == 0
    await b.stop()


async def test_complete_batch_waits_on_the_instance_not_the_queue():
    """With batches_per_instance 2 a full batch leaves the queue while instance 0 is busy and starts as soon
    as the running batch ends; its queue time still runs until it started. With 1 it stays queued."""
    for depth, pending_while_held in ((2, 0), (1, 8)):
        clock = Clock()
        backend = FakeBackend()
        backend.release.clear()
        b, rec = await make(spec(batches_per_instance=depth), backend, clock)
        first = b.submit(x(), ("y",), 1)
        await started(backend)
        full = [b.submit(x(value=i), ("y",), 1) for i in range(8)]  # exactly max_batch_size rows
        await asyncio.sleep(0.01)
        assert rec.pending == pending_while_held
        clock.t += 0.005  # the full batch waits 5 ms for the first one
        backend.release.set()
        results = await asyncio.gather(first, *full)
        assert backend.batches == [1, 8]
        assert all(r.queue_ns >= 4_900_000 for r in results[1:]), (depth, [r.queue_ns for r in results])
        await b.stop()


async def test_queue_delay_with_injected_clock():
    clock = Clock()
    backend = FakeBackend(instances=2)
    backend.release.clear()
    b, rec = await make(spec(max_queue_delay_us=1000), backend, clock)
    blocker = b.submit(x(), ("y",), 1)
    await started(backend)  # instance 0 busy -> instance 1 free, partial batches wait for the delay
    waiting = b.submit(x(rows=2), ("y",), 2)
    await asyncio.sleep(0.05)
    assert not waiting.done() and rec.pending == 1
    clock.t += 0.0011
    b.poke()
    await started(backend)
    backend.release.set()
    await asyncio.gather(blocker, waiting)
    assert sorted(backend.batches) == [1, 2]
    await b.stop()


async def test_a_lone_client_never_waits_but_a_contended_model_holds_while_requests_keep_coming():
    """One request at a time never finds the model in use: each runs at once (the injected clock stands still and
    the queue delay is a second, so a held batch would wait for ever). Once most arrivals find requests queued or
    running, an idle instance holds a partial batch for a couple of the recent gaps between arrivals past the last
    one (rule 4), well before the queue delay."""
    clock = Clock()
    backend = FakeBackend()
    b, rec = await make(spec(max_queue_delay_us=1_000_000), backend, clock)
    for i in range(20):
        r = await asyncio.wait_for(b.submit(x(value=i), ("y",), 1), 5)
        assert r.batch_size == 1
    backend.release.clear()
    first = b.submit(x(), ("y",), 1)
    await started(backend)
    contended = []
    for i in range(7):  # each finds the first running; 1 ms apart, and the loop sees each
        clock.t += 0.001
        contended.append(b.submit(x(value=i), ("y",), 1))
        await asyncio.sleep(0.01)
    backend.release.set()
    await first
    await asyncio.sleep(0.05)
    assert not any(f.done() for f in contended) and rec.pending == 7  # idle instance, partial batch: held
    clock.t += 0.05  # far past a few gaps of 1 ms, far before the delay
    b.poke()
    results = await asyncio.wait_for(asyncio.gather(*contended), 5)
    assert backend.batches[-2:] == [1, 7] and all(r.batch_size == 7 for r in results)
    await b.stop()


async def test_priorities_strict_between_levels():
    backend = FakeBackend()
    backend.release.clear()
    b, _ = await make(spec(priority_levels=2, default_priority_level=2, max_batch_size=8,
                           preferred_batch_sizes=(1,)), backend)
    order: List[str] = []
    blocker = b.submit(x(), ("y",), 1)
    await started(backend)
    low = [b.submit(x(), ("y",), 1, priority=2) for _ in range(2)]
    high = [b.submit(x(), ("y",), 1, priority=1) for _ in range(2)]
    for name, futs in (("low", low), ("high", high)):
        for f in futs:
            f.add_done_callback(lambda _f, n=name: order.append(n))
    backend.release.set()
    await asyncio.gather(blocker, *low, *high)
    assert order == ["high", "high", "low", "low"]
    await b.stop()


async def test_queue_full_is_rejected_fast():
    backend = FakeBackend()
    backend.release.clear()
    b, _ = await make(spec(default_queue_policy=QueuePolicy(max_queue_size=2)), backend)
    running = b.submit(x(), ("y",), 1)
    await started(backend)
    queued = [b.submit(x(), ("y",), 1) for _ in range(2)]
    with pytest.raises(QueueFull, match="full"):
        b.submit(x(), ("y",), 1)
    backend.release.set()
    await asyncio.gather(running, *queued)
    await b.stop()


async def test_queue_timeout_reject_and_delay():
    clock = Clock()
    backend = FakeBackend()
    backend.release.clear()
    b, rec = await make(spec(priority_levels=2, default_priority_level=1,
                             priority_queue_policy={
                                 1: QueuePolicy(timeout_action="REJECT", default_timeout_us=1000),
                                 2: QueuePolicy(timeout_action="DELAY", default_timeout_us=1000,
                                                allow_timeout_override=True)},
                             preferred_batch_sizes=(1,), batches_per_instance=1), backend, clock)
    running = b.submit(x(), ("y",), 1, priority=2, timeout_us=10**9)
    await started(backend)
    rejected = b.submit(x(), ("y",), 1, priority=1)
    delayed = b.submit(x(value=7), ("y",), 1, priority=2, timeout_us=500)  # override lowers the timeout
    clock.t += 0.002
    b.poke()
    with pytest.raises(QueueTimeout, match="timed out"):
        await rejected
    fresh = b.submit(x(value=3), ("y",), 1, priority=2)
    order: List[str] = []
    delayed.add_done_callback(lambda f: order.append("delayed"))
    fresh.add_done_callback(lambda f: order.append("fresh"))
    backend.release.set()
    await asyncio.gather(running, delayed, fresh)
    assert order == ["fresh", "delayed"]  # DELAY: a timed-out request runs after the others
    assert rec.pending == 0
    await b.stop()


async def test_deadline_expired_in_queue_is_never_executed():
    clock = Clock()
    backend = FakeBackend()
    backend.release.clear()
    b, rec = await make(spec(), backend, clock)
    running = b.submit(x(), ("y",), 1)
    await started(backend)
    doomed = b.submit(x(rows=3), ("y",), 3, deadline=clock.t + 0.01)
    clock.t += 0.02
    b.poke()
    with pytest.raises(DeadlineExceeded, match="not executed"):
        await doomed
    backend.release.set()
    await running
    assert 3 not in backend.batches and rec.pending == 0
    await b.stop()


async def test_cancel_removes_from_queue():
    backend = FakeBackend()
    backend.release.clear()
    b, rec = await make(spec(), backend)
    running = b.submit(x(), ("y",), 1)
    await started(backend)
    cancelled = b.submit(x(rows=3), ("y",), 3)
    kept = b.submit(x(rows=2), ("y",), 2)
    cancelled.cancel()
    await asyncio.sleep(0.01)
    backend.release.set()
    await asyncio.gather(running, kept)
    assert backend.batches == [1, 2] and rec.pending == 0
    await b.stop()


async def test_failed_batch_answers_each_request_once_and_keeps_serving():
    backend = FakeBackend()
    backend.fail_when_rows = 3
    backend.release.clear()
    b, _ = await make(spec(), backend)
    running = b.submit(x(), ("y",), 1)
    await started(backend)
    doomed = [b.submit(x(), ("y",), 1) for _ in range(3)]
    backend.release.set()
    await running
    results = await asyncio.gather(*doomed, return_exceptions=True)
    assert all(isinstance(r, Internal) and "injected failure" in str(r) for r in results)
    ok = await b.submit(x(rows=2), ("y",), 2)
    assert ok.outputs["y"].shape == (2, 4)
    await b.stop()


async def test_padding_and_slicing_back():
    profiles = (Profile(0, {"x": ShapeRange((1, 1), (8, 16), (8, 16))}, (0,)),)
    backend = FakeBackend(profiles=profiles)
    backend.release.clear()
    s = spec()
    s = ModelSpec(**{**s.__dict__, "pad_values": {"x": -1.0}, "unpad": {"y": "x"}})
    b, _ = await make(s, backend)
    first = b.submit(x(n=2), ("y",), 1)
    await started(backend)
    a = b.submit({"x": np.arange(3, dtype=np.float32)[None]}, ("y",), 1)
    c = b.submit({"x": np.arange(5, dtype=np.float32)[None].repeat(2, 0)}, ("y",), 2)
    backend.release.set()
    await first
    ra, rc = await asyncio.gather(a, c)
    assert backend.batches == [1, 3]
    np.testing.assert_array_equal(ra.outputs["y"], 2 * np.arange(3, dtype=np.float32)[None])
    np.testing.assert_array_equal(rc.outputs["y"], 2 * np.arange(5, dtype=np.float32)[None].repeat(2, 0))
    with pytest.raises(InvalidArgument, match="fit no optimization profile"):
        b.submit({"x": np.zeros((1, 17), np.float32)}, ("y",), 1)
    await b.stop()


async def test_preserve_ordering_across_instances():
    backend = FakeBackend(instances=2)
    s = spec(preserve_ordering=True, preferred_batch_sizes=(1,))
    b, _ = await make(s, backend)
    order: List[int] = []
    futs = [b.submit(x(value=i), ("y",), 1) for i in range(6)]
    for i, f in enumerate(futs):
        f.add_done_callback(lambda _f, i=i: order.append(i))
    await asyncio.gather(*futs)
    assert order == sorted(order)
    await b.stop()


async def test_stop_drains_queue_then_rejects_new():
    backend = FakeBackend()
    b, _ = await make(spec(), backend)
    futs = [b.submit(x(), ("y",), 1) for _ in range(4)]
    await b.stop(timeout=5)
    assert all(f.done() and not f.exception() for f in futs)
    with pytest.raises(Exception, match="unloading"):
        b.submit(x(), ("y",), 1)


def test_non_batching_model_runs_each_request_alone():
    s = spec(enabled=False)
    rules = ShapeRules(batches=True, max_batch_size=8, paddable=frozenset(), profiles=())
    p = pol.plan([pend(), pend()], 0.0, s.batching, rules, {0}, busy=False)
    assert len(p.requests) == 1


@pytest.mark.parametrize("value, depth", [(None, 2), ("1", 1), ("2", 2), ("3", None), ("x", None)])
def test_batches_per_instance_parameter(value, depth):
    from google.protobuf import text_format

    from trtserve.protos import model_config_pb2 as mc
    from trtserve.server.errors import ModelLoadError
    text = ('name: "m" max_batch_size: 8 input [{ name: "x" data_type: TYPE_FP32 dims: [4] }] '
            'output [{ name: "y" data_type: TYPE_FP32 dims: [4] }]')
    if value is not None:
        text += f' parameters {{ key: "trtserve.batches_per_instance" value: {{ string_value: "{value}" }} }}'
    config = text_format.Parse(text, mc.ModelConfig())
    if depth is None:
        with pytest.raises(ModelLoadError, match="trtserve.batches_per_instance' must be 1 or 2"):
            ModelSpec.from_proto(config, "1")
    else:
        assert ModelSpec.from_proto(config, "1").batches_per_instance == depth


def test_device_pieces_stay_pieces_for_the_backend_to_copy():
    """CUDA shared-memory inputs (objects with __cuda_array_interface__) are never touched on the host:
    a batch containing one becomes a Gather of the pieces in row order; padding them is refused."""
    from trtserve.server.engine.backends.base import Gather
    from trtserve.server.engine.batcher import assemble

    class Dev:  # what protocol/shm.DeviceTensor looks like to the batcher
        def __init__(self, shape):
            self.shape, self.dtype, self.nbytes = shape, np.dtype(np.float32), 4 * int(np.prod(shape))

        @property
        def __cuda_array_interface__(self):
            return {"shape": self.shape, "typestr": "<f4", "data": (0, True), "version": 3, "strides": None}

    dev, host = Dev((2, 4)), np.ones((1, 4), np.float32)
    reqs = [Pending(inputs={"x": dev}, outputs=("y",), rows=2, shapes={"x": (4,)}, level=1, arrival=0.0,
                    ticket=None), Pending(inputs={"x": host}, outputs=("y",), rows=1, shapes={"x": (4,)}, level=1,
                                          arrival=0.0, ticket=None)]  # type: ignore[arg-type]
    out = assemble.stack(reqs, {"x": (4,)}, {}, True, {"x": np.zeros((3, 4), np.float32)})
    assert isinstance(out["x"], Gather) and out["x"].parts == (dev, host) and out["x"].shape == (3, 4)
    assert assemble.stack(reqs[:1], {"x": (4,)}, {}, True)["x"] is dev  # alone: handed over as it is
    reqs[1] = Pending(inputs={"x": np.ones((1, 6), np.float32)}, outputs=("y",), rows=1, shapes={"x": (6,)},
                      level=1, arrival=0.0, ticket=None)  # type: ignore[arg-type]
    with pytest.raises(Internal, match="cannot be padded"):
        assemble.stack(reqs, {"x": (6,)}, {"x": 0.0}, True)


async def test_batch_abandoned_while_queued_behind_is_not_executed():
    """A complete batch waiting on the instance (rule 5) whose clients all cancelled never runs."""
    backend = FakeBackend()
    backend.release.clear()
    b, rec = await make(spec(), backend)
    first = b.submit(x(), ("y",), 1)
    await started(backend)
    behind = [b.submit(x(value=i), ("y",), 1) for i in range(8)]  # a full batch, queued behind the first
    await asyncio.sleep(0.01)
    assert rec.pending == 0
    for f in behind:
        f.cancel()
    backend.release.set()
    await first
    await asyncio.sleep(0.05)
    assert backend.batches == [1]  # the abandoned batch of 8 never reached the backend
    later = await b.submit(x(value=5), ("y",), 1)  # and the instance serves the next request
    np.testing.assert_array_equal(later.outputs["y"], np.full((1, 4), 10, np.float32))
    assert backend.batches == [1, 1]
    await b.stop()


async def test_a_failure_while_answering_still_answers_every_request(caplog):
    class Broken(Recorder):
        def batch_done(self, *args, **kwargs) -> None:
            raise RuntimeError("observer bug")

    backend = FakeBackend()
    b = DynamicBatcher(spec(), backend, Broken(), Clock())
    b.start()
    for i in range(2):  # answered (not left hanging), and the instance is free for the next batch
        r = await asyncio.wait_for(b.submit(x(value=i), ("y",), 1), 5)
        np.testing.assert_array_equal(r.outputs["y"], np.full((1, 4), 2 * i, np.float32))  # counted after answering
    assert backend.batches == [1, 1]
    assert "answering a batch of 1 rows failed" in caplog.text
    await asyncio.wait_for(b.stop(), 5)


def test_a_ticket_is_settled_once_and_its_owner_is_told_at_once(caplog):
    from trtserve.server.engine.batcher.request import Ticket

    seen = []
    t = Ticket(lambda ticket: seen.append((ticket.result, ticket.error, ticket.cancelled)))
    cancels = []
    t.on_cancel = lambda: cancels.append(1)
    assert not t.done() and t.settle("r") and t.done()
    assert not t.settle("again") and not t.cancel() and seen == [("r", None, False)] and cancels == []

    c = Ticket(lambda ticket: seen.append(("cancelled", ticket.cancelled)))
    c.on_cancel = lambda: cancels.append(1)
    assert c.cancel() and seen[-1] == ("cancelled", True) and cancels == [1]
    assert not c.settle(error=RuntimeError("late")) and c.error is None

    def broken(ticket):
        raise RuntimeError("owner failed")

    b = Ticket(broken)
    with caplog.at_level("ERROR", logger="trtserve.batcher"):
        assert b.settle("x")  # the failure is logged, not raised into the batcher's loop
    assert "answering a request failed" in caplog.text


async def test_cancelling_the_future_of_submit_cancels_the_queued_request_at_once():
    from trtserve.server.engine.batcher.request import TicketFuture

    fut = TicketFuture(asyncio.get_running_loop())
    hooked = []
    fut.ticket.on_cancel = lambda: hooked.append(1)
    assert fut.cancel() and fut.cancelled() and fut.ticket.cancelled and hooked == [1]
    assert not fut.cancel()
    done = TicketFuture(asyncio.get_running_loop())
    done.ticket.settle(error=ValueError("bad"))
    with pytest.raises(ValueError):
        await done

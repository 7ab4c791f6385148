"""Alike requests of one front end's frame are queued as one batcher entry (server/engine/group.py): small ones
gathered from the arena, large ones (a GPU backend's direct copies from a page-locked arena) left where they lie.

The engine runs in this process (EngineHost) with a fake backend, and the test is its front end: it writes inputs
into its own arena and sends INFER descriptors over a LocalLink, the way a front-end process does, so what the engine
does with a frame of many requests is seen exactly: which entries the batcher got, what ran, what came back."""
from __future__ import annotations

import asyncio
import ctypes
import pathlib
import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

from trtserve.server.engine.backends.base import Backend, BatchResult, Gather, TensorSpec, each_destination
from trtserve.server.engine.host import EngineHost
from trtserve.server.errors import Unavailable
from trtserve.server.events import Observer
from trtserve.server.frontend.engine_client import EngineClient
from trtserve.server.ipc import messages as m
from trtserve.server.ipc.arena import Allocator, Arena
from trtserve.server.ipc.channel import LocalLink
from trtserve.server.options import ServerOptions

from .models import write_config

HELD = -1.0  # a batch holding this value waits for the gate (it occupies the one instance)
HELD2 = -2.0  # ... and one holding this, for the second gate


class Doubling(Backend):
    """OUTPUT0 = 2 * INPUT0, logging every batch's input; a batch with a HELD value waits for ``gate``."""

    platform = "fake_groups"
    batches: List[np.ndarray] = []
    started = threading.Event()
    gate = threading.Event()
    started2 = threading.Event()
    gate2 = threading.Event()

    def open(self) -> None:
        pass

    def io(self):
        return ((TensorSpec("INPUT0", "FP32", (-1, 4)),), (TensorSpec("OUTPUT0", "FP32", (-1, 4)),))

    def run(self, instance, inputs, outputs):
        x = np.asarray(inputs["INPUT0"])
        Doubling.batches.append(x.copy())
        if (x == HELD).any():
            Doubling.started.set()
            assert Doubling.gate.wait(30)
        if (x == HELD2).any():
            Doubling.started2.set()
            assert Doubling.gate2.wait(30)
        return BatchResult({"OUTPUT0": 2 * x})

    def close(self) -> None:
        pass


class Counts(Observer):
    def __init__(self) -> None:
        self.queued = self.dequeued = 0
        self.batches: List[Tuple[int, int]] = []  # (rows, requests)

    def request_queued(self, model, version, priority, count=1) -> None:
        self.queued += count

    def request_dequeued(self, model, version, priority, count=1) -> None:
        self.dequeued += count

    def batch_done(self, model, version, batch_size, requests, *a, **k) -> None:
        self.batches.append((batch_size, requests))


CONFIG = """
name: "{name}" platform: "fake_groups" max_batch_size: {max_batch}
input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 4 ] }} ]
dynamic_batching {{ {batching} }}
"""


class FrontEnd:
    """The test's side of the link: an arena, descriptors, and every message the engine sent back."""

    def __init__(self, link: LocalLink, arena: Arena, serial: int) -> None:
        self.link, self.arena, self.serial = link, arena, serial
        self.alloc = Allocator(arena.size)
        self.messages: List[tuple] = []
        self.answered = asyncio.Event()
        self._ids = 0
        self.inputs: Dict[int, np.ndarray] = {}
        self.slots: Dict[int, int] = {}

    def on_messages(self, batch: List[tuple]) -> None:
        self.messages.extend(batch)
        self.answered.set()

    def infer(self, model: str, x: np.ndarray, deadline: Optional[float] = None, slot_bytes: Optional[int] = None,
              priority: int = 0, trace: Optional[str] = None) -> int:
        self._ids += 1
        off = self.alloc.alloc(x.nbytes)
        self.arena.write(off, x)
        cap = slot_bytes if slot_bytes is not None else x.nbytes
        out = self.alloc.alloc(max(cap, 1))
        self.inputs[self._ids], self.slots[self._ids] = x, out
        inputs = (("INPUT0", "FP32", x.shape, (m.ARENA, off, x.nbytes)),)
        self.link.send((m.INFER, self._ids, model, "", self.serial, inputs, (("OUTPUT0", None, (out, cap)),),
                        x.shape[0], priority, 0, deadline, 0, trace))
        return self._ids

    def answers(self) -> Dict[int, Tuple[str, np.ndarray]]:
        """req_id -> (code, OUTPUT0 or an empty array), from RESULT and RESULTS alike."""
        out: Dict[int, Tuple[str, np.ndarray]] = {}
        for msg in self.messages:
            if msg[0] == m.RESULTS:
                for i, req_id in enumerate(msg[1]):
                    assert req_id not in out, f"request {req_id} answered twice"
                    (name, wire, shape, offsets, nbytes), = msg[2]
                    out[req_id] = ("", self.arena.array(offsets[i], np.dtype(np.float32), tuple(shape)).copy())
            elif msg[0] == m.RESULT:
                assert msg[1] not in out, f"request {msg[1]} answered twice"
                value = np.empty(0)
                if not msg[2]:
                    (name, wire, shape, where), = msg[4]
                    value = (self.arena.array(where[1], np.dtype(np.float32), tuple(shape)).copy()
                             if where[0] == m.ARENA else np.frombuffer(where[1], np.float32).reshape(shape))
                out[msg[1]] = (msg[2], value)
        return out

    async def wait_for(self, count: int, timeout: float = 10.0) -> Dict[int, Tuple[str, np.ndarray]]:
        async def until() -> None:
            while len(self.answers()) < count:
                self.answered.clear()
                await self.answered.wait()

        await asyncio.wait_for(until(), timeout)
        return self.answers()


async def _engine(repo: pathlib.Path, counts: Counts, backend: type = Doubling):
    host = EngineHost(ServerOptions(model_repository=repo, metrics_port=None, gpu_metrics=False,
                                    backend_factories={"fake_groups": backend}), extra_observers=[counts])
    await host.start()
    ours, theirs = LocalLink.pair()
    arena = Arena.create(1 << 20)
    arena.pinned = bool(getattr(backend, "accepts_device_tensors", False))  # as the engine page-locks it for TensorRT
    host.attach("test", theirs, arena)
    serial = host.repository.get("m").serial
    fe = FrontEnd(ours, arena, serial)
    ours.start(fe.on_messages, lambda: None)
    return host, fe


class Direct(Doubling):
    """Doubling as the TensorRT backend does it for large requests in a page-locked arena: the input may come in
    pieces (``Gather``: logged), each destination gets its rows by memmove (the device copy), and a request index
    counts as delivered only when every destination of it got them. As TensorRT, it copies the output back to the
    host only when some row was not delivered; otherwise its host result is zeros, so an answer the engine wrote
    from it would show. A destination whose input rows hold ``refuse`` is not written (too small, say)."""

    accepts_device_tensors = True
    direct_copy_min_bytes = 16  # one row of 4 FP32: every request here is large
    pieces: List[int] = []  # per batch: the pieces its input came in
    addresses: List[List[int]] = []  # per batch: where each piece lies
    destinations: List[List[Tuple[int, int, int]]] = []  # per batch: (request index, row offset, rows)
    columns: List[bool] = []  # per batch: the input came as columns (PieceColumns)
    kinds: List[List[str]] = []  # per batch: its destinations' types
    refuse: Optional[float] = None

    def run(self, instance, inputs, outputs):
        return self.run_to_device(instance, inputs, outputs, ())

    def run_to_device(self, instance, inputs, outputs, destinations):
        x = inputs["INPUT0"]
        Direct.columns.append(isinstance(x, Gather) and x.columns is not None)
        Direct.kinds.append([type(d).__name__ for d in destinations])
        parts = x.parts if isinstance(x, Gather) else (x,)
        Direct.pieces.append(len(parts))
        Direct.addresses.append([np.asarray(p).ctypes.data for p in parts])
        Direct.destinations.append([(d.request, d.row_offset, d.rows) for d in each_destination(destinations)])
        y = super().run(instance, {"INPUT0": np.concatenate([np.asarray(p) for p in parts])}, outputs).outputs["OUTPUT0"]
        return device_copies(y, destinations, Direct.refuse)


def device_copies(y: np.ndarray, destinations, refuse: Optional[float]) -> BatchResult:
    """OUTPUT0 ``y`` of a batch as TensorRT's device copies leave it: each destination gets its rows (memmove), unless
    they hold 2 * ``refuse``; a request index is delivered when every destination of it got them; the host result is
    zeros when every row was delivered (TensorRT does not copy it back then)."""
    reached: Dict[int, bool] = {}
    covered = 0
    for d in each_destination(destinations):
        rows = np.ascontiguousarray(y[d.row_offset:d.row_offset + d.rows])
        ptr, room = d.outputs["OUTPUT0"]
        ok = rows.nbytes <= room and not (refuse is not None and (rows == 2 * refuse).any())
        if ok:
            ctypes.memmove(ptr, rows.ctypes.data, rows.nbytes)
            covered += d.rows
        reached[d.request] = reached.get(d.request, True) and ok
    host = y if covered < y.shape[0] else np.zeros_like(y)
    return BatchResult({"OUTPUT0": host}, delivered={i: frozenset({"OUTPUT0"}) for i, ok in reached.items() if ok})


@pytest.fixture
def repo(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    Doubling.batches = []
    Doubling.started.clear()
    Doubling.gate.clear()
    Doubling.started2.clear()
    Doubling.gate2.clear()
    Direct.pieces, Direct.destinations, Direct.addresses, Direct.refuse = [], [], [], None
    Direct.columns, Direct.kinds = [], []
    close = Arena.close

    def unpin_then_close(self: Arena) -> None:
        self.pinned = False  # nothing was registered with CUDA
        close(self)

    monkeypatch.setattr(Arena, "close", unpin_then_close)
    return tmp_path


def _model(repo: pathlib.Path, max_batch: int = 64, batching: str = "max_queue_delay_microseconds: 100") -> None:
    write_config(repo, "m", CONFIG.format(name="m", max_batch=max_batch, batching=batching))
    (repo / "m" / "1").mkdir()


def _rows(n: int, seed: int, rows: int = 1) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 1, (rows, 4)).astype(np.float32) for _ in range(n)]


async def _hold(fe: FrontEnd) -> int:
    """One batch that waits for the gate on the model's one instance: what is sent next queues behind it."""
    held = fe.infer("m", np.full((1, 4), HELD, np.float32))  # alone in its frame: a request on its own
    await asyncio.get_running_loop().run_in_executor(None, Doubling.started.wait, 10)
    return held


def _the_others_ran(answers: Dict[int, Tuple[str, np.ndarray]], held: int, ids: List[int], xs: List[np.ndarray],
                    left: int) -> None:
    """Every request but ``ids[left]`` was answered with 2 * its input, and so was the held one; the batches after
    the held one ran those rows and never ``xs[left]``."""
    for i, (req_id, x) in enumerate(zip(ids, xs)):
        if i != left:
            assert answers[req_id][0] == ""
            np.testing.assert_array_equal(answers[req_id][1], 2 * x)
    assert answers[held][0] == ""
    ran = np.concatenate(Doubling.batches[1:])
    assert ran.shape[0] == len(xs) - 1 and not (ran == xs[left]).all(axis=1).any()


async def _release_and_check(fe: FrontEnd, held: int, ids: List[int], xs: List[np.ndarray]) -> None:
    """Lets the held batch end once the requests sent behind it queued; each of them, and the held one, is answered
    (with 2 * its input)."""
    await asyncio.sleep(0.05)
    Doubling.gate.set()
    answers = await fe.wait_for(len(ids) + 1)
    for req_id, x in zip(ids, xs):
        np.testing.assert_array_equal(answers[req_id][1], 2 * x)
    assert answers[held][0] == ""


BOTH = pytest.mark.parametrize("backend", [Doubling, Direct], ids=["small", "large"])


@BOTH
async def test_alike_requests_of_a_frame_are_one_entry_and_each_gets_its_own_answer(repo, backend) -> None:
    _model(repo)
    counts = Counts()
    host, fe = await _engine(repo, counts, backend)
    try:
        held = await _hold(fe)
        xs = _rows(10, 0)
        ids = [fe.infer("m", x) for x in xs]  # one loop turn: one frame
        odd = fe.infer("m", _rows(1, 1, rows=2)[0])  # other shape: on its own, in the same batch
        await asyncio.sleep(0.05)
        assert host.repository.get("m").batcher.pending == 11  # requests, not entries: the ten are one
        Doubling.gate.set()
        answers = await fe.wait_for(12)
        for req_id, x in zip(ids, xs):
            code, y = answers[req_id]
            assert code == "" and y.shape == (1, 4)
            np.testing.assert_array_equal(y, 2 * x)
        assert answers[odd][0] == "" and answers[held][0] == ""
        assert [len(msg[1]) for msg in fe.messages if msg[0] == m.RESULTS] == [10]  # one message for the ten
        assert [b.shape[0] for b in Doubling.batches] == [1, 12]  # the held batch, then one batch of all
        stats = host.statistics.snapshot("m", "1")
        assert (stats.success.count, stats.inference_count, stats.execution_count) == (12, 13, 2)
        assert counts.queued == counts.dequeued == 12  # queue metrics count requests, not entries
        assert counts.batches == [(1, 1), (12, 11)]
        if backend is Direct:  # the ten left in the arena, one piece each, answered where the device wrote them
            assert Direct.pieces == [1, 11]
            assert Direct.destinations[1] == [(0, i, 1) for i in range(10)] + [(1, 10, 2)]
            # the ten as columns, the odd one as a destination of its own (so the batch's input is in parts)
            assert Direct.kinds[1] == ["MemberDestinations", "DeviceDestination"] and Direct.columns == [False, False]
    finally:
        await host.stop()


@BOTH
async def test_a_group_that_does_not_fit_whole_gives_a_batch_its_first_members_and_the_rest_go_next(repo,
                                                                                                 backend) -> None:
    """Groups come in whatever sizes a front end's reads bring: a batch takes what fits of the next one (the batcher's
    rule 2), so batches stay full; the rest go first in the batch after. Every request gets exactly one answer."""
    _model(repo, max_batch=8)
    counts = Counts()
    host, fe = await _engine(repo, counts, backend)
    try:
        held = await _hold(fe)
        xs = _rows(11, 4)
        ids = [fe.infer("m", x) for x in xs[:5]]  # one frame: one entry of five
        await asyncio.sleep(0.05)
        ids += [fe.infer("m", x) for x in xs[5:]]  # the next frame: an entry of six
        await _release_and_check(fe, held, ids, xs)
        assert [b.shape[0] for b in Doubling.batches] == [1, 8, 3]
        np.testing.assert_array_equal(np.concatenate(Doubling.batches[1:]), np.concatenate(xs))  # in order
        assert [len(msg[1]) for msg in fe.messages if msg[0] == m.RESULTS] == [5, 3, 3]
        assert counts.batches == [(1, 1), (8, 8), (3, 3)]
        assert counts.queued == counts.dequeued == 12
        stats = host.statistics.snapshot("m", "1")
        assert (stats.success.count, stats.fail.count, stats.execution_count) == (12, 0, 3)
        assert not host.repository.get("m").batcher.pending and not host.core.sessions[0].inflight
        if backend is Direct:  # each part's members still written where the device put them
            assert Direct.pieces == [1, 8, 3]
            assert Direct.destinations[1] == [(0, i, 1) for i in range(5)] + [(1, 5 + i, 1) for i in range(3)]
            assert Direct.destinations[2] == [(0, i, 1) for i in range(3)]
            # groups and parts of groups in columns, joined in one batch: no array per member on the way
            assert Direct.columns == [False, True, True]
            assert Direct.kinds[1:] == [["MemberDestinations"] * 2, ["MemberDestinations"]]
    finally:
        await host.stop()


@BOTH
async def test_the_members_left_by_a_split_are_cancelled_and_expire_on_their_own(repo, backend) -> None:
    """After a batch took the first members of a group, the others are an entry of their own: a cancel or a deadline
    among them leaves the members in the running batch alone, and a cancel of a member in the batch is answered
    CANCELLED when that batch is done."""
    _model(repo, max_batch=4)
    host, fe = await _engine(repo, Counts(), backend)
    try:
        held = await _hold(fe)
        bs = _rows(3, 5)
        bs[0][:] = HELD2  # the batch of these three and the first of the next group waits for the second gate
        now = time.monotonic()
        b_ids = [fe.infer("m", x, deadline=now + 60) for x in bs]
        await asyncio.sleep(0.05)
        cs = _rows(4, 6)
        c_ids = [fe.infer("m", x, deadline=now + (0.3 if i == 2 else 60)) for i, x in enumerate(cs)]
        await asyncio.sleep(0.05)
        Doubling.gate.set()
        await asyncio.get_running_loop().run_in_executor(None, Doubling.started2.wait, 10)
        fe.link.send((m.CANCEL, c_ids[0]))  # in the running batch
        fe.link.send((m.CANCEL, c_ids[1]))  # left queued by the split
        answers = await fe.wait_for(2)  # the held one, and the queued cancel at once
        assert answers[c_ids[1]][0] == "CANCELLED" and c_ids[0] not in answers
        answers = await fe.wait_for(3)  # then the short deadline, while the batch still runs
        assert answers[c_ids[2]][0] == "DEADLINE_EXCEEDED"
        Doubling.gate2.set()
        answers = await fe.wait_for(8)
        assert answers[c_ids[0]][0] == "CANCELLED"
        for req_id, x in list(zip(b_ids, bs)) + [(c_ids[3], cs[3])]:
            assert answers[req_id][0] == ""
            np.testing.assert_array_equal(answers[req_id][1], 2 * x)
        assert answers[held][0] == ""
        assert [b.shape[0] for b in Doubling.batches] == [1, 4, 1]  # the held one, three and one, the last one
        np.testing.assert_array_equal(Doubling.batches[2], cs[3])
        stats = host.statistics.snapshot("m", "1")
        assert (stats.success.count, stats.fail.count) == (5, 3)
        assert not host.repository.get("m").batcher.pending and not host.core.sessions[0].inflight
    finally:
        await host.stop()


async def test_large_members_are_queued_in_arena_order_and_each_still_gets_its_own_answer(repo) -> None:
    """The backend copies members whose pieces lie at one distance from each other in one call
    (backends/tensorrt/copies.py), so a group of large requests is ordered by where they lie in the arena."""
    _model(repo)
    host, fe = await _engine(repo, Counts(), Direct)
    try:
        held = await _hold(fe)
        low = [fe.alloc.alloc(16) for _ in range(4)]  # room for two requests (input and output slot each)...
        xs = _rows(4, 7)
        ids = [fe.infer("m", xs[0]), fe.infer("m", xs[1])]  # ...so these two lie above it
        for off in low:
            fe.alloc.free(off)
        ids += [fe.infer("m", xs[2]), fe.infer("m", xs[3])]  # and these two, sent later in the same frame, in it
        await _release_and_check(fe, held, ids, xs)
        assert Direct.pieces == [1, 4]
        group = Direct.addresses[1]
        assert group == sorted(group) and group[0] == fe.arena.address(low[0], 16)  # the later ones first
    finally:
        await host.stop()


@BOTH
async def test_requests_with_deadlines_are_one_entry_and_one_whose_deadline_passes_first_leaves_it(repo, backend) -> None:
    """Clients' deadlines (gRPC timeouts) differ: the entry's is the earliest. When it passes in the queue, that member
    is answered DEADLINE_EXCEEDED and never runs; the others are queued again, as one entry, and succeed."""
    _model(repo)
    host, fe = await _engine(repo, Counts(), backend)
    try:
        held = await _hold(fe)
        xs = _rows(5, 11)
        now = time.monotonic()
        ids = [fe.infer("m", x, deadline=now + (0.1 if i == 2 else 60)) for i, x in enumerate(xs)]
        answers = await fe.wait_for(1)  # the batcher expires the entry while the instance is held
        assert answers[ids[2]][0] == "DEADLINE_EXCEEDED"
        assert list(answers) == [ids[2]]
        Doubling.gate.set()
        answers = await fe.wait_for(6)
        _the_others_ran(answers, held, ids, xs, 2)
        assert [len(msg[1]) for msg in fe.messages if msg[0] == m.RESULTS] == [4]  # the four, still one entry
        stats = host.statistics.snapshot("m", "1")
        assert (stats.success.count, stats.fail.count) == (5, 1)
    finally:
        await host.stop()


@BOTH
async def test_a_request_cancelled_in_the_queue_never_runs_and_its_group_still_does(repo, backend) -> None:
    _model(repo)
    host, fe = await _engine(repo, Counts(), backend)
    try:
        held = await _hold(fe)
        xs = _rows(6, 2)
        ids = [fe.infer("m", x) for x in xs]
        await asyncio.sleep(0.05)  # queued, as one entry, behind the held batch
        fe.link.send((m.CANCEL, ids[2]))
        answers = await fe.wait_for(1)
        assert answers[ids[2]][0] == "CANCELLED"  # at once: the instance is still held
        Doubling.gate.set()
        answers = await fe.wait_for(7)
        _the_others_ran(answers, held, ids, xs, 2)  # the cancelled row never ran
        assert host.statistics.snapshot("m", "1").success.count == 6  # five and the held one
    finally:
        await host.stop()


@BOTH
async def test_a_request_cancelled_while_its_group_runs_is_answered_cancelled_and_the_others_succeed(repo, backend) -> None:
    _model(repo)
    host, fe = await _engine(repo, Counts(), backend)
    try:
        xs = _rows(4, 3)
        xs[0][:] = HELD  # the group's batch waits for the gate
        ids = [fe.infer("m", x) for x in xs]
        await asyncio.get_running_loop().run_in_executor(None, Doubling.started.wait, 10)
        fe.link.send((m.CANCEL, ids[1]))
        await asyncio.sleep(0.05)
        assert not fe.answers()  # it runs with its group: answered when the group is
        Doubling.gate.set()
        answers = await fe.wait_for(4)
        assert answers[ids[1]][0] == "CANCELLED"
        for i in (0, 2, 3):
            np.testing.assert_array_equal(answers[ids[i]][1], 2 * xs[i])
        assert [b.shape[0] for b in Doubling.batches] == [4]
    finally:
        await host.stop()


@pytest.mark.parametrize("why", ["traced", "priority", "queue limit", "not batched", "preserve ordering"])
async def test_requests_that_are_not_alike_run_one_by_one(repo, why: str) -> None:
    batching = "max_queue_delay_microseconds: 100"
    if why == "queue limit":  # the limit counts entries: such a model's requests are never grouped
        batching += " default_queue_policy { max_queue_size: 100 }"
    elif why == "preserve ordering":  # a group would be queued after what was read with it and goes one by one
        batching += " preserve_ordering: true"
    elif why == "priority":
        batching += " priority_levels: 2 default_priority_level: 1"
    _model(repo, max_batch=1 if why == "not batched" else 64, batching=batching)
    host, fe = await _engine(repo, Counts())
    try:
        held = await _hold(fe)
        xs = _rows(4, 4)
        ids = [fe.infer("m", x, trace=str(i) if why == "traced" else None,
                        priority=1 + i % 2 if why == "priority" else 0) for i, x in enumerate(xs)]
        await _release_and_check(fe, held, ids, xs)
        grouped = [len(msg[1]) for msg in fe.messages if msg[0] == m.RESULTS]
        assert grouped == ([2, 2] if why == "priority" else [])  # alike within a priority level only
    finally:
        await host.stop()


async def test_an_output_larger_than_its_slots_is_answered_one_by_one_as_bytes(repo) -> None:
    _model(repo)
    host, fe = await _engine(repo, Counts())
    try:
        held = await _hold(fe)
        xs = _rows(3, 5)
        ids = [fe.infer("m", x, slot_bytes=8) for x in xs]  # 16 bytes of output each
        await asyncio.sleep(0.05)
        Doubling.gate.set()
        answers = await fe.wait_for(4)
        for req_id, x in zip(ids, xs):
            np.testing.assert_array_equal(answers[req_id][1], 2 * x)
        assert not [msg for msg in fe.messages if msg[0] == m.RESULTS]
        assert sum(1 for msg in fe.messages if msg[0] == m.RESULT and msg[4] and msg[4][0][3][0] == m.DATA) == 3
        assert [b.shape[0] for b in Doubling.batches] == [1, 3]  # still one entry
        del held
    finally:
        await host.stop()


@BOTH
async def test_a_group_whose_front_end_went_away_never_runs(repo, backend) -> None:
    _model(repo)
    host, fe = await _engine(repo, Counts(), backend)
    try:
        await _hold(fe)
        for x in _rows(5, 6):
            fe.infer("m", x)
        await asyncio.sleep(0.05)
        fe.link.close()  # the front end's process died
        await asyncio.sleep(0.05)
        Doubling.gate.set()
        await asyncio.sleep(0.2)
        assert [b.shape[0] for b in Doubling.batches] == [1]
        assert host.repository.get("m").batcher.pending == 0
        assert not host.core.sessions
    finally:
        await host.stop()


def engine_client() -> Tuple[EngineClient, LocalLink, List[tuple], Arena]:
    """A front end's EngineClient on one end of a LocalLink; the test is the engine on the other: (client, the
    engine's end, what the client sent it, the arena)."""
    ours, engine = LocalLink.pair()
    arena = Arena.create(1 << 16)
    client = EngineClient(ours, arena)
    sent: List[tuple] = []
    engine.start(sent.extend, lambda: None)
    client.start()
    return client, engine, sent, arena


async def test_the_front_end_answers_each_request_of_a_results_message() -> None:
    client, engine, sent, arena = engine_client()
    blocks = [client.allocator.alloc(64) for _ in range(3)]
    futures = [client.submit(("m", "", 1, (), (), 1, 0, 0, None, 0, None), b) for b in blocks]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    ids = tuple(msg[1] for msg in sent)
    assert len(ids) == 3
    client.cancel(futures[1][0])  # the client gave up: its block is freed when the answer comes
    engine.send((m.RESULTS, ids, (("OUTPUT0", "FP32", (1, 4), [0, 64, 128], 16),)))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert await futures[0][1] == (("OUTPUT0", "FP32", (1, 4), (m.ARENA, 0, 16)),)
    assert await futures[2][1] == (("OUTPUT0", "FP32", (1, 4), (m.ARENA, 128, 16)),)
    assert futures[1][1].cancelled() and client.inflight == 0
    assert client.allocator.in_use == 2 * 64  # the cancelled request's block is free again, the others are the caller's
    arena.close()


async def test_a_request_submitted_after_the_engine_went_away_frees_its_block() -> None:
    client, engine, sent, arena = engine_client()
    engine.close()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not client.alive
    block = client.allocator.alloc(64)
    with pytest.raises(Unavailable, match="not running"):
        client.submit(("m", "", 1, (), (), 1, 0, 0, None, 0, None), block)
    assert client.allocator.in_use == 0 and client.inflight == 0
    arena.close()


class NarrowProfile(Doubling):
    """The same model whose one profile takes batches of 1-2 rows only (max_batch_size says 64)."""

    def profiles(self):
        from trtserve.server.engine.backends.base import Profile, ShapeRange

        return (Profile(0, {"INPUT0": ShapeRange((1, 4), (1, 4), (2, 4))}, (0,)),)


async def test_a_group_no_profile_takes_falls_back_to_its_requests_one_by_one(repo) -> None:
    _model(repo)
    host, fe = await _engine(repo, Counts(), NarrowProfile)
    try:
        xs = _rows(5, 8)
        ids = [fe.infer("m", x) for x in xs]  # alike, but five rows fit no profile: each is queued on its own
        answers = await fe.wait_for(5)
        for req_id, x in zip(ids, xs):
            assert answers[req_id][0] == ""
            np.testing.assert_array_equal(answers[req_id][1], 2 * x)
        assert max(b.shape[0] for b in Doubling.batches) <= 2
    finally:
        await host.stop()


async def test_a_large_member_the_device_did_not_write_gets_the_whole_group_answered_from_the_host(repo) -> None:
    """Delivered means every member got its rows from the device; when one did not, the group's output comes back
    to the host and every member is answered from there, in one RESULTS as before."""
    _model(repo)
    host, fe = await _engine(repo, Counts(), Direct)
    try:
        xs = _rows(4, 9)
        xs[2][:] = 7.0
        Direct.refuse = 7.0
        await _queued_behind_a_held_batch_then_all_doubled(fe, xs, [None] * 4)
        assert [len(msg[1]) for msg in fe.messages if msg[0] == m.RESULTS] == [4]
        assert Direct.pieces[1:] == [4]
    finally:
        await host.stop()


async def test_a_large_member_whose_slot_the_device_cannot_write_sends_the_group_through_the_host(repo) -> None:
    """One member's output slot is below the direct-copy size (and too small for its output): no member of the
    group gets a device copy, and the output larger than its slot is answered one by one, as bytes."""
    _model(repo)
    host, fe = await _engine(repo, Counts(), Direct)
    try:
        await _queued_behind_a_held_batch_then_all_doubled(fe, _rows(3, 10), [None, 8, None])
        assert not [msg for msg in fe.messages if msg[0] == m.RESULTS]
        assert Direct.pieces[1:] == [3] and Direct.destinations[1:] == [[]]
    finally:
        await host.stop()


async def _queued_behind_a_held_batch_then_all_doubled(fe: FrontEnd, xs: List[np.ndarray],
                                                       slot_bytes: List[Optional[int]]) -> None:
    """Sends ``xs`` (one frame) while a held batch occupies the instance, lets it go, and checks that every request,
    the held one too, is answered with twice its input."""
    held = await _hold(fe)
    ids = [fe.infer("m", x, slot_bytes=n) for x, n in zip(xs, slot_bytes)]
    await asyncio.sleep(0.05)
    Doubling.gate.set()
    answers = await fe.wait_for(len(xs) + 1)
    for req_id, x in zip(ids, xs):
        assert answers[req_id][0] == ""
        np.testing.assert_array_equal(answers[req_id][1], 2 * x)
    assert answers[held][0] == ""


def test_which_requests_may_share_an_entry_and_how() -> None:
    """members_per_entry: as many as a batch holds; direct when every tensor reaches the backend's direct-copy
    size in a page-locked arena; none when some reach it and some do not."""
    from types import SimpleNamespace

    from trtserve.server.engine import group

    mv = SimpleNamespace(spec=SimpleNamespace(max_batch_size=64))

    def msg(rows: int, in_bytes: int, out_bytes: int) -> tuple:
        return (m.INFER, 1, "m", "", 1, (("INPUT0", "FP32", (rows, 4), (m.ARENA, 0, in_bytes)),),
                (("OUTPUT0", None, (4096, out_bytes)),), rows, 0, 0, None, 0, None)

    assert group.members_per_entry(mv, msg(4, 64, 64), None) == (16, False)  # not page-locked: gathered
    assert group.members_per_entry(mv, msg(4, 64, 64), 1024) == (16, False)  # small
    assert group.members_per_entry(mv, msg(4, 2048, 1024), 1024) == (16, True)  # large
    assert group.members_per_entry(mv, msg(4, 2048, 512), 1024) == (0, False)  # mixed: one by one
    assert group.members_per_entry(mv, msg(4, 512, 2048), 1024) == (0, False)
    assert group.members_per_entry(mv, msg(128, 2048, 2048), 1024) == (0, True)  # more rows than a batch

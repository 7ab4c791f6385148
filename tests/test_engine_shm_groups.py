"""Alike requests in client CUDA shared memory queued as one batcher entry (server/engine/group.py): each member's
regions checked and held as its own request's are, the device reading every member's input where it lies and writing
every member's rows into its own output region, one RESULTS for the group.

The engine runs in this process (EngineHost) on a fake CUDA (host buffers stand in for device memory,
tests/test_system_shm.py) with a backend that does what the TensorRT backend does with device tensors and device
destinations; the test is the front end: it registers a region per client, as perf_analyzer does, and sends INFER
descriptors over a LocalLink in one frame."""
from __future__ import annotations

import asyncio
import ctypes
import pathlib
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

from trtserve.server.engine import group
from trtserve.server.engine.backends.base import DeviceTensor, Gather, each_destination
from trtserve.server.ipc import messages as m

from .models import write_config
from .test_engine_groups import CONFIG, HELD, HELD2, Counts, Doubling, _engine, _model, device_copies, engine_client
from .test_system_shm import FakeCuda


class OnDevice(Doubling):
    """OUTPUT0 = 2 * INPUT0 as the TensorRT backend computes it from CUDA shared memory: inputs as device tensors
    (pieces of a ``Gather`` for a batch of several), each destination's rows copied into its memory (memmove on the
    fake), an output delivered for a request index only when every destination of it got its rows; the host result
    is zeros when every row was delivered (it is not copied back), so an answer written from it would show. A
    destination whose rows hold ``refuse`` is not written."""

    accepts_device_tensors = True
    pieces: List[List[str]] = []  # per batch: each input piece's type
    blocks: List[List[Optional[int]]] = []  # per batch: each destination's memory block
    refuse: Optional[float] = None

    def run(self, instance, inputs, outputs):
        return self.run_to_device(instance, inputs, outputs, ())

    @staticmethod
    def _host(piece) -> np.ndarray:
        if isinstance(piece, DeviceTensor):
            return np.frombuffer(bytes((ctypes.c_ubyte * piece.nbytes).from_address(piece.ptr)),
                                 np.float32).reshape(piece.shape)
        return np.asarray(piece)

    def run_to_device(self, instance, inputs, outputs, destinations):
        x = inputs["INPUT0"]
        parts = x.parts if isinstance(x, Gather) else (x,)
        OnDevice.pieces.append([type(p).__name__ for p in parts])
        OnDevice.blocks.append([d.block for d in each_destination(destinations)])
        x = np.concatenate([self._host(p) for p in parts])
        return device_copies(super().run(instance, {"INPUT0": x}, outputs).outputs["OUTPUT0"], destinations,
                             OnDevice.refuse)


class Clients:
    """Clients of the engine's front end, each with its own CUDA input and output region (as perf_analyzer's)."""

    def __init__(self, host, fe, fake: FakeCuda) -> None:
        self.host, self.fe, self.fake = host, fe, fake
        self.handles: Dict[str, bytes] = {}
        self.sent: Dict[int, np.ndarray] = {}  # req_id -> input
        self.out_region: Dict[int, str] = {}

    def region(self, name: str, nbytes: int) -> bytes:
        h = self.handles[name] = self.fake.allocate(nbytes)
        self.host.shared_memory.register_cuda(name, h, 0, nbytes)
        return h

    def infer(self, k: int, x: np.ndarray, out_bytes: Optional[int] = None, in_region: Optional[str] = None,
              deadline: Optional[float] = None) -> int:
        """Client ``k`` writes ``x`` into its input region and asks for OUTPUT0 in its output region."""
        fe = self.fe
        fe._ids += 1
        name_in, name_out = f"in{k}", f"out{k}"
        if name_in not in self.handles:
            self.region(name_in, x.nbytes)
            self.region(name_out, x.nbytes if out_bytes is None else out_bytes)
        self.fake.array(self.handles[name_in])[:x.nbytes] = x.reshape(-1).view(np.uint8)
        room = x.nbytes if out_bytes is None else out_bytes
        inputs = (("INPUT0", "FP32", x.shape, (m.SHM, in_region or name_in, 0, x.nbytes)),)
        fe.link.send((m.INFER, fe._ids, "m", "", fe.serial, inputs, (("OUTPUT0", (name_out, 0, room), None),),
                      x.shape[0], 0, 0, deadline, 0, None))
        self.sent[fe._ids], self.out_region[fe._ids] = x, name_out
        return fe._ids

    def check_doubled(self, answers: Dict[int, Tuple[str, str]], ids: List[int], xs: List[np.ndarray]) -> None:
        """Each of ``ids`` succeeded and its output region holds 2 * its input."""
        for req_id, x in zip(ids, xs):
            assert answers[req_id] == ("", "")
            np.testing.assert_array_equal(self.output(req_id), 2 * x)

    def output(self, req_id: int) -> np.ndarray:
        x = self.sent[req_id]
        return self.fake.array(self.handles[self.out_region[req_id]])[:x.nbytes].view(np.float32).reshape(x.shape)

    def answers(self) -> Dict[int, Tuple[str, str]]:
        """req_id -> (code, message); a success must say its output is in its region."""
        out: Dict[int, Tuple[str, str]] = {}
        for msg in self.fe.messages:
            if msg[0] == m.RESULTS:
                for req_id in msg[1]:
                    assert req_id not in out, f"request {req_id} answered twice"
                    assert [(o[0], o[3]) for o in msg[2]] == [("OUTPUT0", None)]  # in each one's region
                    out[req_id] = ("", "")
            elif msg[0] == m.RESULT:
                assert msg[1] not in out, f"request {msg[1]} answered twice"
                if not msg[2] and msg[1] in self.sent:
                    assert [(o[0], o[3]) for o in msg[4]] == [("OUTPUT0", (m.SHM,))]
                out[msg[1]] = (msg[2], msg[3])
        return out

    async def wait_for(self, count: int) -> Dict[int, Tuple[str, str]]:
        async def until() -> None:
            while len(self.answers()) < count:
                self.fe.answered.clear()
                await self.fe.answered.wait()

        await asyncio.wait_for(until(), 10)
        return self.answers()

    def leases(self) -> int:
        return sum(r.leases for r in self.host.shared_memory._regions.values())


@pytest.fixture
def repo(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    from trtserve.server.ipc.arena import Arena

    Doubling.batches = []
    Doubling.started.clear()
    Doubling.gate.clear()
    Doubling.started2.clear()
    Doubling.gate2.clear()
    OnDevice.pieces, OnDevice.blocks, OnDevice.refuse = [], [], None
    close = Arena.close

    def unpin_then_close(self: Arena) -> None:
        self.pinned = False  # nothing was registered with CUDA
        close(self)

    monkeypatch.setattr(Arena, "close", unpin_then_close)
    _model(tmp_path)
    return tmp_path


async def _clients(repo: pathlib.Path, backend: type = OnDevice) -> Clients:
    host, fe = await _engine(repo, Counts(), backend)
    fake = FakeCuda(devices=1)
    host.shared_memory._cuda_api, host.shared_memory._cuda_devices = fake, None
    return Clients(host, fe, fake)


async def _stop(c: Clients) -> None:
    c.host.shared_memory.unregister("CUDA")
    await c.host.stop()
    assert c.fake.open_count == 0  # every region unmapped: no lease was left behind


async def _hold(c: Clients) -> int:
    """A batch (arena input, alone in its frame) that holds the model's one instance until the gate."""
    held = c.fe.infer("m", np.full((1, 4), HELD, np.float32))
    await asyncio.get_running_loop().run_in_executor(None, Doubling.started.wait, 10)
    return held


def _xs(n: int, seed: int) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 1, (2, 4)).astype(np.float32) for _ in range(n)]


async def test_cuda_shm_requests_of_a_frame_are_one_entry_read_and_written_where_they_lie(repo) -> None:
    c = await _clients(repo)
    try:
        held = await _hold(c)
        xs = _xs(6, 0)
        ids = [c.infer(k, x) for k, x in enumerate(xs)]  # six clients, one frame
        await asyncio.sleep(0.05)
        assert c.leases() == 12  # each member holds its two regions while queued
        Doubling.gate.set()
        answers = await c.wait_for(7)
        c.check_doubled(answers, ids, xs)  # the device's copy: the host result is zeros
        assert answers[held][0] == ""
        assert [len(msg[1]) for msg in c.fe.messages if msg[0] == m.RESULTS] == [6]
        assert OnDevice.pieces[1] == ["DeviceTensor"] * 6  # read where the clients wrote them
        blocks = OnDevice.blocks[1]
        assert len(blocks) == 6 and len(set(blocks)) == 6  # six clients' regions: no copy may span two
        stats = c.host.statistics.snapshot("m", "1")
        assert (stats.success.count, stats.inference_count, stats.execution_count) == (7, 13, 2)
        assert c.leases() == 0
    finally:
        await _stop(c)


async def test_a_member_that_fails_a_check_is_answered_alone_and_the_others_run_as_a_group(repo) -> None:
    c = await _clients(repo)
    try:
        held = await _hold(c)
        xs = _xs(5, 1)
        ids = [c.infer(k, x, out_bytes=16 if k == 1 else None, in_region="nowhere" if k == 3 else None)
               for k, x in enumerate(xs)]
        await asyncio.sleep(0.05)
        answers = c.answers()  # the two are answered before anything runs
        assert answers[ids[1]][0] == "INVALID_ARGUMENT" and "too small" in answers[ids[1]][1]
        assert answers[ids[3]][0] == "NOT_FOUND" and "'nowhere'" in answers[ids[3]][1]
        Doubling.gate.set()
        answers = await c.wait_for(6)
        for i in (0, 2, 4):
            assert answers[ids[i]] == ("", "")
            np.testing.assert_array_equal(c.output(ids[i]), 2 * xs[i])
        assert answers[held][0] == ""
        assert [len(msg[1]) for msg in c.fe.messages if msg[0] == m.RESULTS] == [3]
        assert c.leases() == 0
    finally:
        await _stop(c)


async def test_an_output_the_device_did_not_write_is_written_from_the_host_for_each_member(repo) -> None:
    c = await _clients(repo)
    try:
        held = await _hold(c)
        xs = _xs(4, 2)
        xs[2][:] = 7.0
        OnDevice.refuse = 7.0  # one member's rows are not copied by the device: the output comes back to the host
        ids = [c.infer(k, x) for k, x in enumerate(xs)]
        await asyncio.sleep(0.05)
        Doubling.gate.set()
        answers = await c.wait_for(5)
        c.check_doubled(answers, ids, xs)
        assert answers[held][0] == ""
        assert [len(msg[1]) for msg in c.fe.messages if msg[0] == m.RESULTS] == [4]
    finally:
        await _stop(c)


async def test_a_batch_takes_the_first_members_of_a_group_and_the_rest_keep_their_regions_until_they_run(
        repo) -> None:
    """A group that does not fit whole gives the batch its first members (the batcher's rule 2): those members'
    regions go back when their batch is answered, the others' stay held until their own batch is."""
    write_config(repo, "m", CONFIG.format(name="m", max_batch=8, batching="max_queue_delay_microseconds: 100"))
    c = await _clients(repo)
    try:
        held = await _hold(c)
        xs = _xs(6, 9)  # two rows each: four fit a batch
        xs[4][0, 0] = HELD2  # the batch of the two left over waits for the second gate
        ids = [c.infer(k, x) for k, x in enumerate(xs[:3])]
        await asyncio.sleep(0.05)
        ids += [c.infer(k, x) for k, x in enumerate(xs[3:], start=3)]  # the next frame: a second group of three
        await asyncio.sleep(0.05)
        assert c.leases() == 12
        Doubling.gate.set()
        await asyncio.get_running_loop().run_in_executor(None, Doubling.started2.wait, 10)
        assert len(await c.wait_for(5)) == 5  # the held one and the first four: their regions are back
        assert c.leases() == 4
        Doubling.gate2.set()
        answers = await c.wait_for(7)
        c.check_doubled(answers, ids, xs)
        assert answers[held][0] == ""
        assert [b.shape[0] for b in Doubling.batches] == [1, 8, 4]
        assert [len(msg[1]) for msg in c.fe.messages if msg[0] == m.RESULTS] == [3, 1, 2]
        assert OnDevice.pieces[1:] == [["DeviceTensor"] * 4, ["DeviceTensor"] * 2]
        assert all(len(set(b)) == len(b) for b in OnDevice.blocks[1:])
        assert c.leases() == 0
    finally:
        await _stop(c)


async def test_a_member_cancelled_in_the_queue_never_runs_and_its_group_still_does(repo) -> None:
    c = await _clients(repo)
    try:
        held = await _hold(c)
        xs = _xs(4, 3)
        ids = [c.infer(k, x) for k, x in enumerate(xs)]
        await asyncio.sleep(0.05)
        c.fe.link.send((m.CANCEL, ids[1]))
        answers = await c.wait_for(1)
        assert answers[ids[1]][0] == "CANCELLED"
        Doubling.gate.set()
        answers = await c.wait_for(5)
        for i in (0, 2, 3):
            assert answers[ids[i]] == ("", "")
            np.testing.assert_array_equal(c.output(ids[i]), 2 * xs[i])
        assert answers[held][0] == ""
        ran = np.concatenate(Doubling.batches[1:])
        assert ran.shape[0] == 6 and not any((ran == row).all(axis=1).any() for row in xs[1])
        np.testing.assert_array_equal(c.output(ids[1]), 0)  # never written
        assert c.leases() == 0
    finally:
        await _stop(c)


async def test_a_member_whose_deadline_passes_in_the_queue_gives_its_regions_back_and_the_others_run(repo) -> None:
    c = await _clients(repo)
    try:
        held = await _hold(c)
        xs = _xs(4, 6)
        now = time.monotonic()
        ids = [c.infer(k, x, deadline=now + (0.1 if k == 0 else 60)) for k, x in enumerate(xs)]
        answers = await c.wait_for(1)
        assert answers[ids[0]][0] == "DEADLINE_EXCEEDED"
        await asyncio.sleep(0.05)
        assert c.leases() == 6  # the three queued again hold their regions; the expired one gave its two back
        Doubling.gate.set()
        answers = await c.wait_for(5)
        for k in (1, 2, 3):
            assert answers[ids[k]] == ("", "")
            np.testing.assert_array_equal(c.output(ids[k]), 2 * xs[k])
        np.testing.assert_array_equal(c.output(ids[0]), 0)  # never ran
        assert answers[held][0] == ""
        assert [len(msg[1]) for msg in c.fe.messages if msg[0] == m.RESULTS] == [3]
        assert c.leases() == 0
    finally:
        await _stop(c)


async def test_a_group_whose_front_end_went_away_never_runs_and_gives_its_regions_back(repo) -> None:
    c = await _clients(repo)
    try:
        await _hold(c)
        for k, x in enumerate(_xs(5, 4)):
            c.infer(k, x)
        await asyncio.sleep(0.05)
        assert c.leases() == 10
        c.fe.link.close()  # the front end's process died
        await asyncio.sleep(0.05)
        Doubling.gate.set()
        await asyncio.sleep(0.2)
        assert [b.shape[0] for b in Doubling.batches] == [1]
        assert c.leases() == 0
    finally:
        await _stop(c)


async def test_without_device_tensors_cuda_shm_requests_run_one_by_one(repo) -> None:
    """A backend that does not take device tensors gets host copies, request by request, as before."""
    c = await _clients(repo, Doubling)
    try:
        held = await _hold(c)
        xs = _xs(3, 5)
        ids = [c.infer(k, x) for k, x in enumerate(xs)]
        await asyncio.sleep(0.05)
        Doubling.gate.set()
        answers = await c.wait_for(4)
        c.check_doubled(answers, ids, xs)
        assert answers[held][0] == ""
        assert not [msg for msg in c.fe.messages if msg[0] == m.RESULTS]
        assert [b.shape[0] for b in Doubling.batches] == [1, 6]  # still batched together, as three requests
    finally:
        await _stop(c)


async def _round(c: Clients, xs: List[np.ndarray], **infer) -> Tuple[List[int], Dict[int, Tuple[str, str]]]:
    """One request per client, queued behind a held batch so they are read as one frame; their answers."""
    before = len(c.answers())
    held = await _hold(c)
    ids = [c.infer(k, x, **infer) for k, x in enumerate(xs)]
    await asyncio.sleep(0.05)
    Doubling.gate.set()
    answers = await c.wait_for(before + len(xs) + 1)
    assert answers[held][0] == ""
    Doubling.started.clear()
    Doubling.gate.clear()
    return ids, answers


async def test_a_clients_next_request_over_the_same_windows_is_checked_from_memory(repo) -> None:
    c = await _clients(repo)
    try:
        checks = c.host.core._groups._members
        for seed in (10, 11, 12):
            xs = _xs(5, seed)
            if seed == 12:
                xs[3][:] = 7.0
                OnDevice.refuse = 7.0  # the host writes this member's output: through its remembered output window
            ids, answers = await _round(c, xs)
            c.check_doubled(answers, ids, xs)
            assert c.leases() == 0
        assert checks.remembered_hits == 10  # the first round checked each member, the later two remembered
        assert [len(msg[1]) for msg in c.fe.messages if msg[0] == m.RESULTS] == [5, 5, 5]
    finally:
        await _stop(c)


async def test_a_window_registered_again_is_checked_again(repo) -> None:
    """Remembered checks go with any registration: a region unregistered, or registered again smaller under the
    same name, fails its member's next request with the error a first check gives."""
    c = await _clients(repo)
    try:
        ids, answers = await _round(c, _xs(4, 20))
        assert all(answers[i] == ("", "") for i in ids)
        c.host.shared_memory.unregister("CUDA", "out1")
        c.region("out1", 16)  # room for one of the two rows the client still names
        c.host.shared_memory.unregister("CUDA", "in3")
        xs = _xs(4, 21)
        ids, answers = await _round(c, xs)
        assert answers[ids[1]][0] == "INVALID_ARGUMENT" and "past the end of CUDA shared memory region 'out1' (16 " \
            "bytes)" in answers[ids[1]][1]
        assert answers[ids[3]][0] == "NOT_FOUND" and "'in3' was unregistered" in answers[ids[3]][1]
        for k in (0, 2):
            assert answers[ids[k]] == ("", "")
            np.testing.assert_array_equal(c.output(ids[k]), 2 * xs[k])
        assert c.host.core._groups._members.remembered_hits == 0
        assert c.leases() == 0
    finally:
        await _stop(c)


def test_regions_are_leased_again_only_while_nothing_was_registered_or_unregistered() -> None:
    from trtserve.server.engine.shm.registry import SharedMemoryRegistry

    fake = FakeCuda(devices=1)
    reg = SharedMemoryRegistry(fake)
    reg.register_cuda("a", fake.allocate(64), 0, 64)
    generation = reg.generation
    a = reg.acquire("a", "input")
    assert reg.lease([a, a], generation) and a.leases == 3
    reg.release([a, a, a])
    reg.register_cuda("b", fake.allocate(64), 0, 64)
    assert not reg.lease([a], generation) and a.leases == 0
    generation = reg.generation
    reg.unregister("CUDA", "missing")  # nothing was unregistered: nothing changes
    assert reg.generation == generation
    reg.unregister("CUDA", "a")
    assert reg.generation != generation and not reg.lease([a], generation)
    reg.close()
    assert fake.open_count == 0


def test_which_requests_are_alike_by_where_their_tensors_lie() -> None:
    def msg(inputs: tuple, outputs: tuple) -> tuple:
        return (m.INFER, 1, "m", "", 1, inputs, outputs, 2, 0, 0, None, 0, None)

    arena_in = ("INPUT0", "FP32", (2, 4), (m.ARENA, 0, 32))
    shm_in = ("INPUT0", "FP32", (2, 4), (m.SHM, "in", 0, 32))
    arena_out = ("OUTPUT0", None, (64, 32))
    shm_out = ("OUTPUT0", ("out", 0, 32), None)
    assert group.key(msg((arena_in,), (arena_out,)))[-1] == m.ARENA
    assert group.key(msg((shm_in,), (shm_out,)))[-1] == m.SHM
    assert group.in_shared_memory(msg((shm_in,), (shm_out,)))
    assert group.key(msg((shm_in,), (arena_out,))) is None  # the output would come in the response
    assert group.key(msg((arena_in,), (shm_out,))) is None
    assert group.key(msg((shm_in,), ())) is None  # no output asked for: every output comes in the response
    two = ("INPUT1", "FP32", (2, 4), (m.ARENA, 32, 32))
    assert group.key(msg((shm_in, two), (shm_out,))) is None
    assert group.key(msg((shm_in,), (shm_out,))) != group.key(msg((arena_in,), (arena_out,)))


async def test_the_front_end_answers_a_results_message_of_shared_memory_outputs() -> None:
    client, engine, sent, arena = engine_client()
    futures = [client.submit(("m", "", 1, (), (), 2, 0, 0, None, 0, None), None) for _ in range(2)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    engine.send((m.RESULTS, tuple(msg[1] for msg in sent), (("OUTPUT0", "FP32", (2, 4), None, 0),)))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    for _req_id, fut in futures:
        assert await fut == (("OUTPUT0", "FP32", (2, 4), (m.SHM,)),)
    arena.close()

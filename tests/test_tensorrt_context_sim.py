"""InstanceContext's two-batches-in-flight logic on the CPU, against a simulated CUDA stream and TensorRT context.

The real thing runs in tests/gpu (on the GPU machine only). Here every stream operation is *deferred*: a
memcpyAsync or an execute_async_v3 is queued and runs only when something waits for the stream (an event's
synchronize, a stream synchronize), reading its source memory then, as a GPU would. So a pinned mirror reused
before the previous batch's copies ran, an output read before its event, or shapes taken from the context at
the wrong time give wrong numbers here, on the CI machine, instead of only on a GPU."""
from __future__ import annotations

import ctypes
import threading
import types
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest

from trtserve.server.engine.backends.base import DeviceDestination, Gather, MemberDestinations, PieceColumns, ShapeRange
from trtserve.server.engine.backends.tensorrt import compat
from trtserve.server.engine.backends.tensorrt.context import InstanceContext
from trtserve.server.engine.backends.tensorrt.engine import EngineInfo, IOTensor
from trtserve.server.errors import Internal, InvalidArgument
from trtserve.server.engine.backends.tensorrt import pieces, staging
from trtserve.server.engine.backends.base import DeviceTensor

N_IN, N_OUT, MAX_ROWS = 8, 8, 16


class SimStream:
    """A CUDA stream whose work runs in order, only when waited for."""

    registry: Dict[int, "SimStream"] = {}

    def __init__(self, non_blocking: bool = True) -> None:
        self.ops: List[Callable[[], None]] = []
        self.lock = threading.Lock()
        self.ptr = id(self)
        self.captured: Optional[List[Callable[[], None]]] = None  # between begin_capture and end_capture
        SimStream.registry[self.ptr] = self

    def enqueue(self, op: Callable[[], None]) -> None:
        with self.lock:
            (self.ops if self.captured is None else self.captured).append(op)

    def begin_capture(self, mode: int = 0) -> None:
        self.captured = []

    def end_capture(self) -> "SimGraph":
        ops, self.captured = self.captured, None
        return SimGraph(ops or [])

    def run_until(self, marker: object = None) -> None:
        with self.lock:
            while self.ops:
                op = self.ops.pop(0)
                op()
                if marker is not None and op is marker:
                    return

    def synchronize(self) -> None:
        self.run_until()


class SimGraph:
    """A captured sequence of stream operations, replayed as it was captured (addresses and shapes included)."""

    def __init__(self, ops: List[Callable[[], None]]) -> None:
        self.ops = ops

    def launch(self, stream: SimStream) -> None:
        for op in self.ops:
            stream.enqueue(op)


class SimEvent:
    def __init__(self, *a: object, **k: object) -> None:
        self.block = bool(k.get("block", False))  # cudaEventBlockingSync: a wait sleeps instead of spinning
        self._stream: SimStream = None  # type: ignore[assignment]
        self._marker: Callable[[], None] = lambda: None

    def record(self, stream: SimStream) -> None:
        def marker() -> None:
            pass
        self._stream, self._marker = stream, marker
        stream.enqueue(marker)

    def synchronize(self) -> None:
        self._stream.run_until(self._marker)


class _Mem:
    def __init__(self, size: int) -> None:
        self._buf = np.zeros(size + 256, np.uint8)
        base = self._buf.ctypes.data
        self.ptr = base + (-base % 256)  # cudaMalloc-like alignment


def make_cupy(fail_compile: bool = False, driver: bool = True) -> types.ModuleType:
    """A CuPy stand-in; ``cuda.copies`` records every memcpyAsync (dst, src, bytes, kind), ``cuda.strided`` every
    memcpy2DAsync (dst, dpitch, src, spitch, width, height, kind), ``cuda.launches`` every kernel launch (first
    table row, pieces), and ``cuda.locked`` holds the (start, end) host ranges "registered" as page-locked.
    ``driver``: kernels have a function pointer and ``cuda.driver.launchKernel`` launches them, reading their
    parameters through the pointers it is given when called, as CUDA does (else only ``RawKernel`` calls work)."""
    copies: List[Tuple[int, int, int, int]] = []
    launches: List[Tuple[int, int]] = []
    strided: List[Tuple[int, int, int, int, int, int, int]] = []
    locked: List[Tuple[int, int]] = []

    def memcpy(dst: int, src: int, n: int, kind: int, sp: int) -> None:
        copies.append((dst, src, n, kind))
        SimStream.registry[sp].enqueue(lambda: ctypes.memmove(dst, src, n))

    def within_one(lo: int, hi: int) -> bool:
        return any(a <= lo and hi <= b for a, b in locked)

    def memcpy2d(dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: int, sp: int) -> None:
        if width > min(dpitch, spitch):
            raise RuntimeError("cudaErrorInvalidPitchValue")
        # CUDA checks a 2D copy's whole extent against the host registration it starts in
        for start, pitch in ((src, spitch), (dst, dpitch)):
            if within_one(start, start + 1) and not within_one(start, start + pitch * (height - 1) + width):
                raise RuntimeError("cudaErrorInvalidValue")
        strided.append((dst, dpitch, src, spitch, width, height, kind))

        def rows() -> None:
            for k in range(height):
                ctypes.memmove(dst + k * dpitch, src + k * spitch, width)
        SimStream.registry[sp].enqueue(rows)

    class RawKernel:
        """A kernel launch as the GPU would run it: pieces.py's copy kernel, reading its table from device memory
        when the stream reaches it (not when launched)."""

        def __init__(self, code: str, name: str) -> None:
            assert f"void {name}(" in code
            if fail_compile:
                raise RuntimeError("nvrtc: compilation failed")
            if driver:
                self.kernel = types.SimpleNamespace(ptr=id(self))
                kernels[id(self)] = self

        def compile(self) -> None:
            pass

        def __call__(self, grid: Tuple[int, int], block: Tuple[int], args: tuple, stream: SimStream) -> None:
            self.run(int(args[0]), int(args[1]), grid[1], stream)

        @staticmethod
        def run(table: int, first: int, count: int, stream: SimStream) -> None:
            launches.append((first, count))

            def run() -> None:
                rows = np.ctypeslib.as_array((ctypes.c_uint64 * (3 * (first + count))).from_address(table))
                for dst, src, n in rows.reshape(-1, 3)[first:]:
                    ctypes.memmove(int(dst), int(src), int(n))
            stream.enqueue(run)

    kernels: Dict[int, RawKernel] = {}

    def launch_kernel(f: int, gx: int, gy: int, gz: int, bx: int, by: int, bz: int, shared: int, sp: int,
                      params: int, extra: int) -> None:
        args = (ctypes.c_void_p * 2).from_address(params)
        table, first = ctypes.c_uint64.from_address(args[0]).value, ctypes.c_int32.from_address(args[1]).value
        kernels[f].run(table, first, gy, SimStream.registry[sp])

    def attributes(ptr: int) -> types.SimpleNamespace:
        if not any(lo <= ptr < hi for lo, hi in locked):
            raise RuntimeError("cudaErrorInvalidValue")  # what CUDA says of pageable memory
        return types.SimpleNamespace(type=1)

    def memset(ptr: int, value: int, n: int, sp: int) -> None:
        SimStream.registry[sp].enqueue(lambda: ctypes.memset(ptr, value, n))

    runtime = types.SimpleNamespace(
        memcpyHostToDevice=1, memcpyDeviceToHost=2, memcpyDeviceToDevice=3, memcpyDefault=4, memoryTypeHost=1,
        streamCaptureModeThreadLocal=1, getDevice=lambda: 0, setDevice=lambda d: None, memcpyAsync=memcpy,
        memcpy2DAsync=memcpy2d, memsetAsync=memset, pointerGetAttributes=attributes,
    )
    cuda = types.SimpleNamespace(Stream=SimStream, Event=SimEvent, runtime=runtime, copies=copies, strided=strided,
                                 driver=types.SimpleNamespace(launchKernel=launch_kernel) if driver else None,
                                 locked=locked, launches=launches,
                                 get_elapsed_time=lambda a, b: 0.001,
                                 alloc_pinned_memory=lambda size: bytearray(size))
    mod = types.ModuleType("cupy")
    mod.cuda = cuda  # type: ignore[attr-defined]
    mod.uint8 = np.uint8  # type: ignore[attr-defined]
    mod.empty = lambda size, dtype=None: types.SimpleNamespace(data=_Mem(size))  # type: ignore[attr-defined]
    mod.RawKernel = RawKernel  # type: ignore[attr-defined]
    return mod


def _uploaded_from(ctx, piece: np.ndarray) -> bool:
    """Whether a host-to-device copy read ``piece`` where it lies: a plain copy or one row of a strided one
    covers it."""
    lo, hi = piece.ctypes.data, piece.ctypes.data + piece.nbytes
    if any(src <= lo and hi <= src + n for _, src, n, kind in ctx.cuda.copies if kind == 1):
        return True
    return any(src + k * sp <= lo and hi <= src + k * sp + width
               for _, _, src, sp, width, height, kind in ctx.cuda.strided if kind == 1 for k in range(height))


def _array_at(ptr: int, shape: Tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_float * n).from_address(ptr)).reshape(shape)


class SimContext:
    """y = 2 * x + 1 over whatever shapes and addresses were set when execute_async_v3 was called."""

    def __init__(self) -> None:
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.addresses: Dict[str, int] = {}
        self.fail_execute = False

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        return True

    def set_input_shape(self, name: str, shape: Tuple[int, ...]) -> bool:
        if not (1 <= shape[0] <= MAX_ROWS and tuple(shape[1:]) == (N_IN,)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def infer_shapes(self) -> List[str]:
        return [] if "INPUT0" in self.shapes else ["INPUT0"]

    def get_tensor_shape(self, name: str) -> Tuple[int, ...]:
        return self.shapes[name] if name == "INPUT0" else (self.shapes["INPUT0"][0], N_OUT)

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_ptr: int) -> bool:
        if self.fail_execute:
            return False
        rows = self.shapes["INPUT0"][0]  # read now, at enqueue, as TensorRT does
        src, dst = self.addresses["INPUT0"], self.addresses["OUTPUT0"]

        def run() -> None:
            _array_at(dst, (rows, N_OUT))[:] = _array_at(src, (rows, N_IN)) * 2 + 1
        SimStream.registry[stream_ptr].enqueue(run)
        return True


def _open_instance(monkeypatch: pytest.MonkeyPatch, fail_compile: bool = False,
                   **options: object) -> Tuple[InstanceContext, SimContext]:
    """An opened two-slot instance of the simulated engine (y = 2x + 1) on the simulated CUDA."""
    cupy = make_cupy(fail_compile)
    monkeypatch.setattr(compat, "import_cupy", lambda: cupy)
    monkeypatch.setattr(staging, "_cupy", lambda: cupy)
    trt = types.SimpleNamespace(__version__="8.6.0")
    ctx = SimContext()
    engine = types.SimpleNamespace(create_execution_context=lambda *a: ctx)
    r = ShapeRange((1, N_IN), (8, N_IN), (MAX_ROWS, N_IN))
    info = EngineInfo(inputs=(IOTensor("INPUT0", True, "FP32", (-1, N_IN)),),
                      outputs=(IOTensor("OUTPUT0", False, "FP32", (-1, N_OUT)),), profiles=({"INPUT0": r},))
    inst = InstanceContext(trt, engine, info, 0, 0, 0, True, "model 'sim'", slots=2,  # type: ignore[arg-type]
                           **options)
    inst.open()
    ctx.cuda = cupy.cuda  # type: ignore[attr-defined]
    return inst, ctx


@pytest.fixture()
def instance(monkeypatch: pytest.MonkeyPatch):
    inst, ctx = _open_instance(monkeypatch)
    yield inst, ctx
    inst.close()


def _x(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, N_IN)).astype(np.float32)


def test_two_batches_in_flight_keep_their_own_staging_and_shapes(instance) -> None:
    inst, _ = instance
    sizes = [3, 16, 1, 9, 9, 4, 16, 2, 7, 11]
    pending: List[Tuple[np.ndarray, object]] = []
    done = 0
    for k, rows in enumerate(sizes):
        x = _x(rows, k)
        view = inst.staging({"INPUT0": x.shape})  # the batcher stacks into the slot's pinned mirror
        view["INPUT0"][:] = x
        pending.append((x, inst.enqueue(view, ["OUTPUT0"])))
        if len(pending) == 2:  # nothing has run yet: both batches wait on the simulated stream
            x0, ticket = pending.pop(0)
            np.testing.assert_array_equal(inst.collect(ticket).outputs["OUTPUT0"], x0 * 2 + 1)
            done += 1
    for x0, ticket in pending:
        np.testing.assert_array_equal(inst.collect(ticket).outputs["OUTPUT0"], x0 * 2 + 1)
        done += 1
    assert done == len(sizes)


def test_the_result_is_a_copy_that_a_later_batch_does_not_overwrite(instance) -> None:
    inst, _ = instance
    first = inst.run({"INPUT0": _x(4, 1)}, ["OUTPUT0"]).outputs["OUTPUT0"].copy()
    kept = inst.run({"INPUT0": _x(4, 1)}, ["OUTPUT0"]).outputs["OUTPUT0"]
    for k in range(4):  # both slots are reused twice over
        inst.run({"INPUT0": _x(4, 100 + k)}, ["OUTPUT0"])
    np.testing.assert_array_equal(kept, first)


def test_a_failed_enqueue_leaves_its_slot_free_and_the_next_batch_correct(instance) -> None:
    inst, ctx = instance
    a = inst.enqueue({"INPUT0": _x(5, 1)}, ["OUTPUT0"])
    ctx.fail_execute = True
    with pytest.raises(Internal, match=r"model 'sim' instance 0 \(profile 0\): execute_async_v3 failed"):
        inst.enqueue({"INPUT0": _x(6, 2)}, ["OUTPUT0"])
    ctx.fail_execute = False
    with pytest.raises(InvalidArgument, match=r"shape \[17, 8\] is outside profile 0"):
        inst.enqueue({"INPUT0": _x(17, 3)}, ["OUTPUT0"])
    b = inst.enqueue({"INPUT0": _x(6, 4)}, ["OUTPUT0"])  # the failed batches took no slot
    np.testing.assert_array_equal(inst.collect(a).outputs["OUTPUT0"], _x(5, 1) * 2 + 1)
    np.testing.assert_array_equal(inst.collect(b).outputs["OUTPUT0"], _x(6, 4) * 2 + 1)


def test_a_third_batch_waits_for_its_slot_until_the_first_is_collected(instance) -> None:
    inst, _ = instance
    a = inst.enqueue({"INPUT0": _x(2, 1)}, ["OUTPUT0"])
    b = inst.enqueue({"INPUT0": _x(3, 2)}, ["OUTPUT0"])
    third: Dict[str, object] = {}
    t = threading.Thread(target=lambda: third.update(ticket=inst.enqueue({"INPUT0": _x(4, 3)}, ["OUTPUT0"])))
    t.start()
    t.join(0.2)
    assert t.is_alive() and not third  # slot 0 still belongs to batch a
    np.testing.assert_array_equal(inst.collect(a).outputs["OUTPUT0"], _x(2, 1) * 2 + 1)
    t.join(5)
    assert not t.is_alive()
    np.testing.assert_array_equal(inst.collect(b).outputs["OUTPUT0"], _x(3, 2) * 2 + 1)
    np.testing.assert_array_equal(inst.collect(third["ticket"]).outputs["OUTPUT0"], _x(4, 3) * 2 + 1)


def test_device_pieces_and_device_destinations_land_on_their_rows(instance) -> None:
    """CUDA shared memory's path: a batch gathered from device pieces and host pieces, its outputs copied device to
    device into each request's region at that request's rows, all on the stream and in flight with another batch."""
    inst, _ = instance
    xs = [_x(3, 1), _x(2, 2), _x(4, 3)]
    regions = []
    for x in xs:  # requests 0 and 2 sit in "device memory", request 1 is a host array
        mem = _Mem(x.nbytes)
        _array_at(mem.ptr, x.shape)[:] = x
        regions.append(mem)
    pieces = (DeviceTensor(regions[0].ptr, xs[0].nbytes, xs[0].shape, np.dtype(np.float32), 0, "r0"), xs[1],
              DeviceTensor(regions[2].ptr, xs[2].nbytes, xs[2].shape, np.dtype(np.float32), 0, "r2"))
    batch = Gather(pieces, (9, N_IN), np.dtype(np.float32))
    outs = [_Mem(x.shape[0] * N_OUT * 4) for x in xs]
    dests = [DeviceDestination(0, 0, 3, {"OUTPUT0": (outs[0].ptr, 3 * N_OUT * 4)}),
             DeviceDestination(2, 5, 4, {"OUTPUT0": (outs[2].ptr, 4 * N_OUT * 4)})]
    other = inst.enqueue({"INPUT0": _x(7, 9)}, ["OUTPUT0"])  # a batch ahead of it on the same stream
    ticket = inst.enqueue({"INPUT0": batch}, ["OUTPUT0"], dests)  # type: ignore[dict-item]
    np.testing.assert_array_equal(inst.collect(other).outputs["OUTPUT0"], _x(7, 9) * 2 + 1)
    result = inst.collect(ticket)
    want = np.concatenate(xs) * 2 + 1
    np.testing.assert_array_equal(result.outputs["OUTPUT0"], want)
    assert result.delivered == {0: frozenset({"OUTPUT0"}), 2: frozenset({"OUTPUT0"})}
    np.testing.assert_array_equal(_array_at(outs[0].ptr, (3, N_OUT)), want[0:3])
    np.testing.assert_array_equal(_array_at(outs[2].ptr, (4, N_OUT)), want[5:9])


def test_outputs_every_row_of_which_has_a_destination_are_not_copied_to_the_host(instance) -> None:
    """Large outputs go from the device straight into each request's page-locked arena slot (or CUDA shared
    memory); when every row of an output went somewhere, nothing copies it to the host: the host result keeps
    its shape and type only."""
    inst, ctx = instance
    xs = [_x(3, 1), _x(5, 2)]
    outs = [np.zeros((x.shape[0], N_OUT), np.float32) for x in xs]  # stand-ins for arena slots
    dests = [DeviceDestination(0, 0, 3, {"OUTPUT0": (outs[0].ctypes.data, outs[0].nbytes)}),
             DeviceDestination(1, 3, 5, {"OUTPUT0": (outs[1].ctypes.data, outs[1].nbytes)})]
    ctx.cuda.copies.clear()
    result = inst.run({"INPUT0": np.concatenate(xs)}, ["OUTPUT0"], dests)
    assert result.delivered == {0: frozenset({"OUTPUT0"}), 1: frozenset({"OUTPUT0"})}
    np.testing.assert_array_equal(outs[0], xs[0] * 2 + 1)
    np.testing.assert_array_equal(outs[1], xs[1] * 2 + 1)
    host = result.outputs["OUTPUT0"]
    assert host.shape == (8, N_OUT) and host.dtype == np.float32 and not host.flags.writeable
    kinds = [k for _, _, _, k in ctx.cuda.copies]
    assert kinds == [1, 4, 4], kinds  # the input up, each request's rows out; no download of the whole output
    # a destination too small for its rows is left to the host path: the output is downloaded after all
    small = DeviceDestination(0, 0, 3, {"OUTPUT0": (outs[0].ctypes.data, outs[0].nbytes - 4)})
    result = inst.run({"INPUT0": xs[0]}, ["OUTPUT0"], [small])
    assert result.delivered == {}
    np.testing.assert_array_equal(result.outputs["OUTPUT0"], xs[0] * 2 + 1)


def test_host_pieces_in_page_locked_memory_are_copied_to_the_device_from_where_they_lie(instance) -> None:
    """A batch left in host pieces (large requests in the arena): a piece in page-locked memory is read by the
    device copy where it is, a pageable one goes through the slot's pinned mirror; both land on their rows."""
    inst, ctx = instance
    locked_piece, plain_piece = _x(4, 1), _x(2, 2)
    start = locked_piece.ctypes.data
    ctx.cuda.locked.append((start, start + locked_piece.nbytes))
    ctx.cuda.copies.clear()
    batch = Gather((locked_piece, plain_piece), (6, N_IN), np.dtype(np.float32))
    other = inst.enqueue({"INPUT0": _x(7, 9)}, ["OUTPUT0"])  # in flight ahead of it on the same stream
    ticket = inst.enqueue({"INPUT0": batch}, ["OUTPUT0"])  # type: ignore[dict-item]
    np.testing.assert_array_equal(inst.collect(other).outputs["OUTPUT0"], _x(7, 9) * 2 + 1)
    np.testing.assert_array_equal(inst.collect(ticket).outputs["OUTPUT0"],
                                  np.concatenate([locked_piece, plain_piece]) * 2 + 1)
    uploads = [(src, n) for _, src, n, kind in ctx.cuda.copies if kind == 1]
    assert (start, locked_piece.nbytes) in uploads
    assert all(src != plain_piece.ctypes.data for src, _ in uploads)  # copied into the mirror first


def test_batch_sizes_seen_before_reuse_their_output_shapes(instance, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under load the batch size changes every batch: each new input shape is set on the context every time,
    but its output shapes are asked of TensorRT only the first time."""
    inst, ctx = instance
    trt_ctx = inst._ctx
    asked: List[int] = []
    real = trt_ctx.infer_shapes
    monkeypatch.setattr(trt_ctx, "infer_shapes", lambda: asked.append(1) or real())
    for rows in (3, 5, 3, 5, 7, 3):
        x = _x(rows, rows)
        out = inst.run({"INPUT0": x}, ["OUTPUT0"]).outputs["OUTPUT0"]
        assert out.shape == (rows, N_OUT)
        np.testing.assert_array_equal(out, x * 2 + 1)
        assert trt_ctx.shapes["INPUT0"] == (rows, N_IN)  # set for this batch, not left at the last one's
    assert len(asked) == 3  # rows 3, 5 and 7


def test_page_locked_is_asked_of_cuda_once_per_memory_owner(instance, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests' inputs are views of their front end's arena: CUDA is asked whether the arena is page-locked once,
    not once per piece per batch, and pieces of a pageable owner still go through the pinned mirror."""
    inst, ctx = instance
    arena = np.zeros((64, N_IN), np.float32)  # one owner, like an arena's array of one dtype
    ctx.cuda.locked.append((arena.ctypes.data, arena.ctypes.data + arena.nbytes))
    pageable = np.zeros((64, N_IN), np.float32)
    asked: List[int] = []
    real = ctx.cuda.runtime.pointerGetAttributes
    monkeypatch.setattr(ctx.cuda.runtime, "pointerGetAttributes", lambda ptr: asked.append(ptr) or real(ptr))
    for first in (0, 8, 16):
        arena[first:first + 4] = _x(4, first)
        pageable[first:first + 2] = _x(2, first + 1)
        pieces = (arena[first:first + 2], arena[first + 2:first + 4], pageable[first:first + 2])
        ctx.cuda.copies.clear()
        out = inst.run({"INPUT0": Gather(pieces, (6, N_IN), np.dtype(np.float32))}, ["OUTPUT0"])  # type: ignore[dict-item]
        np.testing.assert_array_equal(out.outputs["OUTPUT0"], np.concatenate(pieces) * 2 + 1)
        # read where they lie (the two arena pieces are back to back: one copy), the third through the mirror
        assert _uploaded_from(ctx, pieces[0]) and _uploaded_from(ctx, pieces[1])
        assert not _uploaded_from(ctx, pieces[2])
    assert len(asked) == 2  # the arena once, the pageable owner once


@pytest.mark.parametrize("busy_wait", [False, True])
def test_the_wait_for_a_batch_sleeps_unless_busy_wait_is_set(monkeypatch: pytest.MonkeyPatch, busy_wait: bool) -> None:
    """The completion thread's wait is on each slot's "done" event: a blocking event unless trtserve.busy_wait (a
    spinning wait holds a core per instance); the other events only time the phases."""
    inst, _ = _open_instance(monkeypatch, busy_wait=busy_wait)
    try:
        assert [[e.block for e in slot] for slot in inst._events] == [[False, False, False, not busy_wait]] * 2
    finally:
        inst.close()


def test_members_at_one_distance_go_in_one_strided_copy_each_way_and_never_across_owners(instance) -> None:
    """Large requests of two front ends in one batch (engine/group.py): members whose blocks lie at one distance in
    their front end's arena are read in one strided copy and answered in one (backends/tensorrt/copies.py); a run
    never takes in a piece of another arena (CUDA refuses a 2D copy whose extent spans two registrations)."""
    inst, ctx = instance
    rows, block = 2, 64  # a member: 2 rows in, 2 rows out, in a block of 64 floats of its arena
    arenas = sorted((np.zeros(block * 8, np.float32) for _ in range(2)), key=lambda a: a.ctypes.data)
    for a in arenas:
        ctx.cuda.locked.append((a.ctypes.data, a.ctypes.data + a.nbytes))
    # (arena, block): one of the first arena, two of the second, two more of the first; the first two lie at some
    # distance, which a run starting there would take as its step
    places = [(0, 0), (1, 3), (1, 4), (0, 1), (0, 2)]
    xs = [_x(rows, 40 + k) for k in range(len(places))]
    pieces, dests = [], []
    for k, ((a, b), x) in enumerate(zip(places, xs)):
        start = b * block
        arenas[a][start:start + x.size] = x.ravel()
        pieces.append(arenas[a][start:start + x.size].reshape(rows, N_IN))
        slot = arenas[a][start + 32:start + 32 + rows * N_OUT]
        dests.append(DeviceDestination(a, k * rows, rows, {"OUTPUT0": (slot.ctypes.data, slot.nbytes)}))
    ctx.cuda.copies.clear()
    ctx.cuda.strided.clear()
    result = inst.run({"INPUT0": Gather(tuple(pieces), (rows * len(places), N_IN), np.dtype(np.float32))},
                      ["OUTPUT0"], dests)
    assert result.delivered == {0: frozenset({"OUTPUT0"}), 1: frozenset({"OUTPUT0"})}
    for (a, b), x in zip(places, xs):
        start = b * block + 32
        np.testing.assert_array_equal(arenas[a][start:start + rows * N_OUT].reshape(rows, N_OUT), x * 2 + 1)
    step = block * 4
    width_in, width_out = rows * N_IN * 4, rows * N_OUT * 4
    assert sorted((dp, sp, w, h, kind) for _, dp, _, sp, w, h, kind in ctx.cuda.strided) == [
        (width_in, step, width_in, 2, 1), (width_in, step, width_in, 2, 1),  # each pair's inputs up in one
        (step, width_out, width_out, 2, 4), (step, width_out, width_out, 2, 4)]  # and their outputs back in one
    assert [k for _, _, _, k in ctx.cuda.copies if k in (1, 4)] == [1, 4]  # the first member alone, both ways


def test_members_whose_memory_lies_apart_are_answered_one_copy_each_even_at_one_distance(instance) -> None:
    """A group of CUDA shared-memory requests (engine/group.py): each member's output region is another client's
    allocation, so its destinations each have their own block (DeviceDestination.block) and are copied one by one,
    even where the addresses happen to step by one distance (a 2D copy must not span two allocations)."""
    inst, ctx = instance
    rows, members = 2, 4
    outs = np.zeros((members, 64), np.float32)  # one distance apart, as separate allocations may well be
    ctx.cuda.locked.append((outs.ctypes.data, outs.ctypes.data + outs.nbytes))
    xs = [_x(rows, 60 + k) for k in range(members)]
    dests = [DeviceDestination(0, k * rows, rows, {"OUTPUT0": (outs[k].ctypes.data, rows * N_OUT * 4)}, -1 - k * rows)
             for k in range(members)]
    ctx.cuda.copies.clear()
    ctx.cuda.strided.clear()
    result = inst.run({"INPUT0": np.concatenate(xs)}, ["OUTPUT0"], dests)
    assert result.delivered == {0: frozenset({"OUTPUT0"})}
    for k, x in enumerate(xs):
        np.testing.assert_array_equal(outs[k][:rows * N_OUT].reshape(rows, N_OUT), x * 2 + 1)
    assert not [c for c in ctx.cuda.strided if c[-1] == 4]  # no 2D copy back
    assert sum(1 for _, _, _, k in ctx.cuda.copies if k == 4) == members  # one copy each
    same = [DeviceDestination(0, d.row_offset, d.rows, d.outputs) for d in dests]  # one block: a run forms
    ctx.cuda.copies.clear()
    ctx.cuda.strided.clear()
    inst.run({"INPUT0": np.concatenate(xs)}, ["OUTPUT0"], same)
    assert len([c for c in ctx.cuda.strided if c[-1] == 4]) == 1


def _cuda_shm_group(members: int, rows: int, seed: int) -> Tuple[Gather, List[DeviceDestination], List[np.ndarray],
                                                                   List[_Mem]]:
    """A group of CUDA shared-memory requests as the engine hands it over: each member's input and output in its own
    "device allocation", one destination per member, apart and on the device."""
    xs = [_x(rows, seed + k) for k in range(members)]
    ins, outs = [_Mem(x.nbytes) for x in xs], [_Mem(rows * N_OUT * 4) for _ in xs]
    for mem, x in zip(ins, xs):
        _array_at(mem.ptr, x.shape)[:] = x
    parts = tuple(DeviceTensor(m.ptr, x.nbytes, x.shape, np.dtype(np.float32), 0, f"r{k}")
                  for k, (m, x) in enumerate(zip(ins, xs)))
    dests = [DeviceDestination(0, k * rows, rows, {"OUTPUT0": (o.ptr, rows * N_OUT * 4)}, -1 - k * rows, True)
             for k, o in enumerate(outs)]
    return Gather(parts, (rows * members, N_IN), np.dtype(np.float32)), dests, xs, ins + outs


def test_a_group_in_cuda_shared_memory_is_copied_in_one_launch_each_way_with_two_batches_in_flight(instance) -> None:
    """Each member of a CUDA shared-memory group lies in its own allocation, so no copies merge: the batch's inputs
    go in one kernel launch and its outputs back in another (pieces.py), each reading a table that belongs to the
    batch's slot. Two batches are enqueued before either runs; each must still read its own table."""
    inst, ctx = instance
    first, second = _cuda_shm_group(5, 2, 10), _cuda_shm_group(6, 1, 50)
    ctx.cuda.copies.clear()
    a = inst.enqueue({"INPUT0": first[0]}, ["OUTPUT0"], first[1])  # type: ignore[dict-item]
    b = inst.enqueue({"INPUT0": second[0]}, ["OUTPUT0"], second[1])  # type: ignore[dict-item]
    assert ctx.cuda.launches == [(0, 5), (5, 5), (0, 6), (6, 6)]  # per batch: inputs, then outputs
    assert not [c for c in ctx.cuda.copies if c[3] in (3, 4)]  # no piece copied on its own
    assert [c[3] for c in ctx.cuda.copies] == [1, 1, 1, 1]  # the tables; every row went to a member: none down
    for ticket, (_, dests, xs, mems) in ((a, first), (b, second)):
        result = inst.collect(ticket)
        assert result.delivered == {0: frozenset({"OUTPUT0"})}
        for d, x in zip(dests, xs):
            np.testing.assert_array_equal(_array_at(d.outputs["OUTPUT0"][0], (x.shape[0], N_OUT)), x * 2 + 1)


def test_a_group_in_cuda_shared_memory_larger_than_the_buffer_is_refused_before_anything_is_copied(instance) -> None:
    """The server checks every batch's rows against the profile; the staging buffer checks its bytes again, so a
    group's pieces never write past it whatever reached it."""
    inst, ctx = instance
    batch, _, _, _ = _cuda_shm_group(MAX_ROWS + 1, 1, 90)
    ctx.cuda.copies.clear()
    inst._copier.begin(0)
    with pytest.raises(ValueError, match=f"tensor 'INPUT0': {(MAX_ROWS + 1) * N_IN * 4} bytes exceed"):
        inst._tensors["INPUT0"].gather(batch.parts, inst._stream, 0, inst._copier)
    assert not ctx.cuda.copies and not ctx.cuda.launches


def test_two_members_in_cuda_shared_memory_are_copied_one_by_one(instance) -> None:
    """Below pieces.MIN_PIECES a launch (a table upload and the kernel) saves no call."""
    inst, ctx = instance
    batch, dests, xs, _ = _cuda_shm_group(2, 3, 70)
    ctx.cuda.copies.clear()
    inst.run({"INPUT0": batch}, ["OUTPUT0"], dests)  # type: ignore[dict-item]
    assert not ctx.cuda.launches
    assert sorted(c[3] for c in ctx.cuda.copies) == [3, 3, 4, 4]
    for d, x in zip(dests, xs):
        np.testing.assert_array_equal(_array_at(d.outputs["OUTPUT0"][0], (3, N_OUT)), x * 2 + 1)


def test_without_the_copy_kernel_a_group_is_copied_piece_by_piece(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A CUDA toolchain that cannot build the kernel costs calls, never a model: the load says so and batches copy
    each piece on its own."""
    with caplog.at_level("WARNING", logger="trtserve.tensorrt"):
        inst, ctx = _open_instance(monkeypatch, fail_compile=True)
    assert "batched device copies unavailable (RuntimeError: nvrtc: compilation failed)" in caplog.text
    batch, dests, xs, _ = _cuda_shm_group(4, 2, 80)
    ctx.cuda.copies.clear()
    inst.run({"INPUT0": batch}, ["OUTPUT0"], dests)  # type: ignore[dict-item]
    assert sorted(c[3] for c in ctx.cuda.copies) == [3] * 4 + [4] * 4
    for d, x in zip(dests, xs):
        np.testing.assert_array_equal(_array_at(d.outputs["OUTPUT0"][0], (2, N_OUT)), x * 2 + 1)
    inst.close()


@pytest.mark.parametrize("driver", [True, False], ids=["cuLaunchKernel", "RawKernel"])
def test_a_batch_table_that_is_full_leaves_the_rest_to_plain_copies(driver: bool) -> None:
    cupy = make_cupy(driver=driver)
    copier = pieces.PieceCopier(cupy, slots=2, capacity=5)
    stream = SimStream()
    srcs, dsts = [_Mem(32) for _ in range(5)], [_Mem(32) for _ in range(5)]
    for k, m in enumerate(srcs):
        _array_at(m.ptr, (8,))[:] = k
    copier.begin(1)
    assert copier.copy([(d.ptr, s.ptr, 32, 0) for d, s in zip(dsts[:3], srcs[:3])], stream)
    assert not copier.copy([(d.ptr, s.ptr, 32, 0) for d, s in zip(dsts[2:], srcs[2:])], stream)  # 3 + 3 > 5
    assert not copier.copy([(dsts[3].ptr, srcs[3].ptr, 32, 0)] * 2, stream)  # too few to be worth a launch
    stream.synchronize()
    assert [int(_array_at(d.ptr, (8,))[0]) for d in dsts] == [0, 1, 2, 0, 0]
    copier.begin(0)  # the next batch starts its table again
    assert copier.copy([(d.ptr, s.ptr, 32, 0) for d, s in zip(dsts[2:], srcs[2:])], stream)
    stream.synchronize()
    assert [int(_array_at(d.ptr, (8,))[0]) for d in dsts] == [0, 1, 2, 3, 4]
    assert cupy.cuda.launches == [(0, 3), (0, 3)] and copier.launches == 2


@pytest.fixture()
def with_graphs(monkeypatch: pytest.MonkeyPatch):
    """The simulated instance with CUDA graphs captured for buckets 1, 2, 4, 8, 16 (graphs.capture imports cupy:
    here the stand-in)."""
    import sys

    inst, ctx = _open_instance(monkeypatch)
    monkeypatch.setitem(sys.modules, "cupy", staging._cupy())
    assert inst.capture_graphs(None) == (1, 2, 4, 8, 16)
    yield inst, ctx
    inst.close()


def test_a_group_in_cuda_shared_memory_replays_the_engine_graph_of_its_bucket(with_graphs) -> None:
    """Inputs already on the device have no host copy to replay: the batch copies them into the device buffer,
    zeroes the rows up to its bucket (as the host graphs pad theirs), replays the graph of the engine alone, and
    copies only its own rows out, while another batch of the other slot is in flight."""
    inst, ctx = with_graphs
    buffer = inst._tensors["INPUT0"]  # noqa: SLF001 - the padding rows are what is checked
    _array_at(buffer.ptr, (MAX_ROWS, N_IN))[:] = np.nan  # what earlier batches may have left there
    batch, dests, xs, _ = _cuda_shm_group(5, 2, 90)  # 10 rows: bucket 16
    other = inst.enqueue({"INPUT0": _x(3, 91)}, ["OUTPUT0"])  # host input: its slot's own graph
    ticket = inst.enqueue({"INPUT0": batch}, ["OUTPUT0"], dests)  # type: ignore[dict-item]
    assert inst.device_graph_replays == 1
    np.testing.assert_array_equal(inst.collect(other).outputs["OUTPUT0"], _x(3, 91) * 2 + 1)
    result = inst.collect(ticket)
    assert result.delivered == {0: frozenset({"OUTPUT0"})} and result.outputs["OUTPUT0"].shape == (10, N_OUT)
    for d, x in zip(dests, xs):
        np.testing.assert_array_equal(_array_at(d.outputs["OUTPUT0"][0], (2, N_OUT)), x * 2 + 1)
    np.testing.assert_array_equal(_array_at(buffer.ptr, (MAX_ROWS, N_IN))[10:], 0)  # padded with zeros
    np.testing.assert_array_equal(_array_at(buffer.ptr, (MAX_ROWS, N_IN))[:10], np.concatenate(xs))


def test_a_request_from_cuda_shared_memory_alone_replays_the_graph_and_returns_its_rows(with_graphs) -> None:
    """One request's device input (no destination: its output comes back through the host), then batches of
    other sizes: each replays its own bucket's graph and returns exactly its rows."""
    inst, _ = with_graphs
    for rows in (3, 1, 16, 7):
        x = _x(rows, 100 + rows)
        mem = _Mem(x.nbytes)
        _array_at(mem.ptr, x.shape)[:] = x
        t = DeviceTensor(mem.ptr, x.nbytes, x.shape, np.dtype(np.float32), 0, "r")
        np.testing.assert_array_equal(inst.run({"INPUT0": t}, ["OUTPUT0"]).outputs["OUTPUT0"], x * 2 + 1)  # type: ignore[dict-item]
    assert inst.device_graph_replays == 4


def _arena_group(arena: np.ndarray, blocks: List[int], rows: int, seed: int, block: int = 64,
                 room: Optional[List[int]] = None) -> Tuple[PieceColumns, Dict[str, Tuple[np.ndarray, np.ndarray]],
                                                            List[np.ndarray]]:
    """A group of large requests in one page-locked arena as the engine hands it over: its members' input pieces and
    output slots as columns (input at the start of each member's block of ``block`` floats, output slot 32 floats
    on)."""
    xs = [_x(rows, seed + k) for k in range(len(blocks))]
    base = arena.ctypes.data
    for b, x in zip(blocks, xs):
        arena[b * block:b * block + x.size] = x.ravel()
    starts = np.array([base + b * block * 4 for b in blocks], np.int64)
    pieces = lambda: tuple(arena[b * block:b * block + rows * N_IN].reshape(rows, N_IN) for b in blocks)  # noqa: E731
    rooms = np.array(room if room is not None else [rows * N_OUT * 4] * len(blocks), np.int64)
    return (PieceColumns(starts, np.full(len(blocks), id(arena), np.int64), rows * N_IN * 4, pieces),
            {"OUTPUT0": (starts + 32 * 4, rooms)}, xs)


def test_groups_given_as_columns_go_in_one_strided_copy_each_way_per_arena(instance) -> None:
    """Groups of large requests as the engine hands them over (columns: PieceColumns in, MemberDestinations out),
    two front ends' groups in one batch: each group's members lie at one distance in their arena, so each goes in
    one 2D copy each way, never spanning both arenas; every member's rows land in its slot and nothing is copied
    back to the host."""
    inst, ctx = instance
    rows, block = 2, 64
    arenas = sorted((np.zeros(block * 8, np.float32) for _ in range(2)), key=lambda a: a.ctypes.data)
    for a in arenas:
        ctx.cuda.locked.append((a.ctypes.data, a.ctypes.data + a.nbytes))
    one = _arena_group(arenas[0], [0, 1, 2], rows, 10)
    two = _arena_group(arenas[1], [3, 4], rows, 20)
    joined = PieceColumns.join([one[0], two[0]])
    assert joined is not None
    batch = Gather(None, (rows * 5, N_IN), np.dtype(np.float32), joined)
    dests = [MemberDestinations(0, 0, rows, 3, one[1]), MemberDestinations(1, 3 * rows, rows, 2, two[1])]
    other = inst.enqueue({"INPUT0": _x(7, 9)}, ["OUTPUT0"])  # a batch ahead of it on the same stream
    ctx.cuda.copies.clear()
    ctx.cuda.strided.clear()
    ticket = inst.enqueue({"INPUT0": batch}, ["OUTPUT0"], dests)  # type: ignore[dict-item]
    np.testing.assert_array_equal(inst.collect(other).outputs["OUTPUT0"], _x(7, 9) * 2 + 1)
    result = inst.collect(ticket)
    assert result.delivered == {0: frozenset({"OUTPUT0"}), 1: frozenset({"OUTPUT0"})}
    for arena, blocks, xs in ((arenas[0], [0, 1, 2], one[2]), (arenas[1], [3, 4], two[2])):
        for b, x in zip(blocks, xs):
            start = b * block + 32
            np.testing.assert_array_equal(arena[start:start + rows * N_OUT].reshape(rows, N_OUT), x * 2 + 1)
    step = block * 4
    width_in, width_out = rows * N_IN * 4, rows * N_OUT * 4
    assert sorted((dp, sp, w, h, kind) for _, dp, _, sp, w, h, kind in ctx.cuda.strided) == [
        (width_in, step, width_in, 2, 1), (width_in, step, width_in, 3, 1),  # each group's inputs up in one
        (step, width_out, width_out, 2, 4), (step, width_out, width_out, 3, 4)]  # and its outputs back in one
    assert not [c for c in ctx.cuda.copies if c[3] in (2, 4)]  # nothing back to the host, no copy on its own
    assert batch._parts is None  # the pieces were never made one by one


def test_a_member_whose_slot_is_too_small_is_left_to_the_host_and_the_others_still_get_their_rows(instance) -> None:
    """A group's output is delivered only if every member got it (columns: one room per member): a slot too small
    for its rows is never written past, the output then also goes back to the host (which the engine answers that
    member from), and the members that fit still got theirs from the device."""
    inst, ctx = instance
    rows, block = 2, 64
    arena = np.zeros(block * 8, np.float32)
    ctx.cuda.locked.append((arena.ctypes.data, arena.ctypes.data + arena.nbytes))
    pieces, outputs, xs = _arena_group(arena, [0, 1, 2], rows, 30, room=[rows * N_OUT * 4, rows * N_OUT * 4 - 4,
                                                                          rows * N_OUT * 4])
    result = inst.run({"INPUT0": Gather(None, (rows * 3, N_IN), np.dtype(np.float32), pieces)}, ["OUTPUT0"],
                      [MemberDestinations(0, 0, rows, 3, outputs)])
    assert result.delivered == {}
    np.testing.assert_array_equal(result.outputs["OUTPUT0"], np.concatenate(xs) * 2 + 1)  # downloaded after all
    for b, x in zip([0, 2], [xs[0], xs[2]]):
        np.testing.assert_array_equal(arena[b * block + 32:b * block + 32 + rows * N_OUT].reshape(rows, N_OUT),
                                      x * 2 + 1)
    assert not arena[block + 32:block + 32 + rows * N_OUT].any()  # the small slot was not written


def test_a_cuda_shared_memory_group_given_as_columns_is_answered_in_one_launch(instance) -> None:
    """A group of CUDA shared-memory requests with its destinations as columns (``apart``: each member's memory an
    allocation of its own): its outputs join the batch's one launch back, and each member's rows land in its own
    region."""
    inst, ctx = instance
    batch, dests, xs, _mems = _cuda_shm_group(5, 2, 70)
    columns = MemberDestinations(0, 0, 2, 5, {"OUTPUT0": ([d.outputs["OUTPUT0"][0] for d in dests],
                                                          [d.outputs["OUTPUT0"][1] for d in dests])}, apart=True)
    assert [(d.row_offset, d.block, d.on_device) for d in columns.members()] == \
        [(d.row_offset, d.block, d.on_device) for d in dests]  # taken apart, the same destinations
    ctx.cuda.copies.clear()
    ctx.cuda.launches.clear()
    result = inst.run({"INPUT0": batch}, ["OUTPUT0"], [columns])  # type: ignore[dict-item]
    assert ctx.cuda.launches == [(0, 5), (5, 5)]
    assert result.delivered == {0: frozenset({"OUTPUT0"})}
    for d, x in zip(dests, xs):
        np.testing.assert_array_equal(_array_at(d.outputs["OUTPUT0"][0], (x.shape[0], N_OUT)), x * 2 + 1)

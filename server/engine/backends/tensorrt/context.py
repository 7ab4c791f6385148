"""One instance: one IExecutionContext pinned to one profile for life, one non-default stream, fixed buffers.

A batch, all on the instance's stream: pack into pinned memory -> H2D -> ``set_input_shape`` for every input
-> ``infer_shapes() == []`` -> ``execute_async_v3`` -> D2H of the valid bytes -> event record. ``enqueue`` does
that and returns at once; ``collect`` (any thread) waits for the event and copies the outputs out. In between,
the next batch is enqueued behind it on the same stream, so the GPU goes from one batch to
the next without waiting for Python (Triton's TensorRT backend does the same with its completion thread and
rotating buffer sets). Each batch in flight owns one ``slot``: a pinned host mirror of every IO tensor and its
events; device buffers are shared, as the one stream orders every device read and write.
``set_tensor_address`` runs for every IO tensor once at open (the buffers never move, so re-setting them per
batch would only cost time), and shapes are set again only when they differ from the previous batch's
(re-setting an unchanged shape only repeats TensorRT's shape work, as Polygraphy notes); TensorRT reads shapes
and addresses at enqueue, so changing them while an earlier batch still runs is safe (tests/gpu enqueues
batch k+1 with another shape before collecting batch k, and both equal ONNX Runtime's). Every TensorRT return
value is checked and a failure names the tensor and the reason. With CUDA graphs on, a batch whose size has a
captured bucket replays the graph of its slot instead (inputs zero-padded to the bucket); a batch with inputs
already on the device (CUDA shared memory) replays the bucket's graph of the engine alone after copying them in.
A batch's device-to-device copies go as one kernel launch each way (pieces.py). One thread at a time calls
``staging`` and ``enqueue`` (the engine's loop, or the instance's own thread: base.py).
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from types import ModuleType
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from trtserve.dtypes import from_wire
from trtserve.server.engine.backends.base import (BatchResult, Destination, Gather, MemberDestinations, ShapeRange,
                                                  is_host)
from trtserve.server.errors import Internal, InvalidArgument, ModelLoadError
from trtserve.server.engine.backends.tensorrt import copies
from trtserve.server.engine.backends.tensorrt import graphs as graph_util
from trtserve.server.engine.backends.tensorrt import pieces
from trtserve.server.engine.backends.tensorrt.staging import StagedTensor, nbytes_of

from . import compat
from .engine import EngineInfo

log = logging.getLogger("trtserve.tensorrt")


# how long enqueue waits for a slot's earlier batch to be collected; far beyond any batch, so only a bug trips it
SLOT_WAIT_S = 300.0
_KNOWN_SHAPES = 1024  # input-shape keys whose output shapes an instance remembers (variable dims: bounded)


def _on_host(a: Any) -> bool:
    """A host array, or a batch left in host pieces (``Gather``)."""
    return is_host(a) or isinstance(a, Gather) and (a.columns is not None or all(is_host(p) for p in a.parts))


@functools.lru_cache(maxsize=256)  # read-only views of one zero: shared by every batch of the same shape
def _unread(shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The host result of an output that went only to destinations: its shape and type (which the answer
    reports) without its data, which nobody reads (every request was written where it asked)."""
    return np.broadcast_to(np.zeros((), dtype), shape)


class _Graph:
    """A captured batch of ``rows`` rows on one slot: replay = H2D + execute + D2H of exactly those shapes."""

    def __init__(self, rows: int, graph: Any, out_shapes: Dict[str, Tuple[int, ...]]) -> None:
        self.rows = rows
        self.graph = graph
        self.out_shapes = out_shapes


class InFlight:
    """One enqueued batch: what ``collect`` needs to wait for it and read it back."""

    __slots__ = ("slot", "out_shapes", "wanted", "t0", "t1", "graph", "delivered", "skipped")

    def __init__(self, slot: int, out_shapes: Dict[str, Tuple[int, ...]], wanted: Sequence[str], t0: int, t1: int,
                 graph: bool, delivered: Dict[int, frozenset], skipped: frozenset = frozenset()) -> None:
        self.slot = slot
        self.out_shapes = out_shapes
        self.wanted = wanted
        self.t0 = t0  # host ns: enqueue called
        self.t1 = t1  # host ns: inputs packed into pinned memory
        self.graph = graph
        self.delivered = delivered
        self.skipped = skipped  # outputs every row of which went to a destination: never copied to the host


def _sized(outputs: Mapping[str, Any], sizes: Mapping[str, Tuple[Any, int]]) -> Iterator[Tuple[str, Any, Any, int]]:
    """(name, where it goes, its buffer, bytes per row) of the outputs a destination names that the device writes
    (``sizes``: the batch's, see ``_to_devices``)."""
    for name, where in outputs.items():
        size = sizes.get(name)
        if size is not None:
            yield name, where, size[0], size[1]


class _Delivery:
    """What a batch's copies to destinations gather as ``_to_devices`` walks them."""

    __slots__ = ("delivered", "covered", "pending", "on_device")

    def __init__(self) -> None:
        self.delivered: Dict[int, frozenset] = {}  # request index -> outputs that reached every destination of it
        self.covered: Dict[str, int] = {}  # output -> rows copied to a destination
        self.pending: Dict[str, List[copies.Copy]] = {}  # output -> its other copies, in destination order
        self.on_device: List[copies.Copy] = []  # copies into device memory, every output's: one launch (pieces.py)

    def reached(self, request: int, names: frozenset) -> None:
        """A destination of ``request`` got ``names``: a group's members share its index, and what is delivered
        is what reached every member."""
        had = self.delivered.get(request)
        self.delivered[request] = names if had is None else had & names


class InstanceContext:
    """Instance ``index`` of a model, serving engine profile ``profile``, with ``slots`` batches in flight at most."""

    def __init__(
        self, trt: ModuleType, engine: Any, info: EngineInfo, index: int, profile: int, device_id: int,
        batched: bool, what: str, slots: int = 1, busy_wait: bool = False,
    ) -> None:
        self._trt = trt
        self._engine = engine
        self._info = info
        self.index = index
        self.profile = profile
        self._device_id = device_id
        self._batched = batched
        self._what = f"{what} instance {index} (profile {profile})"
        self._ranges: Mapping[str, ShapeRange] = info.profiles[profile]
        # what requests carry: the served type (INT64 for an INT32 engine input served as INT64: narrowed in ``pack``)
        self._in_dtypes = {t.name: from_wire(t.served_wire).numpy for t in info.inputs}
        # INT32 engine outputs served as INT64: widened after the copy back, never written device to device
        self._widened = {t.name: from_wire(t.served_wire).numpy for t in info.outputs if t.converted}
        self._narrowed = frozenset(t.name for t in info.inputs if t.converted)
        self._ctx: Any = None
        self._stream: Any = None
        self._activation: Any = None
        self._tensors: Dict[str, StagedTensor] = {}
        self.slots = max(1, slots)
        self._busy_wait = busy_wait
        self._next = 0  # the slot the next batch takes
        self._slot_free = [threading.Event() for _ in range(self.slots)]
        for e in self._slot_free:
            e.set()
        self._events: List[Tuple[Any, Any, Any, Any]] = []  # per slot
        self._graphs: Dict[Tuple[int, int], _Graph] = {}  # (rows, slot)
        self._buckets: Tuple[int, ...] = ()
        # per bucket, the engine alone (no host copies): for batches whose inputs already lie on the device
        self._device_graphs: Dict[int, _Graph] = {}
        self._device_buckets: Tuple[int, ...] = ()
        self.device_graph_replays = 0  # batches that replayed one (tests, benchmarks)
        self._cupy: Any = None
        self._copier: Optional[pieces.PieceCopier] = None  # a batch's device-to-device copies in one launch
        # input shapes last set on the context, and the output shapes TensorRT inferred for them
        self._shapes: Dict[str, Tuple[int, ...]] = {}
        self._out_shapes: Dict[str, Tuple[int, ...]] = {}
        self._known_out_shapes: Dict[tuple, Dict[str, Tuple[int, ...]]] = {}  # input shapes -> output shapes

    # ---- lifecycle ----

    def open(self) -> None:
        """Creates the context, pins its profile, allocates every buffer and sets every address once."""
        trt = self._trt
        cupy = self._cupy = compat.import_cupy()
        v = compat.trt_version(trt)
        self._stream = cupy.cuda.Stream(non_blocking=True)
        if compat.has_user_managed_profile_memory(v):
            # activation memory for this profile only (STATIC would size every context for all profiles)
            ctx = self._engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        else:
            ctx = self._engine.create_execution_context()
        if ctx is None:
            raise ModelLoadError(compat.with_trt_error(f"{self._what}: cannot create an execution context"))
        self._ctx = ctx
        try:
            ok = ctx.set_optimization_profile_async(self.profile, self._stream.ptr)
        except RuntimeError:
            ok = False
        if ok is False:
            msg = f"{self._what}: cannot select optimization profile {self.profile}"
            raise ModelLoadError(compat.with_trt_error(msg))
        self._stream.synchronize()
        if compat.has_user_managed_profile_memory(v):
            size = self._engine.get_device_memory_size_for_profile_v2(self.profile)
            self._activation = cupy.empty(max(size, 512), dtype=cupy.uint8)
            ctx.set_device_memory(self._activation.data.ptr, size)
        # output capacity: set every input to the profile max and let TensorRT infer the output shapes
        for t in self._info.inputs:
            self._set_shape(t.name, self._ranges[t.name].max, load=True)
        self._infer_shapes(load=True)
        for t in self._info.inputs:
            self._tensors[t.name] = StagedTensor(t.name, from_wire(t.wire).numpy, self._ranges[t.name].max,
                                                 self.slots)
        for t in self._info.outputs:
            shape = tuple(ctx.get_tensor_shape(t.name))
            if any(d < 0 for d in shape):
                raise ModelLoadError(
                    f"{self._what}: output '{t.name}' has data-dependent shape {list(shape)}; not supported"
                )
            self._tensors[t.name] = StagedTensor(t.name, from_wire(t.wire).numpy, shape, self.slots)
        self._set_addresses()
        if self._batched:  # a batch holds one request at most otherwise: nothing to copy in bulk
            rows = min(r.max[0] for r in self._ranges.values()) * len(self._tensors)  # one row per member and tensor
            self._copier = pieces.open_copier(cupy, self.slots, min(rows, pieces.MAX_TABLE_ROWS), self._what)
        # per slot, start / inputs copied / executed / done: timing events for the compute_* durations. The thread
        # that waits for "done" sleeps in the OS unless busy_wait: a spinning wait holds a core per instance, which
        # the front ends on the same host need more (trtserve.busy_wait)
        self._events = [tuple(cupy.cuda.Event(block=not self._busy_wait and i == 3) for i in range(4))
                        for _ in range(self.slots)]  # type: ignore

    def capture_graphs(self, explicit_buckets: Optional[Sequence[int]]) -> Tuple[int, ...]:
        """Captures one graph per batch bucket; returns the buckets captured (empty when not applicable)."""
        if not self._batched:
            return ()
        for name, r in self._ranges.items():
            if r.min[1:] != r.max[1:]:
                log.info("%s: input '%s' has variable non-batch dims; CUDA graphs off", self._what, name)
                return ()
        lo = max(r.min[0] for r in self._ranges.values())
        hi = min(r.max[0] for r in self._ranges.values())
        for rows in graph_util.bucket_sizes(lo, hi, explicit_buckets):
            graphs = self._capture(rows)
            if graphs is not None:
                self._graphs.update(((rows, slot), g) for slot, g in enumerate(graphs))
        self._buckets = tuple(sorted({rows for rows, _ in self._graphs}))
        self._device_buckets = tuple(sorted(self._device_graphs))
        self._shapes, self._out_shapes = {}, {}  # capture left the context at the last bucket's shapes
        return self._buckets

    def _capture(self, rows: int) -> Optional[List[_Graph]]:
        """One graph per slot (each copies through its own pinned mirror), or None if any capture fails."""
        ctx, stream = self._ctx, self._stream
        shapes = {t.name: (rows,) + tuple(self._ranges[t.name].max[1:]) for t in self._info.inputs}
        for name, shape in shapes.items():
            self._set_shape(name, shape, load=True)
        self._infer_shapes(load=True)
        out_shapes = {t.name: tuple(ctx.get_tensor_shape(t.name)) for t in self._info.outputs}
        if not ctx.execute_async_v3(stream.ptr):  # warm-up: the first enqueue after a shape change allocates
            log.warning("%s", compat.with_trt_error(f"{self._what}: warm-up for graph of {rows} rows failed"))
            return None
        stream.synchronize()
        in_bytes = {n: nbytes_of(s, self._tensors[n].dtype) for n, s in shapes.items()}
        out_bytes = {n: nbytes_of(s, self._tensors[n].dtype) for n, s in out_shapes.items()}
        graphs = []
        for slot in range(self.slots):
            def enqueue(slot: int = slot) -> None:
                for n, b in in_bytes.items():
                    self._tensors[n].upload(b, stream, slot)
                if not ctx.execute_async_v3(stream.ptr):
                    raise RuntimeError(compat.with_trt_error("execute_async_v3 returned False under capture"))
                for n, b in out_bytes.items():
                    self._tensors[n].download(b, stream, slot)

            graph = graph_util.capture(stream, enqueue, f"{self._what} graph of {rows} rows, slot {slot}")
            if graph is None:
                return None
            graphs.append(_Graph(rows, graph, out_shapes))

        def execute() -> None:
            if not ctx.execute_async_v3(stream.ptr):
                raise RuntimeError(compat.with_trt_error("execute_async_v3 returned False under capture"))

        # inputs from CUDA shared memory are copied device to device before it, and outputs where they are wanted
        # after it: no host copy to replay, so one graph serves every slot
        graph = graph_util.capture(stream, execute, f"{self._what} graph of {rows} rows on device inputs")
        if graph is not None:
            self._device_graphs[rows] = _Graph(rows, graph, out_shapes)
        return graphs

    def close(self) -> None:
        """Waits for the stream, then frees graphs, the context and buffers, in that order."""
        if self._stream is not None:
            try:
                self._stream.synchronize()
            except Exception as e:  # noqa: BLE001 - closing must go on
                log.warning("%s: stream synchronize at close failed: %s", self._what, e)
        self._graphs.clear()
        self._device_graphs.clear()
        self._copier = None
        self._ctx = None
        self._activation = None
        for t in self._tensors.values():
            t.free()
        self._tensors.clear()
        self._events = []
        self._stream = None

    # ---- checked TensorRT calls ----

    def _set_shape(self, name: str, shape: Tuple[int, ...], load: bool = False) -> None:
        if not self._ctx.set_input_shape(name, tuple(shape)):
            r = self._ranges[name]
            msg = compat.with_trt_error(
                f"{self._what}: set_input_shape('{name}', {list(shape)}) failed; profile {self.profile} allows "
                f"min {list(r.min)} max {list(r.max)}"
            )
            raise ModelLoadError(msg) if load else InvalidArgument(msg)

    def _infer_shapes(self, load: bool = False) -> None:
        missing = self._ctx.infer_shapes()
        if missing:
            msg = compat.with_trt_error(f"{self._what}: infer_shapes left {list(missing)} unspecified")
            raise ModelLoadError(msg) if load else Internal(msg)

    def _set_addresses(self) -> None:
        for name, t in self._tensors.items():
            if t.ptr == 0:  # cannot happen (StagedTensor allocates >= 512 bytes); kept as the seed-(a) guard
                raise Internal(f"{self._what}: tensor address for '{name}' is 0 (TensorRT would fail 'bindings[x]')")
            if not self._ctx.set_tensor_address(name, t.ptr):
                raise Internal(compat.with_trt_error(f"{self._what}: set_tensor_address('{name}') failed"))

    # ---- one batch ----

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> Optional[int]:
        """Names, dtypes and shapes against this instance's profile; returns the batch rows (None if unbatched)."""
        expected = [t.name for t in self._info.inputs]
        missing = [n for n in expected if n not in inputs]
        extra = sorted(set(inputs) - set(expected))
        if missing or extra:
            raise InvalidArgument(
                f"{self._what}: inputs {sorted(inputs)} do not match the model's {expected}"
                + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else "")
            )
        rows: Optional[int] = None
        for t in self._info.inputs:
            a = inputs[t.name]
            want = self._in_dtypes[t.name]
            if a.dtype != want:
                raise InvalidArgument(
                    f"{self._what}: input '{t.name}': datatype {a.dtype} does not match the model's {t.served_wire} "
                    f"({want})"
                )
            r = self._ranges[t.name]
            if not r.contains(tuple(a.shape)):
                raise InvalidArgument(
                    f"{self._what}: input '{t.name}': shape {list(a.shape)} is outside profile {self.profile} "
                    f"(min {list(r.min)}, max {list(r.max)})"
                )
            if self._batched:
                if rows is not None and a.shape[0] != rows:
                    raise InvalidArgument(f"{self._what}: input '{t.name}' has {a.shape[0]} rows, other inputs {rows}")
                rows = int(a.shape[0])
        return rows

    def staging(self, shapes: Mapping[str, Tuple[int, ...]]) -> Optional[Dict[str, np.ndarray]]:
        """Views of the pinned input buffers with these shapes (None if any does not fit): the batcher stacks
        into them and ``pack`` then finds the data already in place."""
        if any(name not in self._tensors or not self._ranges[name].contains(tuple(shape))
               for name, shape in shapes.items()):
            return None
        slot = self._next
        self._wait_slot(slot)  # its previous batch may still be copying out of that mirror
        # narrowed inputs are stacked in their served type and converted by ``pack``
        return {name: self._tensors[name].view(tuple(shape), slot) for name, shape in shapes.items()
                if name not in self._narrowed}

    def _wait_slot(self, slot: int) -> None:
        if not self._slot_free[slot].wait(SLOT_WAIT_S):
            raise Internal(f"{self._what}: slot {slot}'s previous batch was not collected within {SLOT_WAIT_S:.0f} s")

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str],
            destinations: Sequence[Destination] = ()) -> BatchResult:
        """One batch, start to end: ``collect(enqueue(...))``."""
        return self.collect(self.enqueue(inputs, outputs, destinations))

    def enqueue(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str],
                destinations: Sequence[Destination] = ()) -> InFlight:
        """Checks and enqueues one batch on the stream without waiting for it; one caller thread at a time.
        ``destinations``: requests' rows of outputs copied device to device into their
        CUDA shared memory, on this stream. Waits first if the next slot's batch is still in flight."""
        t0 = time.perf_counter_ns()
        rows = self.check_inputs(inputs)
        wanted = list(outputs) or [t.name for t in self._info.outputs]
        out_names = {t.name for t in self._info.outputs}
        unknown = [n for n in wanted if n not in out_names]
        if unknown:
            raise InvalidArgument(f"{self._what}: unknown output(s) {unknown}; outputs: {sorted(out_names)}")
        cupy = self._cupy
        if cupy.cuda.runtime.getDevice() != self._device_id:  # the calling thread's current device
            cupy.cuda.runtime.setDevice(self._device_id)
        slot = self._next
        self._wait_slot(slot)
        try:
            out_shapes, t1, graph, delivered, skipped = self._enqueue(inputs, rows, wanted, destinations, slot)
        except BaseException:
            self._shapes, self._out_shapes = {}, {}
            self._drain()  # nothing may still read the pinned buffers when the next batch packs them
            raise
        self._slot_free[slot].clear()
        self._next = (slot + 1) % self.slots
        return InFlight(slot, out_shapes, wanted, t0, t1, graph, delivered, skipped)

    def wait(self, batch: InFlight) -> bool:
        """Blocks (without the GIL) until the batch is done on the device; ``collect`` then finds it done. A failure
        is left to ``collect``, which waits again and reports it."""
        try:
            self._events[batch.slot][3].synchronize()
        except Exception:  # noqa: BLE001 - collect raises it, with the batch's context
            pass
        return True

    def collect(self, batch: InFlight) -> BatchResult:
        """Waits for an enqueued batch and returns its outputs; any thread, once per ``enqueue``, in order."""
        ev_start, ev_in, ev_exec, ev_done = self._events[batch.slot]
        elapsed = self._cupy.cuda.get_elapsed_time
        try:
            ev_done.synchronize()  # releases the GIL while it waits
            if batch.graph:
                in_ns, exec_ns, out_ns = 0, int(elapsed(ev_start, ev_done) * 1e6), 0
            else:
                in_ns = int(elapsed(ev_start, ev_in) * 1e6)
                exec_ns = int(elapsed(ev_in, ev_exec) * 1e6)
                out_ns = int(elapsed(ev_exec, ev_done) * 1e6)
            t2 = time.perf_counter_ns()
            result = {name: self._tensors[name].result(batch.out_shapes[name], batch.slot, self._widened.get(name))
                      if name not in batch.skipped else _unread(batch.out_shapes[name], self._tensors[name].dtype)
                      for name in batch.wanted}
            t3 = time.perf_counter_ns()
        except Exception as e:
            raise Internal(f"{self._what}: waiting for the batch on the GPU failed: {type(e).__name__}: {e}") from e
        finally:
            self._slot_free[batch.slot].set()
        return BatchResult(
            outputs=result,
            compute_input_ns=(batch.t1 - batch.t0) + in_ns,
            compute_infer_ns=exec_ns,
            compute_output_ns=out_ns + (t3 - t2),
            delivered=batch.delivered,
        )

    def _drain(self) -> None:
        try:
            self._stream.synchronize()
        except Exception as e:  # noqa: BLE001 - report the original error, log this one
            log.error("%s: stream synchronize after a failed batch: %s", self._what, e)

    def _to_devices(self, destinations: Sequence[Destination], out_shapes: Mapping[str, Tuple[int, ...]],
                    stream: Any) -> Tuple[Dict[int, frozenset], frozenset]:
        """Enqueues copies of each destination's rows of each output (device memory or page-locked host memory:
        CUDA tells which from the address); returns what went where, and the outputs whose every row went to a
        destination (nothing else reads those, so they need no copy to the host). The copies of one output go
        in as few calls as their addresses allow (copies.py), and copies into device memory in one launch where
        the copier takes them (pieces.py)."""
        rt = self._cupy.cuda.runtime
        out = _Delivery()
        sizes: Dict[str, Tuple[Any, int]] = {}  # output -> (its buffer, bytes per row); once per batch, not per member
        for name, shape in out_shapes.items():
            if name not in self._widened:  # widened on the host; the server writes it there
                t = self._tensors[name]
                sizes[name] = (t, nbytes_of(tuple(shape[1:]), t.dtype) if self._batched else nbytes_of(shape, t.dtype))
        for d in destinations:
            if type(d) is MemberDestinations:
                self._members_to_devices(d, sizes, out, rt, stream)
                continue
            into = out.on_device if d.on_device else None
            done = []
            for name, (ptr, room), t, row_bytes in _sized(d.outputs, sizes):
                n = d.rows * row_bytes if self._batched else row_bytes
                start = d.row_offset * row_bytes if self._batched else 0
                if n > room or start + n > t.capacity:  # the server checked sizes; never write past a region
                    continue
                if n:
                    # a request's destinations lie in one block (a group's members in their front end's arena)
                    # unless it says otherwise; another request's may be anywhere
                    (out.pending.setdefault(name, []) if into is None else into).append(
                        (ptr, t.ptr + start, n, d.request if d.block is None else d.block))
                done.append(name)
                out.covered[name] = out.covered.get(name, 0) + (d.rows if self._batched else 1)
            out.reached(d.request, frozenset(done))
        plain = list(out.pending.values())
        on_device = out.on_device
        if on_device and (self._copier is None or not self._copier.copy(on_device, stream)):
            plain.append(on_device)
        for wanted in plain:
            copies.enqueue(rt, wanted, rt.memcpyDefault, stream.ptr)
        whole = {n: (shape[0] if self._batched else 1) for n, shape in out_shapes.items()}
        return ({i: names for i, names in out.delivered.items() if names},
                frozenset(n for n, c in out.covered.items() if c >= whole[n] > 0))

    def _members_to_devices(self, d: MemberDestinations, sizes: Mapping[str, Tuple[Any, int]], out: "_Delivery",
                            rt: Any, stream: Any) -> None:
        """``_to_devices`` for a group's members given as columns. Members in one arena: each output's copies worked
        out with array arithmetic, a run at one distance in one call. Members apart (each in its own device
        allocation, so no two copies merge): each copy joins the batch's one launch."""
        count = d.count
        done = []
        for name, (ptrs, rooms), t, row_bytes in _sized(d.outputs, sizes):
            n = d.rows * row_bytes
            if d.apart:
                got = 0
                for k in range(count):
                    row = d.row_offset + k * d.rows
                    start = row * row_bytes
                    if n <= rooms[k] and start + n <= t.capacity:  # never write past a region
                        if n:
                            out.on_device.append((ptrs[k], t.ptr + start, n, -1 - row))  # a block of its own
                        got += 1
            else:
                starts = (d.row_offset + np.arange(count, dtype=np.int64) * d.rows) * row_bytes
                fits = (rooms >= n) & (starts + n <= t.capacity)  # the server checked sizes; never write past a slot
                got = int(fits.sum())
                if n and got:
                    dst, src = (ptrs, starts + t.ptr) if got == count else (ptrs[fits], starts[fits] + t.ptr)
                    copies.enqueue_columns(rt, dst, src, n, np.full(got, d.request, np.int64), rt.memcpyDefault,
                                           stream.ptr)
            if got == count:
                done.append(name)
            out.covered[name] = out.covered.get(name, 0) + got * d.rows
        out.reached(d.request, frozenset(done))

    def _captured_dims(self, inputs: Mapping[str, Any]) -> bool:
        """Whether every input has the profile's largest dims after the batch's: the shapes graphs are captured with
        (``_capture``), so a batch of a bucket's rows at most can replay one."""
        return all(tuple(a.shape[1:]) == self._ranges[n].max[1:] for n, a in inputs.items())

    def _to_device(self, inputs: Mapping[str, Any], stream: Any, slot: int) -> int:
        """Enqueues every input's copy into its device buffer (host arrays through the slot's pinned mirror, device
        pieces device to device) after the batch's start event; returns when host packing ended (ns)."""
        sizes = {name: self._tensors[name].pack(a, slot=slot) for name, a in inputs.items() if is_host(a)}
        t1 = time.perf_counter_ns()
        self._events[slot][0].record(stream)
        for name, n in sizes.items():
            self._tensors[name].upload(n, stream, slot)
        for name, a in inputs.items():
            if not is_host(a):  # pieces (CUDA shared memory, or large requests in an arena): each to its rows
                t = self._tensors[name]
                columns = a.columns if isinstance(a, Gather) else None
                if columns is not None and a.dtype == t.dtype:
                    t.gather_columns(columns, stream)
                else:
                    t.gather(a.parts if isinstance(a, Gather) else (a,), stream, slot, self._copier)
        return t1

    def _enqueue_device_graph(
        self, g: _Graph, inputs: Mapping[str, Any], rows: int, wanted: Sequence[str],
        destinations: Sequence[Destination], slot: int,
    ) -> Tuple[Dict[str, Tuple[int, ...]], int, bool, Dict[int, frozenset], frozenset]:
        """A batch with inputs on the device (CUDA shared memory) on a captured bucket: the inputs copied into the
        device buffers and their rows up to the bucket zeroed (as the host graphs pad them), the engine's graph
        replayed, then only the batch's rows of each output copied where they go."""
        stream = self._stream
        _, ev_in, ev_exec, _ = self._events[slot]
        t1 = self._to_device(inputs, stream, slot)
        rt = self._cupy.cuda.runtime
        for name, a in inputs.items():
            t = self._tensors[name]
            used = nbytes_of(tuple(a.shape), t.dtype)
            pad = nbytes_of((g.rows,) + tuple(a.shape[1:]), t.dtype) - used
            if pad > 0:
                rt.memsetAsync(t.ptr + used, 0, pad, stream.ptr)
        ev_in.record(stream)
        g.graph.launch(stream=stream)
        ev_exec.record(stream)
        out_shapes = {n: (rows,) + g.out_shapes[n][1:] for n in wanted}
        delivered, skipped = self._outputs_out(out_shapes, destinations, stream, slot)
        self.device_graph_replays += 1
        return out_shapes, t1, False, delivered, skipped

    def _outputs_out(self, out_shapes: Mapping[str, Tuple[int, ...]], destinations: Sequence[Destination],
                     stream: Any, slot: int) -> Tuple[Dict[int, frozenset], frozenset]:
        """After the engine ran: each destination's rows copied where it wants them, every output not wholly
        delivered so into the slot's pinned mirror, then the batch's done event; (delivered, skipped) as
        ``_to_devices`` returns them."""
        delivered, skipped = self._to_devices(destinations, out_shapes, stream) if destinations else ({}, frozenset())
        for name, shape in out_shapes.items():
            if name not in skipped:
                self._tensors[name].download(nbytes_of(shape, self._tensors[name].dtype), stream, slot)
        self._events[slot][3].record(stream)
        return delivered, skipped

    def _enqueue(
        self, inputs: Mapping[str, np.ndarray], rows: Optional[int], wanted: Sequence[str],
        destinations: Sequence[Destination], slot: int,
    ) -> Tuple[Dict[str, Tuple[int, ...]], int, bool, Dict[int, frozenset], frozenset]:
        """Enqueues one batch on ``slot``: (output shapes, host pack end ns, replayed a graph, outputs delivered
        to destinations, outputs not copied to the host)."""
        stream = self._stream
        ev_start, ev_in, ev_exec, ev_done = self._events[slot]
        if self._copier is not None:
            self._copier.begin(slot)
        on_host = all(_on_host(a) for a in inputs.values()) if self._buckets or self._device_buckets else None
        bucket = graph_util.pick_bucket(self._buckets, rows) if rows is not None and self._buckets else None
        if bucket is not None and on_host and self._captured_dims(inputs):  # a graph replays its captured host copies
            g = self._graphs[(bucket, slot)]
            for name, a in inputs.items():
                t = self._tensors[name]
                if isinstance(a, Gather):  # host pieces: the graph reads them from the slot's mirror
                    a = np.concatenate(a.parts, axis=0, out=t.view(a.shape, slot)) if name not in self._narrowed \
                        else np.concatenate(a.parts, axis=0)
                t.pack(a, pad_to_bytes=nbytes_of((bucket,) + tuple(a.shape[1:]), t.dtype), slot=slot)
            t1 = time.perf_counter_ns()
            ev_start.record(stream)
            g.graph.launch(stream=stream)
            out_shapes = {n: (rows,) + g.out_shapes[n][1:] for n in wanted}
            delivered, _ = self._to_devices(destinations, out_shapes, stream) if destinations else ({}, frozenset())
            ev_done.record(stream)
            return out_shapes, t1, True, delivered, frozenset()  # the graph copied every output to the host
        if self._device_buckets and rows is not None and not on_host:
            bucket = graph_util.pick_bucket(self._device_buckets, rows)
            if bucket is not None and self._captured_dims(inputs):
                return self._enqueue_device_graph(self._device_graphs[bucket], inputs, rows, wanted, destinations,
                                                  slot)
        t1 = self._to_device(inputs, stream, slot)
        ev_in.record(stream)
        shapes = {name: tuple(a.shape) for name, a in inputs.items()}
        if shapes != self._shapes:
            self._shapes = {}
            for name, shape in shapes.items():
                self._set_shape(name, shape)
            # under load the batch size changes from one batch to the next: the output shapes of input shapes
            # seen before are remembered (they depend on nothing else) instead of asked of TensorRT again
            key = tuple(shapes.items())
            out_shapes = self._known_out_shapes.get(key)  # type: ignore[assignment]
            if out_shapes is None:
                self._infer_shapes()
                out_shapes = {}
                for t in self._info.outputs:
                    shape = tuple(self._ctx.get_tensor_shape(t.name))
                    if any(d < 0 for d in shape):
                        raise Internal(f"{self._what}: output '{t.name}' shape {list(shape)} unknown after "
                                       "infer_shapes")
                    out_shapes[t.name] = shape
                if len(self._known_out_shapes) >= _KNOWN_SHAPES:
                    self._known_out_shapes.clear()
                self._known_out_shapes[key] = out_shapes
            self._shapes, self._out_shapes = shapes, out_shapes
        if not self._ctx.execute_async_v3(stream.ptr):
            raise Internal(compat.with_trt_error(f"{self._what}: execute_async_v3 failed"))
        ev_exec.record(stream)
        out_shapes = {name: self._out_shapes[name] for name in wanted}
        delivered, skipped = self._outputs_out(out_shapes, destinations, stream, slot)
        return out_shapes, t1, False, delivered, skipped

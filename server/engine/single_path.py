"""A request on its own, from its INFER to its RESULT: its inputs become NumPy views of the front end's arena (no
copy) or reads of client shared memory, it joins its model's batcher, and its answer goes back as one RESULT:
outputs written into the slot the front end reserved in the arena when they fit, as bytes in the message when they
do not. Requests that are alike go as a group instead (group_path.py); this path takes every other one, and a
group's members that cannot go with it."""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from trtserve import dtypes
from trtserve.server.engine.backends.base import DeviceTensor
from trtserve.server.engine.batcher.request import Ticket
from trtserve.server.engine.outcome import ARENA_DTYPES, Successes, failure, guarded, on_host
from trtserve.server.engine.repository.registry import ModelRepository, ModelVersion
from trtserve.server.engine.session import Session
from trtserve.server.engine.shm.registry import SharedMemoryRegistry
from trtserve.server.engine.shm.request import ShmRef
from trtserve.server.errors import Internal, InvalidArgument, TrtServeError
from trtserve.server.events import Observer
from trtserve.server.ipc import messages as m

log = logging.getLogger("trtserve.engine")


class InFlight(Ticket):
    """One request between its INFER and its RESULT: the batcher settles it, and ``SinglePath._done`` answers it
    right there (no future, closure or loop turn per request)."""

    __slots__ = ("session", "req_id", "mv", "outputs", "rows", "t0", "trace", "dispatched", "abandoned", "shm",
                 "queued_ns")

    def __init__(self, on_settled: Callable[[Ticket], None], session: Session, req_id: int, outputs: tuple,
                 rows: int, t0: int, trace: Optional[str]) -> None:
        super().__init__(on_settled)
        self.session, self.req_id, self.outputs, self.rows, self.t0, self.trace = \
            session, req_id, outputs, rows, t0, trace
        self.mv: Optional[ModelVersion] = None
        self.queued_ns = 0  # traced requests: QUEUE_START
        self.dispatched = False  # joined a batch on an instance: its arena memory is being read
        self.abandoned = False  # the client cancelled, or its front end went away
        self.shm: Any = None  # RequestShm, when the request uses client shared memory

    def mark_dispatched(self) -> None:
        self.dispatched = True


class SinglePath:
    """``infer(session, msg)`` queues one INFER and answers it exactly once, whatever happens to it."""

    def __init__(self, repository: ModelRepository, shared_memory: SharedMemoryRegistry, observer: Observer,
                 successes: Successes) -> None:
        self._repo = repository
        self._shm = shared_memory
        self._observer = observer
        self._successes = successes

    def infer(self, session: Session, msg: tuple, alone: bool = False) -> None:
        """``alone``: no other request came with this one (the batcher may run it at once, see its ``queue``)."""
        (_, req_id, model, version, serial, inputs, outputs, rows, priority, timeout_us, deadline, t0, trace) = msg
        item = InFlight(self._done, session, req_id, outputs, rows, t0, trace)
        session.inflight[req_id] = item
        mv: Optional[ModelVersion] = None
        try:
            mv = item.mv = self._repo.get(model, version)
            if mv.serial != serial:
                session.answer(req_id, m.STALE, "the model was reloaded", ())
                return
            spec, batcher = mv.spec, mv.batcher
            assert spec is not None and batcher is not None
            arrays, shapes = self._inputs(session, mv, item, inputs)
            device_outputs = self._outputs(session, mv, item, outputs, rows)
            names = tuple([o[0] for o in outputs])
            if trace is not None:
                item.queued_ns = time.monotonic_ns()
            batcher.queue(item, arrays, names, rows, priority, timeout_us, deadline, device_outputs,
                          on_dispatch=item.mark_dispatched, shapes=shapes, at_once=alone)
        except TrtServeError as e:
            if mv is not None:
                self._observer.request_done(mv.name, mv.version, False, e.reason, rows,
                                            time.monotonic_ns() - t0, 0, 0, 0, 0)
            _finish_shm(item, True)
            session.answer(req_id, e.code, e.message, ())
            return
        except Exception as e:
            log.exception("model '%s': request failed before it was queued", model)
            _finish_shm(item, True)
            session.answer(req_id, "INTERNAL", f"{type(e).__name__}: {e}", ())

    def _inputs(self, session: Session, mv: ModelVersion, item: InFlight,
                inputs: tuple) -> Tuple[Dict[str, Any], Dict[str, Tuple[int, ...]]]:
        """NumPy views of the arena (read-only), or what client shared memory holds; and each input's shape as
        the batcher keys it (without the batch dimension when the model batches), taken from the descriptor
        rather than asked of every array again."""
        arrays: Dict[str, Any] = {}
        shapes: Dict[str, Tuple[int, ...]] = {}
        spec, backend = mv.spec, mv.backend
        assert spec is not None
        batches = spec.batches
        for name, wire, shape, source in inputs:
            if type(shape) is not tuple:
                shape = tuple(shape)
            shapes[name] = shape[1:] if batches else shape
            if source[0] == m.ARENA:
                if session.arena is None:
                    raise Internal(f"input '{name}': no arena for this front end")
                if wire == "BYTES":
                    count = math.prod(shape) if shape else 1
                    raw = session.arena.view(source[1], source[2])
                    arrays[name] = dtypes.deserialize_bytes(raw.tobytes(), count).reshape(shape)
                else:
                    arrays[name] = session.arena.array(source[1], ARENA_DTYPES[wire], shape)
                continue
            dt = dtypes.BY_WIRE[wire]
            if item.shm is None:
                item.shm = self._shm.request()
            device_tensors = bool(getattr(backend, "accepts_device_tensors", False))
            device_id = device_of(backend)
            ref = ShmRef(source[1], source[2], source[3])
            data = item.shm.read_input(name, dt, tuple(shape), ref,
                                       device_tensors and name not in spec.pad_values)
            if isinstance(data, DeviceTensor) and data.device_id != device_id:
                raise InvalidArgument(f"input '{name}': CUDA shared memory region '{ref.region}' is on device "
                                      f"{data.device_id} but model '{spec.name}' runs on device {device_id}")
            arrays[name] = data
        return arrays, shapes

    def _outputs(self, session: Session, mv: ModelVersion, item: InFlight, outputs: tuple,
                 rows: int) -> Dict[str, Tuple[int, int]]:
        """Resolves output shared-memory regions before the request is queued (bounds, overlap, size when
        the shape is known); returns which outputs the backend may write itself: into CUDA regions, and, when
        the arena is page-locked, into the arena slots the front end reserved for large outputs."""
        backend = mv.backend
        arena = session.arena
        direct = getattr(backend, "direct_copy_min_bytes", None) if arena is not None and arena.pinned else None
        for o in outputs:
            if o[1] is not None:
                break
        else:  # the usual case: no output goes to client shared memory
            return arena_destinations(arena, outputs, direct) if direct is not None else {}
        spec = mv.spec
        assert spec is not None
        if item.shm is None:
            item.shm = self._shm.request()
        for name, shm_ref, _slot in outputs:
            if shm_ref is not None:
                item.shm.add_output(name, ShmRef(*shm_ref))
        for t in spec.outputs:
            full = ((rows,) if spec.batches else ()) + tuple(t.dims)
            item.shm.check_output_size(t.name, dtypes.BY_WIRE[t.datatype], full)
        device_outputs: Dict[str, Tuple[int, int]] = {}
        if getattr(backend, "accepts_device_tensors", False):
            device_id = device_of(backend)
            for name in item.shm.outputs:
                dest = item.shm.device_destination(name, device_id)
                if dest is not None:
                    device_outputs[name] = dest
        if direct is not None:
            device_outputs.update(arena_destinations(arena, outputs, direct))
        return device_outputs

    def _done(self, ticket: Ticket) -> None:
        """The batcher settled the request (or it was cancelled while queued): its RESULT goes back now."""
        item: InFlight = ticket  # type: ignore[assignment]
        session, req_id, outputs, rows, t0, trace = item.session, item.req_id, item.outputs, item.rows, item.t0, \
            item.trace
        assert item.mv is not None
        spec = item.mv.spec
        assert spec is not None
        # a request cancelled after it joined a batch ran to the end (its memory was being read); the client
        # has gone, so it is answered CANCELLED all the same
        if item.cancelled or (item.abandoned and item.error is None):
            self._observer.request_done(spec.name, spec.version, False, "cancelled", rows,
                                        time.monotonic_ns() - t0, 0, 0, 0, 0)
            _finish_shm(item, False)
            session.answer(req_id, "CANCELLED", "the request was cancelled", ())
            return
        error = item.error
        if error is None:
            result = item.result
            written, error = guarded(spec, lambda: write_outputs(session, item, spec, outputs, result))
        if error is not None:
            code, message, reason = failure(error)
            self._observer.request_done(spec.name, spec.version, False, reason, rows, time.monotonic_ns() - t0,
                                        0, 0, 0, 0)
            _finish_shm(item, True)
            if trace is not None and not session.closed:
                session.traces[req_id] = (spec.name, spec.version, trace,
                                          [("REQUEST_START", t0), ("QUEUE_START", item.queued_ns)])
            session.answer(req_id, code, message, ())
            return
        self._successes.count(spec.name, spec.version, [(rows, time.monotonic_ns() - t0, result.queue_ns,
                                                         result.compute_input_ns, result.compute_infer_ns,
                                                         result.compute_output_ns)])
        _finish_shm(item, True)
        if trace is not None and not session.closed:
            session.traces[req_id] = (spec.name, spec.version, trace, _timestamps(t0, item.queued_ns, result))
        session.answer(req_id, "", "", written)


def write_outputs(session: Session, item: Optional[InFlight], spec: Any, outputs: tuple, result: Any) -> tuple:
    """A request's outputs where its front end reads them: client shared memory, its arena slots, or bytes in the
    RESULT; returns them as the RESULT lists them."""
    written = []
    arena = session.arena if not session.closed else None
    for name, shm_ref, slot in outputs:
        array = result.outputs[name]
        wire = spec.output(name).datatype
        shape = tuple(array.shape)  # NumPy's and CuPy's shapes are tuples of Python ints
        if shm_ref is not None:
            assert item is not None  # a request of a group (no item) never uses shared memory
            if name not in result.delivered:  # the backend wrote those into device memory already
                item.shm.write_output(name, wire, array)
            written.append((name, wire, shape, (m.SHM,)))
            continue
        if slot is not None and name in result.delivered:  # the device wrote it into the arena slot
            written.append((name, wire, shape, (m.ARENA, slot[0], array.nbytes)))
            continue
        host = on_host(array)
        if wire == "BYTES":
            written.append((name, wire, shape, (m.DATA, dtypes.serialize_bytes(host))))
            continue
        want = ARENA_DTYPES[wire]
        if host.dtype != want:
            host = host.astype(want)
        if slot is not None and host.nbytes <= slot[1] and arena is not None:
            arena.write(slot[0], host)
            written.append((name, wire, shape, (m.ARENA, slot[0], host.nbytes)))
        else:
            written.append((name, wire, shape, (m.DATA, np.ascontiguousarray(host).tobytes())))
    return tuple(written)


def _finish_shm(item: InFlight, finished: bool) -> None:
    if item.shm is not None:
        item.shm.release(finished=finished)
        item.shm = None


def device_of(backend: Any) -> int:
    """The GPU a model's backend runs on (0 for one that names none), where its device tensors must lie."""
    return getattr(getattr(backend, "config", None), "device_id", 0)


def arena_destinations(arena: Any, outputs: tuple, min_bytes: int) -> Dict[str, Tuple[int, int]]:
    """Outputs whose reserved arena slot holds at least ``min_bytes``: (host address, bytes), for the backend to
    copy there from the device (the arena is page-locked)."""
    return {name: (arena.address(slot[0], slot[1]), slot[1]) for name, shm_ref, slot in outputs
            if shm_ref is None and slot is not None and slot[1] >= min_bytes}


def _timestamps(t0: int, queued: int, result: Any) -> List[Tuple[str, int]]:
    """A traced request's timestamps up to COMPUTE_END: the batcher measures durations (queue, compute input,
    infer, output) of the batch the request ran in; they are laid end to end from QUEUE_START, and kept in order
    and no later than now."""
    now = time.monotonic_ns()
    stamps = [("REQUEST_START", t0), ("QUEUE_START", max(queued, t0))]
    at = stamps[-1][1]
    for name, ns in (("COMPUTE_START", result.queue_ns), ("COMPUTE_INPUT_END", result.compute_input_ns),
                     ("COMPUTE_OUTPUT_START", result.compute_infer_ns), ("COMPUTE_END", result.compute_output_ns)):
        at = min(now, at + max(0, int(ns)))
        stamps.append((name, at))
    return stamps


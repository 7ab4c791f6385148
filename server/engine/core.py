"""The engine's side of every front-end link: descriptors in, batcher tickets, results out.

One ``Session`` per connected front end holds its arena and the requests it has in flight. A request
arrives checked (the front end validated it against the model); here it becomes NumPy views of the
arena (no copy) or reads of client shared memory, joins its model's batcher, and its answer goes back
as one RESULT: outputs written into the slot the front end reserved in the arena when they fit, as bytes
in the message when they do not. Every INFER gets exactly one RESULT, whatever happens: a cancel, a
deadline, a reload, the front end going away (then the answer is dropped, and its arena is unmapped
once nothing reads it any more).

Control calls (metadata, repository, shared-memory registration, statistics) are answered by
engine/control.py; this module only routes them, and pushes the log and trace settings control.py holds to
every front end (SETTINGS: on attach and on every change).

A traced request (the front end sampled it: the INFER's ``trace`` is the request's id, not None) gets its
QUEUE_START here when it is queued, and its compute timestamps from the batcher's durations when it is done;
they wait in the session until the front end's TRACE brings REQUEST_END (the response built), and then the
whole trace goes to the one trace file (tracing.py).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from trtserve import dtypes
from trtserve.server.engine.backends.base import DeviceTensor, Gather
from trtserve.server.engine import group
from trtserve.server.engine.batcher.request import RequestResult, Split, Ticket
from trtserve.server.engine.repository.registry import ModelRepository, ModelVersion
from trtserve.server.engine.shm.members import MemberChecks
from trtserve.server.engine.shm.registry import SharedMemoryRegistry
from trtserve.server.engine.shm.request import RequestShm, ShmRef
from trtserve.server.errors import DeadlineExceeded, Internal, InvalidArgument, TrtServeError
from trtserve.server.events import Done, Observer
from trtserve.server.ipc import messages as m
from trtserve.server.ipc.arena import Arena
from trtserve.server.ipc.channel import Link

log = logging.getLogger("trtserve.engine")

# each fixed-size datatype as it lies in the arena (little-endian), looked up per input instead of rebuilt
_ARENA_DTYPES = {w: (d.numpy.newbyteorder("<") if d.itemsize > 1 else d.numpy)
                 for w, d in dtypes.BY_WIRE.items() if w != "BYTES"}


class _InFlight(Ticket):
    """One request between its INFER and its RESULT: the batcher settles it, and ``EngineCore._done``
    answers it right there (no future, closure or loop turn per request)."""

    __slots__ = ("session", "req_id", "mv", "outputs", "rows", "t0", "trace", "dispatched", "abandoned", "shm",
                 "queued_ns")

    def __init__(self, on_settled: Callable[[Ticket], None], session: "Session", req_id: int, outputs: tuple,
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


class Session:
    """One front end's link, arena and requests in flight."""

    def __init__(self, name: str, link: Link, arena: Optional[Arena]) -> None:
        self.name = name
        self.link = link
        self.arena = arena
        self.inflight: Dict[int, Any] = {}  # req_id -> its _InFlight, or the group.Group it is queued in
        self.closed = False
        # traced requests answered, waiting for the front end's TRACE: req_id -> (model, version, id, stamps)
        self.traces: Dict[int, Tuple[str, str, str, List[Tuple[str, int]]]] = {}


class EngineCore:
    """Turns messages from front ends into batcher submissions and control calls."""

    def __init__(self, repository: ModelRepository, shared_memory: SharedMemoryRegistry, observer: Observer,
                 control: Callable[[str, tuple], "asyncio.Future"]) -> None:
        self._repo = repository
        self._shm = shared_memory
        self._members = MemberChecks(shared_memory)  # group members' region checks, remembered
        self._observer = observer
        self._control = control
        self.sessions: List[Session] = []
        # successful requests answered in this loop turn, per model version: the observers get them in one call
        # per version and turn (a batch's answers arrive together), not one per request
        self._succeeded: Dict[Tuple[str, str], List[Done]] = {}
        self._allowed: Dict[Tuple[str, str, int], bool] = {}  # (model, version asked, serial) -> may be grouped
        if hasattr(control, "broadcast"):
            control.broadcast = self.broadcast_settings  # type: ignore[attr-defined]

    # ---- sessions -------------------------------------------------------------------------------------------------
    def attach(self, name: str, link: Link, arena: Optional[Arena]) -> Session:
        session = Session(name, link, arena)
        self.sessions.append(session)
        link.start(lambda batch: self._handle(session, batch), lambda: self._detach(session))
        settings = getattr(self._control, "settings", None)
        if settings is not None:
            link.send((m.SETTINGS,) + tuple(settings()))
        log.debug("front end %s attached", name)
        return session

    def _detach(self, session: Session) -> None:
        """The front end went away: nobody waits for its answers; queued requests never run."""
        if session.closed:
            return
        session.closed = True
        if session in self.sessions:
            self.sessions.remove(session)
        inflight = len(session.inflight)
        for item in list(session.inflight.values()):  # every one is queued: _infer answers those it does not queue
            item.abandoned = True
            if not item.dispatched:
                item.cancel()
        if not session.inflight and session.arena is not None:
            session.arena.close()
        log.info("front end %s detached (%d requests were in flight)", session.name, inflight)

    def close(self) -> None:
        for s in list(self.sessions):
            s.link.close()
            self._detach(s)
        self._flush_successes()
        tracer = getattr(self._control, "tracer", None)
        if tracer is not None:
            tracer.flush()  # traces collected and not yet written (log_frequency 0) go to the trace file

    def broadcast_settings(self) -> None:
        """The log or trace settings changed: every front end applies them."""
        msg = (m.SETTINGS,) + tuple(self._control.settings())  # type: ignore[attr-defined]
        for s in self.sessions:
            if not s.closed:
                s.link.send(msg)

    # ---- messages -------------------------------------------------------------------------------------------------
    def _handle(self, session: Session, batch: List[tuple]) -> None:
        alike: Optional[Dict[tuple, List[tuple]]] = None  # INFERs that may be queued together (group.py), by key
        for msg in batch:
            tag = msg[0]
            try:
                if tag == m.INFER:
                    k = group.key(msg)
                    if k is not None:
                        allowed = self._allowed.get(k[:3])  # (model, version asked, serial): see _groups_allowed
                        if allowed is None:
                            allowed = self._groups_allowed(msg)
                        if not allowed:
                            k = None
                    if k is None:
                        self._infer(session, msg)
                    elif alike is None:
                        alike = {k: [msg]}
                    else:
                        alike.setdefault(k, []).append(msg)
                    continue
                if alike:  # queued before anything that may refer to them (a CANCEL)
                    self._queue_alike(session, alike)
                    alike = None
                if tag == m.CANCEL:
                    self._cancel(session, msg[1])
                elif tag == m.FAILED:
                    _, model, version, reason, rows, request_ns = msg
                    self._observer.request_done(model, version, False, reason, rows, request_ns, 0, 0, 0, 0)
                elif tag == m.CALL:
                    asyncio.get_running_loop().create_task(self._call(session, msg[1], msg[2], msg[3]))
                elif tag == m.TRACE:
                    trace = session.traces.pop(msg[1], None)
                    if trace is not None:
                        model, version, request_id, stamps = trace
                        stamps.append(("REQUEST_END", max(msg[2], stamps[-1][1])))
                        self._control.trace_done(model, version, request_id, stamps)  # type: ignore[attr-defined]
                else:
                    log.error("front end %s sent an unknown message tag %r", session.name, tag)
            except Exception:  # one bad message must not stop the others in the batch
                log.exception("front end %s: handling message %r failed", session.name, tag)
        if alike:
            self._queue_alike(session, alike)

    def _groups_allowed(self, msg: tuple) -> bool:
        """Whether the INFER's model lets its requests be grouped (group.allows); one that does not, or that is not
        loaded, handles it one by one, in the order read. Kept per loaded version (its serial): asking the
        repository and the config for every request cost more than the grouping saved."""
        try:
            mv = self._repo.get(msg[2], msg[3])
        except TrtServeError:
            return False  # not kept: the model may be loaded later
        allowed = mv.serial == msg[4] and group.allows(mv)
        if len(self._allowed) >= 1024:  # versions come and go with reloads: start over now and then
            self._allowed.clear()
        self._allowed[(msg[2], msg[3], msg[4])] = allowed
        return allowed

    def _queue_alike(self, session: Session, alike: Dict[tuple, List[tuple]]) -> None:
        for msgs in alike.values():
            self._infer_group(session, msgs)

    def _infer_group(self, session: Session, msgs: List[tuple]) -> None:
        """Alike requests (group.key): as entries of up to what the model's batches hold, or one by one (each
        path answers every request it takes, whatever fails)."""
        first = msgs[0]
        mv: Optional[ModelVersion] = None
        per, direct_min = 0, None
        shm = group.in_shared_memory(first)
        if len(msgs) > 1:
            try:
                mv = self._repo.get(first[2], first[3])
                if mv.serial != first[4]:
                    pass  # one by one: each is answered STALE
                elif shm:  # the device reads and writes the members' regions
                    if getattr(mv.backend, "accepts_device_tensors", False):
                        per = group.members_per_entry(mv, first, None)[0]
                else:
                    arena = session.arena
                    direct_min = getattr(mv.backend, "direct_copy_min_bytes", None) \
                        if arena is not None and arena.pinned else None
                    per, direct = group.members_per_entry(mv, first, direct_min)
                    if not direct:
                        direct_min = None
            except TrtServeError:
                pass  # one by one: each request is answered why
        if mv is None or per < 2:
            for msg in msgs:
                self._infer(session, msg)
            return
        for i in range(0, len(msgs), per):
            part = msgs[i:i + per]
            if len(part) == 1:
                self._infer(session, part[0])
                continue
            if shm:
                self._queue_shm_group(session, mv, part)
                continue
            if direct_min is not None:
                # members in arena order: their pieces then mostly lie at one distance from each other, and the
                # backend copies such a run in one call (backends/tensorrt/copies.py)
                part.sort(key=_arena_offset)
            self._queue_group(session, mv, part, direct_min)

    def _queue_group(self, session: Session, mv: ModelVersion, msgs: List[tuple],
                     direct_min: Optional[int] = None) -> None:
        """One entry for ``msgs``; ``direct_min``: its members are large (group.members_per_entry), their inputs are
        left in the arena in pieces and each member's outputs go from the device into its own slots."""
        g = group.Group(self._group_done, session, mv, msgs)
        for msg in msgs:
            session.inflight[msg[1]] = g
        first = msgs[0]
        priority, timeout_us = first[8], first[9]
        try:
            arena = session.arena
            if arena is None:
                raise Internal("no arena for this front end")
            arrays: Dict[str, Any] = {}
            shapes: Dict[str, Tuple[int, ...]] = {}
            rows = g.rows
            for j, (name, wire, shape, _source) in enumerate(first[5]):
                shape = tuple(shape)
                dtype = _ARENA_DTYPES[wire]
                if direct_min is not None:
                    arrays[name] = Gather(tuple([arena.array(msg[5][j][3][1], dtype, shape) for msg in msgs]),
                                          (rows,) + shape[1:], dtype)
                else:
                    offsets = np.fromiter((msg[5][j][3][1] for msg in msgs), np.int64, len(msgs))
                    arrays[name] = arena.gather(offsets, dtype, shape)
                shapes[name] = shape[1:]
            names = tuple([o[0] for o in first[6]])
            members = None
            if direct_min is not None:
                members = tuple([_arena_destinations(arena, msg[6], direct_min) for msg in msgs])
                if not members[0] or any(d.keys() != members[0].keys() for d in members):
                    # the device writes an output of a group for every member or for none (delivered means every
                    # member got it): a member whose slot cannot take it sends the group's outputs through the host
                    members = None
            assert mv.batcher is not None
            mv.batcher.queue(g, arrays, names, rows, priority, timeout_us, group.deadline(msgs), None,
                             on_dispatch=g.mark_dispatched, shapes=shapes, count=len(msgs), member_outputs=members,
                             splitter=self._split_group)
        except Exception as e:
            self._not_queued(g, e)

    def _queue_shm_group(self, session: Session, mv: ModelVersion, msgs: List[tuple]) -> None:
        """One entry for those of ``msgs`` (every tensor in client shared memory) whose inputs and outputs all lie in
        CUDA regions on the model's GPU: the backend reads the members' device tensors and writes each member's rows
        into its own output regions. Each member's regions are checked and held as its own request's would be; one
        that fails a check or lies elsewhere goes on its own (and is answered why)."""
        spec, backend = mv.spec, mv.backend
        assert spec is not None and mv.batcher is not None
        device_id = getattr(getattr(backend, "config", None), "device_id", 0)
        members: List[tuple] = []
        shms: List[Any] = []
        pieces: List[List[DeviceTensor]] = []
        destinations: List[Dict[str, Tuple[int, int]]] = []
        for msg in msgs:
            held = self._members.check(spec, msg, device_id)
            if held is None:
                self._infer(session, msg)
                continue
            members.append(msg)
            shms.append(held[0])
            pieces.append(held[1])
            destinations.append(held[2])
        if len(members) < 2:
            for shm in shms:
                shm.release(finished=True)  # nothing was handed to the backend
            for msg in members:
                self._infer(session, msg)
            return
        g = group.Group(self._group_done, session, mv, members)
        g.shms = shms
        for msg in members:
            session.inflight[msg[1]] = g
        first = members[0]
        try:
            rows = g.rows
            arrays: Dict[str, Any] = {}
            shapes: Dict[str, Tuple[int, ...]] = {}
            for j, (name, wire, shape, _source) in enumerate(first[5]):
                shape = tuple(shape)
                arrays[name] = Gather(tuple([p[j] for p in pieces]), (rows,) + shape[1:], _ARENA_DTYPES[wire])
                shapes[name] = shape[1:]
            names = tuple([o[0] for o in first[6]])
            mv.batcher.queue(g, arrays, names, rows, first[8], first[9], group.deadline(members), None,
                             on_dispatch=g.mark_dispatched, shapes=shapes, count=len(members),
                             member_outputs=tuple(destinations), members_apart=True, splitter=self._split_group)
        except Exception as e:
            self._not_queued(g, e)

    def _split_group(self, ticket: Ticket, k: int) -> Split:
        """The batcher takes only the first ``k`` members of a queued group into a batch (its policy's rule 2): the
        others become a group of their own, which their answers and cancels now go through. A queued group has no
        member cancelled or gone yet (a cancel while queued settles the whole entry), so only members move."""
        g: group.Group = ticket  # type: ignore[assignment]
        rest = group.Group(self._group_done, g.session, g.mv, g.msgs[k:])
        g.msgs = g.msgs[:k]
        if g.shms is not None:
            g.shms, rest.shms = g.shms[:k], g.shms[k:]
        inflight = g.session.inflight
        for msg in rest.msgs:
            inflight[msg[1]] = rest
        return Split(rest, rest.mark_dispatched, group.deadline(g.msgs), group.deadline(rest.msgs))

    def _not_queued(self, g: group.Group, e: BaseException) -> None:
        """A group the batcher did not take. Refused as a whole (a TrtServeError: its rows fit no optimization
        profile, the model is unloading, ...): each member goes on its own and gets its own verdict, as it would have
        without the group. Anything else fails each member."""
        self._release_shms(g)
        if isinstance(e, TrtServeError):
            for msg in g.msgs:
                self._infer(g.session, msg)
            return
        log.error("model '%s': %d requests failed before they were queued", g.mv.name, len(g.msgs), exc_info=e)
        self._fail_members(g, g.msgs, "INTERNAL", f"{type(e).__name__}: {e}", "backend")

    @staticmethod
    def _release_shms(g: group.Group) -> None:
        """Gives back the regions a group's members held. Its batch has finished or never started (a group is
        cancelled only before it joins a batch, and settled after the batch that ran it), so nothing reads them."""
        shms, g.shms = g.shms, None
        if shms:
            RequestShm.release_all(shms)

    def _fail_members(self, g: group.Group, msgs: List[tuple], code: str, message: str, reason: str) -> None:
        now = time.monotonic_ns()
        for msg in msgs:
            self._observer.request_done(g.mv.name, g.mv.version, False, reason, msg[7], now - msg[11], 0, 0, 0, 0)
            self._answer(g.session, msg[1], code, message, ())

    async def _call(self, session: Session, call_id: int, method: str, args: tuple) -> None:
        try:
            value = await self._control(method, args)
        except TrtServeError as e:
            session.link.send((m.REPLY, call_id, e.code, e.message, None))
        except Exception as e:
            log.exception("control call %s failed", method)
            session.link.send((m.REPLY, call_id, "INTERNAL", f"{method}: {type(e).__name__}: {e}", None))
        else:
            session.link.send((m.REPLY, call_id, "", "", value))

    def _cancel(self, session: Session, req_id: int) -> None:
        item = session.inflight.get(req_id)
        if item is None:
            return
        if isinstance(item, group.Group):
            if item.dispatched:
                item.gone.add(req_id)  # it runs with its group; answered CANCELLED when the group is done
            elif item.requeue is None:
                item.requeue = req_id  # answered now; the others are queued again without it (_group_done)
                item.cancel()
            return
        item.abandoned = True
        if not item.dispatched:
            item.cancel()  # still queued: it never runs, and its answer goes back now

    def _infer(self, session: Session, msg: tuple) -> None:
        (_, req_id, model, version, serial, inputs, outputs, rows, priority, timeout_us, deadline, t0, trace) = msg
        item = _InFlight(self._done, session, req_id, outputs, rows, t0, trace)
        session.inflight[req_id] = item
        mv: Optional[ModelVersion] = None
        try:
            mv = item.mv = self._repo.get(model, version)
            if mv.serial != serial:
                self._answer(session, req_id, m.STALE, "the model was reloaded", ())
                return
            spec, batcher = mv.spec, mv.batcher
            assert spec is not None and batcher is not None
            arrays, shapes = self._inputs(session, mv, item, inputs)
            device_outputs = self._outputs(session, mv, item, outputs, rows)
            names = tuple([o[0] for o in outputs])
            if trace is not None:
                item.queued_ns = time.monotonic_ns()
            batcher.queue(item, arrays, names, rows, priority, timeout_us, deadline, device_outputs,
                          on_dispatch=item.mark_dispatched, shapes=shapes)
        except TrtServeError as e:
            if mv is not None:
                self._observer.request_done(mv.name, mv.version, False, e.reason, rows,
                                            time.monotonic_ns() - t0, 0, 0, 0, 0)
            self._finish_shm(item, True)
            self._answer(session, req_id, e.code, e.message, ())
            return
        except Exception as e:
            log.exception("model '%s': request failed before it was queued", model)
            self._finish_shm(item, True)
            self._answer(session, req_id, "INTERNAL", f"{type(e).__name__}: {e}", ())

    def _inputs(self, session: Session, mv: ModelVersion, item: _InFlight,
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
                    arrays[name] = session.arena.array(source[1], _ARENA_DTYPES[wire], shape)
                continue
            dt = dtypes.BY_WIRE[wire]
            if item.shm is None:
                item.shm = self._shm.request()
            device_tensors = bool(getattr(backend, "accepts_device_tensors", False))
            device_id = getattr(getattr(backend, "config", None), "device_id", 0)
            ref = ShmRef(source[1], source[2], source[3])
            data = item.shm.read_input(name, dt, tuple(shape), ref,
                                       device_tensors and name not in spec.pad_values)
            if isinstance(data, DeviceTensor) and data.device_id != device_id:
                raise InvalidArgument(f"input '{name}': CUDA shared memory region '{ref.region}' is on device "
                                      f"{data.device_id} but model '{spec.name}' runs on device {device_id}")
            arrays[name] = data
        return arrays, shapes

    def _outputs(self, session: Session, mv: ModelVersion, item: _InFlight, outputs: tuple,
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
            return _arena_destinations(arena, outputs, direct) if direct is not None else {}
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
            device_id = getattr(getattr(backend, "config", None), "device_id", 0)
            for name in item.shm.outputs:
                dest = item.shm.device_destination(name, device_id)
                if dest is not None:
                    device_outputs[name] = dest
        if direct is not None:
            device_outputs.update(_arena_destinations(arena, outputs, direct))
        return device_outputs

    def _done(self, ticket: Ticket) -> None:
        """The batcher settled the request (or it was cancelled while queued): its RESULT goes back now."""
        item: _InFlight = ticket  # type: ignore[assignment]
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
            self._finish_shm(item, False)
            self._answer(session, req_id, "CANCELLED", "the request was cancelled", ())
            return
        error = item.error
        if error is None:
            result = item.result
            written, error = _guarded(spec, lambda: self._write_outputs(session, item, spec, outputs, result))
        if error is not None:
            code, message, reason = _failure(error)
            self._observer.request_done(spec.name, spec.version, False, reason, rows, time.monotonic_ns() - t0,
                                        0, 0, 0, 0)
            self._finish_shm(item, True)
            if trace is not None and not session.closed:
                session.traces[req_id] = (spec.name, spec.version, trace,
                                          [("REQUEST_START", t0), ("QUEUE_START", item.queued_ns)])
            self._answer(session, req_id, code, message, ())
            return
        self._count_successes(spec.name, spec.version, [(rows, time.monotonic_ns() - t0, result.queue_ns,
                                                         result.compute_input_ns, result.compute_infer_ns,
                                                         result.compute_output_ns)])
        self._finish_shm(item, True)
        if trace is not None and not session.closed:
            session.traces[req_id] = (spec.name, spec.version, trace, _timestamps(t0, item.queued_ns, result))
        self._answer(session, req_id, "", "", written)

    def _group_done(self, ticket: Ticket) -> None:
        """A group's entry was settled: every member gets its answer, the successful ones in one RESULTS."""
        g: group.Group = ticket  # type: ignore[assignment]
        session, spec = g.session, g.mv.spec
        assert spec is not None
        shms = g.shms
        if g.cancelled or g.abandoned or g.error is not None:
            self._release_shms(g)  # (a finished one's once its outputs are written, below)
        if g.requeue is not None and not g.abandoned:
            cancelled = g.requeue
            rest = [msg for msg in g.msgs if msg[1] != cancelled]
            self._cancelled(session, spec, [msg for msg in g.msgs if msg[1] == cancelled])
            if rest:  # behind what arrived meanwhile: a cancel costs the others their place in the queue
                self._infer_group(session, rest)
            return
        if isinstance(g.error, DeadlineExceeded) and not g.abandoned:
            self._expired(g)
            return
        if g.cancelled or (g.abandoned and g.error is None):
            self._cancelled(session, spec, g.msgs)
            return
        error: Optional[BaseException] = g.error
        written: Optional[tuple] = None
        live = [msg for msg in g.msgs if msg[1] not in g.gone]
        if error is None and shms is not None:
            outcome, error = _guarded(spec, lambda: self._write_shm_group(spec, g.msgs, live, g.result, shms))
            self._release_shms(g)
            if outcome is not None:
                written, failed = outcome
                if failed:  # those members are answered alone, why; the others as the group
                    self._fail_each(session, spec, [msg for msg in live if msg[1] in failed], failed)
                    live = [msg for msg in live if msg[1] not in failed]
        elif error is None:
            written, error = _guarded(spec, lambda: self._write_group(session, spec, g.msgs, live, g.result))
        if error is not None:
            self._fail_members(g, g.msgs, *_failure(error))
            return
        self._cancelled(session, spec, [msg for msg in g.msgs if msg[1] in g.gone])
        r = g.result
        now = time.monotonic_ns()
        q, ci, cf, co = r.queue_ns, r.compute_input_ns, r.compute_infer_ns, r.compute_output_ns
        self._count_successes(spec.name, spec.version, [(msg[7], now - msg[11], q, ci, cf, co) for msg in live])
        if written is None or not live:  # answered one by one (an output did not fit its slots), or none is left
            return
        ids = tuple([msg[1] for msg in live])
        if _answered(session, ids):
            session.link.send((m.RESULTS, ids, written))

    def _expired(self, g: group.Group) -> None:
        """The group's deadline (its earliest member's) passed before it ran, in the queue or while its batch waited
        for an instance, so none of it ran: members whose own deadline passed are answered DEADLINE_EXCEEDED, those
        cancelled meanwhile CANCELLED, and the others are queued again (behind what arrived meanwhile) in the next loop
        turn: the batcher settles an expired entry while it walks its queues. The members with the group's deadline
        count as passed whatever this process's clock says (the batcher's may be another), so each time at least one
        leaves."""
        session, spec = g.session, g.mv.spec
        first = group.deadline(g.msgs)
        now = time.monotonic()
        passed = [msg for msg in g.msgs if msg[10] is not None and (msg[10] <= now or msg[10] == first)
                  and msg[1] not in g.gone]
        self._fail_each(session, spec, passed, {msg[1]: g.error for msg in passed})
        self._cancelled(session, spec, [msg for msg in g.msgs if msg[1] in g.gone])
        out = {msg[1] for msg in passed} | g.gone
        rest = [msg for msg in g.msgs if msg[1] not in out]
        if rest:
            asyncio.get_running_loop().call_soon(self._requeue, session, rest)

    def _requeue(self, session: Session, msgs: List[tuple]) -> None:
        if session.closed:  # its front end went away meanwhile: nobody waits for these
            _answered(session, tuple([msg[1] for msg in msgs]))
            return
        self._infer_group(session, msgs)

    def _fail_each(self, session: Session, spec: Any, msgs: List[tuple], errors: Dict[int, TrtServeError]) -> None:
        now = time.monotonic_ns()
        for msg in msgs:
            code, message, reason = _failure(errors[msg[1]])
            self._observer.request_done(spec.name, spec.version, False, reason, msg[7], now - msg[11], 0, 0, 0, 0)
            self._answer(session, msg[1], code, message, ())

    def _cancelled(self, session: Session, spec: Any, msgs: List[tuple]) -> None:
        now = time.monotonic_ns()
        for msg in msgs:
            self._observer.request_done(spec.name, spec.version, False, "cancelled", msg[7], now - msg[11], 0, 0, 0, 0)
            self._answer(session, msg[1], "CANCELLED", "the request was cancelled", ())

    def _write_group(self, session: Session, spec: Any, msgs: List[tuple], live: List[tuple],
                     result: Any) -> Optional[tuple]:
        """Scatters each output of the group's rows into its live members' slots and returns the RESULTS outputs:
        (name, datatype, one member's shape, slot offsets, bytes each). Members have the same rows (their shapes
        are part of the group's key). An output the device wrote into every member's slot (``result.delivered``) is
        only reported. An output larger than its slots (a variable shape) is answered one by one instead, as a
        request on its own would be: then None."""
        arena = session.arena if not session.closed else None
        count, each = len(msgs), msgs[0][7]
        index = None
        if len(live) != count:
            live_ids = {msg[1] for msg in live}
            index = np.array([i for i, msg in enumerate(msgs) if msg[1] in live_ids], np.int64)
        hosts = {}
        pieces = []
        fits = True
        delivered = result.delivered  # written into every member's slot by the device (a group of large requests)
        for j, (name, _shm, _slot) in enumerate(msgs[0][6]):
            array = _on_host(result.outputs[name])
            wire = spec.output(name).datatype
            if name in delivered:  # only reported: its host result is not read (the backend did not copy it back)
                hosts[name] = array
                pieces.append((name, wire, (each,) + tuple(array.shape[1:]), [msg[6][j][2][0] for msg in live],
                               array.nbytes // count, None))
                continue
            want = _ARENA_DTYPES[wire]
            host = hosts[name] = np.ascontiguousarray(array if array.dtype == want else array.astype(want))
            per = host.reshape((count, each) + tuple(host.shape[1:]))
            if index is not None:
                per = per[index]
            slots = np.array([msg[6][j][2] for msg in live], np.int64).reshape(-1, 2)
            nbytes = host.nbytes // count
            fits = fits and (not len(live) or int(slots[:, 1].min()) >= nbytes)
            pieces.append((name, wire, (each,) + tuple(host.shape[1:]), slots[:, 0], nbytes, per))
        if fits:
            written = []
            for name, wire, shape, offsets, nbytes, per in pieces:
                if per is not None:
                    if arena is not None and len(live):
                        arena.scatter(offsets, per)
                    offsets = offsets.tolist()
                written.append((name, wire, shape, offsets, nbytes))
            return tuple(written)
        position = {msg[1]: i for i, msg in enumerate(msgs)}
        for msg in live:
            start = position[msg[1]] * each
            own = RequestResult({name: host[start:start + each] for name, host in hosts.items()}, 0, 0, 0, 0, 0,
                                delivered)
            self._answer(session, msg[1], "", "", self._write_outputs(session, None, spec, msg[6], own))
        return None

    @staticmethod
    def _write_shm_group(spec: Any, msgs: List[tuple], live: List[tuple], result: Any,
                         shms: List[Any]) -> Tuple[tuple, Dict[int, TrtServeError]]:
        """A group in client shared memory: the outputs the device did not write into every member's regions are
        written there from the host result, member by member. Returns the RESULTS outputs (``offsets`` None: each
        member's output is in its region) and the members whose write failed, with why (each is answered alone)."""
        each = msgs[0][7]
        position = {msg[1]: i for i, msg in enumerate(msgs)}
        delivered = result.delivered
        failed: Dict[int, TrtServeError] = {}
        written = []
        for name, _ref, _slot in msgs[0][6]:
            array = result.outputs[name]
            wire = spec.output(name).datatype
            if name not in delivered:
                host = _on_host(array)
                for msg in live:
                    k = position[msg[1]]
                    if msg[1] not in failed:
                        try:
                            shms[k].write_output(name, wire, host[k * each:(k + 1) * each])
                        except TrtServeError as e:
                            failed[msg[1]] = e
            written.append((name, wire, (each,) + tuple(array.shape[1:]), None, 0))
        return tuple(written), failed

    def _write_outputs(self, session: Session, item: Optional[_InFlight], spec, outputs: tuple, result) -> tuple:
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
            host = _on_host(array)
            if wire == "BYTES":
                written.append((name, wire, shape, (m.DATA, dtypes.serialize_bytes(host))))
                continue
            want = _ARENA_DTYPES[wire]
            if host.dtype != want:
                host = host.astype(want)
            if slot is not None and host.nbytes <= slot[1] and arena is not None:
                arena.write(slot[0], host)
                written.append((name, wire, shape, (m.ARENA, slot[0], host.nbytes)))
            else:
                written.append((name, wire, shape, (m.DATA, np.ascontiguousarray(host).tobytes())))
        return tuple(written)

    def _count_successes(self, model: str, version: str, done: List[Done]) -> None:
        """Counted in the loop turn after the answers were written: the flush is queued on the loop before the
        answers go out, so a statistics call that follows an answer finds the request counted (a /metrics
        scrape, on its own thread, may see it one loop turn later)."""
        if not self._succeeded:
            asyncio.get_running_loop().call_soon(self._flush_successes)
        self._succeeded.setdefault((model, version), []).extend(done)

    def _flush_successes(self) -> None:
        succeeded, self._succeeded = self._succeeded, {}
        for (model, version), done in succeeded.items():
            self._observer.requests_done(model, version, done)

    @staticmethod
    def _finish_shm(item: _InFlight, finished: bool) -> None:
        if item.shm is not None:
            item.shm.release(finished=finished)
            item.shm = None

    def _answer(self, session: Session, req_id: int, code: str, message: str, outputs: tuple) -> None:
        if _answered(session, (req_id,)):
            session.link.send((m.RESULT, req_id, code, message, outputs))


def _answered(session: Session, req_ids: Tuple[int, ...]) -> bool:
    """The requests are no longer in flight; whether their answers can go out (False once the front end went away:
    then the arena is closed when the last request that could read it has finished)."""
    inflight = session.inflight
    for req_id in req_ids:
        inflight.pop(req_id, None)
    if session.closed:
        if not inflight and session.arena is not None:
            session.arena.close()
        return False
    return True


def _guarded(spec: Any, write: Callable[[], Any]) -> Tuple[Any, Optional[BaseException]]:
    """(what ``write`` returned, None), or (None, the error to answer with): writing a result must not fail the
    batch's other answers."""
    try:
        return write(), None
    except TrtServeError as e:
        return None, e
    except Exception as e:
        log.exception("model '%s': writing a result failed", spec.name)
        return None, Internal(f"model '{spec.name}': writing the result failed: {type(e).__name__}: {e}")


def _failure(error: BaseException) -> Tuple[str, str, str]:
    """(status code, message, statistics reason) to answer a failed request with."""
    if isinstance(error, TrtServeError):
        return error.code, error.message, error.reason
    return "INTERNAL", f"{type(error).__name__}: {error}", "backend"


def _arena_offset(msg: tuple) -> int:
    """Where an INFER's first input lies in its front end's arena (its source is ``(ARENA, offset, bytes)``)."""
    return msg[5][0][3][1]


def _arena_destinations(arena: Any, outputs: tuple, min_bytes: int) -> Dict[str, Tuple[int, int]]:
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


def _on_host(array: Any) -> np.ndarray:
    """A backend's output as a NumPy array: as it is in the usual case (a host result), else copied from the device
    or converted."""
    if type(array) is np.ndarray:
        return array
    return _to_host(array) if hasattr(array, "__cuda_array_interface__") else np.asarray(array)


def _to_host(array: Any) -> np.ndarray:
    import cupy  # only a device result (CuPy) gets here

    return cupy.asnumpy(array)

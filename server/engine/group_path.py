"""A group of alike requests (group.py), from their INFERs to their answers: their data made one batcher entry (arena
rows gathered, large arena tensors or client CUDA shared memory left in pieces), the entry split when a batch takes
only its first members, and every member answered once: the successful ones in one RESULTS, the others (cancelled,
past their deadline, failed) each in its own RESULT. Members that cannot go with the group go on their own
(single_path.py)."""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from trtserve.server.engine import group
from trtserve.server.engine.backends.base import DeviceTensor, Gather, PieceColumns
from trtserve.server.engine.batcher.request import MemberOutputs, RequestResult, Split, Ticket
from trtserve.server.engine.outcome import ARENA_DTYPES, Successes, failure, guarded, on_host
from trtserve.server.engine.repository.registry import ModelRepository, ModelVersion
from trtserve.server.engine.session import Session
from trtserve.server.engine.shm.members import MemberChecks
from trtserve.server.engine.shm.registry import SharedMemoryRegistry
from trtserve.server.engine.shm.request import RequestShm
from trtserve.server.engine.single_path import SinglePath, device_of, write_outputs
from trtserve.server.errors import DeadlineExceeded, Internal, TrtServeError
from trtserve.server.events import Observer
from trtserve.server.ipc import messages as m

log = logging.getLogger("trtserve.engine")


class GroupPath:
    """``infer_group(session, msgs)`` queues alike INFERs as entries of up to what the model's batches hold and
    answers each member exactly once."""

    def __init__(self, repository: ModelRepository, shared_memory: SharedMemoryRegistry, observer: Observer,
                 successes: Successes, single: SinglePath) -> None:
        self._repo = repository
        self._members = MemberChecks(shared_memory)  # group members' region checks, remembered
        self._observer = observer
        self._successes = successes
        self._single = single

    def infer_group(self, session: Session, msgs: List[tuple]) -> None:
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
                self._single.infer(session, msg)
            return
        for i in range(0, len(msgs), per):
            part = msgs[i:i + per]
            if len(part) == 1:
                self._single.infer(session, part[0])
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
                dtype = ARENA_DTYPES[wire]
                if direct_min is not None:
                    arrays[name] = _arena_pieces(arena, msgs, j, dtype, shape, rows)
                else:
                    arrays[name] = arena.gather([msg[5][j][3][1] for msg in msgs], dtype, shape)
                shapes[name] = shape[1:]
            names = tuple([o[0] for o in first[6]])
            members = _arena_members(arena, msgs, direct_min) if direct_min is not None else None
            assert mv.batcher is not None
            mv.batcher.queue(g, arrays, names, rows, priority, timeout_us, group.deadline(msgs), None,
                             on_dispatch=g.mark_dispatched, shapes=shapes, count=len(msgs), member_outputs=members,
                             splitter=self.split)
        except Exception as e:
            self._not_queued(g, e)

    def _queue_shm_group(self, session: Session, mv: ModelVersion, msgs: List[tuple]) -> None:
        """One entry for those of ``msgs`` (every tensor in client shared memory) whose inputs and outputs all lie in
        CUDA regions on the model's GPU: the backend reads the members' device tensors and writes each member's rows
        into its own output regions. Each member's regions are checked and held as its own request's would be; one
        that fails a check or lies elsewhere goes on its own (and is answered why)."""
        spec, backend = mv.spec, mv.backend
        assert spec is not None and mv.batcher is not None
        device_id = device_of(backend)
        members: List[tuple] = []
        shms: List[Any] = []
        pieces: List[List[DeviceTensor]] = []
        destinations: List[Dict[str, Tuple[int, int]]] = []
        for msg in msgs:
            held = self._members.check(spec, msg, device_id)
            if held is None:
                self._single.infer(session, msg)
                continue
            members.append(msg)
            shms.append(held[0])
            pieces.append(held[1])
            destinations.append(held[2])
        if len(members) < 2:
            for shm in shms:
                shm.release(finished=True)  # nothing was handed to the backend
            for msg in members:
                self._single.infer(session, msg)
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
                arrays[name] = Gather(tuple([p[j] for p in pieces]), (rows,) + shape[1:], ARENA_DTYPES[wire])
                shapes[name] = shape[1:]
            names = tuple([o[0] for o in first[6]])
            count = len(members)
            # lists, not arrays: members apart are copied one by one (MemberDestinations)
            columns = {name: ([d[name][0] for d in destinations], [d[name][1] for d in destinations])
                       for name in destinations[0]}
            mv.batcher.queue(g, arrays, names, rows, first[8], first[9], group.deadline(members), None,
                             on_dispatch=g.mark_dispatched, shapes=shapes, count=count,
                             member_outputs=MemberOutputs(columns, count) if columns else None, members_apart=True,
                             splitter=self.split)
        except Exception as e:
            self._not_queued(g, e)

    def split(self, ticket: Ticket, k: int) -> Split:
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
                self._single.infer(g.session, msg)
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

    def _fail(self, session: Session, name: str, version: str, msgs: List[tuple], code: str, message: str,
              reason: str) -> None:
        """Members answered alike, each on its own (a failure counted per request, as Triton counts them)."""
        now = time.monotonic_ns()
        for msg in msgs:
            self._observer.request_done(name, version, False, reason, msg[7], now - msg[11], 0, 0, 0, 0)
            session.answer(msg[1], code, message, ())

    def _fail_members(self, g: group.Group, msgs: List[tuple], code: str, message: str, reason: str) -> None:
        self._fail(g.session, g.mv.name, g.mv.version, msgs, code, message, reason)

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
                self.infer_group(session, rest)
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
            outcome, error = guarded(spec, lambda: self._write_shm_group(spec, g.msgs, live, g.result, shms))
            self._release_shms(g)
            if outcome is not None:
                written, failed = outcome
                if failed:  # those members are answered alone, why; the others as the group
                    self._fail_each(session, spec, [msg for msg in live if msg[1] in failed], failed)
                    live = [msg for msg in live if msg[1] not in failed]
        elif error is None:
            written, error = guarded(spec, lambda: self._write_group(session, spec, g.msgs, live, g.result))
        if error is not None:
            self._fail_members(g, g.msgs, *failure(error))
            return
        self._cancelled(session, spec, [msg for msg in g.msgs if msg[1] in g.gone])
        r = g.result
        now = time.monotonic_ns()
        q, ci, cf, co = r.queue_ns, r.compute_input_ns, r.compute_infer_ns, r.compute_output_ns
        self._successes.count(spec.name, spec.version, [(msg[7], now - msg[11], q, ci, cf, co) for msg in live])
        if written is None or not live:  # answered one by one (an output did not fit its slots), or none is left
            return
        ids = tuple([msg[1] for msg in live])
        if session.answered(ids):
            session.send_answers((m.RESULTS, ids, written))

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
            session.answered(tuple([msg[1] for msg in msgs]))
            return
        self.infer_group(session, msgs)

    def _fail_each(self, session: Session, spec: Any, msgs: List[tuple], errors: Dict[int, TrtServeError]) -> None:
        for msg in msgs:
            self._fail(session, spec.name, spec.version, [msg], *failure(errors[msg[1]]))

    def _cancelled(self, session: Session, spec: Any, msgs: List[tuple]) -> None:
        self._fail(session, spec.name, spec.version, msgs, "CANCELLED", "the request was cancelled", "cancelled")

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
            array = on_host(result.outputs[name])
            wire = spec.output(name).datatype
            if name in delivered:  # only reported: its host result is not read (the backend did not copy it back)
                hosts[name] = array
                pieces.append((name, wire, (each,) + tuple(array.shape[1:]), [msg[6][j][2][0] for msg in live],
                               array.nbytes // count, None))
                continue
            want = ARENA_DTYPES[wire]
            host = hosts[name] = np.ascontiguousarray(array if array.dtype == want else array.astype(want))
            per = host.reshape((count, each) + tuple(host.shape[1:]))
            if index is not None:
                per = per[index]
            slots = [msg[6][j][2] for msg in live]  # (offset, bytes) of each live member's slot
            nbytes = host.nbytes // count
            fits = fits and all(size >= nbytes for _offset, size in slots)
            pieces.append((name, wire, (each,) + tuple(host.shape[1:]), [offset for offset, _size in slots], nbytes,
                           per))
        if fits:
            written = []
            for name, wire, shape, offsets, nbytes, per in pieces:
                if per is not None and arena is not None and live:
                    arena.scatter(offsets, per)
                written.append((name, wire, shape, offsets, nbytes))
            return tuple(written)
        position = {msg[1]: i for i, msg in enumerate(msgs)}
        for msg in live:
            start = position[msg[1]] * each
            own = RequestResult({name: host[start:start + each] for name, host in hosts.items()}, 0, 0, 0, 0, 0,
                                delivered)
            session.answer(msg[1], "", "", write_outputs(session, None, spec, msg[6], own))
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
                host = on_host(array)
                for msg in live:
                    k = position[msg[1]]
                    if msg[1] not in failed:
                        try:
                            shms[k].write_output(name, wire, host[k * each:(k + 1) * each])
                        except TrtServeError as e:
                            failed[msg[1]] = e
            written.append((name, wire, (each,) + tuple(array.shape[1:]), None, 0))
        return tuple(written), failed


def _arena_pieces(arena: Any, msgs: List[tuple], j: int, dtype: np.dtype, shape: Tuple[int, ...],
                  rows: int) -> Gather:
    """Input ``j`` of a group of large requests, left where each lies in the (page-locked) arena, as columns."""
    count = len(msgs)
    offsets = np.fromiter((msg[5][j][3][1] for msg in msgs), np.int64, count)
    nbytes = dtype.itemsize * math.prod(shape)
    columns = PieceColumns(arena.addresses(offsets, nbytes), np.full(count, id(arena), np.int64), nbytes,
                           lambda: tuple([arena.array(o, dtype, shape) for o in offsets.tolist()]))
    return Gather(None, (rows,) + tuple(shape[1:]), dtype, columns)


def _arena_members(arena: Any, msgs: List[tuple], min_bytes: int) -> Optional[MemberOutputs]:
    """Where the device writes each member's outputs: the outputs whose every member's slot holds at least
    ``min_bytes``, as columns. None when an output's slots are large for some members and not for others (the
    device writes an output of a group for every member or for none, as delivered means every member got it: then
    the group's outputs go through the host) or when no output goes so."""
    outputs: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    for j, (name, _shm, _slot) in enumerate(msgs[0][6]):
        slots = np.array([msg[6][j][2] for msg in msgs], np.int64).reshape(-1, 2)
        large = slots[:, 1] >= min_bytes
        if not large.all():
            if large.any():
                return None
            continue
        outputs[name] = (arena.addresses(slots[:, 0], slots[:, 1]), slots[:, 1])
    return MemberOutputs(outputs, len(msgs)) if outputs else None


def _arena_offset(msg: tuple) -> int:
    """Where an INFER's first input lies in its front end's arena (its source is ``(ARENA, offset, bytes)``)."""
    return msg[5][0][3][1]

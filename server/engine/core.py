"""The engine's side of every front-end link: messages in, routed to where they are handled.

One ``Session`` per connected front end (session.py) holds its arena and the requests it has in flight. A request
arrives checked (the front end validated it against the model). INFERs that are alike (group.py) are queued as one
entry by group_path.py, every other one on its own by single_path.py; each path answers every request it takes
exactly once, whatever happens: a cancel, a deadline, a reload, the front end going away (then the answer is
dropped, and its arena is unmapped once nothing reads it any more).

Control calls (metadata, repository, shared-memory registration, statistics) are answered by
engine/control.py; this module only routes them, and pushes the log and trace settings control.py holds to
every front end (SETTINGS: on attach and on every change).

A traced request (the front end sampled it: the INFER's ``trace`` is the request's id, not None) gets its
QUEUE_START when it is queued, and its compute timestamps from the batcher's durations when it is done; they wait
in the session until the front end's TRACE brings REQUEST_END (the response built), and then the whole trace goes
to the one trace file (tracing.py).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Dict, List, Optional, Tuple

from trtserve.server.engine import group
from trtserve.server.engine.group_path import GroupPath
from trtserve.server.engine.outcome import Successes
from trtserve.server.engine.repository.registry import ModelRepository
from trtserve.server.engine.session import Session
from trtserve.server.engine.shm.registry import SharedMemoryRegistry
from trtserve.server.engine.single_path import SinglePath
from trtserve.server.errors import TrtServeError
from trtserve.server.events import Observer
from trtserve.server.ipc import messages as m
from trtserve.server.ipc.arena import Arena
from trtserve.server.ipc.channel import Link

log = logging.getLogger("trtserve.engine")

__all__ = ["EngineCore", "Session"]


class EngineCore:
    """Turns messages from front ends into batcher submissions and control calls."""

    def __init__(self, repository: ModelRepository, shared_memory: SharedMemoryRegistry, observer: Observer,
                 control: Callable[[str, tuple], "asyncio.Future"]) -> None:
        self._repo = repository
        self._observer = observer
        self._control = control
        self.sessions: List[Session] = []
        self._successes = Successes(observer)
        self._single = SinglePath(repository, shared_memory, observer, self._successes)
        self._groups = GroupPath(repository, shared_memory, observer, self._successes, self._single)
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
        for item in list(session.inflight.values()):  # every one is queued: each path answers those it does not queue
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
        self._successes.flush()
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
        alone = len(batch) == 1
        for msg in batch:
            tag = msg[0]
            try:
                if tag == m.INFER:
                    if alone:  # the read brought one request: no group to form, and the batcher may run it at once
                        self._single.infer(session, msg, alone=True)
                        continue
                    k = group.key(msg)
                    if k is not None:
                        allowed = self._allowed.get(k[:3])  # (model, version asked, serial): see _groups_allowed
                        if allowed is None:
                            allowed = self._groups_allowed(msg)
                        if not allowed:
                            k = None
                    if k is None:
                        self._single.infer(session, msg)
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
            self._groups.infer_group(session, msgs)

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
                item.requeue = req_id  # answered now; the others are queued again without it (group_path.py)
                item.cancel()
            return
        item.abandoned = True
        if not item.dispatched:
            item.cancel()  # still queued: it never runs, and its answer goes back now

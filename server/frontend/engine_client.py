"""The front end's handle on the engine: inference descriptors and control calls over one link.

Each inference holds one block of the front end's arena (its inputs and the slots for its outputs) from
``submit`` until the engine's RESULT has been read and the response built; a request the client gave up
on keeps its block until the engine answers it too, because until then the engine may still read it.
If the engine goes away, every waiting call fails UNAVAILABLE at once.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

from trtserve.server.errors import TrtServeError, Unavailable
from trtserve.server.ipc import messages as m
from trtserve.server.ipc.arena import Allocator, Arena
from trtserve.server.ipc.channel import Link
from trtserve.server.tracing import Sampler

log = logging.getLogger("trtserve.frontend")
_IN_SHM = (m.SHM,)  # an output's place in a RESULT when it was written into the client's shared memory


class RemoteError(TrtServeError):
    """An error the engine answered with; carries the engine's status code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class StaleModel(Exception):
    """The request was checked against a model version a reload has replaced: check it again."""


class EngineClient:
    """Owns the link to the engine and this front end's arena allocator."""

    def __init__(self, link: Link, arena: Arena) -> None:
        self.link = link
        self.arena = arena
        self.allocator = Allocator(arena.size)
        self.alive = True
        self.closing = False  # set once this front end stops: losing the engine then is expected
        self._ids = itertools.count(1)
        self._pending: Dict[int, Tuple["asyncio.Future", Optional[int]]] = {}
        self._calls: Dict[int, "asyncio.Future"] = {}
        self._models: Dict[Tuple[str, str], Tuple[Any, int]] = {}
        self._lost_callbacks: List[Callable[[], None]] = []
        self.sampler = Sampler()  # which requests to trace: the engine's trace settings (SETTINGS)
        self._attached: Optional["asyncio.Future[None]"] = None

    def start(self) -> None:
        self._attached = asyncio.get_running_loop().create_future()
        self.link.start(self._on_messages, self._on_lost)

    async def attached(self) -> None:
        """Returns once the engine serves this link (its first SETTINGS comes on attach). Until then requests
        would wait unread: the engine page-locks a front end's arena before attaching it, which takes long for
        a large arena, so a front end that took connections meanwhile would stall its clients. Raises
        Unavailable when the engine closes the link instead."""
        assert self._attached is not None, "start() first"
        await asyncio.shield(self._attached)
        if not self.alive:
            raise Unavailable("the engine closed the link before attaching this front end")

    def on_lost(self, callback: Callable[[], None]) -> None:
        self._lost_callbacks.append(callback)

    @property
    def inflight(self) -> int:
        return len(self._pending)

    # ---- control calls --------------------------------------------------------------------------------------------
    async def call(self, method: str, *args: Any) -> Any:
        if not self.alive:
            raise Unavailable("the engine process is not running")
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        self.link.send((m.CALL, call_id, method, args))
        try:
            return await fut
        finally:
            self._calls.pop(call_id, None)

    async def model(self, name: str, version: str) -> Tuple[Any, int]:
        """(ModelSpec, serial) to check a request against; asked of the engine once, then cached."""
        key = (name, version)
        hit = self._models.get(key)
        if hit is None:
            hit = tuple(await self.call("model_info", name, version))  # type: ignore[assignment]
            self._models[key] = hit  # type: ignore[assignment]
        return hit  # type: ignore[return-value]

    def forget_model(self, name: str, version: str) -> None:
        self._models.pop((name, version), None)

    # ---- inference ------------------------------------------------------------------------------------------------
    def submit(self, descriptor: tuple, block: Optional[int]) -> Tuple[int, "asyncio.Future"]:
        """Sends an INFER (``descriptor`` is the message without its tag and id); the future resolves to the
        outputs tuple of the RESULT. The engine reads ``block`` until it answers: then the caller frees it once the
        outputs are read, or this client does if the caller gave up; sent to an engine that is gone, at once."""
        if not self.alive:
            self.free(block)  # nothing will answer this request, so nothing else would free its block
            raise Unavailable("the engine process is not running")
        req_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[req_id] = (fut, block)
        self.link.send((m.INFER, req_id) + descriptor)
        return req_id, fut

    def cancel(self, req_id: int) -> None:
        """The client gave up: the engine drops it if it is still queued; its block is freed on the answer."""
        entry = self._pending.get(req_id)
        if entry is not None:
            entry[0].cancel()
            self.link.send((m.CANCEL, req_id))

    def free(self, block: Optional[int]) -> None:
        if block is not None:
            self.allocator.free(block)

    def trace_end(self, req_id: int, end_ns: int) -> None:
        """A traced request's response is built: its REQUEST_END, for the engine to write its trace."""
        if self.alive:
            self.link.send((m.TRACE, req_id, end_ns))

    def report_failure(self, model: str, version: str, reason: str, rows: int, request_ns: int) -> None:
        """A request refused here (statistics and metrics live in the engine)."""
        if self.alive:
            self.link.send((m.FAILED, model, version, reason, rows, request_ns))

    # ---- incoming -------------------------------------------------------------------------------------------------
    def _on_messages(self, batch: List[tuple]) -> None:
        for msg in batch:
            if msg[0] == m.RESULTS:
                self._results(msg[1], msg[2])
            elif msg[0] == m.RESULT:
                _, req_id, code, message, outputs = msg
                entry = self._pending.pop(req_id, None)
                if entry is None:
                    continue
                fut, block = entry
                if fut.done():  # the client gave up meanwhile: the block is ours again
                    self.free(block)
                elif not code:
                    fut.set_result(outputs)
                elif code == m.STALE:
                    fut.set_exception(StaleModel())
                else:
                    fut.set_exception(RemoteError(code, message))
            elif msg[0] == m.REPLY:
                _, call_id, code, message, value = msg
                fut = self._calls.get(call_id)
                if fut is None or fut.done():
                    continue
                if code:
                    fut.set_exception(RemoteError(code, message))
                else:
                    fut.set_result(value)
            elif msg[0] == m.SETTINGS:
                self._apply_settings(msg[1], msg[2])
                if self._attached is not None and not self._attached.done():
                    self._attached.set_result(None)

    def _results(self, req_ids: Tuple[int, ...], outputs: tuple) -> None:
        """The successful answers of a group of requests: each one's outputs as its own RESULT carries them (an
        output without offsets is in each request's shared-memory region)."""
        pending = self._pending
        for i, req_id in enumerate(req_ids):
            entry = pending.pop(req_id, None)
            if entry is None:
                continue
            fut, block = entry
            if fut.done():  # the client gave up meanwhile: the block is ours again
                self.free(block)
            else:
                fut.set_result(tuple([(name, wire, shape,
                                       _IN_SHM if offsets is None else (m.ARENA, offsets[i], nbytes))
                                      for name, wire, shape, offsets, nbytes in outputs]))

    def _apply_settings(self, log_settings: dict, trace_view: Any) -> None:
        from trtserve.server import logsettings

        try:
            logsettings.apply(log_settings)
        except OSError as e:  # the engine opened the same file: this process should too
            log.error("cannot apply the log settings: %s", e)
        self.sampler.update(trace_view)

    def _on_lost(self) -> None:
        if not self.alive:
            return
        self.alive = False
        if self._attached is not None and not self._attached.done():
            self._attached.set_result(None)  # attached() raises: the link is gone
        (log.info if self.closing else log.error)("the engine went away: answering %d requests UNAVAILABLE",
                                                  len(self._pending))
        error = "the engine process stopped; the request may not have run"
        for fut, block in list(self._pending.values()):
            if fut.done():
                self.free(block)
            else:
                fut.set_exception(Unavailable(error))
        self._pending.clear()
        for fut in list(self._calls.values()):
            if not fut.done():
                fut.set_exception(Unavailable(error))
        self._models.clear()
        for callback in self._lost_callbacks:
            callback()

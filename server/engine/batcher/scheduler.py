"""DynamicBatcher: one asyncio task per model version that ties queue, policy, assembly and the
executor pool together, and settles every request's ticket exactly once.

Everything here runs on the event loop; only ``_work`` (stack -> backend.enqueue/collect -> split) runs on an
instance's thread, or, for a pipelined backend, ``_begin`` (stack -> enqueue) on the instance's thread and
``_end`` (collect -> split) on its completion thread when another batch waits behind it, so the instance's next
batch is enqueued while the previous one still runs (a lone batch is collected where it was enqueued). In the
engine process (``inline``) a pipelined backend's ``_begin`` runs on the loop itself, the completion thread only
waits for the device (``Backend.wait``), and ``_end`` runs on the loop again (``_waiter``); a backend that is not
pipelined, with one instance, runs whole batches on the loop. The loop
sleeps on an Event (new request, released slot, cancellation) with a timeout for the next deadline or queue
delay: no busy waiting.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import time
import types
from typing import Callable, Deque, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np

from trtserve.server.engine.backends.base import (Backend, BatchResult, Destination, DeviceDestination, Gather,
                                                  MemberDestinations)
from trtserve.server.engine.batcher import assemble, policy
from trtserve.server.engine.batcher.contention import Contention
from trtserve.server.engine.batcher.request import MemberOutputs, Pending, RequestResult, Splitter, Ticket, TicketFuture
from trtserve.server.engine.batcher.shapes import ShapeRules, describe_profiles
from trtserve.server.errors import (DeadlineExceeded, Internal, InvalidArgument, QueueFull, QueueTimeout,
                                    TrtServeError, Unavailable)
from trtserve.server.events import Observer
from trtserve.server.engine.executor.pool import ExecutorPool
from trtserve.server.engine.repository.model_config import ModelSpec
from trtserve.server.process.alarm import Alarm

log = logging.getLogger("trtserve.batcher")

# a batch runs on the engine's loop only when it should take less than this: the hand-off to the instance thread
# it saves costs tens of microseconds, so past a few milliseconds it is a small share of the batch, while every
# control call (readiness, metadata, a front end's first request of a model) waits out an inline batch
INLINE_MAX_S = 0.002


class DynamicBatcher:
    """Queues requests for one model version and runs them in batches on the backend's instances."""

    def __init__(self, spec: ModelSpec, backend: Backend, observer: Observer,
                 clock: Callable[[], float] = time.monotonic, inline: bool = False) -> None:
        self.spec = spec
        self._backend = backend
        # run short batches on the loop's own thread: only where the loop does nothing else (the engine process)
        # and the backend has one instance that is not pipelined; it saves the hand-off to the instance thread and
        # back (most of the engine's cost per small batch), and while a batch runs, new requests gather in the
        # socket and arrive together as the next batch. Only batches known to be short (see _runs_inline): while
        # one runs, the loop answers nothing else, readiness and metadata included
        self._inline = inline and not backend.pipelined and backend.instance_count() == 1
        self._row_s: Optional[float] = None  # recent CPU seconds per row of a batch on this model (_work measures)
        self._on_thread: Set[int] = set()  # batches (seq) handed to the instance thread and not answered yet
        # a pipelined backend's enqueue only queues work on the device and returns, so where the loop serves only
        # the engine it runs right here, and only the wait for the device goes to the instance's completion
        # thread: an instance thread would take and give back the GIL around each of a batch's many CUDA calls,
        # waiting for the busy loop every time (profiled on the GPU engine: the instance threads spent most of a
        # batch waiting for the GIL inside their CUDA calls, and the device sat idle meanwhile)
        self._loop_enqueue = inline and backend.pipelined
        self._observer = observer
        self._clock = clock
        self._rules = ShapeRules(
            batches=spec.batches, max_batch_size=max(1, spec.max_batch_size), paddable=frozenset(spec.pad_values),
            profiles=tuple(backend.profiles()),
        )
        self._unpad = {
            out: (inp, tuple(i for i, d in enumerate(spec.output(out).dims) if d == -1))  # type: ignore[union-attr]
            for out, inp in spec.unpad.items()
        }
        self._pipelined = backend.pipelined and spec.batches_per_instance > 1
        self._pool = ExecutorPool(backend.instance_count(), name=spec.name, depth=spec.batches_per_instance,
                                  completion=self._pipelined or self._loop_enqueue)
        self._queues: Dict[int, Deque[Pending]] = {lvl: collections.deque()
                                                    for lvl in range(1, spec.batching.levels + 1)}
        self._queue_policies = {lvl: spec.batching.queue_policy(lvl) for lvl in self._queues}
        self._batches = spec.batches
        self._delayed: Deque[Pending] = collections.deque()
        self._wake = asyncio.Event()
        self._running: Dict[int, "asyncio.Future"] = {}  # one per batch handed to an instance, until answered
        self._seq = itertools.count()
        self._batch_seq = itertools.count()
        self._next_to_settle = 0
        self._finished: Dict[int, Callable[[], None]] = {}
        self._task: Optional["asyncio.Task"] = None
        self._closing = False
        self._stopped = asyncio.Event()
        # the queues are scanned for expiry only when something can have changed: a cancellation, or the
        # earliest deadline passing (a full scan per loop iteration was O(queue) at every wake-up)
        self._scan_needed = False
        self._next_expiry: Optional[float] = None
        self._unreported: Dict[int, int] = {}  # level -> requests queued and not yet reported to the observers
        self._contention = Contention()  # whether an idle instance may hold a partial batch (policy rule 4)
        self._cancel_hook = self._on_cancel  # bound once: every queued request's ticket holds it

    # ---- public API -------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Requests waiting, a group of them (engine/group.py) counted as its members, as the queue metrics count."""
        return sum(r.count for q in self._queues.values() for r in q) + sum(r.count for r in self._delayed)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.spec.name}")

    def submit(self, inputs: Mapping[str, np.ndarray], outputs: Tuple[str, ...], rows: int, priority: int = 0,
               timeout_us: int = 0, deadline: Optional[float] = None,
               device_outputs: Optional[Mapping[str, Tuple[int, int]]] = None,
               on_dispatch: Optional[Callable[[], None]] = None) -> "asyncio.Future[RequestResult]":
        """``queue`` for a caller that awaits one request: returns the future its answer arrives on
        (cancelling the future cancels the request)."""
        fut = TicketFuture(asyncio.get_running_loop())
        self.queue(fut.ticket, inputs, outputs, rows, priority, timeout_us, deadline, device_outputs, on_dispatch)
        return fut

    def queue(self, ticket: Ticket, inputs: Mapping[str, np.ndarray], outputs: Tuple[str, ...], rows: int,
              priority: int = 0, timeout_us: int = 0, deadline: Optional[float] = None,
              device_outputs: Optional[Mapping[str, Tuple[int, int]]] = None,
              on_dispatch: Optional[Callable[[], None]] = None,
              shapes: Optional[Dict[str, Tuple[int, ...]]] = None, count: int = 1,
              member_outputs: Optional[MemberOutputs] = None,
              members_apart: bool = False, splitter: Optional[Splitter] = None, at_once: bool = False) -> None:
        """Queues a validated request; its answer is settled on ``ticket`` (the engine's path: no future per
        request). ``device_outputs``: outputs the backend may write straight into device memory (name ->
        pointer, bytes; CUDA shared memory). ``on_dispatch``: called when the request joins a batch on an
        instance (see ``Pending.on_dispatch``). ``shapes``: each input's shape without the batch dimension
        (the whole shape when the model does not batch) when the caller has them already; else read from the
        arrays. ``count``: how many client requests this entry stands for (a group of them, see
        ``Pending.count``): queue metrics and batch statistics count those; the queue's size limit counts entries
        (the engine groups no requests of a model that has one). ``member_outputs``: such a group's
        ``device_outputs``, as columns with a row per member (members have equal rows); ``members_apart``: their
        memory lies in separate blocks of device memory (clients' CUDA shared memory on the model's GPU), not in one
        arena.
        ``splitter``: a batch may take only the first members of such a group (policy rule 2; see ``Splitter``);
        kept only for a group whose members have equal rows and whose inputs in pieces have one piece each.
        ``at_once``: the caller knows of no other request arriving with this one; where the batcher would run it
        alone on its next turn anyway, it runs here and now, and its ticket is settled before this returns (see
        ``_at_once``).

        Raises (synchronously) InvalidArgument for a bad priority or a shape no profile accepts, and
        Unavailable when the model is shutting down or the priority level's queue is full.
        """
        if self._closing:
            raise Unavailable(f"model '{self.spec.name}' is unloading; retry once it is ready again")
        b = self.spec.batching
        try:
            level = b.level_of(priority) if b.enabled else 1
        except ValueError as e:
            raise InvalidArgument(f"model '{self.spec.name}': {e}") from None
        self._backend.check_request(inputs)
        if shapes is None:
            if self._batches:
                shapes = {n: tuple(a.shape[1:]) for n, a in inputs.items()}
            else:
                shapes = {n: tuple(a.shape) for n, a in inputs.items()}
        if not self._rules.accepts(rows, shapes):
            full = {n: list(s) for n, s in self._rules.full(rows, shapes).items()}
            raise InvalidArgument(f"model '{self.spec.name}': input shapes {full} fit no optimization profile; "
                                  f"profiles: {describe_profiles(self._rules.profiles)}")
        qp = self._queue_policies[level]
        queue = self._queues[level]
        # entries, not requests: the engine groups requests only for models without a queue size limit (group.py)
        if qp.max_queue_size and len(queue) >= qp.max_queue_size:
            raise QueueFull(f"model '{self.spec.name}': the queue for priority level {level} is full "
                              f"(max_queue_size {qp.max_queue_size}); request rejected")
        now = self._clock()
        timeout = qp.default_timeout_us
        if timeout_us > 0 and qp.allow_timeout_override:
            timeout = min(timeout, timeout_us) if timeout else timeout_us
        queue_deadline = (now + timeout / 1e6) if timeout else None
        if splitter is not None and not _splittable(inputs, rows, count, member_outputs):
            splitter = None
        req = Pending(inputs, outputs, rows, shapes, level, now, ticket, queue_deadline, deadline, False,
                      next(self._seq), device_outputs or _NO_DEVICE_OUTPUTS, on_dispatch, count, member_outputs,
                      members_apart, splitter)
        ticket.on_cancel = self._cancel_hook
        self._contention.arrival(bool(self._delayed) or any(self._queues.values()), bool(self._running), count)
        if at_once:
            p = self._at_once(req, now)
            if p is not None:
                if on_dispatch is not None:
                    on_dispatch()
                self._start(p, now)  # on the loop, answered before this returns; the instance is freed next turn
                return
        queue.append(req)
        if deadline is not None or queue_deadline is not None:
            self._next_expiry = _earliest(self._next_expiry, deadline, queue_deadline)
        self._unreported[level] = self._unreported.get(level, 0) + count  # reported by the loop, see _report_queued
        self._wake.set()

    def _at_once(self, req: Pending, now: float) -> Optional[policy.Plan]:
        """The batch of ``req`` alone, when the batcher's next turn would run exactly that batch on the loop
        (rule 4 with nothing else queued or running, on an idle instance that fits it, a batch short enough for the
        loop) and the model's requests are a lone client's (``Contention.lone``: else a request of another front end
        read in the same turn could still join it); None otherwise, and the request is queued as usual. Run here, a lone
        client's request skips the queue, the loop's turn and the batch's hand-offs between them, a good part of the
        engine's own time per request when one is in flight (docs/architecture.md, "The engine's own cost").
        It runs as a batch the loop dispatched does (``_start``): its instance stays held until the loop's next turn,
        so a request read after it in the same turn finds the model in use, as it would have found it queued, and the
        model's contention (rule 4) reads the same as without this lane."""
        if not self._inline or self._closing or self._running or self._queued() or req.count != 1:
            return None
        if req.deadline is not None and now >= req.deadline:
            return None  # the queue answers it DEADLINE_EXCEEDED, unexecuted
        if not self._runs_inline(req.rows):
            return None
        self._contention.look(now)
        if not self._contention.lone():
            return None  # others' requests may be on their way: the queue decides (and may hold the batch)
        instance, profile = policy.place(self._rules, req.rows, req.shapes, self._pool.free())
        if instance is None:
            return None
        return policy.Plan([req], req.rows, req.shapes, instance, profile)

    def _report_queued(self) -> None:
        """Tells the observers about the requests queued since the last report, one call per level: the loop
        does it on each wake-up (a burst of requests costs one call, not one each) and before any dequeue,
        so the pending count never goes below zero."""
        if self._unreported:
            unreported, self._unreported = self._unreported, {}
            for level, count in unreported.items():
                self._observer.request_queued(self.spec.name, self.spec.version, level, count)

    def _dequeued(self, level: int, count: int = 1) -> None:
        self._report_queued()
        self._observer.request_dequeued(self.spec.name, self.spec.version, level, count)

    def poke(self) -> None:
        """Re-evaluates the queue now (tests with an injected clock call this after moving time)."""
        self._wake.set()

    async def stop(self, timeout: Optional[float] = None) -> None:
        """Stops accepting, lets queued and running batches finish (up to ``timeout`` s), then
        answers anything left UNAVAILABLE and shuts the instance threads down."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._stopped.wait()), timeout)
            except asyncio.TimeoutError:
                self._task.cancel()
        for req in self._drain_all():
            req.ticket.settle(error=Unavailable(f"model '{self.spec.name}' was unloaded before the request ran"))
        if self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown)

    # ---- scheduling loop --------------------------------------------------------------------
    def _on_cancel(self) -> None:
        self._scan_needed = True
        self._wake.set()  # the loop purges it from its queue

    def _queued(self) -> bool:
        """Whether any request waits (cheaper than ``pending``, which counts them)."""
        return bool(self._delayed) or any(self._queues.values())

    def _ordered(self) -> List[Pending]:
        out: List[Pending] = []
        for lvl in sorted(self._queues):
            out.extend(self._queues[lvl])
        out.extend(self._delayed)
        return out

    def _purge_and_expire(self, now: float) -> Optional[float]:
        """Answers expired requests, drops cancelled ones, moves DELAY timeouts behind everything
        else; returns the next time something expires (or None)."""
        if not self._scan_needed and (self._next_expiry is None or now < self._next_expiry):
            return self._next_expiry
        self._scan_needed = False
        nxt: Optional[float] = None
        newly_delayed: List[Pending] = []
        for lvl in list(self._queues):
            keep: Deque[Pending] = collections.deque()
            for r in self._queues[lvl]:
                if self._expire(r, now):
                    continue
                if r.queue_deadline is not None and now >= r.queue_deadline:
                    if self.spec.batching.queue_policy(r.level).timeout_action == "DELAY":
                        r.delayed = True
                        newly_delayed.append(r)
                        continue
                    self._dequeued(r.level, r.count)
                    r.ticket.settle(error=QueueTimeout(
                        f"model '{self.spec.name}': request timed out in the queue after "
                        f"{(now - r.arrival) * 1e6:.0f} us (queue policy timeout, timeout_action REJECT)"))
                    continue
                keep.append(r)
                nxt = _earliest(nxt, r.deadline, r.queue_deadline)
            self._queues[lvl] = keep
        kept = [r for r in self._delayed if not self._expire(r, now)]
        self._delayed = collections.deque(kept + newly_delayed)
        for r in self._delayed:
            nxt = _earliest(nxt, r.deadline)
        self._next_expiry = nxt
        return nxt

    def _expire(self, r: Pending, now: float) -> bool:
        """True (and answered, if needed) when ``r`` was cancelled or its client deadline passed."""
        if r.ticket.done():  # cancelled by the client
            self._dequeued(r.level, r.count)
            return True
        if r.deadline is not None and now >= r.deadline:
            self._dequeued(r.level, r.count)
            r.ticket.settle(error=DeadlineExceeded(
                f"model '{self.spec.name}': the request's deadline expired after "
                f"{(now - r.arrival) * 1e3:.1f} ms in the queue; it was not executed"))
            return True
        return False

    async def _loop(self) -> None:
        alarm = Alarm(self._wake.set)  # holds and queue delays are fractions of a millisecond: see process/alarm.py
        try:
            while True:
                self._wake.clear()
                self._report_queued()
                now = self._clock()
                self._contention.look(now)
                next_deadline = self._purge_and_expire(now)
                if self._closing and not self.pending and not self._running:
                    break
                free, queueable = (self._pool.free(), self._pool.queueable()) if self._queued() else (None, None)
                # every instance full (the usual case under load, woken by each new request), or nothing queued (the
                # turn after a batch was dispatched, under light load): nothing to plan
                p = policy.plan(self._ordered(), now, self.spec.batching, self._rules, free,
                                busy=self._pool.busy(), queueable=queueable,
                                hold=self._contention.hold_until()) if free or queueable else policy.Plan()
                if p.requests:
                    self._dispatch(p, now)
                    continue
                waits = [w for w in (p.wait_s, None if next_deadline is None else next_deadline - now)
                         if w is not None]
                if not waits:
                    await self._wake.wait()
                    continue
                # an alarm that sets the event, not asyncio.wait_for: that wraps the wait in a Task of its own and
                # adds callbacks, on every wait of this loop (every batch under light load)
                # from this turn's clock reading: a moment asked for again on a later turn (the queue delay of the
                # same oldest request) finds the alarm armed for it already (process/alarm.py)
                alarm.set(min(waits), since=now if self._clock is time.monotonic else None)
                try:
                    await self._wake.wait()
                finally:
                    alarm.cancel()
        except Exception:  # a bug here must not leave requests hanging: answer them all
            log.exception("batcher loop for model '%s' failed", self.spec.name)
            for req in self._drain_all():
                req.ticket.settle(error=Internal(f"model '{self.spec.name}': scheduler failure"))
        finally:
            alarm.close()
            self._stopped.set()

    def _drain_all(self) -> List[Pending]:
        reqs = self._ordered()
        for q in self._queues.values():
            q.clear()
        self._delayed.clear()
        for r in reqs:
            self._dequeued(r.level, r.count)
        return reqs

    def _split(self, r: Pending, k: int) -> None:
        """Policy rule 2: ``r`` keeps its first ``k`` members (and joins the batch); the others stay queued right
        behind it as an entry of their own, with its level, arrival and order, so they go first in the next batch.
        Queue counts need no change: the batch dequeues the ``k`` it takes."""
        assert r.splitter is not None and 0 < k < r.count
        head_rows = k * (r.rows // r.count)
        head: Dict[str, object] = {}
        tail: Dict[str, object] = {}
        for name, a in r.inputs.items():
            if isinstance(a, Gather):  # one piece per member (_splittable)
                head[name], tail[name] = a.split(k, head_rows)
            else:
                head[name], tail[name] = a[:head_rows], a[head_rows:]  # type: ignore[index]
        part = r.splitter(r.ticket, k)
        members = r.member_outputs
        rest = Pending(tail, r.outputs, r.rows - head_rows, r.shapes, r.level, r.arrival, part.ticket,
                       r.queue_deadline, part.tail_deadline, r.delayed, r.seq, r.device_outputs, part.on_dispatch,
                       r.count - k, None if members is None else members[k:], r.members_apart, r.splitter)
        part.ticket.on_cancel = self._cancel_hook
        r.inputs, r.rows, r.count, r.deadline = head, head_rows, k, part.head_deadline
        if members is not None:
            r.member_outputs = members[:k]
        q = self._delayed if r.delayed else self._queues[r.level]
        q.insert(q.index(r) + 1, rest)

    def _dispatch(self, p: policy.Plan, now: float) -> None:
        if p.split:
            self._split(p.requests[-1], p.split)
        q = self._queues[p.requests[0].level]
        n = len(p.requests)
        if not p.requests[0].delayed and len(q) >= n and all(q[i] is r for i, r in enumerate(p.requests)):
            for _ in range(n):  # the usual case: the batch is the head of one level's queue
                q.popleft()
        else:
            taken = set(id(r) for r in p.requests)
            for lvl, q in self._queues.items():
                if any(id(r) in taken for r in q):
                    self._queues[lvl] = collections.deque(r for r in q if id(r) not in taken)
            self._delayed = collections.deque(r for r in self._delayed if id(r) not in taken)
        levels: Dict[int, int] = {}
        for r in p.requests:
            levels[r.level] = levels.get(r.level, 0) + r.count
            if r.on_dispatch is not None:
                r.on_dispatch()
        for level, count in levels.items():  # one observer call per level, not per request
            self._dequeued(level, count)
        self._start(p, now)

    def _start(self, p: policy.Plan, now: float) -> None:
        """Runs a batch taken from the queue (or one run at once, ``_at_once``) on its instance."""
        assert p.instance is not None
        self._pool.acquire(p.instance)
        seq = next(self._batch_seq)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._running[seq] = done

        def finished(f: "concurrent.futures.Future") -> None:  # on the instance (or completion) thread
            try:
                loop.call_soon_threadsafe(self._complete, p, seq, now, f, done)
            except RuntimeError:  # the loop is closed: the process is exiting, nobody waits for the answer
                pass

        instance = p.instance
        if self._inline and self._runs_inline(p.rows):
            # answered at once, so the answers leave with this turn's writes; the instance is freed in the next
            # turn, not this one, so the loop goes back to its sockets between inline batches and a request that
            # arrived meanwhile (a higher priority) is seen before the next batch is planned
            self._complete(p, seq, now, _Outcome.of(lambda: self._work(p)), done, release=False)
            loop.call_soon(self._release, instance, seq, done)
            return
        if self._loop_enqueue:
            # the instance's slot for this batch is free: the batch that used it last was answered (and released
            # the instance) before the pool let this one in, so enqueue does not wait here
            try:
                begun = self._begin(p)
            except BaseException as e:  # noqa: BLE001 - whatever happens, the batch gets its one answer
                failed: "concurrent.futures.Future" = concurrent.futures.Future()
                failed.set_exception(e)
                loop.call_soon(self._complete, p, seq, now, failed, done)
                return
            self._pool.after(instance, self._waiter(p, seq, now, begun, done, loop))
            return
        if not self._pipelined:
            # a plain done-callback, not a Task awaiting run_in_executor: the result is handled in the first loop
            # iteration after the thread finishes (a Task, a future chain and two loop iterations per batch less:
            # fake backend, 0.4 ms per batch, one instance: 1,070-1,205 -> 1,476-1,509 batches/s)
            if self._inline:
                self._on_thread.add(seq)  # no batch runs on the loop until this one is answered (_complete)
            self._pool.submit(instance, lambda: self._work(p)).add_done_callback(finished)
            return

        def on_instance() -> None:  # the instance's thread: enqueue, then wait here or hand the wait over
            out: "concurrent.futures.Future" = concurrent.futures.Future()
            try:
                ticket = self._begin(p)
                if self._pool.holds(instance) > 1:
                    # another batch waits behind this one: the completion thread waits for this one meanwhile
                    self._pool.complete(instance, lambda: self._end(p, *ticket)).add_done_callback(finished)
                    return
                # nothing behind it: wait right here and save the hand-off (one request at a time through the
                # batcher, 50 us backend, 2-core VM: p50 417-645 us with the hand-off, 292-382 us without it, the
                # same as no pipelining, 323-363 us). A batch dispatched meanwhile waits in this
                # thread's FIFO as it would without pipelining; an earlier batch of this instance is never still
                # being collected, since it stays held until answered.
                out.set_result(self._end(p, *ticket))
            except BaseException as e:  # noqa: BLE001 - whatever happens, the batch gets its one answer
                out.set_exception(e)
            finished(out)

        # submitted as one function, not chained with add_done_callback: a callback added to a future that is
        # already done runs on the adding thread, and that would put the wait on the event loop
        self._pool.submit(instance, on_instance)

    def _waiter(self, p: policy.Plan, seq: int, dispatched: float, begun: Tuple[object, int, float],
                done: "asyncio.Future", loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """The completion thread's part of a batch the loop enqueued: wait for the device, then hand the batch to
        the loop, which collects, splits and answers it (``_collected``). Only the wait runs there: anything more
        would hold the GIL on that thread while the loop, which enqueues every batch, waits for it. A backend that
        cannot wait apart (``Backend.wait`` says False) is collected and split on that thread instead."""
        backend, instance, ticket = self._backend, p.instance, begun[0]

        def wait() -> None:
            outcome: Optional[_Outcome] = None
            try:
                apart = backend.wait(instance, ticket)  # type: ignore[arg-type]
            except BaseException:  # noqa: BLE001 - collect raises it again, on the loop
                apart = True
            if not apart:
                outcome = _Outcome.of(lambda: self._end(p, *begun))
            try:
                loop.call_soon_threadsafe(self._collected, p, seq, dispatched, begun, outcome, done)
            except RuntimeError:  # the loop is closed: the process is exiting, nobody waits for the answer
                pass

        return wait

    def _collected(self, p: policy.Plan, seq: int, dispatched: float, begun: Tuple[object, int, float],
                   outcome: Optional["_Outcome"], done: "asyncio.Future") -> None:
        """On the loop: the batch finished on the device; collected and split here unless the completion thread
        did, then answered."""
        if outcome is None:
            outcome = _Outcome.of(lambda: self._end(p, *begun))
        self._complete(p, seq, dispatched, outcome, done)

    def _begin(self, p: policy.Plan) -> Tuple[object, int, float]:
        """Instance thread: stacks the batch and starts it; (backend ticket, host ns spent, start time)."""
        started = self._clock()  # a batch queued behind another (policy rule 5) waited until now
        if all(r.ticket.done() or (r.deadline is not None and started >= r.deadline) for r in p.requests):
            # every client gave up while the batch waited on the instance: do not spend the device on it
            # (reading done() from this thread is a plain state read; a race only means running it anyway)
            raise _Abandoned()
        t0 = time.perf_counter_ns()
        names = tuple(dict.fromkeys(n for r in p.requests for n in r.outputs))
        staging = None
        assert p.instance is not None
        if len(p.requests) > 1:  # one request goes as it is: its array is the batch
            staging = self._backend.staging(p.instance, self._rules.full(p.rows, p.shapes))  # type: ignore[arg-type]
        inputs = assemble.stack(p.requests, p.shapes, self.spec.pad_values, self.spec.batches, staging,
                                self._backend.direct_copy_min_bytes)
        t1 = time.perf_counter_ns()
        ticket = self._backend.enqueue(p.instance, inputs, names, self._destinations(p.requests))
        return ticket, t1 - t0, started

    def _end(self, p: policy.Plan, ticket: object, stack_ns: int,
             started: float) -> Tuple[BatchResult, Sequence[Dict[str, np.ndarray]], int, float]:
        """Waits for the batch and splits its outputs per request; (result, outputs per request, host ns, start)."""
        assert p.instance is not None
        result = self._backend.collect(p.instance, ticket)
        t2 = time.perf_counter_ns()
        per_request = assemble.split(result.outputs, p.requests, self._unpad, self.spec.batches)
        return result, per_request, stack_ns + (time.perf_counter_ns() - t2), started

    def _runs_inline(self, rows: int) -> bool:
        """Whether a batch of ``rows`` runs on the loop: when no batch is on the instance's thread (it must not run
        beside this one) and this model's recent batches say it takes under INLINE_MAX_S. A model not measured yet
        runs its first batch on the instance thread."""
        row_s = self._row_s
        return row_s is not None and row_s * rows < INLINE_MAX_S and not self._on_thread

    def _work(self, p: policy.Plan) -> Tuple[BatchResult, Sequence[Dict[str, np.ndarray]], int, float]:
        """Both halves on the instance's thread (backends that are not pipelined, or one batch per instance)."""
        if not self._inline:  # nothing reads the measure
            return self._end(p, *self._begin(p))
        # CPU time of this thread, not wall time: on the instance thread, waiting for the GIL the busy loop holds
        # would count, and the model would look slower the busier the engine is
        t0 = time.thread_time()
        out = self._end(p, *self._begin(p))
        row_s = (time.thread_time() - t0) / max(1, p.rows)
        # the latest batch weighs most, and a slow one at once: a model that turned slow leaves the loop now
        prev = self._row_s
        self._row_s = row_s if prev is None or row_s > prev else 0.5 * (prev + row_s)
        return out

    def _destinations(self, requests: Sequence[Pending]) -> List[Destination]:
        """Where requests want outputs in device memory: each one's rows (an unbatched model: the whole
        output; a group: its members' as columns, MemberDestinations, with the group's index). Outputs sliced back per
        request along variable dims (``trtserve.unpad``) are not contiguous rows, so the server writes those from
        the host result."""
        out: List[Destination] = []
        offset = 0
        for i, r in enumerate(requests):
            if r.member_outputs:  # a group: each member's rows to its own memory (groups never unpad), as columns
                members = r.member_outputs
                out.append(MemberDestinations(i, offset, r.rows // members.count, members.count, members.outputs,
                                              r.members_apart))
            elif r.device_outputs:  # most requests want none: no dict built for them
                wanted = {n: d for n, d in r.device_outputs.items() if n not in self._unpad}
                if wanted:
                    out.append(DeviceDestination(i, offset if self.spec.batches else 0, r.rows, wanted))
            offset += r.rows
        return out

    def _complete(self, p: policy.Plan, seq: int, dispatched: float, f: "Union[concurrent.futures.Future, _Outcome]",
                  done: "asyncio.Future", release: bool = True) -> None:
        """On the loop, once the batch's work finished (``_work``, or ``_end`` on the instance or completion
        thread): answers the batch's requests and frees the instance (``release`` False: the caller frees it with
        ``_release`` later)."""
        try:
            self._answer(p, seq, dispatched, f)
        except Exception:  # a bug while answering must not leave the batch's requests without an answer
            log.exception("model '%s': answering a batch of %d rows failed", self.spec.name, p.rows)
            for r in p.requests:
                r.ticket.settle(error=Internal(f"model '{self.spec.name}': failed to answer the batch"))
        finally:
            if release:
                assert p.instance is not None
                self._release(p.instance, seq, done)

    def _release(self, instance: int, seq: int, done: "asyncio.Future") -> None:
        """The batch is answered: its instance takes the next one."""
        self._pool.release(instance)
        self._running.pop(seq, None)
        self._on_thread.discard(seq)
        if not done.done():
            done.set_result(None)
        if self._closing or self._queued():
            self._wake.set()  # the loop plans what runs next on the freed instance (nothing queued: nothing to plan)

    def _answer(self, p: policy.Plan, seq: int, dispatched: float,
                f: "Union[concurrent.futures.Future, _Outcome]") -> None:
        assert p.instance is not None
        error: Optional[BaseException] = None
        abandoned = False
        try:
            result, per_request, extra_ns, started = f.result()
        except _Abandoned:
            abandoned = True
            error = DeadlineExceeded(f"model '{self.spec.name}': the request was cancelled or its deadline "
                                     "expired while its batch waited for an instance; it was not executed")
        except TrtServeError as e:
            error = e
        except Exception as e:  # a backend bug fails this batch only; the scheduler keeps serving
            log.exception("model '%s': batch of %d rows failed", self.spec.name, p.rows, exc_info=e)
            error = Internal(f"model '{self.spec.name}': batch execution failed: {type(e).__name__}: {e}")
        name, version = self.spec.name, self.spec.version
        if error is not None:
            if not abandoned:  # an abandoned batch never executed: no execution to count
                self._observer.batch_done(name, version, p.rows, _requests(p), 0, 0, 0, ok=False)
            self._finish(seq, lambda: [r.ticket.settle(error=error) for r in p.requests])
            return
        cin = result.compute_input_ns + extra_ns

        def answer() -> None:
            start, infer_ns, output_ns, delivered = (max(started, dispatched), result.compute_infer_ns,
                                                     result.compute_output_ns, result.delivered)
            for i, (r, outs) in enumerate(zip(p.requests, per_request)):
                r.ticket.settle(RequestResult(outs, int((start - r.arrival) * 1e9), cin, infer_ns, output_ns, p.rows,
                                              delivered.get(i, _NOTHING_DELIVERED)))

        try:
            self._finish(seq, answer)
        finally:
            # counted once the answers are out: nothing reads the counts before this turn of the loop ends (a
            # statistics call is handled on a later one), and with one request in flight the client waits on them
            self._observer.batch_done(name, version, p.rows, _requests(p), cin, result.compute_infer_ns,
                                      result.compute_output_ns, ok=True)

    def _finish(self, seq: int, answer: Callable[[], object]) -> None:
        """Answers now, or in dispatch order when preserve_ordering is set."""
        if not self.spec.batching.preserve_ordering:
            answer()
            return
        self._finished[seq] = answer
        while self._next_to_settle in self._finished:
            self._finished.pop(self._next_to_settle)()
            self._next_to_settle += 1


_NO_DEVICE_OUTPUTS: Mapping[str, Tuple[int, int]] = types.MappingProxyType({})
_NOTHING_DELIVERED: frozenset = frozenset()


class _Outcome:
    """What a batch's work returned or raised, read as a future's ``result()`` is (no future's lock and callbacks:
    one is made per batch on the engine's loop)."""

    __slots__ = ("_value", "_error")

    def __init__(self, value: object = None, error: Optional[BaseException] = None) -> None:
        self._value, self._error = value, error

    @staticmethod
    def of(work: Callable[[], object]) -> "_Outcome":
        try:
            return _Outcome(work())
        except BaseException as e:  # noqa: BLE001 - whatever happens, the batch gets its one answer
            return _Outcome(error=e)

    def result(self) -> object:
        if self._error is not None:
            raise self._error
        return self._value


class _Abandoned(Exception):
    """Raised on the instance thread when nobody waits for the batch any more."""


def _splittable(inputs: Mapping[str, object], rows: int, count: int,
                member_outputs: Optional[MemberOutputs]) -> bool:
    """Whether a group can be cut at any member: equal rows each, one piece (or one block of rows) per member."""
    if count < 2 or rows % count or (member_outputs is not None and len(member_outputs) != count):
        return False
    return all(a.count == count if isinstance(a, Gather) else getattr(a, "shape", (0,))[0] == rows
               for a in inputs.values())


def _requests(p: policy.Plan) -> int:
    """Client requests in a batch (an entry may stand for several, see Pending.count)."""
    return sum(r.count for r in p.requests)


def _earliest(current: Optional[float], *times: Optional[float]) -> Optional[float]:
    for t in times:
        if t is not None and (current is None or t < current):
            current = t
    return current

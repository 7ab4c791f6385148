"""A request waiting in (or taken from) a batcher queue, and the ticket its one answer is settled on."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Dict, FrozenSet, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

Shape = Tuple[int, ...]

log = logging.getLogger("trtserve.batcher")


class Ticket:
    """A request's one answer: settled once, by the batcher (a result or an error) or by its owner (cancel).

    The engine answers many thousands of requests a second on one thread; an asyncio.Future per request
    cost a future, two done-callbacks and a loop turn (a Handle) per answer. A ticket calls its owner's
    ``on_settled`` right away, on the thread that settles it (the event loop's), so a batch's answers go out
    in one pass. ``on_cancel`` is the batcher's hook (purge the queue); both are set before it is queued.
    """

    __slots__ = ("result", "error", "cancelled", "_done", "on_settled", "on_cancel")

    def __init__(self, on_settled: Callable[["Ticket"], None]) -> None:
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.cancelled = False
        self._done = False
        self.on_settled = on_settled
        self.on_cancel: Optional[Callable[[], None]] = None

    def done(self) -> bool:
        """A plain read: the instance thread may ask whether anybody still waits for a batch."""
        return self._done

    def settle(self, result: Any = None, error: Optional[BaseException] = None) -> bool:
        """Answers once; False if it was already answered or cancelled."""
        if self._done:
            return False
        self._done = True
        self.result, self.error = result, error
        self._notify()
        return True

    def cancel(self) -> bool:
        """The owner gives up (its client cancelled): the batcher drops the request if it is still queued."""
        if self._done:
            return False
        self._done = True
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel()
        self._notify()
        return True

    def _notify(self) -> None:
        try:
            self.on_settled(self)
        except Exception:  # noqa: BLE001 - the owner's failure must not stop the batch's other answers
            log.exception("answering a request failed")


class TicketFuture(asyncio.Future):
    """An asyncio.Future over a ticket, for callers that await one request (tests, benchmarks, tools):
    cancelling it cancels the ticket at once, as cancelling the batcher's future always did."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self.ticket = Ticket(self._settled)

    def _settled(self, ticket: Ticket) -> None:
        if self.done():
            return
        if ticket.cancelled:
            super().cancel()
        elif ticket.error is not None:
            self.set_exception(ticket.error)
        else:
            self.set_result(ticket.result)

    def cancel(self, msg: Any = None) -> bool:  # type: ignore[override]
        if self.done():
            return False
        self.ticket.cancel()  # settles this future through _settled
        return True


class MemberOutputs:
    """A group's ``device_outputs`` as columns (engine/group.py): per output, each member's address and room in bytes,
    in member order (int64 arrays for members in one arena, lists for members apart; see
    backends.base.MemberDestinations). Sliced when a batch takes only the first members."""

    __slots__ = ("outputs", "count")

    def __init__(self, outputs: Dict[str, Tuple[Sequence[int], Sequence[int]]], count: int) -> None:
        self.outputs = outputs
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, part: slice) -> "MemberOutputs":
        return MemberOutputs({n: (a[part], r[part]) for n, (a, r) in self.outputs.items()},
                             len(range(self.count)[part]))


class Pending:
    """One validated request. ``shapes`` are the non-batch shapes per input (full shape when the
    model does not batch); ``rows`` is its batch dimension (1 when the model does not batch).

    A plain class with slots, not a dataclass: one is made per request on the engine's one busy thread, and
    slots make it smaller and its creation and attribute reads cheaper."""

    __slots__ = ("inputs", "outputs", "rows", "shapes", "level", "arrival", "ticket", "queue_deadline", "deadline",
                 "delayed", "seq", "device_outputs", "on_dispatch", "count", "member_outputs",
                 "members_apart", "splitter")

    def __init__(self, inputs: Mapping[str, np.ndarray], outputs: Tuple[str, ...], rows: int, shapes: Dict[str, Shape],
                 level: int, arrival: float, ticket: Ticket, queue_deadline: Optional[float] = None,
                 deadline: Optional[float] = None, delayed: bool = False, seq: int = 0,
                 device_outputs: Optional[Mapping[str, Tuple[int, int]]] = None,
                 on_dispatch: Optional[Callable[[], None]] = None, count: int = 1,
                 member_outputs: Optional[MemberOutputs] = None,
                 members_apart: bool = False, splitter: Optional["Splitter"] = None) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.rows = rows
        self.shapes = shapes
        self.level = level  # priority level, 1 = highest
        self.arrival = arrival  # batcher clock, seconds
        self.ticket = ticket
        self.queue_deadline = queue_deadline  # queue-policy timeout (batcher clock)
        self.deadline = deadline  # the client's gRPC deadline (batcher clock)
        self.delayed = delayed  # timed out under timeout_action DELAY: runs only after all others
        self.seq = seq  # arrival order, for FIFO and preserve_ordering
        self.device_outputs: Mapping[str, Tuple[int, int]] = device_outputs if device_outputs is not None else {}
        # called (on the loop) when the request is handed to an instance: from then on its input memory is read
        # until its ticket is settled, even if the client cancels, so the caller must not reuse it before
        self.on_dispatch = on_dispatch
        # client requests it stands for: the engine queues same-shaped small requests of one front end as one entry
        # (engine/group.py); queue counts and metrics count requests, not entries
        self.count = count
        # an entry of ``count`` members of equal rows whose outputs the device writes into each member's own memory:
        # what ``device_outputs`` is for a request on its own, for every member, as columns
        self.member_outputs = member_outputs
        # the members' output memory lies in separate blocks of device memory (clients' CUDA shared memory; see
        # DeviceDestination.block and .on_device), not in one arena
        self.members_apart = members_apart
        # an entry of ``count`` members that a batch may take in part (policy rule 2): the owner's hook that moves
        # the members after the first k to a ticket of their own (None: the entry is taken whole or not at all)
        self.splitter = splitter

    def __repr__(self) -> str:
        return f"Pending(rows={self.rows}, shapes={self.shapes}, level={self.level}, seq={self.seq})"


class Split(NamedTuple):
    """What an entry's owner returns when a batch takes only its first members (``Splitter``): the rest's own
    ticket and dispatch hook, and each part's deadline (its earliest member's)."""

    ticket: Ticket
    on_dispatch: Optional[Callable[[], None]]
    head_deadline: Optional[float]
    tail_deadline: Optional[float]


# (the entry's ticket, k) -> Split: the ticket keeps its first k members, the returned one takes the others
Splitter = Callable[[Ticket, int], Split]


class RequestResult:
    """What a request's ticket is settled with (slots, as Pending: one per request)."""

    __slots__ = ("outputs", "queue_ns", "compute_input_ns", "compute_infer_ns", "compute_output_ns", "batch_size",
                 "delivered")

    def __init__(self, outputs: Dict[str, np.ndarray], queue_ns: int, compute_input_ns: int, compute_infer_ns: int,
                 compute_output_ns: int, batch_size: int, delivered: FrozenSet[str] = frozenset()) -> None:
        self.outputs = outputs
        self.queue_ns = queue_ns
        self.compute_input_ns = compute_input_ns
        self.compute_infer_ns = compute_infer_ns
        self.compute_output_ns = compute_output_ns
        self.batch_size = batch_size
        self.delivered = delivered  # outputs the backend already wrote into the request's device memory

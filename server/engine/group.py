"""Small requests of one front end, queued together as one batcher entry.

Under load the engine reads many INFERs of a front end at once (channel.py: a loop turn's messages go in one frame,
and the frames that wait are read together), and most are alike: one model version, the same shapes, priority and
timeout, inputs in the arena, outputs to slots in the arena. The engine's Python objects per request (a ticket, a
batcher entry, NumPy views, an answer message) are what bound it with small requests
(docs/benchmarks/gpu-frontends.md). Alike requests read together are queued as one entry: their inputs gathered from
the arena in one indexed copy, their outputs scattered back into their slots in one, their answers sent as one
RESULTS message. Each keeps its own id, answer, cancellation and statistics; a batch never splits an entry,
as it never splits a request.

Requests that are not alike in this way run one by one as before: one with a deadline (each has its own), a traced
one, one with client shared memory or BYTES tensors, one large enough for the backend's direct copy from the
page-locked arena, one of a model that does not batch, has a queue size limit (which counts entries), unpads outputs
or preserves ordering.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Set

from trtserve.server.engine.batcher.request import Ticket
from trtserve.server.engine.repository.registry import ModelVersion
from trtserve.server.ipc import messages as m

# INFER fields (messages.py)
_ID, _MODEL, _VERSION, _SERIAL, _INPUTS, _OUTPUTS, _ROWS, _PRIORITY, _TIMEOUT, _DEADLINE, _T0, _TRACE = range(1, 13)


def key(msg: tuple) -> Optional[tuple]:
    """What requests must share to be queued as one entry, or None when this one runs on its own."""
    if msg[_DEADLINE] is not None or msg[_TRACE] is not None:
        return None
    shapes = []
    for name, wire, shape, source in msg[_INPUTS]:
        if source[0] != m.ARENA or wire == "BYTES":
            return None
        shapes.append((name, wire, tuple(shape)))
    names = []
    for name, shm, slot in msg[_OUTPUTS]:
        if shm is not None or slot is None:
            return None
        names.append(name)
    return (msg[_MODEL], msg[_VERSION], msg[_SERIAL], msg[_PRIORITY], msg[_TIMEOUT], tuple(shapes), tuple(names))


def allows(mv: ModelVersion) -> bool:
    """Whether this model's requests may be grouped: it batches, it does not unpad outputs per request, no queue size
    limit counts its entries, and it need not answer in arrival order (a group is queued after the requests read with
    it that go one by one, so a model that preserves ordering takes none)."""
    spec = mv.spec
    if spec is None or mv.batcher is None or not spec.batches or spec.unpad or spec.batching.preserve_ordering:
        return False
    return not any(spec.batching.queue_policy(level).max_queue_size for level in range(1, spec.batching.levels + 1))


def members_per_entry(mv: ModelVersion, msg: tuple, direct_min: Optional[int]) -> int:
    """How many requests like ``msg`` one entry of this model may hold (below 2: none are grouped). ``direct_min``:
    the backend's direct-copy threshold where the arena is page-locked (None otherwise): requests that reach it are
    copied to and from the device where they lie, which a gathered copy would only slow down."""
    spec = mv.spec
    if spec is None or msg[_ROWS] < 1:
        return 0
    if direct_min is not None:
        if any(source[2] >= direct_min for _n, _w, _s, source in msg[_INPUTS]):
            return 0
        if any(slot[1] >= direct_min for _n, _shm, slot in msg[_OUTPUTS]):
            return 0
    return max(1, spec.max_batch_size) // msg[_ROWS]


class Group(Ticket):
    """One batcher entry standing for ``msgs`` (INFERs of one front end): settled once for all of them."""

    __slots__ = ("session", "mv", "msgs", "dispatched", "abandoned", "gone", "requeue")

    def __init__(self, on_settled: Callable[[Ticket], None], session: Any, mv: ModelVersion,
                 msgs: List[tuple]) -> None:
        super().__init__(on_settled)
        self.session, self.mv, self.msgs = session, mv, msgs
        self.dispatched = False  # joined a batch: its inputs are being read, it runs to the end
        self.abandoned = False  # its front end went away
        self.gone: Set[int] = set()  # members whose clients cancelled after the group was dispatched
        self.requeue: Optional[int] = None  # a member cancelled while queued: the others go again without it

    def mark_dispatched(self) -> None:
        self.dispatched = True

    @property
    def rows(self) -> int:
        return sum(msg[_ROWS] for msg in self.msgs)

"""Alike requests of one front end, queued together as one batcher entry.

Under load the engine reads many INFERs of a front end at once (channel.py: a loop turn's messages go in one frame,
and the frames that wait are read together), and most are alike: one model version, the same shapes, priority and
timeout, inputs in the arena, outputs to slots in the arena. The engine's Python objects per request (a ticket, a
batcher entry, NumPy views, an answer message) are what bound it (docs/benchmarks/gpu-frontends.md). Alike requests
read together are queued as one entry and answered in one RESULTS message. Each keeps its own id, answer,
cancellation and statistics; a batch never splits a request, but it may take only the first members of an entry
that does not fit whole (the batcher's rule 2), the others becoming an entry of their own (group_path.py).
How the entry holds its members' data depends on their size:

- small requests: their inputs gathered from the arena in one indexed copy, their outputs scattered back into their
  slots in one;
- large requests (every input and output slot at least the backend's direct-copy size, in a page-locked arena): the
  entry's input is the members' arena views left in pieces (``Gather``), which the backend copies to the device one
  by one from where they lie, and each member's rows of each output go from the device into its own slot
  (``Pending.member_outputs``): no host copy either way, as for such a request on its own;
- requests whose every input and output is in client CUDA shared memory on the model's GPU, for a backend that
  takes device tensors: the entry's input is the members' device tensors in pieces, and the device writes each
  member's rows into its own output regions, as for such a request on its own. Each member's regions are checked
  and held as its own request's are (a member that fails a check goes on its own and is answered why).

Members may have deadlines (a client's gRPC timeout): the entry's is the earliest of them. When it passes before the
entry runs, none of it ran: the members whose own deadline passed are answered DEADLINE_EXCEEDED and the others are
queued again (engine/group_path.py).

Requests that are not alike in this way run one by one as before: a traced one, one with system shared memory,
with some tensors in shared memory and some not, or with BYTES tensors, one with some tensors above the direct-copy
size and some below, one of a model that does not batch, has a queue size limit (which counts entries), unpads
outputs or preserves ordering.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Set, Tuple

from trtserve.server.engine.batcher.request import Ticket
from trtserve.server.engine.repository.registry import ModelVersion
from trtserve.server.ipc import messages as m

# INFER fields (messages.py)
_ID, _MODEL, _VERSION, _SERIAL, _INPUTS, _OUTPUTS, _ROWS, _PRIORITY, _TIMEOUT, _DEADLINE, _T0, _TRACE = range(1, 13)


def key(msg: tuple) -> Optional[tuple]:
    """What requests must share to be queued as one entry, or None when this one runs on its own. Its last item
    says where the tensors are: m.ARENA (inputs in the arena, outputs to arena slots) or m.SHM (every input and
    output in client shared memory)."""
    if msg[_TRACE] is not None or not msg[_INPUTS]:
        return None
    where = msg[_INPUTS][0][3][0]
    if where != m.ARENA and (where != m.SHM or not msg[_OUTPUTS]):  # no outputs asked: all come in the response
        return None
    shapes = []
    for name, wire, shape, source in msg[_INPUTS]:
        if source[0] != where or wire == "BYTES":
            return None
        shapes.append((name, wire, tuple(shape)))
    names = []
    in_arena = where == m.ARENA
    for name, shm, slot in msg[_OUTPUTS]:
        if (shm is not None or slot is None) if in_arena else shm is None:
            return None
        names.append(name)
    return (msg[_MODEL], msg[_VERSION], msg[_SERIAL], msg[_PRIORITY], msg[_TIMEOUT], tuple(shapes), tuple(names),
            where)


def deadline(msgs: List[tuple]) -> Optional[float]:
    """An entry's deadline: its earliest member's (None when none has one)."""
    return min((msg[_DEADLINE] for msg in msgs if msg[_DEADLINE] is not None), default=None)


def in_shared_memory(msg: tuple) -> bool:
    """Whether an INFER that ``key`` accepts has its tensors in client shared memory (else in the arena)."""
    return msg[_INPUTS][0][3][0] == m.SHM


def allows(mv: ModelVersion) -> bool:
    """Whether this model's requests may be grouped: it batches, it does not unpad outputs per request, no queue size
    limit counts its entries, and it need not answer in arrival order (a group is queued after the requests read with
    it that go one by one, so a model that preserves ordering takes none)."""
    spec = mv.spec
    if spec is None or mv.batcher is None or not spec.batches or spec.unpad or spec.batching.preserve_ordering:
        return False
    return not any(spec.batching.queue_policy(level).max_queue_size for level in range(1, spec.batching.levels + 1))


def members_per_entry(mv: ModelVersion, msg: tuple, direct_min: Optional[int]) -> Tuple[int, bool]:
    """How many requests like ``msg`` one entry of this model may hold (below 2: none are grouped), and whether the
    entry leaves their data where it lies (``direct``, see the module's docstring). ``direct_min``: the backend's
    direct-copy threshold where the arena is page-locked (None otherwise). A request with some tensors at or
    above it and some below is not grouped: the large ones would lose their direct copy in a gathered entry, and
    the small ones cost a CUDA call each in a direct one."""
    spec = mv.spec
    if spec is None or msg[_ROWS] < 1:
        return 0, False
    direct = False
    if direct_min is not None:
        sizes = [source[2] for _n, _w, _s, source in msg[_INPUTS]] + [slot[1] for _n, _shm, slot in msg[_OUTPUTS]]
        large = sum(1 for n in sizes if n >= direct_min)
        if large and large < len(sizes):
            return 0, False
        direct = large > 0
    return max(1, spec.max_batch_size) // msg[_ROWS], direct


class Group(Ticket):
    """One batcher entry standing for ``msgs`` (INFERs of one front end): settled once for all of them."""

    __slots__ = ("session", "mv", "msgs", "dispatched", "abandoned", "gone", "requeue", "shms")

    def __init__(self, on_settled: Callable[[Ticket], None], session: Any, mv: ModelVersion,
                 msgs: List[tuple]) -> None:
        super().__init__(on_settled)
        self.session, self.mv, self.msgs = session, mv, msgs
        self.dispatched = False  # joined a batch: its inputs are being read, it runs to the end
        self.abandoned = False  # its front end went away
        self.gone: Set[int] = set()  # members whose clients cancelled after the group was dispatched
        self.requeue: Optional[int] = None  # a member cancelled while queued: the others go again without it
        self.shms: Optional[List[Any]] = None  # members in client shared memory: each one's RequestShm, in order

    def mark_dispatched(self) -> None:
        self.dispatched = True

    @property
    def rows(self) -> int:
        return sum(msg[_ROWS] for msg in self.msgs)

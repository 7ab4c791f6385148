"""Many equal copies as few CUDA calls: a batch of large requests copies each member's rows on its own (from its
place in the front end's arena to the batch's device buffer, and back into its own slot), and each copy is a CUDA
call made from the engine's one Python loop, which is what bounds a GPU fed large requests. Members of one entry
have equal sizes and their blocks in an arena usually lie at a fixed distance from each other, so a run of such
copies is one ``cudaMemcpy2DAsync``: ``height`` rows of ``width`` bytes, each ``dpitch``/``spitch`` further on
than the one before. A run never leaves one memory block (one arena, one region): CUDA checks a 2D copy's whole
extent, gaps included, against the allocation or registration it starts in, and two front ends' arenas may lie
at any distance. CuPy is only touched through the ``runtime`` module the caller passes.
"""
from __future__ import annotations

from typing import Any, Hashable, List, NamedTuple, Sequence, Tuple

import numpy as np

# cudaMemcpy2D refuses a pitch above the device's cudaDevAttrMaxPitch (2**31 - 1 where CUDA reports it); a run is
# only formed up to it (a farther step is two copies)
MAX_PITCH = 2 ** 31 - 1


class Run(NamedTuple):
    """``height`` copies of ``width`` bytes: the k-th from ``src + k * spitch`` to ``dst + k * dpitch``."""

    dst: int
    dpitch: int
    src: int
    spitch: int
    width: int
    height: int


Copy = Tuple[int, int, int, Hashable]  # (dst, src, nbytes, the memory block that the side which varies lies in)


def block_of(array: Any) -> Hashable:
    """The memory block a host array lies in, as far as a run may go: the NumPy array it is a view of (a front end's
    arena gives out views of one whole-arena array, one CUDA registration, so pieces of one arena share it), or the
    array itself when it owns its memory or views something that is not an array."""
    base = getattr(array, "base", None)
    return id(base) if type(base) is np.ndarray else id(array)


def runs(copies: Sequence[Copy]) -> List[Run]:
    """``copies`` in order, merged into runs: consecutive copies of one size in one memory block whose destinations
    and sources each step by one constant pitch, at least the size (rows never overlap) and at most MAX_PITCH. A
    copy of 0 bytes is dropped."""
    out: List[Run] = []
    i, count = 0, len(copies)
    while i < count:
        dst, src, n, block = copies[i]
        if n <= 0:
            i += 1
            continue
        height, dp, sp = 1, n, n
        if i + 1 < count and copies[i + 1][2] == n and copies[i + 1][3] == block:
            step_d, step_s = copies[i + 1][0] - dst, copies[i + 1][1] - src
            if n <= step_d <= MAX_PITCH and n <= step_s <= MAX_PITCH:
                height, dp, sp = 2, step_d, step_s
                while (i + height < count and copies[i + height][2] == n and copies[i + height][3] == block
                       and copies[i + height][0] - copies[i + height - 1][0] == dp
                       and copies[i + height][1] - copies[i + height - 1][1] == sp):
                    height += 1
        out.append(Run(dst, dp, src, sp, n, height))
        i += height
    return out


def column_runs(dst: np.ndarray, src: np.ndarray, nbytes: int, blocks: np.ndarray) -> List[Run]:
    """``runs`` of copies given as columns (int64 arrays, one copy of ``nbytes`` each): where every copy steps by one
    distance on each side within one block (a group's members in arena order, the usual case) the run is found with
    array arithmetic; otherwise ``runs`` merges them one by one, so the result is always what ``runs`` gives."""
    count = len(dst)
    if nbytes <= 0 or not count:
        return []
    if count == 1:
        return [Run(int(dst[0]), nbytes, int(src[0]), nbytes, nbytes, 1)]
    step_d, step_s = int(dst[1] - dst[0]), int(src[1] - src[0])
    if (nbytes <= step_d <= MAX_PITCH and nbytes <= step_s <= MAX_PITCH and bool((blocks == blocks[0]).all())
            and bool((np.diff(dst) == step_d).all()) and bool((np.diff(src) == step_s).all())):
        return [Run(int(dst[0]), step_d, int(src[0]), step_s, nbytes, count)]
    return runs(list(zip(dst.tolist(), src.tolist(), [nbytes] * count, blocks.tolist())))


def enqueue_columns(rt: Any, dst: np.ndarray, src: np.ndarray, nbytes: int, blocks: np.ndarray, kind: int,
                    stream_ptr: int) -> int:
    """``enqueue`` for copies given as columns (see ``column_runs``)."""
    return _enqueue_runs(rt, column_runs(dst, src, nbytes, blocks), kind, stream_ptr)


def enqueue(rt: Any, copies: Sequence[Copy], kind: int, stream_ptr: int) -> int:
    """Enqueues ``copies`` (see ``runs``) on the stream with CUDA runtime ``rt`` (CuPy's): one call per run, a run
    whose rows are back to back on both sides as one plain copy. Returns the number of CUDA calls made."""
    return _enqueue_runs(rt, runs(copies), kind, stream_ptr)


def _enqueue_runs(rt: Any, found: Sequence[Run], kind: int, stream_ptr: int) -> int:
    calls = 0
    for r in found:
        if r.height == 1 or (r.dpitch == r.width and r.spitch == r.width):
            rt.memcpyAsync(r.dst, r.src, r.width * r.height, kind, stream_ptr)
        else:
            rt.memcpy2DAsync(r.dst, r.dpitch, r.src, r.spitch, r.width, r.height, kind, stream_ptr)
        calls += 1
    return calls

"""Copies of a batch's members merged into strided runs (server/engine/backends/tensorrt/copies.py), on the CPU:
the runs a list of copies becomes, and that replaying the calls ``enqueue`` makes moves exactly the bytes the copies
one by one would have."""
from __future__ import annotations

import random
from typing import List, Tuple

import numpy as np
import pytest

from trtserve.server.engine.backends.tensorrt import copies
from trtserve.server.engine.backends.tensorrt.copies import MAX_PITCH, Run


def test_equal_copies_at_one_distance_are_one_run() -> None:
    # four 100-byte members whose arena blocks are 256 bytes apart, into back-to-back rows of a batch buffer
    cs = [(5000 + 100 * k, 256 * k, 100, "arena") for k in range(4)]
    assert copies.runs(cs) == [Run(5000, 100, 0, 256, 100, 4)]


def test_a_run_breaks_where_the_step_or_the_size_changes() -> None:
    cs = [(0, 0, 8, 1), (8, 64, 8, 1), (16, 128, 8, 1),  # step 64 on the source
          (24, 512, 8, 1),  # a farther step: starts the next run
          (32, 520, 8, 1),
          (40, 600, 16, 1)]  # another size
    assert copies.runs(cs) == [Run(0, 8, 0, 64, 8, 3), Run(24, 8, 512, 8, 8, 2), Run(40, 16, 600, 16, 16, 1)]


def test_no_run_with_overlapping_rows_backwards_steps_or_pitches_past_the_limit() -> None:
    assert copies.runs([(0, 100, 8, 1), (4, 200, 8, 1)]) == [Run(0, 8, 100, 8, 8, 1), Run(4, 8, 200, 8, 8, 1)]
    assert copies.runs([(100, 0, 8, 1), (0, 8, 8, 1)]) == [Run(100, 8, 0, 8, 8, 1), Run(0, 8, 8, 8, 8, 1)]
    far = MAX_PITCH + 1
    assert copies.runs([(0, 0, 8, 1), (8, far, 8, 1)]) == [Run(0, 8, 0, 8, 8, 1), Run(8, 8, far, 8, 8, 1)]
    assert copies.runs([(0, 0, 8, 1), (8, MAX_PITCH, 8, 1)]) == [Run(0, 8, 0, MAX_PITCH, 8, 2)]


def test_a_run_never_leaves_its_memory_block() -> None:
    # two front ends' arenas: the step from one to the other may look like the members' own step, and CUDA would
    # refuse a 2D copy whose extent spans both
    cs = [(0, 1000, 8, "a"), (8, 1064, 8, "a"), (16, 1128, 8, "b"), (24, 1192, 8, "b"), (32, 1256, 8, "a")]
    assert copies.runs(cs) == [Run(0, 8, 1000, 64, 8, 2), Run(16, 8, 1128, 64, 8, 2), Run(32, 8, 1256, 8, 8, 1)]


def test_pieces_of_one_arena_share_a_block_and_two_arenas_do_not() -> None:
    from trtserve.server.ipc.arena import Arena

    one, two = Arena.create(1 << 16), Arena.create(1 << 16)
    try:
        f32 = np.dtype(np.float32)
        a, b = one.array(0, f32, (4, 4)), one.array(4096, f32, (4, 4))
        c = two.array(0, f32, (4, 4))
        assert copies.block_of(a) == copies.block_of(b) != copies.block_of(c)
        loose, other = np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32)  # arrays of their own
        assert copies.block_of(loose) == copies.block_of(loose[1:]) != copies.block_of(other)
        assert copies.block_of(loose) != copies.block_of(a)
        del a, b, c
    finally:
        one.close()
        two.close()


def test_empty_copies_are_dropped() -> None:
    assert copies.runs([(0, 0, 0, 1), (0, 0, 4, 1), (4, 4, 0, 1)]) == [Run(0, 4, 0, 4, 4, 1)]
    assert copies.runs([]) == []


class _Memory:
    """Stands in for CUDA's runtime over one flat byte array: addresses are offsets into it."""

    memcpyHostToDevice = 1

    def __init__(self, size: int) -> None:
        self.bytes = np.zeros(size, np.uint8)
        self.calls: List[Tuple[str, tuple]] = []

    def memcpyAsync(self, dst: int, src: int, n: int, kind: int, stream: int) -> None:
        self.calls.append(("1d", (dst, src, n)))
        self.bytes[dst:dst + n] = self.bytes[src:src + n].copy()

    def memcpy2DAsync(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: int,
                      stream: int) -> None:
        assert dpitch >= width and spitch >= width, "CUDA refuses a pitch below the width"
        self.calls.append(("2d", (dst, dpitch, src, spitch, width, height)))
        for k in range(height):
            self.bytes[dst + k * dpitch:dst + k * dpitch + width] = \
                self.bytes[src + k * spitch:src + k * spitch + width].copy()


@pytest.mark.parametrize("seed", range(20))
def test_enqueued_runs_move_the_same_bytes_as_the_copies_one_by_one(seed: int) -> None:
    rnd = random.Random(seed)
    size, width = 1 << 16, rnd.choice([16, 48, 100])
    block = width + rnd.choice([0, 16, 60])
    slots = list(range(0, 20 * block, block))  # an arena of equal blocks, some taken out of order
    taken = sorted(rnd.sample(slots, rnd.randint(1, 12)))
    dst0 = 40000
    cs = [(dst0 + k * width, 1000 + off, width, "arena") for k, off in enumerate(taken)]
    if rnd.random() < 0.5:  # and a piece of another size at the end
        cs.append((dst0 + len(taken) * width, 30000, 24, "arena"))
    one_by_one, merged = _Memory(size), _Memory(size)
    noise = np.frombuffer(rnd.randbytes(size), np.uint8)
    one_by_one.bytes[:] = noise
    merged.bytes[:] = noise
    for dst, src, n, _block in cs:
        one_by_one.memcpyAsync(dst, src, n, 1, 0)
    calls = copies.enqueue(merged, cs, merged.memcpyHostToDevice, 0)
    np.testing.assert_array_equal(merged.bytes, one_by_one.bytes)
    assert calls == len(copies.runs(cs)) == len(merged.calls) <= len(cs)


def test_back_to_back_rows_go_as_one_plain_copy() -> None:
    mem = _Memory(4096)
    assert copies.enqueue(mem, [(1000 + 10 * k, 10 * k, 10, 1) for k in range(5)], 1, 0) == 1
    assert mem.calls == [("1d", (1000, 0, 50))]


@pytest.mark.parametrize("seed", range(40))
def test_copies_given_as_columns_make_the_runs_the_copies_one_by_one_make(seed: int) -> None:
    """``column_runs`` (a group's pieces or destinations as address columns) finds a single run with array
    arithmetic and leaves anything else to ``runs``: either way the runs are exactly those of the same copies as a
    list. Layouts: one distance throughout (the usual case), a break in the step, two blocks, overlapping or
    backwards steps, a pitch past the limit, one copy, none."""
    rng = random.Random(seed)
    count = rng.choice([0, 1, 2, 3, 8, 32])
    n = rng.choice([0, 8, 64, 100])
    step_d, step_s = rng.choice([n, n + 64, max(1, n // 2)]), rng.choice([n, 256, MAX_PITCH, MAX_PITCH + 1, -64])
    dst = [1000 + k * step_d for k in range(count)]
    src = [1 << 40 if step_s < 0 else 1 << 20] * count
    src = [s + k * step_s for k, s in enumerate(src)]
    blocks = [7] * count
    if count > 2 and rng.random() < 0.4:  # the step breaks somewhere
        at = rng.randrange(1, count)
        src = src[:at] + [s + 4096 for s in src[at:]]
    if count > 2 and rng.random() < 0.3:  # the last pieces lie in another block
        at = rng.randrange(1, count)
        blocks = blocks[:at] + [9] * (count - at)
    as_list = copies.runs([(d, s, n, b) for d, s, b in zip(dst, src, blocks)])
    got = copies.column_runs(np.array(dst, np.int64), np.array(src, np.int64), n, np.array(blocks, np.int64))
    assert got == as_list


def test_a_group_in_arena_order_is_one_run_found_without_walking_its_members() -> None:
    dst = 5000 + 100 * np.arange(32, dtype=np.int64)
    src = 256 * np.arange(32, dtype=np.int64)
    assert copies.column_runs(dst, src, 100, np.zeros(32, np.int64)) == [Run(5000, 100, 0, 256, 100, 32)]

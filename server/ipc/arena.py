"""The tensor arena: one shared-memory block per front end, where request inputs and outputs live.

A front end writes a request's input tensors into space it allocates here and hands the engine only
offsets; the engine reads the batch straight from these pages (for TensorRT, the block is registered
with CUDA as pinned memory, so the copy to the device reads where the front end wrote) and writes the
outputs into space the front end reserved. The block is an anonymous ``memfd``: it has no name in
/dev/shm, so no process death can leave it behind; the engine gets it as a file descriptor over the
front end's Unix socket.

Only the front end allocates and frees (one event-loop thread, no lock); a block is freed once the
engine has answered the request that used it, never earlier (the engine may still read it).
"""
from __future__ import annotations

import bisect
import math
import mmap
import os
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

ALIGN = 64  # cache line; also what CUDA copies and NumPy's SIMD loops like to start on
# gather and scatter copy up to this many pieces one memoryview slice at a time: NumPy's indexed copy costs more to set
# up (index arrays, a broadcast sum, the bounds reductions) than a few dozen slice copies, and the engine's groups are
# mostly that small; past it the indexed copy is the faster (docs/benchmarks/frontends-2core.md)
SLICED_MAX = 32
Offsets = Union[np.ndarray, List[int]]


def aligned(n: int) -> int:
    """``n`` rounded up to ALIGN: the size a block or a piece of one takes in an arena."""
    return (n + ALIGN - 1) & ~(ALIGN - 1)


class ArenaFull(Exception):
    """No free block is large enough right now (requests in flight hold the space)."""


class Arena:
    """A mapping of the arena's file descriptor; ``view`` gives NumPy views of parts of it."""

    def __init__(self, fd: int, size: int, owner: bool) -> None:
        self.fd = fd
        self.size = size
        self.owner = owner
        self._mmap: Optional[mmap.mmap] = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.buffer = np.frombuffer(self._mmap, dtype=np.uint8)
        self._memory: Optional[memoryview] = memoryview(self._mmap)
        self._readonly: Optional[memoryview] = self._memory.toreadonly()
        self._base = int(self.buffer.ctypes.data)
        self._typed: Dict[np.dtype, np.ndarray] = {}  # dtype -> the whole arena as read-only items of it
        self._line_view: Optional[np.ndarray] = None  # see _lines
        self.pinned = False

    @classmethod
    def create(cls, size: int, name: str = "trtserve-arena") -> "Arena":
        """A new arena of ``size`` bytes, backed by memory (memfd) rather than a named file."""
        if size <= 0:
            raise ValueError(f"arena size must be > 0, got {size}")
        # not posix_fallocate'd: pages are taken as requests first touch them, so an arena sized for bursts
        # costs only what the bursts use; a memfd lives on the kernel's internal shm mount, which has no size
        # of its own to run out of (unlike a container's small /dev/shm), so a touch cannot hit SIGBUS there
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, size, owner=True)

    @classmethod
    def attach(cls, fd: int) -> "Arena":
        """Maps an arena another process created (its descriptor arrived over a socket)."""
        return cls(fd, os.fstat(fd).st_size, owner=False)

    def _check(self, offset: int, nbytes: int) -> None:
        """Bounds of every access, so a bad descriptor cannot reach past the arena."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"arena range {offset}+{nbytes} is outside the arena ({self.size} bytes)")

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """uint8 view of [offset, offset + nbytes)."""
        self._check(offset, nbytes)
        return self.buffer[offset:offset + nbytes]

    def array(self, offset: int, dtype: np.dtype, shape: Tuple[int, ...]) -> np.ndarray:
        """A read-only array of ``dtype`` and ``shape`` at ``offset`` (bounds-checked): the engine's view of one
        input. It is a slice of one whole-arena array per dtype, made once with frombuffer: that array holds the
        mapping's buffer export, so ``close`` cannot unmap pages a slice still reads (an ``ndarray(buffer=...)``
        would not hold it), and slicing it costs a fraction of a new frombuffer per input."""
        count = math.prod(shape)
        itemsize = dtype.itemsize
        self._check(offset, itemsize * count)
        typed = self._typed.get(dtype)
        if typed is None:
            if self._readonly is None:
                raise ValueError("the arena is closed")
            typed = self._typed[dtype] = np.frombuffer(self._readonly, dtype, self.size // itemsize)
        if offset % itemsize:  # not where the front end puts inputs (64-byte aligned), but still served
            return np.frombuffer(self._readonly, dtype, count, offset).reshape(shape)  # type: ignore[arg-type]
        start = offset // itemsize
        return typed[start:start + count].reshape(shape)

    def gather(self, offsets: Offsets, dtype: np.dtype, shape: Tuple[int, ...]) -> np.ndarray:
        """A new array of ``len(offsets) * shape[0]`` rows: the ``shape`` pieces of ``dtype`` at ``offsets`` (ints,
        bounds-checked), one after the other. One copy for the many small requests of one group (see
        engine/group.py), instead of an array object per request and a concatenate."""
        nbytes = dtype.itemsize * math.prod(shape)
        count = len(offsets)
        if count <= SLICED_MAX:
            starts = self._checked(offsets, nbytes)
            out = np.empty((count * shape[0],) + tuple(shape[1:]), dtype)
            if nbytes:
                dst, memory = memoryview(out).cast("B"), self._memory
                assert memory is not None
                for i, start in enumerate(starts):
                    dst[i * nbytes:(i + 1) * nbytes] = memory[start:start + nbytes]
            return out
        offsets = np.asarray(offsets, np.int64)
        self._check_many(offsets, nbytes)
        if nbytes % ALIGN == 0 and not (offsets % ALIGN).any():  # whole cache lines: the fewest indices
            lines = self._lines()
            taken = lines[(offsets // ALIGN)[:, None] + np.arange(nbytes // ALIGN)]
        else:
            taken = self.buffer[offsets[:, None] + np.arange(nbytes)]
        return taken.view(np.uint8).view(dtype).reshape((count * shape[0],) + tuple(shape[1:]))

    def scatter(self, offsets: Offsets, pieces: np.ndarray) -> None:
        """Writes row i of ``pieces`` (C-contiguous, one row per offset) at ``offsets[i]`` (bounds-checked): a group's
        outputs into the slots its requests reserved, in one copy."""
        count = len(offsets)
        raw = pieces.reshape(count, -1).view(np.uint8)
        nbytes = raw.shape[1]
        if count <= SLICED_MAX:
            starts = self._checked(offsets, nbytes)
            if nbytes:
                src, memory = memoryview(np.ascontiguousarray(raw)).cast("B"), self._memory
                assert memory is not None
                for i, start in enumerate(starts):
                    memory[start:start + nbytes] = src[i * nbytes:(i + 1) * nbytes]
            return
        offsets = np.asarray(offsets, np.int64)
        self._check_many(offsets, nbytes)
        if nbytes % ALIGN == 0 and not (offsets % ALIGN).any():
            self._lines()[(offsets // ALIGN)[:, None] + np.arange(nbytes // ALIGN)] = \
                raw.view(f"V{ALIGN}")
        else:
            self.buffer[offsets[:, None] + np.arange(nbytes)] = raw

    def _checked(self, offsets: Offsets, nbytes: int) -> List[int]:
        """A few ``offsets`` as ints, each [offset, offset + nbytes) checked to lie in the arena."""
        starts = offsets.tolist() if isinstance(offsets, np.ndarray) else list(offsets)
        self._check_span(min(starts, default=None), max(starts, default=None), nbytes)
        return starts

    def _check_many(self, offsets: np.ndarray, nbytes: int) -> None:
        lo, hi = (int(offsets.min()), int(offsets.max())) if len(offsets) else (None, None)
        self._check_span(lo, hi, nbytes)

    def _check_span(self, lo: Optional[int], hi: Optional[int], nbytes: int) -> None:
        """Ranges of ``nbytes`` at offsets from ``lo`` to ``hi`` (None: there are none) lie in the open arena."""
        if self._memory is None:
            raise ValueError("the arena is closed")
        if lo is not None and hi is not None and (lo < 0 or hi + nbytes > self.size):
            raise ValueError(f"an arena range of {nbytes} bytes at offsets {lo}..{hi} "
                             f"is outside the arena ({self.size} bytes)")

    def _lines(self) -> np.ndarray:
        """The arena as 64-byte items (writable), made once."""
        if self._line_view is None:
            self._line_view = self.buffer[:self.size - self.size % ALIGN].view(f"V{ALIGN}")
        return self._line_view

    def address(self, offset: int, nbytes: int) -> int:
        """The host address of [offset, offset + nbytes), for a device copy into or out of a pinned arena."""
        self._check(offset, nbytes)
        if self._memory is None:
            raise ValueError("the arena is closed")
        return self._base + offset

    def addresses(self, offsets: np.ndarray, nbytes: Union[np.ndarray, int]) -> np.ndarray:
        """``address`` of many ranges at once (int64 offsets; sizes, one each or one for all; bounds-checked): a
        group's pieces and slots."""
        if self._memory is None:
            raise ValueError("the arena is closed")
        if len(offsets) and (int(offsets.min()) < 0 or int(np.min(nbytes)) < 0
                             or int(np.max(offsets + nbytes)) > self.size):
            raise ValueError(f"an arena range at offsets {int(offsets.min())}..{int(offsets.max())} is outside the "
                             f"arena ({self.size} bytes)")
        return offsets + self._base

    def write(self, offset: int, array: np.ndarray) -> None:
        """Copies ``array``'s bytes to ``offset`` (bounds-checked). A C-contiguous array goes in one memoryview
        copy, a fraction of what NumPy's slicing and copyto cost for the small results the engine writes per
        request; anything else through NumPy."""
        n = array.nbytes
        self._check(offset, n)
        if self._memory is None:
            raise ValueError("the arena is closed")
        try:
            self._memory[offset:offset + n] = array.data.cast("B")
        except (TypeError, ValueError):  # not C-contiguous, or no elements: memoryview cannot cast those
            np.copyto(self.buffer[offset:offset + n].view(array.dtype).reshape(array.shape), array)

    def put(self, offset: int, data: bytes) -> None:
        """Copies ``data`` (bytes as a request brought them) to ``offset`` (bounds-checked), in one memoryview copy."""
        n = len(data)
        self._check(offset, n)
        if self._memory is None:
            raise ValueError("the arena is closed")
        self._memory[offset:offset + n] = data

    def pin(self) -> None:
        """Registers the whole arena with CUDA as page-locked host memory, so a device copy of an input reads
        straight from where the front end wrote it (the TensorRT backend checks, see staging.py). It locks
        the arena's pages in memory: the engine does it only when it serves a TensorRT model."""
        import cupy  # only the engine of a GPU server gets here

        # portable (cudaHostRegisterPortable): page-locked for every device's context, not only the calling
        # thread's current one (the engine pins on a worker thread; models may run on any device)
        cupy.cuda.runtime.hostRegister(self._base, self.size, 1)
        self.pinned = True

    def close(self) -> None:
        """Unmaps and closes; views still alive keep the pages mapped until they go away."""
        if self.pinned:
            import cupy

            try:
                cupy.cuda.runtime.hostUnregister(self._base)
            except Exception:  # noqa: BLE001 - the context may be gone at exit; the mapping goes anyway
                pass
            self.pinned = False
        self.buffer = np.empty(0, np.uint8)
        # dropped, not released: arrays made by ``array`` hold exports of the read-only view, and while one
        # lives, close() below leaves the mapping to the last of them
        self._memory = self._readonly = None
        self._typed = {}
        self._line_view = None
        mm, self._mmap = self._mmap, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view is still referenced somewhere: the mapping goes with it
                pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Allocator:
    """First-fit allocation of aligned blocks in [0, size), with neighbours merged on free.

    The free list is kept sorted by offset; with requests freed roughly in arrival order it stays short,
    so allocation and free cost a bisect and a few list operations."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free_offsets: List[int] = [0]
        self._free_sizes: List[int] = [size]
        self._used = {}  # offset -> size
        self.in_use = 0

    def alloc(self, nbytes: int) -> int:
        """Offset of a new block of at least ``nbytes``; ArenaFull when none fits now."""
        need = aligned(max(nbytes, 1))
        if need > self.size:
            raise ValueError(f"{nbytes} bytes can never fit an arena of {self.size} bytes")
        for i, size in enumerate(self._free_sizes):
            if size >= need:
                offset = self._free_offsets[i]
                if size == need:
                    del self._free_offsets[i]
                    del self._free_sizes[i]
                else:
                    self._free_offsets[i] = offset + need
                    self._free_sizes[i] = size - need
                self._used[offset] = need
                self.in_use += need
                return offset
        raise ArenaFull(f"{nbytes} bytes requested, {self.size - self.in_use} of {self.size} free "
                        f"(largest free block {max(self._free_sizes, default=0)})")

    def free(self, offset: int) -> None:
        size = self._used.pop(offset)
        self.in_use -= size
        i = bisect.bisect_left(self._free_offsets, offset)
        # merge with the following block, then with the preceding one
        if i < len(self._free_offsets) and offset + size == self._free_offsets[i]:
            size += self._free_sizes[i]
            del self._free_offsets[i]
            del self._free_sizes[i]
        if i > 0 and self._free_offsets[i - 1] + self._free_sizes[i - 1] == offset:
            self._free_sizes[i - 1] += size
            return
        self._free_offsets.insert(i, offset)
        self._free_sizes.insert(i, size)

    def blocks(self) -> List[Tuple[int, int]]:
        """(offset, size) of every free block, for tests."""
        return list(zip(self._free_offsets, self._free_sizes))

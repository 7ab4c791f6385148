"""Many device-to-device copies as one kernel launch.

A batch of CUDA shared-memory requests copies each member's input from its client's allocation into the batch's
device buffer, and each member's rows of every output back into its client's allocation. Every copy is a CUDA call
made from the engine's one Python loop, and separate allocations never merge into one strided copy (copies.py), so
a batch of N such requests costs 2N calls. Here a batch's copies become a table of (destination, source, bytes),
uploaded with one copy from the slot's page-locked memory, and one kernel launch performs them all: two calls
whatever N is. Only device memory on both sides goes this way (the kernel reads and writes device addresses);
host pieces keep their DMA copies.

Each batch in flight (``slot``) owns its page-locked table, as it owns its pinned mirrors: the upload reads it when
the stream reaches it, after ``enqueue`` returned. One device table per instance is enough: the instance's one
stream orders each upload after the launches that read the previous contents. CuPy is only touched through the
module the caller passes.
"""
from __future__ import annotations

import ctypes
import logging
from typing import Any, Optional, Sequence

import numpy as np

log = logging.getLogger("trtserve.tensorrt")

# fewer pieces than this go as plain copies: a launch costs a table upload and the launch, two calls
MIN_PIECES = 3
THREADS = 256
MAX_BLOCKS_PER_PIECE = 32
BYTES_PER_BLOCK = THREADS * 16 * 4  # four 16-byte words per thread before another block helps
MAX_TABLE_ROWS = 65535  # a launch's pieces are its grid's y dimension, which CUDA bounds there

# one block row (blockIdx.y) per piece; 16-byte words where the piece's addresses and size allow, else bytes
SOURCE = r"""
extern "C" __global__ void trtserve_copy_pieces(unsigned long long table, int first) {
    __shared__ unsigned long long piece[3];
    if (threadIdx.x < 3) {
        piece[threadIdx.x] = ((const unsigned long long*)table)[3 * (first + blockIdx.y) + threadIdx.x];
    }
    __syncthreads();
    char* dst = (char*)piece[0];
    const char* src = (const char*)piece[1];
    unsigned long long n = piece[2];
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
    if (((piece[0] | piece[1] | n) & 15ULL) == 0ULL) {
        uint4* d = (uint4*)dst;
        const uint4* s = (const uint4*)src;
        for (unsigned long long words = n >> 4; i < words; i += step) d[i] = s[i];
    } else {
        for (; i < n; i += step) dst[i] = src[i];
    }
}
"""
KERNEL = "trtserve_copy_pieces"

class PieceCopier:
    """One instance's batched device copies: ``begin(slot)`` once per batch, then ``copy`` for each group of pieces
    (each takes the next rows of the slot's table). ``capacity``: table rows a batch may use in all; a ``copy`` that
    does not fit returns False and the caller copies those pieces itself."""

    def __init__(self, cupy: Any, slots: int, capacity: int) -> None:
        self._cupy = cupy
        self.capacity = max(MIN_PIECES, int(capacity))
        self._kernel = cupy.RawKernel(SOURCE, KERNEL)
        self._kernel.compile()  # at load: a toolchain that cannot build it is found now, not on a batch
        # the launch through the driver with its two parameters packed once: CuPy's RawKernel call converts and
        # packs its arguments on every launch, in the engine's one loop (bench/cuda_calls.py measures both)
        self._function = getattr(getattr(self._kernel, "kernel", None), "ptr", None)
        self._launch = getattr(getattr(cupy.cuda, "driver", None), "launchKernel", None)
        self._arg_table, self._arg_first = ctypes.c_uint64(0), ctypes.c_int32(0)
        self._params = (ctypes.c_void_p * 2)(ctypes.addressof(self._arg_table), ctypes.addressof(self._arg_first))
        self._params_ptr = ctypes.addressof(self._params)
        size = self.capacity * 3 * 8
        self._pinned = [cupy.cuda.alloc_pinned_memory(size) for _ in range(max(1, slots))]  # keeps them alive
        self._tables = [np.frombuffer(p, dtype=np.uint64, count=self.capacity * 3).reshape(self.capacity, 3)
                        for p in self._pinned]
        self._table_ptrs = [int(t.ctypes.data) for t in self._tables]
        self._device = cupy.empty(size, dtype=cupy.uint8)
        self._device_ptr = int(self._device.data.ptr)
        self._slot = 0
        self._used = 0  # table rows taken by this batch so far
        self.launches = 0  # kernels launched since open (tests, benchmarks)

    def begin(self, slot: int) -> None:
        """A new batch on ``slot``: its table starts empty (the slot's previous batch was collected)."""
        self._slot, self._used = slot, 0

    def copy(self, pieces: Sequence[Any], stream: Any) -> bool:
        """Enqueues ``pieces`` (tuples whose first three items are destination, source, bytes: device addresses)
        on ``stream`` as one launch; False, with nothing enqueued, when there are fewer than MIN_PIECES or the
        batch's table is full."""
        return self.copy_columns([p[0] for p in pieces], [p[1] for p in pieces], [p[2] for p in pieces], stream)

    def copy_columns(self, dst: Sequence[int], src: Sequence[int], nbytes: Sequence[int], stream: Any) -> bool:
        """``copy`` for pieces given as three columns (the table is filled a column at a time: a row at a time
        cost a tuple per piece)."""
        count = len(dst)
        first = self._used
        if count < MIN_PIECES or first + count > self.capacity or count > MAX_TABLE_ROWS:
            return False
        rows = self._tables[self._slot][first:first + count]
        rows[:, 0], rows[:, 1], rows[:, 2] = dst, src, nbytes
        largest = max(nbytes)
        self._used = first + count
        rt = self._cupy.cuda.runtime
        offset = first * 24
        rt.memcpyAsync(self._device_ptr + offset, self._table_ptrs[self._slot] + offset, count * 24,
                       rt.memcpyHostToDevice, stream.ptr)
        blocks = min(MAX_BLOCKS_PER_PIECE, max(1, -(-largest // BYTES_PER_BLOCK)))
        if self._function and self._launch is not None:
            self._arg_table.value, self._arg_first.value = self._device_ptr, first  # read when launched
            self._launch(self._function, blocks, count, 1, THREADS, 1, 1, 0, stream.ptr, self._params_ptr, 0)
        else:
            self._kernel((blocks, count), (THREADS,), (np.uint64(self._device_ptr), np.int32(first)), stream=stream)
        self.launches += 1
        return True


def open_copier(cupy: Any, slots: int, capacity: int, what: str) -> Optional[PieceCopier]:
    """A PieceCopier, or None (with a warning: batches then copy piece by piece, correct but with a CUDA call per
    piece) where the kernel cannot be built or launched here."""
    try:
        return PieceCopier(cupy, slots, capacity)
    except Exception as e:  # noqa: BLE001 - NVRTC missing or refusing: the plain copies still work
        log.warning("%s: batched device copies unavailable (%s: %s); copying piece by piece", what,
                    type(e).__name__, e)
        return None


__all__ = ["MIN_PIECES", "PieceCopier", "open_copier"]

"""What each CUDA call the engine makes per batch costs its Python loop (``python -m bench.cuda_calls``; needs CuPy
and a GPU).

The engine's one loop enqueues every batch's copies, launches and events; with the GPU far from busy, its time per
batch is what bounds throughput (docs/benchmarks/gpu-frontends.md). This prints the host time of one call of each
kind, the median of blocks of calls (the stream drained between blocks, so no call waits for room in the queue),
side by side in one process: a plain copy, the batched-copies kernel through CuPy's ``RawKernel`` and through the
driver's ``cuLaunchKernel`` with its parameters packed once, a whole ``PieceCopier.copy`` of a batch's pieces, a
graph launch, an event record, a memset.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from typing import Callable, List

import numpy as np


def _per_call(call: Callable[[], object], stream, calls: int, blocks: int) -> float:
    """Median over ``blocks`` of the host microseconds per call, ``calls`` calls per block."""
    out: List[float] = []
    for _ in range(blocks):
        stream.synchronize()
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            call()
        out.append((time.perf_counter_ns() - t0) / calls / 1e3)
    stream.synchronize()
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pieces", type=int, default=13, help="pieces per batched copy (a batch's members)")
    ap.add_argument("--piece-bytes", type=int, default=131072)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--blocks", type=int, default=25)
    a = ap.parse_args()

    import cupy

    from trtserve.server.engine.backends.tensorrt import pieces as pieces_mod

    rt = cupy.cuda.runtime
    stream = cupy.cuda.Stream(non_blocking=True)
    n, k = a.piece_bytes, a.pieces
    src = cupy.zeros(n * k, dtype=cupy.uint8)
    dst = cupy.zeros(n * k, dtype=cupy.uint8)
    table = [(int(dst.data.ptr) + i * n, int(src.data.ptr) + i * n, n, i) for i in range(k)]
    copier = pieces_mod.PieceCopier(cupy, 1, 4 * k)
    copier.begin(0)
    copier.copy(table, stream)  # the table's rows 0..k-1, on the device for the launches below
    stream.synchronize()
    kernel = cupy.RawKernel(pieces_mod.SOURCE, pieces_mod.KERNEL)
    table_ptr = np.uint64(copier._device_ptr)  # noqa: SLF001 - the benchmark reuses the copier's uploaded table
    blocks = min(pieces_mod.MAX_BLOCKS_PER_PIECE, max(1, -(-n // pieces_mod.BYTES_PER_BLOCK)))

    def raw_kernel() -> None:
        kernel((blocks, k), (pieces_mod.THREADS,), (table_ptr, np.int32(0)), stream=stream)

    function = kernel.kernel.ptr
    arg_table, arg_first = ctypes.c_uint64(int(table_ptr)), ctypes.c_int32(0)
    params = (ctypes.c_void_p * 2)(ctypes.addressof(arg_table), ctypes.addressof(arg_first))
    params_ptr = ctypes.addressof(params)
    launch = cupy.cuda.driver.launchKernel

    def driver_kernel() -> None:
        launch(function, blocks, k, 1, pieces_mod.THREADS, 1, 1, 0, stream.ptr, params_ptr, 0)

    def whole_copy() -> None:
        copier.begin(0)
        copier.copy(table, stream)

    def plain_copy() -> None:
        rt.memcpyAsync(table[0][0], table[0][1], n, rt.memcpyDeviceToDevice, stream.ptr)

    event = cupy.cuda.Event()

    def record() -> None:
        event.record(stream)

    def memset() -> None:
        rt.memsetAsync(int(dst.data.ptr), 0, n, stream.ptr)

    stream.begin_capture()
    rt.memcpyAsync(table[0][0], table[0][1], n, rt.memcpyDeviceToDevice, stream.ptr)
    graph = stream.end_capture()

    def graph_launch() -> None:
        graph.launch(stream=stream)

    rows = [
        ("memcpyAsync, device to device", plain_copy),
        (f"pieces kernel via RawKernel ({k} pieces)", raw_kernel),
        (f"pieces kernel via cuLaunchKernel, parameters packed once ({k} pieces)", driver_kernel),
        (f"PieceCopier.copy: table write, upload, launch ({k} pieces)", whole_copy),
        ("Graph.launch (one copy captured)", graph_launch),
        ("Event.record", record),
        ("memsetAsync", memset),
    ]
    for _ in range(2):  # warm: the first rounds load modules and grow the queues
        for _, call in rows:
            _per_call(call, stream, a.calls, 2)
    gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"host time per call, median of {a.blocks} blocks of {a.calls} calls ({gpu})")
    print("| call | us |\n|---|---|")
    for label, call in rows:
        print(f"| {label} | {_per_call(call, stream, a.calls, a.blocks):.2f} |")


if __name__ == "__main__":
    main()

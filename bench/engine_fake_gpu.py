"""The engine's own cost on large GPU requests, without a GPU: the engine process serving a stand-in for the
TensorRT backend that keeps its contract (pipelined: enqueue returns at once, wait/collect after; inputs taken where
they lie in the page-locked arena, outputs counted as delivered into the arena slots, as TensorRT's device copies do)
and whose "device" takes ``--device-us`` per batch, one batch after another. Each CUDA call TensorRT makes per batch
(a copy per run of input pieces and per run of output destinations as backends/tensorrt/copies.py forms them, four
timing events, ``execute_async_v3``, three elapsed times) is stood in for by a few microseconds of work without the
GIL, as CuPy's and TensorRT's bindings give it up. What
is left is the engine's Python per batch and per request: descriptors in, queueing, batching, enqueue, answers out.

    python -m bench.engine_fake_gpu [--device-us 160] [--concurrency 4,16,64] [--duration 3] [--baseline DIR]

Defaults mirror bench.gpu_engine's heavy MLP (256 FP16 values per row, 256-row requests, batches of up to 1024 on
two instances; an H200 computes such a batch in about 160 us). "of device" is the rate against what the device
alone would allow. ``--baseline DIR``: the same run with the engine of another checkout (a ``git archive`` of an
older commit), interleaved per level. The engine side runs this file as a script (``--serve``, internal).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

if sys.path and pathlib.Path(sys.path[0] or ".").resolve() == pathlib.Path(__file__).resolve().parent:
    del sys.path[0]  # run as a script (the engine side): bench/http.py would hide the standard library's http

import numpy as np

N = 256  # values per row, in and out


def _backend_class():  # imported only in the engine process, where trtserve is the one being measured
    from trtserve.server.engine.backends.base import Backend, BatchResult, Profile, ShapeRange, TensorSpec

    class FakeGpu(Backend):
        """The device is busy ``device_s`` per batch, batches queue behind each other as on one GPU; outputs are
        zeros (the benchmark does not read them)."""

        platform = "tensorrt_plan"
        accepts_device_tensors = True
        pipelined = True
        direct_copy_min_bytes = 16384
        device_s = 160e-6
        execute_s = 30e-6  # host time of execute_async_v3, without the GIL
        cuda_call: Callable[..., None] = staticmethod(lambda seconds=0.0: None)  # serve() sets a _CudaCall

        def open(self) -> None:
            mb = self.config.max_batch_size
            self._stage = [np.empty((mb, N), np.float16) for _ in range(self.config.instance_count * 2)]
            self._free_at = 0.0
            self._lock = threading.Lock()
            shape = (mb, N)
            self._profiles = [Profile(0, {"INPUT0": ShapeRange((1, N), shape, shape)},
                                      tuple(range(self.config.instance_count)))]

        def io(self):
            return ((TensorSpec("INPUT0", "FP16", (-1, N)),), (TensorSpec("OUTPUT0", "FP16", (-1, N)),))

        def profiles(self):
            return self._profiles

        def staging(self, instance: int, shapes: Mapping[str, Tuple[int, ...]]):
            return {"INPUT0": self._stage[instance][:shapes["INPUT0"][0]]}

        def run(self, instance, inputs, outputs):
            return self.collect(instance, self.enqueue(instance, inputs, outputs))

        def run_to_device(self, instance, inputs, outputs, destinations):
            return self.collect(instance, self.enqueue(instance, inputs, outputs, destinations))

        def enqueue(self, instance, inputs, outputs, destinations=()):
            x = inputs["INPUT0"]
            # TensorRT's enqueue makes a CUDA call per run of input pieces and of destinations (copies.py), per
            # timing event, and execute_async_v3; each gives the GIL up while it runs, as CuPy's and TensorRT's
            # bindings do
            calls, delivered, covered = _copies(x, destinations)
            for _ in range(calls + 4):
                self.cuda_call()
            self.cuda_call(self.execute_s)
            rows = int(x.shape[0])
            with self._lock:
                start = max(time.perf_counter(), self._free_at)
                self._free_at = start + self.device_s
                ready = self._free_at
            return ready, rows, delivered, covered >= rows

        def wait(self, instance, ticket):
            wait = ticket[0] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            return True

        def collect(self, instance, ticket):
            ready, rows, delivered, all_delivered = ticket
            self.wait(instance, ticket)
            for _ in range(3):  # the timing events' elapsed times
                self.cuda_call()
            out = np.broadcast_to(np.zeros((), np.float16), (rows, N)) if all_delivered else \
                np.zeros((rows, N), np.float16)
            return BatchResult({"OUTPUT0": out}, delivered=delivered)

        def close(self) -> None:
            pass

    return FakeGpu


def _copies(x, destinations) -> Tuple[int, Dict[int, frozenset], int]:
    """The CUDA calls the TensorRT backend makes for a batch's input pieces and its output destinations, worked
    out as it does (server/engine/backends/tensorrt/context.py and copies.py) from where they lie, with the
    outputs delivered and the rows they cover. The device copies into the arena slots cost the engine a CUDA call
    each, not a host copy: nothing is copied here, the destinations only count as delivered."""
    from trtserve.server.engine.backends import base
    from trtserve.server.engine.backends.tensorrt import copies

    members = getattr(base, "MemberDestinations", None)  # absent from a --baseline engine older than columns
    calls = 0
    columns = getattr(x, "columns", None)
    if columns is not None:
        n = columns.nbytes
        dst = np.arange(len(columns), dtype=np.int64) * n
        calls += len(copies.column_runs(dst, columns.addresses, n, columns.blocks))
    else:
        ins, row = [], 0
        for p in getattr(x, "parts", (x,)):
            ins.append((row, p.__array_interface__["data"][0], p.nbytes, copies.block_of(p)))
            row += p.nbytes
        calls += len(copies.runs(ins))
    outs, delivered, covered = [], {}, 0
    for d in destinations:
        if members is not None and type(d) is members:
            ptrs, rooms = d.outputs["OUTPUT0"]
            n = d.rows * N * 2
            starts = (d.row_offset + np.arange(d.count, dtype=np.int64) * d.rows) * N * 2
            calls += len(copies.column_runs(np.asarray(ptrs, np.int64), starts, n,
                                            np.full(d.count, d.request, np.int64)))
            if bool((np.asarray(rooms) >= n).all()):
                delivered[d.request] = frozenset({"OUTPUT0"})
                covered += d.rows * d.count
            continue
        ptr, room = d.outputs["OUTPUT0"]
        n = d.rows * N * 2
        outs.append((ptr, d.row_offset * N * 2, n, d.request if d.block is None else d.block))
        if n <= room:
            delivered[d.request] = frozenset({"OUTPUT0"})
            covered += d.rows
    return calls + len(copies.runs(outs)), delivered, covered


class _CudaCall:
    """Host time of a CUDA call without the GIL: hashlib lets the GIL go while it hashes a buffer of 2 KiB or more,
    and takes time in proportion to its size (measured once, at start)."""

    def __init__(self) -> None:
        self._buffer = memoryview(bytes(1 << 20))
        t0 = time.perf_counter()
        for _ in range(20):
            hashlib.sha256(self._buffer)
        self._bytes_per_s = 20 * len(self._buffer) / (time.perf_counter() - t0)

    def __call__(self, seconds: float = 2e-6) -> None:
        hashlib.sha256(self._buffer[:max(2048, int(seconds * self._bytes_per_s))])


def serve() -> int:
    """The engine process, with the stand-in backend and arenas that count as page-locked."""
    from trtserve.server.engine import process
    from trtserve.server.ipc.arena import Arena
    from trtserve.server.process import child, loops

    Arena.pin = lambda self: setattr(self, "pinned", True)  # type: ignore[method-assign]
    close = Arena.close

    def unpin_then_close(self: Arena) -> None:
        self.pinned = False  # nothing was registered with CUDA
        close(self)

    Arena.close = unpin_then_close  # type: ignore[method-assign]
    payload = child.boot()
    backend = _backend_class()
    backend.cuda_call = _CudaCall()
    backend.device_s = float(os.environ.get("FAKE_GPU_DEVICE_US", "160")) / 1e6
    payload["options"] = dataclasses.replace(payload["options"], backend_factories={"tensorrt_plan": backend})
    return loops.run(lambda: process._run(payload), payload["options"].event_loop)


def _repository(root: pathlib.Path, max_batch: int, instances: int) -> pathlib.Path:
    repo = root / "repo"
    (repo / "heavy" / "1").mkdir(parents=True, exist_ok=True)
    (repo / "heavy" / "config.pbtxt").write_text(
        f'name: "heavy"\nplatform: "tensorrt_plan"\nmax_batch_size: {max_batch}\n'
        f'input [ {{ name: "INPUT0", data_type: TYPE_FP16, dims: [ {N} ] }} ]\n'
        f'output [ {{ name: "OUTPUT0", data_type: TYPE_FP16, dims: [ {N} ] }} ]\n'
        f'instance_group [ {{ count: {instances}, kind: KIND_GPU }} ]\ndynamic_batching {{ }}\n')
    return repo


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device-us", type=float, default=160.0)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--concurrency", default="4,16,64")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--engine-cpus", default=None)
    p.add_argument("--baseline", type=pathlib.Path, default=None,
                   help="a checkout of another commit: its engine measured in the same run")
    p.add_argument("--event-loops", default="auto",
                   help="the engine's event loops to compare, e.g. uvloop,asyncio (default: what serve takes)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(list(argv) if argv is not None else None)
    if a.serve:
        return serve()
    from bench import engine_alone
    from trtserve.cli import DEFAULT_GIL_SWITCH_INTERVAL_US  # what `trtserve serve` sets where TensorRT runs

    root = pathlib.Path(tempfile.mkdtemp(prefix="trtserve-fake-gpu-"))
    try:
        repo = _repository(root, a.max_batch, a.instances)
        here = pathlib.Path(__file__).resolve().parent.parent
        choices = [x for x in a.event_loops.split(",") if x]
        codes: List[Tuple[str, pathlib.Path, str]] = [("this" if len(choices) == 1 else x, here, x) for x in choices]
        if a.baseline is not None:
            codes.append(("baseline", a.baseline.resolve(), "auto"))
        device_rows_s = a.max_batch / (a.device_us / 1e6)
        print(f"engine with a stand-in GPU: {a.device_us:g} us per batch of up to {a.max_batch} rows "
              f"(device alone: {device_rows_s:,.0f} rows/s), {a.rows}-row requests of {N} FP16, "
              f"{a.instances} instances; medians of {a.rounds} round(s)")
        print(f"{'code':>9} {'in flight':>9} {'req/s':>8} {'rows/s':>11} {'of device':>9} {'p50 ms':>7} {'batch':>6} "
              f"{'engine cores':>12} {'engine us/req':>13} {'driver cores':>12}", flush=True)
        inputs = [("INPUT0", "FP16", (N,))]
        for level in [int(x) for x in a.concurrency.split(",")]:
            results: Dict[str, List[Dict[str, float]]] = {name: [] for name, _, _ in codes}
            for _ in range(a.rounds):
                for name, code, event_loop in codes:
                    # run as a script, so that ``trtserve`` comes from PYTHONPATH (that checkout), not the working
                    # folder
                    env = {"PYTHONPATH": str(code), "FAKE_GPU_DEVICE_US": str(a.device_us)}
                    engine = engine_alone.Engine(repo, a.engine_cpus, env=env, script=[__file__, "--serve"],
                                                 switch_interval=DEFAULT_GIL_SWITCH_INTERVAL_US / 1e6,
                                                 event_loop=event_loop)
                    try:
                        results[name].append(asyncio.run(engine_alone._level(engine, "heavy", inputs, a.rows, level,
                                                                             a.warmup, a.duration)))
                    finally:
                        engine.stop()
            for name, _, _ in codes:
                rs = sorted(results[name], key=lambda r: r["req_s"])
                r = rs[len(rs) // 2]
                print(f"{name:>9} {level:>9} {r['req_s']:>8.0f} {r['rows_s']:>11.0f} "
                      f"{r['rows_s'] / device_rows_s:>9.0%} {r['p50_ms']:>7.2f} {r['mean_batch']:>6.0f} "
                      f"{r['engine_cores']:>12.2f} {r['engine_us_per_req']:>13.1f} {r['driver_cores']:>12.2f}",
                      flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the model repository: nothing in it is kept
    return 0


if __name__ == "__main__":
    sys.exit(main())

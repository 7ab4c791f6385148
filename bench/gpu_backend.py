"""Raw TensorRT rows/s versus rows/s through TensorRTBackend.run() on 1/2/4 instances (needs a GPU).

    python -m bench.gpu_backend [--seconds 1.0] [--out DIR] [--models small,heavy,conv]

For each model and batch size B it measures:
  raw       execute_async_v3 in a loop on one context at batch B (device buffers only, no copies)
  raw+io    the same with H2D before and D2H after each execute (one stream)
  raw xN    the raw loop on N contexts at once, one thread and stream each: what the GPU gives N streams
  run xN    TensorRTBackend.run() from N instance threads (pinned staging, copies, checks, result arrays)
  batcher xN  the server's DynamicBatcher + executor pool over N instances, fed requests of B/4 rows
            (max_batch_size B, so every batch has B rows when the queue is full)
and prints a table; "best/raw" is the best column of a kind over raw (rows/s throughout). Models (deterministic weights, via ``onnx``):
  small     MLP 64 -> 256 -> 16, FP32 (TF32)
  heavy     MLP 256 -> 4x4096 -> 256, FP16 weights and IO (many FLOPs per row, little IO; yet a batch of 1024
            takes only ~0.16 ms on an H200, so at B/4 rows per request the Python front end's request rate shows)
  conv      ResNet-18-shaped conv net (bench/resnet.py), FP32 IO with FP16 compute, 602 KB per image: measured
            with host inputs and with inputs already in device memory (CUDA shared memory's path)
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from trtserve.cli import DEFAULT_GIL_SWITCH_INTERVAL_US


@dataclass(frozen=True)
class BenchModel:
    name: str
    dims_in: Tuple[int, ...]  # per row (config dims), batch dimension excluded
    dims_out: Tuple[int, ...]
    wire: str
    max_batch: int
    batches: Tuple[int, ...]
    make: Callable[[pathlib.Path], None]
    parameters: Dict[str, str]
    # also feed the batcher requests whose inputs are already in device memory (what CUDA shared memory hands
    # the backend): for models whose inputs are large next to their compute, host copies would be measured
    device_inputs: bool = False


def make_deep_mlp(path: pathlib.Path, n_in: int = 256, hidden: int = 4096, layers: int = 4, n_out: int = 256) -> None:
    """FP16 MLP: n_in -> (hidden, Relu) x layers -> n_out; weights scaled to keep activations O(1)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    dims = [n_in] + [hidden] * layers + [n_out]
    nodes, inits, prev = [], [], "INPUT0"
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float16)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        out = "OUTPUT0" if i == len(dims) - 2 else f"h{i}"
        mm = out if i == len(dims) - 2 else f"m{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [mm]))
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [mm], [out]))
        prev = out
    graph = helper.make_graph(
        nodes, "deep_mlp",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT16, ["batch", n_in])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT16, ["batch", n_out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="trtserve-bench")
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _models() -> Dict[str, BenchModel]:
    from bench.resnet import make_resnet18
    from trtserve.server.examples.make_mlp import make_mlp

    return {
        "small": BenchModel("small", (64,), (16,), "FP32", 256, (1, 8, 64, 256),
                            lambda p: make_mlp(p, 64, 256, 16), {}),
        "heavy": BenchModel("heavy", (256,), (256,), "FP16", 4096, (16, 128, 1024, 4096),
                            lambda p: make_deep_mlp(p), {"trtserve.fp16": "true"}),
        "conv": BenchModel("conv", (3, 224, 224), (1000,), "FP32", 128, (32, 128),
                           lambda p: make_resnet18(p), {"trtserve.fp16": "true"}, device_inputs=True),
    }


def _timed_loop(step: Callable[[], None], seconds: float) -> Tuple[int, float]:
    """Runs ``step`` until ``seconds`` pass; (iterations, elapsed s)."""
    n, t0 = 0, time.perf_counter()
    deadline = t0 + seconds
    while True:
        step()
        n += 1
        now = time.perf_counter()
        if now >= deadline:
            return n, now - t0


def raw_rows_per_s(backend, batch: int, seconds: float, with_io: bool, instance: int = 0) -> float:
    """execute_async_v3 in a loop on one instance's context and stream, bypassing run() (its buffers, profile)."""
    import cupy

    inst = backend._instances[instance]  # the bench looks inside on purpose: same context, stream and buffers
    ctx, stream = inst._ctx, inst._stream
    tensors = inst._tensors
    shapes = {t.name: (batch,) + tuple(inst._ranges[t.name].max[1:]) for t in inst._info.inputs}
    with cupy.cuda.Device(backend.config.device_id):
        for name, shape in shapes.items():
            assert ctx.set_input_shape(name, shape), name
        assert ctx.infer_shapes() == []
        for name, t in tensors.items():
            assert ctx.set_tensor_address(name, t.ptr), name
        in_bytes = {n: int(np.prod(s)) * tensors[n].dtype.itemsize for n, s in shapes.items()}
        out_bytes = {t.name: int(np.prod(ctx.get_tensor_shape(t.name))) * tensors[t.name].dtype.itemsize
                     for t in inst._info.outputs}

        def step() -> None:
            for _ in range(20):  # enqueue ahead like a real pipeline; sync every 20
                if with_io:
                    for n, b in in_bytes.items():
                        tensors[n].upload(b, stream)
                assert ctx.execute_async_v3(stream.ptr)
                if with_io:
                    for n, b in out_bytes.items():
                        tensors[n].download(b, stream)
            stream.synchronize()

        step()
        n, dt = _timed_loop(step, seconds)
    inst._shapes = {}  # the bench changed the context's shapes behind run()'s back
    return n * 20 * batch / dt


def raw_parallel_rows_per_s(backend, batch: int, seconds: float, instances: int) -> float:
    """The raw loop on ``instances`` contexts at once (one thread each); total rows/s."""
    rates = [0.0] * instances

    def work(i: int) -> None:
        rates[i] = raw_rows_per_s(backend, batch, seconds, with_io=False, instance=i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(instances)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(rates)


def _input(model: BenchModel, rows: int, device: bool):
    """Deterministic input rows; on the device (a CuPy array, as CUDA shared memory hands them over) if asked."""
    from trtserve.dtypes import from_wire

    x = np.random.default_rng(0).standard_normal((rows,) + model.dims_in).astype(from_wire(model.wire).numpy)
    if not device:
        return x
    import cupy

    return cupy.asarray(x)


def run_rows_per_s(backend, model: BenchModel, batch: int, instances: int, seconds: float,
                   device: bool = False) -> float:
    """run() from ``instances`` threads, each on its own instance, for ``seconds``."""
    x = _input(model, batch, device)
    counts = [0] * instances
    barrier = threading.Barrier(instances + 1)
    stop = threading.Event()

    def worker(i: int) -> None:
        backend.run(i, {"INPUT0": x}, ["OUTPUT0"])  # warm
        barrier.wait()
        while not stop.is_set():
            backend.run(i, {"INPUT0": x}, ["OUTPUT0"])
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(instances)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    stop.wait(seconds)  # the main thread sleeps on the event: no busy wait
    c0 = sum(counts)
    dt = time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join()
    return c0 * batch / dt


class _FirstInstances:
    """The backend seen through its first ``n`` instances, so one engine serves the 1/2/4-instance rows;
    ``pipelined`` False makes the batcher run each batch start to end on the instance's thread (the executor
    before enqueue/collect), for an A/B in one process."""

    def __init__(self, backend, n: int, pipelined: bool = True) -> None:
        self._b = backend
        self._n = n
        self.pipelined = pipelined and backend.pipelined

    def profiles(self):
        return [dataclasses.replace(p, instances=tuple(i for i in p.instances if i < self._n))
                for p in self._b.profiles() if any(i < self._n for i in p.instances)]

    def instance_count(self) -> int:
        return self._n

    def check_request(self, inputs) -> None:
        self._b.check_request(inputs)

    def staging(self, instance, shapes):
        return self._b.staging(instance, shapes)

    accepts_device_tensors = True

    def run(self, instance, inputs, outputs):
        return self._b.run(instance, inputs, outputs)

    def run_to_device(self, instance, inputs, outputs, destinations):
        return self._b.run_to_device(instance, inputs, outputs, destinations)

    def enqueue(self, instance, inputs, outputs, destinations=()):
        return self._b.enqueue(instance, inputs, outputs, destinations)

    def collect(self, instance, ticket):
        return self._b.collect(instance, ticket)


def batcher_rows_per_s(backend, model: BenchModel, batch: int, instances: int, seconds: float,
                       device: bool = False, pipelined: bool = True) -> float:
    """Closed loop through DynamicBatcher.submit with enough requests in flight to keep every instance busy;
    ``device``: each request's input is a CuPy array (the batcher hands the pieces to the backend, which copies
    them device to device into its buffers, as for CUDA shared-memory requests)."""
    from bench.batcher_overhead import closed_loop

    rows = max(1, batch // 4)
    x = _input(model, rows, device)
    return rows * closed_loop(_FirstInstances(backend, instances, pipelined), model.wire, model.dims_in,
                              model.dims_out, batch, instances, {"INPUT0": x}, rows, seconds)


def bench_model(
    model: BenchModel, workdir: pathlib.Path, seconds: float, instance_counts: Sequence[int], graphs: bool,
    with_batcher: bool, results: Optional[List[dict]] = None, serial_too: bool = False,
) -> List[List[str]]:
    """Table rows (strings) for one model; ``results`` (if given) receives the same numbers as dicts.
    ``serial_too``: also the batcher with pipelining off (results' "batcher_serial"), interleaved per cell."""
    from trtserve.server.engine.backends.base import BackendConfig, TensorSpec
    from trtserve.server.engine.backends.tensorrt import TensorRTBackend

    d = workdir / model.name / "1"
    model.make(d / "model.onnx")
    # one engine for every instance count: on TensorRT 8.6 each instance has its own profile copy
    cfg = BackendConfig(
        name=model.name, version="1", model_dir=d, default_model_filename="", max_batch_size=model.max_batch,
        inputs=[TensorSpec("INPUT0", model.wire, model.dims_in)], outputs=[TensorSpec("OUTPUT0", model.wire, model.dims_out)],
        instance_count=max(instance_counts), cache_dir=workdir / "cache", cuda_graphs=graphs,
        parameters=dict(model.parameters, **({"trtserve.graph_batch_sizes": ",".join(map(str, model.batches))}
                                             if graphs else {})),
    )
    backend = TensorRTBackend(cfg)
    t0 = time.monotonic()
    backend.open()
    print(f"# {model.name}: open {time.monotonic() - t0:.1f} s (cache hit {backend.report.cache_hit}, "
          f"graph buckets {backend.report.graph_buckets[0] if graphs else 'off'})", flush=True)
    rows = []
    try:
        for b in model.batches:
            raw = raw_rows_per_s(backend, b, seconds, with_io=False)
            raw_io = raw_rows_per_s(backend, b, seconds, with_io=True)
            raw_par = raw_parallel_rows_per_s(backend, b, seconds, max(instance_counts))
            for device in (False, True) if model.device_inputs else (False,):
                runs = [run_rows_per_s(backend, model, b, n, seconds, device) for n in instance_counts]
                batched = ([batcher_rows_per_s(backend, model, b, n, seconds, device) for n in instance_counts]
                           if with_batcher else [float("nan")] * len(instance_counts))
                serial = ([batcher_rows_per_s(backend, model, b, n, seconds, device, pipelined=False)
                           for n in instance_counts] if with_batcher and serial_too else [])
                where = "device" if device else "host"
                if results is not None:
                    results.append({"model": model.name, "graphs": graphs, "batch": b, "inputs": where, "raw": raw,
                                    "raw_io": raw_io, "raw_parallel": raw_par, "parallel": max(instance_counts),
                                    "run": dict(zip(instance_counts, runs)),
                                    "batcher": dict(zip(instance_counts, batched)),
                                    **({"batcher_serial": dict(zip(instance_counts, serial))} if serial else {})})
                label = model.name + (" +graphs" if graphs else "") + (", inputs on device" if device else "")
                rows.append([label, str(b), f"{raw:,.0f}", f"{raw_io:,.0f}", f"{raw_par:,.0f}"]
                            + [f"{r:,.0f}" for r in runs] + [f"{r:,.0f}" for r in batched]
                            + [f"{max(runs) / raw:.0%}", f"{max(batched) / raw:.0%}"]
                            + ([f"{max(serial) / raw:.0%}"] if serial else []))
                print("  " + " | ".join(rows[-1]), flush=True)
    finally:
        backend.close()
    return rows


def main(argv: Sequence[str] = ()) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=1.0, help="measuring time per cell")
    p.add_argument("--models", default="small,heavy,conv")
    p.add_argument("--instances", default="1,2,4")
    p.add_argument("--out", type=pathlib.Path, default=None, help="work folder (plans are cached there)")
    p.add_argument("--cuda-graphs", action="store_true", help="also run each model with CUDA graphs on")
    p.add_argument("--no-batcher", action="store_true", help="skip the batcher columns")
    p.add_argument("--serial-too", action="store_true",
                   help="also the batcher with pipelining off (enqueue and wait on the instance's thread)")
    p.add_argument("--switch-interval-us", type=float, default=DEFAULT_GIL_SWITCH_INTERVAL_US,
                   help="sys.setswitchinterval for this process, as `trtserve serve` sets it (0: Python's 5000 us)")
    a = p.parse_args(list(argv) or None)
    if a.switch_interval_us > 0:
        sys.setswitchinterval(a.switch_interval_us / 1e6)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from trtserve.server.engine.backends.tensorrt import compat

    ok, why = compat.available()
    if not ok:
        print(f"needs CUDA, CuPy and TensorRT: {why}", file=sys.stderr)
        return 2
    counts = [int(x) for x in a.instances.split(",")]
    models = _models()
    workdir = a.out or pathlib.Path(tempfile.mkdtemp(prefix="trtserve-bench-"))
    print(f"TensorRT {why}, GPU {compat.gpu_name(0)}, {a.seconds:.1f} s per cell", flush=True)
    table: List[List[str]] = []
    for name in a.models.split(","):
        for graphs in (False, True) if a.cuda_graphs else (False,):
            table += bench_model(models[name], workdir, a.seconds, counts, graphs, not a.no_batcher,
                                 serial_too=a.serial_too)
    head = (["model", "batch", "raw rows/s", "raw+io rows/s", f"raw x{max(counts)}"] + [f"run x{n}" for n in counts]
            + [f"batcher x{n}" for n in counts] + ["run best/raw", "batcher best/raw"]
            + (["unpipelined best/raw"] if a.serial_too else []))
    widths = [max(len(r[i]) for r in [head] + table) for i in range(len(head))]
    print()
    for r in [head, ["-" * w for w in widths]] + table:
        print(" | ".join(c.rjust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The batcher's own cost: requests/s and batches/s through DynamicBatcher + executor when the backend does nothing
but wait (no GPU needed).

    python -m bench.batcher_overhead [--batch 1024] [--instances 1,2,4] [--run-us 160] [--seconds 3] [--rounds 3]

A stand-in backend sleeps ``--run-us`` per batch (the GIL released, as during a GPU synchronize) and returns a
preallocated output; requests of batch/4 rows of 256 FP16 values are stacked into its staging buffers, as on
TensorRT. The defaults mirror bench.gpu_backend's heavy MLP at batch 1024 on an H200 (~160 us per batch), where the
batcher, not the device, sets the pace: "ideal" is what the sleeps alone would allow. Medians of ``--rounds``.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from trtserve.server.engine.backends.base import Backend, BackendConfig, BatchResult, Profile, ShapeRange

N_IN = 256


class SleepingBackend(Backend):
    """Backend contract, minus the work: run() sleeps, staging() hands out preallocated arrays."""

    def __init__(self, instances: int, batch: int, run_s: float) -> None:
        super().__init__(BackendConfig("m", "1", None, "", batch, (), (), instance_count=instances))  # type: ignore
        self._n = instances
        self._run_s = run_s
        self._stage = [np.empty((batch, N_IN), np.float16) for _ in range(instances)]
        self._out = np.zeros((batch, N_IN), np.float16)
        shape = (batch, N_IN)
        self._profiles = [Profile(0, {"INPUT0": ShapeRange((1, N_IN), shape, shape)}, tuple(range(instances)))]

    def profiles(self):
        return self._profiles

    def instance_count(self) -> int:
        return self._n

    def check_request(self, inputs: Mapping[str, np.ndarray]) -> None:
        pass

    def staging(self, instance: int, shapes: Mapping[str, Tuple[int, ...]]) -> Optional[Dict[str, np.ndarray]]:
        return {"INPUT0": self._stage[instance][:shapes["INPUT0"][0]]}

    def open(self) -> None:
        pass

    def io(self):
        return (), ()

    def close(self) -> None:
        pass

    def run(self, instance: int, inputs: Dict[str, np.ndarray], outputs: Sequence[str]) -> BatchResult:
        time.sleep(self._run_s)
        return BatchResult(outputs={"OUTPUT0": self._out[:inputs["INPUT0"].shape[0]]}, compute_input_ns=0,
                           compute_infer_ns=0, compute_output_ns=0)


def closed_loop(backend, wire: str, dims_in: Sequence[int], dims_out: Sequence[int], batch: int, instances: int,
                inputs: Mapping[str, object], rows: int, seconds: float) -> float:
    """Requests/s through DynamicBatcher.submit over ``backend``'s first ``instances`` (max_batch_size ``batch``),
    16 closed-loop clients per instance each sending ``inputs`` (``rows`` rows): one batch running on every
    instance, one queued behind it (policy rule 5) and one forming on the queue. Shared with bench.gpu_backend."""
    from google.protobuf import text_format

    from trtserve.protos import model_config_pb2 as mc
    from trtserve.server.engine.batcher.scheduler import DynamicBatcher
    from trtserve.server.events import Observer
    from trtserve.server.engine.repository.model_config import ModelSpec

    t = f"TYPE_{wire}"
    text = (f'name: "m" platform: "tensorrt_plan" max_batch_size: {batch} '
            f'input [{{ name: "INPUT0" data_type: {t} dims: {list(dims_in)} }}] '
            f'output [{{ name: "OUTPUT0" data_type: {t} dims: {list(dims_out)} }}] '
            f'instance_group [{{ count: {instances} kind: KIND_GPU }}] dynamic_batching {{ }}')
    spec = ModelSpec.from_proto(text_format.Parse(text, mc.ModelConfig()), "1")

    async def main() -> float:
        batcher = DynamicBatcher(spec, backend, Observer())
        batcher.start()
        done = 0
        stop_at = 0.0

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                await batcher.submit(inputs, ("OUTPUT0",), rows)  # type: ignore[arg-type]
                done += 1

        stop_at = time.perf_counter() + 0.3  # warm-up
        await asyncio.gather(*(client() for _ in range(16 * instances)))
        done = 0
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        await asyncio.gather(*(client() for _ in range(16 * instances)))
        dt = time.perf_counter() - t0
        await batcher.stop()
        return done / dt

    return asyncio.run(main())


def measure(batch: int, instances: int, run_s: float, seconds: float) -> float:
    """Requests/s of batch/4 rows against the sleeping backend (bench.gpu_backend's load)."""
    rows = max(1, batch // 4)
    x = np.random.default_rng(0).standard_normal((rows, N_IN)).astype(np.float16)
    return closed_loop(SleepingBackend(instances, batch, run_s), "FP16", (N_IN,), (N_IN,), batch, instances,
                       {"INPUT0": x}, rows, seconds)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--instances", default="1,2,4")
    p.add_argument("--run-us", type=float, default=160.0)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--switch-interval-us", type=float, default=0, help="sys.setswitchinterval (0: Python's)")
    a = p.parse_args(argv)
    if a.switch_interval_us > 0:
        sys.setswitchinterval(a.switch_interval_us / 1e6)
    print(f"batch {a.batch} in requests of {max(1, a.batch // 4)} rows, backend sleeps {a.run_us:g} us per batch, "
          f"medians of {a.rounds} x {a.seconds:g} s")
    print(f"{'instances':>9} {'requests/s':>11} {'batches/s':>10} {'ideal batches/s':>16}")
    for n in (int(x) for x in a.instances.split(",")):
        rates: List[float] = [measure(a.batch, n, a.run_us / 1e6, a.seconds) for _ in range(a.rounds)]
        rps = statistics.median(rates)
        print(f"{n:>9} {rps:>11,.0f} {rps / 4:>10,.0f} {n / (a.run_us / 1e6):>16,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

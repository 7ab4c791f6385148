"""Dynamic batching on vs off on the CPU backend: requests/s, p50/p99 and mean formed batch size at
concurrency 1, 8, 32 and 128 (``python -m bench.batching [--duration 5] [--model mlp|wide]``).

Load comes from trtserve's own load tester (closed loop, asyncio); the server runs in a child
process. The mean formed batch is inference_count / execution_count over each level's window,
read from ModelStatistics.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import platform
import shutil
import tempfile
from typing import Dict, List, Sequence, Tuple

from bench._server import ServerProcess
from trtserve.client.bench.runner import BenchConfig, run
from trtserve.client.sync import InferenceClient
from trtserve.server.examples import REPOSITORY

CONFIGS = {
    "off": "",  # no dynamic_batching: each request runs as its own batch
    "on": "dynamic_batching { }",  # delay 0: batches are whatever queued while the last one ran
    "on+delay": "dynamic_batching { max_queue_delay_microseconds: 1000 }",
}


def make_repo(root: pathlib.Path, mode: str, model: str, intra_op_threads: int) -> pathlib.Path:
    repo = root / mode
    shutil.copytree(REPOSITORY / "mlp", repo / "m")
    if model == "wide":  # a larger CPU model: 1024 -> 4096 -> 1024
        from trtserve.server.examples.make_mlp import make_mlp

        make_mlp(repo / "m" / "1" / "model.onnx", n_in=1024, hidden=4096, n_out=1024)
    n_in, n_out = (1024, 1024) if model == "wide" else (64, 16)
    (repo / "m" / "config.pbtxt").write_text(f"""
name: "m" platform: "onnxruntime_onnx" max_batch_size: 128
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {n_in} ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {n_out} ] }} ]
{CONFIGS[mode]}
parameters {{ key: "trtserve.intra_op_threads" value {{ string_value: "{intra_op_threads}" }} }}
""")
    return repo


def _counts(url: str) -> Tuple[int, int]:
    with InferenceClient(url) as c:
        s = c.model_statistics("m").model_stats[0]
        return s.inference_count, s.execution_count


def measure(url: str, levels: Sequence[int], duration: float) -> List[Dict[str, float]]:
    rows = []
    for level in levels:
        before = _counts(url)
        result = asyncio.run(run(BenchConfig(url=url, model="m", concurrency=[level], duration_s=duration,
                                             warmup_s=min(1.0, duration / 3))))
        after = _counts(url)
        lv = result.levels[0]
        batches = after[1] - before[1]
        rows.append({"concurrency": level, "rps": lv.requests_per_s, "p50_ms": lv.p50_ms, "p99_ms": lv.p99_ms,
                     "mean_batch": (after[0] - before[0]) / batches if batches else 0.0,
                     "errors": lv.errors})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--levels", default="1,8,32,128")
    p.add_argument("--model", choices=["mlp", "wide"], default="mlp")
    p.add_argument("--modes", default="off,on,on+delay")
    p.add_argument("--intra-op-threads", type=int, default=1,
                   help="ONNX Runtime threads per batch; 1 leaves a core to the gRPC front end on small machines")
    a = p.parse_args(argv)
    levels = [int(x) for x in a.levels.split(",")]
    print(f"# dynamic batching, model {a.model}, ONNX Runtime CPU, {platform.node()} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), {a.duration:.0f} s per level, "
          f"ORT intra-op threads {a.intra_op_threads}")
    print(f"{'batching':<10} {'conc':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>11} {'errors':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in a.modes.split(","):
            with ServerProcess(make_repo(pathlib.Path(tmp), mode, a.model, a.intra_op_threads)) as s:
                for r in measure(s.url, levels, a.duration):
                    print(f"{mode:<10} {r['concurrency']:>5} {r['rps']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                          f"{r['mean_batch']:>11.1f} {r['errors']:>6.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

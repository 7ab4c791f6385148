"""CPU benchmark suite, one run, side by side (``python -m bench.cpu [--duration 3] [--levels 1,8,32,128]
[--models mlp,wide] [--no-perf-analyzer] [--out DIR] [--name NAME]``).

For the example MLP and a larger CPU model (1024 -> 4096 -> 1024), in one run:
(a) the Python gRPC ceiling (bench/ceiling_server.py: decode, return a precomputed response),
(b) trtserve with ONNX Runtime, dynamic batching off and on,
(c) ONNX Runtime called in-process at batch 1 and at the batch sizes the batcher formed,
loaded by ``trtserve bench`` (closed loop) and by NVIDIA's perf_analyzer at each concurrency.
Writes docs/benchmarks/cpu.md (tables + ratios) and a PNG per model.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import AbstractSet, Dict, List, Mapping, Optional, Tuple

import numpy as np

from bench._server import ServerProcess
from bench.batching import _counts, make_repo

OUT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
MODELS = {"mlp": (64, 16), "wide": (1024, 1024)}


def perf_analyzer_path() -> str:
    for c in (os.environ.get("PERF_ANALYZER"), "/tmp/perf-analyzer/perf_analyzer", shutil.which("perf_analyzer")):
        if c and pathlib.Path(c).is_file() and subprocess.run([c, "--version"], capture_output=True).returncode == 0:
            return c
    return ""


def load_trtserve(url: str, level: int, duration: float, model: str = "m", engine: str = "auto",
                  warmup_s: Optional[float] = None, transport: str = "auto",
                  env: Optional[Mapping[str, str]] = None) -> Optional[Dict[str, float]]:
    """One closed-loop level of ``trtserve bench``, run as users run it: the CLI in its own process (which also
    picks its gRPC client settings before gRPC loads, see trtserve/cli.py; ``env`` replaces the environment it
    gets). None when it fails."""
    warmup = min(1.0, duration / 3) if warmup_s is None else warmup_s
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "trtserve", "bench", "--url", url, "--model", model, "--concurrency",
               str(level), "--duration", str(duration), "--warmup", str(warmup), "--engine", engine,
               "--transport", transport, "--json", str(out), "--quiet"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env=None if env is None else dict(env))
        if proc.returncode != 0 or not out.exists():
            print(f"trtserve bench failed ({model} concurrency {level}): {proc.stdout[-600:]} {proc.stderr[-600:]}",
                  file=sys.stderr, flush=True)
            return None
        r = json.loads(out.read_text())["levels"][0]
    return {"rps": r["requests_per_s"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "errors": r["errors"]}


def load_perf_analyzer(pa: str, url: str, level: int, duration: float, model: str = "m", batch: int = 1,
                       shm: str = "none", max_trials: int = 10,
                       cpus: Optional[AbstractSet[int]] = None,
                       share: Optional[int] = None) -> Optional[Dict[str, float]]:
    """One concurrency level of perf_analyzer; rps is requests/s, rows_per_s its Inferences/Second (requests x
    batch). ``shm``: none, system or cuda (output regions of 1 MiB). ``cpus``: perf_analyzer runs on these CPUs
    only. ``share``: its contexts per gRPC connection (tritonclient's TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT;
    None: tritonclient's default). ``client_cores``: the CPU perf_analyzer used over its whole run (trials included)
    per second of it; ``client_us``: its latency split (CLIENT_SPLIT), where its CSV has it. None when perf_analyzer
    fails."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "pa.csv"
        cmd = [pa, "-m", model, "-i", "grpc", "-u", url, "-b", str(batch), "--concurrency-range", f"{level}:{level}",
               "--measurement-interval", str(int(duration * 1000)), "--stability-percentage", "100",
               "--max-trials", str(max_trials), "-f", str(out)]
        if shm != "none":
            cmd += ["--shared-memory", shm, "--output-shared-memory-size", str(1 << 20)]
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None  # type: ignore[arg-type]
        env = dict(os.environ, TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT=str(share)) if share else None
        used, t0 = children_cpu_s(), time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, close_fds=False, preexec_fn=pin,
                              env=env)
        client_cores = (children_cpu_s() - used) / max(time.monotonic() - t0, 1e-9)
        if proc.returncode != 0 or not out.exists():
            print(f"perf_analyzer failed ({model} concurrency {level} shm={shm}): {proc.stdout[-600:]} "
                  f"{proc.stderr[-600:]}", file=sys.stderr, flush=True)
            return None
        row = next(csv.DictReader(out.open()))
        rows_per_s = float(row["Inferences/Second"])
        r = {"rps": rows_per_s / batch, "rows_per_s": rows_per_s, "p50_ms": float(row["p50 latency"]) / 1000,
             "p99_ms": float(row["p99 latency"]) / 1000, "errors": 0, "client_cores": client_cores}
        split = {k: float(row[c]) for k, c in CLIENT_SPLIT.items() if row.get(c)}
        if split:
            r["client_us"] = split
        return r


# perf_analyzer's CSV columns that split its mean latency (us) by where it was spent: its own send and receive
# work, and the rest of the wait for the response less the server's queue and compute ("network+server": the
# transport both ways and the server's time outside its queue and compute).
CLIENT_SPLIT = {"send": "Client Send", "network_server": "Network+Server Send/Recv", "recv": "Client Recv"}


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's children that ended and were waited for."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def raw_ort(model_dir: pathlib.Path, n_in: int, batch: int, iters: int = 300) -> Tuple[float, float]:
    """(p50 ms, rows/s) of InferenceSession.run in-process at ``batch`` (1 intra-op thread, as served)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    s = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, n_in)).astype(np.float32)
    for _ in range(20):
        s.run(None, {"INPUT0": x})
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        s.run(None, {"INPUT0": x})
        times.append(time.perf_counter() - t)
    p50 = statistics.median(times)
    return p50 * 1e3, batch / p50


def plot(model: str, rows: List[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for (server, tool), style in zip(sorted({(r["server"], r["tool"]) for r in rows}), ["-o", "--s", "-^", "--v",
                                                                                        "-d", "--x"]):
        pts = sorted((r["concurrency"], r["rps"], r["p50_ms"]) for r in rows
                     if r["server"] == server and r["tool"] == tool)
        ax[0].plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{server} ({tool})")
        ax[1].plot([p[1] for p in pts], [p[2] for p in pts], style, label=f"{server} ({tool})")
    ax[0].set(xscale="log", xlabel="concurrency", ylabel="requests/s", title=f"{model}: throughput")
    ax[1].set(xlabel="requests/s", ylabel="p50 latency (ms)", yscale="log", title=f"{model}: latency vs throughput")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--levels", default="1,8,32,128")
    p.add_argument("--models", default="mlp,wide")
    p.add_argument("--no-perf-analyzer", action="store_true")
    p.add_argument("--out", type=pathlib.Path, default=OUT, help="where cpu.md and the plots go")
    p.add_argument("--name", default="cpu", help="file name stem: NAME.md, NAME_<model>.png")
    a = p.parse_args(argv)
    out_dir = a.out
    levels = [int(x) for x in a.levels.split(",")]
    pa = "" if a.no_perf_analyzer else perf_analyzer_path()
    tools = ["trtserve bench"] + (["perf_analyzer"] if pa else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.node()}, {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    md = [f"# CPU benchmarks\n\nMeasured by `python -m bench.cpu --duration {a.duration:g} --levels {a.levels}` on "
          f"{machine}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Server, load generator and (for the "
          "ceiling) the bare server share the machine's cores, so absolute numbers are low; the ratios are the point.\n"]
    for model in a.models.split(","):
        n_in, _ = MODELS[model]
        rows: List[dict] = []
        formed: Dict[Tuple[str, int], float] = {}
        with tempfile.TemporaryDirectory() as tmp:
            root = pathlib.Path(tmp)
            servers = {"ceiling": None, "trtserve batching off": "off", "trtserve batching on": "on"}
            for server, mode in servers.items():
                if mode is None:
                    proc = ServerProcess(None, command=[sys.executable, "-m", "bench.ceiling_server", "--inputs",
                                                        str(n_in), "--outputs", str(MODELS[model][1])])
                else:
                    proc = ServerProcess(make_repo(root, mode, model, 1))
                with proc as s:
                    for level in levels:
                        for tool in tools:
                            before = _counts(s.url) if mode else None
                            r = (load_trtserve(s.url, level, a.duration) if tool == "trtserve bench"
                                 else load_perf_analyzer(pa, s.url, level, a.duration))
                            if r is None:
                                continue
                            if mode:
                                after = _counts(s.url)
                                formed[(server, level)] = (after[0] - before[0]) / max(1, after[1] - before[1])
                            rows.append({"model": model, "server": server, "tool": tool, "concurrency": level,
                                         **r, "mean_batch": formed.get((server, level), float("nan"))})
                            print(f"{model:5} {server:22} {tool:15} c={level:<4} {r['rps']:8.0f} req/s  "
                                  f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
                                  f"batch {formed.get((server, level), float('nan')):5.1f}", flush=True)
            model_dir = root / "on" / "m"
            raw = {b: raw_ort(model_dir, n_in, b) for b in sorted({1} | {max(1, round(v)) for v in formed.values()})}
        md.append(f"\n## {model} ({n_in} inputs)\n\n| server | load tool | concurrency | req/s | p50 ms | p99 ms | "
                  "mean formed batch |\n|---|---|---:|---:|---:|---:|---:|")
        for r in rows:
            mb = "" if np.isnan(r["mean_batch"]) else f"{r['mean_batch']:.1f}"
            md.append(f"| {r['server']} | {r['tool']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | "
                      f"{r['p99_ms']:.2f} | {mb} |")
        md.append("\nONNX Runtime in-process (1 intra-op thread): " + ", ".join(
            f"batch {b}: p50 {v[0]:.3f} ms, {v[1]:.0f} rows/s" for b, v in raw.items()))

        def get(server: str, level: int, tool: str = "trtserve bench") -> Optional[dict]:
            return next((r for r in rows if r["server"] == server and r["concurrency"] == level
                         and r["tool"] == tool), None)
        lines = []
        for tool in tools:
            for level in levels:
                on, ceil = get("trtserve batching on", level, tool), get("ceiling", level, tool)
                if on and ceil:
                    lines.append(f"- {tool}, concurrency {level}: trtserve (batching on) / ceiling throughput = "
                                 f"{on['rps'] / ceil['rps']:.2f}")
            one, ceil1 = get("trtserve batching off", 1, tool), get("ceiling", 1, tool)
            if one:
                lines.append(f"- {tool}: added p50 latency at concurrency 1 = trtserve p50 - raw ORT p50 = "
                             f"{one['p50_ms'] - raw[1][0]:.3f} ms (ceiling server p50 "
                             f"{ceil1['p50_ms'] if ceil1 else float('nan'):.3f} ms)")
        for level in levels:
            b1, b2 = get("trtserve batching on", level), get("trtserve batching on", level, "perf_analyzer")
            if b1 and b2:
                lines.append(f"- trtserve bench vs perf_analyzer on trtserve (batching on), concurrency {level}: "
                             f"throughput {b1['rps']:.0f} vs {b2['rps']:.0f} ({(b1['rps'] / b2['rps'] - 1) * 100:+.0f}%),"
                             f" p50 {b1['p50_ms']:.2f} vs {b2['p50_ms']:.2f} ms "
                             f"({(b1['p50_ms'] / b2['p50_ms'] - 1) * 100:+.0f}%)")
        md.append("\n" + "\n".join(lines))
        png = out_dir / f"{a.name}_{model}.png"
        try:
            plot(model, rows, png)
            md.append(f"\n![{model}]({png.name})\n")
        except ImportError:  # e.g. the GPU kit, which carries no matplotlib
            print("matplotlib not installed: no plot", file=sys.stderr)
    (out_dir / f"{a.name}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out_dir / (a.name + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

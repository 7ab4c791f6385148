"""GPU host, the full server: the small MLP on TensorRT behind 1, 2, 4, 8 front-end processes (issue 17).

``python -m bench.gpu_frontends [--frontends 1,2,4,8] [--concurrency 256] [--pa-processes 4] [--duration 5]
[--server-cpus 0-9] [--client-cpus 10-15] [--protocols grpc,http] [--graphs] [--instances 2] [--queue-delay-us 0]
[--ceiling-grpc-defaults] [--baseline DIR] [--also 'NAME=ARGS'] [--profile DIR]``
builds the small MLP (64->256->256->16, FP32) as a TensorRT model (2 instances, max_batch_size 256, dynamic
batching; CUDA graphs with --graphs; --instances and --queue-delay-us change the model's instance count and
max_queue_delay_microseconds), starts ``trtserve serve --frontends N`` pinned to the server CPUs, and drives
it with several perf_analyzer processes pinned to the client CPUs (their concurrencies add up to --concurrency;
each context its own connection), all measuring at once. Beside it, in the same run, the bare grpc.aio ceiling
server (bench/ceiling_server.py) on the same CPUs and on the gRPC I/O ``trtserve serve`` sets up (GRPC_EXPERIMENTS,
trtserve/cli.py; --ceiling-grpc-defaults adds one on grpcio's defaults), with --baseline the same servers run from
another checkout (an older commit), and with --also a server started with other arguments (an option on and off).
Prints requests/s (summed), p50/p99 (the median of the processes' values), the mean formed batch, the server's CPU in
cores (in all; the engine process and its event loop's thread; the front ends together and the busiest one) and the
load generators' CPU. With --profile, py-spy samples the engine and one front end of each trtserve server under a
second load after the measured one (sampling slows what it samples: the table's numbers come from the load without
it; bench/pyspy.py): their main threads' busiest functions are printed and the raw profiles kept in DIR. Needs CUDA,
CuPy, TensorRT and perf_analyzer (run it with the GPU kit).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

from bench import frontends as fb
from bench import pyspy
from bench.cpu import children_cpu_s


def _pa() -> str:
    for c in (os.environ.get("PERF_ANALYZER"), shutil.which("perf_analyzer"), "/tmp/perf-analyzer/perf_analyzer"):
        if c and pathlib.Path(c).is_file():
            return c
    raise SystemExit("perf_analyzer not found (PERF_ANALYZER, PATH)")


def _one_pa(pa: str, url: str, model: str, level: int, duration: float, cpus: Optional[str],
            protocol: str = "grpc") -> Optional[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "pa.csv"
        cmd = [pa, "-m", model, "-i", protocol, "-u", url, "-b", "1", "--concurrency-range", f"{level}:{level}",
               "--measurement-mode", "time_windows", "--measurement-interval", str(int(duration * 1000)),
               "--stability-percentage", "100", "--max-trials", "3", "-f", str(out)]
        if cpus:
            cmd = ["taskset", "-c", cpus] + cmd
        env = dict(os.environ, TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120 + 10 * duration, env=env)
        if proc.returncode != 0 or not out.exists():
            print(f"perf_analyzer failed: {proc.stdout[-400:]} {proc.stderr[-400:]}", file=sys.stderr, flush=True)
            return None
        row = next(csv.DictReader(out.open()))
        return {"rps": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1000,
                "p99_ms": float(row["p99 latency"]) / 1000}


def _load(pa: str, url: str, model: str, total: int, processes: int, duration: float,
          cpus: Optional[str], protocol: str = "grpc") -> Optional[dict]:
    each = [total // processes + (1 if i < total % processes else 0) for i in range(processes)]
    with concurrent.futures.ThreadPoolExecutor(processes) as pool:
        results = list(pool.map(lambda c: _one_pa(pa, url, model, c, duration, cpus, protocol), each))
    if any(r is None for r in results):
        return None
    return {"rps": sum(r["rps"] for r in results), "p50_ms": statistics.median(r["p50_ms"] for r in results),
            "p99_ms": statistics.median(r["p99_ms"] for r in results)}


def _repo(work: pathlib.Path, graphs: bool = False, instances: int = 2, queue_delay_us: int = 0) -> pathlib.Path:
    from bench.gpu import _config
    from trtserve.server.examples.make_mlp import make_mlp

    repo = work / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    make_mlp(repo / "m" / "1" / "model.onnx", 64, 256, 16)
    (repo / "m" / "config.pbtxt").write_text(_config("m", "FP32", (64,), (16,), 256, instances, graphs=graphs,
                                                      queue_delay_us=queue_delay_us))
    return repo


def _server(name: str, cmd: List[str], port: int, metrics_port: Optional[int], cpus: Optional[str],
            checkout: Optional[pathlib.Path] = None, env: Optional[Dict[str, str]] = None) -> fb.Server:
    if cpus:
        cmd = ["taskset", "-c", cpus] + cmd
    return fb.Server(name, cmd, port, metrics_port, checkout, env)


class _Profiles(threading.Thread):
    """py-spy on the engine and the first front end, started a second into a load (perf_analyzer's connections
    are up by then) for ``seconds``."""

    def __init__(self, spy: str, where: pathlib.Path, label: str, roles: Dict[str, int], seconds: float) -> None:
        super().__init__(daemon=True)
        self.records: List[Tuple[str, int, pathlib.Path]] = []
        tag = label.replace(" ", "-")
        for role in ("engine", "frontend"):
            pid = next((int(k.split()[1]) for k in sorted(roles) if k.startswith(role + " ")), None)
            if pid is not None:
                self.records.append((role, pid, where / f"{tag}-{role}-{pid}.txt"))
        self._spy, self._seconds = spy, seconds

    def run(self) -> None:
        time.sleep(1.0)
        procs = [pyspy.start(self._spy, pid, self._seconds, raw) for _role, pid, raw in self.records]
        for proc in procs:
            proc.wait()


def _profile_later(spy: str, where: pathlib.Path, label: str, roles: Dict[str, int], seconds: float) -> _Profiles:
    where.mkdir(parents=True, exist_ok=True)
    profiles = _Profiles(spy, where, label, roles, seconds)
    profiles.start()
    return profiles


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frontends", default="1,2,4,8")
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--pa-processes", type=int, default=4)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--server-cpus", default="0-9")
    p.add_argument("--client-cpus", default="10-15")
    p.add_argument("--no-ceiling", action="store_true")
    p.add_argument("--uvloop-ceiling", action="store_true",
                   help="also the ceiling server on uvloop, the loop trtserve's processes take where it is installed")
    p.add_argument("--ceiling-grpc-defaults", action="store_true",
                   help="also the ceiling on grpcio's default I/O (EventEngine); the others run on the gRPC I/O "
                        "`trtserve serve` sets up (trtserve/cli.py, GRPC_EXPERIMENTS)")
    p.add_argument("--graphs", action="store_true", help="the model with CUDA graphs on")
    p.add_argument("--instances", type=int, default=2, help="the model's instance count")
    p.add_argument("--queue-delay-us", type=int, default=0, help="the model's max_queue_delay_microseconds")
    p.add_argument("--baseline", type=pathlib.Path, default=None,
                   help="another checkout (an older commit): its servers with the same --frontends in the same run")
    p.add_argument("--also", action="append", default=[], metavar="NAME=ARGS",
                   help="one more trtserve server in the same run, named NAME, with these extra `trtserve serve` "
                        "arguments (they should say --frontends), e.g. 'f6 normal=--frontends 6 "
                        "--frontend-scheduling normal'; repeatable")
    p.add_argument("--protocols", default="grpc", help="trtserve's ports to load, in turn: grpc, http or both "
                                                      "(grpc,http); the ceiling is gRPC only")
    p.add_argument("--profile", type=pathlib.Path, default=None,
                   help="py-spy the engine and a front end of each trtserve server during its load; raw files here")
    a = p.parse_args(list(argv) if argv is not None else None)
    pa = _pa()
    spy = pyspy.find() if a.profile else None
    if a.profile and spy is None:
        print("--profile: py-spy not found ($PY_SPY, PATH): no profiles", flush=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="trtserve-gpu-frontends-"))
    try:
        return _measure(a, pa, spy, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the model and its engine cache: made again by each run


def _measure(a: argparse.Namespace, pa: str, spy: Optional[str], work: pathlib.Path) -> int:
    """Each server of the plan in turn under the same load, a row each; the table at the end."""
    repo = _repo(work, a.graphs, a.instances, a.queue_delay_us)
    hz = os.sysconf("SC_CLK_TCK")
    rows: List[List[str]] = []
    head = ["server", "req/s", "p50 ms", "p99 ms", "mean batch", "server CPU", "engine (loop)", "front ends (busiest)",
            "load gen CPU", "steal"]
    print(f"# {os.cpu_count()} CPUs; server on {a.server_cpus}, {a.pa_processes} perf_analyzer processes on "
          f"{a.client_cpus}, concurrency {a.concurrency} in all; {a.duration:g} s windows; the model on {a.instances} "
          f"instance{'s' if a.instances != 1 else ''}, max_queue_delay_microseconds {a.queue_delay_us}", flush=True)
    plan: List[tuple] = [] if a.no_ceiling else [("ceiling", None, [])]
    if a.uvloop_ceiling:
        plan.append(("ceiling uvloop", None, ["--event-loop", "uvloop"]))
    if a.ceiling_grpc_defaults:
        plan.append(("ceiling grpc defaults", None, []))
    plan += [(f"trtserve f{n}", int(n), ["--frontends", n]) for n in a.frontends.split(",")]
    if a.baseline is not None:
        plan += [(f"baseline f{n}", int(n), ["--frontends", n]) for n in a.frontends.split(",")]
    for also in a.also:
        name, args = fb.also_server(also)
        plan.append((name, 0, args))
    protocols = [x for x in a.protocols.split(",") if x]
    for name, n, args in plan:
        port, http_port = fb.free_port(), fb.free_port()
        if n is None:
            cmd = [sys.executable, "-m", "bench.ceiling_server", "--port", str(port), "--model", "m", "--inputs", "64",
                   "--outputs", "16", *args]
            server = _server(name, cmd, port, None, a.server_cpus, env=fb.ceiling_env(name == "ceiling grpc defaults"))
        else:
            mport = fb.free_port()
            cmd = [sys.executable, "-m", "trtserve", "serve", "--model-repository", str(repo), "--grpc-port",
                   str(port), "--http-port", str(http_port) if "http" in protocols else "-1", "--metrics-port",
                   str(mport), "--log-level", "warning", "--no-gpu-metrics", "--cache-dir", str(work / "cache"),
                   *args]
            server = _server(name, cmd, port, mport, a.server_cpus,
                             a.baseline.resolve() if name.startswith("baseline") else None)
        try:
            if not server.start(timeout=600):
                rows.append([name, "failed"] + [""] * (len(head) - 2))
                continue
            for protocol in ["grpc"] if n is None else protocols:
                url = server.url if protocol == "grpc" else f"127.0.0.1:{http_port}"
                label = name if n is None or protocols == ["grpc"] else f"{name} {protocol}"
                _load(pa, url, "m", a.concurrency, a.pa_processes, 1.0, a.client_cpus, protocol)  # warm-up
                before = fb.batch_counts(server.metrics()) if server.metrics_port else None
                assert server.proc is not None
                t0, c0, r0 = time.monotonic(), fb.process_tree_ticks(server.proc.pid), fb.role_ticks(server.proc.pid)
                k0, s0 = children_cpu_s(), fb.steal_ticks()
                r = _load(pa, url, "m", a.concurrency, a.pa_processes, a.duration, a.client_cpus, protocol)
                wall = time.monotonic() - t0
                split_client = f"{(children_cpu_s() - k0) / wall:.2f}"
                cpu = fb.cpu_cores(c0, fb.process_tree_ticks(server.proc.pid), wall, hz)
                roles = fb.role_cores(r0, fb.role_ticks(server.proc.pid), wall, hz)
                split = ["", ""] if n is None else [f"{roles['engine']:.2f} ({roles['loop']:.2f})",
                                                    f"{roles['frontends']:.2f} ({roles['frontend max']:.2f})"]
                split.append(split_client)
                s1 = fb.steal_ticks()  # the host's: a run it slowed is told from a slow server
                steal = fb.steal_cores(s0, s1, wall, hz)
                split.append("n/a" if steal is None else f"{steal:.2f}")
                batch = fb.mean_batch(before, fb.batch_counts(server.metrics())) if before else None
                if r is None:
                    rows.append([label, "failed", "", "", "", f"{cpu:.2f}"] + split)
                else:
                    rows.append([label, f"{r['rps']:,.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                                 "n/a" if batch is None else f"{batch:.1f}", f"{cpu:.2f}"] + split)
                print(" | ".join(rows[-1]), flush=True)
                if spy and n is not None:
                    profiles = _profile_later(spy, a.profile, label, fb.role_ticks(server.proc.pid), a.duration)
                    _load(pa, url, "m", a.concurrency, a.pa_processes, a.duration, a.client_cpus, protocol)
                    profiles.join()
                    for role, pid, raw in profiles.records:
                        print(f"profile of {label}, {role} (pid {pid}):\n  " +
                              "\n  ".join(pyspy.summary(raw, 24)), flush=True)
        finally:
            server.stop()
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    print()
    for r in [head, ["-" * w for w in widths]] + rows:
        print(" | ".join(c.rjust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

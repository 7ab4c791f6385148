"""trtserve with N gRPC front-end processes vs the bare grpc.aio ceiling, side by side, under perf_analyzer
(``python -m bench.frontends [--frontends 0,1,2] [--levels 1,8,32,128] [--duration 4] [--rounds 1] [--write PATH]``).

The model is the one issue 17 measures on the 2-core box: the example-sized MLP 64->256->256->16 on ONNX Runtime
with 1 intra-op thread, max_batch_size 32, dynamic batching with a 2 ms queue delay (the bundled example sets
500 us; the issue's numbers use 2 ms), 1 row per request. For every concurrency level, and for every round, each
server is measured in turn (the order rotates per round), so drift on a shared machine affects all alike:

- ``ceiling``: bench/ceiling_server.py, decode and return a precomputed response (no model, no batching), on the
  gRPC I/O ``trtserve serve`` sets up (GRPC_EXPERIMENTS, trtserve/cli.py), so that only what they serve differs;
  ``--ceiling-grpc-defaults`` adds it on grpcio's defaults (``ceiling grpc defaults``);
- ``trtserve fN``: ``trtserve serve --frontends N`` (N = 0: the single-process mode);
- ``baseline fN`` (with ``--baseline DIR``): the same server run from another checkout, e.g. a git worktree of an
  older commit, so a change is measured beside what it changed in one run;
- ``--also 'NAME=ARGS'``: one more ``trtserve serve`` with these arguments, e.g. an option measured on and off.

Load: perf_analyzer ``-i grpc``, ``--concurrency-range L:L``, time windows, with
TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT=1 so each of its contexts opens its own connection (SO_REUSEPORT
balances connections, not calls); or, with ``--trtserve-bench TIMEOUT_S``, ``trtserve bench`` with a deadline on
every request, as most clients set one. Per row: requests/s, p50 and p99 (perf_analyzer's), the mean formed batch
(delta nv_inference_count / delta nv_inference_exec_count from /metrics, summed over the model's label sets,
before and after the level) and the server's CPU (utime + stime of the server process and all its descendants,
from /proc, delta over the perf_analyzer run / its wall time, in cores). Medians over rounds. A server that does
not start, or a level that fails, reads "failed". The goal lines give each round's throughput ratio beside the
verdict on the medians. ``--per-process`` adds a table of CPU per request: the whole server, its front ends, its
engine, and the rest of the machine (/proc/stat's busy time less the server's: the load generator, which shares the
cores). ``--write PATH`` also writes the tables and the run's details as a Markdown page
(docs/benchmarks/frontends-2core.md quotes such tables; it is not overwritten).
"""
from __future__ import annotations

import argparse
import collections
import csv
import os
import pathlib
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Callable, Deque, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = "m"
N_IN, N_OUT = 64, 16
CONFIG = f"""
name: "{MODEL}" platform: "onnxruntime_onnx" max_batch_size: 32
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {N_IN} ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {N_OUT} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
parameters {{ key: "trtserve.intra_op_threads" value {{ string_value: "1" }} }}
"""
GOAL_P50_MS = 0.3  # at concurrency 1, trtserve's p50 within this of the ceiling's
GOAL_LEVEL = 32  # at this concurrency and above: throughput >= the ceiling's, mean batch >= GOAL_BATCH
GOAL_BATCH = 8.0


# ---- pure functions (tested in tests/test_bench_scripts.py) ------------------------------------------------------

def stat_cpu_ticks(stat_text: str) -> int:
    """utime + stime (clock ticks) from the text of /proc/<pid>/stat. The command name (field 2) is in
    parentheses and may hold spaces or parentheses, so fields are counted after the last ')'."""
    fields = stat_text[stat_text.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5); fields[0] is field 3 (state)


def parse_children(text: str) -> List[int]:
    """The pids in a /proc/<pid>/task/<tid>/children file (space-separated)."""
    return [int(x) for x in text.split()]


def tree_stats(pid: int, read: Callable[[str], Optional[str]],
               list_tasks: Callable[[int], Iterable[int]]) -> Iterator[Tuple[int, str]]:
    """(pid, text of /proc/<pid>/stat) for ``pid`` and all its descendants. ``read(path)`` returns a /proc file's
    text or None (the process is gone); ``list_tasks(pid)`` the thread ids under /proc/<pid>/task. A process
    that exits between the reads is left out."""
    seen, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        stat = read(f"/proc/{p}/stat")
        if stat is None:
            continue
        yield p, stat
        for tid in list_tasks(p):
            children = read(f"/proc/{p}/task/{tid}/children")
            if children:
                todo.extend(parse_children(children))


def tree_cpu_ticks(pid: int, read: Callable[[str], Optional[str]],
                   list_tasks: Callable[[int], Iterable[int]]) -> int:
    """utime + stime of ``pid`` and all its descendants, in clock ticks (a process gone counts as 0)."""
    return sum(stat_cpu_ticks(stat) for _, stat in tree_stats(pid, read, list_tasks))


def batch_counts(prom_text: str, model: str = MODEL) -> Tuple[float, float]:
    """(nv_inference_count, nv_inference_exec_count) for ``model`` in a Prometheus text exposition, each summed
    over the model's label sets (versions, and front ends if a server ever exposes them separately)."""
    from prometheus_client.parser import text_string_to_metric_families

    sums = {"nv_inference_count": 0.0, "nv_inference_exec_count": 0.0}
    for family in text_string_to_metric_families(prom_text):
        for s in family.samples:
            # the parser names a counter's samples <family>_total whatever the exposition called them
            name = s.name[:-len("_total")] if s.name.endswith("_total") else s.name
            if name in sums and s.labels.get("model") == model:
                sums[name] += s.value
    return sums["nv_inference_count"], sums["nv_inference_exec_count"]


def mean_batch(before: Tuple[float, float], after: Tuple[float, float]) -> Optional[float]:
    """Rows per executed batch between two batch_counts() readings; None when no batch ran."""
    batches = after[1] - before[1]
    return (after[0] - before[0]) / batches if batches > 0 else None


def cpu_cores(ticks_before: int, ticks_after: int, wall_s: float, hz: int) -> float:
    return (ticks_after - ticks_before) / hz / wall_s if wall_s > 0 else float("nan")


def steal_ticks(read: Optional[Callable[[str], Optional[str]]] = None) -> Optional[int]:
    """The machine's steal time so far (ticks, all CPUs; /proc/stat): time the hypervisor gave this VM's CPUs to
    others. Shown per round, so that a round slowed by the host can be told from a slow server. None where the
    kernel does not report it."""
    text = (read or _read)("/proc/stat") or ""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu" and len(fields) > 8:
            return int(fields[8])
    return None


def steal_cores(before: Optional[int], after: Optional[int], wall_s: float, hz: int) -> Optional[float]:
    """Cores the hypervisor took between two ``steal_ticks`` reads (None where the kernel does not report it)."""
    return None if before is None or after is None else cpu_cores(before, after, wall_s, hz)


def busy_ticks(read: Optional[Callable[[str], Optional[str]]] = None) -> Optional[int]:
    """CPU time the whole machine spent running anything so far (ticks, all CPUs; /proc/stat: user, nice, system,
    irq and softirq; guest time is inside user). With the server's own share taken out, what is left is the load
    generator's (and the rest of the machine's), which on a box they share decides as much as the server's.
    None where /proc/stat cannot be read."""
    text = (read or _read)("/proc/stat") or ""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu" and len(fields) > 7:
            user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
            return user + nice + system + irq + softirq
    return None


def per_request_us(cores: Optional[float], rps: Optional[float]) -> Optional[float]:
    """CPU per request in microseconds from cores used at ``rps`` requests/s (None when either is unknown)."""
    return None if cores is None or not rps else cores / rps * 1e6


def median_row(samples: Sequence[Optional[dict]]) -> Optional[dict]:
    """Per-key median over the rounds that succeeded (None when none did); ``n`` is how many did."""
    ok = [s for s in samples if s is not None]
    if not ok:
        return None
    row: dict = {"n": len(ok)}
    for key in ok[0]:
        vals = [s[key] for s in ok if s.get(key) is not None]
        row[key] = statistics.median(vals) if vals else None
    return row


def _fmt(v: Optional[float], spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _rows(servers: Sequence[str], levels: Sequence[int], results: Mapping[Tuple[str, int], Optional[dict]],
          cells: Callable[[dict], List[str]]) -> List[List[str]]:
    """[server, level, *cells(result)] per level and server, "failed" in every cell where the measurement failed."""
    out = []
    for level in levels:
        for server in servers:
            r = results.get((server, level))
            out.append([server, str(level)] + (["failed"] * 5 if r is None else cells(r)))
    return out


def table_rows(servers: Sequence[str], levels: Sequence[int], results: Mapping[Tuple[str, int], Optional[dict]]
               ) -> List[List[str]]:
    """[server, level, req/s, p50 ms, p99 ms, mean batch, CPU cores] per server and level, "failed" where the
    measurement failed."""
    return _rows(servers, levels, results, lambda r: [
        _fmt(r["rps"], ".0f"), _fmt(r["p50_ms"], ".2f"), _fmt(r["p99_ms"], ".2f"), _fmt(r.get("mean_batch"), ".1f"),
        _fmt(r.get("cpu_cores"), ".2f")])


def round_ratios(server: Sequence[Optional[dict]], ceiling: Sequence[Optional[dict]]) -> List[float]:
    """The server's requests/s over the ceiling's, round by round (the i-th sample of each is round i; a round in
    which either failed is left out): the two ran minutes apart at most, so these ratios are steadier than the
    ratio of two medians on a box whose speed moves from hour to hour."""
    return [r["rps"] / c["rps"] for r, c in zip(server, ceiling) if r is not None and c is not None and c["rps"]]


def goal_lines(servers: Sequence[str], levels: Sequence[int], results: Mapping[Tuple[str, int], Optional[dict]],
               rounds: Optional[Mapping[Tuple[str, int], Sequence[Optional[dict]]]] = None) -> List[str]:
    """Issue 17's 2-core goals, one line per trtserve server and level: at GOAL_LEVEL and above, throughput
    >= the ceiling's with mean batch >= GOAL_BATCH; at concurrency 1, p50 within GOAL_P50_MS of the ceiling's.
    ``rounds``: each round's samples, to show each round's throughput ratio beside the verdict on the medians."""
    lines = []
    for server in servers:
        if server.startswith(("ceiling", "baseline")):
            continue
        for level in levels:
            if level < GOAL_LEVEL and level != 1:
                continue
            r, c = results.get((server, level)), results.get(("ceiling", level))
            if r is None or c is None:
                lines.append(f"- {server}, concurrency {level}: no verdict ({'server' if r is None else 'ceiling'} "
                             "failed)")
                continue
            if level == 1:
                d = r["p50_ms"] - c["p50_ms"]
                ok = d <= GOAL_P50_MS
                lines.append(f"- {server}, concurrency 1: p50 {r['p50_ms']:.2f} ms vs ceiling {c['p50_ms']:.2f} ms, "
                             f"{d:+.2f} ms (goal <= +{GOAL_P50_MS} ms): "
                             f"{'MET' if ok else f'MISSED by {d - GOAL_P50_MS:.2f} ms'}")
            if level >= GOAL_LEVEL:
                ratio = r["rps"] / c["rps"] if c["rps"] else float("nan")
                mb = r.get("mean_batch")
                ok_t, ok_b = ratio >= 1.0, mb is not None and mb >= GOAL_BATCH
                verdict = "MET" if ok_t and ok_b else "MISSED: " + ", ".join(
                    ([f"throughput {(1 - ratio) * 100:.0f}% short"] if not ok_t else [])
                    + ([f"mean batch {_fmt(mb, '.1f')} < {GOAL_BATCH:g}"] if not ok_b else []))
                each = round_ratios(rounds.get((server, level), ()), rounds.get(("ceiling", level), ())) \
                    if rounds is not None else []
                per_round = f"; rounds {', '.join(f'{x:.2f}x' for x in each)}" if len(each) > 1 else ""
                lines.append(f"- {server}, concurrency {level}: {r['rps']:.0f} vs ceiling {c['rps']:.0f} req/s "
                             f"({ratio:.2f}x, goal >= 1.00x{per_round}), mean batch {_fmt(mb, '.1f')} "
                             f"(goal >= {GOAL_BATCH:g}): {verdict}")
    return lines


HEADER = ["server", "concurrency", "req/s", "p50 ms", "p99 ms", "mean batch", "server CPU (cores)"]
PROCESS_HEADER = ["server", "concurrency", "req/s", "server us/req", "front ends us/req", "engine us/req",
                  "rest of the machine us/req"]


def process_rows(servers: Sequence[str], levels: Sequence[int],
                 results: Mapping[Tuple[str, int], Optional[dict]]) -> List[List[str]]:
    """``--per-process``: CPU per request of the whole server, of its front ends and of its engine (n/a for the
    ceiling, one process), and of everything else the machine ran meanwhile (the load generator)."""
    return _rows(servers, levels, results, lambda r: [_fmt(r["rps"], ".0f")] + [
        _fmt(r.get(k), ".0f") for k in ("server_us", "frontends_us", "engine_us", "rest_us")])


def render_text(rows: List[List[str]], header: Sequence[str] = HEADER) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header)] + [line(r) for r in rows])


def render_markdown(rows: List[List[str]], header: Sequence[str] = HEADER) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


# ---- processes -----------------------------------------------------------------------------------------------

def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # gone (or not ours to read)
        return None


def _list_tasks(pid: int) -> List[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def process_tree_ticks(pid: int) -> int:
    return tree_cpu_ticks(pid, _read, _list_tasks)


def role_ticks(pid: int, read: Callable[[str], Optional[str]] = _read,
               list_tasks: Callable[[int], Iterable[int]] = _list_tasks) -> Dict[str, int]:
    """utime + stime per process of a trtserve server's tree, keyed "<role> <pid>" (role engine, frontend or
    other, from the command line), plus "loop <pid>" for the engine's main thread (its event loop): which
    process is the limit is what the table's total cannot say."""
    out: Dict[str, int] = {}
    for p, stat in tree_stats(pid, read, list_tasks):
        cmdline = read(f"/proc/{p}/cmdline") or ""
        role = "engine" if "engine.process" in cmdline else "frontend" if "frontend.process" in cmdline else "other"
        out[f"{role} {p}"] = stat_cpu_ticks(stat)
        if role == "engine":
            main = read(f"/proc/{p}/task/{p}/stat")
            if main is not None:
                out[f"loop {p}"] = stat_cpu_ticks(main)
    return out


def role_cores(before: Mapping[str, int], after: Mapping[str, int], wall_s: float, hz: int) -> Dict[str, float]:
    """Cores used over ``wall_s`` per role: engine (whole process), loop (its main thread), frontends (all of
    them), frontend max (the busiest one), other. Processes that started or ended between the two reads count
    from 0 or not at all."""
    cores: Dict[str, float] = {"engine": 0.0, "loop": 0.0, "frontends": 0.0, "frontend max": 0.0, "other": 0.0}
    for key, ticks in after.items():
        c = cpu_cores(before.get(key, 0), ticks, wall_s, hz)
        role = key.split(" ", 1)[0]
        if role == "frontend":
            cores["frontends"] += c
            cores["frontend max"] = max(cores["frontend max"], c)
        else:
            cores[role] += c
    return cores


_TAKEN: set = set()


def free_port() -> int:
    """A free local port, never one this run handed out already (the kernel may offer a closed one again)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _TAKEN:
            _TAKEN.add(port)
            return port


def make_repo(root: pathlib.Path) -> pathlib.Path:
    """The example MLP (64->256->256->16, the bundled weights) under model name ``m``, configured as above."""
    import shutil

    from trtserve.server.examples import REPOSITORY

    repo = root / "repo"
    shutil.copytree(REPOSITORY / "mlp", repo / MODEL)
    (repo / MODEL / "config.pbtxt").write_text(CONFIG)
    return repo


class Server:
    """One server under test, started in its own session (so whatever it spawns can be stopped with it)."""

    def __init__(self, name: str, cmd: List[str], port: int, metrics_port: Optional[int],
                 checkout: Optional[pathlib.Path] = None, env: Optional[Mapping[str, str]] = None) -> None:
        self.name, self.cmd, self.port, self.metrics_port = name, cmd, port, metrics_port
        self.checkout = checkout  # another checkout to run the server from (its code, not this one's)
        self.env = dict(env or {})  # variables set for this server only
        # `trtserve serve` prints this once every front end serves: before it, the first front end may answer
        # while others are still starting, and a load that connects then has its connections spread (by
        # SO_REUSEPORT) over only the front ends already bound, for the whole run
        self._ready_line = "trtserve: serving " if "trtserve" in cmd and "serve" in cmd else None
        self._seen_ready_line = threading.Event()
        self.url = f"127.0.0.1:{port}"
        self.proc: Optional[subprocess.Popen] = None
        self.tail: Deque[str] = collections.deque(maxlen=50)
        self.failure = ""  # why it did not start, for the notes under the table

    def start(self, timeout: float = 120.0) -> bool:
        env = dict(os.environ, **self.env)
        if self.checkout is not None:  # `python -m` puts the working folder first on the path: that checkout wins
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.checkout), os.environ.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=self.checkout or ROOT, start_new_session=True, env=env)
        threading.Thread(target=self._drain, daemon=True).start()  # a full pipe would block the server's logging
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self._ready():
                return True
            time.sleep(0.25)
        last = [line.strip() for line in self.tail if line.strip()]
        self.failure = f"did not start (exit {self.proc.poll()}): {last[-1] if last else 'no output'}"
        print(f"{self.name}: {self.failure}\n{''.join(self.tail)[-1500:]}", file=sys.stderr, flush=True)
        self.stop()
        return False

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.tail.append(line)
            if self._ready_line is not None and line.startswith(self._ready_line):
                self._seen_ready_line.set()

    def _ready(self) -> bool:
        if self._ready_line is not None and not self._seen_ready_line.is_set():
            return False
        import grpc

        from trtserve.protos import grpc_service_pb2 as pb
        from trtserve.protos import grpc_service_pb2_grpc as pb_grpc

        try:
            with grpc.insecure_channel(self.url) as ch:
                pb_grpc.GRPCInferenceServiceStub(ch).ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=1)
            if self.metrics_port is not None:
                self.metrics()
            return True
        except Exception:  # not up yet
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:  # the session this script created for it: anything it left behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        self.proc = None


def ceiling_env(grpc_defaults: bool = False) -> Dict[str, str]:
    """The ceiling's variables: gRPC's I/O as ``trtserve serve`` sets it up (GRPC_EXPERIMENTS, trtserve/cli.py), so
    the two differ only in what they serve; ``grpc_defaults``: none, grpcio's own defaults (or the user's variable)."""
    from trtserve import cli

    experiments = None if grpc_defaults else cli.grpc_experiments_for("serve")
    return {"GRPC_EXPERIMENTS": experiments} if experiments is not None else {}


def make_ceiling(name: str, event_loop: str = "asyncio", registered: str = "all",
                 grpc_defaults: bool = False) -> Server:
    """The ceiling server, with ``ceiling_env(grpc_defaults)``."""
    port = free_port()
    cmd = [sys.executable, "-m", "bench.ceiling_server", "--port", str(port), "--model", MODEL,
           "--inputs", str(N_IN), "--outputs", str(N_OUT), "--event-loop", event_loop, "--registered", registered]
    return Server(name, cmd, port, None, env=ceiling_env(grpc_defaults))


def make_server(name: str, repo: pathlib.Path, args: Sequence[str],
                checkout: Optional[pathlib.Path] = None) -> Server:
    """``trtserve serve`` on ``repo`` with ``args`` (which should say --frontends: without it the server chooses)."""
    port = free_port()
    metrics_port = free_port()
    cmd = [sys.executable, "-m", "trtserve", "serve", "--model-repository", str(repo), "--grpc-port", str(port),
           "--http-port", "-1", "--metrics-port", str(metrics_port), "--log-level", "warning", "--no-gpu-metrics",
           *args]
    return Server(name, cmd, port, metrics_port, checkout)


def also_server(value: str) -> Tuple[str, List[str]]:
    """An ``--also`` value, 'NAME=ARGS': the server's name and its ``trtserve serve`` arguments."""
    name, _, args = value.partition("=")
    return name.strip(), shlex.split(args)


def _csv_row(tool: str, cmd: List[str], out: pathlib.Path, level: int, timeout_s: float,
             **kwargs) -> Optional[Dict[str, str]]:
    """Runs a load generator that writes one CSV row per level into ``out``; that row, or None (said why)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, **kwargs)
    except subprocess.TimeoutExpired:
        print(f"{tool} timed out (concurrency {level})", file=sys.stderr, flush=True)
        return None
    if proc.returncode != 0 or not out.exists():
        print(f"{tool} failed (concurrency {level}): {proc.stdout[-600:]} {proc.stderr[-600:]}",
              file=sys.stderr, flush=True)
        return None
    return next(csv.DictReader(out.open()))


def run_perf_analyzer(pa: str, url: str, level: int, duration: float, protocol: str = "grpc",
                      ) -> Optional[Dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "pa.csv"
        cmd = [pa, "-m", MODEL, "-i", protocol, "-u", url, "-b", "1", "--concurrency-range", f"{level}:{level}",
               "--measurement-mode", "time_windows", "--measurement-interval", str(int(duration * 1000)),
               "--stability-percentage", "100", "--max-trials", "10", "-f", str(out)]
        env = dict(os.environ, TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT="1")
        row = _csv_row("perf_analyzer", cmd, out, level, 60 + 20 * duration, env=env)
        if row is None:
            return None
        return {"rps": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1000,
                "p99_ms": float(row["p99 latency"]) / 1000}


def run_trtserve_bench(url: str, level: int, duration: float, timeout_s: float) -> Optional[Dict[str, float]]:
    """One closed-loop level of ``trtserve bench``, whose requests carry a deadline (``timeout_s``), as most
    clients' do (perf_analyzer sets none)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "bench.csv"
        cmd = [sys.executable, "-m", "trtserve.client", "bench", "--url", url, "-m", MODEL, "--concurrency",
               str(level), "--duration", str(duration), "--timeout", str(timeout_s), "--csv", str(out)]
        row = _csv_row("trtserve bench", cmd, out, level, 60 + 4 * duration, cwd=ROOT)
        if row is None:
            return None
        return {"rps": float(row["requests_per_s"]), "p50_ms": float(row["p50_ms"]), "p99_ms": float(row["p99_ms"])}


def measure(server: Server, pa: str, level: int, duration: float, hz: int,
            timeout_s: Optional[float] = None, per_process: bool = False) -> Optional[dict]:
    """One level against ``server``: perf_analyzer, or ``trtserve bench`` with that deadline when ``timeout_s``;
    ``per_process``: also the CPU per request by process (``process_rows``)."""
    if not server.alive():
        return None
    try:
        before = batch_counts(server.metrics()) if server.metrics_port is not None else None
        assert server.proc is not None
        roles0, busy0 = (role_ticks(server.proc.pid), busy_ticks()) if per_process else ({}, None)
        t0, c0, s0 = time.monotonic(), process_tree_ticks(server.proc.pid), steal_ticks()
        r = (run_perf_analyzer(pa, server.url, level, duration) if timeout_s is None
             else run_trtserve_bench(server.url, level, duration, timeout_s))
        c1, t1, s1 = process_tree_ticks(server.proc.pid), time.monotonic(), steal_ticks()
        roles1, busy1 = (role_ticks(server.proc.pid), busy_ticks()) if per_process else ({}, None)
        if r is None:
            return None
        r["cpu_cores"] = cpu_cores(c0, c1, t1 - t0, hz)
        if per_process:
            r.update(_by_process(r, roles0, roles1, busy0, busy1, t1 - t0, hz))
        r["steal_cores"] = steal_cores(s0, s1, t1 - t0, hz)
        r["mean_batch"] = mean_batch(before, batch_counts(server.metrics())) if before is not None else None
        return r
    except Exception as e:  # a server that died or whose /metrics broke: this level failed, the run goes on
        print(f"{server.name} concurrency {level}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return None


def _by_process(r: Mapping[str, float], roles0: Mapping[str, int], roles1: Mapping[str, int], busy0: Optional[int],
                busy1: Optional[int], wall_s: float, hz: int) -> Dict[str, Optional[float]]:
    """CPU per request (us) of the server, its front ends and engine (None for a server without them), and the rest
    of the machine, from ``measure``'s readings around one level."""
    rps = r["rps"]
    cores = role_cores(roles0, roles1, wall_s, hz)
    split = any(k.startswith(("engine ", "frontend ")) for k in roles1)
    rest = None if busy0 is None or busy1 is None else cpu_cores(busy0, busy1, wall_s, hz) - r["cpu_cores"]
    return {"server_us": per_request_us(r["cpu_cores"], rps),
            "frontends_us": per_request_us(cores["frontends"], rps) if split else None,
            "engine_us": per_request_us(cores["engine"], rps) if split else None,
            "rest_us": per_request_us(rest, rps)}


def _commit(where: Optional[pathlib.Path] = None) -> str:
    where = where or ROOT
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class RunInfo:
    """What every perf_analyzer benchmark prints first and writes beside its tables: the tool, the clock rate for
    /proc CPU ticks, the machine, the command and the date."""

    def __init__(self, pa: str, command: str) -> None:
        self.pa, self.command = pa, command
        self.hz = os.sysconf("SC_CLK_TCK")
        self.machine = (f"{platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
                        f"(affinity {len(os.sched_getaffinity(0))}), Python {platform.python_version()}")
        self.date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    @classmethod
    def start(cls, module: str, argv: Optional[Sequence[str]]) -> "Optional[RunInfo]":
        """Finds perf_analyzer and prints the run's header; None (after saying why) when it is not there."""
        from bench.cpu import perf_analyzer_path

        pa = perf_analyzer_path()
        if not pa:
            print("perf_analyzer not found: bash ../shared/perf-analyzer/setup.sh /tmp/perf-analyzer (or set "
                  "PERF_ANALYZER)", file=sys.stderr)
            return None
        info = cls(pa, f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:]))
        print(f"# {info.machine}; {info.date}; commit {_commit()}\n# {info.command}", flush=True)
        return info


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frontends", default="0,1,2", help="values of trtserve serve --frontends (0: single process)")
    p.add_argument("--levels", default="1,8,32,128", help="perf_analyzer concurrency levels")
    p.add_argument("--duration", type=float, default=4.0, help="perf_analyzer measurement window, seconds")
    p.add_argument("--rounds", type=int, default=1, help="rounds (medians are reported)")
    p.add_argument("--write", type=pathlib.Path, default=None, metavar="PATH",
                   help="also write the table and the run's details as a Markdown page to PATH")
    p.add_argument("--baseline", type=pathlib.Path, default=None,
                   help="another checkout (e.g. a git worktree of an older commit): its servers with the same "
                        "--frontends run in the same run, named 'baseline fN'")
    p.add_argument("--also", action="append", default=[], metavar="NAME=ARGS",
                   help="one more trtserve server in the same run, named NAME, started with these `trtserve serve` "
                        "arguments (e.g. 'f2 normal=--frontends 2 --frontend-scheduling normal'); repeatable")
    p.add_argument("--ceiling-grpc-defaults", action="store_true",
                   help="also the ceiling on grpcio's default I/O (EventEngine); the goals are read against the "
                        "ceiling on the gRPC I/O `trtserve serve` sets up (trtserve/cli.py, GRPC_EXPERIMENTS)")
    p.add_argument("--uvloop-ceiling", action="store_true",
                   help="also the ceiling server on uvloop (trtserve's loop where uvloop is installed); the goals are "
                        "read against the asyncio ceiling, as issue 17 set them")
    p.add_argument("--registered-ceiling", action="store_true",
                   help="also the ceiling on uvloop with only the inference methods registered with grpc, as "
                        "trtserve registers them (what that choice gives a bare server)")
    p.add_argument("--per-process", action="store_true",
                   help="also a table of CPU per request: the whole server, its front ends, its engine, and the rest "
                        "of the machine (the load generator, which shares the cores)")
    p.add_argument("--trtserve-bench", type=float, default=None, metavar="TIMEOUT_S",
                   help="load with `trtserve bench` instead of perf_analyzer, every request with this deadline")
    a = p.parse_args(argv)
    levels = [int(x) for x in a.levels.split(",") if x]
    frontends = [int(x) for x in a.frontends.split(",") if x]
    info = RunInfo.start("bench.frontends", argv)
    if info is None:
        return 2
    pa, hz, machine, command, date = info.pa, info.hz, info.machine, info.command, info.date
    samples: Dict[Tuple[str, int], List[Optional[dict]]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(pathlib.Path(tmp))
        servers = [make_ceiling("ceiling")]
        if a.ceiling_grpc_defaults:
            servers.append(make_ceiling("ceiling grpc defaults", grpc_defaults=True))
        if a.uvloop_ceiling:
            servers.append(make_ceiling("ceiling uvloop", "uvloop"))
        if a.registered_ceiling:
            servers.append(make_ceiling("ceiling uvloop inference-registered", "uvloop", "inference"))
        servers += [make_server(f"trtserve f{n}", repo, ["--frontends", str(n)]) for n in frontends]
        if a.baseline is not None:
            servers += [make_server(f"baseline f{n}", repo, ["--frontends", str(n)], a.baseline.resolve())
                        for n in frontends]
        for also in a.also:
            name, args = also_server(also)
            servers.append(make_server(name, repo, args))
        names = [s.name for s in servers]
        notes: List[str] = []
        try:
            for s in servers:
                if not s.start():
                    notes.append(f"- {s.name} (`{' '.join(s.cmd[1:])}`) {s.failure}")
            idle = {}
            time.sleep(2.0)  # past start-up (models warming, heaps settling): what an idle server costs
            for s in servers:  # all servers stay up: an idle one should cost nothing; show that it does not
                if s.alive():
                    assert s.proc is not None
                    idle[s.name] = process_tree_ticks(s.proc.pid)
            time.sleep(1.0)
            for s in servers:
                if s.name in idle and s.alive():
                    assert s.proc is not None
                    idle[s.name] = (process_tree_ticks(s.proc.pid) - idle[s.name]) / hz
            print("# idle CPU (cores) while the others wait: " + ", ".join(f"{k} {v:.2f}" for k, v in idle.items()),
                  flush=True)
            for rnd in range(a.rounds):
                for level in levels:
                    k = (rnd + levels.index(level)) % len(servers)
                    for s in servers[k:] + servers[:k]:  # rotate who goes first
                        r = measure(s, pa, level, a.duration, hz, a.trtserve_bench, a.per_process)
                        samples[(s.name, level)].append(r)
                        cells = table_rows([s.name], [level], {(s.name, level): r})[0]
                        steal = "" if r is None or r.get("steal_cores") is None else f" | steal {r['steal_cores']:.2f}"
                        print(f"round {rnd + 1} | " + " | ".join(cells) + steal, flush=True)
        finally:
            for s in servers:
                s.stop()
    results = {key: median_row(v) for key, v in samples.items()}
    rows = table_rows(names, levels, results)
    goals = goal_lines(names, levels, results, samples)
    by_process = process_rows(names, levels, results) if a.per_process else []
    print()
    print(render_text(rows))
    if by_process:
        print()
        print(render_text(by_process, PROCESS_HEADER))
    print()
    print("\n".join(goals))
    if notes:
        print("\n" + "\n".join(notes))
    if a.write is not None:
        md = ["# trtserve front ends vs the grpc.aio ceiling (2-core box)\n",
              f"- machine: {machine}", f"- command: `{command}`", f"- date: {date}", f"- commit: {_commit()}"
              + (f"; baseline fN: commit {_commit(a.baseline)}" if a.baseline is not None else ""),
              f"- model: MLP 64->256->256->16, ONNX Runtime 1 intra-op thread, max_batch_size 32, dynamic batching "
              f"2 ms queue delay, 1 row per request; perf_analyzer -i grpc, time windows of {a.duration:g} s, "
              f"TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT=1; medians of {a.rounds} round(s), servers interleaved "
              "per level", "- mean batch: delta nv_inference_count / delta nv_inference_exec_count from /metrics; "
              "server CPU: utime+stime of the server and all its descendants over the perf_analyzer run / its wall "
              "time (load generator and server share the cores)", "", render_markdown(rows), ""]
        if by_process:
            md += ["## CPU per request by process", "", render_markdown(by_process, PROCESS_HEADER), ""]
        md += ["## Goals (issue 17)", ""] + goals + (["", "## Failures", ""] + notes if notes else [])
        a.write.write_text("\n".join(md) + "\n")
        print(f"wrote {a.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

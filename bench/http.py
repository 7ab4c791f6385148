"""HTTP beside gRPC on the same trtserve, and the HTTP library choice, under perf_analyzer
(``python -m bench.http [--levels 1,8,32] [--frontends 1] [--duration 4] [--rounds 1] [--libraries] [--write]``).

Model: bench/frontends.py's (the example-sized MLP on ONNX Runtime, 1 row per request, 2 ms queue delay).

- Protocols: one ``trtserve serve --frontends N`` with both ports; perf_analyzer ``-i grpc`` against 8001's
  twin and ``-i http`` against the HTTP port, alternating per level and round so drift hits both alike.
  Goal (issue 20): HTTP at least as fast as gRPC at every level.
- ``--libraries``: the library behind the HTTP port, aiohttp (shipped) vs uvicorn + httptools, each in front of
  the same single-process server and the same REST API (bench/http_candidate.py), at the same levels.

Per row: requests/s, p50 and p99 (perf_analyzer's), the server's CPU (its process tree, delta over the run / wall
time, in cores). Medians over rounds. ``--write`` writes the tables to docs/benchmarks/http-2core.md.
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

from bench import frontends as fb

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks" / "http-2core.md"
HEADER = ["server", "protocol", "concurrency", "req/s", "p50 ms", "p99 ms", "server CPU (cores)"]


class Target:
    """One thing perf_analyzer loads: a server process and the protocol and address to load it on."""

    def __init__(self, name: str, server: fb.Server, protocol: str, port: int) -> None:
        self.name, self.server, self.protocol = name, server, protocol
        self.url = f"127.0.0.1:{port}"


def measure(t: Target, pa: str, level: int, duration: float, hz: int) -> Optional[dict]:
    if not t.server.alive():
        return None
    assert t.server.proc is not None
    t0, c0 = time.monotonic(), fb.process_tree_ticks(t.server.proc.pid)
    r = fb.run_perf_analyzer(pa, t.url, level, duration, protocol=t.protocol)
    c1, t1 = fb.process_tree_ticks(t.server.proc.pid), time.monotonic()
    if r is not None:
        r["cpu_cores"] = fb.cpu_cores(c0, c1, t1 - t0, hz)
    return r


def rows(targets: List[Target], levels: List[int], results: Dict[Tuple[str, int], Optional[dict]]) -> List[List[str]]:
    out = []
    for level in levels:
        for t in targets:
            r = results.get((t.name, level))
            head = [t.name.split(" / ")[0], t.protocol, str(level)]
            out.append(head + (["failed"] * 4 if r is None else [
                fb._fmt(r["rps"], ".0f"), fb._fmt(r["p50_ms"], ".2f"), fb._fmt(r["p99_ms"], ".2f"),
                fb._fmt(r.get("cpu_cores"), ".2f")]))
    return out


def verdicts(levels: List[int], results: Dict[Tuple[str, int], Optional[dict]], http: str, grpc: str) -> List[str]:
    """Issue 20's goal per level: HTTP requests/s >= gRPC requests/s on the same server."""
    lines = []
    for level in levels:
        h, g = results.get((http, level)), results.get((grpc, level))
        if h is None or g is None:
            lines.append(f"- concurrency {level}: no verdict (a run failed)")
            continue
        ratio = h["rps"] / g["rps"] if g["rps"] else float("nan")
        lines.append(f"- concurrency {level}: HTTP {h['rps']:.0f} vs gRPC {g['rps']:.0f} req/s ({ratio:.2f}x; p50 "
                     f"{h['p50_ms']:.2f} vs {g['p50_ms']:.2f} ms): {'MET' if ratio >= 1.0 else 'MISSED'}")
    return lines


def text(table: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(HEADER)]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [HEADER] + table)


def markdown(table: List[List[str]]) -> str:
    return "\n".join(["| " + " | ".join(HEADER) + " |", "|---|---|" + "---:|" * (len(HEADER) - 2)]
                     + ["| " + " | ".join(r) + " |" for r in table])


def run(targets: List[Target], levels: List[int], rounds: int, pa: str, duration: float, hz: int
        ) -> Dict[Tuple[str, int], Optional[dict]]:
    samples: Dict[Tuple[str, int], List[Optional[dict]]] = collections.defaultdict(list)
    for rnd in range(rounds):
        for i, level in enumerate(levels):
            k = (rnd + i) % len(targets)
            for t in targets[k:] + targets[:k]:  # rotate who goes first
                r = measure(t, pa, level, duration, hz)
                samples[(t.name, level)].append(r)
                print(f"round {rnd + 1} | " + " | ".join(rows([t], [level], {(t.name, level): r})[0]), flush=True)
    return {key: fb.median_row(v) for key, v in samples.items()}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", default="1,8,32", help="perf_analyzer concurrency levels")
    p.add_argument("--frontends", type=int, default=1, help="trtserve serve --frontends for the protocol table")
    p.add_argument("--duration", type=float, default=4.0, help="perf_analyzer measurement window, seconds")
    p.add_argument("--rounds", type=int, default=1, help="rounds (medians are reported)")
    p.add_argument("--libraries", action="store_true", help="also compare aiohttp with uvicorn + httptools")
    p.add_argument("--write", action="store_true", help=f"write the tables to {OUT.relative_to(ROOT)}")
    a = p.parse_args(argv)
    levels = [int(x) for x in a.levels.split(",") if x]
    info = fb.RunInfo.start("bench.http", argv)
    if info is None:
        return 2
    pa, hz, machine, command, date = info.pa, info.hz, info.machine, info.command, info.date
    sections: List[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = fb.make_repo(pathlib.Path(tmp))
        # ---- protocols on one trtserve
        grpc_port, http_port = fb.free_port(), fb.free_port()
        cmd = [sys.executable, "-m", "trtserve", "serve", "--model-repository", str(repo), "--grpc-port",
               str(grpc_port), "--http-port", str(http_port), "--metrics-port", "-1", "--log-level", "warning",
               "--no-gpu-metrics", "--frontends", str(a.frontends)]
        server = fb.Server(f"trtserve f{a.frontends}", cmd, grpc_port, None)
        targets = [Target(f"trtserve f{a.frontends} / grpc", server, "grpc", grpc_port),
                   Target(f"trtserve f{a.frontends} / http", server, "http", http_port)]
        try:
            if not server.start():
                return 1
            results = run(targets, levels, a.rounds, pa, a.duration, hz)
        finally:
            server.stop()
        table = rows(targets, levels, results)
        goals = verdicts(levels, results, targets[1].name, targets[0].name)
        print("\n" + text(table) + "\n\n" + "\n".join(goals), flush=True)
        sections += [f"## HTTP beside gRPC on `trtserve serve --frontends {a.frontends}`", "", markdown(table), "",
                     "Goal (issue 20): HTTP at least as fast as gRPC at every level.", ""] + goals + [""]
        # ---- HTTP libraries in front of the same API
        if a.libraries:
            servers, lib_targets = [], []
            for library in ("aiohttp", "uvicorn"):
                g, h = fb.free_port(), fb.free_port()
                cmd = [sys.executable, "-m", "bench.http_candidate", "--library", library, "--repo", str(repo),
                       "--grpc-port", str(g), "--http-port", str(h)]
                s = fb.Server(library, cmd, g, None)
                servers.append(s)
                lib_targets.append(Target(f"{library} / http", s, "http", h))
            try:
                for s in servers:
                    s.start()
                lib_results = run(lib_targets, levels, a.rounds, pa, a.duration, hz)
            finally:
                for s in servers:
                    s.stop()
            lib_table = rows(lib_targets, levels, lib_results)
            print("\n" + text(lib_table), flush=True)
            sections += ["## HTTP libraries in front of the same REST API (single-process server)", "",
                         markdown(lib_table), ""]
    if a.write:
        head = ["# HTTP/REST beside gRPC (2-core box)\n", f"- machine: {machine}", f"- command: `{command}`",
                f"- date: {date}", f"- commit: {fb._commit()}",
                "- model: MLP 64->256->256->16, ONNX Runtime 1 intra-op thread, max_batch_size 32, dynamic batching "
                f"2 ms queue delay, 1 row per request; perf_analyzer, time windows of {a.duration:g} s; medians of "
                f"{a.rounds} round(s); load generator and server share the cores", ""]
        OUT.write_text("\n".join(head + sections))
        print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

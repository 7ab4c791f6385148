"""trtserve bench against perf_analyzer on the same server (issue #6): throughput and p50 at each concurrency.

    python -m bench.agreement [--models mlp] [--modes on,off] [--levels 1,8,32] [--rounds 3] [--duration 2.5]
                              [--server-cpus 0-3 --client-cpus 8-15]

Starts trtserve on the CPU (ONNX Runtime, bench.batching's repository: the example MLP or the wide model, dynamic
batching on or off) in a child process and measures every level with both tools ``--rounds`` times, interleaved,
so the server's own drift (on a busy host it moves single measurements by 10-30 %) hits both alike; prints each
tool's medians and the differences, against the issue's band of 15 %. ``trtserve bench`` runs as users run it,
the CLI in its own process. On a many-core host, ``--server-cpus``/``--client-cpus`` pin the server and the load
tools (this process's children) to disjoint cores, so neither tool's threads land on the server's cores.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

from bench._server import ServerProcess
from bench.batching import make_repo
from bench.cpu import load_perf_analyzer, load_trtserve, perf_analyzer_path
from trtserve.server.process.placement import cpu_list

BAND = 0.15


def compare(url: str, levels: Sequence[int], rounds: int, duration: float, pa: str,
            transport: str = "auto") -> Dict[Tuple[str, int], dict]:
    """Medians of req/s and p50 per (tool, level)."""
    got: Dict[Tuple[str, int], List[dict]] = {}
    for _ in range(rounds):
        for level in levels:
            for tool in ("perf_analyzer", "trtserve bench"):
                r = (load_perf_analyzer(pa, url, level, duration) if tool == "perf_analyzer"
                     else load_trtserve(url, level, duration, transport=transport))
                if r is not None:
                    got.setdefault((tool, level), []).append(r)
                    print(f"  {tool:15} concurrency {level:3}: {r['rps']:8.0f} req/s  p50 {r['p50_ms']:.3f} ms",
                          flush=True)  # every measurement, so a reader sees the spread behind each median
    return {k: {"rps": statistics.median(r["rps"] for r in v), "p50_ms": statistics.median(r["p50_ms"] for r in v),
                "n": len(v)} for k, v in got.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp")
    p.add_argument("--modes", default="on,off", help="dynamic batching on, off")
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=2.5)
    p.add_argument("--out", type=pathlib.Path, help="also write the table to this Markdown file")
    p.add_argument("--transport", default="auto", choices=["auto", "h2", "grpcio"],
                   help="trtserve bench --transport (auto: h2, its own HTTP/2 client, for one HOST:PORT)")
    p.add_argument("--server-cpus", default="", help="pin the server to these CPUs, e.g. 0-3 (Linux)")
    p.add_argument("--client-cpus", default="", help="pin the load tools to these CPUs, e.g. 8-15 (Linux)")
    a = p.parse_args(argv)
    server_cpus = cpu_list(a.server_cpus) or None
    if a.client_cpus:
        os.sched_setaffinity(0, cpu_list(a.client_cpus))  # inherited by every load tool this process starts
    pa = perf_analyzer_path()
    if not pa:
        print("perf_analyzer not found (bash ../shared/perf-analyzer/setup.sh /tmp/perf-analyzer)", file=sys.stderr)
        return 2
    levels = [int(x) for x in a.levels.split(",")]
    lines = [f"trtserve bench vs perf_analyzer, medians of {a.rounds} interleaved rounds of {a.duration:g} s; "
             f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; trtserve bench --transport {a.transport}"
             + (f"; server on CPUs {a.server_cpus}, load tools on CPUs {a.client_cpus}"
                if a.server_cpus or a.client_cpus else ""), "",
             "| model | batching | concurrency | perf_analyzer req/s | trtserve bench req/s | diff | "
             "perf_analyzer p50 ms | trtserve bench p50 ms | diff | within 15 % |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    worst = 0.0
    for model in a.models.split(","):
        for mode in a.modes.split(","):
            with tempfile.TemporaryDirectory() as tmp, ServerProcess(make_repo(pathlib.Path(tmp), mode, model, 1),
                                                                       cpus=server_cpus) as s:
                med = compare(s.url, levels, a.rounds, a.duration, pa, a.transport)
            for level in levels:
                ref, ours = med.get(("perf_analyzer", level)), med.get(("trtserve bench", level))
                if ref is None or ours is None:
                    lines.append(f"| {model} | {mode} | {level} | failed | | | | | | |")
                    continue
                d_rps = ours["rps"] / ref["rps"] - 1
                d_p50 = ours["p50_ms"] / ref["p50_ms"] - 1
                worst = max(worst, abs(d_rps), abs(d_p50))
                ok = abs(d_rps) <= BAND and abs(d_p50) <= BAND
                lines.append(f"| {model} | {mode} | {level} | {ref['rps']:.0f} | {ours['rps']:.0f} | {d_rps:+.0%} | "
                             f"{ref['p50_ms']:.2f} | {ours['p50_ms']:.2f} | {d_p50:+.0%} | {'yes' if ok else 'NO'} |")
                print(lines[-1], flush=True)
    lines += ["", f"largest difference: {worst:.0%}"]
    print("\n".join(lines[:4] + lines[-2:]))
    if a.out:
        a.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

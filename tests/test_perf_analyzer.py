"""NVIDIA's unmodified perf_analyzer completes a concurrency sweep against trtserve.

The binary comes from PyPI's perf-analyzer through ../shared/perf-analyzer/setup.sh (which `.ci/run`
runs); set PERF_ANALYZER to its path. Skipped when the binary is not there.
"""
from __future__ import annotations

import csv
import os
import pathlib
import shutil
import subprocess

import pytest



def _find() -> str:
    """The first candidate that actually runs (a pip-installed one may lack its shared libraries)."""
    for c in (os.environ.get("PERF_ANALYZER"), "/tmp/perf-analyzer/perf_analyzer", shutil.which("perf_analyzer")):
        if c and pathlib.Path(c).is_file():
            try:
                if subprocess.run([c, "--version"], capture_output=True, timeout=30).returncode == 0:
                    return c
            except (OSError, subprocess.TimeoutExpired):
                continue
    return ""


PA = _find()
pytestmark = pytest.mark.skipif(not PA, reason="no runnable perf_analyzer (run ../shared/perf-analyzer/setup.sh)")


def test_perf_analyzer_concurrency_sweep(example_server, tmp_path):
    out = tmp_path / "pa.csv"
    cmd = [PA, "-m", "mlp", "-i", "grpc", "-u", example_server.url, "--concurrency-range", "1:4",
           "--measurement-interval", "1000", "--stability-percentage", "100", "-f", str(out)]
    # close_fds=False lets subprocess use posix_spawn instead of fork(): a forked child of this
    # multi-threaded (gRPC) process sometimes aborts in epoll_wait under Python 3.9
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, close_fds=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert sorted(int(r["Concurrency"]) for r in rows) == [1, 2, 3, 4]
    assert all(float(r["Inferences/Second"]) > 0 for r in rows)
    # server-side statistics were found (perf_analyzer needs "statistics" and a rising queue count)
    assert "Server:" in proc.stdout and "Inference count" in proc.stdout

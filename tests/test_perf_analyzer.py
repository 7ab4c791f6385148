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

PA = os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer") or "/tmp/perf-analyzer/perf_analyzer"
pytestmark = pytest.mark.skipif(not pathlib.Path(PA).is_file(), reason=f"perf_analyzer not found ({PA})")


def test_perf_analyzer_concurrency_sweep(example_server, tmp_path):
    out = tmp_path / "pa.csv"
    cmd = [PA, "-m", "mlp", "-i", "grpc", "-u", example_server.url, "--concurrency-range", "1:4",
           "--measurement-interval", "1000", "--stability-percentage", "100", "-f", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert sorted(int(r["Concurrency"]) for r in rows) == [1, 2, 3, 4]
    assert all(float(r["Inferences/Second"]) > 0 for r in rows)
    # server-side statistics were found (perf_analyzer needs "statistics" and a rising queue count)
    assert "Server:" in proc.stdout and "Inference count" in proc.stdout

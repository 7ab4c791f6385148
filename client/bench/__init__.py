"""trtserve's load tester: closed/open-loop load, percentile math, CSV/JSON/PNG reports (``trtserve bench``)."""
from __future__ import annotations

from trtserve.client.bench.runner import BenchConfig, BenchResult, run

__all__ = ["BenchConfig", "BenchResult", "run"]

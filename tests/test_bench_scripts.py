"""The benchmark scripts in bench/ keep working (their numbers are measured elsewhere, never asserted here)."""
from __future__ import annotations

import itertools

import pytest

pytest.importorskip("bench.agreement", reason="the bench/ folder is not on the path")


def test_batcher_overhead_measures_requests() -> None:
    from bench.batcher_overhead import measure

    assert measure(batch=64, instances=2, run_s=0.0002, seconds=0.3) > 0


def test_agreement_takes_medians_per_tool_and_level(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.agreement as agreement

    pa = itertools.cycle([100.0, 300.0, 200.0])
    ours = itertools.cycle([90.0, 95.0, 400.0])
    monkeypatch.setattr(agreement, "load_perf_analyzer",
                        lambda pa_path, url, level, duration: {"rps": next(pa) * level, "p50_ms": 1.0})
    monkeypatch.setattr(agreement, "load_trtserve",
                        lambda url, level, duration, transport: {"rps": next(ours) * level, "p50_ms": 2.0})
    med = agreement.compare("127.0.0.1:1", [1, 8], rounds=3, duration=0.1, pa="pa")
    assert med[("perf_analyzer", 1)]["rps"] == 200.0  # median of 100, 300, 200 (levels interleave per round)
    assert med[("trtserve bench", 8)]["n"] == 3
    assert med[("trtserve bench", 1)]["p50_ms"] == 2.0

"""bench/engine_cprofile.py: the real engine process profiled for the window the benchmark signals, and the
summary per batch."""
from __future__ import annotations

import asyncio
import pathlib

from bench import engine_alone, engine_cprofile
from trtserve.server.examples import REPOSITORY


def test_profile_covers_the_signalled_window_and_divides_by_its_batches(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "engine.prof"
    engine = engine_alone.Engine(REPOSITORY, None, module="bench.engine_cprofile",
                                 env={engine_cprofile.ENV: str(path)})
    try:
        r = asyncio.run(engine_alone._level(engine, "mlp", [("INPUT0", "FP32", (64,))], 1, 32, 0.3, 0.7,
                                            window_signals=True))
    finally:
        engine.stop()
    assert r["errors"] == 0 and r["window_batches"] > 0
    lines = engine_cprofile.summary(str(path), r["window_batches"], top=200)
    assert f"over {r['window_batches']} batches" in lines[0]
    rows = {line.rsplit(" | ", 1)[1]: [float(x) for x in line.split(" | ")[:3]] for line in lines[1:]}
    dispatch = next(v for k, v in rows.items() if k.startswith("_dispatch (scheduler.py"))
    assert 0.9 <= dispatch[2] <= 1.1  # one batcher dispatch per executed batch: the window's batches divide
    assert not any(k.startswith("start (host.py") for k in rows)  # the engine's start is outside the window


def test_summary_of_a_missing_profile_says_so(tmp_path: pathlib.Path) -> None:
    assert "not written" in engine_cprofile.summary(str(tmp_path / "none.prof"), 10)[0]

"""The engine process with cProfile on its main thread (the loop that reads descriptors, batches and enqueues)
for a window the benchmark chooses: SIGUSR1 starts it, SIGUSR2 writes the statistics to
$TRTSERVE_BENCH_CPROFILE and stops it.

Why cProfile and not py-spy here: on the GPU host py-spy cannot read the engine process (the GPU kit's Python
3.9 with CUDA and TensorRT loaded: "Failed to find python version from target process"). cProfile counts every
call, so a function's time divides by the window's batches into a cost per batch; it slows Python-heavy code,
so the window it profiles is not one whose rate is reported. ``summary`` prints the busiest functions.
"""
from __future__ import annotations

import cProfile
import os
import pstats
import signal
from typing import Any, List, Optional

from trtserve.server.engine import process

ENV = "TRTSERVE_BENCH_CPROFILE"


class _Window:
    """Profiles the main thread between SIGUSR1 and SIGUSR2 (signal handlers run on the main thread)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.prof: Optional[cProfile.Profile] = None

    def start(self, *_: Any) -> None:
        self.prof = cProfile.Profile()
        self.prof.enable()

    def stop(self, *_: Any) -> None:
        if self.prof is not None:
            self.prof.disable()
            self.prof.dump_stats(self.path)
            self.prof = None


def summary(path: str, batches: int, top: int = 25) -> List[str]:
    """The functions with the most own time in the profile at ``path``: own and cumulative microseconds per
    batch (``batches`` executed in the window) and calls per batch."""
    if not os.path.exists(path):
        return [f"(no profile: {path} was not written)"]
    st = pstats.Stats(path)
    total = sum(v[2] for v in st.stats.values())  # type: ignore[attr-defined]
    per = max(1, batches)
    lines = [f"main thread, {total:.3f} s of own time over {batches} batches ({1e6 * total / per:.0f} us per batch); "
             "own us/batch | cum us/batch | calls/batch | function"]
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # type: ignore[attr-defined]
    for (file, line, name), (_cc, calls, tt, ct, _callers) in rows:
        where = f"{os.path.basename(file)}:{line}" if file != "~" else "builtin"
        lines.append(f"{1e6 * tt / per:8.1f} | {1e6 * ct / per:8.1f} | {calls / per:7.2f} | {name} ({where})")
    return lines


if __name__ == "__main__":
    window = _Window(os.environ[ENV])
    signal.signal(signal.SIGUSR1, window.start)
    signal.signal(signal.SIGUSR2, window.stop)
    raise SystemExit(process.main())

"""bench/pyspy.py: the main thread's busiest functions from py-spy's raw output."""
from __future__ import annotations

import pathlib

from bench import pyspy

RAW = """\
thread (100): MainThread;run (asyncio/base_events.py:600);_run_once (asyncio/base_events.py:1900);_infer (server/engine/core.py:190) 6
thread (100): MainThread;run (asyncio/base_events.py:600);_run_once (asyncio/base_events.py:1900);_infer (server/engine/core.py:204);get (registry.py:10) 2
thread (100): MainThread;run (asyncio/base_events.py:600);_write (server/ipc/channel.py:89) 2
thread (101): Thread-1;_worker (concurrent/futures/thread.py:81) 50
"""


def test_summary_counts_only_the_main_thread_and_adds_up_a_functions_lines(tmp_path: pathlib.Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text(RAW)
    lines = pyspy.summary(raw, 100, top=10)
    assert lines[0].startswith("10 busy samples")
    table = {line.split(" | ")[2]: (float(line.split(" | ")[0]), float(line.split(" | ")[1]))
             for line in lines[1:] if line.count(" | ") == 2}
    assert table["_infer (core.py)"] == (80.0, 60.0)  # two lines of one function, one of them with a callee
    assert table["get (registry.py)"] == (20.0, 20.0)
    assert table["run (base_events.py)"] == (100.0, 0.0)
    assert not any("_worker" in line for line in lines)  # another thread


def test_summary_of_a_missing_file_says_so(tmp_path: pathlib.Path) -> None:
    assert "not written" in pyspy.summary(tmp_path / "none.txt", 1)[0]

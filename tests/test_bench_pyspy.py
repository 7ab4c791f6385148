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
# Python 3.9: py-spy names a thread by its pthread handle
RAW39 = """\
thread (0x7FE9D2507740): MainThread;run (asyncio/base_events.py:600);_write (server/ipc/channel.py:89) 3
thread (0x7FE9C93F66C0): Thread-2;_worker (concurrent/futures/thread.py:81) 7
"""


def test_summary_counts_only_the_main_thread_and_adds_up_a_functions_lines(tmp_path: pathlib.Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text(RAW)
    lines = pyspy.summary(raw, top=10)
    assert lines[0].startswith("10 busy samples")
    table = {line.split(" | ")[2]: (float(line.split(" | ")[0]), float(line.split(" | ")[1]))
             for line in lines[1:] if line.count(" | ") == 2}
    assert table["_infer (core.py)"] == (80.0, 60.0)  # two lines of one function, one of them with a callee
    assert table["get (registry.py)"] == (20.0, 20.0)
    assert table["run (base_events.py)"] == (100.0, 0.0)
    assert not any("_worker" in line for line in lines)  # another thread


def test_summary_finds_the_main_thread_by_its_name(tmp_path: pathlib.Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text(RAW39)
    lines = pyspy.summary(raw, top=10)
    assert lines[0].startswith("3 busy samples")
    assert any(line.endswith("_write (channel.py)") and line.startswith("100.0 | 100.0") for line in lines)


def test_summary_of_a_missing_file_says_why(tmp_path: pathlib.Path) -> None:
    (tmp_path / "none.err").write_text("Error: Failed to find python version from target process\n")
    line = pyspy.summary(tmp_path / "none.txt")[0]
    assert "not written" in line and "Failed to find python version" in line

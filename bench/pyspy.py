"""Sampling profiles for the benchmarks: py-spy on a server's processes while the load runs.

A benchmark that misses a goal says why with a profile taken in the same run. ``start`` runs ``py-spy record``
on one process in the background (raw folded stacks, one line per distinct stack); ``summary`` turns the file
into the busiest functions of the process's main thread (the event loop of a front end or of the engine):
inclusive and self shares of that thread's samples. py-spy is found through $PY_SPY or PATH; without it the
benchmarks run without profiles.
"""
from __future__ import annotations

import collections
import os
import pathlib
import shutil
import subprocess
from typing import List, Optional


def find() -> Optional[str]:
    for c in (os.environ.get("PY_SPY"), shutil.which("py-spy")):
        if c and pathlib.Path(c).is_file():
            return c
    return None


def start(py_spy: str, pid: int, seconds: float, out: pathlib.Path, rate: int = 250) -> subprocess.Popen:
    """py-spy record on ``pid`` for ``seconds``, every thread, raw output with thread ids (see ``summary``)."""
    cmd = [py_spy, "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", str(rate), "-f", "raw",
           "--threads", "-o", str(out)]
    with open(out.with_suffix(".err"), "wb") as err:  # why a profile is missing, for ``summary`` to say
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)


def _function(frame: str) -> str:
    """'name (path/to/file.py:123)' -> 'name (file.py)': the line number apart, so a function's lines add up."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].split(':', 1)[0]})" if where else name


def summary(raw: pathlib.Path, top: int = 20) -> List[str]:
    """The main thread's busiest functions in ``raw`` (py-spy ``-f raw --threads``, idle samples left out):
    inclusive share, self share, of that thread's busy samples."""
    inclusive: "collections.Counter[str]" = collections.Counter()
    own: "collections.Counter[str]" = collections.Counter()
    total = 0
    try:
        text = raw.read_text()
    except OSError:
        try:
            why = raw.with_suffix(".err").read_text().strip().splitlines()[-3:]
        except OSError:
            why = []
        return [f"(no profile: {raw} was not written) " + " / ".join(why)]
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        # the first frame names the thread: "thread (ID): NAME", the ID a native id or a pthread handle by Python
        # version, so the main thread is known by its name
        if not stack.startswith("thread (") or not stack.split(";", 1)[0].endswith("): MainThread") \
                or not count.isdigit():
            continue
        n = int(count)
        total += n
        funcs = [_function(f) for f in stack.split(";")[1:]]
        for f in set(funcs):
            inclusive[f] += n
        if funcs:
            own[funcs[-1]] += n
    if not total:
        return ["(no busy samples of the main thread)"]
    lines = [f"{total} busy samples of the main thread; inclusive % | self % | function"]
    for f, n in inclusive.most_common(top):
        lines.append(f"{100 * n / total:5.1f} | {100 * own[f] / total:5.1f} | {f}")
    lines.append("busiest by self %:")
    for f, n in own.most_common(top // 2):
        lines.append(f"{100 * n / total:5.1f} | {f}")
    return lines

"""Starts ``trtserve serve`` in a child process (so load and server do not share a GIL) and stops it."""
from __future__ import annotations

import collections
import os
import pathlib
import re
import subprocess
import sys
import threading
import time
from typing import AbstractSet, Deque, List, Optional


class ServerProcess:
    """``with ServerProcess(repo) as s: s.url``; the server picks a free port and prints it."""

    def __init__(self, repo: Optional[pathlib.Path], extra: Optional[List[str]] = None,
                 command: Optional[List[str]] = None, cpus: Optional[AbstractSet[int]] = None) -> None:
        self.repo = repo
        self.cpus = cpus  # pin the server to these CPUs (Linux), so load generators do not share its cores
        self.extra = extra or []
        self.command = command  # another server that prints "... on HOST:PORT ..." (e.g. bench.ceiling_server)
        self.proc: Optional[subprocess.Popen] = None
        self.url = ""
        self.tail: Deque[str] = collections.deque(maxlen=200)  # the server's last log lines

    def __enter__(self) -> "ServerProcess":
        cmd = self.command or [sys.executable, "-m", "trtserve", "serve", "--model-repository", str(self.repo),
                               "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1", "--log-level", "warning",
                               "--no-gpu-metrics"] + self.extra
        cpus = self.cpus
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None  # type: ignore[arg-type]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     preexec_fn=pin)
        deadline = time.monotonic() + 120
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = re.search(r" on ([\d.]+):(\d+) ", line)
            if m:
                self.url = f"{m.group(1)}:{m.group(2)}"
                # keep reading: a full pipe would block the server's logging (and so the server)
                threading.Thread(target=self._drain, daemon=True).start()
                return self
            if time.monotonic() > deadline:
                break
        self.__exit__()
        raise RuntimeError("trtserve did not start")

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.tail.append(line)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

"""Helpers for tests of the multi-process server: a real ``trtserve serve`` and its process tree."""
from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = pathlib.Path(__file__).resolve().parent.parent


def children(pid: int) -> List[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    out: List[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return out
    for task in tasks:  # a thread that ended since the listing is skipped, not every thread after it
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def tree(pid: int) -> List[int]:
    """``pid`` and all its descendants."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(children(p))
    return seen


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def dev_shm() -> set:
    """Names in /dev/shm, less the regions test clients create (other tests may run beside this one): the
    server itself names nothing there (its arenas are memfds), so any other new name is a leak."""
    names = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    return {n for n in names if not n.startswith(("trtserve_harden_", "trtserve_test_"))}


def tcp_established() -> List[Tuple[int, int, str]]:
    """(local port, remote port, socket inode) of every established TCP connection (/proc/net/tcp, tcp6)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = pathlib.Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "01":
                out.append((int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16), f[9]))
    return out


def client_ports(port: int) -> set:
    """Local ports of the client ends of the connections to ``port`` (client and server share loopback)."""
    return {local for local, remote, _ in tcp_established() if remote == port}


def front_end_of(port: int, pids: Sequence[int]) -> Dict[int, int]:
    """{client port: pid of the process in ``pids`` that holds the server end} for the connections to ``port``
    (/proc/net/tcp gives the server ends' inodes, /proc/PID/fd which process holds them)."""
    by_inode = {inode: remote for local, remote, inode in tcp_established() if local == port}
    out = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in by_inode:
                out[by_inode[link[8:-1]]] = pid
    return out


class Serve:
    """``trtserve serve`` in its own process; ``port``, ``http_port``, ``metrics_port``, ``proc``."""

    def __init__(self, repo: pathlib.Path, frontends: int = 2, args: Sequence[str] = (), metrics: bool = True,
                 drain_seconds: float = 5.0, new_session: bool = False,
                 env: Optional[Dict[str, Optional[str]]] = None) -> None:
        given = env or {}  # variables set for this server (None: removed)
        env = {k: v for k, v in dict(os.environ, PYTHONUNBUFFERED="1", **given).items() if v is not None}
        cmd = [sys.executable, "-m", "trtserve", "serve", "--model-repository", str(repo), "--grpc-port", "0", "--http-port", "0",
               "--metrics-port", "0" if metrics else "-1", "--no-gpu-metrics", "--frontends", str(frontends),
               "--drain-seconds", str(drain_seconds), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=str(ROOT), env=env, start_new_session=new_session)
        self.lines: List[str] = []
        self.port: Optional[int] = None
        self.metrics_port: Optional[int] = None
        self.http_port: Optional[int] = None
        t0 = time.monotonic()
        assert self.proc.stdout is not None
        while time.monotonic() - t0 < 90:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            found = re.search(r" on 127\.0\.0\.1:(\d+) \(HTTP (\w+); metrics (\w+)", line)
            if found:
                self.port = int(found.group(1))
                self.http_port = int(found.group(2)) if found.group(2).isdigit() else None
                self.metrics_port = int(found.group(3)) if found.group(3).isdigit() else None
                break
        if self.port is None:
            self.proc.kill()
            self.proc.wait(10)
            raise RuntimeError("trtserve serve did not start:\n" + self.drain_output())
        self.url = f"127.0.0.1:{self.port}"
        # read on, so that the server's log is there when a test fails (and a full pipe never stalls a process
        # that logs: every one of the server's processes writes to it)
        self._reader = threading.Thread(target=self._read, name="serve-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def drain_output(self) -> str:
        """The server's whole output once it exited ("" while it runs)."""
        if self.proc.poll() is None:
            return ""
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.join(10)
        else:
            assert self.proc.stdout is not None
            self.lines.append(self.proc.stdout.read())
        return self.output()

    def roles(self) -> dict:
        """{"engine": pid, "frontend": [pids]} from the children's command lines."""
        out: dict = {"engine": None, "frontend": []}
        for pid in children(self.proc.pid):
            if not alive(pid):  # killed, not yet reaped by the supervisor
                continue
            line = cmdline(pid)
            if "server.engine.process" in line:
                out["engine"] = pid
            elif "server.frontend.process" in line:
                out["frontend"].append(pid)
        return out

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in tree(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            code = self.proc.wait(10)
        self.drain_output()
        return code

    def output(self) -> str:
        return "".join(self.lines)

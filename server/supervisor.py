"""The supervisor: starts one engine process and N front-end processes, watches them, stops them.

Start: the gRPC port is probed without SO_REUSEPORT (so a second server on the same port is refused
instead of silently taking half the connections) and then held by a SO_REUSEPORT socket that never
listens; the engine starts and loads the models; then the front ends start, all at once, each binding the
port itself once the engine has attached it. A front end that dies is started again (only its own in-flight
requests fail; the engine drops their answers). If the engine dies, the front ends already answer UNAVAILABLE
(their link is gone); the supervisor stops them and the server exits non-zero, for the process manager (Kubernetes,
Docker, systemd) to restart it: the engine holds the GPU, and a clean start is the only state known
to be good. A child whose event loop stops beating (heartbeat.py) for ``watchdog_seconds`` is killed, and then
handled as one that died. Stop (SIGTERM): front ends drain first, then the engine unloads, then the port is released.

Children die with the supervisor (PR_SET_PDEATHSIG), the engine's socket has an abstract name and the
arenas are memfds: a SIGKILL anywhere leaves no process, file or shared-memory segment behind.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Set, Tuple

from trtserve.server.errors import bind_hint
from trtserve.server.ipc import channel
from trtserve.server.options import ServerOptions
from trtserve.server.process import heartbeat, placement

log = logging.getLogger("trtserve.supervisor")

START_TIMEOUT_S = 600.0  # model loads (TensorRT engine builds) happen before the engine reports ready
RESTARTS_PER_MINUTE = 5  # a front end that keeps dying is a broken server, not bad luck


class StartError(RuntimeError):
    """A child process failed to start; the message says which and why (one line), ``code`` is the exit code
    the server should end with (1; 2 for bad arguments such as a taken port)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def reserve_port(host: str, port: int, what: str = "gRPC") -> Tuple[socket.socket, int]:
    """(a socket that holds the port for this server's front ends, the port). Raises OSError naming the port
    when anything else has it, trtserve included."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of an earlier run is fine
        try:
            probe.bind((host, port))
        except OSError as e:
            raise OSError(e.errno, f"cannot use {host}:{port} for {what}: {e.strerror}{bind_hint(e)}") from None
        port = probe.getsockname()[1]
    finally:
        probe.close()
    hold = socket.socket(family, socket.SOCK_STREAM)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    hold.bind((host, port))
    return hold, port


MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"


def migration_warning(frontends: int, path: str = MIGRATE_REQ) -> Optional[str]:
    """What to tell the operator when a dying front end would reset connections (None when it would not).

    Every front end has a listening socket of its own on the shared port (SO_REUSEPORT). The kernel drops a killed
    process's listener a few milliseconds after its connections, and the clients that reconnect at once can land in
    that listener's queue: when it closes, those connections are reset, and gRPC clients then fail every call for
    their reconnect backoff (about a second) though other front ends serve. With ``net.ipv4.tcp_migrate_req`` set
    to 1 (Linux 5.14 and later, per network namespace) the kernel moves them to another front end's listener."""
    if frontends < 2:  # one front end: nothing to move them to while it restarts
        return None
    try:
        with open(path) as f:
            value = f.read().strip()
    except OSError:
        return ("this kernel cannot move connections between listeners (net.ipv4.tcp_migrate_req, Linux 5.14 and "
                "later): when a front-end process dies, clients that were connecting to it fail their calls for "
                "about a second (see docs/reliability.md)")
    if value != "0":
        return None
    return ("net.ipv4.tcp_migrate_req is 0: when a front-end process dies, clients that were connecting to it fail "
            "their calls for about a second instead of moving to the other front ends; set it to 1 (docs/deploy.md, "
            "'Front-end restarts')")


def own_memory(pid: int) -> Optional[int]:
    """Bytes of a process's anonymous resident memory (its heap: not its arena, which is shared memory, nor the
    pages of its libraries); None when it cannot be read (the process ended, or no /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class Child:
    """One child process and the thread that waits for its exit."""

    def __init__(self, role: str, index: int, proc: subprocess.Popen) -> None:
        self.role, self.index, self.proc = role, index, proc
        self.started = time.monotonic()
        self.last_beat: Optional[float] = None  # when its heartbeat was last read; None: not watched
        self.hung_for: Optional[float] = None  # set when the watchdog killed it: how long it had been silent
        self.exited: "asyncio.Future[int]" = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()

        def wait() -> None:
            code = proc.wait()
            try:
                loop.call_soon_threadsafe(lambda: self.exited.done() or self.exited.set_result(code))
            except RuntimeError:  # the loop is closed: nobody is watching any more
                pass

        threading.Thread(target=wait, name=f"watch-{role}-{index}", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    async def stop(self, timeout: float) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except asyncio.TimeoutError:
            log.warning("%s %d did not stop within %.0f s: killing it", self.role, self.index, timeout)
            self.signal(signal.SIGKILL)
            return await self.exited


class Supervisor:
    """``await start()`` -> (grpc port, metrics port), ``http_port`` set; ``await stop(grace)``; ``await wait()``
    -> exit code."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.address = channel.engine_address(f"{os.getpid()}-{uuid.uuid4().hex[:12]}")
        self.engine: Optional[Child] = None
        self.frontends: List[Optional[Child]] = [None] * options.frontends
        self.grpc_port: Optional[int] = None
        self.http_port: Optional[int] = None
        self.metrics_port: Optional[int] = None
        self.restarts = 0
        self.replacements = 0  # front ends replaced for their memory (frontend_max_memory_bytes)
        self._retiring: Set[Child] = set()  # replaced front ends that are draining
        self._starts: Set["asyncio.Future[None]"] = set()  # front-end starts under way (restarts, replacements)
        self._hold: List[socket.socket] = []
        self._stopping = False
        self._done: Optional["asyncio.Future[int]"] = None
        self._tasks: List["asyncio.Task"] = []
        self._restart_times: List[float] = []

    async def start(self) -> Tuple[int, Optional[int]]:
        self._done = asyncio.get_running_loop().create_future()
        if self.options.engine_cpus:  # the CLI checked it; an embedder's ServerOptions may not be
            try:
                placement.checked(set(self.options.engine_cpus))
            except ValueError as e:
                raise StartError(f"engine_cpus {list(self.options.engine_cpus)}: {e}", 2) from None
        hold, port = reserve_port(self.options.host, self.options.grpc_port)
        self._hold.append(hold)
        self.grpc_port = port
        warning = migration_warning(self.options.frontends)
        if warning is not None:
            log.warning("%s", warning)
        try:
            if self.options.http_port is not None:
                hold, self.http_port = reserve_port(self.options.host, self.options.http_port, "HTTP")
                self._hold.append(hold)
            self.engine, info = await self._spawn("engine", 0)
            self.metrics_port = info.get("metrics_port")
            self._watch(self.engine)
            # all at once: each start waits for a Python process and, with TensorRT, for the engine to page-lock
            # the front end's arena; one after the other, a server took N times that to start
            started = await asyncio.gather(*(self._start_frontend(i) for i in range(self.options.frontends)),
                                           return_exceptions=True)
            failed = [r for r in started if isinstance(r, BaseException)]
            if failed:  # every start has ended: the except below stops those that did start
                raise failed[0]
        except BaseException as e:
            # stopping first: the watchers must not take the children stopped here for crashes to restart; and
            # wait() answers with the start's exit code
            await self._shutdown(e.code if isinstance(e, StartError) else 1, grace=5.0)
            raise
        if self.options.frontend_max_memory_bytes > 0 and self.options.frontends > 0:
            self._tasks.append(asyncio.get_running_loop().create_task(self._watch_memory()))
        if self.options.watchdog_seconds > 0:
            self._tasks.append(asyncio.get_running_loop().create_task(self._watch_hangs()))
        log.info("trtserve serving gRPC on %s:%d and HTTP on %s with %d front-end processes (engine pid %d; "
                 "metrics: %s)", self.options.host, port, self.http_port if self.http_port is not None else "off",
                 self.options.frontends, self.engine.pid,
                 self.metrics_port if self.metrics_port is not None else "off")
        return port, self.metrics_port

    def _payload(self, role: str, index: int, reason: str = "start") -> Dict[str, Any]:
        options = self.options
        if role == "frontend":
            import dataclasses

            options = dataclasses.replace(options, grpc_port=self.grpc_port, http_port=self.http_port)
        # children log and switch threads as this process does (the CLI set both up)
        # why this front end starts: it tells the engine, which counts it in trtserve_frontend_starts_total
        return {"role": f"{role}-{index}" if role == "frontend" else role, "index": index, "options": options,
                "start_reason": reason, "cpus": self._cpus(role),
                "address": self.address, "parent_pid": os.getpid(),
                "log_level": logging.getLogger().getEffectiveLevel(), "switch_interval": sys.getswitchinterval(),
                "beat_interval": (heartbeat.beat_interval(self.options.watchdog_seconds)
                                  if self.options.watchdog_seconds > 0 else None)}

    def _cpus(self, role: str) -> Optional[Tuple[int, ...]]:
        """Where a child's threads run (--engine-cpus): the engine on its CPUs, the front ends on the others this
        process may use; None: where the OS puts them."""
        engine = self.options.engine_cpus
        if not engine:
            return None
        return tuple(engine) if role == "engine" else placement.frontend_cpus(engine)

    async def _spawn(self, role: str, index: int, reason: str = "start") -> Tuple[Child, Dict[str, Any]]:
        module = "trtserve.server.engine.process" if role == "engine" else "trtserve.server.frontend.process"
        # a session of its own: a signal to the whole process group (Ctrl-C in a terminal, `timeout`, a shell
        # script's kill 0) reaches only this process, which stops the children in order (front ends drain first)
        proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                start_new_session=True)
        child = Child(role, index, proc)
        assert proc.stdin is not None and proc.stdout is not None
        loop = asyncio.get_running_loop()
        beats = False
        try:
            payload = pickle.dumps(self._payload(role, index, reason))
            await loop.run_in_executor(None, _write_and_close, proc.stdin, payload)
            line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), START_TIMEOUT_S)
            info = json.loads(line) if line else None
            # a child that is ready keeps the pipe: from now on it carries the child's heartbeats
            beats = info is not None and "error" not in info and self.options.watchdog_seconds > 0
        except (OSError, asyncio.TimeoutError, pickle.PicklingError, AttributeError, TypeError) as e:
            child.signal(9)
            raise StartError(f"the {role} process failed to start: {type(e).__name__}: {e}") from None
        finally:
            if not beats:
                proc.stdout.close()
        if info is None:
            code = await child.exited
            raise StartError(f"the {role} process exited with code {code} before it was ready (see its log above)")
        if "error" in info:  # the child said why it cannot start (a model failed to load, a port is taken)
            await child.exited
            raise StartError(info["error"], int(info.get("code", 1)))
        if beats:
            child.last_beat = time.monotonic()
            await heartbeat.read_beats(proc.stdout, lambda t: setattr(child, "last_beat", t))
        return child, info

    async def _start_frontend(self, index: int, reason: str = "start") -> None:
        started = asyncio.get_running_loop().create_future()
        self._starts.add(started)  # a stop waits for it: the engine must outlive a front end that attached to it
        try:
            child, _ = await self._spawn("frontend", index, reason)
            if self._stopping:  # the server began to stop while this one started (a restart or a replacement)
                await child.stop(self.options.drain_notice_seconds + 5.0)
                return
            self.frontends[index] = child
            self._watch(child)
        finally:
            self._starts.discard(started)
            started.set_result(None)

    def _watch(self, child: Child) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(self._on_exit(child)))

    async def _watch_memory(self) -> None:
        """Replaces, one at a time, a front end whose own memory passed ``frontend_max_memory_bytes``."""
        limit = self.options.frontend_max_memory_bytes
        while not self._stopping:
            await asyncio.sleep(self.options.frontend_memory_check_s)
            for child in list(self.frontends):
                if child is None or self._stopping:
                    continue
                if time.monotonic() - child.started < self.options.frontend_min_age_s:
                    continue
                used = own_memory(child.pid)
                if used is None or used <= limit:
                    continue
                try:
                    await self._replace(child, used)
                except Exception:  # noqa: BLE001 - the server serves on; the next check tries again
                    log.exception("replacing front end %d failed", child.index)

    async def _watch_hangs(self) -> None:
        """Kills a child whose heartbeat has been silent for ``watchdog_seconds``; its exit watch (_on_exit) then
        handles it as a death."""
        limit = self.options.watchdog_seconds
        step = heartbeat.beat_interval(limit)
        last = time.monotonic()
        while not self._stopping:
            await asyncio.sleep(step)
            now = time.monotonic()
            watched = [c for c in (self.engine, *self.frontends, *self._retiring) if c is not None]
            if now - last > 2 * step + 1.0:
                # this process itself did not run (stopped, starved): the children's beats wait unread in their
                # pipes, so their silence says nothing; count from now
                for c in watched:
                    if c.last_beat is not None:
                        c.last_beat = now
            last = now
            for c in watched:
                if c.last_beat is None or c.exited.done() or now - c.last_beat <= limit:
                    continue
                c.hung_for = now - c.last_beat
                c.last_beat = None
                log.error("%s (pid %d) has not run its event loop for %.0f s (--watchdog-seconds %g): killing it",
                          "the engine" if c.role == "engine" else f"front end {c.index}", c.pid, c.hung_for, limit)
                c.signal(signal.SIGKILL)

    async def _replace(self, old: Child, used: int) -> None:
        """A new front end first, so the port keeps its capacity; then the old one drains as on SIGTERM: its
        listener closes and its connections get GOAWAY, so their clients move to the other front ends."""
        log.warning("front end %d (pid %d) holds %d MiB of its own memory, more than --frontend-max-memory-mib %d: "
                    "starting a new one, then draining it", old.index, old.pid, used >> 20,
                    self.options.frontend_max_memory_bytes >> 20)
        self._retiring.add(old)  # its exit from now on is planned: _on_exit leaves it alone
        try:
            await self._start_frontend(old.index, "replacement")
        except StartError as e:
            self._retiring.discard(old)
            if self._stopping:  # the server stops: the new one's start was cut short, as expected
                return
            if old.exited.done():  # it died meanwhile, and nothing could take its place: as a failed restart
                log.error("%s: stopping the server", e)
                await self._shutdown(1, grace=1.0)
                return
            old.started = time.monotonic()  # tried again once it has been up its minimum age once more
            log.error("front end %d could not be replaced (%s); it keeps serving", old.index, e)
            return
        code = await old.stop(self.options.drain_seconds + self.options.drain_notice_seconds + 5.0)
        self._retiring.discard(old)
        if self._stopping:
            return
        self.replacements += 1
        new = self.frontends[old.index]
        log.info("front end %d replaced: pid %d drained (exit code %d), pid %s serves", old.index, old.pid, code,
                 new.pid if new is not None else "-")

    async def _on_exit(self, child: Child) -> None:
        code = await child.exited
        if self._stopping or child in self._retiring:
            return
        how = (f"was killed by the watchdog after {child.hung_for:.0f} s without running its event loop"
               if child.hung_for is not None else f"exited with code {code}")
        if child.role == "engine":
            log.error("the engine process (pid %d) %s: stopping the front ends; the server exits with code 1 for its "
                      "process manager to restart it", child.pid, how)
            await self._shutdown(1, grace=1.0)
            return
        log.error("front end %d (pid %d) %s: its requests in flight failed; starting it again", child.index, child.pid,
                  how)
        now = time.monotonic()
        self._restart_times = [t for t in self._restart_times if now - t < 60.0] + [now]
        if not self.options.restart_frontends or len(self._restart_times) > RESTARTS_PER_MINUTE:
            log.error("front ends keep dying (%d restarts in a minute): stopping the server", len(self._restart_times))
            await self._shutdown(1, grace=1.0)
            return
        try:
            await self._start_frontend(child.index, "watchdog" if child.hung_for is not None else "restart")
            if self._stopping:
                return
            self.restarts += 1
            log.info("front end %d serves again (pid %d)", child.index, self.frontends[child.index].pid)
        except StartError as e:
            if self._stopping:  # the server stops: the new one's start was cut short, as expected
                return
            log.error("%s: stopping the server", e)
            await self._shutdown(1, grace=1.0)

    async def _shutdown(self, code: int, grace: float) -> None:
        if self._stopping:
            return
        self._stopping = True
        await self._stop_children(grace)
        self._release()
        if self._done is not None and not self._done.done():
            self._done.set_result(code)

    async def _stop_children(self, grace: float) -> None:
        fronts = [c for c in self.frontends if c is not None] + [c for c in self._retiring if c not in self.frontends]
        # front ends drain first (their in-flight requests still need the engine), then the engine unloads; a front
        # end still starting finishes its start and is stopped by it (_start_frontend) before the engine goes, so
        # that it never finds the engine gone
        timeout = grace + self.options.drain_notice_seconds + 5.0
        starts = list(self._starts)
        await asyncio.gather(*(c.stop(timeout) for c in fronts),
                             *([asyncio.wait(starts, timeout=START_TIMEOUT_S)] if starts else []))
        if self.engine is not None:
            await self.engine.stop(self.options.drain_seconds + 10.0)

    def _release(self) -> None:
        for hold in self._hold:
            hold.close()
        self._hold = []

    async def stop(self, grace: Optional[float] = None) -> None:
        await self._shutdown(0, self.options.drain_seconds if grace is None else grace)
        for t in self._tasks:
            t.cancel()

    async def wait(self) -> int:
        """The server's exit code once it stopped (0 after stop(); 1 when the engine died)."""
        assert self._done is not None
        return await asyncio.shield(self._done)

    def pids(self) -> Dict[str, int]:
        """{role: pid} of the running children, for tests and diagnostics."""
        out = {}
        if self.engine is not None:
            out["engine"] = self.engine.pid
        for c in self.frontends:
            if c is not None:
                out[f"frontend-{c.index}"] = c.pid
        return out


def _write_and_close(pipe: Any, data: bytes) -> None:
    try:
        pipe.write(data)
    finally:
        pipe.close()

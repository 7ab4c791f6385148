"""The engine, assembled: repository, batchers, client shared memory, statistics, metrics, and the core
that serves front ends. In a multi-process server it is the engine process; with ``--frontends 0`` it runs
on the same event loop as the single front end."""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import List, Optional, Set

from trtserve.server.engine.control import Control
from trtserve.server.engine.core import EngineCore, Session
from trtserve.server.engine.repository import layout
from trtserve.server.engine.repository.registry import ModelRepository
from trtserve.server.engine.shm.registry import SharedMemoryRegistry
from trtserve.server.errors import bind_hint
from trtserve.server.events import Fanout, Observer
from trtserve.server.frontend.memory import PeriodicTrim
from trtserve.server.ipc import channel
from trtserve.server.ipc.arena import Arena
from trtserve.server.ipc.channel import Link, SocketLink
from trtserve.server.metrics.frontends import FrontEndStarts
from trtserve.server.metrics.statistics import Statistics
from trtserve.server.options import ServerOptions

log = logging.getLogger("trtserve.engine")


class StartupFailure(RuntimeError):
    """The server cannot start: ``str()`` is one line for the user, ``code`` the exit code (1: a model failed to
    load, 2: bad arguments such as a repository that is not a folder, a port that is taken)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class EngineHost:
    """``await start()`` loads the models and starts /metrics; front ends then ``attach``."""

    def __init__(self, options: ServerOptions, extra_observers: Optional[List[Observer]] = None) -> None:
        self.options = options
        self.statistics = Statistics()
        self.prometheus = None
        self.frontend_starts: Optional[FrontEndStarts] = None
        observers: List[Observer] = [self.statistics]
        if options.metrics_port is not None:
            from trtserve.server.metrics.prometheus import PrometheusObserver

            self.prometheus = PrometheusObserver(gpu=options.gpu_metrics)
            self.frontend_starts = FrontEndStarts(self.prometheus.registry)
            observers.append(self.prometheus)
        observers.extend(extra_observers or [])
        self.observer = Fanout(observers)
        self.repository = ModelRepository(options.model_repository, self.observer, options.cache_dir,
                                          options.drain_seconds, options.backend_factories,  # type: ignore[arg-type]
                                          lenient_config=options.lenient_config)
        self.shared_memory = SharedMemoryRegistry(max_regions=options.max_shm_regions)
        self.control = Control(self.repository, self.statistics, self.shared_memory, self._run_blocking,
                               strict_readiness=options.strict_readiness)
        self.control.model_control_mode = options.model_control_mode
        self.core = EngineCore(self.repository, self.shared_memory, self.observer, self.control)
        self._poll_task: Optional[asyncio.Task] = None
        self._stopping = False
        self._poll_pass = False  # a poll pass is under way (a stop waits for it; a sleeping poll is cancelled)
        self.metrics_port: Optional[int] = None
        self._metrics_server = None
        self._listener: Optional[socket.socket] = None
        self._attaching: Set["asyncio.Future"] = set()  # front ends accepted, not yet attached
        self._trim = PeriodicTrim()  # heap pages back to the OS once a burst is over (issue 18 item 10)

    @staticmethod
    async def _run_blocking(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def start(self) -> None:
        """Starts /metrics, then loads the models. StartupFailure (one line for the user) when the repository is
        not a folder, the metrics port cannot be bound, or (exit_on_error) a model fails to load; whatever was
        started is stopped again first."""
        root = self.options.model_repository
        if not root.is_dir():
            raise StartupFailure(f"model repository {root} " + ("is not a folder" if root.exists() else
                                                               "does not exist"), code=2)
        if self.prometheus is not None and self.options.metrics_port is not None:
            from trtserve.server.metrics.http import MetricsServer

            opts = self.options
            self._metrics_server = MetricsServer(
                self.prometheus.registry, opts.host, opts.metrics_port,
                metrics_tls=opts.tls if opts.metrics_tls else None,
                metrics_auth_token=opts.auth_token if opts.metrics_auth else None)
            try:
                self.metrics_port = self._metrics_server.start()
            except OSError as e:
                self._metrics_server = None
                raise StartupFailure(f"cannot use {opts.host}:{opts.metrics_port} for /metrics: "
                                     f"{e.strerror or e}{bind_hint(e)}; --metrics-port -1 turns metrics off",
                                     code=2) from None
        startup: Optional[List[str]] = None  # none and poll: every model of the repository
        if self.options.model_control_mode == "explicit":  # --load-model's models ("*": all)
            startup = list(self.options.startup_models)
            if "*" in startup:
                startup = layout.model_names(root)
        failed = await self.repository.load_all(startup)
        if failed and self.options.exit_on_error:
            await self.stop()
            reasons = "; ".join(" ".join(reason.split()) for _, reason in failed)
            names = ", ".join(f"'{name}'" for name, _ in failed)
            raise StartupFailure(f"model{'s' if len(failed) > 1 else ''} {names} failed to load, stopping "
                                 f"(--no-exit-on-error serves the others): {reasons}", code=1)
        self._trim.start()
        if self.options.model_control_mode == "poll":
            self._poll_task = asyncio.ensure_future(self._poll())

    async def _poll(self) -> None:
        """Model control mode poll: rescans the repository every --repository-poll-secs, in the engine (the
        scan itself runs off the loop). A stop waits for the pass under way, so no load is cut in half."""
        interval = max(0.05, self.options.repository_poll_secs)
        while not self._stopping:
            await asyncio.sleep(interval)
            if self._stopping:
                return
            self._poll_pass = True
            try:
                await self.repository.poll(stopping=lambda: self._stopping)
            except Exception:  # noqa: BLE001 - one failed pass (a folder changing under it) must not end polling
                log.exception("repository poll failed; trying again in %.3g s", interval)
            finally:
                self._poll_pass = False

    def attach(self, name: str, link: Link, arena: Optional[Arena]) -> Session:
        if arena is not None:
            self._maybe_pin(arena)
        return self.core.attach(name, link, arena)

    # ---- front ends in other processes ----------------------------------------------------------------------------
    def listen(self, address: str) -> None:
        """Accepts front ends on a Unix socket (abstract name: nothing on disk); each sends its arena first."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(address)
        sock.listen(64)
        sock.setblocking(False)
        self._listener = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            try:
                # a front end sends its hello right after connecting: reading it blocks for microseconds
                hello, fds = channel.receive_hello(conn)
                if len(fds) != 1:
                    raise ConnectionError(f"expected the arena's descriptor, got {len(fds)} descriptors")
                arena = Arena.attach(fds[0])
            except (OSError, ValueError, ConnectionError) as e:
                log.error("a front end failed to connect: %s", e)
                conn.close()
                continue
            task = asyncio.ensure_future(self._attach_remote(str(hello.get("name", "?")), conn, arena,
                                                             str(hello.get("start", "start"))))
            self._attaching.add(task)
            task.add_done_callback(self._attaching.discard)

    async def _attach_remote(self, name: str, conn: socket.socket, arena: Arena, reason: str = "start") -> None:
        """Page-locks the arena on a worker thread, then attaches: registering a whole arena with CUDA takes
        long enough to stall every request in flight if the loop did it (a front end restarted under load).
        The front end binds its port only once attached (EngineClient.attached), so no client waits on it."""
        try:
            if self._serves_tensorrt():
                started = time.monotonic()
                await asyncio.get_running_loop().run_in_executor(None, self._pin, arena)
                log.info("front end %s: its arena (%d MiB) page-locked in %.2f s", name, arena.size >> 20,
                         time.monotonic() - started)
            if not self._stopping:
                self.core.attach(name, SocketLink(conn), arena)
                if self.frontend_starts is not None:
                    self.frontend_starts.started(reason)
                return
        except Exception:  # noqa: BLE001 - this front end fails to connect (it reconnects or is restarted), no other
            log.exception("attaching front end %s failed", name)
        conn.close()
        arena.close()

    def _serves_tensorrt(self) -> bool:
        return any(v.backend is not None and v.backend.platform == "tensorrt_plan" for v in self.repository.loaded())

    def _maybe_pin(self, arena: Arena) -> None:
        """Page-locks a front end's arena when a TensorRT model is served, so input copies to the device read
        the arena directly (no copy through the instance's own pinned buffer)."""
        if self._serves_tensorrt():
            self._pin(arena)

    @staticmethod
    def _pin(arena: Arena) -> None:
        try:
            arena.pin()
        except Exception as e:  # noqa: BLE001 - serving works unpinned, only with one more host copy per batch
            log.warning("could not page-lock a front end's arena (%d bytes): %s; inputs are staged through "
                        "pinned buffers instead", arena.size, e)

    async def stop(self) -> None:
        """Readiness false, front ends detached (their queued requests answered), models unloaded, /metrics off."""
        self.control.ready = False
        self._trim.stop()
        self._stopping = True
        if self._poll_task is not None:
            if not self._poll_pass:
                self._poll_task.cancel()
            await asyncio.wait({self._poll_task})
            self._poll_task = None
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        if self._attaching:  # front ends whose arena is being page-locked: they close instead of attaching
            await asyncio.gather(*self._attaching, return_exceptions=True)
        await self.repository.close()
        self.core.close()
        self.shared_memory.close()
        if self._metrics_server is not None:  # its stop() waits for the HTTP thread: not on the loop
            await asyncio.get_running_loop().run_in_executor(None, self._metrics_server.stop)
        if self.prometheus is not None:
            self.prometheus.close()

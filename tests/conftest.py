"""Real servers on free loopback ports, for tests that talk to trtserve as its users do.

``RunningServer`` runs ``TrtServer`` on its own event loop in a background thread, so tests may use
blocking clients (tritonclient.grpc) or their own asyncio loop against it. ``serve_repo`` starts one
on any repository; ``example_server`` is the bundled example, shared by a whole test session.
"""
from __future__ import annotations

import os
import subprocess

# Tests fork subprocesses (openssl, perf_analyzer, trtserve serve, kubectl, ...) from a process that runs
# gRPC servers and channels. Python 3.9 forks with fork() (3.10+ uses vfork), and grpcio's fork handlers
# then abort the child ("epoll_wait error: Bad file descriptor"). The server itself never forks, so the
# test process turns gRPC's fork support off before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import asyncio
import pathlib
import threading
from typing import Callable, Iterator, List, Optional

import pytest

from trtserve.server.app import ServerOptions, TrtServer
from trtserve.server.examples import REPOSITORY as EXAMPLE_REPOSITORY


class RunningServer:
    """A started TrtServer; ``url`` is "127.0.0.1:<grpc port>", ``http_url`` the same for HTTP, ``metrics_url``
    the /metrics address."""

    def __init__(self, repo: pathlib.Path, metrics: bool = True, drain_seconds: float = 5.0, **options) -> None:
        self.repo = repo
        self.server = TrtServer(ServerOptions(model_repository=repo, grpc_port=0, http_port=0, metrics_port=0 if metrics else None,
                                              drain_seconds=drain_seconds, gpu_metrics=False, **options))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="trtserve-test-server", daemon=True)
        self._thread.start()
        self.call(self.server.start())
        self.url = f"127.0.0.1:{self.server.grpc_port}"
        self.http_url = f"127.0.0.1:{self.server.http_port}"
        self.metrics_url = (f"http://127.0.0.1:{self.server.metrics_port}/metrics"
                            if self.server.metrics_port is not None else None)

    def call(self, coro, timeout: float = 120.0):
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.server.stop(grace=2.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


# load and unload RPCs need Triton's explicit model control; "*" loads every model at start, as the default does
EXPLICIT = {"model_control_mode": "explicit", "startup_models": ("*",)}
EXPLICIT_ARGS = ("--model-control-mode", "explicit", "--load-model", "*")


@pytest.fixture(scope="session")
def example_server() -> Iterator[RunningServer]:
    """The bundled example repository (model ``mlp``), shared by the session: read-only tests only."""
    s = RunningServer(EXAMPLE_REPOSITORY)
    yield s
    s.stop()


@pytest.fixture
def serve_repo() -> Iterator[Callable[..., RunningServer]]:
    """``serve_repo(path, metrics=True, **ServerOptions fields)`` starts a server on ``path``; all are
    stopped after the test."""
    started: List[RunningServer] = []

    def start(repo: pathlib.Path, metrics: bool = True, drain_seconds: float = 5.0, **options) -> RunningServer:
        s = RunningServer(repo, metrics=metrics, drain_seconds=drain_seconds, **options)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def triton_client(example_server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(example_server.url)
    yield client
    client.close()


def stop_server(s: Optional[RunningServer]) -> None:
    if s is not None:
        s.stop()


def spawn(cmd, **kwargs) -> "subprocess.CompletedProcess":
    """subprocess.run without fork(): a forked child of a process running gRPC threads can abort
    (gRPC's fork handlers) before it execs. Python uses posix_spawn only for a full executable path,
    close_fds=False and no cwd, so callers pass absolute paths instead of cwd."""
    import shutil

    exe = shutil.which(cmd[0]) or cmd[0]
    return subprocess.run([exe, *cmd[1:]], close_fds=False, **kwargs)

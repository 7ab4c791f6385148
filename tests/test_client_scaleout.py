"""Two real server processes behind one client target (round robin): requests spread over both, and
stopping one mid-run (SIGTERM: drain) loses no request. Item 5 of issue #7 as well as #6."""
from __future__ import annotations

import asyncio
import re
import select
import signal
import subprocess
import sys
import time
from typing import Iterator, List, Tuple

import numpy as np
import pytest

from trtserve.client import AsyncInferenceClient, InferenceClient, InferenceServerError

pytestmark = pytest.mark.slow
_SERVING = re.compile(r"on 127\.0\.0\.1:(\d+)")


def _start_server() -> Tuple[subprocess.Popen, int]:
    """``trtserve serve`` on a free port (port 0), the port read from its first stdout line."""
    proc = subprocess.Popen([sys.executable, "-m", "trtserve", "serve", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "-1",
                             "--no-gpu-metrics", "--drain-seconds", "5", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        m = _SERVING.search(line)
        if m:
            return proc, int(m.group(1))
    proc.kill()
    raise RuntimeError(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def two_servers() -> Iterator[List[Tuple[subprocess.Popen, int]]]:
    servers = [_start_server(), _start_server()]
    try:
        yield servers
    finally:
        for proc, _ in servers:
            _stop(proc)


def _successes(port: int) -> int:
    with InferenceClient(f"127.0.0.1:{port}") as c:
        return int(c.model_statistics("mlp").model_stats[0].inference_stats.success.count)


def test_requests_spread_over_both_servers(two_servers):
    ports = [p for _, p in two_servers]
    before = [_successes(p) for p in ports]
    x = np.ones((1, 64), np.float32)
    with InferenceClient([f"127.0.0.1:{p}" for p in ports]) as c:
        assert c.target == "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
        for _ in range(100):
            assert c.infer("mlp", {"INPUT0": x})["OUTPUT0"].shape == (1, 16)
    served = [_successes(p) - b for p, b in zip(ports, before)]
    assert sum(served) == 100
    assert min(served) >= 30, served  # round robin: about half each (the first calls may land on one)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
async def test_client_survives_one_server_stopping(two_servers, sig):
    """8 callers in a loop; server A is killed (or drained) mid-run; every call still succeeds.

    A killed server's in-flight calls fail UNAVAILABLE before any response header, so the
    client's retry policy sends them again and round robin picks the live server. A drained server turns
    NOT_SERVING for a notice period before it refuses calls, so the client's health check moves the callers
    away first (without it, grpc answered calls caught at the stop with CANCELLED, which no client may retry).
    """
    (proc_a, port_a), (_, port_b) = two_servers
    before_b = _successes(port_b)
    x = np.ones((2, 64), np.float32)
    done = asyncio.Event()
    ok: List[float] = []
    failures: List[InferenceServerError] = []
    loop = asyncio.get_running_loop()

    async with AsyncInferenceClient(f"127.0.0.1:{port_a},127.0.0.1:{port_b}") as client:
        async def worker() -> None:
            while not done.is_set():
                try:
                    out = await client.infer("mlp", {"INPUT0": x}, timeout=10)
                    assert out["OUTPUT0"].shape == (2, 16)
                    ok.append(loop.time())
                except InferenceServerError as e:
                    failures.append(e)

        workers = [asyncio.ensure_future(worker()) for _ in range(8)]
        await asyncio.sleep(1.0)
        stopped_at = loop.time()
        proc_a.send_signal(sig)
        exited = await loop.run_in_executor(None, proc_a.wait, 30)
        assert exited == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        gone_at = loop.time()
        await asyncio.sleep(1.0)
        done.set()
        await asyncio.gather(*workers)

    assert failures == [], [str(f) for f in failures[:5]]
    assert sum(1 for t in ok if t < stopped_at) > 0
    after_gone = sum(1 for t in ok if t > gone_at)
    assert after_gone > 0  # server B carried the load alone
    assert _successes(port_b) - before_b >= after_gone

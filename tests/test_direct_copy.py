"""Large requests on a GPU model skip the host copies: the engine hands the backend each request's input where it
lies in the page-locked arena (a batch left in pieces) and the address of each request's arena slot for its
output, and answers with that slot without writing it again. Here the TensorRT backend is a fake whose "device
copies" are memmoves (the real one runs in tests/gpu) and the arena's page-locking is a flag, so the engine's
side of the path runs in CI: which requests go direct (``direct_copy_min_bytes``), what the answer carries, and
that a request below the threshold still takes the staged path in the same batch."""
from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Iterator, List, Sequence

import numpy as np
import pytest

from trtserve.server.engine.backends.base import Backend, BatchResult, Gather, TensorSpec, each_destination
from trtserve.server.ipc.arena import Arena

from .test_system_shm import fake_device_copies

MIN_BYTES = 64  # requests of 4+ rows of 4 FP32 go direct


class DirectBackend(Backend):
    """OUTPUT0 = 2 * INPUT0, written into each destination by memmove (what the device copy does); in the host
    result it returns, the rows it delivered are 2 * INPUT0 + 1000, so an output the engine wrote again from the
    host result shows."""

    platform = "tensorrt_plan"  # the engine page-locks arenas for it
    accepts_device_tensors = True
    direct_copy_min_bytes = MIN_BYTES
    batches: List[dict] = []
    lock = threading.Lock()
    started = threading.Event()  # a batch began
    gate = threading.Event()  # a batch whose input is all -1 waits for it (holds the one instance)

    def open(self) -> None:
        pass

    def io(self):
        return ((TensorSpec("INPUT0", "FP32", (-1, 4)),), (TensorSpec("OUTPUT0", "FP32", (-1, 4)),))

    def run(self, instance, inputs, outputs):
        return self.run_to_device(instance, inputs, outputs, ())

    def run_to_device(self, instance, inputs, outputs, destinations):
        x = inputs["INPUT0"]
        parts = x.parts if isinstance(x, Gather) else (x,)
        y = 2 * np.concatenate(parts, axis=0)
        DirectBackend.started.set()
        if (y == -2).all():
            DirectBackend.gate.wait(30)
            return BatchResult({"OUTPUT0": y})
        delivered = fake_device_copies(y, destinations)
        each = list(each_destination(destinations))
        host = y.copy()
        for d in each:
            host[d.row_offset:d.row_offset + d.rows] += 1000
        with self.lock:
            DirectBackend.batches.append({"gathered": isinstance(x, Gather), "rows": int(y.shape[0]),
                                          "destinations": sorted(d.rows for d in each)})
        return BatchResult({"OUTPUT0": host}, delivered=delivered)

    def close(self) -> None:
        pass


@pytest.fixture
def server(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    from tests.test_faults import OptionsServer
    from trtserve.server.app import ServerOptions

    from .models import fake_backend_model

    close = Arena.close

    def unpin_then_close(self: Arena) -> None:
        self.pinned = False  # nothing was registered with CUDA
        close(self)

    monkeypatch.setattr(Arena, "pin", lambda self: setattr(self, "pinned", True))
    monkeypatch.setattr(Arena, "close", unpin_then_close)
    fake_backend_model(tmp_path, "direct", "tensorrt_plan", 64, preferred=64, delay_us=300000)
    DirectBackend.batches = []
    s = OptionsServer(ServerOptions(model_repository=tmp_path, grpc_port=0, http_port=0, metrics_port=None,
                                    gpu_metrics=False, backend_factories={"tensorrt_plan": DirectBackend}))
    yield s
    s.stop()


def _infer(client, rows: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)
    y = client.infer("direct", {"INPUT0": x})["OUTPUT0"]
    np.testing.assert_array_equal(y, 2 * x)  # 2x + 1000: the engine wrote a delivered output again
    return y


def _one_batch(client, rows: Sequence[int], seed: int) -> None:
    """Requests of these sizes in one batch: they queue while a held batch occupies the instance."""
    blocker = np.full((1, 4), -1, np.float32)
    DirectBackend.started.clear()
    DirectBackend.gate.clear()
    with concurrent.futures.ThreadPoolExecutor(len(rows) + 1) as pool:
        held = pool.submit(client.infer, "direct", {"INPUT0": blocker})
        assert DirectBackend.started.wait(10)
        jobs = [pool.submit(_infer, client, n, seed + k) for k, n in enumerate(rows)]
        time.sleep(0.3)  # all of them queue behind the held batch
        DirectBackend.gate.set()
        for j in jobs + [held]:
            j.result(timeout=30)


def test_large_requests_are_read_and_answered_in_place_and_small_ones_staged(server) -> None:
    from trtserve.client import InferenceClient

    with InferenceClient(server.url) as client:
        assert server.server.engine.core.sessions[0].arena.pinned
        # large requests only: the input left in pieces, every output written by the "device"
        _one_batch(client, (8, 8, 4, 8), 0)
        # one small request among them: the input is concatenated, only the large requests get destinations
        _one_batch(client, (8, 1, 16, 3), 10)
        # alone, below the threshold: the staged path
        _infer(client, 2, 99)
    seen = [b for b in DirectBackend.batches if b["rows"] != 1 or b["destinations"]]  # not the held batches
    assert seen == [{"gathered": True, "rows": 28, "destinations": [4, 8, 8, 8]},
                    {"gathered": False, "rows": 28, "destinations": [8, 16]},
                    {"gathered": False, "rows": 2, "destinations": []}], seen


def test_the_threshold_parameter_is_read_like_the_other_integer_parameters(tmp_path) -> None:
    from trtserve.server.engine.backends.base import BackendConfig
    from trtserve.server.engine.backends.tensorrt import DIRECT_COPY_MIN_BYTES, _direct_copy_min_bytes
    from trtserve.server.errors import ModelLoadError

    def threshold(**parameters: str):
        return _direct_copy_min_bytes(BackendConfig("m", "1", tmp_path, "", 8, (), (), parameters=parameters))

    assert threshold() == DIRECT_COPY_MIN_BYTES
    assert threshold(**{"trtserve.direct_copy_min_bytes": " 1024 "}) == 1024
    assert threshold(**{"trtserve.direct_copy_min_bytes": "0"}) is None  # off
    for bad in ("-1", "16k", ""):
        with pytest.raises(ModelLoadError, match="parameter 'trtserve.direct_copy_min_bytes'"):
            threshold(**{"trtserve.direct_copy_min_bytes": bad})


async def _listening_gpu_engine(repo, monkeypatch: pytest.MonkeyPatch):
    """An engine host on an empty repository that behaves as if it served TensorRT (it page-locks the arenas of
    front ends that connect), listening on a fresh address: (host, address)."""
    import uuid

    from trtserve.server.engine.host import EngineHost
    from trtserve.server.ipc import channel
    from trtserve.server.options import ServerOptions

    host = EngineHost(ServerOptions(model_repository=repo, grpc_port=0, http_port=0, metrics_port=None,
                                    gpu_metrics=False))
    await host.start()
    monkeypatch.setattr(host, "_serves_tensorrt", lambda: True)
    address = channel.engine_address(uuid.uuid4().hex)
    host.listen(address)
    return host, address


def test_a_front_ends_arena_is_page_locked_off_the_engine_loop(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Registering a whole arena with CUDA takes long: it runs on a worker thread while the engine's loop keeps
    serving, the front end is attached once it is done, and an engine stopping meanwhile closes the connection
    instead of attaching it."""
    import asyncio

    from trtserve.server.ipc import channel

    pinned: List[int] = []
    release = threading.Event()

    def slow_pin(self: Arena) -> None:
        pinned.append(threading.get_ident())
        release.wait(10)
        self.pinned = False  # nothing was registered: close() has nothing to unregister

    monkeypatch.setattr(Arena, "pin", slow_pin)

    async def until(check, what: str) -> None:
        for _ in range(500):
            if check():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        host, address = await _listening_gpu_engine(tmp_path, monkeypatch)
        arenas = [Arena.create(1 << 16), Arena.create(1 << 16)]
        try:
            first = await loop.run_in_executor(None, channel.connect, address, {"name": "fe-1"}, [arenas[0].fd])
            await until(lambda: pinned, "the pin")  # this coroutine runs meanwhile: the loop is not blocked
            assert pinned[0] != threading.get_ident()
            assert host.core.sessions == []  # not attached before its arena is page-locked
            release.set()
            await until(lambda: len(host.core.sessions) == 1, "the attach")
            release.clear()
            second = await loop.run_in_executor(None, channel.connect, address, {"name": "fe-2"}, [arenas[1].fd])
            await until(lambda: len(pinned) == 2, "the second pin")
            stopping = asyncio.ensure_future(host.stop())  # waits for the pin under way
            await asyncio.sleep(0.05)
            release.set()
            await asyncio.wait_for(stopping, 10)
            assert [s.name for s in host.core.sessions] == []
            second.settimeout(5)
            assert second.recv(1) == b""  # closed, never attached
            first.close()
            second.close()
        finally:
            release.set()
            for a in arenas:
                a.close()

    asyncio.run(main())


def test_a_front_end_serves_only_once_the_engine_attached_it(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A front end binds its port after the engine attached it: while the engine page-locks its arena nothing
    reads the link, so connections taken meanwhile would stall. ``attached()`` waits for that, and raises
    Unavailable when the engine closes the link instead (it stopped during the pin)."""
    import asyncio

    from trtserve.server.errors import Unavailable
    from trtserve.server.frontend.engine_client import EngineClient
    from trtserve.server.ipc import channel
    from trtserve.server.ipc.channel import SocketLink

    pinning = threading.Event()
    release = threading.Event()

    def slow_pin(self: Arena) -> None:
        pinning.set()
        release.wait(10)
        self.pinned = False

    monkeypatch.setattr(Arena, "pin", slow_pin)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        host, address = await _listening_gpu_engine(tmp_path, monkeypatch)
        clients = []
        try:
            for name in ("fe-1", "fe-2"):
                arena = Arena.create(1 << 16)
                sock = await loop.run_in_executor(None, channel.connect, address, {"name": name}, [arena.fd])
                client = EngineClient(SocketLink(sock), arena)
                client.start()
                clients.append(client)
                waiter = asyncio.ensure_future(client.attached())
                assert await loop.run_in_executor(None, pinning.wait, 10)
                await asyncio.sleep(0.1)
                assert not waiter.done()  # the engine is still page-locking the arena
                if name == "fe-1":
                    release.set()
                    await asyncio.wait_for(waiter, 10)
                    assert await asyncio.wait_for(client.call("server_ready"), 10) is True
                    pinning.clear()
                    release.clear()
                else:
                    stopping = asyncio.ensure_future(host.stop())
                    await asyncio.sleep(0.05)
                    release.set()
                    with pytest.raises(Unavailable, match="before attaching"):
                        await asyncio.wait_for(waiter, 10)
                    await asyncio.wait_for(stopping, 10)
        finally:
            release.set()
            for c in clients:
                c.link.close()
                c.arena.close()

    asyncio.run(main())

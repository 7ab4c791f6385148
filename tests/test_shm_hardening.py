"""Issue 18, items 1 and 4: a client's system shared-memory object must never take the server down,
and registered regions must not exhaust the server's file descriptors.

1. SIGBUS: a client shrinks (``ftruncate``) the object behind a registered region while requests read
   inputs from it and write outputs into it. A server that maps the object dies of SIGBUS within a
   second; the server reads and writes through a file descriptor instead and answers such requests
   INVALID_ARGUMENT. Run twice: against the in-process server (before the fix the whole pytest
   process died) and against ``trtserve serve`` in a subprocess (before the fix: an assertion that the
   process is gone, exit status -SIGBUS).
4. One descriptor per system region (the mmap kept a second one), and ``max_regions`` (the server's
   ``--max-shm-regions``) answers RESOURCE_EXHAUSTED beyond it.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Callable, Dict, Iterator, List

import numpy as np
import pytest

try:  # the unmodified tritonclient; the tests that do not need it run without it (e.g. on Python 3.9)
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
    _NO_TC = ""
except Exception as e:  # ImportError, or pkg_resources missing under tritonclient
    grpcclient = None  # type: ignore[assignment]
    InferenceServerException = Exception  # type: ignore[assignment,misc]
    _NO_TC = f"tritonclient unusable here: {type(e).__name__}: {e}"
needs_tc = pytest.mark.skipif(bool(_NO_TC), reason=_NO_TC or "-")
needs_dev_shm = pytest.mark.skipif(not os.path.isdir("/dev/shm") or not os.path.isdir("/proc/self/fd"),
                                   reason="needs Linux /dev/shm and /proc")

from tests.mp import tree  # noqa: E402
from trtserve import dtypes  # noqa: E402
from trtserve.server.engine.shm.registry import SharedMemoryRegistry  # noqa: E402
from trtserve.server.engine.shm.request import ShmRef  # noqa: E402
from trtserve.server.errors import InvalidArgument, ResourceExhausted  # noqa: E402
from trtserve.server.examples import REPOSITORY as EXAMPLE_REPOSITORY  # noqa: E402
from trtserve.server.examples.make_mlp import reference  # noqa: E402

ROWS = 32  # the example mlp's max_batch_size: 8 KiB of input, 2 KiB of output per request
IN_BYTES, OUT_BYTES = ROWS * 64 * 4, ROWS * 16 * 4
FP32 = dtypes.BY_WIRE["FP32"]


# ---- client-side POSIX objects, never mapped by the test (a mapping here would SIGBUS the test itself) -----------

class PosixObject:
    """A POSIX shared-memory object the test owns: created, sized, written and shrunk through its fd."""

    def __init__(self, size: int) -> None:
        self.key = f"/trtserve_harden_{uuid.uuid4().hex[:12]}"
        self.path = pathlib.Path("/dev/shm") / self.key.lstrip("/")
        self.size = size
        self.fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(self.fd, size)

    def write(self, data: bytes, offset: int = 0) -> None:
        os.pwrite(self.fd, data, offset)

    def read(self, n: int, offset: int = 0) -> bytes:
        return os.pread(self.fd, n, offset)

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def destroy(self) -> None:
        self.close_fd()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


@pytest.fixture
def posix() -> Iterator[Callable[[int], PosixObject]]:
    made: List[PosixObject] = []

    def make(size: int) -> PosixObject:
        o = PosixObject(size)
        made.append(o)
        return o

    yield make
    for o in made:
        o.destroy()


# ---- the server as a subprocess (a SIGBUS there is an exit status, not the end of pytest) --------------------------

_SERVING = re.compile(r" on 127\.0\.0\.1:(\d+)")


class ServeProcess:
    def __init__(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "trtserve", "serve", "--model-repository",
                                      str(EXAMPLE_REPOSITORY), "--grpc-port", "0", "--http-port", "0", "--metrics-port", "-1",
                                      "--no-gpu-metrics", "--drain-seconds", "2", "--log-level", "warning"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: List[str] = []
        deadline = time.monotonic() + 90
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = _SERVING.search(line)
            if m:
                self.url = f"127.0.0.1:{m.group(1)}"
                # keep draining its output so that it never blocks on a full pipe
                threading.Thread(target=self._drain, daemon=True).start()
                return
        self.proc.kill()
        raise AssertionError("trtserve serve did not start:\n" + "".join(self.lines))

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def describe_death(self) -> str:
        rc = self.proc.poll()
        name = signal.Signals(-rc).name if rc is not None and rc < 0 else str(rc)
        return f"server exited ({name}); last output:\n" + "".join(self.lines[-20:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def serve_process() -> Iterator[ServeProcess]:
    s = ServeProcess()
    yield s
    s.stop()


def _process_tree_fds(pid: int) -> int:
    """Open descriptors of ``pid`` and every descendant (the engine may run in a child process)."""
    total = 0
    for p in tree(pid):
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


# ---- item 1: the shrinking object ----------------------------------------------------------------------------------

def _request(region_in: str, region_out: str, out_offset: int):
    i = grpcclient.InferInput("INPUT0", [ROWS, 64], "FP32")
    i.set_shared_memory(region_in, IN_BYTES)
    o = grpcclient.InferRequestedOutput("OUTPUT0")
    o.set_shared_memory(region_out, OUT_BYTES, out_offset)
    return [i], [o]


def _shrink_race(url: str, posix: Callable[[int], PosixObject], alive: Callable[[], bool], describe: Callable[[], str],
                 seconds: float = 2.0, clients: int = 3) -> Dict[str, int]:
    """Clients infer with input and output in shared memory while another thread shrinks and regrows both
    objects; returns the outcomes by status. The server must answer every request and stay up."""
    tag = uuid.uuid4().hex[:8]
    rin, rout = f"race_in_{tag}", f"race_out_{tag}"
    x = np.random.default_rng(1).random((ROWS, 64), dtype=np.float32)
    obj_in, obj_out = posix(IN_BYTES), posix(OUT_BYTES * clients)
    obj_in.write(x.tobytes())
    admin = grpcclient.InferenceServerClient(url)
    admin.register_system_shared_memory(rin, obj_in.key, IN_BYTES)
    admin.register_system_shared_memory(rout, obj_out.key, OUT_BYTES * clients)
    stop = threading.Event()
    outcomes: Dict[str, int] = {}
    unexpected: List[str] = []
    lock = threading.Lock()

    def shrink() -> None:
        while not stop.is_set():
            for o in (obj_in, obj_out):
                os.ftruncate(o.fd, 0)
                os.ftruncate(o.fd, o.size)

    def client(k: int) -> None:
        c = grpcclient.InferenceServerClient(url)
        try:
            inputs, outputs = _request(rin, rout, k * OUT_BYTES)
            while not stop.is_set():
                try:
                    c.infer("mlp", inputs, outputs=outputs, client_timeout=30)
                    key = "OK"
                except InferenceServerException as e:
                    key = str(e.status()).replace("StatusCode.", "")
                    if key != "INVALID_ARGUMENT":
                        with lock:
                            unexpected.append(f"{key}: {e.message()}")
                    elif "shrunk after registration" not in (e.message() or ""):
                        with lock:
                            unexpected.append(f"unexpected INVALID_ARGUMENT: {e.message()}")
                with lock:
                    outcomes[key] = outcomes.get(key, 0) + 1
                if key not in ("OK", "INVALID_ARGUMENT"):
                    return  # the server is probably gone: stop hammering it
        finally:
            c.close()

    shrinker = threading.Thread(target=shrink, daemon=True)
    workers = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    shrinker.start()
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join(60)
    shrinker.join(10)
    assert not any(w.is_alive() for w in workers), "a request was never answered"
    assert alive(), describe()
    assert not unexpected, (unexpected[:5], outcomes)
    assert sum(outcomes.values()) >= clients, outcomes

    # the objects are whole again: a normal request through both regions succeeds and is right
    obj_in.write(x.tobytes())
    inputs, outputs = _request(rin, rout, 0)
    result = admin.infer("mlp", inputs, outputs=outputs, client_timeout=30)
    assert list(result.get_output("OUTPUT0").shape) == [ROWS, 16]
    got = np.frombuffer(obj_out.read(OUT_BYTES), np.float32).reshape(ROWS, 16)
    np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-5)
    assert admin.is_server_live()
    admin.unregister_system_shared_memory(rin)
    admin.unregister_system_shared_memory(rout)
    admin.close()
    return outcomes


@needs_tc
@needs_dev_shm
def test_shrinking_object_in_process_server_survives(serve_repo, posix):
    """In process: before the fix this killed the pytest process itself (SIGBUS on an instance thread)."""
    s = serve_repo(EXAMPLE_REPOSITORY, metrics=False)
    _shrink_race(s.url, posix, lambda: True, lambda: "")


@needs_tc
@needs_dev_shm
def test_shrinking_object_subprocess_server_survives(serve_process, posix):
    """``trtserve serve``: before the fix the process died with -SIGBUS, which fails the ``alive`` check."""
    outcomes = _shrink_race(serve_process.url, posix, serve_process.alive, serve_process.describe_death)
    assert serve_process.alive(), serve_process.describe_death()
    print("outcomes:", outcomes)


# ---- item 1 at the registry: short reads, refused writes, caller's buffer ------------------------------------------

@needs_dev_shm
def test_read_of_a_shrunk_object_is_invalid_argument_and_write_never_grows_it(posix):
    obj = posix(8192)
    obj.write(np.arange(2048, dtype=np.float32).tobytes())
    reg = SharedMemoryRegistry()
    reg.register_system("r", obj.key, 0, 8192)
    with reg.request() as req:
        got = req.read_input("INPUT0", FP32, (2, 4), ShmRef("r", 4096, 32))
        np.testing.assert_array_equal(got.reshape(-1), np.arange(1024, 1032, dtype=np.float32))
        req.add_output("OUTPUT0", ShmRef("r", 6144, 64))
        os.ftruncate(obj.fd, 4100)  # the owner shrinks it below both windows
        with pytest.raises(InvalidArgument, match=r"input 'INPUT1'.*region 'r' was shrunk after registration"):
            req.read_input("INPUT1", FP32, (2, 4), ShmRef("r", 4096, 32))  # partly past the end: a short read
        with pytest.raises(InvalidArgument, match=r"input 'INPUT1'.*was shrunk"):
            req.read_input("INPUT1", FP32, (4,), ShmRef("r", 5000, 16))  # wholly past the end
        with pytest.raises(InvalidArgument, match=r"output 'OUTPUT0'.*was shrunk"):
            req.write_output("OUTPUT0", "FP32", np.ones(16, np.float32))
        assert os.fstat(obj.fd).st_size == 4100  # the server did not grow the client's object
        os.ftruncate(obj.fd, 8192)
        req.write_output("OUTPUT0", "FP32", np.full(16, 7, np.float32))
        assert np.frombuffer(obj.read(64, 6144), np.float32).tolist() == [7.0] * 16
    reg.close()


@needs_dev_shm
def test_read_into_a_callers_buffer(posix):
    obj = posix(4096)
    x = np.arange(16, dtype=np.float32)
    obj.write(x.tobytes(), 64)
    obj.write(b"\x03\x00\x00\x00abc\x01\x00\x00\x00z", 512)  # BYTES: ["abc", "z"]
    reg = SharedMemoryRegistry()
    reg.register_system("r", obj.key, 0, 4096)
    batch = np.zeros((3, 16), np.float32)  # e.g. one row of a batch, or an IPC arena slot
    with reg.request() as req:
        got = req.read_input("INPUT0", FP32, (16,), ShmRef("r", 64, 64), out=batch[1])
        assert np.shares_memory(got, batch) and batch[1].tolist() == x.tolist() and not batch[0].any()
        arena = bytearray(12)
        b = req.read_input("S", dtypes.BY_WIRE["BYTES"], (2,), ShmRef("r", 512, 12), out=arena)
        assert b.tolist() == [b"abc", b"z"] and bytes(arena[:7]) == b"\x03\x00\x00\x00abc"
        with pytest.raises(ValueError, match="exactly|needs 64"):
            req.read_input("INPUT0", FP32, (16,), ShmRef("r", 64, 64), out=bytearray(63))
        with pytest.raises(ValueError, match="read-only"):
            req.read_input("INPUT0", FP32, (16,), ShmRef("r", 64, 64), out=bytes(64))
        odd = bytearray(65)
        got = req.read_input("INPUT0", FP32, (16,), ShmRef("r", 64, 64), out=memoryview(odd)[1:])
        assert got.tolist() == x.tolist() and got.flags.aligned  # an unaligned buffer still gives aligned data
    reg.close()


# ---- item 4: descriptors and the region cap --------------------------------------------------------------------------

@needs_dev_shm
def test_one_descriptor_per_system_region_in_the_registry(posix):
    objs = [posix(4096) for _ in range(50)]
    for o in objs:
        o.close_fd()
    reg = SharedMemoryRegistry()
    before = len(os.listdir("/proc/self/fd"))
    for i, o in enumerate(objs):
        reg.register_system(f"r{i}", o.key, 0, 4096)
    grown = len(os.listdir("/proc/self/fd")) - before
    assert 48 <= grown <= 55, grown  # was 100: the fd and the mmap's own dup
    reg.close()
    assert len(os.listdir("/proc/self/fd")) - before <= 2


@needs_tc
@needs_dev_shm
def test_server_holds_one_descriptor_per_region(serve_process, posix):
    n = 200
    objs = [posix(4096) for _ in range(n)]
    for o in objs:
        o.close_fd()  # the test itself holds none of them open
    c = grpcclient.InferenceServerClient(serve_process.url)
    try:
        c.unregister_system_shared_memory()
        before = _process_tree_fds(serve_process.pid)
        for i, o in enumerate(objs):
            c.register_system_shared_memory(f"fd{i}", o.key, 4096)
        grown = _process_tree_fds(serve_process.pid) - before
        assert n - 10 <= grown <= n + 30, f"{grown} descriptors for {n} regions (two per region would be {2 * n})"
        c.unregister_system_shared_memory()
        assert _process_tree_fds(serve_process.pid) - before <= 10
    finally:
        c.close()
    assert serve_process.alive(), serve_process.describe_death()


@needs_dev_shm
def test_max_regions_in_the_registry(posix):
    from tests.test_system_shm import FakeCuda

    obj = posix(4096)
    cuda = FakeCuda()
    reg = SharedMemoryRegistry(cuda=cuda, max_regions=8)
    for i in range(7):
        reg.register_system(f"s{i}", obj.key, 0, 4096)
    reg.register_cuda("c0", cuda.allocate(64), 0, 64)  # both kinds count
    with pytest.raises(ResourceExhausted, match=r"8 shared memory regions.*--max-shm-regions \(now 8\)") as e:
        reg.register_system("s8", obj.key, 0, 4096)
    assert e.value.code == "RESOURCE_EXHAUSTED" and e.value.reason == "rejected"
    with pytest.raises(ResourceExhausted):
        reg.register_cuda("c1", cuda.allocate(64), 0, 64)
    assert cuda.open_count == 1  # nothing was opened for the refused one
    reg.unregister("system", "s3")
    reg.register_system("s8", obj.key, 0, 4096)
    assert len(reg) == 8
    with pytest.raises(ValueError):
        SharedMemoryRegistry(max_regions=0)
    reg.close()


def _server_with_max_regions(serve_repo, limit: int):
    """A running in-process server whose registry allows ``limit`` regions: through ServerOptions
    (``max_shm_regions``) when it has the field, else by swapping the registry the service uses."""
    from trtserve.server.app import ServerOptions

    if "max_shm_regions" in {f.name for f in dataclasses.fields(ServerOptions)}:
        return serve_repo(EXAMPLE_REPOSITORY, metrics=False, max_shm_regions=limit), None
    s = serve_repo(EXAMPLE_REPOSITORY, metrics=False)
    service = s.server.service
    real = service.shared_memory
    service.shared_memory = SharedMemoryRegistry(max_regions=limit)
    return s, (service, real)


@needs_tc
@needs_dev_shm
def test_registration_past_the_limit_answers_resource_exhausted(serve_repo, posix):
    s, swapped = _server_with_max_regions(serve_repo, 8)
    obj = posix(4096)
    c = grpcclient.InferenceServerClient(s.url)
    try:
        for i in range(8):
            c.register_system_shared_memory(f"m{i}", obj.key, 4096)
        with pytest.raises(InferenceServerException, match="max-shm-regions") as e:
            c.register_system_shared_memory("m8", obj.key, 4096)
        assert str(e.value.status()) == "StatusCode.RESOURCE_EXHAUSTED"
        assert len(c.get_system_shared_memory_status().regions) == 8
        c.unregister_system_shared_memory("m0")
        c.register_system_shared_memory("m8", obj.key, 4096)
        assert "m8" in c.get_system_shared_memory_status().regions
        c.unregister_system_shared_memory()
        assert c.is_server_live()
    finally:
        c.close()
        if swapped is not None:
            service, real = swapped
            service.shared_memory.close()
            service.shared_memory = real

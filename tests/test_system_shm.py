"""System shared memory end to end with the unmodified tritonclient and its shared_memory helpers,
every error case with its status, the registry's lifetimes, perf_analyzer --shared-memory system,
and the CUDA server path on a fake CUDA (host memory standing in for device memory).
"""
from __future__ import annotations

import base64
import ctypes
import csv
import os
import pathlib
import subprocess
import threading
import time
import uuid
from typing import Callable, Dict, Iterator, List

import numpy as np
import pytest

try:  # the unmodified tritonclient; the tests that do not need it run without it (e.g. on Python 3.9)
    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as tshm
    from tritonclient.utils import InferenceServerException
    _NO_TC = ""
except Exception as e:  # ImportError, or pkg_resources missing under tritonclient
    grpcclient = tshm = None  # type: ignore[assignment]
    InferenceServerException = Exception  # type: ignore[assignment,misc]
    _NO_TC = f"tritonclient unusable here: {type(e).__name__}: {e}"
needs_tc = pytest.mark.skipif(bool(_NO_TC), reason=_NO_TC or "-")

from .models import add_sub, copy_example, identity  # noqa: E402
from trtserve.server.engine.backends.base import (Backend, BatchResult, Gather, TensorSpec,  # noqa: E402
                                                  each_destination)
from trtserve.server.errors import AlreadyExists, InvalidArgument, NotFound  # noqa: E402
from trtserve.server.examples.make_mlp import reference  # noqa: E402
from trtserve.server.engine.shm.cuda import CudaApi  # noqa: E402
from trtserve.server.engine.shm.registry import SharedMemoryRegistry  # noqa: E402
from trtserve.server.engine.shm.request import ShmRef  # noqa: E402
from trtserve import dtypes  # noqa: E402

PA = os.environ.get("PERF_ANALYZER") or "/tmp/perf-analyzer/perf_analyzer"


def _status(e: pytest.ExceptionInfo) -> str:
    return str(e.value.status())


@pytest.fixture(scope="module")
def shm_repo(tmp_path_factory) -> pathlib.Path:
    repo = tmp_path_factory.mktemp("shm_repo")
    copy_example(repo, "mlp")
    add_sub(repo, "add_sub")
    identity(repo, "ident_bytes", "BYTES", dims="[ 3 ]")
    identity(repo, "ident_u8", "UINT8", dims="[ 5 ]")
    return repo


@pytest.fixture
def server(serve_repo, shm_repo):
    return serve_repo(shm_repo, metrics=False)


@pytest.fixture
def client(server) -> Iterator:
    c = grpcclient.InferenceServerClient(server.url)
    yield c
    c.close()


@pytest.fixture
def regions() -> Iterator[Callable[..., object]]:
    """``regions(name, size)`` -> a tritonclient system region on a fresh key; destroyed after the test."""
    made: List[object] = []

    def make(name: str, size: int):
        h = tshm.create_shared_memory_region(name, f"/trtserve_test_{uuid.uuid4().hex[:12]}", size)
        made.append(h)
        return h

    yield make
    for h in made:
        tshm.destroy_shared_memory_region(h)


def _key(handle) -> str:
    return handle._shm_key


def _register(client, handle, size: int, offset: int = 0) -> None:
    client.register_system_shared_memory(handle._triton_shm_name, _key(handle), size, offset)


def _mlp_input(x: np.ndarray, region: str, nbytes: int, offset: int = 0):
    i = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    i.set_shared_memory(region, nbytes, offset)
    return i


# ---- happy paths --------------------------------------------------------------------------------------------------

@needs_tc
def test_metadata_lists_system_shared_memory_only_when_it_works(client):
    ext = client.get_server_metadata().extensions
    assert "system_shared_memory" in ext
    try:
        import cupy  # noqa: F401

        has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        has_gpu = False
    assert ("cuda_shared_memory" in ext) == has_gpu


@needs_tc
def test_input_and_output_in_shared_memory(client, regions):
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    h_in, h_out = regions("in", x.nbytes), regions("out", 4 * 16 * 4)
    tshm.set_shared_memory_region(h_in, [x])
    _register(client, h_in, x.nbytes)
    _register(client, h_out, 4 * 16 * 4)
    out = grpcclient.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory("out", 4 * 16 * 4)
    result = client.infer("mlp", [_mlp_input(x, "in", x.nbytes)], outputs=[out])
    meta = result.get_output("OUTPUT0")
    assert (meta.datatype, list(meta.shape)) == ("FP32", [4, 16])
    # like Triton: one (empty) raw_output_contents entry per output, the data only in the region
    assert list(result.get_response().raw_output_contents) == [b""]
    got = tshm.get_contents_as_numpy(h_out, np.float32, meta.shape)
    np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-5)
    status = client.get_system_shared_memory_status()
    assert {r.name: (r.key, r.offset, r.byte_size) for r in status.regions.values()} == {
        "in": (_key(h_in), 0, x.nbytes), "out": (_key(h_out), 0, 256)}
    client.unregister_system_shared_memory()
    assert not client.get_system_shared_memory_status().regions


@needs_tc
def test_offsets_inside_one_region_and_registered_offset(client, regions):
    x = np.arange(2 * 64, dtype=np.float32).reshape(2, 64) / 100
    h = regions("big", 8192)
    tshm.set_shared_memory_region(h, [x], offset=1000)  # the tensor lies at byte 1000 of the object
    # region registered from byte 512 of the object; the tensor is at offset 488 inside the region
    client.register_system_shared_memory("big", _key(h), 4096, offset=512)
    out = grpcclient.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory("big", 2 * 16 * 4, offset=3000 - 512)
    client.infer("mlp", [_mlp_input(x, "big", x.nbytes, offset=1000 - 512)], outputs=[out])
    got = tshm.get_contents_as_numpy(h, np.float32, [2, 16], offset=3000)
    np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-5)


@needs_tc
def test_output_in_region_input_in_message_and_the_reverse(client, regions):
    x = np.random.default_rng(1).random((3, 64), dtype=np.float32)
    h_out = regions("o", 1024)
    _register(client, h_out, 1024)
    inp = grpcclient.InferInput("INPUT0", [3, 64], "FP32")
    inp.set_data_from_numpy(x)
    out = grpcclient.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory("o", 1024)
    client.infer("mlp", [inp], outputs=[out])
    np.testing.assert_allclose(tshm.get_contents_as_numpy(h_out, np.float32, [3, 16]), reference(x), rtol=1e-5,
                               atol=1e-5)
    h_in = regions("i", x.nbytes)
    tshm.set_shared_memory_region(h_in, [x])
    _register(client, h_in, x.nbytes)
    result = client.infer("mlp", [_mlp_input(x, "i", x.nbytes)])
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), reference(x), rtol=1e-5, atol=1e-5)


@needs_tc
def test_mixed_inputs_raw_entries_belong_to_the_others(client, regions):
    """INPUT0 in shared memory, INPUT1 in raw_input_contents (the only raw entry), outputs split too."""
    a = np.random.default_rng(2).random((2, 16), dtype=np.float32)
    b = np.random.default_rng(3).random((2, 16), dtype=np.float32)
    h = regions("mix", 4096)
    tshm.set_shared_memory_region(h, [a])
    _register(client, h, 4096)
    i0 = grpcclient.InferInput("INPUT0", [2, 16], "FP32")
    i0.set_shared_memory("mix", a.nbytes)
    i1 = grpcclient.InferInput("INPUT1", [2, 16], "FP32")
    i1.set_data_from_numpy(b)
    o0 = grpcclient.InferRequestedOutput("OUTPUT0")
    o0.set_shared_memory("mix", a.nbytes, offset=1024)
    o1 = grpcclient.InferRequestedOutput("OUTPUT1")
    result = client.infer("add_sub", [i0, i1], outputs=[o0, o1])
    raw = result.get_response().raw_output_contents
    assert len(raw) == 2 and raw[0] == b""
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
    np.testing.assert_allclose(tshm.get_contents_as_numpy(h, np.float32, [2, 16], offset=1024), a + b, rtol=1e-6)


@needs_tc
def test_bytes_and_odd_offsets(client, regions):
    strings = np.array([[b"alpha", b"", "ünï".encode()]], dtype=object)
    wire = dtypes.serialize_bytes(strings)
    h = regions("s", 4096)
    tshm.set_shared_memory_region(h, [np.frombuffer(wire, dtype=np.uint8)], offset=3)
    _register(client, h, 4096)
    i = grpcclient.InferInput("INPUT0", [1, 3], "BYTES")
    i.set_shared_memory("s", len(wire), offset=3)
    o = grpcclient.InferRequestedOutput("OUTPUT0")
    o.set_shared_memory("s", 200, offset=1001)
    client.infer("ident_bytes", [i], outputs=[o])
    got = tshm.get_contents_as_numpy(h, np.object_, [1, 3], offset=1001)
    assert got.tolist() == strings.tolist()
    u8 = np.arange(5, dtype=np.uint8).reshape(1, 5)
    tshm.set_shared_memory_region(h, [u8], offset=2001)  # unaligned for nothing: uint8
    i = grpcclient.InferInput("INPUT0", [1, 5], "UINT8")
    i.set_shared_memory("s", 5, offset=2001)
    assert client.infer("ident_u8", [i]).as_numpy("OUTPUT0").tolist() == u8.tolist()


@needs_tc
def test_concurrent_requests_share_an_input_region(client, regions):
    """perf_analyzer's pattern: one input region read by many in-flight requests, outputs apart."""
    x = np.random.default_rng(4).random((1, 64), dtype=np.float32)
    h_in, h_out = regions("cin", x.nbytes), regions("cout", 16 * 64 * 4)
    tshm.set_shared_memory_region(h_in, [x])
    _register(client, h_in, x.nbytes)
    _register(client, h_out, 16 * 64 * 4)
    done: List[object] = []
    for k in range(16):
        o = grpcclient.InferRequestedOutput("OUTPUT0")
        o.set_shared_memory("cout", 64, offset=64 * k)
        client.async_infer("mlp", [_mlp_input(x, "cin", x.nbytes)], lambda result, error: done.append(error),
                           outputs=[o])
    import time

    deadline = time.monotonic() + 30
    while len(done) < 16 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done == [None] * 16
    got = tshm.get_contents_as_numpy(h_out, np.float32, [16, 16])
    np.testing.assert_allclose(got, np.repeat(reference(x), 16, axis=0), rtol=1e-5, atol=1e-5)


@needs_tc
def test_streaming_with_shared_memory(client, regions):
    import queue

    x = np.random.default_rng(9).random((2, 64), dtype=np.float32)
    h_in, h_out = regions("sin", x.nbytes), regions("sout", 4 * 2 * 16 * 4)
    tshm.set_shared_memory_region(h_in, [x])
    _register(client, h_in, x.nbytes)
    _register(client, h_out, 4 * 2 * 16 * 4)
    answers: "queue.Queue" = queue.Queue()
    client.start_stream(lambda result, error: answers.put((result, error)))
    try:
        for k in range(4):
            o = grpcclient.InferRequestedOutput("OUTPUT0")
            o.set_shared_memory("sout", 128, offset=128 * k)
            client.async_stream_infer("mlp", [_mlp_input(x, "sin", x.nbytes)], outputs=[o], request_id=str(k))
        got = [answers.get(timeout=30) for _ in range(4)]
    finally:
        client.stop_stream()
    assert [e for _, e in got] == [None] * 4
    out = tshm.get_contents_as_numpy(h_out, np.float32, [4, 2, 16])
    for k in range(4):
        np.testing.assert_allclose(out[k], reference(x), rtol=1e-5, atol=1e-5)

# ---- errors, each with its status ---------------------------------------------------------------------------------

@needs_tc
def test_registration_errors(client, regions):
    h = regions("r", 1024)
    _register(client, h, 1024)
    with pytest.raises(InferenceServerException, match="already in manager") as e:
        _register(client, h, 512)
    assert _status(e) == "StatusCode.ALREADY_EXISTS"
    with pytest.raises(InferenceServerException, match="does not fit") as e:
        client.register_system_shared_memory("r2", _key(h), 1024, 1)
    assert _status(e) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="byte size must be > 0") as e:
        client.register_system_shared_memory("r3", _key(h), 0)
    assert _status(e) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="no shared memory object") as e:
        client.register_system_shared_memory("r4", "/trtserve_no_such_key_" + uuid.uuid4().hex, 16)
    assert _status(e) == "StatusCode.INVALID_ARGUMENT"
    for bad in ("../etc/passwd", "/a/b", "", "/"):
        with pytest.raises(InferenceServerException, match="not a POSIX shared-memory name") as e:
            client.register_system_shared_memory("r5", bad, 16)
        assert _status(e) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="Unable to find system shared memory region: 'nope'") as e:
        client.get_system_shared_memory_status("nope")
    assert _status(e) == "StatusCode.NOT_FOUND"
    client.unregister_system_shared_memory("nope")  # unknown names are fine, as in Triton
    assert list(client.get_system_shared_memory_status("r").regions) == ["r"]


@needs_tc
def test_unknown_region_and_reuse_after_unregister(client, regions):
    x = np.zeros((1, 64), dtype=np.float32)
    with pytest.raises(InferenceServerException, match="Unable to find shared memory region: 'ghost'") as e:
        client.infer("mlp", [_mlp_input(x, "ghost", x.nbytes)])
    assert _status(e) == "StatusCode.NOT_FOUND"
    h = regions("gone", x.nbytes)
    _register(client, h, x.nbytes)
    client.infer("mlp", [_mlp_input(x, "gone", x.nbytes)])
    client.unregister_system_shared_memory("gone")
    with pytest.raises(InferenceServerException, match="'gone' was unregistered") as e:
        client.infer("mlp", [_mlp_input(x, "gone", x.nbytes)])
    assert _status(e) == "StatusCode.NOT_FOUND"
    _register(client, h, x.nbytes)  # the name is free again
    client.infer("mlp", [_mlp_input(x, "gone", x.nbytes)])


@needs_tc
def test_bad_offsets_and_sizes(client, regions):
    x = np.zeros((2, 64), dtype=np.float32)
    h = regions("b", 1024)
    _register(client, h, 1024)
    cases = [
        (_mlp_input(x, "b", x.nbytes - 4), "does not match shape \\[2, 64\\]"),
        (_mlp_input(x, "b", x.nbytes, offset=513), "past the end of system shared memory region 'b'"),
        (_mlp_input(np.zeros((3, 64), np.float32), "b", 768, offset=512), "past the end"),
    ]
    for inp, message in cases:
        with pytest.raises(InferenceServerException, match=message) as e:
            client.infer("mlp", [inp])
        assert _status(e) == "StatusCode.INVALID_ARGUMENT"
    out = grpcclient.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory("b", 2 * 16 * 4 - 1, offset=512)
    tshm.set_shared_memory_region(h, [x])
    with pytest.raises(InferenceServerException, match="too small for shape \\[2, 16\\]") as e:
        client.infer("mlp", [_mlp_input(x, "b", x.nbytes)], outputs=[out])
    assert _status(e) == "StatusCode.INVALID_ARGUMENT"
    out.set_shared_memory("b", 2 * 16 * 4, offset=1000)
    with pytest.raises(InferenceServerException, match="past the end") as e:
        client.infer("mlp", [_mlp_input(x, "b", x.nbytes)], outputs=[out])
    assert _status(e) == "StatusCode.INVALID_ARGUMENT"


@needs_tc
def test_malformed_parameters(client, regions):
    h = regions("p", 1024)
    _register(client, h, 1024)
    x = np.zeros((1, 64), dtype=np.float32)
    inp = grpcclient.InferInput("INPUT0", [1, 64], "FP32")
    inp._input.parameters["shared_memory_region"].string_param = "p"  # no byte size
    with pytest.raises(InferenceServerException, match="'shared_memory_byte_size' is required") as e:
        client.infer("mlp", [inp])
    assert _status(e) == "StatusCode.INVALID_ARGUMENT"
    inp = _mlp_input(x, "p", x.nbytes)
    inp._input.parameters["shared_memory_offset"].string_param = "0"
    with pytest.raises(InferenceServerException, match="must be an integer") as e:
        client.infer("mlp", [inp])
    assert _status(e) == "StatusCode.INVALID_ARGUMENT"


@needs_tc
def test_overlapping_output_regions_are_refused(client, regions):
    a = np.ones((1, 16), dtype=np.float32)
    h = regions("ov", 4096)
    tshm.set_shared_memory_region(h, [a, a])
    _register(client, h, 4096)
    # a second name for the same bytes of the same object: the overlap is found through the key
    client.register_system_shared_memory("ov_alias", _key(h), 2048, offset=2048)
    inputs = []
    for k, name in enumerate(("INPUT0", "INPUT1")):
        i = grpcclient.InferInput(name, [1, 16], "FP32")
        i.set_shared_memory("ov", 64, offset=64 * k)
        inputs.append(i)
    o0, o1 = grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")
    o0.set_shared_memory("ov", 64, offset=2100)
    o1.set_shared_memory("ov_alias", 64, offset=60)  # object bytes 2108..2172 vs 2100..2164
    with pytest.raises(InferenceServerException, match="outputs 'OUTPUT0' and 'OUTPUT1' overlap") as e:
        client.infer("add_sub", inputs, outputs=[o0, o1])
    assert _status(e) == "StatusCode.INVALID_ARGUMENT"
    o1.set_shared_memory("ov_alias", 64, offset=116)  # 2164..2228: adjacent, fine
    client.infer("add_sub", inputs, outputs=[o0, o1])
    got = tshm.get_contents_as_numpy(h, np.float32, [2, 16], offset=2100)
    np.testing.assert_array_equal(got, np.stack([a[0] + a[0], a[0] - a[0]]))


@needs_tc
def test_shrunk_object_is_refused_not_a_crash(client):
    key = f"/trtserve_test_{uuid.uuid4().hex[:12]}"
    path = pathlib.Path("/dev/shm") / key.lstrip("/")
    if not path.parent.is_dir():
        pytest.skip("no /dev/shm")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, 8192)
        client.register_system_shared_memory("shrink", key, 8192)
        os.ftruncate(fd, 100)  # the owner shrinks it: touching the lost pages would raise SIGBUS
        x = np.zeros((1, 64), dtype=np.float32)
        with pytest.raises(InferenceServerException, match="was shrunk after registration") as e:
            client.infer("mlp", [_mlp_input(x, "shrink", x.nbytes, offset=4096)])
        assert _status(e) == "StatusCode.INVALID_ARGUMENT"
        assert client.is_server_live()
    finally:
        os.close(fd)
        path.unlink()


@needs_tc
def test_cuda_regions_without_a_gpu(client):
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("this machine has a GPU: see tests/gpu/test_cuda_shm.py")
    except Exception:
        pass
    client.unregister_cuda_shared_memory()  # perf_analyzer does this first, GPU or not
    assert not client.get_cuda_shared_memory_status().regions
    with pytest.raises(InferenceServerException, match="no usable GPU") as e:
        client.register_cuda_shared_memory("c", base64.b64encode(b"\0" * 64), 0, 1024)
    assert _status(e) == "StatusCode.INVALID_ARGUMENT"


@needs_tc
def test_server_stop_unmaps_every_region(serve_repo, shm_repo, regions):
    s = serve_repo(shm_repo, metrics=False)
    c = grpcclient.InferenceServerClient(s.url)
    h = regions("z", 4096)
    _register(c, h, 4096)
    c.close()
    registry = s.server.shared_memory
    region = registry.status("system", "z")[0]
    s.stop()
    assert region.closed and region._fd == -1
    assert registry.status("system") == []
    with pytest.raises(Exception, match="shutting down"):
        registry.register_system("again", _key(h), 0, 16)
    s.stop = lambda: None  # already stopped; the fixture's teardown must not stop it twice


# ---- a fake CUDA, so the CUDA code paths run on any machine ---------------------------------------------------

class FakeCuda(CudaApi):
    """Host buffers stand in for device allocations; a "handle" is 64 bytes naming one buffer."""

    def __init__(self, devices: int = 1) -> None:
        self.devices = devices
        self.buffers: Dict[bytes, ctypes.Array] = {}
        self.open_count = 0

    def allocate(self, nbytes: int) -> bytes:
        handle = uuid.uuid4().bytes * 4
        self.buffers[handle] = (ctypes.c_ubyte * nbytes)()
        return handle

    def array(self, handle: bytes) -> np.ndarray:
        return np.ctypeslib.as_array(self.buffers[handle])

    def device_count(self) -> int:
        return self.devices

    def open_handle(self, raw_handle: bytes, device_id: int) -> int:
        if raw_handle not in self.buffers:
            raise RuntimeError("cudaErrorInvalidValue: invalid argument")
        self.open_count += 1
        return ctypes.addressof(self.buffers[raw_handle])

    def close_handle(self, ptr: int, device_id: int) -> None:
        self.open_count -= 1

    def allocation_size(self, ptr: int, device_id: int):
        for buf in self.buffers.values():
            if ctypes.addressof(buf) == ptr:
                return ctypes.sizeof(buf)
        return None

    def copy(self, dst: int, src: int, nbytes: int, device_id: int) -> None:
        ctypes.memmove(dst, src, nbytes)


def _use_fake_cuda(registry: SharedMemoryRegistry, fake: "FakeCuda") -> Callable[[], None]:
    """Points a running server's registry at ``fake`` (wherever the server keeps the registry); the returned
    function unregisters the CUDA regions and puts the real CUDA back."""
    saved = (registry._cuda_api, registry._cuda_devices)
    registry._cuda_api, registry._cuda_devices = fake, None

    def restore() -> None:
        registry.unregister("CUDA")
        registry._cuda_api, registry._cuda_devices = saved

    return restore


# ---- the registry's lifetimes -------------------------------------------------------------------------------------

@pytest.fixture
def posix_object() -> Iterator[str]:
    from trtserve.client import shm as cshm

    key = f"/trtserve_test_{uuid.uuid4().hex[:12]}"
    with cshm.create_shared_memory_region("unused", key, 4096):
        yield key


def test_unregister_while_in_flight_defers_the_close(posix_object):
    reg = SharedMemoryRegistry(cuda=None)
    reg.register_system("r", posix_object, 0, 4096)
    fd = os.open("/dev/shm/" + posix_object.lstrip("/"), os.O_RDWR)
    try:
        os.pwrite(fd, np.ones(4, np.float32).tobytes(), 0)
        shm = reg.request()
        arr = shm.read_input("INPUT0", dtypes.BY_WIRE["FP32"], (4,), ShmRef("r", 0, 16))
        os.pwrite(fd, np.zeros(4, np.float32).tobytes(), 0)
    finally:
        os.close(fd)
    assert arr.flags.aligned and arr.tolist() == [1.0] * 4  # a copy, not a view of the client's object
    reg.unregister("system", "r")
    with pytest.raises(NotFound, match="was unregistered"):
        reg.request().read_input("INPUT0", dtypes.BY_WIRE["FP32"], (4,), ShmRef("r", 0, 16))
    region = shm._held[0]
    assert not region.closed  # still open for the request in flight: it can read more and write outputs
    assert region.read(16, 16, "input 'INPUT1'").tolist() == [0] * 16  # e.g. to write an output
    shm.release()
    assert region.closed  # closed by the last lease
    assert arr.tolist() == [1.0] * 4  # the server's copy outlives the region


def test_registry_rejects_duplicates_across_kinds_and_checks_devices(posix_object):
    cuda = FakeCuda(devices=2)
    reg = SharedMemoryRegistry(cuda=cuda)
    reg.register_system("x", posix_object, 0, 64)
    with pytest.raises(AlreadyExists):  # one namespace for both kinds
        reg.register_cuda("x", cuda.allocate(64), 0, 64)
    with pytest.raises(InvalidArgument, match="device 2 does not exist"):
        reg.register_cuda("y", cuda.allocate(64), 2, 64)
    with pytest.raises(InvalidArgument, match="64"):
        reg.register_cuda("y", b"short", 0, 64)
    with pytest.raises(InvalidArgument, match="exceeds the allocation"):
        reg.register_cuda("y", cuda.allocate(64), 1, 65)
    with pytest.raises(InvalidArgument, match="cannot open the IPC handle"):
        reg.register_cuda("y", b"\1" * 64, 0, 64)
    reg.register_cuda("y", cuda.allocate(64), 1, 64)
    with pytest.raises(NotFound, match="registered as system shared memory, not CUDA"):
        reg.status("CUDA", "x")
    reg.unregister("CUDA", "x")  # wrong kind: nothing happens
    assert [r.name for r in reg.status("system")] == ["x"]
    reg.close()
    assert cuda.open_count == 0
    assert reg.extensions() == ("system_shared_memory", "cuda_shared_memory")



def test_cancelled_request_keeps_device_regions_mapped(posix_object):
    """A cancelled RPC may leave the backend copying from a DeviceTensor: its CUDA region must not close."""
    cuda = FakeCuda(devices=1)
    reg = SharedMemoryRegistry(cuda=cuda)
    handle = cuda.allocate(256)
    reg.register_cuda("dev", handle, 0, 256)
    reg.register_system("sys", posix_object, 0, 256)
    shm = reg.request()
    t = shm.read_input("INPUT0", dtypes.BY_WIRE["FP32"], (2, 4), ShmRef("dev", 32, 32), device_tensors=True)
    iface = t.__cuda_array_interface__
    assert (iface["shape"], iface["typestr"], iface["data"], iface["version"]) == ((2, 4), "<f4", (t.ptr, True), 3)
    assert t.ptr == ctypes.addressof(cuda.buffers[handle]) + 32 and t.nbytes == 32 and t.ndim == 2
    shm.read_input("INPUT1", dtypes.BY_WIRE["FP32"], (4,), ShmRef("sys", 0, 16))
    reg.unregister("CUDA")
    reg.unregister("system")
    shm.release(finished=False)
    assert cuda.open_count == 1  # still mapped: the backend may be reading it
    assert reg.status("CUDA") == [] and reg.status("system") == []


# ---- the CUDA path of the server, on a fake CUDA -------------------------------------------------------------------

@needs_tc
def test_cuda_regions_through_the_server_on_a_fake_gpu(server, client):
    fake = FakeCuda(devices=1)
    restore = _use_fake_cuda(server.server.shared_memory, fake)
    try:
        assert "cuda_shared_memory" in client.get_server_metadata().extensions
        x = np.random.default_rng(5).random((2, 64), dtype=np.float32)
        h_in, h_out = fake.allocate(x.nbytes), fake.allocate(2 * 16 * 4)
        fake.array(h_in)[:] = x.reshape(-1).view(np.uint8)
        client.register_cuda_shared_memory("cin", base64.b64encode(h_in), 0, x.nbytes)
        client.register_cuda_shared_memory("cout", base64.b64encode(h_out), 0, 128)
        status = client.get_cuda_shared_memory_status()
        assert {r.name: (r.device_id, r.byte_size) for r in status.regions.values()} == {
            "cin": (0, x.nbytes), "cout": (0, 128)}
        out = grpcclient.InferRequestedOutput("OUTPUT0")
        out.set_shared_memory("cout", 128)
        result = client.infer("mlp", [_mlp_input(x, "cin", x.nbytes)], outputs=[out])
        assert list(result.get_response().raw_output_contents) == [b""]
        got = fake.array(h_out).view(np.float32).reshape(2, 16)
        np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-5)
        with pytest.raises(InferenceServerException, match="already in manager") as e:
            client.register_cuda_shared_memory("cin", base64.b64encode(h_in), 0, x.nbytes)
        assert _status(e) == "StatusCode.ALREADY_EXISTS"
        with pytest.raises(InferenceServerException, match="device 3 does not exist") as e:
            client.register_cuda_shared_memory("c3", base64.b64encode(fake.allocate(8)), 3, 8)
        assert _status(e) == "StatusCode.INVALID_ARGUMENT"
        client.unregister_cuda_shared_memory("cin")
        assert fake.open_count == 1
        with pytest.raises(InferenceServerException, match="'cin' was unregistered") as e:
            client.infer("mlp", [_mlp_input(x, "cin", x.nbytes)])
        assert _status(e) == "StatusCode.NOT_FOUND"
    finally:
        restore()
    assert fake.open_count == 0


def fake_device_copies(y: np.ndarray, destinations) -> dict:
    """What the TensorRT backend's device copies do, as memmoves: each destination gets its request's rows of
    OUTPUT0 (``y``); returns ``BatchResult.delivered``."""
    delivered = {}
    for d in each_destination(destinations):
        ptr, room = d.outputs["OUTPUT0"]
        rows = np.ascontiguousarray(y[d.row_offset:d.row_offset + d.rows])
        assert rows.nbytes <= room
        ctypes.memmove(ptr, rows.ctypes.data, rows.nbytes)
        delivered[d.request] = frozenset({"OUTPUT0"})  # every destination of an index gets it: no intersection
    return delivered


class DeviceCopyBackend(Backend):
    """What the TensorRT backend does with CUDA shared memory, on the fake CUDA (device pointers are host
    pointers here): takes DeviceTensor and Gather inputs, and writes outputs into requests' device
    destinations itself. OUTPUT0 = 2 * INPUT0; the host result it returns is 2 * INPUT0 + 1000, a marker
    that shows whether the server wrote an output from the host result or left the backend's copy alone."""

    platform = "devcopy"
    accepts_device_tensors = True
    seen: List[List[str]] = []  # per batch: the kind of each input piece
    gate = threading.Event()  # a batch whose input is all -1 waits for it (holds the instance)

    def open(self) -> None:
        pass

    def io(self):
        return ((TensorSpec("INPUT0", "FP32", (-1, 4)),), (TensorSpec("OUTPUT0", "FP32", (-1, 4)),))

    @staticmethod
    def _host(piece) -> np.ndarray:
        if isinstance(piece, np.ndarray):
            return piece
        buf = (ctypes.c_ubyte * piece.nbytes).from_address(piece.ptr)  # "device" memory of the fake
        return np.frombuffer(bytes(buf), np.float32).reshape(piece.shape)

    def run(self, instance, inputs, outputs):
        return self.run_to_device(instance, inputs, outputs, ())

    def run_to_device(self, instance, inputs, outputs, destinations):
        x = inputs["INPUT0"]
        parts = x.parts if isinstance(x, Gather) else (x,)
        DeviceCopyBackend.seen.append([type(p).__name__ for p in parts])
        x = np.concatenate([self._host(p) for p in parts], axis=0)
        if (x == -1).all():
            DeviceCopyBackend.gate.wait(30)
        y = 2 * x
        return BatchResult({"OUTPUT0": y + 1000}, delivered=fake_device_copies(y, destinations))

    def close(self) -> None:
        pass


def test_device_inputs_and_outputs_through_the_batcher_on_a_fake_gpu(tmp_path):
    """Four requests in one batch: CUDA input and CUDA output (x2), CUDA input with the output in the
    response, raw input with the output in the response. The backend gets a Gather of DeviceTensor and
    ndarray pieces, writes the two CUDA outputs itself, and the server leaves those alone."""
    import concurrent.futures

    import grpc

    from tests.test_faults import OptionsServer
    from trtserve.protos import grpc_service_pb2 as pb
    from trtserve.protos import grpc_service_pb2_grpc as pbg
    from trtserve.server.app import ServerOptions

    from .models import fake_backend_model
    fake_backend_model(tmp_path, "dev", "devcopy", 8, preferred=4, delay_us=2000000)
    DeviceCopyBackend.seen = []
    DeviceCopyBackend.gate.clear()
    server = OptionsServer(ServerOptions(model_repository=tmp_path, grpc_port=0, http_port=0, metrics_port=None,
                                         gpu_metrics=False, backend_factories={"devcopy": DeviceCopyBackend}))
    fake = FakeCuda(devices=1)
    restore = _use_fake_cuda(server.server.shared_memory, fake)
    channel = grpc.insecure_channel(server.url)
    try:
        stub = pbg.GRPCInferenceServiceStub(channel)
        xs = [np.arange(4, dtype=np.float32).reshape(1, 4) + 10 * i for i in range(4)]
        h_in, h_out = fake.allocate(4 * 16), fake.allocate(4 * 16)
        fake.array(h_in)[:] = np.concatenate(xs).reshape(-1).view(np.uint8)
        for name, h in (("din", h_in), ("dout", h_out)):
            stub.CudaSharedMemoryRegister(pb.CudaSharedMemoryRegisterRequest(
                name=name, raw_handle=h, device_id=0, byte_size=64), timeout=10)

        def request(i: int) -> pb.ModelInferRequest:
            r = pb.ModelInferRequest(model_name="dev", id=str(i))
            t = r.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
            if i < 3:
                t.parameters["shared_memory_region"].string_param = "din"
                t.parameters["shared_memory_byte_size"].int64_param = 16
                t.parameters["shared_memory_offset"].int64_param = 16 * i
            else:
                r.raw_input_contents.append(xs[i].tobytes())
            if i < 2:
                o = r.outputs.add(name="OUTPUT0")
                o.parameters["shared_memory_region"].string_param = "dout"
                o.parameters["shared_memory_byte_size"].int64_param = 16
                o.parameters["shared_memory_offset"].int64_param = 16 * i
            return r

        blocker = pb.ModelInferRequest(model_name="dev")
        blocker.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
        blocker.raw_input_contents.append(np.full((1, 4), -1, np.float32).tobytes())
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            held = pool.submit(stub.ModelInfer, blocker, timeout=30)  # keeps the one instance busy
            deadline = time.monotonic() + 10
            while not DeviceCopyBackend.seen and time.monotonic() < deadline:
                time.sleep(0.01)
            futures = [pool.submit(stub.ModelInfer, request(i), timeout=30) for i in range(4)]
            time.sleep(0.3)  # the four queue up: one batch of the preferred size
            DeviceCopyBackend.gate.set()
            answers = [f.result() for f in futures]
            held.result()
        assert len(DeviceCopyBackend.seen) == 2 and sorted(DeviceCopyBackend.seen[1]) == [
            "DeviceTensor", "DeviceTensor", "DeviceTensor", "ndarray"]
        out = fake.array(h_out).view(np.float32).reshape(4, 4)
        for i in (0, 1):  # written by the backend, device to device; the server did not overwrite them
            assert list(answers[i].raw_output_contents) == [b""]  # the output lives in the region
            np.testing.assert_array_equal(out[i], 2 * xs[i][0])
        for i in (2, 3):  # in the response, from the host result
            got = np.frombuffer(answers[i].raw_output_contents[0], np.float32)
            np.testing.assert_array_equal(got, 2 * xs[i][0] + 1000)
        stub.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest(), timeout=10)
    finally:
        channel.close()
        restore()
        server.server.shared_memory.close()
        server.stop()
    assert fake.open_count == 0


# ---- perf_analyzer ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not pathlib.Path(PA).is_file(), reason=f"perf_analyzer not found ({PA})")
def test_perf_analyzer_system_shared_memory(server, tmp_path):
    out = tmp_path / "pa.csv"
    cmd = [PA, "-m", "mlp", "-i", "grpc", "-u", server.url, "--shared-memory", "system",
           "--output-shared-memory-size", "4096", "--concurrency-range", "1:4:3", "-b", "2",
           "--measurement-interval", "1000", "--stability-percentage", "100", "-f", str(out)]
    # close_fds=False lets Python spawn without fork(): a fork() of this process, whose gRPC threads are
    # busy, runs grpcio's fork handlers in the child and sometimes aborts it (epoll_wait: Bad file descriptor)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, close_fds=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert sorted(int(r["Concurrency"]) for r in rows) == [1, 4]
    assert all(float(r["Inferences/Second"]) > 0 for r in rows)
    # perf_analyzer unregisters its regions at the end; nothing is left mapped in the server
    assert server.server.shared_memory.status("system") == []


# ---- trtserve's own client helpers (client/shm.py) ----------------------------------------------------------------

def test_client_helpers_end_to_end(server, shm_repo):
    import asyncio

    from trtserve.client import AsyncInferenceClient, InferenceClient
    from trtserve.client import shm as cshm

    x = np.random.default_rng(6).random((3, 64), dtype=np.float32)
    b = np.random.default_rng(7).random((3, 16), dtype=np.float32)
    key = f"/trtserve_test_{uuid.uuid4().hex[:12]}"
    with InferenceClient(server.url) as client, cshm.create_shared_memory_region("data", key, 8192) as region:
        cshm.set_shared_memory_region(region, [x])
        assert cshm.get_contents_as_numpy(region, "FP32", [3, 64]).tolist() == x.tolist()
        cshm.register(client, region)
        assert dict((n, r.byte_size) for n, r in cshm.status(client).regions.items()) == {"data": 8192}
        request = cshm.build_request("mlp", [cshm.shm_input("INPUT0", "FP32", x.shape, region)],
                                     [cshm.shm_output("OUTPUT0", region, offset=4096)])
        out = cshm.outputs(client.model_infer(request), {"OUTPUT0": (region, 4096)})
        np.testing.assert_allclose(out["OUTPUT0"], reference(x), rtol=1e-5, atol=1e-5)
        # mixed: INPUT0 from the region, INPUT1 as an ordinary array; one output each way
        cshm.set_shared_memory_region(region, [b[:, :16]])
        request = cshm.build_request("add_sub", [cshm.shm_input("INPUT0", "FP32", (3, 16), region)],
                                     ["OUTPUT1", cshm.shm_output("OUTPUT0", region, 192, offset=1024)],
                                     arrays={"INPUT1": b})
        out = cshm.outputs(client.model_infer(request), {"OUTPUT0": (region, 1024)})
        np.testing.assert_array_equal(out["OUTPUT0"], b + b)
        np.testing.assert_array_equal(out["OUTPUT1"], b - b)
        if tshm is not None:  # the same object, seen through tritonclient's helper: interoperable
            h = tshm.create_shared_memory_region("peek", key, 8192)
            try:
                np.testing.assert_array_equal(tshm.get_contents_as_numpy(h, np.float32, [3, 16], offset=1024), b + b)
            finally:
                tshm.destroy_shared_memory_region(h)
        cshm.unregister(client, region)
        assert not cshm.status(client).regions

        async def aio() -> None:
            async with AsyncInferenceClient(server.url) as ac:
                await cshm.register(ac, region, offset=4096, byte_size=4096)
                st = await cshm.status(ac, "system", "data")
                assert (st.regions["data"].offset, st.regions["data"].byte_size) == (4096, 4096)
                await cshm.unregister(ac, "", "system")

        asyncio.run(aio())
    assert not pathlib.Path("/dev/shm", key.lstrip("/")).exists()  # the creator unlinked it


def test_client_helpers_bytes_and_bounds():
    from trtserve.client import shm as cshm

    key = f"/trtserve_test_{uuid.uuid4().hex[:12]}"
    with cshm.create_shared_memory_region("s", key, 64) as region:
        strings = np.array([b"ab", b"", "ü".encode()], dtype=object)
        cshm.set_shared_memory_region(region, [strings], offset=5)
        assert cshm.get_contents_as_numpy(region, np.object_, [3], offset=5).tolist() == strings.tolist()
        with pytest.raises(ValueError, match="do not fit"):
            cshm.set_shared_memory_region(region, [np.zeros(16, np.float32)], offset=1)
        with pytest.raises(FileExistsError):
            cshm.create_shared_memory_region("t", key, 64, create_only=True)
        with pytest.raises(ValueError, match="give byte_size for BYTES"):
            cshm.shm_input("x", "BYTES", [3], region)


def test_registered_request_for_load_generators(server):
    import asyncio

    from trtserve.client import AsyncInferenceClient
    from trtserve.client import shm as cshm
    from trtserve.protos import grpc_service_pb2 as pb

    x = np.random.default_rng(8).random((2, 64), dtype=np.float32)

    async def go() -> None:
        async with AsyncInferenceClient(server.url) as ac:
            async with cshm.registered_request(ac, "mlp", {"INPUT0": x}, {"OUTPUT0": 2 * 16 * 4}) as request:
                assert len(request.raw_input_contents) == 0
                assert len((await cshm.status(ac)).regions) == 2
                payload = request.SerializeToString()  # what a load generator sends again and again
                for _ in range(3):
                    response = await ac.model_infer(pb.ModelInferRequest.FromString(payload))
                    assert list(response.raw_output_contents) == [b""]
            assert not (await cshm.status(ac)).regions

    asyncio.run(go())

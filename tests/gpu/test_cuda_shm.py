"""CUDA shared memory on a real GPU: a client *process* allocates with CuPy, registers the IPC handle,
the server reads the input from / writes the output into that device memory, and the output read back
from the client's region equals the reference; on ONNX Runtime (the staged path: one copy each way)
and on TensorRT. Plus the server-side pieces in process (DeviceTensor, device-sourced outputs), the
error cases, handle cleanup, and perf_analyzer --shared-memory cuda.

IPC handles cannot be opened by the process that made them, so every region comes from a child
process: ``CudaPeer`` (allocates and serves reads/writes over a pipe) or ``CLIENT_FLOW`` (a whole
client, using trtserve.client.shm). Skipped without CuPy and a GPU; the TensorRT test also needs
TensorRT. Clients are the generated stubs (tritonclient's CUDA helpers need cuda-python).
"""
from __future__ import annotations

import base64
import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
from typing import Iterator

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="CUDA shared memory needs CuPy")
try:
    _DEVICES = cupy.cuda.runtime.getDeviceCount()
except Exception as e:  # no driver
    pytest.skip(f"no usable GPU: {e}", allow_module_level=True)
if _DEVICES == 0:
    pytest.skip("no GPU", allow_module_level=True)
grpc = pytest.importorskip("grpc")

from trtserve.protos import grpc_service_pb2 as pb  # noqa: E402
from trtserve.protos import grpc_service_pb2_grpc as pbg  # noqa: E402
from trtserve.server.examples import REPOSITORY as EXAMPLE_REPOSITORY  # noqa: E402
from trtserve.server.examples.make_mlp import reference  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
PA = os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer") or "/tmp/perf-analyzer/perf_analyzer"

PEER = textwrap.dedent("""
    import base64, sys
    import cupy
    n = int(sys.argv[1])
    mem = cupy.cuda.Memory(n)  # its own cudaMalloc: the handle covers exactly these bytes
    cupy.cuda.runtime.memset(mem.ptr, 0, n)
    print(base64.b64encode(bytes(cupy.cuda.runtime.ipcGetMemHandle(mem.ptr))).decode(), flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "w":
            data = base64.b64decode(args[1])
            host = bytearray(data)
            import numpy as np
            a = np.frombuffer(host, dtype=np.uint8)
            cupy.cuda.runtime.memcpy(mem.ptr + int(args[0]), a.ctypes.data, len(data), 1)
            print("ok", flush=True)
        elif cmd == "r":
            import numpy as np
            out = np.empty(int(args[1]), dtype=np.uint8)
            cupy.cuda.runtime.memcpy(out.ctypes.data, mem.ptr + int(args[0]), out.nbytes, 2)
            print(base64.b64encode(out.tobytes()).decode(), flush=True)
        else:
            break
""")

CLIENT_FLOW = textwrap.dedent("""
    import json, sys
    import numpy as np
    from trtserve.client import InferenceClient, shm
    url, model, rows, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    x = np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)
    with InferenceClient(url) as client:
        r_in = shm.create_cuda_shared_memory_region("flow_in", x.nbytes, 0)
        r_out = shm.create_cuda_shared_memory_region("flow_out", rows * 16 * 4, 0)
        shm.set_shared_memory_region(r_in, [x])
        shm.register(client, r_in)
        shm.register(client, r_out)
        request = shm.build_request(model, [shm.shm_input("INPUT0", "FP32", x.shape, r_in)],
                                    [shm.shm_output("OUTPUT0", r_out)])
        response = client.model_infer(request, timeout=120)
        y = shm.outputs(response, {"OUTPUT0": r_out})["OUTPUT0"]
        status = shm.status(client, "cuda")
        names = sorted(status.regions)
        shm.unregister(client, r_in)
        shm.unregister(client, r_out)
        print(json.dumps({"x": x.tolist(), "y": y.tolist(), "raw": [len(b) for b in response.raw_output_contents],
                          "regions": names}))
""")


# 16 concurrent requests: even ones read their input from one shared CUDA region (each at its own offset),
# odd ones send raw host bytes, so the batcher forms batches that mix device pieces and host pieces (Gather)
CLIENT_MIX = textwrap.dedent("""
    import json, sys, threading
    import numpy as np
    from trtserve.client import InferenceClient, shm
    url, model, n = sys.argv[1], sys.argv[2], 16
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((1 + i % 5, 64)).astype(np.float32) for i in range(n)]
    ys = [None] * n
    with InferenceClient(url) as client:
        r_in = shm.create_cuda_shared_memory_region("mix_in", 5 * 64 * 4 * n, 0)
        r_out = shm.create_cuda_shared_memory_region("mix_out", 5 * 16 * 4 * n, 0)
        shm.register(client, r_in)
        shm.register(client, r_out)
        for i in range(0, n, 2):
            shm.set_shared_memory_region(r_in, [xs[i]], offset=i * 5 * 64 * 4)
        barrier = threading.Barrier(n)

        def one(i):
            barrier.wait()
            if i % 2:
                ys[i] = client.infer(model, {"INPUT0": xs[i]})["OUTPUT0"]
                return
            out_off = i * 5 * 16 * 4
            req = shm.build_request(model, [shm.shm_input("INPUT0", "FP32", xs[i].shape, r_in, offset=i * 5 * 64 * 4)],
                                    [shm.shm_output("OUTPUT0", r_out, byte_size=xs[i].shape[0] * 64, offset=out_off)])
            client.model_infer(req, timeout=120)
            ys[i] = shm.get_contents_as_numpy(r_out, "FP32", [xs[i].shape[0], 16], offset=out_off)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = client.model_statistics(model)
        shm.unregister(client, r_in)
        shm.unregister(client, r_out)
        print(json.dumps({"x": [x.tolist() for x in xs], "y": [y.tolist() for y in ys], "stats": str(stats)}))
""")

CLIENT_GROUPS = textwrap.dedent("""
    import json, sys, threading
    import numpy as np
    from trtserve.client import InferenceClient, shm
    url, model, n, rounds = sys.argv[1], sys.argv[2], 16, 20
    rng = np.random.default_rng(12)
    xs = [[rng.standard_normal((4, 64)).astype(np.float32) for _ in range(rounds)] for _ in range(n)]
    ys = [[None] * rounds for _ in range(n)]
    with InferenceClient(url) as client:
        regions = []
        for i in range(n):  # each client its own allocations, as perf_analyzer's
            r_in = shm.create_cuda_shared_memory_region(f"g_in{i}", 4 * 64 * 4, 0)
            r_out = shm.create_cuda_shared_memory_region(f"g_out{i}", 4 * 16 * 4, 0)
            shm.register(client, r_in)
            shm.register(client, r_out)
            regions.append((r_in, r_out))
        barrier = threading.Barrier(n)

        def one(i):
            r_in, r_out = regions[i]
            for k in range(rounds):
                shm.set_shared_memory_region(r_in, [xs[i][k]])
                barrier.wait()
                req = shm.build_request(model, [shm.shm_input("INPUT0", "FP32", (4, 64), r_in)],
                                        [shm.shm_output("OUTPUT0", r_out, byte_size=4 * 16 * 4)])
                client.model_infer(req)
                ys[i][k] = shm.get_contents_as_numpy(r_out, "FP32", [4, 16])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = client.model_statistics(model).model_stats[0]
        for r_in, r_out in regions:
            shm.unregister(client, r_in)
            shm.unregister(client, r_out)
        print(json.dumps({"x": [[x.tolist() for x in row] for row in xs], "y": [[y.tolist() for y in row] for row in ys],
                          "requests": stats.inference_stats.success.count, "batches": stats.execution_count}))
""")


def _mlp_trt(repo: pathlib.Path, batching: str) -> None:
    """The example MLP as a TensorRT model "mlp_trt" (built from ONNX at load), one instance."""
    from .gpu_models import make_mlp

    make_mlp(repo / "mlp_trt" / "1" / "model.onnx", 64, 256, 16)
    (repo / "mlp_trt" / "config.pbtxt").write_text("""
name: "mlp_trt"
platform: "tensorrt_plan"
max_batch_size: 64
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 64 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 16 ] } ]
instance_group [ { count: 1, kind: KIND_GPU } ]
dynamic_batching { %s }
""" % batching)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class CudaPeer:
    """A child process owning ``byte_size`` bytes of device memory; ``handle`` is its raw IPC handle."""

    def __init__(self, byte_size: int) -> None:
        self.byte_size = byte_size
        self._p = subprocess.Popen([sys.executable, "-c", PEER, str(byte_size)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, env=_env())
        self.handle = base64.b64decode(self._p.stdout.readline().strip())
        assert len(self.handle) == 64

    def write(self, offset: int, data: bytes) -> None:
        self._p.stdin.write(f"w {offset} {base64.b64encode(data).decode()}\n")
        self._p.stdin.flush()
        assert self._p.stdout.readline().strip() == "ok"

    def read(self, offset: int, nbytes: int) -> bytes:
        self._p.stdin.write(f"r {offset} {nbytes}\n")
        self._p.stdin.flush()
        return base64.b64decode(self._p.stdout.readline().strip())

    def close(self) -> None:
        try:
            self._p.stdin.write("q\n")
            self._p.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        self._p.wait(30)


@pytest.fixture
def peers() -> Iterator:
    made = []

    def make(byte_size: int) -> CudaPeer:
        made.append(CudaPeer(byte_size))
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.fixture(scope="module")
def server() -> Iterator:
    from tests.conftest import RunningServer

    s = RunningServer(EXAMPLE_REPOSITORY, metrics=False)
    yield s
    s.stop()


@pytest.fixture
def stub(server) -> Iterator:
    channel = grpc.insecure_channel(server.url)
    stub_ = pbg.GRPCInferenceServiceStub(channel)
    yield stub_
    stub_.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest(), timeout=10)  # before the peers exit
    channel.close()


def _shm(params, region: str, byte_size: int, offset: int = 0) -> None:
    params["shared_memory_region"].string_param = region
    params["shared_memory_byte_size"].int64_param = byte_size
    if offset:
        params["shared_memory_offset"].int64_param = offset


def _register(stub, name: str, peer: CudaPeer, device_id: int = 0, byte_size: int = 0) -> None:
    stub.CudaSharedMemoryRegister(pb.CudaSharedMemoryRegisterRequest(
        name=name, raw_handle=peer.handle, device_id=device_id, byte_size=byte_size or peer.byte_size), timeout=30)


def test_metadata_lists_cuda_shared_memory(stub) -> None:
    ext = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).extensions
    assert "cuda_shared_memory" in ext and "system_shared_memory" in ext


def test_client_process_end_to_end_on_onnxruntime(server) -> None:
    proc = subprocess.run([sys.executable, "-c", CLIENT_FLOW, server.url, "mlp", "5", "1"], capture_output=True,
                          text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["raw"] == [0] and out["regions"] == ["flow_in", "flow_out"]
    np.testing.assert_allclose(np.array(out["y"], np.float32), reference(np.array(out["x"], np.float32)),
                               rtol=1e-5, atol=1e-5)


def test_offsets_errors_and_unregister(peers, stub, server) -> None:
    # fixture order: stub is torn down first, so the regions are unregistered before the peers exit
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    peer = peers(8192)
    peer.write(1024, x.tobytes())
    _register(stub, "dev", peer)
    status = stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(name="dev"), timeout=10)
    assert (status.regions["dev"].device_id, status.regions["dev"].byte_size) == (0, 8192)

    def request(in_offset: int = 1024, out_offset: int = 4096, out_size: int = 128) -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name="mlp")
        t = req.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 64])
        _shm(t.parameters, "dev", x.nbytes, in_offset)
        o = req.outputs.add(name="OUTPUT0")
        _shm(o.parameters, "dev", out_size, out_offset)
        return req

    resp = stub.ModelInfer(request(), timeout=60)
    assert list(resp.raw_output_contents) == [b""] and list(resp.outputs[0].shape) == [2, 16]
    y = np.frombuffer(peer.read(4096, 128), np.float32).reshape(2, 16)
    np.testing.assert_allclose(y, reference(x), rtol=1e-5, atol=1e-5)
    bad = [(request(in_offset=8192 - 100), grpc.StatusCode.INVALID_ARGUMENT, "past the end"),
           (request(out_size=64), grpc.StatusCode.INVALID_ARGUMENT, "too small"),
           (request(out_offset=1100), grpc.StatusCode.OK, "")]  # output over the input: allowed (read first)
    for req, code, text in bad:
        if code == grpc.StatusCode.OK:
            stub.ModelInfer(req, timeout=60)
            continue
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req, timeout=60)
        assert e.value.code() == code and text in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        _register(stub, "dev", peer)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as e:
        _register(stub, "other", peers(64), device_id=_DEVICES)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not exist" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # more than the allocation behind the handle
        _register(stub, "big", peers(4096), byte_size=1 << 20)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stub.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest(name="dev"), timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request(), timeout=60)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "was unregistered" in e.value.details()


def test_device_tensor_and_device_sourced_outputs(peers, tmp_path) -> None:
    """The pieces a device-to-device backend uses, in process: DeviceTensor is a CuPy view of the
    client's memory; a CuPy result is written into CUDA and system regions without going through NumPy."""
    from trtserve import dtypes
    from trtserve.server.engine.shm.registry import SharedMemoryRegistry
    from trtserve.server.engine.shm.request import ShmRef

    peer = peers(4096)
    x = np.arange(32, dtype=np.float32)
    peer.write(256, x.tobytes())
    reg = SharedMemoryRegistry()
    reg.register_cuda("d", peer.handle, 0, 4096)
    req = reg.request()
    t = req.read_input("INPUT0", dtypes.BY_WIRE["FP32"], (4, 8), ShmRef("d", 256, 128), device_tensors=True)
    view = cupy.asarray(t)
    assert view.shape == (4, 8) and view.data.ptr == t.ptr
    np.testing.assert_array_equal(cupy.asnumpy(view).reshape(-1), x)
    req.add_output("OUTPUT0", ShmRef("d", 1024, 128))
    req.write_output("OUTPUT0", "FP32", view * 2)  # device -> device
    np.testing.assert_array_equal(np.frombuffer(peer.read(1024, 128), np.float32), x * 2)
    req.release()
    key = f"/trtserve_gpu_{os.getpid()}"
    from trtserve.client import shm as cshm

    with cshm.create_shared_memory_region("h", key, 4096) as host:
        reg.register_system("h", key, 0, 4096)
        req = reg.request()
        req.add_output("OUTPUT0", ShmRef("h", 64, 128))
        req.write_output("OUTPUT0", "FP32", cupy.asarray(x) + 1)  # device -> system region
        np.testing.assert_array_equal(cshm.get_contents_as_numpy(host, "FP32", [32], offset=64), x + 1)
        req.release()
        reg.close()


def test_server_stop_closes_ipc_handles(peers) -> None:
    from tests.conftest import RunningServer

    s = RunningServer(EXAMPLE_REPOSITORY, metrics=False)
    channel = grpc.insecure_channel(s.url)
    try:
        _register(pbg.GRPCInferenceServiceStub(channel), "gone", peers(1024))
        region = s.server.shared_memory.status("CUDA", "gone")[0]
        assert region.ptr is not None
    finally:
        channel.close()
        s.stop()
    assert region.ptr is None


def test_client_process_end_to_end_on_tensorrt(tmp_path) -> None:
    from trtserve.server.engine.backends.tensorrt import compat

    ok, why = compat.available()
    if not ok:
        pytest.skip(f"needs TensorRT: {why}")
    from tests.conftest import RunningServer

    from .gpu_models import ort_run, ort_session

    _mlp_trt(tmp_path, "")
    s = RunningServer(tmp_path, metrics=False)
    try:
        proc = subprocess.run([sys.executable, "-c", CLIENT_FLOW, s.url, "mlp_trt", "7", "3"], capture_output=True,
                              text=True, timeout=300, env=_env())
        mix = subprocess.run([sys.executable, "-c", CLIENT_MIX, s.url, "mlp_trt"], capture_output=True,
                             text=True, timeout=300, env=_env())
    finally:
        s.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    session = ort_session(tmp_path / "mlp_trt" / "1" / "model.onnx")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    x = np.array(out["x"], np.float32)
    ref = ort_run(session, {"INPUT0": x})["OUTPUT0"]
    np.testing.assert_allclose(np.array(out["y"], np.float32), ref, rtol=1e-2, atol=1e-2)  # TF32
    assert mix.returncode == 0, mix.stderr[-3000:]
    out = json.loads(mix.stdout.strip().splitlines()[-1])
    worst = 0.0
    for xi, yi in zip(out["x"], out["y"]):
        ref = ort_run(session, {"INPUT0": np.array(xi, np.float32)})["OUTPUT0"]
        np.testing.assert_allclose(np.array(yi, np.float32), ref, rtol=1e-2, atol=1e-2)
        worst = max(worst, float(np.abs(np.array(yi, np.float32) - ref).max()))
    batches = ", ".join(line.split(":")[1].strip() for line in out["stats"].splitlines() if "batch_size:" in line)
    print(f"16 concurrent requests (8 from CUDA shared memory, 8 raw): max |trt - ort| = {worst:.2e}; "
          f"batch sizes formed: {batches}")


def test_many_clients_regions_in_one_batch_on_tensorrt(tmp_path, monkeypatch) -> None:
    """Sixteen clients, each with its own CUDA allocations, send alike requests together: the engine queues them as
    groups (engine/group.py) whose members the device reads and answers where each client's memory lies, one copy
    per member (separate allocations: never one strided copy across them). Every output matches ONNX Runtime's."""
    from trtserve.server.engine.backends.tensorrt import compat

    ok, why = compat.available()
    if not ok:
        pytest.skip(f"needs TensorRT: {why}")
    from tests.conftest import RunningServer
    from trtserve.server.engine.group_path import GroupPath

    from .gpu_models import ort_run, ort_session

    groups = []  # members of each group, as the engine gives their regions back
    release = GroupPath._release_shms
    monkeypatch.setattr(GroupPath, "_release_shms",
                        staticmethod(lambda g: (groups.append(len(g.shms or ())), release(g))))
    _mlp_trt(tmp_path, "max_queue_delay_microseconds: 2000")
    s = RunningServer(tmp_path, metrics=False)
    try:
        proc = subprocess.run([sys.executable, "-c", CLIENT_GROUPS, s.url, "mlp_trt"], capture_output=True,
                              text=True, timeout=300, env=_env())
        leftover = s.server.shared_memory.status("CUDA")
    finally:
        s.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert leftover == []
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    session = ort_session(tmp_path / "mlp_trt" / "1" / "model.onnx")
    for xrow, yrow in zip(out["x"], out["y"]):
        for x, y in zip(xrow, yrow):
            ref = ort_run(session, {"INPUT0": np.array(x, np.float32)})["OUTPUT0"]
            np.testing.assert_allclose(np.array(y, np.float32), ref, rtol=1e-2, atol=1e-2)  # TF32
    assert out["requests"] == 16 * 20
    grouped = sum(groups)
    print(f"16 clients x 20 rounds over their own CUDA regions: {out['requests']} requests in {out['batches']} "
          f"batches, {grouped} of them in {len([n for n in groups if n])} groups; every output as ONNX Runtime's")
    assert grouped > 0  # requests read together were queued as groups


@pytest.mark.skipif(not pathlib.Path(PA).is_file(), reason=f"perf_analyzer not found ({PA})")
def test_perf_analyzer_cuda_shared_memory(server, tmp_path) -> None:
    out = tmp_path / "pa.csv"
    cmd = [PA, "-m", "mlp", "-i", "grpc", "-u", server.url, "--shared-memory", "cuda",
           "--output-shared-memory-size", "4096", "--concurrency-range", "1:4:3", "-b", "2",
           "--measurement-interval", "1000", "--stability-percentage", "100", "-f", str(out)]
    # close_fds=False lets Python spawn without fork(): a fork() of this process, whose gRPC threads are
    # busy, runs grpcio's fork handlers in the child and sometimes aborts it (epoll_wait: Bad file descriptor)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, close_fds=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert sorted(int(r["Concurrency"]) for r in rows) == [1, 4]
    assert all(float(r["Inferences/Second"]) > 0 for r in rows)
    assert server.server.shared_memory.status("CUDA") == []

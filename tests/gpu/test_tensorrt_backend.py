"""The TensorRT backend on a real GPU: ONNX -> engine with two profiles and two instances, concurrent mixed
batches equal to ONNX Runtime, clear errors for bad input while it keeps serving, overlapping instances,
plan-cache reuse, CUDA graphs, dtypes and load-time validation."""
from __future__ import annotations

import concurrent.futures
import pathlib
import shutil
import threading
import time
from typing import Dict, Iterator, List, Tuple

import numpy as np
import pytest

from trtserve.server.engine.backends.tensorrt import compat

_OK, _WHY = compat.available()
if not _OK:
    pytest.skip(f"needs CUDA, CuPy and TensorRT: {_WHY}", allow_module_level=True)
pytest.importorskip("onnx", reason="needs the onnx package to write test models")
pytest.importorskip("onnxruntime", reason="needs onnxruntime for reference outputs")

from trtserve.server.engine.backends.base import BackendConfig, Gather, TensorSpec  # noqa: E402
from trtserve.server.engine.backends.tensorrt import TensorRTBackend  # noqa: E402
from trtserve.server.errors import InvalidArgument, ModelLoadError  # noqa: E402

from .gpu_models import TWO_PROFILES, make_mlp, make_multi_dtype, mlp_config, ort_run, ort_session  # noqa: E402

N_IN, HIDDEN, N_OUT = 64, 256, 16
TF32_TOL = dict(rtol=1e-2, atol=1e-2)  # TF32 matmuls keep ~10 mantissa bits


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("trt")
    make_mlp(d / "mlp" / "1" / "model.onnx", N_IN, HIDDEN, N_OUT)
    return d


@pytest.fixture(scope="module")
def mlp(workdir: pathlib.Path) -> Iterator[TensorRTBackend]:
    """MLP with two profiles (1-8 rows, 9-64 rows) and two instances, built from ONNX at load."""
    cfg = mlp_config(workdir / "mlp" / "1", N_IN, N_OUT, parameters={"trtserve.profiles": TWO_PROFILES},
                     cache_dir=workdir / "cache")
    b = TensorRTBackend(cfg)
    t0 = time.monotonic()
    b.open()
    print(f"\nopen: {time.monotonic() - t0:.1f} s, report {b.report}")
    yield b
    b.close()


@pytest.fixture(scope="module")
def ort(workdir: pathlib.Path):
    return ort_session(workdir / "mlp" / "1" / "model.onnx")


def _x(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, N_IN)).astype(np.float32)


def test_profiles_say_which_instance_serves_what(mlp: TensorRTBackend) -> None:
    p0, p1 = mlp.profiles()
    assert (p0.index, p0.instances, p0.inputs["INPUT0"].min, p0.inputs["INPUT0"].max) == (0, (0,), (1, N_IN), (8, N_IN))
    assert (p1.index, p1.instances, p1.inputs["INPUT0"].min, p1.inputs["INPUT0"].max) == (1, (1,), (9, N_IN), (64, N_IN))
    assert p1.fits({"INPUT0": (40, N_IN)}) and not p0.fits({"INPUT0": (40, N_IN)})
    ins, outs = mlp.io()
    assert [(s.name, s.datatype, tuple(s.dims)) for s in ins] == [("INPUT0", "FP32", (-1, N_IN))]
    assert [(s.name, s.datatype, tuple(s.dims)) for s in outs] == [("OUTPUT0", "FP32", (-1, N_OUT))]


def test_concurrent_mixed_batches_match_onnxruntime(mlp: TensorRTBackend, ort) -> None:
    """Two instance threads (as the executor pool runs them), each fed the batch sizes its profile takes."""
    threads = [concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"inst{i}") for i in range(2)]
    jobs: List[Tuple[int, np.ndarray, concurrent.futures.Future]] = []
    rng = np.random.default_rng(1)
    for k in range(120):
        instance = k % 2
        rows = int(rng.integers(1, 9)) if instance == 0 else int(rng.integers(9, 65))
        x = _x(rows, k)
        jobs.append((instance, x, threads[instance].submit(mlp.run, instance, {"INPUT0": x}, ["OUTPUT0"])))
    worst = 0.0
    for instance, x, fut in jobs:
        res = fut.result(timeout=60)
        y = res.outputs["OUTPUT0"]
        ref = ort_run(ort, {"INPUT0": x})["OUTPUT0"]
        assert y.shape == ref.shape and y.dtype == np.float32
        np.testing.assert_allclose(y, ref, **TF32_TOL)
        worst = max(worst, float(np.abs(y - ref).max()))
        assert res.compute_infer_ns > 0
    for t in threads:
        t.shutdown()
    print(f"\n120 batches (1-64 rows) on 2 instances: max |trt - ort| = {worst:.2e}")


def _pipelined(backend: TensorRTBackend, instance: int, sizes: List[int],
               seed: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Keeps two batches in flight on one instance, as the batcher does: enqueue k+1, then collect k. Batch sizes
    differ, so the context's input shapes change while the previous batch is still running."""
    out: List[Tuple[np.ndarray, np.ndarray]] = []
    pending: List[Tuple[np.ndarray, object]] = []
    for k, rows in enumerate(sizes):
        x = _x(rows, seed + k)
        pending.append((x, backend.enqueue(instance, {"INPUT0": x}, ["OUTPUT0"])))
        if len(pending) == 2:
            x0, ticket = pending.pop(0)
            out.append((x0, backend.collect(instance, ticket).outputs["OUTPUT0"]))
    for x0, ticket in pending:
        out.append((x0, backend.collect(instance, ticket).outputs["OUTPUT0"]))
    return out


def test_two_batches_in_flight_on_one_instance_match_onnxruntime(mlp: TensorRTBackend, ort) -> None:
    rng = np.random.default_rng(5)
    worst = 0.0
    for instance, lo, hi in ((0, 1, 9), (1, 9, 65)):
        sizes = [int(r) for r in rng.integers(lo, hi, 40)]
        for x, y in _pipelined(mlp, instance, sizes, seed=1000 * instance):
            ref = ort_run(ort, {"INPUT0": x})["OUTPUT0"]
            assert y.shape == ref.shape
            np.testing.assert_allclose(y, ref, **TF32_TOL)
            worst = max(worst, float(np.abs(y - ref).max()))
    print(f"\n80 batches, two in flight per instance, shapes changing between enqueues: max |trt - ort| = {worst:.2e}")


@pytest.mark.parametrize(
    "instance, feeds, outputs, match",
    [
        (0, {"INPUT0": _x(20, 0)}, ["OUTPUT0"], r"input 'INPUT0': shape \[20, 64\] is outside profile 0 .*max \[8, 64\]"),
        (1, {"INPUT0": _x(65, 0)}, ["OUTPUT0"], r"shape \[65, 64\] is outside profile 1 .*max \[64, 64\]"),
        (1, {"INPUT0": _x(4, 0)}, ["OUTPUT0"], r"shape \[4, 64\] is outside profile 1 \(min \[9, 64\]"),
        (0, {"INPUT0": np.zeros((2, 63), np.float32)}, ["OUTPUT0"], r"shape \[2, 63\] is outside profile 0"),
        (0, {"INPUT0": _x(2, 0).astype(np.float64)}, ["OUTPUT0"], r"datatype float64 does not match the model's FP32"),
        (0, {"INPUT0": np.zeros((2, 8, 8), np.float32)}, ["OUTPUT0"], r"shape \[2, 8, 8\] is outside profile 0"),
        (0, {"X": _x(2, 0)}, ["OUTPUT0"], r"missing \['INPUT0'\]; unknown \['X'\]"),
        (0, {"INPUT0": _x(2, 0)}, ["NOPE"], r"unknown output\(s\) \['NOPE'\]"),
        (7, {"INPUT0": _x(2, 0)}, ["OUTPUT0"], r"no instance 7"),
    ],
)
def test_bad_requests_get_clear_errors_and_serving_goes_on(
    mlp: TensorRTBackend, ort, instance: int, feeds: Dict[str, np.ndarray], outputs: List[str], match: str
) -> None:
    with pytest.raises(InvalidArgument, match=match):
        mlp.run(instance, feeds, outputs)
    for i, rows in ((0, 8), (1, 64)):
        x = _x(rows, 99)
        np.testing.assert_allclose(mlp.run(i, {"INPUT0": x}, ["OUTPUT0"]).outputs["OUTPUT0"],
                                   ort_run(ort, {"INPUT0": x})["OUTPUT0"], **TF32_TOL)


def test_plan_cache_is_reused_on_second_open(mlp: TensorRTBackend, workdir: pathlib.Path) -> None:
    assert mlp.report is not None and mlp.report.source == "onnx"
    cfg = mlp_config(workdir / "mlp" / "1", N_IN, N_OUT, parameters={"trtserve.profiles": TWO_PROFILES},
                     cache_dir=workdir / "cache")
    again = TensorRTBackend(cfg)
    t0 = time.monotonic()
    again.open()
    took = time.monotonic() - t0
    try:
        assert again.report.cache_hit and again.report.cache_key == mlp.report.cache_key
        assert (workdir / "cache" / f"{mlp.report.cache_key}.plan").is_file()
        x = _x(33, 5)
        np.testing.assert_array_equal(again.run(1, {"INPUT0": x}, []).outputs["OUTPUT0"],
                                      mlp.run(1, {"INPUT0": x}, []).outputs["OUTPUT0"])
    finally:
        again.close()
    print(f"\nfirst open built in {mlp.report.build_s:.1f} s; second open from the plan cache in {took:.2f} s")


def test_prebuilt_plan_and_instances_per_profile(mlp: TensorRTBackend, workdir: pathlib.Path) -> None:
    """model.plan straight from the cache; on 8.6 more instances than engine profiles is refused at load."""
    d = workdir / "plan" / "1"
    d.mkdir(parents=True)
    shutil.copy(workdir / "cache" / f"{mlp.report.cache_key}.plan", d / "model.plan")
    params = {"trtserve.split_batch_profiles": "true"}
    b = TensorRTBackend(mlp_config(d, N_IN, N_OUT, instances=2, parameters=params))
    b.open()
    try:
        assert b.report.source == "plan" and [p.instances for p in b.profiles()] == [(0,), (1,)]
        x = _x(3, 3)
        np.testing.assert_array_equal(b.run(0, {"INPUT0": x}, []).outputs["OUTPUT0"],
                                      mlp.run(0, {"INPUT0": x}, []).outputs["OUTPUT0"])
    finally:
        b.close()
    if not compat.contexts_may_share_profile(compat.trt_version(__import__("tensorrt"))):
        with pytest.raises(ModelLoadError, match="every live execution context needs its own profile"):
            TensorRTBackend(mlp_config(d, N_IN, N_OUT, instances=3, parameters=params)).open()
    with pytest.raises(ModelLoadError, match="profile 0 allows at most 8 rows but max_batch_size is 64"):
        TensorRTBackend(mlp_config(d, N_IN, N_OUT, instances=2)).open()


@pytest.mark.parametrize(
    "inputs, outputs, match",
    [
        ([TensorSpec("INPUT0", "FP16", (N_IN,))], [TensorSpec("OUTPUT0", "FP32", (N_OUT,))],
         r"input 'INPUT0': config datatype FP16, the engine has FP32"),
        ([TensorSpec("INPUT0", "FP32", (N_IN,))], [TensorSpec("OUTPUT0", "FP32", (N_OUT,)), TensorSpec("EXTRA", "FP32", (1,))],
         r"engine has 2 IO tensors \(INPUT0, OUTPUT0\) but the config declares 3"),
        ([TensorSpec("INPUT0", "FP32", (N_IN,))], [TensorSpec("OUT", "FP32", (N_OUT,))],
         r"config output 'OUT' is not an engine output"),
    ],
)
def test_load_validation_names_the_tensor(
    mlp: TensorRTBackend, workdir: pathlib.Path, inputs: List[TensorSpec], outputs: List[TensorSpec], match: str
) -> None:
    d = workdir / "plan" / "1"  # the plan written by the test above, else copy it now
    if not (d / "model.plan").exists():
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(workdir / "cache" / f"{mlp.report.cache_key}.plan", d / "model.plan")
    cfg = BackendConfig("bad", "1", d, "", 64, inputs, outputs, 2, {"trtserve.split_batch_profiles": "true"})
    with pytest.raises(ModelLoadError, match=match):
        TensorRTBackend(cfg).open()


def test_cuda_graphs_match_eager(mlp: TensorRTBackend, workdir: pathlib.Path) -> None:
    cfg = mlp_config(workdir / "mlp" / "1", N_IN, N_OUT, parameters={"trtserve.profiles": TWO_PROFILES},
                     cache_dir=workdir / "cache", cuda_graphs=True)
    g = TensorRTBackend(cfg)
    g.open()
    try:
        print(f"\ncaptured graph buckets per instance: {g.report.graph_buckets}")
        assert g.report.graph_buckets[0] == (1, 2, 4, 8) and g.report.graph_buckets[1] == (9, 16, 32, 64)
        for instance, rows in ((0, 1), (0, 3), (0, 8), (1, 9), (1, 33), (1, 64), (0, 5)):
            x = _x(rows, rows)
            got = g.run(instance, {"INPUT0": x}, ["OUTPUT0"]).outputs["OUTPUT0"]
            want = mlp.run(instance, {"INPUT0": x}, ["OUTPUT0"]).outputs["OUTPUT0"]
            assert got.shape == (rows, N_OUT)
            np.testing.assert_allclose(got, want, **TF32_TOL)  # same engine; a padded shape may round differently
        # a batch left in host pieces (large requests) replays the graph too, its pieces packed into the mirror
        parts = (_x(20, 1), _x(12, 2))
        got = g.run(1, {"INPUT0": Gather(parts, (32, N_IN), np.dtype(np.float32))}, ["OUTPUT0"]).outputs["OUTPUT0"]
        want = mlp.run(1, {"INPUT0": np.concatenate(parts)}, ["OUTPUT0"]).outputs["OUTPUT0"]
        np.testing.assert_allclose(got, want, **TF32_TOL)
        # two in flight: the batches alternate between the slots' graphs (each copies through its own mirror)
        for x, y in _pipelined(g, 1, [9, 33, 64, 17, 40, 64, 9], seed=7):
            np.testing.assert_allclose(y, mlp.run(1, {"INPUT0": x}, ["OUTPUT0"]).outputs["OUTPUT0"], **TF32_TOL)
    finally:
        g.close()


def test_cuda_graphs_replay_for_inputs_in_device_memory(mlp: TensorRTBackend, workdir: pathlib.Path) -> None:
    """Inputs in CUDA shared memory (device tensors, alone or a group's pieces) are copied into the device buffer and
    the engine's own graph of the bucket replays (context.py: no host copies in it); the rows up to the bucket are
    zeroed; each request gets exactly its rows, the same as eager execution."""
    import cupy
    from trtserve.server.engine.backends.base import DeviceDestination, DeviceTensor

    cfg = mlp_config(workdir / "mlp" / "1", N_IN, N_OUT, parameters={"trtserve.profiles": TWO_PROFILES},
                     cache_dir=workdir / "cache", cuda_graphs=True)
    g = TensorRTBackend(cfg)
    g.open()
    try:
        def on_device(x: np.ndarray) -> Tuple[DeviceTensor, object]:
            a = cupy.asarray(x)
            return DeviceTensor(int(a.data.ptr), a.nbytes, a.shape, np.dtype(np.float32), 0, "r"), a

        for instance, rows in ((0, 3), (1, 9), (1, 50), (0, 8)):
            x = _x(rows, 300 + rows)
            t, keep = on_device(x)
            got = g.run(instance, {"INPUT0": t}, ["OUTPUT0"]).outputs["OUTPUT0"]  # type: ignore[dict-item]
            assert got.shape == (rows, N_OUT)
            np.testing.assert_allclose(got, mlp.run(instance, {"INPUT0": x}, ["OUTPUT0"]).outputs["OUTPUT0"],
                                       **TF32_TOL)
        rows, members = 5, 4  # a group of 20 rows: bucket 32, members in allocations of their own
        xs = [_x(rows, 400 + k) for k in range(members)]
        held = [on_device(x) for x in xs]
        outs = [cupy.zeros((rows, N_OUT), cupy.float32) for _ in xs]
        dests = [DeviceDestination(0, k * rows, rows, {"OUTPUT0": (int(o.data.ptr), o.nbytes)}, -1 - k * rows, True)
                 for k, o in enumerate(outs)]
        batch = Gather(tuple(t for t, _ in held), (rows * members, N_IN), np.dtype(np.float32))
        result = g.run_to_device(1, {"INPUT0": batch}, ["OUTPUT0"], dests)  # type: ignore[dict-item]
        assert result.delivered == {0: frozenset({"OUTPUT0"})}
        for o, x in zip(outs, xs):
            np.testing.assert_allclose(cupy.asnumpy(o), mlp.run(0, {"INPUT0": x}, ["OUTPUT0"]).outputs["OUTPUT0"],
                                       **TF32_TOL)  # 5 rows: the first profile's instance
        replays = [inst.device_graph_replays for inst in g._instances]  # noqa: SLF001
        print(f"\ndevice-input graph replays per instance: {replays}")
        assert replays == [2, 3]
    finally:
        g.close()


def test_dtypes_fp16_int32_bool(workdir: pathlib.Path) -> None:
    d = workdir / "multi" / "1"
    make_multi_dtype(d / "model.onnx")
    specs = [("H", "FP16"), ("I", "INT32"), ("B", "BOOL")]
    cfg = BackendConfig("multi", "1", d, "", 8, [TensorSpec(n, w, (4,)) for n, w in specs],
                        [TensorSpec(n + "_OUT", w, (4,)) for n, w in specs], 1, {}, cache_dir=workdir / "cache")
    b = TensorRTBackend(cfg)
    b.open()
    try:
        rng = np.random.default_rng(0)
        feeds = {"H": rng.standard_normal((3, 4)).astype(np.float16), "I": rng.integers(-100, 100, (3, 4)).astype(np.int32),
                 "B": rng.integers(0, 2, (3, 4)).astype(bool)}
        out = b.run(0, feeds, []).outputs
        np.testing.assert_array_equal(out["H_OUT"], feeds["H"] * np.float16(2))
        np.testing.assert_array_equal(out["I_OUT"], feeds["I"] + 1)
        np.testing.assert_array_equal(out["B_OUT"], ~feeds["B"])
        assert (out["H_OUT"].dtype, out["I_OUT"].dtype, out["B_OUT"].dtype) == (np.float16, np.int32, np.bool_)
        with pytest.raises(InvalidArgument, match=r"input 'I': datatype int64 does not match the model's INT32"):
            b.run(0, dict(feeds, I=feeds["I"].astype(np.int64)), [])
    finally:
        b.close()


def test_two_instances_run_concurrently(workdir: pathlib.Path) -> None:
    """Two instance threads on a heavier MLP: their run() windows overlap, and two beat one."""
    d = workdir / "wide" / "1"
    make_mlp(d / "model.onnx", 1024, 4096, 1024, seed=1)
    cfg = mlp_config(d, 1024, 1024, max_batch_size=256, instances=2, cache_dir=workdir / "cache", name="wide")
    b = TensorRTBackend(cfg)
    b.open()
    try:
        x = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
        for i in range(2):
            b.run(i, {"INPUT0": x}, [])  # warm-up
        windows: Dict[int, List[Tuple[int, int]]] = {0: [], 1: []}
        n = 40

        def loop(instance: int, barrier: threading.Barrier) -> None:
            barrier.wait()
            for _ in range(n):
                t0 = time.perf_counter_ns()
                b.run(instance, {"INPUT0": x}, [])
                windows[instance].append((t0, time.perf_counter_ns()))

        t0 = time.perf_counter()
        loop(0, threading.Barrier(1))
        one = time.perf_counter() - t0
        windows[0].clear()
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=loop, args=(i, barrier)) for i in range(2)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        two = time.perf_counter() - t0
        overlaps = sum(1 for a0, a1 in windows[0] for b0, b1 in windows[1] if a0 < b1 and b0 < a1)
        print(f"\n{n} batches x 256 rows: 1 instance {one * 1e3:.1f} ms; {2 * n} batches on 2 instances "
              f"{two * 1e3:.1f} ms ({2 * n * 256 / two:.0f} rows/s vs {n * 256 / one:.0f}); overlapping windows: {overlaps}")
        assert overlaps > 0
    finally:
        b.close()


@pytest.mark.parametrize("columns", [False, True], ids=["per-member", "columns"])
def test_members_at_one_distance_go_in_strided_copies_and_match_onnxruntime(mlp: TensorRTBackend, ort, columns: bool,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A group of large requests (engine/group.py): each member's input read where it lies in page-locked memory and
    its output rows written by the device into its own slot. Four members whose blocks lie at one distance go in one
    2D copy each way (backends/tensorrt/copies.py); a fifth lies elsewhere and goes on its own. The same whether the
    group comes as a piece and a destination per member or as columns (PieceColumns, MemberDestinations), as the
    engine hands its groups over."""
    import cupy
    from trtserve.server.engine.backends.base import DeviceDestination, MemberDestinations, PieceColumns

    rows, members = 6, 5
    in_bytes, out_bytes = rows * N_IN * 4, rows * N_OUT * 4
    stride = in_bytes + out_bytes + 512  # a block: the input, then the output slot, then something else
    size = stride * 16
    pinned = cupy.cuda.alloc_pinned_memory(size)
    block = np.frombuffer(pinned, np.uint8, size)
    starts = [0, stride, 2 * stride, 3 * stride, 9 * stride + 128]  # the last one breaks the run
    xs = [_x(rows, 700 + k) for k in range(members)]
    pieces = []
    for s, x in zip(starts, xs):
        piece = block[s:s + in_bytes].view(np.float32).reshape(rows, N_IN)
        piece[:] = x
        pieces.append(piece)
    base = block.ctypes.data
    destinations = [DeviceDestination(0, k * rows, rows, {"OUTPUT0": (base + s + in_bytes, out_bytes)})
                    for k, s in enumerate(starts)]
    calls = {"2d": 0}
    rt = cupy.cuda.runtime
    plain = rt.memcpy2DAsync

    def counted(*args):
        calls["2d"] += 1
        return plain(*args)

    monkeypatch.setattr(rt, "memcpy2DAsync", counted)
    batch = Gather(tuple(pieces), (rows * members, N_IN), np.dtype(np.float32))
    if columns:
        at = np.array(starts, np.int64) + base
        batch = Gather(None, batch.shape, batch.dtype,
                       PieceColumns(at, np.zeros(members, np.int64), in_bytes, lambda: tuple(pieces)))
        destinations = [MemberDestinations(0, 0, rows, members, {"OUTPUT0": (at + in_bytes,
                                                                             np.full(members, out_bytes, np.int64))})]
    result = mlp.run_to_device(1, {"INPUT0": batch}, ["OUTPUT0"], destinations)
    assert result.delivered == {0: frozenset({"OUTPUT0"})}
    assert calls["2d"] == 2  # the four in a run, in and out
    for s, x in zip(starts, xs):
        y = block[s + in_bytes:s + in_bytes + out_bytes].view(np.float32).reshape(rows, N_OUT)
        np.testing.assert_allclose(y, ort_run(ort, {"INPUT0": x})["OUTPUT0"], **TF32_TOL)


def test_requests_from_two_front_ends_arenas_never_share_a_copy(mlp: TensorRTBackend, ort) -> None:
    """One batch of requests from two front ends: their arenas are two CUDA registrations at some distance, which
    a strided copy must not span (CUDA refuses it with an invalid argument); each arena's own run still merges."""
    from trtserve.server.engine.backends.base import DeviceDestination
    from trtserve.server.engine.backends.tensorrt.copies import MAX_PITCH
    from trtserve.server.ipc.arena import Arena

    rows = 4
    out_bytes = rows * N_OUT * 4
    arenas = sorted((Arena.create(16 << 20) for _ in range(2)), key=lambda a: a.address(0, 1))
    try:
        for a in arenas:
            a.pin()
        assert 0 < arenas[1].address(0, 1) - arenas[0].address(0, 1) <= MAX_PITCH  # a step a run could take
        f32 = np.dtype(np.float32)
        # a request of the first arena, a group of two of the second (a run of their own), one more of the first:
        # the first two are one step apart, and the step of a run is whatever its first two are apart
        places = [(arenas[0], 0), (arenas[1], 0), (arenas[1], 4096), (arenas[0], 4096)]
        entries = [0, 1, 1, 2]
        xs = [_x(rows, 900 + k) for k in range(len(places))]
        pieces = []
        for (a, off), x in zip(places, xs):
            a.write(off, x)
            pieces.append(a.array(off, f32, x.shape))
        destinations = [DeviceDestination(entries[k], k * rows, rows, {"OUTPUT0": (a.address(off + 2048, out_bytes),
                                                                               out_bytes)})
                        for k, (a, off) in enumerate(places)]
        result = mlp.run_to_device(1, {"INPUT0": Gather(tuple(pieces), (rows * len(places), N_IN), f32)},
                                   ["OUTPUT0"], destinations)
        assert result.delivered == {i: frozenset({"OUTPUT0"}) for i in (0, 1, 2)}
        for (a, off), x in zip(places, xs):
            y = a.array(off + 2048, f32, (rows, N_OUT))
            np.testing.assert_allclose(y, ort_run(ort, {"INPUT0": x})["OUTPUT0"], **TF32_TOL)
            del y
        del pieces
    finally:
        for a in arenas:
            a.close()


def test_a_group_in_separate_device_allocations_is_copied_in_one_launch_each_way(mlp: TensorRTBackend, ort) -> None:
    """A group of CUDA shared-memory requests (engine/group.py): every member's input and output in an allocation of
    its own, so no copies merge; the batch reads them all in one kernel launch and writes them in one
    (backends/tensorrt/pieces.py). Every output matches ONNX Runtime's."""
    import cupy
    from trtserve.server.engine.backends.base import DeviceDestination, DeviceTensor

    for rows, members in ((3, 5), (4, 6)):
        xs = [_x(rows, 1100 + 10 * rows + k) for k in range(members)]
        ins = [cupy.asarray(x) for x in xs]
        outs = [cupy.zeros((rows, N_OUT), cupy.float32) for _ in xs]
        parts = tuple(DeviceTensor(int(a.data.ptr), a.nbytes, a.shape, np.dtype(np.float32), 0, f"r{k}")
                      for k, a in enumerate(ins))
        destinations = [DeviceDestination(0, k * rows, rows, {"OUTPUT0": (int(o.data.ptr), o.nbytes)}, -1 - k * rows,
                                          True) for k, o in enumerate(outs)]
        copier = mlp._instances[1]._copier  # noqa: SLF001 - the launches are what this test is about
        assert copier is not None
        before = copier.launches
        result = mlp.run_to_device(1, {"INPUT0": Gather(parts, (rows * members, N_IN), np.dtype(np.float32))},
                                   ["OUTPUT0"], destinations)
        assert copier.launches - before == 2
        assert result.delivered == {0: frozenset({"OUTPUT0"})}
        for o, x in zip(outs, xs):
            np.testing.assert_allclose(cupy.asnumpy(o), ort_run(ort, {"INPUT0": x})["OUTPUT0"], **TF32_TOL)


def test_the_copy_kernel_moves_pieces_of_any_size_and_alignment() -> None:
    """pieces.PieceCopier on its own: sources in separate allocations and at odd offsets, sizes from one byte to
    megabytes, two launches in one batch (each its own table rows), a table too full for a third."""
    import cupy
    from trtserve.server.engine.backends.tensorrt.pieces import PieceCopier

    copier = PieceCopier(cupy, slots=2, capacity=8)
    stream = cupy.cuda.Stream(non_blocking=True)
    rng = np.random.default_rng(5)
    sizes = [1, 17, 4096, 131072, 1_000_003, 48]
    offsets = [0, 3, 16, 0, 5, 8]
    srcs = [cupy.asarray(rng.integers(0, 256, n + o + 7, dtype=np.uint8)) for n, o in zip(sizes, offsets)]
    dst = cupy.zeros(sum(sizes) + 1024, cupy.uint8)
    places, at = [], 1  # destinations at odd offsets of one buffer
    for n in sizes:
        places.append(at)
        at += n + 1
    pieces = [(int(dst.data.ptr) + p, int(s.data.ptr) + o, n) for p, s, o, n in zip(places, srcs, offsets, sizes)]
    copier.begin(1)
    assert copier.copy(pieces[:3], stream) and copier.copy(pieces[3:], stream)
    assert not copier.copy(pieces[:3], stream)  # 6 rows taken of 8
    stream.synchronize()
    for p, s, o, n in zip(places, srcs, offsets, sizes):
        np.testing.assert_array_equal(cupy.asnumpy(dst[p:p + n]), cupy.asnumpy(s[o:o + n]))
    assert int(cupy.count_nonzero(dst[:places[0]])) == 0
    for p, n, q in zip(places, sizes, places[1:] + [at]):  # nothing written between the pieces
        assert int(cupy.count_nonzero(dst[p + n:q])) == 0

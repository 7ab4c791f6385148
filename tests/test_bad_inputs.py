"""The bad-input matrix beyond tests/test_errors.py: every datatype string wrong, typed contents of
every wrong type, raw and typed mixed across inputs, empty non-batch dims, corrupt BYTES in
multi-element tensors, bogus parameters of every type, oversized messages, garbage versions and
model names (path traversal included). Each case asserts the status and the words of the message,
then that the server still answers a valid request correctly (raw stubs: nothing is pre-checked).
"""
from __future__ import annotations

import struct
import time
from typing import Iterator, List, Tuple

import grpc
import numpy as np
import pytest

from tests import models
from tests.conftest import RunningServer
from trtserve import dtypes
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc
from trtserve.server.app import ServerOptions, TrtServer
from trtserve.server.examples.make_mlp import reference

OK = np.ones((2, 64), np.float32)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents", "fp32_contents",
          "fp64_contents", "bytes_contents")
VALUES = {"bool_contents": True, "int_contents": 1, "int64_contents": 1, "uint_contents": 1, "uint64_contents": 1,
          "fp32_contents": 1.0, "fp64_contents": 1.0, "bytes_contents": b"a"}


def mlp_req(name="INPUT0", datatype="FP32", shape=(2, 64), raw=None, model="mlp", version=""):
    r = pb.ModelInferRequest(model_name=model, model_version=version)
    r.inputs.add(name=name, datatype=datatype, shape=list(shape))
    r.raw_input_contents.append(OK.tobytes() if raw is None else raw)
    return r


def typed(datatype, field, values, shape=(2, 64), model="mlp"):
    r = pb.ModelInferRequest(model_name=model)
    t = r.inputs.add(name="INPUT0", datatype=datatype, shape=list(shape))
    getattr(t.contents, field).extend(values)
    return r


def param(r, key, **value):
    for k, v in value.items():
        setattr(r.parameters[key], k, v)
    return r


def check_mlp(stub) -> None:
    """The server answers the next valid request correctly."""
    out = stub.ModelInfer(mlp_req(), timeout=10)
    np.testing.assert_allclose(np.frombuffer(out.raw_output_contents[0], np.float32).reshape(2, 16), reference(OK),
                               rtol=1e-5, atol=1e-5)


def expect(stub, request, code, words, method="ModelInfer"):
    with pytest.raises(grpc.RpcError) as e:
        getattr(stub, method)(request, timeout=10)
    assert e.value.code() == code, (e.value.code(), e.value.details())
    for w in words:
        assert w in e.value.details(), f"{w!r} not in {e.value.details()!r}"
    check_mlp(stub)


@pytest.fixture(scope="module")
def stub(example_server):
    with grpc.insecure_channel(example_server.url) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


# ---- datatype strings ---------------------------------------------------------------------------
def _datatype_cases() -> List[Tuple[str, pb.ModelInferRequest, list]]:
    cases = []
    for wire in dtypes.BY_WIRE:  # spelled wrong: unknown, named in the message
        for bad in (wire.lower(), wire.capitalize(), f" {wire}", f"{wire} ", f"TYPE_{wire}", f"{wire}\x00"):
            if bad != wire:
                cases.append((f"{bad!r}", mlp_req(datatype=bad), ["INPUT0", "unknown datatype", bad.strip("\x00")]))
    for alias in ("", "float32", "float", "F32", "STRING", "TYPE_STRING", "fp32 ", "FP 32", "FP32;DROP"):
        cases.append((f"{alias!r}", mlp_req(datatype=alias), ["INPUT0", "unknown datatype"]))
    for wire, dt in dtypes.BY_WIRE.items():  # a real datatype, just not the model's
        if wire == "FP32":
            continue
        raw = dtypes.serialize_bytes(np.array([b""] * 128, object)) if wire == "BYTES" else bytes(128 * dt.itemsize)
        cases.append((f"valid {wire}", mlp_req(datatype=wire, raw=raw), ["INPUT0", f"datatype {wire}", "FP32"]))
    return cases


DATATYPE_CASES = _datatype_cases()


@pytest.mark.parametrize("case,request_,words", DATATYPE_CASES, ids=[c[0] for c in DATATYPE_CASES])
def test_wrong_datatype_string(stub, case, request_, words):
    expect(stub, request_, INVALID, words)


# ---- typed contents of every wrong type, for every datatype ---------------------------------------
def _typed_cases():
    cases = []
    for wire, dt in dtypes.BY_WIRE.items():
        for field in FIELDS:
            if field == dt.contents_field:
                continue
            words = (["INPUT0", wire, "no typed contents field"] if dt.contents_field is None else
                     ["INPUT0", f"contents.{dt.contents_field}", f"contents.{field}"])
            cases.append((f"{wire}-{field}", typed(wire, field, [VALUES[field]] * 128), words))
    # two fields at once, one right and one wrong: the wrong one is named
    r = typed("FP32", "fp32_contents", [1.0] * 128)
    r.inputs[0].contents.int_contents.extend([1] * 128)
    cases.append(("FP32-right-and-wrong", r, ["INPUT0", "contents.int_contents"]))
    # values the field can hold but the datatype cannot
    for wire, field, value in (("INT8", "int_contents", 128), ("INT8", "int_contents", -129),
                               ("INT16", "int_contents", 1 << 15), ("UINT8", "uint_contents", 256),
                               ("UINT16", "uint_contents", 1 << 16)):
        cases.append((f"{wire}-range-{value}", typed(wire, field, [value] * 128), ["INPUT0", f"{wire} range"]))
    return cases


TYPED_CASES = _typed_cases()


@pytest.mark.parametrize("case,request_,words", TYPED_CASES, ids=[c[0] for c in TYPED_CASES])
def test_typed_contents_of_the_wrong_type(stub, case, request_, words):
    expect(stub, request_, INVALID, words)


# ---- a zoo of small models: typed positives, mixing across inputs, empty dims, BYTES, oversize -------
ZOO_TYPED = {  # datatype -> (field, extreme values that must round-trip exactly)
    "INT8": ("int_contents", [-128, 127, 0, 1]), "UINT8": ("uint_contents", [0, 255, 1, 2]),
    "INT64": ("int64_contents", [-(1 << 63), (1 << 63) - 1, 0, 1]),
    "UINT64": ("uint64_contents", [0, (1 << 64) - 1, 1 << 63, 1]),
    "BOOL": ("bool_contents", [True, False, True, True]), "FP64": ("fp64_contents", [1e308, -0.0, 2.5, 1e-300]),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    repo = tmp_path_factory.mktemp("zoo")
    for wire in ZOO_TYPED:
        models.identity(repo, f"id_{wire.lower()}", wire)
    models.identity(repo, "id_var", "FP32", dims="[ -1 ]")
    models.identity(repo, "id_bytes", "BYTES", dims="[ -1 ]")
    models.add_sub(repo)
    models.copy_example(repo)
    s = RunningServer(repo, metrics=False)
    try:
        with grpc.insecure_channel(s.url) as ch:
            yield pb_grpc.GRPCInferenceServiceStub(ch)
    finally:
        s.stop()


@pytest.mark.parametrize("wire", sorted(ZOO_TYPED))
def test_typed_extremes_round_trip(zoo, wire):
    """Positive control, and the regression test for uint64_contents above 2**63 (was INTERNAL:
    OverflowError converting through int64)."""
    field, values = ZOO_TYPED[wire]
    resp = zoo.ModelInfer(typed(wire, field, values, shape=(1, 4), model=f"id_{wire.lower()}"), timeout=10)
    out = np.frombuffer(resp.raw_output_contents[0], dtypes.BY_WIRE[wire].numpy.newbyteorder("<"))
    np.testing.assert_array_equal(out, np.array(values, dtypes.BY_WIRE[wire].numpy))


def _add_sub(raw0=True, typed0=False, raw1=True, typed1=False, extra_raw=()):
    r = pb.ModelInferRequest(model_name="add_sub")
    x = np.arange(16, dtype=np.float32)[None]
    for name, raw, typ in (("INPUT0", raw0, typed0), ("INPUT1", raw1, typed1)):
        t = r.inputs.add(name=name, datatype="FP32", shape=[1, 16])
        if typ:
            t.contents.fp32_contents.extend(x.ravel().tolist())
        if raw:
            r.raw_input_contents.append(x.tobytes())
    r.raw_input_contents.extend(extra_raw)
    return r


MIXED_CASES = [
    ("raw then typed", _add_sub(raw1=False, typed1=True), ["raw_input_contents has 1 entries", "2 inputs"]),
    ("typed then raw", _add_sub(raw0=False, typed0=True), ["raw_input_contents has 1 entries", "2 inputs"]),
    ("typed with empty raw slot", _add_sub(raw1=False, typed1=True, extra_raw=(b"",)),
     ["INPUT1", "typed contents", "raw_input_contents"]),
    ("both, raw in both slots", _add_sub(typed1=True), ["INPUT1", "typed contents", "raw_input_contents"]),
    ("raw with one slot too many", _add_sub(extra_raw=(b"\0" * 64,)), ["raw_input_contents has 3 entries"]),
    ("one raw, one without data", _add_sub(raw1=False), ["raw_input_contents has 1 entries"]),
]


@pytest.mark.parametrize("case,request_,words", MIXED_CASES, ids=[c[0] for c in MIXED_CASES])
def test_raw_and_typed_mixed_across_inputs(zoo, case, request_, words):
    expect(zoo, request_, INVALID, words)


def test_typed_for_every_input_is_fine(zoo):
    resp = zoo.ModelInfer(_add_sub(raw0=False, typed0=True, raw1=False, typed1=True), timeout=10)
    np.testing.assert_array_equal(np.frombuffer(resp.raw_output_contents[0], np.float32), 2 * np.arange(16))


def _empty(model, datatype, shape, raw=b""):
    r = pb.ModelInferRequest(model_name=model)
    r.inputs.add(name="INPUT0", datatype=datatype, shape=list(shape))
    if raw is not None:
        r.raw_input_contents.append(raw)
    return r


EMPTY_CASES = [
    ("var dim 0 (raw)", _empty("id_var", "FP32", (1, 0)), ["INPUT0", "variable dim 1 is 0"]),
    ("var dim 0 (no data)", _empty("id_var", "FP32", (2, 0), raw=None), ["INPUT0", "variable dim 1 is 0"]),
    ("var dim 0 (BYTES)", _empty("id_bytes", "BYTES", (1, 0)), ["INPUT0", "variable dim 1 is 0"]),
    ("fixed dim 0", _empty("mlp", "FP32", (2, 0)), ["INPUT0", "[2, 0]", "dim 1 must be 64"]),
    ("fixed dim 0 of 4", _empty("id_int8", "INT8", (1, 0), raw=None), ["INPUT0", "dim 1 must be 4"]),
    ("rank 1 empty", _empty("mlp", "FP32", (0,)), ["INPUT0", "rank 1"]),
    ("rank 3 empty", _empty("mlp", "FP32", (1, 0, 64)), ["INPUT0", "rank 3"]),
    ("all zero", _empty("id_var", "FP32", (0, 0)), ["INPUT0", "batch size 0"]),
    ("scalar", _empty("mlp", "FP32", (), raw=b"\0" * 4), ["INPUT0", "rank 0"]),
    ("zero dims, stray bytes", _empty("id_var", "FP32", (1, 0), raw=b"\0" * 4), ["INPUT0", "4 bytes", "0 bytes"]),
    # regression (found by bench/fuzz.py): NumPy refused these shapes -> INTERNAL "array is too big"
    ("zero next to huge dims (no data)", _empty("mlp", "FP32", (0, (1 << 63) - 1, 2), raw=None),
     ["INPUT0", "dimensions whose product"]),
    ("zero next to huge dims (raw)", _empty("mlp", "FP32", (0, (1 << 63) - 1, 2)), ["INPUT0", "dimensions whose product"]),
    ("zero next to huge dims (BYTES)", _empty("mlp", "BYTES", (1 << 62, 0, 4)), ["INPUT0", "dimensions whose product"]),
]


@pytest.mark.parametrize("case,request_,words", EMPTY_CASES, ids=[c[0] for c in EMPTY_CASES])
def test_empty_tensors(zoo, case, request_, words):
    expect(zoo, request_, INVALID, words)


def _prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


SIX = [b"a" * 20, b"", b"ccc", b"dd", b"eeeee", b"f"]  # one [2, 3] BYTES tensor, element by element
BYTES_CASES = [
    ("cut inside element 4's prefix", _prefixed(*SIX[:3]) + b"\x02\x00", ["element 3", "runs past"]),
    ("cut inside element 5's data", _prefixed(*SIX[:4]) + struct.pack("<I", 5) + b"ee", ["element 4", "runs past"]),
    ("last length too long", _prefixed(*SIX[:5]) + struct.pack("<I", 2) + b"f", ["element 5", "length 2"]),
    ("prefix 0xFFFFFFFF", _prefixed(*SIX[:2]) + b"\xff\xff\xff\xff" + b"ccc", ["element 2", "4294967295"]),
    ("one element missing", _prefixed(*SIX[:5]), ["runs past"]),
    ("one element extra", _prefixed(*SIX, b"g"), ["5 bytes after its 6 elements"]),
    ("trailing garbage", _prefixed(*SIX) + b"\0", ["1 bytes after its 6 elements"]),
    ("prefixes big-endian", b"".join(struct.pack(">I", len(i)) + i for i in SIX), ["BYTES"]),
    ("not UTF-8 (ORT strings)", _prefixed(b"a", b"\xc3\x28", b"", b"", b"", b""), ["element 1", "UTF-8"]),
    ("no data at all", b"", ["24 bytes", "got 0"]),
]


@pytest.mark.parametrize("case,raw,words", BYTES_CASES, ids=[c[0] for c in BYTES_CASES])
def test_corrupt_bytes_multi_element(zoo, case, raw, words):
    expect(zoo, _empty("id_bytes", "BYTES", (2, 3), raw=raw), INVALID, ["INPUT0"] + words)
    resp = zoo.ModelInfer(_empty("id_bytes", "BYTES", (2, 3), raw=_prefixed(*SIX)), timeout=10)
    assert resp.raw_output_contents[0] == _prefixed(*SIX) and list(resp.outputs[0].shape) == [2, 3]


@pytest.mark.parametrize("shape", [(1 << 30,), (1, 1 << 36), (1 << 20, 1 << 20)])
def test_tiny_bytes_message_claiming_a_huge_tensor_is_rejected_before_allocating(stub, shape):
    """Regression: BYTES decoding allocated an object array of shape's size before reading any
    prefix, so a 30-byte request could make the server allocate gigabytes (or die)."""
    t0 = time.monotonic()
    expect(stub, mlp_req(datatype="BYTES", shape=shape, raw=b"\0\0\0\0"), INVALID,
           ["INPUT0", "BYTES", "runs past the end", "got 4 bytes"])
    assert time.monotonic() - t0 < 2.0


# ---- parameters ---------------------------------------------------------------------------------
PARAM_TYPES = {"bool_param": True, "int64_param": 7, "string_param": "x", "double_param": 1.5,
               "uint64_param": (1 << 64) - 1}


def _param_cases():
    bad = []
    for key in ("priority", "timeout"):
        for kind, value in PARAM_TYPES.items():
            if kind in ("int64_param", "uint64_param"):
                continue
            bad.append((f"{key} as {kind}", param(mlp_req(), key, **{kind: value}), [key, kind]))
        bad.append((f"{key} negative", param(mlp_req(), key, int64_param=-5), [key, "-5"]))
        r = mlp_req()
        r.parameters[key].SetInParent()  # present but no value
        bad.append((f"{key} unset", r, [key]))
    bad.append(("priority 2**64-1", param(mlp_req(), "priority", uint64_param=(1 << 64) - 1),
                ["priority", str((1 << 64) - 1), "outside"]))
    for key, kind, value in (("sequence_id", "string_param", "abc"), ("sequence_id", "uint64_param", 3),
                             ("sequence_start", "bool_param", True), ("sequence_end", "bool_param", True),
                             ("sequence_end", "int64_param", 1)):
        bad.append((f"{key} {kind}", param(mlp_req(), key, **{kind: value}), [key, "sequence batching"]))
    r = mlp_req(raw=None)
    del r.raw_input_contents[:]
    r.inputs[0].parameters["shared_memory_region"].string_param = "region0"
    bad.append(("input shared memory, unregistered", r, ["INPUT0", "shared_memory"]))
    r = mlp_req()
    r.outputs.add(name="OUTPUT0").parameters["shared_memory_region"].string_param = "../../dev/shm/x"
    bad.append(("output shared memory, traversal", r, ["OUTPUT0", "shared_memory"]))
    return bad


PARAM_CASES = _param_cases()


@pytest.mark.parametrize("case,request_,words", PARAM_CASES, ids=[c[0] for c in PARAM_CASES])
def test_bogus_known_parameters(stub, case, request_, words):
    expect(stub, request_, INVALID, words)


GOOD_PARAM_CASES = [(f"unknown {kind}", "x-made-up", kind, v) for kind, v in PARAM_TYPES.items()] + [
    ("empty key", "", "string_param", "v"), ("huge key", "k" * 5000, "string_param", "v" * 5000),
    ("binary_data_output", "binary_data_output", "bool_param", True),
    ("timeout max (no override allowed)", "timeout", "uint64_param", (1 << 64) - 1),
    ("sequence_id 0", "sequence_id", "uint64_param", 0),
]


@pytest.mark.parametrize("case,key,kind,value", GOOD_PARAM_CASES, ids=[c[0] for c in GOOD_PARAM_CASES])
def test_unknown_parameters_are_ignored(stub, case, key, kind, value):
    """As in Triton, parameters the server does not know pass through (tritonclient sends some)."""
    r = param(mlp_req(), key, **{kind: value})
    r.inputs[0].parameters[key].CopyFrom(r.parameters[key])  # on the tensor as well
    out = stub.ModelInfer(r, timeout=10)
    np.testing.assert_allclose(np.frombuffer(out.raw_output_contents[0], np.float32).reshape(2, 16), reference(OK),
                               rtol=1e-5, atol=1e-5)


# ---- versions and model names -----------------------------------------------------------------------
VERSIONS = ["abc", "-1", "0", "01", "1.0", " 1", "1 ", "+1", "2", "99999999999999999999999", "1/../1", "\u0661",
            "1\x00", "v" * 20000]


@pytest.mark.parametrize("version", VERSIONS, ids=[repr(v[:12]) for v in VERSIONS])
def test_garbage_model_version(stub, version):
    words = ["mlp", "no version"] + (["loaded versions: ['1']"] if len(version) < 1000 else ["characters cut"])
    expect(stub, mlp_req(version=version), NOT_FOUND, words)


NAMES = ["", ".", "..", "../x", "../mlp", "../../../../etc/passwd", "/etc/passwd", "mlp/../mlp", "mlp/", "./mlp",
         "MLP", "mlp ", " mlp", "m\x00lp", "%2e%2e", "..\\mlp", "mlp\n", "\U0001f4a5", "a" * 300, "a" * 100000]


@pytest.mark.parametrize("name", NAMES, ids=[repr(n[:16]) for n in NAMES])
def test_unknown_model_names(stub, name):
    """NOT_FOUND with the name (cut when huge) and no claim about folders outside the repository.

    Regression: names of more than 255 bytes made the existence probe raise OSError (INTERNAL), and a
    100 kB name echoed in the message exceeded the client's trailer limit (RESOURCE_EXHAUSTED)."""
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(mlp_req(model=name), timeout=10)
    assert e.value.code() == NOT_FOUND, e.value.details()
    assert e.value.details().startswith("model '")
    assert ("is not loaded" if len(name) < 1000 else "characters cut") in e.value.details()
    assert "it is in the repository" not in e.value.details()
    assert len(e.value.details()) < 5000
    for method, request_ in (("ModelMetadata", pb.ModelMetadataRequest(name=name)),
                             ("ModelConfig", pb.ModelConfigRequest(name=name)),
                             ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=name)),
                             ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=name))):
        with pytest.raises(grpc.RpcError) as e:
            getattr(stub, method)(request_, timeout=10)
        # load and unload: refused before the name is looked at under model control mode none (Triton's rule;
        # test_model_control.py checks the names in explicit mode)
        expected = grpc.StatusCode.UNAVAILABLE if method.startswith("Repository") else NOT_FOUND
        assert e.value.code() == expected, (method, e.value.details()[:200])
    assert stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=10).ready is False
    check_mlp(stub)


# ---- oversized messages --------------------------------------------------------------------------
class _SmallLimitServer(RunningServer):
    """RunningServer with ``max_message_bytes`` set (conftest's class does not expose it)."""

    def __init__(self, repo, max_message_bytes: int) -> None:  # noqa: super().__init__ builds its own options
        import asyncio
        import threading

        self.repo = repo
        self.server = TrtServer(ServerOptions(model_repository=repo, grpc_port=0, http_port=0, metrics_port=None,
                                              max_message_bytes=max_message_bytes, drain_seconds=5.0,
                                              gpu_metrics=False))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="trtserve-small-limit", daemon=True)
        self._thread.start()
        self.call(self.server.start())
        self.url = f"127.0.0.1:{self.server.grpc_port}"


LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    repo = tmp_path_factory.mktemp("small")
    models.copy_example(repo)
    models.identity(repo, "id_var", "FP32", dims="[ -1 ]")
    _doubler(repo)
    s = _SmallLimitServer(repo, LIMIT)
    try:
        with grpc.insecure_channel(s.url, options=[("grpc.max_send_message_length", -1),
                                                   ("grpc.max_receive_message_length", -1)]) as ch:
            yield pb_grpc.GRPCInferenceServiceStub(ch)
    finally:
        s.stop()


def _doubler(repo) -> None:
    """OUTPUT0 = concat(INPUT0, INPUT0) along dim 1: the answer is twice the request."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Concat", ["INPUT0", "INPUT0"], ["OUTPUT0"], axis=1)], "double",
                              [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["b", "n"])],
                              [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["b", "m"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    models._save(model, repo / "double" / "1" / "model.onnx")
    models.write_config(repo, "double", """
name: "double" platform: "onnxruntime_onnx" max_batch_size: 4
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
""")


@pytest.mark.parametrize("n", [LIMIT // 4, LIMIT, 1 << 20])
def test_request_over_max_message_size(small, n):
    with pytest.raises(grpc.RpcError) as e:
        small.ModelInfer(_empty("id_var", "FP32", (1, n), raw=np.zeros(n, np.float32).tobytes()), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert "larger than max" in e.value.details() and str(LIMIT) in e.value.details()
    check_mlp(small)


def test_request_id_over_max_message_size(small):
    r = mlp_req()
    r.id = "i" * LIMIT
    with pytest.raises(grpc.RpcError) as e:
        small.ModelInfer(r, timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in e.value.details()
    check_mlp(small)


def test_response_over_max_message_size(small):
    """The request fits but the answer does not: the client is told so, and the server goes on."""
    n = LIMIT // 4 // 2 + 1024  # request ~36 KiB, response ~72 KiB
    with pytest.raises(grpc.RpcError) as e:
        small.ModelInfer(_empty("double", "FP32", (1, n), raw=np.ones(n, np.float32).tobytes()), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert "larger than max" in e.value.details(), e.value.details()
    resp = small.ModelInfer(_empty("double", "FP32", (1, 4), raw=np.ones(4, np.float32).tobytes()), timeout=10)
    assert list(resp.outputs[0].shape) == [1, 8]
    check_mlp(small)


def test_just_under_the_limit_is_served(small):
    n = (LIMIT - 1024) // 4
    resp = small.ModelInfer(_empty("id_var", "FP32", (1, n), raw=np.full(n, 3, np.float32).tobytes()), timeout=10)
    assert np.frombuffer(resp.raw_output_contents[0], np.float32).sum() == 3 * n

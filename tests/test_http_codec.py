"""The HTTP/REST inference codec (server/frontend/http/infer_codec.py) against tritonclient.http's own encoders
and decoders, which is what real clients send and read: every datatype in JSON and binary form, both ways;
shared memory, classification and binary_data_output parameters; and each malformed body, whose message must
name the tensor. No server runs here."""
from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pytest

tritonhttp = pytest.importorskip("tritonclient.http")

from tritonclient.utils import np_to_triton_dtype  # noqa: E402

from trtserve import dtypes  # noqa: E402
from trtserve.protos import grpc_service_pb2 as pb  # noqa: E402
from trtserve.server.engine.repository.model_config import BatchingPolicy, ModelSpec, TensorSpec  # noqa: E402
from trtserve.server.errors import InvalidArgument  # noqa: E402
from trtserve.server.frontend.http.infer_codec import OutputForm, encode_infer, parse_infer  # noqa: E402
from trtserve.server.frontend.validation import precheck  # noqa: E402

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None
# recent tritonclients (2.73 here) carry BF16 as ml_dtypes.bfloat16, and send it only as binary data over HTTP
CLIENT_BF16 = ml_dtypes is not None and np_to_triton_dtype(np.dtype(ml_dtypes.bfloat16)) == "BF16"

NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
ALL = NUMERIC + ["BYTES"]  # BF16 has its own tests: tritonclient sends it only as binary, and needs ml_dtypes
SHAPE = (2, 3)


def sample(wire: str, shape: Sequence[int] = SHAPE) -> np.ndarray:
    """A tensor of ``wire`` with the type's extremes in it, as a client would hand it to tritonclient."""
    rng = np.random.default_rng(zlib.crc32(wire.encode()))
    n = math.prod(shape)
    if wire == "BOOL":
        flat = rng.integers(0, 2, n).astype(bool)
    elif wire == "BYTES":
        flat = np.array([("élément %d" % i).encode() if i % 3 else b"" for i in range(n)], dtype=object)
    elif wire in ("FP16", "FP32", "FP64"):
        np_type = dtypes.BY_WIRE[wire].numpy
        flat = (rng.standard_normal(n) * 100).astype(np_type)
        flat[0] = np.finfo(np_type).max
        flat[-1] = np.finfo(np_type).tiny
    else:
        np_type = dtypes.BY_WIRE[wire].numpy
        info = np.iinfo(np_type)
        flat = rng.integers(info.min, info.max, n, dtype=np_type, endpoint=True)
        flat[0], flat[-1] = info.min, info.max
    return flat.reshape(shape)


def wire_bytes(wire: str, arr: np.ndarray) -> bytes:
    return dtypes.serialize_bytes(arr) if wire == "BYTES" else np.ascontiguousarray(arr).astype(
        arr.dtype.newbyteorder("<")).tobytes()


def client_body(inputs, outputs=None, **kw):
    return tritonhttp.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kw)


def client_input(name: str, wire: str, arr: np.ndarray, binary: bool) -> Any:
    t = tritonhttp.InferInput(name, list(arr.shape), wire)
    t.set_data_from_numpy(arr, binary_data=binary)
    return t


def parse(body: bytes, header_length: Optional[int] = None):
    return parse_infer("m", "1", body, header_length)


def parse_json(doc: Dict[str, Any]):
    return parse(json.dumps(doc).encode())


def bad(body_or_doc, header_length: Optional[int] = None, *needles: str) -> str:
    """Parses, expecting InvalidArgument whose message holds every needle; returns the message."""
    body = body_or_doc if isinstance(body_or_doc, (bytes, bytearray)) else json.dumps(body_or_doc).encode()
    with pytest.raises(InvalidArgument) as info:
        parse(body, header_length)
    message = info.value.message
    for needle in needles:
        assert needle in message, message
    return message


def one_input(datatype: str, data: Any, shape: Sequence[int] = (2,), name: str = "X", **extra) -> Dict[str, Any]:
    return {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data, **extra}]}


def response(outputs: List[tuple], **kw) -> pb.ModelInferResponse:
    """pb answer as service._response builds it: one raw entry per output ((name, wire, shape, raw))."""
    r = pb.ModelInferResponse(model_name="m", model_version="1", **kw)
    for name, wire, shape, raw in outputs:
        r.outputs.add(name=name, datatype=wire, shape=list(shape))
        r.raw_output_contents.append(raw)
    return r


def client_result(body: bytes, header_length: Optional[int]):
    return tritonhttp.InferResult.from_response_body(body, verbose=False, header_length=header_length)


# ---------------------------------------------------------------------------------------------- requests


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("wire", ALL)
def test_request_every_datatype(wire: str, binary: bool) -> None:
    arr = sample(wire)
    body, n = client_body([client_input("X", wire, arr, binary)], request_id="r1")
    assert (n is None) == (not binary)
    request, form = parse(body, n)
    assert (request.model_name, request.model_version, request.id) == ("m", "1", "r1")
    (t,) = request.inputs
    assert (t.name, t.datatype, list(t.shape)) == ("X", wire, list(SHAPE))
    assert "binary_data_size" not in t.parameters
    assert list(request.raw_input_contents) == [wire_bytes(wire, arr)]
    assert form.binary_default is True  # no outputs listed: tritonclient asks for all of them in binary


def test_request_all_datatypes_together_in_order() -> None:
    """Binary and JSON inputs interleaved: one raw entry each, in input order, the binary ones sliced in turn."""
    arrays = {f"I_{w}": (w, sample(w)) for w in ALL}
    inputs = [client_input(name, w, arr, i % 2 == 0) for i, (name, (w, arr)) in enumerate(arrays.items())]
    request, _ = parse(*client_body(inputs))
    assert [t.name for t in request.inputs] == list(arrays)
    assert list(request.raw_input_contents) == [wire_bytes(w, arr) for w, arr in arrays.values()]


def test_request_passes_precheck() -> None:
    """What the codec builds is what validation.precheck accepts for the model (the gRPC path's checks)."""
    spec = ModelSpec(name="m", version="1", platform="fake", max_batch_size=8,
                     inputs=(TensorSpec("a", "FP32", (3,)), TensorSpec("b", "BYTES", (1,))),
                     outputs=(TensorSpec("y", "FP32", (3,)),), batching=BatchingPolicy(enabled=True, max_batch_size=8),
                     instance_count=1, parameters={}, pad_values={}, unpad={})
    inputs = [client_input("a", "FP32", sample("FP32", (2, 3)), True),
              client_input("b", "BYTES", np.array([[b"x"], [b"yz"]], dtype=object), False)]
    request, _ = parse(*client_body(inputs, [tritonhttp.InferRequestedOutput("y")]))
    checked = precheck(spec, request, None)
    assert checked.rows == 2 and checked.outputs == ("y",)


@pytest.mark.skipif(not CLIENT_BF16, reason="this tritonclient has no ml_dtypes BF16")
def test_request_bf16_binary_from_tritonclient() -> None:
    arr = np.array([[1.5, -2.25, 3.0e38], [0.0, -0.0, 1e-38]], dtype=ml_dtypes.bfloat16)
    request, _ = parse(*client_body([client_input("X", "BF16", arr, True)]))
    assert list(request.raw_input_contents) == [arr.view(np.uint16).astype("<u2").tobytes()]


@pytest.mark.skipif(ml_dtypes is None, reason="no ml_dtypes")
def test_request_bf16_json_rounds_like_ml_dtypes() -> None:
    """tritonclient sends BF16 only as binary, but other clients send numbers: rounded to nearest even, like
    ml_dtypes (through float32, as ml_dtypes converts a float64)."""
    rng = np.random.default_rng(7)
    values = np.concatenate([rng.standard_normal(500).astype(np.float32),
                             (rng.integers(0, 1 << 16, 500).astype(np.uint32) << 16 | 0x8000).view(np.float32),  # ties
                             np.array([np.inf, -np.inf, 3.4e38, -1e-40, 0.0, 1.0, 65504.0], np.float32)])
    values = values[np.isfinite(values) | np.isinf(values)]
    request, _ = parse_json(one_input("BF16", [float(v) for v in values], shape=[len(values)]))
    expected = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(np.frombuffer(request.raw_input_contents[0], "<u2"), expected)
    tie = 1 + 2 ** -8 + 2 ** -30  # float32 makes it a BF16 tie (then even: 1.0), as ml_dtypes does from float64
    request, _ = parse_json(one_input("BF16", [tie], shape=[1]))
    assert request.raw_input_contents[0] == np.array([tie]).astype(ml_dtypes.bfloat16).tobytes() == b"\x80\x3f"
    nan, _ = parse(b'{"inputs":[{"name":"X","shape":[1],"datatype":"BF16","data":[NaN]}]}')
    assert np.isnan(np.frombuffer(nan.raw_input_contents[0], "<u2").view(ml_dtypes.bfloat16).astype(np.float32)[0])


@pytest.mark.parametrize("wire", ["INT32", "UINT8", "FP32", "FP16", "BOOL", "BYTES"])
def test_request_nested_and_flat_json_agree(wire: str) -> None:
    arr = sample(wire, (2, 3, 2))
    if wire == "BYTES":
        arr = np.vectorize(lambda b: b.decode(), otypes=[object])(arr)
    flat, _ = parse_json(one_input(wire, arr.reshape(-1).tolist(), shape=arr.shape))
    nested, _ = parse_json(one_input(wire, arr.tolist(), shape=arr.shape))
    assert flat.raw_input_contents[0] == nested.raw_input_contents[0] == wire_bytes(wire, arr)


def test_request_json_numbers_convert() -> None:
    """Integers are numbers to float types; empty tensors take an empty array; a scalar shape [] takes one value."""
    r, _ = parse_json(one_input("FP64", [1, 2.5], shape=[2]))
    assert r.raw_input_contents[0] == np.array([1.0, 2.5], "<f8").tobytes()
    r, _ = parse_json(one_input("INT32", [[], []], shape=[2, 0]))
    assert list(r.raw_input_contents) == [b""]
    r, _ = parse_json(one_input("UINT64", [2 ** 64 - 1], shape=[]))
    assert r.raw_input_contents[0] == struct.pack("<Q", 2 ** 64 - 1)


def test_request_shared_memory_inputs_get_no_raw_entry() -> None:
    a, c = sample("FP32"), sample("INT64")
    shm = tritonhttp.InferInput("B", list(SHAPE), "FP32")
    shm.set_shared_memory("region0", 24, offset=8)
    request, _ = parse(*client_body([client_input("A", "FP32", a, True), shm, client_input("C", "INT64", c, False)]))
    assert [t.name for t in request.inputs] == ["A", "B", "C"]
    assert list(request.raw_input_contents) == [wire_bytes("FP32", a), wire_bytes("INT64", c)]
    params = request.inputs[1].parameters
    assert params["shared_memory_region"].string_param == "region0"
    assert params["shared_memory_byte_size"].WhichOneof("parameter_choice") == "int64_param"
    assert (params["shared_memory_byte_size"].int64_param, params["shared_memory_offset"].int64_param) == (24, 8)


def test_request_outputs_parameters() -> None:
    shm_out = tritonhttp.InferRequestedOutput("S", binary_data=True)
    shm_out.set_shared_memory("out_region", 64, offset=16)
    outputs = [tritonhttp.InferRequestedOutput("J", binary_data=False),
               tritonhttp.InferRequestedOutput("B", binary_data=True),
               tritonhttp.InferRequestedOutput("C", binary_data=False, class_count=3), shm_out]
    request, form = parse(*client_body([client_input("X", "FP32", sample("FP32"), False)], outputs))
    assert [o.name for o in request.outputs] == ["J", "B", "C", "S"]
    assert all("binary_data" not in o.parameters for o in request.outputs)
    cls = request.outputs[2].parameters["classification"]
    assert (cls.WhichOneof("parameter_choice"), cls.int64_param) == ("int64_param", 3)
    s = request.outputs[3].parameters
    assert (s["shared_memory_region"].string_param, s["shared_memory_byte_size"].int64_param,
            s["shared_memory_offset"].int64_param) == ("out_region", 64, 16)
    assert form.binary_default is False
    assert [form.is_binary(n) for n in ("J", "B", "C", "S", "unlisted")] == [False, True, False, False, False]
    assert dict(form.shm) == {"S": {"shared_memory_region": "out_region", "shared_memory_byte_size": 64,
                                    "shared_memory_offset": 16}}


def test_request_binary_data_output_and_parameters() -> None:
    doc = one_input("INT32", [1, 2])
    doc["parameters"] = {"binary_data_output": True, "priority": 2, "timeout": 100, "s": "text", "f": 0.5,
                         "flag": True, "big": 2 ** 64 - 1, "neg": -5}
    doc["outputs"] = [{"name": "A"}, {"name": "B", "parameters": {"binary_data": False}}]
    request, form = parse_json(doc)
    assert form.binary_default is True and form.is_binary("A") and not form.is_binary("B")
    kinds = {k: (p.WhichOneof("parameter_choice"), getattr(p, p.WhichOneof("parameter_choice")))
             for k, p in request.parameters.items()}
    assert kinds == {"priority": ("int64_param", 2), "timeout": ("int64_param", 100), "s": ("string_param", "text"),
                     "f": ("double_param", 0.5), "flag": ("bool_param", True), "big": ("uint64_param", 2 ** 64 - 1),
                     "neg": ("int64_param", -5)}
    request, _ = parse(*client_body([client_input("X", "FP32", sample("FP32"), True)], request_id="id7",
                                    priority=3, parameters={"custom": "v"}))
    assert request.id == "id7" and request.parameters["priority"].int64_param == 3
    assert request.parameters["custom"].string_param == "v"


def test_request_many_inputs_is_linear() -> None:
    """60,000 inputs (half of them binary) parse in one pass: this must finish quickly, not in minutes."""
    n = 60_000
    inputs = []
    for i in range(n):
        if i % 2:
            inputs.append({"name": f"I{i}", "shape": [1], "datatype": "INT32", "parameters": {"binary_data_size": 4}})
        else:
            inputs.append({"name": f"I{i}", "shape": [1], "datatype": "FP32", "data": [float(i)]})
    header = json.dumps({"inputs": inputs, "outputs": [{"name": f"O{i}"} for i in range(n)]}).encode()
    body = header + b"".join(struct.pack("<i", i) for i in range(1, n, 2))
    request, _ = parse(body, len(header))
    assert len(request.inputs) == len(request.raw_input_contents) == n and len(request.outputs) == n
    assert request.raw_input_contents[n - 1] == struct.pack("<i", n - 1)
    assert request.raw_input_contents[n - 2] == struct.pack("<f", n - 2)


# ----------------------------------------------------------------------------------------- request errors


def test_error_count_mismatch() -> None:
    bad(one_input("FP32", [1.0, 2.0, 3.0], shape=[2, 2], name="IN"), None,
        "input 'IN'", "3 elements", "[2, 2]", "needs 4")


@pytest.mark.parametrize("wire,value,limits", [("INT8", 128, "[-128, 127]"), ("UINT8", -1, "[0, 255]"),
                                               ("UINT64", 2 ** 64, "18446744073709551615"),
                                               ("INT64", -(2 ** 63) - 1, "-9223372036854775808")])
def test_error_int_out_of_range(wire: str, value: int, limits: str) -> None:
    bad(one_input(wire, [0, value], name="IN"), None, "input 'IN'", str(value), f"{wire} range", limits)


@pytest.mark.parametrize("wire,data,needs", [("FP32", [1.0, "2"], "numbers"), ("INT32", [1, 2.0], "integers"),
                                             ("INT32", [1, True], "integers"), ("BOOL", [True, 1], "booleans"),
                                             ("BYTES", ["a", 1], "strings"), ("FP64", [1.0, None], "numbers")])
def test_error_wrong_json_type(wire: str, data: list, needs: str) -> None:
    bad(one_input(wire, data, name="IN"), None, "input 'IN'", needs, "element 1")


@pytest.mark.parametrize("data", [[[1, 2], [3]], [[1, 2], 3, 4], [[[1]], [2]]])
def test_error_ragged(data: list) -> None:
    bad(one_input("INT32", data, shape=[3], name="IN"), None, "input 'IN'", "ragged")


def test_error_binary_bytes_left_over_or_missing() -> None:
    body, n = client_body([client_input("A", "FP32", sample("FP32"), True),
                           client_input("B", "INT8", sample("INT8"), True)])
    bad(body + b"xy", n, "input 'B'", "2 bytes", "left over", "declare 30 bytes", "has 32 bytes")
    bad(body[:-1], n, "input 'B'", "runs past the end", "declare 30 bytes", "has 29 bytes")
    bad(body[:n + 10], n, "input 'A'", "binary_data_size 24", "has 10 bytes")
    json_only, _ = client_body([client_input("A", "FP32", sample("FP32"), False)])
    bad(json_only + b"\0" * 4, len(json_only), "4 bytes of binary data are left over")
    bad(body, None)  # the binary data read as JSON


@pytest.mark.parametrize("header_length", [-1, 10 ** 9])
def test_error_header_length(header_length: int) -> None:
    body, _ = client_body([client_input("A", "FP32", sample("FP32"), True)])
    bad(body, header_length, "Inference-Header-Content-Length", str(header_length))


@pytest.mark.parametrize("body,needle", [(b"{", "Expecting"), (b"", "Expecting"), (b"[1]", "JSON object"),
                                         (b"\xff\xfe{", ""), (b"[" * 100_000 + b"]" * 100_000, ""),
                                         (b'{"inputs": {}}', "'inputs' must be an array"),
                                         (b'{"id": 5, "inputs": []}', "'id' must be a string"),
                                         (b'{"parameters": []}', "'parameters' must be an object"),
                                         (b'{"outputs": []}', "no 'inputs'"),
                                         (b'{"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}', "'name'"),
                                         (b'{"inputs": [{"name": "IN", "shape": "1", "datatype": "FP32"}]}',
                                          "input 'IN': 'shape' must be an array"),
                                         (b'{"inputs": [{"name": "IN", "shape": [true], "datatype": "FP32"}]}',
                                          "input 'IN': 'shape' must be an array of integers"),
                                         (b'{"inputs": [], "outputs": [{"name": 3}]}', "'name' must be a string")])
def test_error_bad_json(body: bytes, needle: str) -> None:
    bad(body, None, "failed to parse the request JSON", needle)


def test_error_data_with_binary_or_shared_memory() -> None:
    doc = one_input("FP32", [1.0, 2.0], name="IN", parameters={"binary_data_size": 8})
    bad(json.dumps(doc).encode() + b"\0" * 8, len(json.dumps(doc)), "input 'IN'", "'data'", "binary_data_size")
    bad(one_input("FP32", [1.0, 2.0], name="IN", parameters={"shared_memory_region": "r",
                                                              "shared_memory_byte_size": 8}),
        None, "input 'IN'", "shared memory", "use one")


def test_error_other_input_faults() -> None:
    bad(one_input("FLOAT", [1.0, 2.0], name="IN"), None, "input 'IN'", "unknown datatype", "FP32", "BYTES", "BF16")
    bad({"inputs": [{"name": "IN", "shape": [2], "datatype": "FP32"}]}, None, "input 'IN'", "no data")
    bad(one_input("FP32", 1.0, name="IN"), None, "input 'IN'", "must be a JSON array")
    bad(one_input("FP32", [1.0, 2.0], shape=[-2], name="IN"), None, "input 'IN'", "negative")
    bad(one_input("BYTES", ["a", "\ud800"], name="IN"), None, "input 'IN'", "UTF-8")
    bad(one_input("FP32", [1.0, 10 ** 400], name="IN"), None, "input 'IN'", "too large")
    bad(one_input("FP32", [1.0, 2.0], name="IN", parameters={"binary_data_size": -1}), None, "input 'IN'",
        "binary_data_size")
    bad(one_input("FP32", [1.0, 2.0], name="IN", parameters={"p": [1]}), None, "input 'IN'", "parameter 'p'")
    bad({"inputs": [], "parameters": {"binary_data_output": 1}}, None, "binary_data_output", "boolean")
    bad({"inputs": [], "parameters": {"x": {}}}, None, "parameter 'x'")
    bad({"inputs": [], "parameters": {"x": 2 ** 64}}, None, "parameter 'x'", "range")
    bad({"inputs": [], "outputs": [{"name": "O", "parameters": {"binary_data": "yes"}}]}, None, "output 'O'",
        "binary_data")


# ---------------------------------------------------------------------------------------------- responses


def form(binary_default: bool = False, binary=None, shm=None) -> OutputForm:
    return OutputForm(binary_default, binary or {}, shm or {})


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("wire", ALL)
def test_response_every_datatype(wire: str, binary: bool) -> None:
    arr = sample(wire)
    body, n = encode_infer(response([("Y", wire, SHAPE, wire_bytes(wire, arr))], id="r9"), form(binary))
    assert (n is None) == (not binary)
    result = client_result(body, n)
    got = result.as_numpy("Y")
    assert got.shape == SHAPE
    if wire == "BYTES" and not binary:  # JSON carries text: the client gets str elements
        assert got.tolist() == [[b.decode() for b in row] for row in arr.tolist()]
    else:
        np.testing.assert_array_equal(got, arr)
        assert got.dtype == arr.dtype
    header = json.loads(body[:n] if n else body)
    assert header["id"] == "r9" and header["model_name"] == "m" and header["model_version"] == "1"


@pytest.mark.skipif(not CLIENT_BF16, reason="this tritonclient has no ml_dtypes BF16")
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_response_bf16(binary: bool) -> None:
    arr = np.array([[1.5, -2.25, 3.0e38], [np.inf, -0.0, 1e-38]], dtype=ml_dtypes.bfloat16)
    body, n = encode_infer(response([("Y", "BF16", arr.shape, arr.view(np.uint16).tobytes())]), form(binary))
    got = client_result(body, n).as_numpy("Y")
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.view(np.uint16), arr.view(np.uint16))


def test_response_mixed_forms_and_order() -> None:
    """Binary outputs' bytes follow the JSON in output order; JSON ones carry data; shm ones name, datatype and
    shape only (no "parameters": Triton's C++ client would read them as binary data)."""
    a, b, c, d = sample("FP32"), sample("INT16"), sample("BYTES"), sample("UINT8")
    shm = {"shared_memory_region": "r", "shared_memory_byte_size": 24, "shared_memory_offset": 8}
    r = response([("A", "FP32", SHAPE, wire_bytes("FP32", a)), ("S", "FP32", SHAPE, b""),
                  ("B", "INT16", SHAPE, wire_bytes("INT16", b)), ("C", "BYTES", SHAPE, wire_bytes("BYTES", c)),
                  ("D", "UINT8", SHAPE, wire_bytes("UINT8", d))])
    body, n = encode_infer(r, form(True, {"B": False}, {"S": shm}))
    header = json.loads(body[:n])
    assert "id" not in header
    assert [o["name"] for o in header["outputs"]] == ["A", "S", "B", "C", "D"]
    assert header["outputs"][1] == {"name": "S", "datatype": "FP32", "shape": [2, 3]}
    assert header["outputs"][2]["data"] == b.reshape(-1).tolist()
    assert body[n:] == wire_bytes("FP32", a) + wire_bytes("BYTES", c) + wire_bytes("UINT8", d)
    result = client_result(body, n)
    for name, arr in (("A", a), ("B", b), ("C", c), ("D", d)):
        np.testing.assert_array_equal(result.as_numpy(name), arr)
    assert "data" not in result.get_output("S")


def test_response_only_shared_memory_is_pure_json() -> None:
    shm = {"shared_memory_region": "r", "shared_memory_byte_size": 24}
    body, n = encode_infer(response([("S", "FP32", SHAPE, b"")]), form(True, {}, {"S": shm}))
    assert n is None and json.loads(body)["outputs"][0] == {"name": "S", "datatype": "FP32", "shape": [2, 3]}


def test_response_compact_json() -> None:
    body, n = encode_infer(response([("Y", "INT32", [2], wire_bytes("INT32", np.array([1, 2], np.int32)))]), form())
    assert n is None and body == b'{"model_name":"m","model_version":"1","outputs":[{"name":"Y","datatype":"INT32",' \
                                 b'"shape":[2],"data":[1,2]}]}'


def test_response_request_round_trip() -> None:
    """A request parsed from tritonclient, its inputs echoed as outputs in the form it asked for, reads back equal."""
    arrays = {w: sample(w) for w in ALL}
    outputs = [tritonhttp.InferRequestedOutput(w, binary_data=i % 2 == 0) for i, w in enumerate(ALL)]
    request, output_form = parse(*client_body([client_input(w, w, a, True) for w, a in arrays.items()], outputs))
    r = response([(t.name, t.datatype, list(t.shape), raw) for t, raw in zip(request.inputs,
                                                                            request.raw_input_contents)])
    result = client_result(*encode_infer(r, output_form))
    for w, arr in arrays.items():
        got = result.as_numpy(w)
        expected = arr
        if w == "BYTES" and not output_form.is_binary(w):
            expected = np.vectorize(lambda b: b.decode(), otypes=[object])(arr)
        np.testing.assert_array_equal(got, expected)


def test_response_non_utf8_bytes_in_json() -> None:
    raw = dtypes.serialize_bytes(np.array([b"ok", b"\xff\xfe"], dtype=object))
    with pytest.raises(InvalidArgument) as info:
        encode_infer(response([("OUT", "BYTES", [2], raw)]), form())
    assert "output 'OUT'" in info.value.message and "binary_data" in info.value.message
    body, n = encode_infer(response([("OUT", "BYTES", [2], raw)]), form(False, {"OUT": True}))
    assert client_result(body, n).as_numpy("OUT").tolist() == [b"ok", b"\xff\xfe"]

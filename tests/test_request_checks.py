"""Issue 18 items 5, 6 and 10: requests are checked against the model before any decoding, in work
bounded by the model (not by the request), and shared-memory parameters are parsed strictly.

No test here is timed: boundedness is shown by counting how many entries a check reads, and "no
decoding" by payloads that would fail to decode (or a decoder that fails the test when called).
"""
from __future__ import annotations

import math
import struct
import types
from typing import Optional

import numpy as np
import pytest
from google.protobuf import text_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trtserve import dtypes
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import model_config_pb2 as mc
from trtserve.server.engine.repository.model_config import ModelSpec
from trtserve.server.errors import InvalidArgument
from tests import reference_codec
from trtserve.server.frontend import codec
from trtserve.server.frontend.shm_params import ShmRef, parse_shm_ref
from trtserve.server.frontend.validation import check_request_outputs, precheck

MiB = 1 << 20


def spec_of(text: str, version: str = "1") -> ModelSpec:
    return ModelSpec.from_proto(text_format.Parse(text, mc.ModelConfig()), version)


MLP = spec_of('name: "mlp" platform: "onnxruntime_onnx" max_batch_size: 32 '
              'input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 64 ] } ] '
              'output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 16 ] } ] dynamic_batching { }')
ADD_SUB = spec_of('name: "add_sub" platform: "onnxruntime_onnx" max_batch_size: 8 '
                  'input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 16 ] }, '
                  '{ name: "INPUT1", data_type: TYPE_FP32, dims: [ 16 ] } ] '
                  'output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 16 ] }, '
                  '{ name: "OUTPUT1", data_type: TYPE_FP32, dims: [ 16 ] } ] dynamic_batching { }')


def identity_spec(name: str, wire: str, dims: str = "[ 4 ]", max_batch_size: int = 8, optional_extra=False):
    config = "TYPE_STRING" if wire == "BYTES" else f"TYPE_{wire}"
    extra = (f', {{ name: "INPUT1", data_type: {config}, dims: {dims}, optional: true }}' if optional_extra else "")
    return spec_of(f'name: "{name}" platform: "onnxruntime_onnx" max_batch_size: {max_batch_size} '
                   f'input [ {{ name: "INPUT0", data_type: {config}, dims: {dims} }}{extra} ] '
                   f'output [ {{ name: "OUTPUT0", data_type: {config}, dims: {dims} }} ]')


SPECS = {"mlp": MLP, "add_sub": ADD_SUB, "id_var": identity_spec("id_var", "FP32", "[ -1 ]"),
         "id_bytes": identity_spec("id_bytes", "BYTES", "[ -1 ]"), "s": identity_spec("s", "BYTES", "[ 2 ]")}
for _wire in ("INT8", "UINT8", "INT64", "UINT64", "BOOL", "FP64"):
    SPECS[f"id_{_wire.lower()}"] = identity_spec(f"id_{_wire.lower()}", _wire)


def mlp_req(datatype="FP32", shape=(2, 64), raw: Optional[bytes] = None) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="mlp")
    r.inputs.add(name="INPUT0", datatype=datatype, shape=list(shape))
    r.raw_input_contents.append(np.ones(shape, np.float32).tobytes() if raw is None else raw)
    return r


def new_path(spec: ModelSpec, request: pb.ModelInferRequest, max_input_bytes: Optional[int] = 64 * MiB):
    """What the new request path does: the cheap check, then decoding, then (redundantly) validation."""
    checked = precheck(spec, request, max_input_bytes)
    arrays, types_ = reference_codec.decode_inputs(request)
    rows, names = reference_codec.validate_request(spec, arrays, types_, reference_codec.requested_outputs(request, allow_shm=True))
    assert (rows, names) == (checked.rows, checked.outputs)
    return checked


def old_path(spec: ModelSpec, request: pb.ModelInferRequest):
    arrays, types_ = reference_codec.decode_inputs(request)
    return reference_codec.validate_request(spec, arrays, types_, reference_codec.requested_outputs(request))


def raises(spec, request, *words, max_input_bytes: Optional[int] = 64 * MiB) -> str:
    with pytest.raises(InvalidArgument) as e:
        precheck(spec, request, max_input_bytes)
    for w in words:
        assert w in e.value.message, f"{w!r} not in {e.value.message!r}"
    return e.value.message


class Counting(list):
    """A repeated field stand-in that counts how many entries a check read."""

    read = 0

    def __iter__(self):
        for item in list.__iter__(self):
            self.read += 1
            yield item


def counting_request(request: pb.ModelInferRequest, field: str):
    """``request`` with one repeated field replaced by a Counting list (everything else is the real message)."""
    counted = Counting(getattr(request, field))
    fake = types.SimpleNamespace(inputs=request.inputs, outputs=request.outputs,
                                 raw_input_contents=request.raw_input_contents)
    setattr(fake, field, counted)
    return fake, counted


# ---- item 5: requested outputs, linear and bounded ---------------------------------------------------------------

def test_60000_duplicate_outputs_are_rejected_after_reading_two():
    r = mlp_req()
    for _ in range(60_000):
        r.outputs.add(name="OUTPUT0")
    fake, counted = counting_request(r, "outputs")
    with pytest.raises(InvalidArgument, match="output 'OUTPUT0' is requested more than once"):
        precheck(MLP, fake, None)
    assert counted.read == 2  # bounded by the model's outputs (1) + 1, not by the request's 60,000
    with pytest.raises(InvalidArgument, match="more than once"):
        check_request_outputs(MLP, r)


def test_60000_distinct_unknown_outputs_are_rejected_at_the_first():
    r = mlp_req()
    for i in range(60_000):
        r.outputs.add(name=f"OUT{i}")
    fake, counted = counting_request(r, "outputs")
    with pytest.raises(InvalidArgument, match=r"unknown requested output 'OUT0'; the model's outputs are \['OUTPUT0'\]",
                       ):
        precheck(MLP, fake, None)
    assert counted.read == 1


def test_requested_outputs_bound_is_the_models_output_count():
    r = mlp_req(shape=(1, 16), raw=np.ones((1, 16), np.float32).tobytes())
    for name in ("OUTPUT1", "OUTPUT0", "OUTPUT1"):
        r.outputs.add(name=name)
    r.inputs[0].name = "INPUT0"
    r.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 16])
    r.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
    fake, counted = counting_request(r, "outputs")
    with pytest.raises(InvalidArgument, match="'OUTPUT1' is requested more than once"):
        precheck(ADD_SUB, fake, None)
    assert counted.read == 3 == len(ADD_SUB.outputs) + 1
    del r.outputs[2:]
    assert check_request_outputs(ADD_SUB, r) == ("OUTPUT1", "OUTPUT0")  # request order
    del r.outputs[:]
    assert check_request_outputs(ADD_SUB, r) == ("OUTPUT0", "OUTPUT1")  # none requested: all, model order


def test_codec_requested_outputs_is_linear_and_still_rejects_duplicates():
    r = pb.ModelInferRequest()
    for i in range(60_000):  # quadratic before (list membership): 1.8e9 comparisons; a set now
        r.outputs.add(name=f"o{i}")
    assert len(reference_codec.requested_outputs(r)) == 60_000
    r.outputs.add(name="o17")
    with pytest.raises(InvalidArgument, match="output 'o17' is requested more than once"):
        reference_codec.requested_outputs(r)


def test_many_unknown_inputs_are_rejected_at_the_first():
    r = pb.ModelInferRequest(model_name="mlp")
    for i in range(20_000):
        r.inputs.add(name=f"X{i}", datatype="BYTES", shape=[1 << 20])
    fake, counted = counting_request(r, "inputs")
    with pytest.raises(InvalidArgument, match=r"unexpected input 'X0'; the model's inputs are \['INPUT0'\]"):
        precheck(MLP, fake, None)
    assert counted.read == 1


def test_many_copies_of_a_known_input_are_rejected_at_the_second():
    r = mlp_req()
    for _ in range(20_000):
        r.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 64])
    fake, counted = counting_request(r, "inputs")
    with pytest.raises(InvalidArgument, match="input 'INPUT0' appears more than once"):
        precheck(MLP, fake, None)
    assert counted.read == 2


def test_a_huge_unknown_name_is_cut_in_the_message():
    r = mlp_req()
    r.inputs[0].name = "n" * 100_000
    assert len(raises(MLP, r, "unexpected input", "characters cut")) < 1000


# ---- item 6: nothing is decoded before the model's expectations are checked ---------------------------------------

def _bytes_payload(count: int, element: int) -> bytes:
    one = struct.pack("<I", element) + b"x" * element
    return one * count


def test_bytes_for_an_fp32_model_is_refused_on_its_datatype_without_decoding(monkeypatch):
    # 16 MiB of well-formed BYTES (the 3.2 s stall) for a model that takes FP32
    raw = _bytes_payload(128, 16 * MiB // 128 - 4)
    assert len(raw) == 16 * MiB

    def no_decoding(*a, **k):
        raise AssertionError("precheck decoded BYTES")

    monkeypatch.setattr(dtypes, "deserialize_bytes", no_decoding)
    raises(MLP, mlp_req("BYTES", (2, 64), raw), "input 'INPUT0' has datatype BYTES, expected FP32")


def test_malformed_bytes_with_the_wrong_datatype_gets_the_datatype_error():
    # enough bytes for the 128 length prefixes, but the prefixes are garbage: decoding would fail
    raw = b"\xff\xff\xff\xff" * 128 + b"junk"
    with pytest.raises(InvalidArgument, match="malformed BYTES"):
        reference_codec.decode_inputs(mlp_req("BYTES", (2, 64), raw))  # what decoding first used to answer
    msg = raises(MLP, mlp_req("BYTES", (2, 64), raw), "INPUT0", "datatype BYTES", "expected FP32")
    assert "malformed" not in msg


def test_bytes_shape_far_larger_than_its_data_is_refused_on_the_prefix_count():
    raises(MLP, mlp_req("BYTES", (1 << 30,), b"\0\0\0\0"), "INPUT0", "BYTES", "runs past the end", "got 4 bytes")


def test_fixed_size_raw_byte_count_is_checked():
    raises(MLP, mlp_req(raw=bytes(508)), "INPUT0", "508", "512")
    raises(MLP, mlp_req(raw=bytes(513)), "INPUT0", "513", "512")


def _shm_input(r: pb.ModelInferRequest, name: str, datatype: str, shape, region="r", byte_size=None, offset=None):
    t = r.inputs.add(name=name, datatype=datatype, shape=list(shape))
    t.parameters["shared_memory_region"].string_param = region
    if byte_size is not None:
        t.parameters["shared_memory_byte_size"].int64_param = byte_size
    if offset is not None:
        t.parameters["shared_memory_offset"].int64_param = offset
    return t


def test_tiny_request_pointing_at_64_mib_of_shared_memory_is_refused_by_the_size_limit():
    spec = SPECS["id_bytes"]
    r = pb.ModelInferRequest(model_name="id_bytes")
    _shm_input(r, "INPUT0", "BYTES", (1, 1000), byte_size=64 * MiB)
    assert r.ByteSize() < 100  # the 92-byte request
    raises(spec, r, "input 'INPUT0'", f"{64 * MiB}", "max_input_bytes", f"{4 * MiB}", max_input_bytes=4 * MiB)
    checked = precheck(spec, r, 64 * MiB)  # within the limit: accepted, nothing read yet
    assert checked.input_shm == {"INPUT0": ShmRef("r", 0, 64 * MiB)} and checked.shm_bytes == 64 * MiB


def test_shared_memory_limit_counts_all_inputs_together():
    r = pb.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        _shm_input(r, name, "FP32", (8, 16), byte_size=8 * 16 * 4)
    assert precheck(ADD_SUB, r, 1024).shm_bytes == 1024
    raises(ADD_SUB, r, "input 'INPUT1'", "1024", "max_input_bytes", max_input_bytes=1023)


def test_shared_memory_byte_size_must_match_the_shape():
    r = pb.ModelInferRequest(model_name="mlp")
    _shm_input(r, "INPUT0", "FP32", (2, 64), byte_size=508)
    raises(MLP, r, "INPUT0", "shared memory byte size 508 does not match shape [2, 64] of FP32", "512 bytes")
    r = pb.ModelInferRequest(model_name="id_bytes")
    _shm_input(r, "INPUT0", "BYTES", (1, 1000), byte_size=3999)
    raises(SPECS["id_bytes"], r, "INPUT0", "3999", "at least 4000 bytes")


def test_shared_memory_input_and_typed_contents_are_exclusive():
    r = pb.ModelInferRequest(model_name="mlp")
    t = _shm_input(r, "INPUT0", "FP32", (1, 64), byte_size=256)
    t.contents.fp32_contents.extend([1.0] * 64)
    raises(MLP, r, "INPUT0", "typed contents and a shared memory region")


def test_raw_entries_belong_to_the_inputs_not_in_shared_memory():
    r = pb.ModelInferRequest(model_name="add_sub")
    _shm_input(r, "INPUT0", "FP32", (1, 16), byte_size=64)
    r.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 16])
    r.raw_input_contents.append(bytes(64))
    checked = precheck(ADD_SUB, r, None)
    assert checked.rows == 1 and set(checked.input_shm) == {"INPUT0"}
    r.raw_input_contents.append(bytes(64))
    raises(ADD_SUB, r, "raw_input_contents has 2 entries", "1 inputs not in shared memory")


def test_shared_memory_refused_when_not_allowed():
    r = pb.ModelInferRequest(model_name="mlp")
    _shm_input(r, "INPUT0", "FP32", (1, 64), byte_size=256)
    with pytest.raises(InvalidArgument, match="input 'INPUT0': shared memory inputs are not supported"):
        precheck(MLP, r, None, allow_shm=False)
    r = mlp_req()
    o = r.outputs.add(name="OUTPUT0")
    o.parameters["shared_memory_region"].string_param = "out"
    o.parameters["shared_memory_byte_size"].int64_param = 128
    with pytest.raises(InvalidArgument, match="output 'OUTPUT0': shared memory outputs are not supported"):
        precheck(MLP, r, None, allow_shm=False)
    assert precheck(MLP, r, None).output_shm == {"OUTPUT0": ShmRef("out", 0, 128)}


def test_model_checks_before_decoding():
    raises(MLP, mlp_req("FP64", raw=bytes(1024)), "INPUT0", "datatype FP64", "expected FP32")
    raises(MLP, mlp_req(shape=(128,)), "INPUT0", "rank 1")
    raises(MLP, mlp_req(shape=(4, 32)), "INPUT0", "[4, 32]", "dim 1 must be 64")
    raises(MLP, mlp_req(shape=(33, 64)), "INPUT0", "batch size 33", "max_batch_size 32")
    raises(MLP, mlp_req(shape=(0, 64), raw=b""), "INPUT0", "batch size 0")
    raises(MLP, pb.ModelInferRequest(model_name="mlp"), "missing input(s) ['INPUT0']")
    r = pb.ModelInferRequest(model_name="add_sub")
    for name, rows in (("INPUT0", 2), ("INPUT1", 3)):
        r.inputs.add(name=name, datatype="FP32", shape=[rows, 16])
        r.raw_input_contents.append(bytes(rows * 64))
    raises(ADD_SUB, r, "input 'INPUT1' has batch size 3 but other inputs have 2")
    raises(SPECS["id_var"], _one(SPECS["id_var"], "FP32", (1, 0), b""), "INPUT0", "variable dim 1 is 0")


def _one(spec, datatype, shape, raw):
    r = pb.ModelInferRequest(model_name=spec.name)
    r.inputs.add(name="INPUT0", datatype=datatype, shape=list(shape))
    if raw is not None:
        r.raw_input_contents.append(raw)
    return r


def test_result_carries_what_the_decoder_and_batcher_need():
    checked = new_path(MLP, mlp_req(shape=(3, 64)))
    assert checked.rows == 3 and checked.outputs == ("OUTPUT0",)
    assert dict(checked.shapes) == {"INPUT0": (3, 64)} and dict(checked.datatypes) == {"INPUT0": "FP32"}
    assert not checked.input_shm and not checked.output_shm and checked.shm_bytes == 0
    nb = identity_spec("nb", "INT8", "[ 2, -1 ]", max_batch_size=0, optional_extra=True)
    r = _one(nb, "INT8", (2, 5), bytes(10))
    checked = new_path(nb, r)
    assert checked.rows == 1 and dict(checked.shapes) == {"INPUT0": (2, 5)}  # optional INPUT1 may be left out


def test_typed_contents_are_checked_without_converting_them():
    r = pb.ModelInferRequest(model_name="mlp")
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 64]).contents.fp32_contents.extend([1.0] * 5)
    raises(MLP, r, "INPUT0", "contents.fp32_contents has 5 elements", "needs 128")
    r.inputs[0].contents.int_contents.append(1)
    raises(MLP, r, "INPUT0", "contents.fp32_contents", "contents.int_contents")


# ---- item 10: shared-memory parameters ----------------------------------------------------------------------------

def _params(**kinds) -> pb.InferParameter:
    t = pb.ModelInferRequest.InferInputTensor()
    for key, (kind, value) in kinds.items():
        setattr(t.parameters[f"shared_memory_{key}"], kind, value)
    return t.parameters


def test_parse_shm_ref():
    assert parse_shm_ref(_params(), "input 'A'") is None
    ref = parse_shm_ref(_params(region=("string_param", "r"), byte_size=("uint64_param", 64),
                                offset=("int64_param", 8)), "input 'A'")
    assert ref == ShmRef("r", 8, 64)
    with pytest.raises(Exception):
        ref.region = "other"  # frozen
    for params, words in [
        (_params(byte_size=("int64_param", 64)), "parameter 'shared_memory_byte_size' without 'shared_memory_region'"),
        (_params(offset=("int64_param", 0)), "parameter 'shared_memory_offset' without 'shared_memory_region'"),
        (_params(region=("int64_param", 3), byte_size=("int64_param", 64)),
         "parameter 'shared_memory_region' must be a string (region name), got int64_param"),
        (_params(region=("bool_param", True), byte_size=("int64_param", 64)),
         "must be a string (region name), got bool_param"),
        (_params(region=("string_param", ""), byte_size=("int64_param", 64)), "must be a non-empty string"),
        (_params(region=("string_param", "r")), "'shared_memory_byte_size' is required"),
        (_params(region=("string_param", "r"), byte_size=("string_param", "64")), "must be an integer"),
        (_params(region=("string_param", "r"), byte_size=("int64_param", -1)), "must be >= 0, got -1"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            parse_shm_ref(params, "input 'A'")
        assert "input 'A'" in e.value.message and words in e.value.message, e.value.message


def test_region_without_a_value_is_named():
    t = pb.ModelInferRequest.InferInputTensor()
    t.parameters["shared_memory_region"].SetInParent()
    t.parameters["shared_memory_byte_size"].int64_param = 4
    with pytest.raises(InvalidArgument, match="must be a string \\(region name\\), got no value"):
        parse_shm_ref(t.parameters, "input 'A'")


def test_byte_size_without_region_is_an_error_on_every_path():
    r = mlp_req()
    r.inputs[0].parameters["shared_memory_byte_size"].int64_param = 512
    raises(MLP, r, "input 'INPUT0'", "'shared_memory_byte_size' without 'shared_memory_region'")
    with pytest.raises(InvalidArgument, match="'shared_memory_byte_size' without"):
        reference_codec.decode_inputs(r)  # the old path, without shared memory support
    with pytest.raises(InvalidArgument, match="'shared_memory_byte_size' without"):
        reference_codec.decode_inputs(r, shm_reader=lambda *a: None)  # and with it
    r = mlp_req()
    r.outputs.add(name="OUTPUT0").parameters["shared_memory_offset"].int64_param = 0
    raises(MLP, r, "output 'OUTPUT0'", "'shared_memory_offset' without")
    for allow in (False, True):
        with pytest.raises(InvalidArgument, match="output 'OUTPUT0'.*'shared_memory_offset' without"):
            reference_codec.requested_outputs(r, allow_shm=allow)


def test_integer_region_name_gets_a_clear_message():
    r = pb.ModelInferRequest(model_name="mlp")
    t = r.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 64])
    t.parameters["shared_memory_region"].int64_param = 7
    t.parameters["shared_memory_byte_size"].int64_param = 256
    raises(MLP, r, "input 'INPUT0'", "must be a string (region name), got int64_param")


# ---- the existing bad-input tables give the same answers through precheck -------------------------------------

SERVICE_LEVEL = ("priority", "timeout", "sequence", "nope", "version")  # checked by the service, not here


def _existing_cases():
    try:
        from tests import test_bad_inputs as bad
        from tests import test_errors as errs
    except Exception as e:  # those modules import the server, which may be mid-rewrite
        pytest.skip(f"cannot import the bad-input tables: {e}")
    cases = []
    for case, request, code, words in errs.CASES:
        if code.name == "INVALID_ARGUMENT" and not any(w in case for w in SERVICE_LEVEL):
            cases.append((f"errors: {case}", request, words))
    for table in (bad.DATATYPE_CASES, bad.TYPED_CASES, bad.MIXED_CASES, bad.EMPTY_CASES):
        cases.extend((f"bad: {c}", r, w) for c, r, w in table)
    for case, raw, words in bad.BYTES_CASES:
        if "UTF-8" in words:  # the ONNX Runtime backend's check, at inference
            continue
        cases.append((f"bytes: {case}", bad._empty("id_bytes", "BYTES", (2, 3), raw=raw), ["INPUT0"] + words))
    cases.extend((f"param: {c}", r, w) for c, r, w in bad.PARAM_CASES if "shared memory" in c)
    for shape in [(1 << 30,), (1, 1 << 36), (1 << 20, 1 << 20)]:
        cases.append((f"tiny bytes {shape}", bad.mlp_req(datatype="BYTES", shape=shape, raw=b"\0\0\0\0"),
                      ["INPUT0", "BYTES", "runs past the end", "got 4 bytes"]))
    return cases


def test_existing_bad_input_tables_keep_their_messages_through_precheck():
    """Each table case, as the new path runs it (precheck, then decode, then validate), fails with the words
    its end-to-end test expects; the cases that precheck itself answers are most of them."""
    answered_by_precheck = 0
    cases = _existing_cases()
    assert len(cases) > 150
    for case, request, words in cases:
        spec = SPECS[request.model_name]
        try:
            precheck(spec, request, 64 * MiB)
        except InvalidArgument as e:
            answered_by_precheck += 1
            message = e.message
        else:
            with pytest.raises(InvalidArgument) as e:
                new_path(spec, request)
            message = e.value.message
        for w in words:
            assert w in message, f"{case}: {w!r} not in {message!r}"
    # only what needs the data itself is left to decoding: BYTES prefixes past the lower bound
    assert answered_by_precheck >= len(cases) - 12, answered_by_precheck


# ---- property: precheck accepts exactly what the old path accepted --------------------------------------------------

PROPERTY_SPECS = [MLP, ADD_SUB, SPECS["id_bytes"], SPECS["id_int8"], SPECS["id_uint64"],
                  identity_spec("nb", "INT8", "[ 2, -1 ]", max_batch_size=0, optional_extra=True)]


def _rarely(draw, one_in: int = 8) -> bool:
    return draw(st.integers(0, one_in - 1)) == 0


@st.composite
def model_requests(draw):
    """Mostly-valid requests for one of PROPERTY_SPECS, each part wrong now and then."""
    spec = draw(st.sampled_from(PROPERTY_SPECS))
    r = pb.ModelInferRequest(model_name=spec.name)
    rows = None
    if spec.batches:
        rows = draw(st.integers(0, spec.max_batch_size + 1) if _rarely(draw) else st.integers(1, spec.max_batch_size))
    names = [t.name for t in spec.inputs if not t.optional or draw(st.booleans())]
    if _rarely(draw):
        names = draw(st.lists(st.sampled_from([t.name for t in spec.inputs] + ["X"]), max_size=3))
    use_raw = draw(st.booleans())
    for name in names:
        t_spec = spec.input(name)
        wire = t_spec.datatype if t_spec is not None and not _rarely(draw) else draw(st.sampled_from(
            list(dtypes.BY_WIRE) + ["fp32"]))
        dims = [d if d != -1 else draw(st.integers(0 if _rarely(draw) else 1, 3))
                for d in (t_spec.dims if t_spec else (4,))]
        shape = ([rows] if rows is not None else []) + dims
        if _rarely(draw):
            shape = draw(st.lists(st.integers(-1, 5), max_size=3))
        t = r.inputs.add(name=name, datatype=wire, shape=shape)
        dt = dtypes.BY_WIRE.get(wire)
        count = math.prod(shape) if shape and min(shape) >= 0 else 1
        if use_raw:
            if dt is not None and not _rarely(draw) and count < 200:
                if dt.wire == "BYTES":
                    raw = dtypes.serialize_bytes(np.array([b"ab"] * count, object))
                else:
                    raw = bytes(count * dt.itemsize)
                if _rarely(draw):
                    raw = raw[:-1] if raw else b"\0"
            else:
                raw = draw(st.binary(max_size=20))
            r.raw_input_contents.append(raw)
        elif dt is not None and dt.contents_field and not _rarely(draw):
            field = dt.contents_field if not _rarely(draw) else draw(st.sampled_from(codec._CONTENT_FIELDS))
            n = count if not _rarely(draw) and count < 200 else draw(st.integers(0, 5))
            value = {"bytes_contents": b"a", "fp32_contents": 1.0, "fp64_contents": 1.0,
                     "bool_contents": True}.get(field, draw(st.sampled_from([0, 1, 200, 70000])))
            getattr(t.contents, field).extend([value] * n)
    if use_raw and _rarely(draw):
        r.raw_input_contents.append(b"")
    if draw(st.booleans()):
        outs = [t.name for t in spec.outputs]
        for name in draw(st.lists(st.sampled_from(outs + ["Y"]) if _rarely(draw) else st.sampled_from(outs),
                                  max_size=len(outs), unique=not _rarely(draw))):
            r.outputs.add(name=name)
    return spec, r


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_requests())
def test_precheck_then_decode_accepts_exactly_what_decode_then_validate_accepted(case):
    spec, request = case
    try:
        old = old_path(spec, request)
    except InvalidArgument:
        old = None
    try:
        checked = precheck(spec, request, None)
    except InvalidArgument as e:
        assert old is None, f"precheck refused what the old path accepted: {e.message}"
        return
    if old is not None:
        assert (checked.rows, checked.outputs) == old
        new_path(spec, request, None)
        return
    # precheck passed but the old path refused: only the data itself can be at fault (BYTES contents)
    with pytest.raises(InvalidArgument, match="BYTES"):
        reference_codec.decode_inputs(request)

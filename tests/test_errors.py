"""Every malformed request gets the right status and a message naming the problem, and the server
answers the next valid request correctly (table-driven, raw gRPC stubs so nothing is pre-checked)."""
from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest

from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc
from trtserve.server.examples.make_mlp import reference

OK = np.ones((2, 64), np.float32)


def req(model="mlp", version="", name="INPUT0", datatype="FP32", shape=(2, 64), raw=None, **fields):
    r = pb.ModelInferRequest(model_name=model, model_version=version, **fields)
    r.inputs.add(name=name, datatype=datatype, shape=list(shape))
    r.raw_input_contents.append(OK.tobytes() if raw is None else raw)
    return r


def with_param(r, key, **value):
    for k, v in value.items():
        setattr(r.parameters[key], k, v)
    return r


def typed(field, values, datatype="FP32", shape=(2, 64)):
    r = pb.ModelInferRequest(model_name="mlp")
    t = r.inputs.add(name="INPUT0", datatype=datatype, shape=list(shape))
    getattr(t.contents, field).extend(values)
    return r


def two_inputs():
    r = req()
    r.inputs.add(name="EXTRA", datatype="FP32", shape=[2, 64])
    r.raw_input_contents.append(OK.tobytes())
    return r


def duplicate_input():
    r = req()
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 64])
    r.raw_input_contents.append(OK.tobytes())
    return r


def mixed_raw_and_typed():
    r = req()
    r.inputs[0].contents.fp32_contents.extend([1.0] * 128)
    return r


def missing_input():
    return pb.ModelInferRequest(model_name="mlp")


def raw_count_mismatch():
    r = req()
    r.raw_input_contents.append(b"")
    return r


def unknown_output():
    r = req()
    r.outputs.add(name="NOPE")
    return r


def duplicate_output():
    r = req()
    r.outputs.add(name="OUTPUT0")
    r.outputs.add(name="OUTPUT0")
    return r


def no_data():
    r = pb.ModelInferRequest(model_name="mlp")
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 64])
    return r


CASES = [
    # (case id, request, status, words the message must contain)
    ("unknown model", req(model="nope"), grpc.StatusCode.NOT_FOUND, ["nope"]),
    ("unknown version", req(version="7"), grpc.StatusCode.NOT_FOUND, ["version", "7"]),
    ("missing input", missing_input(), grpc.StatusCode.INVALID_ARGUMENT, ["missing", "INPUT0"]),
    ("unknown input", req(name="X"), grpc.StatusCode.INVALID_ARGUMENT, ["unexpected input 'X'", "INPUT0"]),
    ("extra input", two_inputs(), grpc.StatusCode.INVALID_ARGUMENT, ["EXTRA"]),
    ("duplicate input", duplicate_input(), grpc.StatusCode.INVALID_ARGUMENT, ["INPUT0", "more than once"]),
    ("unknown datatype", req(datatype="FP128"), grpc.StatusCode.INVALID_ARGUMENT, ["FP128", "INPUT0"]),
    ("wrong datatype", req(datatype="FP64", raw=np.ones((2, 64)).tobytes()), grpc.StatusCode.INVALID_ARGUMENT,
     ["INPUT0", "FP64", "FP32"]),
    ("wrong rank", req(shape=(128,), raw=OK.tobytes()), grpc.StatusCode.INVALID_ARGUMENT, ["INPUT0", "rank"]),
    ("wrong dim", req(shape=(4, 32), raw=OK.tobytes()), grpc.StatusCode.INVALID_ARGUMENT, ["INPUT0", "[4, 32]", "64"]),
    ("negative dim", req(shape=(-2, 64)), grpc.StatusCode.INVALID_ARGUMENT, ["INPUT0", "negative"]),
    ("huge dims", req(shape=(1 << 30, 1 << 30)), grpc.StatusCode.INVALID_ARGUMENT, ["INPUT0", "elements"]),
    ("raw too short", req(raw=OK.tobytes()[:-4]), grpc.StatusCode.INVALID_ARGUMENT, ["INPUT0", "508", "512"]),
    ("raw too long", req(raw=OK.tobytes() + b"\0"), grpc.StatusCode.INVALID_ARGUMENT, ["INPUT0", "513", "512"]),
    ("raw count mismatch", raw_count_mismatch(), grpc.StatusCode.INVALID_ARGUMENT, ["raw_input_contents", "2"]),
    ("mixed raw and typed", mixed_raw_and_typed(), grpc.StatusCode.INVALID_ARGUMENT, ["INPUT0", "raw"]),
    ("typed wrong field", typed("int_contents", [1] * 128), grpc.StatusCode.INVALID_ARGUMENT,
     ["INPUT0", "fp32_contents", "int_contents"]),
    ("typed wrong count", typed("fp32_contents", [1.0] * 5), grpc.StatusCode.INVALID_ARGUMENT, ["INPUT0", "5", "128"]),
    ("no data", no_data(), grpc.StatusCode.INVALID_ARGUMENT, ["INPUT0", "no data"]),
    ("empty batch", req(shape=(0, 64), raw=b""), grpc.StatusCode.INVALID_ARGUMENT, ["INPUT0", "batch size 0"]),
    ("batch over max", req(shape=(33, 64), raw=np.ones((33, 64), np.float32).tobytes()),
     grpc.StatusCode.INVALID_ARGUMENT, ["INPUT0", "33", "max_batch_size 32"]),
    ("unknown output", unknown_output(), grpc.StatusCode.INVALID_ARGUMENT, ["NOPE", "OUTPUT0"]),
    ("duplicate output", duplicate_output(), grpc.StatusCode.INVALID_ARGUMENT, ["OUTPUT0", "more than once"]),
    ("bad priority type", with_param(req(), "priority", string_param="high"), grpc.StatusCode.INVALID_ARGUMENT,
     ["priority"]),
    ("negative priority", with_param(req(), "priority", int64_param=-1), grpc.StatusCode.INVALID_ARGUMENT,
     ["priority"]),
    ("priority out of range", with_param(req(), "priority", uint64_param=9), grpc.StatusCode.INVALID_ARGUMENT,
     ["priority 9"]),
    ("bad timeout type", with_param(req(), "timeout", double_param=1.5), grpc.StatusCode.INVALID_ARGUMENT, ["timeout"]),
    ("sequence id", with_param(req(), "sequence_id", int64_param=5), grpc.StatusCode.INVALID_ARGUMENT, ["sequence"]),
]


@pytest.fixture(scope="module")
def stub(example_server):
    with grpc.insecure_channel(example_server.url) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


@pytest.mark.parametrize("case,request_,code,words", CASES, ids=[c[0] for c in CASES])
def test_bad_request(stub, case, request_, code, words):
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request_, timeout=10)
    assert e.value.code() == code, e.value.details()
    for w in words:
        assert w in e.value.details(), f"{case}: {w!r} not in {e.value.details()!r}"
    good = req()  # the server answers the next valid request correctly
    out = np.frombuffer(stub.ModelInfer(good, timeout=10).raw_output_contents[0], np.float32).reshape(2, 16)
    np.testing.assert_allclose(out, reference(OK), rtol=1e-5, atol=1e-5)


def test_corrupt_bytes_prefix(tmp_path, serve_repo):
    from tests import models

    models.identity(tmp_path, "s", "BYTES", dims="[ 2 ]")
    s = serve_repo(tmp_path, metrics=False)
    good = struct.pack("<I", 1) + b"a" + struct.pack("<I", 2) + b"bc"
    with grpc.insecure_channel(s.url) as ch:
        st = pb_grpc.GRPCInferenceServiceStub(ch)
        for raw, words in ((struct.pack("<I", 100) + b"a", ["BYTES", "runs past"]),
                           (good + b"zz", ["after its 2 elements"]), (b"\x01", ["BYTES"]),
                           (struct.pack("<I", 1) + b"\xff" + struct.pack("<I", 1) + b"a", ["UTF-8"])):
            r = pb.ModelInferRequest(model_name="s")
            r.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 2])
            r.raw_input_contents.append(raw)
            with pytest.raises(grpc.RpcError) as e:
                st.ModelInfer(r, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert all(w in e.value.details() for w in words), e.value.details()
        r = pb.ModelInferRequest(model_name="s")
        r.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 2])
        r.raw_input_contents.append(good)
        resp = st.ModelInfer(r, timeout=10)
        assert resp.raw_output_contents[0] == good


def test_model_not_ready_is_unavailable(tmp_path, serve_repo):
    from tests import models

    models.write_config(tmp_path, "broken", 'name: "broken"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 4\n')
    (tmp_path / "broken" / "1").mkdir(parents=True)
    s = serve_repo(tmp_path, metrics=False, exit_on_error=False)
    with grpc.insecure_channel(s.url) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req(model="broken"), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "broken" in e.value.details() and "not ready" in e.value.details()


def test_tritonclient_sees_status_and_message(triton_client):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    inp = grpcclient.InferInput("INPUT0", [1, 63], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 63), np.float32))
    with pytest.raises(InferenceServerException) as e:
        triton_client.infer("mlp", [inp])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "INPUT0" in e.value.message() and "[1, 63]" in e.value.message()

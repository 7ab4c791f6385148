"""Request plans (server/frontend/plans.py): a plain request's check and arena layout, kept per model version and
signature, give every request the verdict and the descriptors the general path (precheck, then ``_stage``) gives it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from trtserve.protos import grpc_service_pb2 as pb
from trtserve.server.errors import InvalidArgument
from trtserve.server.frontend import plans as plans_mod
from trtserve.server.frontend.plans import Plans, signature
from trtserve.server.frontend.service import InferenceService
from trtserve.server.frontend.validation import precheck
from trtserve.server.ipc.arena import Allocator, Arena
from tests.test_request_checks import (ADD_SUB, MLP, counting_request, identity_spec, mlp_req, model_requests,
                                      spec_of)

MiB = 1 << 20


class _Engine:
    """What ``InferenceService._stage`` uses of the engine client: the arena and its allocator."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.allocator = Allocator(arena.size)
        self.inflight = 0


@pytest.fixture
def arena():
    a = Arena.create(1 << 20)
    yield a
    a.close()


def _general(service: InferenceService, spec, request: pb.ModelInferRequest):
    """The general path: precheck, then ``_stage``."""
    checked = precheck(spec, request, 64 * MiB)
    return checked, service._stage(spec, request, checked)


def _relative(descriptors: tuple, base: int) -> tuple:
    """Descriptors with arena offsets made relative to their block, to compare two blocks' staging."""
    inputs, outputs = descriptors
    return (tuple((n, w, s, (src[0], src[1] - base, src[2])) for n, w, s, src in inputs),
            tuple((n, shm, None if slot is None else (slot[0] - base, slot[1])) for n, shm, slot in outputs))


def _stage_both(service: InferenceService, arena: Arena, spec, request: pb.ModelInferRequest, plans: Plans):
    """Stages ``request`` both ways; returns (plan or None, general (checked, block, inputs, outputs) or the error of
    each path)."""
    datas: list = []
    try:
        plan = plans.find(spec, request, 64 * MiB, datas)
        plan_error: Optional[str] = None
    except InvalidArgument as e:
        plan, plan_error = None, e.message
    try:
        checked, (block, inputs, outputs) = _general(service, spec, request)
        general_error: Optional[str] = None
    except InvalidArgument as e:
        checked, block, inputs, outputs, general_error = None, None, (), (), e.message
    return plan, plan_error, datas, checked, block, inputs, outputs, general_error


SHARED = Plans()  # across examples: later requests of a shape seen before take its kept plan


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(model_requests())
def test_a_plan_gives_every_request_the_general_paths_verdict_and_staging(arena, case):
    spec, request = case
    service = InferenceService.__new__(InferenceService)
    service._engine = _Engine(arena)
    for _ in range(2):  # the first find may check and keep, the second takes what was kept
        plan, plan_error, datas, checked, block, inputs, outputs, general_error = _stage_both(
            service, arena, spec, request, SHARED)
        if plan is None and plan_error is None:  # not plain: the general path handles it, as before
            assert signature(request, [], len(spec.inputs), len(spec.outputs)) is None
            break
        assert plan_error == general_error, (plan_error, general_error)
        if general_error is not None:
            break
        assert plan is not None and checked is not None
        assert (plan.checked.rows, plan.checked.outputs, dict(plan.checked.shapes), dict(plan.checked.datatypes)) \
            == (checked.rows, checked.outputs, dict(checked.shapes), dict(checked.datatypes))
        assert not plan.checked.input_shm and not plan.checked.output_shm
        other = service._engine.allocator.alloc(plan.total) if plan.total else None
        staged = plan.stage(arena, other, datas)
        assert _relative(staged, other or 0) == _relative((inputs, outputs), block or 0)
        for (_n, _w, _s, src), (_n2, _w2, _s2, src2) in zip(staged[0], inputs):  # the same bytes, each in its block
            assert bytes(arena.view(src[1], src[2])) == bytes(arena.view(src2[1], src2[2]))
        for b in (block, other):
            if b is not None:
                service._engine.allocator.free(b)


def test_same_shape_other_data_reuses_the_plan_and_stages_the_new_bytes(arena):
    plans = Plans()
    first, second = mlp_req(raw=np.zeros((2, 64), np.float32).tobytes()), mlp_req(
        raw=np.arange(128, dtype=np.float32).tobytes())
    d1: list = []
    d2: list = []
    p1 = plans.find(MLP, first, None, d1)
    p2 = plans.find(MLP, second, None, d2)
    assert p1 is p2 is not None and p1.total == 2 * 64 * 4 + 2 * 16 * 4
    inputs, outputs = p2.stage(arena, 4096, d2)
    (_name, wire, shape, (_kind, at, n)), = inputs
    assert (wire, shape, at, n) == ("FP32", (2, 64), 4096, 512)
    assert np.array_equal(np.frombuffer(bytes(arena.view(at, n)), np.float32), np.arange(128, dtype=np.float32))
    assert outputs == (("OUTPUT0", None, (4096 + 512, 128)),)


def test_a_refused_request_is_never_kept_and_a_later_one_of_its_shape_is_checked_again():
    plans = Plans()
    bad = mlp_req(raw=b"\0" * 100)  # 100 bytes where [2, 64] FP32 needs 512
    for _ in range(2):
        with pytest.raises(InvalidArgument, match="raw_input_contents holds 100 bytes"):
            plans.find(MLP, bad, None, [])
    assert plans.find(MLP, mlp_req(), None, []) is not None
    with pytest.raises(InvalidArgument, match="raw_input_contents holds 100 bytes"):  # its length is in the key
        plans.find(MLP, bad, None, [])
    with pytest.raises(InvalidArgument, match="batch size 33"):
        plans.find(MLP, mlp_req(shape=(33, 64), raw=b"\0" * 33 * 64 * 4), None, [])


def test_a_reloaded_model_checks_again():
    plans = Plans()
    assert plans.find(MLP, mlp_req(), None, []) is not None
    narrower = spec_of('name: "mlp" platform: "onnxruntime_onnx" max_batch_size: 32 '
                       'input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 32 ] } ] '
                       'output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 16 ] } ] dynamic_batching { }')
    with pytest.raises(InvalidArgument, match="dim 1 must be 32"):
        plans.find(narrower, mlp_req(), None, [])


def test_only_plain_requests_have_a_signature():
    assert signature(mlp_req(), [], 1, 1) is not None
    shm = mlp_req()
    shm.inputs[0].parameters["shared_memory_region"].string_param = "r"
    out_param = mlp_req()
    out_param.outputs.add(name="OUTPUT0").parameters["classification"].int64_param = 3
    typed = pb.ModelInferRequest(model_name="mlp")
    typed.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend([0.0] * 64)
    strings = pb.ModelInferRequest(model_name="s")
    strings.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 2])
    strings.raw_input_contents.append(b"\1\0\0\0a\1\0\0\0b")
    for request in (shm, out_param, typed, strings):
        assert signature(request, [], 2, 2) is None
    datas: list = []
    two = pb.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        two.inputs.add(name=name, datatype="FP32", shape=[1, 16])
        two.raw_input_contents.append(b"\0" * 64)
    two.outputs.add(name="OUTPUT1")
    assert signature(two, datas, 2, 2) == ((("INPUT0", "FP32", (1, 16)), ("INPUT1", "FP32", (1, 16))), (64, 64),
                                     ("OUTPUT1",))
    assert datas == [b"\0" * 64] * 2
    assert Plans().find(ADD_SUB, two, None, []).outputs == (("OUTPUT1", None, 128, 64),)


def test_a_request_without_one_raw_entry_per_input_is_left_to_precheck():
    none = pb.ModelInferRequest(model_name="mlp")
    none.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 64])
    extra = mlp_req()
    extra.raw_input_contents.append(b"")
    for request in (none, extra):
        assert Plans().find(MLP, request, None, []) is None
        with pytest.raises(InvalidArgument):
            precheck(MLP, request, None)


def test_a_request_larger_than_the_model_is_left_to_precheck_unread():
    """The signature reads no entry of a request with more inputs or outputs than the model has: precheck then
    refuses it in work bounded by the model (test_request_checks.py counts that)."""
    many_outputs = mlp_req()
    for _ in range(60000):
        many_outputs.outputs.add(name="OUTPUT0")
    fake, counted = counting_request(many_outputs, "outputs")
    assert signature(fake, [], 1, 1) is None and counted.read == 0
    many_inputs = pb.ModelInferRequest(model_name="mlp")
    for _ in range(60000):
        many_inputs.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 64])
        many_inputs.raw_input_contents.append(b"")
    fake, counted = counting_request(many_inputs, "inputs")
    datas: list = []
    assert signature(fake, datas, 1, 1) is None and counted.read == 0 and datas == []


def test_kept_plans_are_bounded(monkeypatch):
    monkeypatch.setattr(plans_mod, "MAX_SIGNATURES", 4)
    plans = Plans()
    spec = identity_spec("id_var", "FP32", "[ -1 ]")
    for width in range(1, 11):
        r = pb.ModelInferRequest(model_name="id_var")
        r.inputs.add(name="INPUT0", datatype="FP32", shape=[1, width])
        r.raw_input_contents.append(b"\0" * 4 * width)
        assert plans.find(spec, r, None, []) is not None
        assert len(plans._models[id(spec)][1]) <= 4

"""The committed stubs are fresh, and every message is wire-identical to tritonclient's."""
from __future__ import annotations

import importlib

import pytest

from trtserve.protos import generate
from trtserve.protos import grpc_service_pb2 as ours_svc
from trtserve.protos import model_config_pb2 as ours_cfg


def test_generated_stubs_are_fresh():
    pytest.importorskip("grpc_tools")
    import grpc_tools

    version = getattr(importlib.import_module("grpc_tools"), "__version__", None)
    if version is None:
        from importlib.metadata import version as v

        version = v("grpcio-tools")
    if version != generate.GRPC_TOOLS_VERSION:
        pytest.fail(f"grpcio-tools {version} is installed but the stubs are generated with "
                    f"{generate.GRPC_TOOLS_VERSION}; install grpcio-tools=={generate.GRPC_TOOLS_VERSION}")
    assert generate.main(["--check"]) == 0, "stale stubs: run python -m trtserve.protos.generate"
    assert grpc_tools  # imported for the version check


def _fields(desc):
    return {f.name: (f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else None,
                     f.enum_type.full_name if f.enum_type else None) for f in desc.fields}


def _messages(file_desc):
    out = {}

    def walk(d):
        out[d.full_name] = d
        for n in d.nested_types:
            walk(n)
    for m in file_desc.message_types_by_name.values():
        walk(m)
    return out


@pytest.mark.parametrize("ours,theirs_module", [(ours_svc, "tritonclient.grpc.service_pb2"),
                                                (ours_cfg, "tritonclient.grpc.model_config_pb2")])
def test_wire_compatible_with_tritonclient(ours, theirs_module):
    theirs = pytest.importorskip(theirs_module)
    mine, ref = _messages(ours.DESCRIPTOR), _messages(theirs.DESCRIPTOR)
    missing = sorted(set(ref) - set(mine))
    assert not missing, f"messages tritonclient has and we lack: {missing}"
    for name, d in ref.items():
        ours_f, theirs_f = _fields(mine[name]), _fields(d)
        # every field tritonclient knows must be identical here; an older tritonclient (the newest for
        # Python 3.9 is 2.41) simply lacks fields that newer protocol versions added
        assert {k: ours_f.get(k) for k in theirs_f} == theirs_f, name
    for name, e in theirs.DESCRIPTOR.enum_types_by_name.items():
        assert {v.name: v.number for v in e.values} == {
            v.name: v.number for v in ours.DESCRIPTOR.enum_types_by_name[name].values}


def test_service_methods_match_tritonclient():
    theirs = pytest.importorskip("tritonclient.grpc.service_pb2")
    a = ours_svc.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    b = theirs.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert a.full_name == "inference.GRPCInferenceService"
    assert {m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
            for m in a.methods} == {m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming,
                                             m.server_streaming) for m in b.methods}


def test_triton_config_pbtxt_parses():
    """A Triton config with fields we do not act on (sequence batching, warmup, optimization) still parses."""
    from google.protobuf import text_format

    text = """
name: "resnet" platform: "tensorrt_plan" max_batch_size: 8
input [ { name: "in" data_type: TYPE_FP16 format: FORMAT_NCHW dims: [ 3, 224, 224 ] } ]
output [ { name: "out" data_type: TYPE_FP16 dims: [ 1000 ] label_filename: "labels.txt" } ]
instance_group [ { count: 2 kind: KIND_GPU gpus: [ 0 ] profile: [ "0" ] } ]
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100
  priority_levels: 2 default_priority_level: 2
  default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 1000 max_queue_size: 16 } }
optimization { cuda { graphs: true } input_pinned_memory { enable: true } }
model_warmup [ { name: "w" batch_size: 1 inputs { key: "in" value { data_type: TYPE_FP16 dims: [3,224,224] zero_data: true } } } ]
version_policy { latest { num_versions: 2 } }
"""
    cfg = text_format.Parse(text, ours_cfg.ModelConfig())
    assert cfg.dynamic_batching.default_queue_policy.timeout_action == ours_cfg.ModelQueuePolicy.DELAY
    assert cfg.optimization.cuda.graphs

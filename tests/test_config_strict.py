"""Issue 19 item 2: config.pbtxt fields trtserve does not implement fail the model's load with a message naming
the field; --lenient-config (ServerOptions.lenient_config) loads it with one warning per field and drops the
field from the ModelConfig it serves back. docs/model-config.md lists every field."""
from __future__ import annotations

import logging
import pathlib
import re

import grpc
import pytest

from tests.models import copy_example
from tests.mp import Serve
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent

# model name -> (text added to the example MLP's config.pbtxt, the field the error must name)
REFUSED = {
    "decoupled": ("model_transaction_policy { decoupled: true }", "model_transaction_policy.decoupled"),
    "sequence": ("sequence_batching { max_sequence_idle_microseconds: 5000000 }", "sequence_batching"),
    "ensemble": ('ensemble_scheduling { step [ { model_name: "x" model_version: -1 } ] }', "ensemble_scheduling"),
    "cache": ("response_cache { enable: true }", "response_cache"),
    "ratelimit": ('instance_group [ { count: 1 kind: KIND_CPU rate_limiter { resources [ { name: "R" count: 1 } ] } } ]',
                  "instance_group.rate_limiter"),
    "gpus": ("instance_group [ { count: 1 kind: KIND_GPU gpus: [ 3 ] } ]", "instance_group.gpus"),
    "kindgpu": ("instance_group [ { count: 1 kind: KIND_GPU } ]", "instance_group.kind"),
    "reshape": (None, "input.reshape"),
    "backend": ('backend: "python"', "backend"),
    "agents": ('model_repository_agents { agents [ { name: "checksum" } ] }', "model_repository_agents"),
    "accel": ('optimization { execution_accelerators { cpu_execution_accelerator [ { name: "openvino" } ] } }',
              "optimization.execution_accelerators"),
    "batchin": ('batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "N" data_type: TYPE_FP32 '
                'source_input: "INPUT0" } ]', "batch_input"),
}


def _write(repo: pathlib.Path) -> None:
    copy_example(repo, "good")
    base = (repo / "good" / "config.pbtxt").read_text()
    for name, (extra, _) in REFUSED.items():
        text = base.replace('name: "good"', f'name: "{name}"')
        if name == "reshape":
            text = text.replace('name: "INPUT0"', 'name: "INPUT0"\n    reshape: { shape: [ 64 ] }')
        elif name == "backend":
            text = text.replace('platform: "onnxruntime_onnx"', extra)
        else:
            if name in ("sequence", "ensemble"):  # one scheduling choice per model
                text = re.sub(r"dynamic_batching \{[^}]*\}", "", text)
            text += "\n" + extra + "\n"
        copy_example(repo, name, config=text)
    assert "reshape" in (repo / "reshape" / "config.pbtxt").read_text()


def test_every_refused_field_fails_the_load_naming_the_field(tmp_path: pathlib.Path, serve_repo) -> None:
    repo = tmp_path / "models"
    _write(repo)
    s = serve_repo(repo, exit_on_error=False, metrics=False)
    with grpc.insecure_channel(s.url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        index = {m.name: m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models}
        assert index["good"].state == "READY"
        for name, (_, field) in REFUSED.items():
            assert index[name].state == "UNAVAILABLE", name
            assert f"config.pbtxt field '{field}' is not supported" in index[name].reason, (name, index[name].reason)
        assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready  # strict readiness


def test_lenient_config_loads_them_with_one_warning_per_field(tmp_path: pathlib.Path, serve_repo,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    repo = tmp_path / "models"
    _write(repo)
    del_backend = repo / "backend"  # an unknown backend cannot be served at all, lenient or not
    import shutil

    shutil.rmtree(del_backend)
    caplog.set_level(logging.WARNING, logger="trtserve.repository")
    s = serve_repo(repo, lenient_config=True, metrics=False)
    warnings = [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]
    with grpc.insecure_channel(s.url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        for name, (_, field) in REFUSED.items():
            if name == "backend":
                continue
            assert stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=10).ready, name
            mine = [w for w in warnings if w.startswith(f"model '{name}': config.pbtxt field '{field}' is ignored")]
            assert len(mine) == 1, (name, warnings)
            config = stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=10).config
            text = str(config)
            top = field.split(".")[0]
            if top in ("input", "output", "instance_group", "optimization"):
                gone = "KIND_GPU" if field == "instance_group.kind" else field.split(".")[-1] + " "
                assert gone not in text.replace(":", " "), (name, text)
            else:
                assert not config.HasField(top) if top not in ("batch_input",) else not config.batch_input, name


def test_cli_strict_then_lenient_config(tmp_path: pathlib.Path) -> None:
    """The real server: a refused field stops it at start (exit 1, naming the field); --lenient-config serves."""
    from tests.conftest import spawn
    import sys

    repo = tmp_path / "models"
    copy_example(repo, "good")
    text = (repo / "good" / "config.pbtxt").read_text()
    (repo / "good" / "config.pbtxt").write_text(text + "\nresponse_cache { enable: true }\n")
    out = spawn([sys.executable, "-m", "trtserve", "serve", "--model-repository", str(repo), "--grpc-port", "0", "--http-port", "0",
                 "--metrics-port", "-1", "--frontends", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert re.search(r"^trtserve: model 'good' failed to load.*field 'response_cache' is not supported",
                     out.stderr.strip().splitlines()[-1])
    s = Serve(repo, frontends=1, args=["--lenient-config"])
    try:
        with grpc.insecure_channel(s.url) as ch:
            assert pb_grpc.GRPCInferenceServiceStub(ch).ModelReady(pb.ModelReadyRequest(name="good"), timeout=10).ready
    finally:
        assert s.stop() == 0
    assert s.output().count("config.pbtxt field 'response_cache' is ignored") == 1


def test_the_docs_table_covers_every_field_of_the_schema() -> None:
    """docs/model-config.md names every field of ModelConfig and of the messages it contains."""
    from trtserve.protos import model_config_pb2 as mc

    doc = (ROOT / "docs" / "model-config.md").read_text()
    seen = set()

    def walk(desc, prefix: str) -> None:
        for f in desc.fields:
            path = f"{prefix}{f.name}"
            assert f"`{path}`" in doc, path
            if f.message_type is not None and not f.message_type.GetOptions().map_entry \
                    and f.message_type.full_name not in seen and prefix.count(".") < 1:
                seen.add(f.message_type.full_name)
                walk(f.message_type, path + ".")

    walk(mc.ModelConfig.DESCRIPTOR, "")

"""Tiny ONNX models for tests, each written into a Triton-layout repository with its config.pbtxt."""
from __future__ import annotations

import pathlib
import shutil
from typing import Optional

import numpy as np

from trtserve.server.examples import REPOSITORY as EXAMPLE_REPOSITORY

# wire datatype -> ONNX TensorProto enum name
ONNX_TYPES = {
    "BOOL": "BOOL", "UINT8": "UINT8", "UINT16": "UINT16", "UINT32": "UINT32", "UINT64": "UINT64",
    "INT8": "INT8", "INT16": "INT16", "INT32": "INT32", "INT64": "INT64", "FP16": "FLOAT16", "FP32": "FLOAT",
    "FP64": "DOUBLE", "BYTES": "STRING",
}


def _save(model, path: pathlib.Path) -> None:
    import onnx

    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def write_config(repo: pathlib.Path, name: str, text: str) -> None:
    (repo / name).mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(text)


def fake_backend_model(repo: pathlib.Path, name: str, platform: str, max_batch_size: int, preferred: int,
                       delay_us: int) -> None:
    """A model served by a test's fake backend (``ServerOptions.backend_factories[platform]``): FP32 INPUT0 and
    OUTPUT0 of 4 values a row, batched up to ``max_batch_size`` with one preferred size."""
    write_config(repo, name, f"""
name: "{name}" platform: "{platform}" max_batch_size: {max_batch_size}
input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 4 ] }} ]
dynamic_batching {{ preferred_batch_size: [ {preferred} ] max_queue_delay_microseconds: {delay_us} }}
""")
    (repo / name / "1").mkdir()


def copy_example(repo: pathlib.Path, name: str = "mlp", config: Optional[str] = None) -> None:
    """The bundled MLP under ``name``, optionally with another config.pbtxt body."""
    shutil.copytree(EXAMPLE_REPOSITORY / "mlp", repo / name)
    text = (repo / name / "config.pbtxt").read_text().replace('name: "mlp"', f'name: "{name}"')
    (repo / name / "config.pbtxt").write_text(config if config is not None else text)


def identity(repo: pathlib.Path, name: str, wire: str, max_batch_size: int = 8, dims: str = "[ 4 ]",
             extra: str = "", version: int = 1) -> None:
    """INPUT0 -> OUTPUT0 (Identity) of one datatype."""
    from onnx import TensorProto, helper

    t = getattr(TensorProto, ONNX_TYPES[wire])
    shape = ["batch"] + [int(d) if d != "-1" else f"d{i}" for i, d in enumerate(dims.strip("[] ").split(","))] \
        if max_batch_size else [int(d) if d != "-1" else f"d{i}" for i, d in enumerate(dims.strip("[] ").split(","))]
    graph = helper.make_graph([helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], name,
                              [helper.make_tensor_value_info("INPUT0", t, shape)],
                              [helper.make_tensor_value_info("OUTPUT0", t, shape)])
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), repo / name / str(version) / "model.onnx")
    config_type = "TYPE_STRING" if wire == "BYTES" else f"TYPE_{wire}"
    write_config(repo, name, f"""
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [ {{ name: "INPUT0", data_type: {config_type}, dims: {dims} }} ]
output [ {{ name: "OUTPUT0", data_type: {config_type}, dims: {dims} }} ]
{extra}
""")


def add_sub(repo: pathlib.Path, name: str = "add_sub", extra: str = "dynamic_batching { }", max_batch_size: int = 8) -> None:
    """OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 (FP32, [16]): two inputs, two outputs."""
    from onnx import TensorProto, helper

    shape = ["batch", 16] if max_batch_size else [16]
    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
         helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])], name,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("INPUT0", "INPUT1")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("OUTPUT0", "OUTPUT1")])
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), repo / name / "1" / "model.onnx")
    write_config(repo, name, f"""
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ 16 ] }}, {{ name: "INPUT1", data_type: TYPE_FP32, dims: [ 16 ] }} ]
output [ {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 16 ] }}, {{ name: "OUTPUT1", data_type: TYPE_FP32, dims: [ 16 ] }} ]
{extra}
""")


def sequence_scale(repo: pathlib.Path, name: str = "seq", extra: str = "") -> None:
    """Variable-length rows: OUTPUT0[b, t] = 2 * INPUT0[b, t] + (number of padded zeros ignored).

    INPUT0 FP32 [-1] is marked paddable (pad 0) and OUTPUT0 follows INPUT0's length, so requests of
    different lengths share a batch and each gets its own length back.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["INPUT0", "TWO"], ["OUTPUT0"])], name,
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", "t"])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", "t"])],
        [numpy_helper.from_array(np.array(2.0, dtype=np.float32), "TWO")])
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), repo / name / "1" / "model.onnx")
    write_config(repo, name, f"""
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] }} ]
parameters {{ key: "trtserve.pad.INPUT0" value {{ string_value: "0" }} }}
parameters {{ key: "trtserve.unpad.OUTPUT0" value {{ string_value: "INPUT0" }} }}
{extra}
""")

"""ONNX models and configs for the GPU tests and bench/gpu_backend.py, with deterministic weights."""
from __future__ import annotations

import json
import pathlib
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from trtserve.server.engine.backends.base import BackendConfig, TensorSpec

TWO_PROFILES = json.dumps([{"batch": [1, 4, 8]}, {"batch": [9, 32, 64]}])


def make_mlp(path: pathlib.Path, n_in: int, hidden: int, n_out: int, fp16: bool = False, seed: int = 0) -> None:
    """INPUT0 [batch, n_in] -> MatMul/Add/Relu/MatMul/Add -> OUTPUT0 [batch, n_out]; FP16 IO and weights if asked."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dt = np.float16 if fp16 else np.float32
    onnx_t = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((n_in, hidden)) / np.sqrt(n_in)).astype(dt)
    b1 = (rng.standard_normal(hidden) * 0.1).astype(dt)
    w2 = (rng.standard_normal((hidden, n_out)) / np.sqrt(hidden)).astype(dt)
    b2 = (rng.standard_normal(n_out) * 0.1).astype(dt)
    nodes = [
        helper.make_node("MatMul", ["INPUT0", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "B1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"]),
        helper.make_node("Add", ["h3", "B2"], ["OUTPUT0"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("INPUT0", onnx_t, ["batch", n_in])],
        [helper.make_tensor_value_info("OUTPUT0", onnx_t, ["batch", n_out])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (b1, "B1"), (w2, "W2"), (b2, "B2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="trtserve-tests")
    model.ir_version = 8  # TensorRT 8.6's parser and ONNX Runtime both read IR 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def make_multi_dtype(path: pathlib.Path) -> None:
    """Three IO pairs of different types: H (FP16) -> H*2, I (INT32) -> I+1, B (BOOL) -> Not(B); dims [4]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Mul", ["H", "two"], ["H_OUT"]),
        helper.make_node("Add", ["I", "one"], ["I_OUT"]),
        helper.make_node("Not", ["B"], ["B_OUT"]),
    ]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "multi",
        [vi("H", TensorProto.FLOAT16, ["batch", 4]), vi("I", TensorProto.INT32, ["batch", 4]),
         vi("B", TensorProto.BOOL, ["batch", 4])],
        [vi("H_OUT", TensorProto.FLOAT16, ["batch", 4]), vi("I_OUT", TensorProto.INT32, ["batch", 4]),
         vi("B_OUT", TensorProto.BOOL, ["batch", 4])],
        [numpy_helper.from_array(np.array(2, np.float16), "two"), numpy_helper.from_array(np.array(1, np.int32), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="trtserve-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def mlp_config(
    model_dir: pathlib.Path, n_in: int, n_out: int, max_batch_size: int = 64, instances: int = 2,
    parameters: Optional[Mapping[str, str]] = None, cache_dir: Optional[pathlib.Path] = None, wire: str = "FP32",
    cuda_graphs: bool = False, name: str = "mlp",
) -> BackendConfig:
    return BackendConfig(
        name=name, version="1", model_dir=model_dir, default_model_filename="", max_batch_size=max_batch_size,
        inputs=[TensorSpec("INPUT0", wire, (n_in,))], outputs=[TensorSpec("OUTPUT0", wire, (n_out,))],
        instance_count=instances, parameters=dict(parameters or {}), cuda_graphs=cuda_graphs, cache_dir=cache_dir,
    )


def ort_session(path: pathlib.Path):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def ort_run(session, feeds: Dict[str, np.ndarray], outputs: Sequence[str] = ("OUTPUT0",)) -> Dict[str, np.ndarray]:
    return dict(zip(outputs, session.run(list(outputs), feeds)))

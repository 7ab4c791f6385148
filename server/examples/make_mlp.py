"""Writes the example MLP (INPUT0 FP32 [-1,64] -> OUTPUT0 FP32 [-1,16]) as ONNX, deterministically.

``python -m trtserve.server.examples.make_mlp OUT.onnx [--in 64 --hidden 32 --out 16 --seed 0]``; the
bundled models/mlp/1/model.onnx was made with the defaults (needs the ``onnx`` package).
"""
from __future__ import annotations

import argparse
import pathlib
from typing import Tuple

import numpy as np


def mlp_weights(n_in: int = 64, hidden: int = 32, n_out: int = 16,
                seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((n_in, hidden)) / np.sqrt(n_in)).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((hidden, n_out)) / np.sqrt(hidden)).astype(np.float32)
    b2 = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
    return w1, b1, w2, b2


def reference(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The MLP in NumPy, to check any backend's answer."""
    w1, b1, w2, b2 = mlp_weights(x.shape[1], seed=seed)
    return np.maximum(x @ w1 + b1, 0.0) @ w2 + b2


def make_mlp(path: pathlib.Path, n_in: int = 64, hidden: int = 32, n_out: int = 16, seed: int = 0,
             opset: int = 13) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1, b1, w2, b2 = mlp_weights(n_in, hidden, n_out, seed)
    nodes = [
        helper.make_node("MatMul", ["INPUT0", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "B1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"]),
        helper.make_node("Add", ["h3", "B2"], ["OUTPUT0"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", n_out])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (b1, "B1"), (w2, "W2"), (b2, "B2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="trtserve")
    model.ir_version = 8  # readable by ONNX Runtime and TensorRT 8.6's parser
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=pathlib.Path)
    p.add_argument("--in", dest="n_in", type=int, default=64)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--out", dest="n_out", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    make_mlp(a.out, a.n_in, a.hidden, a.n_out, a.seed)


if __name__ == "__main__":
    main()

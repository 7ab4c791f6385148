"""A ResNet-18-shaped ONNX model (random weights, batch-norm folded into the convolutions) for the GPU
benchmarks: the compute and IO profile of the real network (FP32 [N,3,224,224] in, 602 KB per image;
FP32 [N,1000] out; ~1.8 GFLOP per image), without downloading weights. Built with ``trtserve.fp16``."""
from __future__ import annotations

import pathlib
from typing import List, Tuple

import numpy as np


def make_resnet18(path: pathlib.Path, classes: int = 1000, seed: int = 0) -> None:
    """conv7x7/2 -> maxpool -> 4 stages x 2 basic blocks (64, 128, 256, 512) -> global pool -> fc."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes: List = []
    inits: List = []
    count = [0]

    def name(prefix: str) -> str:
        count[0] += 1
        return f"{prefix}{count[0]}"

    def conv(x: str, c_in: int, c_out: int, k: int, stride: int, relu: bool) -> str:
        w, b, y = name("w"), name("b"), name("conv")
        inits.append(numpy_helper.from_array(
            (rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2.0 / (c_in * k * k)) * 0.5).astype(np.float32), w))
        inits.append(numpy_helper.from_array(np.zeros(c_out, np.float32), b))
        nodes.append(helper.make_node("Conv", [x, w, b], [y], kernel_shape=[k, k], strides=[stride, stride],
                                      pads=[k // 2] * 4))
        if not relu:
            return y
        r = name("relu")
        nodes.append(helper.make_node("Relu", [y], [r]))
        return r

    def block(x: str, c_in: int, c_out: int, stride: int) -> str:
        h = conv(x, c_in, c_out, 3, stride, True)
        h = conv(h, c_out, c_out, 3, 1, False)
        skip = x if (stride == 1 and c_in == c_out) else conv(x, c_in, c_out, 1, stride, False)
        s, r = name("add"), name("relu")
        nodes.append(helper.make_node("Add", [h, skip], [s]))
        nodes.append(helper.make_node("Relu", [s], [r]))
        return r

    x = conv("INPUT0", 3, 64, 7, 2, True)
    p = name("pool")
    nodes.append(helper.make_node("MaxPool", [x], [p], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, c = p, 64
    stages: Tuple[Tuple[int, int], ...] = ((64, 1), (128, 2), (256, 2), (512, 2))
    for c_out, stride in stages:
        x = block(x, c, c_out, stride)
        x = block(x, c_out, c_out, 1)
        c = c_out
    g, f = name("gap"), name("flat")
    nodes.append(helper.make_node("GlobalAveragePool", [x], [g]))
    nodes.append(helper.make_node("Flatten", [g], [f], axis=1))
    inits.append(numpy_helper.from_array((rng.standard_normal((c, classes)) / np.sqrt(c)).astype(np.float32), "fc_w"))
    inits.append(numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b"))
    mm = name("fc")
    nodes.append(helper.make_node("MatMul", [f, "fc_w"], [mm]))
    nodes.append(helper.make_node("Add", [mm, "fc_b"], ["OUTPUT0"]))
    graph = helper.make_graph(
        nodes, "resnet18_shaped",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="trtserve-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))

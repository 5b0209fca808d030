"""Small ONNX graphs written by hand with onnx.helper, independent of our exporter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CHANNELS = 8


def save_graph(nodes, inputs, outputs, initializers, path: Path) -> Path:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def classifier_onnx(path: Path, *, batch: int | str = "N", conv1_kernel=None, seed: int = 0):
    """Conv-Relu-Conv-Relu-GlobalAveragePool-Flatten-Gemm-Softmax, NCHW (3, 8, 8) input."""
    rng = np.random.default_rng(seed)
    w1 = (
        rng.normal(size=(CHANNELS, 3, 3, 3)) * 0.3 if conv1_kernel is None else conv1_kernel
    ).astype(np.float32)
    arrays = {
        "w1": w1,
        "b1": rng.normal(size=CHANNELS).astype(np.float32),
        "w2": (rng.normal(size=(CHANNELS, CHANNELS, 3, 3)) * 0.2).astype(np.float32),
        "b2": rng.normal(size=CHANNELS).astype(np.float32),
        "wd": rng.normal(size=(CHANNELS, 5)).astype(np.float32),
        "bd": rng.normal(size=5).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wd", "bd"], ["logits"], name="dense"),
        helper.make_node("Softmax", ["logits"], ["y"], axis=-1, name="softmax"),
    ]
    return save_graph(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])],
        [numpy_helper.from_array(array, name) for name, array in arrays.items()],
        path,
    )


BLOCK_CHANNELS, BLOCK_WIDTH, BLOCK_CLASSES = 4, 16, 10


def depthwise_block(seed: int = 0) -> onnx.ModelProto:
    """A 3x3 convolution with ReLU6 whose output channels span two decades (what folded
    BN leaves), a depthwise 3x3 convolution with ReLU6, a linear pointwise convolution
    added back to the first layer's output, global average pooling and a Gemm; NCHW
    (4, 8, 8) input."""
    rng = np.random.default_rng(seed)
    spread = np.logspace(-2, 0, BLOCK_WIDTH)
    weights = {
        "c1_w": rng.normal(size=(BLOCK_WIDTH, BLOCK_CHANNELS, 3, 3))
        * spread[:, None, None, None]
        * 0.5,
        "c1_b": 0.6 * spread,
        "dw_w": rng.normal(size=(BLOCK_WIDTH, 1, 3, 3)) * 0.5,
        "dw_b": rng.normal(size=BLOCK_WIDTH) * 0.05,
        "pw_w": rng.normal(size=(BLOCK_WIDTH, BLOCK_WIDTH, 1, 1)) * 0.4,
        "pw_b": rng.normal(size=BLOCK_WIDTH) * 0.05,
        "fc_w": rng.normal(size=(BLOCK_WIDTH, BLOCK_CLASSES)) / spread[:, None] * 0.3,
        "fc_b": rng.normal(size=BLOCK_CLASSES) * 0.1,
        "low": np.array(0.0),
        "high": np.array(6.0),
    }
    initializers = [
        numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()
    ]
    same = {"pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "c1_w", "c1_b"], ["c1"], "conv", **same),
        helper.make_node("Clip", ["c1", "low", "high"], ["c1_relu6"], "relu6_1"),
        helper.make_node(
            "Conv", ["c1_relu6", "dw_w", "dw_b"], ["dw"], "depthwise", group=BLOCK_WIDTH, **same
        ),
        helper.make_node("Clip", ["dw", "low", "high"], ["dw_relu6"], "relu6_2"),
        helper.make_node("Conv", ["dw_relu6", "pw_w", "pw_b"], ["pw"], "pointwise"),
        helper.make_node("Add", ["pw", "c1_relu6"], ["sum"], "residual"),
        helper.make_node("GlobalAveragePool", ["sum"], ["pooled"], "gap"),
        helper.make_node("Flatten", ["pooled"], ["flat"], "flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], "dense"),
    ]
    graph = helper.make_graph(
        nodes,
        "tuning",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, BLOCK_CHANNELS, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, BLOCK_CLASSES])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def block_images(count: int, seed: int) -> np.ndarray:
    """Inputs for :func:`depthwise_block`: non-negative, each channel its own scale."""
    rng = np.random.default_rng(seed)
    return (
        rng.random((count, BLOCK_CHANNELS, 8, 8)) * rng.random((count, BLOCK_CHANNELS, 1, 1)) * 2
    ).astype(np.float32)

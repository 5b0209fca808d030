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

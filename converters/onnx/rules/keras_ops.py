"""Rules: ``keras.ops`` operations in functional code and Keras Applications' layers.

``x + 3.0``, ``a * b``, ``ops.gelu(x)`` in a Functional model become operation
nodes whose classes, like the Applications' LayerScale and CustomScaleLayer, are
reachable only through Keras's private modules, which ``keras_bn._keras_internals``
(the project's one module of private Keras access) imports for us.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from keras_bn._keras_internals import CustomScaleLayer, LayerScale, nn_ops, numpy_ops
from keras_bn.converters.graph import Node, Tensor, to_numpy
from keras_bn.converters.onnx.builder import Builder, Unsupported, tensor_type
from keras_bn.converters.onnx.rules.activations import ACTIVATIONS, gelu
from keras_bn.converters.onnx.rules.common import Rule, common_layout, softmax_nodes

__all__ = ["CustomScaleLayer", "LayerScale", "nn_ops", "numpy_ops"]


_BINARY_OPS = {
    numpy_ops.Add: "Add",
    numpy_ops.Subtract: "Sub",
    numpy_ops.Multiply: "Mul",
    numpy_ops.Divide: "Div",
    numpy_ops.TrueDivide: "Div",
    numpy_ops.Maximum: "Max",
    numpy_ops.Minimum: "Min",
}


def binary_op(b: Builder, node: Node) -> None:
    """``keras.ops`` add/subtract/multiply/divide/maximum/minimum (``x + 3.0``, ``a * b``)
    of float tensors, and of integer ones (indices computed in ``call()``: D-FINE's
    ``y * width + x``) in the output's integer type, except true division."""
    op_type = _BINARY_OPS[type(node.layer)]
    args = list(node.args[:2])
    tensors = [arg for arg in args if isinstance(arg, Tensor)]
    output = np.dtype(node.outputs[0].dtype)
    floats = all(np.dtype(t.dtype).kind == "f" for t in tensors)
    integers = output.kind in "iu" and all(np.dtype(t.dtype).kind in "iub" for t in tensors)
    if not (floats or (integers and op_type != "Div")) or len(node.args) != 2:
        raise Unsupported("only binary operations on float or integer tensors are exported")
    names, perm = common_layout(b, tensors, expand=False)
    if integers:
        names = [
            name
            if np.dtype(t.dtype) == output
            else b.op("Cast", [name], to=tensor_type(output.name))
            for name, t in zip(names, tensors, strict=True)
        ]
    rank = len(perm)
    by_tensor = dict(zip(map(id, tensors), names, strict=True))
    operands = []
    for arg in args:
        if id(arg) in by_tensor:
            operands.append(by_tensor[id(arg)])
        else:
            # Python ints too: float tensors; integer ones in their own type
            array = np.asarray(to_numpy(arg), dtype=output if integers else np.float64)
            if array.ndim > rank:
                raise Unsupported(f"a constant of shape {array.shape} widens the tensor")
            dtype = output if integers else None
            operands.append(b.broadcast_const(array, rank, perm, "constant", dtype=dtype))
    b.set(node.outputs[0], b.op(op_type, operands), perm)


def negative(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    b.set(node.outputs[0], b.op("Neg", [b.get(node.inputs[0], value.perm)]), value.perm)


def unary_activation(function: Any) -> Rule:
    """The rule of a ``keras.ops`` activation op: the activation's own emitter."""
    emit = ACTIVATIONS[function]

    def rule(b: Builder, node: Node) -> None:
        value = b.value(node.inputs[0])
        b.set(node.outputs[0], emit(b, b.get(node.inputs[0], value.perm), value.perm), value.perm)

    rule.__name__ = f"op_{emit.__name__.removeprefix('_act_')}"
    return rule


def gelu_op(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    out = gelu(b, b.get(node.inputs[0], value.perm), bool(node.layer.approximate))
    b.set(node.outputs[0], out, value.perm)


def softmax_op(b: Builder, node: Node) -> None:
    axis = node.layer.axis
    axes = (
        list(range(node.inputs[0].rank))
        if axis is None
        else (list(axis) if isinstance(axis, list | tuple) else [axis])
    )
    value = b.value(node.inputs[0])
    b.set(
        node.outputs[0],
        softmax_nodes(b, b.get(node.inputs[0], value.perm), value, axes),
        value.perm,
    )


# --------------------------------------------------------------------------------------
# Keras Applications' own layers.


def layer_scale(b: Builder, node: Node) -> None:
    """ConvNeXt's LayerScale: ``x * gamma`` on the last axis."""
    tensor = node.inputs[0]
    value = b.value(tensor)
    gamma = b.broadcast_const(
        to_numpy(node.layer.gamma),
        tensor.rank,
        value.perm,
        "gamma",
        key=(id(node.layer), value.perm),
    )
    b.set(node.outputs[0], b.op("Mul", [b.get(tensor, value.perm), gamma]), value.perm)


def custom_scale(b: Builder, node: Node) -> None:
    """InceptionResNetV2's CustomScaleLayer: ``inputs[0] + inputs[1] * scale``."""
    names, perm = common_layout(b, node.inputs, expand=False)
    scaled = b.op("Mul", [names[1], b.scalar(float(node.layer.scale), "scale")])
    b.set(node.outputs[0], b.op("Add", [names[0], scaled]), perm)

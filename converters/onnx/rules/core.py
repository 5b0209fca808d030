"""Rules: core layers (Dense, Embedding, activations, Softmax) and merges."""

from __future__ import annotations

import numpy as np

from keras_bn.converters.graph import Node, Tensor, to_numpy
from keras_bn.converters.onnx.builder import Builder, Unsupported, Value
from keras_bn.converters.onnx.layout import channels_first_perm, identity_perm
from keras_bn.converters.onnx.rules.activations import apply_activation
from keras_bn.converters.onnx.rules.common import (
    check_not_quantized,
    common_layout,
    node_array,
    node_bias,
    node_weight,
    softmax_nodes,
)


def dense(b: Builder, node: Node) -> None:
    layer = node.layer
    check_not_quantized(layer)
    tensor = node.inputs[0]
    kernel, key = node_array(b, node, "kernel")  # (input units, units)
    bias = node_bias(b, node)
    rank = tensor.rank
    value = b.value(tensor)
    if rank == 2:
        perm = identity_perm(2)
        inputs = [b.get(tensor), b.const(kernel, "kernel", key=key)]
        out = b.op("Gemm", inputs + ([bias] if bias else []))
    elif 3 <= rank <= 5 and value.perm == channels_first_perm(rank):
        # A Dense on the channel axis of a channels-first tensor is a 1x1 convolution.
        perm = value.perm
        weight = kernel.T.reshape(kernel.shape[1], kernel.shape[0], *([1] * (rank - 2)))
        out = b.op(
            "Conv",
            [b.get(tensor, perm), b.const(weight, "kernel", key=(*key, "1x1"))]
            + ([bias] if bias else []),
            kernel_shape=[1] * (rank - 2),
        )
    else:
        perm = identity_perm(rank)
        out = b.op("MatMul", [b.get(tensor), b.const(kernel, "kernel", key=key)])
        if bias:
            out = b.op("Add", [out, bias])
    b.set(node.outputs[0], apply_activation(b, layer.activation, out, perm), perm)


def embedding(b: Builder, node: Node) -> None:
    layer = node.layer
    check_not_quantized(layer)
    tensor = node.inputs[0]
    indices = b.get(tensor, cast=False)
    if np.dtype(tensor.dtype).kind not in "iu":
        indices = b.op("Cast", [indices], to=7)  # INT64
    out = b.op("Gather", [node_weight(b, node, "embeddings"), indices], axis=0)
    b.set(node.outputs[0], out)


def identity(b: Builder, node: Node) -> None:
    """Dropout-like layers: the identity at inference."""
    b.set(node.outputs[0], b.value(node.inputs[0], keep_pads=True))


def activation(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    name = b.get(node.inputs[0], value.perm)
    b.set(node.outputs[0], apply_activation(b, node.layer.activation, name, value.perm), value.perm)


def relu(b: Builder, node: Node) -> None:
    layer = node.layer
    value = b.value(node.inputs[0])
    x = b.get(node.inputs[0], value.perm)
    slope = float(layer.negative_slope or 0.0)
    threshold = float(layer.threshold or 0.0)
    max_value = None if layer.max_value is None else float(layer.max_value)
    if threshold == 0.0 and slope == 0.0:
        out = (
            b.op("Relu", [x])
            if max_value is None
            else b.op("Clip", [x, b.scalar(0.0, "zero"), b.scalar(max_value, "max_value")])
        )
    elif threshold == 0.0 and max_value is None:
        out = b.op("LeakyRelu", [x], alpha=slope)
    else:  # Keras's general formula, term by term
        zero = b.scalar(0.0, "zero")
        if threshold != 0.0:
            t = b.scalar(threshold, "threshold")
            out = b.op("Where", [b.op("Greater", [x, t]), x, zero])
        else:
            out = b.op("Relu", [x])
        if max_value is not None:
            out = b.op("Clip", [out, zero, b.scalar(max_value, "max_value")])
        if slope != 0.0:
            shifted = (
                b.op("Sub", [b.scalar(threshold, "threshold"), x])
                if threshold
                else b.op("Neg", [x])
            )
            negative = b.op("Mul", [b.op("Relu", [shifted]), b.scalar(slope, "negative_slope")])
            out = b.op("Sub", [out, negative])
    b.set(node.outputs[0], out, value.perm)


def leaky_relu(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    out = b.op(
        "LeakyRelu", [b.get(node.inputs[0], value.perm)], alpha=float(node.layer.negative_slope)
    )
    b.set(node.outputs[0], out, value.perm)


def prelu(b: Builder, node: Node) -> None:
    tensor = node.inputs[0]
    value = b.value(tensor)
    slope = b.broadcast_const(
        to_numpy(node.layer.alpha),
        tensor.rank,
        value.perm,
        "alpha",
        key=(id(node.layer), value.perm),
    )
    b.set(node.outputs[0], b.op("PRelu", [b.get(tensor, value.perm), slope]), value.perm)


def elu(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    out = b.op("Elu", [b.get(node.inputs[0], value.perm)], alpha=float(node.layer.alpha))
    b.set(node.outputs[0], out, value.perm)


def softmax(b: Builder, node: Node) -> None:
    """The Softmax layer, with its ``mask`` argument as Keras applies it: masked
    positions (mask false, or <= 0.5) set to a large negative number before the
    softmax and to 0 after it (an axis masked throughout gives zeros)."""
    layer = node.layer
    mask = node.args[1] if len(node.args) > 1 else node.kwargs.get("mask")
    tensor = node.inputs[0]
    axes = [int(a) % tensor.rank for a in np.atleast_1d(layer.axis)]
    if mask is None:
        value = b.value(tensor)
        out = softmax_nodes(b, b.get(tensor, value.perm), value, axes)
        b.set(node.outputs[0], out, value.perm)
        return
    if not isinstance(mask, Tensor):
        raise Unsupported("a constant mask is not exported")
    keep = b.get(mask, cast=False)
    if np.dtype(mask.dtype) != np.bool_:
        half = b.const(np.asarray(0.5).astype(mask.dtype), "half", dtype=np.dtype(mask.dtype))
        keep = b.op("Greater", [keep, half])
    x = b.get(tensor)
    large_negative = -3e4 if np.dtype(b.dtype) == np.float16 else -1e9  # Keras's
    x = b.op("Where", [keep, x, b.scalar(large_negative, "large_negative")])
    out = softmax_nodes(b, x, Value(x, tuple(range(tensor.rank))), axes)
    b.set(node.outputs[0], b.op("Where", [keep, out, b.scalar(0.0, "zero")]))


# --------------------------------------------------------------------------------------
# Merges.


def _merge(b: Builder, node: Node, op_type: str) -> None:
    names, perm = common_layout(b, node.inputs, expand=True)
    if op_type in ("Add", "Mul", "Sub") or len(names) == 2 and op_type != "Mean":
        out = names[0]
        for name in names[1:]:
            out = b.op(op_type, [out, name])
    elif op_type == "Mean":  # Keras: sum in order, then divide
        out = names[0]
        for name in names[1:]:
            out = b.op("Add", [out, name])
        out = b.op("Div", [out, b.scalar(float(len(names)), "count")])
    else:
        out = b.op(op_type, names)
    b.set(node.outputs[0], out, perm)


def add(b: Builder, node: Node) -> None:
    _merge(b, node, "Add")


def subtract(b: Builder, node: Node) -> None:
    _merge(b, node, "Sub")


def multiply(b: Builder, node: Node) -> None:
    _merge(b, node, "Mul")


def average(b: Builder, node: Node) -> None:
    _merge(b, node, "Mean")


def maximum(b: Builder, node: Node) -> None:
    _merge(b, node, "Max")


def minimum(b: Builder, node: Node) -> None:
    _merge(b, node, "Min")


def concatenate(b: Builder, node: Node) -> None:
    names, perm = common_layout(b, node.inputs, expand=False)
    axis = perm.index(node.layer.axis % len(perm))
    b.set(node.outputs[0], b.op("Concat", names, axis=axis), perm)

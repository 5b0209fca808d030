"""``keras.ops`` rules: linear algebra, attention, normalizations, convolution and pooling.

Matrix products and normalizations work in Keras order; convolutions and pooling
in channels-first order (as their layer rules do, :mod:`..convolution`).
"""

from __future__ import annotations

import math
import types
from typing import Any

import keras
import numpy as np

from keras_bn.converters.graph import Node, Tensor, to_numpy
from keras_bn.converters.onnx.builder import Builder, Unsupported, tensor_type
from keras_bn.converters.onnx.layout import Perm
from keras_bn.converters.onnx.rules.common import Rule
from keras_bn.converters.onnx.rules.convolution import (
    Pads,
    constant_kernel_conv,
    depthwise_weight,
    pool_nodes,
    spatial_input,
)
from keras_bn.converters.onnx.rules.ops.common import axes_of, operand

__all__ = [
    "conv_op",
    "depthwise_conv_op",
    "dot_product_attention",
    "einsum",
    "layer_norm",
    "matmul",
    "normalize",
    "pool_op",
    "rms_norm",
]


def matmul(b: Builder, node: Node) -> None:
    like = next(arg for arg in node.args[:2] if isinstance(arg, Tensor))
    first, second = (operand(b, arg, like) for arg in node.args[:2])
    b.set(node.outputs[0], b.op("MatMul", [first, second]))


def einsum(b: Builder, node: Node) -> None:
    like = next(arg for arg in node.args if isinstance(arg, Tensor))
    equation = node.layer.subscripts.replace(" ", "")
    operands = [operand(b, arg, like) for arg in node.args]
    b.set(node.outputs[0], b.op("Einsum", operands, equation=equation))


def dot_product_attention(b: Builder, node: Node) -> None:
    """softmax(q k^T * scale + bias, masked) v over (batch, length, heads, dim) inputs."""
    names = ("query", "key", "value", "bias", "mask", "scale")
    arguments = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    if getattr(node.layer, "is_causal", False):
        raise Unsupported("causal attention")
    query, key, value = (arguments[name] for name in names[:3])
    if not all(isinstance(t, Tensor) for t in (query, key, value)) or query.rank != 4:
        raise Unsupported("attention over rank-4 (batch, length, heads, dim) tensors only")
    scale = arguments.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    q = b.get(query, (0, 2, 1, 3))
    k = b.get(key, (0, 2, 3, 1))
    v = b.get(value, (0, 2, 1, 3))
    logits = b.op("Mul", [b.op("MatMul", [q, k]), b.scalar(float(scale), "scale")])
    if arguments.get("bias") is not None:
        logits = b.op("Add", [logits, operand(b, arguments["bias"], query)])
    if arguments.get("mask") is not None:
        mask = operand(b, arguments["mask"])
        low = b.scalar(float(np.finfo(b.dtype).min), "masked")
        logits = b.op("Where", [b.op("Cast", [mask], to=tensor_type("bool")), logits, low])
    weights = b.op("Softmax", [logits], axis=3)
    out = b.op("MatMul", [weights, v])  # (batch, heads, length, dim)
    b.set(node.outputs[0], out, (0, 2, 1, 3))


# --------------------------------------------------------------------------------------
# Normalizations and activations.


def layer_norm(b: Builder, node: Node) -> None:
    """``ops.layer_normalization(x, gamma, beta, axis, epsilon)`` (rms_scaling too)."""
    layer = node.layer
    tensor = node.inputs[0]
    axes = axes_of(layer.axis, tensor.rank)
    epsilon = 1e-3 if layer.epsilon is None else float(layer.epsilon)
    x = b.get(tensor)
    gamma = node.args[1] if len(node.args) > 1 else node.kwargs.get("gamma")
    beta = node.args[2] if len(node.args) > 2 else node.kwargs.get("beta")
    if layer.rms_scaling:
        out = _rms(b, x, axes, epsilon)
    else:
        mean = b.reduce("ReduceMean", x, axes, keepdims=True)
        centred = b.op("Sub", [x, mean])
        variance = b.reduce("ReduceMean", b.op("Mul", [centred, centred]), axes, keepdims=True)
        deviation = b.op("Sqrt", [b.op("Add", [variance, b.scalar(epsilon, "epsilon")])])
        out = b.op("Div", [centred, deviation])
    if gamma is not None:
        out = b.op("Mul", [out, operand(b, gamma, tensor)])
    if beta is not None:
        out = b.op("Add", [out, operand(b, beta, tensor)])
    b.set(node.outputs[0], out)


def _rms(b: Builder, x: str, axes: list[int], epsilon: float) -> str:
    mean_square = b.reduce("ReduceMean", b.op("Mul", [x, x]), axes, keepdims=True)
    root = b.op("Sqrt", [b.op("Add", [mean_square, b.scalar(epsilon, "epsilon")])])
    return b.op("Div", [x, root])


def rms_norm(b: Builder, node: Node) -> None:
    layer = node.layer
    tensor = node.inputs[0]
    epsilon = 1e-6 if layer.epsilon is None else float(layer.epsilon)
    out = _rms(b, b.get(tensor), axes_of(layer.axis, tensor.rank), epsilon)
    scale = node.args[1] if len(node.args) > 1 else node.kwargs.get("scale")
    if scale is not None:
        out = b.op("Mul", [out, operand(b, scale, tensor)])
    b.set(node.outputs[0], out)


def normalize(b: Builder, node: Node) -> None:
    """``ops.normalize(x, axis, order, epsilon)`` (``Dot(normalize=True)``): for
    ``order=2``, Keras's ``x * min(rsqrt(sum(x**2)), 1 / epsilon)``; otherwise
    ``x / max(norm, epsilon)`` with the vector ``order``-norm along one axis."""
    operation, tensor = node.layer, node.inputs[0]
    order = operation.order
    if tensor.rank == 0 or not isinstance(order, int) or order < 1:
        raise Unsupported("normalize of a scalar, or of an order that is not an int >= 1")
    epsilon = keras.config.epsilon() if operation.epsilon is None else float(operation.epsilon)
    value = b.value(tensor)
    x = b.get(tensor, value.perm)
    keras_axes = axes_of(operation.axis, tensor.rank)
    axes = [value.axis(axis) for axis in keras_axes]
    if order == 2:
        square_sum = b.reduce("ReduceSum", b.op("Mul", [x, x]), axes, keepdims=True)
        inverse = b.op("Reciprocal", [b.op("Sqrt", [square_sum])])
        inverse = b.op("Min", [inverse, b.scalar(1.0 / epsilon, "inverse_epsilon")])
        b.set(node.outputs[0], b.op("Mul", [x, inverse]), value.perm)
        return
    if len(axes) != 1:
        raise Unsupported(f"a matrix norm (order={order} over axes {keras_axes})")
    powers = b.op("Abs", [x])
    if order != 1:
        powers = b.op("Pow", [powers, b.scalar(float(order), "order")])
    norm = b.reduce("ReduceSum", powers, axes, keepdims=True)
    if order != 1:
        norm = b.op("Pow", [norm, b.scalar(1.0 / order, "inverse_order")])
    denominator = b.op("Max", [norm, b.scalar(epsilon, "epsilon")])
    b.set(node.outputs[0], b.op("Div", [x, denominator]), value.perm)


# --------------------------------------------------------------------------------------
# Convolution and pooling.


def _per_axis(value: Any, count: int) -> tuple[int, ...]:
    values = tuple(int(v) for v in np.atleast_1d(value).tolist())
    return values * count if len(values) == 1 else values


def _conv_op_input(b: Builder, node: Node) -> tuple[str, Perm, list, Pads | None, np.ndarray, Any]:
    """The input and constant kernel of ``ops.conv``/``ops.depthwise_conv``, and the
    operation's strides, dilations and padding as tuples (it keeps ints)."""
    operation = node.layer
    kernel_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("kernel")
    if isinstance(kernel_arg, Tensor):
        raise Unsupported("a kernel computed from the inputs (a weight or constant is exported)")
    kernel = np.asarray(to_numpy(kernel_arg))
    spatial = kernel.ndim - 2
    padding = operation.padding
    if padding not in ("valid", "same"):
        raise Unsupported(f"padding={padding!r}")
    data_format = operation.data_format or "channels_last"
    name, perm, sizes, pending = spatial_input(b, node, data_format, padding == "valid")
    settings = types.SimpleNamespace(
        strides=_per_axis(operation.strides, spatial),
        dilation_rate=_per_axis(operation.dilation_rate, spatial),
        padding=padding,
    )
    return name, perm, sizes, pending, kernel, settings


def conv_op(b: Builder, node: Node) -> None:
    """``ops.conv(inputs, kernel, ...)`` with a constant kernel (grouped when the
    kernel has fewer input channels than the inputs)."""

    def grouped(kernel: np.ndarray, channels: int | None) -> tuple[np.ndarray, int]:
        if channels is None or channels % kernel.shape[-2]:
            raise Unsupported("input channels that are not a multiple of the kernel's")
        rank = kernel.ndim
        weight = np.transpose(kernel, (rank - 1, rank - 2, *range(rank - 2)))
        return weight, channels // kernel.shape[-2]

    constant_kernel_conv(b, node, _conv_op_input(b, node), grouped)


def depthwise_conv_op(b: Builder, node: Node) -> None:
    """``ops.depthwise_conv(inputs, kernel, ...)`` with a constant kernel."""
    constant_kernel_conv(
        b,
        node,
        _conv_op_input(b, node),
        lambda kernel, _: (depthwise_weight(kernel), kernel.shape[-2]),
    )


def pool_op(op_type: str) -> Rule:
    """The rule of ``ops.max_pool`` / ``ops.average_pool`` (MaxPool / AveragePool;
    ``strides`` default to ``pool_size``, as in Keras)."""

    def rule(b: Builder, node: Node) -> None:
        operation = node.layer
        spatial = node.inputs[0].rank - 2
        if operation.padding not in ("valid", "same"):
            raise Unsupported(f"padding={operation.padding!r}")
        strides = operation.pool_size if operation.strides is None else operation.strides
        settings = types.SimpleNamespace(
            pool_size=_per_axis(operation.pool_size, spatial),
            strides=_per_axis(strides, spatial),
            padding=operation.padding,
            data_format=operation.data_format or keras.config.image_data_format(),
        )
        pool_nodes(b, node, op_type, settings)

    rule.__name__ = f"op_{op_type.lower()}"
    return rule

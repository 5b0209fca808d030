"""One ONNX rule per Keras layer (or ``keras.ops`` operation) class.

:data:`RULES` is the table the exporter consults: a literal dict from class to a
small function ``rule(builder, node)`` that reads the layer's config and weights,
emits ONNX nodes through the :class:`~keras_bn.converters.onnx_export.Builder` and
publishes the node's outputs with ``builder.set``. Adding a layer is adding one
entry and one function. Activation functions (the ``activation`` argument of
Dense/Conv layers, the Activation layer) have their own table,
:data:`ACTIVATIONS`.

A rule that cannot export a particular configuration raises
:class:`~keras_bn.converters.onnx_export.Unsupported` with the reason; the exporter
collects every such layer into one error message.

Layouts: a rule either asks for the order it needs (``builder.get(tensor, perm)``,
convolutions and pooling take channels-first) or works in whatever layout its
input arrives in (``builder.value(tensor)``) and remaps its axes through
``value.perm``; see the module docstring of ``onnx_export``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import activations
from keras import layers as L
from keras.src.applications.convnext import LayerScale
from keras.src.applications.inception_resnet_v2 import CustomScaleLayer
from keras.src.ops import nn as nn_ops
from keras.src.ops import numpy as numpy_ops

from keras_bn.converters.folding import batch_norm_affine
from keras_bn.converters.graph import Node, Tensor, to_numpy
from keras_bn.converters.onnx_export import (
    Builder,
    Perm,
    Unsupported,
    Value,
    channels_first_perm,
    identity_perm,
    same_memory_order,
)
from keras_bn.layers import BatchNormalization as KerasBnBatchNormalization

__all__ = ["RULES", "ACTIVATIONS", "find_rule", "supported_classes"]

Rule = Callable[[Builder, Node], None]
Activation = Callable[[Builder, str, Perm], str]


_numpy = to_numpy  # a variable's value as NumPy, read once


def _weight(b: Builder, layer: Any, attribute: str, array: np.ndarray | None = None) -> str:
    """An initializer for ``layer.<attribute>`` (stored once for shared layers)."""
    if array is None:
        array = _numpy(getattr(layer, attribute))
    return b.const(array, attribute, key=(id(layer), attribute))


def _node_array(b: Builder, node: Node, attribute: str) -> tuple[np.ndarray, tuple]:
    """``node``'s weight ``attribute`` and the key that stores it once.

    A call whose BN was folded while exporting has its own folded weights
    (:meth:`Builder.folded_weight`); every other call reads its layer's, stored
    once for all calls of a shared layer.
    """
    folded = b.folded_weight(node, attribute)
    if folded is not None:
        return folded, (id(node), attribute)
    return _numpy(getattr(node.layer, attribute)), (id(node.layer), attribute)


def _node_weight(b: Builder, node: Node, attribute: str) -> str:
    """An initializer for ``node``'s weight ``attribute`` (see :func:`_node_array`)."""
    array, key = _node_array(b, node, attribute)
    return b.const(array, attribute, key=key)


def _bias(b: Builder, node: Node) -> str | None:
    """The bias initializer of a Dense/Conv-like call, None without one."""
    if b.folded_weight(node, "bias") is None and not node.layer.use_bias:
        return None
    return _node_weight(b, node, "bias")


def _check_not_quantized(layer: Any) -> None:
    mode = getattr(layer, "quantization_mode", None)
    if mode is not None:
        raise Unsupported(f"quantized layers (quantization_mode={mode!r}) are not exported")


# --------------------------------------------------------------------------------------
# Activation functions.


def _apply_activation(b: Builder, function: Any, name: str, perm: Perm) -> str:
    emit = ACTIVATIONS.get(function)
    if emit is None:
        label = getattr(function, "__name__", repr(function))
        raise Unsupported(f"activation {label!r} has no ONNX rule")
    return emit(b, name, perm)


def _last_axis(perm: Perm) -> int:
    return perm.index(len(perm) - 1)


def _act_linear(b: Builder, x: str, perm: Perm) -> str:
    return x


def _act_relu(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Relu", [x])


def _act_relu6(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Clip", [x, b.scalar(0.0, "zero"), b.scalar(6.0, "six")])


def _act_leaky_relu(b: Builder, x: str, perm: Perm) -> str:
    return b.op("LeakyRelu", [x], alpha=0.2)


def _act_elu(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Elu", [x], alpha=1.0)


def _act_selu(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Selu", [x])  # ONNX's default alpha and gamma are Keras's constants


def _act_celu(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Celu", [x], alpha=1.0)


def _act_sigmoid(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Sigmoid", [x])


def _act_hard_sigmoid(b: Builder, x: str, perm: Perm) -> str:
    return b.op("HardSigmoid", [x], alpha=1.0 / 6.0, beta=0.5)


def _act_hard_silu(b: Builder, x: str, perm: Perm) -> str:
    if b.opset >= 14:
        return b.op("HardSwish", [x])
    return b.op("Mul", [x, _act_hard_sigmoid(b, x, perm)])


def _act_silu(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Mul", [x, b.op("Sigmoid", [x])])


def _act_tanh(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Tanh", [x])


def _act_hard_tanh(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Clip", [x, b.scalar(-1.0, "minus_one"), b.scalar(1.0, "one")])


def _act_softmax(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Softmax", [x], axis=_last_axis(perm))


def _act_log_softmax(b: Builder, x: str, perm: Perm) -> str:
    return b.op("LogSoftmax", [x], axis=_last_axis(perm))


def _act_softplus(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Softplus", [x])


def _act_softsign(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Softsign", [x])


def _act_exponential(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Exp", [x])


def _act_log_sigmoid(b: Builder, x: str, perm: Perm) -> str:
    # log(sigmoid(x)) = -softplus(-x), exact for large |x| (as Keras computes it).
    return b.op("Neg", [b.op("Softplus", [b.op("Neg", [x])])])


def _act_mish(b: Builder, x: str, perm: Perm) -> str:
    if b.opset >= 18:
        return b.op("Mish", [x])
    return b.op("Mul", [x, b.op("Tanh", [b.op("Softplus", [x])])])


def _act_tanh_shrink(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Sub", [x, b.op("Tanh", [x])])


def _act_hard_shrink(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Shrink", [x], lambd=0.5, bias=0.0)


def _act_soft_shrink(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Shrink", [x], lambd=0.5, bias=0.5)


def _act_sparse_sigmoid(b: Builder, x: str, perm: Perm) -> str:
    return b.op("HardSigmoid", [x], alpha=0.5, beta=0.5)


def _gelu(b: Builder, x: str, approximate: bool) -> str:
    if b.opset >= 20:
        return b.op("Gelu", [x], approximate="tanh" if approximate else "none")
    if approximate:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = b.op("Mul", [b.op("Mul", [x, x]), x])
        inner = b.op("Add", [x, b.op("Mul", [cube, b.scalar(0.044715, "gelu_coefficient")])])
        scaled = b.op("Mul", [inner, b.scalar(math.sqrt(2.0 / math.pi), "sqrt_2_over_pi")])
        one_plus = b.op("Add", [b.op("Tanh", [scaled]), b.scalar(1.0, "one")])
    else:  # 0.5 x (1 + erf(x / sqrt(2)))
        erf = b.op("Erf", [b.op("Div", [x, b.scalar(math.sqrt(2.0), "sqrt_2")])])
        one_plus = b.op("Add", [erf, b.scalar(1.0, "one")])
    return b.op("Mul", [b.op("Mul", [x, one_plus]), b.scalar(0.5, "half")])


def _act_gelu(b: Builder, x: str, perm: Perm) -> str:
    return _gelu(b, x, approximate=False)  # keras.activations.gelu defaults to exact


ACTIVATIONS: dict[Any, Activation] = {
    activations.linear: _act_linear,
    activations.relu: _act_relu,
    activations.relu6: _act_relu6,
    activations.leaky_relu: _act_leaky_relu,
    activations.elu: _act_elu,
    activations.selu: _act_selu,
    activations.celu: _act_celu,
    activations.sigmoid: _act_sigmoid,
    activations.hard_sigmoid: _act_hard_sigmoid,
    activations.hard_silu: _act_hard_silu,  # also "hard_swish"
    activations.silu: _act_silu,  # also "swish"
    activations.gelu: _act_gelu,
    activations.tanh: _act_tanh,
    activations.hard_tanh: _act_hard_tanh,
    activations.softmax: _act_softmax,
    activations.log_softmax: _act_log_softmax,
    activations.softplus: _act_softplus,
    activations.softsign: _act_softsign,
    activations.exponential: _act_exponential,
    activations.log_sigmoid: _act_log_sigmoid,
    activations.mish: _act_mish,
    activations.tanh_shrink: _act_tanh_shrink,
    activations.hard_shrink: _act_hard_shrink,
    activations.soft_shrink: _act_soft_shrink,
    activations.sparse_sigmoid: _act_sparse_sigmoid,
}


# --------------------------------------------------------------------------------------
# Shared helpers for convolutions and pooling.


def _spatial_axes(rank: int, data_format: str) -> list[int]:
    return list(range(1, rank - 1)) if data_format == "channels_last" else list(range(2, rank))


def _channels_first(rank: int, data_format: str) -> Perm:
    return channels_first_perm(rank) if data_format == "channels_last" else identity_perm(rank)


def _padding_attributes(
    padding: str,
    sizes: Sequence[int | None],
    kernel_size: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pending: Sequence[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """ONNX ``pads``/``auto_pad`` reproducing Keras's padding (TensorFlow's SAME)."""
    count = len(kernel_size)
    begins, ends = [0] * count, [0] * count
    for i in range(count):
        effective = (kernel_size[i] - 1) * dilations[i] + 1
        if padding == "same":
            if strides[i] == 1:
                total = effective - 1
            elif sizes[i] is None:
                return {"auto_pad": "SAME_UPPER"}  # TensorFlow puts the extra pad at the end
            else:
                out = -(-sizes[i] // strides[i])
                total = max((out - 1) * strides[i] + effective - sizes[i], 0)
            begins[i], ends[i] = total // 2, total - total // 2
        elif padding == "causal":
            begins[i] = effective - 1
    if pending:
        begins = [p + q[0] for p, q in zip(begins, pending, strict=True)]
        ends = [p + q[1] for p, q in zip(ends, pending, strict=True)]
    if not any(begins) and not any(ends):
        return {}
    return {"pads": begins + ends}


Pads = list[tuple[int, int]]


def _spatial_input(
    b: Builder, node: Node, data_format: str, absorb_pads: bool
) -> tuple[str, Perm, list[int | None], Pads | None]:
    """The node's input in channels-first order, with pending zero padding if absorbable.

    Returns ``(name, perm, spatial sizes, pending pads per spatial axis or None)``.
    """
    tensor = node.inputs[0]
    rank = tensor.rank
    perm = _channels_first(rank, data_format)
    spatial = _spatial_axes(rank, data_format)
    value = b.value(tensor, keep_pads=True)
    pending = None
    if value.pads is not None:
        other = [value.pads[axis] for axis in range(rank) if axis not in spatial]
        if absorb_pads and not any(any(pad) for pad in other):
            pending = [value.pads[axis] for axis in spatial]
            value = Value(value.name, value.perm)
        else:
            value = b.value(tensor)
    name = b.cast_float(b.transpose(value, perm), tensor.dtype)
    sizes = [tensor.shape[axis] for axis in spatial]
    if pending is not None:
        sizes = [
            None if s is None else s + p[0] + p[1] for s, p in zip(sizes, pending, strict=True)
        ]
    return name, perm, sizes, pending


def _conv_node(
    b: Builder,
    name: str,
    weight: str,
    bias: str | None,
    layer: Any,
    sizes: Sequence[int | None],
    pending: Pads | None,
    kernel_size: Sequence[int],
    group: int = 1,
) -> str:
    strides = list(layer.strides)
    dilations = list(layer.dilation_rate)
    attributes = _padding_attributes(
        layer.padding,
        sizes,
        kernel_size,
        strides,
        dilations,
        pending,
    )
    inputs = [name, weight] + ([bias] if bias is not None else [])
    return b.op(
        "Conv",
        inputs,
        kernel_shape=list(kernel_size),
        strides=strides,
        dilations=dilations,
        group=group if group != 1 else None,
        **attributes,
    )


# --------------------------------------------------------------------------------------
# Rules: core layers.


def dense(b: Builder, node: Node) -> None:
    layer = node.layer
    _check_not_quantized(layer)
    tensor = node.inputs[0]
    kernel, key = _node_array(b, node, "kernel")  # (input units, units)
    bias = _bias(b, node)
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
    b.set(node.outputs[0], _apply_activation(b, layer.activation, out, perm), perm)


def embedding(b: Builder, node: Node) -> None:
    layer = node.layer
    _check_not_quantized(layer)
    tensor = node.inputs[0]
    indices = b.get(tensor, cast=False)
    if np.dtype(tensor.dtype).kind not in "iu":
        indices = b.op("Cast", [indices], to=7)  # INT64
    out = b.op("Gather", [_weight(b, layer, "embeddings"), indices], axis=0)
    b.set(node.outputs[0], out)


def identity(b: Builder, node: Node) -> None:
    """Dropout-like layers: the identity at inference."""
    b.set(node.outputs[0], b.value(node.inputs[0], keep_pads=True))


def activation(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    name = b.get(node.inputs[0], value.perm)
    b.set(
        node.outputs[0], _apply_activation(b, node.layer.activation, name, value.perm), value.perm
    )


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
        _numpy(node.layer.alpha), tensor.rank, value.perm, "alpha", key=(id(node.layer), value.perm)
    )
    b.set(node.outputs[0], b.op("PRelu", [b.get(tensor, value.perm), slope]), value.perm)


def elu(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    out = b.op("Elu", [b.get(node.inputs[0], value.perm)], alpha=float(node.layer.alpha))
    b.set(node.outputs[0], out, value.perm)


def _softmax(b: Builder, x: str, value: Value, axes: Sequence[int]) -> str:
    onnx_axes = sorted(value.axis(axis) for axis in axes)
    if len(onnx_axes) == 1:
        return b.op("Softmax", [x], axis=onnx_axes[0])
    shifted = b.op("Sub", [x, b.reduce("ReduceMax", x, onnx_axes, keepdims=True)])
    exp = b.op("Exp", [shifted])
    return b.op("Div", [exp, b.reduce("ReduceSum", exp, onnx_axes, keepdims=True)])


def softmax(b: Builder, node: Node) -> None:
    if len(node.inputs) > 1 or node.kwargs.get("mask") is not None:
        raise Unsupported("a mask argument is not exported")
    axis = node.layer.axis
    axes = list(axis) if isinstance(axis, list | tuple) else [axis]
    value = b.value(node.inputs[0])
    out = _softmax(b, b.get(node.inputs[0], value.perm), value, axes)
    b.set(node.outputs[0], out, value.perm)


# --------------------------------------------------------------------------------------
# Rules: convolutions and pooling.


def conv(b: Builder, node: Node) -> None:
    """Conv1D/2D/3D (groups, dilation, same/valid/causal padding)."""
    layer = node.layer
    _check_not_quantized(layer)
    name, perm, sizes, pending = _spatial_input(
        b, node, layer.data_format, absorb_pads=layer.padding == "valid"
    )
    kernel, key = _node_array(b, node, "kernel")  # (*kernel_size, in / groups, filters)
    rank = kernel.ndim
    weight = np.transpose(kernel, (rank - 1, rank - 2, *range(rank - 2)))
    out = _conv_node(
        b,
        name,
        b.const(weight, "kernel", key=key),
        _bias(b, node),
        layer,
        sizes,
        pending,
        layer.kernel_size,
        group=layer.groups,
    )
    b.set(node.outputs[0], _apply_activation(b, layer.activation, out, perm), perm)


def _depthwise_weight(kernel: np.ndarray) -> np.ndarray:
    """(*k, C, M) Keras depthwise kernel -> (C*M, 1, *k) ONNX grouped kernel."""
    spatial = kernel.ndim - 2
    flat = kernel.reshape(*kernel.shape[:spatial], -1)  # output channel c * M + m
    return np.moveaxis(flat, -1, 0)[:, None]


def depthwise_conv(b: Builder, node: Node) -> None:
    layer = node.layer
    _check_not_quantized(layer)
    name, perm, sizes, pending = _spatial_input(
        b, node, layer.data_format, absorb_pads=layer.padding == "valid"
    )
    kernel, key = _node_array(b, node, "kernel")
    out = _conv_node(
        b,
        name,
        b.const(_depthwise_weight(kernel), "kernel", key=key),
        _bias(b, node),
        layer,
        sizes,
        pending,
        layer.kernel_size,
        group=kernel.shape[-2],
    )
    b.set(node.outputs[0], _apply_activation(b, layer.activation, out, perm), perm)


def separable_conv(b: Builder, node: Node) -> None:
    layer = node.layer
    name, perm, sizes, pending = _spatial_input(
        b, node, layer.data_format, absorb_pads=layer.padding == "valid"
    )
    depthwise, depthwise_key = _node_array(b, node, "depthwise_kernel")
    depthwise_out = _conv_node(
        b,
        name,
        b.const(_depthwise_weight(depthwise), "depthwise_kernel", key=depthwise_key),
        None,
        layer,
        sizes,
        pending,
        layer.kernel_size,
        group=depthwise.shape[-2],
    )
    pointwise, pointwise_key = _node_array(b, node, "pointwise_kernel")  # (*ones, C*M, out)
    rank = pointwise.ndim
    weight = np.transpose(pointwise, (rank - 1, rank - 2, *range(rank - 2)))
    bias = _bias(b, node)
    out = b.op(
        "Conv",
        [depthwise_out, b.const(weight, "pointwise_kernel", key=pointwise_key)]
        + ([bias] if bias else []),
        kernel_shape=[1] * (rank - 2),
    )
    b.set(node.outputs[0], _apply_activation(b, layer.activation, out, perm), perm)


def _transpose_padding(
    kernel: int, stride: int, dilation: int, padding: str, output_padding: int | None
) -> tuple[int, int, int]:
    """ONNX ConvTranspose (pad begin, pad end, output_padding) for Keras's padding.

    Keras defines transposed convolution (for every backend) as a convolution of
    the stride-dilated input padded by ``(left, right)`` below; ONNX pads that input
    by ``effective - 1 - pad`` on each side, plus ``output_padding`` at the end.
    """
    effective = (kernel - 1) * dilation + 1
    if padding == "valid":
        extra = max(effective, stride) - effective if output_padding is None else output_padding
        left, right = effective - 1, effective - 1 + extra
    else:
        if output_padding is None:
            total = stride + effective - 2
        else:
            total = effective + effective % 2 - 2 + output_padding
        left = min(total // 2 + total % 2, effective - 1)
        right = total - left
    begin = effective - 1 - left
    if right > effective - 1:
        return begin, 0, right - (effective - 1)
    return begin, effective - 1 - right, 0


def conv_transpose(b: Builder, node: Node) -> None:
    layer = node.layer
    name, perm, _, _ = _spatial_input(b, node, layer.data_format, absorb_pads=False)
    kernel, key = _node_array(b, node, "kernel")  # (*kernel_size, filters, input channels)
    rank = kernel.ndim
    weight = np.transpose(kernel, (rank - 1, rank - 2, *range(rank - 2)))
    spatial = rank - 2
    output_padding = layer.output_padding
    pads = [
        _transpose_padding(
            layer.kernel_size[i],
            layer.strides[i],
            layer.dilation_rate[i],
            layer.padding,
            None if output_padding is None else output_padding[i],
        )
        for i in range(spatial)
    ]
    inputs = [name, b.const(weight, "kernel", key=key)]
    bias = _bias(b, node)
    if bias:
        inputs.append(bias)
    begins = [p[0] for p in pads]
    ends = [p[1] for p in pads]
    extra = [p[2] for p in pads]
    out = b.op(
        "ConvTranspose",
        inputs,
        kernel_shape=list(layer.kernel_size),
        strides=list(layer.strides),
        dilations=list(layer.dilation_rate),
        pads=begins + ends if any(begins) or any(ends) else None,
        output_padding=extra if any(extra) else None,
    )
    b.set(node.outputs[0], _apply_activation(b, layer.activation, out, perm), perm)


def _pool(b: Builder, node: Node, op_type: str) -> None:
    layer = node.layer
    name, perm, sizes, _ = _spatial_input(b, node, layer.data_format, absorb_pads=False)
    strides = list(layer.strides)
    attributes = _padding_attributes(
        layer.padding, sizes, layer.pool_size, strides, [1] * len(strides)
    )
    if op_type == "AveragePool" and "pads" in attributes:
        attributes["count_include_pad"] = 0  # Keras averages the real elements only
    out = b.op(op_type, [name], kernel_shape=list(layer.pool_size), strides=strides, **attributes)
    b.set(node.outputs[0], out, perm)


def max_pooling(b: Builder, node: Node) -> None:
    _pool(b, node, "MaxPool")


def average_pooling(b: Builder, node: Node) -> None:
    _pool(b, node, "AveragePool")


def _global_pool(b: Builder, node: Node, global_op: str, reduce_op: str) -> None:
    layer = node.layer
    tensor = node.inputs[0]
    rank = tensor.rank
    value = b.value(tensor)
    spatial = _spatial_axes(rank, layer.data_format)
    onnx_spatial = sorted(value.axis(axis) for axis in spatial)
    x = b.get(tensor, value.perm)
    if onnx_spatial == list(range(2, rank)):  # channels-first already
        out = b.op(global_op, [x])
        if layer.keepdims:
            b.set(node.outputs[0], out, value.perm)
        else:
            b.set(node.outputs[0], b.op("Flatten", [out], axis=1), identity_perm(2))
        return
    out = b.reduce(reduce_op, x, onnx_spatial, keepdims=layer.keepdims)
    if layer.keepdims:
        b.set(node.outputs[0], out, value.perm)
    else:
        kept = [axis for axis in value.perm if axis not in spatial]
        renumber = {axis: i for i, axis in enumerate(sorted(kept))}
        b.set(node.outputs[0], out, tuple(renumber[axis] for axis in kept))


def global_average_pooling(b: Builder, node: Node) -> None:
    if node.kwargs.get("mask") is not None or len(node.inputs) > 1:
        raise Unsupported("a mask argument is not exported")
    _global_pool(b, node, "GlobalAveragePool", "ReduceMean")


def global_max_pooling(b: Builder, node: Node) -> None:
    _global_pool(b, node, "GlobalMaxPool", "ReduceMax")


# --------------------------------------------------------------------------------------
# Rules: merges and elementwise operations.


def _expand_rank(b: Builder, tensor: Any, rank: int, perm: Perm) -> str:
    """A lower-rank merge input expanded at axis 1 (as Keras's Merge does), in ``perm``."""
    shape = (tensor.shape[0],) + (1,) * (rank - tensor.rank) + tuple(tensor.shape[1:])
    name = b.get(tensor)
    if same_memory_order(identity_perm(rank), perm, shape):
        return _reshape_to(b, name, [shape[axis] for axis in perm])
    expanded = b.op("Unsqueeze", [name, b.ints(range(1, 1 + rank - tensor.rank), "axes")])
    return b.transpose(Value(expanded, identity_perm(rank)), perm)


def _common_layout(b: Builder, tensors: Sequence[Any], expand: bool) -> tuple[list[str], Perm]:
    """The inputs in one layout: the one most of them already have.

    Inputs of lower rank are expanded at axis 1 when ``expand`` (merge layers), and
    otherwise broadcast NumPy-style, which needs Keras order.
    """
    values = [b.value(t) for t in tensors]
    rank = max(v.rank for v in values)
    if any(v.rank != rank for v in values) and not expand:
        return [b.get(t) for t in tensors], identity_perm(rank)
    counts: dict[Perm, int] = {}
    for v in values:
        if v.rank == rank:
            counts[v.perm] = counts.get(v.perm, 0) + 1
    perm = max(counts, key=lambda p: counts[p])  # ties: the first input's layout
    names = [b.get(t, perm) if t.rank == rank else _expand_rank(b, t, rank, perm) for t in tensors]
    return names, perm


def _merge(b: Builder, node: Node, op_type: str) -> None:
    names, perm = _common_layout(b, node.inputs, expand=True)
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
    names, perm = _common_layout(b, node.inputs, expand=False)
    axis = perm.index(node.layer.axis % len(perm))
    b.set(node.outputs[0], b.op("Concat", names, axis=axis), perm)


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
    """``keras.ops`` add/subtract/multiply/divide/maximum/minimum (``x + 3.0``, ``a * b``)."""
    op_type = _BINARY_OPS[type(node.layer)]
    args = list(node.args[:2])
    tensors = [arg for arg in args if isinstance(arg, Tensor)]
    if any(np.dtype(t.dtype).kind != "f" for t in tensors) or len(node.args) != 2:
        raise Unsupported("only binary operations on float tensors are exported")
    names, perm = _common_layout(b, tensors, expand=False)
    rank = len(perm)
    by_tensor = dict(zip(map(id, tensors), names, strict=True))
    operands = []
    for arg in args:
        if id(arg) in by_tensor:
            operands.append(by_tensor[id(arg)])
        else:
            array = np.asarray(arg, dtype=np.float64)  # Python ints too: float tensors
            if array.ndim > rank:
                raise Unsupported(f"a constant of shape {array.shape} widens the tensor")
            operands.append(b.broadcast_const(array, rank, perm, "constant"))
    b.set(node.outputs[0], b.op(op_type, operands), perm)


def negative(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    b.set(node.outputs[0], b.op("Neg", [b.get(node.inputs[0], value.perm)]), value.perm)


def _unary_activation(emit: Activation) -> Rule:
    def rule(b: Builder, node: Node) -> None:
        value = b.value(node.inputs[0])
        b.set(node.outputs[0], emit(b, b.get(node.inputs[0], value.perm), value.perm), value.perm)

    rule.__name__ = f"op_{emit.__name__.removeprefix('_act_')}"
    return rule


def gelu_op(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    out = _gelu(b, b.get(node.inputs[0], value.perm), bool(node.layer.approximate))
    b.set(node.outputs[0], out, value.perm)


def softmax_op(b: Builder, node: Node) -> None:
    axis = node.layer.axis
    axes = (
        list(range(node.inputs[0].rank))
        if axis is None
        else (list(axis) if isinstance(axis, list | tuple) else [axis])
    )
    value = b.value(node.inputs[0])
    b.set(node.outputs[0], _softmax(b, b.get(node.inputs[0], value.perm), value, axes), value.perm)


# --------------------------------------------------------------------------------------
# Rules: reshaping, padding, cropping, resampling.


def _reshape_to(b: Builder, name: str, dims: Sequence[int | None]) -> str:
    """Reshape keeping the batch dimension (0 copies it); at most one other unknown size."""
    target = [0] + [-1 if size is None else int(size) for size in dims[1:]]
    if target.count(-1) > 1:
        raise Unsupported("reshaping with more than one unknown non-batch dimension")
    return b.op("Reshape", [name, b.ints(target, "shape")])


def reshape(b: Builder, node: Node) -> None:
    tensor, output = node.inputs[0], node.outputs[0]
    value = b.value(tensor)
    rank = output.rank
    if same_memory_order(value.perm, identity_perm(tensor.rank), tensor.shape):
        # The exported tensor already holds Keras's element order: reshape it directly,
        # straight into channels-first when only size-1 axes move (SE blocks' (1, 1, C)).
        name = b.get(tensor, value.perm)
        perm = channels_first_perm(rank)
        if rank < 3 or not same_memory_order(identity_perm(rank), perm, output.shape):
            perm = identity_perm(rank)
    else:
        name, perm = b.get(tensor), identity_perm(rank)
    b.set(output, _reshape_to(b, name, [output.shape[axis] for axis in perm]), perm)


def flatten(b: Builder, node: Node) -> None:
    tensor = node.inputs[0]
    rank = tensor.rank
    value = b.value(tensor)
    order = identity_perm(rank)
    if node.layer.data_format == "channels_first" and rank > 2:
        order = (0, *range(2, rank), 1)
    if same_memory_order(value.perm, order, tensor.shape):
        name = b.get(tensor, value.perm)
    else:
        name = b.get(tensor, order)
    b.set(node.outputs[0], b.op("Flatten", [name], axis=1), identity_perm(2))


def permute(b: Builder, node: Node) -> None:
    """Permute costs nothing: only the layout bookkeeping changes."""
    value = b.value(node.inputs[0], keep_pads=True)
    order = (0, *node.layer.dims)  # output Keras axis j = input Keras axis order[j]
    inverse = {axis: j for j, axis in enumerate(order)}
    pads = None if value.pads is None else tuple(value.pads[axis] for axis in order)
    b.set(node.outputs[0], Value(value.name, tuple(inverse[a] for a in value.perm), pads))


def _pairs(padding: Any, count: int) -> list[tuple[int, int]]:
    """Normalize a ZeroPadding/Cropping argument to one (begin, end) pair per axis."""
    if isinstance(padding, int):
        return [(padding, padding)] * count
    padding = list(padding)
    if count == 1 and len(padding) == 2 and all(isinstance(p, int) for p in padding):
        return [(int(padding[0]), int(padding[1]))]
    pairs = []
    for item in padding:
        pairs.append(
            (int(item), int(item)) if isinstance(item, int) else (int(item[0]), int(item[1]))
        )
    return pairs


def _padded_axes(layer: Any, rank: int) -> list[int]:
    data_format = getattr(layer, "data_format", "channels_last")
    return _spatial_axes(rank, data_format)


def zero_padding(b: Builder, node: Node) -> None:
    """Left pending: a following valid convolution takes it as its ``pads``."""
    tensor = node.inputs[0]
    rank = tensor.rank
    axes = _padded_axes(node.layer, rank)
    pairs = _pairs(node.layer.padding, len(axes))
    value = b.value(tensor, keep_pads=True)
    pads = list(value.pads or [(0, 0)] * rank)
    for axis, (begin, end) in zip(axes, pairs, strict=True):
        pads[axis] = (pads[axis][0] + begin, pads[axis][1] + end)
    b.set(node.outputs[0], Value(value.name, value.perm, tuple(pads)))


def cropping(b: Builder, node: Node) -> None:
    tensor = node.inputs[0]
    axes = _padded_axes(node.layer, tensor.rank)
    pairs = _pairs(node.layer.cropping, len(axes))
    value = b.value(tensor)
    onnx_axes = [value.axis(axis) for axis in axes]
    starts = [begin for begin, _ in pairs]
    ends = [-end if end else np.iinfo(np.int64).max for _, end in pairs]
    out = b.op(
        "Slice",
        [value.name, b.ints(starts, "starts"), b.ints(ends, "ends"), b.ints(onnx_axes, "axes")],
    )
    b.set(node.outputs[0], out, value.perm)


def upsampling(b: Builder, node: Node) -> None:
    layer = node.layer
    tensor = node.inputs[0]
    rank = tensor.rank
    axes = _padded_axes(layer, rank)
    size = layer.size
    factors = [int(size)] * len(axes) if isinstance(size, int) else [int(s) for s in size]
    interpolation = getattr(layer, "interpolation", "nearest")
    if interpolation not in ("nearest", "bilinear"):
        raise Unsupported(f"interpolation={interpolation!r} (nearest and bilinear are)")
    if interpolation == "bilinear":
        data_format = getattr(layer, "data_format", "channels_last")
        perm = _channels_first(rank, data_format)
        name = b.get(tensor, perm)
    else:
        value = b.value(tensor)
        perm, name = value.perm, b.get(tensor, value.perm)
    scales = [1.0] * rank
    for axis, factor in zip(axes, factors, strict=True):
        scales[perm.index(axis)] = float(factor)
    scales_name = b.const(np.asarray(scales, dtype=np.float32), "scales", dtype=np.float32)
    if interpolation == "nearest":  # Keras repeats each element
        out = b.op(
            "Resize",
            [name, "", scales_name],
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        )
    else:
        out = b.op(
            "Resize",
            [name, "", scales_name],
            mode="linear",
            coordinate_transformation_mode="half_pixel",
        )
    b.set(node.outputs[0], out, perm)


# --------------------------------------------------------------------------------------
# Rules: preprocessing and normalization.


def rescaling(b: Builder, node: Node) -> None:
    layer = node.layer
    tensor = node.inputs[0]
    value = b.value(tensor)
    scale = np.asarray(layer.scale if np.isscalar(layer.scale) else _numpy(layer.scale), float)
    offset = np.asarray(layer.offset if np.isscalar(layer.offset) else _numpy(layer.offset), float)
    if keras.config.image_data_format() == "channels_first":
        scale = scale.reshape(scale.shape + (1,) * (3 - scale.ndim)) if scale.ndim else scale
        offset = offset.reshape(offset.shape + (1,) * (3 - offset.ndim)) if offset.ndim else offset
    out = b.get(tensor, value.perm)
    if not (scale.ndim == 0 and float(scale) == 1.0):
        out = b.op("Mul", [out, b.broadcast_const(scale, tensor.rank, value.perm, "scale")])
    if not (offset.ndim == 0 and float(offset) == 0.0):
        out = b.op("Add", [out, b.broadcast_const(offset, tensor.rank, value.perm, "offset")])
    b.set(node.outputs[0], out, value.perm)


def normalization(b: Builder, node: Node) -> None:
    """(x - mean) / max(sqrt(variance), epsilon), as Keras computes it."""
    layer = node.layer
    tensor = node.inputs[0]
    value = b.value(tensor)
    dtype = b.dtype
    mean = _numpy(layer.mean).astype(dtype)
    deviation = np.maximum(
        np.sqrt(_numpy(layer.variance).astype(dtype)), np.asarray(keras.config.epsilon(), dtype)
    )
    x = b.get(tensor, value.perm)
    mean_name = b.broadcast_const(mean, tensor.rank, value.perm, "mean")
    deviation_name = b.broadcast_const(deviation, tensor.rank, value.perm, "deviation")
    if layer.invert:
        out = b.op("Add", [b.op("Mul", [x, deviation_name]), mean_name])
    else:
        out = b.op("Div", [b.op("Sub", [x, mean_name]), deviation_name])
    b.set(node.outputs[0], out, value.perm)


def _param_shape_const(
    b: Builder, layer: Any, attribute: str, rank: int, perm: Perm, axes: Sequence[int]
) -> str:
    return b.broadcast_const(
        _numpy(getattr(layer, attribute)),
        rank,
        perm,
        attribute,
        axes=axes,
        key=(id(layer), attribute, perm),
    )


def layer_normalization(b: Builder, node: Node) -> None:
    layer = node.layer
    tensor = node.inputs[0]
    rank = tensor.rank
    axes = sorted(
        a % rank for a in (layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis])
    )
    value = b.value(tensor)
    trailing = list(range(rank - len(axes), rank))
    if not layer.rms_scaling and b.opset >= 17:
        perm = value.perm if sorted(value.axis(a) for a in axes) == trailing else None
        if perm is None and axes == trailing:
            perm = identity_perm(rank)
        if perm is not None:
            x = b.get(tensor, perm)
            size = [tensor.shape[a] for a in perm[rank - len(axes) :]]
            order = [a for a in perm if a in axes]
            params = {}
            for attribute, enabled, fill in (
                ("gamma", layer.scale, 1.0),
                ("beta", layer.center, 0.0),
            ):
                if enabled:
                    array = _numpy(getattr(layer, attribute))
                    array = array.reshape([tensor.shape[a] for a in axes])
                    array = np.transpose(array, [axes.index(a) for a in order])
                else:
                    array = np.full(size, fill)
                params[attribute] = b.const(array, attribute, key=(id(layer), attribute, perm))
            out = b.op(
                "LayerNormalization",
                [x, params["gamma"], params["beta"]],
                axis=rank - len(axes),
                epsilon=float(layer.epsilon),
            )
            b.set(node.outputs[0], out, perm)
            return
    # Decomposed, in the input's layout.
    perm = value.perm
    x = b.get(tensor, perm)
    onnx_axes = sorted(value.axis(a) for a in axes)
    mean = b.reduce("ReduceMean", x, onnx_axes, keepdims=True)
    centered = b.op("Sub", [x, mean])
    variance = b.reduce("ReduceMean", b.op("Mul", [centered, centered]), onnx_axes, keepdims=True)
    inverse = b.op(
        "Reciprocal",
        [b.op("Sqrt", [b.op("Add", [variance, b.scalar(float(layer.epsilon), "epsilon")])])],
    )
    out = b.op("Mul", [x if layer.rms_scaling else centered, inverse])
    if layer.scale:
        out = b.op("Mul", [out, _param_shape_const(b, layer, "gamma", rank, perm, axes)])
    if layer.center and not layer.rms_scaling:
        out = b.op("Add", [out, _param_shape_const(b, layer, "beta", rank, perm, axes)])
    b.set(node.outputs[0], out, perm)


def group_normalization(b: Builder, node: Node) -> None:
    """Reshape to (N, groups, -1), InstanceNormalization, reshape back, affine."""
    layer = node.layer
    tensor = node.inputs[0]
    rank = tensor.rank
    axis = layer.axis % rank
    perm = channels_first_perm(rank, axis)
    x = b.get(tensor, perm)
    groups = int(layer.groups)
    grouped = b.op("Reshape", [x, b.ints([0, groups, -1], "group_shape")])
    ones = b.const(np.ones(groups), "instance_scale")
    zeros = b.const(np.zeros(groups), "instance_bias")
    normalized = b.op("InstanceNormalization", [grouped, ones, zeros], epsilon=float(layer.epsilon))
    shape = [tensor.shape[a] for a in perm]
    if sum(size is None for size in shape[1:]) <= 1:
        out = _reshape_to(b, normalized, shape)
    else:
        out = b.op("Reshape", [normalized, b.op("Shape", [x])])
    if layer.scale:
        out = b.op("Mul", [out, _param_shape_const(b, layer, "gamma", rank, perm, [axis])])
    if layer.center:
        out = b.op("Add", [out, _param_shape_const(b, layer, "beta", rank, perm, [axis])])
    b.set(node.outputs[0], out, perm)


def batch_normalization(b: Builder, node: Node) -> None:
    """An unfolded BatchNormalization: one per-channel Mul and Add in any layout.

    Folding it into a neighbouring layer is ``fold_batch_norms``'s job; the export's
    structural check warns when one is left after a foldable layer.
    """
    if node.kwargs.get("training") is True:
        raise Unsupported("called with training=True (batch statistics at inference)")
    layer = node.layer
    tensor = node.inputs[0]
    rank = tensor.rank
    axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
    value = b.value(tensor)
    scale, offset = batch_norm_affine(layer)  # float64, stock and keras_bn layers
    x = b.get(tensor, value.perm)
    scale_name = b.broadcast_const(
        scale, rank, value.perm, "scale", axes=axes, key=(id(layer), "scale", value.perm)
    )
    offset_name = b.broadcast_const(
        offset, rank, value.perm, "offset", axes=axes, key=(id(layer), "offset", value.perm)
    )
    out = b.op("Add", [b.op("Mul", [x, scale_name]), offset_name])
    b.set(node.outputs[0], out, value.perm)


def layer_scale(b: Builder, node: Node) -> None:
    """ConvNeXt's LayerScale: ``x * gamma`` on the last axis."""
    tensor = node.inputs[0]
    value = b.value(tensor)
    gamma = b.broadcast_const(
        _numpy(node.layer.gamma), tensor.rank, value.perm, "gamma", key=(id(node.layer), value.perm)
    )
    b.set(node.outputs[0], b.op("Mul", [b.get(tensor, value.perm), gamma]), value.perm)


def custom_scale(b: Builder, node: Node) -> None:
    """InceptionResNetV2's CustomScaleLayer: ``inputs[0] + inputs[1] * scale``."""
    names, perm = _common_layout(b, node.inputs, expand=False)
    scaled = b.op("Mul", [names[1], b.scalar(float(node.layer.scale), "scale")])
    b.set(node.outputs[0], b.op("Add", [names[0], scaled]), perm)


# --------------------------------------------------------------------------------------
# The table.

RULES: dict[type, Rule] = {
    # Core
    L.Dense: dense,
    L.Embedding: embedding,
    L.Activation: activation,
    L.ReLU: relu,
    L.LeakyReLU: leaky_relu,
    L.PReLU: prelu,
    L.ELU: elu,
    L.Softmax: softmax,
    # Convolution and pooling
    L.Conv1D: conv,
    L.Conv2D: conv,
    L.Conv3D: conv,
    L.DepthwiseConv1D: depthwise_conv,
    L.DepthwiseConv2D: depthwise_conv,
    L.SeparableConv1D: separable_conv,
    L.SeparableConv2D: separable_conv,
    L.Conv1DTranspose: conv_transpose,
    L.Conv2DTranspose: conv_transpose,
    L.Conv3DTranspose: conv_transpose,
    L.MaxPooling1D: max_pooling,
    L.MaxPooling2D: max_pooling,
    L.MaxPooling3D: max_pooling,
    L.AveragePooling1D: average_pooling,
    L.AveragePooling2D: average_pooling,
    L.AveragePooling3D: average_pooling,
    L.GlobalAveragePooling1D: global_average_pooling,
    L.GlobalAveragePooling2D: global_average_pooling,
    L.GlobalAveragePooling3D: global_average_pooling,
    L.GlobalMaxPooling1D: global_max_pooling,
    L.GlobalMaxPooling2D: global_max_pooling,
    L.GlobalMaxPooling3D: global_max_pooling,
    # Merging
    L.Add: add,
    L.Subtract: subtract,
    L.Multiply: multiply,
    L.Average: average,
    L.Maximum: maximum,
    L.Minimum: minimum,
    L.Concatenate: concatenate,
    # Reshaping
    L.Reshape: reshape,
    L.Flatten: flatten,
    L.Permute: permute,
    L.ZeroPadding1D: zero_padding,
    L.ZeroPadding2D: zero_padding,
    L.ZeroPadding3D: zero_padding,
    L.Cropping1D: cropping,
    L.Cropping2D: cropping,
    L.Cropping3D: cropping,
    L.UpSampling1D: upsampling,
    L.UpSampling2D: upsampling,
    L.UpSampling3D: upsampling,
    # Identity at inference
    L.Dropout: identity,
    L.SpatialDropout1D: identity,
    L.SpatialDropout2D: identity,
    L.SpatialDropout3D: identity,
    L.GaussianDropout: identity,
    L.GaussianNoise: identity,
    L.AlphaDropout: identity,
    L.ActivityRegularization: identity,
    L.Identity: identity,
    # Preprocessing and normalization
    L.Rescaling: rescaling,
    L.Normalization: normalization,
    L.LayerNormalization: layer_normalization,
    L.GroupNormalization: group_normalization,
    L.BatchNormalization: batch_normalization,
    KerasBnBatchNormalization: batch_normalization,
    # Keras Applications' own layers
    LayerScale: layer_scale,
    CustomScaleLayer: custom_scale,
    # keras.ops operations used in functional code (x + 3.0, x * y, ops.gelu(x))
    numpy_ops.Add: binary_op,
    numpy_ops.Subtract: binary_op,
    numpy_ops.Multiply: binary_op,
    numpy_ops.Divide: binary_op,
    numpy_ops.TrueDivide: binary_op,
    numpy_ops.Maximum: binary_op,
    numpy_ops.Minimum: binary_op,
    numpy_ops.Negative: negative,
    numpy_ops.Tanh: _unary_activation(_act_tanh),
    nn_ops.Relu: _unary_activation(_act_relu),
    nn_ops.Relu6: _unary_activation(_act_relu6),
    nn_ops.Sigmoid: _unary_activation(_act_sigmoid),
    nn_ops.Silu: _unary_activation(_act_silu),
    nn_ops.HardSigmoid: _unary_activation(_act_hard_sigmoid),
    nn_ops.HardSilu: _unary_activation(_act_hard_silu),
    nn_ops.Gelu: gelu_op,
    nn_ops.Softmax: softmax_op,
}


def find_rule(layer: Any) -> Rule | None:
    """The rule for ``layer``'s exact class (a subclass may compute something else)."""
    return RULES.get(type(layer))


def supported_classes() -> list[str]:
    """Names of the layer/operation classes with a rule, for messages and the CLI."""
    return sorted({f"{cls.__module__.split('.')[-1]}.{cls.__name__}" for cls in RULES})

"""Rules: convolutions (plain, depthwise, separable, transposed) and pooling."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from keras_bn.converters.graph import Node
from keras_bn.converters.onnx.builder import Builder, Unsupported, Value
from keras_bn.converters.onnx.layout import Perm, identity_perm
from keras_bn.converters.onnx.rules.activations import apply_activation
from keras_bn.converters.onnx.rules.common import (
    channels_first_layout,
    check_not_quantized,
    node_array,
    node_bias,
    spatial_axes,
)


def padding_attributes(
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
                size = int(sizes[i])  # type: ignore[arg-type]  # known: the branch above
                out = -(-size // strides[i])
                total = max((out - 1) * strides[i] + effective - size, 0)
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


def spatial_input(
    b: Builder, node: Node, data_format: str, absorb_pads: bool
) -> tuple[str, Perm, list[int | None], Pads | None]:
    """The node's input in channels-first order, with pending zero padding if absorbable.

    Returns ``(name, perm, spatial sizes, pending pads per spatial axis or None)``.
    """
    tensor = node.inputs[0]
    rank = tensor.rank
    perm = channels_first_layout(rank, data_format)
    spatial = spatial_axes(rank, data_format)
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
    attributes = padding_attributes(
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
# Convolutions.


def conv(b: Builder, node: Node) -> None:
    """Conv1D/2D/3D (groups, dilation, same/valid/causal padding)."""
    layer = node.layer
    check_not_quantized(layer)
    name, perm, sizes, pending = spatial_input(
        b, node, layer.data_format, absorb_pads=layer.padding == "valid"
    )
    kernel, key = node_array(b, node, "kernel")  # (*kernel_size, in / groups, filters)
    rank = kernel.ndim
    weight = np.transpose(kernel, (rank - 1, rank - 2, *range(rank - 2)))
    out = _conv_node(
        b,
        name,
        b.const(weight, "kernel", key=key),
        node_bias(b, node),
        layer,
        sizes,
        pending,
        layer.kernel_size,
        group=layer.groups,
    )
    b.set(node.outputs[0], apply_activation(b, layer.activation, out, perm), perm)


def constant_kernel_conv(
    b: Builder,
    node: Node,
    conv_input: tuple[str, Perm, list, Pads | None, np.ndarray, Any],
    as_onnx: Callable[[np.ndarray, int | None], tuple[np.ndarray, int]],
) -> None:
    """An ONNX Conv for ``ops.conv``/``ops.depthwise_conv`` (:mod:`.ops.nn`):
    ``conv_input`` is the input, its layout, spatial sizes and pending pads, the
    constant kernel and the operation's settings; ``as_onnx(kernel, input
    channels)`` gives the ONNX weight and the group count."""
    name, perm, sizes, pending, kernel, settings = conv_input
    weight, group = as_onnx(kernel, node.inputs[0].shape[perm[1]])
    out = _conv_node(
        b,
        name,
        b.const(weight, "kernel"),
        None,
        settings,
        sizes,
        pending,
        kernel.shape[:-2],
        group=group,
    )
    b.set(node.outputs[0], out, perm)


def depthwise_weight(kernel: np.ndarray) -> np.ndarray:
    """(*k, C, M) Keras depthwise kernel -> (C*M, 1, *k) ONNX grouped kernel."""
    spatial = kernel.ndim - 2
    flat = kernel.reshape(*kernel.shape[:spatial], -1)  # output channel c * M + m
    return np.moveaxis(flat, -1, 0)[:, None]


def depthwise_conv(b: Builder, node: Node) -> None:
    layer = node.layer
    check_not_quantized(layer)
    name, perm, sizes, pending = spatial_input(
        b, node, layer.data_format, absorb_pads=layer.padding == "valid"
    )
    kernel, key = node_array(b, node, "kernel")
    out = _conv_node(
        b,
        name,
        b.const(depthwise_weight(kernel), "kernel", key=key),
        node_bias(b, node),
        layer,
        sizes,
        pending,
        layer.kernel_size,
        group=kernel.shape[-2],
    )
    b.set(node.outputs[0], apply_activation(b, layer.activation, out, perm), perm)


def separable_conv(b: Builder, node: Node) -> None:
    layer = node.layer
    name, perm, sizes, pending = spatial_input(
        b, node, layer.data_format, absorb_pads=layer.padding == "valid"
    )
    depthwise, depthwise_key = node_array(b, node, "depthwise_kernel")
    depthwise_out = _conv_node(
        b,
        name,
        b.const(depthwise_weight(depthwise), "depthwise_kernel", key=depthwise_key),
        None,
        layer,
        sizes,
        pending,
        layer.kernel_size,
        group=depthwise.shape[-2],
    )
    pointwise, pointwise_key = node_array(b, node, "pointwise_kernel")  # (*ones, C*M, out)
    rank = pointwise.ndim
    weight = np.transpose(pointwise, (rank - 1, rank - 2, *range(rank - 2)))
    bias = node_bias(b, node)
    out = b.op(
        "Conv",
        [depthwise_out, b.const(weight, "pointwise_kernel", key=pointwise_key)]
        + ([bias] if bias else []),
        kernel_shape=[1] * (rank - 2),
    )
    b.set(node.outputs[0], apply_activation(b, layer.activation, out, perm), perm)


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
    name, perm, _, _ = spatial_input(b, node, layer.data_format, absorb_pads=False)
    kernel, key = node_array(b, node, "kernel")  # (*kernel_size, filters, input channels)
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
    bias = node_bias(b, node)
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
    b.set(node.outputs[0], apply_activation(b, layer.activation, out, perm), perm)


# --------------------------------------------------------------------------------------
# Pooling.


def pool_nodes(b: Builder, node: Node, op_type: str, layer: Any) -> None:
    """MaxPool/AveragePool of the node's input by ``layer``'s ``pool_size``,
    ``strides``, ``padding`` and ``data_format`` (a pooling layer, or the settings
    of ``ops.max_pool``/``ops.average_pool``)."""
    name, perm, sizes, _ = spatial_input(b, node, layer.data_format, absorb_pads=False)
    strides = list(layer.strides)
    attributes = padding_attributes(
        layer.padding, sizes, layer.pool_size, strides, [1] * len(strides)
    )
    if op_type == "AveragePool" and "pads" in attributes:
        attributes["count_include_pad"] = 0  # Keras averages the real elements only
    out = b.op(op_type, [name], kernel_shape=list(layer.pool_size), strides=strides, **attributes)
    b.set(node.outputs[0], out, perm)


def max_pooling(b: Builder, node: Node) -> None:
    pool_nodes(b, node, "MaxPool", node.layer)


def average_pooling(b: Builder, node: Node) -> None:
    pool_nodes(b, node, "AveragePool", node.layer)


def _global_pool(b: Builder, node: Node, global_op: str, reduce_op: str) -> None:
    layer = node.layer
    tensor = node.inputs[0]
    rank = tensor.rank
    value = b.value(tensor)
    spatial = spatial_axes(rank, layer.data_format)
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

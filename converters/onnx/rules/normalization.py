"""Rules: preprocessing and normalization layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from keras_bn.converters.folding.rules import layer_affine
from keras_bn.converters.graph import Node, to_numpy
from keras_bn.converters.onnx.builder import Builder, Unsupported
from keras_bn.converters.onnx.layout import Perm, channels_first_perm, identity_perm
from keras_bn.converters.onnx.rules.common import reshape_to


def rescaling(b: Builder, node: Node) -> None:
    layer = node.layer
    tensor = node.inputs[0]
    value = b.value(tensor)
    scale = np.asarray(layer.scale if np.isscalar(layer.scale) else to_numpy(layer.scale), float)
    offset = np.asarray(
        layer.offset if np.isscalar(layer.offset) else to_numpy(layer.offset), float
    )
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
    mean = to_numpy(layer.mean).astype(dtype)
    deviation = np.maximum(
        np.sqrt(to_numpy(layer.variance).astype(dtype)), np.asarray(keras.config.epsilon(), dtype)
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
        to_numpy(getattr(layer, attribute)),
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
                    array = to_numpy(getattr(layer, attribute))
                    array = array.reshape([tensor.shape[a] for a in axes])
                    array = np.transpose(array, [axes.index(a) for a in order])
                else:
                    array = np.full([int(d or 1) for d in size], fill)  # sizes are known
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
        out = reshape_to(b, normalized, shape)
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
    scale, offset = layer_affine(layer)  # float64, stock and keras_bn layers
    x = b.get(tensor, value.perm)
    scale_name = b.broadcast_const(
        scale, rank, value.perm, "scale", axes=axes, key=(id(layer), "scale", value.perm)
    )
    offset_name = b.broadcast_const(
        offset, rank, value.perm, "offset", axes=axes, key=(id(layer), "offset", value.perm)
    )
    out = b.op("Add", [b.op("Mul", [x, scale_name]), offset_name])
    b.set(node.outputs[0], out, value.perm)


def unit_normalization(b: Builder, node: Node) -> None:
    """x * min(1 / sqrt(sum(x^2, axes)), 1e12), as Keras's ``ops.normalize`` computes it."""
    layer = node.layer
    tensor = node.inputs[0]
    value = b.value(tensor)
    axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
    x = b.get(tensor, value.perm)
    onnx_axes = sorted(value.axis(a) for a in axes)
    square_sum = b.reduce("ReduceSum", b.op("Mul", [x, x]), onnx_axes, keepdims=True)
    inverse = b.op("Reciprocal", [b.op("Sqrt", [square_sum])])
    inverse = b.op("Min", [inverse, b.scalar(1e12, "inverse_epsilon")])
    b.set(node.outputs[0], b.op("Mul", [x, inverse]), value.perm)

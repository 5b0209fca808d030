"""Rules: reshaping, padding, cropping, resampling."""

from __future__ import annotations

from typing import Any

import numpy as np

from keras_bn.converters.graph import Node
from keras_bn.converters.onnx.builder import Builder, Unsupported, Value
from keras_bn.converters.onnx.layout import channels_first_perm, identity_perm, same_memory_order
from keras_bn.converters.onnx.rules.common import channels_first_layout, reshape_to, spatial_axes


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
    b.set(output, reshape_to(b, name, [output.shape[axis] for axis in perm]), perm)


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
    return spatial_axes(rank, data_format)


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
        perm = channels_first_layout(rank, data_format)
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


def resize_images(
    b: Builder,
    node: Node,
    layer: Any,
    size: tuple[int, int],
    coordinates: str = "half_pixel",
) -> None:
    """``Resizing`` / ``ops.image.resize`` of a batch of images to ``size`` (height,
    width): ONNX Resize with half-pixel centres, as TensorFlow's and JAX's resize
    compute them (nearest: ``floor((i + 0.5) * in / out)``), or with the ONNX
    ``coordinate_transformation_mode`` ``coordinates``."""
    tensor = node.inputs[0]
    if tensor.rank != 4:
        raise Unsupported("resizing a single image (rank 3); batches of images are exported")
    interpolation = layer.interpolation
    if interpolation not in ("nearest", "bilinear"):
        raise Unsupported(f"interpolation={interpolation!r} (nearest and bilinear are)")
    for option in ("crop_to_aspect_ratio", "pad_to_aspect_ratio", "antialias"):
        if getattr(layer, option, False):
            raise Unsupported(f"{option}=True")
    data_format = getattr(layer, "data_format", None) or "channels_last"
    if interpolation == "bilinear":  # onnxruntime resizes the last two axes linearly
        perm = channels_first_layout(4, data_format)
        name = b.get(tensor, perm)
    else:
        value = b.value(tensor)
        perm, name = value.perm, b.get(tensor, value.perm)
    spatial = (1, 2) if data_format == "channels_last" else (2, 3)
    parts = []
    for axis in perm:  # the output's sizes in the exported layout; the batch at runtime
        if axis == 0:
            parts.append(b.batch_size())
        else:
            known = size[spatial.index(axis)] if axis in spatial else tensor.shape[axis]
            if known is None:
                raise Unsupported("resizing images with an unknown number of channels")
            parts.append(b.ints([int(known)], "size"))
    sizes = b.op("Concat", parts, axis=0)
    if interpolation == "nearest":
        out = b.op(
            "Resize",
            [name, "", "", sizes],
            mode="nearest",
            coordinate_transformation_mode=coordinates,
            nearest_mode="round_prefer_ceil",
        )
    else:
        out = b.op(
            "Resize",
            [name, "", "", sizes],
            mode="linear",
            coordinate_transformation_mode=coordinates,
        )
    b.set(node.outputs[0], out, perm)


def resizing(b: Builder, node: Node) -> None:
    resize_images(b, node, node.layer, (node.layer.height, node.layer.width))


def repeat_vector(b: Builder, node: Node) -> None:
    """RepeatVector: ``(batch, features)`` -> ``(batch, n, features)``, the input
    repeated ``n`` times along a new axis 1 (Unsqueeze, Tile)."""
    x = b.op("Unsqueeze", [b.get(node.inputs[0]), b.ints([1], "axis1")])
    repeats = b.ints([1, int(node.layer.n), 1], "repeats")
    b.set(node.outputs[0], b.op("Tile", [x, repeats]))

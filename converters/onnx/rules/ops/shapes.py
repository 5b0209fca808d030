"""``keras.ops`` rules: shapes, indexing, gathering and resampling.

They work in Keras order (their inputs arrive in it through one cached
Transpose), except transposes, which relabel the layout and cost no node. Sizes
equal to a multiple of the tracing batch size
(:data:`keras_bn.converters.tracing.BATCH`) or to a product of unknown input
sizes stand for the runtime sizes (:func:`.common.shape_input`).
"""

from __future__ import annotations

import numpy as np

from keras_bn.converters.graph import Node, Tensor, to_numpy
from keras_bn.converters.onnx.builder import Builder, Unsupported, tensor_type
from keras_bn.converters.onnx.rules.ops.common import axes_of, cast_to, operand, shape_input
from keras_bn.converters.onnx.rules.reshaping import resize_images

__all__ = [
    "aligned_resize",
    "broadcast_to",
    "concatenate",
    "expand_dims",
    "get_item",
    "grid_sample",
    "image_resize",
    "one_hot",
    "pad",
    "reshape",
    "split",
    "squeeze",
    "stack",
    "swapaxes",
    "take",
    "take_along_axis",
    "tile",
    "transpose",
    "unstack",
]


def reshape(b: Builder, node: Node) -> None:
    """To the output's static shape, or, with several unknown sizes, to the traced
    target shape with each unknown size computed from the input sizes it stands for
    (``ops.reshape(y, ops.shape(x))``: Shape, Slice, Mul, Concat; from opset 14 with
    ``allowzero``, so that a size computed as 0 stays 0)."""
    out = node.outputs[0]
    sizes = [-1 if size is None else size for size in out.shape]
    if sizes.count(-1) > 1:
        target = [size if size is not None else 0 for size in node.layer.newshape]
        if any(size in (None, 0) for size in target):
            raise Unsupported("reshaping to several unknown sizes not read from the input shapes")
        shape = shape_input(b, node, target)
        # A size computed as 0 (no prompt points) means 0, not "copy the input's".
        allowzero = 1 if b.opset >= 14 else None
    else:
        shape, allowzero = b.ints(sizes, "shape"), None
    b.set(out, b.op("Reshape", [b.get(node.inputs[0]), shape], allowzero=allowzero))


def transpose(b: Builder, node: Node) -> None:
    tensor = node.inputs[0]
    axes = node.layer.axes
    order = list(reversed(range(tensor.rank))) if axes is None else [a % tensor.rank for a in axes]
    # A transpose is a relabelling of the layout: no node unless someone asks for order.
    value = b.value(tensor)
    b.set(node.outputs[0], value.name, tuple(order.index(axis) for axis in value.perm))


def swapaxes(b: Builder, node: Node) -> None:
    tensor = node.inputs[0]
    order = list(range(tensor.rank))
    first, second = node.layer.axis1 % tensor.rank, node.layer.axis2 % tensor.rank
    order[first], order[second] = order[second], order[first]
    value = b.value(tensor)
    b.set(node.outputs[0], value.name, tuple(order.index(axis) for axis in value.perm))


def expand_dims(b: Builder, node: Node) -> None:
    rank = node.outputs[0].rank
    axes = axes_of(node.layer.axis, rank)
    b.set(node.outputs[0], b.op("Unsqueeze", [b.get(node.inputs[0]), b.ints(axes, "axes")]))


def squeeze(b: Builder, node: Node) -> None:
    tensor = node.inputs[0]
    axis = node.layer.axis
    axes = (
        [i for i, size in enumerate(tensor.shape) if size == 1]
        if axis is None
        else axes_of(axis, tensor.rank)
    )
    b.set(node.outputs[0], b.op("Squeeze", [b.get(tensor), b.ints(axes, "axes")]))


def concatenate(b: Builder, node: Node) -> None:
    parts = node.args[0]
    like = next(part for part in parts if isinstance(part, Tensor))
    axis = int(node.layer.axis) % node.outputs[0].rank
    names = [operand(b, part, like) for part in parts]
    b.set(node.outputs[0], b.op("Concat", names, axis=axis))


def stack(b: Builder, node: Node) -> None:
    parts = node.args[0]
    like = next(part for part in parts if isinstance(part, Tensor))
    axis = int(node.layer.axis) % node.outputs[0].rank
    names = [b.op("Unsqueeze", [operand(b, part, like), b.ints([axis], "axes")]) for part in parts]
    b.set(node.outputs[0], b.op("Concat", names, axis=axis))


def split(b: Builder, node: Node) -> None:
    tensor = node.inputs[0]
    axis = int(node.layer.axis) % tensor.rank
    sizes: list[int] = []
    for out in node.outputs:
        size = out.shape[axis]
        if size is None:
            raise Unsupported("splitting an axis of unknown size")
        sizes.append(size)
    outs = b.op(
        "Split", [b.get(tensor), b.ints(sizes, "split")], axis=axis, outputs=len(node.outputs)
    )
    for out, name in zip(node.outputs, outs if len(node.outputs) > 1 else [outs], strict=True):
        b.set(out, name)


def unstack(b: Builder, node: Node) -> None:
    tensor = node.inputs[0]
    axis = int(node.layer.axis) % tensor.rank
    count = len(node.outputs)
    parts = b.op("Split", [b.get(tensor), b.ints([1] * count, "split")], axis=axis, outputs=count)
    for out, name in zip(node.outputs, parts if count > 1 else [parts], strict=True):
        b.set(out, b.op("Squeeze", [name, b.ints([axis], "axes")]))


def tile(b: Builder, node: Node) -> None:
    tensor = node.inputs[0]
    repeats = list(np.atleast_1d(node.layer.repeats))
    repeats = [1] * (tensor.rank - len(repeats)) + [int(r) for r in repeats]
    x = b.get(tensor)
    if len(repeats) > tensor.rank:
        x = b.op("Reshape", [x, b.ints([1] * (len(repeats) - tensor.rank) + [0] * tensor.rank)])
    b.set(node.outputs[0], b.op("Tile", [x, shape_input(b, node, repeats)]))


def broadcast_to(b: Builder, node: Node) -> None:
    shape = [int(size) for size in node.layer.shape]
    b.set(node.outputs[0], b.op("Expand", [b.get(node.inputs[0]), shape_input(b, node, shape)]))


def pad(b: Builder, node: Node) -> None:
    layer = node.layer
    if layer.mode not in ("constant", "reflect", "symmetric", "edge"):
        raise Unsupported(f"pad mode {layer.mode!r}")
    if layer.mode == "symmetric":
        raise Unsupported("pad mode 'symmetric' has no ONNX equivalent")
    tensor = node.inputs[0]
    value = b.value(tensor)
    widths = np.broadcast_to(np.asarray(layer.pad_width, dtype=np.int64), (tensor.rank, 2))
    begins = [int(widths[axis][0]) for axis in value.perm]
    ends = [int(widths[axis][1]) for axis in value.perm]
    inputs = [b.get(tensor, value.perm), b.ints(begins + ends, "pads")]
    constant = node.args[1] if len(node.args) > 1 else node.kwargs.get("constant_values")
    if constant is not None:
        if isinstance(constant, Tensor):
            raise Unsupported("a symbolic pad value")
        inputs.append(b.scalar(float(constant), "pad_value"))
    mode = {"constant": "constant", "reflect": "reflect", "edge": "edge"}[layer.mode]
    b.set(node.outputs[0], b.op("Pad", inputs, mode=mode), value.perm)


def get_item(b: Builder, node: Node) -> None:
    """``x[...]`` with ints, slices (strided, negative), None and Ellipsis."""
    tensor = node.inputs[0]
    key = node.args[1] if len(node.args) > 1 else node.kwargs["key"]
    key = list(key) if isinstance(key, list | tuple) else [key]
    if any(isinstance(item, Tensor) for item in key):
        raise Unsupported("indexing with a symbolic tensor (use ops.take)")
    used = sum(1 for item in key if item is not None and item is not Ellipsis)
    if Ellipsis in key:
        at = key.index(Ellipsis)
        key = key[:at] + [slice(None)] * (tensor.rank - used) + key[at + 1 :]
    key += [slice(None)] * (tensor.rank - used)
    x = b.get(tensor)
    starts, ends, axes, steps, gathers, inserts = [], [], [], [], [], []
    axis = 0
    out_axis = 0
    for item in key:
        if item is None:
            inserts.append(out_axis)
            out_axis += 1
            continue
        if isinstance(item, slice):
            if item != slice(None):
                step = 1 if item.step is None else int(item.step)
                start = item.start if item.start is not None else (0 if step > 0 else -1)
                default_end = np.iinfo(np.int64).max if step > 0 else np.iinfo(np.int64).min
                end = item.stop if item.stop is not None else default_end
                starts.append(int(start))
                ends.append(int(end))
                axes.append(axis)
                steps.append(step)
            out_axis += 1
        elif isinstance(item, int | np.integer):
            gathers.append((axis, int(item)))
        else:
            raise Unsupported(f"index {item!r}")
        axis += 1
    if axes:
        x = b.op(
            "Slice",
            [
                x,
                b.ints(starts, "starts"),
                b.ints(ends, "ends"),
                b.ints(axes, "axes"),
                b.ints(steps, "steps"),
            ],
        )
    for gather_axis, index in reversed(gathers):  # later axes first: indices stay valid
        x = b.op("Gather", [x, b.ints([index], "index")], axis=gather_axis)
    if gathers:
        x = b.op("Squeeze", [x, b.ints([axis for axis, _ in gathers], "axes")])
    if inserts:
        x = b.op("Unsqueeze", [x, b.ints(inserts, "axes")])
    b.set(node.outputs[0], x)


def take(b: Builder, node: Node) -> None:
    """``ops.take`` (embedding lookups): Gather along ``axis`` (flattened when None)."""
    x = operand(b, node.args[0])
    indices_arg = node.args[1] if len(node.args) > 1 else node.kwargs["indices"]
    if isinstance(indices_arg, Tensor):
        indices = b.op("Cast", [b.get(indices_arg)], to=tensor_type("int64"))
    else:
        indices = b.const(np.asarray(to_numpy(indices_arg), np.int64), "indices")
    axis = node.layer.axis
    if axis is None:
        x = b.op("Reshape", [x, b.ints([-1], "shape")])
        axis = 0
    b.set(node.outputs[0], b.op("Gather", [x, indices], axis=int(axis)))


def take_along_axis(b: Builder, node: Node) -> None:
    """``ops.take_along_axis(x, indices, axis)``: GatherElements, the two broadcast
    against each other on every other axis first (NumPy's rule, which GatherElements
    lacks: D-FINE gathers ``(n, points, 1)`` indices from ``(n, pixels, channels)``)."""
    axis = node.layer.axis
    x = operand(b, node.args[0])
    indices_arg = node.args[1] if len(node.args) > 1 else node.kwargs["indices"]
    indices = b.op("Cast", [operand(b, indices_arg)], to=tensor_type("int64"))
    if axis is None:
        x = b.op("Reshape", [x, b.ints([-1], "shape")])
        indices = b.op("Reshape", [indices, b.ints([-1], "shape")])
        axis = 0
    rank = node.outputs[0].rank
    axis = int(axis) % rank

    def others(name: str) -> str:  # its shape, 1 along the axis
        shape = b.op("Shape", [name])
        return b.op("ScatterElements", [shape, b.ints([axis], "axis"), b.ints([1], "one")])

    x_others, indices_others = others(x), others(indices)
    indices = b.op("Expand", [indices, x_others])
    x = b.op("Expand", [x, indices_others])
    b.set(node.outputs[0], b.op("GatherElements", [x, indices], axis=axis))


def image_resize(b: Builder, node: Node) -> None:
    """``ops.image.resize`` (nearest, bilinear) of a batch of images."""
    resize_images(b, node, node.layer, tuple(node.layer.size))


def aligned_resize(b: Builder, node: Node) -> None:
    """Bilinear resize with aligned corners (KerasHub DepthAnything's ``interpolate``):
    output pixel ``i`` samples the input at ``i * (in - 1) / (out - 1)``."""
    resize_images(b, node, node.layer, node.layer.size, coordinates="align_corners")


def grid_sample(b: Builder, node: Node) -> None:
    """Bilinear sampling with zeros outside (D-FINE's deformable attention): ONNX
    GridSample on ``(N, C, H, W)`` data, in Keras order, from opset 16."""
    if b.opset < 16:
        raise Unsupported("grid sampling needs opset 16 or later (GridSample)")
    data, grid = (b.get(tensor) for tensor in node.inputs[:2])
    mode = "bilinear" if b.opset < 20 else "linear"
    out = b.op(
        "GridSample",
        [data, grid],
        mode=mode,
        padding_mode="zeros",
        align_corners=int(node.layer.align_corners),
    )
    b.set(node.outputs[0], out)


def one_hot(b: Builder, node: Node) -> None:
    """``ops.one_hot(x, num_classes, axis)``: ONNX OneHot, whose negative indices
    count from the end where Keras's give a row of zeros: they become
    ``num_classes``, out of range, which gives zeros in both."""
    operation, tensor, out = node.layer, node.inputs[0], node.outputs[0]
    if getattr(operation, "sparse", False):
        raise Unsupported("a sparse one-hot tensor")
    indices = b.op("Cast", [b.get(tensor, cast=False)], to=tensor_type("int64"))
    classes = int(operation.num_classes)
    depth = b.ints([classes], "depth")
    negative = b.op("Less", [indices, b.ints([0], "zero")])
    indices = b.op("Where", [negative, depth, indices])
    # onnxruntime's OneHot writes float32 or int64 (with int64 indices): cast after
    dtype = np.dtype(out.dtype)
    written = np.dtype(np.float32 if dtype.kind == "f" else np.int64)
    values = b.const(np.asarray([0, 1], written), "values", dtype=written)
    hot = b.op("OneHot", [indices, depth, values], axis=int(operation.axis))
    b.set(out, cast_to(b, hot, written, dtype))

"""Rules: ``keras.ops`` operations recorded by tracing a layer's ``call()``.

One small rule per operation class (the table in :mod:`.table` keys them by
class). An operation's attributes live on the operation instance (``node.layer``:
``Reshape.newshape``, ``Pad.pad_width``...); its arguments in ``node.args``,
where symbolic tensors are graph :class:`~keras_bn.converters.graph.Tensor` and
everything else (weights read in ``call()``, Python numbers, tensors computed from
constants) is a constant. Shape-changing operations work in Keras order (their
inputs arrive in it through one cached Transpose); elementwise operations and
reductions keep whatever layout their input has. Sizes equal to a multiple of the
tracing batch size (:data:`keras_bn.converters.tracing.BATCH`) stand for the
runtime batch size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from keras import tree

from keras_bn._keras_internals import core_ops, image_ops, math_ops, nn_ops, numpy_ops
from keras_bn.converters.graph import Node, Tensor, to_numpy
from keras_bn.converters.onnx.builder import Builder, Unsupported, tensor_type
from keras_bn.converters.onnx.layout import Perm
from keras_bn.converters.onnx.rules.common import Rule, softmax_nodes
from keras_bn.converters.onnx.rules.common import constant_input as _constant
from keras_bn.converters.onnx.rules.convolution import conv_op, depthwise_conv_op
from keras_bn.converters.onnx.rules.reshaping import resize_images
from keras_bn.converters.tracing import (
    AlignedResize,
    Constant,
    GridSample,
    TraceError,
    batch_multiple,
    trace_function,
    traced_size,
)

__all__ = ["OPERATION_RULES", "READS_UNKNOWN_SIZES"]


# --------------------------------------------------------------------------------------
# Helpers.


def _batch(b: Builder) -> str:
    """The runtime batch size as a 1-D int64 tensor (of the first graph input)."""
    return b.batch_size()


def _operand(b: Builder, arg: Any, like: Tensor | None = None) -> str:
    return b.get(arg) if isinstance(arg, Tensor) else _constant(b, arg, like)


def _shape_input(b: Builder, node: Node, sizes: Sequence[Any]) -> str:
    """A shape (Reshape/Expand/Tile argument) whose sizes that stand for the runtime
    batch size or for products of unknown input sizes
    (:func:`~keras_bn.converters.tracing.traced_size`) are computed at runtime."""
    traced = [traced_size(size, node.unknown_sizes) for size in sizes]
    if all(size.static for size in traced):
        return b.ints([size.coefficient for size in traced], "shape")
    parts = []
    for size in traced:
        factors = [_batch(b)] if size.batch else []
        factors += [b.size(tensor, axis) for tensor, axis in size.dims]
        if size.coefficient != 1 or not factors:
            factors.append(b.ints([size.coefficient], "size"))
        part = factors[0]
        for factor in factors[1:]:
            part = b.op("Mul", [part, factor])
        parts.append(part)
    return b.op("Concat", parts, axis=0)


def _axes(axis: Any, rank: int) -> list[int]:
    if axis is None:
        return list(range(rank))
    axes = list(axis) if isinstance(axis, list | tuple) else [axis]
    return sorted(int(a) % rank for a in axes)


def _kept_perm(perm: Perm, removed: Sequence[int]) -> Perm:
    """The layout left when Keras axes ``removed`` are reduced away."""
    kept = [axis for axis in perm if axis not in removed]
    order = sorted(kept)
    return tuple(order.index(axis) for axis in kept)


def constant(b: Builder, node: Node) -> None:
    """A traced call's output computed from constants only (flatten drops the ones
    nothing reads); an Identity gives a graph output of its own."""
    out = _constant(b, node.layer.value)
    b.set(node.outputs[0], out if node.outputs[0].consumers else b.op("Identity", [out]))


# --------------------------------------------------------------------------------------
# Elementwise.


def _unary(op_type: str) -> Rule:
    def rule(b: Builder, node: Node) -> None:
        value = b.value(node.inputs[0])
        b.set(node.outputs[0], b.op(op_type, [b.get(node.inputs[0], value.perm)]), value.perm)

    rule.__name__ = f"op_{op_type.lower()}"
    return rule


def square(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    x = b.get(node.inputs[0], value.perm)
    b.set(node.outputs[0], b.op("Mul", [x, x]), value.perm)


def rsqrt(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    root = b.op("Sqrt", [b.get(node.inputs[0], value.perm)])
    b.set(node.outputs[0], b.op("Reciprocal", [root]), value.perm)


def cast(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    x = b.get(node.inputs[0], value.perm, cast=False)
    b.set(node.outputs[0], b.op("Cast", [x], to=tensor_type(node.outputs[0].dtype)), value.perm)


def identity(b: Builder, node: Node) -> None:
    """``ops.stop_gradient`` (the identity at inference) and ``ops.convert_to_tensor``
    of a tensor (a Cast where it changes the dtype)."""
    tensor, out = node.inputs[0], node.outputs[0]
    value = b.value(tensor, keep_pads=True)
    if np.dtype(tensor.dtype) == np.dtype(out.dtype):
        b.set(out, value)
        return
    x = b.get(tensor, value.perm, cast=False)
    b.set(out, b.op("Cast", [x], to=tensor_type(out.dtype)), value.perm)


def zeros_like(b: Builder, node: Node) -> None:
    """Zeros of the input's shape (and the op's dtype), in the input's layout."""
    value = b.value(node.inputs[0])
    shape = b.op("Shape", [b.get(node.inputs[0], value.perm, cast=False)])
    dtype = np.dtype(node.outputs[0].dtype)
    zero = b.const(np.zeros((1,), dtype=dtype), "zero", dtype=dtype)
    b.set(node.outputs[0], b.op("Expand", [zero, shape]), value.perm)


def logical_not(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    x = _boolean(b, b.get(node.inputs[0], value.perm, cast=False), node.inputs[0].dtype)
    b.set(node.outputs[0], b.op("Not", [x]), value.perm)


def _boolean(b: Builder, name: str, dtype: Any) -> str:
    return name if np.dtype(dtype) == np.bool_ else b.op("Cast", [name], to=tensor_type("bool"))


def clip(b: Builder, node: Node) -> None:
    """Clip of floats, or of integers (D-FINE's pixel indices) with integer bounds."""
    tensor, out = node.inputs[0], node.outputs[0]
    value = b.value(tensor)
    dtype = np.dtype(out.dtype)
    if dtype.kind == "f":
        x = b.get(tensor, value.perm)
        low = b.scalar(float(node.layer.x_min), "min")
        high = b.scalar(float(node.layer.x_max), "max")
    else:
        x = _cast_to(b, b.get(tensor, value.perm, cast=False), tensor.dtype, out.dtype)
        low = b.const(np.asarray(to_numpy(node.layer.x_min), dtype), "min", dtype=dtype)
        high = b.const(np.asarray(to_numpy(node.layer.x_max), dtype), "max", dtype=dtype)
    b.set(out, b.op("Clip", [x, low, high]), value.perm)


_BINARY = {
    numpy_ops.Power: "Pow",
    numpy_ops.Greater: "Greater",
    numpy_ops.GreaterEqual: "GreaterOrEqual",
    numpy_ops.Less: "Less",
    numpy_ops.LessEqual: "LessOrEqual",
    numpy_ops.Equal: "Equal",
    numpy_ops.LogicalAnd: "And",
    numpy_ops.LogicalOr: "Or",
}


def binary(b: Builder, node: Node) -> None:
    """Power, comparisons and logical and/or, NumPy broadcasting in Keras order."""
    like = next(arg for arg in node.args[:2] if isinstance(arg, Tensor))
    operands = [_operand(b, arg, like) for arg in node.args[:2]]
    op_type = _BINARY[type(node.layer)]
    if op_type in ("And", "Or"):  # truthiness of numbers, as NumPy's
        operands = [
            _boolean(b, name, arg.dtype if isinstance(arg, Tensor) else np.asarray(arg).dtype)
            for name, arg in zip(operands, node.args[:2], strict=True)
        ]
    b.set(node.outputs[0], b.op(op_type, operands))


def where(b: Builder, node: Node) -> None:
    if len(node.args) != 3 or node.args[1] is None:
        raise Unsupported("only where(condition, x1, x2) is exported")
    like = next((arg for arg in node.args[1:] if isinstance(arg, Tensor)), None)
    condition = _operand(b, node.args[0])
    if not isinstance(node.args[0], Tensor) or np.dtype(node.args[0].dtype) != np.bool_:
        condition = b.op("Cast", [condition], to=tensor_type("bool"))
    operands = [_operand(b, arg, like) for arg in node.args[1:]]
    b.set(node.outputs[0], b.op("Where", [condition, *operands]))


# --------------------------------------------------------------------------------------
# Reductions (in the input's layout).


def _reduction(op_type: str) -> Rule:
    def rule(b: Builder, node: Node) -> None:
        layer = node.layer
        if getattr(layer, "initial", None) is not None:
            raise Unsupported("reductions with an initial value are not exported")
        tensor = node.inputs[0]
        value = b.value(tensor)
        axes = _axes(layer.axis, tensor.rank)
        keepdims = bool(layer.keepdims)
        out = b.reduce(op_type, b.get(tensor, value.perm), [value.axis(a) for a in axes], keepdims)
        perm = value.perm if keepdims else _kept_perm(value.perm, axes)
        b.set(node.outputs[0], out, perm)

    rule.__name__ = f"op_{op_type.lower()}"
    return rule


# --------------------------------------------------------------------------------------
# Scans, arg-reductions, sorting (in the input's layout).


def _flat_or_axis(b: Builder, node: Node, axis: Any) -> tuple[str, int, Any]:
    """The input and the ONNX axis to scan/sort along, and the output's layout: the
    flattened input (Keras order) when ``axis`` is None."""
    tensor = node.inputs[0]
    if axis is None:
        return b.op("Reshape", [b.get(tensor), b.ints([-1], "shape")]), 0, None
    value = b.value(tensor)
    return b.get(tensor, value.perm), value.axis(int(axis) % tensor.rank), value.perm


def _cast_to(b: Builder, name: str, source: str, target: str) -> str:
    return name if source == target else b.op("Cast", [name], to=tensor_type(target))


def cumsum(b: Builder, node: Node) -> None:
    x, axis, perm = _flat_or_axis(b, node, node.layer.axis)
    out = b.op("CumSum", [x, b.ints([axis], "axis")])
    b.set(node.outputs[0], _cast_to(b, out, node.inputs[0].dtype, node.outputs[0].dtype), perm)


def cumprod(b: Builder, node: Node) -> None:
    """No ONNX CumProd: a log-depth scan (Hillis-Steele), x *= x shifted by 1, 2, 4...
    along the axis with ones shifted in; exact products, in another order."""
    tensor = node.inputs[0]
    if np.dtype(tensor.dtype).kind != "f":
        raise Unsupported("cumprod of integers (of floats is exported)")
    x, axis, perm = _flat_or_axis(b, node, node.layer.axis)
    if node.layer.axis is None:
        size = None if None in tensor.shape else math.prod(tensor.shape)  # type: ignore[arg-type]
    else:
        size = tensor.shape[int(node.layer.axis) % tensor.rank]
    if size is None:
        raise Unsupported("cumprod along an axis of unknown size")
    rank = 1 if node.layer.axis is None else tensor.rank
    shift = 1
    while shift < size:
        head = b.op(
            "Slice", [x, b.ints([0], "starts"), b.ints([size - shift], "ends"), b.ints([axis])]
        )
        pads = [0] * (2 * rank)
        pads[axis] = shift
        shifted = b.op("Pad", [head, b.ints(pads, "pads"), b.scalar(1.0, "one")])
        x = b.op("Mul", [x, shifted])
        shift *= 2
    b.set(node.outputs[0], _cast_to(b, x, node.inputs[0].dtype, node.outputs[0].dtype), perm)


def _arg_reduction(op_type: str) -> Rule:
    def rule(b: Builder, node: Node) -> None:
        layer = node.layer
        tensor = node.inputs[0]
        x, axis, perm = _flat_or_axis(b, node, layer.axis)
        keepdims = bool(layer.keepdims)
        out = b.op(op_type, [x], axis=axis, keepdims=int(keepdims))
        if perm is not None and not keepdims:
            perm = _kept_perm(perm, [int(layer.axis) % tensor.rank])
        if layer.axis is None and keepdims:  # Keras keeps every axis, of size 1
            out = b.op("Reshape", [out, b.ints([1] * tensor.rank, "shape")])
        b.set(node.outputs[0], b.op("Cast", [out], to=tensor_type(node.outputs[0].dtype)), perm)

    rule.__name__ = f"op_{op_type.lower()}"
    return rule


def sort(b: Builder, node: Node) -> None:
    """Ascending sort: TopK of every element, smallest first."""
    x, axis, perm = _flat_or_axis(b, node, node.layer.axis)
    count = b.op("Slice", [b.op("Shape", [x]), b.ints([axis]), b.ints([axis + 1])])
    values, _ = b.op("TopK", [x, count], axis=axis, largest=0, sorted=1, outputs=2)
    b.set(node.outputs[0], values, perm)


def top_k(b: Builder, node: Node) -> None:
    """``ops.top_k(x, k)`` along the last axis: values and int32 indices, largest
    first (also for ``sorted=False``, whose order Keras leaves to the backend)."""
    tensor = node.inputs[0]
    x = b.get(tensor)
    k = b.ints([int(node.layer.k)], "k")
    values, indices = b.op("TopK", [x, k], axis=tensor.rank - 1, largest=1, sorted=1, outputs=2)
    b.set(node.outputs[0], values)
    b.set(node.outputs[1], b.op("Cast", [indices], to=tensor_type(node.outputs[1].dtype)))


# --------------------------------------------------------------------------------------
# Shapes (Keras order).


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
        shape = _shape_input(b, node, target)
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
    axes = _axes(node.layer.axis, rank)
    b.set(node.outputs[0], b.op("Unsqueeze", [b.get(node.inputs[0]), b.ints(axes, "axes")]))


def squeeze(b: Builder, node: Node) -> None:
    tensor = node.inputs[0]
    axis = node.layer.axis
    axes = (
        [i for i, size in enumerate(tensor.shape) if size == 1]
        if axis is None
        else _axes(axis, tensor.rank)
    )
    b.set(node.outputs[0], b.op("Squeeze", [b.get(tensor), b.ints(axes, "axes")]))


def concatenate(b: Builder, node: Node) -> None:
    parts = node.args[0]
    like = next(part for part in parts if isinstance(part, Tensor))
    axis = int(node.layer.axis) % node.outputs[0].rank
    names = [_operand(b, part, like) for part in parts]
    b.set(node.outputs[0], b.op("Concat", names, axis=axis))


def stack(b: Builder, node: Node) -> None:
    parts = node.args[0]
    like = next(part for part in parts if isinstance(part, Tensor))
    axis = int(node.layer.axis) % node.outputs[0].rank
    names = [b.op("Unsqueeze", [_operand(b, part, like), b.ints([axis], "axes")]) for part in parts]
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
    b.set(node.outputs[0], b.op("Tile", [x, _shape_input(b, node, repeats)]))


def broadcast_to(b: Builder, node: Node) -> None:
    shape = [int(size) for size in node.layer.shape]
    b.set(node.outputs[0], b.op("Expand", [b.get(node.inputs[0]), _shape_input(b, node, shape)]))


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


def slice_op(b: Builder, node: Node) -> None:
    """``ops.slice(x, start_indices, shape)`` at static starts; batch-sized sizes
    (``ops.shape(x)[0]`` read while tracing) end at the runtime batch size."""
    tensor = node.inputs[0]
    starts_arg = node.args[1] if len(node.args) > 1 else node.kwargs["start_indices"]
    if any(isinstance(start, Tensor) for start in tree.flatten(starts_arg)):
        raise Unsupported("slicing at symbolic start indices")
    starts = [int(start) for start in np.asarray(to_numpy(starts_arg)).reshape(-1)]
    begins, ends, axes = [], [], []
    for axis, (start, size, full) in enumerate(
        zip(starts, node.layer.shape, tensor.shape, strict=True)
    ):
        if start == 0 and size == full:
            continue  # the whole axis
        begins.append(start)
        ends.append(start + int(size) if batch_multiple(size) is None else size)
        axes.append(axis)
    x = b.get(tensor)
    if not axes:
        b.set(node.outputs[0], b.op("Identity", [x]))
        return
    if any(batch_multiple(end) for end in ends):
        if any(start for start, end in zip(begins, ends, strict=True) if batch_multiple(end)):
            raise Unsupported("a batch-sized slice not starting at 0")
        stops = _shape_input(b, node, ends)
    else:
        stops = b.ints(ends, "ends")
    b.set(
        node.outputs[0], b.op("Slice", [x, b.ints(begins, "starts"), stops, b.ints(axes, "axes")])
    )


def take(b: Builder, node: Node) -> None:
    """``ops.take`` (embedding lookups): Gather along ``axis`` (flattened when None)."""
    x = _operand(b, node.args[0])
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
    x = _operand(b, node.args[0])
    indices_arg = node.args[1] if len(node.args) > 1 else node.kwargs["indices"]
    indices = b.op("Cast", [_operand(b, indices_arg)], to=tensor_type("int64"))
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


# --------------------------------------------------------------------------------------
# Loops.


def map_op(b: Builder, node: Node) -> None:
    """``ops.map(f, xs)``: ``f`` traced once on placeholders for one element of each
    ``xs`` tensor, and run by ONNX Scan over their first axis (the batch, for
    KerasHub D-FINE's per-sample gathers), its outputs stacked along it, as Keras's."""
    function, xs = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["xs"]
    elements = tree.flatten(xs)
    if not elements or not all(isinstance(x, Tensor) and x.rank for x in elements):
        raise Unsupported("ops.map over constants (mapped over symbolic tensors it is exported)")
    if any(size is None for x in elements for size in x.shape[1:]):
        raise Unsupported("ops.map over elements of unknown size")
    element = tree.map_structure(
        lambda x: Tensor(x.name, x.shape[1:], x.dtype) if isinstance(x, Tensor) else x, xs
    )

    def spec(x: Any) -> tuple[tuple[int | None, ...], str] | None:
        return (x.shape, x.dtype) if isinstance(x, Tensor) else None

    try:
        traced = trace_function(function, (element,), spec, node.layer.name)
    except TraceError as error:
        raise Unsupported(f"its function does not trace ({error})") from error
    if traced.model is None or any(not hasattr(x, "shape") for x in traced.outputs):
        raise Unsupported("ops.map of a function whose outputs do not depend on its input")
    body = b.export_subgraph(traced.model, node.name, b.unique(f"{node.name}/body"))
    names = [b.get(x, cast=False) for x in elements]
    count = len(node.outputs)
    outs = b.op("Scan", names, outputs=count, body=body, num_scan_inputs=len(names))
    for out, name in zip(node.outputs, outs if count > 1 else [outs], strict=True):
        b.set(out, name)


# --------------------------------------------------------------------------------------
# Linear algebra and attention.


def matmul(b: Builder, node: Node) -> None:
    like = next(arg for arg in node.args[:2] if isinstance(arg, Tensor))
    first, second = (_operand(b, arg, like) for arg in node.args[:2])
    b.set(node.outputs[0], b.op("MatMul", [first, second]))


def einsum(b: Builder, node: Node) -> None:
    like = next(arg for arg in node.args if isinstance(arg, Tensor))
    equation = node.layer.subscripts.replace(" ", "")
    operands = [_operand(b, arg, like) for arg in node.args]
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
        logits = b.op("Add", [logits, _operand(b, arguments["bias"], query)])
    if arguments.get("mask") is not None:
        mask = _operand(b, arguments["mask"])
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
    axes = _axes(layer.axis, tensor.rank)
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
        out = b.op("Mul", [out, _operand(b, gamma, tensor)])
    if beta is not None:
        out = b.op("Add", [out, _operand(b, beta, tensor)])
    b.set(node.outputs[0], out)


def _rms(b: Builder, x: str, axes: list[int], epsilon: float) -> str:
    mean_square = b.reduce("ReduceMean", b.op("Mul", [x, x]), axes, keepdims=True)
    root = b.op("Sqrt", [b.op("Add", [mean_square, b.scalar(epsilon, "epsilon")])])
    return b.op("Div", [x, root])


def rms_norm(b: Builder, node: Node) -> None:
    layer = node.layer
    tensor = node.inputs[0]
    epsilon = 1e-6 if layer.epsilon is None else float(layer.epsilon)
    out = _rms(b, b.get(tensor), _axes(layer.axis, tensor.rank), epsilon)
    scale = node.args[1] if len(node.args) > 1 else node.kwargs.get("scale")
    if scale is not None:
        out = b.op("Mul", [out, _operand(b, scale, tensor)])
    b.set(node.outputs[0], out)


def log_softmax(b: Builder, node: Node) -> None:
    tensor = node.inputs[0]
    value = b.value(tensor)
    axes = _axes(node.layer.axis, tensor.rank)
    x = b.get(tensor, value.perm)
    b.set(node.outputs[0], b.op("Log", [softmax_nodes(b, x, value, axes)]), value.perm)


def erf(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    b.set(node.outputs[0], b.op("Erf", [b.get(node.inputs[0], value.perm)]), value.perm)


# The rules that compute the unknown input sizes a traced operation's arguments hold
# at runtime; any other rule refuses such a node (it would bake a marker size in).
READS_UNKNOWN_SIZES: frozenset[Rule] = frozenset({reshape, tile, broadcast_to})

OPERATION_RULES: dict[type, Rule] = {
    Constant: constant,
    # elementwise
    numpy_ops.Sqrt: _unary("Sqrt"),
    numpy_ops.Exp: _unary("Exp"),
    numpy_ops.Log: _unary("Log"),
    numpy_ops.Abs: _unary("Abs"),
    numpy_ops.Absolute: _unary("Abs"),
    numpy_ops.Reciprocal: _unary("Reciprocal"),
    numpy_ops.Sign: _unary("Sign"),
    numpy_ops.Floor: _unary("Floor"),
    numpy_ops.Ceil: _unary("Ceil"),
    numpy_ops.Sin: _unary("Sin"),
    numpy_ops.Cos: _unary("Cos"),
    numpy_ops.Square: square,
    numpy_ops.Clip: clip,
    numpy_ops.Power: binary,
    numpy_ops.Greater: binary,
    numpy_ops.GreaterEqual: binary,
    numpy_ops.Less: binary,
    numpy_ops.LessEqual: binary,
    numpy_ops.Equal: binary,
    numpy_ops.LogicalAnd: binary,
    numpy_ops.LogicalOr: binary,
    numpy_ops.LogicalNot: logical_not,
    numpy_ops.Where: where,
    numpy_ops.ZerosLike: zeros_like,
    core_ops.StopGradient: identity,
    core_ops.ConvertToTensor: identity,
    math_ops.Rsqrt: rsqrt,
    math_ops.Erf: erf,
    core_ops.Cast: cast,
    nn_ops.Softplus: _unary("Softplus"),
    nn_ops.Softsign: _unary("Softsign"),
    nn_ops.LogSoftmax: log_softmax,
    # scans, arg-reductions, sorting
    numpy_ops.Cumsum: cumsum,
    numpy_ops.Cumprod: cumprod,
    numpy_ops.Argmax: _arg_reduction("ArgMax"),
    numpy_ops.Argmin: _arg_reduction("ArgMin"),
    numpy_ops.Sort: sort,
    math_ops.TopK: top_k,
    # reductions
    numpy_ops.Mean: _reduction("ReduceMean"),
    numpy_ops.Sum: _reduction("ReduceSum"),
    numpy_ops.Max: _reduction("ReduceMax"),
    numpy_ops.Min: _reduction("ReduceMin"),
    numpy_ops.Amax: _reduction("ReduceMax"),
    numpy_ops.Amin: _reduction("ReduceMin"),
    # shapes
    numpy_ops.Reshape: reshape,
    numpy_ops.Transpose: transpose,
    numpy_ops.Swapaxes: swapaxes,
    numpy_ops.ExpandDims: expand_dims,
    numpy_ops.Squeeze: squeeze,
    numpy_ops.Concatenate: concatenate,
    numpy_ops.Stack: stack,
    numpy_ops.Split: split,
    core_ops.Unstack: unstack,
    numpy_ops.Tile: tile,
    numpy_ops.BroadcastTo: broadcast_to,
    numpy_ops.Pad: pad,
    numpy_ops.GetItem: get_item,
    core_ops.Slice: slice_op,
    numpy_ops.Take: take,
    numpy_ops.TakeAlongAxis: take_along_axis,
    image_ops.Resize: image_resize,
    GridSample: grid_sample,
    AlignedResize: aligned_resize,
    nn_ops.Conv: conv_op,
    nn_ops.DepthwiseConv: depthwise_conv_op,
    # loops
    core_ops.Map: map_op,
    # linear algebra, attention, normalization
    numpy_ops.Matmul: matmul,
    numpy_ops.Einsum: einsum,
    nn_ops.DotProductAttention: dot_product_attention,
    nn_ops.LayerNorm: layer_norm,
    nn_ops.RMSNorm: rms_norm,
}

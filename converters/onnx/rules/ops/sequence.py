"""Rules: the ``keras.ops`` operations sequence models record when traced.

Text backbones read the sequence length while tracing (``ops.shape(x)[1]``) and
build from it what other models build from constants: position tables sliced to
the length, ``ops.arange(length)`` for causal masks and rotary embeddings. A trace
records those calls as operations (see
:func:`keras_bn.converters.tracing.trace_call`) whose sizes stand for the runtime
length (:func:`~keras_bn.converters.tracing.traced_size`); the rules here compute
them from the input's shape, so one ONNX file runs at any length. Also the
operations decoder-only models add: ``ops.repeat`` (grouped-query attention repeats
key/value heads).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from keras import tree

from keras_bn.converters.graph import Node, Tensor, to_numpy
from keras_bn.converters.onnx.builder import Builder, Unsupported, tensor_type
from keras_bn.converters.onnx.rules.common import Rule, constant_input
from keras_bn.converters.onnx.rules.ops import shapes
from keras_bn.converters.tracing import traced_size

__all__ = [
    "READS_UNKNOWN_SIZES",
    "all_op",
    "anchored_constant",
    "fft2",
    "moveaxis",
    "range_op",
    "repeat",
    "reshape",
    "slice_op",
]


def _runtime_size(b: Builder, node: Node, size: Any) -> str | None:
    """A traced size as a 1-D int64 tensor of one element computed at runtime,
    None when it is static."""
    traced = traced_size(size, node.unknown_sizes)
    if traced.static:
        return None
    factors = [b.batch_size()] if traced.batch else []
    factors += [b.size(tensor, axis) for tensor, axis in traced.dims]
    if traced.coefficient != 1:
        factors.append(b.ints([traced.coefficient], "size"))
    part = factors[0]
    for factor in factors[1:]:
        part = b.op("Mul", [part, factor])
    return part


def _operand(b: Builder, arg: Any) -> str:
    return b.get(arg) if isinstance(arg, Tensor) else constant_input(b, arg)


def _scalar_operand(b: Builder, node: Node, arg: Any, dtype: str) -> str:
    """A scalar argument (a number, a traced size, a 0-d tensor) as a 0-d ``dtype``."""
    if isinstance(arg, Tensor):
        return b.op("Cast", [b.get(arg, cast=False)], to=tensor_type(dtype))
    if isinstance(arg, int | np.integer) and not isinstance(arg, bool):
        size = _runtime_size(b, node, int(arg))
        if size is not None:
            scalar = b.op("Squeeze", [size, b.ints([0], "axes")])
            return b.op("Cast", [scalar], to=tensor_type(dtype))
    return b.const(np.asarray(to_numpy(arg), dtype=dtype), "scalar", dtype=dtype)


def slice_op(b: Builder, node: Node) -> None:
    """``ops.slice(x, start_indices, shape)`` at static starts, of a tensor or of a
    constant (a position table), where sizes may stand for the runtime batch size or
    sequence length."""
    source = node.args[0]
    starts_arg = node.args[1] if len(node.args) > 1 else node.kwargs["start_indices"]
    if any(isinstance(start, Tensor) for start in tree.flatten(starts_arg)):
        raise Unsupported("slicing at symbolic start indices")
    starts = [int(start) for start in np.asarray(to_numpy(starts_arg)).reshape(-1)]
    full_shape: Sequence[int | None] = (
        source.shape if isinstance(source, Tensor) else np.shape(to_numpy(source))
    )
    x = _operand(b, source)
    begins, ends, axes = [], [], []
    for axis, (start, size, full) in enumerate(
        zip(starts, node.layer.shape, full_shape, strict=True)
    ):
        runtime = _runtime_size(b, node, int(size))
        if runtime is None and start == 0 and size == full:
            continue  # the whole axis
        begins.append(start)
        ends.append(
            b.ints([start + int(size)], "end")
            if runtime is None
            else (b.op("Add", [runtime, b.ints([start], "start")]) if start else runtime)
        )
        axes.append(axis)
    if not axes:
        b.set(node.outputs[0], b.op("Identity", [x]))
        return
    stops = ends[0] if len(ends) == 1 else b.op("Concat", ends, axis=0)
    sliced = b.op("Slice", [x, b.ints(begins, "starts"), stops, b.ints(axes, "axes")])
    b.set(node.outputs[0], sliced)


def range_op(b: Builder, node: Node) -> None:
    """A traced ``ops.arange`` of a length read from an input: ONNX Range, its ends
    computed from the input's runtime shape."""
    layer = node.layer
    dtype = str(np.dtype(node.outputs[0].dtype))
    operands = [
        _scalar_operand(b, node, value, dtype) for value in (layer.start, layer.stop, layer.step)
    ]
    b.set(node.outputs[0], b.op("Range", operands))


def anchored_constant(b: Builder, node: Node) -> None:
    """A constant a traced operation of unknown size reads (its input only anchors it)."""
    b.set(node.outputs[0], b.const(node.layer.value, "constant"))


def _around(b: Builder, size: str, axis: int, rank: int) -> str:
    """A 1-D int64 vector of ``rank`` ones with ``size`` (1-D, one element) at ``axis``."""
    parts = []
    if axis:
        parts.append(b.ints([1] * axis, "ones"))
    parts.append(size)
    if rank - axis - 1:
        parts.append(b.ints([1] * (rank - axis - 1), "ones"))
    return parts[0] if len(parts) == 1 else b.op("Concat", parts, axis=0)


def repeat(b: Builder, node: Node) -> None:
    """``ops.repeat(x, repeats, axis)`` with one count (grouped-query attention's
    key/value heads; DeBERTa's relative positions, repeated as often as the sequence
    is long: a count computed at runtime): each element repeated in place, as
    Unsqueeze, Tile, Reshape."""
    tensor = node.inputs[0]
    layer = node.layer
    repeats = layer.repeats
    if isinstance(repeats, Tensor) or (np.ndim(repeats) > 0 and np.size(repeats) != 1):
        raise Unsupported("repeat counts per element")
    if layer.axis is None:
        raise Unsupported("repeat of the flattened tensor (axis=None)")
    count = int(np.asarray(repeats).reshape(-1)[0])
    runtime = _runtime_size(b, node, count)
    counted = b.ints([count], "count") if runtime is None else runtime
    axis = int(layer.axis) % tensor.rank
    x = b.get(tensor)
    expanded = b.op("Unsqueeze", [x, b.ints([axis + 1], "axes")])
    tiled = b.op("Tile", [expanded, _around(b, counted, axis + 1, tensor.rank + 1)])
    # The output shape: the input's, with ``axis`` multiplied by the count.
    target = b.op("Mul", [b.op("Shape", [x]), _around(b, counted, axis, tensor.rank)])
    b.set(node.outputs[0], b.op("Reshape", [tiled, target]))


def moveaxis(b: Builder, node: Node) -> None:
    """``ops.moveaxis`` (rotary embeddings move the sequence axis): a transpose, which
    relabels the layout without a node until someone asks for Keras order."""
    tensor = node.inputs[0]
    rank = tensor.rank
    source = [int(a) % rank for a in np.atleast_1d(node.layer.source)]
    destination = [int(a) % rank for a in np.atleast_1d(node.layer.destination)]
    order = [axis for axis in range(rank) if axis not in source]
    for where, axis in sorted(zip(destination, source, strict=True)):
        order.insert(where, axis)
    value = b.value(tensor)
    b.set(node.outputs[0], value.name, tuple(order.index(axis) for axis in value.perm))


def all_op(b: Builder, node: Node) -> None:
    """``ops.all`` over axes (a mask's reduction): the minimum of 0/1 integers."""
    tensor = node.inputs[0]
    axes = _reduced_axes(node.layer.axis, tensor.rank)
    name = b.get(tensor, cast=False)
    if np.dtype(tensor.dtype) != np.bool_:
        name = b.op("Cast", [name], to=tensor_type("bool"))
    as_int = b.op("Cast", [name], to=tensor_type("int32"))
    reduced = b.reduce("ReduceMin", as_int, axes, keepdims=bool(node.layer.keepdims))
    b.set(node.outputs[0], b.op("Cast", [reduced], to=tensor_type("bool")))


def _reduced_axes(axis: Any, rank: int) -> list[int]:
    if axis is None:
        return list(range(rank))
    return sorted(int(a) % rank for a in (axis if isinstance(axis, list | tuple) else [axis]))


def reshape(b: Builder, node: Node) -> None:
    """``ops.reshape`` where the traced target holds one None (a sequence length that
    Keras's shape inference lost, read back with ``ops.shape``: Gemma's attention)
    beside sizes that stand for the batch or other unknown sizes: the None becomes
    -1, the others are computed at runtime. Any other reshape: the general rule."""
    target = list(node.layer.newshape)
    out = node.outputs[0]
    if target.count(None) != 1 or [size for size in out.shape].count(None) < 2:
        shapes.reshape(b, node)
        return
    parts = []
    for size in target:
        runtime = None if size is None else _runtime_size(b, node, int(size))
        if size is None:
            parts.append(b.ints([-1], "size"))
        elif runtime is None:
            parts.append(b.ints([int(size)], "size"))
        else:
            parts.append(runtime)
    shape = b.op("Concat", parts, axis=0)
    b.set(out, b.op("Reshape", [b.get(node.inputs[0]), shape]))


def fft2(b: Builder, node: Node) -> None:
    """``ops.fft2((real, imag))`` over the last two axes (F-Net's token mixing): two
    ONNX DFTs on the complex pair stacked last, of any runtime length."""
    pair = node.args[0]
    if not isinstance(pair, list | tuple) or len(pair) != 2:
        raise Unsupported("fft2 of anything but a (real, imaginary) pair")
    rank = len(node.outputs[0].shape)
    last = b.ints([rank], "complex_axis")
    parts = [b.op("Unsqueeze", [_operand(b, part), last]) for part in pair]
    x = b.op("Concat", parts, axis=rank)
    for axis in (rank - 2, rank - 1):
        if b.opset >= 20:  # the axis became an input
            x = b.op("DFT", [x, "", b.op("Squeeze", [b.ints([axis], "axis")])])
        else:
            x = b.op("DFT", [x], axis=axis)
    for index, out in enumerate(node.outputs):
        part = b.op("Gather", [x, b.ints([index], "part")], axis=rank)
        b.set(out, b.op("Squeeze", [part, last]))


# The rules here that compute sizes read while tracing at runtime.
READS_UNKNOWN_SIZES: frozenset[Rule] = frozenset({slice_op, range_op, reshape, repeat})

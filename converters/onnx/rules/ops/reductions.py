"""``keras.ops`` rules: reductions, scans, arg-reductions and sorting.

They work in whatever layout their input has: a reduced axis is looked up in it,
and the output keeps the input's order of the axes left.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from keras_bn.converters.graph import Node
from keras_bn.converters.onnx.builder import Builder, Unsupported, tensor_type
from keras_bn.converters.onnx.rules.common import Rule, any_along
from keras_bn.converters.onnx.rules.ops.common import axes_of, boolean, cast_to, kept_perm

__all__ = [
    "any_op",
    "arg_reduction",
    "cumprod",
    "cumsum",
    "reduction",
    "size",
    "sort",
    "top_k",
]


def reduction(op_type: str) -> Rule:
    """The rule of ``ops.sum``/``mean``/``max``/``min``/``prod``... over ``axis``,
    computed in the output's dtype (Keras's: ``prod`` of int8 is int32)."""

    def rule(b: Builder, node: Node) -> None:
        layer = node.layer
        if getattr(layer, "initial", None) is not None:
            raise Unsupported("reductions with an initial value are not exported")
        tensor, out = node.inputs[0], node.outputs[0]
        value = b.value(tensor)
        axes = axes_of(layer.axis, tensor.rank)
        keepdims = bool(layer.keepdims)
        x = b.get(tensor, value.perm)
        if np.dtype(tensor.dtype).kind != "f":
            x = cast_to(b, x, tensor.dtype, out.dtype)
        out_name = b.reduce(op_type, x, [value.axis(a) for a in axes], keepdims)
        b.set(out, out_name, value.perm if keepdims else kept_perm(value.perm, axes))

    rule.__name__ = f"op_{op_type.lower()}"
    return rule


def any_op(b: Builder, node: Node) -> None:
    """``ops.any`` over axes (the masks' reduction), of booleans or numbers."""
    tensor = node.inputs[0]
    if node.layer.axis is None:
        raise Unsupported("any over every axis is not exported")
    value = b.value(tensor)
    axes = axes_of(node.layer.axis, tensor.rank)
    x = boolean(b, b.get(tensor, value.perm, cast=False), tensor.dtype)
    keepdims = bool(node.layer.keepdims)
    out = any_along(b, x, [value.axis(a) for a in axes], keepdims)
    b.set(node.outputs[0], out, value.perm if keepdims else kept_perm(value.perm, axes))


def size(b: Builder, node: Node) -> None:
    """``ops.size(x)``: the number of elements at runtime (the batch size is unknown)."""
    tensor, out = node.inputs[0], node.outputs[0]
    count = b.op("Size", [b.value(tensor).name])
    b.set(out, b.op("Cast", [count], to=tensor_type(out.dtype)))


# --------------------------------------------------------------------------------------
# Scans, arg-reductions, sorting.


def _flat_or_axis(b: Builder, node: Node, axis: Any) -> tuple[str, int, Any]:
    """The input and the ONNX axis to scan/sort along, and the output's layout: the
    flattened input (Keras order) when ``axis`` is None."""
    tensor = node.inputs[0]
    if axis is None:
        return b.op("Reshape", [b.get(tensor), b.ints([-1], "shape")]), 0, None
    value = b.value(tensor)
    return b.get(tensor, value.perm), value.axis(int(axis) % tensor.rank), value.perm


def cumsum(b: Builder, node: Node) -> None:
    x, axis, perm = _flat_or_axis(b, node, node.layer.axis)
    out = b.op("CumSum", [x, b.ints([axis], "axis")])
    b.set(node.outputs[0], cast_to(b, out, node.inputs[0].dtype, node.outputs[0].dtype), perm)


def cumprod(b: Builder, node: Node) -> None:
    """No ONNX CumProd: a log-depth scan (Hillis-Steele), x *= x shifted by 1, 2, 4...
    along the axis with ones shifted in; exact products, in another order."""
    tensor = node.inputs[0]
    if np.dtype(tensor.dtype).kind != "f":
        raise Unsupported("cumprod of integers (of floats is exported)")
    x, axis, perm = _flat_or_axis(b, node, node.layer.axis)
    if node.layer.axis is None:
        count = None if None in tensor.shape else math.prod(tensor.shape)  # type: ignore[arg-type]
    else:
        count = tensor.shape[int(node.layer.axis) % tensor.rank]
    if count is None:
        raise Unsupported("cumprod along an axis of unknown size")
    rank = 1 if node.layer.axis is None else tensor.rank
    shift = 1
    while shift < count:
        head = b.op(
            "Slice", [x, b.ints([0], "starts"), b.ints([count - shift], "ends"), b.ints([axis])]
        )
        pads = [0] * (2 * rank)
        pads[axis] = shift
        shifted = b.op("Pad", [head, b.ints(pads, "pads"), b.scalar(1.0, "one")])
        x = b.op("Mul", [x, shifted])
        shift *= 2
    b.set(node.outputs[0], cast_to(b, x, node.inputs[0].dtype, node.outputs[0].dtype), perm)


def arg_reduction(op_type: str) -> Rule:
    """The rule of ``ops.argmax``/``argmin`` (ArgMax/ArgMin, cast to Keras's int32)."""

    def rule(b: Builder, node: Node) -> None:
        layer = node.layer
        tensor = node.inputs[0]
        x, axis, perm = _flat_or_axis(b, node, layer.axis)
        keepdims = bool(layer.keepdims)
        out = b.op(op_type, [x], axis=axis, keepdims=int(keepdims))
        if perm is not None and not keepdims:
            perm = kept_perm(perm, [int(layer.axis) % tensor.rank])
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

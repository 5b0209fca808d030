"""Helpers shared by the rule families: weights, layouts, reshapes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from keras_bn.converters.graph import Node, Tensor, to_numpy
from keras_bn.converters.onnx.builder import Builder, Unsupported, Value
from keras_bn.converters.onnx.layout import (
    Perm,
    channels_first_perm,
    identity_perm,
    same_memory_order,
)
from keras_bn.converters.tracing import batch_multiple

__all__ = [
    "Rule",
    "any_along",
    "constant_input",
    "channels_first_layout",
    "check_not_quantized",
    "common_layout",
    "node_array",
    "node_bias",
    "node_weight",
    "reshape_to",
    "softmax_nodes",
    "spatial_axes",
]

Rule = Callable[[Builder, Node], None]


def constant_input(b: Builder, value: Any, like: Tensor | None = None, *, dtype: Any = None) -> str:
    """A non-symbolic argument as an initializer (weights, numbers, eager tensors),
    floats in the node's float dtype, others in ``dtype`` if given (else int64).

    A constant whose first axis was tiled to the tracing batch size (a class token
    ``ops.tile(token, (batch, 1, 1))``) becomes one row tiled at runtime.
    """
    array = np.asarray(to_numpy(value))
    if like is not None and np.dtype(like.dtype).kind == "f" and array.dtype.kind in "iub":
        array = array.astype(like.dtype)
    if array.ndim and batch_multiple(array.shape[0]) == 1:
        if not np.array_equal(array, np.broadcast_to(array[:1], array.shape)):
            raise Unsupported("a constant with a batch-sized axis whose rows differ")
        row = b.const(array[:1], "constant", dtype=dtype)
        repeats = b.op("Concat", [b.batch_size(), b.ints([1] * (array.ndim - 1))], axis=0)
        return b.op("Tile", [row, repeats])
    if dtype is None and like is not None and np.dtype(like.dtype).kind in "iu":
        if array.dtype.kind in "iub":
            dtype = np.dtype(like.dtype)  # ops.equal(mask, 0) on an int32 mask
    return b.const(array, "constant", dtype=dtype)


def node_array(b: Builder, node: Node, attribute: str) -> tuple[np.ndarray, tuple]:
    """``node``'s weight ``attribute`` and the key that stores it once.

    A call with its own weights (a rewritten graph's, e.g. folded) stores them
    per call; every other call reads its layer's, stored once for all calls of a
    shared layer.
    """
    if node.has_weight_override(attribute):
        return node.weight(attribute), (id(node), attribute)
    return node.weight(attribute), (id(node.layer), attribute)


def node_weight(b: Builder, node: Node, attribute: str) -> str:
    """An initializer for ``node``'s weight ``attribute`` (see :func:`node_array`)."""
    array, key = node_array(b, node, attribute)
    return b.const(array, attribute, key=key)


def node_bias(b: Builder, node: Node) -> str | None:
    """The bias initializer of a Dense/Conv-like call, None without one."""
    if not node.has_weight_override("bias") and not node.layer.use_bias:
        return None
    return node_weight(b, node, "bias")


def check_not_quantized(layer: Any) -> None:
    mode = getattr(layer, "quantization_mode", None)
    if mode is not None:
        raise Unsupported(f"quantized layers (quantization_mode={mode!r}) are not exported")


# --------------------------------------------------------------------------------------
# Layouts shared by several rule families.


def spatial_axes(rank: int, data_format: str) -> list[int]:
    return list(range(1, rank - 1)) if data_format == "channels_last" else list(range(2, rank))


def channels_first_layout(rank: int, data_format: str) -> Perm:
    return channels_first_perm(rank) if data_format == "channels_last" else identity_perm(rank)


def softmax_nodes(b: Builder, x: str, value: Value, axes: Sequence[int]) -> str:
    onnx_axes = sorted(value.axis(axis) for axis in axes)
    if len(onnx_axes) == 1:
        return b.op("Softmax", [x], axis=onnx_axes[0])
    shifted = b.op("Sub", [x, b.reduce("ReduceMax", x, onnx_axes, keepdims=True)])
    exp = b.op("Exp", [shifted])
    return b.op("Div", [exp, b.reduce("ReduceSum", exp, onnx_axes, keepdims=True)])


def any_along(b: Builder, boolean: str, axes: Sequence[int], keepdims: bool) -> str:
    """Whether any element of a boolean tensor is true along ONNX ``axes``."""
    as_int = b.op("Cast", [boolean], to=6)  # INT32: no ReduceMax over booleans before opset 20
    return b.op("Cast", [b.reduce("ReduceMax", as_int, axes, keepdims=keepdims)], to=9)  # BOOL


def _expand_rank(b: Builder, tensor: Any, rank: int, perm: Perm) -> str:
    """A lower-rank merge input expanded at axis 1 (as Keras's Merge does), in ``perm``."""
    shape = (tensor.shape[0],) + (1,) * (rank - tensor.rank) + tuple(tensor.shape[1:])
    name = b.get(tensor)
    if same_memory_order(identity_perm(rank), perm, shape):
        return reshape_to(b, name, [shape[axis] for axis in perm])
    expanded = b.op("Unsqueeze", [name, b.ints(range(1, 1 + rank - tensor.rank), "axes")])
    return b.transpose(Value(expanded, identity_perm(rank)), perm)


def common_layout(b: Builder, tensors: Sequence[Any], expand: bool) -> tuple[list[str], Perm]:
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


def reshape_to(b: Builder, name: str, dims: Sequence[int | None]) -> str:
    """Reshape keeping the batch dimension (0 copies it); at most one other unknown size."""
    target = [0] + [-1 if size is None else int(size) for size in dims[1:]]
    if target.count(-1) > 1:
        raise Unsupported("reshaping with more than one unknown non-batch dimension")
    return b.op("Reshape", [name, b.ints(target, "shape")])

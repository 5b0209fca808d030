"""Helpers shared by the ``keras.ops`` rule families: operands, axes, layouts, sizes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from keras_bn.converters.graph import Node, Tensor
from keras_bn.converters.onnx.builder import Builder, tensor_type
from keras_bn.converters.onnx.layout import Perm
from keras_bn.converters.onnx.rules.common import constant_input
from keras_bn.converters.tracing import traced_size

__all__ = ["axes_of", "boolean", "cast_to", "kept_perm", "operand", "shape_input"]


def operand(b: Builder, arg: Any, like: Tensor | None = None) -> str:
    """A symbolic argument in Keras order, or a constant one as an initializer."""
    return b.get(arg) if isinstance(arg, Tensor) else constant_input(b, arg, like)


def shape_input(b: Builder, node: Node, sizes: Sequence[Any]) -> str:
    """A shape (Reshape/Expand/Tile argument) whose sizes that stand for the runtime
    batch size or for products of unknown input sizes
    (:func:`~keras_bn.converters.tracing.traced_size`) are computed at runtime."""
    traced = [traced_size(size, node.unknown_sizes) for size in sizes]
    if all(size.static for size in traced):
        return b.ints([size.coefficient for size in traced], "shape")
    parts = []
    for size in traced:
        factors = [b.batch_size()] if size.batch else []
        factors += [b.size(tensor, axis) for tensor, axis in size.dims]
        if size.coefficient != 1 or not factors:
            factors.append(b.ints([size.coefficient], "size"))
        part = factors[0]
        for factor in factors[1:]:
            part = b.op("Mul", [part, factor])
        parts.append(part)
    return b.op("Concat", parts, axis=0)


def axes_of(axis: Any, rank: int) -> list[int]:
    """An operation's ``axis`` (None: every axis; an int or a sequence) as sorted axes."""
    if axis is None:
        return list(range(rank))
    axes = list(axis) if isinstance(axis, list | tuple) else [axis]
    return sorted(int(a) % rank for a in axes)


def kept_perm(perm: Perm, removed: Sequence[int]) -> Perm:
    """The layout left when Keras axes ``removed`` are reduced away."""
    kept = [axis for axis in perm if axis not in removed]
    order = sorted(kept)
    return tuple(order.index(axis) for axis in kept)


def boolean(b: Builder, name: str, dtype: Any) -> str:
    """``name`` as a boolean tensor (truthiness of numbers, as NumPy's)."""
    return name if np.dtype(dtype) == np.bool_ else b.op("Cast", [name], to=tensor_type("bool"))


def cast_to(b: Builder, name: str, source: Any, target: Any) -> str:
    """``name`` cast from dtype ``source`` to ``target`` (no node when they agree)."""
    if np.dtype(source) == np.dtype(target):
        return name
    return b.op("Cast", [name], to=tensor_type(np.dtype(target).name))

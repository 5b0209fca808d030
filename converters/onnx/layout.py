"""Layouts: which Keras axis each ONNX axis holds (no onnx import).

Keras tensors are channels-last, ONNX convolutions channels-first. Every exported
tensor carries a *layout*: a permutation ``perm`` such that ONNX axis ``i`` holds
Keras axis ``perm[i]`` (``(0, 3, 1, 2)`` is NCHW for an NHWC Keras tensor).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Perm", "identity_perm", "channels_first_perm", "inverse_perm", "same_memory_order"]

Perm = tuple[int, ...]


def identity_perm(rank: int) -> Perm:
    return tuple(range(rank))


def channels_first_perm(rank: int, channel_axis: int = -1) -> Perm:
    """The layout that moves Keras axis ``channel_axis`` to ONNX axis 1."""
    channel_axis %= rank
    if rank < 3:
        return identity_perm(rank)
    return (0, channel_axis, *(a for a in range(1, rank) if a != channel_axis))


def inverse_perm(perm: Sequence[int]) -> Perm:
    inverse = [0] * len(perm)
    for onnx_axis, keras_axis in enumerate(perm):
        inverse[keras_axis] = onnx_axis
    return tuple(inverse)


def same_memory_order(perm_a: Sequence[int], perm_b: Sequence[int], shape: Sequence) -> bool:
    """True if both layouts list the axes of size other than 1 in the same order.

    Two such layouts hold the same elements in the same row-major order, so a
    Reshape/Flatten of one equals the other's.
    """

    def big(perm):
        return [axis for axis in perm if shape[axis] != 1]

    return big(perm_a) == big(perm_b)

"""Float64 formulations that XLA:CPU runs fast, for the float64 twin only.

XLA:CPU hands float32 convolutions to Eigen but lowers float64 ones to generic
loops, and its float64 depthwise (grouped) convolution is pathological on small
spatial extents with many channels: EfficientNetB0's 5x5 depthwise convolutions
on 4x4 feature maps with 1152 channels take seconds each, where the whole float32
network takes a fraction of one (BENCHMARKS.md section 15). The twin replaces such
layers with the same computation written as elementwise work XLA fuses well:

- a depthwise convolution is a sum over the kernel taps of strided slices of the
  padded input times that tap's per-channel weights. Every product and sum is
  the convolution's own; only the summation order differs, so in float64 it is
  the exact result to float64 rounding.

On JAX, :data:`TWIN_LAYERS` maps a Keras layer class to its replacement: a subclass whose
``call`` uses the formulation, with the same config and weights (the twin copies
weights by position, and the subclass builds exactly the parent's). Only those
exact classes are replaced, never a user's subclass of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

__all__ = ["TWIN_LAYERS", "depthwise_conv_taps", "replaced_class_name", "twin_layer_class"]


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) padding of "same": XLA's and TensorFlow's convention (the
    larger half after)."""
    extent = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


def depthwise_conv_taps(
    inputs: Any,
    kernel: Any,
    strides: Sequence[int],
    padding: str,
    dilation_rate: Sequence[int],
    data_format: str = "channels_last",
) -> Any:
    """``keras.ops.depthwise_conv`` as a sum over the kernel taps.

    ``inputs``: ``(batch, *spatial, channels)`` (``channels_last``) or
    ``(batch, channels, *spatial)``; ``kernel``: ``(*kernel_size, channels,
    depth_multiplier)``; output channel ``c * depth_multiplier + m`` is channel
    ``c`` convolved with ``kernel[..., c, m]``, as in Keras. ``padding``: ``"valid"``
    or ``"same"``. Any number of spatial dimensions (1 for DepthwiseConv1D).
    """
    rank = len(kernel.shape) - 2
    if data_format == "channels_first":
        inputs = ops.moveaxis(inputs, 1, -1)
    sizes = [int(size) for size in inputs.shape[1:-1]]
    kernel_size = [int(size) for size in kernel.shape[:rank]]
    channels, multiplier = int(kernel.shape[-2]), int(kernel.shape[-1])
    if padding.lower() == "same":
        pads = [
            _same_padding(size, k, s, d)
            for size, k, s, d in zip(sizes, kernel_size, strides, dilation_rate, strict=True)
        ]
        inputs = ops.pad(inputs, [(0, 0), *pads, (0, 0)])
        sizes = [size + before + after for size, (before, after) in zip(sizes, pads, strict=True)]
    counts = [
        (size - (k - 1) * d - 1) // s + 1
        for size, k, s, d in zip(sizes, kernel_size, strides, dilation_rate, strict=True)
    ]
    total = None
    for tap in _taps(kernel_size):
        window = tuple(
            slice(t * d, t * d + (n - 1) * s + 1, s)
            for t, d, n, s in zip(tap, dilation_rate, counts, strides, strict=True)
        )
        part = inputs[(slice(None), *window, slice(None))]
        weights = kernel[tap]  # (channels, multiplier)
        if multiplier == 1:
            term = part * ops.reshape(weights, (channels,))
        else:
            term = ops.reshape(
                ops.expand_dims(part, -1) * weights, (-1, *counts, channels * multiplier)
            )
        total = term if total is None else total + term
    if data_format == "channels_first":
        total = ops.moveaxis(total, -1, 1)
    return total


def _taps(kernel_size: Sequence[int]) -> list[tuple[int, ...]]:
    taps: list[tuple[int, ...]] = [()]
    for size in kernel_size:
        taps = [(*tap, index) for tap in taps for index in range(size)]
    return taps


class _TapsDepthwiseCall:
    """``BaseDepthwiseConv.call`` with :func:`depthwise_conv_taps` for the convolution."""

    def call(self: Any, inputs: Any) -> Any:
        outputs = depthwise_conv_taps(
            inputs,
            self.kernel,
            self.strides,
            self.padding,
            self.dilation_rate,
            self.data_format,
        )
        if self.use_bias:
            width = len(self.kernel.shape) - 1
            shape = [1] * (width + 1)
            shape[-1 if self.data_format == "channels_last" else 1] = -1
            outputs = ops.add(outputs, ops.reshape(self.bias, shape))
        if self.activation is not None:
            return self.activation(outputs)
        return outputs


class TapsDepthwiseConv1D(_TapsDepthwiseCall, keras.layers.DepthwiseConv1D):
    """DepthwiseConv1D computed by :func:`depthwise_conv_taps` (the float64 twin's)."""


class TapsDepthwiseConv2D(_TapsDepthwiseCall, keras.layers.DepthwiseConv2D):
    """DepthwiseConv2D computed by :func:`depthwise_conv_taps` (the float64 twin's)."""


# Keras layer class -> the twin's replacement (same config, same weights).
TWIN_LAYERS: dict[type, type[Any]] = {
    keras.layers.DepthwiseConv1D: TapsDepthwiseConv1D,
    keras.layers.DepthwiseConv2D: TapsDepthwiseConv2D,
}


def twin_layer_class(layer: Any) -> type[Any]:
    """The class the float64 twin builds for ``layer``: on JAX its replacement in
    :data:`TWIN_LAYERS` for exactly that class, else the layer's own class (other
    backends' own float64 kernels are fast: TensorFlow runs the replacement slower)."""
    if keras.backend.backend() != "jax":
        return type(layer)
    return TWIN_LAYERS.get(type(layer), type(layer))


def replaced_class_name(name: str) -> str:
    """The Keras class name a replacement's ``name`` stands for (else ``name``): an
    error raised in a replacement's call names the layer class the twin keeps float32."""
    for original, replacement in TWIN_LAYERS.items():
        if replacement.__name__ == name:
            return original.__name__
    return name

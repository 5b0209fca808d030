"""The maths of folding BatchNormalization into a linear layer, in pure NumPy.

Inference BatchNormalization is a per-channel affine map ``y = x * scale + offset``
with ``scale = gamma / sqrt(moving_variance + epsilon)`` and
``offset = beta - moving_mean * scale``. A linear layer next to it can absorb it:

- **forward** (linear layer -> BN): the layer's output channels are scaled, so
  ``kernel' = kernel * scale`` along the output-channel axis and
  ``bias' = bias * scale + offset``;
- **backward** (BN -> linear layer): the layer's input channels are scaled, so
  ``kernel' = kernel * scale`` along the input-channel axis and
  ``bias' = bias + sum(kernel * offset)`` over the kernel's spatial and input axes.
  Exact only where every output sees the whole kernel over real inputs (no zero
  padding); checking that is the caller's business.

Every function here computes in float64 and returns float64; the caller composes
folds and rounds once with :func:`round_to_dtype`. Kernel layouts are Keras 3's,
whatever the data format: Dense ``(in, out)``, Conv ``(*kernel_size, in / groups,
out)``, DepthwiseConv ``(*kernel_size, in, depth_multiplier)``, ConvTranspose
``(*kernel_size, out, in)``. Nothing here imports Keras (PyTorch keeps
``fuse_conv_bn_weights`` apart from the module plumbing the same way).
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "FLOAT16_MAX",
    "FLOAT16_SMALLEST_NORMAL",
    "BACKWARD_CANCELLATION_LIMIT",
    "FLOAT64_EXACT",
    "ChannelRisk",
    "ScaledKernel",
    "backward_cancellation",
    "batch_norm_affine",
    "compose_affines",
    "depthwise_as_grouped",
    "float16_risks",
    "fold_backward",
    "fold_forward",
    "grouped_as_depthwise",
    "round_to_dtype",
]

FLOAT16_MAX = 65504.0
# Below this, float16 stores values as subnormals (fewer significant bits) down to
# 2**-24, and flushes anything smaller to zero.
FLOAT16_SMALLEST_NORMAL = 2.0**-14

Array = np.ndarray

# Float dtypes a float64 product reads exactly as they are: no float64 copy first.
FLOAT64_EXACT = (np.dtype(np.float32), np.dtype(np.float64))


def _float64(array) -> Array:
    return np.asarray(array, dtype=np.float64)


def batch_norm_affine(
    moving_mean,
    moving_variance,
    epsilon: float,
    gamma=None,
    beta=None,
) -> tuple[Array, Array]:
    """``(scale, offset)`` of inference BN, in float64.

    ``gamma=None`` means ``scale=False`` (gamma is 1), ``beta=None`` means
    ``center=False`` (beta is 0).
    """
    moving_mean = _float64(moving_mean)
    moving_variance = _float64(moving_variance)
    scale = 1.0 / np.sqrt(moving_variance + float(epsilon))
    if gamma is not None:
        scale = _float64(gamma) * scale
    offset = -moving_mean * scale
    if beta is not None:
        offset = offset + _float64(beta)
    return scale, offset


# A backward fold is declined where the folded layer would sum terms more than this
# many times larger than it sums unfolded (:func:`backward_cancellation`): float32
# keeps about 24 bits of each sum, and 6 of them lost put the fold's error beyond
# float32 noise (validation's yardstick: 4x Keras float32's own error, plus 1e-5 of
# the output's range). BENCHMARKS.md section 57.
BACKWARD_CANCELLATION_LIMIT = 64.0


def backward_cancellation(scale, offset, moving_mean, moving_variance) -> float:
    """How many times larger, at worst over the channels, the terms a layer sums are
    once the BN before it is folded into it (backward) than without the fold.

    Channel ``c``'s input lies near ``moving_mean[c] +- sqrt(moving_variance[c])``.
    Unfolded, the layer sums the BN's outputs ``x * scale + offset``, of size
    ``|scale| * sqrt(var) + |mean * scale + offset|``; folded, it sums ``x * scale``,
    of size ``|scale| * (|mean| + sqrt(var))``, and its bias cancels the difference.
    A raw sensor reading of 1000 +- 1 gives about 1000: the folded sums lose 10 of
    float32's 24 bits, where Keras's BN (``x - mean`` first) loses none.
    """
    scale, offset = _float64(scale), _float64(offset)
    mean = _float64(moving_mean)
    spread = np.sqrt(np.maximum(_float64(moving_variance), 0.0))
    folded = np.abs(scale) * (np.abs(mean) + spread)
    unfolded = np.abs(scale) * spread + np.abs(mean * scale + offset)
    live = unfolded > 0  # a channel with scale 0 and no offset sums nothing either way
    return float(np.max(folded[live] / unfolded[live], initial=1.0))


def compose_affines(first: tuple[Array, Array], second: tuple[Array, Array]) -> tuple[Array, Array]:
    """The affine ``x -> second(first(x))`` of two per-channel affines, in float64."""
    scale_1, offset_1 = (_float64(a) for a in first)
    scale_2, offset_2 = (_float64(a) for a in second)
    return scale_1 * scale_2, offset_1 * scale_2 + offset_2


def _channel_axes(ndim: int, channel_axis: int | tuple[int, ...]) -> tuple[int, ...]:
    axes = (channel_axis,) if isinstance(channel_axis, int) else tuple(channel_axis)
    normalized = tuple(axis % ndim for axis in axes)
    if any(b != a + 1 for a, b in zip(normalized, normalized[1:], strict=False)):
        raise ValueError(
            "channel_axis must name adjacent kernel axes in increasing order. "
            f"Received: channel_axis={channel_axis} for a kernel of rank {ndim}"
        )
    return normalized


def _along(vector: Array, shape: tuple[int, ...], axes: tuple[int, ...]) -> Array:
    """``vector`` reshaped to broadcast against ``shape`` over ``axes`` (C order)."""
    channel_shape = tuple(shape[axis] for axis in axes)
    if vector.size != int(np.prod(channel_shape)):
        raise ValueError(
            f"Expected {int(np.prod(channel_shape))} channels (kernel axes {axes} of "
            f"shape {shape}), received a vector of {vector.size}."
        )
    broadcast = [1] * len(shape)
    for axis, size in zip(axes, channel_shape, strict=True):
        broadcast[axis] = size
    return vector.reshape(broadcast)


@dataclasses.dataclass(frozen=True)
class ScaledKernel:
    """The float64 product ``kernel * scale``, not multiplied out yet.

    :func:`fold_forward` returns one when asked (``deferred=True``): a float32 kernel
    then never has a float64 copy. :func:`round_to_dtype` multiplies and rounds in
    one pass (ResNet50: 100 MB written instead of 200 MB of float64 and then 100 MB),
    :func:`float16_risks` reads each channel's largest weight off the kernel, and
    anything else gets the product from ``np.asarray``.
    """

    kernel: Array  # float32 or float64
    scale: Array  # float64, shaped to broadcast along the kernel's channel axes
    axes: tuple[int, ...]  # those axes

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.kernel.shape)

    @property
    def ndim(self) -> int:
        return int(self.kernel.ndim)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float64)

    def __array__(self, dtype=None, copy=None) -> Array:
        product = np.multiply(self.kernel, self.scale, dtype=np.float64)
        return product if dtype is None else product.astype(dtype, copy=False)


def fold_forward(
    kernel,
    bias,
    scale,
    offset,
    *,
    channel_axis: int | tuple[int, ...] = -1,
    deferred: bool = False,
) -> tuple[Array | ScaledKernel, Array]:
    """Fold the affine ``(scale, offset)`` applied to a layer's output channels.

    Args:
        kernel: the layer's kernel.
        bias: its bias, or None for a layer without one (zero bias).
        scale, offset: the per-output-channel affine, one value per channel.
        channel_axis: the kernel axis holding output channels: -1 for Dense and
            Conv (also the pointwise kernel of SeparableConv), -2 for ConvTranspose,
            ``(-2, -1)`` for DepthwiseConv, whose output channel
            ``c * depth_multiplier + m`` is kernel entry ``[..., c, m]``.
        deferred: return a float32 or float64 kernel's product as a
            :class:`ScaledKernel` (same values, multiplied when used).

    Returns:
        ``(kernel, bias)`` in float64 with ``kernel * scale`` along the channel
        axis and ``bias * scale + offset``.
    """
    kernel = np.asarray(kernel)  # times a float64 scale: float64, without a float64 copy
    if kernel.dtype.kind != "f":
        kernel = _float64(kernel)
    scale = _float64(scale).reshape(-1)
    offset = _float64(offset).reshape(-1)
    axes = _channel_axes(kernel.ndim, channel_axis)
    bias = np.zeros_like(scale) if bias is None else _float64(bias).reshape(-1)
    along = _along(scale, kernel.shape, axes)
    new_bias = bias * scale + offset
    if deferred and kernel.dtype in FLOAT64_EXACT:
        return ScaledKernel(kernel, along, axes), new_bias
    return kernel * along, new_bias


def _input_channel_index(kernel_shape: tuple[int, ...], groups: int) -> Array:
    """``index[j, o]``: the layer input channel that kernel entry ``[..., j, o]`` reads."""
    in_per_group, out = kernel_shape[-2], kernel_shape[-1]
    if groups < 1 or out % groups:
        raise ValueError(f"The kernel's {out} output channels do not split into groups={groups}.")
    group_of_output = np.arange(out) // (out // groups)
    return group_of_output[None, :] * in_per_group + np.arange(in_per_group)[:, None]


def fold_backward(
    kernel,
    bias,
    scale,
    offset,
    *,
    groups: int = 1,
) -> tuple[Array, Array]:
    """Fold the affine ``(scale, offset)`` applied to a layer's input channels.

    The layer computes ``y[o] = bias[o] + sum_{k, j} kernel[k, j, o] * x[g(o), j]``
    where ``g(o)`` is output channel ``o``'s group: kernel layout
    ``(*spatial, in / groups, out)`` (Dense: ``(in, out)``; DepthwiseConv through
    :func:`depthwise_as_grouped`). Substituting ``x * scale + offset`` for ``x``
    gives ``kernel' = kernel * scale[input channel]`` and
    ``bias' = bias + sum_{k, j} kernel[k, j, o] * offset[input channel]``.

    Exact only where every output position sums the whole kernel over real input
    values (``padding="valid"`` or a 1x1 kernel): padded zeros are not shifted by
    ``offset``.

    Returns:
        ``(kernel, bias)`` in float64.
    """
    kernel = _float64(kernel)
    if kernel.ndim < 2:
        raise ValueError(f"Expected a kernel of rank >= 2, received shape {kernel.shape}.")
    scale = _float64(scale).reshape(-1)
    offset = _float64(offset).reshape(-1)
    index = _input_channel_index(kernel.shape, groups)
    if scale.size != kernel.shape[-2] * groups:
        raise ValueError(
            f"Expected {kernel.shape[-2] * groups} input channels (kernel shape "
            f"{kernel.shape}, groups={groups}), received {scale.size}."
        )
    out = kernel.shape[-1]
    bias = np.zeros(out) if bias is None else _float64(bias).reshape(-1)
    new_kernel = kernel * scale[index]
    spatial_and_input = tuple(range(kernel.ndim - 1))
    new_bias = bias + np.sum(kernel * offset[index], axis=spatial_and_input)
    return new_kernel, new_bias


def depthwise_as_grouped(kernel) -> tuple[Array, int]:
    """A depthwise kernel ``(*k, in, dm)`` as the grouped kernel ``(*k, 1, in * dm)``.

    Depthwise convolution is grouped convolution with ``groups = in``: output
    channel ``c * dm + m`` reads input channel ``c`` only. Returns the kernel and
    the number of groups.
    """
    kernel = _float64(kernel)
    *spatial, channels, depth_multiplier = kernel.shape
    return kernel.reshape(*spatial, 1, channels * depth_multiplier), channels


def grouped_as_depthwise(kernel, channels: int) -> Array:
    """Inverse of :func:`depthwise_as_grouped`."""
    kernel = _float64(kernel)
    *spatial, _, out = kernel.shape
    return kernel.reshape(*spatial, channels, out // channels)


def round_to_dtype(array, dtype: str) -> Array:
    """Round a float64 array (or :class:`ScaledKernel`) once to ``dtype`` (nearest,
    as NumPy casts)."""
    if isinstance(array, ScaledKernel) and str(dtype) != "bfloat16":
        rounded = np.empty(array.shape, np.dtype(dtype))
        # each product in float64, then cast: what multiplying out and astype give
        np.multiply(array.kernel, array.scale, out=rounded, dtype=np.float64, casting="same_kind")
        return rounded
    array = np.asarray(array, dtype=np.float64)
    if str(dtype) != "bfloat16":
        return array.astype(np.dtype(dtype))
    import ml_dtypes  # shipped with JAX and TensorFlow

    # ml_dtypes casts float64 -> float32 -> bfloat16, rounding twice. Round to
    # float32 *to odd* first (truncate, then set the last bit if inexact): the
    # second rounding to nearest is then exact (Boldo & Melquiond 2008).
    with np.errstate(over="ignore"):
        truncated = array.astype(np.float32)
        too_far = np.abs(truncated.astype(np.float64)) > np.abs(array)
        truncated = np.where(too_far, np.nextafter(truncated, np.float32(0)), truncated)
    inexact = truncated.astype(np.float64) != array
    bits = truncated.view(np.uint32) | inexact.astype(np.uint32)
    return bits.view(np.float32).astype(ml_dtypes.bfloat16)


@dataclasses.dataclass(frozen=True)
class ChannelRisk:
    """An output channel whose folded weights do not survive a float16 cast.

    ``kind`` is ``"overflow"`` (a weight or the bias beyond 65504, float16's largest
    value: becomes inf) or ``"underflow"`` (every nonzero weight of the channel below
    float16's smallest normal 2**-14: stored with fewer bits, or as zero below
    2**-24). ``value`` is the channel's largest absolute weight (or bias).
    """

    channel: int
    value: float
    kind: str


def float16_risks(kernel, bias, *, channel_axis: int | tuple[int, ...] = -1) -> list[ChannelRisk]:
    """Output channels of folded weights that a float16 export would damage."""
    axes = _channel_axes(kernel.ndim, channel_axis)
    other = tuple(axis for axis in range(kernel.ndim) if axis not in axes)
    scale = 1.0
    if isinstance(kernel, ScaledKernel) and kernel.axes == axes:
        # max |k * s| over a channel is |s| * max |k|: rounding is monotonic
        kernel, scale = kernel.kernel, np.abs(kernel.scale).reshape(-1)
    kernel = _float64(kernel) if kernel.dtype != np.float32 else kernel
    # max |w| as max(max w, -min w): the same value without an |kernel| copy
    largest_weight = np.maximum(np.max(kernel, axis=other), -np.min(kernel, axis=other))
    channel_max = largest_weight.reshape(-1).astype(np.float64) * scale
    bias_abs = np.zeros_like(channel_max) if bias is None else np.abs(_float64(bias))
    largest = np.maximum(channel_max, bias_abs)
    overflow = largest > FLOAT16_MAX
    underflow = ~overflow & (channel_max > 0.0) & (channel_max < FLOAT16_SMALLEST_NORMAL)
    return [
        ChannelRisk(int(channel), float(largest[channel]), "overflow")
        if overflow[channel]
        else ChannelRisk(int(channel), float(channel_max[channel]), "underflow")
        for channel in np.flatnonzero(overflow | underflow)
    ]

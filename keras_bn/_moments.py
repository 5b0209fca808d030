"""Numerically stable batch moments for `keras_bn.BatchNormalization`.

Two-pass moments: the mean first, then the mean of squared deviations from it.
The one-pass form E[x^2] - E[x]^2 (used by the stock layer's torch and numpy
backends and by its TensorFlow `synchronized=True` path) cancels catastrophically
when |mean| >> std and can even return a negative variance.

Everything here is backend-neutral `keras.ops` code except the cross-replica
sums of the synchronized path, which only exists on the TensorFlow backend
(where `tf.distribute` provides the replica context).
"""

import math

import keras
from keras import ops


def static_size(shape, axes):
    """Number of elements over `axes` as a Python int, or None if any is unknown."""
    sizes = [shape[a] for a in axes]
    if any(size is None for size in sizes):
        return None
    return math.prod(sizes)


def _dynamic_size(x, axes):
    shape = ops.shape(x)
    count = 1
    for a in axes:
        count = count * ops.cast(shape[a], x.dtype)
    return count


def _replica_context():
    """The tf.distribute replica context when statistics must be synchronized."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def _all_reduce_sum(context, values):
    import tensorflow as tf

    return context.all_reduce(tf.distribute.ReduceOp.SUM, values)


def moments(x, axes, mask=None, synchronized=False):
    """Batch mean and biased variance of `x` over `axes`, kept as size-1 dims.

    Args:
        x: float tensor.
        axes: list of the axes to reduce.
        mask: optional boolean tensor with the full size of `x` on every
            axis in `axes` (broadcast it to `x`'s shape first: the counts are
            the mask's own); False entries are left out of the statistics.
        synchronized: reduce over the global batch of all replicas of the
            current `tf.distribute` replica context (TensorFlow backend only).

    Returns:
        `(mean, variance, count)`: `count` is the number of values behind each
        statistic, a Python int when known statically, otherwise a tensor
        broadcastable to `mean`. Where `count` is 0, mean and variance are 0
        (never NaN).
    """
    context = _replica_context() if synchronized else None
    if mask is None:
        count = static_size(x.shape, axes)
        if count is None or context is not None:
            count = _dynamic_size(x, axes) if count is None else ops.cast(count, x.dtype)
        total = ops.sum(x, axis=axes, keepdims=True)
    else:
        mask = ops.cast(mask, "bool")
        count = ops.sum(ops.cast(mask, x.dtype), axis=axes, keepdims=True)
        total = ops.sum(ops.where(mask, x, ops.zeros((), x.dtype)), axis=axes, keepdims=True)
    if context is not None:
        total, count = _all_reduce_sum(context, [total, count])
    mean = ops.stop_gradient(total / _at_least_one(count))

    # Second pass, on deviations from the first-pass mean: the variance, and a
    # correction of the mean itself (whose float32 sum rounds off digits when
    # |mean| >> std; the deviations are small and sum accurately). Gradients
    # flow through the deviations only, which gives the exact ones.
    deviation = x - mean
    if mask is not None:
        deviation = ops.where(mask, deviation, ops.zeros((), x.dtype))
    sums = [
        ops.sum(deviation, axis=axes, keepdims=True),
        ops.sum(ops.square(deviation), axis=axes, keepdims=True),
    ]
    if context is not None:
        sums = _all_reduce_sum(context, sums)
    correction = sums[0] / _at_least_one(count)
    mean = mean + correction
    variance = ops.maximum(sums[1] / _at_least_one(count) - ops.square(correction), 0.0)
    return mean, variance, count


def _at_least_one(count):
    if isinstance(count, int):
        return max(count, 1)
    return ops.maximum(count, 1.0)


def mask_axes(mask_shape, input_shape, axes, axis=None):
    """The axes to insert into a mask so that it broadcasts to the inputs.

    Keras's reading wins where it fits: a mask of rank `len(input_shape) - 1`
    whose `mask[..., None]` broadcasts to the inputs covers their leading axes
    (the stock layer's rule). Otherwise the mask is the input shape without
    the normalized `axes` (sorted, non-negative), e.g. `(B, T)` for `(B, C, T)`
    inputs with `axis=1`. Unknown sizes (None) count as fitting; sizes of 1
    broadcast.

    Args:
        mask_shape: tuple, the mask's (static) shape.
        input_shape: tuple, the inputs' (static) shape.
        axes: sorted non-negative normalized axes.
        axis: the layer's `axis` argument, for the error message.

    Returns:
        A tuple of axes, in increasing order, for `expand_dims` one at a time.

    Raises:
        ValueError: the mask fits neither reading.
    """
    rank = len(input_shape)
    if len(mask_shape) == rank - 1 and _broadcastable((*mask_shape, 1), input_shape):
        return (rank - 1,)
    without_axes = tuple(d for i, d in enumerate(input_shape) if i not in axes)
    if _broadcastable(mask_shape, without_axes):
        return tuple(axes)
    leading = input_shape[:-1]
    raise ValueError(
        "Invalid mask for BatchNormalization: expected the shape of the inputs' "
        f"leading axes {leading} (Keras's convention: mask[..., None] broadcasts "
        f"to the inputs) or the input shape without the normalized axes "
        f"{list(axes)}: {without_axes}; sizes of 1 broadcast. Reshape or "
        "transpose the mask to one of these. Received: "
        f"mask.shape={tuple(mask_shape)}, inputs.shape={tuple(input_shape)}, "
        f"axis={axis!r}"
    )


def _broadcastable(shape, target):
    """Whether `shape` broadcasts to `target` (same rank); None fits anything."""
    return len(shape) == len(target) and all(
        size is None or goal is None or size in (1, goal)
        for size, goal in zip(shape, target, strict=True)
    )

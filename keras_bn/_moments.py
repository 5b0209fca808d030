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

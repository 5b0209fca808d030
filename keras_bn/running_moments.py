"""Exact running moments in float64: the statistics maths of :mod:`keras_bn.recalibration`.

Plain NumPy, no Keras: count, mean and sum of squared deviations per channel,
merged group by group with Chan et al.'s parallel formula.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RunningMoments"]


class RunningMoments:
    """Exact running count, mean and sum of squared deviations, per channel.

    Float64 accumulation with Chan et al.'s parallel merge: for two groups with
    counts ``n_a, n_b``, means ``mean_a, mean_b`` and sums of squared deviations
    ``m2_a, m2_b``::

        n     = n_a + n_b
        delta = mean_b - mean_a
        mean  = mean_a + delta * n_b / n
        m2    = m2_a + m2_b + delta**2 * n_a * n_b / n

    which is the law of total variance written without cancellation, so the result
    is the population mean/variance of all values seen, whatever the batch sizes
    (an unequal last batch included).

    Args:
        shape: shape of the per-channel statistics.
    """

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.count = np.zeros(self.shape, dtype=np.float64)
        self.mean = np.zeros(self.shape, dtype=np.float64)
        self.m2 = np.zeros(self.shape, dtype=np.float64)

    def update(self, values, weights=None):
        """Adds a batch: ``values`` shaped ``(n, *shape)``, optional 0/1 ``weights``.

        ``weights`` (same shape as ``values`` or ``(n,)``) marks which values count
        (a Keras mask); the statistics are over the values with weight 1.
        """
        values = np.asarray(values, dtype=np.float64).reshape((-1, *self.shape))
        if weights is None:
            count = np.full(self.shape, float(values.shape[0]))
            if values.shape[0] == 0:
                return
            mean = values.mean(axis=0)
            m2 = np.square(values - mean).sum(axis=0)
        else:
            weights = np.asarray(weights, dtype=np.float64)
            weights = np.broadcast_to(
                weights.reshape(weights.shape + (1,) * (values.ndim - weights.ndim)),
                values.shape,
            )
            count = weights.sum(axis=0)
            safe_count = np.where(count > 0, count, 1.0)
            mean = (weights * values).sum(axis=0) / safe_count
            m2 = (weights * np.square(values - mean)).sum(axis=0)
        self.merge(count, mean, m2)

    def merge(self, count, mean, m2):
        """Merges another group's (count, mean, m2) into this one."""
        count = np.broadcast_to(np.asarray(count, dtype=np.float64), self.shape)
        total = self.count + count
        safe_total = np.where(total > 0, total, 1.0)
        delta = np.asarray(mean, dtype=np.float64) - self.mean
        self.mean = self.mean + delta * count / safe_total
        self.m2 = self.m2 + np.asarray(m2, dtype=np.float64)
        self.m2 = self.m2 + np.square(delta) * self.count * count / safe_total
        self.count = total

    def variance(self, unbiased=False):
        """Population variance ``m2 / n``, or ``m2 / (n - 1)`` when ``unbiased``.

        With a single value per channel the unbiased variance is undefined; it is
        returned as 0 there (the biased value), never NaN.
        """
        if unbiased:
            denominator = np.where(self.count > 1, self.count - 1.0, 1.0)
        else:
            denominator = np.where(self.count > 0, self.count, 1.0)
        return self.m2 / denominator

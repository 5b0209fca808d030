"""keras_bn.running_moments: float64 moments over batches, against NumPy."""

import keras
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_bn.running_moments import RunningMoments

StockBN = keras.layers.BatchNormalization


@settings(max_examples=30, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 120), max_size=6),
    offset=st.sampled_from([0.0, 1e3, -1e6]),
    seed=st.integers(0, 2**16),
)
def test_running_moments_equal_numpy_for_any_batching(cuts, offset, seed):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(120, 3)) * [1e-2, 1.0, 1e2] + offset
    moments = RunningMoments((3,))
    for batch in np.split(values, sorted(cuts)):  # unequal and empty batches
        moments.update(batch)
    np.testing.assert_array_equal(moments.count, 120)
    np.testing.assert_allclose(moments.mean, values.mean(axis=0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(moments.variance(), values.var(axis=0), rtol=1e-7)
    np.testing.assert_allclose(
        moments.variance(unbiased=True), values.var(axis=0, ddof=1), rtol=1e-7
    )


def test_running_moments_weights_select_values():
    rng = np.random.default_rng(1)
    values = rng.normal(5.0, 3.0, size=(50, 2, 4))
    weights = rng.random((50, 2)) > 0.3
    moments = RunningMoments((2, 4))
    moments.update(values[:17], weights[:17])
    moments.update(values[17:], weights[17:])
    for channel in range(2):
        kept = values[weights[:, channel], channel]
        np.testing.assert_allclose(moments.mean[channel], kept.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(moments.variance()[channel], kept.var(axis=0), rtol=1e-10)

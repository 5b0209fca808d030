"""keras_bn.replacement.replace_batch_norm: stock BatchNormalization swapped for ours in
a clone, outputs and weights kept."""

import keras
import numpy as np
import pytest
from support.checks import as_float64, spread_features
from support.models import batch_norm_layers, randomize_batch_norms

from keras_bn.layers import BatchNormalization
from keras_bn.replacement import replace_batch_norm

StockBN = keras.layers.BatchNormalization


def _nested_shared_model():
    """Conv backbone (nested, frozen) with BNs, a shared BN on two branches."""
    backbone = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            keras.layers.Conv2D(4, 3, name="conv"),
            StockBN(name="backbone_bn"),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
        ],
        name="backbone",
    )
    backbone.trainable = False
    inputs = keras.Input((8, 8, 2))
    features = backbone(inputs)
    shared = StockBN(name="shared_bn", epsilon=1e-2)
    a = shared(keras.layers.Dense(4, name="dense_a")(features))
    b = shared(keras.layers.Dense(4, name="dense_b")(features))
    ours = BatchNormalization(name="ours_bn")(keras.layers.Concatenate()([a, b]))
    outputs = keras.layers.Dense(3, name="head")(ours)
    model = keras.Model(inputs, outputs, name="outer")
    return randomize_batch_norms(model, np.random.default_rng(30))


def test_replace_batch_norm_swaps_layers_keeps_outputs_and_original():
    model = _nested_shared_model()
    original_weights = [w.copy() for w in model.get_weights()]
    x = np.random.default_rng(31).normal(size=(6, 8, 8, 2)).astype("float32")
    expected = as_float64(model(x, training=False))

    clone = replace_batch_norm(model)
    layers = batch_norm_layers(clone)
    assert sorted(layer.name for layer in layers) == ["backbone_bn", "ours_bn", "shared_bn"]
    assert all(type(layer) is BatchNormalization for layer in layers)
    assert [type(layer) for layer in batch_norm_layers(model)].count(StockBN) == 2
    np.testing.assert_allclose(as_float64(clone(x, training=False)), expected, rtol=1e-6, atol=1e-6)
    # The shared layer is still one layer with two call sites; the frozen nested
    # backbone stays frozen.
    assert len(clone.get_layer("shared_bn")._inbound_nodes) == 2
    assert clone.get_layer("backbone").trainable is False
    assert clone.get_layer("backbone").get_layer("backbone_bn").trainable is False
    assert clone.get_layer("head").trainable is True
    # Training the copy leaves the original untouched.
    clone.compile("sgd", "mse")
    clone.fit(x, np.ones((6, 3)), epochs=1, verbose=0)
    assert not np.allclose(
        as_float64(clone.get_layer("shared_bn").moving_mean),
        as_float64(model.get_layer("shared_bn").moving_mean),
    )
    for before, after in zip(original_weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)


def test_replace_batch_norm_applies_overrides():
    model = _nested_shared_model()
    clone = replace_batch_norm(model, momentum=None, unbiased_moving_variance=True)
    for layer in batch_norm_layers(clone):
        assert layer.momentum is None and layer.unbiased_moving_variance is True
        assert int(as_float64(layer.num_batches_tracked)) == 0
    assert clone.get_layer("shared_bn").epsilon == 1e-2  # config kept
    x = np.random.default_rng(32).normal(size=(3, 8, 8, 2)).astype("float32")
    np.testing.assert_allclose(
        as_float64(clone(x, training=False)),
        as_float64(model(x, training=False)),
        rtol=1e-6,
        atol=1e-6,
    )


def test_replace_batch_norm_enabling_renorm_keeps_inference_outputs():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, StockBN(name="bn")(inputs))
    randomize_batch_norms(model.get_layer("bn"), np.random.default_rng(33))
    clone = replace_batch_norm(model, renorm=True)
    layer = clone.get_layer("bn")
    np.testing.assert_allclose(
        as_float64(layer.moving_stddev) ** 2 - layer.epsilon,
        as_float64(model.get_layer("bn").moving_variance),
        rtol=1e-5,
    )
    x = spread_features(np.random.default_rng(34), 5, 3)
    np.testing.assert_allclose(as_float64(clone(x)), as_float64(model(x)), rtol=1e-6)


def test_replace_batch_norm_errors():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.bn = StockBN()

        def call(self, x):
            return self.bn(x)

    subclassed = Subclassed()
    subclassed(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="Sequential and Functional"):
        replace_batch_norm(subclassed)
    model = _nested_shared_model()
    with pytest.raises(ValueError, match="name='x'"):
        replace_batch_norm(model, name="x")
    with pytest.raises(ValueError, match="would drop the weight 'gamma'"):
        replace_batch_norm(model, scale=False)
    with pytest.raises(ValueError, match="momentum"):
        replace_batch_norm(model, momentum=2.0)

"""keras_bn.training, the compatibility module: it re-exports the training utilities
(each tested against NumPy in its own module here), and they work together on JAX."""

import pytest

import keras_bn
import keras_bn.monitor
import keras_bn.recalibration
import keras_bn.replacement
import keras_bn.running_moments
import keras_bn.torch_interop
from keras_bn import training

# Each name keras_bn.training has always offered, and the module that defines it.
HOMES = {
    "RunningMoments": keras_bn.running_moments,
    "recalibrate_batch_norm": keras_bn.recalibration,
    "BatchNormMonitor": keras_bn.monitor,
    "replace_batch_norm": keras_bn.replacement,
    "load_torch_batch_norm": keras_bn.torch_interop,
    "torch_batch_norm_kwargs": keras_bn.torch_interop,
}


def test_training_reexports_each_utility_from_its_own_module():
    assert sorted(training.__all__) == sorted(HOMES)
    for name, module in HOMES.items():
        assert getattr(training, name) is getattr(module, name), name
        assert getattr(training, name).__module__ == module.__name__, name


# ------------------------------------------------------------------ JAX backend

_JAX_SCRIPT = """
import numpy as np, keras
from keras_bn import BatchNormMonitor, recalibrate_batch_norm, replace_batch_norm
from keras_bn.layers import BatchNormalization
assert keras.backend.backend() == "jax"
rng = np.random.default_rng(0)
x = (rng.normal(size=(50, 6, 6, 2)) * [0.1, 10.0] + [5.0, -3.0]).astype("float32")
inputs = keras.Input((6, 6, 2))
h = keras.layers.BatchNormalization(name="bn0")(inputs)
h = keras.layers.Conv2D(3, 3, name="conv")(h)
outputs = BatchNormalization(name="bn1", unbiased_moving_variance=True)(h)
model = keras.Model(inputs, outputs)
for mode in ("training", "inference"):
    recalibrate_batch_norm(model, x, batch_size=16, mode=mode)
    probe = keras.Model(inputs, [model.get_layer("bn0").input, model.get_layer("conv").output])
    for layer, values, ddof in zip(
        (model.get_layer("bn0"), model.get_layer("bn1")), probe(x, training=False), (0, 1)
    ):
        values = np.asarray(values, np.float64)
        if mode == "training" and layer.name == "bn1":
            continue  # upstream batch statistics: checked on TensorFlow
        np.testing.assert_allclose(layer.moving_mean.numpy(), values.mean((0, 1, 2)), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(layer.moving_variance.numpy(), values.var((0, 1, 2), ddof=ddof), rtol=1e-5)
clone = replace_batch_norm(model)
# ours computes (x - mean) * inv, the stock layer x * inv - mean * inv: float32 apart
np.testing.assert_allclose(np.asarray(clone(x)), np.asarray(model(x)), rtol=1e-5, atol=2e-5)
clone.compile("sgd", "mse")
history = clone.fit(x, np.zeros((50, 4, 4, 3)), epochs=2, verbose=0, callbacks=[BatchNormMonitor()])
assert len(history.history["bn_mean_drift"]) == 2 and history.history["bn_mean_drift"][0] > 0
print("ok")
"""


@pytest.mark.first
def test_training_utilities_on_jax_backend(run_python):
    result = run_python(["-c", _JAX_SCRIPT], env={"KERAS_BACKEND": "jax"})
    assert result.stdout.strip().endswith("ok")

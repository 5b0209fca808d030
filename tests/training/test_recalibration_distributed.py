"""Data-parallel recalibration: ``recalibrate_batch_norm`` under the engines' distributions.

On 2 and 4 simulated devices (JAX: ``keras.distribution.DataParallel`` over
``--xla_force_host_platform_device_count`` CPU devices; TensorFlow:
``MirroredStrategy`` over logical CPU devices), one fresh process of 4 devices per
backend running both, the
statistics must equal the single-process recalibration's and an independent
NumPy float64 reference (the mean and variance of the first BN's input, taken
from a sub-model over the whole data) within 1e-6; each replica's share is
counted once (the counts are the number of values, not a multiple), with
batches that do not split evenly over the devices.
"""

from __future__ import annotations

import pytest

SCRIPT = """
import sys
import numpy as np

backend, most = sys.argv[1], int(sys.argv[2])
if backend == "tensorflow":
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * most
    )
import keras

from keras_bn.layers import BatchNormalization
from keras_bn.recalibration import recalibrate_batch_norm


def build():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    h = BatchNormalization(name="ours")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(5, 3)(h)
    h = keras.layers.BatchNormalization(name="stock")(h)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(h))


def statistics(model):
    return {v.path: np.asarray(v.numpy(), np.float64) for v in model.non_trainable_variables}


x = np.random.default_rng(0).normal(3.0, 2.0, (101, 6, 6, 3)).astype("float32")
single = build()
single_counts = recalibrate_batch_norm(single, x, batch_size=30)  # 30: uneven over 4
conv = keras.Model(single.inputs, single.get_layer("conv").output).predict(x, verbose=0)
conv = np.asarray(conv, np.float64).reshape(-1, 4)


def distributed(devices):  # built and recalibrated data-parallel over the first devices
    if backend == "jax":
        chosen = keras.distribution.list_devices()[:devices]
        assert len(chosen) == devices
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=chosen))
        try:
            model = build()
            return model, recalibrate_batch_norm(model, x, batch_size=30)
        finally:
            keras.distribution.set_distribution(None)
    names = [d.name for d in tf.config.list_logical_devices("CPU")][:devices]
    strategy = tf.distribute.MirroredStrategy(names)
    assert strategy.num_replicas_in_sync == devices
    with strategy.scope():
        model = build()
    return model, recalibrate_batch_norm(model, x, batch_size=30)


for devices in (2, most):
    model, counts = distributed(devices)
    assert counts == single_counts == {"ours": 101 * 36, "stock": 101 * 16}, counts
    got, want = statistics(model), statistics(single)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-6, atol=1e-9, err_msg=path)
    np.testing.assert_allclose(got["ours/moving_mean"], conv.mean(0), rtol=1e-6)
    np.testing.assert_allclose(got["ours/moving_variance"], conv.var(0), rtol=1e-6)
    print("distributed recalibration ok", backend, devices)
"""


@pytest.mark.first
@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_distributed_recalibration_equals_single_process(run_python, backend):
    """2 and then 4 devices in one process of 4 (the start-up paid once)."""
    env = {"KERAS_BACKEND": backend}
    if backend == "jax":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    result = run_python(["-c", SCRIPT, backend, "4"], env=env, timeout=300)
    for devices in (2, 4):
        assert f"distributed recalibration ok {backend} {devices}" in result.stdout

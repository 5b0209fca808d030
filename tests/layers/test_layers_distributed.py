"""BatchNormalization under data parallelism, against NumPy statistics of the global batch.

Each scenario runs in a subprocess: logical CPU devices (TensorFlow) and
XLA_FLAGS (JAX) must be set before the framework initializes. The scripts
only train and print JSON (data and resulting weights); the expectations are
computed here with NumPy.
"""

import json

import numpy as np
import pytest

TENSORFLOW_SCRIPT = r"""
import json
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from keras_bn import BatchNormalization

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
rng = np.random.default_rng(0)
results = {}


def fit(layer, x, input_shape, batch_size=8, masking=False):
    with strategy.scope():
        layers = [keras.Input(input_shape)]
        if masking:
            layers.append(keras.layers.Masking(0.0))
        model = keras.Sequential(layers + [layer])
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    model.fit(x, np.zeros_like(x), batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
    return model


def weights(layer):
    return {w.name: keras.ops.convert_to_numpy(w).tolist() for w in layer.weights}


# Replicas see different data: replica 0 gets x[:4], replica 1 gets x[4:].
x = (rng.normal(size=(8, 3)) * [1.0, 10.0, 0.1] + [1.0, -2.0, 3.0]).astype("float32")
x[4:] = x[4:] * 3.0 + 5.0
results["x"] = x.tolist()
for name, layer in {
    "stock": keras.layers.BatchNormalization(momentum=0.0),
    "local": BatchNormalization(momentum=0.0),
    "synchronized": BatchNormalization(momentum=0.0, synchronized=True),
}.items():
    fit(layer, x, (3,))
    results[name] = weights(layer)

# Two steps, cumulative average, unbiased variance: the count stays a plain count.
x2 = (rng.normal(size=(16, 3)) * [2.0, 0.5, 1.0] + [4.0, 0.0, -1.0]).astype("float32")
results["x2"] = x2.tolist()
layer = BatchNormalization(momentum=None, unbiased_moving_variance=True)
fit(layer, x2, (3,))
results["cumulative"] = weights(layer)

# mean 1e3, std 1e-2 in float32, synchronized: E[x^2] - E[x]^2 fails here.
x3 = (1e3 + 1e-2 * rng.normal(size=(8, 3))).astype("float32")
x3[4:] += 0.03
results["x3"] = x3.tolist()
layer = BatchNormalization(momentum=0.0, epsilon=1e-6, synchronized=True, unbiased_moving_variance=True)
model = fit(layer, x3, (3,))
results["stable"] = weights(layer)


@tf.function
def train_outputs(inputs):
    return strategy.run(lambda batch: model(batch, training=True), args=(inputs,))


dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(x3).batch(8))
per_replica = train_outputs(next(iter(dataset)))
results["stable_outputs"] = np.concatenate(
    [t.numpy() for t in strategy.experimental_local_results(per_replica)]
).tolist()

# Masked sequences (Masking -> mask (B, T)), synchronized.
x4 = (rng.normal(size=(8, 5, 3)) * [1.0, 3.0, 0.3] + [2.0, -1.0, 0.5]).astype("float32")
x4[4:] += 4.0
x4[0, 2:] = 0.0
x4[5, 1:] = 0.0
x4[6, 4:] = 0.0
results["x4"] = x4.tolist()
layer = BatchNormalization(momentum=0.0, synchronized=True)
fit(layer, x4, (5, 3), masking=True)
results["masked"] = weights(layer)

# A mask in Keras's convention: (B, T) on (B, T, C) normalized along axis=1 (the
# stock layer's reading), called directly; also the stock layer, unmasked.
x5 = (rng.normal(size=(8, 6, 3)) * [1.0, 3.0, 0.3] + [2.0, -1.0, 0.5]).astype("float32")
x5[4:] = x5[4:] * 2.0 + 3.0
mask5 = rng.random((8, 6)) < 0.7
results["x5"], results["mask5"] = x5.tolist(), mask5.tolist()


def train_step(cls, use_mask, **options):
    with strategy.scope():
        layer = cls(axis=1, momentum=0.0, **options)
        layer.build((None, 6, 3))

    @tf.function
    def step(x, mask):
        return layer(x, training=True, mask=mask if use_mask else None)

    data = tf.data.Dataset.from_tensor_slices((x5, mask5)).batch(8)
    per_replica = strategy.run(step, args=next(iter(strategy.experimental_distribute_dataset(data))))
    outputs = np.concatenate([t.numpy() for t in strategy.experimental_local_results(per_replica)])
    return {"outputs": outputs.tolist(), **weights(layer)}


results["stock-synchronized-axis1"] = train_step(keras.layers.BatchNormalization, False, synchronized=True)
results["synchronized-axis1"] = train_step(BatchNormalization, False, synchronized=True)
results["synchronized-keras-mask"] = train_step(BatchNormalization, True, synchronized=True)
results["local-keras-mask"] = train_step(BatchNormalization, True)
print("RESULTS" + json.dumps(results))
"""

JAX_SCRIPT = r"""
import json
import jax
import keras
import numpy as np
from keras_bn import BatchNormalization

devices = jax.devices()
assert len(devices) == 2, devices
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
rng = np.random.default_rng(1)
results = {"batch_sharding": str(keras.distribution.distribution().get_data_layout((8, 3)).axes)}


def fit(layer, x, input_shape, masking=False):
    layers = [keras.Input(input_shape)]
    if masking:
        layers.append(keras.layers.Masking(0.0))
    model = keras.Sequential(layers + [layer])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    model.fit(x, np.zeros_like(x), batch_size=8, epochs=1, verbose=0, shuffle=False)


def weights(layer):
    return {w.name: keras.ops.convert_to_numpy(w).tolist() for w in layer.weights}


x = (rng.normal(size=(8, 3)) * [1.0, 10.0, 0.1] + [1.0, -2.0, 3.0]).astype("float32")
x[4:] = x[4:] * 3.0 + 5.0
results["x"] = x.tolist()
layer = BatchNormalization(momentum=0.0)
fit(layer, x, (3,))
results["plain"] = weights(layer)

x4 = (rng.normal(size=(8, 5, 3)) * [1.0, 3.0, 0.3] + [2.0, -1.0, 0.5]).astype("float32")
x4[4:] += 4.0
x4[0, 2:] = 0.0
x4[5, 1:] = 0.0
results["x4"] = x4.tolist()
layer = BatchNormalization(momentum=0.0, unbiased_moving_variance=True)
fit(layer, x4, (5, 3), masking=True)
results["masked"] = weights(layer)
print("RESULTS" + json.dumps(results))
"""


def parse_results(stdout):
    line = next(line for line in stdout.splitlines() if line.startswith("RESULTS"))
    results = json.loads(line[len("RESULTS") :])
    return {
        key: (
            {name: np.array(v, np.float64) for name, v in value.items()}
            if isinstance(value, dict)
            else np.array(value, np.float64)
            if isinstance(value, list)
            else value
        )
        for key, value in results.items()
    }


@pytest.fixture(scope="module")
def tensorflow_results(run_python):
    result = run_python(["-c", TENSORFLOW_SCRIPT], env={"KERAS_BACKEND": "tensorflow"})
    return parse_results(result.stdout)


@pytest.fixture(scope="module")
def jax_results(run_python):
    result = run_python(
        ["-c", JAX_SCRIPT],
        env={"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    return parse_results(result.stdout)


def masked_statistics(x, ddof=0):
    """Per-channel mean/variance over the time steps that are not all zero."""
    values = x[np.any(x != 0.0, axis=-1)]
    return values.mean(axis=0), values.var(axis=0, ddof=ddof)


def test_tensorflow_local_statistics_average_over_replicas(tensorflow_results):
    x = tensorflow_results["x"]
    replicas = (x[:4], x[4:])
    mean_over_replicas = np.mean([r.mean(0) for r in replicas], axis=0)
    variance_over_replicas = np.mean([r.var(0) for r in replicas], axis=0)
    ours = tensorflow_results["local"]
    np.testing.assert_allclose(ours["moving_mean"], mean_over_replicas, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["moving_variance"], variance_over_replicas, rtol=1e-5)
    # The replicas differ, and the stock layer keeps replica 0's statistics alone.
    stock = tensorflow_results["stock"]
    np.testing.assert_allclose(stock["moving_mean"], x[:4].mean(0), rtol=1e-5, atol=1e-6)
    assert np.abs(stock["moving_mean"] - mean_over_replicas).min() > 0.5


def test_tensorflow_synchronized_statistics_are_the_global_batch(tensorflow_results):
    x = tensorflow_results["x"]
    ours = tensorflow_results["synchronized"]
    np.testing.assert_allclose(ours["moving_mean"], x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["moving_variance"], x.var(0), rtol=1e-5)
    local = tensorflow_results["local"]["moving_variance"]
    assert np.max(np.abs(local - x.var(0)) / x.var(0)) > 0.2  # sync changed something


def test_tensorflow_cumulative_average_counts_steps_not_replicas(tensorflow_results):
    x = tensorflow_results["x2"]
    replica_batches = [x[0:4], x[4:8], x[8:12], x[12:16]]  # 2 steps x 2 replicas
    ours = tensorflow_results["cumulative"]
    assert ours["num_batches_tracked"] == 2
    np.testing.assert_allclose(
        ours["moving_mean"], np.mean([b.mean(0) for b in replica_batches], 0), rtol=1e-5
    )
    np.testing.assert_allclose(
        ours["moving_variance"], np.mean([b.var(0, ddof=1) for b in replica_batches], 0), rtol=1e-5
    )


def test_tensorflow_synchronized_is_stable_for_large_mean(tensorflow_results):
    x = tensorflow_results["x3"]
    ours = tensorflow_results["stable"]
    np.testing.assert_allclose(ours["moving_mean"], x.mean(0), rtol=1e-7)
    np.testing.assert_allclose(ours["moving_variance"], x.var(0, ddof=1), rtol=2e-2)
    outputs = tensorflow_results["stable_outputs"]
    expected = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-6)
    assert np.all(np.isfinite(outputs))
    np.testing.assert_allclose(outputs, expected, atol=2e-2)


def test_tensorflow_synchronized_with_mask_uses_global_unmasked_values(tensorflow_results):
    mean, variance = masked_statistics(tensorflow_results["x4"])
    ours = tensorflow_results["masked"]
    np.testing.assert_allclose(ours["moving_mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["moving_variance"], variance, rtol=1e-5)


def keras_mask_statistics(x, mask):
    """Per-step (axis 1) outputs, mean and variance of (B, T, C) over the unmasked (b, t)."""
    full = np.broadcast_to(mask[..., None], x.shape)
    mean = np.array([x[:, t][full[:, t]].mean() for t in range(x.shape[1])])
    variance = np.array([x[:, t][full[:, t]].var() for t in range(x.shape[1])])
    outputs = (x - mean[:, None]) / np.sqrt(variance[:, None] + 1e-3)
    return outputs, mean, variance


def test_tensorflow_synchronized_matches_stock_over_replicas(tensorflow_results):
    stock = tensorflow_results["stock-synchronized-axis1"]
    ours = tensorflow_results["synchronized-axis1"]
    for name, value in stock.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    x = tensorflow_results["x5"]
    np.testing.assert_allclose(ours["moving_mean"], x.mean(axis=(0, 2)), rtol=1e-5, atol=1e-6)


def test_tensorflow_keras_convention_mask_over_replicas(tensorflow_results):
    """A (B, T) mask on (B, T, C) with axis=1, against NumPy.

    Differences from the stock layer: its masked path ignores `synchronized`
    (each replica normalizes with its own masked statistics) where ours takes the
    global batch's unmasked values; without synchronization it keeps replica 0's
    moving statistics where ours averages the replicas'.
    """
    x, mask = tensorflow_results["x5"], tensorflow_results["mask5"].astype(bool)
    outputs, mean, variance = keras_mask_statistics(x, mask)
    ours = tensorflow_results["synchronized-keras-mask"]
    np.testing.assert_allclose(ours["outputs"], outputs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours["moving_mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["moving_variance"], variance, rtol=1e-5)
    replicas = [keras_mask_statistics(x[s], mask[s]) for s in (slice(0, 4), slice(4, 8))]
    local = tensorflow_results["local-keras-mask"]
    np.testing.assert_allclose(
        local["outputs"], np.concatenate([r[0] for r in replicas]), rtol=1e-4, atol=1e-4
    )
    for index, name in ((1, "moving_mean"), (2, "moving_variance")):
        expected = np.mean([r[index] for r in replicas], axis=0)
        np.testing.assert_allclose(local[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_jax_data_parallel_statistics_are_the_global_batch(jax_results):
    assert "batch" in jax_results["batch_sharding"]  # the batch axis is split over devices
    x = jax_results["x"]
    ours = jax_results["plain"]
    np.testing.assert_allclose(ours["moving_mean"], x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["moving_variance"], x.var(0), rtol=1e-5)
    assert np.abs(ours["moving_mean"] - x[:4].mean(0)).min() > 0.5


def test_jax_data_parallel_masked_statistics_are_the_global_batch(jax_results):
    mean, variance = masked_statistics(jax_results["x4"], ddof=1)
    ours = jax_results["masked"]
    np.testing.assert_allclose(ours["moving_mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["moving_variance"], variance, rtol=1e-5)

"""Tests of the training utilities (keras_bn.recalibration, .monitor, .replacement,
.torch_interop, .running_moments) against NumPy references of the formulas."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from support.models import batch_norm_layers, randomize_batch_norms

from keras_bn._batch_norm_state import to_numpy
from keras_bn.layers import BatchNormalization
from keras_bn.monitor import BatchNormMonitor
from keras_bn.recalibration import recalibrate_batch_norm
from keras_bn.replacement import replace_batch_norm
from keras_bn.running_moments import RunningMoments
from keras_bn.torch_interop import load_torch_batch_norm, torch_batch_norm_kwargs

StockBN = keras.layers.BatchNormalization


# ------------------------------------------------------------------ helpers


def _np(value):
    """A Keras variable or tensor as a float64 NumPy array."""
    return to_numpy(value).astype(np.float64)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _features(rng, n, channels):
    """Inputs whose channels have means != 0 and scales over orders of magnitude."""
    scales = np.logspace(-2, 2, channels)
    means = rng.uniform(-50, 50, channels)
    return (rng.normal(size=(n, channels)) * scales + means).astype("float32")


def _np_bn_inference(x, layer):
    """NumPy BN inference along the last axis with the layer's weights."""
    mean = _np(layer.moving_mean)
    var = _np(layer.moving_variance)
    gamma = _np(layer.gamma) if layer.gamma is not None else 1.0
    beta = _np(layer.beta) if layer.beta is not None else 0.0
    return (x - mean) / np.sqrt(var + layer.epsilon) * gamma + beta


def _dense(x, layer):
    kernel, bias = (_np(w) for w in layer.get_weights())
    return x @ kernel + bias


def _stats(layer):
    return _np(layer.moving_mean), _np(layer.moving_variance)


def _assert_stats(layer, mean, variance, rtol=1e-5):
    """Moving statistics equal (mean, variance) up to float32 rounding.

    The mean error is measured against the standard deviation plus float32's
    resolution at the mean's magnitude (the values pass through float32).
    """
    got_mean, got_variance = _stats(layer)
    tolerance = rtol * 10 * np.sqrt(variance) + 4 * np.finfo(np.float32).eps * np.abs(mean)
    assert np.all(np.abs(got_mean - mean) <= tolerance), (got_mean, mean)
    np.testing.assert_allclose(got_variance, variance, rtol=rtol)


# ---------------------------------------------------------- RunningMoments maths


@settings(max_examples=30, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 120), max_size=6),
    offset=st.sampled_from([0.0, 1e3, -1e6]),
    seed=st.integers(0, 2**16),
)
def test_running_moments_equal_numpy_for_any_batching(cuts, offset, seed):
    rng = _rng(seed)
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
    rng = _rng(1)
    values = rng.normal(5.0, 3.0, size=(50, 2, 4))
    weights = rng.random((50, 2)) > 0.3
    moments = RunningMoments((2, 4))
    moments.update(values[:17], weights[:17])
    moments.update(values[17:], weights[17:])
    for channel in range(2):
        kept = values[weights[:, channel], channel]
        np.testing.assert_allclose(moments.mean[channel], kept.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(moments.variance()[channel], kept.var(axis=0), rtol=1e-10)


# ----------------------------------------------------------------- recalibration


def _chain_model(bn_second, dropout=0.0):
    """x -> Dense -> stock BN -> Dense -> [Dropout] -> nested(BN) -> Dense."""
    inputs = keras.Input((5,))
    h = keras.layers.Dense(4, name="dense0")(inputs)
    h = StockBN(name="bn0")(h)
    h = keras.layers.Dense(3, name="dense1")(h)
    if dropout:
        h = keras.layers.Dropout(dropout, name="dropout")(h)
    nested = keras.Sequential([keras.Input((3,)), bn_second], name="nested")
    h = nested(h)
    outputs = keras.layers.Dense(2, name="dense2")(h)
    model = keras.Model(inputs, outputs)
    rng = _rng(2)
    for layer in (model.get_layer("bn0"), bn_second):
        randomize_batch_norms(layer, rng)
    return model


@pytest.mark.parametrize("second", ["stock", "ours"])
def test_recalibrate_inference_mode_equals_numpy_population_statistics(second):
    bn1 = StockBN(name="bn1") if second == "stock" else BatchNormalization(name="bn1")
    model = _chain_model(bn1, dropout=0.5)
    x = _features(_rng(3), 203, 5)  # 203 = 6 * 32 + 11: unequal last batch
    counts = recalibrate_batch_norm(model, x, batch_size=32)
    assert counts == {"bn0": 203, "bn1": 203}

    # NumPy reference: sequential, inference mode, Dropout off.
    bn0 = model.get_layer("bn0")
    h0 = _dense(x.astype(np.float64), model.get_layer("dense0"))
    _assert_stats(bn0, h0.mean(axis=0), h0.var(axis=0))
    h1 = _dense(_np_bn_inference(h0, bn0), model.get_layer("dense1"))
    _assert_stats(bn1, h1.mean(axis=0), h1.var(axis=0))


def test_recalibrated_statistics_are_a_fixed_point_of_inference():
    """Afterwards each BN's inference-mode input has exactly its moving statistics."""
    model = _chain_model(BatchNormalization(name="bn1"))
    x = _features(_rng(4), 100, 5)
    recalibrate_batch_norm(model, x, batch_size=7)
    probe = keras.Model(
        model.input,
        [model.get_layer("bn0").input, model.get_layer("dense1").output],
    )
    for layer, values in zip(
        (model.get_layer("bn0"), model.get_layer("nested").get_layer("bn1")),
        probe(x, training=False),
        strict=True,
    ):
        values = _np(values)
        _assert_stats(layer, values.mean(axis=0), values.var(axis=0))


def test_recalibrate_training_mode_uses_batch_statistics_upstream():
    model = _chain_model(StockBN(name="bn1"))
    bn0, bn1 = model.get_layer("bn0"), model.get_layer("nested").get_layer("bn1")
    x = _features(_rng(5), 90, 5)
    weights_before = [w.copy() for w in model.get_weights()]
    counts = recalibrate_batch_norm(model, (x, np.zeros(90)), batch_size=40, mode="training")
    assert counts == {"bn0": 90, "bn1": 90}

    h0 = _dense(x.astype(np.float64), model.get_layer("dense0"))
    _assert_stats(bn0, h0.mean(axis=0), h0.var(axis=0))
    # bn0 in training mode: each batch (40, 40, 10) normalized by its own stats.
    gamma, beta = (_np(w) for w in (bn0.gamma, bn0.beta))
    h1 = []
    for batch in np.split(h0, [40, 80]):
        normalized = (batch - batch.mean(0)) / np.sqrt(batch.var(0) + bn0.epsilon)
        h1.append(_dense(normalized * gamma + beta, model.get_layer("dense1")))
    h1 = np.concatenate(h1)
    _assert_stats(bn1, h1.mean(axis=0), h1.var(axis=0))
    # Only the moving statistics changed.
    for before, after, variable in zip(
        weights_before, model.get_weights(), model.weights, strict=True
    ):
        if "moving" not in variable.path:
            np.testing.assert_array_equal(before, after)


def test_recalibrate_unbiased_option_and_batch_count():
    layer = BatchNormalization(momentum=None, unbiased_moving_variance=True, name="bn")
    model = keras.Sequential([keras.Input((3,)), layer])
    x = _features(_rng(6), 13, 3)
    recalibrate_batch_norm(model, x, batch_size=4)  # 4 batches
    reference = x.astype(np.float64)
    _assert_stats(layer, reference.mean(0), reference.var(0, ddof=1))
    assert int(_np(layer.num_batches_tracked)) == 4


def test_recalibrate_multi_axis_statistics():
    layer = BatchNormalization(axis=(1, -1), name="bn")
    model = keras.Sequential([keras.Input((3, 4, 2)), layer])
    rng = _rng(7)
    x = (rng.normal(size=(21, 3, 4, 2)) * rng.uniform(0.1, 10, (3, 1, 2)) + 7).astype("float32")
    recalibrate_batch_norm(model, x, batch_size=8)
    reference = x.astype(np.float64)
    _assert_stats(layer, reference.mean(axis=(0, 2)), reference.var(axis=(0, 2)))


class _ChannelsFirst(keras.layers.Layer):
    """(B, T, C) -> (B, C, T), passing the (B, T) mask on."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, x):
        return keras.ops.transpose(x, (0, 2, 1))

    def compute_mask(self, inputs, mask=None):
        return mask


@pytest.mark.parametrize("layout", ["stock", "ours", "ours_channels_first"])
def test_recalibrate_uses_only_unmasked_positions(layout):
    rng = _rng(8)
    tokens = rng.integers(1, 20, size=(30, 7))
    lengths = rng.integers(1, 8, size=30)
    tokens[np.arange(7) >= lengths[:, None]] = 0  # padding, masked by Embedding
    embedding = keras.layers.Embedding(20, 4, mask_zero=True, name="embedding")
    layers = [keras.Input((7,), dtype="int32"), embedding]
    if layout == "stock":
        bn = StockBN(name="bn")
    elif layout == "ours":
        bn = BatchNormalization(name="bn")
    else:  # (B, C, T) with the (B, T) mask: ours accepts masks for any axis
        layers.append(_ChannelsFirst())
        bn = BatchNormalization(axis=1, name="bn")
    model = keras.Sequential([*layers, bn])
    embedding.embeddings.assign(rng.normal(2.0, 3.0, (20, 4)).astype("float32"))
    recalibrate_batch_norm(model, tokens, batch_size=8)
    values = _np(embedding.embeddings)[tokens[tokens != 0]]
    _assert_stats(bn, values.mean(axis=0), values.var(axis=0))


@pytest.mark.parametrize("cls", [StockBN, BatchNormalization], ids=["stock", "ours"])
def test_recalibrate_reads_masks_as_the_layer_does(cls):
    """A (B, T) mask on (B, T, C) with axis=1 covers the leading axes (Keras's convention)."""
    rng = np.random.default_rng(30)
    tokens = rng.integers(1, 20, size=(30, 7))
    tokens[np.arange(7) >= rng.integers(3, 8, size=30)[:, None]] = 0
    embedding = keras.layers.Embedding(20, 4, mask_zero=True)
    bn = cls(axis=1)
    model = keras.Sequential([keras.Input((7,), dtype="int32"), embedding, bn])
    embedding.embeddings.assign(rng.normal(2.0, 3.0, (20, 4)).astype("float32"))
    recalibrate_batch_norm(model, tokens, batch_size=8)
    vectors = keras.ops.convert_to_numpy(embedding.embeddings).astype(np.float64)
    steps = [vectors[tokens[:, t][tokens[:, t] != 0]] for t in range(7)]
    for name, expected in (
        ("moving_mean", [step.mean() for step in steps]),
        ("moving_variance", [step.var() for step in steps]),
    ):
        actual = keras.ops.convert_to_numpy(getattr(bn, name))
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_recalibrate_shared_layer_collects_every_call():
    shared = StockBN(name="shared_bn")
    a, b = keras.Input((3,)), keras.Input((3,))
    outputs = keras.layers.Add()([shared(a), shared(keras.layers.Dense(3, name="dense")(b))])
    model = keras.Model([a, b], outputs)
    randomize_batch_norms(shared, _rng(9))
    xa, xb = _features(_rng(10), 50, 3), _features(_rng(11), 50, 3)
    recalibrate_batch_norm(model, [xa, xb])
    values = np.concatenate([xa, _dense(xb.astype(np.float64), model.get_layer("dense"))])
    _assert_stats(shared, values.mean(0), values.var(0))


def _two_bn_model():
    inputs = keras.Input((4,), name="features")
    h = BatchNormalization(name="bn0")(inputs)
    h = keras.layers.Dense(3, name="dense")(h)
    outputs = StockBN(name="bn1")(h)
    model = keras.Model(inputs, outputs)
    rng = _rng(12)
    model.get_layer("dense").set_weights([rng.normal(size=(4, 3)), rng.normal(size=3)])
    randomize_batch_norms(model.get_layer("bn0"), rng)
    randomize_batch_norms(model.get_layer("bn1"), rng)
    return model


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index):
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[rows], self.y[rows]


@pytest.mark.parametrize(
    "source", ["tuple", "x_only_tuple", "tf.data", "generator", "pydataset", "steps"]
)
def test_recalibrate_accepts_every_data_source(source):
    x = _features(_rng(13), 70, 4)
    y = np.zeros((70, 1), "float32")
    expected = _two_bn_model()
    recalibrate_batch_norm(expected, x[:60] if source == "steps" else x, batch_size=20)

    model = _two_bn_model()
    data = {
        "tuple": (x, y),
        "x_only_tuple": (x,),
        "tf.data": tf.data.Dataset.from_tensor_slices((x, y)).batch(16),
        "generator": ((x[i : i + 9], y[i : i + 9]) for i in range(0, 70, 9)),
        "pydataset": _Batches(x, y, 11),
        "steps": x,
    }[source]
    counts = recalibrate_batch_norm(
        model, data, batch_size=20, steps=3 if source == "steps" else None
    )
    assert counts == {"bn0": 60 if source == "steps" else 70, "bn1": counts["bn0"]}
    for name in ("bn0", "bn1"):
        np.testing.assert_allclose(
            _stats(model.get_layer(name)), _stats(expected.get_layer(name)), rtol=1e-5, atol=1e-6
        )


def test_recalibrate_renorm_layer_keeps_moving_stddev_consistent():
    layer = StockBN(renorm=True, name="bn")
    model = keras.Sequential([keras.Input((3,)), layer])
    x = _features(_rng(14), 40, 3)
    recalibrate_batch_norm(model, x)
    reference = x.astype(np.float64)
    _assert_stats(layer, reference.mean(0), reference.var(0))
    np.testing.assert_allclose(
        _np(layer.moving_stddev) ** 2 - layer.epsilon, reference.var(0), rtol=1e-5
    )


class _Block(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3)
        self.bn = BatchNormalization()

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)


def test_recalibrate_finds_batch_norm_inside_custom_layers():
    block = _Block()
    model = keras.Sequential([keras.Input((4,)), block])
    x = _features(_rng(15), 33, 4)
    recalibrate_batch_norm(model, x, batch_size=10)
    values = _dense(x.astype(np.float64), block.dense)
    _assert_stats(block.bn, values.mean(0), values.var(0))


def test_recalibrate_failure_leaves_statistics_unchanged():
    model = _two_bn_model()
    before = [_stats(model.get_layer(name)) for name in ("bn0", "bn1")]
    x = _features(_rng(16), 30, 4)

    def batches():
        yield x[:10]
        yield x[10:20]
        raise RuntimeError("data pipeline failed")

    with pytest.raises(RuntimeError, match="data pipeline failed"):
        recalibrate_batch_norm(model, batches())
    for name, (mean, variance) in zip(("bn0", "bn1"), before, strict=True):
        np.testing.assert_array_equal(_stats(model.get_layer(name))[0], mean)
        np.testing.assert_array_equal(_stats(model.get_layer(name))[1], variance)
    # and the model still runs normally (no patched calls left behind)
    assert all("call" not in vars(layer) for layer in model.layers)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "train"}, "Received: mode='train'"),
        ({"steps": 0}, "Received: steps=0"),
        ({"batch_size": 2.5}, "Received: batch_size=2.5"),
    ],
    ids=["mode", "steps", "batch_size"],
)
def test_recalibrate_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        recalibrate_batch_norm(_two_bn_model(), np.zeros((4, 4), "float32"), **kwargs)


def test_recalibrate_rejects_bad_data_and_unbuilt_models():
    with pytest.raises(ValueError, match="Received: data of type int"):
        recalibrate_batch_norm(_two_bn_model(), 3)
    with pytest.raises(ValueError, match="lengths"):
        recalibrate_batch_norm(_two_bn_model(), [np.zeros((4, 4)), np.zeros((5, 4))])
    with pytest.raises(ValueError, match="built model"):
        recalibrate_batch_norm(keras.Sequential([StockBN()]), np.zeros((4, 4)))


def test_recalibrate_warns_about_layers_without_data():
    model = _two_bn_model()
    before = _stats(model.get_layer("bn0"))
    with pytest.warns(UserWarning, match="received no data"):
        counts = recalibrate_batch_norm(model, iter([]))
    assert counts == {"bn0": 0, "bn1": 0}
    np.testing.assert_array_equal(_stats(model.get_layer("bn0"))[0], before[0])


# ----------------------------------------------------------------------- monitor


class _Snapshots(keras.callbacks.Callback):
    """Independent record of the moving statistics (runs before the monitor)."""

    def __init__(self, layers):
        super().__init__()
        self.layers, self.values = layers, []

    def _take(self):
        self.values.append([_stats(layer) for layer in self.layers])

    def on_train_begin(self, logs=None):
        self._take()

    def on_epoch_end(self, epoch, logs=None):
        self._take()


def test_monitor_logs_drift_per_epoch_in_history():
    rng = _rng(20)
    x = _features(rng, 96, 6)
    y = (x[:, :1] > 0).astype("float32")
    bn0, bn1 = StockBN(name="bn0", momentum=0.8), BatchNormalization(name="bn1", momentum=0.8)
    model = keras.Sequential(
        [keras.Input((6,)), bn0, keras.layers.Dense(5), bn1, keras.layers.Dense(1)]
    )
    model.compile("sgd", "mse")
    snapshots = _Snapshots([bn0, bn1])
    monitor = BatchNormMonitor(per_layer=True)
    history = model.fit(x, y, epochs=3, batch_size=32, verbose=0, callbacks=[snapshots, monitor])
    logs = history.history
    for epoch in range(3):
        drifts = {}
        for index, layer in enumerate((bn0, bn1)):
            old_mean, old_var = snapshots.values[epoch][index]
            new_mean, new_var = snapshots.values[epoch + 1][index]
            scale = np.sqrt(old_var + layer.epsilon)
            drifts[layer.name] = (
                np.max(np.abs(new_mean - old_mean) / scale),
                np.max(np.abs(new_var - old_var) / (old_var + layer.epsilon)),
            )
            assert logs[f"bn_{layer.name}/mean_drift"][epoch] == pytest.approx(
                drifts[layer.name][0]
            )
            assert logs[f"bn_{layer.name}/variance_drift"][epoch] == pytest.approx(
                drifts[layer.name][1]
            )
        assert logs["bn_mean_drift"][epoch] == pytest.approx(max(d[0] for d in drifts.values()))
        assert logs["bn_variance_drift"][epoch] == pytest.approx(max(d[1] for d in drifts.values()))
        assert logs["bn_nonfinite"][epoch] == 0
    # The first epoch moves bn0's statistics far from their initial (0, 1).
    assert logs["bn_mean_drift"][0] > 1.0
    assert len(monitor.history) == 3 and set(monitor.history[0]) == {"bn0", "bn1"}


def test_monitor_detects_nonfinite_statistics_and_stops_training():
    x = _features(_rng(21), 64, 3)
    x[40] = np.nan  # the third batch of 16 poisons the moving statistics
    y = np.zeros((64, 1), "float32")
    bn = StockBN(name="bn")
    model = keras.Sequential([keras.Input((3,)), bn, keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    monitor = BatchNormMonitor(stop_on_nonfinite=True, check_every_batch=True)

    class CountBatches(keras.callbacks.Callback):
        batches = 0

        def on_train_batch_end(self, batch, logs=None):
            CountBatches.batches += 1

    with pytest.warns(UserWarning, match=r"non-finite or negative moving statistics in \['bn'\]"):
        history = model.fit(
            x,
            y,
            epochs=5,
            batch_size=16,
            shuffle=False,
            verbose=0,
            callbacks=[CountBatches(), monitor],
        )
    assert CountBatches.batches == 3  # stopped right after the bad batch
    assert monitor.nonfinite_layers == ["bn"]
    assert history.history["bn_nonfinite"] == [1.0]
    assert np.isnan(history.history["bn_mean_drift"][0])


def test_monitor_without_stop_keeps_training():
    x = _features(_rng(22), 32, 3)
    x[5] = np.inf
    model = keras.Sequential([keras.Input((3,)), StockBN(name="bn"), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = model.fit(
            x,
            np.zeros((32, 1)),
            epochs=2,
            batch_size=16,
            verbose=0,
            callbacks=[BatchNormMonitor(prefix="stats_")],
        )
    assert history.history["stats_nonfinite"] == [1.0, 1.0]


# ------------------------------------------------------------------- replacement


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
    return randomize_batch_norms(model, _rng(30))


def test_replace_batch_norm_swaps_layers_keeps_outputs_and_original():
    model = _nested_shared_model()
    original_weights = [w.copy() for w in model.get_weights()]
    x = _rng(31).normal(size=(6, 8, 8, 2)).astype("float32")
    expected = _np(model(x, training=False))

    clone = replace_batch_norm(model)
    layers = batch_norm_layers(clone)
    assert sorted(layer.name for layer in layers) == ["backbone_bn", "ours_bn", "shared_bn"]
    assert all(type(layer) is BatchNormalization for layer in layers)
    assert [type(layer) for layer in batch_norm_layers(model)].count(StockBN) == 2
    np.testing.assert_allclose(_np(clone(x, training=False)), expected, rtol=1e-6, atol=1e-6)
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
        _np(clone.get_layer("shared_bn").moving_mean),
        _np(model.get_layer("shared_bn").moving_mean),
    )
    for before, after in zip(original_weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)


def test_replace_batch_norm_applies_overrides():
    model = _nested_shared_model()
    clone = replace_batch_norm(model, momentum=None, unbiased_moving_variance=True)
    for layer in batch_norm_layers(clone):
        assert layer.momentum is None and layer.unbiased_moving_variance is True
        assert int(_np(layer.num_batches_tracked)) == 0
    assert clone.get_layer("shared_bn").epsilon == 1e-2  # config kept
    x = _rng(32).normal(size=(3, 8, 8, 2)).astype("float32")
    np.testing.assert_allclose(
        _np(clone(x, training=False)),
        _np(model(x, training=False)),
        rtol=1e-6,
        atol=1e-6,
    )


def test_replace_batch_norm_enabling_renorm_keeps_inference_outputs():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, StockBN(name="bn")(inputs))
    randomize_batch_norms(model.get_layer("bn"), _rng(33))
    clone = replace_batch_norm(model, renorm=True)
    layer = clone.get_layer("bn")
    np.testing.assert_allclose(
        _np(layer.moving_stddev) ** 2 - layer.epsilon,
        _np(model.get_layer("bn").moving_variance),
        rtol=1e-5,
    )
    x = _features(_rng(34), 5, 3)
    np.testing.assert_allclose(_np(clone(x)), _np(model(x)), rtol=1e-6)


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


# ----------------------------------------------------------------------- PyTorch


class _FakeTorchTensor:
    """Duck-typed torch.Tensor: only .detach().cpu().numpy()."""

    def __init__(self, value):
        self._value = np.asarray(value)

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self._value


def _torch_state(rng, channels, affine=True, tensors=True, prefix=""):
    state = {
        "running_mean": rng.normal(2.0, 3.0, channels).astype("float32"),
        "running_var": np.logspace(-3, 2, channels).astype("float32"),
        "num_batches_tracked": np.array(17, "int64"),
    }
    if affine:
        state["weight"] = rng.uniform(0.5, 2.0, channels).astype("float32")
        state["bias"] = rng.normal(size=channels).astype("float32")
    wrap = _FakeTorchTensor if tensors else np.asarray
    return {prefix + key: wrap(value) for key, value in state.items()}


def _torch_eval_nchw(x, state, eps, prefix=""):
    """torch.nn.functional.batch_norm(training=False) in NumPy, channels at axis 1."""

    def get(key, default):
        value = state.get(prefix + key)
        if value is None:
            return default
        value = value.numpy() if hasattr(value, "numpy") else value
        return _np(value).reshape(1, -1, 1, 1)

    mean, var = get("running_mean", None), get("running_var", None)
    return (x - mean) / np.sqrt(var + eps) * get("weight", 1.0) + get("bias", 0.0)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("layer_class", [BatchNormalization, StockBN], ids=["ours", "stock"])
def test_load_torch_batch_norm_matches_torch_eval(affine, layout, layer_class):
    rng = _rng(40)
    state = _torch_state(rng, 5, affine=affine, prefix="features.1.")
    state["features.0.weight"] = _FakeTorchTensor(np.ones((5, 3, 3, 3)))  # ignored
    x = rng.normal(1.0, 4.0, size=(2, 5, 4, 3))
    expected = _torch_eval_nchw(x, state, 1e-5, prefix="features.1.")

    kwargs = torch_batch_norm_kwargs(
        momentum=0.1, eps=1e-5, affine=affine, channels_first=layout == "channels_first"
    )
    if layer_class is StockBN:
        kwargs.pop("unbiased_moving_variance")
    if layer_class is StockBN and not affine:
        kwargs.update(center=True, scale=True)  # loads the identity into gamma/beta
    layer = layer_class(**kwargs)
    inputs = x if layout == "channels_first" else np.moveaxis(x, 1, -1)
    layer.build(inputs.shape)
    assert load_torch_batch_norm(layer, state, prefix="features.1.", eps=1e-5) is layer
    outputs = _np(layer(inputs.astype("float32"), training=False))
    if layout == "channels_last":
        outputs = np.moveaxis(outputs, -1, 1)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


def test_torch_kwargs_reproduce_torch_training_update():
    """Momentum 1 - m and the unbiased running variance, as torch updates them."""
    rng = _rng(41)
    state = _torch_state(rng, 3, tensors=False)
    layer = BatchNormalization(**torch_batch_norm_kwargs(momentum=0.3, eps=1e-5))
    layer.build((None, 3, 4))
    load_torch_batch_norm(layer, state)
    x = rng.normal(4.0, 2.0, size=(6, 3, 4))
    layer(x.astype("float32"), training=True)
    batch_mean = x.mean(axis=(0, 2))
    batch_var = x.var(axis=(0, 2), ddof=1)  # torch: unbiased
    expected_mean = 0.7 * state["running_mean"] + 0.3 * batch_mean
    expected_var = 0.7 * state["running_var"] + 0.3 * batch_var
    _assert_stats(layer, expected_mean, expected_var)


def test_load_torch_batch_norm_num_batches_tracked_into_cumulative_layer():
    layer = BatchNormalization(**torch_batch_norm_kwargs(momentum=None))
    layer.build((None, 4, 2, 2))
    load_torch_batch_norm(layer, _torch_state(_rng(42), 4))
    assert int(_np(layer.num_batches_tracked)) == 17


def test_torch_batch_norm_kwargs_mapping():
    assert torch_batch_norm_kwargs() == {
        "axis": 1,
        "momentum": pytest.approx(0.9),
        "epsilon": 1e-5,
        "center": True,
        "scale": True,
        "unbiased_moving_variance": True,
    }
    assert torch_batch_norm_kwargs(momentum=None, affine=False, channels_first=False) == {
        "axis": -1,
        "momentum": None,
        "epsilon": 1e-5,
        "center": False,
        "scale": False,
        "unbiased_moving_variance": True,
    }
    with pytest.raises(ValueError, match="track_running_stats=False"):
        torch_batch_norm_kwargs(track_running_stats=False)
    with pytest.raises(ValueError, match="momentum=1.5"):
        torch_batch_norm_kwargs(momentum=1.5)


def test_load_torch_batch_norm_errors():
    rng = _rng(43)
    layer = BatchNormalization(axis=1, epsilon=1e-5)
    with pytest.raises(ValueError, match="built layer"):
        load_torch_batch_norm(layer, _torch_state(rng, 4))
    layer.build((None, 4, 3))
    with pytest.raises(ValueError, match="missing"):
        load_torch_batch_norm(layer, _torch_state(rng, 4), prefix="bn1.")
    with pytest.raises(ValueError, match="expects 4 channels"):
        load_torch_batch_norm(layer, _torch_state(rng, 5))
    with pytest.raises(ValueError, match="epsilon=0.001"):
        load_torch_batch_norm(layer, _torch_state(rng, 4), eps=1e-3)
    bad = _torch_state(rng, 4, tensors=False)
    bad["running_var"][0] = -1.0
    with pytest.raises(ValueError, match="negative or non-finite"):
        load_torch_batch_norm(layer, bad)
    no_scale = BatchNormalization(axis=1, scale=False)
    no_scale.build((None, 4, 3))
    with pytest.raises(ValueError, match="scale=True"):
        load_torch_batch_norm(no_scale, _torch_state(rng, 4))
    # A failed load changes nothing.
    np.testing.assert_array_equal(_np(no_scale.moving_mean), 0.0)


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


def test_training_utilities_on_jax_backend(run_python):
    result = run_python(["-c", _JAX_SCRIPT], env={"KERAS_BACKEND": "jax"})
    assert result.stdout.strip().endswith("ok")

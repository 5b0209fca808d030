"""keras_bn.monitor.BatchNormMonitor: drift and non-finite moving statistics during fit,
against an independent record of the statistics."""

import warnings

import keras
import numpy as np
import pytest
from support.checks import moving_statistics, spread_features

from keras_bn.layers import BatchNormalization
from keras_bn.monitor import BatchNormMonitor

StockBN = keras.layers.BatchNormalization


class _Snapshots(keras.callbacks.Callback):
    """Independent record of the moving statistics (runs before the monitor)."""

    def __init__(self, layers):
        super().__init__()
        self.layers, self.values = layers, []

    def _take(self):
        self.values.append([moving_statistics(layer) for layer in self.layers])

    def on_train_begin(self, logs=None):
        self._take()

    def on_epoch_end(self, epoch, logs=None):
        self._take()


def test_monitor_logs_drift_per_epoch_in_history():
    rng = np.random.default_rng(20)
    x = spread_features(rng, 96, 6)
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
    x = spread_features(np.random.default_rng(21), 64, 3)
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
    x = spread_features(np.random.default_rng(22), 32, 3)
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

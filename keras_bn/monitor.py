"""A Keras callback that watches BatchNormalization moving statistics during ``fit``."""

from __future__ import annotations

import warnings

import keras
import numpy as np

from keras_bn._batch_norm_state import batch_norm_layers, to_numpy, unique_names

__all__ = ["BatchNormMonitor"]


class BatchNormMonitor(keras.callbacks.Callback):
    """Watches BatchNormalization moving statistics during ``fit``.

    At the end of every epoch, for each BN layer of the model (nested ones too),
    compares ``moving_mean``/``moving_variance`` with their values at the end of
    the previous epoch (the start of training for the first epoch) and writes into
    the epoch's ``logs``, so that they appear in the ``History`` and the progress
    bar:

    - ``{prefix}mean_drift``: the largest mean shift in units of the previous
      standard deviation, ``max |mean_new - mean_old| / sqrt(var_old + epsilon)``
      over channels and layers (scale-free, well defined when the mean is 0);
    - ``{prefix}variance_drift``: the largest relative variance change,
      ``max |var_new - var_old| / (var_old + epsilon)``;
    - ``{prefix}nonfinite``: how many BN layers have a NaN/Inf moving statistic or
      a negative moving variance (the drifts are NaN then).

    With ``per_layer=True`` the same three values are also logged per layer as
    ``{prefix}{layer_name}/mean_drift`` etc. ``monitor.history`` keeps every
    epoch's per-layer values as a list of ``{layer_name: {...}}`` dicts.

    Args:
        stop_on_nonfinite: stop training (``model.stop_training = True``) as soon
            as a moving statistic is NaN/Inf or a moving variance is negative. A
            warning names the layers either way.
        check_every_batch: also check for non-finite statistics after every
            training batch (one device-to-host copy of the statistics per batch),
            so that training stops at the first bad batch rather than at the end
            of the epoch.
        per_layer: also log per-layer values.
        prefix: prefix of the log keys.

    Example:

    >>> monitor = BatchNormMonitor(stop_on_nonfinite=True)
    >>> history = model.fit(x, y, epochs=3, callbacks=[monitor])  # doctest: +SKIP
    >>> history.history["bn_mean_drift"]  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        stop_on_nonfinite=False,
        check_every_batch=False,
        per_layer=False,
        prefix="bn_",
    ):
        super().__init__()
        self.stop_on_nonfinite = bool(stop_on_nonfinite)
        self.check_every_batch = bool(check_every_batch)
        self.per_layer = bool(per_layer)
        self.prefix = str(prefix)
        self.history: list[dict[str, dict[str, float]]] = []
        self.nonfinite_layers: list[str] = []
        self._layers: list = []
        self._names: list[str] = []
        self._previous: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._epoch = 0

    def _statistics(self, layer):
        return (
            to_numpy(layer.moving_mean).astype(np.float64),
            to_numpy(layer.moving_variance).astype(np.float64),
        )

    def on_train_begin(self, logs=None):
        self._layers = batch_norm_layers(self.model)
        self._names = unique_names(self._layers)
        self._previous = {
            id(layer): self._statistics(layer)
            for layer in self._layers
            if layer.moving_mean is not None
        }
        self.nonfinite_layers = []

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _bad_layers(self) -> list[str]:
        bad = []
        for layer, name in zip(self._layers, self._names, strict=True):
            if layer.moving_mean is None:
                continue
            mean, variance = self._statistics(layer)
            if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(variance))):
                bad.append(name)
            elif np.any(variance < 0):
                bad.append(name)
        return bad

    def _handle_bad(self, bad, where) -> None:
        if not bad:
            return
        new = [name for name in bad if name not in self.nonfinite_layers]
        self.nonfinite_layers.extend(new)
        if new:
            warnings.warn(
                f"BatchNormMonitor: non-finite or negative moving statistics in {new} "
                f"({where})." + (" Stopping training." if self.stop_on_nonfinite else ""),
                stacklevel=2,
            )
        if self.stop_on_nonfinite:
            self.model.stop_training = True

    def on_train_batch_end(self, batch, logs=None):
        if self.check_every_batch:
            self._handle_bad(self._bad_layers(), f"epoch {self._epoch}, batch {batch}")

    def on_epoch_end(self, epoch, logs=None):
        record = {}
        for layer, name in zip(self._layers, self._names, strict=True):
            if layer.moving_mean is None:
                continue
            mean, variance = self._statistics(layer)
            previous = self._previous.get(id(layer))
            self._previous[id(layer)] = (mean, variance)
            nonfinite = not (np.all(np.isfinite(mean)) and np.all(np.isfinite(variance))) or bool(
                np.any(variance < 0)
            )
            if previous is None:
                continue  # built during this epoch: no baseline yet
            old_mean, old_variance = previous
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                mean_drift = np.max(np.abs(mean - old_mean) / np.sqrt(old_variance + layer.epsilon))
                variance_drift = np.max(
                    np.abs(variance - old_variance) / (old_variance + layer.epsilon)
                )
            if nonfinite:
                mean_drift = variance_drift = float("nan")
            record[name] = {
                "mean_drift": float(mean_drift),
                "variance_drift": float(variance_drift),
                "nonfinite": float(nonfinite),
            }
        self.history.append(record)
        self._handle_bad([name for name, r in record.items() if r["nonfinite"]], f"epoch {epoch}")
        if logs is None or not record:
            return
        values = list(record.values())
        logs[f"{self.prefix}mean_drift"] = _nan_max(v["mean_drift"] for v in values)
        logs[f"{self.prefix}variance_drift"] = _nan_max(v["variance_drift"] for v in values)
        logs[f"{self.prefix}nonfinite"] = float(sum(v["nonfinite"] for v in values))
        if self.per_layer:
            for name, values_of_layer in record.items():
                for key, value in values_of_layer.items():
                    logs[f"{self.prefix}{name}/{key}"] = value


def _nan_max(values) -> float:
    """The maximum, NaN if any value is NaN (a NaN drift must show)."""
    values = list(values)
    return float(np.max(values)) if values else float("nan")

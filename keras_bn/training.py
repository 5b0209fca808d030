"""Training-side utilities for batch normalization.

- :func:`recalibrate_batch_norm` recomputes the moving statistics of every
  BatchNormalization layer of a model as exact population statistics over a
  dataset ("precise BN"), for use after SWA, pruning or fine-tuning.
- :class:`BatchNormMonitor` is a Keras callback that watches the moving statistics
  during ``fit``: drift per epoch, NaN/Inf, recorded in the training logs.
- :func:`replace_batch_norm` clones a model with every stock
  ``keras.layers.BatchNormalization`` swapped for ``keras_bn.BatchNormalization``,
  keeping the weights.
- :func:`load_torch_batch_norm` loads a PyTorch BatchNorm ``state_dict`` into a
  Keras BatchNormalization layer; :func:`torch_batch_norm_kwargs` translates
  PyTorch's hyperparameters into Keras layer arguments.

The statistics maths (:class:`RunningMoments`) is plain NumPy; everything else is
thin Keras plumbing around it. Every BatchNormalization layer is found by
``isinstance(layer, keras.layers.BatchNormalization)``, so the stock layer, ours
and other subclasses are all handled, inside nested models and custom layers too.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import keras
import numpy as np
from keras import tree

from keras_bn.layers import BatchNormalization

__all__ = [
    "RunningMoments",
    "recalibrate_batch_norm",
    "BatchNormMonitor",
    "replace_batch_norm",
    "load_torch_batch_norm",
    "torch_batch_norm_kwargs",
]

# Options of keras_bn.BatchNormalization, read with getattr so that these utilities
# work on the stock layer (which has neither) and on other subclasses alike.
_UNBIASED_ATTRIBUTE = "unbiased_moving_variance"
_COUNT_VARIABLE = "num_batches_tracked"  # exists with momentum=None


# --------------------------------------------------------------------------- maths


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


# ---------------------------------------------------------------- keras plumbing


def _batch_norm_layers(model) -> list:
    """Every BatchNormalization layer inside ``model`` (nested ones too), once each.

    Uses ``Layer._flatten_layers``, Keras's own recursive walk over tracked
    sublayers. With the ``Functional`` class in :func:`_is_cloneable`, the only
    Keras internals this module touches (``keras_bn`` must not import the
    converter's graph module).
    """
    return [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def _unique_names(layers) -> list[str]:
    names, seen = [], {}
    for layer in layers:
        name = layer.name
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name] - 1}")
    return names


def _is_unbiased(layer) -> bool:
    return bool(getattr(layer, _UNBIASED_ATTRIBUTE, False))


def _count_variable(layer):
    """Our layer's batch-count variable (``momentum=None``), or None."""
    variable = getattr(layer, _COUNT_VARIABLE, None)
    return variable if isinstance(variable, keras.Variable) else None


def _to_numpy(value) -> np.ndarray:
    """A Keras/backend tensor, NumPy array or torch tensor as a NumPy array."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
        return np.asarray(value.detach().cpu().numpy())
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, keras.Variable):
        return np.asarray(value.numpy())  # convert_to_numpy(variable) warns on TF
    return np.asarray(keras.ops.convert_to_numpy(value))


def _feature_axes(layer, rank: int) -> list[int]:
    axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
    return sorted(int(axis) % rank for axis in axes)


def _batch_moments(layer, inputs, mask):
    """(count, mean, m2) of one call's input, per channel, shaped like moving_mean."""
    values = _to_numpy(inputs).astype(np.float64)
    rank = values.ndim
    axes = _feature_axes(layer, rank)
    feature_shape = tuple(values.shape[axis] for axis in axes)
    weights = None
    if mask is not None:
        weights = _to_numpy(mask).astype(np.float64)
        if weights.ndim == rank - len(axes):  # mask over the non-feature axes
            for axis in axes:
                weights = np.expand_dims(weights, axis)
        weights = np.broadcast_to(weights, values.shape)
        weights = np.moveaxis(weights, axes, range(rank - len(axes), rank))
        weights = weights.reshape((-1, *feature_shape))
    values = np.moveaxis(values, axes, range(rank - len(axes), rank))
    values = values.reshape((-1, *feature_shape))
    moments = RunningMoments(feature_shape)
    moments.update(values, weights)
    shape = tuple(layer.moving_mean.shape)
    return (
        moments.count.reshape(shape),
        moments.mean.reshape(shape),
        moments.m2.reshape(shape),
    )


def _assign(variable, value) -> None:
    variable.assign(np.asarray(value).astype(variable.dtype).reshape(variable.shape))


# ------------------------------------------------------------------------- data


def _x_of(element):
    """The model input of one dataset element: Keras's ``(x, y, sample_weight)``."""
    x, _, _ = keras.utils.unpack_x_y_sample_weight(element)
    return x


def _is_array_like(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "__array__")


def _is_in_memory(data) -> bool:
    """NumPy-like arrays, or a list/dict of them (the model input ``x``)."""
    if _is_array_like(data):
        return True
    if isinstance(data, list | dict) and data:
        return all(_is_array_like(value) for value in tree.flatten(data))
    return False


class _Batches:
    """Re-iterable batches of model inputs ``x`` from any supported ``data``."""

    def __init__(self, data, batch_size: int, steps: int | None):
        self.steps = steps
        self._cached = None
        if isinstance(data, tuple) and data and _is_in_memory(data[0]):
            data = data[0]  # (x,), (x, y) or (x, y, sample_weight) arrays
        if _is_in_memory(data):
            sizes = {len(value) for value in tree.flatten(data)}
            if len(sizes) != 1:
                raise ValueError(
                    "recalibrate_batch_norm needs input arrays with one common number "
                    f"of samples. Received arrays with lengths {sorted(sizes)}."
                )
            self._arrays, self._size = data, sizes.pop()
            self._batch_size = int(batch_size)
            self._kind = "arrays"
        elif isinstance(data, keras.utils.PyDataset):
            self._dataset, self._kind = data, "pydataset"
        elif hasattr(data, "as_numpy_iterator"):  # tf.data.Dataset
            self._dataset, self._kind = data, "tf.data"
        elif isinstance(data, Iterable):
            self._kind = "iterator" if iter(data) is data else "iterable"
            self._dataset = data
        else:
            raise ValueError(
                "recalibrate_batch_norm expects data as a NumPy array (or a list/dict "
                "of arrays), a tuple (x, y), a tf.data.Dataset, a keras.utils.PyDataset "
                f"or an iterable of batches. Received: data of type {type(data).__name__}"
            )

    @property
    def reiterable(self) -> bool:
        return self._kind != "iterator" or self._cached is not None

    def cache(self) -> None:
        """Keeps the batches of a one-shot iterator so that they can be replayed."""
        if not self.reiterable:
            self._cached = list(self._raw())

    def __iter__(self) -> Iterator:
        if self._cached is not None:
            return iter(self._cached)
        return self._raw()

    def _raw(self) -> Iterator:
        steps = self.steps
        if self._kind == "arrays":
            count = math.ceil(self._size / self._batch_size)
            for index in range(count if steps is None else min(count, steps)):
                rows = slice(index * self._batch_size, (index + 1) * self._batch_size)
                yield tree.map_structure(lambda a, rows=rows: np.asarray(a[rows]), self._arrays)
            return
        if self._kind == "pydataset":
            count = self._dataset.num_batches
            if count is None and steps is None:
                raise ValueError(
                    "recalibrate_batch_norm received an infinite keras.utils.PyDataset "
                    "(num_batches=None) and steps=None. Pass steps=N to use N batches."
                )
            if steps is not None:
                count = steps if count is None else min(count, steps)
            for index in range(count):
                yield _x_of(self._dataset[index])
            return
        if self._kind == "tf.data":
            source = self._dataset.as_numpy_iterator()
        else:
            source = iter(self._dataset)
        for index, element in enumerate(source):
            if steps is not None and index >= steps:
                break
            yield _x_of(element)


# ----------------------------------------------------------------- recalibration


class _StopForward(Exception):
    """Raised inside a forward pass once the statistics it was run for are in."""


def recalibrate_batch_norm(
    model,
    data,
    *,
    steps=None,
    batch_size=32,
    mode="inference",
    verbose=False,
):
    """Recomputes every BatchNormalization layer's moving statistics exactly.

    "Precise BN" (fvcore's ``update_bn_stats``, PyTorch's ``swa_utils.update_bn``):
    after SWA, pruning, weight surgery or a fine-tune whose moving averages lag the
    weights, replace each BN layer's exponential moving averages by the population
    statistics of its input over ``data``.

    What "exact" means here: for each BN layer, ``moving_mean`` and
    ``moving_variance`` become the mean and variance of *all* the values its input
    takes over the whole dataset, per channel (over the batch and every
    non-``axis`` dimension, at unmasked positions when a Keras mask reaches the
    layer). They are accumulated in float64 with Chan's parallel merge (the law of
    total variance), so they equal the statistics of the concatenated dataset for
    any batching, an unequal last batch included - not fvcore/PyTorch's average of
    per-batch variances, which omits the spread of the batch means. The variance is
    the population (biased) one, or ``n / (n - 1)`` times it for our layer created
    with ``unbiased_moving_variance=True``, ``n`` being the number of values per
    channel over the dataset (with ``n = 1`` that variance is undefined and the
    channel keeps its moving variance; a channel that received no value, e.g.
    masked everywhere, keeps both statistics).

    In which mode the inputs are computed (``mode``):

    - ``"inference"`` (default): sequential recalibration. The layers are
      recalibrated one at a time in the order the model calls them; the model runs
      in inference mode (``training=False``: Dropout off, every BN normalizing with
      its moving statistics), and every BN layer upstream of the one being measured
      already holds its recalibrated statistics. This is the statistic inference
      actually uses: afterwards, running the model in inference mode over ``data``,
      every BN layer's input has mean ``moving_mean`` and variance
      ``moving_variance`` exactly - the property BN's inference formula (and
      folding BN into neighbouring layers) assumes. Noise from Dropout and from
      batch statistics never enters. Cost: one partial pass over ``data`` per BN
      layer (each pass stops right after the measured layer), so roughly
      ``number_of_bn_layers / 2`` full forward passes. A shared BN layer is
      measured over all its calls; where a later call sits downstream of a BN
      layer not yet recalibrated, that layer still uses its old statistics.
    - ``"training"``: one pass in training mode, as fvcore and PyTorch do: every BN
      layer normalizes with the batch statistics (so an upstream BN's output, hence
      a downstream BN's input, depends on the batch composition) and Dropout is
      active. Much cheaper on deep models; the statistics are those of the
      training-mode activations the layers were trained with. The variables the
      forward pass would change (moving statistics, renorm statistics, random seed
      state) are restored before the new statistics are written.

    Every BN layer is recalibrated, frozen ones (``trainable=False``,
    ``freeze_statistics=True``) included. The model is called eagerly (layer by
    layer, no compilation), which costs a fixed overhead per call: in
    ``"inference"`` mode the statistics do not depend on the batching, so use the
    largest ``batch_size`` memory allows; in ``"training"`` mode the batch size is
    part of the definition (upstream batch statistics), so use the training one. A
    BN layer that never receives data keeps its statistics (a warning names it). With ``renorm=True`` the layer's ``moving_stddev`` is set to
    ``sqrt(moving_variance + epsilon)`` to stay consistent; for our layer with
    ``momentum=None`` the batch count becomes the number of batches used. On any
    error, every BN layer is left as it was.

    Args:
        model: a built Keras model or layer (Sequential, Functional or subclassed;
            BN layers inside nested models and custom layers are found too).
        data: the inputs, one of: a NumPy array (or a list/dict of arrays for a
            multi-input model), a tuple ``(x,)``, ``(x, y)`` or
            ``(x, y, sample_weight)`` of those (``y`` is ignored), a
            ``tf.data.Dataset``, a ``keras.utils.PyDataset``, or any iterable of
            batches (each an ``x`` or an ``(x, y[, sample_weight])`` tuple, Keras's
            convention). In ``"inference"`` mode the data is iterated once per BN
            layer: re-iterable sources must yield the same batches each time
            (turn off shuffling and random augmentation); a one-shot iterator
            (e.g. a generator) is consumed once and its batches kept in memory.
        steps: use only the first ``steps`` batches (required for infinite data).
        batch_size: batch size for array ``data`` (ignored otherwise).
        mode: ``"inference"`` (default) or ``"training"``, see above.
        verbose: print one line per recalibrated layer.

    Returns:
        A dict mapping each BN layer's name to the number of values per channel its
        statistics were computed from (0 for a layer that received no data).

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4),
    ...                           keras.layers.BatchNormalization()])
    >>> x = np.random.default_rng(0).normal(size=(100, 8)).astype("float32")
    >>> counts = recalibrate_batch_norm(model, x, batch_size=32)  # doctest: +SKIP
    """
    if mode not in ("inference", "training"):
        raise ValueError(
            "Invalid mode for recalibrate_batch_norm: expected 'inference' or "
            f"'training'. Received: mode={mode!r}"
        )
    if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 1):
        raise ValueError(
            "Invalid steps for recalibrate_batch_norm: expected a positive integer or "
            f"None (all batches). Received: steps={steps!r}"
        )
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(
            "Invalid batch_size for recalibrate_batch_norm: expected a positive "
            f"integer. Received: batch_size={batch_size!r}"
        )
    layers = _batch_norm_layers(model)
    names = dict(zip(map(id, layers), _unique_names(layers), strict=True))
    if not layers:
        return {}
    unbuilt = [layer.name for layer in layers if layer.moving_mean is None]
    if unbuilt:
        raise ValueError(
            "recalibrate_batch_norm needs a built model: BatchNormalization layers "
            f"{unbuilt} have no weights yet. Call the model on a batch (or build it) "
            "first."
        )
    batches = _Batches(data, batch_size, steps)
    saved = {id(layer): [_to_numpy(v).copy() for v in layer.variables] for layer in layers}
    try:
        if mode == "training":
            moments, batch_counts = _measure_training_mode(model, layers, batches)
        else:
            moments, batch_counts = _measure_inference_mode(model, layers, batches, names, verbose)
        for layer in layers:
            _write_statistics(layer, moments.get(id(layer)), batch_counts.get(id(layer), 0))
    except BaseException:
        for layer in layers:
            for variable, value in zip(layer.variables, saved[id(layer)], strict=True):
                variable.assign(value)
        raise
    result = {}
    for layer in layers:
        measured = moments.get(id(layer))
        count = int(measured.count.max()) if measured is not None else 0
        result[names[id(layer)]] = count
        if verbose and mode == "training":
            print(f"recalibrated {names[id(layer)]}: {count} values per channel")
    missing = [name for name, count in result.items() if count == 0]
    if missing:
        warnings.warn(
            f"recalibrate_batch_norm: BatchNormalization layers {missing} received no "
            "data; their moving statistics were left unchanged.",
            stacklevel=2,
        )
    return result


class _CallPatch:
    """Temporarily routes each BN layer's ``call`` through ``hook(layer, ...)``."""

    def __init__(self, layers, hook):
        self.layers, self.hook = layers, hook

    def __enter__(self):
        for layer in self.layers:
            original = layer.call

            def call(inputs, training=None, mask=None, _layer=layer, _original=original):
                return self.hook(_layer, _original, inputs, training, mask)

            layer.call = call
        return self

    def __exit__(self, *exc_info):
        for layer in self.layers:
            if "call" in vars(layer):
                del layer.call
        return False


def _run(model, x, training):
    try:
        model(x, training=training)
    except _StopForward:
        pass


def _measure_training_mode(model, layers, batches):
    moments = {id(layer): RunningMoments(layer.moving_mean.shape) for layer in layers}
    batch_counts = {id(layer): 0 for layer in layers}
    state = [(v, _to_numpy(v).copy()) for v in model.non_trainable_variables]

    def hook(layer, original, inputs, training, mask):
        moments[id(layer)].merge(*_batch_moments(layer, inputs, mask))
        batch_counts[id(layer)] += 1
        return original(inputs, training=training, mask=mask)

    try:
        with _CallPatch(layers, hook):
            for x in batches:
                _run(model, x, training=True)
    finally:
        for variable, value in state:
            variable.assign(value)
    return (
        {key: value for key, value in moments.items() if value.count.max() > 0},
        batch_counts,
    )


def _measure_inference_mode(model, layers, batches, names, verbose):
    """One pass per layer, in call order, upstream layers already recalibrated."""
    batches.cache()
    order, calls_per_forward = [], {}

    def discover(layer, original, inputs, training, mask):
        if id(layer) not in calls_per_forward:
            order.append(layer)
            calls_per_forward[id(layer)] = 0
        calls_per_forward[id(layer)] += 1
        return original(inputs, training=False, mask=mask)

    first = next(iter(batches), None)
    if first is None:
        return {}, {}
    with _CallPatch(layers, discover):
        _run(model, first, training=False)

    moments, batch_counts = {}, {}
    for target in order:
        measured, batch_count = _measure_layer(
            model, layers, batches, target, calls_per_forward[id(target)]
        )
        if measured.count.max() > 0:
            moments[id(target)] = measured
            batch_counts[id(target)] = batch_count
            _write_statistics(target, measured, batch_count)
        if verbose:
            print(
                f"recalibrated {names[id(target)]}: {int(measured.count.max())} values per channel"
            )
    return moments, batch_counts


def _measure_layer(model, layers, batches, target, calls_per_forward):
    """The moments of ``target``'s input over ``batches``, in inference mode.

    Each forward pass stops once ``target`` has seen all its calls for the batch.
    """
    measured = RunningMoments(target.moving_mean.shape)
    state = {"calls": 0, "batches": 0}

    def hook(layer, original, inputs, training, mask):
        if layer is target:
            measured.merge(*_batch_moments(layer, inputs, mask))
            state["calls"] += 1
            if state["calls"] % calls_per_forward == 0:
                state["batches"] += 1
                raise _StopForward
        return original(inputs, training=False, mask=mask)

    with _CallPatch(layers, hook):
        for x in batches:
            _run(model, x, training=False)
    return measured, state["batches"]


def _write_statistics(layer, moments, batch_count) -> None:
    if moments is None:
        return
    unbiased = _is_unbiased(layer)
    # Channels that saw no value (all masked) keep their statistics, and so does
    # an unbiased variance from a single value (undefined), as our layer does.
    mean = np.where(moments.count > 0, moments.mean, _to_numpy(layer.moving_mean))
    variance = np.where(
        moments.count > (1 if unbiased else 0),
        moments.variance(unbiased=unbiased),
        _to_numpy(layer.moving_variance),
    )
    _assign(layer.moving_mean, mean)
    _assign(layer.moving_variance, variance)
    if getattr(layer, "renorm", False) and getattr(layer, "moving_stddev", None) is not None:
        _assign(layer.moving_stddev, np.sqrt(variance + layer.epsilon))
    count = _count_variable(layer)
    if count is not None:
        _assign(count, batch_count)


# ---------------------------------------------------------------------- monitor


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
            _to_numpy(layer.moving_mean).astype(np.float64),
            _to_numpy(layer.moving_variance).astype(np.float64),
        )

    def on_train_begin(self, logs=None):
        self._layers = _batch_norm_layers(self.model)
        self._names = _unique_names(self._layers)
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


# -------------------------------------------------------------------- replacement


def replace_batch_norm(model, **layer_kwargs):
    """Clones a model with every BatchNormalization layer as ours, weights kept.

    Returns a copy of a Sequential or Functional ``model`` (nested Sequential and
    Functional models included, shared layers stay shared) in which every stock
    ``keras.layers.BatchNormalization`` - and every ``keras_bn.BatchNormalization``,
    so that options can be changed - is a ``keras_bn.BatchNormalization`` built
    from the same config updated with ``layer_kwargs``, holding the same gamma,
    beta and moving statistics. Every other layer is a fresh copy of the original
    (same config, same weights, same ``trainable`` flag). The original model is not
    modified and shares no variable with the copy. Other BN subclasses are copied
    unchanged. The copy is not compiled.

    Without overrides the copy's inference outputs equal the original's. Options
    that our layer adds start from their initial state: with ``momentum=None`` the
    batch count starts at 0 (the first training batch then replaces the moving
    statistics); enabling ``renorm`` initializes its moving standard deviations from
    the moving variance.

    Args:
        model: a Sequential or Functional Keras model.
        **layer_kwargs: arguments of ``keras_bn.BatchNormalization`` overriding the
            copied configs, e.g. ``momentum=None`` or ``epsilon=1e-5``.

    Returns:
        The new model.

    Example:

    >>> ours = replace_batch_norm(model, momentum=None)  # doctest: +SKIP
    """
    if "name" in layer_kwargs:
        raise ValueError(
            "replace_batch_norm keeps each layer's name; it cannot be overridden for "
            f"every layer at once. Received: name={layer_kwargs['name']!r}"
        )
    if not _is_cloneable(model):
        raise ValueError(
            "replace_batch_norm supports Sequential and Functional models. Received: "
            f"a model of type {type(model).__name__}. For a subclassed model, build its "
            "layers with keras_bn.BatchNormalization instead."
        )
    BatchNormalization(**layer_kwargs)  # reject bad overrides before cloning
    cache: dict[int, Any] = {}
    pairs: list[tuple[Any, Any]] = []

    def clone_function(layer):
        if id(layer) in cache:
            return cache[id(layer)]
        if isinstance(layer, keras.Model) and _is_cloneable(layer):
            new = keras.models.clone_model(layer, clone_function=clone_function)
        elif isinstance(layer, keras.Model) and _batch_norm_layers(layer):
            raise ValueError(
                "replace_batch_norm cannot look inside the nested subclassed model "
                f"{layer.name!r} ({type(layer).__name__}), which contains "
                "BatchNormalization layers. Rebuild it with keras_bn.BatchNormalization."
            )
        elif type(layer) is keras.layers.BatchNormalization or type(layer) is BatchNormalization:
            config = {**layer.get_config(), **layer_kwargs}
            new = BatchNormalization.from_config(config)
        else:
            new = layer.__class__.from_config(layer.get_config())
        cache[id(layer)] = new
        pairs.append((layer, new))
        return new

    new_model = keras.models.clone_model(model, clone_function=clone_function)
    cache[id(model)] = new_model
    for old, new in pairs:
        if isinstance(old, keras.Layer) and not isinstance(old, keras.Model):
            _copy_weights(old, new)
    _copy_trainable(model, new_model, cache)
    return new_model


def _is_cloneable(model) -> bool:
    """A Sequential or Functional model (what ``keras.models.clone_model`` rebuilds).

    ``keras.Model(inputs, outputs)`` returns an instance of Keras's private
    ``Functional`` class (subclasses included); no public name tells it apart
    from a subclassed model.
    """
    from keras.src.models.functional import Functional

    return isinstance(model, keras.Sequential | Functional)


def _copy_weights(old, new) -> None:
    if not old.weights:
        return
    if isinstance(old, keras.layers.BatchNormalization):
        _copy_batch_norm_weights(old, new)
        return
    if len(old.weights) != len(new.weights):
        raise ValueError(
            f"replace_batch_norm could not copy the weights of layer {old.name!r}: the "
            f"copy has {len(new.weights)} weights, the original {len(old.weights)}."
        )
    for source, target in zip(old.weights, new.weights, strict=True):
        target.assign(source)


def _copy_batch_norm_weights(old, new) -> None:
    """Copies BN weights by name; fails if a non-identity weight would be dropped."""
    old_weights = {variable.name: variable for variable in old.weights}
    new_weights = {variable.name: variable for variable in new.weights}
    for name, variable in old_weights.items():
        if name in new_weights:
            new_weights[name].assign(variable)
            continue
        value = _to_numpy(variable)
        identity = {"gamma": 1.0, "beta": 0.0}.get(name)
        if identity is None or not np.all(value == identity):
            raise ValueError(
                f"replace_batch_norm would drop the weight {name!r} of layer "
                f"{old.name!r}, whose values are not the identity. Keep "
                "center=True/scale=True (or fold that weight elsewhere first)."
            )
    if getattr(new, "renorm", False) and not getattr(old, "renorm", False):
        stddev = np.sqrt(_to_numpy(old.moving_variance) + new.epsilon)
        _assign(new.moving_stddev, stddev)
        _assign(new.renorm_mean, _to_numpy(old.moving_mean))
        _assign(new.renorm_stddev, stddev)


def _copy_trainable(old, new, cache) -> None:
    """Sets ``trainable`` like the original's, outer models first (it propagates)."""
    new.trainable = old.trainable
    if isinstance(old, keras.Model):
        for layer in old.layers:
            if id(layer) in cache:
                _copy_trainable(layer, cache[id(layer)], cache)


# ------------------------------------------------------------------------ PyTorch


def torch_batch_norm_kwargs(
    momentum=0.1, eps=1e-5, affine=True, track_running_stats=True, *, channels_first=True
):
    """Keras BatchNormalization arguments equivalent to a PyTorch BatchNorm's.

    The correspondence (PyTorch -> Keras):

    ============================  =====================================
    ``momentum=m`` (default 0.1)  ``momentum=1 - m`` (default 0.9)
    ``momentum=None``             ``momentum=None`` (our layer only:
                                  cumulative moving average)
    ``eps`` (default 1e-5)        ``epsilon`` (Keras default is 1e-3)
    ``affine=False``              ``center=False, scale=False``
    channel dimension 1           ``axis=1``, or ``-1`` once the model is
                                  channels-last
    ============================  =====================================

    PyTorch updates ``running = (1 - m) * running + m * batch_stat``; Keras
    updates ``moving = momentum * moving + (1 - momentum) * batch_stat``. PyTorch
    keeps the *unbiased* running variance (Bessel's correction on each batch)
    while the stock Keras layer keeps the biased one; our layer's
    ``unbiased_moving_variance=True`` (returned here) matches PyTorch. Both normalize with the
    running variance directly at inference, so loaded statistics give the same
    inference outputs either way (see :func:`load_torch_batch_norm`).

    Args:
        momentum: PyTorch ``momentum`` (float in [0, 1] or None).
        eps: PyTorch ``eps``.
        affine: PyTorch ``affine``.
        track_running_stats: PyTorch ``track_running_stats``; must be True (a
            PyTorch BN without running statistics normalizes with batch statistics
            even in eval mode, which Keras cannot express).
        channels_first: whether the Keras model keeps PyTorch's channels-first
            layout (``axis=1``) or is channels-last (``axis=-1``).

    Returns:
        A dict of keyword arguments for ``keras_bn.BatchNormalization`` (drop
        ``unbiased_moving_variance`` for the stock layer, which cannot take
        ``momentum=None`` either).
    """
    if not track_running_stats:
        raise ValueError(
            "A PyTorch BatchNorm with track_running_stats=False uses batch statistics "
            "at inference too, which a Keras BatchNormalization cannot do. Received: "
            "track_running_stats=False. Train it with running statistics instead."
        )
    if momentum is not None and not (0.0 <= float(momentum) <= 1.0):
        raise ValueError(
            "Invalid PyTorch momentum: expected a float in [0, 1] or None. Received: "
            f"momentum={momentum!r}"
        )
    if not float(eps) > 0:
        raise ValueError(f"Invalid PyTorch eps: expected a float > 0. Received: eps={eps!r}")
    kwargs = {
        "axis": 1 if channels_first else -1,
        "momentum": None if momentum is None else 1.0 - float(momentum),
        "epsilon": float(eps),
        "center": bool(affine),
        "scale": bool(affine),
        "unbiased_moving_variance": True,
    }
    return kwargs


def load_torch_batch_norm(layer, state_dict, *, prefix="", eps=None):
    """Loads a PyTorch BatchNorm state into a built Keras BatchNormalization layer.

    Reads ``{prefix}weight``, ``{prefix}bias`` (absent for ``affine=False``),
    ``{prefix}running_mean``, ``{prefix}running_var`` and, optionally,
    ``{prefix}num_batches_tracked`` from ``state_dict`` (a mapping of NumPy arrays
    or torch tensors; other keys are ignored, so a whole model's ``state_dict()``
    with ``prefix="layer1.0.bn1."`` works). Torch is never imported: tensors are
    read with ``.detach().cpu().numpy()``.

    Mapping: ``gamma = weight``, ``beta = bias``, ``moving_mean = running_mean``,
    ``moving_variance = running_var``. PyTorch's eval mode computes
    ``(x - running_mean) / sqrt(running_var + eps) * weight + bias`` with the
    running variance as stored (unbiased), and Keras's inference mode computes the
    same with ``moving_variance``; so the running variance is loaded unchanged into
    both the stock layer and ours, whatever ``unbiased_moving_variance`` says, and
    the layer's inference output equals PyTorch's eval output provided
    ``layer.epsilon`` equals the PyTorch ``eps`` (pass ``eps=`` to have that
    checked). With ``unbiased_moving_variance=True`` (see
    :func:`torch_batch_norm_kwargs`), further training also updates the moving
    variance as PyTorch would. ``affine=False`` states load into a layer
    with ``center=False, scale=False``, or into one with gamma/beta, which are then
    set to 1/0. ``num_batches_tracked`` is loaded into our layer's batch count when
    it has one (``momentum=None``: PyTorch's cumulative average uses that count).

    Args:
        layer: a built ``keras.layers.BatchNormalization`` (ours or stock) whose
            moving statistics have the PyTorch channel count.
        state_dict: mapping of names to NumPy arrays or torch tensors.
        prefix: prefix of the keys, e.g. ``"bn1."``.
        eps: the PyTorch layer's ``eps``; if given, must equal ``layer.epsilon``.

    Returns:
        The layer.

    Example:

    >>> layer = keras_bn.BatchNormalization(**torch_batch_norm_kwargs(eps=1e-5))
    >>> layer.build((None, 16, 8, 8))  # doctest: +SKIP
    >>> load_torch_batch_norm(layer, torch_bn.state_dict())  # doctest: +SKIP
    """
    if not isinstance(layer, keras.layers.BatchNormalization):
        raise ValueError(
            "load_torch_batch_norm expects a keras.layers.BatchNormalization layer. "
            f"Received: layer of type {type(layer).__name__}"
        )
    if layer.moving_mean is None:
        raise ValueError(
            f"load_torch_batch_norm needs a built layer; {layer.name!r} has no weights "
            "yet. Call layer.build(input_shape) first, e.g. layer.build((None, C, H, W))."
        )
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            "load_torch_batch_norm expects a mapping of names to arrays/tensors (a "
            f"PyTorch state_dict). Received: {type(state_dict).__name__}"
        )
    if eps is not None and not math.isclose(float(eps), layer.epsilon, rel_tol=1e-6):
        raise ValueError(
            f"The PyTorch eps ({eps!r}) differs from the epsilon of layer {layer.name!r} "
            f"({layer.epsilon!r}), so inference outputs would differ. Create the layer "
            f"with epsilon={eps!r}."
        )
    missing = [
        f"{prefix}{key}"
        for key in ("running_mean", "running_var")
        if prefix + key not in state_dict
    ]
    if missing:
        available = sorted(key for key in state_dict if str(key).startswith(prefix))[:8]
        raise ValueError(
            f"load_torch_batch_norm: missing {missing} in the state dict. Keys with "
            f"prefix {prefix!r}: {available}. Pass the right prefix= (a PyTorch "
            "BatchNorm created with track_running_stats=False has no running statistics "
            "and cannot be loaded)."
        )
    shape = tuple(layer.moving_mean.shape)
    size = int(np.prod(shape))

    def read(key):
        value = _to_numpy(state_dict[prefix + key]).astype(np.float64)
        if value.size != size or value.ndim != 1 and value.shape != shape:
            raise ValueError(
                f"load_torch_batch_norm: {prefix + key} has shape {value.shape}; layer "
                f"{layer.name!r} expects {size} channels (moving_mean shape {shape}). "
                "Check the layer's axis and the state dict prefix."
            )
        return value.reshape(shape)

    running_mean, running_var = read("running_mean"), read("running_var")
    if np.any(running_var < 0) or not np.all(np.isfinite(running_var)):
        raise ValueError(
            f"load_torch_batch_norm: {prefix}running_var has negative or non-finite "
            "values; expected finite values >= 0. Check the checkpoint."
        )
    affine = {"gamma": "weight", "beta": "bias"}
    identity = {"gamma": 1.0, "beta": 0.0}
    values = {}
    for keras_name, torch_name in affine.items():
        present = prefix + torch_name in state_dict
        value = read(torch_name) if present else np.full(shape, identity[keras_name])
        variable = getattr(layer, keras_name, None)
        if variable is None:
            if present and not np.all(value == identity[keras_name]):
                option = "scale" if keras_name == "gamma" else "center"
                raise ValueError(
                    f"load_torch_batch_norm: {prefix + torch_name} is not the identity "
                    f"but layer {layer.name!r} has {option}=False. Create the layer with "
                    f"{option}=True."
                )
            continue
        values[keras_name] = value
    for keras_name, value in values.items():
        _assign(getattr(layer, keras_name), value)
    _assign(layer.moving_mean, running_mean)
    _assign(layer.moving_variance, running_var)
    if getattr(layer, "renorm", False) and getattr(layer, "moving_stddev", None) is not None:
        _assign(layer.moving_stddev, np.sqrt(running_var + layer.epsilon))
    count = _count_variable(layer)
    if count is not None and prefix + "num_batches_tracked" in state_dict:
        _assign(count, _to_numpy(state_dict[prefix + "num_batches_tracked"]))
    return layer

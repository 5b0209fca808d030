"""Recalibration ("precise BN"): exact moving statistics over a dataset.

:func:`recalibrate_batch_norm` recomputes the moving statistics of every
BatchNormalization layer of a model as exact population statistics over a dataset,
for use after SWA, pruning or fine-tuning. The statistics maths is
:class:`keras_bn.running_moments.RunningMoments`; this module reads the data,
routes each layer's inputs to it and writes the results; under a distribution
(``keras.distribution`` on JAX, ``tf.distribute`` on TensorFlow) each batch is
split over the replicas (:mod:`keras_bn._replicas`).

What "exact" means: for each BN layer, ``moving_mean`` and
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

Every BN layer is recalibrated, frozen ones (``trainable=False``,
``freeze_statistics=True``) included. The model is called eagerly (layer by
layer, no compilation), which costs a fixed overhead per call: in
``"inference"`` mode the statistics do not depend on the batching; larger batches
spend less on that overhead, but memory grows about in proportion, and past tensors
of a few tens of megabytes the allocator costs more than the overhead saves (on JAX
CPU, ResNet50 at 128 px took longer in batches of 64 than in batches of 8 to 32:
BENCHMARKS.md section 43). In ``"training"`` mode the batch size is part of the
definition (upstream batch statistics), so use the training one. A
BN layer that never receives data keeps its statistics (a warning names it).
With ``renorm=True`` the layer's ``moving_stddev`` is set to
``sqrt(moving_variance + epsilon)`` to stay consistent; for our layer with
``momentum=None`` the batch count becomes the number of batches used. On any
error, every BN layer is left as it was.

The two modes of :func:`recalibrate_batch_norm` (``mode``):

- ``"inference"`` (default): sequential recalibration. The layers are
  recalibrated one at a time in the order the model calls them; the model runs
  in inference mode (``training=False``: Dropout off, every BN normalizing with
  its moving statistics), and every BN layer upstream of the one being measured
  already holds its recalibrated statistics. This is the statistic inference
  actually uses: afterwards, running the model in inference mode over ``data``,
  every BN layer's input has mean ``moving_mean`` and variance
  ``moving_variance`` exactly - the property BN's inference formula (and
  folding BN into neighbouring layers) assumes. Noise from Dropout and from
  batch statistics never enters. Cost: for a Functional or Sequential model whose
  BN layers are each called once by its graph (nested Functional and Sequential
  models included, not inside a custom layer), one pass: the graph's layers run in
  order, each on every batch,
  and each BN layer is measured over all of them before it runs, every tensor
  held (for all batches) until its last reader ran; past ``GRAPH_PASS_BYTES``
  (2 GiB) of such tensors, or for other models, one partial pass over ``data``
  per BN layer (each stops right after the measured layer), roughly
  ``number_of_bn_layers / 2`` full forward passes. Both run the same layer calls
  on the same batches, so their statistics are the same, bit for bit. A shared
  BN layer is measured over all its calls; where a later call sits downstream of
  a BN layer not yet recalibrated, that layer still uses its old statistics.
- ``"training"``: one pass in training mode, as fvcore and PyTorch do: every BN
  layer normalizes with the batch statistics (so an upstream BN's output, hence
  a downstream BN's input, depends on the batch composition) and Dropout is
  active. Much cheaper on deep models; the statistics are those of the
  training-mode activations the layers were trained with. The variables the
  forward pass would change (moving statistics, renorm statistics, random seed
  state) are restored before the new statistics are written. Under a
  distribution the batch statistics are those of what each replica computes
  its batch statistics over (TensorFlow: its share of the batch; JAX: the whole
  batch, and separately a last part that does not split evenly over the devices).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import keras
import numpy as np
from keras import tree

from keras_bn import _keras_internals as internals
from keras_bn import _moments
from keras_bn import _xla as xla
from keras_bn._batch_norm_state import (
    assign,
    batch_norm_layers,
    count_variable,
    is_unbiased,
    restore_variables,
    snapshot_variables,
    sync_moving_stddev,
    to_numpy,
    unique_names,
)
from keras_bn._replicas import Replicas, replica_id
from keras_bn.running_moments import RunningMoments

__all__ = ["recalibrate_batch_norm"]


def _feature_axes(layer, rank: int) -> list[int]:
    axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
    return sorted(int(axis) % rank for axis in axes)


def _batch_moments(layer, inputs, mask):
    """(count, mean, m2) of one call's input, per channel, shaped like moving_mean.

    A BN input sharded over devices is reduced piece by piece where it lies and
    the pieces merged (Chan), never gathered whole.
    """
    moments = RunningMoments(layer.moving_mean.shape)
    for values, piece_mask in Replicas.pieces(inputs, mask):
        moments.merge(*_piece_moments(layer, values, piece_mask))
    return moments.count, moments.mean, moments.m2


def _piece_moments(layer, values, mask):
    values = np.asarray(values, np.float64)
    rank = values.ndim
    axes = _feature_axes(layer, rank)
    feature_shape = tuple(values.shape[axis] for axis in axes)
    weights = None
    if mask is not None:
        weights = to_numpy(mask).astype(np.float64)
        # The layer's own reading (Keras's convention first, see _moments.mask_axes).
        for axis in _moments.mask_axes(weights.shape, values.shape, axes, layer.axis):
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
        self._cached: list[Any] | None = None
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

    Exact: each layer's ``moving_mean`` and ``moving_variance`` become the float64
    mean and variance of all the values its input takes over ``data``, per channel
    (masked positions left out), for any batching (the module docstring says more).

    In which mode the inputs are computed (``mode``, see the module docstring):
    ``"inference"`` (default), sequential, upstream layers already recalibrated (one
    pass through a Functional graph, else one partial pass per BN layer); or ``"training"``, one pass with batch statistics
    and Dropout active, as fvcore and PyTorch do.

    Every BN layer is recalibrated, frozen ones included; a BN layer that never
    receives data keeps its statistics (a warning names it). On any error, every
    BN layer is left as it was.

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
    _check_arguments(mode, steps, batch_size)
    layers = batch_norm_layers(model)
    names = dict(zip(map(id, layers), unique_names(layers), strict=True))
    if not layers:
        return {}
    _check_built(layers)
    batches = _Batches(data, batch_size, steps)
    moments = _recalibrate(model, layers, batches, mode, names, verbose)
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


def _check_built(layers) -> None:
    unbuilt = [layer.name for layer in layers if layer.moving_mean is None]
    if unbuilt:
        raise ValueError(
            "recalibrate_batch_norm needs a built model: BatchNormalization layers "
            f"{unbuilt} have no weights yet. Call the model on a batch (or build it) "
            "first."
        )


def _recalibrate(model, layers, batches, mode, names, verbose):
    """Measures and writes every layer's statistics; on any error restores them all."""
    saved = snapshot_variables(v for layer in layers for v in layer.variables)
    try:
        replicas = Replicas(model)
        if mode == "training":
            moments, batch_counts = _measure_training_mode(model, layers, batches, replicas)
        else:
            moments, batch_counts = _measure_inference_mode(
                model, layers, batches, names, verbose, replicas
            )
        for layer in layers:
            _write_statistics(layer, moments.get(id(layer)), batch_counts.get(id(layer), 0))
    except BaseException:
        restore_variables(saved)
        raise
    return moments


def _check_arguments(mode, steps, batch_size) -> None:
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


def _forward(model, x, training):
    try:
        model(x, training=training)
    except _StopForward:
        pass


def _run(model, replicas, x, training):
    """One forward pass over ``x``, split over ``replicas`` when distributed."""
    replicas.run(lambda part: _forward(model, part, training), x)


def _measure_training_mode(model, layers, batches, replicas):
    moments = {id(layer): RunningMoments(layer.moving_mean.shape) for layer in layers}
    batch_counts = {id(layer): 0 for layer in layers}
    state = snapshot_variables(model.non_trainable_variables)
    called = set()

    def hook(layer, original, inputs, training, mask):
        moments[id(layer)].merge(*_batch_moments(layer, inputs, mask))
        called.add(id(layer))
        return original(inputs, training=training, mask=mask)

    try:
        with _CallPatch(layers, hook):
            for x in batches:
                called.clear()
                _run(model, replicas, x, training=True)
                for key in called:
                    batch_counts[key] += 1
    finally:
        restore_variables(state)
    moments = {key: replicas.merge_hosts(value) for key, value in moments.items()}
    return (
        {key: value for key, value in moments.items() if value.count.max() > 0},
        batch_counts,
    )


def _measure_inference_mode(model, layers, batches, names, verbose, replicas):
    """One pass per layer, in call order, upstream layers already recalibrated (or one
    pass through the graph, layer by layer: :func:`_measure_through_graph`)."""
    batches.cache()
    if replicas.kind == "local":
        measured = _measure_through_graph(model, layers, batches, names, verbose)
        if measured is not None:
            return measured
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
        _forward(model, first, training=False)  # unsplit: each call counted once

    moments, batch_counts = {}, {}
    for target in order:
        measured, batch_count = _measure_layer(
            model, layers, batches, target, calls_per_forward[id(target)], replicas
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


# Live tensors (every batch's value of each tensor still to be read) the one-pass
# recalibration may hold; past it, the sequential passes (which hold one batch).
GRAPH_PASS_BYTES = 2 << 30


class _OverBudget(Exception):
    """The graph pass's live tensors outgrew GRAPH_PASS_BYTES."""


def _graph_plan(model, layers):
    """The calls of ``model``'s graph that feed a BN layer of ``layers``, in execution
    order, nested Functional and Sequential models' calls expanded into their own,
    and ``key(tensor)``: the tensor whose values a graph tensor takes (a nested
    model's inputs are its caller's, its caller's outputs its own). None when the
    one-pass recalibration does not apply: a subclassed model (or a Functional one
    whose class overrides ``call``), a BN layer not called
    exactly once by one of these graphs or called with a mask (custom layers holding
    BN layers, shared layers), a nested model called on other dtypes or structures."""
    functional = _nested_graph(model)
    if functional is None:
        return None
    aliases: dict[int, int] = {}
    nodes = _expanded_nodes(functional, aliases)
    if nodes is None or any(not node.input_tensors for node in nodes):
        return None  # not expandable, or a call of constants only (not in batches)

    def key(tensor) -> int:
        found = id(tensor)
        while found in aliases:
            found = aliases[found]
        return found

    targets = {id(layer) for layer in layers}
    calls: dict[int, int] = {}
    for node in nodes:
        if id(node.operation) in targets:
            calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
            if any(internals.keras_mask(t) is not None for t in node.input_tensors):
                return None
        elif isinstance(node.operation, keras.layers.Layer) and any(
            id(inner) in targets for inner in internals.flatten_layers(node.operation)
        ):
            return None
    if any(count > 1 for count in calls.values()):
        return None
    producers = {key(t): node for node in nodes for t in node.outputs}
    needed: set[int] = set()
    pending = [node for node in nodes if id(node.operation) in targets]
    while pending:
        node = pending.pop()
        if id(node) not in needed:
            needed.add(id(node))
            pending += [producers[key(t)] for t in node.input_tensors if key(t) in producers]
    return functional, [node for node in nodes if id(node) in needed], key


def _expanded_nodes(functional, aliases: dict[int, int], seen: set[int] | None = None):
    """``functional``'s calls in execution order, each call of a nested Functional or
    Sequential model replaced by that model's own calls (recursively), its input and
    output tensors recorded in ``aliases``; None for a nested model called more than
    once (its calls' tensors are one set) or on inputs it would convert (another
    dtype, structure or count)."""
    seen = set() if seen is None else seen
    nodes = []
    for node in internals.ordered_nodes(functional):
        inner = _nested_graph(node.operation)
        if inner is None:
            nodes.append(node)
            continue
        if id(inner) in seen:
            return None
        seen.add(id(inner))
        inputs = keras.tree.flatten(internals.inputs_struct(inner))
        outputs = keras.tree.flatten(internals.outputs_struct(inner))
        given = node.input_tensors
        if len(inputs) != 1 or len(given) != 1 or len(outputs) != len(node.outputs):
            return None
        dtype = keras.backend.standardize_dtype(given[0].dtype)
        if dtype != keras.backend.standardize_dtype(inputs[0].dtype) or (
            internals.converts_input_args(node.operation)
            and "float" in dtype
            and dtype != node.operation.compute_dtype
        ):
            return None
        # A model called on its own Input tensor (KerasHub's ImageClassifier calls its
        # backbone on ``backbone.input``): the tensor is its own alias, not a cycle.
        if inputs[0] is not given[0]:
            aliases[id(inputs[0])] = id(given[0])
        expanded = _expanded_nodes(inner, aliases, seen)
        if expanded is None:
            return None
        nodes += expanded
        aliases.update(
            {
                id(mine): id(its)
                for mine, its in zip(node.outputs, outputs, strict=True)
                if mine is not its
            }
        )
    return nodes


def _nested_graph(operation):
    """The graph a Functional or Sequential model runs when called, else None (also
    for a subclass that overrides ``call``: it may do more than its graph)."""
    if not internals.runs_its_graph(operation):
        return None
    try:
        return internals.functional_of(operation)
    except ValueError:
        return None


def _measure_through_graph(model, layers, batches, names, verbose):
    """:func:`_measure_inference_mode`'s statistics in one pass: the graph's nodes run
    in order, each on every batch, and each BN layer is measured over all of them,
    recalibrated, then run; a tensor's values are dropped once its last reader ran.
    The same calls on the same batches as the sequential passes (the same statistics,
    bit for bit), once each instead of once per BN layer downstream. None where it
    does not apply (:func:`_graph_plan`) or the live tensors would outgrow
    :data:`GRAPH_PASS_BYTES`; then nothing was written."""
    plan = _graph_plan(model, layers)
    if plan is None:
        return None
    functional, nodes, key = plan
    readers: dict[int, int] = {}
    for node in nodes:
        for tensor in node.input_tensors:
            readers[key(tensor)] = readers.get(key(tensor), 0) + 1
    targets = {id(layer) for layer in layers}
    written = snapshot_variables(v for layer in layers for v in layer.variables)
    moments, batch_counts = {}, {}
    try:
        graph_inputs = internals.inputs_struct(functional)
        keys = [id(tensor) for tensor in keras.tree.flatten(graph_inputs)]
        live = _LiveTensors(readers, key)
        for x in batches:
            flat = internals.standardized_inputs(functional, x)
            for input_key, value in zip(keys, flat, strict=True):
                live.add(input_key, value)
        if not live.values:
            return None  # no data: the sequential passes say so
        for node in nodes:
            if id(node.operation) in targets:
                target = node.operation
                measured, count = _measure_node(target, node, live)
                if measured.count.max() > 0:
                    moments[id(target)], batch_counts[id(target)] = measured, count
                    _write_statistics(target, measured, count)
                if verbose:
                    values = int(measured.count.max())
                    print(f"recalibrated {names[id(target)]}: {values} values per channel")
            live.run(node)
    except _OverBudget:
        restore_variables(written)
        return None
    return moments, batch_counts


class _LiveTensors:
    """Every batch's value of each graph tensor still to be read, by tensor id."""

    def __init__(self, readers: dict[int, int], key):
        self.readers, self.key = dict(readers), key
        self.values: dict[int, list] = {}
        self.bytes = 0

    def add(self, key: int, value) -> None:
        if self.readers.get(key, 0) == 0:
            return  # nothing reads it
        self.values.setdefault(key, []).append(value)
        self.bytes += _nbytes(value)
        if self.bytes > GRAPH_PASS_BYTES:
            raise _OverBudget

    def batch_arguments(self, node):
        """``(args, kwargs)`` of ``node``'s call for each batch."""
        count = len(self.values[self.key(node.input_tensors[0])]) if node.input_tensors else 0
        for index in range(count):

            def fill(value, index=index):
                if isinstance(value, keras.KerasTensor):
                    return self.values[self.key(value)][index]
                return value

            yield keras.tree.map_structure(fill, (node.args, node.kwargs))

    def run(self, node) -> None:
        """``node``'s call on every batch; its inputs dropped where it read them last."""
        call = internals.inference_call(node.operation)
        results = [call(*args, **kwargs) for args, kwargs in self.batch_arguments(node)]
        for tensor in node.input_tensors:
            self.readers[self.key(tensor)] -= 1
            if self.readers[self.key(tensor)] == 0 and self.key(tensor) in self.values:
                self.bytes -= sum(map(_nbytes, self.values.pop(self.key(tensor))))
        for outputs in results:  # paired with the node's outputs as Keras pairs them
            flat = keras.tree.flatten(outputs)
            for tensor, value in zip(node.outputs, flat, strict=False):
                self.add(self.key(tensor), value)


def _nbytes(value) -> int:
    """The bytes a backend tensor holds."""
    itemsize = np.dtype(keras.backend.standardize_dtype(value.dtype)).itemsize
    return int(np.prod(value.shape)) * itemsize


def _measure_node(target, node, live: _LiveTensors):
    """The moments of ``target``'s input over every batch (its call stopped once the
    input is measured, as the sequential passes measure it) and the batches seen."""
    measured = RunningMoments(target.moving_mean.shape)
    batch_count = 0

    def hook(layer, original, inputs, training, mask):
        measured.merge(*_batch_moments(layer, inputs, mask))
        raise _StopForward

    call = internals.inference_call(target)
    with _CallPatch([target], hook):
        for args, kwargs in live.batch_arguments(node):
            seen = measured.count.max()
            try:
                call(*args, **kwargs)
            except _StopForward:
                pass
            batch_count += int(measured.count.max() > seen)
    return measured, batch_count


def _measure_layer(model, layers, batches, target, calls_per_forward, replicas):
    """The moments of ``target``'s input over ``batches``, in inference mode.

    Each forward pass (each replica's) stops once ``target`` has seen all its
    calls for the batch. The moments are merged over the hosts.
    """
    measured = RunningMoments(target.moving_mean.shape)
    calls: dict[int, int] = {}  # per replica
    batch_count = 0

    def hook(layer, original, inputs, training, mask):
        if layer is target:
            measured.merge(*_batch_moments(layer, inputs, mask))
            replica = replica_id()
            calls[replica] = calls.get(replica, 0) + 1
            if calls[replica] % calls_per_forward == 0:
                raise _StopForward
        return original(inputs, training=False, mask=mask)

    with _CallPatch(layers, hook):
        for x in batches:
            seen = measured.count.max()
            _run(model, replicas, x, training=False)
            batch_count += int(measured.count.max() > seen)
    return replicas.merge_hosts(measured), batch_count


def _write_statistics(layer, moments, batch_count) -> None:
    if moments is None:
        return
    unbiased = is_unbiased(layer)
    # Channels that saw no value (all masked) keep their statistics, and so does
    # an unbiased variance from a single value (undefined), as our layer does.
    mean = np.where(moments.count > 0, moments.mean, to_numpy(layer.moving_mean))
    variance = np.where(
        moments.count > (1 if unbiased else 0),
        moments.variance(unbiased=unbiased),
        to_numpy(layer.moving_variance),
    )
    assign(layer.moving_mean, mean)
    assign(layer.moving_variance, variance)
    sync_moving_stddev(layer, variance)
    count = count_variable(layer)
    if count is not None:
        assign(count, batch_count)


# ------------------------------------------------- every layer's input, one pass


def _call_moments(layer, inputs, mask):
    """One BN call's input reduced per channel in the graph, so that only per-channel
    vectors leave the device: ``(count, shift, total, squares)``, shaped like
    moving_mean, in float32 (float64 for float64 inputs). ``total`` and ``squares``
    are the sums of ``x - shift`` and of its squares, ``shift`` one of the input's own
    values per channel (its first position): the shifted-data algorithm, whose sums
    do not cancel unless the values lie many standard deviations from that value,
    and two sums independent of each other (two-pass moments' second waits on the
    first's mean), which XLA compiles in two thirds the time (BENCHMARKS.md, section
    47). A masked input, or one whose reduced sizes are not all known and non-zero
    when traced (no first value for certain), keeps two-pass moments, as ``(count,
    mean, 0, m2)``. :func:`_as_moments` turns either into ``(count, mean, m2)`` in
    float64."""
    dtype = "float64" if keras.backend.standardize_dtype(inputs.dtype) == "float64" else "float32"
    values = keras.ops.cast(inputs, dtype)
    rank = len(values.shape)
    axes = _feature_axes(layer, rank)
    reduced = [axis for axis in range(rank) if axis not in axes]
    shape = tuple(layer.moving_mean.shape)
    sizes = keras.ops.shape(values)
    count = 1  # without a mask an integer: float32 holds integers up to 2**24 only
    for axis in reduced:
        count = count * sizes[axis]
    count = keras.ops.broadcast_to(keras.ops.cast(count, "int32"), shape)
    if mask is None and all(values.shape[axis] for axis in reduced):
        first = tuple(slice(None) if axis in axes else slice(0, 1) for axis in range(rank))
        shift = keras.ops.stop_gradient(values[first])
        deviations = values - shift
        total = keras.ops.sum(deviations, axis=reduced)
        squares = keras.ops.sum(keras.ops.square(deviations), axis=reduced)
        return tuple(keras.ops.reshape(v, shape) for v in (count, shift, total, squares))
    if mask is not None:
        # The layer's own reading (Keras's convention first, see _moments.mask_axes).
        for axis in _moments.mask_axes(tuple(mask.shape), tuple(values.shape), axes, layer.axis):
            mask = keras.ops.expand_dims(mask, axis)
        mask = keras.ops.broadcast_to(keras.ops.cast(mask, "bool"), keras.ops.shape(values))
    mean, variance, masked_count = _moments.moments(values, reduced, mask=mask)
    m2 = variance * keras.ops.cast(masked_count, dtype)
    if mask is not None:
        count = masked_count
    zero = keras.ops.zeros_like(mean)
    return tuple(keras.ops.reshape(v, shape) for v in (count, mean, zero, m2))


def _as_moments(count, shift, total, squares):
    """:func:`_call_moments`'s sums as ``(count, mean, m2)``, in float64:
    ``mean = shift + total / count``, ``m2 = squares - total**2 / count``."""
    count = np.asarray(count, np.float64)
    total = np.asarray(total, np.float64)
    offset = total / np.where(count > 0, count, 1.0)
    mean = np.asarray(shift, np.float64) + offset
    m2 = np.maximum(np.asarray(squares, np.float64) - total * offset, 0.0)
    return count, mean, m2


class _MomentRecorder(keras.Model):
    """``model`` in inference mode, returning its outputs and every BN call's input
    sums (per channel, :func:`_call_moments`), in call order."""

    def __init__(self, model):
        super().__init__(name="batch_norm_inputs")
        self.inner = model
        self.calls: list = []  # the BN layer of each call, in call order
        self.built = True

    def call(self, x):
        calls, moments = [], []

        def hook(layer, original, inputs, training, mask):
            calls.append(layer)
            moments.append(_call_moments(layer, inputs, mask))
            return original(inputs, training=False, mask=mask)

        with _CallPatch(batch_norm_layers(self.inner), hook):
            outputs = self.inner(x, training=False)
        self.calls = calls
        return keras.tree.flatten(outputs), moments


class _CompiledRecorder:
    """The recorder compiled once per input shape: on JAX one ``jax.jit`` program of
    its stateless call (the variables are arguments, so new statistics reuse it; XLA's
    full optimization, which pays for itself over two passes of a few batches, with
    :mod:`keras_bn._xla`'s quicker code generation); on other backends the engine's
    ``predict_on_batch`` (``tf.function``)."""

    def __init__(self, recorder: _MomentRecorder):
        self.recorder = recorder
        self._jitted = None
        if keras.backend.backend() == "jax":

            def call(trainable, non_trainable, x):
                outputs, _ = recorder.stateless_call(trainable, non_trainable, x)
                return outputs

            self._jitted = xla.jit(call, quick=False)

    def __call__(self, x):
        """``(outputs, moments)`` as NumPy arrays."""
        if self._jitted is None:
            return self.recorder.predict_on_batch(x)
        state = (
            [v.value for v in self.recorder.trainable_variables],
            [v.value for v in self.recorder.non_trainable_variables],
        )
        result = self._jitted(*state, tree.map_structure(np.asarray, x))
        return tree.map_structure(np.asarray, result)


class BatchNormInputs:
    """Every BN layer's input moments over data, in one compiled inference pass.

    The model runs in inference mode with every BN layer at its current
    statistics (unlike :func:`recalibrate_batch_norm`'s sequential passes, no
    layer is recalibrated before the next is measured), so each layer's moments
    are those of the input it actually receives. Each call's per-channel sums
    are reduced inside the compiled pass (:func:`_call_moments`: shifted by one of
    the input's own values, in its precision), and only those vectors come back;
    the batches are merged in float64 (Chan). Compiled once per input shape and
    reused by :meth:`outputs`, which runs with whatever statistics the layers
    hold then.
    """

    def __init__(self, model):
        self.layers = batch_norm_layers(model)
        self._recorder = _MomentRecorder(model)
        self._compiled = _CompiledRecorder(self._recorder)

    def measure(self, batches, on_outputs=None) -> dict[int, RunningMoments]:
        """``{id(layer): RunningMoments}`` of every BN layer's input over ``batches``.

        ``batches`` is an iterable of model inputs ``x``; ``on_outputs(outputs)``
        receives each batch's model outputs (a list of NumPy arrays). The moments
        are merged in float64 with Chan's formula; a layer never called has count 0.
        """
        moments = {id(layer): RunningMoments(layer.moving_mean.shape) for layer in self.layers}
        for x in batches:
            outputs, calls = self._compiled(x)
            if on_outputs is not None:
                on_outputs(list(outputs))
            for layer, call in zip(self._recorder.calls, calls, strict=True):
                moments[id(layer)].merge(*_as_moments(*call))
        return moments

    def outputs(self, x) -> list[np.ndarray]:
        """The model's outputs for ``x`` in inference mode, with the current statistics."""
        return list(self._compiled(x)[0])


def write_population_statistics(layer, moments) -> None:
    """Writes ``moments`` (a :class:`RunningMoments`) as ``layer``'s moving statistics."""
    _write_statistics(layer, moments, int(moments.count.max()))

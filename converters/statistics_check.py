"""Stale BatchNormalization statistics: moving statistics against the data's own.

A BN layer normalizes in inference with its moving statistics; when they do not
describe the data (a short fine-tune, momentum 0.99 over few steps, small batches,
SWA, pruning) the model is wrong in inference while every export of it is
faithful. :func:`check_statistics` measures each BN layer's population statistics
over the data at that layer as the model stands (one compiled pass,
``keras_bn.recalibration.BatchNormInputs``: each BN input's per-channel sums reduced
in the pass, only those vectors copied out, the batches merged in float64 with
Chan's formula), compares them with the moving statistics, and runs the
model again with the population statistics (the same compiled program, new
statistics) to say how much the difference changes the outputs, on the first
:data:`EFFECT_SAMPLES` samples (every sample when the data has labels: the accuracy
on them is reported). The first pass's outputs are Keras's run of the data
(:attr:`StatisticsCheck.moving_outputs`): ``keras-bn export`` takes them as its
reference when it validates on the same samples, rather than a third pass.
``keras-bn recalibrate`` measures the same layers sequentially instead
(``keras_bn.recalibrate_batch_norm``, upstream layers recalibrated first):
on a healthy model the two agree; on a stale one both name the stale layers.

Per channel ``c`` (``epsilon`` is the layer's)::

    shift_c  = |population_mean_c - moving_mean_c| / sqrt(moving_variance_c + epsilon)
    factor_c = max(r_c, 1 / r_c),  r_c = (population_variance_c + epsilon)
                                         / (moving_variance_c + epsilon)

and per layer the mean shift is the root mean square of ``shift_c`` and the
variance factor the geometric mean of ``factor_c``. A layer is stale when its mean
shift exceeds :data:`SHIFT_LIMIT` (a quarter of a standard deviation) or its
variance factor :data:`VARIANCE_FACTOR_LIMIT` (1.5): trained models measured on
their own data stay within a few hundredths of 0 and 1 (a CNN trained 20 epochs
with momentum 0.9 on the digits measures 0.024 and 1.03 at worst); the same CNN
trained 2 epochs with momentum 0.999 measures 0.09-0.4 and 2.5-67.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "SHIFT_LIMIT",
    "VARIANCE_FACTOR_LIMIT",
    "EFFECT_SAMPLES",
    "statistic_change",
    "LayerCheck",
    "OutputEffect",
    "StatisticsCheck",
    "check_statistics",
    "NOT_CHECKED",
]

SHIFT_LIMIT = 0.25
VARIANCE_FACTOR_LIMIT = 1.5
NOT_CHECKED = (
    "BatchNormalization statistics were not checked against data: pass --data (or "
    "--inputs/--calibration) to find stale moving statistics."
)
# Samples the output-effect lines are measured on (the second pass, with the
# population statistics, runs on the first batches holding that many): the lines
# illustrate what stale statistics do to the outputs; the verdicts come from the
# first pass over every sample. ``keras-bn export`` and ``inspect`` read the data in
# batches of this size, so the second pass reuses the first pass's compiled program.
EFFECT_SAMPLES = 16
FIX = "keras-bn recalibrate MODEL.keras --data DATA -o OUT.keras"


def statistic_change(
    moving_mean: Any, moving_variance: Any, mean: Any, variance: Any, epsilon: float
) -> tuple[float, float]:
    """(mean shift, variance factor) of statistics ``mean``/``variance`` against the
    moving ones (the module docstring's formulas), in float64."""
    moving_mean, moving_variance, mean, variance = (
        np.asarray(a, np.float64).ravel() for a in (moving_mean, moving_variance, mean, variance)
    )
    scale = np.sqrt(moving_variance + epsilon)
    shift = float(np.sqrt(np.mean((np.abs(mean - moving_mean) / scale) ** 2)))
    log_ratio = np.abs(np.log((variance + epsilon) / (moving_variance + epsilon)))
    return shift, float(np.exp(np.mean(log_ratio)))


@dataclasses.dataclass
class LayerCheck:
    name: str
    channels: int
    values_per_channel: int  # 0: the layer received no data and was not checked
    mean_shift: float
    variance_factor: float

    @property
    def stale(self) -> bool:
        if self.values_per_channel == 0:
            return False
        return not (
            self.mean_shift <= SHIFT_LIMIT and self.variance_factor <= VARIANCE_FACTOR_LIMIT
        )


@dataclasses.dataclass
class OutputEffect:
    """How one output changes from moving to population statistics."""

    name: str
    kind: str  # "top-1 agreement" (classifier scores) or "relative change"
    value: float  # the fraction of samples that agree, or max|diff| / max|population|
    samples: int = 0  # how many samples both runs compared (0: not recorded)

    def describe(self, before: str, after: str) -> str:
        if self.kind == "top-1 agreement":
            return (
                f"output {self.name!r}: the {before} and the {after} give the same top-1 "
                f"class for {100 * self.value:.1f}% of {self._samples}"
            )
        return (
            f"output {self.name!r}: changes by {self.value:.3g} of its range from the "
            f"{before} to the {after} on {self._samples} (max |difference| / max |output|)"
        )

    @property
    def _samples(self) -> str:
        return f"{self.samples} sample(s)" if self.samples else "the samples"


@dataclasses.dataclass
class StatisticsCheck:
    """Moving statistics ("before") against the data's population statistics ("after")."""

    data: str
    layers: list[LayerCheck]
    outputs: list[OutputEffect]
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    before_name: str = "moving statistics"  # how the two sides are named in the text
    after_name: str = "population statistics"
    # The model's outputs over the data with its moving statistics (every batch, in
    # output order), when the check's measuring pass made them: Keras's reference run
    # of the same samples, for a caller that needs one (``keras-bn export``).
    moving_outputs: list[np.ndarray] | None = dataclasses.field(default=None, repr=False)

    @property
    def stale(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.stale]

    def __bool__(self) -> bool:
        return not self.stale

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "stale": self.stale,
            "shift_limit": SHIFT_LIMIT,
            "variance_factor_limit": VARIANCE_FACTOR_LIMIT,
            "layers": [{**dataclasses.asdict(x), "stale": x.stale} for x in self.layers],
            "outputs": [dataclasses.asdict(x) for x in self.outputs],
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
        }

    def __str__(self) -> str:
        from keras_bn.converters.progress import format_table

        rows = [["batch_norm", "channels", "mean shift", "variance factor", "verdict"]]
        for layer in self.layers:
            verdict = "STALE" if layer.stale else "ok"
            if layer.values_per_channel == 0:
                verdict = "no data reached it"
            rows.append(
                [
                    layer.name,
                    str(layer.channels),
                    f"{layer.mean_shift:.3g}",
                    f"{layer.variance_factor:.3g}",
                    verdict,
                ]
            )
        lines = [
            f"BatchNormalization statistics on {self.data}: {self.after_name} against "
            f"{self.before_name}, {len(self.stale)} of {len(self.layers)} layer(s) stale "
            f"(mean shift > {SHIFT_LIMIT:g} moving standard deviations or variance factor "
            f"> {VARIANCE_FACTOR_LIMIT:g})",
            format_table(rows),
        ]
        lines += [output.describe(self.before_name, self.after_name) for output in self.outputs]
        if self.accuracy_before is not None and self.accuracy_after is not None:
            lines.append(
                f"accuracy on the labels: {100 * self.accuracy_before:.1f}% with the "
                f"{self.before_name}, {100 * self.accuracy_after:.1f}% with the {self.after_name}"
            )
        return "\n".join(lines)


def check_statistics(
    model: Any,
    source: Any,
    *,
    keep_population: bool = False,
    before_writing: Callable[[], Any] | None = None,
) -> StatisticsCheck:
    """Compare every BN layer's moving statistics with ``source``'s population ones.

    ``source`` is a :class:`~keras_bn.converters.data_sources.DataSource` (re-iterable
    ``(x, y)`` batches). The model is left as it was. The population statistics
    are those of each layer's input as the model stands (one compiled pass,
    ``keras_bn.recalibration.BatchNormInputs``, moments reduced in the pass), and a
    second run of the same compiled program, with all of them written, measures the
    effect on the outputs (on the first :data:`EFFECT_SAMPLES` samples, unless the
    data has labels). With
    ``keep_population`` the model is instead recalibrated (``recalibrate_batch_norm``,
    sequential and exact: what ``keras-bn recalibrate`` writes) and kept so: the
    check then describes the change. ``before_writing()`` is called (and waited for)
    before the first statistic is written: the first pass only reads the layers, so
    another thread may read their weights meanwhile (the export's).
    """
    from keras_bn._batch_norm_state import batch_norm_layers, restore_variables, unique_names
    from keras_bn.recalibration import BatchNormInputs, write_population_statistics

    layers = batch_norm_layers(model)
    names = unique_names(layers)
    before = _state(layers)
    forward = BatchNormInputs(model)
    if keep_population:
        from keras_bn.recalibration import recalibrate_batch_norm

        if before_writing is not None:
            before_writing()
        counts = recalibrate_batch_norm(model, source.elements())
        moving_outputs: list[list[np.ndarray]] | None = None
    else:
        moving_outputs = []
        moments = forward.measure(source.inputs(), on_outputs=moving_outputs.append)
        if before_writing is not None:
            before_writing()
        counts = {}
        for layer, name in zip(layers, names, strict=True):
            counts[name] = int(moments[id(layer)].count.max())
            if counts[name] > 0:
                write_population_statistics(layer, moments[id(layer)])
    after = _state(layers)
    try:
        checks = [
            _layer_check(layer, name, counts.get(name, 0), before, after)
            for layer, name in zip(layers, names, strict=True)
        ]
        effects = _OutputEffects(model)
        for index, (x, y) in enumerate(source):
            if y is None and not keep_population and effects.samples >= EFFECT_SAMPLES:
                break  # enough for the effect lines (no labels to score on every sample)
            if moving_outputs is None:
                restore_variables(before)
                moving = forward.outputs(x)
                restore_variables(after)
            else:
                moving = moving_outputs[index]
            effects.add(moving, forward.outputs(x), y)
    finally:
        restore_variables(after if keep_population else before)
    return StatisticsCheck(
        data=source.description,
        layers=checks,
        outputs=effects.results(),
        accuracy_before=effects.accuracy(0),
        accuracy_after=effects.accuracy(1),
        moving_outputs=None if moving_outputs is None else _concatenate(moving_outputs),
    )


def _concatenate(batches: list[list[np.ndarray]]) -> list[np.ndarray] | None:
    """Each output over every batch, or None when an output is not batch-major (its
    first axis does not follow the batch)."""
    sizes = [len(outputs[0]) if np.ndim(outputs[0]) else -1 for outputs in batches]
    for outputs, size in zip(batches, sizes, strict=True):
        if any(np.ndim(output) == 0 or len(output) != size for output in outputs):
            return None
    return [np.concatenate([np.asarray(o[i]) for o in batches]) for i in range(len(batches[0]))]


def _class_scores(tensor: Any) -> bool:
    """Whether a graph output holds class scores, where a top-1 class means something:
    computed by a Dense or EinsumDense (linear, softmax or log-softmax), a Softmax, or
    a softmax Activation or operation, through reshapes and dropout (what
    ``onnx_graph.class_score_outputs`` finds in the file). A recurrent layer's state
    or pooled features are not: their effect line is a relative change."""
    import keras
    from keras import activations
    from keras import layers as L

    from keras_bn import _keras_internals as internals

    passing = (L.Reshape, L.Flatten, L.Dropout, L.Identity)
    node = tensor.producer
    while node is not None and isinstance(node.layer, passing) and node.inputs:
        node = node.inputs[0].producer
    if node is None:
        return False
    layer = node.layer
    probabilities = (activations.softmax, activations.log_softmax)
    if isinstance(layer, L.Softmax | internals.nn_ops.Softmax | internals.nn_ops.LogSoftmax):
        return True
    if isinstance(layer, L.Dense | L.EinsumDense):
        return layer.activation in (activations.linear, *probabilities)
    return isinstance(layer, keras.layers.Activation) and layer.activation in probabilities


def _state(layers: list) -> list[tuple[Any, np.ndarray]]:
    from keras_bn._batch_norm_state import snapshot_variables

    return snapshot_variables(v for layer in layers for v in layer.variables)


def _layer_check(layer, name: str, count: int, before: list, after: list) -> LayerCheck:
    def value(state: list, variable: Any) -> np.ndarray:
        return next(v for var, v in state if var is variable)

    shift, factor = statistic_change(
        value(before, layer.moving_mean),
        value(before, layer.moving_variance),
        value(after, layer.moving_mean),
        value(after, layer.moving_variance),
        float(layer.epsilon),
    )
    channels = int(np.prod(layer.moving_mean.shape))
    return LayerCheck(name, channels, int(count), shift, factor)


class _OutputEffects:
    """Streams both runs' outputs into agreement counts or range-relative changes."""

    def __init__(self, model: Any):
        self.model = model
        from keras_bn.converters.graph import flatten

        graph = flatten(model)
        self.names = list(graph.output_names)
        self.scores = [_class_scores(tensor) for tensor in graph.outputs]
        self.agree = [0] * len(self.names)
        self.samples = 0
        self.max_diff = [0.0] * len(self.names)
        self.max_value = [0.0] * len(self.names)
        self.correct = [0, 0]
        self.labelled = 0
        self.classifier: list[bool] = []

    def add(self, moving: list[np.ndarray], population: list[np.ndarray], y: Any) -> None:
        moving = [np.asarray(a, np.float64) for a in moving]
        population = [np.asarray(a, np.float64) for a in population]
        if not self.classifier:
            self.classifier = [
                scores and a.ndim == 2 and a.shape[-1] >= 2
                for scores, a in zip(self.scores, moving, strict=True)
            ]
        self.samples += len(moving[0])
        for i, (a, b) in enumerate(zip(moving, population, strict=True)):
            if self.classifier[i]:
                self.agree[i] += int(np.sum(a.argmax(-1) == b.argmax(-1)))
            self.max_diff[i] = max(self.max_diff[i], float(np.max(np.abs(a - b), initial=0)))
            self.max_value[i] = max(self.max_value[i], float(np.max(np.abs(b), initial=0)))
        if y is not None and len(moving) == 1 and self.classifier[0]:
            labels = np.asarray(y)
            labels = labels.argmax(-1) if labels.ndim == 2 else labels.reshape(-1)
            self.labelled += len(labels)
            for side, scores in enumerate((moving[0], population[0])):
                self.correct[side] += int(np.sum(scores.argmax(-1) == labels))

    def results(self) -> list[OutputEffect]:
        effects = []
        for i, name in enumerate(self.names):
            if self.classifier and self.classifier[i]:
                agree = self.agree[i] / self.samples
                effects.append(OutputEffect(name, "top-1 agreement", agree, self.samples))
            else:
                scale = self.max_value[i] or 1.0
                change = self.max_diff[i] / scale
                effects.append(OutputEffect(name, "relative change", change, self.samples))
        return effects

    def accuracy(self, side: int) -> float | None:
        return self.correct[side] / self.labelled if self.labelled else None

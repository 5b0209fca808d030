"""Where int8 goes wrong: a per-Keras-layer divergence report of a quantized model.

The int8 file is compared with the float model it was quantized from at every Keras
layer output that exists in both graphs, named by the Keras layer (the exporter's
layer map in the file's metadata, :mod:`.onnx.metadata`). The float side is the
float model's value; the int8 side is the same tensor as the next layer reads it:
the ``DequantizeLinear`` output of its quantize/dequantize pair. A layer whose
output ONNX value was renamed or fused away by the quantizer (onnxruntime folds a
ReLU into the quantization range of the convolution before it) has no common
tensor before its activation, so a folded layer is compared after its activation.

The shipped file is never touched: both models are copied in memory with the
compared values added as graph outputs and run once each, batch by batch, with
onnxruntime's graph optimizations off. That is the exact QDQ arithmetic (each
quantized value dequantized and computed in float32), independent of the CPU's
int8 kernels and of fusions an extra output would otherwise block. Statistics
are accumulated per batch, so memory does not grow with the samples.

Per layer: the SQNR of the int8 value against the float one
(:func:`.comparison.sqnr_db`'s formula) over all samples; the median channel's SQNR,
each channel against its own signal (a whole-value SQNR is ruled by the largest
channels: one channel scaled up 64x leaves it nearly unchanged while the others
are rounded away); the largest absolute error relative to the float value's range;
and an estimate of the median-channel SQNR the layer would have if its inputs were
exact (``local_sqnr_db``): quantization noise adds up, so the layer's own
noise-to-signal ratio is its output's minus the worst of its inputs' (the nearest
compared values upstream). An estimate: a layer whose output is much smaller than
its inputs (a projection that cancels) raises the ratio without rounding anything.
Error a layer only passes on does not count against it, so the layer ranked worst
is the one that loses accuracy, not the last one. The hint names the usual cause
that the numbers show: one channel whose range dwarfs the others' (a per-tensor
activation scale leaves the rest few levels; cross-layer equalization is the cure)
or per-tensor weights whose output channels' ranges spread widely.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keras_bn.converters import onnx_graph, runtime
from keras_bn.converters.comparison import power_ratio_db
from keras_bn.converters.onnx.metadata import decode_layer_map

__all__ = [
    "DIVERGENCE_SAMPLES",
    "DivergenceReport",
    "LayerDivergence",
    "compared_samples",
    "compared_values",
    "layer_divergence",
]

# Samples the report runs on by default: the SQNR of a layer settles within a
# fraction of a dB long before that, and each sample costs one run of each model.
DIVERGENCE_SAMPLES = 8
# A channel range this many times the median channel's leaves the median channel
# fewer than 256 / SPREAD of the int8 levels (5 bits at 8x).
SPREAD_HINT = 8.0
# Per-tensor symmetric weights: a 4x spread leaves the median channel ~32 of 127 levels.
WEIGHT_SPREAD_HINT = 4.0
# A channel whose largest |value| is under this fraction of the widest channel's counts
# as zero in the activation spread (float rounding, not a signal).
ZERO_CHANNEL = 1e-6
_EXACT = "ORT_DISABLE_ALL"  # exact QDQ arithmetic: no fusion, no int8 kernel
_PASS_THROUGH = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh"}
_PASS_THROUGH |= {"Add", "Mul", "Identity", "Flatten", "Reshape", "Transpose"}


@dataclasses.dataclass(frozen=True)
class LayerDivergence:
    """One Keras layer output: the int8 model's value against the float model's."""

    layer: str  # the Keras layer whose output is compared (node key)
    onnx_value: str  # the float model's ONNX value computing it
    computed_by: tuple[str, ...]  # the Keras layers computing it from ``inputs``
    inputs: tuple[str, ...]  # the compared layers upstream (none: fed by graph inputs)
    sqnr_db: float  # the whole value's
    channel_sqnr_db: float  # the median channel's, each against its own signal
    local_sqnr_db: float  # channel SQNR estimated with exact inputs (inf: adds no noise)
    max_abs_error: float
    relative_to_range: float  # max |int8 - float| / (max - min of the float value)
    value_range: tuple[float, float]
    channel_spread: float  # the largest channel's max |value| over the median (non-zero) one
    int8_step: float | None  # the activation scale (None: the value is not quantized)
    weights_per_tensor: bool
    weight_spread: float | None  # the weight's largest output channel range over the median
    hint: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("computed_by", "inputs", "value_range"):
            data[key] = list(data[key])
        return data

    def __str__(self) -> str:
        name = " -> ".join(self.computed_by) if len(self.computed_by) > 1 else self.layer
        text = f"{name}: SQNR {self.sqnr_db:.1f} dB, median channel {self.channel_sqnr_db:.1f} dB"
        if self.inputs and self.local_sqnr_db != self.channel_sqnr_db:
            alone = "adds no noise" if math.isinf(self.local_sqnr_db) else None
            text += f" ({alone or f'~{self.local_sqnr_db:.1f} dB from this layer alone'})"
        text += f", max |error| {self.relative_to_range:.1%} of its range"
        return text + (f"; {self.hint}" if self.hint else "")


@dataclasses.dataclass
class DivergenceReport:
    """Every compared layer, in graph order; :meth:`worst` ranks them."""

    samples: int
    layers: list[LayerDivergence]
    note: str = ""  # why nothing could be compared (no layer map), else empty

    def worst(self, count: int = 3) -> list[LayerDivergence]:
        """The ``count`` layers that lose the most accuracy themselves (local SQNR)."""
        ranked = sorted(self.layers, key=lambda layer: (layer.local_sqnr_db, layer.channel_sqnr_db))
        return [layer for layer in ranked[:count] if math.isfinite(layer.local_sqnr_db)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "arithmetic": "exact QDQ (onnxruntime, graph optimizations off)",
            "worst": [layer.layer for layer in self.worst()],
            "layers": [layer.to_dict() for layer in self.layers],
            "note": self.note,
        }

    def format(self, count: int = 3) -> str:
        if not self.layers:
            return f"  per-layer int8 divergence: {self.note or 'no layer to compare'}"
        worst = self.worst(count)
        lines = [
            f"  per-layer int8 divergence on {self.samples} sample(s), exact QDQ arithmetic: "
            f"worst {len(worst)} of {len(self.layers)} layer(s)"
        ]
        lines += [f"    {layer}" for layer in worst]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


# --------------------------------------------------------------------------------------
# The graphs: which values to compare, where the int8 model holds them, upstream.


@dataclasses.dataclass(frozen=True)
class _Site:
    layer: str
    float_value: str
    int8_value: str
    channel_axis: int | None  # the ONNX axis of the Keras channel axis (last)
    scale: str | None  # the activation scale initializer in the int8 model


def _int8_value(
    name: str, producers: Mapping[str, Any], consumers: Mapping[tuple[str, str], Any]
) -> tuple[str, str | None] | None:
    """Where the int8 model holds float ``name`` as the next layer reads it, and its scale.

    The dequantized value of the pair that quantizes it; ``name`` itself when it is
    a graph output (the quantizer renames the producer and gives the dequantized
    value the output's name) or left in float; None when the quantizer removed it.
    """
    quantize = consumers.get(("QuantizeLinear", name))
    if quantize is not None:
        dequantize = consumers.get(("DequantizeLinear", quantize.output[0]))
        if dequantize is not None:
            return dequantize.output[0], quantize.input[1]
    producer = producers.get(name)
    if producer is None:
        return None
    if producer.op_type == "DequantizeLinear":
        return name, producer.input[1]
    return name, None


def _sites(float_model, int8_model) -> tuple[list[_Site], dict[str, list[Any]], str]:
    """The compared values in graph order, one per ONNX value (the last layer naming it)."""
    metadata = {p.key: p.value for p in float_model.metadata_props}
    layer_map = decode_layer_map(metadata)
    if layer_map is None:
        return [], {}, "the float ONNX file has no keras-bn layer map (not exported by keras-bn)"
    float_producers = _used_values(float_model.graph)
    int8_producers = onnx_graph.producers(int8_model.graph)
    int8_consumers: dict[tuple[str, str], Any] = {}
    for node in int8_model.graph.node:  # the first quantize/dequantize reading each value
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            int8_consumers.setdefault((node.op_type, node.input[0]), node)
    by_value: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, entries in layer_map.items():
        for index, entry in enumerate(entries):
            if entry is not None and entry[0] in float_producers:
                label = key if len(entries) == 1 else f"{key}:{index}"
                by_value[entry[0]] = (label, tuple(entry[1]))
    order = {name: i for i, node in enumerate(float_model.graph.node) for name in node.output}
    sites = []
    for name in sorted(by_value, key=order.__getitem__):
        found = _int8_value(name, int8_producers, int8_consumers)
        if found is None:
            continue  # renamed by the quantizer: a ReLU folded into the range before it
        label, perm = by_value[name]
        channel_axis = perm.index(len(perm) - 1) if len(perm) >= 2 else None
        sites.append(_Site(label, name, found[0], channel_axis, found[1]))
    return sites, layer_map, "" if sites else "no Keras layer output exists in both ONNX graphs"


def _upstream(
    graph, sites: Sequence[_Site], layer_map: Mapping[str, list[Any]]
) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Each compared value's nearest compared values upstream (their layers), and the
    Keras layers computing it from them (folded BN and fused activations included)."""
    producers = onnx_graph.producers(graph)
    layer_of = {site.float_value: site.layer for site in sites}
    keys_of: dict[str, list[str]] = {}  # ONNX value or node name -> Keras layers
    for key, entries in layer_map.items():
        for entry in entries:
            if entry is not None:
                keys_of.setdefault(entry[0], []).append(key)
    order = {key: i for i, key in enumerate(layer_map)}
    found = {}
    for site in sites:
        seen: set[str] = set()
        nearest: list[str] = []
        computing = set(keys_of.get(site.float_value, []))
        pending = [site.float_value]
        while pending:
            name = pending.pop()
            if name in seen or not name:
                continue
            seen.add(name)
            if name in layer_of and name != site.float_value:
                nearest.append(layer_of[name])
            elif name in producers:
                node = producers[name]
                computing.update(keys_of.get(name, []))
                computing.update(
                    key for key in (node.name, node.name.split("/")[0]) if key in order
                )
                pending.extend(node.input)
        found[site.float_value] = (
            tuple(dict.fromkeys(sorted(nearest))),
            tuple(sorted(computing, key=order.__getitem__)),
        )
    return found


def _weight_of(
    name: str, producers: Mapping[str, Any], initializers: Collection[str]
) -> tuple[str, int] | None:
    """The weight initializer of the layer computing ``name`` and its output-channel axis:
    the first Conv/Gemm/MatMul upstream through activations and per-channel affines
    (``producers``: ``onnx_graph.producers`` of the graph; ``initializers``: its
    initializers' names)."""
    node = producers.get(name)
    while node is not None:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.input) > 1:
            weight = node.input[1]
            if weight not in initializers:
                return None
            if node.op_type == "Conv":
                return weight, 0
            if node.op_type == "ConvTranspose":
                return weight, 1
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            return weight, 0 if trans_b else -1
        if node.op_type not in _PASS_THROUGH:
            return None
        data = [i for i in node.input if i in producers]
        node = producers.get(data[0]) if len(data) == 1 else None
    return None


# --------------------------------------------------------------------------------------
# Running: one copy of each model, the compared values as extra outputs.


def _augmented_session(model, values: Sequence[str]):
    """A session on a copy of ``model`` with ``values`` as extra outputs (untyped: a
    Keras layer's output may be an integer tensor, a text model's mask)."""
    copy = onnx_graph.with_outputs(model, values)
    session = runtime.open_session(copy, optimization=_EXACT, spinning=False)
    return session, [output.name for output in session.get_outputs()]


@dataclasses.dataclass
class _Totals:
    """Running sums over the batches for one compared value (per channel where it has
    a channel axis, else one "channel" for the whole value)."""

    signal: np.ndarray | None = None  # sum of float^2 per channel
    noise: np.ndarray | None = None  # sum of (int8 - float)^2 per channel
    channel_max: np.ndarray | None = None  # max |float| per channel
    max_error: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    def add(self, float_value: np.ndarray, int8_value: np.ndarray, axis: int | None) -> None:
        # float32 elementwise, float64 sums (no float64 copy of the activations)
        exact = np.asarray(float_value, np.float32)
        error = np.asarray(int8_value, np.float32) - exact
        if not exact.size:
            return
        if axis is None or exact.ndim <= axis:
            exact, error, axis = exact.reshape(-1, 1), error.reshape(-1, 1), 1
        others = tuple(i for i in range(exact.ndim) if i != axis)
        with np.errstate(invalid="ignore", over="ignore"):
            nan = np.isnan(error)
            if nan.any():
                error[nan] = np.inf  # error is this call's own array
            # max |x| as max(max x, -min x): the extremes come with it, no |x| copy
            lowest, highest = np.min(exact, axis=others), np.max(exact, axis=others)
            largest_error = max(float(error.max()), -float(error.min()))
            parts = (
                np.asarray(np.sum(np.square(exact), axis=others, dtype=np.float64)),
                np.asarray(np.sum(np.square(error, out=error), axis=others, dtype=np.float64)),
                np.asarray(np.maximum(highest, -lowest), dtype=np.float64),
            )
        if self.signal is None:
            self.signal, self.noise, self.channel_max = parts
        else:
            assert self.noise is not None and self.channel_max is not None
            self.signal = self.signal + parts[0]
            self.noise = self.noise + parts[1]
            self.channel_max = np.maximum(self.channel_max, parts[2])
        self.max_error = max(self.max_error, largest_error)
        self.low = min(self.low, float(lowest.min()))
        self.high = max(self.high, float(highest.max()))

    def relative_error(self) -> float:
        """The largest error over the value's range (``high - low``); over its largest
        magnitude where the value is constant (a softmax of equal scores: 0.0118 for
        0.01 is 18% off, not 0% "of a range of 0"); inf for an error on zeros."""
        if self.high < self.low:  # nothing added
            return 0.0
        span = (self.high - self.low) or max(abs(self.high), abs(self.low))
        if span > 0:
            return self.max_error / span
        return 0.0 if self.max_error == 0 else math.inf

    def sqnr_db(self) -> float:
        """comparison.sqnr_db's formula over the whole value, from the sums."""
        if self.signal is None or self.noise is None:
            return math.inf
        return power_ratio_db(float(np.sum(self.signal)), float(np.sum(self.noise)))

    def channel_sqnr_db(self) -> float:
        """The median channel's SQNR, each channel against its own signal (channels
        that are zero in the float model left out, as :func:`_spread` counts zero)."""
        if self.signal is None or self.noise is None:
            return math.inf
        live = self.signal > 0
        if self.channel_max is not None:
            live &= self.channel_max > ZERO_CHANNEL * self.channel_max.max(initial=0.0)
        if not np.any(live):
            return self.sqnr_db()
        values = [
            power_ratio_db(a, b) for a, b in zip(self.signal[live], self.noise[live], strict=True)
        ]
        return float(np.median(values))


def compared_samples(
    specs: Sequence[runtime.InputSpec], total: int, max_samples: int | None = DIVERGENCE_SAMPLES
) -> int:
    """How many of ``total`` samples :func:`layer_divergence` compares: the first
    ``max_samples`` (None: all), rounded up to a whole batch for a fixed batch size."""
    count = total if max_samples is None else min(total, max_samples)
    fixed = runtime.fixed_batch_size(specs)
    if fixed and count % fixed:
        count = min(total, -(-count // fixed) * fixed)
    return count


def _feeds(
    specs: Sequence[runtime.InputSpec],
    inputs: Mapping[str, np.ndarray],
    max_samples: int | None,
    batch_size: int,
) -> tuple[list[dict[str, np.ndarray]], int]:
    """The batches of the samples :func:`compared_samples` counts, and their count."""
    matched = runtime.match_inputs(specs, inputs, "Divergence inputs")
    count = compared_samples(specs, int(len(next(iter(matched.values())))), max_samples)
    matched = {name: array[:count] for name, array in matched.items()}
    return list(runtime.batches(matched, runtime.fixed_batch_size(specs), batch_size)), count


def compared_values(float_model: str | os.PathLike | Any) -> list[str]:
    """The float model's values :func:`layer_divergence` may compare (every Keras layer
    output it computes; none without a layer map): what a caller that runs the float
    model anyway keeps for it, as ``float_values``."""
    float_model = _load(float_model)
    layer_map = decode_layer_map({p.key: p.value for p in float_model.metadata_props})
    if layer_map is None:
        return []
    used = _used_values(float_model.graph)
    values = (entry[0] for entries in layer_map.values() for entry in entries if entry is not None)
    return list(dict.fromkeys(value for value in values if value in used))


def _used_values(graph) -> dict[str, Any]:
    """The values ``graph`` computes that a node reads or the graph outputs -> their
    producers: a layer output nothing uses (an FFT's imaginary half that the model
    drops) is not a layer to rank, whatever its rounding."""
    outputs = {output.name for output in graph.output}
    readers = onnx_graph.readers(graph)
    return {
        name: node
        for name, node in onnx_graph.producers(graph).items()
        if name in readers or name in outputs
    }


def _run(
    float_model,
    int8_model,
    sites: Sequence[_Site],
    inputs: Mapping[str, np.ndarray],
    max_samples: int | None,
    batch_size: int,
    float_values: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, _Totals], int]:
    """Both augmented copies on the first ``max_samples`` inputs, batch by batch; the
    totals and the count. ``float_values`` (the float model's values on exactly those
    samples) stand in for the float model's run when they hold every site's value and
    the samples make one batch."""
    int8_session, int8_names = _augmented_session(int8_model, [site.int8_value for site in sites])
    feeds, count = _feeds(runtime.input_specs(int8_session), inputs, max_samples, batch_size)
    given = float_values
    if given is None or len(feeds) != 1 or any(site.float_value not in given for site in sites):
        session, names = _augmented_session(float_model, [site.float_value for site in sites])
        given = None
    totals = {site.float_value: _Totals() for site in sites}
    for feed in feeds:
        computed = given or dict(zip(names, session.run(None, feed), strict=True))
        int8_values = dict(zip(int8_names, int8_session.run(None, feed), strict=True))
        for site in sites:
            totals[site.float_value].add(
                np.asarray(computed[site.float_value]),
                np.asarray(int8_values[site.int8_value]),
                site.channel_axis,
            )
    return totals, count


# --------------------------------------------------------------------------------------
# Judging: the numbers per layer and the hint.


def _spread(channel_max: np.ndarray | None) -> float:
    """The largest entry over the median non-zero one (1.0 for fewer than two non-zero
    channels). Channels that stay zero on the samples (dead after a ReLU) lose nothing
    to the per-tensor scale: over all channels, a median of zero read as an infinite
    spread. Below a millionth of the largest counts as zero: float rounding around a
    channel held constant (a bias absorbed whole by equalization) read as 1e14x."""
    if channel_max is None:
        return 1.0
    live = channel_max[channel_max > ZERO_CHANNEL * channel_max.max(initial=0.0)]
    if live.size < 2:
        return 1.0
    return float(live.max()) / float(np.median(live))


class _WeightFacts:
    """Per layer: whether its weight is quantized per tensor, and its channel range
    spread; and a scale's step. The models' lookups are built once for all layers."""

    def __init__(self, float_model, int8_model):
        self.producers = onnx_graph.producers(float_model.graph)
        self.float_weights = {init.name: init for init in float_model.graph.initializer}
        self.int8_initializers = {init.name: init for init in int8_model.graph.initializer}
        self.dequantized = [n for n in int8_model.graph.node if n.op_type == "DequantizeLinear"]
        self.float_model = float_model
        self.paired: set[str] | None = None  # found on the first question

    def equalizable(self, value: str) -> bool:
        """Whether ``value`` is computed by the first layer of a pair cross-layer
        equalization rescales (through activations and per-channel affines)."""
        if self.paired is None:
            from keras_bn.converters.equalization import pair_outputs

            firsts = pair_outputs(self.float_model)
            self.paired = {n.input[1] for n in self.float_model.graph.node if n.name in firsts}
        found = _weight_of(value, self.producers, self.float_weights)
        return found is not None and found[0] in self.paired

    def __call__(self, value: str) -> tuple[bool, float | None]:
        from onnx import numpy_helper

        found = _weight_of(value, self.producers, self.float_weights)
        if found is None:
            return False, None
        weight, axis = found
        array = numpy_helper.to_array(self.float_weights[weight])
        moved = np.moveaxis(np.abs(array.astype(np.float64)), axis, 0)
        spread = _spread(moved.reshape(moved.shape[0], -1).max(axis=1))
        per_tensor = False
        for node in self.dequantized:
            if node.output[0].startswith(weight):
                scale = self.int8_initializers.get(node.input[1])
                per_tensor = scale is not None and numpy_helper.to_array(scale).size == 1
                break
        return per_tensor, spread

    def step(self, scale: str | None) -> float | None:
        """The value of the int8 model's scale initializer ``scale`` (None: not one)."""
        from onnx import numpy_helper

        found = self.int8_initializers.get(scale) if scale is not None else None
        return None if found is None else float(numpy_helper.to_array(found).ravel()[0])


def _hint(
    spread: float, per_tensor: bool, weight_spread: float | None, equalizable: bool = True
) -> str:
    hints = []
    if spread >= SPREAD_HINT:
        advice = " (cross-layer equalization evens them out: --equalize, every layer pair)"
        hints.append(
            f"one channel's range is {spread:.0f}x the median channel's, so the per-tensor "
            "activation scale leaves most channels few int8 levels"
            + (advice if equalizable else "")
        )
    if per_tensor and weight_spread is not None and weight_spread >= WEIGHT_SPREAD_HINT:
        hints.append(
            f"its weights are quantized per tensor and one output channel's range is "
            f"{weight_spread:.0f}x the median's (per-channel weights or equalization)"
        )
    return "; ".join(hints)


def _local_db(own_db: float, inputs_db: Sequence[float]) -> float:
    """The SQNR a layer would have with exact inputs: noise-to-signal ratios add, so its
    own ratio is its output's minus the worst input's (inf: it adds none)."""
    ratio = 10 ** (-own_db / 10) if own_db > -math.inf else math.inf
    if not math.isfinite(ratio):
        return own_db
    own = ratio - max((10 ** (-db / 10) for db in inputs_db), default=0.0)
    return -10 * math.log10(own) if own > 0 else math.inf


def _judge(float_model, int8_model, sites, totals, upstream) -> list[LayerDivergence]:
    channel_db: dict[str, float] = {}
    layers = []
    facts = _WeightFacts(float_model, int8_model)
    for site in sites:
        total = totals[site.float_value]
        inputs, computed_by = upstream[site.float_value]
        channel_db[site.layer] = total.channel_sqnr_db()
        spread = _spread(total.channel_max)
        per_tensor, weight_spread = facts(site.float_value)
        layers.append(
            LayerDivergence(
                layer=site.layer,
                onnx_value=site.float_value,
                computed_by=computed_by,
                inputs=inputs,
                sqnr_db=total.sqnr_db(),
                channel_sqnr_db=channel_db[site.layer],
                local_sqnr_db=_local_db(channel_db[site.layer], [channel_db[i] for i in inputs]),
                max_abs_error=total.max_error,
                relative_to_range=total.relative_error(),
                value_range=(total.low, total.high),
                channel_spread=spread,
                int8_step=facts.step(site.scale),
                weights_per_tensor=per_tensor,
                weight_spread=weight_spread,
                hint=_hint(
                    spread,
                    per_tensor,
                    weight_spread,
                    spread >= SPREAD_HINT and facts.equalizable(site.float_value),
                ),
            )
        )
    return layers


def layer_divergence(
    float_model: str | os.PathLike | Any,
    int8_model: str | os.PathLike | Any,
    inputs: Mapping[str, np.ndarray],
    *,
    max_samples: int | None = DIVERGENCE_SAMPLES,
    batch_size: int = 16,
    float_values: Mapping[str, np.ndarray] | None = None,
) -> DivergenceReport:
    """Compare an int8 ONNX model with its float model at every Keras layer output.

    Args:
        float_model: the float ONNX model exported by keras-bn (a path or a loaded
            ``ModelProto``); its metadata names the Keras layers.
        int8_model: the model quantized from it (QDQ; a path or ``ModelProto``).
            Neither is modified: both are copied in memory.
        inputs: input arrays keyed by ONNX input name, batch first, in the ONNX
            layout (the calibration data, typically).
        max_samples: compare on the first this many samples (None: all; for a
            fixed batch size, rounded up to whole batches).
        batch_size: samples per run (for a fixed batch size: the model's).
        float_values: the float model's values of :func:`compared_values` on exactly
            the compared samples (:func:`compared_samples`), computed by the caller;
            with every compared value there, the float model is not run again.

    Returns:
        A :class:`DivergenceReport`: every compared layer in graph order, and
        :meth:`~DivergenceReport.worst` the layers that lose the most themselves.
    """
    float_model, int8_model = _load(float_model), _load(int8_model)
    sites, layer_map, note = _sites(float_model, int8_model)
    if not sites:
        return DivergenceReport(samples=0, layers=[], note=note)
    totals, samples = _run(
        float_model, int8_model, sites, inputs, max_samples, batch_size, float_values
    )
    upstream = _upstream(float_model.graph, sites, layer_map)
    return DivergenceReport(
        samples=samples, layers=_judge(float_model, int8_model, sites, totals, upstream)
    )


def _load(model: str | os.PathLike | Any):
    if isinstance(model, str | os.PathLike):
        import onnx

        return onnx.load(str(Path(model)))
    return model

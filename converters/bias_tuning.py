"""Bias tuning of a quantized (QDQ) ONNX model on calibration data, checked on its outputs.

Bias correction (:mod:`.bias_correction`) removes the mean shift that rounding each
layer's *weights* causes. Rounding *activations* shifts means too: a rounded value
clipped by ReLU/ReLU6, or by its tensor's int8 range, has another mean than the exact
one, and pooling carries a per-channel shift to the logits undiminished while it
averages rounding noise away. Tuning measures those shifts in the quantized model
itself, layer after layer in graph order: for each Conv/Gemm whose bias the
quantizer stored as int32, the per-channel shift that brings the layer's output,
clipped as the graph clips it (ReLU, Clip, the int8 range of the QuantizeLinear that
reads it), closest to the float model's on the tuning samples (:func:`clipped_shift`).

Each shift is **kept only where it brings the model's outputs closer to the float
model's** on those samples (:func:`relative_error`); otherwise the bias goes back.
The check is what makes tuning safe: on MobileNetV2 correcting every layer this way
took the logits from 16.7 to 14.3 dB SQNR, because several layers' errors cancel
further down (most of blocks 9-16 there), while the checked form reaches 18.5 dB
(BENCHMARKS.md, section 35). It costs about one run of the quantized model per layer
(with the candidate) and a few of the float model, on the first ``TUNING_SAMPLES``
samples; the biases are fed as graph inputs, so each model is opened once.

The maths are NumPy functions (:func:`clipped_shift`, :func:`relative_error`); the
rest finds the layers and runs the two models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from keras_bn.converters import onnx_graph, runtime
from keras_bn.converters.bias_correction import corrected_bias

__all__ = ["BiasTuningReport", "clipped_shift", "relative_error", "tune_biases"]

TUNING_SAMPLES = 32  # the quantized model runs on these once per layer
EXPOSED_BYTES = 128 * 2**20  # layer outputs kept from one run for the layers that follow


# ---------------------------------------------------------------------------------------
# Maths (NumPy only).


def clipped_shift(
    values: np.ndarray,
    targets: np.ndarray,
    low: float = -np.inf,
    high: float = np.inf,
    iterations: int = 8,
) -> np.ndarray:
    """A per-channel shift ``d`` (channel axis 1) that brings
    ``clip(values + d, low, high)`` close to ``targets`` in mean square.

    Only the positions left inside ``(low, high)`` move with ``d``, so each step sets
    their mean error to zero (Gauss-Newton on the clipped objective, from ``d = 0``);
    a channel whose values all clip keeps its shift. The result is a stationary point:
    values that cross a bound make the objective non-convex, so not always its
    lowest. Without bounds one step gives ``mean(targets - values)``, the whole mean
    shift."""
    values = np.moveaxis(np.asarray(values, np.float64), 1, 0).reshape(np.shape(values)[1], -1)
    targets = np.moveaxis(np.asarray(targets, np.float64), 1, 0).reshape(values.shape)
    shift = np.zeros(values.shape[0])
    for _ in range(iterations if np.isfinite([low, high]).any() else 1):
        moved = values + shift[:, None]
        inside = (moved > low) & (moved < high)
        counts = inside.sum(axis=1)
        errors = np.where(inside, moved - targets, 0.0).sum(axis=1)
        step = np.divide(errors, counts, out=np.zeros_like(errors), where=counts > 0)
        shift -= step
        if not np.any(np.abs(step) > 1e-12 * (1.0 + np.abs(shift))):
            break
    return shift


def relative_error(received: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> float:
    """The outputs' squared error, each relative to its expected signal's power and
    summed over outputs (so that every output counts, whatever its scale)."""
    total = 0.0
    for got, want in zip(received, expected, strict=True):
        want = np.asarray(want, np.float64)
        power = float(np.mean(want**2)) or 1.0
        total += float(np.mean((np.asarray(got, np.float64) - want) ** 2)) / power
    return total


def _sqnr_db(error: float, outputs: int) -> float:
    """The mean relative error of ``outputs`` outputs as an SQNR in dB."""
    mean = error / max(outputs, 1)
    return float("inf") if mean <= 0 else float(-10.0 * np.log10(mean))


# ---------------------------------------------------------------------------------------
# Report.


@dataclasses.dataclass
class BiasTuningReport:
    """What :func:`tune_biases` did: the layers tried and changed, and the outputs'
    SQNR against the float model on the tuning samples before and after."""

    tried: list[str]
    changed: list[str]
    skipped: dict[str, str]  # node name -> why it was not tried
    samples: int
    sqnr_db_before: float | None  # None: nothing was run (no layer to tune)
    sqnr_db_after: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        if self.sqnr_db_before is None or self.sqnr_db_after is None:
            text = "bias tuning: no Conv/Gemm layer to tune"
            return text + (f" ({len(self.skipped)} not tried)" if self.skipped else "")
        text = (
            f"bias tuning: {len(self.changed)} of {len(self.tried)} layer(s) changed on "
            f"{self.samples} sample(s); output SQNR there {self.sqnr_db_before:.1f} -> "
            f"{self.sqnr_db_after:.1f} dB"
        )
        if self.skipped:
            text += f"; {len(self.skipped)} layer(s) not tried"
        return text


# ---------------------------------------------------------------------------------------
# ONNX plumbing.


@dataclasses.dataclass
class _Layer:
    """A tunable layer: its node, its int32 bias (initializer name, values, scale),
    the tensor it writes, the float tensor that output should match once clipped to
    ``[low, high]``."""

    node: Any
    bias: str
    values: np.ndarray
    scale: np.ndarray
    output: str
    target: str
    low: float
    high: float


def _constant(name: str, initializers: Mapping[str, Any]) -> float | None:
    from onnx import numpy_helper

    if name not in initializers:
        return None
    value = numpy_helper.to_array(initializers[name])
    return float(value) if value.size == 1 else None


def _clipped_to(
    output: str, readers: Mapping[str, list], initializers: Mapping[str, Any]
) -> tuple[str, list[str], float, float] | None:
    """Follow ``output`` through Relu/Clip to the one QuantizeLinear that reads it: the
    tensor that QuantizeLinear reads, what its DequantizeLinears write, and the bounds
    on the way (the int8 range included); None where the path forks or passes
    anything else."""
    low, high, tensor = -np.inf, np.inf, output
    while True:
        nodes = readers.get(tensor, [])
        if len(nodes) != 1:
            return None
        node = nodes[0]
        if node.op_type == "QuantizeLinear":
            scale = _constant(node.input[1], initializers)
            zero = initializers.get(node.input[2]) if len(node.input) > 2 else None
            if scale is None or zero is None:
                return None
            from onnx import numpy_helper

            zero_values = numpy_helper.to_array(zero)
            if zero_values.size != 1:
                return None
            info = np.iinfo(zero_values.dtype)
            lowest = scale * (info.min - float(zero_values))
            highest = scale * (info.max - float(zero_values))
            # A graph output's DequantizeLinear writes the output's own name.
            dequantized = [n.output[0] for n in readers.get(node.output[0], [])]
            return tensor, dequantized, max(low, lowest), min(high, highest)
        if node.op_type == "Relu":
            low = max(low, 0.0)
        elif node.op_type == "Clip":
            names = (list(node.input[1:3]) + ["", ""])[:2]
            bounds = [_constant(name, initializers) if name else None for name in names]
            if any(name and bound is None for name, bound in zip(names, bounds, strict=True)):
                return None  # a bound computed in the graph
            low = low if bounds[0] is None else max(low, bounds[0])
            high = high if bounds[1] is None else min(high, bounds[1])
        else:
            return None
        tensor = node.output[0]


def _tunable_layers(quantized, float_tensors: set[str]) -> tuple[list[_Layer], dict[str, str]]:
    """The Conv/Gemm nodes whose int32 bias can be tuned, in graph order, and why others
    cannot."""
    from onnx import TensorProto, numpy_helper

    initializers = {initializer.name: initializer for initializer in quantized.graph.initializer}
    producers = onnx_graph.producers(quantized.graph)
    readers = onnx_graph.readers(quantized.graph)
    layers, skipped = [], {}
    for node in quantized.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        dequantize = producers.get(node.input[2]) if len(node.input) > 2 else None
        if (
            dequantize is None
            or dequantize.op_type != "DequantizeLinear"
            or dequantize.input[0] not in initializers
            or initializers[dequantize.input[0]].data_type != TensorProto.INT32
            or dequantize.input[1] not in initializers
            or len(readers.get(dequantize.input[0], [])) != 1
        ):
            skipped[node.name] = "no int32 bias of its own"
            continue
        path = _clipped_to(node.output[0], readers, initializers)
        if path is None:
            skipped[node.name] = "its output is not quantized through Relu/Clip only"
            continue
        quantized_tensor, dequantized, low, high = path
        target = next((n for n in [quantized_tensor, *dequantized] if n in float_tensors), None)
        if target is None:
            skipped[node.name] = f"no tensor {quantized_tensor!r} in the float model"
        else:
            bias = dequantize.input[0]
            values = numpy_helper.to_array(initializers[bias])
            scale = numpy_helper.to_array(initializers[dequantize.input[1]])
            layers.append(_Layer(node, bias, values, scale, node.output[0], target, low, high))
    return layers, skipped


def _exposed(model, outputs: Sequence[str], biases: Sequence[_Layer] = ()) -> bytes:
    """``model`` serialized with ``outputs`` added to its graph outputs and each of
    ``biases`` turned from an initializer into a graph input (fed on every run)."""
    import onnx

    copy = onnx.ModelProto()  # the float model is read by another thread meanwhile
    copy.CopyFrom(model)
    fed = {layer.bias for layer in biases}
    kept = [i for i in copy.graph.initializer if i.name not in fed]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    copy.graph.input.extend(
        onnx.helper.make_tensor_value_info(
            layer.bias, onnx.TensorProto.INT32, list(layer.values.shape)
        )
        for layer in biases
    )
    return onnx_graph.with_outputs(copy, outputs, in_place=True)


class _Runs:
    """The two models on the tuning samples: the float targets, and the quantized
    model's outputs under given biases.

    Each run also returns the outputs of as many of the layers that follow as fit in
    ``EXPOSED_BYTES`` (per-sample sizes from ONNX shape inference): a trial that is
    not kept then costs no second run for the next layer's output, and the float model
    runs once per window of layers, not once per layer."""

    def __init__(self, float_model, quantized, layers: list[_Layer], feeds, outputs):
        self.layers = layers
        self.outputs = outputs
        self.feeds = feeds
        self.samples = sum(len(next(iter(feed.values()))) for feed in feeds)
        self.sizes = onnx_graph.sample_sizes(float_model)
        targets = list(dict.fromkeys(layer.target for layer in layers))
        names = [layer.output for layer in layers]
        # No arena: each run asks for other outputs (BENCHMARKS.md 35: 1.5 -> 1.0 GB).
        self.float = runtime.open_session(
            _exposed(float_model, targets), spinning=False, arena=False
        )
        self.quantized = runtime.open_session(
            _exposed(quantized, names, layers),
            optimization="ORT_DISABLE_ALL",
            spinning=False,
            arena=False,
        )
        self.expected = self._float(list(outputs))
        self._targets: dict[str, np.ndarray] = {}

    def window(self, start: int) -> list[_Layer]:
        """``layers[start:]``, as many as fit in ``EXPOSED_BYTES`` (at least one)."""
        kept: list[_Layer] = []
        total = 0
        for layer in self.layers[start:]:
            size = self.sizes.get(layer.target)
            cost = EXPOSED_BYTES + 1 if size is None else size * 4 * self.samples
            if kept and total + cost > EXPOSED_BYTES:
                break
            kept.append(layer)
            total += cost
        return kept

    def target(self, index: int) -> np.ndarray:
        """The float model's value of ``layers[index]``'s target tensor."""
        name = self.layers[index].target
        if name not in self._targets:
            names = list(dict.fromkeys(layer.target for layer in self.window(index)))
            self._targets = dict(zip(names, self._float(names), strict=True))
        return self._targets[name]

    def _float(self, names: list[str]) -> list[np.ndarray]:
        runs = [self.float.run(names, feed) for feed in self.feeds]
        return [np.concatenate(values) for values in zip(*runs, strict=True)]

    def quantized_values(
        self, biases: Mapping[str, np.ndarray], start: int
    ) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """The graph outputs under ``biases``, and the outputs of the layers from
        ``start`` on, as many as fit (by tensor name)."""
        exposed = [layer.output for layer in self.window(start)]  # none past the last
        names = list(self.outputs) + exposed
        runs = [self.quantized.run(names, {**feed, **biases}) for feed in self.feeds]
        values = [np.concatenate(parts) for parts in zip(*runs, strict=True)]
        count = len(self.outputs)
        return values[:count], dict(zip(exposed, values[count:], strict=True))


def _candidate(
    layer: _Layer, values: np.ndarray, target: np.ndarray, biases: Mapping[str, np.ndarray]
) -> np.ndarray | None:
    """The layer's bias with :func:`clipped_shift` added, or None where it rounds to
    the bias it has."""
    shift = clipped_shift(values, target, layer.low, layer.high)
    candidate = corrected_bias(biases[layer.bias], layer.scale, shift)
    return None if np.array_equal(candidate, biases[layer.bias]) else candidate


def tune_biases(
    float_model,
    quantized_model,
    calibration_batches: Sequence[Mapping[str, np.ndarray]],
    *,
    samples: int = TUNING_SAMPLES,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Any, BiasTuningReport]:
    """Tune the quantized model's int32 biases, layer by layer, keeping each change
    that brings its outputs closer to the float model's on the first ``samples``
    calibration samples (the module's docstring says how and why).

    Args:
        float_model: the float ONNX model (``ModelProto``) that was quantized.
        quantized_model: its QDQ quantization (``ModelProto``; not modified), node
            and tensor names as in the float model (onnxruntime's quantizer keeps them).
        calibration_batches: feeds (input name -> array), batch first.
        samples: how many of their samples tuning runs on.
        progress: called as ``progress(done, total)`` after each layer.

    Returns:
        The tuned copy of ``quantized_model`` and a :class:`BiasTuningReport`.
    """
    import onnx
    from onnx import numpy_helper

    tuned = onnx.ModelProto()
    tuned.CopyFrom(quantized_model)
    float_tensors = {name for node in float_model.graph.node for name in node.output}
    float_tensors |= {graph_input.name for graph_input in float_model.graph.input}
    layers, skipped = _tunable_layers(tuned, float_tensors)
    whole = onnx_graph.batch_is_fixed(float_model)  # then whole batches only
    feeds = runtime.first_samples(calibration_batches, samples, None if whole else samples)
    count = sum(len(next(iter(feed.values()))) for feed in feeds)
    quantized_outputs = {output.name for output in tuned.graph.output}
    outputs = [o.name for o in float_model.graph.output if o.name in quantized_outputs]
    if not layers or not count or not outputs:
        return tuned, BiasTuningReport([], [], skipped, count, None, None)
    runs = _Runs(float_model, tuned, layers, feeds, outputs)
    biases = {layer.bias: layer.values for layer in layers}
    received, current = runs.quantized_values(biases, 0)  # the outputs under ``biases``
    error = before = relative_error(received, runs.expected)
    tried, changed = [], []
    for index, layer in enumerate(layers):
        if layer.output not in current:
            current = runs.quantized_values(biases, index)[1]
        values, target = current.pop(layer.output), runs.target(index)
        shape_differs = values.shape != target.shape
        candidate = None if shape_differs else _candidate(layer, values, target, biases)
        if shape_differs:
            skipped[layer.node.name] = "its output and the float tensor differ in shape"
        elif candidate is not None:
            tried.append(layer.node.name)
            trial = {**biases, layer.bias: candidate}
            received, following = runs.quantized_values(trial, index + 1)
            trial_error = relative_error(received, runs.expected)
            if trial_error < error:
                biases, error, current = trial, trial_error, following
                changed.append(layer.node.name)
        if progress is not None:
            progress(index + 1, len(layers))
    for initializer in tuned.graph.initializer:
        if initializer.name in biases:
            initializer.CopyFrom(
                numpy_helper.from_array(biases[initializer.name], initializer.name)
            )
    report = BiasTuningReport(
        tried,
        changed,
        skipped,
        count,
        _sqnr_db(before, len(outputs)),
        _sqnr_db(error, len(outputs)),
    )
    return tuned, report

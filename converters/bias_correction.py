"""Empirical bias correction of a quantized (QDQ) ONNX model.

Rounding weights to int8 shifts each layer's expected output: ``E[W_q x]`` differs
from ``E[W x]`` by ``(W_q - W) E[x]``, a per-channel bias that the following layers
amplify (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and
Bias Correction", section 4.2; Finkelstein et al. 2019, "Fighting Quantization Bias
With Bias"). On depthwise layers, whose few weights per channel round coarsely, the
shift is large. This pass measures it on calibration data, for every Conv/Gemm whose
bias the quantizer kept: the mean over batch and positions of each output channel,
in the float model and in the quantized one (before the output's QuantizeLinear),
and adds the difference to the quantized bias.

Correcting one layer changes the inputs of the layers after it, so the measurement
is repeated: each pass measures every layer at once (one run of the quantized model
with the layers' outputs exposed) and corrects them all; after ``passes`` passes the
remaining shift is that of the last pass's downstream propagation, which shrinks
with each pass (the test measures it). Memory stays bounded: only per-channel sums
are kept, batch by batch.

The maths are NumPy functions (:func:`channel_sums`, :func:`corrected_bias`); the
rest reads and writes the ONNX graph. onnxruntime's quantizer stores a bias as int32
with scale ``input_scale * weight_scale`` (a DequantizeLinear of an int32
initializer): the correction is added in those units, rounded, so it costs no
extra node and runs on the integer kernels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from keras_bn.converters import runtime

__all__ = [
    "BiasCorrectionReport",
    "LayerCorrection",
    "channel_sums",
    "correct_biases",
    "corrected_bias",
]

INT32_MIN, INT32_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max
CORRECTED_OPS = ("Conv", "ConvTranspose", "Gemm")  # channels on axis 1, bias input 2


# ---------------------------------------------------------------------------------------
# Maths (NumPy only).


def channel_sums(values: np.ndarray, channel_axis: int = 1) -> tuple[np.ndarray, int]:
    """Per-channel sums of ``values`` over every other axis, in float64, and the count
    of values each sum holds (so that streamed batches average exactly)."""
    values = np.moveaxis(np.asarray(values, dtype=np.float64), channel_axis, -1)
    flat = values.reshape(-1, values.shape[-1])
    return flat.sum(axis=0), flat.shape[0]


def corrected_bias(
    quantized_bias: np.ndarray, scale: np.ndarray | float, shift: np.ndarray
) -> np.ndarray:
    """An int32 bias (dequantized as ``quantized_bias * scale``) plus ``shift`` (float
    units, per channel), rounded to the nearest step and kept in int32's range."""
    steps = np.asarray(quantized_bias, np.float64) + np.asarray(shift, np.float64) / np.asarray(
        scale, np.float64
    )
    return np.clip(np.rint(steps), INT32_MIN, INT32_MAX).astype(np.int32)


# ---------------------------------------------------------------------------------------
# Reports.


@dataclasses.dataclass(frozen=True)
class LayerCorrection:
    """One corrected layer: its node and the output shift measured before correcting
    (largest over channels, and relative to the layer output's standard deviation)."""

    node: str
    channels: int
    max_abs_shift: float
    relative_shift: float  # max |shift| / std of the float output

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BiasCorrectionReport:
    """What :func:`correct_biases` did: corrected layers and the ones it left alone."""

    layers: list[LayerCorrection]
    skipped: dict[str, str]  # node name -> why it was not corrected
    passes: int
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "passes": self.passes,
            "samples": self.samples,
            "layers": [layer.to_dict() for layer in self.layers],
            "skipped": dict(self.skipped),
        }

    def __str__(self) -> str:
        worst = max(self.layers, key=lambda layer: layer.relative_shift, default=None)
        text = (
            f"bias correction: {len(self.layers)} layer(s) corrected on {self.samples} "
            f"sample(s), {self.passes} pass(es)"
        )
        if worst is not None:
            text += (
                f"; largest output shift {worst.relative_shift:.1%} of its spread ({worst.node})"
            )
        if self.skipped:
            text += f"; {len(self.skipped)} layer(s) left as they were"
        return text


# ---------------------------------------------------------------------------------------
# ONNX plumbing.


@dataclasses.dataclass
class _Bias:
    """Where a layer's int32 bias and its scale live in the quantized graph."""

    node: Any
    initializer: Any  # the int32 TensorProto, edited in place
    scale: np.ndarray


def _initializers(model) -> dict[str, Any]:
    return {initializer.name: initializer for initializer in model.graph.initializer}


def _find_biases(quantized, float_nodes: Mapping[str, Any]) -> tuple[list[_Bias], dict[str, str]]:
    """The layers whose bias can be corrected, in graph order, and why others cannot."""
    from onnx import TensorProto, numpy_helper

    initializers = _initializers(quantized)
    producers = {output: node for node in quantized.graph.node for output in node.output}
    found, skipped = [], {}
    for node in quantized.graph.node:
        if node.op_type not in CORRECTED_OPS:
            continue
        name = node.name
        dequantize = producers.get(node.input[2]) if len(node.input) > 2 else None
        if name not in float_nodes:
            skipped[name] = "no node of that name in the float model"
        elif dequantize is None or dequantize.op_type != "DequantizeLinear":
            skipped[name] = "no quantized bias (int32 DequantizeLinear)"
        elif (
            dequantize.input[0] not in initializers
            or initializers[dequantize.input[0]].data_type != TensorProto.INT32
            or dequantize.input[1] not in initializers
        ):
            skipped[name] = "its bias is not an int32 initializer with a stored scale"
        else:
            scale = numpy_helper.to_array(initializers[dequantize.input[1]])
            found.append(_Bias(node, initializers[dequantize.input[0]], scale))
    return found, skipped


def _with_outputs(model, names: Sequence[str]) -> bytes:
    """The model serialized with ``names`` added to its graph outputs."""
    import onnx

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {output.name for output in exposed.graph.output}
    for name in names:
        if name not in existing:
            exposed.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    return exposed.SerializeToString()


def _layer_means(
    model, names: Sequence[str], batches: Iterable[Mapping[str, np.ndarray]]
) -> tuple[list[np.ndarray], list[float], int]:
    """Per-channel means and standard deviations of the tensors ``names`` over
    ``batches``, in exact QDQ arithmetic (graph optimizations off), and the sample count."""
    session = runtime.open_session(_with_outputs(model, names), optimization="ORT_DISABLE_ALL")
    sums: list[np.ndarray] = [np.zeros(0)] * len(names)
    squares = [0.0] * len(names)
    counts = [0] * len(names)
    samples = 0
    for batch in batches:
        values = session.run(list(names), dict(batch))
        samples += len(next(iter(batch.values())))
        for index, value in enumerate(values):
            total, count = channel_sums(value)
            sums[index] = total if counts[index] == 0 else sums[index] + total
            squares[index] += float(np.square(value, dtype=np.float64).sum())
            counts[index] += count
    means = [total / count for total, count in zip(sums, counts, strict=True)]
    spreads = [
        float(np.sqrt(max(square / (count * mean.size) - np.mean(mean) ** 2, 0.0)))
        for square, count, mean in zip(squares, counts, means, strict=True)
    ]
    return means, spreads, samples


def correct_biases(
    float_model,
    quantized_model,
    calibration_batches: Sequence[Mapping[str, np.ndarray]],
    *,
    passes: int = 2,
) -> tuple[Any, BiasCorrectionReport]:
    """Correct the quantized model's biases so each layer's mean output matches the
    float model's on the calibration data.

    Args:
        float_model: the float ONNX model (a loaded ``ModelProto``) that was quantized.
        quantized_model: its QDQ quantization (``ModelProto``; not modified), with
            onnxruntime's int32 biases; node names as in the float model.
        calibration_batches: feeds (input name -> array), e.g. the batches the
            activation ranges were calibrated on.
        passes: measure-and-correct passes (each runs the quantized model once on the
            batches; the float model runs once in all).

    Returns:
        The corrected copy of ``quantized_model`` and a :class:`BiasCorrectionReport`.
    """
    import onnx
    from onnx import numpy_helper

    if passes < 1:
        raise ValueError(f"Bias correction needs at least one pass. Received: passes={passes}")
    corrected = onnx.ModelProto()
    corrected.CopyFrom(quantized_model)
    float_nodes = {node.name: node for node in float_model.graph.node if node.name}
    biases, skipped = _find_biases(corrected, float_nodes)
    if not biases:
        return corrected, BiasCorrectionReport([], skipped, 0, 0)
    float_names = [float_nodes[bias.node.name].output[0] for bias in biases]
    quantized_names = [bias.node.output[0] for bias in biases]
    expected, spreads, samples = _layer_means(float_model, float_names, calibration_batches)
    layers = []
    for index in range(passes):
        received, _, _ = _layer_means(corrected, quantized_names, calibration_batches)
        for bias, target, mean, spread in zip(biases, expected, received, spreads, strict=True):
            shift = target - mean
            values = numpy_helper.to_array(bias.initializer)
            bias.initializer.CopyFrom(
                numpy_helper.from_array(
                    corrected_bias(values, bias.scale, shift), bias.initializer.name
                )
            )
            if index == 0:
                largest = float(np.abs(shift).max())
                layers.append(
                    LayerCorrection(bias.node.name, shift.size, largest, largest / (spread or 1.0))
                )
    return corrected, BiasCorrectionReport(layers, skipped, passes, samples)

"""Cross-layer equalization and high-bias absorption (Nagel et al. 2019), data-free.

Per-tensor int8 gives every output channel of a layer the same weight scale, so a
layer whose channels' weight ranges differ by 10x-1000x (folded BatchNormalization
makes them differ: the folded kernel is ``kernel * gamma / sqrt(moving_variance +
epsilon)``) leaves its small channels a few levels. Two layers in a row with a
positively homogeneous activation between them (ReLU, ReLU6, identity) can trade a
per-channel factor: dividing the first layer's output channel ``c`` by ``s_c`` and
multiplying the second layer's input channel ``c`` by ``s_c`` computes the same
function, and ``s_c = sqrt(r1_c / r2_c)`` (``r1_c``: the range of the first layer's
output channel, ``r2_c``: of the second's input channel) makes both ranges
``sqrt(r1_c * r2_c)``. Sweeping over every pair until the factors reach 1
equalizes whole chains (expand -> depthwise -> project). Depthwise convolutions
take part: in a grouped convolution an input channel's weights are the rows of its
group, one output channel per input channel when depthwise.

ReLU6 stays exact per channel: ``min(max(x / s, 0), 6 / s) = min(max(x, 0), 6) / s``,
so a Clip whose bound no longer is one number gets a ``Min`` with the per-channel
bound after it (the paper swaps ReLU6 for ReLU, which changes what the network
computes; on EfficientNet-Lite0 it ruins the float model). The Clip stays in front
with the widest channel's bound: onnxruntime drops a Clip after a quantized Conv and
takes the Conv output's int8 range from the Clip's output, which keeps that range
bounded.

One departure from the paper: the factors keep each activation's int8 range.
onnxruntime quantizes the tensor between two layers with one range, the widest
channel's; a channel scaled up past it widens that range for every channel. So
``s_c >= a_c / max(a)``, ``a_c`` being channel ``c``'s activation range: measured on
data where given (``extremes``: ``quantize_int8`` measures them on the calibration
data), else known without data (``mean + 3 std`` from the BN statistics, within the
ReLU6 bound; else the bound). On EfficientNet-Lite0 (64 calibration, 256 evaluation
crops) the data-free rule took per-tensor int8's logit SQNR from 7.8 dB (the paper's
factors) to 9.7 dB; on MobileNetV2 it cost 0.5 dB (BENCHMARKS.md, section 18).
Measured ranges do better than the statistics' guess, which calls some channels
small that are not, scales them up and so widens the tensor's range after all
(section 30).

High-bias absorption moves bias that always passes the activation to the next layer.
The BatchNormalization folded into the first layer says what its output channel
looks like: mean ``beta``, standard deviation ``|gamma|`` (when the moving
statistics describe the data). With ``c = max(0, beta - 3 |gamma|)`` (clamped to the
upper bound), ``min(max(x, 0), u) = min(max(x - c, 0), u - c) + c`` wherever
``x >= c``, so the first layer's bias loses ``c``, the upper bound loses ``c`` and
the second layer's bias gains ``W2 @ c``. Through the identity the whole mean moves
(exact for any input). A second layer that zero-pads its input is skipped: its
border outputs would see the padded zeros shifted by ``-c``. Data beats the
statistics here: ``keras-bn export --precision int8`` (``quantize_int8``) measures
each channel's extremes on the calibration data (``extremes``) and absorbs
``c = max(0, lowest)`` through ReLU, exact wherever the data's bound holds;
EfficientNet-Lite0's pre-activations pass ``beta - 3 |gamma|`` often enough to take
its float model to 24 dB SQNR (BENCHMARKS.md, section 30).

With per-channel weights only the pairs into a depthwise layer are worth equalizing
(``depthwise_only``). There each output channel of the second layer reads one input
channel, so the factor ``s_c`` scales whole per-channel weight rows on both sides,
which per-channel scales absorb exactly: the weights lose nothing, and the tensor
between the layers, quantized with one range, gets channels of even ranges. Into a
layer that mixes channels the factor moves range between the columns of one
per-channel row, which per-channel weights do not need. There ReLU6 stays one Clip
(``keep_bounds``): a per-channel ``Min`` would run in float between the int8 layers
(1.6-2x slower files). Measured on the testbeds (section 31b): MobileNetV2 13.6 ->
16.4-16.7 dB, EfficientNet-Lite0 20.0 -> 19.7 dB, where every pair costs Lite0 2.4 dB.
Evening the channels is not always a gain there: the tensor's one range is a percentile
of all its channels' values, and channels scaled up can lift it, coarsening the grid of
the channels left as they were. So with ``judged_on`` (the activations on calibration
samples) each such pair is left unscaled where its factors raise :func:`rounding_error`,
the error that rounding the tensor adds to the depthwise layer's output; on the trained depthwise
1-D net one pair of two raised it 1.3-4.6 dB and is left unscaled (section 37).

Where it applies: on the folded float ONNX graph, before onnxruntime quantizes it,
not on the folded Keras model. The quantizer sees the ONNX graph, so the pairs are
the exporter's own ``Conv``/``Gemm`` -> ``Relu``/``Clip``/nothing ->
(``GlobalAveragePool`` -> ``Flatten``) -> ``Conv``/``Gemm`` patterns, whatever
Keras layers (Dense on channels-first tensors, ZeroPadding2D merged into a Conv's
pads, layers traced from custom code) they came from; a Keras rewrite would have to
rebuild layers to express per-channel ReLU6 bounds, and would miss layers that
only exist after export. The BN statistics come from the fold: the fold report says
which BatchNormalization went into which layer (the ONNX node of that name), and
:func:`batch_norm_statistics` reads its ``gamma`` and ``beta``.

The maths (:class:`LinearLayer`, :func:`equalize_pairs`, :func:`absorb_high_bias`)
is NumPy in float64 with no ONNX or Keras import; :func:`equalize_model` and
:func:`equalize_file` are the ONNX adapter; onnxruntime's quantizer does the rest.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np

from keras_bn.converters import onnx_graph

__all__ = [
    "Activation",
    "ChannelExtremes",
    "ChannelStatistics",
    "EqualizationReport",
    "LinearLayer",
    "Pair",
    "absorb_high_bias",
    "activation_ranges",
    "batch_norm_statistics",
    "describe",
    "equalization_scales",
    "equalize_file",
    "equalize_model",
    "equalize_pairs",
    "high_bias",
    "measured_high_bias",
    "pair_outputs",
    "rounding_error",
    "weight_spread",
]

# Sweeps stop when every factor of a sweep is within this of 1 (log scale).
TOLERANCE = 1e-4
MAX_SWEEPS = 100
# A channel whose weight range is below this fraction of its layer's widest is
# dead (BN gamma ~0): it computes a constant, and scaling it up would blow up the
# constant (its bias) instead of its weights.
DEAD_CHANNEL = 1e-8
SIGMAS = 3.0  # absorbed bias: mean - SIGMAS * std, as in the paper

# --------------------------------------------------------------------------------------
# The maths: NumPy only, float64.


@dataclasses.dataclass
class LinearLayer:
    """A Conv or Dense layer's weights in float64.

    ``weight``: a convolution's ``(out, in / groups, *kernel)`` (ONNX's layout), or
    a dense ``(in, out)`` matrix when ``dense``. ``bias``: ``(out,)``.
    """

    weight: np.ndarray
    bias: np.ndarray
    groups: int = 1
    dense: bool = False

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[1] if self.dense else self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[0] if self.dense else self.weight.shape[1] * self.groups)

    def _input_index(self) -> np.ndarray:
        """``(out, in / groups)``: which input channel each kernel row reads."""
        out, per_group = self.weight.shape[0], self.weight.shape[1]
        group = np.arange(out) // (out // self.groups)
        return group[:, None] * per_group + np.arange(per_group)[None, :]

    def output_ranges(self) -> np.ndarray:
        magnitude = np.abs(self.weight)
        if self.dense:
            return magnitude.max(axis=0)
        return magnitude.reshape(magnitude.shape[0], -1).max(axis=1)

    def input_ranges(self) -> np.ndarray:
        magnitude = np.abs(self.weight)
        if self.dense:
            return magnitude.max(axis=1)
        rows = magnitude.reshape(*magnitude.shape[:2], -1).max(axis=2)
        ranges = np.zeros(self.in_channels)
        np.maximum.at(ranges, self._input_index().ravel(), rows.ravel())
        return ranges

    def input_power(self) -> np.ndarray:
        """Per input channel, the sum of the squared weights that read it."""
        if self.dense:
            return np.square(self.weight).sum(axis=1)
        rows = np.square(self.weight).reshape(*self.weight.shape[:2], -1).sum(axis=2)
        power = np.zeros(self.in_channels)
        np.add.at(power, self._input_index().ravel(), rows.ravel())
        return power

    def scale_outputs(self, factors: np.ndarray) -> None:
        """Output channel ``c`` times ``factors[c]`` (weights and bias)."""
        if self.dense:
            self.weight = self.weight * factors[None, :]
        else:
            self.weight = self.weight * factors.reshape(-1, *[1] * (self.weight.ndim - 1))
        self.bias = self.bias * factors

    def scale_inputs(self, factors: np.ndarray) -> None:
        """Input channel ``c`` times ``factors[c]``."""
        if self.dense:
            self.weight = self.weight * factors[:, None]
            return
        per_row = factors[self._input_index()]
        self.weight = self.weight * per_row.reshape(*per_row.shape, *[1] * (self.weight.ndim - 2))

    def constant_input_response(self, values: np.ndarray) -> np.ndarray:
        """The output (per channel) for an input holding ``values[c]`` everywhere in
        channel ``c``, without bias, away from any padding."""
        if self.dense:
            return values @ self.weight
        sums = self.weight.reshape(*self.weight.shape[:2], -1).sum(axis=2)
        return (sums * values[self._input_index()]).sum(axis=1)


@dataclasses.dataclass
class Activation:
    """What sits between two layers: ``"relu"`` (``min(max(x, 0), upper)``, no
    upper bound when ``upper`` is None) or ``"identity"``. ``upper``: per channel."""

    kind: Literal["relu", "identity"]
    upper: np.ndarray | None = None


@dataclasses.dataclass
class ChannelStatistics:
    """A layer output's per-channel mean and standard deviation (from the BN folded
    into it: ``beta`` and ``|gamma|``)."""

    mean: np.ndarray
    std: np.ndarray


@dataclasses.dataclass
class ChannelExtremes:
    """A layer output's smallest and largest value per channel, measured on data
    (before its activation); ``highest`` None: only the lowest is to be used."""

    lowest: np.ndarray
    highest: np.ndarray | None = None


@dataclasses.dataclass
class Pair:
    """Two layers in a row: ``first``'s output reaches ``second`` through
    ``activation`` (and per-channel linear operations such as global pooling only).
    ``padded``: ``second`` zero-pads its input (no bias absorption)."""

    first: str
    second: str
    activation: Activation
    padded: bool = False
    scales: np.ndarray | None = None  # product of the factors applied (first's output / s)
    absorbed: np.ndarray | None = None  # the bias moved to the second layer, per channel


def equalization_scales(first_ranges: np.ndarray, second_ranges: np.ndarray) -> np.ndarray:
    """``s_c = sqrt(r1_c / r2_c)``: dividing ``first``'s output channel by ``s_c`` and
    multiplying ``second``'s input channel by it makes both ranges ``sqrt(r1_c r2_c)``.

    Channels with an empty range on either side, or a dead first channel (range
    below ``DEAD_CHANNEL`` of the layer's widest), keep ``s_c = 1``.
    """
    first_ranges = np.asarray(first_ranges, np.float64)
    second_ranges = np.asarray(second_ranges, np.float64)
    scales = np.ones_like(first_ranges)
    widest = first_ranges.max(initial=0.0)
    live = (first_ranges > DEAD_CHANNEL * widest) & (second_ranges > 0)
    scales[live] = np.sqrt(first_ranges[live] / second_ranges[live])
    return scales


def equalize_pairs(
    layers: Mapping[str, LinearLayer],
    pairs: list[Pair],
    statistics: Mapping[str, ChannelStatistics] | None = None,
    *,
    extremes: Mapping[str, ChannelExtremes] | None = None,
    keep_activation_range: bool = True,
    keep_bounds: bool = False,
    tolerance: float = TOLERANCE,
    max_sweeps: int = MAX_SWEEPS,
) -> int:
    """Equalize every pair, sweeping until no factor moves by more than ``tolerance``
    (log scale); returns the number of sweeps.

    ``keep_activation_range``: no channel's activation range (:func:`activation_ranges`,
    where known) grows beyond the widest channel's, so the activation tensor's one
    int8 range does not widen: ``s_c >= a_c / max(a)``; from the ``extremes`` measured
    on data where given (per first layer), else from the ``statistics``.

    ``keep_bounds``: each activation keeps its one upper bound (ReLU6's 6), so no
    per-channel ``Min`` has to run in float between two int8 layers. The channels that
    reach the bound in the measured ``extremes`` keep ``s_c = 1``; the others never
    reach it there, and with ``s_c >= a_c / max(a)`` their scaled values stay under it:
    exact wherever the data's maxima hold (beyond them a channel scaled down is clipped
    later than the original, one scaled up sooner).

    Modifies ``layers``, each pair's activation bounds and ``scales``, and the
    ``statistics`` and ``extremes`` of each first layer (scaled with its outputs) in
    place.
    """
    statistics = statistics if statistics is not None else {}
    extremes = extremes if extremes is not None else {}
    for pair in pairs:
        pair.scales = np.ones(layers[pair.first].out_channels)
    for sweep in range(1, max_sweeps + 1):
        largest = 0.0
        for pair in pairs:
            first, second = layers[pair.first], layers[pair.second]
            scales = equalization_scales(first.output_ranges(), second.input_ranges())
            ranges = activation_ranges(
                pair.activation, statistics.get(pair.first), extremes=extremes.get(pair.first)
            )
            if keep_activation_range and ranges is not None and ranges.max() > 0:
                scales = np.maximum(scales, ranges / ranges.max())
            if keep_bounds:
                scales = _bound_channels_kept(pair.activation, extremes.get(pair.first), scales)
            first.scale_outputs(1.0 / scales)
            second.scale_inputs(scales)
            if pair.activation.upper is not None and not keep_bounds:
                pair.activation.upper = pair.activation.upper / scales
            if pair.first in statistics:
                stats = statistics[pair.first]
                stats.mean, stats.std = stats.mean / scales, stats.std / scales
            if pair.first in extremes:
                measured = extremes[pair.first]
                measured.lowest = measured.lowest / scales
                if measured.highest is not None:
                    measured.highest = measured.highest / scales
            pair.scales = pair.scales * scales
            largest = max(largest, float(np.abs(np.log(scales)).max(initial=0.0)))
        if largest <= tolerance:
            return sweep
    return max_sweeps


def _bound_channels_kept(
    activation: Activation, measured: ChannelExtremes | None, scales: np.ndarray
) -> np.ndarray:
    """``scales`` with ``s_c = 1`` for the channels whose measured largest value reaches
    the activation's upper bound; all ones when nothing says which (no bound is then
    moved)."""
    if activation.upper is None:
        return scales
    if measured is None or measured.highest is None:
        return np.ones_like(scales)
    reached = np.asarray(measured.highest) >= np.asarray(activation.upper) * (1 - 1e-6)
    return np.where(reached, 1.0, scales)


def activation_ranges(
    activation: Activation,
    statistics: ChannelStatistics | None,
    sigmas: float = SIGMAS,
    *,
    extremes: ChannelExtremes | None = None,
) -> np.ndarray | None:
    """Each channel's largest activation magnitude after ``activation``: from the
    ``extremes`` measured on data where given (within the bounds), else data-free:
    ``mean + sigmas * std`` (within the bounds) from the statistics, else the upper
    bound; None when none says."""
    if extremes is not None and extremes.highest is not None:
        lowest, highest = np.asarray(extremes.lowest), np.asarray(extremes.highest)
        if activation.kind == "identity":
            return np.maximum(np.abs(lowest), np.abs(highest))
        return _passed(activation, highest)
    if statistics is None:
        return None if activation.upper is None else np.maximum(activation.upper, 0.0)
    mean, std = np.asarray(statistics.mean), np.abs(np.asarray(statistics.std))
    if activation.kind == "identity":
        return np.abs(mean) + sigmas * std
    return _passed(activation, mean + sigmas * std)


def rounding_error(
    values: np.ndarray, factors: np.ndarray, weight_power: np.ndarray, percentile: float = 100.0
) -> float:
    """The error power that rounding an activation to int8 adds to a depthwise layer's
    output, when the tensor holds ``values / factors`` (channel ``c`` divided by
    ``factors[c]``, as equalization scales it) and the layer's weights undo the factors.

    ``values``: the activation, ``(samples, channels, ...)``, unscaled;
    ``weight_power``: per input channel, the sum of the squared weights that read it
    (each output channel of a depthwise layer reads one input channel, so rounding
    errors, independent from position to position, add up as ``sum w^2 e^2``). The
    tensor's range is the calibrator's: ``percentile`` % of ``|x|`` (100: the
    largest), within the signed extremes, on onnxruntime's asymmetric uint8 grid; the
    error of channel ``c`` is measured back in its unscaled units (times ``factors[c]``).
    """
    shape = (1, -1) + (1,) * (values.ndim - 2)
    factors = np.asarray(factors, np.float32).reshape(shape)
    unscaled = bool(np.all(factors == 1))  # x / 1 and e * 1 are x and e: skipped
    scaled = np.asarray(values, np.float32)
    scaled = scaled if unscaled else scaled / factors
    work = np.abs(scaled)  # one float32 buffer, reused in place up to the rounding
    limit = float(np.percentile(work, percentile, overwrite_input=True))
    lowest = max(min(float(scaled.min()), 0.0), -limit)
    highest = max(min(float(scaled.max()), limit), 0.0)
    if highest <= lowest:
        return 0.0
    step = (highest - lowest) / 255.0
    zero_point = np.round(-lowest / step)
    # ((clip(round(x / step) + zero, 0, 255) - zero) * step - x) * factors, squared:
    # in float32 up to the rounding, then float64 (``zero_point`` is a float64 scalar).
    np.divide(scaled, step, out=work)
    np.round(work, out=work)
    wide = np.add(work, zero_point)
    del work
    np.clip(wide, 0, 255, out=wide)
    wide -= zero_point
    wide *= step
    wide -= scaled
    if not unscaled:
        wide *= factors
    np.square(wide, out=wide)
    per_channel = wide.mean(axis=(0, *range(2, values.ndim)), dtype=np.float64)
    return float(np.dot(np.asarray(weight_power, np.float64), per_channel))


def high_bias(
    activation: Activation, statistics: ChannelStatistics, sigmas: float = SIGMAS
) -> np.ndarray:
    """The bias that always passes ``activation``, per channel: through ReLU
    ``max(0, mean - sigmas * std)`` (at most the upper bound), through the identity
    the whole mean."""
    mean = np.asarray(statistics.mean, np.float64)
    if activation.kind == "identity":
        return mean.copy()
    std = np.abs(np.asarray(statistics.std, np.float64))
    spread = np.where(std > 0, sigmas * std, 0.0)  # a constant channel (gamma = 0) moves whole
    return _passed(activation, mean - spread)


def measured_high_bias(activation: Activation, lowest: np.ndarray) -> np.ndarray:
    """The bias that passes a ReLU ``activation`` on data whose smallest value per
    channel is ``lowest``: ``max(0, lowest)``, at most the upper bound."""
    return _passed(activation, np.asarray(lowest, np.float64))


def _passed(activation: Activation, values: np.ndarray) -> np.ndarray:
    """``values`` (per channel, or ``(samples, channels, ...)``) through a ReLU
    ``activation``: ``max(0, values)``, at most its upper bound (itself at least 0)."""
    passed = np.maximum(values, 0.0)
    if activation.upper is None:
        return passed
    upper = np.maximum(activation.upper, 0.0)
    if np.ndim(upper) and np.ndim(values) > 1:  # per-channel bounds along axis 1
        upper = np.reshape(upper, (-1,) + (1,) * (np.ndim(values) - 2))
    return np.minimum(passed, upper)


def absorb_high_bias(
    first: LinearLayer,
    activation: Activation,
    second: LinearLayer,
    absorbed: np.ndarray,
) -> None:
    """Move ``absorbed`` (per channel of ``first``'s output) from ``first``'s bias
    through ``activation`` into ``second``'s bias, in place.

    Exact where the first layer's outputs are at least ``absorbed`` (ReLU) or
    always (identity), provided ``second`` does not zero-pad its input.
    """
    first.bias = first.bias - absorbed
    if activation.upper is not None:
        activation.upper = activation.upper - absorbed
    second.bias = second.bias + second.constant_input_response(absorbed)


def weight_spread(layer: LinearLayer) -> float:
    """Widest output channel's weight range over the median channel's: what one
    per-tensor scale loses against per-channel scales."""
    ranges = layer.output_ranges()
    median = float(np.median(ranges))
    return float(ranges.max() / median) if median > 0 else float("inf")


# --------------------------------------------------------------------------------------
# The report.


@dataclasses.dataclass
class EqualizationReport:
    """What equalization did to an ONNX model: the pairs, the sweeps, the effect on
    the per-channel weight-range spread (max/median, per layer) and the bias moved."""

    pairs: list[Pair]
    sweeps: int
    spread_before: dict[str, float]
    spread_after: dict[str, float]
    absorbed_channels: int = 0
    not_absorbed: dict[str, str] = dataclasses.field(default_factory=dict)
    per_channel_bounds: int = 0  # Clip nodes given a per-channel Min after them
    float_sqnr_db: float | None = None  # the equalized float model's, against the original
    float_samples: int = 0  # ... on this many calibration samples
    measured_bounds: int = 0  # pairs absorbing up to a lower bound measured on data
    measured_ranges: int = 0  # pairs whose activation ranges were measured on data
    depthwise_only: bool = False  # only the pairs into depthwise layers were equalized
    # Per judged pair (first layer), rounding_error unscaled and equalized; those whose
    # second figure is the higher were left unscaled.
    judged: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    judged_samples: int = 0

    @property
    def left_unscaled(self) -> list[str]:
        return [first for first, (plain, scaled) in self.judged.items() if scaled > plain]

    def _median(self, spreads: dict[str, float]) -> float:
        return float(np.median(list(spreads.values()))) if spreads else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "pairs": len(self.pairs),
            "sweeps": self.sweeps,
            "layers": len(self.spread_before),
            "spread_median_before": self._median(self.spread_before),
            "spread_median_after": self._median(self.spread_after),
            "spread_max_before": max(self.spread_before.values(), default=1.0),
            "spread_max_after": max(self.spread_after.values(), default=1.0),
            "absorbed_channels": self.absorbed_channels,
            "not_absorbed": dict(self.not_absorbed),
            "per_channel_bounds": self.per_channel_bounds,
            "float_sqnr_db": self.float_sqnr_db,
            "float_samples": self.float_samples,
            "measured_bounds": self.measured_bounds,
            "measured_ranges": self.measured_ranges,
            "depthwise_only": self.depthwise_only,
            "judged": {first: list(errors) for first, errors in self.judged.items()},
            "left_unscaled": self.left_unscaled,
            "judged_samples": self.judged_samples,
        }

    def __str__(self) -> str:
        return "\n".join(describe(self.to_dict()))


def describe(summary: Mapping[str, Any]) -> list[str]:
    """The lines that say what equalization did, from :meth:`EqualizationReport.to_dict`."""
    scope = " into depthwise layers (what per-channel weights gain from)"
    lines = [
        f"cross-layer equalization: {summary['pairs']} layer pair(s)"
        f"{scope if summary.get('depthwise_only') else ''}, {summary['sweeps']} "
        f"sweep(s); weight-range spread (widest/median channel) of {summary['layers']} "
        f"layer(s): median {summary['spread_median_before']:.2f}x -> "
        f"{summary['spread_median_after']:.2f}x, worst {summary['spread_max_before']:.3g}x -> "
        f"{summary['spread_max_after']:.3g}x"
        + (
            f"; {summary['per_channel_bounds']} Clip bound(s) made per-channel"
            if summary["per_channel_bounds"]
            else ""
        )
        + (
            f"; activation ranges of {summary['measured_ranges']} pair(s) measured on the "
            "calibration data"
            if summary.get("measured_ranges")
            else ""
        )
    ]
    left = summary.get("left_unscaled") or []
    if left:
        lines.append(
            f"{len(left)} pair(s) into depthwise layers left unscaled (scaling would round "
            f"their activation coarser, judged on {summary['judged_samples']} calibration "
            "sample(s)): "
            + ", ".join(left[:3])
            + (f" and {len(left) - 3} more" if len(left) > 3 else "")
        )
    reasons: dict[str, int] = {}
    for reason in summary["not_absorbed"].values():
        reasons[reason] = reasons.get(reason, 0) + 1
    skipped = "".join(f"; {n} pair(s) skipped: {r}" for r, n in reasons.items())
    measured = summary.get("measured_bounds", 0)
    source = f" ({measured} pair(s) up to their lowest calibration value)" if measured else ""
    if not summary.get("depthwise_only"):
        lines.append(
            f"high-bias absorption: {summary['absorbed_channels']} channel(s){source}{skipped}"
        )
    if summary.get("float_sqnr_db") is not None:
        samples = summary.get("float_samples")
        lines.append(
            f"equalized float model vs the original: SQNR {summary['float_sqnr_db']:.1f} dB"
            + (f" on {samples} calibration sample(s)" if samples else "")
        )
    return lines


# --------------------------------------------------------------------------------------
# The Keras side: BN statistics from the fold.


def batch_norm_statistics(model: Any, fold_report: Any) -> dict[str, ChannelStatistics]:
    """Each forward-folded layer's output statistics, keyed by the layer's name (its
    ONNX node's): mean ``beta``, standard deviation ``|gamma|`` of the BatchNormalization
    folded into it. ``model``: the Keras model (or ``PreparedModel``) that was
    exported; ``fold_report``: the export's (``ExportResult.fold_report``)."""
    from keras_bn.converters.folding.rules import variables_by_name
    from keras_bn.converters.prepared import prepare

    layers = {node.name: node.layer for node in prepare(model).graph.nodes}
    statistics = {}
    for entry in fold_report.entries:
        if not entry.folded or entry.direction != "forward" or entry.batch_norm not in layers:
            continue
        variables = variables_by_name(layers[entry.batch_norm])
        reference = variables.get("moving_mean", variables.get("gamma"))
        if reference is None:
            continue
        gamma = variables.get("gamma", np.ones_like(reference))
        beta = variables.get("beta", np.zeros_like(reference))
        statistics[entry.target] = ChannelStatistics(
            mean=np.asarray(beta, np.float64).ravel(),
            std=np.abs(np.asarray(gamma, np.float64)).ravel(),
        )
    return statistics


# --------------------------------------------------------------------------------------
# The ONNX adapter.


class _Graph:
    """An ONNX graph's initializers, producers and consumers, for pattern matching."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.model = model
        graph = model.graph
        self.initializers = {i.name: i for i in graph.initializer}
        self.constants = {
            node.output[0]: numpy_helper.to_array(node.attribute[0].t)
            for node in graph.node
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"
        }
        self.outputs = {output.name for output in graph.output}
        self.consumers = onnx_graph.readers(graph)  # a node per use

    def array(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        return self.constants.get(name)

    def only_consumer(self, tensor: str) -> Any | None:
        consumers = self.consumers.get(tensor, [])
        if tensor in self.outputs or len(consumers) != 1:
            return None
        return consumers[0]

    def set_initializer(self, name: str, values: np.ndarray) -> None:
        from onnx import numpy_helper

        original = self.initializers[name]
        dtype = numpy_helper.to_array(original).dtype
        original.CopyFrom(numpy_helper.from_array(values.astype(dtype), name))

    def add_initializer(self, name: str, values: np.ndarray) -> str:
        from onnx import numpy_helper

        while name in self.initializers or name in self.consumers:
            name += "_"
        tensor = numpy_helper.from_array(values.astype(np.float32), name)
        self.model.graph.initializer.append(tensor)
        self.initializers[name] = self.model.graph.initializer[-1]
        return name


def _attribute(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _linear_shape(graph: _Graph, node: Any) -> tuple[int, int, int] | None:
    """``(out_channels, in_channels, groups)`` of the node if it is a Conv or Gemm with
    its own constant weights (the ones :func:`_linear_layer` reads), from the
    initializers' dimensions: no weight is read."""
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
        return None
    names = [name for name in node.input[1:] if name]
    if any(
        name not in graph.initializers or len(graph.consumers.get(name, [])) != 1 for name in names
    ):
        return None
    dims = [int(d) for d in graph.initializers[node.input[1]].dims]
    groups = int(_attribute(node, "group", 1))
    if node.op_type == "Gemm":
        if (
            _attribute(node, "transA", 0)
            or _attribute(node, "alpha", 1.0) != 1.0
            or _attribute(node, "beta", 1.0) != 1.0
            or len(dims) != 2
        ):
            return None
        in_channels, out = dims[::-1] if _attribute(node, "transB", 0) else dims
    else:
        out, in_channels = dims[0], dims[1] * groups
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias_name is not None and list(graph.initializers[bias_name].dims) != [out]:
        return None
    return out, in_channels, groups


def _linear_layer(graph: _Graph, node: Any, shape: tuple[int, int, int]) -> LinearLayer:
    """The weights of a node whose :func:`_linear_shape` is ``shape``, in float64."""
    weight = graph.array(node.input[1])
    assert weight is not None
    if node.op_type == "Gemm" and _attribute(node, "transB", 0):
        weight = weight.T
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    bias = np.zeros(shape[0]) if bias_name is None else graph.array(bias_name)
    assert bias is not None
    return LinearLayer(
        weight.astype(np.float64),
        bias.astype(np.float64),
        groups=shape[2],
        dense=node.op_type == "Gemm",
    )


def _padded(node: Any) -> bool:
    if node.op_type != "Conv":
        return False
    auto_pad = _attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return auto_pad not in ("NOTSET", "VALID") or any(_attribute(node, "pads", []))


def _activation(graph: _Graph, node: Any, channels: int) -> Activation | None:
    """Relu, or a Clip whose lower bound is 0, as an :class:`Activation`."""
    if node.op_type == "Relu":
        return Activation("relu")
    if node.op_type != "Clip" or len(node.input) < 2 or not node.input[1]:
        return None
    lower = graph.array(node.input[1])
    if lower is None or lower.size != 1 or float(lower.ravel()[0]) != 0.0:
        return None
    if len(node.input) < 3 or not node.input[2]:
        return Activation("relu")
    upper = graph.array(node.input[2])
    if upper is None or upper.size != 1:
        return None
    return Activation("relu", np.full(channels, float(upper.ravel()[0]), np.float64))


def _follow(graph: _Graph, node: Any, channels: int) -> tuple[Pair, Any, Any] | str:
    """The pair that starts at linear ``node`` (with its activation node and second
    node), or why there is none."""
    tensor, activation, activation_node, pooled = (
        node.output[0],
        Activation("identity"),
        None,
        False,
    )
    while True:
        consumer = graph.only_consumer(tensor)
        if consumer is None:
            return "its output feeds several nodes or is a model output"
        op = consumer.op_type
        if op in ("Relu", "Clip") and activation_node is None and not pooled:
            found = _activation(graph, consumer, channels)
            if found is None:
                return f"{op} {consumer.name!r} is not positively homogeneous"
            activation, activation_node = found, consumer
        elif op == "GlobalAveragePool" and not pooled:
            pooled = True
        elif op == "Flatten" and pooled and _attribute(consumer, "axis", 1) == 1:
            pass
        elif op in ("Conv", "Gemm") and consumer.input[0] == tensor:
            pair = Pair(node.name, consumer.name, activation, padded=_padded(consumer))
            return pair, activation_node, consumer
        else:
            return f"its output reaches {op} {consumer.name!r}"
        tensor = consumer.output[0]


def _find_pairs(
    graph: _Graph, depthwise_only: bool = False
) -> tuple[dict[str, LinearLayer], list[Pair], dict[str, Any]]:
    """Every pair of layers that can be equalized (``depthwise_only``: whose second
    layer is depthwise), their weights, their activation nodes. The pairs are found
    from the weights' shapes (:func:`_pairs`); only the paired layers' weights are read."""
    pairs, activation_nodes, shapes = _pairs(graph, depthwise_only)
    nodes = {node.name: node for node in graph.model.graph.node}
    paired = dict.fromkeys(name for pair in pairs for name in (pair.first, pair.second))
    layers = {name: _linear_layer(graph, nodes[name], shapes[name]) for name in paired}
    return layers, pairs, activation_nodes


def _pairs(
    graph: _Graph, depthwise_only: bool
) -> tuple[list[Pair], dict[str, Any], dict[str, tuple[int, int, int]]]:
    """:func:`_find_pairs`' pairs and activation nodes, and every linear layer's shape,
    from the weights' dimensions alone."""
    nodes = {node.name: node for node in graph.model.graph.node}
    shapes = {}
    for node in graph.model.graph.node:
        shape = _linear_shape(graph, node)
        if shape is not None and node.name:
            shapes[node.name] = shape
    pairs, activation_nodes = [], {}
    for name, (out, _, _) in shapes.items():
        found = _follow(graph, nodes[name], out)
        if isinstance(found, str):
            continue
        pair, activation_node, second = found
        after = shapes.get(second.name)
        if after is None or after[1] != out:
            continue
        if not depthwise_only or after[2] == after[1]:  # depthwise: a group per channel
            pairs.append(pair)
            activation_nodes[name] = activation_node
    return pairs, activation_nodes, shapes


def _write_back(
    graph: _Graph, layers: Mapping[str, LinearLayer], pairs: list[Pair], activation_nodes
) -> int:
    """The new weights, biases and activation bounds into the graph; returns how many
    Clip nodes became Relu + per-channel Min."""
    nodes = {node.name: node for node in graph.model.graph.node}
    touched = {name for pair in pairs for name in (pair.first, pair.second)}
    for name in touched:
        node, layer = nodes[name], layers[name]
        weight = (
            layer.weight.T
            if node.op_type == "Gemm" and _attribute(node, "transB", 0)
            else layer.weight
        )
        graph.set_initializer(node.input[1], weight)
        if len(node.input) > 2 and node.input[2]:
            graph.set_initializer(node.input[2], layer.bias)
        elif np.any(layer.bias):
            bias = graph.add_initializer(f"{name}/bias", layer.bias)
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = bias
    rewritten = 0
    for pair in pairs:
        clip, upper = activation_nodes[pair.first], pair.activation.upper
        if clip is None or upper is None:
            continue
        clip.input[2] = graph.add_initializer(f"{clip.name}/max", np.array(upper.max()))
        if np.all(upper == upper[0]):
            continue
        rank = layers[pair.first].weight.ndim if not layers[pair.first].dense else 2
        bound = graph.add_initializer(f"{clip.name}/upper", upper.reshape(-1, *[1] * (rank - 2)))
        _bound_per_channel(graph, clip, bound)
        rewritten += 1
    return rewritten


def _bound_per_channel(graph: _Graph, clip: Any, bound: str) -> None:
    """``Clip(x, 0, max(u))`` -> ``Min(Clip(x, 0, max(u)), u)``, in place (the Min
    takes the Clip's output name).

    The Clip with the widest channel's bound stays for the quantizer: onnxruntime
    drops a Clip after a quantized Conv and calibrates the Conv's output range on
    the Clip's output, so that range stays bounded (``[0, max(u)]``), not the Conv's
    raw output's; :func:`.calibration.share_bound_ranges` then narrows it to the
    Min's output range, so that the two roundings fall on one grid.
    """
    from onnx import helper

    nodes = graph.model.graph.node
    index = list(nodes).index(clip)
    output = clip.output[0]
    clip.output[0] = f"{output}/clipped"
    bounded = helper.make_node("Min", [clip.output[0], bound], [output], name=f"{clip.name}/bound")
    nodes.insert(index + 1, bounded)


def pair_outputs(model: Any, depthwise_only: bool = False) -> dict[str, str]:
    """Per pair :func:`equalize_model` would equalize, its first node's name and output
    tensor: where ``extremes`` are measured."""
    pairs, _, _ = _pairs(_Graph(model), depthwise_only)
    nodes = {node.name: node for node in model.graph.node}
    return {pair.first: nodes[pair.first].output[0] for pair in pairs}


def equalize_model(
    model: Any,
    statistics: Mapping[str, ChannelStatistics] | None = None,
    *,
    absorb: bool = True,
    sigmas: float = SIGMAS,
    keep_activation_range: bool = True,
    extremes: Mapping[str, ChannelExtremes] | None = None,
    depthwise_only: bool = False,
    judged_on: Mapping[str, np.ndarray] | None = None,
    percentile: float = 100.0,
) -> tuple[Any, EqualizationReport]:
    """Cross-layer equalization (and, with ``statistics`` or ``extremes``, high-bias
    absorption) of an ONNX ``ModelProto``; returns the new model (the input is not
    modified) and what was done.

    ``statistics``: per ONNX node name, its output's :class:`ChannelStatistics`
    (:func:`batch_norm_statistics`); pairs whose first layer has none are equalized
    but absorb nothing. ``extremes``: per :func:`pair_outputs` node, its output's
    :class:`ChannelExtremes` on representative data, which then say what the
    statistics would guess: each channel's activation range (``keep_activation_range``)
    and, through ReLU, the bias absorbed (the lowest value: exact wherever the data
    holds it, where the statistics' ``mean - sigmas * std`` is a guess).
    ``depthwise_only``: only the pairs whose second layer is depthwise (what
    per-channel weights gain from), each activation keeping its one upper bound
    (``keep_bounds`` of :func:`equalize_pairs`: no float ``Min`` between int8 layers),
    and no bias absorbed (it would lower the bounds channel by channel).
    ``judged_on`` (``depthwise_only``): per pair's first layer, its output on some
    calibration samples (before the activation); each such pair is left unscaled where its
    factors raise :func:`rounding_error` (ranges at ``percentile``).
    """
    model = copy.deepcopy(model)
    graph = _Graph(model)
    layers, pairs, activation_nodes = _find_pairs(graph, depthwise_only)
    owned = {
        name: ChannelStatistics(np.asarray(s.mean, np.float64), np.asarray(s.std, np.float64))
        for name, s in (statistics or {}).items()
        if name in layers and np.shape(s.mean) == (layers[name].out_channels,)
    }
    measured = {
        name: ChannelExtremes(
            np.asarray(e.lowest, np.float64),
            None if e.highest is None else np.asarray(e.highest, np.float64),
        )
        for name, e in (extremes or {}).items()
        if name in layers and np.shape(e.lowest) == (layers[name].out_channels,)
    }
    judged: dict[str, tuple[float, float]] = {}
    if depthwise_only and judged_on and pairs:
        pairs, judged = _judge(
            layers, pairs, owned, measured, judged_on, percentile, keep_activation_range
        )
    touched = sorted({name for pair in pairs for name in (pair.first, pair.second)})
    before = {name: weight_spread(layers[name]) for name in touched}
    sweeps = (
        equalize_pairs(
            layers,
            pairs,
            owned,
            extremes=measured,
            keep_activation_range=keep_activation_range,
            keep_bounds=depthwise_only,
        )
        if pairs
        else 0
    )
    report = EqualizationReport(
        pairs, sweeps, before, {name: weight_spread(layers[name]) for name in touched}
    )
    report.depthwise_only = depthwise_only
    report.judged = judged
    report.judged_samples = len(next(iter(judged_on.values()))) if judged_on and judged else 0
    report.measured_ranges = sum(
        pair.first in measured and measured[pair.first].highest is not None for pair in pairs
    )
    if absorb and not depthwise_only:  # absorbing would make the bounds per-channel
        _absorb(layers, pairs, owned, report, sigmas, measured)
    report.per_channel_bounds = _write_back(graph, layers, pairs, activation_nodes)
    return model, report


def _judge(
    layers: Mapping[str, LinearLayer],
    pairs: list[Pair],
    statistics: Mapping[str, ChannelStatistics],
    extremes: Mapping[str, ChannelExtremes],
    judged_on: Mapping[str, np.ndarray],
    percentile: float,
    keep_activation_range: bool,
) -> tuple[list[Pair], dict[str, tuple[float, float]]]:
    """The pairs to equalize, and per pair into a depthwise layer with values in
    ``judged_on``: :func:`rounding_error` unscaled and with the factors that equalizing
    every pair gives (worked out on copies of the pairs and their layers; ``layers``,
    ``statistics`` and ``extremes`` are not modified). A pair whose error the factors
    raise is left out."""
    trial_pairs = copy.deepcopy(pairs)
    touched = {name for pair in pairs for name in (pair.first, pair.second)}
    equalize_pairs(
        {name: copy.deepcopy(layers[name]) for name in touched},
        trial_pairs,
        copy.deepcopy(dict(statistics)),
        extremes=copy.deepcopy(dict(extremes)),
        keep_activation_range=keep_activation_range,
        keep_bounds=True,
    )
    factors = {pair.first: pair.scales for pair in trial_pairs if pair.scales is not None}
    judged = {}
    for pair in pairs:
        if pair.first not in judged_on or pair.first not in factors:
            continue
        values = np.asarray(judged_on[pair.first])
        if pair.activation.kind != "identity":
            values = _passed(pair.activation, values)
        power = layers[pair.second].input_power()
        scales = factors[pair.first]
        judged[pair.first] = (
            rounding_error(values, np.ones_like(scales), power, percentile),
            rounding_error(values, scales, power, percentile),
        )
    left = {first for first, (plain, scaled) in judged.items() if scaled > plain}
    return [pair for pair in pairs if pair.first not in left], judged


def _absorb(
    layers: Mapping[str, LinearLayer],
    pairs: Iterable[Pair],
    statistics: Mapping[str, ChannelStatistics],
    report: EqualizationReport,
    sigmas: float,
    extremes: Mapping[str, ChannelExtremes],
) -> None:
    """High-bias absorption for every pair that allows it; the others' reasons."""
    for pair in pairs:
        stats, measured = statistics.get(pair.first), extremes.get(pair.first)
        if pair.padded:
            report.not_absorbed[pair.first] = "the next layer zero-pads its input"
        elif measured is not None and pair.activation.kind == "relu":
            pair.absorbed = measured_high_bias(pair.activation, measured.lowest)  # scaled
            report.measured_bounds += 1
        elif stats is None:
            report.not_absorbed[pair.first] = "no BatchNormalization statistics"
        else:
            pair.absorbed = high_bias(pair.activation, stats, sigmas)
        if pair.absorbed is not None:
            absorb_high_bias(
                layers[pair.first], pair.activation, layers[pair.second], pair.absorbed
            )
            report.absorbed_channels += int(np.count_nonzero(pair.absorbed))


def equalize_file(
    onnx_in: str | os.PathLike,
    onnx_out: str | os.PathLike,
    statistics: Mapping[str, ChannelStatistics] | None = None,
    extremes: Mapping[str, ChannelExtremes] | None = None,
    depthwise_only: bool = False,
    judged_on: Mapping[str, np.ndarray] | None = None,
    percentile: float = 100.0,
) -> EqualizationReport:
    """:func:`equalize_model` from one ONNX file to another."""
    import onnx

    model, report = equalize_model(
        onnx.load(str(onnx_in)),
        statistics,
        extremes=extremes,
        depthwise_only=depthwise_only,
        judged_on=judged_on,
        percentile=percentile,
    )
    onnx.save(model, str(onnx_out))
    return report

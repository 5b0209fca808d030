"""Percentile calibration and bias correction's input means in one float pass.

onnxruntime's percentile calibrator keeps a histogram of ``|x|`` for every tensor it
calibrates (2048 bins over the first batch's range, widened by bins of the same
width when a later batch goes beyond it) and takes the edge where the cumulative
share reaches the percentile. It rebuilds each histogram with ``np.histogram`` on
explicit edges, which sorts every batch of every tensor; bias correction then ran
the float model over the calibration data a second time for its per-channel input
means.

:func:`collect` does both in one onnxruntime run over the calibration batches, with
the same histograms counted on uniform bins (``np.histogram`` with a range, which
does not sort) and the per-channel sums bias correction needs taken from the same
outputs. :func:`quantize_with_ranges` hands the ranges to onnxruntime's
``quantize_static`` through its calibration cache (``calibration_cache_path``, in
the onnxruntime releases that have it), so onnxruntime still does the QDQ rewrite.
Its thresholds equal onnxruntime's own calibrator's to within one histogram bin
(tested): a later batch's bins are laid out by the same arithmetic, but from a
range rather than onnxruntime's float32 edge list.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keras_bn.converters import runtime

__all__ = [
    "HISTOGRAM_BINS",
    "CalibrationStatistics",
    "PercentileHistogram",
    "calibrated_tensors",
    "collect",
    "has_calibration_cache",
    "quantize_with_ranges",
]

HISTOGRAM_BINS = 2048  # onnxruntime's default for its percentile calibrator


class PercentileHistogram:
    """onnxruntime's symmetric percentile histogram of one tensor, batch by batch."""

    def __init__(self, bins: int = HISTOGRAM_BINS) -> None:
        self.bins = bins
        self.counts: np.ndarray | None = None
        self.first_edge = self.width = 0.0
        self.lowest = self.highest = None  # of x itself, not |x|

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values).ravel()
        if values.size == 0:
            return
        lowest, highest = values.min(), values.max()
        if np.isnan(lowest) or np.isnan(highest):  # rare: NumPy's NaN-aware path
            values = values[~np.isnan(values)]
            if values.size == 0:
                return
            lowest, highest = values.min(), values.max()
        self.lowest = lowest if self.lowest is None else min(self.lowest, lowest)
        self.highest = highest if self.highest is None else max(self.highest, highest)
        magnitudes = np.abs(values)
        if self.counts is None:  # the first batch sets the bins, as onnxruntime's
            self.counts, edges = np.histogram(magnitudes, bins=self.bins)
            edges = edges.astype(values.dtype)
            self.first_edge, self.width = float(edges[0]), float(edges[1] - edges[0])
            return
        bins = len(self.counts)
        top = float(max(-lowest, highest))
        last_edge = self.first_edge + bins * self.width
        if top > last_edge:  # more bins of the same width, up to the new maximum
            bins += int(np.ceil((top - last_edge) / self.width))
        counts, _ = np.histogram(  # bins from a range: NumPy counts them without sorting
            magnitudes, bins=bins, range=(self.first_edge, self.first_edge + bins * self.width)
        )
        counts[: len(self.counts)] += self.counts
        self.counts = counts

    def range(self, percentile: float) -> tuple[np.ndarray, np.ndarray]:
        """``(-t, t)`` with ``t`` the edge where ``percentile`` % of ``|x|`` lies
        below, kept within the values' own minimum and maximum (onnxruntime's)."""
        assert self.counts is not None and self.lowest is not None
        share = np.cumsum(self.counts / self.counts.sum())
        index = int(np.searchsorted(share, percentile / 100.0))
        dtype = self.lowest.dtype
        threshold = np.asarray(self.first_edge + index * self.width, dtype=dtype)
        lowest = max(-threshold, np.asarray(self.lowest, dtype))
        highest = min(threshold, np.asarray(self.highest, dtype))
        return np.asarray(lowest, dtype), np.asarray(highest, dtype)


@dataclasses.dataclass
class CalibrationStatistics:
    """What :func:`collect` gathers: activation ranges, and per-channel means and
    overall spreads of the tensors bias correction asked for."""

    ranges: dict[str, tuple[np.ndarray, np.ndarray]]
    means: dict[str, np.ndarray]
    spreads: dict[str, float]
    samples: int


def calibrated_tensors(model: Any) -> list[str]:
    """The tensors onnxruntime's calibrators calibrate: every float input or output,
    not an initializer, of a node onnxruntime can quantize, in graph order."""
    from onnx import TensorProto

    try:
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        op_types: set[str] | None = set(QDQRegistry) | set(QLinearOpsRegistry)
    except ImportError:  # every node, as onnxruntime's calibrators do when told no types
        op_types = None
    graph = model.graph
    typed = {value.name: value for value in itertools.chain(graph.value_info, graph.output)}
    typed.update({value.name: value for value in graph.input})
    initializers = {initializer.name for initializer in graph.initializer}
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16}
    names: dict[str, None] = {}
    for node in graph.node:
        if op_types is not None and node.op_type not in op_types:
            continue
        for name in itertools.chain(node.input, node.output):
            value = typed.get(name)
            if (
                value is not None
                and name not in initializers
                and value.type.HasField("tensor_type")
                and value.type.tensor_type.elem_type in floats
            ):
                names[name] = None
    return list(names)


def _exposing(model: Any, names: Sequence[str]) -> bytes:
    """``model`` serialized with ``names`` among its graph outputs."""
    import onnx

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {output.name for output in exposed.graph.output}
    typed = {value.name: value for value in exposed.graph.value_info}
    for name in names:
        if name not in existing:
            exposed.graph.output.append(
                typed.get(name)
                or onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    return exposed.SerializeToString()


class _Moments:
    """Per-channel (axis 1) sums and the overall sum of squares of one tensor."""

    def __init__(self) -> None:
        self.sums: np.ndarray | None = None
        self.squares = 0.0
        self.count = 0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values)
        if values.ndim < 2:
            values = values[:, None]
        axes = tuple(axis for axis in range(values.ndim) if axis != 1)
        sums = values.sum(axis=axes, dtype=np.float64)
        self.sums = sums if self.sums is None else self.sums + sums
        flat = values.ravel()
        self.squares += float(np.dot(flat, flat))  # the report's spread only
        self.count += values.size // values.shape[1]

    def mean_and_spread(self) -> tuple[np.ndarray, float]:
        assert self.sums is not None
        mean = self.sums / self.count
        variance = self.squares / (self.count * mean.size) - float(np.mean(mean)) ** 2
        return mean, max(variance, 0.0) ** 0.5


def collect(
    model: Any,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    percentile: float,
    means_of: Sequence[str] = (),
    progress: Callable[[int, int], None] | None = None,
) -> CalibrationStatistics:
    """One run of the float ``model`` (a loaded ``ModelProto`` with inferred shapes)
    over ``batches``, in exact arithmetic (graph optimizations off, as onnxruntime's
    calibrators run): the percentile ranges of :func:`calibrated_tensors` and the
    per-channel means and spreads of the tensors ``means_of``."""
    batches = list(batches)
    histograms = {name: PercentileHistogram() for name in calibrated_tensors(model)}
    moments = {name: _Moments() for name in means_of}
    names = list(dict.fromkeys([*histograms, *moments]))
    session = runtime.open_session(_exposing(model, names), optimization="ORT_DISABLE_ALL")
    samples = 0
    for done, batch in enumerate(batches, start=1):
        for name, values in zip(names, session.run(names, dict(batch)), strict=True):
            if name in histograms:
                histograms[name].add(values)
            if name in moments:
                moments[name].add(values)
        samples += len(next(iter(batch.values())))
        if progress is not None:
            progress(done, len(batches))
    ranges = {
        name: histogram.range(percentile)
        for name, histogram in histograms.items()
        if histogram.counts is not None
    }
    summary = {name: moment.mean_and_spread() for name, moment in moments.items()}
    return CalibrationStatistics(
        ranges=ranges,
        means={name: mean for name, (mean, _) in summary.items()},
        spreads={name: spread for name, (_, spread) in summary.items()},
        samples=samples,
    )


def has_calibration_cache() -> bool:
    """Whether this onnxruntime's ``quantize_static`` takes ranges computed elsewhere
    (its ``calibration_cache_path``, with ``calibrate.save_tensors_data``)."""
    from onnxruntime.quantization import calibrate, quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters and hasattr(
        calibrate, "save_tensors_data"
    )


def quantize_with_ranges(
    model_path: Path,
    output: Path,
    ranges: Mapping[str, tuple[np.ndarray, np.ndarray]],
    **options: Any,
) -> None:
    """onnxruntime's ``quantize_static`` of ``model_path`` with percentile ``ranges``
    (through its calibration cache, a JSON file beside ``output``, removed after)."""
    from onnxruntime.quantization import CalibrationMethod, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    cache = output.with_name(output.stem + ".ranges.json")
    try:
        data = {name: TensorData(lowest=lo, highest=hi) for name, (lo, hi) in ranges.items()}
        save_tensors_data(TensorsData(CalibrationMethod.Percentile, data), cache)
        quantize_static(
            str(model_path),
            str(output),
            None,
            calibrate_method=CalibrationMethod.Percentile,
            calibration_cache_path=str(cache),
            **options,
        )
    finally:
        cache.unlink(missing_ok=True)

"""int8 calibration in one float onnxruntime pass, then onnxruntime's QDQ rewrite.

onnxruntime's ``quantize_static`` calibrates with a graph of its own (the model with
every tensor to quantize as an extra output) and, for Percentile, merges one
``np.histogram`` of ``|x|`` per tensor and batch; bias correction then ran the float
model again for the layers' input means. Here one run of the float model, batch by
batch (memory bounded by one batch's activations), gives both:

* the ranges of the tensors onnxruntime's calibrator would choose
  (:func:`tensors_to_calibrate`), as its MinMax and Percentile calibrators compute
  them: :class:`MinMaxRange` (the range over every batch) and
  :class:`AbsoluteHistogram` (onnxruntime's histogram of ``|x|``: 2048 bins over the
  first batch's range, widened by whole bins when a batch reaches beyond, and its
  percentile rule). Only the top of each histogram is counted bin by bin (the
  percentile lies there), with ``np.bincount`` of the scaled values, not
  ``np.histogram``'s sort: a value within float32 rounding of a bin edge may be
  counted in the bin beside it, so a Percentile range is onnxruntime's to one bin;
* per-channel moments of the tensors bias correction needs
  (:class:`~keras_bn.converters.bias_correction.ChannelMoments`).

onnxruntime's own quantizer (``QDQQuantizer``) then does the QDQ rewrite with these
ranges, on the model already in memory (no file round trip, no second shape
inference). Entropy calibration keeps onnxruntime's calibrator (``quantize_static``).

Everything this module relies on in onnxruntime's quantization package, beyond
``quantize_static``'s public arguments, is named in :data:`ONNXRUNTIME_RELIANCES`
and reached only from here; :func:`reliance_problem` says which one changed, and
the caller then falls back to ``quantize_static`` (``tests/test_upgrade_safety.py``
checks each).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keras_bn.converters import onnx_graph, runtime
from keras_bn.converters.bias_correction import ChannelMoments
from keras_bn.converters.errors import UserInputError

__all__ = [
    "FAST_METHODS",
    "HISTOGRAM_BINS",
    "ONNXRUNTIME_RELIANCES",
    "AbsoluteHistogram",
    "Calibration",
    "MinMaxRange",
    "activation_outputs",
    "bounded_sources",
    "calibrate",
    "channel_extremes",
    "output_overrides",
    "quantize_qdq",
    "reliance_problem",
    "replaced_ranges",
    "share_bound_ranges",
    "share_concat_ranges",
    "tensors_to_calibrate",
]

FAST_METHODS = ("MinMax", "Percentile")  # Entropy keeps onnxruntime's calibrator
HISTOGRAM_BINS = 2048  # onnxruntime's create_calibrator: Percentile's num_bins
_CALIBRATED_TYPES = (1, 10)  # TensorProto.FLOAT, FLOAT16: what its calibrators select


# ---------------------------------------------------------------------------------------
# Ranges (NumPy only).


_BLOCK = 1 << 16  # values scaled at a time when counting (np.histogram's block)


@dataclasses.dataclass
class MinMaxRange:
    """The smallest and largest value over every batch (onnxruntime's MinMax
    calibrator without moving average or symmetry)."""

    lowest: np.float32 | None = None
    highest: np.float32 | None = None
    seen: bool = False  # any value at all, finite or not

    def add(self, values: np.ndarray) -> None:
        self.seen = self.seen or np.size(values) > 0
        finite = _finite(values)
        if finite is None:
            return
        _, low, high = finite
        self.lowest = low if self.lowest is None else min(self.lowest, low)
        self.highest = high if self.highest is None else max(self.highest, high)

    def tensor_range(self) -> tuple[np.ndarray, np.ndarray]:
        """As onnxruntime's calibrator gives it: float32 arrays of shape (1,)."""
        return (
            np.array([self.lowest], dtype=np.float32),
            np.array([self.highest], dtype=np.float32),
        )


@dataclasses.dataclass
class AbsoluteHistogram:
    """onnxruntime's histogram of ``|x|`` (``HistogramCollector.collect_absolute_value``):
    ``bins`` bins over the first batch's ``[min |x|, max |x|]``; a later batch that
    reaches beyond the last edge adds bins of the same width; values below the first
    edge are not counted. ``lowest``/``highest`` are the signed extremes.

    Percentile reads only the top of the histogram, so the bins under ``floor`` are
    not counted one by one: their total is kept in bin 0 (one comparison per value
    instead of a bin index and a count; the largest tensors have millions of values
    per batch). The floor is set on the first batch so that at least ``tail`` of its
    values lie above it; :meth:`percentile_range` says when the percentile fell under
    it after all (later batches lighter-tailed than the first) and the tensor must be
    counted again with ``tail=1.0`` (every bin)."""

    bins: int = HISTOGRAM_BINS
    tail: float = 1.0  # share of the first batch counted bin by bin, at least
    counts: Any = None  # int64 counts once a batch was added; bin 0 holds all under floor
    edges: Any = None  # float32, len(counts) + 1
    lowest: Any = None
    highest: Any = None
    floor: int = 0  # the first bin counted bin by bin
    seen: bool = False  # any value at all, finite or not

    def add(self, values: np.ndarray) -> None:
        self.seen = self.seen or np.size(values) > 0
        finite = _finite(values)
        if finite is None:
            return
        flat, low, high = finite
        magnitude = flat if low >= 0 else np.abs(flat)  # a ReLU's output is its own |x|
        if self.edges is None:  # np.histogram's edges for bins=self.bins
            self.edges = _first_edges(magnitude, self.bins, max(abs(low), abs(high)))
            self.counts = np.zeros(self.bins, np.int64)
            self.lowest, self.highest = low, high
            self.floor = _floor(magnitude, self.edges, self.tail)
        else:
            self._widen(low, high)
        if not self.floor:
            self.counts += count_in_bins(magnitude, self.edges)
            return
        top = magnitude[magnitude >= self.edges[self.floor]]
        counted = magnitude.size  # those under the first edge are not counted
        if self.edges[0]:
            counted -= int(np.count_nonzero(magnitude < self.edges[0]))
        self._count(top, counted)

    def add_in_one_pass(self, values: np.ndarray, moments: ChannelMoments | None = None) -> bool:
        """:meth:`add` (and ``moments.add``) reading ``values`` from memory once (the
        first batch: twice): a block at a time, each block's extremes, top values and
        (for ``moments``) per-row sums taken while it is in the CPU's cache, instead
        of a pass over the whole tensor for each. The same edges, floor, counts,
        extremes and channel sums, bit for bit; the sum of squares (a spread for
        reports) is summed by block. Only for a histogram counting its top, on a
        C-contiguous float32 tensor (channels on axis 1 with ``moments``) of finite
        values: False, with nothing changed, otherwise (the caller adds the usual way)."""
        if (
            (self.edges is None and self.tail >= _WHOLE_TAIL)
            or (self.edges is not None and not self.floor)
            or values.dtype != np.float32
            or not values.flags.c_contiguous
            or values.ndim < (2 if moments is None else 3)
            or values.size < _SMALL_BATCH
        ):
            return False
        rows = values.reshape(values.shape[0] * values.shape[1], -1)
        sums = moments is not None
        if self.edges is None:
            scanned = self._place(values, rows, sums)
        else:
            scanned = _scan(rows, self.edges[self.floor], self.edges[0], sums)
            if scanned is not None:
                self._widen(scanned.low, scanned.high)
        if scanned is None:  # an inf or NaN (add() leaves them out), or a misplaced floor
            return False
        self.seen = True
        self._count(scanned.top, values.size - scanned.below)
        if moments is not None and scanned.row_sums is not None:  # _scan summed the rows
            channel = np.sum(scanned.row_sums.reshape(values.shape[:2]), axis=0, dtype=np.float64)
            moments.add_sums(
                np.asarray(channel), values.size // values.shape[1], len(values), scanned.squares
            )
        return True

    def _place(self, values: np.ndarray, rows: np.ndarray, sums: bool) -> _Scanned | None:
        """The first batch's two reads: the extremes (and sums), which place the edges
        and the sampled floor, then the top values; the edges, floor and extremes set.
        None, with nothing set, at an inf or NaN, or where the floor is 0 or would count
        fewer than ``tail`` of the values bin by bin (add() then counts every bin)."""
        first = _scan(rows, None, 0, sums)
        if first is None:
            return None
        edges = _edges_between(first.smallest, max(abs(first.low), abs(first.high)), self.bins)
        floor = _sampled_floor(values.reshape(-1), edges, self.tail)
        second = _scan(rows, edges[floor], edges[0], False) if floor else None
        if second is None or second.top.size < self.tail * values.size:
            return None
        self.edges, self.floor, self.counts = edges, floor, np.zeros(self.bins, np.int64)
        self.lowest, self.highest = first.low, first.high
        return dataclasses.replace(second, row_sums=first.row_sums, squares=first.squares)

    def _widen(self, low: Any, high: Any) -> None:
        """Take in a later batch's signed extremes: onnxruntime's rule for a batch
        reaching beyond the last edge, whole bins of the same width (float32)."""
        self.lowest, self.highest = min(self.lowest, low), max(self.highest, high)
        largest = max(abs(low), abs(high))
        if largest > self.edges[-1]:
            width = self.edges[1] - self.edges[0]
            more = np.arange(self.edges[-1] + width, largest + width, width)
            self.edges = np.hstack((self.edges, more)).astype(self.edges.dtype)
            self.counts = np.concatenate(
                [self.counts, np.zeros(len(self.edges) - 1 - len(self.counts), np.int64)]
            )

    def _count(self, top: np.ndarray, counted: int) -> None:
        """Count ``top`` (the values from the floor's edge up) bin by bin and the rest
        of ``counted`` (the values at or above the first edge) in bin 0."""
        self.counts += count_in_bins(top, self.edges)
        self.counts[0] += counted - top.size

    def whole_range(self) -> tuple[Any, Any, Any, Any]:
        """The signed extremes, as :meth:`percentile_range` gives its range."""
        return self.lowest, self.highest, self.counts[0], self.counts[1]

    def percentile_range(self, percentile: float) -> tuple[Any, Any, Any, Any] | None:
        """onnxruntime's ``compute_percentile`` (symmetric): ``(-t, t)`` with ``t`` the
        left edge of the bin where the cumulative share reaches ``percentile``, kept
        within the signed extremes; then the first two counts, as it returns them
        (onnxruntime's quantizer does not read them). None when that bin lies under
        :attr:`floor`, where the bins were not counted one by one."""
        counts, edges = self.counts, self.edges
        cdf = np.cumsum(counts / counts.sum())
        index = np.searchsorted(cdf, percentile / 100.0)
        if index < self.floor:
            return None
        edge = np.array(edges[index], dtype=edges.dtype)
        lowest, highest = -edge, edge
        if lowest < self.lowest:
            lowest = self.lowest
        if highest > self.highest:
            highest = self.highest
        return lowest, highest, counts[0], counts[1]


_SCAN = 1 << 17  # values per block of a one-pass scan: half a MiB of float32, in L2


@dataclasses.dataclass
class _Scanned:
    """What :func:`_scan` read."""

    low: Any  # the signed extremes
    high: Any
    smallest: Any  # the smallest |x| (only without an edge)
    top: np.ndarray  # the magnitudes at or above the edge, in order
    below: int  # how many magnitudes lie under the first edge
    row_sums: np.ndarray | None
    squares: float


def _scan(rows: np.ndarray, edge: Any, first: Any, sums: bool) -> _Scanned | None:
    """:meth:`AbsoluteHistogram.add_in_one_pass`'s read of ``rows`` (2-D, C-contiguous,
    float32), blocks of whole rows: the signed extremes; the magnitudes at or above
    ``edge`` and how many lie under ``first`` (None: the smallest magnitude instead);
    with ``sums`` each row's sum (NumPy's pairwise float32 sum of the row, as
    :func:`.channel_sums` takes it) and the sum of squares. None at the first block
    holding an inf or a NaN."""
    step = max(1, _SCAN // max(rows.shape[1], 1))
    buffer = np.empty(min(len(rows), step) * rows.shape[1], rows.dtype)
    row_sums = np.empty(len(rows), rows.dtype) if sums else None
    low = high = smallest = None
    tops, below, squares = [], 0, 0.0
    for start in range(0, len(rows), step):
        block = rows[start : start + step]
        lowest, highest = block.min(), block.max()
        if not (np.isfinite(lowest) and np.isfinite(highest)):
            return None
        low = lowest if low is None else min(low, lowest)
        high = highest if high is None else max(high, highest)
        if row_sums is not None:
            np.sum(block, axis=1, out=row_sums[start : start + len(block)])
            flat = block.reshape(-1)
            with np.errstate(over="ignore"):  # as ChannelMoments.add
                squares += float(np.dot(flat, flat))
        magnitude = block
        if lowest < 0:  # |x| of this block only: a ReLU's output is its own
            magnitude = np.abs(block, out=buffer[: block.size].reshape(block.shape))
        if edge is None:
            least = magnitude.min() if lowest < 0 else lowest
            smallest = least if smallest is None else min(smallest, least)
            continue
        tops.append(magnitude[magnitude >= edge])
        if first:
            below += int(np.count_nonzero(magnitude < first))
    top = np.concatenate(tops) if tops else np.empty(0, rows.dtype)
    return _Scanned(low, high, smallest, top, below, row_sums, squares)


def _finite(values: np.ndarray) -> tuple[np.ndarray, Any, Any] | None:
    """``values`` flattened without infinities and NaNs, with their smallest and
    largest; None when none is left. A -inf is legitimate where a layer pads before
    max pooling (KerasHub's ResNet pads with -inf): it belongs to no range, and
    quantizing saturates it at the range's low end, which max pooling never picks over
    a real value. One min and one max when every value is finite."""
    flat = np.asarray(values).reshape(-1)
    if flat.size == 0:
        return None
    low, high = np.min(flat), np.max(flat)
    if np.isfinite(low) and np.isfinite(high):
        return flat, low, high
    flat = flat[np.isfinite(flat)]
    return None if flat.size == 0 else (flat, np.min(flat), np.max(flat))


def _first_edges(magnitude: np.ndarray, bins: int, largest: Any) -> np.ndarray:
    """np.histogram's ``bins + 1`` edges over ``[min |x|, max |x|]``, as onnxruntime
    places them, in ``magnitude``'s dtype; from 0 instead where that range is too
    narrow for distinct edges in that dtype (a nearly constant tensor, such as a
    squeeze-excite gate of an untrained network: numpy, and so onnxruntime's own
    calibrator, refuses it), and at least ``bins`` smallest normal numbers wide."""
    return _edges_between(np.min(magnitude), largest, bins, magnitude.dtype)


def _edges_between(smallest: Any, largest: Any, bins: int, dtype: Any = np.float32) -> np.ndarray:
    """:func:`_first_edges` from the extremes of ``|x|`` alone (NumPy reads only the
    range and the dtype when a range is given)."""
    try:
        edges = np.histogram_bin_edges(np.empty(0, dtype), bins, range=(smallest, largest))
    except ValueError as error:
        if "Too many bins" not in str(error):
            raise
        tiny = float(np.finfo(dtype).tiny) if np.issubdtype(dtype, np.floating) else 1.0
        edges = np.linspace(0.0, max(float(largest), bins * tiny), bins + 1)
    return edges.astype(dtype)


_SAMPLE = 1 << 14  # values of the first batch sampled to place the floor
_SMALL_BATCH = 1 << 16  # values: a batch this small is counted bin by bin


_WHOLE_TAIL = 0.125  # a tail this large: every bin counted (floor 0)


def _floor(magnitude: np.ndarray, edges: np.ndarray, tail: float) -> int:
    """The highest bin with at least ``tail`` of ``magnitude`` at or above its left
    edge, placed from a random sample of the values (:func:`_sampled_floor`) and
    checked on all of them: 0 (count every bin) for small batches, a large ``tail``,
    or a sample that misled."""
    if tail >= _WHOLE_TAIL or magnitude.size < _SMALL_BATCH:
        return 0
    floor = _sampled_floor(magnitude, edges, tail)
    above = np.count_nonzero(magnitude >= edges[floor])
    return floor if floor and above >= tail * magnitude.size else 0


def _sampled_floor(values: np.ndarray, edges: np.ndarray, tail: float) -> int:
    """:func:`_floor`'s candidate before its check: from a random sample of ``|values|``
    (flat), aiming at four times ``tail`` (a strided sample of an NCHW tensor would
    see a few image columns only)."""
    sample = np.abs(values[np.random.default_rng(0).integers(0, values.size, _SAMPLE)])
    level = np.quantile(sample, 1.0 - 4.0 * tail)
    width = edges[1] - edges[0]
    return int(min(max((level - edges[0]) / width, 0), len(edges) - 2))


def count_in_bins(magnitude: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """How many of ``magnitude`` fall in each bin ``[edges[i], edges[i + 1])`` (the
    last bin includes its right edge; nothing above it is expected), for edges spaced
    uniformly: ``np.bincount`` of the scaled values, one pass, no sort. The values are
    scaled a block at a time (as ``np.histogram`` does), so that the temporaries stay
    in the CPU's cache: activations are hundreds of megabytes per calibration run."""
    bins = len(edges) - 1
    first, width = edges[0], edges[1] - edges[0]
    scale = np.float32(1.0 / float(width))
    counts = np.zeros(bins, np.int64)
    kind = magnitude.dtype if magnitude.dtype.kind == "f" else np.dtype(np.float32)
    scaled = np.empty(min(len(magnitude), _BLOCK), kind)
    below = 0
    for start in range(0, len(magnitude), _BLOCK):
        part = magnitude[start : start + _BLOCK]
        block = scaled[: len(part)]
        if first:  # values below the first edge: clipped into bin 0, then taken out
            np.subtract(part, first, out=block)
            block *= scale
            np.clip(block, 0, bins - 1, out=block)
            below += int(np.count_nonzero(part < first))
        else:
            np.multiply(part, scale, out=block)
            np.minimum(block, bins - 1, out=block)  # floor(min(v, n)) = min(floor(v), n)
        counts += np.bincount(block.astype(np.intp), minlength=bins)
    counts[0] -= below
    return counts


# ---------------------------------------------------------------------------------------
# Per-channel int8 weights (NumPy only): onnxruntime's numbers, whole arrays at a time.


def per_channel_parameters(weights: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray] | None:
    """onnxruntime's symmetric int8 zero points and scales of each channel of
    ``weights`` along ``axis`` (``compute_data_quant_params`` per channel: the range
    widened to hold 0 and made symmetric, ``2 max|w| / 254`` in float64 stored as
    float32, 1.0 where that is under float32's smallest normal), or None for an
    empty or non-finite array (left to onnxruntime, which reports it)."""
    if weights.dtype != np.float32 or weights.size == 0:
        return None
    rows = np.moveaxis(weights, axis, 0).reshape(weights.shape[axis], -1)
    largest = np.maximum(np.abs(np.minimum(rows.min(axis=1), 0)), np.maximum(rows.max(axis=1), 0))
    if not np.all(np.isfinite(largest)):
        return None
    scale = largest.astype(np.float64) * 2 / 254.0
    stored = np.where(scale < np.finfo(np.float32).tiny, 1.0, scale).astype(np.float32)
    return np.zeros(len(stored), np.int8), stored


def per_channel_integers(weights: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """``weights`` (float32) divided by each channel's ``scale`` along ``axis``, rounded
    half to even and clipped to int8, as onnxruntime's ``quantize_nparray`` does per
    channel (zero points 0)."""
    shape = [1] * weights.ndim
    shape[axis] = -1
    scaled = np.round(weights.astype(np.float32) / np.asarray(scale).reshape(shape))
    return np.clip(scaled, -128, 127).astype(np.int8)


# ---------------------------------------------------------------------------------------
# The float pass.


def tensors_to_calibrate(model: Any, op_types: Iterable[str] | None = None) -> list[str]:
    """The tensors onnxruntime's calibrator calibrates (``select_tensors_to_calibrate``),
    in graph order: every float input or output of a node whose op type onnxruntime
    quantizes (``op_types``, by default quantize_static's), not an initializer, with a
    known type (shape inference must have run)."""
    kinds = set(default_op_types() if op_types is None else op_types)
    typed = {info.name: info for info in model.graph.value_info}
    typed.update({info.name: info for info in model.graph.output})
    typed.update({info.name: info for info in model.graph.input})
    initializers = {tensor.name for tensor in model.graph.initializer}
    chosen: dict[str, None] = {}
    for node in model.graph.node:
        if node.op_type not in kinds:
            continue
        for name in (*node.input, *node.output):
            info = typed.get(name)
            if (
                info is not None
                and info.type.HasField("tensor_type")
                and info.type.tensor_type.elem_type in _CALIBRATED_TYPES
                and name not in initializers
            ):
                chosen[name] = None
    return list(chosen)


@dataclasses.dataclass
class Calibration:
    """What the float pass measured: onnxruntime's ``TensorsData`` of the ranges, the
    moments of the tensors asked for, the sample count, and the values of the tensors
    asked to be kept on the first samples."""

    ranges: Any
    moments: dict[str, ChannelMoments]
    samples: int
    kept: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def calibrate(
    model: Any,
    batches: Sequence[Mapping[str, np.ndarray]],
    method: str,
    *,
    percentile: float = 99.99,
    moments_of: Sequence[str] = (),
    progress: Callable[[int, int], None] | None = None,
    whole: Collection[str] = (),
    keep: Sequence[str] = (),
    keep_samples: int = 0,
    quantizer_exclude: Collection[str] | None = None,
) -> Calibration:
    """Run the float ``model`` (shape-inferred ``ModelProto``, not modified) once over
    ``batches``, in onnxruntime's calibration arithmetic (graph optimizations off), and
    measure every tensor to calibrate (``method``: ``"MinMax"`` or ``"Percentile"``)
    and the per-channel moments of ``moments_of``. ``progress(done, total)`` after
    each batch. The tensors named in ``whole`` get their whole range (the signed
    extremes) whatever the method. Percentile histograms count their top bins only
    (:class:`AbsoluteHistogram`); a tensor whose percentile fell under that top is
    measured again in a second pass, counting every bin. ``Calibration.kept``: the
    values of ``keep`` on exactly the first ``keep_samples`` samples (:mod:`.divergence`'s
    float side, without a second run of the float model), where the first batch holds
    them; a value cut to them must be batch-major (``onnx_graph.batch_major``), and one
    that is not is kept only when the first batch is those samples.

    ``quantizer_exclude``: the ranges go only to :func:`share_bound_ranges`, then to
    :func:`quantize_qdq` with these nodes left float. The tensors of
    :func:`replaced_ranges` are then not measured (the quantizer would replace their
    ranges before reading them), and each gets the range the quantizer gives it; those
    into a Relu or Clip are not kept either (the quantizer removes the activation and
    gives its output name to the producer's). None: every tensor measured, as
    onnxruntime's calibrator does."""
    from onnxruntime.quantization import CalibrationMethod, TensorData, TensorsData

    first = len(next(iter(batches[0].values()))) if batches and batches[0] else 0
    if first < keep_samples:
        keep = ()  # the first batch holds fewer samples: run the float model for them
    elif first > keep_samples:
        keep = onnx_graph.batch_major(model, keep)
    replaced = {} if quantizer_exclude is None else replaced_ranges(model, quantizer_exclude)
    names = [name for name in tensors_to_calibrate(model) if name not in replaced]
    # An activation's input the quantizer removes is renamed: no int8 value to compare with.
    keep = [name for name in keep if replaced.get(name) is None]
    # Percentile's bin lies in the top (1 - percentile) of all values: with batches no
    # larger than the first, the values counted bin by bin are twice that share or more
    # (when a tail is lighter after all, that tensor is counted again, every bin).
    tail = 2 * (1 - percentile / 100) * len(batches)
    collected, moments, samples, kept = _float_pass(
        model, batches, names, method, tail, moments_of, progress, keep, keep_samples
    )
    for statistic in collected.values():
        if not statistic.seen:  # no value in any batch (a split of width 0): a range of 0
            statistic.add(np.zeros(1, np.float32))
    unmeasured = [name for name, statistic in collected.items() if statistic.lowest is None]
    if unmeasured:  # values, but none finite: the float model overflows on this data
        more = f" (and {len(unmeasured) - 1} more)" if len(unmeasured) > 1 else ""
        raise UserInputError(
            f"int8 calibration: the float model's tensor {unmeasured[0]!r}{more} has no "
            "finite value on the calibration data (only inf or NaN): check the "
            "calibration inputs' scale and preprocessing"
        )
    if method == "MinMax":
        ranges = {name: statistic.tensor_range() for name, statistic in collected.items()}
    else:
        ranges = {
            name: stat.whole_range() if name in whole else stat.percentile_range(percentile)
            for name, stat in collected.items()
        }
        recount = [name for name, measured in ranges.items() if measured is None]
        if recount:  # a tail lighter than the first batch's: count every bin again
            again, _, _, _ = _float_pass(model, batches, recount, method, 1.0, (), None)
            ranges.update({name: again[name].percentile_range(percentile) for name in recount})
    probabilities = TensorData(lowest=np.float32(0.0), highest=np.float32(1.0))  # a Softmax's
    for name, source in replaced.items():  # in the order they would be replaced
        ranges[name] = probabilities if source is None else ranges[source]
    return Calibration(TensorsData(CalibrationMethod[method], ranges), moments, samples, kept)


def replaced_ranges(model: Any, exclude: Collection[str] = ()) -> dict[str, str | None]:
    """The calibrated tensors whose measured range is replaced before anything reads it,
    on the way to :func:`quantize_qdq` with the nodes in ``exclude`` left float: those
    of :func:`_quantizer_replacements` (both tensors calibrated), each with the tensor
    whose range it takes (None: a probability's, 0 to 1), in order. ResNet50's 49
    convolution outputs into a ReLU are such tensors. Left out: a tensor whose own range
    is read on the way (by another replacement, as a ReLU's output into a Clip, or by
    :func:`share_bound_ranges`, which runs first), and the graph outputs (their whole
    range, :func:`calibrate`'s ``whole``; :func:`output_overrides` keeps it)."""
    calibrated = set(tensors_to_calibrate(model))
    replaced = {
        name: source
        for name, source in _quantizer_replacements(model, exclude).items()
        if name in calibrated and (source is None or source in calibrated)
    }
    read = set(replaced.values()) | {output.name for output in model.graph.output}
    read.update(bounded_sources(model).values())  # share_bound_ranges reads them first
    return {name: source for name, source in replaced.items() if name not in read}


def activation_outputs(model: Any, exclude: Collection[str] = ()) -> list[str]:
    """The graph outputs that onnxruntime's quantizer gives a Relu's or Clip's range
    (:func:`_quantizer_replacements`), so that their negative values would all come out
    as 0, unless an override keeps each output's own (:func:`output_overrides`; the
    activation stays, an output is never removed)."""
    replaced = _quantizer_replacements(model, exclude)
    return [output.name for output in model.graph.output if replaced.get(output.name)]


def output_overrides(model: Any, ranges: Any, exclude: Collection[str] = ()) -> dict[str, Any]:
    """onnxruntime's ``TensorQuantOverrides`` keeping each :func:`activation_outputs`
    tensor's own range in ``ranges``."""
    overrides = {}
    for name in activation_outputs(model, exclude):
        if name in ranges:
            lowest, highest = (np.float32(np.ravel(v)[0]) for v in ranges[name].range_value)
            overrides[name] = [{"rmin": lowest, "rmax": highest}]
    return overrides


def _quantizer_replacements(model: Any, exclude: Collection[str]) -> dict[str, str | None]:
    """The ranges onnxruntime's quantizer replaces (``BaseQuantizer.adjust_tensor_ranges``,
    before it computes any scale), with the nodes in ``exclude`` left float, in its
    order: the input of a Relu or Clip it quantizes, read by that node alone, takes the
    node's output range (the activation is then removed and the producer's output
    quantized with it); a Softmax's output takes 0 to 1 (None). It replaces only ranges
    it was given: callers keep the calibrated tensors."""
    kinds, excluded = set(default_op_types()), set(exclude)
    readers = onnx_graph.readers(model.graph)  # a slot per read, as the quantizer counts
    replaced: dict[str, str | None] = {}
    for node in model.graph.node:
        if node.op_type not in kinds or node.name in excluded:
            continue
        if node.op_type in ("Relu", "Clip") and len(readers.get(node.input[0], ())) == 1:
            replaced[node.input[0]] = node.output[0]
        elif node.op_type == "Softmax":
            replaced[node.output[0]] = None
    return replaced


def bounded_sources(model: Any) -> dict[str, str]:
    """Each tensor read by nothing but a ``Min`` or ``Max`` against a constant (the
    per-channel ReLU6 bound :mod:`.equalization` puts after a Clip), mapped to that
    node's output; graph outputs excluded."""
    constants = {tensor.name for tensor in model.graph.initializer}
    constants.update(node.output[0] for node in model.graph.node if node.op_type == "Constant")
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {output.name for output in model.graph.output}
    return {
        node.input[0]: node.output[0]
        for node in model.graph.node
        if node.op_type in ("Min", "Max")
        and len(node.input) == 2
        and node.input[1] in constants
        and readers.get(node.input[0]) == 1
        and node.input[0] not in outputs
    }


def share_bound_ranges(model: Any, ranges: Any) -> None:
    """Give each :func:`bounded_sources` tensor its bound's output range, in ``ranges``
    (``TensorsData``) in place.

    Lossless: the bound's output is quantized with its own range anyway, and
    ``min(clamp(x), c)`` then rounds to the same value as ``min(x, c)`` (a value of
    ``x`` beyond that range ends beyond it either way), while the source's own range
    reaches the widest channel's bound (ReLU6 after equalization: ``6 / s_c``, up to
    ``6 / min(s)``) and rounds every channel on that coarser grid first.
    EfficientNet-Lite0 per-tensor int8 (BENCHMARKS.md, section 30): +0.5 dB."""
    for source, bounded in bounded_sources(model).items():
        if source in ranges and bounded in ranges:
            ranges[source] = ranges[bounded]


def share_concat_ranges(model: Any, ranges: Any) -> None:
    """Give each Concat output the union of its inputs' ranges, in ``ranges``
    (``TensorsData``) in place, in graph order (a chain of Concats passes the union
    on); graph outputs keep their own (whole) range.

    A Concat's output holds nothing but its inputs' values, so this range clips
    nothing the inputs' do not. Its own percentile (onnxruntime's calibration) moves
    a little with each Concat of a chain, so the values a chain carries were rounded
    again onto a slightly different grid at every Concat; with the union they keep
    their scale wherever theirs is the widest range (a dense block's input). DenseNet's
    blocks chain up to 24 Concats: 15 dB of output SQNR with their own percentiles
    (onnxruntime's ``quantize_static`` too), 33 dB with the union (DenseNet121, random
    weights, per-channel; BENCHMARKS.md, section 54)."""
    from onnxruntime.quantization import TensorData

    outputs = {output.name for output in model.graph.output}
    for node in model.graph.node:
        if node.op_type != "Concat" or node.output[0] in outputs or node.output[0] not in ranges:
            continue
        if not node.input or not all(name in ranges for name in node.input):
            continue
        lows = [np.ravel(ranges[name].range_value[0])[0] for name in node.input]
        highs = [np.ravel(ranges[name].range_value[1])[0] for name in node.input]
        ranges[node.output[0]] = TensorData(
            lowest=np.float32(min(lows)), highest=np.float32(max(highs))
        )


def channel_extremes(
    model: Any,
    batches: Iterable[Mapping[str, np.ndarray]],
    names: Iterable[str],
    *,
    kept_bytes: int = 0,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[np.ndarray], dict[str, np.ndarray]]:
    """Each tensor of ``names``' smallest and largest value per channel (axis 1) over
    ``batches`` (float64), the model's own outputs on them (concatenated, float64),
    and, with ``kept_bytes``, the values of ``names`` on the first samples (as many as
    fit in that many bytes, at least one; float32), from one float run of ``model``
    (``ModelProto``, not modified)."""
    names = list(dict.fromkeys(names))
    own = [output.name for output in model.graph.output]
    fetched = [*own, *(name for name in names if name not in own)]
    # onnxruntime's default optimizations (as the equalized model's check run): the
    # extremes bound scale factors, so float32 rounding does not matter to them, and
    # its blocked layout runs depthwise convolutions several times faster than the
    # graph as written (MobileNetV2: 0.44 against 0.93 s; BENCHMARKS.md, section 50).
    session = runtime.open_session(
        onnx_graph.with_outputs(model, fetched, in_place=True), spinning=False
    )
    extremes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    outputs: list[list[np.ndarray]] = [[] for _ in own]
    kept: dict[str, list[np.ndarray]] = {name: [] for name in names} if kept_bytes else {}
    wanted = 0  # samples to keep, from the first batch's sizes
    for batch in batches:
        values = dict(zip(fetched, session.run(fetched, dict(batch)), strict=True))
        for collected, name in zip(outputs, own, strict=True):
            collected.append(np.asarray(values[name], np.float64))
        if kept and not wanted:
            per_sample = sum(values[name][:1].astype(np.float32).nbytes for name in names)
            wanted = max(1, kept_bytes // max(per_sample, 1))
        for name, parts in kept.items():
            held = sum(len(part) for part in parts)
            if held < wanted:
                parts.append(np.array(values[name][: wanted - held], np.float32))
        for name in names:
            axes = (0, *range(2, values[name].ndim))
            lowest = values[name].min(axis=axes).astype(np.float64)
            highest = values[name].max(axis=axes).astype(np.float64)
            if name in extremes:
                lowest = np.minimum(extremes[name][0], lowest)
                highest = np.maximum(extremes[name][1], highest)
            extremes[name] = (lowest, highest)
    samples = {name: np.concatenate(parts) for name, parts in kept.items() if parts}
    return extremes, [np.concatenate(parts) for parts in outputs], samples


def _float_pass(
    model: Any,
    batches: Sequence[Mapping[str, np.ndarray]],
    names: Sequence[str],
    method: str,
    tail: float,
    moments_of: Sequence[str],
    progress: Callable[[int, int], None] | None,
    keep: Sequence[str] = (),
    keep_samples: int = 0,
) -> tuple[dict[str, Any], dict[str, ChannelMoments], int, dict[str, np.ndarray]]:
    """:func:`calibrate`'s run of ``model`` over ``batches``: the range statistic of
    each of ``names`` (histograms counting ``tail`` of the first batch bin by bin),
    the moments of ``moments_of``, the sample count, and ``keep``'s values on the
    first batch's first ``keep_samples`` samples (copies)."""
    inputs = {info.name for info in model.graph.input}
    wanted = [*names, *moments_of, *(keep if keep_samples else ())]
    fetched = [name for name in dict.fromkeys(wanted) if name not in inputs]
    session = runtime.open_session(
        onnx_graph.with_outputs(model, fetched, in_place=True),
        optimization="ORT_DISABLE_ALL",
        spinning=False,
    )
    collected: dict[str, Any] = {
        name: MinMaxRange() if method == "MinMax" else AbsoluteHistogram(tail=tail)
        for name in names
    }
    moments = {name: ChannelMoments() for name in moments_of}
    samples = 0
    kept: dict[str, np.ndarray] = {}
    for done, batch in enumerate(batches, start=1):
        values = dict(zip(fetched, session.run(fetched, dict(batch)), strict=True))
        values.update({name: batch[name] for name in inputs if name in batch})
        if done == 1 and keep_samples:
            kept = {name: np.array(values[name][:keep_samples]) for name in keep}
        for name, statistic in collected.items():
            moment = moments.get(name)
            if isinstance(statistic, AbsoluteHistogram) and statistic.add_in_one_pass(
                values[name], moment
            ):
                continue
            statistic.add(values[name])
            if moment is not None:
                moment.add(values[name])
        for name, moment in moments.items():
            if name not in collected:
                moment.add(values[name])
        samples += len(next(iter(batch.values())))
        del values
        if progress is not None:
            progress(done, len(batches))
    return collected, moments, samples, kept


# ---------------------------------------------------------------------------------------
# onnxruntime's quantizer, and what this module relies on in it.


def default_op_types() -> list[str]:
    """The op types ``quantize_static`` quantizes (and calibrates) by default."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return list(set(QLinearOpsRegistry) | set(QDQRegistry))


def quantize_qdq(
    model: Any,
    ranges: Any,
    *,
    per_channel: bool,
    extra_options: Mapping[str, Any],
    exclude: Sequence[str] = (),
) -> Any:
    """onnxruntime's QDQ rewrite (``QDQQuantizer``, as ``quantize_static`` runs it for
    QDQ int8 weights and activations) of ``model`` (shape-inferred, marked
    pre-processed; consumed) with ``ranges``: the quantized ``ModelProto``, nodes in
    topological order as ``quantize_static`` saves them. Per-channel int8 weights get
    their scales and integers a whole array at a time (:func:`_whole_array_weights`),
    not one channel at a time: the same numbers. The nodes named in ``exclude`` stay
    float."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    add_infer_metadata(model)  # what quantize_static's loading adds
    quantizer = _quantizer_class()(
        model,
        per_channel,
        False,  # reduce_range
        QuantType.QInt8,
        QuantType.QInt8,
        ranges,
        [],  # nodes_to_quantize: all
        list(exclude),  # nodes_to_exclude
        default_op_types(),
        dict(extra_options),
    )
    _rewire_by_lookup(quantizer.model)
    with _whole_array_weights(), _quiet_axis_warnings():
        quantizer.quantize_model()
    quantizer.model.topological_sort()
    return quantizer.model.model


def _rewire_by_lookup(model: Any) -> None:
    """``model``'s (the quantizer's ``ONNXModel``) ``replace_input_of_all_nodes`` and
    ``replace_output_of_all_nodes`` with the same effect, each node tested with one
    C-level lookup (``name in node.input``) before its inputs are walked in Python.
    onnxruntime's walks every input of every node for each tensor it quantizes
    (EfficientNetB0: 208,000 ``replace_node_input`` calls, 0.35 s of its rewrite)."""
    nodes = model.model.graph.node  # onnxruntime's walk: the main graph's nodes

    def replace_inputs(old: str, new: str) -> None:
        for node in nodes:
            if old in node.input:
                type(model).replace_node_input(node, old, new)

    def replace_outputs(old: str, new: str) -> None:
        for node in nodes:
            if old in node.output:
                type(model).replace_node_output(node, old, new)

    model.replace_input_of_all_nodes = replace_inputs
    model.replace_output_of_all_nodes = replace_outputs


class _AxisWarnings(logging.Filter):
    """Drops the quantizer's "Axis 1 is out-of-range for weight 'gamma' with rank 1",
    logged on the root logger for every 1-D weight of a per-channel op (a LayerNorm's
    scale: it gets one scale, as it should), five times per LayerNorm of a text model."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is out-of-range for weight" not in record.getMessage()


@contextlib.contextmanager
def _quiet_axis_warnings() -> Iterator[None]:
    quiet = _AxisWarnings()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


@functools.cache
def _quantizer_class() -> type:
    """``QDQQuantizer`` with :meth:`_calc_initializer_quant_params` computing the
    parameters of plain per-channel int8 weights (no overrides, no blocks, no reduced
    or minimum range: ours) from whole arrays; everything else stays onnxruntime's."""
    from onnx import TensorProto, numpy_helper
    from onnxruntime.quantization import QDQQuantizer
    from onnxruntime.quantization.base_quantizer import QuantizationParams
    from onnxruntime.quantization.qdq_quantizer import QDQQuantTensorType

    class WholeArrayQuantizer(QDQQuantizer):
        def _calc_initializer_quant_params(self) -> dict[str, Any]:
            everything: dict[str, Any] = self.tensors_to_quantize  # type: ignore[has-type]
            arrays = {tensor.name: tensor for tensor in self.model.initializer()}
            ours = {}
            for name, info in everything.items():
                if name in arrays and self._plain_per_channel(info):
                    weights = numpy_helper.to_array(arrays[name])
                    axis = info.axis % weights.ndim
                    found = per_channel_parameters(weights, axis)
                    if found is not None:
                        zero_point, scale = found
                        ours[name] = QuantizationParams(
                            zero_point=zero_point,
                            scale=scale,
                            quant_type=TensorProto.INT8,
                            axis=axis,
                        )
            self.tensors_to_quantize = {n: i for n, i in everything.items() if n not in ours}
            try:
                theirs = super()._calc_initializer_quant_params()
            finally:
                self.tensors_to_quantize = everything
            return {
                name: ours[name] if name in ours else theirs[name]
                for name in everything
                if name in ours or name in theirs
            }

        def _plain_per_channel(self, info: Any) -> bool:
            # Attributes read with defaults that leave the tensor to onnxruntime.
            return (
                getattr(info, "tensor_type", None) is QDQQuantTensorType.WEIGHT
                and getattr(info, "axis", None) is not None
                and getattr(self, "weight_qType", None) == TensorProto.INT8
                and getattr(self, "reduce_range", True) is False
                and getattr(self, "min_real_range", 0) is None
                and getattr(self, "block_size", None) == 0
                and not getattr(self, "tensor_quant_overrides", True)
            )

    return WholeArrayQuantizer


_SWAP = threading.Lock()


@contextlib.contextmanager
def _whole_array_weights() -> Iterator[None]:
    """onnxruntime's ``quantize_onnx_initializer``, as its QDQ rewrite calls it, made
    whole-array for per-channel int8 weights (:func:`per_channel_integers`, the same
    integers) while the block runs; other calls go to onnxruntime's own."""
    from onnx import TensorProto, numpy_helper
    from onnxruntime.quantization import qdq_quantizer
    from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX

    theirs = qdq_quantizer.quantize_onnx_initializer

    def quantize_onnx_initializer(
        weight: Any,
        quant_type: Any,
        zero_point: np.ndarray,
        scale: np.ndarray,
        axis: int | None = None,
        quant_weight_name: str | None = None,
        block_size: int = 0,
    ) -> Any:
        if (
            axis is None
            or block_size
            or quant_type != TensorProto.INT8
            or weight.data_type != TensorProto.FLOAT
            or np.any(zero_point)
        ):
            return theirs(
                weight, quant_type, zero_point, scale, axis, quant_weight_name, block_size
            )
        integers = per_channel_integers(numpy_helper.to_array(weight), scale, axis)
        return numpy_helper.from_array(
            integers, quant_weight_name or f"{weight.name}{TENSOR_NAME_QUANT_SUFFIX}"
        )

    with _SWAP:
        qdq_quantizer.quantize_onnx_initializer = quantize_onnx_initializer
        try:
            yield
        finally:
            qdq_quantizer.quantize_onnx_initializer = theirs


def _parameters_are(function: Any, *names: str) -> str | None:
    try:
        found = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return f"{function!r} has no readable signature"
    if found[: len(names)] != list(names):
        return f"{getattr(function, '__qualname__', function)} takes {found}, not {list(names)}"
    return None


def _quantizer() -> str | None:
    from onnxruntime.quantization import QDQQuantizer
    from onnxruntime.quantization.onnx_model import ONNXModel

    return (
        _parameters_are(
            QDQQuantizer.__init__,
            "self",
            "model",
            "per_channel",
            "reduce_range",
            "weight_qType",
            "activation_qType",
            "tensors_range",
            "nodes_to_quantize",
            "nodes_to_exclude",
            "op_types_to_quantize",
            "extra_options",
        )
        or _parameters_are(QDQQuantizer.quantize_model, "self")
        or _parameters_are(ONNXModel.topological_sort, "self")
        or _rewiring(ONNXModel)
    )


def _rewiring(model_class: type) -> str | None:
    """What :func:`_rewire_by_lookup` stands in for (methods), and calls (static)."""
    for name, first in (
        ("replace_input_of_all_nodes", "self"),
        ("replace_output_of_all_nodes", "self"),
        ("replace_node_input", "node"),
        ("replace_node_output", "node"),
    ):
        found = list(inspect.signature(getattr(model_class, name)).parameters)
        if len(found) != 3 or found[0] != first:
            return f"ONNXModel.{name} takes {found}, not ({first}, old name, new name)"
        if first == "node" and not isinstance(
            inspect.getattr_static(model_class, name), staticmethod
        ):
            return f"ONNXModel.{name} is no longer a static method"
    return None


def _registries() -> str | None:
    from onnxruntime.quantization import registry

    for name in ("QLinearOpsRegistry", "QDQRegistry"):
        if not isinstance(getattr(registry, name, None), dict):
            return f"onnxruntime.quantization.registry.{name} is no longer a dict"
    return None


def _ranges() -> str | None:
    from onnxruntime.quantization import TensorData, TensorsData

    problem = _parameters_are(TensorsData.__init__, "self", "calibration_method", "data")
    if problem is not None:
        return problem
    try:
        TensorData(lowest=np.float32(0), highest=np.float32(1), hist=np.zeros(1), bins=np.zeros(2))
    except (TypeError, ValueError):
        return "onnxruntime's TensorData no longer takes lowest, highest, hist and bins"
    return None


def _metadata() -> str | None:
    from onnxruntime.quantization import quant_utils

    return _parameters_are(
        getattr(quant_utils, "add_infer_metadata", None), "model"
    ) or _parameters_are(getattr(quant_utils, "add_pre_process_metadata", None), "model")


def _histogram() -> str | None:
    from onnxruntime.quantization.calibrate import HistogramCollector, create_calibrator

    source = inspect.getsource(create_calibrator)
    if '"num_bins", 2048' not in source or '"symmetric", True' not in source:
        return "create_calibrator's Percentile defaults are no longer 2048 bins, symmetric"
    return _parameters_are(
        HistogramCollector.collect_absolute_value, "self", "name_to_arr"
    ) or _parameters_are(HistogramCollector.compute_percentile, "self")


def _weights() -> str | None:
    from onnxruntime.quantization import qdq_quantizer
    from onnxruntime.quantization.base_quantizer import QuantizationParams  # noqa: F401
    from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX  # noqa: F401

    if not hasattr(qdq_quantizer.QDQQuantTensorType, "WEIGHT"):
        return "QDQQuantTensorType has no WEIGHT"
    # The module's text, not inspect.getsource(QDQQuantizer): a class's source is found
    # with ast.parse, which CPython 3.11 does not allow beside another thread's parse.
    source = Path(inspect.getfile(qdq_quantizer)).read_text(encoding="utf-8")
    for used in (
        "self.tensors_to_quantize",
        "self.block_size",
        "self.initializer_quant_params = self._calc_initializer_quant_params()",
        "quantize_onnx_initializer(",
    ):
        if used not in source:
            return f"QDQQuantizer no longer has {used!r}"
    return _parameters_are(
        qdq_quantizer.quantize_onnx_initializer,
        "weight",
        "quant_type",
        "zero_point",
        "scale",
        "axis",
        "quant_weight_name",
        "block_size",
    )


# What the fast path relies on -> how to tell it changed (a sentence, or None).
ONNXRUNTIME_RELIANCES: dict[str, tuple[str, Callable[[], str | None]]] = {
    "quantizer": (
        "onnxruntime.quantization.QDQQuantizer(model, per_channel, reduce_range, "
        "weight_qType, activation_qType, tensors_range, nodes_to_quantize, nodes_to_exclude, "
        "op_types_to_quantize, extra_options).quantize_model() and its .model "
        "(ONNXModel.topological_sort, .model; replace_input_of_all_nodes and "
        "replace_output_of_all_nodes(old, new) over .model.graph.node, with the static "
        "replace_node_input and replace_node_output(node, old, new))",
        _quantizer,
    ),
    "op types": (
        "onnxruntime.quantization.registry.QLinearOpsRegistry and QDQRegistry: the op "
        "types quantize_static quantizes and calibrates by default",
        _registries,
    ),
    "ranges": (
        "onnxruntime.quantization.TensorsData(calibration_method, data) of "
        "TensorData(lowest, highest[, hist, bins])",
        _ranges,
    ),
    "metadata": (
        "onnxruntime.quantization.quant_utils.add_infer_metadata(model) and "
        "add_pre_process_metadata(model)",
        _metadata,
    ),
    "weights": (
        "onnxruntime's QDQQuantizer method _calc_initializer_quant_params() (its .tensors_to_quantize, "
        ".block_size, .min_real_range, .reduce_range, .weight_qType, .tensor_quant_overrides), "
        "qdq_quantizer.quantize_onnx_initializer(weight, quant_type, zero_point, scale, axis, "
        "quant_weight_name, block_size), QuantizationParams, QDQQuantTensorType.WEIGHT and "
        "TENSOR_NAME_QUANT_SUFFIX: per-channel weights a whole array at a time",
        _weights,
    ),
    "histogram": (
        "onnxruntime's Percentile calibrator: 2048 bins of |x| "
        "(create_calibrator's defaults, HistogramCollector.collect_absolute_value, "
        "compute_percentile), replicated by AbsoluteHistogram",
        _histogram,
    ),
}


def reliance_problem() -> str | None:
    """The first changed reliance, as a sentence, or None when all hold."""
    for what, (_, check) in ONNXRUNTIME_RELIANCES.items():
        try:
            problem = check()
        except (ImportError, AttributeError, OSError, TypeError) as error:
            problem = f"{type(error).__name__}: {error}"
        if problem is not None:
            return f"onnxruntime's {what} changed: {problem}"
    return None

"""Rounding a quantized (QDQ) ONNX model's int8 weights against each layer's inputs (GPTQ).

onnxruntime's quantizer rounds every weight to its nearest int8 level, which makes
each weight's own error smallest. What the model feels is each layer's *output*
error, ``(W - W_q) x`` over the inputs the layer sees: with ``H = sum x x^T`` (the
second moments of the layer's input patches on calibration data), an output
channel's error power is ``(w - w_q)^T H (w - w_q)``. Correlated inputs let one
weight's rounding error be cancelled by its neighbours'. GPTQ (Frantar et al. 2023,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", from Optimal Brain Quantization) rounds one input column at a time
and moves the error it leaves onto the columns not yet rounded, weighted by the
inverse of ``H`` through its Cholesky factor (:func:`gptq_round`). The scales and
zero points stay as the quantizer chose them; only the integers change, so the
file runs on the same kernels.

It matters where a layer's weights get few levels: per-tensor weights, where one
scale serves channels of different ranges (equalization narrows, not closes, that
gap), and depthwise layers, 9 weights per channel. Per-tensor it gains 0.5 dB of logit
SQNR on MobileNetV2 and 1.1 dB on EfficientNet-Lite0 (with bias tuning after it);
with per-channel weights, on the depthwise layers, it lifts MobileNetV2's top-1
agreement over 98% (BENCHMARKS.md, section 36). ``H`` comes from one float pass over
the first ``ROUNDING_SAMPLES`` calibration samples (:func:`patches` lays out what a
Conv's kernel sees, 1-D convolutions as one row of a 2-D one); depthwise layers get
one ``H`` per channel, Gemm layers their input's. Bias correction, which runs next,
corrects the mean shift of whichever integers it finds.

The maths are NumPy functions (:func:`patches`, :func:`gptq_round`,
:func:`output_error`); the rest finds the layers and runs the float model.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from keras_bn.converters import onnx_graph, runtime

__all__ = ["WeightRoundingReport", "gptq_round", "output_error", "patches", "round_weights"]

ROUNDING_SAMPLES = 64  # calibration samples whose layer inputs give H (D x D, D up to ~5000)
DEPTHWISE_SAMPLES = 32  # enough for a depthwise layer's 9 x 9 H per channel, at half the cost
DAMPING = 0.01  # added to H's diagonal, relative to its mean: a singular H still inverts
BLOCK = 128  # columns rounded between two matrix products (GPTQ's lazy batch)
CHUNK = 4  # samples whose patches are summed at once (a depthwise layer's are 9x its input)
RUN = 16  # samples per float run at most (fewer, larger runs: BENCHMARKS.md section 50)
EXPOSED_BYTES = 256 * 2**20  # layer inputs two float runs may hold at once (fewer samples if more)


# ---------------------------------------------------------------------------------------
# Maths (NumPy only).


def patches(
    x: np.ndarray,
    kernel: Sequence[int],
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    *,
    depthwise: bool = False,
) -> np.ndarray:
    """What a 2-D Conv's kernel sees in ``x`` (NCHW; ONNX ``pads`` order: top, left,
    bottom, right), one column per output position, so that the convolution is
    ``W.reshape(out, -1) @ patches``: shape ``(C * kh * kw, positions)``, rows in
    ``W``'s (C, kh, kw) order. With ``depthwise`` each channel apart:
    ``(C, kh * kw, positions)``. (Positions last: the copy then runs along rows.)"""
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    spans = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    windows = np.lib.stride_tricks.sliding_window_view(x, spans, axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # (N, C, out_h, out_w, kh, kw)
    columns = windows.transpose(1, 4, 5, 0, 2, 3)  # (C, kh, kw, N, out_h, out_w)
    if depthwise:
        return columns.reshape(x.shape[1], kh * kw, -1)
    return columns.reshape(x.shape[1] * kh * kw, -1)


def gptq_round(
    weights: np.ndarray,
    moments: np.ndarray,
    scale: np.ndarray | float,
    zero: float = 0.0,
    low: float = -128,
    high: float = 127,
    damping: float = DAMPING,
) -> np.ndarray:
    """Integers for ``weights`` (rows: output channels, columns: inputs) on the grid
    ``(q - zero) * scale`` (``scale`` per row or one), in ``[low, high]``, chosen
    column by column with GPTQ against ``moments`` (``H``: one ``(D, D)`` matrix, or
    one per row, ``(rows, D, D)``). With a diagonal ``H`` this is round-to-nearest."""
    weights = np.array(weights, np.float64)
    rows, columns = weights.shape
    stacked = np.asarray(moments, np.float64).reshape(-1, columns, columns)
    diagonal = np.einsum("rii->ri", stacked)
    damp = damping * diagonal.mean(axis=1) + np.finfo(np.float64).tiny
    damped = stacked + damp[:, None, None] * np.eye(columns)
    # H^-1 = U^T U with U upper triangular: row d of U carries column d's error onward.
    upper = np.linalg.cholesky(np.linalg.inv(damped)).transpose(0, 2, 1)
    shared = len(upper) == 1
    steps = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (rows,))
    ints = np.empty((rows, columns), np.int64)
    for start in range(0, columns, BLOCK):  # GPTQ's lazy batches: one product per block
        stop = min(start + BLOCK, columns)
        block = upper[:, start:stop, start:stop]
        errors = np.empty((rows, stop - start))
        for d in range(stop - start):
            column = np.clip(np.round(weights[:, start + d] / steps) + zero, low, high)
            ints[:, start + d] = column
            error = weights[:, start + d] - (column - zero) * steps
            error /= block[0, d, d] if shared else block[:, d, d]
            after = block[0, d, d + 1 :] if shared else block[:, d, d + 1 :]
            weights[:, start + d + 1 : stop] -= error[:, None] * after
            errors[:, d] = error
        rest = upper[:, start:stop, stop:]
        if shared:
            weights[:, stop:] -= errors @ rest[0]
        else:
            weights[:, stop:] -= np.einsum("rb,rbc->rc", errors, rest)
    return ints


def output_error(
    weights: np.ndarray,
    ints: np.ndarray,
    moments: np.ndarray,
    scale: np.ndarray | float,
    zero: float = 0.0,
) -> float:
    """``sum over rows of (w - w_q)^T H (w - w_q)``: the layer's output error power
    over the inputs ``moments`` (``H``, as in :func:`gptq_round`) were summed from."""
    steps = np.asarray(scale, np.float64).reshape(-1, 1)
    errors = np.asarray(weights, np.float64) - (np.asarray(ints, np.float64) - zero) * steps
    stacked = np.asarray(moments, np.float64).reshape(-1, errors.shape[1], errors.shape[1])
    if len(stacked) == 1:
        return float(np.sum((errors @ stacked[0]) * errors))
    return float(np.sum(np.matmul(errors[:, None, :], stacked)[:, 0] * errors))


# ---------------------------------------------------------------------------------------
# Report.


@dataclasses.dataclass
class WeightRoundingReport:
    """What :func:`round_weights` did: the layers whose integers it chose, those it
    left (with the reason), and the median over those layers of each one's output error
    power against round-to-nearest's, on the samples ``H`` came from. (A median of
    ratios, not a ratio of sums: layers' errors differ by orders of magnitude, and a sum
    is one layer's, often the stem's, whose 27 weights per channel leave GPTQ little.)"""

    rounded: list[str]
    skipped: dict[str, str]  # node name -> why it kept its integers
    samples: int
    error_db: float | None  # median of 10 log10(GPTQ's / nearest's error); None: none rounded
    depthwise_only: bool = False  # only depthwise layers were considered

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        kind = "depthwise " if self.depthwise_only else ""
        if self.error_db is None:
            text = f"weight rounding: no {kind or 'Conv/Gemm '}layer with int8 weights to round"
        else:
            text = (
                f"weight rounding (GPTQ): {len(self.rounded)} {kind}layer(s) on "
                f"{self.samples} sample(s); a layer's output error {self.error_db:+.1f} dB "
                "against round-to-nearest (median)"
            )
        return text + (f"; {len(self.skipped)} layer(s) kept" if self.skipped else "")


# ---------------------------------------------------------------------------------------
# ONNX plumbing.


@dataclasses.dataclass
class _Layer:
    """A layer whose integers can be chosen: its node, its 8-bit weight initializer
    (name, values, per-row scale, zero point, bounds), its float weights as rows, and
    the float tensor it reads. ``kind``: "conv", "depthwise" or "gemm"."""

    node: Any
    initializer: str
    ints: np.ndarray
    scale: np.ndarray
    zero: float
    low: int
    high: int
    rows: np.ndarray
    input: str
    kind: str
    transposed: bool = False  # a Gemm whose weights are (inputs, outputs)
    # A convolution's kernel, strides, pads, dilations as :func:`patches` takes them
    # (a 1-D one as one row of a 2-D one); None for a Gemm.
    geometry: tuple[list[int], list[int], list[int], list[int]] | None = None

    def to_initializer(self, ints: np.ndarray) -> np.ndarray:
        """``ints`` (rows, columns) in the initializer's layout and type."""
        values = ints.T if self.transposed else ints
        return values.reshape(self.ints.shape).astype(self.ints.dtype)

    def original(self) -> np.ndarray:
        """The quantizer's integers as rows."""
        values = self.ints.T if self.transposed else self.ints
        return values.reshape(len(self.rows), -1).astype(np.int64)


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def _layer(
    node: Any, dequantize: Any, initializers, float_node: Any, float_weights
) -> _Layer | str:
    """The layer of ``node`` (its weights read through ``dequantize``), or why not."""
    from onnx import numpy_helper

    ints = numpy_helper.to_array(initializers[dequantize.input[0]])
    if ints.dtype not in (np.int8, np.uint8):
        return "its weights are not stored as 8-bit integers"
    if float_node is None or float_node.input[1] not in float_weights:
        return "no float weights of that node in the float model"
    weights = numpy_helper.to_array(float_weights[float_node.input[1]]).astype(np.float64)
    attributes = _attributes(node)
    scale = numpy_helper.to_array(initializers[dequantize.input[1]]).astype(np.float64)
    zeros = (
        numpy_helper.to_array(initializers[dequantize.input[2]])
        if len(dequantize.input) > 2 and dequantize.input[2] in initializers
        else np.zeros(1, ints.dtype)
    )
    if np.unique(zeros).size != 1 or weights.shape != ints.shape:
        return "per-channel zero points, or weights of another shape"
    transposed = node.op_type == "Gemm" and not attributes.get("transB", 0)
    axis = _axis(dequantize)
    if scale.size > 1 and axis != (1 if transposed else 0):
        return "its weight scales are not per output channel"
    kind = "gemm"
    if node.op_type == "Gemm":
        if attributes.get("transA", 0):
            return "a Gemm with a transposed input"
        rows = weights.T if transposed else weights
    else:
        group = attributes.get("group", 1)
        if len(weights.shape) not in (3, 4) or attributes.get("auto_pad", b"NOTSET") not in (
            b"NOTSET",
            "NOTSET",
        ):
            return "not a 1-D or 2-D convolution with explicit padding"
        if group > 1 and weights.shape[1] != 1:
            return "a grouped convolution (not depthwise)"
        if group > 1 and group != weights.shape[0]:
            # Tried with one H per input channel shared by its output channels: on the
            # trained depthwise 1-D net -0.38 to +0.07 dB (BENCHMARKS.md, section 37).
            return "a depthwise convolution with a depth multiplier"
        kind = "depthwise" if group > 1 else "conv"
        rows = weights.reshape(len(weights), -1)
    info = np.iinfo(ints.dtype)
    return _Layer(
        node, dequantize.input[0], ints, np.broadcast_to(scale.reshape(-1), (len(rows),)),
        float(zeros.reshape(-1)[0]), int(info.min), int(info.max), rows, float_node.input[0],
        kind, transposed, None if kind == "gemm" else _geometry(attributes, weights.shape[2:]),
    )  # fmt: skip


def _geometry(
    attributes: Mapping[str, Any], spatial: Sequence[int]
) -> tuple[list[int], list[int], list[int], list[int]]:
    """A Conv's kernel, strides, pads and dilations in 2-D form (a 1-D convolution is
    one row of a 2-D one), ONNX's defaults filled in."""
    kernel = list(attributes.get("kernel_shape") or spatial)
    strides = list(attributes.get("strides", [1] * len(kernel)))
    dilations = list(attributes.get("dilations", [1] * len(kernel)))
    pads = list(attributes.get("pads", [0] * 2 * len(kernel)))
    if len(kernel) == 1:
        return [1, *kernel], [1, *strides], [0, pads[0], 0, pads[1]], [1, *dilations]
    return kernel, strides, pads, dilations


def _axis(dequantize: Any) -> int:
    return next((a.i for a in dequantize.attribute if a.name == "axis"), 1)


def _layers(
    float_model: Any, quantized: Any, depthwise_only: bool = False
) -> tuple[list[_Layer], dict[str, str]]:
    """The Conv/Gemm layers of ``quantized`` whose integers can be chosen, in graph
    order, and why others cannot (``depthwise_only``: grouped convolutions only)."""
    initializers = {initializer.name: initializer for initializer in quantized.graph.initializer}
    float_weights = {i.name: i for i in float_model.graph.initializer}
    float_nodes = {node.name: node for node in float_model.graph.node}
    producers = onnx_graph.producers(quantized.graph)
    readers = onnx_graph.readers(quantized.graph)
    layers, skipped = [], {}
    for node in quantized.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        if depthwise_only and _attributes(node).get("group", 1) == 1:
            continue
        dequantize = producers.get(node.input[1])
        if (
            dequantize is None
            or dequantize.op_type != "DequantizeLinear"
            or dequantize.input[0] not in initializers
            or dequantize.input[1] not in initializers
        ):
            skipped[node.name] = "its weights are not a stored DequantizeLinear"
        elif len(readers.get(dequantize.input[0], [])) != 1:
            skipped[node.name] = "its weights are shared"
        else:
            found = _layer(
                node, dequantize, initializers, float_nodes.get(node.name), float_weights
            )
            if isinstance(found, str):
                skipped[node.name] = found
            else:
                layers.append(found)
    return layers, skipped


def _accumulate(layer: _Layer, x: np.ndarray, into: dict[str, np.ndarray]) -> None:
    """Add ``x``'s (a batch of ``layer``'s float input) second moments to ``into``."""
    x = np.asarray(x, np.float32)
    if layer.kind == "gemm":
        rows = x.reshape(len(x), -1)
        moments = (rows.T @ rows).astype(np.float64)
    else:
        assert layer.geometry is not None  # every convolution has one
        x = x[:, :, None] if x.ndim == 3 else x  # a 1-D convolution's input: one row
        taken = patches(x, *layer.geometry, depthwise=layer.kind == "depthwise")
        if layer.kind == "depthwise":
            moments = np.matmul(taken, taken.transpose(0, 2, 1)).astype(np.float64)
        else:
            moments = (taken @ taken.T).astype(np.float64)
    name = layer.node.name
    into[name] = into[name] + moments if name in into else moments


def _accumulate_chunks(
    layer: _Layer, x: np.ndarray, samples: int, into: dict[str, np.ndarray]
) -> None:
    """:func:`_accumulate` of ``x`` (a run's ``samples`` samples of ``layer``'s input)
    ``CHUNK`` samples at a time, in order: the patches of a few samples at once."""
    rows = CHUNK * max(1, len(x) // samples)
    for start in range(0, len(x), rows):
        _accumulate(layer, x[start : start + rows], into)


def _moments(
    float_model: Any, layers: list[_Layer], batches, samples: int, progress: Callable[[int], None]
) -> tuple[dict[str, np.ndarray], int, int]:
    """Each layer's input second moments over the first ``samples`` samples of
    ``batches``, their count and the float runs. The float model runs ``RUN`` samples at a
    time, or fewer where two runs' layer inputs (one run's being added up while the next
    runs) would pass ``EXPOSED_BYTES``; each run's inputs are added ``CHUNK`` samples at
    a time, in order; ``progress(total)`` after each run's layers."""
    names = list(dict.fromkeys(layer.input for layer in layers))
    sizes = onnx_graph.sample_sizes(float_model)
    per_sample = 4 * sum(sizes.get(name, 0) for name in names)
    session = runtime.open_session(
        onnx_graph.with_outputs(float_model, names), spinning=False, arena=False
    )
    budget = max(1, min(RUN, EXPOSED_BYTES // (2 * max(per_sample, 1))))
    chunk = None if onnx_graph.batch_is_fixed(float_model) else budget
    feeds = runtime.first_samples(batches, samples, chunk)
    moments: dict[str, np.ndarray] = {}
    adding: list[concurrent.futures.Future] = []  # the previous run's layers

    def added() -> None:
        for future in adding:
            future.result()
        if adding:
            progress(len(feeds))

    # Two workers add one run's layers while onnxruntime computes the next run here
    # (NumPy's copies and products release the GIL, as onnxruntime does). A run's
    # layers are all added before the next run's are submitted: each layer's sum keeps
    # the runs' order.
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="rounding") as pool:
        for feed in feeds:
            values = dict(zip(names, session.run(names, feed), strict=True))
            added()
            size = len(next(iter(feed.values())))
            adding = [
                pool.submit(_accumulate_chunks, layer, values[layer.input], size, moments)
                for layer in layers
            ]
            del values
        added()
    return moments, sum(len(next(iter(feed.values()))) for feed in feeds), len(feeds)


def round_weights(
    float_model: Any,
    quantized_model: Any,
    calibration_batches: Sequence[Mapping[str, np.ndarray]],
    *,
    samples: int | None = None,
    depthwise_only: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Any, WeightRoundingReport]:
    """Choose the quantized model's int8 weights with :func:`gptq_round` against each
    layer's input moments on the first ``samples`` calibration samples (the module's
    docstring says how and why).

    Args:
        float_model: the float ONNX model (``ModelProto``) that was quantized.
        quantized_model: its QDQ quantization (``ModelProto``; not modified), node
            names as in the float model (onnxruntime's quantizer keeps them).
        calibration_batches: feeds (input name -> array), batch first.
        samples: how many of their samples ``H`` is summed over (None:
            ``ROUNDING_SAMPLES``, ``DEPTHWISE_SAMPLES`` with ``depthwise_only``).
        depthwise_only: round only the depthwise convolutions (the rest keep the
            quantizer's integers, unlisted).
        progress: called as ``progress(done, total)`` after each float run (of
            ``RUN`` samples at most), then after each layer.

    Returns:
        The copy of ``quantized_model`` with its new integers, and a
        :class:`WeightRoundingReport`.
    """
    import onnx
    from onnx import numpy_helper

    rounded = onnx.ModelProto()
    rounded.CopyFrom(quantized_model)
    layers, skipped = _layers(float_model, rounded, depthwise_only)
    if samples is None:
        samples = DEPTHWISE_SAMPLES if depthwise_only else ROUNDING_SAMPLES
    steps = itertools.count(1)

    def done(runs: int) -> None:  # after each float run, then each layer
        if progress is not None:
            progress(next(steps), runs + len(layers))

    moments: dict[str, np.ndarray] = {}
    count = runs = 0
    if layers:
        moments, count, runs = _moments(float_model, layers, calibration_batches, samples, done)
    initializers = {initializer.name: initializer for initializer in rounded.graph.initializer}
    names, changes = [], []
    for layer in layers:
        if layer.node.name in moments:
            ints, (before, after) = _round(layer, moments[layer.node.name])
            changes.append(
                0.0 if after == before else 10 * np.log10(max(after, 1e-300) / max(before, 1e-300))
            )
            values = numpy_helper.from_array(layer.to_initializer(ints), layer.initializer)
            initializers[layer.initializer].CopyFrom(values)
            names.append(layer.node.name)
        done(runs)
    error_db = float(np.median(changes)) if changes else None
    return rounded, WeightRoundingReport(names, skipped, count, error_db, depthwise_only)


def _round(layer: _Layer, moments: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """``layer``'s integers by :func:`gptq_round`, and the output error power of the
    quantizer's integers and of these."""
    grid = (layer.scale, layer.zero)
    ints = gptq_round(layer.rows, moments, *grid, layer.low, layer.high)
    errors = (
        output_error(layer.rows, layer.original(), moments, *grid),
        output_error(layer.rows, ints, moments, *grid),
    )
    return ints, errors

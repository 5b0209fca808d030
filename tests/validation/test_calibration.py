"""Tests for keras_bn.converters.calibration: int8 ranges in one float pass.

The reference is onnxruntime's own calibrators (``create_calibrator``, fed one batch
per ``collect_data`` as ``quantize_static`` does with ``CalibStridedMinMax=1``) and
``quantize_static`` itself, on a small CNN built with onnx.helper; and NumPy
(``np.histogram``, ``np.percentile``) for the histogram maths.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    create_calibrator,
)
from onnxruntime.quantization.calibrate import HistogramCollector
from support.files import sha256
from support.onnx_graphs import save_graph

from keras_bn.converters import bias_correction, calibration, precision
from keras_bn.converters.errors import UserInputError
from keras_bn.converters.precision import quantize_int8

CHANNELS, CLASSES, PERCENTILE = 8, 5, 99.99
SCALES = (1.0, 0.5, 3.0, 2.0)  # per batch: the third batch widens every histogram


def _model() -> onnx.ModelProto:
    """Conv-Relu, a depthwise Conv, a residual Add (signed), pooling and a Gemm."""
    rng = np.random.default_rng(0)
    arrays = {
        "w1": rng.normal(size=(CHANNELS, 3, 3, 3)) * 0.4,
        "b1": rng.normal(size=CHANNELS) * 0.2,
        "w2": rng.normal(size=(CHANNELS, 1, 3, 3)) * np.logspace(-2, 0, CHANNELS)[:, None, None, None],
        "b2": rng.normal(size=CHANNELS) * 0.1,
        "wd": rng.normal(size=(CHANNELS, CLASSES)),
        "bd": rng.normal(size=CLASSES),
    }  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        helper.make_node(
            "Conv", ["r1", "w2", "b2"], ["c2"], "depthwise", group=CHANNELS, pads=[1, 1, 1, 1]
        ),
        helper.make_node("Add", ["c2", "c1"], ["added"], "add"),
        helper.make_node("GlobalAveragePool", ["added"], ["pooled"], "pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], "flatten"),
        helper.make_node("Gemm", ["flat", "wd", "bd"], ["y"], "dense"),
    ]
    graph = helper.make_graph(
        nodes,
        "calibration",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


class _Reader(CalibrationDataReader):
    def __init__(self, batches):
        self._batches = iter(batches)

    def get_next(self):
        return next(self._batches, None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The model (file and pre-processed proto), its batches, and onnxruntime's own
    MinMax and Percentile ranges, computed once."""
    folder = tmp_path_factory.mktemp("calibration")
    path = folder / "model.onnx"
    onnx.save(_model(), str(path))
    preprocessed = precision._preprocess(onnx.load(str(path)))
    onnx.save(preprocessed, str(folder / "pre.onnx"))
    rng = np.random.default_rng(1)
    batches = [
        {"x": (rng.normal(size=(16, 3, 8, 8)) * scale).astype(np.float32)} for scale in SCALES
    ]
    theirs = {}
    for method in ("MinMax", "Percentile"):
        calibrator = create_calibrator(
            folder / "pre.onnx",
            calibration.default_op_types(),
            augmented_model_path=str(folder / f"augmented_{method}.onnx"),
            calibrate_method=CalibrationMethod[method],
            extra_options={"percentile": PERCENTILE},
        )
        with contextlib.redirect_stdout(io.StringIO()):
            for batch in batches:  # quantize_static's CalibStridedMinMax=1
                calibrator.collect_data(_Reader([batch]))
            theirs[method] = calibrator.compute_data()
    return path, preprocessed, batches, theirs


def _all_values(preprocessed, batches, names):
    """Every value of ``names`` over ``batches`` (the float model run in NumPy-land)."""
    from keras_bn.converters import onnx_graph, runtime

    fetched = [name for name in names if name != "x"]
    session = runtime.open_session(onnx_graph.with_outputs(preprocessed, fetched, in_place=True))
    values = {name: [] for name in names}
    for batch in batches:
        outputs = dict(zip(fetched, session.run(fetched, batch), strict=True), x=batch["x"])
        for name in names:
            values[name].append(outputs[name].reshape(-1))
    return {name: np.concatenate(parts) for name, parts in values.items()}


def test_kept_values_are_the_float_models_on_the_first_samples(setup):
    """calibrate keeps the values asked for on exactly the first samples (the layer
    report's float side): batch-major ones cut from the first batch; one that is not
    batch-major (a Shape's) only when the first batch is those samples; none when the
    first batch holds fewer."""
    from keras_bn.converters import onnx_graph, runtime

    _, preprocessed, batches, _ = setup
    model = onnx.ModelProto()
    model.CopyFrom(preprocessed)
    model.graph.node.append(helper.make_node("Shape", ["c1"], ["shape"], "shape"))
    model.graph.value_info.append(helper.make_tensor_value_info("shape", TensorProto.INT64, [4]))
    keep = ["c1", "r1", "shape"]
    session = runtime.open_session(onnx_graph.with_outputs(model, keep))
    for samples, expected in ((5, ["c1", "r1"]), (16, keep), (17, [])):
        first = {"x": batches[0]["x"][:samples]}
        alone = dict(zip(keep, session.run(keep, first), strict=True))
        kept = calibration.calibrate(model, batches, "MinMax", keep=keep, keep_samples=samples).kept
        assert sorted(kept) == sorted(expected), samples
        for name in expected:
            np.testing.assert_allclose(kept[name], alone[name], rtol=1e-6, atol=1e-6)
            assert len(kept[name]) == (4 if name == "shape" else samples)


# ---------------------------------------------------------------------------------------
# Histogram maths against NumPy and onnxruntime's collector.


def test_count_in_bins_is_np_histogram():
    rng = np.random.default_rng(2)
    magnitude = np.abs(rng.standard_cauchy(200_000)).astype(np.float32)
    for first in (0.0, 0.25):  # with values below the first edge (not counted)
        edges = np.linspace(first, magnitude.max(), 2049, dtype=np.float32)
        counts = calibration.count_in_bins(magnitude, edges)
        expected, _ = np.histogram(magnitude, bins=edges)
        assert counts.sum() == expected.sum()
        # The last edge's value is counted; a value within float32 rounding of an
        # edge may land in the bin beside it: the cumulative counts agree to a few.
        assert np.abs(np.cumsum(counts) - np.cumsum(expected)).max() <= 2
        assert np.abs(counts - expected).sum() <= 4


def test_histogram_merges_batches_as_onnxruntime_does():
    """Same edges (the first batch's range, widened by whole bins) and counts as
    onnxruntime's HistogramCollector fed the same batches."""
    rng = np.random.default_rng(3)
    batches = [(rng.normal(size=5000) * scale).astype(np.float32) for scale in SCALES]
    ours = calibration.AbsoluteHistogram()
    theirs = HistogramCollector("percentile", True, 2048, 128, PERCENTILE, "same")
    with contextlib.redirect_stdout(io.StringIO()):
        for batch in batches:
            ours.add(batch)
            theirs.collect({"t": [batch]})
    counts, edges, lowest, highest = theirs.histogram_dict["t"]
    np.testing.assert_array_equal(ours.edges, edges)
    assert len(edges) > 2049  # the third batch widened it
    assert (ours.lowest, ours.highest) == (lowest, highest)
    assert ours.counts.sum() == counts.sum()
    assert np.abs(np.cumsum(ours.counts) - np.cumsum(counts)).max() <= 2


def test_a_nearly_constant_tensor_gets_a_histogram_from_zero():
    """A squeeze-excite gate of an untrained network is about 0.5 everywhere: its
    [min |x|, max |x|] holds no 2048 distinct float32 edges, and numpy (so
    onnxruntime's own collector) refuses it. Ours bins [0, max |x|] instead, and the
    Percentile range still holds the values."""
    rng = np.random.default_rng(5)
    batch = (0.5 + rng.uniform(0, 1e-6, size=4096)).astype(np.float32)
    theirs = HistogramCollector("percentile", True, 2048, 128, PERCENTILE, "same")
    with (
        pytest.raises(ValueError, match="Too many bins"),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        theirs.collect({"t": [batch]})
    ours = calibration.AbsoluteHistogram()
    ours.add(batch)
    ours.add(batch * 1.01)  # a later batch widens it by whole bins
    assert ours.edges[0] == 0 and np.all(np.diff(ours.edges) > 0)
    low, high, *_ = ours.percentile_range(PERCENTILE)
    assert low == ours.lowest == np.float32(0.5)  # kept within the signed extremes
    assert 0.504 < high <= ours.highest  # the percentile's bin, at the top
    subnormal = np.full(64, 1e-42, np.float32)  # no distinct edges even from 0
    tiny = calibration.AbsoluteHistogram()
    tiny.add(subnormal)
    assert np.all(np.diff(tiny.edges) > 0)


def test_infinite_values_are_left_out_of_the_ranges():
    """A -inf from padding before max pooling (KerasHub's ResNetV2) belongs to no
    range: both statistics are those of the finite values alone, and the histogram
    is onnxruntime's collector's given only those."""
    rng = np.random.default_rng(6)
    finite = [(rng.normal(size=4096) * scale).astype(np.float32) for scale in SCALES]
    padded = [np.concatenate([batch, np.full(64, -np.inf, np.float32)]) for batch in finite]
    padded[1][:3] = (np.inf, np.nan, -np.inf)
    ours, theirs = calibration.AbsoluteHistogram(), calibration.AbsoluteHistogram()
    collector = HistogramCollector("percentile", True, 2048, 128, PERCENTILE, "same")
    minmax = calibration.MinMaxRange()
    with contextlib.redirect_stdout(io.StringIO()):
        for batch in padded:
            ours.add(batch)
            minmax.add(batch)
            theirs.add(batch[np.isfinite(batch)])
            collector.collect({"t": [batch[np.isfinite(batch)]]})
    np.testing.assert_array_equal(ours.edges, collector.histogram_dict["t"][1])
    np.testing.assert_array_equal(ours.counts, theirs.counts)
    kept = np.concatenate([batch[np.isfinite(batch)] for batch in padded])
    assert (ours.lowest, ours.highest) == (kept.min(), kept.max())
    assert (minmax.lowest, minmax.highest) == (kept.min(), kept.max())
    assert np.all(np.isfinite(ours.percentile_range(PERCENTILE)[:2]))


def _pooling_model(path, *, pad_node: bool, overflow: bool = False) -> onnx.ModelProto:
    """Conv-Relu, 3x3 max pooling (stride 2) padded by 1 with -inf, Conv, pooling, Gemm:
    the padding a Pad node's (``pad_node``, KerasHub's ResNetV2) or MaxPool's own."""
    rng = np.random.default_rng(7)
    arrays = {
        "w1": rng.normal(size=(CHANNELS, 3, 3, 3)) * 0.4,
        "b1": rng.normal(size=CHANNELS) * 0.2,
        "w2": rng.normal(size=(CHANNELS, CHANNELS, 1, 1)) * 0.3,
        "wd": rng.normal(size=(CHANNELS, CLASSES)),
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1]),
        "minus_inf": np.array(-np.inf),
        "huge": np.array(3e38),
    }  # fmt: skip
    pooled = "padded" if pad_node else "r1"
    pooling = dict(kernel_shape=[3, 3], strides=[2, 2]) | ({} if pad_node else {"pads": [1] * 4})
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c1", "huge"], ["c1_huge"], "overflow") if overflow else None,
        helper.make_node("Relu", ["c1_huge" if overflow else "c1"], ["r1"], "relu1"),
        helper.make_node("Pad", ["r1", "pads", "minus_inf"], ["padded"], "pad") if pad_node else None,
        helper.make_node("MaxPool", [pooled], ["m"], "pool", **pooling),
        helper.make_node("Conv", ["m", "w2"], ["c2"], "conv2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], "average"),
        helper.make_node("Flatten", ["g"], ["flat"], "flatten"),
        helper.make_node("Gemm", ["flat", "wd"], ["y"], "dense"),
    ]  # fmt: skip
    types = {"pads": np.int64}
    return save_graph(
        [node for node in nodes if node is not None],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(a.astype(types.get(n, np.float32)), n) for n, a in arrays.items()],
        path,
    )


def test_padding_with_minus_infinity_quantizes_as_max_poolings_own(tmp_path):
    """The int8 file of a model padding with -inf in a Pad node in front of MaxPool
    (KerasHub's ResNetV2) computes what the int8 file of the same model with MaxPool's
    own padding computes (exact QDQ arithmetic): the padding moves into the MaxPool,
    and no -inf is quantized as a weight (its scale was inf, its pad value NaN)."""
    from keras_bn.converters import runtime

    data = {"x": np.random.default_rng(8).normal(size=(32, 3, 8, 8)).astype(np.float32)}
    outputs = []
    for pad_node in (True, False):
        source = _pooling_model(tmp_path / f"f{pad_node}.onnx", pad_node=pad_node)
        quantize_int8(source, tmp_path / f"q{pad_node}.onnx", data, layer_report=False)
        quantized = onnx.load(str(tmp_path / f"q{pad_node}.onnx"))
        assert "Pad" not in {node.op_type for node in quantized.graph.node}  # MaxPool pads
        for tensor in quantized.graph.initializer:
            assert np.all(np.isfinite(numpy_helper.to_array(tensor))), tensor.name
        session = runtime.open_session(
            str(tmp_path / f"q{pad_node}.onnx"), optimization="ORT_DISABLE_ALL"
        )
        outputs.append(session.run(None, data)[0])
    assert np.all(np.isfinite(outputs[0]))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=0, atol=1e-5 * np.abs(outputs[1]).max())


def test_a_tensor_without_a_finite_value_is_a_user_error(tmp_path):
    """A float model that overflows on the calibration data everywhere in a tensor
    (its inputs far out of scale): a one-line error naming the tensor, no file."""
    source = _pooling_model(tmp_path / "f.onnx", pad_node=True, overflow=True)
    data = {"x": np.random.default_rng(8).normal(size=(16, 3, 8, 8)).astype(np.float32) * 1e3}
    with pytest.raises(UserInputError, match=r"tensor 'c2' \(and 3 more\) has no finite value"):
        quantize_int8(source, tmp_path / "q.onnx", data, layer_report=False)
    assert not (tmp_path / "q.onnx").exists()


def _heavy_tailed_batches(rng, scales, size=100_003):  # no percentile falls on a rank
    return [(rng.standard_t(3, size=size) * scale).astype(np.float32) for scale in scales]


@pytest.mark.parametrize("percentile", [99.99, 99.9, 99.0])
def test_a_histogram_counting_only_its_top_gives_the_same_percentile(percentile):
    """Bins under the floor are kept as one total: the percentile's bin, found from
    the top, is the same as with every bin counted (and as NumPy's percentile)."""
    rng = np.random.default_rng(4)
    batches = _heavy_tailed_batches(rng, SCALES)
    tail = 2 * (1 - percentile / 100) * len(batches)
    top, every = calibration.AbsoluteHistogram(tail=tail), calibration.AbsoluteHistogram()
    for batch in batches:
        top.add(batch)
        every.add(batch)
    assert top.floor > 0 and top.counts[0] > 0.5 * top.counts.sum()  # most lumped, not binned
    assert top.counts[1 : top.floor].sum() <= 2  # (a value at a bin edge may round down)
    np.testing.assert_array_equal(top.edges, every.edges)
    np.testing.assert_array_equal(top.counts[top.floor :], every.counts[top.floor :])
    assert top.counts.sum() == every.counts.sum() == sum(batch.size for batch in batches)
    assert top.percentile_range(percentile)[:2] == every.percentile_range(percentile)[:2]
    whole = np.abs(np.concatenate(batches))
    threshold = np.percentile(whole, percentile, method="inverted_cdf")
    width = every.edges[1] - every.edges[0]
    assert abs(float(top.percentile_range(percentile)[1]) - threshold) <= width


def test_a_tail_lighter_than_the_first_batchs_is_counted_again(setup, monkeypatch):
    """A first batch smaller than the rest and far heavier-tailed puts the floor too
    high for the whole: calibrate counts those tensors again, every bin, and gets the
    ranges of a pass that counted every bin from the start."""
    _, preprocessed, _, _ = setup
    monkeypatch.setattr(calibration, "_SMALL_BATCH", 0)  # count the top of small tensors too
    rng = np.random.default_rng(5)
    heavy = {"x": (rng.standard_t(2, size=(1, 3, 8, 8)) * 20).astype(np.float32)}
    light = [{"x": rng.normal(size=(16, 3, 8, 8)).astype(np.float32)} for _ in range(7)]
    batches = [heavy, *light]
    passes = []
    float_pass = calibration._float_pass
    monkeypatch.setattr(
        calibration, "_float_pass", lambda *a: passes.append(a[2]) or float_pass(*a)
    )
    ranges = calibration.calibrate(preprocessed, batches, "Percentile", percentile=99.9).ranges
    assert len(passes) == 2 and "x" in passes[1]  # x's floor was the heavy batch's
    every, _, _, _ = float_pass(preprocessed, batches, passes[0], "Percentile", 1.0, (), None)
    for name in passes[0]:
        assert ranges[name].range_value == tuple(every[name].percentile_range(99.9)[:2]), name


@pytest.mark.parametrize("block", [calibration._SCAN, 1000, 1])  # rows per block vary
def test_one_pass_over_a_tensor_counts_what_the_separate_passes_count(monkeypatch, block):
    """A calibrated tensor that bias correction also measures is read once per batch,
    twice for the first (AbsoluteHistogram.add_in_one_pass): the same edges, floor,
    counts and extremes as AbsoluteHistogram.add, bit for bit, after the first batch
    and after all, the same per-channel sums as ChannelMoments.add, and channel means
    and spread as NumPy's float64 ones. The batches: ReLU-like (non-negative) and
    signed, one reaching past the last edge, one with values under the first edge,
    one holding an inf (read the usual way, leaving the inf out)."""
    monkeypatch.setattr(calibration, "_SCAN", block)
    rng = np.random.default_rng(11)
    shape = (4, 6, 64, 64)  # 98,304 values per batch: over _SMALL_BATCH
    base = rng.standard_t(3, size=(5, *shape)).astype(np.float32)
    batches = [
        np.abs(base[0]) + 0.25,  # positive only: edges from 0.25 (values under it later)
        np.maximum(base[1], 0),
        base[2] * 3.0,  # signed, wider: new bins
        base[3] * np.linspace(0.1, 1, 6, dtype=np.float32)[None, :, None, None],
        base[4],
    ]
    batches[4][1, 2, 3, 4] = np.inf
    tail = 2 * (1 - PERCENTILE / 100) * len(batches)
    one, apart = calibration.AbsoluteHistogram(tail=tail), calibration.AbsoluteHistogram(tail=tail)
    together, alone = bias_correction.ChannelMoments(), bias_correction.ChannelMoments()
    passes = []
    for batch in batches:
        before = batch.copy()
        passes.append(one.add_in_one_pass(batch, together))
        if not passes[-1]:
            one.add(batch)
            together.add(batch)
        np.testing.assert_array_equal(batch, before)  # the fetched values are not modified
        apart.add(batch)
        alone.add(batch)
        if len(passes) == 1:  # the first batch placed the edges and the floor alike
            np.testing.assert_array_equal(one.edges, apart.edges)
            np.testing.assert_array_equal(one.counts, apart.counts)
            assert (one.floor, one.lowest, one.highest) == (
                apart.floor,
                apart.lowest,
                apart.highest,
            )
    assert passes == [True, True, True, True, False]
    assert one.floor > 0 and one.edges[0] > 0 and len(one.edges) > 2049
    np.testing.assert_array_equal(one.edges, apart.edges)
    np.testing.assert_array_equal(one.counts, apart.counts)
    assert (one.lowest, one.highest) == (apart.lowest, apart.highest)
    assert one.percentile_range(PERCENTILE) == apart.percentile_range(PERCENTILE)
    np.testing.assert_array_equal(together.sums, alone.sums)
    assert (together.count, together.samples) == (alone.count, alone.samples)
    # Means and spread against NumPy in float64, on the finite batches, read in one pass.
    finite = bias_correction.ChannelMoments()
    histogram = calibration.AbsoluteHistogram(tail=tail)
    assert all(histogram.add_in_one_pass(batch, finite) for batch in batches[:4])
    exact = np.concatenate(batches[:4]).astype(np.float64)
    np.testing.assert_allclose(
        finite.means, exact.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-6 * exact.std()
    )
    spread = np.sqrt(np.mean(exact**2) - np.mean(exact.mean(axis=(0, 2, 3))) ** 2)
    assert finite.spread == pytest.approx(spread, rel=1e-5)


def test_one_pass_leaves_other_tensors_to_the_separate_passes():
    """Small tensors, other dtypes, non-contiguous views, channel moments of a 2-D
    tensor and histograms counting every bin go the usual way (False, unchanged)."""
    rng = np.random.default_rng(12)
    big = rng.normal(size=(4, 8, 64, 64)).astype(np.float32)
    histogram = calibration.AbsoluteHistogram(tail=1e-3)
    histogram.add(big)
    state = (histogram.edges.copy(), histogram.counts.copy(), histogram.lowest)
    refused = [
        big[:, :, :8, :8].copy(),  # under _SMALL_BATCH values
        big.astype(np.float64),
        big.transpose(0, 2, 3, 1),  # not C-contiguous
    ]
    for values in refused:
        assert histogram.add_in_one_pass(values) is False
    assert histogram.add_in_one_pass(big.reshape(64, -1), bias_correction.ChannelMoments()) is False
    every = calibration.AbsoluteHistogram(tail=1.0)  # counts every bin: floor 0
    assert every.add_in_one_pass(big) is False and every.edges is None
    every.add(big)
    assert every.floor == 0 and every.add_in_one_pass(big) is False
    np.testing.assert_array_equal(histogram.edges, state[0])
    np.testing.assert_array_equal(histogram.counts, state[1])
    assert histogram.lowest == state[2]


@pytest.mark.parametrize("placed", ["at the top", "at zero"])
def test_one_pass_leaves_a_first_batch_with_a_misplaced_floor_to_add(monkeypatch, placed):
    """Where the sampled floor would count fewer than ``tail`` of the first batch bin by
    bin (a sample that misled), or is 0, the first batch goes the usual way: False,
    nothing changed, and add() then counts every bin, as before."""
    rng = np.random.default_rng(13)
    batch = np.abs(rng.standard_t(3, size=(4, 6, 64, 64))).astype(np.float32)
    sampled = calibration._sampled_floor
    monkeypatch.setattr(
        calibration,
        "_sampled_floor",
        lambda values, edges, tail: len(edges) - 2 if placed == "at the top" else 0,
    )
    histogram, moments = calibration.AbsoluteHistogram(tail=1e-3), bias_correction.ChannelMoments()
    assert histogram.add_in_one_pass(batch, moments) is False
    assert histogram.edges is None and moments.sums is None and not histogram.seen
    histogram.add(batch)
    assert histogram.floor == 0 and histogram.counts.sum() == batch.size
    monkeypatch.setattr(calibration, "_sampled_floor", sampled)
    assert calibration.AbsoluteHistogram(tail=1e-3).add_in_one_pass(batch) is True


# ---------------------------------------------------------------------------------------
# Per-channel weights, whole arrays at a time, against onnxruntime's per-channel loop.


def _awkward_weights(rng, shape, axis):
    """Weights with an all-zero channel, a subnormal one, a negative-only one and
    values on rounding ties (k + 0.5 steps)."""
    weights = rng.normal(size=shape).astype(np.float32)
    index = [slice(None)] * len(shape)
    for channel, values in enumerate(
        [0.0, 1e-40, -np.abs(weights.take(2, axis)), None, np.float32(127 / 3)]
    ):
        if values is None:  # ties: step 1/127 of 1.0 (the channel's max), at half steps
            ties = (np.arange(weights.take(3, axis).size) % 254 - 126.5) / 127
            values = np.append(ties[:-1], 1.0).reshape(weights.take(3, axis).shape)
        index[axis] = channel
        weights[tuple(index)] = values
    return weights


@pytest.mark.parametrize(
    ("shape", "axis"), [((6, 3, 3, 3), 0), ((6, 1, 5, 5), 0), ((9, 6), 1), ((6, 9), 0)]
)
def test_per_channel_weights_are_onnxruntimes_channel_loop(shape, axis):
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import compute_data_quant_params, quantize_nparray

    weights = _awkward_weights(np.random.default_rng(6), shape, axis)
    zero_points, scales = calibration.per_channel_parameters(weights, axis)
    integers = calibration.per_channel_integers(weights, scales, axis)
    for channel in range(shape[axis]):
        data = weights.take(channel, axis).ravel()
        zero, scale = compute_data_quant_params(data, TensorProto.INT8, True)
        assert scales[channel].dtype == scale.dtype and scales[channel] == scale, channel
        assert zero_points[channel].dtype == zero.dtype and zero_points[channel] == zero
        theirs = quantize_nparray(TensorProto.INT8, data, scale, zero)
        np.testing.assert_array_equal(integers.take(channel, axis).ravel(), theirs)
    assert scales[0] == scales[1] == 1.0  # zero and subnormal channels: scale 1
    assert np.abs(integers).max() == 127


def test_per_channel_weights_leave_odd_arrays_to_onnxruntime():
    assert calibration.per_channel_parameters(np.zeros((0, 3), np.float32), 0) is None
    assert calibration.per_channel_parameters(np.ones((2, 3), np.float64), 0) is None
    assert calibration.per_channel_parameters(np.array([[1, np.inf]], np.float32), 0) is None


def test_the_quantizer_swap_is_undone_even_on_error():
    from onnxruntime.quantization import qdq_quantizer

    theirs = qdq_quantizer.quantize_onnx_initializer
    with pytest.raises(RuntimeError), calibration._whole_array_weights():
        assert qdq_quantizer.quantize_onnx_initializer is not theirs
        raise RuntimeError
    assert qdq_quantizer.quantize_onnx_initializer is theirs


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_the_qdq_rewrite_is_onnxruntimes_own(setup, monkeypatch, per_channel):
    """The whole-array weights give onnxruntime's own QDQQuantizer's model, byte for
    byte (its per-channel loop, its bias-scale adjustment after)."""
    from onnxruntime.quantization import QDQQuantizer, QuantType

    _, preprocessed, batches, _ = setup
    whole = []
    parameters = calibration.per_channel_parameters
    monkeypatch.setattr(
        calibration, "per_channel_parameters", lambda *a: whole.append(a[1]) or parameters(*a)
    )
    ranges = calibration.calibrate(preprocessed, batches, "MinMax").ranges
    ours = calibration.quantize_qdq(
        onnx.ModelProto.FromString(preprocessed.SerializeToString()),
        ranges,
        per_channel=per_channel,
        extra_options=precision._INT8_OPTIONS,
    )
    model = onnx.ModelProto.FromString(preprocessed.SerializeToString())
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    add_infer_metadata(model)
    types = calibration.default_op_types()
    theirs = QDQQuantizer(
        model, per_channel, False, QuantType.QInt8, QuantType.QInt8, ranges, [], [], types,
        dict(precision._INT8_OPTIONS),
    )  # fmt: skip
    theirs.quantize_model()
    theirs.model.topological_sort()
    assert ours.SerializeToString() == theirs.model.model.SerializeToString()
    assert whole == ([0, 0, 1] if per_channel else [])  # Conv, depthwise Conv, Gemm (in, out)
    stored = {t.name: t.data_type for t in ours.graph.initializer}
    assert [stored[f"{name}_quantized"] for name in ("w1", "w2", "wd")] == [TensorProto.INT8] * 3


# ---------------------------------------------------------------------------------------
# The float pass against onnxruntime's calibrators.


def test_minmax_ranges_are_onnxruntimes_exactly(setup):
    _, preprocessed, batches, theirs = setup
    ours = calibration.calibrate(preprocessed, batches, "MinMax").ranges
    expected = theirs["MinMax"]
    assert ours.calibration_method == expected.calibration_method
    assert set(ours) == set(expected) and {"x", "c1", "r1", "c2", "added", "y"} <= set(ours)
    for name in expected:
        for got, want in zip(ours[name].range_value, expected[name].range_value, strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape, name
            np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("top_only", [False, True], ids=["every-bin", "top-only"])
def test_percentile_ranges_are_onnxruntimes_within_one_bin(setup, monkeypatch, top_only):
    _, preprocessed, batches, theirs = setup
    if top_only:  # this model's tensors are small enough to be counted bin by bin
        monkeypatch.setattr(calibration, "_SMALL_BATCH", 0)
    ours = calibration.calibrate(preprocessed, batches, "Percentile", percentile=PERCENTILE)
    expected = theirs["Percentile"]
    assert set(ours.ranges) == set(expected)
    every = _all_values(preprocessed, batches, list(expected))
    for name in expected:
        low, high = (float(v) for v in ours.ranges[name].range_value)
        want_low, want_high = (float(v) for v in expected[name].range_value)
        bin_width = np.abs(every[name]).max() / 2048  # at least the final bins' width
        assert abs(high - want_high) <= bin_width and abs(low - want_low) <= bin_width, name
        # A symmetric range clipped at the 99.99th percentile of |x| (the value at
        # that rank of every value collected: the threshold is the left edge of its
        # bin), kept inside the signed extremes.
        threshold = np.percentile(np.abs(every[name]), PERCENTILE, method="inverted_cdf")
        assert abs(high - min(threshold, every[name].max())) <= bin_width, name
        assert abs(low - max(-threshold, every[name].min())) <= bin_width, name


def test_percentile_int8_file_is_quantize_statics(setup, tmp_path):
    """Ranges handed to onnxruntime's quantizer in memory give the very file of its
    own pre-processing + quantize_static with its Percentile calibrator (the previous
    implementation): on this model every range is onnxruntime's to the bit."""
    path, _, batches, _ = setup
    data = np.concatenate([batch["x"] for batch in batches])
    quantize_int8(
        path,
        tmp_path / "ours.onnx",
        {"x": data},
        bias_correction=False,
        round_weights=False,  # onnxruntime's round-to-nearest weights
        layer_report=False,
        signed=True,  # onnxruntime's S8S8, as quantize_static writes it
    )
    precision._quantize_static_file(
        path, onnx.load(str(path)), tmp_path / "theirs.onnx", batches, True, "Percentile", None, PERCENTILE
    )  # fmt: skip
    assert sha256(tmp_path / "ours.onnx") == sha256(tmp_path / "theirs.onnx")


def _output_quantization(path) -> tuple[float, int]:
    """The scale and zero point of the QuantizeLinear that feeds the graph output."""
    model = onnx.load(str(path))
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dequantize = producers[model.graph.output[0].name]
    quantize = producers[dequantize.input[0]]
    assert (dequantize.op_type, quantize.op_type) == ("DequantizeLinear", "QuantizeLinear")
    return float(initializers[quantize.input[1]]), int(initializers[quantize.input[2]])


@pytest.mark.parametrize("fallback", [False, True], ids=["one-pass", "quantize_static"])
def test_graph_outputs_keep_their_whole_range_under_percentile(
    setup, tmp_path, monkeypatch, fallback
):
    """A clipped output ties the largest logits (the answer); Percentile clips every
    other tensor but the graph outputs keep their extremes, on both paths."""
    path, preprocessed, batches, theirs = setup
    if fallback:
        monkeypatch.setattr(calibration, "reliance_problem", lambda: "changed")
    data = np.concatenate([batch["x"] for batch in batches])
    percentile = 99.0  # clips the 1% largest |y|: a visible difference
    quantize_int8(
        path,
        tmp_path / "q.onnx",
        {"x": data},
        percentile=percentile,
        bias_correction=False,
        layer_report=False,
        signed=True,  # the zero point below is int8's
    )
    y = _all_values(preprocessed, batches, ["y"])["y"]
    low, high = min(float(y.min()), 0.0), max(float(y.max()), 0.0)
    scale, zero_point = _output_quantization(tmp_path / "q.onnx")
    assert scale == pytest.approx((high - low) / 255, rel=1e-6)  # asymmetric int8
    assert zero_point == round(-128 - low / scale)
    clipped = np.percentile(np.abs(y), percentile, method="inverted_cdf")
    assert clipped < 0.9 * max(-low, high)  # what Percentile would have given it
    # Every other tensor is still clipped as onnxruntime's calibrator clips it.
    ranges = calibration.calibrate(
        preprocessed, batches, "Percentile", percentile=PERCENTILE, whole=["y"]
    ).ranges
    for name in ranges:
        want = theirs["Percentile"][name].range_value if name != "y" else (y.min(), y.max())
        assert ranges[name].range_value[1] == pytest.approx(float(want[1]), rel=0.02), name


def test_minmax_int8_file_is_the_same_through_the_fallback(setup, tmp_path, monkeypatch):
    """When an onnxruntime internal changed, quantize_int8 falls back to
    quantize_static and its calibrator: the same file."""
    path, _, batches, _ = setup
    data = np.concatenate([batch["x"] for batch in batches])
    options = dict(calibration_method="MinMax", layer_report=False)
    fast = quantize_int8(path, tmp_path / "fast.onnx", {"x": data}, **options)
    monkeypatch.setattr(calibration, "reliance_problem", lambda: "changed")
    slow = quantize_int8(path, tmp_path / "slow.onnx", {"x": data}, **options)
    assert sha256(tmp_path / "fast.onnx") == sha256(tmp_path / "slow.onnx")
    assert fast.details["bias_correction"] == slow.details["bias_correction"]


def test_bias_correction_from_the_pass_is_its_own_float_run(setup, tmp_path):
    """The default scheme: the biases corrected with the calibration pass's moments
    equal bias correction's own float run (the previous implementation) to a step."""
    path, _, batches, _ = setup
    data = np.concatenate([batch["x"] for batch in batches])
    report = quantize_int8(path, tmp_path / "default.onnx", {"x": data}, layer_report=False)
    quantize_int8(
        path, tmp_path / "plain.onnx", {"x": data}, bias_correction=False, layer_report=False
    )
    previous, previous_report = bias_correction.correct_biases(
        onnx.load(str(path)), onnx.load(str(tmp_path / "plain.onnx")), batches
    )
    ours = onnx.load(str(tmp_path / "default.onnx"))
    want = {t.name: numpy_helper.to_array(t) for t in previous.graph.initializer}
    biases = [
        t.name
        for t in ours.graph.initializer
        if t.data_type == TensorProto.INT32 and not t.name.endswith("zero_point")
    ]
    assert sorted(biases) == ["b1_quantized", "b2_quantized", "bd_quantized"]
    for tensor in ours.graph.initializer:
        got = numpy_helper.to_array(tensor)
        if tensor.data_type == TensorProto.INT32:
            assert np.abs(got.astype(np.int64) - want[tensor.name]).max() <= 1, tensor.name
        else:
            np.testing.assert_array_equal(got, want[tensor.name], err_msg=tensor.name)
    layers = report.details["bias_correction"]["layers"]
    assert [layer["node"] for layer in layers] == ["conv1", "depthwise", "dense"]
    assert report.details["bias_correction"]["samples"] == previous_report.samples == len(data)
    for layer, expected in zip(layers, previous_report.layers, strict=True):
        assert layer["max_abs_shift"] == pytest.approx(expected.max_abs_shift, rel=1e-5)
        assert layer["relative_shift"] == pytest.approx(expected.relative_shift, rel=1e-4)


def test_progress_counts_the_batches(setup):
    _, preprocessed, batches, _ = setup
    calls = []
    measured = calibration.calibrate(
        preprocessed,
        batches,
        "Percentile",
        moments_of=["x", "c1"],
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert measured.samples == 64 and measured.moments["x"].samples == 64
    every = np.concatenate([batch["x"] for batch in batches]).astype(np.float64)
    # float32 pairwise sums per position, float64 beyond (bias_correction.channel_sums)
    np.testing.assert_allclose(
        measured.moments["x"].means, every.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-7 * every.std()
    )
    assert measured.moments["x"].spread == pytest.approx(every.std(), rel=1e-5)


def test_onnxruntime_reliances_hold():
    assert calibration.reliance_problem() is None


def test_the_reliance_checks_parse_no_source(monkeypatch):
    """The checks run beside the Keras pass of an export: ``ast.parse`` (which
    ``inspect.getsource`` uses for a class) fails on CPython 3.11 when another thread
    parses at the same time (``SystemError: AST constructor recursion depth
    mismatch``), so no check may parse."""
    import ast

    calls = []
    real = ast.parse
    monkeypatch.setattr(ast, "parse", lambda *a, **k: calls.append(a[1:2]) or real(*a, **k))
    problem = calibration.reliance_problem()
    monkeypatch.undo()
    assert problem is None
    assert calls == []


def _bounded_model() -> onnx.ModelProto:
    """Conv -> Clip(0, 12) -> Min(per-channel bound 12, 1.5) -> Conv: the per-channel
    ReLU6 bound equalization writes. Channel 0 reaches 4, channel 1 runs to 12, far
    past its bound of 1.5."""
    arrays = {
        "w1": np.diag([4.0, 12.0]).reshape(2, 2, 1, 1),
        "w2": np.array([[1.0, 1.0]]).reshape(1, 2, 1, 1),
        "zero": np.array(0.0),
        "widest": np.array(12.0),
        "bound": np.array([12.0, 1.5]).reshape(2, 1, 1),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], "first"),
        helper.make_node("Clip", ["c1", "zero", "widest"], ["clipped"], "clip"),
        helper.make_node("Min", ["clipped", "bound"], ["bounded"], "bound"),
        helper.make_node("Conv", ["bounded", "w2"], ["y"], "second"),
    ]
    return _image_model("bounded", nodes, arrays, 4)


def _image_model(name: str, nodes, arrays, size: int) -> onnx.ModelProto:
    """``nodes`` from ``x`` (N, 2, size, size) to ``y`` (N, 1, size, size), the
    ``arrays`` as float32 initializers."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, size, size])],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _activation_scales(path) -> dict[str, float]:
    """Each quantized tensor's scale, by the name of the tensor quantized."""
    model = onnx.load(str(path))
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {
        node.input[0]: float(initializers[node.input[1]])
        for node in model.graph.node
        if node.op_type == "QuantizeLinear" and node.input[0] not in initializers
    }


def test_a_bounded_clip_shares_its_bounds_range(tmp_path, monkeypatch):
    """The Clip feeding a per-channel Min is quantized on the Min's range, not on its
    own widest-channel range: one rounding instead of two, and a smaller error."""
    path = tmp_path / "bounded.onnx"
    onnx.save(_bounded_model(), str(path))
    assert calibration.bounded_sources(onnx.load(str(path))) == {"clipped": "bounded"}
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (64, 2, 4, 4)).astype(np.float32)
    expected = np.minimum(4 * x[:, :1], 12.0) + np.minimum(12 * x[:, 1:], 1.5)
    scheme = {"calibration_method": "MinMax", "bias_correction": False, "layer_report": False}

    def error(name: str) -> float:
        quantize_int8(path, tmp_path / name, {"x": x}, **scheme)
        session = runtime_session(tmp_path / name)
        return float(np.sqrt(np.mean((session.run(None, {"x": x})[0] - expected) ** 2)))

    shared = error("shared.onnx")
    scales = _activation_scales(tmp_path / "shared.onnx")
    widest, bounded = 12 * float(x[:, 1].max()), 4 * float(x[:, 0].max())  # MinMax: extremes
    assert scales["clipped"] == scales["bounded"] == pytest.approx(bounded / 255, rel=1e-6)
    monkeypatch.setattr(calibration, "share_bound_ranges", lambda model, ranges: None)
    own = error("own.onnx")
    assert _activation_scales(tmp_path / "own.onnx")["clipped"] == pytest.approx(widest / 255)
    assert shared < 0.75 * own  # root-mean-square errors: 0.011 against 0.017


def _dense_block_model() -> onnx.ModelProto:
    """A dense block: each Conv -> Relu adds channels to a chain of Concats
    (``cat1 = Concat(r1, r2)``, ``cat2 = Concat(cat1, r3)``), a Conv reads the last."""
    rng = np.random.default_rng(5)
    arrays = {f"w{i}": rng.normal(size=shape) for i, shape in
              enumerate([(2, 2, 1, 1), (2, 2, 1, 1), (1, 4, 1, 1), (1, 5, 1, 1)], 1)}  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], "conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], "relu2"),
        helper.make_node("Concat", ["r1", "r2"], ["cat1"], "concat1", axis=1),
        helper.make_node("Conv", ["cat1", "w3"], ["c3"], "conv3"),
        helper.make_node("Relu", ["c3"], ["r3"], "relu3"),
        helper.make_node("Concat", ["cat1", "r3"], ["cat2"], "concat2", axis=1),
        helper.make_node("Conv", ["cat2", "w4"], ["y"], "conv4"),
    ]
    return _image_model("dense_block", nodes, arrays, 16)


def test_chained_concats_take_their_inputs_union_range(tmp_path, monkeypatch):
    """Each Concat output is quantized on the union of its inputs' ranges (clipping
    nothing its inputs kept), not on its own percentile (onnxruntime's), which moves
    the grid a chain's carried values are rounded onto again at each Concat."""
    path = tmp_path / "block.onnx"
    onnx.save(_dense_block_model(), str(path))
    x = np.random.default_rng(6).standard_t(3, size=(64, 2, 16, 16)).astype(np.float32)
    scheme = {"bias_correction": False, "layer_report": False, "round_weights": False}
    quantize_int8(path, tmp_path / "shared.onnx", {"x": x}, **scheme)
    scales = _activation_scales(tmp_path / "shared.onnx")
    assert scales["cat1"] == max(scales["r1"], scales["r2"])
    assert scales["cat2"] == max(scales["cat1"], scales["r3"])
    monkeypatch.setattr(calibration, "share_concat_ranges", lambda model, ranges: None)
    quantize_int8(path, tmp_path / "own.onnx", {"x": x}, **scheme)
    own = _activation_scales(tmp_path / "own.onnx")
    assert own["cat2"] < scales["cat2"]  # its own percentile: r3's tail diluted by cat1


def _activations_model(output_relu: bool = True) -> onnx.ModelProto:
    """Activations whose input ranges onnxruntime's quantizer replaces, and some it
    keeps: Conv -> Relu; a Conv read by a Relu and an Add; Conv -> Clip -> Relu;
    Gemm -> Softmax -> Gemm; with ``output_relu`` a Relu's input that is a graph output
    too."""
    rng = np.random.default_rng(5)
    arrays = {
        "w1": rng.normal(size=(4, 3, 3, 3)) * 0.5, "w2": rng.normal(size=(4, 4, 1, 1)),
        "w3": rng.normal(size=(4, 4, 1, 1)), "wg": rng.normal(size=(4, 6)),
        "wh": rng.normal(size=(6, 3)), "zero": np.array(0.0), "six": np.array(1.5),
    }  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], "conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], "relu2"),
        helper.make_node("Add", ["r2", "c2"], ["a"], "add"),
        helper.make_node("Conv", ["a", "w3"], ["c3"], "conv3"),
        helper.make_node("Clip", ["c3", "zero", "six"], ["k3"], "clip3"),
        helper.make_node("Relu", ["k3"], ["r3"], "relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["pooled"], "pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], "flatten"),
        helper.make_node("Gemm", ["flat", "wg"], ["g"], "dense"),
        helper.make_node("Softmax", ["g"], ["p"], "softmax"),
        helper.make_node("Gemm", ["p", "wh"], ["h"], "head"),
        *([helper.make_node("Relu", ["h"], ["y"], "relu_out")] if output_relu else []),
    ]
    graph = helper.make_graph(
        nodes,
        "activations",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 3])
            for name in (("y", "h") if output_relu else ("h",))
        ],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_replaced_ranges_are_those_the_quantizer_replaces_before_reading():
    """A Relu's or Clip's only input takes the output's range, a Softmax's output 0 to
    1; kept: a tensor with two readers, one whose range a later replacement reads (the
    Clip's output into a Relu), a graph output, the input of an excluded node."""
    preprocessed = precision._preprocess(_activations_model())
    assert calibration.replaced_ranges(preprocessed) == {"c1": "r1", "c3": "k3", "p": None}
    assert calibration.replaced_ranges(preprocessed, ["relu1", "softmax"]) == {"c3": "k3"}
    bounded = precision._preprocess(_bounded_model())  # Conv -> Clip -> Min(bound)
    assert calibration.replaced_ranges(bounded) == {"c1": "clipped"}
    bounds = _bounded_model()  # a bound's output read by a Relu alone: share_bound_ranges reads it
    bounds.graph.node.insert(3, helper.make_node("Relu", ["bounded"], ["positive"], "relu"))
    bounds.graph.node[4].input[0] = "positive"
    assert calibration.replaced_ranges(precision._preprocess(bounds)) == {"c1": "clipped"}


def test_values_the_quantizer_renames_are_not_kept():
    """With the quantizer's exclusions given, a Relu's or Clip's only input is neither
    measured nor kept for the layer report (the quantizer removes the activation and
    gives its output name to the producer's: no int8 value of that name)."""
    preprocessed = precision._preprocess(_activations_model(output_relu=False))
    rng = np.random.default_rng(8)
    batches = [{"x": rng.normal(size=(16, 3, 8, 8)).astype(np.float32)} for _ in range(2)]
    keep = ["c1", "r1", "c2", "c3", "k3", "p"]
    kept = calibration.calibrate(
        preprocessed, batches, "MinMax", keep=keep, keep_samples=8, quantizer_exclude=[]
    ).kept
    assert set(kept) == {"r1", "c2", "k3", "p"}
    everything = calibration.calibrate(preprocessed, batches, "MinMax", keep=keep, keep_samples=8)
    assert set(everything.kept) == set(keep)
    for name in kept:
        np.testing.assert_array_equal(kept[name], everything.kept[name])


@pytest.mark.parametrize("output_relu", [False, True], ids=["", "output-into-relu"])
@pytest.mark.parametrize("method", ["MinMax", "Percentile"])
def test_ranges_the_quantizer_replaces_are_not_measured_and_the_file_is_quantize_statics(
    tmp_path, monkeypatch, method, output_relu
):
    """quantize_int8 leaves those tensors out of the float pass (each gets its
    replacement's range), and the int8 file is still onnxruntime's quantize_static's,
    byte for byte, whose calibrator measures every tensor."""
    path = tmp_path / "activations.onnx"
    onnx.save(_activations_model(output_relu), str(path))
    rng = np.random.default_rng(6)
    batches = [{"x": rng.normal(size=(16, 3, 8, 8)).astype(np.float32) * s} for s in SCALES]
    measured = []
    float_pass = calibration._float_pass
    monkeypatch.setattr(
        calibration, "_float_pass", lambda m, b, names, *a: measured.append(names) or float_pass(m, b, names, *a)
    )  # fmt: skip
    quantize_int8(
        path, tmp_path / "ours.onnx", {"x": np.concatenate([b["x"] for b in batches])},
        calibration_method=method, bias_correction=False, round_weights=False,
        layer_report=False, signed=True,
    )  # fmt: skip
    assert not {"c1", "c3", "p"} & set(measured[0])
    assert {"c2", "k3", "r1", "g", "h"} <= set(measured[0])
    precision._quantize_static_file(
        path, onnx.load(str(path)), tmp_path / "theirs.onnx", batches, True, method, None, PERCENTILE
    )  # fmt: skip
    assert sha256(tmp_path / "ours.onnx") == sha256(tmp_path / "theirs.onnx")


@pytest.mark.parametrize("fallback", [False, True], ids=["one-pass", "quantize_static"])
@pytest.mark.parametrize("method", ["MinMax", "Percentile"])
def test_a_graph_output_read_by_a_relu_keeps_its_negative_values(
    tmp_path, monkeypatch, method, fallback
):
    """onnxruntime's quantizer gives a Relu's only input the Relu's range, even where
    that input is a graph output: its negative half would come out as 0. The output
    keeps its own range (an override), on both paths; the Relu's output keeps its own."""
    if fallback:
        monkeypatch.setattr(calibration, "reliance_problem", lambda: "changed")
    path = tmp_path / "activations.onnx"
    onnx.save(_activations_model(output_relu=True), str(path))
    assert calibration.activation_outputs(onnx.load(str(path))) == ["h"]
    assert calibration.activation_outputs(onnx.load(str(path)), ["relu_out"]) == []
    x = np.random.default_rng(7).normal(size=(64, 3, 8, 8)).astype(np.float32)
    options = {"bias_correction": False, "layer_report": False, "round_weights": False}
    quantize_int8(path, tmp_path / "q.onnx", {"x": x}, calibration_method=method, **options)
    float_y, float_h = runtime_session(path).run(["y", "h"], {"x": x})
    int8_y, int8_h = runtime_session(tmp_path / "q.onnx").run(["y", "h"], {"x": x})
    assert (float_h < 0).mean() > 0.2  # a real negative half
    for ours, theirs in ((int8_h, float_h), (int8_y, float_y)):  # not clamped at 0
        assert abs((ours < 0).mean() - (theirs < 0).mean()) < 0.05
        assert np.abs(ours - theirs).mean() < 0.03 * (theirs.max() - theirs.min())
    model = onnx.load(str(tmp_path / "q.onnx"))
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quantize = producers[producers["h"].input[0]]  # h = DequantizeLinear(QuantizeLinear(.))
    assert quantize.op_type == "QuantizeLinear"
    scale = float(initializers[quantize.input[1]])
    assert scale == pytest.approx((float_h.max() - float_h.min()) / 255, rel=1e-5)


def runtime_session(path):
    from keras_bn.converters import runtime

    return runtime.open_session(path, optimization="ORT_DISABLE_ALL")


def test_one_dimensional_weights_log_no_axis_warning(tmp_path, caplog, monkeypatch):
    """onnxruntime's quantizer logged "Axis 1 is out-of-range for weight ..." on the
    root logger for each LayerNormalization scale (five per LayerNorm of a text
    model): a 1-D weight gets one scale, as it should. Quiet, and no filter is left
    on the root logger. (LayerNormalization now stays float with the residual stream:
    quantized here as any 1-D weight's node would be.)"""
    import logging

    monkeypatch.setattr(precision, "_residual_stream", lambda graph, producers: [])

    rng = np.random.default_rng(9)
    arrays = {"gamma": rng.normal(size=8), "beta": rng.normal(size=8), "w": rng.normal(size=(8, 5))}
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], "norm", axis=-1),
        helper.make_node("MatMul", ["n", "w"], ["y"], "dense"),
    ]
    source = save_graph(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5])],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()],
        tmp_path / "f.onnx",
    )
    data = {"x": rng.normal(size=(16, 4, 8)).astype(np.float32)}
    filters = list(logging.getLogger().filters)
    with caplog.at_level(logging.WARNING):
        quantize_int8(source, tmp_path / "q.onnx", data, layer_report=False)
    assert not [r for r in caplog.records if "out-of-range" in r.getMessage()]
    assert logging.getLogger().filters == filters
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    assert "gamma_quantized" in {tensor.name for tensor in quantized.graph.initializer}


def test_a_tensor_of_no_values_gets_a_range_of_zero(tmp_path):
    """A split of width 0 (KerasHub's D-FINE has one) holds no value in any batch: it
    was reported as a tensor without a finite value. It gets the range [0, 0], and the
    int8 file computes the float model's outputs within int8 noise."""
    from keras_bn.converters import runtime

    rng = np.random.default_rng(10)
    arrays = {
        "w1": rng.normal(size=(CHANNELS, 3, 3, 3)) * 0.4,
        "wd": rng.normal(size=(CHANNELS, CLASSES)),
        "split": np.array([CHANNELS, 0]),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Split", ["c1", "split"], ["whole", "empty"], "split", axis=1),
        helper.make_node("Concat", ["whole", "empty"], ["joined"], "concat", axis=1),
        helper.make_node("GlobalAveragePool", ["joined"], ["g"], "average"),
        helper.make_node("Flatten", ["g"], ["flat"], "flatten"),
        helper.make_node("Gemm", ["flat", "wd"], ["y"], "dense"),
    ]
    types = {"split": np.int64}
    source = save_graph(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(a.astype(types.get(n, np.float32)), n) for n, a in arrays.items()],
        tmp_path / "f.onnx",
    )
    data = {"x": rng.normal(size=(32, 3, 8, 8)).astype(np.float32)}
    quantize_int8(source, tmp_path / "q.onnx", data, layer_report=False)
    received = runtime.open_session(str(tmp_path / "q.onnx")).run(None, data)[0]
    expected = runtime.open_session(str(source)).run(None, data)[0]
    assert 10 * np.log10(np.mean(expected**2) / np.mean((received - expected) ** 2)) > 30

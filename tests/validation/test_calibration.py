"""One-pass percentile calibration (converters/calibration.py) against onnxruntime's
own percentile calibrator, NumPy's percentile, and the int8 file onnxruntime's
calibration makes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_bias_correction import _float_model, _images

from keras_bn.converters import calibration, runtime
from keras_bn.converters.comparison import sqnr_db
from keras_bn.converters.precision import quantize_int8

PERCENTILE = 99.99


def _batches(seed: int = 0) -> list[np.ndarray]:
    """Batches whose range grows (the histogram gains bins) and shrinks, with an
    outlier, and a tensor whose magnitudes start away from zero."""
    rng = np.random.default_rng(seed)
    return [
        rng.normal(0.5, 1.0, size=(4, 16, 8, 8)).astype(np.float32),
        rng.normal(0.5, 3.0, size=(4, 16, 8, 8)).astype(np.float32),  # wider: more bins
        np.concatenate([rng.normal(size=4095), [40.0]]).astype(np.float32).reshape(4, 16, 8, 8),
        rng.uniform(0.2, 0.5, size=(4, 16, 8, 8)).astype(np.float32),  # narrower
    ]


def test_percentile_ranges_equal_onnxruntimes_calibrator_to_a_bin():
    from onnxruntime.quantization.calibrate import HistogramCollector

    theirs = HistogramCollector("percentile", True, 2048, 2048, PERCENTILE, "same")
    ours = calibration.PercentileHistogram()
    for batch in _batches():
        theirs.collect({"x": [batch]})
        ours.add(batch)
    low, high, *_ = theirs.compute_collection_result()["x"]
    our_low, our_high = ours.range(PERCENTILE)
    assert ours.width > 0 and ours.counts is not None and ours.counts.sum() == 4 * 4096
    assert len(ours.counts) == len(theirs.histogram_dict["x"][0])  # the same bins
    assert abs(float(our_high) - float(high)) <= 1.01 * ours.width
    assert abs(float(our_low) - float(low)) <= 1.01 * ours.width
    # and the statistic itself, from every |x| seen: the percentile lies in the bin
    # that starts at the threshold
    every = np.abs(np.concatenate([batch.ravel() for batch in _batches()]))
    threshold, share = float(our_high), PERCENTILE / 100
    assert np.mean(every < threshold - 0.01 * ours.width) < share
    assert np.mean(every < threshold + 1.01 * ours.width) >= share


def test_a_range_never_leaves_the_values_own():
    """ReLU outputs: the threshold's negative side is clipped to their minimum, 0."""
    histogram = calibration.PercentileHistogram()
    histogram.add(np.maximum(np.random.default_rng(1).normal(size=10000), 0).astype(np.float32))
    low, high = histogram.range(100.0)
    assert float(low) == 0.0 and 0 < float(high) <= histogram.highest


def test_collect_gives_every_calibrated_tensor_and_the_layer_means():
    model = onnx.shape_inference.infer_shapes(_float_model())
    images = _images(24, seed=3)
    batches = [{"x": images[i : i + 8]} for i in range(0, 24, 8)]
    statistics = calibration.collect(
        model, batches, percentile=PERCENTILE, means_of=["d_relu", "p"]
    )
    assert statistics.samples == 24
    assert set(calibration.calibrated_tensors(model)) <= set(statistics.ranges)
    assert {"x", "d", "p_relu", "logits"} <= set(statistics.ranges)
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for name in ("d_relu", "p"):
        exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, 1, None))
    reference = runtime.open_session(exposed.SerializeToString())
    values = reference.run(["d_relu", "p"], {"x": images})
    for name, value in zip(["d_relu", "p"], values, strict=True):
        np.testing.assert_allclose(
            statistics.means[name], value.mean(axis=(0, 2, 3), dtype=np.float64), rtol=1e-5
        )
        assert statistics.spreads[name] == pytest.approx(float(value.std()), rel=1e-3)


@pytest.fixture(scope="module")
def quantized_both_ways(tmp_path_factory, request):
    """The float model quantized by our calibration pass and by onnxruntime's own."""
    work = tmp_path_factory.mktemp("calibration")
    source = work / "float.onnx"
    onnx.save(_float_model(), source)
    inputs = {"x": _images(32, seed=4)}
    ours = work / "ours.onnx"
    quantize_int8(source, ours, inputs, layer_report=False)
    theirs = work / "theirs.onnx"
    patch = pytest.MonkeyPatch()
    patch.setattr(calibration, "has_calibration_cache", lambda: False)
    try:
        quantize_int8(source, theirs, inputs, layer_report=False)
    finally:
        patch.undo()
    return source, ours, theirs


def _scales(path) -> dict[str, float]:
    model = onnx.load(str(path))
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {
        node.input[0]: float(initializers[node.input[1]])
        for node in model.graph.node
        if node.op_type == "QuantizeLinear" and initializers[node.input[1]].size == 1
    }


def test_the_int8_file_is_onnxruntimes_own_to_a_histogram_bin(quantized_both_ways):
    if not calibration.has_calibration_cache():
        pytest.skip("this onnxruntime has no calibration cache: its own calibrator ran")
    source, ours, theirs = quantized_both_ways
    our_scales, their_scales = _scales(ours), _scales(theirs)
    assert our_scales.keys() == their_scales.keys() and len(our_scales) >= 5
    for name, scale in their_scales.items():
        # a range moves by at most one of 2048+ bins: the scale by about 1/2048 of itself
        assert our_scales[name] == pytest.approx(scale, rel=2e-3), name
    inputs = {"x": _images(64, seed=5)}
    float_out = runtime.run(runtime.open_session(source), inputs)[0]
    our_out = runtime.run(runtime.open_session(ours), inputs)[0]
    their_out = runtime.run(runtime.open_session(theirs), inputs)[0]
    assert sqnr_db(our_out, float_out) >= sqnr_db(their_out, float_out) - 0.5
    assert sqnr_db(our_out, their_out) >= 30

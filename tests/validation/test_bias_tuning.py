"""Bias tuning (converters/bias_tuning.py) on a small QDQ model built in ONNX.

The model: a 3x3 convolution with ReLU6 whose output channels span two decades (what
folded BN leaves), a depthwise 3x3 convolution with ReLU6, a linear pointwise
convolution added back to the first layer's output, global average pooling and a
Gemm. The references are NumPy's formula for the clipped least-squares shift, a
brute-force search of the same objective, the float ONNX model's outputs and the
quantized model's own biases before they were disturbed.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from support.onnx_graphs import (
    BLOCK_CHANNELS,
    BLOCK_CLASSES,
    BLOCK_WIDTH,
    block_images,
    depthwise_block,
)

from keras_bn.converters import bias_tuning, runtime
from keras_bn.converters.bias_tuning import clipped_shift, relative_error, tune_biases
from keras_bn.converters.comparison import sqnr_db
from keras_bn.converters.precision import quantize_int8

CHANNELS, WIDTH, CLASSES = BLOCK_CHANNELS, BLOCK_WIDTH, BLOCK_CLASSES


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The float model, its default int8 quantization (bias correction, no tuning)
    and the calibration images."""
    folder = tmp_path_factory.mktemp("tuning")
    onnx.save(depthwise_block(), str(folder / "float.onnx"))
    calibration = block_images(64, seed=1)
    quantize_int8(
        folder / "float.onnx", folder / "int8.onnx", {"x": calibration}, layer_report=False
    )
    return folder, calibration


def _logits(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = runtime.open_session(model.SerializeToString(), optimization="ORT_DISABLE_ALL")
    return runtime.run(session, {"x": images})[0]


def _biases(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {
        i.name: numpy_helper.to_array(i)
        for i in model.graph.initializer
        if i.data_type == TensorProto.INT32
    }


# ---------------------------------------------------------------------------------------
# Maths.


@pytest.mark.parametrize("bounds", [(-np.inf, np.inf), (0.0, 6.0), (0.0, 0.5), (-1.0, np.inf)])
def test_clipped_shift_nearly_minimizes_the_clipped_squared_error(bounds):
    rng = np.random.default_rng(3)
    values = rng.normal(0.3, 1.0, size=(6, 5, 4, 4))
    targets = np.clip(values + rng.normal(0.2, 0.3, size=values.shape), *bounds)
    shift = clipped_shift(values, targets, *bounds)
    assert shift.shape == (5,)

    def objective(channel: int, d: float) -> float:
        moved = np.clip(values[:, channel] + d, *bounds)
        return float(np.mean((moved - targets[:, channel]) ** 2))

    grid = np.linspace(-1.5, 1.5, 3001)
    for channel in range(5):
        best = min(objective(channel, d) for d in grid)
        reached = objective(channel, shift[channel])
        # A stationary point: clipping makes the objective non-convex.
        assert reached <= min(best * 1.01, objective(channel, 0.0)), channel
        moved = values[:, channel] + shift[channel]
        inside = (moved > bounds[0]) & (moved < bounds[1])
        assert abs(np.mean((moved - targets[:, channel])[inside])) < 1e-9
    if bounds == (-np.inf, np.inf):  # the whole mean shift, in one step
        expected = (targets - values).mean(axis=(0, 2, 3))
        np.testing.assert_allclose(shift, expected, rtol=0, atol=1e-12)


def test_clipped_shift_leaves_a_channel_that_always_clips():
    values = np.full((2, 1, 3), -5.0)  # ReLU clips every value
    assert clipped_shift(values, np.ones_like(values), 0.0, 6.0) == pytest.approx([0.0])


def test_relative_error_weighs_each_output_by_its_own_power():
    expected = [np.array([[2.0, -2.0]]), np.array([[100.0, 300.0]])]
    received = [expected[0] + [[0.2, 0.0]], expected[1] + [[10.0, 0.0]]]
    # (0.04 / 2) / 4 + (100 / 2) / 50000
    assert relative_error(received, expected) == pytest.approx(0.005 + 0.001)
    assert relative_error(expected, expected) == 0.0


# ---------------------------------------------------------------------------------------
# The pass.


def test_tuning_only_changes_int32_biases_and_never_worsens_the_tuning_samples(files):
    folder, calibration = files
    float_model = onnx.load(str(folder / "float.onnx"))
    quantized = onnx.load(str(folder / "int8.onnx"))
    copy = quantized.SerializeToString()
    batches = [{"x": calibration[i : i + 16]} for i in range(0, len(calibration), 16)]
    tuned, report = tune_biases(float_model, quantized, batches)
    assert quantized.SerializeToString() == copy  # not modified
    changed = {
        a.name
        for a, b in zip(quantized.graph.initializer, tuned.graph.initializer, strict=True)
        if a.SerializeToString() != b.SerializeToString()
    }
    assert changed <= set(_biases(quantized))
    # Every Conv/Gemm is tried, the Gemm too, whose output is the graph's.
    assert report.tried == ["conv", "depthwise", "pointwise", "dense"], report
    assert len(changed) == len(report.changed) and report.samples == 32
    # The report's SQNRs are the two models' own, on the samples tuning used.
    used = calibration[:32]
    (expected,) = runtime.run(runtime.open_session(str(folder / "float.onnx")), {"x": used})
    before, after = (
        sqnr_db(_logits(quantized, used), expected),
        sqnr_db(_logits(tuned, used), expected),
    )
    assert report.sqnr_db_before == pytest.approx(before, abs=0.01)
    assert report.sqnr_db_after == pytest.approx(after, abs=0.01)
    assert after >= before
    assert "bias tuning: " in str(report) and f"-> {after:.1f} dB" in str(report)


def test_a_disturbed_bias_is_found_and_put_back(files):
    """A bias pushed off by a whole output spread: the tuned model gets the original
    bias back to within a few steps, and its logits the original's accuracy."""
    folder, calibration = files
    float_model = onnx.load(str(folder / "float.onnx"))
    quantized = onnx.load(str(folder / "int8.onnx"))
    disturbed = onnx.ModelProto()
    disturbed.CopyFrom(quantized)
    name = next(n for n in _biases(quantized) if n.startswith("pw_b"))
    original = _biases(quantized)[name]
    initializer = next(i for i in disturbed.graph.initializer if i.name == name)
    offset = (np.abs(original).max() + 1000) * np.where(np.arange(WIDTH) % 2, 1, -1)
    initializer.CopyFrom(numpy_helper.from_array((original + offset).astype(np.int32), name))
    batches = [{"x": calibration}]
    tuned, report = tune_biases(float_model, disturbed, batches)
    assert "pointwise" in report.changed
    error = np.abs(_biases(tuned)[name].astype(np.int64) - original)
    assert error.max() < 0.05 * np.abs(offset).min(), (error, offset)
    held_out = block_images(128, seed=2)
    (expected,) = runtime.run(runtime.open_session(str(folder / "float.onnx")), {"x": held_out})
    plain = sqnr_db(_logits(quantized, held_out), expected)
    assert sqnr_db(_logits(disturbed, held_out), expected) < plain - 10
    assert sqnr_db(_logits(tuned, held_out), expected) > plain - 1.0


def test_a_change_that_makes_the_outputs_worse_is_not_kept(files, monkeypatch):
    folder, calibration = files
    float_model = onnx.load(str(folder / "float.onnx"))
    quantized = onnx.load(str(folder / "int8.onnx"))

    def harmful(values, targets, low=-np.inf, high=np.inf, iterations=8):
        return np.full(np.shape(values)[1], 0.5)  # half of ReLU6's range, every channel

    monkeypatch.setattr(bias_tuning, "clipped_shift", harmful)
    tuned, report = tune_biases(float_model, quantized, [{"x": calibration}])
    assert report.tried == ["conv", "depthwise", "pointwise", "dense"]
    assert report.changed == []
    assert tuned.SerializeToString() == quantized.SerializeToString()
    assert report.sqnr_db_after == report.sqnr_db_before


def test_layers_that_cannot_be_tuned_say_why(files):
    """A layer whose output is read twice before quantization (the path forks) is
    left alone, with the reason; the others are still tuned."""
    folder, calibration = files
    float_model = onnx.load(str(folder / "float.onnx"))
    quantized = onnx.load(str(folder / "int8.onnx"))
    dense = next(n for n in quantized.graph.node if n.name == "dense")
    for model, read in ((quantized, dense.output[0]), (float_model, "logits")):
        model.graph.node.append(helper.make_node("Neg", [read], ["negated"], "neg"))
        model.graph.output.append(helper.make_tensor_value_info("negated", TensorProto.FLOAT, None))
    _, report = tune_biases(float_model, quantized, [{"x": calibration}])
    assert report.skipped == {"dense": "its output is not quantized through Relu/Clip only"}
    assert report.tried == ["conv", "depthwise", "pointwise"]
    assert "1 layer(s) not tried" in str(report)


def test_quantize_int8_tunes_on_request_and_reports_it(files, tmp_path):
    folder, calibration = files
    progress = []
    report = quantize_int8(
        folder / "float.onnx",
        tmp_path / "tuned.onnx",
        {"x": calibration},
        layer_report=False,
        tune_biases=True,
        tuning_progress=lambda done, total: progress.append((done, total)),
    )
    tuning = report.details["bias_tuning"]
    assert tuning["tried"] == ["conv", "depthwise", "pointwise", "dense"]
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert "bias tuning (" in str(report) and "bias tuning: " in str(report)
    assert report.to_dict()["bias_tuning"] == tuning
    # The written file holds the tuned biases: its error on the tuning samples is
    # the report's.
    tuned = onnx.load(str(tmp_path / "tuned.onnx"))
    used = calibration[:32]
    (expected,) = runtime.run(runtime.open_session(str(folder / "float.onnx")), {"x": used})
    assert sqnr_db(_logits(tuned, used), expected) == pytest.approx(
        tuning["sqnr_db_after"], abs=0.01
    )
    plain = quantize_int8(
        folder / "float.onnx", tmp_path / "plain.onnx", {"x": calibration}, layer_report=False
    )
    assert "bias_tuning" not in plain.details and "bias tuning" not in str(plain)


def test_a_model_with_nothing_to_tune_says_so(files):
    """No Conv/Gemm with an int32 bias (here: every bias taken away): nothing runs,
    the model comes back as it was, and the report says why in JSON-safe values."""
    folder, calibration = files
    float_model = onnx.load(str(folder / "float.onnx"))
    quantized = onnx.load(str(folder / "int8.onnx"))
    for node in quantized.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            del node.input[2:]
    tuned, report = tune_biases(float_model, quantized, [{"x": calibration}])
    assert tuned.SerializeToString() == quantized.SerializeToString()
    assert report.tried == [] and report.sqnr_db_before is None
    assert set(report.skipped) == {"conv", "depthwise", "pointwise", "dense"}
    assert str(report) == "bias tuning: no Conv/Gemm layer to tune (4 not tried)"
    json.dumps(report.to_dict(), allow_nan=False)


def test_a_fixed_batch_size_takes_whole_batches(tmp_path):
    """A model whose batch size is fixed (12) gets whole batches of tuning samples: the
    first three, 36 samples (onnxruntime rejects a batch of the 8 that make 32)."""
    model = depthwise_block()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 12
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    report = quantize_int8(
        tmp_path / "fixed.onnx", tmp_path / "q.onnx", {"x": block_images(48, seed=1)},
        per_channel=False, equalize=True, tune_biases=True, layer_report=False,
    )  # fmt: skip
    assert report.details["bias_tuning"]["samples"] == 36
    assert report.details["weight_rounding"]["samples"] == 48  # all 4 batches (64 asked)

"""Empirical bias correction (converters/bias_correction.py) on a small QDQ model.

The model is built directly in ONNX (no Keras): a depthwise 3x3 convolution whose
channels' kernels differ in scale by three decades (what folding BN leaves, and
what per-tensor int8 rounds to a few levels), ReLU, a pointwise convolution, a
convolution with no bias, global average pooling and a Gemm classifier. Inputs are
positive (image-like), so rounded kernels shift each layer's mean output:
``(W_q - W) E[x]``. The reference for "mean output" is NumPy's mean of the float
model's own layer outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from keras_bn.converters import runtime
from keras_bn.converters.bias_correction import (
    ChannelMoments,
    channel_sums,
    convolution_shift,
    correct_biases,
    corrected_bias,
    dense_shift,
    tensors_to_measure,
)
from keras_bn.converters.comparison import sqnr_db
from keras_bn.converters.errors import UserInputError
from keras_bn.converters.precision import quantize_int8

CHANNELS, WIDTH, CLASSES = 8, 32, 10
CONVOLUTIONS = ("depthwise", "pointwise", "nobias")


def _float_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    spread = np.logspace(-3, 0, CHANNELS)[:, None, None, None]  # 1e-3 .. 1 per channel
    weights = {
        "depthwise_w": rng.normal(size=(CHANNELS, 1, 3, 3)) * spread,
        "depthwise_b": rng.normal(size=CHANNELS) * 0.1,
        "pointwise_w": rng.normal(size=(WIDTH, CHANNELS, 1, 1)) * 0.5,
        "pointwise_b": rng.normal(size=WIDTH) * 0.1,
        "nobias_w": rng.normal(size=(WIDTH, WIDTH, 1, 1)) * 0.3,
        "dense_w": rng.normal(size=(WIDTH, CLASSES)),
        "dense_b": rng.normal(size=CLASSES),
    }
    initializers = [
        numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()
    ]
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "depthwise_w", "depthwise_b"],
            ["d"],
            "depthwise",
            group=CHANNELS,
            pads=[1, 1, 1, 1],
        ),  # fmt: skip
        helper.make_node("Relu", ["d"], ["d_relu"], "relu1"),
        helper.make_node("Conv", ["d_relu", "pointwise_w", "pointwise_b"], ["p"], "pointwise"),
        helper.make_node("Relu", ["p"], ["p_relu"], "relu2"),
        helper.make_node("Conv", ["p_relu", "nobias_w"], ["n"], "nobias"),
        helper.make_node("GlobalAveragePool", ["n"], ["pooled"], "gap"),
        helper.make_node("Flatten", ["pooled"], ["flat"], "flatten"),
        helper.make_node("Gemm", ["flat", "dense_w", "dense_b"], ["logits"], "dense"),
    ]
    graph = helper.make_graph(
        nodes,
        "bias_shift",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, CHANNELS, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, CLASSES])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _images(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, size=(count, CHANNELS, 8, 8)).astype(np.float32)


def _outputs(model: onnx.ModelProto, names: list[str], images: np.ndarray) -> list[np.ndarray]:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for name in names:
        exposed.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = runtime.open_session(exposed.SerializeToString(), optimization="ORT_DISABLE_ALL")
    return session.run(names, {"x": images})


def _layer_output(model: onnx.ModelProto, node_name: str) -> str:
    return next(node.output[0] for node in model.graph.node if node.name == node_name)


def _relative_shifts(float_model, quantized, images) -> dict[str, float]:
    """Per layer: max over channels of |mean float - mean quantized| / std(float output)."""
    layers = ("depthwise", "pointwise", "dense")
    expected = _outputs(float_model, [_layer_output(float_model, n) for n in layers], images)
    received = _outputs(quantized, [_layer_output(quantized, n) for n in layers], images)
    shifts = {}
    for name, want, got in zip(layers, expected, received, strict=True):
        axes = tuple(i for i in range(want.ndim) if i != 1)
        difference = want.astype(np.float64).mean(axes) - got.astype(np.float64).mean(axes)
        shifts[name] = float(np.abs(difference).max() / want.std())
    return shifts


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The float model and its per-tensor and per-channel int8 files (built once)."""
    folder = tmp_path_factory.mktemp("bias_correction")
    float_path = folder / "float.onnx"
    onnx.save(_float_model(), str(float_path))
    calibration = _images(128, seed=1)
    paths = {"float": float_path}
    for per_channel in (False, True):
        path = folder / f"int8_{'channel' if per_channel else 'tensor'}.onnx"
        quantize_int8(  # the scheme before bias correction (not the default)
            float_path,
            path,
            {"x": calibration},
            per_channel=per_channel,
            calibration_method="MinMax",
            bias_correction=False,
            round_weights=False,  # round-to-nearest: the shifts bias correction is for
        )
        paths[per_channel] = path
    return paths, calibration


# ---------------------------------------------------------------------------------------
# Maths.


@pytest.mark.parametrize("axis", [1, -1], ids=["channels-first", "channels-last"])
def test_channel_sums_average_exactly_when_streamed(axis):
    values = np.random.default_rng(0).normal(3.0, 2.0, size=(6, 5, 4, 3)).astype(np.float32)
    total, count = channel_sums(values, channel_axis=axis)
    first, first_count = channel_sums(values[:2], channel_axis=axis)
    rest, rest_count = channel_sums(values[2:], channel_axis=axis)
    axes = tuple(i for i in range(4) if i != axis % 4)
    # channels-first: spatial sums in float32 (pairwise), then float64; else all float64
    rtol = 1e-6 if axis == 1 else 1e-12
    np.testing.assert_allclose(total / count, values.astype(np.float64).mean(axes), rtol=rtol)
    np.testing.assert_allclose((first + rest) / (first_count + rest_count), total / count)
    assert total.dtype == np.float64


def test_channel_sums_of_a_large_feature_map_stay_within_float32_pairwise_error():
    """A calibration-sized NCHW tensor (64x64 positions, values far from zero): the
    float32 spatial sums keep the means within a few 1e-7 of NumPy's float64 ones."""
    rng = np.random.default_rng(2)
    values = rng.normal(50.0, 3.0, size=(4, 8, 64, 64)).astype(np.float32)
    total, count = channel_sums(values)
    exact = values.astype(np.float64).mean(axis=(0, 2, 3))
    assert count == 4 * 64 * 64
    np.testing.assert_allclose(total / count, exact, rtol=1e-6)


def test_channel_moments_streamed_are_numpys():
    """Per-channel means and the overall spread of a tensor fed batch by batch (as the
    int8 calibration pass feeds them) against NumPy's float64 mean and std."""
    spread = np.logspace(-2, 1, 5)[None, :, None, None]  # channels of very different scale
    values = (np.random.default_rng(1).normal(3.0, 1.0, (10, 5, 4, 3)) * spread).astype(np.float32)
    moments = ChannelMoments()
    for start in range(0, 10, 4):  # batches of 4, 4 and 2
        moments.add(values[start : start + 4])
    exact = values.astype(np.float64)
    np.testing.assert_allclose(moments.means, exact.mean(axis=(0, 2, 3)), rtol=1e-6)
    assert moments.spread == pytest.approx(exact.std(), rel=1e-6)
    assert (moments.samples, moments.count) == (10, 10 * 4 * 3)


def test_tensors_to_measure_are_each_layers_input_and_output():
    assert tensors_to_measure(_float_model()) == [
        "x", "d", "d_relu", "p", "p_relu", "n", "flat", "logits"
    ]  # fmt: skip


def test_corrected_bias_adds_the_shift_in_bias_steps():
    bias = np.array([100, -5, 0], dtype=np.int32)
    scale = np.array([0.01, 0.5, 2.0])
    shift = np.array([0.254, -1.0, 0.9])  # 25.4, -2 and 0.45 steps
    np.testing.assert_array_equal(corrected_bias(bias, scale, shift), [125, -7, 0])
    # Per-tensor scale broadcasts; int32's range holds.
    clipped = corrected_bias(np.array([2**31 - 10], np.int32), 1.0, np.array([1e3]))
    np.testing.assert_array_equal(clipped, [2**31 - 1])
    assert clipped.dtype == np.int32


@pytest.mark.parametrize("groups", [1, 2, 6], ids=["dense", "grouped", "depthwise"])
def test_convolution_shift_is_the_mean_of_the_convolved_error(groups):
    """Against a direct convolution of the weight error over a constant-mean input
    (no padding: every output position sees the whole window)."""
    rng = np.random.default_rng(groups)
    channels, outputs = 6, 12
    error = rng.normal(size=(outputs, channels // groups, 3, 3))
    means = rng.normal(size=channels)
    image = np.broadcast_to(means[:, None, None], (channels, 5, 5))
    per_group = channels // groups
    direct = np.array(
        [
            sum(
                (error[o, i] * image[(o // (outputs // groups)) * per_group + i, :3, :3]).sum()
                for i in range(per_group)
            )
            for o in range(outputs)
        ]
    )
    np.testing.assert_allclose(convolution_shift(error, means, groups), direct, rtol=1e-12)
    np.testing.assert_allclose(
        dense_shift(error[:, 0, 0, :2].T, means[:2]), means[:2] @ error[:, 0, 0, :2].T
    )


@pytest.mark.parametrize(
    "shape, axis, zero",
    [
        ((12, 3, 3, 3), 0, False),
        ((12, 1, 3, 3), 0, True),
        ((12, 3, 5), None, True),
        ((7, 5), 1, True),
    ],
    ids=["conv-per-channel", "depthwise-zero-point", "conv1d-per-tensor", "gemm"],
)
def test_stored_weights_error_gives_the_dequantized_kernels_shift(shape, axis, zero):
    """The int8 kernel's error, summed over the window from the stored integers, gives
    the shift of the whole dequantized kernel's error (NumPy, float64)."""
    from keras_bn.converters.bias_correction import _StoredWeights

    rng = np.random.default_rng(len(shape))
    values = rng.integers(-127, 128, size=shape).astype(np.int8)
    broadcast = [1] * len(shape)
    if axis is not None:
        broadcast[axis] = shape[axis]
    scale = rng.uniform(1e-3, 1e-1, size=broadcast).astype(np.float32)
    offset = rng.integers(-3, 4, size=broadcast).astype(np.int8) if zero else None
    exact = (values.astype(np.float32) - (0 if offset is None else offset)) * scale
    exact = (exact + rng.normal(scale=0.3, size=shape) * scale).astype(np.float32)
    dequantized = (values.astype(np.float64) - (0.0 if offset is None else offset)) * scale
    full_error = dequantized - exact.astype(np.float64)
    error = _StoredWeights(values, scale, offset, axis).error(exact)
    if len(shape) == 2:  # a Gemm's weights: nothing to sum
        np.testing.assert_allclose(error, full_error, rtol=1e-12, atol=1e-15)
        return
    means = rng.normal(size=shape[1] * (3 if shape[1] == 1 else 1))
    groups = len(means) // shape[1]
    np.testing.assert_allclose(
        convolution_shift(error, means, groups),
        convolution_shift(full_error, means, groups),
        rtol=1e-10,
        atol=1e-12,
    )


# ---------------------------------------------------------------------------------------
# The pass on a quantized model.


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_mean_output_shift_drops(files, per_channel):
    paths, calibration = files
    float_model, quantized = onnx.load(str(paths["float"])), onnx.load(str(paths[per_channel]))
    batches = [{"x": calibration[i : i + 32]} for i in range(0, len(calibration), 32)]
    corrected, report = correct_biases(float_model, quantized, batches)

    before = _relative_shifts(float_model, quantized, calibration)
    after = _relative_shifts(float_model, corrected, calibration)
    # The shift is real before; where the layer's own rounded weights cause it (the
    # convolutions) it drops to under half. The Gemm's comes mostly from the
    # uncorrectable bias-free convolution before it: it must not grow.
    assert max(before.values()) > 0.005, before
    for name in ("depthwise", "pointwise"):
        assert after[name] < 0.5 * before[name], (name, before, after)
    assert after["dense"] <= before["dense"] * 1.01, (before, after)
    assert [layer.node for layer in report.layers] == ["depthwise", "pointwise", "dense"]
    assert report.skipped == {"nobias": "no quantized bias (int32 DequantizeLinear)"}
    assert report.samples == len(calibration)
    # The quantized input is not modified; only bias initializers change.
    assert onnx.load(str(paths[per_channel])).SerializeToString() == quantized.SerializeToString()
    changed = {
        a.name
        for a, b in zip(quantized.graph.initializer, corrected.graph.initializer, strict=True)
        if a.SerializeToString() != b.SerializeToString()
    }
    assert changed and all("bias" in name or "_b" in name for name in changed), changed


def test_held_out_accuracy_does_not_fall(files):
    paths, calibration = files
    float_model, quantized = onnx.load(str(paths["float"])), onnx.load(str(paths[False]))
    corrected, _ = correct_biases(float_model, quantized, [{"x": calibration}])
    held_out = _images(256, seed=2)
    (reference,) = _outputs(float_model, [], held_out)
    (plain,) = _outputs(quantized, [], held_out)
    (better,) = _outputs(corrected, [], held_out)
    agreement = [float((y.argmax(1) == reference.argmax(1)).mean()) for y in (plain, better)]
    assert agreement[1] >= agreement[0], agreement
    # The logit SQNR may move by noise (0.04 dB down on this model), not more.
    assert sqnr_db(better, reference) >= sqnr_db(plain, reference) - 0.1, "SQNR fell"


def test_quantize_int8_options(files, tmp_path):
    paths, calibration = files
    report = quantize_int8(
        paths["float"],
        tmp_path / "corrected.onnx",
        {"x": calibration},
        per_channel=False,
        calibration_method="Percentile",
        percentile=99.99,
    )
    assert report.details["calibration_method"] == "Percentile"
    assert report.details["percentile"] == 99.99
    corrections = report.details["bias_correction"]
    assert [layer["node"] for layer in corrections["layers"]] == ["depthwise", "pointwise", "dense"]
    assert report.comparison.sqnr_db > 10  # still computes the model
    entropy = quantize_int8(
        paths["float"],
        tmp_path / "entropy.onnx",
        {"x": calibration},
        calibration_method="Entropy",
        bias_correction=False,
    )
    assert "bias_correction" not in entropy.details and entropy.comparison.sqnr_db > 10
    # The default scheme (BENCHMARKS.md 19b): Percentile at 99.99% with bias correction.
    default = quantize_int8(paths["float"], tmp_path / "default.onnx", {"x": calibration})
    assert default.details["calibration_method"] == "Percentile"
    assert default.details["percentile"] == 99.99
    assert default.details["bias_correction"]["samples"] == len(calibration)
    assert (
        "Percentile calibration (99.99% of |x|), GPTQ weight rounding of 1 depthwise layer(s), "
        "bias correction of 3 layer(s)"
    ) in str(default)


def test_bad_arguments(files, tmp_path):
    paths, calibration = files
    with pytest.raises(UserInputError, match=r"Unknown calibration method 'kl'; expected one of"):
        quantize_int8(
            paths["float"], tmp_path / "x.onnx", {"x": calibration}, calibration_method="kl"
        )
    with pytest.raises(UserInputError, match=r"Invalid percentile: .* Received: 0.9999$"):
        quantize_int8(paths["float"], tmp_path / "x.onnx", {"x": calibration}, percentile=0.9999)
    float_model = onnx.load(str(paths["float"]))
    # A float model has no quantized biases: nothing to correct, each layer says why.
    unchanged, report = correct_biases(float_model, float_model, [{"x": calibration}])
    assert report.layers == [] and set(report.skipped) == {
        "depthwise",
        "pointwise",
        "nobias",
        "dense",
    }
    assert unchanged.SerializeToString() == float_model.SerializeToString()

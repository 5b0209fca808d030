"""GPTQ weight rounding (converters/weight_rounding.py).

The references: a convolution written as NumPy loops (for the patches), round-to-nearest
(what GPTQ must reduce to when the inputs are uncorrelated), the two-weight case solved
by hand, fresh inputs from the same distribution (the error must fall there too, not
only on the inputs ``H`` came from), and the float ONNX model's outputs.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from support.onnx_graphs import block_images, depthwise_block

from keras_bn.converters import runtime
from keras_bn.converters.comparison import sqnr_db
from keras_bn.converters.errors import UserInputError
from keras_bn.converters.precision import quantize_int8
from keras_bn.converters.weight_rounding import (
    gptq_round,
    output_error,
    patches,
    round_weights,
)

# ---------------------------------------------------------------------------------------
# Maths.


def _convolution(x, weights, strides, pads, dilations, depthwise=False):
    """A 2-D convolution (NCHW, ONNX's pads order), written as loops over outputs."""
    (sh, sw), (dh, dw) = strides, dilations
    kh, kw = weights.shape[2:]
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    out_h = (x.shape[2] - (kh - 1) * dh - 1) // sh + 1
    out_w = (x.shape[3] - (kw - 1) * dw - 1) // sw + 1
    result = np.zeros((len(x), len(weights), out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            window = x[:, :, i * sh : i * sh + (kh - 1) * dh + 1 : dh]
            window = window[:, :, :, j * sw : j * sw + (kw - 1) * dw + 1 : dw]
            if depthwise:
                result[:, :, i, j] = np.einsum("nckl,ckl->nc", window, weights[:, 0])
            else:
                result[:, :, i, j] = np.einsum("nckl,ockl->no", window, weights)
    return result


@pytest.mark.parametrize(
    ("kernel", "strides", "pads", "dilations"),
    [
        ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
        ((3, 2), (2, 1), (1, 0, 2, 1), (2, 1)),
        ((1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
    ],
    ids=["same-3x3", "strided-dilated-uneven", "pointwise"],
)
@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
def test_patches_times_the_kernel_is_the_convolution(kernel, strides, pads, dilations, depthwise):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 8))
    weights = rng.standard_normal((3 if depthwise else 4, 1 if depthwise else 3, *kernel))
    expected = _convolution(x, weights, strides, pads, dilations, depthwise)
    columns = patches(x, kernel, strides, pads, dilations, depthwise=depthwise)
    if depthwise:
        got = np.einsum("ck,ckp->cp", weights.reshape(3, -1), columns)
        got = got.reshape(3, 2, *expected.shape[2:]).transpose(1, 0, 2, 3)
    else:
        got = (weights.reshape(4, -1) @ columns).reshape(4, 2, *expected.shape[2:])
        got = got.transpose(1, 0, 2, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_uncorrelated_inputs_give_round_to_nearest():
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((6, 40)) * np.linspace(0.1, 2, 6)[:, None]
    scale = np.abs(weights).max(axis=1) / 100  # per row, some weights past the bounds
    moments = np.diag(rng.uniform(0.5, 3.0, 40))
    nearest = np.clip(np.round(weights / scale[:, None]) + 3, -128, 127)
    np.testing.assert_array_equal(gptq_round(weights, moments, scale, zero=3), nearest)


def test_two_weights_carry_the_first_error_onto_the_second():
    """With H = [[a, b], [b, c]], rounding w0 leaves e0 = w0 - q0; the second weight's
    best continuous value is w1 + e0 b / c, which GPTQ then rounds."""
    h = np.array([[2.0, 1.5], [1.5, 3.0]])
    weights = np.array([[0.45, 0.40], [-1.26, 0.71]])
    ints = gptq_round(weights, h, 1.0, damping=0.0)
    first = np.round(weights[:, 0])
    second = np.round(weights[:, 1] + (weights[:, 0] - first) * 1.5 / 3.0)
    np.testing.assert_array_equal(ints, np.stack([first, second], axis=1))
    assert ints.tolist() == [[0, 1], [-1, 1]]  # round-to-nearest: [[0, 0], [-1, 1]]


def test_gptq_lowers_the_output_error_on_fresh_inputs_too():
    """Correlated inputs (what a layer sees): against round-to-nearest, the layer's
    output error falls on the inputs H came from and on new ones."""
    rng = np.random.default_rng(2)
    mixing = rng.standard_normal((200, 200)) * 0.1

    def inputs(count, seed):
        local = np.random.default_rng(seed)
        return local.standard_normal((count, 200)) @ mixing + local.standard_normal((count, 1))

    seen, fresh = inputs(4000, 3), inputs(4000, 4)
    weights = rng.standard_normal((16, 200))
    scale = np.abs(weights).max() / 127  # one scale: per-tensor
    nearest = np.clip(np.round(weights / scale), -128, 127)
    ints = gptq_round(weights, seen.T @ seen, scale)
    for x in (seen, fresh):
        h = x.T @ x
        assert output_error(weights, ints, h, scale) < 0.6 * output_error(
            weights, nearest, h, scale
        )
    assert np.abs(ints - nearest).max() >= 1  # not round-to-nearest


def test_one_moment_matrix_per_row_is_each_row_on_its_own():
    rng = np.random.default_rng(5)
    weights = rng.standard_normal((3, 9))
    moments = np.stack([(x.T @ x) for x in rng.standard_normal((3, 50, 9)) + 1.0])
    scale = np.array([0.05, 0.1, 0.2])
    together = gptq_round(weights, moments, scale)
    for row in range(3):
        alone = gptq_round(weights[row : row + 1], moments[row], scale[row])
        np.testing.assert_array_equal(together[row : row + 1], alone)
    errors = [
        output_error(weights[r : r + 1], together[r : r + 1], moments[r], scale[r])
        for r in range(3)
    ]
    assert output_error(weights, together, moments, scale) == pytest.approx(sum(errors))


# ---------------------------------------------------------------------------------------
# The pass.


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The float block, its per-tensor int8 quantization (round-to-nearest weights, no
    bias correction: only the weights differ) and the calibration images."""
    folder = tmp_path_factory.mktemp("rounding")
    onnx.save(depthwise_block(), str(folder / "float.onnx"))
    calibration = block_images(64, seed=1)
    quantize_int8(
        folder / "float.onnx",
        folder / "int8.onnx",
        {"x": calibration},
        per_channel=False,
        signed=True,
        bias_correction=False,
        round_weights=False,
        layer_report=False,
    )
    return folder, calibration


def _logits(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = runtime.open_session(model.SerializeToString(), optimization="ORT_DISABLE_ALL")
    return runtime.run(session, {"x": images})[0]


def test_rounding_changes_only_weight_integers_and_brings_the_outputs_closer(files):
    folder, calibration = files
    float_model = onnx.load(str(folder / "float.onnx"))
    quantized = onnx.load(str(folder / "int8.onnx"))
    copy = quantized.SerializeToString()
    progress = []
    batches = [{"x": calibration[i : i + 16]} for i in range(0, len(calibration), 16)]
    rounded, report = round_weights(
        float_model, quantized, batches, progress=lambda *step: progress.append(step)
    )
    assert quantized.SerializeToString() == copy  # not modified
    assert report.rounded == ["conv", "depthwise", "pointwise", "dense"]
    assert report.samples == 64 and report.skipped == {}
    assert progress == [(step, 8) for step in range(1, 9)]  # 4 float runs of 16, 4 layers
    changed = [
        a.name
        for a, b in zip(quantized.graph.initializer, rounded.graph.initializer, strict=True)
        if a.SerializeToString() != b.SerializeToString()
    ]
    assert changed and all(name.endswith("_quantized") for name in changed), changed
    for name in changed:  # still 8-bit integers of the same shape
        before, after = (
            numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == name))
            for m in (quantized, rounded)
        )
        assert after.dtype == before.dtype == np.int8 and after.shape == before.shape
    for a, b in zip(quantized.graph.node, rounded.graph.node, strict=True):
        assert a.SerializeToString() == b.SerializeToString()
    assert report.error_db < -1.0, report
    held_out = block_images(256, seed=7)
    (expected,) = runtime.run(runtime.open_session(str(folder / "float.onnx")), {"x": held_out})
    before, after = (sqnr_db(_logits(m, held_out), expected) for m in (quantized, rounded))
    assert after > before + 0.5, (before, after)
    assert "weight rounding (GPTQ): 4 layer(s) on 64 sample(s)" in str(report)
    json.dumps(report.to_dict(), allow_nan=False)


def test_layers_that_cannot_be_rounded_say_why(files):
    folder, calibration = files
    float_model = onnx.load(str(folder / "float.onnx"))
    quantized = onnx.load(str(folder / "int8.onnx"))
    for node in quantized.graph.node:
        if node.name == "depthwise":  # each input channel read by two output channels
            group = next(a for a in node.attribute if a.name == "group")
            group.i = group.i // 2
        if node.name == "pointwise":  # in two groups of its input channels
            node.attribute.append(onnx.helper.make_attribute("group", 2))
    for node in float_model.graph.node:  # the float model has no node "dense" to read
        if node.name == "dense":
            node.name = "classifier"
    _, report = round_weights(float_model, quantized, [{"x": calibration}])
    assert report.skipped == {
        "depthwise": "a depthwise convolution with a depth multiplier",
        "pointwise": "a grouped convolution (not depthwise)",
        "dense": "no float weights of that node in the float model",
    }
    assert report.rounded == ["conv"]
    assert str(report).endswith("; 3 layer(s) kept")


def test_quantize_int8_rounds_before_correcting_and_reports_it(files, tmp_path):
    folder, calibration = files
    progress = []
    report = quantize_int8(
        folder / "float.onnx",
        tmp_path / "rounded.onnx",
        {"x": calibration},
        per_channel=False,
        layer_report=False,
        round_weights=True,
        rounding_progress=lambda *step: progress.append(step),
    )
    rounding = report.details["weight_rounding"]
    assert rounding["rounded"] == ["conv", "depthwise", "pointwise", "dense"]
    assert progress[-1] == (8, 8)
    assert "GPTQ weight rounding of 4 layer(s)" in str(report)
    assert "weight rounding (GPTQ): " in str(report)
    assert report.to_dict()["weight_rounding"] == rounding
    plain = quantize_int8(
        folder / "float.onnx",
        tmp_path / "plain.onnx",
        {"x": calibration},
        per_channel=False,
        layer_report=False,
        round_weights=False,
    )
    assert "weight_rounding" not in plain.details
    held_out = block_images(256, seed=8)
    (expected,) = runtime.run(runtime.open_session(str(folder / "float.onnx")), {"x": held_out})
    scores = [
        sqnr_db(_logits(onnx.load(str(tmp_path / f"{name}.onnx")), held_out), expected)
        for name in ("plain", "rounded")
    ]
    assert scores[1] > scores[0], scores


def test_per_channel_weights_round_the_depthwise_layers_by_default(files, tmp_path):
    """Depthwise layers (9 weights per channel) only: their integers change, every other
    layer keeps round-to-nearest's; ``round_weights=True`` rounds them all."""
    folder, calibration = files
    written = {}
    for name, option in (("default", {}), ("none", {"round_weights": False})):
        report = quantize_int8(
            folder / "float.onnx", tmp_path / f"{name}.onnx", {"x": calibration},
            layer_report=False, bias_correction=False, signed=True, **option,
        )  # fmt: skip
        written[name] = {
            i.name: numpy_helper.to_array(i)
            for i in onnx.load(str(tmp_path / f"{name}.onnx")).graph.initializer
        }
        if name == "default":
            rounding = report.details["weight_rounding"]
            assert rounding["rounded"] == ["depthwise"] and rounding["depthwise_only"]
            assert "GPTQ weight rounding of 1 depthwise layer(s)" in str(report)
            assert "weight rounding (GPTQ): 1 depthwise layer(s)" in str(report)
    differ = sorted(
        n for n in written["none"] if not np.array_equal(written["none"][n], written["default"][n])
    )
    assert differ == ["dw_w_quantized"], differ
    with pytest.raises(UserInputError, match="round_weights: expected True, False or 'depthwise'"):
        quantize_int8(
            folder / "float.onnx", tmp_path / "bad.onnx", {"x": calibration}, round_weights="all"
        )
    assert not (tmp_path / "bad.onnx").exists()


def test_one_dimensional_convolutions_are_rounded_too(tmp_path):
    """Conv1D layers (audio, sequences): a strided 1-D convolution and a dilated
    depthwise one, rounded per-tensor; their held-out output comes closer to the float
    model's than round-to-nearest's."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    spread = np.logspace(-1.5, 0, 8)[:, None, None]  # output channels of unequal ranges
    arrays = {
        "a_w": rng.normal(size=(8, 4, 5)) * spread,
        "a_b": rng.normal(size=8) * 0.1,
        "d_w": rng.normal(size=(8, 1, 3)),
        "d_b": rng.normal(size=8) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], "strided", pads=[2, 2], strides=[2]),
        helper.make_node("Relu", ["a"], ["r"], "relu"),
        helper.make_node(
            "Conv", ["r", "d_w", "d_b"], ["y"], "dilated", group=8, pads=[2, 2], dilations=[2]
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "conv1d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8, 16])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "float.onnx"))
    sequences = np.cumsum(rng.normal(size=(160, 4, 32)), axis=2).astype(np.float32) * 0.3
    calibration, held_out = sequences[:64], sequences[64:]
    scores = {}
    for rounding in (False, True):
        report = quantize_int8(
            tmp_path / "float.onnx", tmp_path / f"{rounding}.onnx", {"x": calibration},
            per_channel=False, round_weights=rounding, bias_correction=False,
            tune_biases=False, layer_report=False, signed=True,
        )  # fmt: skip
        session = runtime.open_session(
            tmp_path / f"{rounding}.onnx", optimization="ORT_DISABLE_ALL"
        )
        (expected,) = runtime.run(runtime.open_session(tmp_path / "float.onnx"), {"x": held_out})
        scores[rounding] = sqnr_db(runtime.run(session, {"x": held_out})[0], expected)
    assert report.details["weight_rounding"]["rounded"] == ["strided", "dilated"]
    assert report.details["weight_rounding"]["error_db"] < 0
    assert scores[True] > scores[False], scores
    # The strided layer's integers are GPTQ's against H summed by hand over its windows
    # on the 64 calibration sequences (pads 2, stride 2, kernel 5).
    padded = np.pad(calibration.astype(np.float64), ((0, 0), (0, 0), (2, 2)))
    windows = np.stack([padded[:, :, 2 * j : 2 * j + 5] for j in range(16)], axis=1)
    rows = windows.reshape(-1, 4 * 5)
    stored = {
        i.name: numpy_helper.to_array(i)
        for i in onnx.load(str(tmp_path / "True.onnx")).graph.initializer
    }
    assert stored["a_w_quantized"].dtype == np.int8 and stored["a_w_zero_point"] == 0
    expected_ints = gptq_round(arrays["a_w"].reshape(8, -1), rows.T @ rows, stored["a_w_scale"])
    np.testing.assert_array_equal(stored["a_w_quantized"].reshape(8, -1), expected_ints)


def test_float_runs_follow_the_memory_budget_and_fixed_batches(files, monkeypatch):
    """The float model runs 16 samples at a time, fewer where their layer inputs would
    pass the budget (same integers), and whole batches where the model's batch size is
    fixed (onnxruntime rejects any other); the inputs are summed 4 samples at a time
    whatever the run's size, so runs of 4 give the same integers."""
    from keras_bn.converters import weight_rounding

    folder, calibration = files
    float_model = onnx.load(str(folder / "float.onnx"))
    quantized = onnx.load(str(folder / "int8.onnx"))
    batches = [{"x": calibration[i : i + 16]} for i in range(0, len(calibration), 16)]

    def rounded(model, **options):
        progress = []
        result, report = round_weights(
            model, quantized, batches, progress=lambda *step: progress.append(step), **options
        )
        ints = {i.name: numpy_helper.to_array(i) for i in result.graph.initializer}
        return ints, report, progress[-1][1] - len(report.rounded)  # float runs

    ints, report, runs = rounded(float_model)
    assert runs == 4 and report.samples == 64
    monkeypatch.setattr(weight_rounding, "RUN", 4)
    fours, report, runs = rounded(float_model)
    assert runs == 16 and report.samples == 64
    assert all(np.array_equal(ints[name], fours[name]) for name in ints)
    pieces = []  # each sum's samples: at most 4 (a depthwise layer's patches are 9x)
    real = weight_rounding._accumulate
    monkeypatch.setattr(
        weight_rounding,
        "_accumulate",
        lambda layer, x, into: (pieces.append(len(x)), real(layer, x, into)),
    )
    monkeypatch.setattr(weight_rounding, "RUN", 16)
    assert rounded(float_model)[0].keys() == ints.keys()
    assert pieces and max(pieces) == 4 and sum(pieces) == 4 * 64  # 4 layers, 64 samples
    monkeypatch.setattr(weight_rounding, "_accumulate", real)
    monkeypatch.setattr(weight_rounding, "EXPOSED_BYTES", 1)  # one sample a run
    tight, report, runs = rounded(float_model)
    assert runs == 64 and report.samples == 64
    assert all(np.array_equal(ints[name], tight[name]) for name in ints)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(float_model)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 16
    _, report, runs = rounded(fixed, samples=20)  # whole batches: 2 runs, 32 samples
    assert runs == 2 and report.samples == 32

"""Tests for keras_bn.converters.precision: float16 conversion and int8 quantization.

The models are built by hand with onnx.helper, so these tests do not depend on the
exporter; the reference is always the float32 model run in onnxruntime.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from support.files import sha256
from support.onnx_graphs import CHANNELS, classifier_onnx, save_graph

from keras_bn.converters.errors import UserInputError
from keras_bn.converters.precision import (
    FLOAT16_MAX,
    FLOAT16_SMALLEST_SUBNORMAL,
    PRECISIONS,
    check_float16_range,
    compare_onnx_models,
    convert_float16,
    float32_compute,
    quantize_int8,
)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed_type = session.get_inputs()[0].type
    x = x.astype(np.float16 if feed_type == "tensor(float16)" else np.float32)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.fixture
def data() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(64, 3, 8, 8)).astype(np.float32)


def test_precision_table_has_the_cli_choices():
    assert list(PRECISIONS) == ["float32", "float16", "int8"]
    # Each states its default validation criterion (tests/validation/test_precision_validation.py
    # checks the words against comparison.judge_precision's constants).
    assert all(p.criterion and p.description for p in PRECISIONS.values())


# ------------------------------------------------------------------------------------
# float16


def test_check_float16_range_counts_values_a_cast_would_destroy(tmp_path):
    kernel = np.random.default_rng(0).normal(size=(CHANNELS, 3, 3, 3)) * 0.3
    kernel[0, 0, 0, :3] = [7e4, -1e5, 2e4]  # two overflow; 2e4 fits in float16
    kernel[1, 0, 0, :3] = [1e-9, -1e-8, 1e-6]  # two underflow; 1e-6 is a subnormal
    path = classifier_onnx(tmp_path / "risky.onnx", conv1_kernel=kernel)
    issues = check_float16_range(path)
    assert len(issues) == 1
    issue = issues[0]
    assert (issue.initializer, issue.overflow, issue.underflow) == ("w1", 2, 2)
    assert issue.max_abs == pytest.approx(1e5)
    assert issue.min_abs_nonzero == pytest.approx(1e-9)
    # Cross-check with a plain float16 cast: exactly these values become inf or 0.
    with np.errstate(over="ignore"):
        cast = kernel.astype(np.float32).astype(np.float16)
    assert np.count_nonzero(np.isinf(cast)) == 2
    assert np.count_nonzero((cast == 0) & (kernel != 0)) == 2
    assert check_float16_range(classifier_onnx(tmp_path / "safe.onnx")) == []


def test_convert_float16_keeps_io_types_and_matches_float32(tmp_path, data):
    source = classifier_onnx(tmp_path / "model.onnx")
    before = sha256(source)
    report = convert_float16(source, tmp_path / "half.onnx", sample_inputs={"x": data})
    assert sha256(source) == before
    converted = onnx.load(str(tmp_path / "half.onnx"))
    assert {t.data_type for t in converted.graph.initializer} == {TensorProto.FLOAT16}
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert converted.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    expected, received = _run(source, data), _run(tmp_path / "half.onnx", data)
    np.testing.assert_allclose(received, expected, atol=5e-3)
    assert report.range_issues == [] and report.clamped_count == 0
    # The report's comparison is the same measurement as ours.
    assert report.comparison.samples == 64
    assert report.comparison.max_abs_diff == pytest.approx(np.abs(received - expected).max())
    assert report.comparison.top1_agreement == pytest.approx(
        np.mean(expected.argmax(1) == received.argmax(1))
    )
    assert report.to_dict()["keep_io_types"] is True


def test_convert_float16_without_io_types(tmp_path, data):
    source = classifier_onnx(tmp_path / "model.onnx")
    convert_float16(source, tmp_path / "half.onnx", keep_io_types=False)
    converted = onnx.load(str(tmp_path / "half.onnx"))
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert converted.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    received = _run(tmp_path / "half.onnx", data)
    assert received.dtype == np.float16
    np.testing.assert_allclose(received, _run(source, data), atol=1e-2)


def test_convert_float16_clamps_only_at_the_real_float16_limits(tmp_path):
    kernel = np.random.default_rng(0).normal(size=(CHANNELS, 3, 3, 3)) * 0.3
    kernel[0, 0, 0, :2] = [2e4, -1e5]  # the converter's default would clamp 2e4 to 1e4
    kernel[1, 0, 0, :2] = [3e-5, 1e-9]  # a float16 subnormal; a value a cast flushes to 0
    source = classifier_onnx(tmp_path / "model.onnx", conv1_kernel=kernel)
    report = convert_float16(source, tmp_path / "half.onnx")
    w1 = _initializers(tmp_path / "half.onnx")["w1"].astype(np.float64)
    assert w1[0, 0, 0, 0] == pytest.approx(2e4, rel=1e-3)  # kept (float16 rounding only)
    assert w1[0, 0, 0, 1] == -FLOAT16_MAX  # clamped, not inf
    assert w1[1, 0, 0, 0] == pytest.approx(3e-5, rel=1e-2)  # a subnormal, kept
    assert w1[1, 0, 0, 1] == FLOAT16_SMALLEST_SUBNORMAL  # lifted, not flushed to 0
    # Everything else is exactly the float16 cast.
    untouched = np.ones(kernel.shape, bool)
    untouched[0, 0, 0, 1] = untouched[1, 0, 0, 1] = False
    with np.errstate(over="ignore"):
        cast = kernel.astype(np.float32).astype(np.float16).astype(np.float64)
    np.testing.assert_array_equal(w1[untouched], cast[untouched])
    # And the report says so.
    assert [(i.initializer, i.overflow, i.underflow) for i in report.range_issues] == [("w1", 1, 1)]
    assert report.clamped_count == 2
    assert "clamped to 65504" in str(report)


def _masked_softmax_graph(large: float, masked_by_product: bool) -> onnx.ModelProto:
    """scores -> Softmax, masked by a one-value constant: ``Where(mask, scores, c)``,
    and the constant also scaling a second output through a MatMul unless
    ``masked_by_product`` is False (then ``c`` reaches the Softmax alone)."""
    nodes = [
        helper.make_node("Cast", ["mask"], ["keep"], to=TensorProto.BOOL),
        helper.make_node("Where", ["keep", "scores", "c"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
    ]
    outputs = [helper.make_tensor_value_info("p", TensorProto.FLOAT, [2, 3])]
    if masked_by_product:
        nodes.append(helper.make_node("Mul", ["scores", "c"], ["scaled"]))
        nodes.append(helper.make_node("MatMul", ["scaled", "w"], ["y"]))
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1]))
    graph = helper.make_graph(
        nodes,
        "masked",
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("mask", TensorProto.INT32, [2, 3]),
        ],
        outputs,
        [
            numpy_helper.from_array(np.array(large, np.float32), "c"),
            numpy_helper.from_array(np.ones((3, 1), np.float32), "w"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_masking_constant_beyond_float16_is_named_as_such(tmp_path):
    """Attention's -1e9 before a Softmax is a masking constant: at float16's limit the
    Softmax gives the same probabilities (checked in onnxruntime), and the report says
    so; the same value also scaling a MatMul's input is an ordinary clamp."""
    onnx.save(_masked_softmax_graph(-1e9, masked_by_product=False), str(tmp_path / "m.onnx"))
    report = convert_float16(tmp_path / "m.onnx", tmp_path / "half.onnx")
    assert [(i.initializer, i.masking) for i in report.range_issues] == [("c", True)]
    assert "c: a masking constant (|x| = 1e+09) written at float16's limit" in str(report)
    feed = {
        "scores": np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]], np.float32),
        "mask": np.array([[1, 1, 0], [1, 0, 1]], np.int32),
    }
    runs = [
        ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"]).run(
            ["p"], feed
        )[0]
        for name in ("half.onnx", "m.onnx")
    ]
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-3)
    assert runs[0][0, 2] == 0 and runs[0][1, 1] == 0  # masked out in float16 too
    used = _masked_softmax_graph(-1e9, masked_by_product=True)
    assert [(i.initializer, i.masking) for i in check_float16_range(used)] == [("c", False)]
    shown = _masked_softmax_graph(-1e9, masked_by_product=False)
    shown.graph.output.append(helper.make_tensor_value_info("masked", TensorProto.FLOAT, [2, 3]))
    assert [i.masking for i in check_float16_range(shown)] == [False]  # an output shows it


def test_convert_float16_rejects_bad_files(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        convert_float16(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07garbage that is not a protobuf \xff\xff")
    with pytest.raises(UserInputError, match="cannot be parsed"):
        convert_float16(garbage, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


# ------------------------------------------------------------------------------------
# int8


def test_quantize_int8_qdq_per_channel_and_close_to_float(tmp_path, data):
    source = classifier_onnx(tmp_path / "model.onnx")
    before = sha256(source)
    report = quantize_int8(source, tmp_path / "int8.onnx", {"x": data})
    assert sha256(source) == before
    quantized = onnx.load(str(tmp_path / "int8.onnx"))
    ops = collections.Counter(node.op_type for node in quantized.graph.node)
    assert ops["QuantizeLinear"] >= 3 and ops["DequantizeLinear"] >= 5
    assert ops["Conv"] == 2  # QDQ format: float ops surrounded by Q/DQ pairs
    # Per-channel weights: the DequantizeLinear of each conv kernel has one scale
    # per output channel, and the quantized kernel is 8-bit (stored as uint8).
    initializers = _initializers(tmp_path / "int8.onnx")
    producers = {node.output[0]: node for node in quantized.graph.node}
    for conv in (n for n in quantized.graph.node if n.op_type == "Conv"):
        dequantize = producers[conv.input[1]]
        assert dequantize.op_type == "DequantizeLinear"
        kernel, scale = (initializers[name] for name in dequantize.input[:2])
        assert kernel.dtype == np.uint8
        assert scale.shape == (CHANNELS,)
    # Accuracy against the float model, measured independently.
    expected, received = _run(source, data), _run(tmp_path / "int8.onnx", data)
    difference = np.abs(received - expected)
    assert difference.max() < 0.1  # softmax outputs in [0, 1]
    assert report.comparison.max_abs_diff == pytest.approx(difference.max(), rel=1e-5)
    assert report.comparison.mean_abs_diff == pytest.approx(difference.mean(), rel=1e-4)
    agreement = np.mean(expected.argmax(1) == received.argmax(1))
    assert report.comparison.top1_agreement == pytest.approx(agreement)
    sqnr = 10 * np.log10(np.sum(expected**2.0) / np.sum((received - expected) ** 2.0))
    assert report.comparison.sqnr_db == pytest.approx(sqnr, rel=1e-4)
    assert f"SQNR {sqnr:.1f} dB" in str(report)
    assert agreement >= 0.9
    assert report.details["per_channel"] is True
    assert report.details["calibration_samples"] == 64
    assert "top-1 agreement" in str(report)


def test_quantize_int8_progress_and_given_float_outputs(tmp_path, data):
    """progress counts the calibration batches; given the float model's outputs, the
    comparison uses them (the file is the same: calibration does not depend on them)."""
    source = classifier_onnx(tmp_path / "model.onnx")
    calls = []
    plain = quantize_int8(source, tmp_path / "plain.onnx", {"x": data}, calibration_batch_size=24)
    report = quantize_int8(
        source,
        tmp_path / "int8.onnx",
        {"x": data},
        calibration_batch_size=24,
        progress=lambda done, total: calls.append((done, total)),
        float_outputs=[_run(source, data) * 2.0],  # visibly not the float model's
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]  # 64 samples in batches of 24
    received = _run(tmp_path / "int8.onnx", data)
    np.testing.assert_array_equal(received, _run(tmp_path / "plain.onnx", data))
    difference = np.abs(received - 2.0 * _run(source, data))
    assert report.comparison.max_abs_diff == pytest.approx(difference.max(), rel=1e-5)
    assert report.comparison.max_abs_diff > 10 * plain.comparison.max_abs_diff
    with pytest.raises(ValueError, match=r"0 output\(s\), the converted one 1"):
        quantize_int8(source, tmp_path / "bad.onnx", {"x": data}, float_outputs=[])


def test_quantize_int8_sessions_do_not_spin(tmp_path, data, opened_sessions):
    """Every onnxruntime session of an int8 export (calibration, the layer report's
    two copies, the comparison) lets idle threads sleep: the CLI runs the Keras
    statistics check beside them, and a spinning thread takes its CPU."""
    source = classifier_onnx(tmp_path / "model.onnx")
    report = quantize_int8(source, tmp_path / "int8.onnx", {"x": data}, equalize=True)
    assert report.divergence is not None and report.details["bias_correction"]["layers"]
    assert len(opened_sessions) >= 5
    assert all(kwargs.get("spinning") is False for kwargs in opened_sessions)


def test_quantize_int8_fixed_batch_and_any_single_key(tmp_path, data):
    source = classifier_onnx(tmp_path / "model.onnx", batch=8)
    report = quantize_int8(source, tmp_path / "int8.onnx", {"anything": data[:32]})
    assert report.comparison.samples == 32
    with pytest.raises(UserInputError, match="fixed batch size of 8"):
        quantize_int8(source, tmp_path / "other.onnx", {"x": data[:30]})
    assert not (tmp_path / "other.onnx").exists()


@pytest.mark.parametrize(
    ("calibration", "fragment"),
    [
        ({"x": np.ones((4, 3, 9, 8))}, "has shape (4, 3, 9, 8)"),
        ({"x": np.ones((4, 3, 8))}, "has shape (4, 3, 8)"),
        ({"x": np.ones((0, 3, 8, 8))}, "is empty"),
        ({"x": np.ones((4, 3, 8, 8)), "y": np.ones((4, 2))}, "expected the ONNX model inputs"),
    ],
    ids=["shape", "rank", "empty", "keys"],
)
def test_quantize_int8_rejects_bad_calibration(tmp_path, calibration, fragment):
    source = classifier_onnx(tmp_path / "model.onnx")
    with pytest.raises(UserInputError) as caught:
        quantize_int8(source, tmp_path / "int8.onnx", calibration)
    assert fragment in str(caught.value)
    assert not (tmp_path / "int8.onnx").exists()


def _conv_batch_norm_onnx(tmp_path: Path, data: np.ndarray, folded: bool) -> Path:
    """Conv -> BN -> Relu -> 1x1 Conv, with BN statistics measured on ``data`` (as after
    training): pre-BN channel variances spread from 1e-3 to 1e2."""
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(CHANNELS, 3, 3, 3)).astype(np.float32)
    unit = np.zeros(CHANNELS, np.float32)

    def conv(kernel, bias):
        path = save_graph(
            [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1])],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", CHANNELS, 8, 8])],
            [numpy_helper.from_array(kernel, "w"), numpy_helper.from_array(bias, "b")],
            tmp_path / "conv.onnx",
        )
        return _run(path, data)

    target_std = np.sqrt(10.0 ** rng.uniform(-3, 2, CHANNELS))
    kernel *= (target_std / conv(kernel, unit).std(axis=(0, 2, 3)))[:, None, None, None]
    bias = (rng.normal(size=CHANNELS) * target_std).astype(np.float32)
    activations = conv(kernel, bias)
    mean = activations.mean(axis=(0, 2, 3)).astype(np.float32)
    variance = activations.var(axis=(0, 2, 3)).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, CHANNELS).astype(np.float32)
    beta = rng.normal(size=CHANNELS).astype(np.float32)
    epsilon = 1e-3
    head = (rng.normal(size=(4, CHANNELS, 1, 1)) * 0.5).astype(np.float32)
    if folded:  # NumPy reference folding
        scale = gamma / np.sqrt(variance + epsilon)
        arrays = {"w": kernel * scale[:, None, None, None], "b": bias * scale + beta - mean * scale}
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["bn"], pads=[1, 1, 1, 1])]
    else:
        arrays = {"w": kernel, "b": bias, "g": gamma, "be": beta, "m": mean, "v": variance}
        nodes = [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node(
                "BatchNormalization", ["c", "g", "be", "m", "v"], ["bn"], epsilon=epsilon
            ),
        ]
    arrays["head"] = head
    nodes += [
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("Conv", ["r", "head"], ["y"]),
    ]
    return save_graph(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()],
        tmp_path / f"{'folded' if folded else 'unfolded'}.onnx",
    )


def test_folding_before_quantization_reduces_int8_error(tmp_path, data):
    """The module docstring's claim: quantize the folded model, not Conv + BN."""
    folded = _conv_batch_norm_onnx(tmp_path, data, folded=True)
    unfolded = _conv_batch_norm_onnx(tmp_path, data, folded=False)
    # Same function in float32...
    assert compare_onnx_models(folded, unfolded, {"x": data}).max_abs_diff < 1e-4
    # ...but quantizing the unfolded graph loses much more.
    folded_error = quantize_int8(folded, tmp_path / "f8.onnx", {"x": data}).comparison
    unfolded_error = quantize_int8(unfolded, tmp_path / "u8.onnx", {"x": data}).comparison
    assert unfolded_error.mean_abs_diff > 5 * folded_error.mean_abs_diff


def test_quantize_int8_writes_what_onnxruntime_pre_processing_and_quantization_write(
    tmp_path, data
):
    """The in-memory pre-processing gives the very file of onnxruntime's own
    ``quant_pre_process`` followed by ``quantize_static`` with the same options (the
    nodes keras-bn leaves float among them: the output Softmax); the input specs read
    from the graph are a session's."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    from keras_bn.converters import precision, runtime

    for batch in ("N", 8):
        source = classifier_onnx(tmp_path / f"model_{batch}.onnx", batch=batch)
        specs = precision._graph_input_specs(onnx.load(str(source)))
        assert specs == runtime.onnx_input_specs(source)
    source = tmp_path / "model_N.onnx"
    quantize_int8(
        source,
        tmp_path / "ours.onnx",
        {"x": data},
        calibration_method="MinMax",
        bias_correction=False,
        signed=True,  # onnxruntime's S8S8, as quantize_static writes it
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": data[i : i + 16]} for i in range(0, len(data), 16)])

        def get_next(self):
            return next(self.batches, None)

    pre = tmp_path / "pre.onnx"
    quant_pre_process(str(source), str(pre), skip_optimization=True, skip_symbolic_shape=True)
    quantize_static(
        str(pre),
        str(tmp_path / "theirs.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=["softmax"],
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )
    assert precision.float_nodes(onnx.load(str(source))) == ["softmax"]
    assert sha256(tmp_path / "ours.onnx") == sha256(tmp_path / "theirs.onnx")


def test_shape_inference_without_the_weights_data_is_onnxs_own():
    """_preprocess infers shapes on a copy whose large float weights have no data:
    the same model as ONNX's shape inference of the whole (shapes taken from an int64
    initializer, a Reshape's), with the data back and the input untouched."""
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    from keras_bn.converters import precision

    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.normal(size=(32, 3, 3, 3)).astype(np.float32),  # 3456 bytes: kept
        "w2": rng.normal(size=(64, 32, 3, 3)).astype(np.float32),  # 73 kB: emptied
        "shape": np.array([0, -1], np.int64),
        "d": rng.normal(size=(64 * 4 * 4, 10)).astype(np.float32),  # 40 kB: emptied
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c2", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "d"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(array, name) for name, array in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    ours = precision._preprocess(model)
    theirs = onnx.shape_inference.infer_shapes(model)
    add_pre_process_metadata(theirs)
    assert ours.SerializeToString() == theirs.SerializeToString()
    assert model.SerializeToString() == before
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in ours.graph.value_info}  # fmt: skip
    assert shapes["flat"] == ["N", 1024] and shapes["c2"] == ["N", 64, 4, 4]


def test_float32_compute_widens_a_float16_graph_and_keeps_its_io_types():
    """A graph that computes in float16 with float16 inputs and outputs: afterwards its
    MatMul runs in float32 between Casts (the inputs and outputs keep their type), so
    the output is the float32 product rounded to float16 once, and nothing 16-bit is
    left inside."""
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(64, 8)).astype(np.float16)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("Cast", ["y"], ["z"], to=TensorProto.FLOAT16),
        ],
        "half",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [None, 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT16, [None, 8])],
        [numpy_helper.from_array(weights, "w")],
        value_info=[helper.make_tensor_value_info("y", TensorProto.FLOAT16, [None, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(16, 64)).astype(np.float16)
    float16_arithmetic = _run_model(model, x)
    assert float32_compute(model) and not float32_compute(model)  # once is enough
    assert all(i.data_type == TensorProto.FLOAT for i in model.graph.initializer)
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [TensorProto.FLOAT16]
    got = _run_model(model, x)
    want = (x.astype(np.float64) @ weights.astype(np.float64)).astype(np.float32)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, want.astype(np.float16))
    np.testing.assert_allclose(float16_arithmetic, got, rtol=2e-3, atol=2e-3)
    assert [i.type.tensor_type.elem_type for i in model.graph.value_info] == [TensorProto.FLOAT]


def _run_model(model, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_the_size_bound_is_never_below_the_serialized_size(tmp_path, external):
    """quantize_int8 decides whether a model fits protobuf's 2 GB in memory from the
    file's size and its tensors' data lengths (no serialization): that bound holds for
    weights stored in the file or beside it, in initializers, Constant attributes and
    a subgraph's own initializer, and is not far above the size."""
    from keras_bn.converters.precision import _serializable, _size_bound

    rng = np.random.default_rng(0)

    def tensor(name, size):
        return numpy_helper.from_array(rng.normal(size=size).astype(np.float32), name)

    branch = helper.make_graph(
        [helper.make_node("Add", ["x", "inner"], ["b"])], "branch", [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [4096])], [tensor("inner", 4096)],
    )  # fmt: skip
    nodes = [
        helper.make_node("Constant", [], ["c"], value=tensor("c_value", 4096)),
        helper.make_node("Add", ["x", "w"], ["s"]),
        helper.make_node("Add", ["s", "c"], ["t"]),
        helper.make_node("ReduceSum", ["t"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["flag"]),
        helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=branch),
    ]
    graph = helper.make_graph(
        nodes, "sizes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4096])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4096])],
        [tensor("w", 4096), numpy_helper.from_array(np.float32(0.0), "zero")],
    )  # fmt: skip
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=external,
              all_tensors_to_one_file=True, size_threshold=0)  # fmt: skip
    model = onnx.load(str(path))  # the external data read in, as quantize_int8 loads it
    size, bound = model.ByteSize(), _size_bound(path, model)
    assert size <= bound <= 2 * size + 64 * 5
    if external:  # the file alone is far smaller than the model it describes
        assert path.stat().st_size < size / 2
    assert _serializable(path, model)


def test_float16_of_a_3d_transpose_into_a_matmul_loads_in_onnxruntime(tmp_path, run_python):
    """``Transpose`` (3-D) into ``MatMul`` in float16, an LSTM's sequence output read
    by a Dense layer: onnxruntime's x86 session set-up crashed on it at its default
    optimization level (a segmentation fault in its NCHWc transformer, onnxruntime
    issue 28392), so the export died without a word. The converter keeps that
    Transpose in float32; a fresh interpreter loads the file at the default level and
    its outputs match NumPy's within float16 rounding."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(8, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2], name="transpose"),
        helper.make_node("MatMul", ["t", "w"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["steps", "batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "f32.onnx")
    convert_float16(tmp_path / "f32.onnx", tmp_path / "f16.onnx")
    converted = onnx.load(str(tmp_path / "f16.onnx"))
    transpose = next(node for node in converted.graph.node if node.op_type == "Transpose")
    declared = {info.name: info.type.tensor_type.elem_type for info in converted.graph.value_info}
    assert declared.get(transpose.output[0]) == TensorProto.FLOAT
    x = rng.normal(size=(5, 3, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, numpy as np, onnxruntime as ort\n"
        f"session = ort.InferenceSession({str(tmp_path / 'f16.onnx')!r}, "
        "providers=['CPUExecutionProvider'])\n"
        f"y = session.run(None, {{'x': np.load({str(tmp_path / 'x.npy')!r})}})[0]\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, y)\n"
    )
    run_python(["-c", code], timeout=120)
    expected = np.transpose(x.astype(np.float64), (1, 0, 2)) @ weight
    got = np.load(tmp_path / "y.npy")
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-2 * np.abs(expected).max())


def _post_norm_encoder() -> Any:
    """Token + position embeddings, then two post-norm blocks (attention, a GELU
    feed-forward, each added back and layer-normalized), the norms' scales with two
    outlier channels of 6, as trained transformers' have."""
    import keras
    from keras import layers

    def scales(shape, dtype=None):
        gamma = np.ones(shape, np.float32)
        gamma[[3, 17]] = 6.0
        return gamma

    keras.utils.set_random_seed(0)
    ids = keras.Input((16,), dtype="int32", name="ids")
    table = keras.initializers.RandomNormal(stddev=1.0)
    x = layers.Embedding(50, 32, embeddings_initializer=table)(ids)
    x = layers.Add()([x, layers.Embedding(16, 32)(keras.ops.arange(16)[None, :])])
    x = layers.LayerNormalization(gamma_initializer=scales)(x)
    for _ in range(2):
        kernels = keras.initializers.RandomNormal(stddev=0.1)
        attended = layers.MultiHeadAttention(4, 8, kernel_initializer=kernels)(x, x)
        x = layers.LayerNormalization(gamma_initializer=scales)(layers.Add()([x, attended]))
        hidden = layers.Dense(64, activation="gelu")(x)
        bias = keras.initializers.RandomNormal(stddev=0.5)
        hidden = layers.Dense(32, bias_initializer=bias)(hidden)
        x = layers.LayerNormalization(gamma_initializer=scales)(layers.Add()([x, hidden]))
    return keras.Model(ids, x)


def test_int8_keeps_a_transformers_residual_stream_in_float(tmp_path, monkeypatch):
    """Each block's residual sum goes into its LayerNormalization unquantized (no
    QuantizeLinear reads it, nor the bias Add of the branch it adds), the matrix
    products stay int8; the output is closer to the float model's than with the
    residual sums quantized per tensor."""
    from keras_bn.converters import precision
    from keras_bn.converters.onnx.export import export_onnx

    export_onnx(_post_norm_encoder(), tmp_path / "f.onnx")
    rng = np.random.default_rng(0)
    calibration, held_out = (rng.integers(0, 50, (64, 16)).astype(np.int32) for _ in range(2))
    float_out = ort.InferenceSession(str(tmp_path / "f.onnx")).run(None, {"ids": held_out})[0]

    def sqnr(name: str) -> float:
        quantize_int8(tmp_path / "f.onnx", tmp_path / name, {"ids": calibration},
                      layer_report=False)  # fmt: skip
        out = ort.InferenceSession(str(tmp_path / name)).run(None, {"ids": held_out})[0]
        return 10 * np.log10(np.sum(float_out**2) / np.sum((out - float_out) ** 2))

    kept = sqnr("kept.onnx")
    graph = onnx.load(str(tmp_path / "kept.onnx")).graph
    written = {output: node for node in graph.node for output in node.output}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    norms = [node for node in graph.node if node.op_type == "LayerNormalization"]
    sums = [written[node.input[0]] for node in norms[1:]]  # each block's residual Add
    assert len(norms) == 5 and all(node.op_type == "Add" for node in sums)
    branches = [written[name] for node in sums for name in node.input if name not in dequantized]
    assert len(branches) == 4 and all(node.op_type == "Add" for node in branches)  # biases
    assert not {node.output[0] for node in sums + branches} & quantized
    matmuls = [node for node in graph.node if node.op_type == "MatMul"]
    assert matmuls and all(node.input[0] in dequantized for node in matmuls)
    monkeypatch.setattr(precision, "_residual_stream", lambda graph, producers: [])
    assert kept > sqnr("quantized.onnx") + 1.5  # 36.4 against 33.3 dB


def test_int8_leaves_output_probabilities_float(tmp_path, monkeypatch):
    """A classifier's Softmax output stays float (the function of the int8 logits), not
    int8 in steps of 1/255: with 100 classes, each probability about 0.01, those steps
    moved the probabilities several times further and tied the top 5."""
    import keras
    from keras import layers

    from keras_bn.converters import precision
    from keras_bn.converters.onnx.export import export_onnx

    keras.utils.set_random_seed(2)
    inputs = keras.Input((12,), name="x")
    hidden = layers.Dense(32, activation="relu")(inputs)
    model = keras.Model(inputs, layers.Dense(100, activation="softmax", name="probs")(hidden))
    export_onnx(model, tmp_path / "f.onnx")
    rng = np.random.default_rng(1)
    calibration, held_out = (rng.normal(size=(64, 12)).astype(np.float32) for _ in range(2))
    exact = ort.InferenceSession(str(tmp_path / "f.onnx")).run(None, {"x": held_out})[0]

    def quantized(name: str) -> tuple[float, float]:
        """The mean |error| of the int8 file's probabilities, and its top-5 agreement."""
        quantize_int8(tmp_path / "f.onnx", tmp_path / name, {"x": calibration},
                      layer_report=False)  # fmt: skip
        out = ort.InferenceSession(str(tmp_path / name)).run(None, {"x": held_out})[0]
        top5 = [set(a) == set(b) for a, b in
                zip(np.argsort(-exact)[:, :5], np.argsort(-out)[:, :5], strict=True)]  # fmt: skip
        return float(np.abs(out - exact).mean()), float(np.mean(top5))

    error, top5 = quantized("float_softmax.onnx")
    graph = onnx.load(str(tmp_path / "float_softmax.onnx")).graph
    softmax = next(node for node in graph.node if node.op_type == "Softmax")
    assert softmax.output[0] == graph.output[0].name  # no QuantizeLinear after it
    assert any(n.op_type == "DequantizeLinear" and n.output[0] == softmax.input[0]
               for n in graph.node)  # fmt: skip
    monkeypatch.setattr(precision, "_output_probabilities", lambda graph: [])
    stepped_error, stepped_top5 = quantized("int8_softmax.onnx")
    assert error < stepped_error / 3 and top5 > stepped_top5

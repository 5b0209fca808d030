"""Tests for keras_bn.converters.int8_storage: int8 values stored as uint8.

The reference is onnxruntime's own signed (S8S8) QDQ file of the same model and
calibration (``quantize_int8(signed=True)``): the unsigned file must hold the very
same numbers, so exact QDQ arithmetic gives bit-identical outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from support.onnx_graphs import classifier_onnx

from keras_bn.converters.int8_storage import store_unsigned
from keras_bn.converters.precision import quantize_int8


def _run(source, x, optimization: str = "ORT_DISABLE_ALL") -> np.ndarray:
    """The first output of ``source`` (a path or a ModelProto) on ``x``."""
    if isinstance(source, onnx.ModelProto):
        source = source.SerializeToString()
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    session = ort.InferenceSession(
        source if isinstance(source, bytes) else str(source),
        options,
        providers=["CPUExecutionProvider"],
    )
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _output_step(model: onnx.ModelProto) -> float:
    """The scale of the DequantizeLinear whose output is the graph's output, or, where
    a float Softmax writes the output, of the one into that Softmax (a change of one
    step in the logits moves no probability by more than half a step)."""
    scales = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    written = {node.output[0]: node for node in model.graph.node}
    last = written[model.graph.output[0].name]
    if last.op_type == "Softmax":
        last = written[last.input[0]]
    assert last.op_type == "DequantizeLinear"
    return float(scales[last.input[1]])


def _stored(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {
        init.name: numpy_helper.to_array(init)
        for init in model.graph.initializer
        if init.data_type in (TensorProto.INT8, TensorProto.UINT8)
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The classifier quantized both ways, per-channel and per-tensor, and its data."""
    folder = tmp_path_factory.mktemp("int8_storage")
    x = np.random.default_rng(3).normal(size=(48, 3, 8, 8)).astype(np.float32)
    source = classifier_onnx(folder / "float.onnx")
    made = {}
    for per_channel in (True, False):
        for signed in (True, False):
            path = folder / f"{per_channel}_{signed}.onnx"
            report = quantize_int8(
                source, path, {"x": x}, per_channel=per_channel, signed=signed, layer_report=False
            )
            made[per_channel, signed] = (path, report)
    return made, x


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_unsigned_file_holds_the_signed_files_numbers(files, per_channel):
    made, x = files
    (signed_path, signed_report), (path, report) = made[per_channel, True], made[per_channel, False]
    signed, unsigned = _stored(onnx.load(str(signed_path))), _stored(onnx.load(str(path)))
    assert signed and set(signed) == set(unsigned)
    for name, values in signed.items():
        assert values.dtype == np.int8 and unsigned[name].dtype == np.uint8
        np.testing.assert_array_equal(
            unsigned[name].astype(np.int16), values.astype(np.int16) + 128
        )
    # Exact QDQ arithmetic: every Quantize/DequantizeLinear as written, bit for bit.
    np.testing.assert_array_equal(
        _run(path, x, "ORT_DISABLE_ALL"), _run(signed_path, x, "ORT_DISABLE_ALL")
    )
    # onnxruntime's integer kernels (U8U8 here) compute the same function, to one step
    # of the output's grid (they round the requantization their own way).
    fused, exact = _run(path, x, "ORT_ENABLE_ALL"), _run(signed_path, x, "ORT_DISABLE_ALL")
    assert np.abs(fused - exact).max() <= _output_step(onnx.load(str(path))) * 1.001
    assert report.comparison.sqnr_db == pytest.approx(signed_report.comparison.sqnr_db, abs=0.05)
    assert (report.details["storage"], signed_report.details["storage"]) == ("uint8", "int8")
    assert "stored as uint8 plus 128" in str(report)
    assert "stored as uint8" not in str(signed_report)


def test_weights_keep_their_symmetric_grid(files):
    """Per-channel symmetric int8 weights (zero point 0) become zero point 128."""
    made, _ = files
    model = onnx.load(str(made[True, False][0]))
    stored = _stored(model)
    kernels = 0
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in stored and "w" in node.input[0]:
            assert stored[node.input[0]].dtype == np.uint8
            np.testing.assert_array_equal(stored[node.input[2]], 128)
            kernels += 1
    assert kernels == 3  # two convolutions and the dense layer


def _qdq_model(extra_nodes=(), outputs=("y",), data_is_input=False) -> onnx.ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear -> Add(DequantizeLinear(int8 weight)) -> y."""
    initializers = [
        numpy_helper.from_array(np.float32(0.1), "s"),
        numpy_helper.from_array(np.int8(-3), "zp"),
        numpy_helper.from_array(np.array([-128, 0, 127], np.int8), "w_q"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "s", "zp"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "s", "zp"], ["w"]),
        helper.make_node("Add", ["x_dq", "w"], ["y"]),
        *extra_nodes,
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])]
    if data_is_input:  # an int8 graph input read by a DequantizeLinear with an int8 zero point
        inputs.append(helper.make_tensor_value_info("q_in", TensorProto.INT8, [3]))
        nodes.append(helper.make_node("DequantizeLinear", ["q_in", "s", "zp"], ["q_dq"]))
    kinds = {"y": TensorProto.FLOAT, "x_q": TensorProto.INT8, "w_cast": TensorProto.FLOAT}
    graph = helper.make_graph(
        nodes,
        "qdq",
        inputs,
        [helper.make_tensor_value_info(name, kinds[name], [3]) for name in outputs],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_store_unsigned_rewrites_a_plain_qdq_graph():
    model = _qdq_model()
    x = np.array([-1.0, 0.04, 12.9], np.float32)
    before = _run(model, x)
    assert store_unsigned(model) == 2
    assert {init.name: init.data_type for init in model.graph.initializer}[
        "w_q"
    ] == TensorProto.UINT8
    np.testing.assert_array_equal(_run(model, x), before)


@pytest.mark.parametrize(
    "model",
    [
        _qdq_model(outputs=("y", "x_q")),  # a quantized value is a graph output
        _qdq_model(  # an int8 weight read by another operator
            extra_nodes=[helper.make_node("Cast", ["w_q"], ["w_cast"], to=TensorProto.FLOAT)],
            outputs=("y", "w_cast"),
        ),
        _qdq_model(data_is_input=True),  # the zero point also reads int8 the graph is fed
    ],
    ids=["graph-output", "other-reader", "int8-graph-input"],
)
def test_store_unsigned_leaves_int8_values_that_mean_more(model):
    before = model.SerializeToString()
    assert store_unsigned(model) == 0
    assert model.SerializeToString() == before


@pytest.mark.parametrize(
    ("flags", "saturates"),
    [
        ("fpu sse2 avx avx2 fma bmi2", True),  # AMD Zen 3, Intel Skylake client: AVX2 only
        ("avx2 avx512f avx512bw avx512vl", True),  # Skylake-SP: AVX-512 without VNNI
        ("avx2 avx512f avx512bw avx512_vnni", False),  # Cascade Lake and later, Zen 4
        ("avx2 avx_vnni", False),  # Alder Lake: VNNI on 256-bit vectors
    ],
)
def test_cpus_without_vnni_are_the_ones_whose_kernels_saturate(flags, saturates):
    from keras_bn.converters.int8_storage import x86_without_vnni

    cpuinfo = f"processor\t: 0\nmodel name\t: some CPU\nflags\t\t: {flags}\nbugs\t\t: \n"
    assert x86_without_vnni(cpuinfo) is saturates
    assert x86_without_vnni("processor\t: 0\n") is False  # no flags line: unknown


def test_signed_file_is_judged_in_exact_arithmetic_where_kernels_saturate(files, monkeypatch):
    """On an x86 CPU without VNNI, onnxruntime's integer kernels saturate on int8
    activations (the reason files are stored as uint8): a ``--signed-int8`` file,
    meant for int32-accumulating runtimes, failed validation there by the host's
    kernels, not its numbers. Where the kernels saturate, the signed file now runs
    with every Quantize/DequantizeLinear as written, and its report says why; the
    uint8 file still runs in the kernels a deployment gets."""
    from keras_bn.converters import int8_storage, precision, runtime, validation

    made, x = files
    (signed_path, signed_report), (path, _) = made[True, True], made[True, False]
    monkeypatch.setattr(int8_storage, "kernels_saturate", lambda: True)
    _, signed_outputs = precision._int8_outputs(signed_path, {"x": x}, True)
    exact = _run(signed_path, x, "ORT_DISABLE_ALL")
    np.testing.assert_array_equal(signed_outputs[0], exact.astype(np.float64))
    _, outputs = precision._int8_outputs(path, {"x": x}, False)
    np.testing.assert_array_equal(outputs[0], _run(path, x, "ORT_ENABLE_ALL").astype(np.float64))
    # validation reads the storage from the file where the caller does not say
    assert validation._signed_int8(signed_path, "int8", None) is True
    assert validation._signed_int8(path, "int8", None) is False
    assert runtime.validation_optimization("int8", True) == "ORT_DISABLE_ALL"
    assert "saturate on this CPU (no VNNI): judged in exact QDQ arithmetic" in str(signed_report)
    monkeypatch.setattr(int8_storage, "kernels_saturate", lambda: False)
    assert runtime.validation_optimization("int8", True) == "ORT_ENABLE_ALL"
    assert validation._signed_int8(signed_path, "int8", None) is False  # not read: no matter
    assert "judged in exact QDQ arithmetic" not in str(signed_report)

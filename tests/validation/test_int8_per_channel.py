"""Per-channel int8 is not worse than per-tensor on a trained depthwise 1-D network.

Issue 23's bar: per-channel logit SQNR not below per-tensor on the README pipeline's
model (tests/examples/test_examples.py, on the pipeline's own int8 file) and on a
trained depthwise net (here: ``support.depthwise_1d``, Conv1D / DepthwiseConv1D /
SeparableConv1D with BN and ReLU6, trained a few seconds on digits read as sequences).
Both files are compared with the float ONNX model on held-out sequences, under the
same scheme, the weights rounded to nearest: what is compared is the scales. (With
GPTQ rounding on both sides the two come within 0.1 dB of each other here, per-tensor
ahead with TensorFlow's training of the net and behind with JAX's: BENCHMARKS.md,
section 36.) The weight scales are checked against NumPy: one per output channel on
the axis that holds the output channels (Conv's axis 0, depthwise included; Gemm's
axis 1), ``max |w| / 127``.
"""

from __future__ import annotations

import numpy as np
import pytest
from support.depthwise_1d import trained_model

from keras_bn.converters import export_onnx, runtime
from keras_bn.converters.comparison import decided_top1_agreement, sqnr_db
from keras_bn.converters.precision import quantize_int8

# Each scheme's quantize_int8 arguments, the weights rounded to nearest on both sides
# (by default per-channel rounds only the depthwise layers with GPTQ, per-tensor all).
SCHEMES = {
    "Percentile 99.99%, bias correction": {"round_weights": False},
    "MinMax, bias correction": {"calibration_method": "MinMax", "round_weights": False},
    # The weights as exported (the default equalizes the pairs into depthwise layers).
    "default without equalization": {"equalize": False, "round_weights": False},
}
UNEQUALIZED = 2  # the scheme whose weights are the float file's


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    """The trained net, its folded float export, and both weight layouts per scheme."""
    model, data = trained_model(seed=0)
    work = tmp_path_factory.mktemp("depthwise_1d")
    export_onnx(model, work / "float.onnx", fold=True)
    calibration = {"sequence": data["calibration"][0]}
    for index, options in enumerate(SCHEMES.values()):
        for per_channel in (True, False):
            quantize_int8(
                work / "float.onnx",
                work / f"{index}-{per_channel}.onnx",
                calibration,
                per_channel=per_channel,
                layer_report=False,
                **options,
            )
    return model, data, work


def _logits(path, sequences: np.ndarray) -> np.ndarray:
    # Exact QDQ arithmetic: onnxruntime's graph optimizations off (no integer kernels).
    session = runtime.open_session(path, optimization="ORT_DISABLE_ALL")
    return np.asarray(runtime.run(session, {"sequence": sequences})[0], np.float64)


def test_the_network_is_trained_and_its_export_folds_every_batch_norm(network):
    import onnx

    model, data, work = network
    sequences, labels = data["held_out"]
    keras_logits = np.asarray(model(sequences, training=False), np.float64)
    assert np.mean(keras_logits.argmax(axis=1) == labels) >= 0.9  # chance is 10%
    graph = onnx.load(work / "float.onnx").graph
    assert [node.op_type for node in graph.node].count("BatchNormalization") == 0
    groups = sorted(
        attribute.i
        for node in graph.node
        if node.op_type == "Conv"
        for attribute in node.attribute
        if attribute.name == "group"
    )
    assert groups == [24, 48]  # the depthwise layer (multiplier 2) and the separable one
    np.testing.assert_allclose(
        _logits(work / "float.onnx", sequences), keras_logits, rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_weights_are_scaled_per_output_channel(network, per_channel):
    """Every weight's DequantizeLinear against NumPy: axis, scales, integer values."""
    import onnx
    from onnx import numpy_helper

    _, _, work = network
    float_graph = onnx.load(work / "float.onnx").graph
    weights = {tensor.name: numpy_helper.to_array(tensor) for tensor in float_graph.initializer}
    output_axes = {  # the weight initializer -> the axis of its output channels
        node.input[1]: 0 if node.op_type == "Conv" else 1
        for node in float_graph.node
        if node.op_type in ("Conv", "Gemm")
    }
    quantized = onnx.load(work / f"{UNEQUALIZED}-{per_channel}.onnx").graph
    stored = {tensor.name: numpy_helper.to_array(tensor) for tensor in quantized.initializer}
    checked = set()
    for node in quantized.node:
        name = node.input[0].removesuffix("_quantized")
        if node.op_type != "DequantizeLinear" or name not in output_axes:
            continue
        weight, axis = weights[name].astype(np.float64), output_axes[name]
        others = tuple(i for i in range(weight.ndim) if i != axis)
        expected = np.max(np.abs(weight), axis=others if per_channel else None) / 127
        attributes = {attribute.name: attribute.i for attribute in node.attribute}
        assert attributes.get("axis") == (axis if per_channel else None), name
        np.testing.assert_allclose(stored[node.input[1]], expected, rtol=1e-6, err_msg=name)
        scales = np.expand_dims(expected, others) if per_channel else expected
        integers, zero_point = stored[node.input[0]], stored[node.input[2]]
        assert integers.dtype == np.uint8 and np.all(zero_point == 128)  # int8 plus 128
        integers = integers.astype(np.int16) - 128
        np.testing.assert_array_equal(integers, np.rint(weight / scales), err_msg=name)
        checked.add(name)
    assert checked == set(output_axes)  # six layers: stem, depthwise, 2 pointwise, dw, head


@pytest.mark.parametrize("scheme", range(len(SCHEMES)), ids=list(SCHEMES))
def test_per_channel_sqnr_not_below_per_tensor(network, scheme):
    _, data, work = network
    sequences = data["held_out"][0]
    reference = _logits(work / "float.onnx", sequences)
    per_channel = _logits(work / f"{scheme}-True.onnx", sequences)
    per_tensor = _logits(work / f"{scheme}-False.onnx", sequences)
    assert sqnr_db(per_channel, reference) >= sqnr_db(per_tensor, reference)
    assert sqnr_db(per_channel, reference) >= 30  # measured 35-36 dB; broken files < 10
    # Top-1 on the samples the float logits decide (their top class leads by 5% of the
    # range, as the int8 criterion counts): a near-tie flips under any rounding. Three
    # held-out near-ties (leads of 0.3-1% of the range) flipped per-channel only when
    # the network started from other random weights (BENCHMARKS.md section 61).
    channel, decided = decided_top1_agreement(per_channel, reference)
    tensor, _ = decided_top1_agreement(per_tensor, reference)
    assert decided >= len(reference) // 2, decided
    assert channel >= tensor


def _second_layers(graph) -> dict[str, str]:
    """Each Conv's name -> the output of the Conv that reads it through one Relu/Clip."""
    convs = {node.input[0]: node for node in graph.node if node.op_type == "Conv"}
    activations = {node.input[0]: node for node in graph.node if node.op_type in ("Relu", "Clip")}
    seconds = {}
    for node in graph.node:
        activation = activations.get(node.output[0]) if node.op_type == "Conv" else None
        if activation is not None and activation.output[0] in convs:
            seconds[node.name] = convs[activation.output[0]].output[0]
    return seconds


def test_pairs_into_depthwise_layers_are_scaled_only_where_their_rounding_gains(
    network, tmp_path, monkeypatch
):
    """The per-channel default equalizes a pair into a depthwise layer only where that
    lowers the error rounding its activation adds at the depthwise output (judged on
    the calibration data). Against the file with every such pair scaled (the judgement
    off), on held-out sequences in onnxruntime: each pair left unscaled on a clear
    margin (> 1 dB) has the lower error at its depthwise layer's output; the default
    file's logits are not below per-tensor int8's (issue 23's bar)."""
    import onnx

    from keras_bn.converters import onnx_graph, precision

    _, data, work = network
    calibration = {"sequence": data["calibration"][0]}
    sequences = data["held_out"][0]
    judged = quantize_int8(
        work / "float.onnx", tmp_path / "judged.onnx", calibration, layer_report=False
    )
    monkeypatch.setattr(precision, "JUDGED_BYTES", 0)
    scaled = quantize_int8(
        work / "float.onnx", tmp_path / "scaled.onnx", calibration, layer_report=False
    )
    details = judged.details["equalization"]
    assert scaled.details["equalization"]["judged"] == {}
    assert sorted(details["judged"]) == ["pointwise", "stem"]  # both pairs into depthwise layers
    clear = [
        first
        for first in details["left_unscaled"]
        if 10 * np.log10(details["judged"][first][1] / details["judged"][first][0]) > 1.0
    ]
    assert clear, details["judged"]  # measured: the pointwise -> separable pair, 1.3-4.6 dB
    assert "left unscaled (scaling would round their activation coarser" in str(judged)
    seconds = _second_layers(onnx.load(work / "float.onnx").graph)
    tensors = [seconds[first] for first in clear]

    def values(path):
        model = onnx_graph.with_outputs(onnx.load(path), tensors)  # serialized
        session = runtime.open_session(model, optimization="ORT_DISABLE_ALL")
        return dict(zip(tensors, runtime.run(session, {"sequence": sequences})[1:], strict=True))

    reference, ours, theirs = (
        values(p) for p in (work / "float.onnx", tmp_path / "judged.onnx", tmp_path / "scaled.onnx")
    )
    for tensor in tensors:
        assert np.mean((ours[tensor] - reference[tensor]) ** 2) < np.mean(
            (theirs[tensor] - reference[tensor]) ** 2
        ), tensor
    logits = _logits(work / "float.onnx", sequences)
    # The logits move by -0.1 to +0.7 dB with it (BENCHMARKS.md, section 37): not
    # asserted; the default file is not below per-tensor's (issue 23's bar).
    ours_db = sqnr_db(_logits(tmp_path / "judged.onnx", sequences), logits)
    assert ours_db >= sqnr_db(_logits(work / "0-False.onnx", sequences), logits)

"""Cross-layer equalization and high-bias absorption (converters/equalization.py).

The maths is checked against an independent NumPy network (convolutions written
out with ``einsum``, grouped and depthwise included): the equalized network computes
the original's function to float64 noise, each pair's ranges meet at
``sqrt(r1 * r2)``, sweeps converge over chains, and absorption equals the original
network with its activations' lower bound raised to the absorbed bias. The ONNX
adapter is checked on a small folded Keras export in onnxruntime (the original file
is the reference), and the int8 hook on a network with spread BN scales, where
per-tensor int8 gains from equalization.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from keras_bn.converters import equalization as eq
from keras_bn.converters import runtime
from keras_bn.converters.errors import UserInputError

# --------------------------------------------------------------------------------------
# An independent NumPy network: conv (ONNX layout, groups, zero padding) and dense.


def conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, groups: int, pad: int):
    """NCHW convolution, stride 1, written with einsum per group."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out_channels, per_group, kh, kw = weight.shape
    height, width = x.shape[2] - kh + 1, x.shape[3] - kw + 1
    windows = np.stack(
        [x[:, :, i : i + height, j : j + width] for i in range(kh) for j in range(kw)], -1
    )  # (N, C, H, W, kh*kw)
    outputs = []
    per_out = out_channels // groups
    for g in range(groups):
        w = weight[g * per_out : (g + 1) * per_out].reshape(per_out, per_group, kh * kw)
        outputs.append(
            np.einsum("nchwk,ock->nohw", windows[:, g * per_group : (g + 1) * per_group], w)
        )
    return np.concatenate(outputs, axis=1) + bias[None, :, None, None]


def apply(layer: eq.LinearLayer, x: np.ndarray, pad: int = 0) -> np.ndarray:
    if layer.dense:
        return x @ layer.weight + layer.bias
    return conv(x, layer.weight, layer.bias, layer.groups, pad)


def activate(x: np.ndarray, activation: eq.Activation, lower=None) -> np.ndarray:
    if activation.kind == "identity":
        return x
    shape = (1, -1) + (1,) * (x.ndim - 2)
    low = 0.0 if lower is None else np.reshape(lower, shape)
    out = np.maximum(x, low)
    if activation.upper is not None:
        out = np.minimum(out, np.reshape(activation.upper, shape))
    return out


def network(layers, activations, x, pads):
    for index, layer in enumerate(layers):
        x = apply(layer, x, pads[index])
        if index < len(activations):
            x = activate(x, activations[index])
    return x


def random_conv(rng, out_channels, in_channels, groups=1, kernel=3, spread=2.0):
    """A folded-looking kernel: per-output-channel scales over orders of magnitude."""
    weight = rng.normal(size=(out_channels, in_channels // groups, kernel, kernel))
    weight *= 10.0 ** rng.uniform(-spread, spread, size=(out_channels, 1, 1, 1))
    return eq.LinearLayer(weight, rng.normal(size=out_channels), groups=groups)


def random_dense(rng, in_units, units, spread=2.0):
    weight = rng.normal(size=(in_units, units)) * 10.0 ** rng.uniform(-spread, spread, units)
    return eq.LinearLayer(weight, rng.normal(size=units), dense=True)


def copy_layers(layers):
    return [
        eq.LinearLayer(layer.weight.copy(), layer.bias.copy(), layer.groups, layer.dense)
        for layer in layers
    ]


def chain(rng, kind: str):
    """Three layers and two activations: expand conv -> depthwise/grouped -> project."""
    if kind == "dense":
        return [random_dense(rng, 5, 8), random_dense(rng, 8, 6), random_dense(rng, 6, 3)]
    groups = {"depthwise": 8, "grouped": 2, "plain": 1}[kind]
    return [
        random_conv(rng, 8, 3, kernel=1),
        random_conv(rng, 8, 8, groups=groups),
        random_conv(rng, 4, 8, kernel=1),
    ]


ACTIVATIONS = {
    "relu": lambda n: eq.Activation("relu"),
    "relu6": lambda n: eq.Activation("relu", np.full(n, 6.0)),
    "identity": lambda n: eq.Activation("identity"),
}


@pytest.mark.parametrize("keep", [False, True], ids=["plain-cle", "keep-activation-range"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("kind", ["plain", "grouped", "depthwise", "dense"])
def test_equalized_chain_computes_the_same_function(kind, activation, keep):
    rng = np.random.default_rng(0)
    layers = chain(rng, kind)
    activations = [ACTIVATIONS[activation](layer.out_channels) for layer in layers[:2]]
    x = rng.normal(size=(4, 5) if kind == "dense" else (4, 3, 6, 6)) * 3
    pads = [0, 1, 0]  # the middle layer zero-pads: scaled zeros stay zero
    expected = network(
        copy_layers(layers), [eq.Activation(a.kind, a.upper) for a in activations], x, pads
    )
    named = {"a": layers[0], "b": layers[1], "c": layers[2]}
    pairs = [eq.Pair("a", "b", activations[0]), eq.Pair("b", "c", activations[1])]
    sweeps = eq.equalize_pairs(named, pairs, keep_activation_range=keep)
    assert 1 < sweeps < eq.MAX_SWEEPS
    received = network(layers, [pair.activation for pair in pairs], x, pads)
    np.testing.assert_allclose(received, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())
    if keep:  # the ReLU6 bounds only shrink: the activation's int8 range does not widen
        for pair in pairs:
            if pair.activation.upper is not None:
                assert pair.activation.upper.max() <= 6.0 * (1 + 1e-12)
                assert np.all(pair.scales >= 1 - 1e-12)
        return
    # The fixed point: every pair's ranges meet (to the sweep tolerance).
    for pair in pairs:
        first, second = named[pair.first].output_ranges(), named[pair.second].input_ranges()
        np.testing.assert_allclose(first, second, rtol=3 * eq.TOLERANCE)
    if activation == "relu6":  # the bound follows its channel: 6 / s_c, not 6
        upper = pairs[0].activation.upper
        np.testing.assert_allclose(upper, 6.0 / pairs[0].scales)
        assert upper.max() / upper.min() > 10


def test_kept_bounds_leave_saturating_channels_and_are_exact_on_the_data():
    """keep_bounds: ReLU6 stays one Clip at 6. Channels whose measured maximum reaches 6
    keep s = 1; the others are scaled, never past 6 on the data they were measured on,
    so the chain computes the original function there."""
    rng = np.random.default_rng(4)
    layers = chain(rng, "depthwise")
    x = rng.normal(size=(16, 3, 6, 6)) * 3
    first_output = apply(layers[0], x)
    highest = first_output.max(axis=(0, 2, 3))
    lowest = first_output.min(axis=(0, 2, 3))
    saturating = highest >= 6.0
    assert 0 < saturating.sum() < len(highest)  # both kinds of channel
    relu6 = [eq.Activation("relu", 6.0), eq.Activation("relu", 6.0)]
    pads = [0, 1, 0]
    expected = network(copy_layers(layers), relu6, x, pads)
    named = {"a": layers[0], "b": layers[1], "c": layers[2]}
    pair = eq.Pair("a", "b", eq.Activation("relu", 6.0))
    measured = {"a": eq.ChannelExtremes(lowest, highest)}
    eq.equalize_pairs(named, [pair], extremes=measured, keep_bounds=True)
    assert np.all(pair.scales[saturating] == 1.0)
    assert np.abs(np.log(pair.scales[~saturating])).max() > 0.1  # the others moved
    assert np.ndim(pair.activation.upper) == 0 and pair.activation.upper == 6.0
    scaled_highest = apply(layers[0], x).max(axis=(0, 2, 3))
    assert np.all(scaled_highest[~saturating] <= 6.0 * (1 + 1e-9))
    received = network(layers, [pair.activation, relu6[1]], x, pads)
    np.testing.assert_allclose(received, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())


@pytest.mark.parametrize("kind", ["plain", "grouped", "depthwise", "dense"])
def test_one_pair_meets_at_the_geometric_mean(kind):
    rng = np.random.default_rng(1)
    first, second, _ = chain(rng, kind)
    r1, r2 = first.output_ranges(), second.input_ranges()
    scales = eq.equalization_scales(r1, r2)
    np.testing.assert_allclose(scales, np.sqrt(r1 / r2))
    first.scale_outputs(1 / scales)
    second.scale_inputs(scales)
    np.testing.assert_allclose(first.output_ranges(), np.sqrt(r1 * r2))
    np.testing.assert_allclose(second.input_ranges(), np.sqrt(r1 * r2))


def test_input_ranges_of_a_depthwise_kernel_are_its_channels():
    rng = np.random.default_rng(2)
    layer = random_conv(rng, 6, 6, groups=6)
    np.testing.assert_allclose(layer.input_ranges(), layer.output_ranges())
    grouped = random_conv(rng, 4, 6, groups=2)  # in 3 per group; outputs 0-1 read 0-2
    magnitude = np.abs(grouped.weight)
    expected = np.concatenate(
        [magnitude[:2].max(axis=(0, 2, 3)), magnitude[2:].max(axis=(0, 2, 3))]
    )
    np.testing.assert_allclose(grouped.input_ranges(), expected)


def test_input_power_sums_the_squared_weights_reading_each_channel():
    rng = np.random.default_rng(5)
    multiplier = random_conv(rng, 8, 4, groups=4)  # depthwise, 2 outputs per channel
    expected = [np.sum(multiplier.weight[2 * c : 2 * c + 2] ** 2) for c in range(4)]
    np.testing.assert_allclose(multiplier.input_power(), expected)
    grouped = random_conv(rng, 4, 6, groups=2)  # outputs 0-1 read inputs 0-2
    expected = [
        np.sum(grouped.weight[2 * (c // 3) : 2 * (c // 3) + 2, c % 3] ** 2) for c in range(6)
    ]
    np.testing.assert_allclose(grouped.input_power(), expected)


@pytest.mark.parametrize("signed", [False, True], ids=["relu-output", "signed"])
def test_rounding_error_is_onnxruntime_qdq_error_through_the_weights(signed):
    """The tensor ``x / s`` quantized and dequantized by onnxruntime on the uint8 grid
    that its own ``compute_scale_zp`` gives for the range, brought back times ``s``
    and through a depthwise 1x1 layer (output = w_c x_c): the error power there is
    what rounding_error says, with and without factors."""
    from onnx import TensorProto, helper
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    rng = np.random.default_rng(6)
    spread = np.array([0.2, 1.0, 3.0, 6.0])[None, :, None]
    values = rng.gamma(0.7, size=(8, 4, 50)) * spread
    values = values - 0.5 * spread if signed else np.minimum(values, 6.0)
    weights = np.array([4.0, 1.0, 0.5, 0.2])
    for factors in (np.ones(4), np.array([0.05, 0.25, 0.6, 1.0])):
        scaled = (values / factors[None, :, None]).astype(np.float32)
        low, high = min(scaled.min(), 0.0), max(scaled.max(), 0.0)
        zero_point, scale = compute_scale_zp(
            np.float32(low), np.float32(high), np.uint8(0), np.uint8(255)
        )
        graph = helper.make_graph(
            [
                helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"]),
                helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"]),
            ],
            "qdq",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, scaled.shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, scaled.shape)],
            [
                helper.make_tensor("scale", TensorProto.FLOAT, [], [float(scale)]),
                helper.make_tensor("zp", TensorProto.UINT8, [], [int(zero_point)]),
            ],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        session = runtime.open_session(model.SerializeToString())
        (rounded,) = session.run(None, {"x": scaled})
        error = (rounded - scaled) * (factors * weights)[None, :, None]
        measured = np.mean(error**2, axis=(0, 2)).sum()
        predicted = eq.rounding_error(values, factors, weights**2, percentile=100.0)
        np.testing.assert_allclose(predicted, measured, rtol=1e-3)


def test_rounding_error_at_a_percentile_clips_the_tail():
    values = np.zeros((1, 2, 10_000))
    values[0, 0] = np.linspace(0.0, 1.0, 10_000)
    values[0, 1, :5] = 50.0  # a rare spike: 0.025% of the values
    power = np.ones(2)
    clipped = eq.rounding_error(values, np.ones(2), power, percentile=99.9)
    # The range ends at about 1: the spike is cut to it, each of 5 values off by ~49.
    assert clipped == pytest.approx(5 * 49.0**2 / 10_000, rel=0.01)
    assert eq.rounding_error(values, np.ones(2), power, percentile=100.0) < clipped


def test_rounding_error_leaves_float32_values_as_they_were():
    """It works in place on its own buffers: the caller's activations (float32, as the
    calibration pass keeps them) come back unchanged, with factors of 1 or others."""
    values = np.random.default_rng(3).standard_normal((2, 3, 40)).astype(np.float32)
    before = values.copy()
    for factors in (np.ones(3), np.array([0.5, 2.0, 1.0])):
        eq.rounding_error(values, factors, np.ones(3), percentile=99.0)
    np.testing.assert_array_equal(values, before)


def test_only_pairs_whose_factors_raise_the_error_are_reported_left_unscaled():
    report = eq.EqualizationReport([], 0, {}, {}, depthwise_only=True, judged_samples=4)
    # a tie (factors of 1: nothing to gain or lose) is not a pair left unscaled
    report.judged = {"tie": (1.0, 1.0), "worse": (1.0, 2.0), "better": (2.0, 1.0)}
    assert report.left_unscaled == ["worse"]
    lines = eq.describe(report.to_dict())
    assert lines[1] == (
        "1 pair(s) into depthwise layers left unscaled (scaling would round their activation "
        "coarser, judged on 4 calibration sample(s)): worse"
    )


def test_dead_and_empty_channels_keep_their_scale():
    scales = eq.equalization_scales(
        np.array([4.0, 1e-12, 0.0, 1.0]), np.array([1.0, 1.0, 1.0, 0.0])
    )
    np.testing.assert_allclose(scales, [2.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("kind", ["plain", "depthwise", "dense"])
@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_absorption_equals_raising_the_lower_bound(kind, activation):
    """min(max(x - c, 0), u - c) + c = min(max(x, c), u): exact where x >= c."""
    rng = np.random.default_rng(3)
    first, second, _ = chain(rng, kind)
    act = ACTIVATIONS[activation](first.out_channels)
    x = rng.normal(size=(16, 5) if kind == "dense" else (16, 3, 5, 5))
    pre = apply(first, x)
    axes = (0,) if kind == "dense" else (0, 2, 3)
    stats = eq.ChannelStatistics(pre.mean(axis=axes) + 2.0, pre.std(axis=axes))
    first.bias = first.bias + 2.0  # most channels positive: something to absorb
    absorbed = eq.high_bias(act, stats, sigmas=1.0)
    assert np.count_nonzero(absorbed) >= 2
    raised = activate(apply(first, x), act, lower=absorbed)
    expected = apply(second, raised)
    eq.absorb_high_bias(first, act, second, absorbed)
    received = apply(second, activate(apply(first, x), act))
    np.testing.assert_allclose(received, expected, rtol=1e-9, atol=1e-9)


def test_absorption_through_the_identity_moves_the_mean_exactly():
    rng = np.random.default_rng(4)
    first, second, _ = chain(rng, "plain")
    identity = eq.Activation("identity")
    x = rng.normal(size=(2, 3, 5, 5))
    expected = apply(second, apply(first, x))
    stats = eq.ChannelStatistics(rng.normal(size=8) * 5, np.ones(8))
    absorbed = eq.high_bias(identity, stats)
    np.testing.assert_array_equal(absorbed, stats.mean)
    eq.absorb_high_bias(first, identity, second, absorbed)
    np.testing.assert_allclose(apply(second, apply(first, x)), expected, rtol=1e-9, atol=1e-9)


def test_high_bias_is_clamped_to_the_activation():
    stats = eq.ChannelStatistics(np.array([10.0, 1.0, -3.0, 4.0]), np.array([1.0, 1.0, 1.0, 0.5]))
    relu6 = eq.Activation("relu", np.full(4, 6.0))
    np.testing.assert_allclose(eq.high_bias(relu6, stats), [6.0, 0.0, 0.0, 2.5])
    np.testing.assert_allclose(eq.high_bias(eq.Activation("relu"), stats), [7.0, 0.0, 0.0, 2.5])


# --------------------------------------------------------------------------------------
# The ONNX adapter, on a small folded export (a MobileNetV2-like block and an MLP head).


def block_model():
    """Conv-BN-ReLU6 -> Depthwise-BN-ReLU -> Conv-BN -> GAP -> Dense(relu) -> Dense, with
    BN scales spread over two orders of magnitude (what folding gives per-tensor int8)."""
    import keras

    import keras_bn

    layers = keras.layers
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3), name="image")
    x = layers.Conv2D(8, 1, use_bias=False, name="expand")(inputs)
    x = keras_bn.BatchNormalization(name="expand_bn")(x)
    x = layers.ReLU(6.0, name="expand_relu6")(x)
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="depthwise")(x)
    x = keras_bn.BatchNormalization(name="depthwise_bn")(x)
    x = layers.ReLU(name="depthwise_relu")(x)
    x = layers.Conv2D(6, 1, use_bias=False, name="project")(x)
    x = keras_bn.BatchNormalization(name="project_bn")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(10, activation="relu", name="hidden")(x)
    model = keras.Model(inputs, layers.Dense(4, name="logits")(x))
    rng = np.random.default_rng(0)
    probe = keras.Model(
        inputs, [model.get_layer(n).output for n in ("expand", "depthwise", "project")]
    )
    sample = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    # One BN at a time, in order: each sees the data through the BNs before it.
    for index, name in enumerate(("expand_bn", "depthwise_bn", "project_bn")):
        values = np.asarray(probe.predict(sample, verbose=0)[index], np.float64)
        bn = model.get_layer(name)
        channels = values.shape[-1]
        gamma = 10.0 ** rng.uniform(-1.5, 0.5, channels)
        beta = rng.normal(size=channels) + (8.0 * gamma if name == "depthwise_bn" else 0.0)
        bn.set_weights([gamma, beta, values.mean(axis=(0, 1, 2)), values.var(axis=(0, 1, 2))])
    return model, sample


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from keras_bn.converters.onnx.export import export_onnx

    model, sample = block_model()
    path = tmp_path_factory.mktemp("equalization") / "block.onnx"
    result = export_onnx(model, path, fold=True)
    return path, eq.batch_norm_statistics(model, result.fold_report), sample


def run_onnx(model: onnx.ModelProto, x: np.ndarray, outputs=()) -> list[np.ndarray]:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for name in outputs:
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    session = runtime.open_session(model.SerializeToString())
    return runtime.run(session, {"image": x})


def test_batch_norm_statistics_are_gamma_and_beta_by_folded_layer(exported):
    _, statistics, _ = exported
    assert sorted(statistics) == ["depthwise", "expand", "project"]
    assert statistics["expand"].mean.shape == (8,)
    assert np.all(statistics["depthwise"].std > 0)


def test_onnx_equalization_keeps_the_float_outputs(exported):
    path, _, x = exported
    original = onnx.load(str(path))
    model, report = eq.equalize_model(original, absorb=False)
    # (the output layer's node may carry a suffix: its name is the graph output's)
    pairs = {
        (pair.first, pair.second.removesuffix("_1"), pair.activation.kind) for pair in report.pairs
    }
    assert pairs == {
        ("expand", "depthwise", "relu"),  # through ReLU6: a per-channel Min after the Clip
        ("depthwise", "project", "relu"),
        ("project", "hidden", "identity"),  # through GlobalAveragePool and Flatten
        ("hidden", "logits", "relu"),
    }
    assert report.per_channel_bounds == 1
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("Min") == 1 and ops.count("Clip") == 1
    assert [node.op_type for node in original.graph.node].count("Clip") == 1  # not modified
    assert max(report.spread_after.values()) < max(report.spread_before.values()) / 4
    (expected,), (received,) = run_onnx(original, x), run_onnx(model, x)
    np.testing.assert_allclose(received, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_onnx_absorption_is_exact_where_the_statistics_hold(exported):
    path, statistics, x = exported
    original = onnx.load(str(path))
    model, report = eq.equalize_model(original, statistics, sigmas=6.0)  # heavy tails
    assert report.not_absorbed == {
        "expand": "the next layer zero-pads its input",  # the depthwise 3x3 'same'
        "hidden": "no BatchNormalization statistics",
    }
    by_first = {pair.first: pair for pair in report.pairs}
    # The precondition, on the original model: depthwise outputs never below the bias moved.
    absorbed = by_first["depthwise"].absorbed * by_first["depthwise"].scales  # original units
    assert np.count_nonzero(absorbed) >= 2
    expected, depthwise = run_onnx(original, x, outputs=["depthwise"])
    moved = absorbed[None, :, None, None]
    assert np.all((depthwise >= moved) | (moved == 0))  # ReLU(x - 0) + 0 holds for any x
    np.testing.assert_allclose(  # the identity moves the whole mean
        by_first["project"].absorbed,
        statistics["project"].mean / by_first["project"].scales,
        rtol=1e-12,
    )
    (received,) = run_onnx(model, x)
    np.testing.assert_allclose(received, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert report.absorbed_channels == np.count_nonzero(absorbed) + 6


def test_measured_extremes_bound_the_factors_and_absorb_exactly_on_their_data(exported):
    """Extremes measured on data: the factors keep each measured activation range
    within the tensor's widest, every ReLU pair absorbs (BN statistics or not) up to
    its channels' lowest value, and the equalized model computes the original's
    function on that data, where the statistics' ``mean - 3 std`` is passed."""
    from keras_bn.converters import calibration

    path, statistics, x = exported
    original = onnx.load(str(path))
    sources = eq.pair_outputs(original)
    assert sorted(sources) == ["depthwise", "expand", "hidden", "project"]
    measured, (logits,), _ = calibration.channel_extremes(
        original, [{"image": x[:40]}, {"image": x[40:]}], sources.values()
    )
    expected, *values = run_onnx(original, x, outputs=list(sources.values()))
    # (graph optimizations and batch sizes differ: float32 rounding apart)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    for tensor, value in zip(sources.values(), values, strict=True):
        axes = (0, *range(2, value.ndim))
        np.testing.assert_allclose(measured[tensor][0], value.min(axis=axes), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(measured[tensor][1], value.max(axis=axes), rtol=1e-5, atol=1e-6)
    extremes = {first: eq.ChannelExtremes(*measured[tensor]) for first, tensor in sources.items()}
    model, report = eq.equalize_model(original, statistics, extremes=extremes)
    assert (report.measured_ranges, report.measured_bounds) == (4, 2)  # absorbed: the ReLUs
    assert report.not_absorbed == {"expand": "the next layer zero-pads its input"}
    by_first = {pair.first: pair for pair in report.pairs}
    ranges = np.maximum(measured[sources["depthwise"]][1], 0.0)  # through a plain ReLU
    assert np.all(by_first["depthwise"].scales >= ranges / ranges.max() * (1 - 1e-9))
    moved = by_first["depthwise"].absorbed * by_first["depthwise"].scales  # original units
    lowest = measured[sources["depthwise"]][0]
    np.testing.assert_allclose(moved, np.maximum(lowest, 0), rtol=1e-12)
    assert np.count_nonzero(moved) >= 2
    (received,) = run_onnx(model, x)
    np.testing.assert_allclose(received, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    (from_statistics,) = run_onnx(eq.equalize_model(original, statistics)[0], x)
    assert np.abs(from_statistics - expected).max() > 1e-3 * np.abs(expected).max()


def test_per_tensor_int8_gains_from_equalization(exported, tmp_path):
    from keras_bn.converters.precision import quantize_int8

    path, statistics, x = exported
    # Equalization's own effect: MinMax ranges, no bias correction (the default scheme's
    # percentile clipping and bias correction recover part of the same loss by other means).
    scheme = {"per_channel": False, "calibration_method": "MinMax", "bias_correction": False}
    plain = quantize_int8(path, tmp_path / "plain.onnx", {"image": x}, **scheme)
    equalized = quantize_int8(
        path,
        tmp_path / "equalized.onnx",
        {"image": x},
        equalize=True,
        batch_norm_statistics=statistics,
        **scheme,
    )
    assert equalized.comparison.sqnr_db > plain.comparison.sqnr_db + 6
    details = equalized.details["equalization"]
    assert details["pairs"] == 4 and details["measured_bounds"] == 2
    assert details["measured_ranges"] == 0  # per-tensor weights: the statistics' ranges
    assert details["float_sqnr_db"] > 100  # absorbed up to the calibration data's minima
    assert "cross-layer equalization: 4 layer pair(s)" in str(equalized)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["equalized.onnx", "plain.onnx"]


def test_per_channel_equalization_bounds_its_factors_by_measured_ranges(exported, tmp_path):
    from keras_bn.converters.precision import quantize_int8

    path, statistics, x = exported
    report = quantize_int8(
        path,
        tmp_path / "q.onnx",
        {"image": x},
        equalize=True,
        batch_norm_statistics=statistics,
        layer_report=False,
    )
    details = report.details["equalization"]
    assert (details["measured_ranges"], details["measured_bounds"]) == (4, 2)
    assert "activation ranges of 4 pair(s) measured on the calibration data" in str(report)


def _stored_weights(path) -> dict[str, np.ndarray]:
    """Each Conv/Gemm node's stored weight integers (as int16), by node name."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {node.output[0]: node for node in model.graph.node}
    return {
        node.name: stored[producers[node.input[1]].input[0]].astype(np.int16)
        for node in model.graph.node
        if node.op_type in ("Conv", "Gemm") and node.input[1] in producers
    }


def test_per_channel_equalizes_the_pairs_into_depthwise_layers_for_free(exported, tmp_path):
    """quantize_int8's per-channel default equalizes expand -> depthwise only: the
    factors scale whole per-channel weight rows, so every stored weight integer is the
    unequalized file's, and only the tensor between the two layers changes."""
    from keras_bn.converters.precision import quantize_int8

    path, _, x = exported
    scheme = {"calibration_method": "MinMax", "bias_correction": False, "layer_report": False}
    default = quantize_int8(path, tmp_path / "default.onnx", {"image": x}, **scheme)
    plain = quantize_int8(path, tmp_path / "plain.onnx", {"image": x}, equalize=False, **scheme)
    details = default.details["equalization"]
    assert (details["pairs"], details["depthwise_only"]) == (1, True)
    # ReLU6 stays one Clip: no per-channel Min to run in float between int8 layers.
    assert details["per_channel_bounds"] == 0 and details["absorbed_channels"] == 0
    ops = [node.op_type for node in onnx.load(str(tmp_path / "default.onnx")).graph.node]
    assert "Min" not in ops
    assert "equalization" not in plain.details
    ours, theirs = (
        _stored_weights(tmp_path / "default.onnx"),
        _stored_weights(tmp_path / "plain.onnx"),
    )
    assert sorted(ours) == sorted(theirs) and len(ours) == 5
    for name in ours:  # a float rounding tie may move one integer by one step
        assert np.abs(ours[name] - theirs[name]).max() <= 1, name
        assert np.mean(ours[name] == theirs[name]) > 0.99, name
    assert details["float_sqnr_db"] > 100  # the same function on the calibration data
    with pytest.raises(UserInputError, match="equalize: expected"):
        quantize_int8(path, tmp_path / "bad.onnx", {"image": x}, equalize="depthwize")


# --------------------------------------------------------------------------------------
# The command: keras-bn export --precision int8 --per-tensor (equalized by default).


def run_main(args, capsys) -> tuple[int, str, str]:
    from keras_bn.converters import cli

    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    model, sample = block_model()
    directory = tmp_path_factory.mktemp("equalization_cli")
    model.save(directory / "block.keras")
    np.savez(directory / "calibration.npz", image=sample)
    return directory


@pytest.mark.parametrize(
    ("flags", "equalized"),
    [
        (["--per-tensor"], "all"),
        (["--per-tensor", "--no-equalize", "--no-tune-biases", "--no-round-weights"], None),
        ([], "depthwise"),
        (["--signed-int8"], "depthwise"),
        (["--no-equalize", "--tune-biases", "--round-weights"], None),
    ],
    ids=[
        "per-tensor",
        "per-tensor-unequalized-untuned",
        "per-channel",
        "per-channel-signed",
        "per-channel-unequalized-tuned",
    ],
)
def test_export_int8_per_tensor_equalizes(model_file, tmp_path, capsys, flags, equalized):
    import json

    code, out, err = run_main(
        ["export", model_file / "block.keras", "-o", tmp_path / "q.onnx", "--precision", "int8"]
        + ["--calibration", model_file / "calibration.npz", "--json", *flags],
        capsys,
    )
    assert code == 0, err
    precision = json.loads(out)["precision"]
    assert precision["per_channel"] is ("--per-tensor" not in flags)
    assert ("equalization" in precision) is (equalized is not None)
    # Bias tuning: on by default with per-tensor weights only. GPTQ weight rounding:
    # every layer per-tensor, the depthwise ones with per-channel weights.
    tuned = flags in (["--per-tensor"], ["--no-equalize", "--tune-biases", "--round-weights"])
    assert ("bias_tuning" in precision) is tuned
    rounding = precision.get("weight_rounding")
    assert (rounding is None) is ("--no-round-weights" in flags)
    corrected = [layer["node"] for layer in precision["bias_correction"]["layers"]]
    if tuned:  # every Conv and Dense, rounded before bias correction corrects them
        assert rounding["rounded"] == corrected and not rounding["depthwise_only"]
    elif rounding is not None:
        depthwise = [n for n in corrected if "depthwise" in n]
        assert rounding["rounded"] == depthwise and len(depthwise) == 1, rounding
        assert rounding["depthwise_only"]
    assert rounding is None or rounding["error_db"] < 0
    # The step table names the stages that ran.
    stages = (
        ["calibrated"] + ["rounding weights"] * (rounding is not None) + ["tuning biases"] * tuned
    )
    steps = [step["step"] for step in json.loads(out)["steps"]]
    assert f"Quantizing to int8 ({', '.join(stages)})" in steps, steps
    if equalized == "all":  # the BN statistics reached it: two pairs absorbed
        assert precision["equalization"]["pairs"] == 4
        assert precision["equalization"]["absorbed_channels"] > 0
    if equalized == "depthwise":  # per-channel weights: expand -> depthwise only
        assert precision["equalization"]["pairs"] == 1
        assert precision["equalization"]["depthwise_only"] is True
        assert "1 layer pair(s) into depthwise layers" in eq.describe(precision["equalization"])[0]
    scales = [
        i
        for i in onnx.load(str(tmp_path / "q.onnx")).graph.initializer
        if i.name.endswith("_scale")
    ]
    weight_scales = [i for i in scales if "kernel" in i.name]
    per_tensor = "--per-tensor" in flags
    assert weight_scales and all(len(i.dims) == (0 if per_tensor else 1) for i in weight_scales)
    # Stored as uint8 (the same values plus 128) unless asked for int8.
    signed = "--signed-int8" in flags
    assert precision["storage"] == ("int8" if signed else "uint8")
    stored = {i.data_type for i in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    assert (onnx.TensorProto.INT8 in stored, onnx.TensorProto.UINT8 in stored) == (
        signed,
        not signed,
    )


@pytest.mark.parametrize(
    "flag",
    [
        "--per-tensor",
        "--equalize",
        "--no-equalize",
        "--signed-int8",
        "--no-tune-biases",
        "--round-weights",
    ],
)
def test_int8_flags_need_int8(model_file, tmp_path, capsys, flag):
    from support.console import assert_rejected

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run_main(
        ["export", model_file / "block.keras", "-o", out_dir / "m.onnx", flag], capsys
    )
    assert_rejected(code, err, "only used with --precision int8", out_dir)


# --------------------------------------------------------------------------------------
# Hand-written ONNX graphs: forms our exporter does not write, and what blocks a pair.


def mlp(activation: str, trans_b: int) -> onnx.ModelProto:
    """x -> Gemm -> activation -> Gemm, the first weight stored (out, in) when trans_b."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(5)
    first = rng.normal(size=(4, 6)) * 10.0 ** rng.uniform(-2, 1, 6)
    second = rng.normal(size=(6, 3))
    initializers = [
        numpy_helper.from_array((first.T if trans_b else first).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=6).astype(np.float32), "b1"),
        numpy_helper.from_array(second.astype(np.float32), "w2"),
        numpy_helper.from_array(np.float32(-1.0 if activation == "hardtanh" else 0.0), "low"),
        numpy_helper.from_array(np.float32(1.0), "high"),
    ]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="first", transB=trans_b)]
    nodes.append(helper.make_node("Clip", ["h", "low", "high"], ["a"], name="act"))
    nodes.append(helper.make_node("Gemm", ["a", "w2"], ["y"], name="second"))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 3])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run_mlp(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = runtime.open_session(model.SerializeToString())
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_pairs_in_either_weight_layout(trans_b):
    model = mlp("relu1", trans_b)
    equalized, report = eq.equalize_model(model)
    assert [(p.first, p.second) for p in report.pairs] == [("first", "second")]
    assert report.per_channel_bounds == 1  # the bound 1 became 1 / s_c
    x = np.random.default_rng(6).normal(size=(32, 4)).astype(np.float32) * 3
    expected = run_mlp(model, x)
    np.testing.assert_allclose(
        run_mlp(equalized, x), expected, rtol=0, atol=1e-6 * np.abs(expected).max()
    )
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    hidden = x @ (weights["w1"].T if trans_b else weights["w1"]) + weights["b1"]
    assert (hidden > 1).any() and (hidden < 0).any()  # both bounds were active
    assert report.spread_after["first"] < report.spread_before["first"]


def test_clip_with_a_negative_lower_bound_blocks_the_pair():
    model = mlp("hardtanh", 0)  # clip(x, -1, 1): not positively homogeneous
    equalized, report = eq.equalize_model(model)
    assert report.pairs == [] and report.sweeps == 0
    assert equalized.SerializeToString() == model.SerializeToString()


def test_batch_norm_statistics_without_scale_or_center():
    import keras

    from keras_bn.converters.folding import plan_folds

    inputs = keras.Input((4, 4, 2))
    x = keras.layers.Conv2D(3, 1, name="conv")(inputs)
    x = keras.layers.BatchNormalization(scale=False, center=False, name="bn")(x)
    model = keras.Model(inputs, keras.layers.ReLU()(x))
    statistics = eq.batch_norm_statistics(model, plan_folds(model))
    np.testing.assert_array_equal(statistics["conv"].mean, np.zeros(3))
    np.testing.assert_array_equal(statistics["conv"].std, np.ones(3))

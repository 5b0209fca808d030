"""Tests for keras_bn.converters.divergence: the per-Keras-layer int8 divergence report.

The model is a small CNN trained on a synthetic task, then one layer is made hard to
quantize without changing what the model computes: one output channel of ``hard``
(Conv-BN-ReLU) is scaled up by ``SCALE`` through its BN (ReLU commutes with a
positive scale) and the depthwise convolution after it divides that channel's
kernel by the same factor. That is cross-layer equalization run backwards: the
float model is unchanged, and the per-tensor activation scale of ``hard``'s output
now leaves its other channels a handful of int8 levels. The report must name it.
The reference for the numbers is NumPy on the two models' own tensors: the float
model's value, and the int8 model's value before its quantize node, quantized and
dequantized in NumPy with the scale and zero point the file holds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import keras
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from support.files import sha256

from keras_bn import BatchNormalization
from keras_bn.converters import cli, runtime
from keras_bn.converters.divergence import DIVERGENCE_SAMPLES, layer_divergence
from keras_bn.converters.onnx.export import export_onnx
from keras_bn.converters.onnx.metadata import decode_layer_map
from keras_bn.converters.precision import quantize_int8

L = keras.layers
SCALE = 64.0
CHANNEL = 2  # the channel of ``hard`` scaled up
SAMPLES = 48


def _block(x, name: str, filters: int | None = None):
    if filters is None:
        x = L.DepthwiseConv2D(3, padding="same", name=name)(x)
    else:
        x = L.Conv2D(filters, 3, padding="same", name=name)(x)
    x = BatchNormalization(name=f"{name}_bn")(x)
    return L.ReLU(name=f"{name}_relu")(x)


def _images(rng, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes: stripes that run horizontally, vertically, or none, plus noise."""
    labels = rng.integers(0, 3, size=count)
    wave = np.sin(np.arange(12.0))
    stripes = np.stack(
        [np.outer(wave, np.ones(12)), np.outer(np.ones(12), wave), np.zeros((12, 12))]
    )[:, :, :, None]
    images = stripes[labels] * rng.uniform(0.5, 1.5, size=(count, 1, 1, 3))
    images = images + 0.2 * rng.normal(size=(count, 12, 12, 3))
    return images.astype("float32"), labels


@pytest.fixture(scope="module")
def trained():
    """The CNN trained for a few epochs (real BN statistics), and its calibration data."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((12, 12, 3), name="image")
    x = _block(inputs, "stem", 8)
    x = _block(x, "hard", 8)
    x = _block(x, "depthwise")
    x = _block(x, "mix", 8)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    outputs = L.Dense(3, activation="softmax", name="head")(x)
    model = keras.Model(inputs, outputs, name="stripes")
    rng = np.random.default_rng(0)
    images, labels = _images(rng, 384)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(images, labels, batch_size=32, epochs=8, verbose=0)
    calibration, _ = _images(rng, SAMPLES)
    return model, calibration


def _make_hard(model) -> keras.Model:
    """A copy computing the same function, ``hard``'s channel CHANNEL SCALE times larger."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    bn = copy.get_layer("hard_bn")
    for weight in (bn.gamma, bn.beta):
        values = keras.ops.convert_to_numpy(weight).copy()
        values[CHANNEL] *= SCALE
        weight.assign(values)
    depthwise = copy.get_layer("depthwise")
    kernel = keras.ops.convert_to_numpy(depthwise.kernel).copy()
    kernel[:, :, CHANNEL, :] /= SCALE
    depthwise.kernel.assign(kernel)
    return copy


def _quantized(model, calibration, directory: Path, **options) -> tuple[Path, Path, object]:
    directory.mkdir()
    float_path, int8_path = directory / "float.onnx", directory / "int8.onnx"
    export_onnx(model, float_path, fold=True, input_layout="channels_first")
    feed = {"image": np.transpose(calibration, (0, 3, 1, 2))}
    report = quantize_int8(float_path, int8_path, feed, **options)
    return float_path, int8_path, report


@pytest.fixture(scope="module")
def models(trained, tmp_path_factory):
    model, calibration = trained
    hard = _make_hard(model)
    keras_outputs = [np.asarray(m.predict(calibration, verbose=0)) for m in (model, hard)]
    directory = tmp_path_factory.mktemp("divergence")
    return {
        "keras": keras_outputs,
        "calibration": calibration,
        # Without equalization: into a depthwise layer it would repair the hard layer
        # (test_equalization_into_the_depthwise_layer_repairs_it).
        "plain": _quantized(model, calibration, directory / "plain", equalize=False),
        "hard": _quantized(hard, calibration, directory / "hard", equalize=False),
        "model": hard,
        "directory": directory,
    }


def _feed(models) -> dict[str, np.ndarray]:
    return {"image": np.transpose(models["calibration"], (0, 3, 1, 2))}


def test_the_hard_copy_computes_the_same_function(models):
    plain, hard = models["keras"]
    np.testing.assert_allclose(hard, plain, atol=1e-5)
    # ... and the trained model is a classifier, not a constant
    assert len(set(np.argmax(plain, axis=1))) == 3


def test_the_hard_layer_is_named_worst(models):
    report = models["hard"][2].divergence
    worst = report.worst()
    assert worst[0].layer == "hard_relu", str(report)
    assert worst[0].computed_by == ("hard", "hard_bn", "hard_relu")
    assert worst[0].inputs == ("stem_relu",)
    assert "one channel's range is" in worst[0].hint
    assert worst[0].channel_spread > SCALE / 4
    # The depthwise layer after it is as bad in total but only passes the error on.
    by_layer = {layer.layer: layer for layer in report.layers}
    downstream = by_layer["depthwise_relu"]
    assert downstream.channel_sqnr_db < by_layer["stem_relu"].channel_sqnr_db - 10
    assert downstream.local_sqnr_db > worst[0].local_sqnr_db + 3
    # Without the scaled channel the same layer loses far less.
    plain = {layer.layer: layer for layer in models["plain"][2].divergence.layers}
    assert plain["hard_relu"].channel_sqnr_db > worst[0].channel_sqnr_db + 20
    assert not plain["hard_relu"].hint


def _numpy_int8_values(int8_path: Path, float_names: list[str], feed) -> dict[str, np.ndarray]:
    """The int8 model's value of each float name before its QuantizeLinear, quantized
    and dequantized in NumPy with the file's scale and zero point (a value int8 leaves
    float, as an output Softmax's: as the file computes it)."""
    model = onnx.load(str(int8_path))
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    quantizers = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            original = node.input[0].removesuffix("_QuantizeLinear_Input")
            quantizers.setdefault(original, node)
    exposed = [quantizers[name].input[0] if name in quantizers else name for name in float_names]
    exposed = [name for name in exposed if name not in {o.name for o in model.graph.output}]
    model.graph.output.extend(
        helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in exposed
    )
    session = runtime.open_session(model.SerializeToString(), optimization="ORT_DISABLE_ALL")
    outputs = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True)
    )
    values = {}
    for name in float_names:
        if name not in quantizers:
            values[name] = outputs[name].astype(np.float64)
            continue
        node = quantizers[name]
        scale = initializers[node.input[1]].astype(np.float64)
        zero_point = initializers[node.input[2]].astype(np.float64)
        raw = outputs[node.input[0]].astype(np.float64)
        stored = np.iinfo(initializers[node.input[2]].dtype)  # int8 or uint8
        quantized = np.clip(np.round(raw / scale) + zero_point, stored.min, stored.max)
        values[name] = (quantized - zero_point) * scale
    return values


def _float_values(float_path: Path, names: list[str], feed) -> dict[str, np.ndarray]:
    model = onnx.load(str(float_path))
    model.graph.output.extend(
        helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in names
    )
    session = runtime.open_session(model.SerializeToString(), optimization="ORT_DISABLE_ALL")
    outputs = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True)
    )
    return {name: outputs[name].astype(np.float64) for name in names}


def _sqnr(values: np.ndarray, exact: np.ndarray) -> float:
    return 10 * math.log10(np.sum(exact**2) / np.sum((values - exact) ** 2))


def test_sqnrs_agree_with_numpy(models):
    float_path, int8_path, report = models["hard"]
    layers = report.divergence.layers
    names = [layer.onnx_value for layer in layers]
    feed = {"image": _feed(models)["image"][:DIVERGENCE_SAMPLES]}
    exact = _float_values(float_path, names, feed)
    int8 = _numpy_int8_values(int8_path, names, feed)
    assert report.divergence.samples == DIVERGENCE_SAMPLES
    for layer in layers:
        f, q = exact[layer.onnx_value], int8[layer.onnx_value]
        assert layer.sqnr_db == pytest.approx(_sqnr(q, f), abs=0.05), layer.layer
        channels = np.moveaxis(f, 1, -1).reshape(-1, f.shape[1]) if f.ndim == 4 else f
        noisy = np.moveaxis(q, 1, -1).reshape(-1, q.shape[1]) if q.ndim == 4 else q
        live = np.sum(channels**2, axis=0) > 0
        median = np.median([_sqnr(noisy[:, c], channels[:, c]) for c in np.flatnonzero(live)])
        assert layer.channel_sqnr_db == pytest.approx(median, abs=0.05), layer.layer
        error = np.abs(q - f).max()
        assert layer.max_abs_error == pytest.approx(error, rel=1e-3, abs=1e-7)
        assert layer.relative_to_range == pytest.approx(error / (f.max() - f.min()), rel=1e-3)


def test_every_layer_output_in_both_graphs_is_compared(models):
    float_path, int8_path, report = models["hard"]
    compared = [layer.layer for layer in report.divergence.layers]
    # Folded convolutions and BNs have no value of their own after quantization (the
    # ReLU is folded into the quantization range): each block is compared once.
    assert compared == [
        "stem_relu",
        "hard_relu",
        "depthwise_relu",
        "mix_relu",
        "pool",
        "head",
    ]
    assert [layer.inputs for layer in report.divergence.layers][1:] == [
        ("stem_relu",),
        ("hard_relu",),
        ("depthwise_relu",),
        ("mix_relu",),
        ("pool",),
    ]


def test_the_int8_file_is_left_as_it_is(models, tmp_path):
    float_path, int8_path, _ = models["hard"]
    before = sha256(int8_path), sha256(float_path)
    layer_divergence(float_path, int8_path, _feed(models))
    assert (sha256(int8_path), sha256(float_path)) == before
    assert [o.name for o in onnx.load(str(int8_path)).graph.output] == ["head"]


def _count_augmented_sessions(monkeypatch) -> list:
    """The models divergence opens augmented sessions on, from now on."""
    from keras_bn.converters import divergence

    opened: list = []
    augmented = divergence._augmented_session
    monkeypatch.setattr(
        divergence,
        "_augmented_session",
        lambda model, names: opened.append(model) or augmented(model, names),
    )
    return opened


def test_given_float_values_stand_in_for_the_float_run(models, monkeypatch):
    """The float model's values on the compared samples, computed elsewhere (what
    quantize_int8's calibration pass keeps), give the report layer_divergence makes
    alone, and the float model is not run again; without every compared value, it is."""
    from keras_bn.converters import divergence

    float_path, int8_path, _ = models["hard"]
    feed = _feed(models)
    alone = layer_divergence(float_path, int8_path, feed)
    names = divergence.compared_values(float_path)
    assert {layer.onnx_value for layer in alone.layers} <= set(names)
    opened = _count_augmented_sessions(monkeypatch)
    first = {"image": feed["image"][:DIVERGENCE_SAMPLES]}
    values = {k: v.astype(np.float32) for k, v in _float_values(float_path, names, first).items()}
    ahead = layer_divergence(float_path, int8_path, feed, float_values=values)
    assert len(opened) == 1  # the int8 model's copy only
    assert ahead.to_dict() == alone.to_dict()
    # A compared value missing: the float model runs, and the report is the one alone.
    opened.clear()
    missing = {k: v for k, v in values.items() if k != alone.layers[0].onnx_value}
    assert layer_divergence(float_path, int8_path, feed, float_values=missing).to_dict() == (
        alone.to_dict()
    )
    assert len(opened) == 2


def test_quantize_int8_runs_the_float_model_once(trained, tmp_path, monkeypatch):
    """quantize_int8's layer report takes the float side from the calibration pass:
    one float session (calibration) and one int8 copy for the report; the report is
    the one layer_divergence makes alone on the files."""
    opened = _count_augmented_sessions(monkeypatch)
    model, calibration = trained
    float_path, int8_path, report = _quantized(
        model, calibration, tmp_path / "once", equalize=False
    )
    assert len(opened) == 1
    feed = {"image": np.transpose(calibration, (0, 3, 1, 2))}
    alone = layer_divergence(float_path, int8_path, feed)
    assert report.divergence.to_dict() == alone.to_dict()


def test_without_a_layer_map_nothing_is_compared(models, tmp_path):
    float_path, int8_path, _ = models["plain"]
    model = onnx.load(str(float_path))
    del model.metadata_props[:]
    report = layer_divergence(model, int8_path, _feed(models))
    assert report.layers == [] and "no keras-bn layer map" in report.note
    assert "no keras-bn layer map" in report.format()


def test_equalization_into_the_depthwise_layer_repairs_it(models, tmp_path):
    """The per-channel default equalizes hard -> depthwise: the channel scaled up by
    the construction is scaled back, and the layer is no longer far the worst."""
    float_path, _, unequalized = models["hard"]
    report = quantize_int8(float_path, tmp_path / "q.onnx", _feed(models))
    assert report.details["equalization"]["depthwise_only"] is True
    before = {layer.layer: layer for layer in unequalized.divergence.layers}["hard_relu"]
    after = {layer.layer: layer for layer in report.divergence.layers}["hard_relu"]
    assert after.channel_sqnr_db > before.channel_sqnr_db + 10  # the median channel's
    assert after.channel_spread < before.channel_spread / 10
    assert "equalization evens them out" in before.hint and not after.hint
    assert report.comparison.sqnr_db > unequalized.comparison.sqnr_db


def test_equalization_is_suggested_only_where_it_can_rescale(tmp_path):
    """Two values with one channel 40x the others: a Dense layer's ReLU output, which
    equalization rescales with the next Dense, gets the --equalize hint; a
    LayerNormalization's output, which no layer pair holds, gets the spread alone."""

    def wide_channel(shape, dtype=None):
        scale = np.ones(shape, np.float32)
        scale[0] = 40.0
        return scale

    keras.utils.set_random_seed(4)
    inputs = keras.Input((8,), name="x")

    def biases(seed):  # not zeros the exporter shares between the layers
        return keras.initializers.RandomNormal(stddev=0.1, seed=seed)

    hidden = keras.layers.Dense(16, "relu", bias_initializer=biases(1), name="hidden")(inputs)
    normed = keras.layers.LayerNormalization(gamma_initializer=wide_channel, name="norm")(
        keras.layers.Dense(16, bias_initializer=biases(2), name="project")(hidden)
    )
    model = keras.Model(inputs, keras.layers.Dense(3, name="scores")(normed))
    kernel = model.get_layer("hidden").kernel
    kernel.assign(keras.ops.convert_to_numpy(kernel) * wide_channel((16,))[None, :])
    export_onnx(model, tmp_path / "f.onnx")
    data = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx", {"x": data},
                  layer_report=False, equalize=False)  # fmt: skip
    report = layer_divergence(tmp_path / "f.onnx", tmp_path / "q.onnx", {"x": data})
    hints = {layer.layer: layer.hint for layer in report.layers}
    assert "one channel's range is" in hints["hidden"] and "--equalize" in hints["hidden"]
    assert "one channel's range is" in hints["norm"] and "--equalize" not in hints["norm"]


def test_layer_report_off(models, tmp_path):
    float_path, _, _ = models["plain"]
    report = quantize_int8(float_path, tmp_path / "q.onnx", _feed(models), layer_report=False)
    assert report.divergence is None and "divergence" not in report.to_dict()


def test_export_cli_names_the_layer(models, capsys):
    directory = models["directory"]
    model_path, calibration = directory / "hard.keras", directory / "calibration.npz"
    models["model"].save(model_path)
    np.savez(calibration, image=models["calibration"])
    output = directory / "cli.onnx"
    # The int8 file is bad on purpose: write it without validation (one run less).
    arguments = ["export", model_path, "-o", output, "--precision", "int8", "--no-validate"]
    arguments += ["--no-statistics-check", "--no-equalize"]
    code = cli.main([str(a) for a in [*arguments, "--calibration", calibration, "--json"]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    divergence = json.loads(captured.out)["precision"]["divergence"]
    assert divergence["worst"][0] == "hard_relu"
    assert len(divergence["layers"]) == 6
    code = cli.main([str(a) for a in [*arguments, "--calibration", calibration, "--force"]])
    text = capsys.readouterr().out
    assert code == 0
    assert "per-layer int8 divergence" in text and "hard -> hard_bn -> hard_relu" in text
    assert "worst int8 layer" in text


def test_per_tensor_weights_with_spread_channels_are_hinted(models, tmp_path):
    # The scaled channel's folded kernel is SCALE times the others': per-tensor
    # weights leave them few levels, and the report says so for that layer only.
    float_path, _, _ = models["hard"]
    report = quantize_int8(float_path, tmp_path / "t.onnx", _feed(models), per_channel=False)
    by_layer = {layer.layer: layer for layer in report.divergence.layers}
    hard = by_layer["hard_relu"]
    assert hard.weights_per_tensor and hard.weight_spread > SCALE / 4
    assert "quantized per tensor" in hard.hint
    assert by_layer["stem_relu"].weight_spread < 4
    assert "quantized per tensor" not in by_layer["stem_relu"].hint


def test_with_equalization_layers_are_compared_with_the_equalized_float_model(models, tmp_path):
    # Equalization rescales channels between layers: the report compares the int8 file
    # with the equalized float model, so the rescaled channels are not errors, and the
    # per-tensor weights it evens out gain (the scaled channel's layer most).
    float_path, _, _ = models["hard"]
    plain = quantize_int8(float_path, tmp_path / "p.onnx", _feed(models), per_channel=False)
    equalized = quantize_int8(
        float_path, tmp_path / "e.onnx", _feed(models), per_channel=False, equalize=True
    )
    before = {layer.layer: layer for layer in plain.divergence.layers}
    after = {layer.layer: layer for layer in equalized.divergence.layers}
    assert after.keys() == before.keys()
    assert after["hard_relu"].channel_sqnr_db > before["hard_relu"].channel_sqnr_db + 6
    assert min(layer.sqnr_db for layer in after.values()) > 10


def test_channel_spread_leaves_out_channels_that_stay_zero():
    """Dead channels (zero on every sample, after a ReLU) lose nothing to a per-tensor
    scale: the spread is the largest channel over the median of the live ones, never
    the infinite ratio a zero median would give."""
    from keras_bn.converters.divergence import _spread

    assert _spread(np.array([0.0, 0.0, 0.0, 0.0, 2.0, 8.0])) == pytest.approx(8.0 / 5.0)
    assert _spread(np.array([0.0, 1.0, 2.0, 8.0])) == pytest.approx(8.0 / 2.0)
    assert _spread(np.array([0.0, 0.0, 3.0])) == 1.0  # one live channel: nothing to compare
    # float rounding around channels held constant (biases absorbed whole) is not a signal
    assert _spread(np.array([3e-16, 1e-15, 2.0, 8.0])) == pytest.approx(8.0 / 5.0)
    assert _spread(np.zeros(4)) == 1.0


def test_channel_sqnr_leaves_out_channels_at_float_rounding():
    """A channel held at float rounding (1e-15) and rounded to 0 by int8 has 0 dB of
    its own: it is not the median channel's signal."""
    from keras_bn.converters.divergence import _Totals

    exact = np.array([[1e-15, -2e-15, 1.0, 4.0], [2e-15, 1e-15, 2.0, 8.0]] * 3, np.float32)
    rounded = np.where(np.abs(exact) < 1e-6, 0.0, exact * 1.01).astype(np.float32)
    totals = _Totals()
    totals.add(exact, rounded, axis=1)
    assert totals.channel_sqnr_db() == pytest.approx(40.0, abs=1e-3)  # 1% error: 40 dB


def test_totals_are_numpys_sums_and_extremes_and_take_nan_as_infinite_error():
    """Per channel: sum of float^2, sum of (int8 - float)^2, max |float|; over the
    value: max |error|, lowest and highest float (NumPy float64, two batches). A NaN
    in the int8 value is an infinite error in its channel only, and neither input is
    modified."""
    from keras_bn.converters.divergence import _Totals

    rng = np.random.default_rng(11)
    spread = np.array([1.0, 5.0, 0.1]).reshape(1, 3, 1, 1)
    batches = [(rng.standard_normal((2, 3, 4, 5)) * spread).astype(np.float32)]
    batches.append((rng.standard_normal((2, 3, 4, 5)) - 3).astype(np.float32))
    int8 = [(b + rng.normal(0, 0.01, b.shape)).astype(np.float32) for b in batches]
    int8[1][1, 2, 0, 0] = np.nan
    kept = [a.copy() for a in batches + int8]
    totals = _Totals()
    for exact, received in zip(batches, int8, strict=True):
        totals.add(exact, received, axis=1)
    for array, copy in zip(batches + int8, kept, strict=True):
        np.testing.assert_array_equal(array, copy)
    exact = np.concatenate(batches).astype(np.float64)
    error = np.concatenate(int8).astype(np.float64) - exact
    np.testing.assert_allclose(totals.signal, (exact**2).sum(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(totals.noise[:2], (error[:, :2] ** 2).sum(axis=(0, 2, 3)), rtol=1e-5)
    assert totals.noise[2] == np.inf
    np.testing.assert_array_equal(totals.channel_max, np.abs(exact).max(axis=(0, 2, 3)))
    assert totals.max_error == np.inf
    assert (totals.low, totals.high) == (exact.min(), exact.max())
    lower = int8[0].copy()
    lower[0, 0, 0, 0] = batches[0][0, 0, 0, 0] - 7.0  # the largest error, below the float
    below = _Totals()
    below.add(batches[0], lower, axis=1)
    assert below.max_error == pytest.approx(7.0, rel=1e-6)


def test_a_layer_output_nothing_uses_is_not_ranked(tmp_path):
    """A layer with two outputs of which the model uses one (an FFT's real half, its
    imaginary half dropped, as KerasHub's FNet does): the dropped value is in the
    layer map but feeds nothing, and its rounding cannot matter. The report ranks
    only the values the int8 model uses; it used to name the dropped half worst."""
    rng = np.random.default_rng(0)
    inputs = keras.Input((8, 8), name="x")
    hidden = L.Dense(8, name="dense")(inputs)
    hidden = BatchNormalization(name="bn")(hidden)
    real, imaginary = keras.ops.fft2((hidden, keras.ops.zeros_like(hidden)))
    model = keras.Model(inputs, L.Dense(4, name="head")(real))
    bn = model.get_layer("bn")
    bn.moving_mean.assign(rng.normal(size=8).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=8).astype("float32"))
    float_path, int8_path = tmp_path / "f.onnx", tmp_path / "q.onnx"
    export_onnx(model, float_path, fold=True)
    feed = {"x": rng.normal(size=(64, 8, 8)).astype("float32")}
    report = quantize_int8(float_path, int8_path, feed)
    float_model = onnx.load(str(float_path))
    layer_map = decode_layer_map({p.key: p.value for p in float_model.metadata_props})
    fft = next(key for key in layer_map if "fft2" in key)
    dropped = layer_map[fft][1][0]  # the imaginary half's ONNX value
    read = {name for node in float_model.graph.node for name in node.input}
    assert dropped not in read and dropped not in {o.name for o in float_model.graph.output}
    compared = [layer.layer for layer in report.divergence.layers]
    assert f"{fft}:0" in compared and f"{fft}:1" not in compared, compared


def test_max_error_is_relative_to_the_range_or_to_a_constant_values_magnitude():
    """ "max |error| X% of its range": the largest error over ``high - low``. A value
    that is constant on the samples (a softmax of equal scores, 0.01 everywhere,
    written as 3/255 = 0.0118) has a range of 0, and the report said 0.0%; it is
    18% of the value's magnitude."""
    from keras_bn.converters.divergence import _Totals

    rng = np.random.default_rng(12)
    exact = rng.normal(size=(2, 3, 4)).astype(np.float32)
    received = exact + np.float32(0.05)
    totals = _Totals()
    totals.add(exact, received, axis=1)
    expected = np.abs(received.astype(np.float64) - exact).max() / (exact.max() - exact.min())
    assert totals.relative_error() == pytest.approx(expected, rel=1e-5)
    uniform = np.full((2, 100), 0.01, np.float32)
    totals = _Totals()
    totals.add(uniform, np.full_like(uniform, 3 / 255), axis=1)
    assert totals.relative_error() == pytest.approx((3 / 255 - 0.01) / 0.01, rel=1e-4)
    zeros = np.zeros((2, 4), np.float32)
    totals = _Totals()
    totals.add(zeros, zeros + np.float32(1e-3), axis=1)
    assert totals.relative_error() == np.inf
    assert _Totals().relative_error() == 0.0

"""The stale-statistics check's single compiled pass (``keras_bn.recalibration.BatchNormInputs``).

Every BN layer's input moments, taken in one compiled inference pass, must equal
the float64 mean and variance of that input computed independently (a Keras
sub-model ending at the layer's input, over the concatenated data), for a shared
layer (two calls), a masked one, and unequal batches; and ``export
--no-statistics-check`` must skip the check and say so.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from keras_bn.converters import cli
from keras_bn.layers import BatchNormalization
from keras_bn.recalibration import BatchNormInputs


def _randomize(model) -> None:
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(2.0, 1.0, channels))
            layer.moving_variance.assign(10.0 ** rng.uniform(-2, 2, channels))
            layer.gamma.assign(rng.uniform(0.5, 2.0, channels))


def _image_model():
    inputs = keras.Input((6, 6, 2), name="image")
    shared = BatchNormalization(name="shared")
    a = shared(keras.layers.Conv2D(3, 3, padding="same", name="conv_a")(inputs))
    b = shared(keras.layers.Conv2D(3, 3, padding="same", name="conv_b")(inputs))
    h = keras.layers.Add()([a, b])
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(4, 3, name="conv_c")(h)
    h = keras.layers.BatchNormalization(name="stock")(h)
    outputs = keras.layers.Dense(3, name="probs")(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inputs, outputs)
    _randomize(model)
    return model


def test_one_pass_moments_equal_the_float64_statistics_of_each_input():
    model = _image_model()
    x = np.random.default_rng(0).normal(3.0, 2.0, (23, 6, 6, 2)).astype("float32")
    batches = [x[:10], x[10:20], x[20:]]  # an unequal last batch
    outputs = []
    moments = BatchNormInputs(model).measure(batches, on_outputs=outputs.append)

    conv_a, conv_b, conv_c = (model.get_layer(n).output for n in ("conv_a", "conv_b", "conv_c"))
    features = keras.Model(model.inputs, [conv_a, conv_b, conv_c]).predict(x, verbose=0)
    a, b, c = (np.asarray(f, np.float64).reshape(-1, f.shape[-1]) for f in features)
    for name, values in (("shared", np.concatenate([a, b])), ("stock", c)):
        measured = moments[id(model.get_layer(name))]
        np.testing.assert_array_equal(measured.count, len(values))
        np.testing.assert_allclose(measured.mean, values.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(measured.variance(), values.var(0), rtol=1e-5)
    np.testing.assert_allclose(
        np.concatenate([o[0] for o in outputs]),
        model.predict(x, verbose=0),
        rtol=1e-5,
        atol=1e-5,
    )


def test_one_pass_moments_skip_masked_positions():
    tokens = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(7, 4, mask_zero=True, name="embed")(tokens)
    h = BatchNormalization(name="bn")(h)
    model = keras.Model(tokens, keras.layers.GlobalAveragePooling1D()(h))
    x = np.random.default_rng(2).integers(0, 7, (9, 5)).astype("int32")
    x[:, -2:] = 0  # padded tail
    moments = BatchNormInputs(model).measure([x[:4], x[4:]])[id(model.get_layer("bn"))]
    embedded = np.asarray(model.get_layer("embed").embeddings.numpy(), np.float64)[x]
    kept = embedded[x != 0]
    np.testing.assert_array_equal(moments.count, len(kept))
    np.testing.assert_allclose(moments.mean, kept.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(moments.variance(), kept.var(0), rtol=1e-5)


def test_one_pass_moments_stay_exact_when_the_mean_dwarfs_the_spread():
    """Reduced in float32 inside the compiled pass, the moments still match a float64
    NumPy computation within float32 noise where E[x^2] - E[x]^2 would cancel: an
    input whose mean is 1000 standard deviations away from 0, over many batches."""
    inputs = keras.Input((4, 3), name="x")
    model = keras.Model(inputs, BatchNormalization(name="bn")(inputs))
    rng = np.random.default_rng(5)
    x = (1000.0 + rng.normal(0.0, 1.0, (70, 4, 3)) * [1.0, 0.1, 3.0]).astype("float32")
    measured = BatchNormInputs(model).measure([x[i : i + 16] for i in range(0, 70, 16)])
    values = x.astype(np.float64).reshape(-1, 3)
    moments = measured[id(model.get_layer("bn"))]
    np.testing.assert_array_equal(moments.count, len(values))
    np.testing.assert_allclose(moments.mean, values.mean(0), rtol=1e-7)
    np.testing.assert_allclose(moments.variance(), values.var(0), rtol=1e-4)
    naive = np.mean(np.square(x), axis=(0, 1)) - np.square(np.mean(x, axis=(0, 1)))
    assert np.max(np.abs(naive / values.var(0) - 1)) > 1e-2  # the cancellation avoided


def test_one_pass_moments_take_an_empty_batch_as_no_values():
    """A batch of no samples has no first value to shift the sums by: it adds nothing,
    and the moments are those of the other batches (float64 NumPy)."""
    inputs = keras.Input((4, 3), name="x")
    model = keras.Model(inputs, BatchNormalization(name="bn")(inputs))
    x = np.random.default_rng(8).normal(5.0, 2.0, (9, 4, 3)).astype("float32")
    measured = BatchNormInputs(model).measure([x[:0], x[:5], x[5:]])
    moments = measured[id(model.get_layer("bn"))]
    values = x.astype(np.float64).reshape(-1, 3)
    np.testing.assert_array_equal(moments.count, len(values))
    np.testing.assert_allclose(moments.mean, values.mean(0), rtol=1e-6)
    np.testing.assert_allclose(moments.variance(), values.var(0), rtol=1e-5)


def test_one_pass_moments_of_a_float64_model_are_float64():
    """A float64 model's inputs are reduced in float64: agreement far below float32's."""
    inputs = keras.Input((5,), dtype="float64")
    layer = BatchNormalization(name="bn", dtype="float64")
    model = keras.Model(inputs, layer(keras.layers.Dense(2, dtype="float64")(inputs)))
    # float32-representable inputs: Keras's predict may hand them over as float32.
    if keras.ops.convert_to_numpy(layer.moving_mean).dtype != np.float64:
        pytest.skip("this backend runs float64 models in float32 (JAX without x64)")
    x = np.random.default_rng(6).normal(7.0, 0.01, (33, 5)).astype("float32").astype("float64")
    moments = BatchNormInputs(model).measure([x[:20], x[20:]])[id(layer)]
    kernel, bias = (np.asarray(w, np.float64) for w in model.layers[1].get_weights())
    values = x @ kernel + bias
    np.testing.assert_allclose(moments.mean, values.mean(0), rtol=1e-12)
    np.testing.assert_allclose(moments.variance(), values.var(0), rtol=1e-9)


@pytest.mark.parametrize("skip", [False, True], ids=["checked", "no-statistics-check"])
def test_export_no_statistics_check_skips_the_check(tmp_path, capsys, skip):
    model = _image_model()  # randomized moving statistics: stale for any data
    model.save(tmp_path / "model.keras")
    x = np.random.default_rng(3).normal(size=(8, 6, 6, 2)).astype("float32")
    np.savez(tmp_path / "inputs.npz", image=x)
    args = ["export", tmp_path / "model.keras", "-o", tmp_path / "model.onnx"]
    args += ["--inputs", tmp_path / "inputs.npz", "--json"]
    code = cli.main([str(a) for a in args] + (["--no-statistics-check"] if skip else []))
    captured = capsys.readouterr()
    statistics = json.loads(captured.out)["statistics"]
    assert code == 0
    if skip:
        assert statistics == {"checked": False, "skipped": True}
        assert "stale" not in captured.err
    else:
        assert statistics["checked"] and statistics["stale"] == ["shared", "stock"]
        assert "stale moving statistics" in captured.err


@pytest.mark.parametrize("separate_data", [False, True], ids=["same-samples", "other-data"])
def test_export_takes_its_reference_from_the_check_on_the_same_samples(
    tmp_path, capsys, monkeypatch, separate_data
):
    """The check's first pass is Keras's run of --inputs: no second reference pass
    unless --data names other samples; validation still passes against it."""
    from keras_bn.converters.cli import steps

    model = _image_model()
    model.save(tmp_path / "model.keras")
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "inputs.npz", image=rng.normal(size=(8, 6, 6, 2)).astype("float32"))
    np.savez(tmp_path / "data.npz", image=rng.normal(size=(5, 6, 6, 2)).astype("float32"))
    started = []
    original = steps.keras_reference
    monkeypatch.setattr(
        steps, "keras_reference", lambda *a, **k: started.append(1) or original(*a, **k)
    )
    args = ["export", tmp_path / "model.keras", "-o", tmp_path / "model.onnx"]
    args += ["--inputs", tmp_path / "inputs.npz", "--json"]
    args += ["--data", tmp_path / "data.npz"] if separate_data else []
    code = cli.main([str(a) for a in args])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["statistics"]["checked"]
    assert report["validation"]["passed"]
    assert started == ([1] if separate_data else [])


def test_output_effects_run_on_the_first_effect_samples_the_verdicts_on_all(tmp_path):
    """The second pass (population statistics) runs on the first ``EFFECT_SAMPLES``
    samples only, in the CLI's batches; its agreement equals the one of the model
    with each BN's input statistics (a float64 sub-model computation over *every*
    sample) written, on those samples; the first pass still covers every sample."""
    from keras_bn.converters.data_sources import open_data
    from keras_bn.converters.statistics_check import EFFECT_SAMPLES, check_statistics

    model = _image_model()
    x = np.random.default_rng(7).normal(1.0, 2.0, (EFFECT_SAMPLES * 2 + 5, 6, 6, 2))
    np.savez(tmp_path / "data.npz", image=x.astype("float32"))
    x = x.astype("float32")
    source = open_data(
        str(tmp_path / "data.npz"), [("image", (None, 6, 6, 2))], batch_size=EFFECT_SAMPLES
    )
    moving = model.predict(x, verbose=0)
    check = check_statistics(model, source)
    (effect,) = check.outputs
    assert effect.kind == "top-1 agreement" and effect.samples == EFFECT_SAMPLES
    assert f"of {EFFECT_SAMPLES} sample(s)" in str(check)
    np.testing.assert_allclose(check.moving_outputs[0], moving, rtol=1e-5, atol=1e-5)

    names = ("conv_a", "conv_b", "conv_c")
    features = keras.Model(model.inputs, [model.get_layer(n).output for n in names])
    a, b, c = (
        np.asarray(f, np.float64).reshape(-1, f.shape[-1]) for f in features.predict(x, verbose=0)
    )
    for name, values in (("shared", np.concatenate([a, b])), ("stock", c)):
        layer = model.get_layer(name)
        layer.moving_mean.assign(values.mean(0))
        layer.moving_variance.assign(values.var(0))
    population = model.predict(x[:EFFECT_SAMPLES], verbose=0)
    agree = np.mean(population.argmax(-1) == moving[:EFFECT_SAMPLES].argmax(-1))
    assert effect.value == pytest.approx(agree)


def test_only_class_scores_get_a_top_1_line(tmp_path):
    """A sequence model with a logits head and a GRU's state as outputs: both are
    (batch, n), and the state's effect line said 'the same top-1 class', which means
    nothing for a state. Only the head, a Dense, is judged by top-1 agreement now; the
    state by its relative change, which equals NumPy's on the two runs' outputs."""
    from keras_bn.converters.data_sources import open_data
    from keras_bn.converters.statistics_check import check_statistics

    L = keras.layers
    inputs = keras.Input((5, 3), name="sequence")
    x = L.BatchNormalization(name="bn")(inputs)
    state = L.GRU(4, name="gru")(x)
    model = keras.Model(inputs, [L.Dense(3, name="head")(state), state])
    x = np.random.default_rng(3).normal(2.0, 3.0, (16, 5, 3)).astype("float32")
    np.savez(tmp_path / "data.npz", sequence=x)
    source = open_data(str(tmp_path / "data.npz"), [("sequence", (None, 5, 3))], batch_size=16)
    moving = [np.asarray(o, np.float64) for o in model.predict(x, verbose=0)]
    check = check_statistics(model, source)
    head, gru = check.outputs
    assert (head.kind, gru.kind) == ("top-1 agreement", "relative change")
    bn = model.get_layer("bn")
    values = x.reshape(-1, 3).astype(np.float64)
    bn.moving_mean.assign(values.mean(0))
    bn.moving_variance.assign(values.var(0))
    population = [np.asarray(o, np.float64) for o in model.predict(x, verbose=0)]
    change = np.abs(moving[1] - population[1]).max() / np.abs(population[1]).max()
    assert gru.value == pytest.approx(change, rel=1e-3)
    assert "top-1" not in gru.describe("moving statistics", "population statistics")

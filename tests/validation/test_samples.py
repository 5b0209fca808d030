"""Generated inputs in the model's domain: what the model says about its input."""

import keras
import numpy as np
import pytest
from support.models import calibrate_batch_norms

from keras_bn.converters import samples
from keras_bn.converters.graph import flatten
from keras_bn.converters.samples import (
    FLOAT_DOMAINS,
    call_model,
    describe_generated_inputs,
    input_domains,
    make_sample_inputs,
    validation_samples,
)

L = keras.layers


def _conv_bn(preprocessing=None, size=16):
    inputs = keras.Input((size, size, 3), name="image")
    x = preprocessing(inputs) if preprocessing is not None else inputs
    x = L.Conv2D(8, 3, use_bias=False)(x)
    x = L.BatchNormalization()(x)
    outputs = L.GlobalAveragePooling2D()(L.ReLU()(x))
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize(
    "trained_on, low, high",
    [
        ("uniform 0..255 (pixels)", 0.0, 255.0),
        ("uniform -1..1", -1.0, 1.0),
        ("standard normal", None, None),
    ],
    ids=["pixels", "minus-one-to-one", "normal"],
)
@pytest.mark.parametrize("size", [16, 72], ids=["four-probe-samples", "one-probe-sample"])
def test_first_batch_norm_statistics_reveal_the_training_range(trained_on, low, high, size):
    # At 72x72 one sample gives the first BN 4,900 values per channel: the probe
    # runs one sample per domain; at 16x16, four.
    model = _conv_bn(size=size)
    data = FLOAT_DOMAINS[trained_on](np.random.default_rng(5), (32, size, size, 3))
    calibrate_batch_norms(model, data.astype("float32"), variance_decades=0.05)
    assert input_domains(flatten(model)) == {"image": trained_on}
    x = make_sample_inputs(model, 8, seed=1)["image"]
    if low is not None:
        assert low <= x.min() and x.max() <= high and x.max() - x.min() > 0.5 * (high - low)


def test_untrained_statistics_give_standard_normal():
    model = _conv_bn()  # moving mean 0, variance 1: nothing learnt
    assert input_domains(flatten(model)) == {"image": "standard normal"}


def test_a_rescaling_layer_means_pixels_whatever_the_statistics():
    model = _conv_bn(L.Rescaling(1 / 255.0))
    assert input_domains(flatten(model)) == {"image": "uniform 0..255 (pixels)"}


def test_generated_inputs_are_seeded():
    model = _conv_bn()
    calibrate_batch_norms(model, np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)))
    first, again = make_sample_inputs(model, 4, seed=3), make_sample_inputs(model, 4, seed=3)
    np.testing.assert_array_equal(first["image"], again["image"])


def test_a_normalization_layer_gives_its_own_mean_and_variance():
    inputs = keras.Input((5,), name="features")
    normalization = L.Normalization(mean=[10.0, -3.0, 0.0, 100.0, 1.0], variance=[4, 1, 9, 25, 1])
    model = keras.Model(inputs, L.Dense(2)(normalization(inputs)))
    assert input_domains(flatten(model))["features"].startswith("normal with the leading")
    x = make_sample_inputs(model, 4000, seed=0)["features"]
    np.testing.assert_allclose(x.mean(axis=0), [10, -3, 0, 100, 1], atol=0.3)
    np.testing.assert_allclose(x.std(axis=0), [2, 1, 3, 5, 1], rtol=0.05)


@pytest.mark.parametrize(
    "scale, offset, domain, high",
    [
        (1 / 16, 0.0, "uniform 0..16", 16.0),
        (1 / 255, 0.0, "uniform 0..255 (pixels)", 255.0),
        (1 / 127.5, -1.0, "uniform 0..255 (pixels)", 255.0),
    ],
    ids=["one-sixteenth", "one-255th", "minus-one-to-one"],
)
def test_a_rescaling_layer_gives_the_range_it_maps_onto_the_unit_interval(
    scale, offset, domain, high
):
    model = _conv_bn(L.Rescaling(scale, offset))
    assert input_domains(flatten(model)) == {"image": domain}
    x = make_sample_inputs(model, 16, seed=0)["image"]
    assert 0 <= x.min() and x.max() <= high and x.max() > 0.9 * high
    # What the Rescaling makes of them: [0, 1], or [-1, 1] with offset -1.
    rescaled = x * scale + offset
    assert rescaled.min() >= min(offset, 0) - 1e-6 and rescaled.max() <= 1 + 1e-6
    assert "Rescaling(scale=" in describe_generated_inputs(model, 16)


def test_a_growing_rescaling_says_nothing_about_the_range():
    model = _conv_bn(L.Rescaling(2.0))  # untrained statistics: nothing else to go by
    assert input_domains(flatten(model)) == {"image": "standard normal"}


def test_generated_inputs_are_described_per_input():
    ids = keras.Input((4,), dtype="int32", name="ids")
    flags = keras.Input((3,), dtype="int32", name="flags")
    table = keras.Input((2,), name="table")
    x = L.Flatten()(L.Embedding(50, 2)(ids))
    model = keras.Model([ids, flags, table], L.Concatenate()([x, L.Dense(2)(flags), table]))
    text = describe_generated_inputs(model, 16)
    assert text.startswith("generated, 16 sample(s): ")
    assert "ids: integers 0..49 (the Embedding's vocabulary)" in text
    assert "flags: integers 0..9 (no Embedding gives a range)" in text
    assert "table: standard normal (nothing in the model gives its range" in text
    x = make_sample_inputs(model, 400, seed=0)
    assert x["ids"].max() == 49 and x["flags"].max() == 9


def test_padding_masks_are_generated_as_a_tokenizer_pads():
    """An integer or boolean (batch, length) input named ...mask is 1s then 0s with
    lengths that vary (at least one position kept, the first sample unpadded), not
    integers 0..9 or coin flips; a mask of another rank keeps the generic values."""
    ids = keras.Input((8,), dtype="int32", name="token_ids")
    padding = keras.Input((8,), dtype="int32", name="padding_mask")
    attention = keras.Input((8,), dtype="bool", name="attention_mask")
    grid = keras.Input((2, 3), dtype="int32", name="grid_mask")
    x = L.Flatten()(L.Embedding(20, 2)(ids))
    masks = [L.Flatten()(keras.ops.cast(m, "float32")) for m in (padding, attention, grid)]
    model = keras.Model([ids, padding, attention, grid], L.Concatenate()([x, *masks]))
    x = make_sample_inputs(model, 64, seed=3)
    for name in ("padding_mask", "attention_mask"):
        mask = x[name].astype(int)
        lengths = mask.sum(axis=1)
        expected = (np.arange(8)[None, :] < lengths[:, None]).astype(int)
        np.testing.assert_array_equal(mask, expected)  # 1s, then 0s to the end
        assert lengths.min() >= 1 and lengths[0] == 8 and len(set(lengths)) > 4
    assert x["padding_mask"].dtype == np.int32 and x["attention_mask"].dtype == bool
    assert x["grid_mask"].max() == 9  # not a (batch, length) mask
    text = describe_generated_inputs(model, 64)
    assert "padding_mask: 1s then 0s (a padding mask" in text
    assert "attention_mask: 1s then 0s" in text and "grid_mask: integers 0..9" in text


def test_a_call_compiled_ahead_runs_the_model_on_jax(run_python):
    """prepare_call compiles the JAX pass for the sample inputs' shapes before the
    inputs exist; call_model then runs that program (no second compile) and gives
    Keras's outputs."""
    code = """
import numpy as np, keras
from keras_bn.converters import samples
from keras_bn.converters.prepared import prepare
x = keras.Input((8, 8, 3), name="image")
h = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(x))
model = keras.Model(x, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h)))
prepared = prepare(model)
samples.prepare_call(prepared, 2)
forward = samples._compiled_forward(model)
assert len(forward._executables) == 1
images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
ours = samples.call_model(prepared, {"image": images})[0]
assert len(forward._executables) == 1, "compiled again"
expected = keras.ops.convert_to_numpy(model(images, training=False))
np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
samples.call_model(model, {"image": images[:1]})  # another shape: its own program
assert len(forward._executables) == 2
"""
    run_python(["-c", code], env={"KERAS_BACKEND": "jax"})


def test_call_model_takes_inputs_by_name_in_any_order():
    first, second = keras.Input((3,), name="first"), keras.Input((2,), name="second")
    model = keras.Model([first, second], [L.Concatenate()([first, second]), L.Dense(1)(second)])
    a, b = np.ones((2, 3), "float32"), np.full((2, 2), 2.0, "float32")
    concatenated, dense = call_model(model, {"second": b, "first": a})
    np.testing.assert_array_equal(concatenated, np.concatenate([a, b], axis=1))
    np.testing.assert_allclose(
        dense, keras.ops.convert_to_numpy(model([a, b], training=False)[1]), rtol=1e-6
    )


@pytest.mark.parametrize(
    "shapes, expected",
    [
        ([(8, 8, 1)], 16),  # 64 values: the cap
        ([(64, 64, 3)], 16),  # 12,288: 22 would be needed, the cap again
        ([(128, 128, 3)], 6),  # 49,152 x 6 = 294,912 >= 2**18 > 49,152 x 5
        ([(224, 224, 3)], 2),  # 150,528: one would do, the floor is two
        ([(512, 512, 3)], 2),
        ([(None, 100)], 16),  # an unknown size is generated as 32: 3,200 values
        ([(128, 128, 3), (128, 128, 3)], 3),  # two inputs: their values add up
    ],
)
def test_validation_samples_hold_enough_values_within_bounds(shapes, expected):
    inputs = [keras.Input(shape) for shape in shapes]
    flat = [L.Flatten()(L.GlobalAveragePooling1D()(x) if x.shape[1] is None else x) for x in inputs]
    model = keras.Model(inputs, L.Dense(1)(flat[0] if len(flat) == 1 else L.Concatenate()(flat)))
    count = validation_samples(model)
    assert count == expected
    # The rule itself: the fewest samples that hold VALIDATION_VALUES, within bounds.
    per_sample = sum(int(np.prod([32 if d is None else d for d in shape])) for shape in shapes)
    needed = next(n for n in range(1, 10**6) if n * per_sample >= samples.VALIDATION_VALUES)
    assert count == min(max(needed, samples.MIN_VALIDATION_SAMPLES), samples.VALIDATION_SAMPLES)
    text = describe_generated_inputs(model, count)
    assert text.startswith(f"generated, {count} sample(s)")
    # Fewer than the cap is said, with the values that made it and how to get more.
    fewer = f"(not {samples.VALIDATION_SAMPLES}: {per_sample:,} values each; --samples N"
    assert (fewer in text) == (count < samples.VALIDATION_SAMPLES)

"""The float64 twin: the same model computed in float64, checked against NumPy."""

import keras
import numpy as np
import pytest

from keras_bn.converters.reference import float64_twin, keras_run

L = keras.layers


def _dense_bn_model():
    inputs = keras.Input((5,))
    x = L.Dense(4, name="dense")(inputs)
    x = L.BatchNormalization(name="bn", epsilon=1e-3)(x)
    outputs = L.Activation("tanh")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    bn = model.get_layer("bn")
    bn.moving_mean.assign(rng.normal(0.0, 2.0, 4))
    bn.moving_variance.assign(10.0 ** rng.uniform(-3, 1, 4))
    bn.gamma.assign(rng.uniform(0.3, 2.0, 4))
    bn.beta.assign(rng.normal(0.0, 1.0, 4))
    return model


def _numpy_float64(model, x):
    dense, bn = model.get_layer("dense"), model.get_layer("bn")
    kernel, bias = (np.asarray(w, np.float64) for w in dense.get_weights())
    gamma, beta, mean, variance = (
        np.asarray(keras.ops.convert_to_numpy(v), np.float64)
        for v in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)
    )
    y = x.astype(np.float64) @ kernel + bias
    return np.tanh((y - mean) / np.sqrt(variance + bn.epsilon) * gamma + beta)


def test_twin_matches_numpy_float64_and_beats_float32():
    model = _dense_bn_model()
    x = np.random.default_rng(1).normal(0.0, 3.0, (64, 5)).astype("float32")
    twin = float64_twin(model, [x])
    exact = _numpy_float64(model, x)
    (got,) = twin([x])
    assert twin.exact and got.dtype == np.float64
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-12)
    float32_error = np.abs(np.asarray(model(x, training=False), np.float64) - exact).max()
    assert float32_error > 1e3 * np.abs(got - exact).max()  # float32 noise, far above the twin's


def test_the_check_run_is_reused_and_other_arrays_are_computed():
    model = _dense_bn_model()
    x = np.random.default_rng(2).normal(0.0, 3.0, (8, 5)).astype("float32")
    twin = float64_twin(model, [x])
    (checked,) = twin([x])  # the check run's outputs, not a second run
    assert twin.checked is not None and twin.checked[1][0] is checked
    np.testing.assert_allclose(checked, _numpy_float64(model, x), rtol=0, atol=1e-12)
    other = x[:3] * 0.5  # new arrays: computed, not the check run's
    (got,) = twin([other])
    np.testing.assert_allclose(got, _numpy_float64(model, other), rtol=0, atol=1e-12)


def test_twin_leaves_the_model_untouched():
    model = _dense_bn_model()
    before = [np.array(w) for w in model.get_weights()]
    x = np.ones((2, 5), "float32")
    float64_twin(model, [x])
    assert all(str(w.dtype) == "float32" for w in model.weights)
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


def test_nested_models_and_integer_inputs():
    inner = keras.Sequential(
        [keras.Input((3, 4)), L.Dense(2), L.BatchNormalization()], name="inner"
    )
    tokens = keras.Input((3,), dtype="int32")
    x = L.Embedding(10, 4)(tokens)
    outputs = L.Flatten()(inner(x))
    model = keras.Model(tokens, outputs)
    ids = np.random.default_rng(0).integers(0, 10, (4, 3)).astype("int32")
    twin = float64_twin(model, [ids])
    (got,) = twin([ids])
    want = np.asarray(model(ids, training=False), np.float64)
    assert twin.exact
    assert np.abs(got - want).max() <= 1e-6 * max(1.0, np.abs(want).max())


def test_a_model_called_with_a_dict_of_inputs_gets_its_twins():
    """KerasHub's text backbones and SAM take a dict of inputs: the float64 twin (the
    exact answer) and the float16 one (float16's yardstick) are called with the same
    dict, inputs given in ``model.inputs``' order (the dict's keys sorted)."""
    points = keras.Input((5,), name="points")
    image = keras.Input((5,), name="image")
    hidden = L.Dense(4, name="dense")(image)
    outputs = L.Activation("tanh")(hidden * L.Dense(4, name="gate")(points))
    model = keras.Model({"points": points, "image": image}, outputs)  # not sorted
    rng = np.random.default_rng(3)
    arrays = {"image": rng.normal(size=(6, 5)), "points": rng.normal(size=(6, 5))}
    arrays = {name: value.astype("float32") for name, value in arrays.items()}
    flat = [arrays[tensor.name] for tensor in model.inputs]
    (kernel, bias), (gate, gate_bias) = (
        [np.asarray(w, np.float64) for w in model.get_layer(name).get_weights()]
        for name in ("dense", "gate")
    )
    exact = np.tanh(
        (arrays["image"].astype(np.float64) @ kernel + bias)
        * (arrays["points"].astype(np.float64) @ gate + gate_bias)
    )
    (got,) = float64_twin(model, flat)(flat)
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-12)
    (half,) = float64_twin(model, flat, dtype="float16")(flat)
    error = np.abs(half - exact).max()
    assert 0 < error <= 8 * 2.0**-11 * np.abs(exact).max()  # float16 rounding, not float32


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="a TensorFlow CPU kernel gap")
def test_layers_without_float64_kernels_stay_float32_and_are_named():
    # TensorFlow's CPU MaxPool3D has no float64 kernel.
    model = keras.Sequential(
        [keras.Input((4, 4, 4, 2)), L.Conv3D(3, 1), L.MaxPooling3D(), L.Flatten(), L.Dense(2)]
    )
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 4, 2)).astype("float32")
    twin = float64_twin(model, [x])
    assert twin.float32_classes == ("MaxPooling3D",) and not twin.exact
    (got,) = twin([x])
    want = np.asarray(model(x, training=False), np.float64)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_twin_is_float64_on_jax(run_python):
    """JAX computes float64 arrays in float32 unless its x64 mode is on: the twin must
    switch it on for itself (and leave the process's default 32-bit types alone)."""
    code = """
import sys
sys.path.insert(0, "tests/validation")
import jax.numpy as jnp
import keras
import numpy as np
import test_reference as t
from keras_bn.converters.reference import float64_enabled

model = t._dense_bn_model()
x = np.random.default_rng(1).normal(0.0, 3.0, (64, 5)).astype("float32")
exact = t._numpy_float64(model, x)
twin = t.float64_twin(model, [x])
(y,) = twin([x])
assert y.dtype == np.float64, y.dtype
assert np.abs(y - exact).max() < 1e-12, np.abs(y - exact).max()
assert jnp.ones(2, dtype="float64").dtype == jnp.float32  # x64 mode switched off again
# ops.slice with an int32 start beside Python ints (int64 in x64 mode), as D-FINE slices
with float64_enabled():
    matrix = np.arange(12.0).reshape(3, 4)
    part = keras.ops.slice(matrix, (0, keras.ops.convert_to_tensor(1, "int32")), (3, 2))
    assert part.dtype == jnp.float64, part.dtype
np.testing.assert_array_equal(np.asarray(part), matrix[:, 1:3])
print("ok")
"""
    result = run_python(["-c", code], env={"KERAS_BACKEND": "jax"})
    assert result.stdout.strip().endswith("ok")


def test_twins_built_in_two_threads_leave_keras_unpatched():
    """A float16 twin built beside the conversion and the float64 one validation builds
    may overlap: afterwards Keras builds layers as before (a twin's build patches Keras
    to skip initializers; two overlapping builds used to leave that patch installed, and
    every later layer started with zero weights)."""
    import threading

    model = _dense_bn_model()
    x = np.random.default_rng(4).normal(size=(8, 5)).astype("float32")
    errors: list[BaseException] = []

    def build(dtype: str) -> None:
        try:
            for _ in range(3):
                float64_twin(model, [x], dtype=dtype)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=build, args=(d,)) for d in ("float16", "float64") * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    fresh = keras.Sequential([keras.Input((4,)), L.Dense(3)])
    assert np.any(np.asarray(keras.ops.convert_to_numpy(fresh.layers[0].kernel)) != 0)


@keras.saving.register_keras_serializable("test_reference")
class _TableScale(L.Layer):
    """Written the way users write layers: a NumPy argument and no get_config, so
    Keras cannot rebuild it from a config (no copy of a model holding it)."""

    def __init__(self, table, **kwargs):
        super().__init__(**kwargs)
        self.table = np.asarray(table, np.float32)

    def call(self, x):
        return x * keras.ops.convert_to_tensor(self.table, dtype=self.compute_dtype)


def test_a_model_no_copy_can_be_made_of_runs_switched_to_float64():
    """Where no float64 copy can be made (KerasHub's Llama decoder's get_config
    raises), the twin is the model itself, its layers switched to float64 for each
    run: float64 arithmetic (NumPy's), under mixed_float16 too, and the model as it
    was after each run."""
    table = np.array([0.5, -2.0, 3.0, 1.5], np.float32)
    inputs = keras.Input((5,))
    x = L.Dense(4, name="dense", dtype="mixed_float16")(inputs)
    x = L.BatchNormalization(name="bn", epsilon=1e-3, dtype="mixed_float16")(x)
    x = L.Activation("tanh", dtype="mixed_float16")(x)
    model = keras.Model(inputs, _TableScale(table, dtype="mixed_float16")(x))
    reference = _dense_bn_model()  # the same Dense and BN weights, in NumPy below
    model.set_weights(reference.get_weights())
    x = np.random.default_rng(5).normal(0.0, 3.0, (16, 5)).astype("float32")
    before = np.asarray(model(x, training=False))
    with pytest.raises(Exception):  # noqa: B017  (whichever Keras raises: no copy)
        keras.models.clone_model(model)
    twin = float64_twin(model, [x])
    (got,) = twin([x * 0.5])
    assert twin.switched and twin.exact and twin.model is model and got.dtype == np.float64
    exact = _numpy_float64(reference, x * 0.5) * table
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-12)
    half = np.asarray(model(x * 0.5, training=False), np.float64)  # float16 arithmetic
    assert np.abs(half - exact).max() > 1e6 * np.abs(got - exact).max()
    assert {layer.dtype_policy.name for layer in model.layers[1:]} == {"mixed_float16"}
    np.testing.assert_array_equal(np.asarray(model(x, training=False)), before)
    # The float16 twin, the same way: Keras's float16 arithmetic, the model's own here.
    (half_twin,) = float64_twin(model, [x], dtype="float16")([x * 0.5])
    assert float64_twin(model, [x], dtype="float16").switched
    np.testing.assert_array_equal(half_twin, half)


@pytest.mark.parametrize(
    "policy, named",
    [("float32", "float32"), ("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")],
)
def test_reports_name_the_precision_keras_computes_in(policy, named):
    """Keras's own error, against which a float32 export's is set, is float16's for a
    mixed_float16 model: the reports say "Keras float16" there, "Keras float32" else."""
    inputs = keras.Input((5,))
    model = keras.Model(inputs, L.Dense(3, dtype=policy)(L.Dense(4)(inputs)))
    assert keras_run(model) == f"Keras {named}"


def test_one_sample_is_judged_against_keras_noise_on_every_sample_of_its_output():
    """Validation compares batch 1 (the first sample) and batch 16. On one sample of a
    mixed_float16 model's few outputs, Keras float16's own error can be a lucky
    near-zero (TensorFlow's float16 convolutions failed a third of correct exports so);
    the yardstick for that sample is Keras's error over the sixteen, which hold it."""
    from keras_bn.converters.comparison import compare_arrays, relative_error
    from keras_bn.converters.reference import Doubtful, rejudge_against_float64

    reference = _dense_bn_model()
    inputs = keras.Input((5,))
    h = L.Dense(4, name="dense", dtype="mixed_float16")(inputs)
    h = L.BatchNormalization(name="bn", epsilon=1e-3, dtype="mixed_float16")(h)
    model = keras.Model(inputs, L.Activation("tanh", dtype="mixed_float16")(h))
    model.set_weights(reference.get_weights())
    x = np.random.default_rng(7).normal(0.0, 3.0, (64, 5)).astype("float32")
    exact_all = _numpy_float64(reference, x)
    keras_all = np.asarray(model(x, training=False), np.float64)
    errors = [relative_error(keras_all[i : i + 1], exact_all[i : i + 1]) for i in range(64)]
    order = np.argsort(errors)  # the luckiest sample first, then 15 others
    x = x[np.concatenate([order[:1], order[-15:]])]
    exact, keras_out = _numpy_float64(reference, x), np.asarray(model(x), np.float64)
    noise = relative_error(keras_out, exact)
    assert relative_error(keras_out[:1], exact[:1]) < noise / 10  # the lucky sample

    def judged(error):  # a candidate off by `error` of the range on every value
        candidate = exact + error * np.abs(exact).max() * np.sign(np.sin(np.arange(4) + 1))
        items = [Doubtful(0, 0, candidate[:1], keras_out[:1], 1, None)]
        items.append(Doubtful(1, 0, candidate, keras_out, 16, None))
        comparisons = [
            compare_arrays(candidate[:1], keras_out[:1], atol=0, rtol=0, batch_size=1),
            compare_arrays(candidate, keras_out, atol=0, rtol=0, batch_size=16),
        ]
        rejudge_against_float64(model, [x], comparisons, items)
        return comparisons

    one, sixteen = judged(2 * noise)  # float16 noise, a different rounding
    assert one.passed and sixteen.passed
    assert one.keras_exact_error == pytest.approx(noise, rel=1e-6)
    assert not any(c.passed for c in judged(8 * noise))  # a converter bug still fails


def test_a_small_samples_keras_noise_is_not_the_batchs_yardstick():
    """Keras's error on the first sample is relative to that sample's range. Where the
    sample's outputs are small next to the batch's (x + 1000 - 1000: float32 rounds
    every sample on the same grid of 6e-5), that relative error is many times Keras's
    error on the batch; the batch's comparison is judged against its own, so a candidate 100x
    Keras's error on the batch fails it."""
    from keras_bn.converters.comparison import compare_arrays, relative_error
    from keras_bn.converters.reference import Doubtful, rejudge_against_float64

    inputs = keras.Input((1,))
    up = L.Dense(1, kernel_initializer="ones", bias_initializer=keras.initializers.Constant(1e3))
    down = L.Dense(1, kernel_initializer="ones", bias_initializer=keras.initializers.Constant(-1e3))
    model = keras.Model(inputs, down(up(inputs)))
    x = np.random.default_rng(3).normal(0.0, 10.0, (16, 1)).astype("float32")
    x[0] = 2.9e-5  # a small output, under half of float32's step at 1000: Keras gives 0
    exact = x.astype(np.float64)  # the identity, exactly
    keras_out = np.asarray(model(x), np.float64)
    noise = relative_error(keras_out, exact)
    assert relative_error(keras_out[:1], exact[:1]) > 100 * noise > 0
    candidate = exact + 100 * noise * np.abs(exact).max()
    items = [
        Doubtful(0, 0, candidate[:1], keras_out[:1], 1, None),
        Doubtful(1, 0, candidate, keras_out, 16, None),
    ]
    comparisons = [
        compare_arrays(candidate[:1], keras_out[:1], atol=0, rtol=0, batch_size=1),
        compare_arrays(candidate, keras_out, atol=0, rtol=0, batch_size=16),
    ]
    rejudge_against_float64(model, [x], comparisons, items)
    assert comparisons[1].keras_exact_error == pytest.approx(noise, rel=1e-6)
    assert not comparisons[1].passed

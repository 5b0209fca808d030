"""keras_bn.BatchNormalization against the stock keras.layers.BatchNormalization.

The contract (README, "The layer"): everything the stock layer accepts gives the same
result. Each test here runs one scenario through both layers, starting from the same
weights, and compares outputs, every weight (moving statistics included), gradients
and regularization losses. Where ours deliberately differs, the test's docstring says
how and checks ours against a NumPy formula instead.

Backend-neutral; tests/layers/test_backends.py reruns this module under KERAS_BACKEND=jax.
The same comparisons over two replicas (`tf.distribute.MirroredStrategy`,
`synchronized=True`, masks) run in tests/layers/test_layers_distributed.py, whose subprocess
already pays for the logical-device setup.
"""

import keras
import numpy as np
import pytest
from support.models import randomize_weights, weights_by_name

from keras_bn.layers import BatchNormalization

BACKEND = keras.backend.backend()
Stock = keras.layers.BatchNormalization

# Float32 noise between two implementations of the same formula. Half precision:
# both layers compute in float32 and round to the same format, rarely to
# neighbouring values.
TOLERANCES = {
    None: {"rtol": 1e-5, "atol": 1e-5},
    "mixed_float16": {"rtol": 2e-3, "atol": 2e-2},
    "mixed_bfloat16": {"rtol": 2e-2, "atol": 1e-1},
    "bfloat16": {"rtol": 2e-2, "atol": 1e-1},
}


# Helpers ------------------------------------------------------------------------------


def numpy(tensor):
    return np.asarray(keras.ops.convert_to_numpy(tensor)).astype(np.float64)


def state(layer):
    return {name: numpy(weight) for name, weight in weights_by_name(layer).items()}


def random_inputs(rng, shape, axis):
    """Per-channel means in [-5, 5] and scales over two orders of magnitude."""
    axis = axis % len(shape)
    channel_shape = [shape[i] if i == axis else 1 for i in range(len(shape))]
    scale = 10.0 ** rng.uniform(-1, 1, channel_shape)
    offset = rng.uniform(-5, 5, channel_shape)
    return (rng.normal(size=shape) * scale + offset).astype("float32")


def copy_weights(source, target):
    """Same values by weight name (never by position), as copies (JAX's fit donates buffers)."""
    targets = weights_by_name(target)
    assert set(targets) == set(weights_by_name(source))
    for name, weight in weights_by_name(source).items():
        targets[name].assign(keras.ops.convert_to_numpy(weight))


def build_pair(shape, options, rng, randomized=True):
    stock, ours = Stock(**options), BatchNormalization(**options)
    stock.build(shape)
    ours.build(shape)
    if randomized:
        randomize_weights(stock, rng, variance_decades=1.0, stddev_decades=0.5)
    copy_weights(stock, ours)
    return stock, ours


def gradients(layer, x, mask, upstream):
    """d sum(outputs * upstream) / d(x, gamma, beta) of a training call, as NumPy."""
    names = [weight.name for weight in layer.trainable_weights]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, mask=mask)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
        values = tape.gradient(loss, [x, *layer.trainable_weights])
    elif BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [weight.value for weight in layer.trainable_variables]
        non_trainable = [weight.value for weight in layer.non_trainable_variables]

        def loss(x, trainable):
            y, _ = layer.stateless_call(trainable, non_trainable, x, training=True, mask=mask)
            return jnp.sum(y.astype("float32") * upstream)

        x_gradient, weight_gradients = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), trainable)
        values = [x_gradient, *weight_gradients]
    elif BACKEND == "torch":
        import torch

        x = torch.tensor(x, requires_grad=True)
        y = layer(x, training=True, mask=mask)
        loss = (y.float() * torch.as_tensor(upstream)).sum()
        variables = [weight.value for weight in layer.trainable_variables]
        values = torch.autograd.grad(loss, [x, *variables])
    else:
        raise AssertionError(f"no gradients on the {BACKEND} backend")
    return dict(zip(["inputs", *names], [numpy(value) for value in values], strict=True))


def assert_close(actual, expected, tolerance, what):
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(
        actual, expected, rtol=tolerance["rtol"], atol=tolerance["atol"] * scale, err_msg=what
    )


def assert_same_state(stock, ours, tolerance, what):
    expected = state(stock)
    actual = state(ours)
    assert set(actual) == set(expected), what
    for name, value in expected.items():
        assert_close(actual[name], value, tolerance, f"{what}: {name}")


def run_scenario(shape, options, mask_shape=None, randomized=True, seed=0, tolerance=None):
    """Training calls, inference calls and gradients through both layers, compared."""
    rng = np.random.default_rng(seed)
    axis = options.get("axis", -1)
    tolerance = tolerance or TOLERANCES[options.get("dtype")]
    stock, ours = build_pair(shape, options, rng, randomized)
    assert_same_state(stock, ours, {"rtol": 0, "atol": 0}, "built")
    for step, training in enumerate([True, True, False, None]):
        x = random_inputs(rng, shape, axis)
        mask = None if mask_shape is None else rng.random(mask_shape) < 0.7
        y_stock = numpy(stock(x, training=training, mask=mask))
        y_ours = numpy(ours(x, training=training, mask=mask))
        what = f"step {step} (training={training})"
        assert_close(y_ours, y_stock, tolerance, f"{what}: outputs")
        assert_same_state(stock, ours, tolerance, what)
        assert len(ours.losses) == len(stock.losses), what
        for ours_loss, stock_loss in zip(ours.losses, stock.losses, strict=True):
            assert_close(numpy(ours_loss), numpy(stock_loss), tolerance, f"{what}: loss")
    x = random_inputs(rng, shape, axis)
    mask = None if mask_shape is None else rng.random(mask_shape) < 0.7
    upstream = rng.normal(size=shape).astype("float32")
    expected = gradients(stock, x, mask, upstream)
    actual = gradients(ours, x, mask, upstream)
    for name, value in expected.items():
        assert_close(actual[name], value, tolerance, f"gradient of {name}")
    return stock, ours


# Constructor arguments ------------------------------------------------------------------

CONSTRUCTOR_CASES = [
    pytest.param((6, 3), {}, id="defaults"),
    pytest.param((6, 3), {"axis": 1}, id="axis=1-rank2"),
    pytest.param((4, 3, 5), {"axis": 1}, id="axis=1-rank3"),
    pytest.param((4, 3, 5), {"axis": -2}, id="axis=-2-rank3"),
    *[
        pytest.param((4, 3, 5, 2), {"axis": axis}, id=f"axis={axis}-rank4")
        for axis in (1, 2, 3, -1, -2, -3)
    ],
    pytest.param((6, 3), {"momentum": 0.5, "epsilon": 1e-5}, id="momentum-epsilon"),
    pytest.param((6, 3), {"momentum": 0.0}, id="momentum=0"),
    pytest.param((6, 3), {"momentum": 1.0}, id="momentum=1"),
    pytest.param((6, 3), {"center": False}, id="center=False"),
    pytest.param((6, 3), {"scale": False}, id="scale=False"),
    pytest.param((4, 3, 5), {"axis": 1, "center": False, "scale": False}, id="no-center-no-scale"),
    pytest.param(
        (6, 3),
        {
            "gamma_regularizer": keras.regularizers.L2(0.1),
            "beta_regularizer": keras.regularizers.L1(0.05),
        },
        id="regularizers",
    ),
    pytest.param(
        (6, 3),
        {
            "gamma_constraint": keras.constraints.MaxNorm(1.2),
            "beta_constraint": keras.constraints.NonNeg(),
        },
        id="constraints",
    ),
    pytest.param((6, 3), {"renorm": True}, id="renorm"),
    pytest.param(
        (4, 3, 5),
        {
            "axis": 1,
            "renorm": True,
            "renorm_momentum": 0.6,
            "momentum": 0.7,
            "renorm_clipping": {"rmax": 1.2, "rmin": 0.9, "dmax": 0.1},
        },
        id="renorm-clipping-momentum",
    ),
    pytest.param((6, 3), {"dtype": "mixed_float16", "momentum": 0.5}, id="mixed_float16"),
    pytest.param((6, 3), {"dtype": "mixed_bfloat16", "momentum": 0.5}, id="mixed_bfloat16"),
    pytest.param((6, 3), {"dtype": "bfloat16", "momentum": 0.5}, id="bfloat16"),
]
if BACKEND == "tensorflow":  # elsewhere both layers reject it (see below)
    CONSTRUCTOR_CASES.append(
        pytest.param((6, 3), {"synchronized": True, "momentum": 0.5}, id="synchronized-1-replica")
    )


@pytest.mark.parametrize("shape, options", CONSTRUCTOR_CASES)
def test_constructor_arguments_match_stock(shape, options):
    """Over two replicas, synchronized=True: tests/layers/test_layers_distributed.py.

    The stock synchronized path takes one-pass moments (E[x^2] - E[x]^2, also on a
    single replica): its input gradients carry float32 rounding of ~1e-3 relative
    for channels whose mean is several standard deviations (ours are two-pass).
    """
    tolerance = {"rtol": 2e-3, "atol": 2e-4} if options.get("synchronized") else None
    stock, ours = run_scenario(shape, options, tolerance=tolerance)
    for name in ("gamma", "beta"):
        if name in weights_by_name(stock):
            stock_weight, ours_weight = weights_by_name(stock)[name], weights_by_name(ours)[name]
            assert type(ours_weight.constraint) is type(stock_weight.constraint), name
            assert ours_weight.dtype == stock_weight.dtype, name
    assert ours.compute_dtype == stock.compute_dtype


INITIALIZERS = {
    "gamma_initializer": keras.initializers.RandomUniform(0.5, 1.5, seed=1),
    "beta_initializer": keras.initializers.Constant(0.3),
    "moving_mean_initializer": keras.initializers.Constant(-2.0),
    "moving_variance_initializer": keras.initializers.Constant(4.0),
}


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(INITIALIZERS, id="initializers"),
        pytest.param({**INITIALIZERS, "renorm": True}, id="initializers-renorm"),
        pytest.param({"moving_variance_initializer": "random_uniform"}, id="unseeded-shape-only"),
    ],
)
def test_initializers_give_the_stock_weights(options):
    """Seeded and constant initializers give the same weights (renorm's stddevs included)."""
    if options["moving_variance_initializer"] == "random_uniform":  # unseeded: shapes only
        stock, ours = Stock(**options), BatchNormalization(**options)
        stock.build((6, 3))
        ours.build((6, 3))
        assert {n: w.shape for n, w in weights_by_name(ours).items()} == {
            n: w.shape for n, w in weights_by_name(stock).items()
        }
        return
    stock, ours = Stock(**options), BatchNormalization(**options)
    stock.build((6, 3))
    ours.build((6, 3))
    assert_same_state(stock, ours, {"rtol": 0, "atol": 0}, "initial weights")
    run_scenario((6, 3), options, randomized=False)


def test_synchronized_is_rejected_off_tensorflow_as_in_stock():
    if BACKEND == "tensorflow":
        Stock(synchronized=True), BatchNormalization(synchronized=True)
        return
    with pytest.raises(ValueError, match="synchronized=True"):
        Stock(synchronized=True)
    with pytest.raises(ValueError, match="synchronized=True"):
        BatchNormalization(synchronized=True)


# Call modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("trainable", [True, False], ids=lambda t: f"trainable={t}")
@pytest.mark.parametrize("training", [True, False, None], ids=lambda t: f"training={t}")
def test_call_modes_match_stock(training, trainable):
    """trainable=False is inference mode whatever `training` says (fine-tuning semantics)."""
    rng = np.random.default_rng(1)
    stock, ours = build_pair((6, 4, 3), {"momentum": 0.5}, rng)
    stock.trainable = ours.trainable = trainable
    before = state(ours)
    x = random_inputs(rng, (6, 4, 3), -1)
    y_stock, y_ours = numpy(stock(x, training=training)), numpy(ours(x, training=training))
    assert_close(y_ours, y_stock, TOLERANCES[None], "outputs")
    assert_same_state(stock, ours, TOLERANCES[None], "state")
    updated = bool(training) and trainable
    assert (state(ours)["moving_mean"] != before["moving_mean"]).all() == updated
    assert len(ours.trainable_weights) == len(stock.trainable_weights) == 2 * trainable


# Masks in the stock layer's convention: rank ndim - 1, mask[..., None] broadcasts.
MASK_CASES = [
    pytest.param((4, 6, 3), {}, (4, 6), id="sequence-mask-axis=-1"),
    pytest.param((4, 6, 3), {"axis": 1}, (4, 6), id="sequence-mask-axis=1"),
    pytest.param((4, 3, 6), {"axis": 1}, (4, 3), id="per-channel-mask-axis=1"),
    pytest.param((4, 5, 2, 3), {}, (1, 5, 1), id="broadcast-mask-rank4"),
    pytest.param((4, 5, 2, 3), {"axis": 1}, (4, 1, 2), id="broadcast-mask-rank4-axis=1"),
    pytest.param((4, 5, 2, 3), {"axis": -2}, (4, 1, 2), id="broadcast-mask-rank4-axis=-2"),
    pytest.param((4, 6, 3), {"axis": 1, "renorm": True}, (4, 6), id="mask-renorm"),
    pytest.param((4, 6, 3), {"axis": 1, "dtype": "mixed_float16"}, (4, 6), id="mask-float16"),
]


@pytest.mark.parametrize("shape, options, mask_shape", MASK_CASES)
def test_masks_match_stock(shape, options, mask_shape):
    run_scenario(shape, {"momentum": 0.5, **options}, mask_shape)


def test_mask_from_a_masking_layer_with_unknown_batch_size():
    """Masking -> (B, T) mask on (B, T, C), BN over axis 1, in a Functional model."""
    rng = np.random.default_rng(2)
    sequences = random_inputs(rng, (5, 6, 3), -1)
    sequences[0, 4:] = 0.0
    sequences[3, 1:] = 0.0
    models, layers = {}, {}
    for cls in (Stock, BatchNormalization):
        inputs = keras.Input((6, 3))
        layers[cls] = cls(axis=1, momentum=0.5)
        masked = keras.layers.Masking(0.0)(inputs)
        models[cls] = keras.Model(inputs, layers[cls](masked, training=True))
    randomize_weights(layers[Stock], rng, variance_decades=1.0, stddev_decades=0.5)
    copy_weights(layers[Stock], layers[BatchNormalization])
    outputs = {
        cls: (numpy(model(sequences, training=True)), state(layers[cls]))
        for cls, model in models.items()
    }
    assert_close(outputs[BatchNormalization][0], outputs[Stock][0], TOLERANCES[None], "outputs")
    for name, value in outputs[Stock][1].items():
        assert_close(outputs[BatchNormalization][1][name], value, TOLERANCES[None], name)


# Serialization -------------------------------------------------------------------------------

CONFIG_CASES = [
    pytest.param({}, id="defaults"),
    pytest.param(
        {
            "axis": 1,
            "momentum": 0.9,
            "epsilon": 1e-5,
            "center": False,
            **INITIALIZERS,
            "gamma_regularizer": keras.regularizers.L2(0.1),
            "beta_regularizer": "l1",
            "gamma_constraint": keras.constraints.MaxNorm(1.2),
            "beta_constraint": "non_neg",
        },
        id="every-weight-argument",
    ),
    pytest.param(
        {"renorm": True, "renorm_clipping": {"rmax": 2.0, "dmax": 1.0}, "renorm_momentum": 0.5},
        id="renorm",
    ),
    pytest.param({"dtype": "mixed_float16", "name": "bn", "trainable": False}, id="base-layer"),
]


@pytest.mark.parametrize("options", CONFIG_CASES)
def test_config_round_trip_matches_stock(options):
    stock_config = Stock(**options).get_config()
    ours_config = BatchNormalization(**options).get_config()
    for key, value in stock_config.items():
        if key != "name":
            assert ours_config[key] == value, key
    assert BatchNormalization.from_config(ours_config).get_config() == ours_config
    # A stock config builds our layer (what replacing the class in a saved model does).
    from_stock = BatchNormalization.from_config(stock_config).get_config()
    assert {key: from_stock[key] for key in stock_config} == stock_config


def test_keras_file_round_trip_matches_stock(tmp_path):
    rng = np.random.default_rng(3)
    x = random_inputs(rng, (8, 6, 3), -1)
    x[1, 3:] = 0.0
    predictions = {}
    for cls in (Stock, BatchNormalization):
        keras.utils.set_random_seed(3)
        options = {"axis": 1, "renorm": True, "gamma_regularizer": "l2"}
        model = keras.Sequential(
            [keras.Input((6, 3)), keras.layers.Masking(0.0), cls(momentum=0.5, **options)]
        )
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.fit(x, x * 0.5, batch_size=4, epochs=1, verbose=0, shuffle=False)
        path = tmp_path / f"{cls.__name__}-{cls.__module__}.keras"
        model.save(path)
        loaded = keras.saving.load_model(path)
        assert type(loaded.layers[-1]) is cls
        assert loaded.layers[-1].get_config() == model.layers[-1].get_config()
        for name, value in state(model.layers[-1]).items():
            np.testing.assert_array_equal(state(loaded.layers[-1])[name], value, err_msg=name)
        predictions[cls] = numpy(loaded.predict_on_batch(x))
    assert_close(predictions[BatchNormalization], predictions[Stock], TOLERANCES[None], "loaded")


# model.fit ------------------------------------------------------------------------------------

FIT_CASES = [
    pytest.param(
        {
            "momentum": 0.9,
            "gamma_regularizer": keras.regularizers.L2(0.1),
            "beta_regularizer": keras.regularizers.L1(0.05),
            "gamma_constraint": keras.constraints.MaxNorm(1.2),
            "beta_constraint": keras.constraints.NonNeg(),
        },
        None,
        id="regularizers-constraints",
    ),
    pytest.param(
        {"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}, "momentum": 0.9},
        None,
        id="renorm",
    ),
    pytest.param({"trainable": False}, None, id="trainable=False-fine-tuning"),
    pytest.param({"dtype": "mixed_float16", "momentum": 0.9}, None, id="mixed_float16"),
    pytest.param({"axis": 1, "momentum": 0.9}, "masking", id="masking-axis=1"),
]


def small_model(cls, options, sequences):
    """Dense -> BN -> Dense; with `sequences`, (B, 6, 3) inputs behind Masking."""
    keras.utils.set_random_seed(4)
    dtype = options.get("dtype")
    layers = [keras.Input((6, 3) if sequences else (5,))]
    if sequences:
        layers.append(keras.layers.Masking(0.0))
    layers += [
        keras.layers.Dense(4, dtype=dtype),
        cls(**options),
        keras.layers.Dense(2, dtype=dtype),
    ]
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


@pytest.mark.parametrize("options, sequences", FIT_CASES)
def test_fit_matches_stock(options, sequences):
    """A few fit steps from the same seed and weights give the same weights."""
    rng = np.random.default_rng(5)
    if sequences:
        x = random_inputs(rng, (16, 6, 3), -1)
        x[0, 4:] = x[5, 1:] = x[9, 2:] = 0.0
        y = rng.normal(size=(16, 6, 2)).astype("float32")
    else:
        x = rng.normal(3.0, 2.0, (16, 5)).astype("float32")
        y = rng.normal(size=(16, 2)).astype("float32")
    stock = small_model(Stock, options, sequences)
    ours = small_model(BatchNormalization, options, sequences)
    randomize_weights(stock.layers[-2], rng, variance_decades=1.0, stddev_decades=0.5)
    for stock_layer, ours_layer in zip(stock.layers, ours.layers, strict=True):
        copy_weights(stock_layer, ours_layer)
    before = state(ours.layers[-2])
    stock.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    ours.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    tolerance = {"rtol": 1e-4, "atol": 1e-5}
    if options.get("dtype"):
        tolerance = TOLERANCES[options["dtype"]]
    for stock_layer, ours_layer in zip(stock.layers, ours.layers, strict=True):
        for name, value in state(stock_layer).items():
            actual = state(ours_layer)[name]
            assert_close(actual, value, tolerance, f"{ours_layer.name}/{name}")
    after = state(ours.layers[-2])
    changed = {name for name in after if np.any(after[name] != before[name])}
    if options.get("trainable", True):
        assert changed == set(after)
    else:
        assert changed == set()
    if "gamma_regularizer" in options:
        assert len(ours.losses) == len(stock.losses) == 2


# Deliberate differences: ours against NumPy --------------------------------------------------


def numpy_batch_norm(x, state, axis, mask=None, epsilon=1e-3):
    """float64 training-mode outputs and batch moments; mask in Keras's convention."""
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    keep = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask[..., None], x.shape)
    moved, keep = np.moveaxis(x, axis, -1), np.moveaxis(keep, axis, -1)
    values = moved.reshape(-1, x.shape[axis])
    keep = keep.reshape(-1, x.shape[axis])
    mean = np.array([values[keep[:, c], c].mean() for c in range(values.shape[1])])
    variance = np.array([values[keep[:, c], c].var() for c in range(values.shape[1])])
    shape = [x.shape[i] if i == axis else 1 for i in range(x.ndim)]

    def param(value):
        return np.reshape(value, shape)

    y = (x - param(mean)) / np.sqrt(param(variance) + epsilon)
    return y * param(state["gamma"]) + param(state["beta"]), mean, variance


def inference_outputs(x, state, axis, epsilon=1e-3):
    shape = [x.shape[i] if i == axis % x.ndim else 1 for i in range(x.ndim)]

    def param(name):
        return state[name].reshape(shape)

    normalized = (x - param("moving_mean")) / np.sqrt(param("moving_variance") + epsilon)
    return normalized * param("gamma") + param("beta")


def degenerate_batch(rng, name):
    """(inputs, mask, axis) where some channel gets fewer than two values."""
    if name == "fully-masked":
        return random_inputs(rng, (4, 6, 3), 1), np.zeros((4, 6), bool), 1
    if name == "one-sample":
        return random_inputs(rng, (1, 3), -1), None, -1
    if name == "one-channel-masked":  # per-channel mask: channel 1 has no values
        mask = np.ones((4, 3), bool)
        mask[:, 1] = False
        return random_inputs(rng, (4, 3, 6), 1), mask, 1
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["fully-masked", "one-sample", "one-channel-masked"])
def test_degenerate_batches_keep_the_moving_statistics(name):
    """Difference: a channel with fewer than two values in a training batch.

    The stock layer normalizes it with a zero variance (outputs of about
    x / sqrt(epsilon), or beta for one sample) and moves its moving statistics
    toward 0 (a fully masked batch) or a zero variance. Ours normalizes such a
    channel with the moving statistics, as in inference, and leaves its moving
    statistics unchanged; the other channels train as in the stock layer.
    """
    rng = np.random.default_rng(6)
    x, mask, axis = degenerate_batch(rng, name)
    stock, ours = build_pair(x.shape, {"axis": axis, "momentum": 0.5}, rng)
    before = state(ours)
    y = numpy(ours(x, training=True, mask=mask))
    assert np.all(np.isfinite(y))
    degenerate = slice(None) if name != "one-channel-masked" else [1]
    expected = inference_outputs(x, before, axis)
    taken = np.take(y, np.arange(x.shape[axis])[degenerate], axis=axis % x.ndim)
    np.testing.assert_allclose(
        taken,
        np.take(expected, np.arange(x.shape[axis])[degenerate], axis=axis % x.ndim),
        rtol=1e-5,
        atol=1e-5,
    )
    after = state(ours)
    for key in ("moving_mean", "moving_variance"):
        np.testing.assert_array_equal(after[key][degenerate], before[key][degenerate], key)
    if name == "one-channel-masked":  # the other channels: the stock layer's result
        y_stock = numpy(stock(x, training=True, mask=mask))
        assert_close(y[:, [0, 2]], y_stock[:, [0, 2]], TOLERANCES[None], "other channels")
        for key, value in state(stock).items():
            assert_close(after[key][[0, 2]], value[[0, 2]], TOLERANCES[None], key)


@pytest.mark.parametrize(
    "shape, axis, mask_shape",
    [
        pytest.param((64, 3, 4), -1, None, id="no-mask"),
        pytest.param((64, 6, 4), 1, (64, 6), id="sequence-mask-axis=1"),
    ],
)
def test_large_mean_small_std_matches_float64(shape, axis, mask_shape):
    """Difference: batch moments are two-pass on every backend and path.

    The stock layer's one-pass E[x^2] - E[x]^2 (torch and numpy backends,
    TensorFlow synchronized=True) returns zero or negative variances for float32
    inputs with mean 1e3 and std 1e-2. Ours matches float64 NumPy there.
    """
    rng = np.random.default_rng(7)
    x = (1e3 + 1e-2 * rng.normal(size=shape)).astype("float32")
    mask = None if mask_shape is None else rng.random(mask_shape) < 0.7
    _, ours = build_pair(shape, {"axis": axis, "momentum": 0.0, "epsilon": 1e-6}, rng)
    y_reference, mean, variance = numpy_batch_norm(x, state(ours), axis, mask, epsilon=1e-6)
    y = numpy(ours(x, training=True, mask=mask))
    np.testing.assert_allclose(y, y_reference, atol=2e-2 * np.abs(y_reference).max())
    np.testing.assert_allclose(state(ours)["moving_mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(state(ours)["moving_variance"], variance, rtol=2e-2)


@pytest.mark.parametrize("training", [True, False], ids=lambda t: f"training={t}")
def test_mask_fitting_neither_reading_raises_in_every_mode(training):
    """Difference: the stock layer ignores masks in inference, whatever their shape.

    Ours checks them in every mode: a (B, 7) mask on (B, 3, 5) inputs with axis=1
    covers neither the leading axes (B, 3) nor the axes without the normalized
    one (B, 5).
    """
    x = np.ones((4, 3, 5), "float32")
    with pytest.raises(ValueError, match=r"Invalid mask.*\(4, 3\).*\(4, 5\).*mask.shape=\(4, 7\)"):
        BatchNormalization(axis=1)(x, training=training, mask=np.ones((4, 7), bool))


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"axis": 0}, id="axis=0"),
        pytest.param({"momentum": 1.5}, id="momentum=1.5"),
        pytest.param({"epsilon": 0.0}, id="epsilon=0"),
    ],
)
def test_meaningless_arguments_the_stock_layer_takes_are_rejected(options):
    """Difference: the stock layer accepts these (axis=0 normalizes each sample
    over the features; momentum > 1 diverges; epsilon=0 divides by zero on a
    constant channel); ours raises a ValueError naming the valid range."""
    Stock(**options)
    with pytest.raises(ValueError, match="Received"):
        BatchNormalization(**options)

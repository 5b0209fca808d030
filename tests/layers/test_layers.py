"""keras_bn.BatchNormalization against NumPy references of its formulas and the stock layer.

Backend-neutral except tests marked `tensorflow_only`; tests/layers/test_backends.py runs
the rest again under KERAS_BACKEND=jax.
"""

import math

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.models import randomize_weights, weights_by_name

from keras_bn.layers import BatchNormalization

BACKEND = keras.backend.backend()
STATISTICS = ("moving_mean", "moving_variance")
RENORM_STATISTICS = ("moving_stddev", "renorm_mean", "renorm_stddev")


# NumPy references ------------------------------------------------------------


def channel_columns(x, axes):
    """`x` as a (values, channels) matrix: one column per combination of `axes`."""
    other = [i for i in range(x.ndim) if i not in axes]
    channels = math.prod(x.shape[a] for a in axes)
    return np.transpose(x, other + list(axes)).reshape(-1, channels)


def reference_call(
    x,
    state,
    *,
    axis=-1,
    training,
    momentum=0.99,
    epsilon=1e-3,
    mask=None,
    unbiased_moving_variance=False,
    virtual_batch_size=None,
    center=True,
    scale=True,
    renorm=False,
    renorm_momentum=0.99,
    renorm_clipping=None,
):
    """One layer call in float64: returns (outputs, new state).

    `state` maps weight names to arrays (plus "count" for momentum=None).
    Ghost batches are explicit slices, masks select values, moments are
    np.mean/np.var: nothing shared with the layer's code.
    """
    x = np.asarray(x, np.float64)
    axes = sorted(a % x.ndim for a in ([axis] if isinstance(axis, int) else axis))
    param_shape = tuple(x.shape[a] for a in axes)
    broadcast_shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]

    def param(value):
        return np.asarray(value, np.float64).reshape(broadcast_shape)

    gamma = param(state["gamma"]) if scale else 1.0
    beta = param(state["beta"]) if center else 0.0

    def normalize(values, mean, variance, r=1.0, d=0.0):
        normalized = (values - param(mean)) / np.sqrt(param(variance) + epsilon)
        return (normalized * r + d) * gamma + beta

    if not training:
        return normalize(x, state["moving_mean"], state["moving_variance"]), state

    full_mask = np.ones(x.shape, bool)
    if mask is not None:
        mask = np.asarray(mask, bool)
        fits_keras = mask.ndim == x.ndim - 1 and all(
            m in (1, d) for m, d in zip((*mask.shape, 1), x.shape, strict=True)
        )
        if fits_keras:  # the stock layer's reading wins wherever it fits: mask[..., None]
            full_mask = np.broadcast_to(mask[..., None], x.shape)
        else:  # the extension: the mask covers the input without the normalized axes
            full_mask = np.broadcast_to(np.expand_dims(mask, tuple(axes)), x.shape)
    # Documented policy, per channel: a channel with fewer than 2 values in a (ghost)
    # batch is normalized with the moving statistics and its statistics are not
    # updated; the others use and update the batch statistics.
    size = virtual_batch_size or max(x.shape[0], 1)
    moving_mean = np.asarray(state["moving_mean"], np.float64).reshape(-1)
    moving_var = np.asarray(state["moving_variance"], np.float64).reshape(-1)
    outputs, ghosts = [], []  # ghosts: (valid, mean, variance, moving-variance update)
    for start in range(0, x.shape[0], size):
        chunk = x[start : start + size]
        values = channel_columns(chunk, axes)
        keep = channel_columns(full_mask[start : start + size], axes)
        counts = keep.sum(axis=0)
        valid = counts >= 2
        mean, variance = moving_mean.copy(), moving_var.copy()
        for c in np.flatnonzero(valid):
            column = values[keep[:, c], c]
            mean[c], variance[c] = column.mean(), column.var()
        r, d = 1.0, 0.0
        if renorm:
            clipping = renorm_clipping or {}
            stddev = np.sqrt(variance + epsilon)
            renorm_stddev = np.maximum(np.reshape(state["renorm_stddev"], -1), np.sqrt(epsilon))
            r = stddev / renorm_stddev
            d = (mean - np.reshape(state["renorm_mean"], -1)) / renorm_stddev
            r = np.clip(r, clipping.get("rmin", -np.inf), clipping.get("rmax", np.inf))
            d = np.clip(d, -clipping.get("dmax", np.inf), clipping.get("dmax", np.inf))
            r, d = param(np.where(valid, r, 1.0)), param(np.where(valid, d, 0.0))
        outputs.append(normalize(chunk, mean, variance, r, d))
        correction = counts / np.maximum(counts - 1, 1) if unbiased_moving_variance else 1.0
        ghosts.append((valid, mean, variance, variance * correction))
    y = np.concatenate(outputs) if outputs else np.zeros(x.shape)
    valid_counts = np.sum([g[0] for g in ghosts], axis=0) if ghosts else np.zeros(0)
    updated = valid_counts > 0
    if not np.any(updated):
        return y, state

    def average(index):  # over the ghost batches where each channel is valid
        total = np.sum([np.where(g[0], g[index], 0.0) for g in ghosts], axis=0)
        return total / np.maximum(valid_counts, 1)

    mean, variance, moving_variance = average(1), average(2), average(3)
    state = dict(state)
    if momentum is None:
        momentum = state["count"] / (state["count"] + 1)
        state["count"] += 1

    def blend(key, batch_value, momentum):
        old = np.asarray(state[key], np.float64).reshape(-1)
        new = old * momentum + batch_value * (1 - momentum)
        return np.where(updated, new, old).reshape(param_shape)

    if not renorm:
        state["moving_mean"] = blend("moving_mean", mean, momentum)
        state["moving_variance"] = blend("moving_variance", moving_variance, momentum)
        return y, state
    stddev = np.sqrt(variance + epsilon)
    state["renorm_mean"] = blend("renorm_mean", mean, renorm_momentum)
    state["renorm_stddev"] = blend("renorm_stddev", stddev, renorm_momentum)
    state["moving_mean"] = blend("moving_mean", mean, momentum)
    state["moving_stddev"] = blend("moving_stddev", np.sqrt(moving_variance + epsilon), momentum)
    new_variance = np.maximum(np.reshape(state["moving_stddev"], -1) ** 2 - epsilon, 0.0)
    state["moving_variance"] = np.where(updated, new_variance, moving_var).reshape(param_shape)
    return y, state


# Helpers -------------------------------------------------------------------------


def layer_state(layer):
    state = {
        name: np.asarray(keras.ops.convert_to_numpy(weight), np.float64)
        for name, weight in weights_by_name(layer).items()
    }
    if "num_batches_tracked" in state:
        state["count"] = int(state.pop("num_batches_tracked"))
    return state


def make_layer(input_shape, rng, **kwargs):
    layer = BatchNormalization(**kwargs)
    layer.build(input_shape)
    randomize_weights(layer, rng)
    return layer


def random_inputs(rng, shape, axes, dtype="float32"):
    """Per-channel means in [-5, 5] and scales over four orders of magnitude."""
    axes = [a % len(shape) for a in ([axes] if isinstance(axes, int) else axes)]
    channel_shape = [shape[i] if i in axes else 1 for i in range(len(shape))]
    scale = 10.0 ** rng.uniform(-2, 2, channel_shape)
    offset = rng.uniform(-5, 5, channel_shape)
    return (rng.normal(size=shape) * scale + offset).astype(dtype)


def random_mask(rng, shape, axes):
    axes = [a % len(shape) for a in ([axes] if isinstance(axes, int) else axes)]
    mask_shape = [d for i, d in enumerate(shape) if i not in axes]
    return rng.random(mask_shape) < 0.7


def assert_state_close(layer, expected, rtol=2e-5, atol=1e-6):
    actual = layer_state(layer)
    for name in (*STATISTICS, *RENORM_STATISTICS, "count"):
        if name in expected:
            np.testing.assert_allclose(
                actual[name], expected[name], rtol=rtol, atol=atol, err_msg=name
            )


def numpy(tensor):
    return keras.ops.convert_to_numpy(tensor)


def output_tolerance(y_reference):
    return 1e-4 * max(1.0, float(np.max(np.abs(y_reference), initial=0.0)))


def check_against_reference(shape, options, use_mask, steps=3, seed=0):
    """Train `steps` calls, then one inference call, all against reference_call."""
    rng = np.random.default_rng(seed)
    axis = options.get("axis", -1)
    layer = make_layer(shape, rng, **options)
    state = layer_state(layer)
    reference_options = {k: v for k, v in options.items() if k != "freeze_statistics"}
    for step in range(steps + 1):
        training = step < steps
        x = random_inputs(rng, shape, axis)
        mask = random_mask(rng, shape, axis) if use_mask else None
        y = numpy(layer(x, training=training, mask=mask))
        y_reference, state = reference_call(
            x, state, training=training, mask=mask, **reference_options
        )
        np.testing.assert_allclose(
            y, y_reference, rtol=1e-4, atol=output_tolerance(y_reference), err_msg=f"step {step}"
        )
        assert_state_close(layer, state)
    return layer


# Formulas for every option ----------------------------------------------------------

OPTION_CASES = [
    pytest.param((6, 3), {}, False, id="defaults"),
    pytest.param((6, 4, 5), {"axis": 1}, False, id="axis=1-rank3"),
    pytest.param((4, 3, 5, 2), {"axis": -2}, False, id="axis=-2-rank4"),
    pytest.param((4, 3, 2, 5), {"axis": (1, 3)}, False, id="axis=(1,3)"),
    pytest.param((4, 3, 2, 5), {"axis": [-1, -3]}, False, id="axis=[-1,-3]"),
    pytest.param((3, 2, 4), {"axis": [2, 1]}, False, id="axis=[2,1]-all-but-batch"),
    pytest.param((6, 3), {"momentum": None}, False, id="momentum=None"),
    pytest.param((6, 3), {"momentum": 0.0}, False, id="momentum=0"),
    pytest.param((6, 3), {"momentum": 1.0}, False, id="momentum=1"),
    pytest.param((5, 3), {"momentum": 0.5, "unbiased_moving_variance": True}, False, id="unbiased"),
    pytest.param(
        (4, 2, 3),
        {"momentum": None, "unbiased_moving_variance": True, "axis": 1},
        False,
        id="unbiased-momentum=None-axis=1",
    ),
    pytest.param((8, 3), {"virtual_batch_size": 4, "momentum": 0.5}, False, id="ghost-4-of-8"),
    pytest.param(
        (6, 3, 2, 2), {"virtual_batch_size": 2, "axis": 1}, False, id="ghost-2-of-6-axis=1"
    ),
    pytest.param((6, 3), {"center": False, "scale": False}, False, id="no-center-no-scale"),
    pytest.param((4, 5, 3), {"momentum": 0.5}, True, id="mask-channels-last"),
    pytest.param((4, 3, 5), {"axis": 1, "momentum": 0.5}, True, id="mask-channels-first"),
    pytest.param((4, 3, 5, 2), {"axis": (1, 3)}, True, id="mask-axis=(1,3)"),
    pytest.param(
        (8, 5, 3),
        {"virtual_batch_size": 4, "unbiased_moving_variance": True, "momentum": None},
        True,
        id="mask-ghost-unbiased-momentum=None",
    ),
    pytest.param(
        (6, 3), {"renorm": True, "momentum": 0.5, "renorm_momentum": 0.7}, False, id="renorm"
    ),
    pytest.param(
        (6, 3),
        {"renorm": True, "renorm_clipping": {"rmax": 1.5, "rmin": 0.8, "dmax": 0.3}},
        False,
        id="renorm-clipped",
    ),
    pytest.param(
        (8, 2, 3),
        {
            "renorm": True,
            "momentum": None,
            "unbiased_moving_variance": True,
            "virtual_batch_size": 4,
            "axis": (1, 2),
        },
        True,
        id="renorm-everything",
    ),
]


@pytest.mark.parametrize("shape, options, use_mask", OPTION_CASES)
def test_training_and_inference_match_numpy_reference(shape, options, use_mask):
    check_against_reference(shape, options, use_mask)


@st.composite
def layer_cases(draw):
    rank = draw(st.integers(2, 4))
    batch = draw(st.integers(1, 8))
    shape = (batch, *draw(st.lists(st.integers(1, 4), min_size=rank - 1, max_size=rank - 1)))
    axes = draw(st.lists(st.integers(1, rank - 1), min_size=1, max_size=rank - 1, unique=True))
    axes = [a - rank if draw(st.booleans()) else a for a in axes]
    options = {
        "axis": axes[0] if len(axes) == 1 else axes,
        "momentum": draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
        "epsilon": draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        "unbiased_moving_variance": draw(st.booleans()),
        "center": draw(st.booleans()),
        "scale": draw(st.booleans()),
    }
    divisors = [d for d in range(1, batch + 1) if batch % d == 0]
    options["virtual_batch_size"] = draw(st.one_of(st.none(), st.sampled_from(divisors)))
    return shape, options, draw(st.booleans()), draw(st.integers(0, 2**16))


# JAX's eager mode compiles every op for every new shape: fewer examples there.
@settings(
    max_examples=30 if BACKEND == "tensorflow" else 10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=layer_cases())
def test_random_options_match_numpy_reference(case):
    shape, options, use_mask, seed = case
    check_against_reference(shape, options, use_mask, steps=2, seed=seed)


def test_momentum_none_is_the_plain_average_of_batch_statistics():
    rng = np.random.default_rng(1)
    layer = make_layer((5, 3), rng, momentum=None, unbiased_moving_variance=True)
    count = weights_by_name(layer)["num_batches_tracked"]
    assert not count.trainable and count.dtype == "int32" and layer_state(layer)["count"] == 0
    batches = [random_inputs(rng, (5, 3), -1) for _ in range(4)]
    for x in batches:
        layer(x, training=True)
    assert layer_state(layer)["count"] == 4
    np.testing.assert_allclose(
        numpy(layer.moving_mean), np.mean([b.mean(0) for b in batches], 0), rtol=1e-5
    )
    np.testing.assert_allclose(
        numpy(layer.moving_variance), np.mean([b.var(0, ddof=1) for b in batches], 0), rtol=1e-5
    )


def test_ghost_batches_are_consecutive_samples_normalized_separately():
    rng = np.random.default_rng(2)
    x = random_inputs(rng, (12, 4, 3), -1)
    ghost = make_layer(x.shape, rng, virtual_batch_size=4)
    plain = BatchNormalization()
    plain.build((4, 4, 3))
    plain.set_weights(ghost.get_weights())
    y = numpy(ghost(x, training=True))
    for start in (0, 4, 8):
        np.testing.assert_allclose(
            y[start : start + 4],
            numpy(plain(x[start : start + 4], training=True)),
            rtol=1e-5,
            atol=1e-5,
        )


# Stock behaviour kept ----------------------------------------------------------------

STOCK_CASES = [
    pytest.param((6, 3), {}, False, id="defaults"),
    pytest.param((4, 3, 5), {"axis": 1, "momentum": 0.9, "epsilon": 1e-5}, False, id="axis=1"),
    pytest.param((4, 5, 3), {"momentum": 0.5}, True, id="mask-channels-last"),
    pytest.param((6, 3), {"renorm": True, "renorm_momentum": 0.6}, False, id="renorm"),
    pytest.param(
        (6, 3),
        {"renorm": True, "renorm_clipping": {"rmax": 1.2, "rmin": 0.9, "dmax": 0.1}},
        False,
        id="renorm-clipped",
    ),
]


@pytest.mark.parametrize("shape, options, use_mask", STOCK_CASES)
def test_matches_stock_layer_without_new_options(shape, options, use_mask):
    rng = np.random.default_rng(3)
    ours = make_layer(shape, rng, **options)
    stock = keras.layers.BatchNormalization(**options)
    stock.build(shape)
    for name, weight in weights_by_name(ours).items():
        weights_by_name(stock)[name].assign(weight)
    for training in (True, True, True, False):
        x = random_inputs(rng, shape, options.get("axis", -1))
        mask = random_mask(rng, shape, -1) if use_mask else None
        np.testing.assert_allclose(
            numpy(ours(x, training=training, mask=mask)),
            numpy(stock(x, training=training, mask=mask)),
            rtol=1e-4,
            atol=1e-4,
        )
        for name, weight in weights_by_name(stock).items():
            np.testing.assert_allclose(
                numpy(weights_by_name(ours)[name]), numpy(weight), rtol=1e-5, err_msg=name
            )


def test_config_keeps_every_stock_argument():
    stock_keys = set(keras.layers.BatchNormalization().get_config())
    config = BatchNormalization(axis=(1, 2), momentum=None).get_config()
    assert stock_keys <= set(config)
    assert config["axis"] == [1, 2] and config["momentum"] is None
    assert {"unbiased_moving_variance", "virtual_batch_size", "freeze_statistics"} <= set(config)


def dense_bn_model(batch_norm_class, **options):
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4),
            batch_norm_class(**options),
            keras.layers.Dense(2),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def test_fit_gradients_regularizer_and_constraint_match_stock():
    options = {
        "gamma_regularizer": keras.regularizers.L2(0.1),
        "beta_regularizer": keras.regularizers.L1(0.05),
        "gamma_constraint": keras.constraints.MaxNorm(1.2),
        "beta_constraint": keras.constraints.NonNeg(),
    }
    rng = np.random.default_rng(5)
    x = rng.normal(3.0, 2.0, (16, 5)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    ours = dense_bn_model(BatchNormalization, **options)
    stock = dense_bn_model(keras.layers.BatchNormalization, **options)
    stock.set_weights(ours.get_weights())
    ours.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    stock.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    for ours_weight, stock_weight in zip(ours.weights, stock.weights, strict=True):
        assert ours_weight.name == stock_weight.name
        np.testing.assert_allclose(
            numpy(ours_weight), numpy(stock_weight), rtol=1e-4, atol=1e-5, err_msg=ours_weight.name
        )
    assert np.all(numpy(ours.layers[1].beta) >= 0)  # the constraint did act
    assert len(ours.losses) == 2


def test_mixed_precision_computes_in_float32_and_returns_float16():
    rng = np.random.default_rng(6)
    layer = make_layer((8, 3), rng, dtype="mixed_float16", momentum=0.5)
    assert layer.moving_mean.dtype == "float32" and layer.gamma.dtype == "float32"
    x = random_inputs(rng, (8, 3), -1, dtype="float16")
    state = layer_state(layer)
    y = layer(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    y_reference, state = reference_call(x, state, training=True, momentum=0.5)
    np.testing.assert_allclose(numpy(y).astype(np.float64), y_reference, rtol=2e-3, atol=2e-2)
    assert_state_close(layer, state, rtol=1e-4)


def test_synchronized_is_tensorflow_only_as_in_stock():
    if BACKEND == "tensorflow":  # without a tf.distribute strategy: local statistics
        rng = np.random.default_rng(18)
        layer = make_layer((6, 3), rng, synchronized=True, momentum=0.5)
        x = random_inputs(rng, (6, 3), -1)
        y_reference, state = reference_call(x, layer_state(layer), training=True, momentum=0.5)
        np.testing.assert_allclose(
            numpy(layer(x, training=True)), y_reference, rtol=1e-4, atol=1e-4
        )
        assert_state_close(layer, state)
    else:
        with pytest.raises(ValueError, match="synchronized=True"):
            BatchNormalization(synchronized=True)


# Training / inference switching ---------------------------------------------------------


def test_trainable_false_means_inference_mode():
    rng = np.random.default_rng(7)
    layer = make_layer((6, 3), rng)
    layer.trainable = False
    before = layer_state(layer)
    x = random_inputs(rng, (6, 3), -1)
    y_reference, _ = reference_call(x, before, training=False)
    np.testing.assert_allclose(numpy(layer(x, training=True)), y_reference, rtol=1e-5, atol=1e-5)
    assert_state_close(layer, before, rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False, None], ids=lambda t: f"training={t}")
def test_freeze_statistics_uses_and_keeps_moving_statistics(training):
    rng = np.random.default_rng(8)
    layer = make_layer((6, 3), rng, freeze_statistics=True, momentum=None)
    before = layer_state(layer)
    x = random_inputs(rng, (6, 3), -1)
    y_reference, _ = reference_call(x, before, training=False)
    np.testing.assert_allclose(
        numpy(layer(x, training=training)), y_reference, rtol=1e-5, atol=1e-5
    )
    assert_state_close(layer, before, rtol=0, atol=0)


def test_freeze_statistics_keeps_gamma_and_beta_trainable_in_fit():
    rng = np.random.default_rng(9)
    x = rng.normal(3.0, 2.0, (16, 5)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    model = dense_bn_model(BatchNormalization, freeze_statistics=True)
    layer = model.layers[1]
    randomize_weights(layer, rng)
    before = layer_state(layer)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    after = layer_state(layer)
    assert len(layer.trainable_weights) == 2
    for name in STATISTICS:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    for name in ("gamma", "beta"):
        assert np.abs(after[name] - before[name]).max() > 1e-4, name


def test_fit_with_a_partial_last_batch_matches_reference():
    """fit compiles the step (TF: dynamic batch size in the graph; JAX: static)."""
    rng = np.random.default_rng(10)
    model = keras.Sequential([keras.Input((4, 3)), BatchNormalization(momentum=None)])
    layer = model.layers[0]
    randomize_weights(layer, rng)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = random_inputs(rng, (10, 4, 3), -1)
    state = layer_state(layer)
    model.fit(x, np.zeros_like(x), batch_size=4, epochs=1, verbose=0, shuffle=False)
    for start in (0, 4, 8):
        _, state = reference_call(x[start : start + 4], state, training=True, momentum=None)
    assert_state_close(layer, state)
    np.testing.assert_allclose(
        numpy(model.predict_on_batch(x)),
        reference_call(x, state, training=False)[0],
        rtol=1e-4,
        atol=1e-4,
    )


# Numerical stability and degenerate batches -------------------------------------------

STABILITY_CASES = [
    pytest.param((64, 3, 4), {}, False, id="defaults"),
    # 131072 values per channel: float32 sums of them lose the mean's low digits
    # (the stock TensorFlow layer is off by about 2 standard deviations here).
    pytest.param((128, 32, 32, 2), {}, False, id="large-batch"),
    pytest.param((64, 3, 4), {"axis": 1}, False, id="axis=1"),
    pytest.param((64, 3, 4), {}, True, id="mask"),
    pytest.param((64, 3, 4), {"virtual_batch_size": 16}, False, id="ghost"),
    pytest.param((64, 3, 4), {"axis": (1, 2)}, False, id="multi-axis"),
    pytest.param(
        (64, 3, 4), {"momentum": None, "unbiased_moving_variance": True}, False, id="momentum=None"
    ),
    pytest.param((64, 3, 4), {"renorm": True}, False, id="renorm"),
]


@pytest.mark.parametrize("shape, options, use_mask", STABILITY_CASES)
def test_large_mean_small_std_float32_stays_accurate(shape, options, use_mask):
    """mean 1e3, std 1e-2: E[x^2] - E[x]^2 cancels to garbage in float32."""
    rng = np.random.default_rng(11)
    x = (1e3 + 1e-2 * rng.normal(size=shape)).astype("float32")
    mask = random_mask(rng, shape, options.get("axis", -1)) if use_mask else None
    options = {"epsilon": 1e-6, "momentum": 0.0, **options}
    layer = BatchNormalization(**options)
    layer.build(shape)
    y_reference, expected = reference_call(
        x, {**layer_state(layer), "count": 0}, training=True, mask=mask, **options
    )
    y = numpy(layer(x, training=True, mask=mask))
    state = layer_state(layer)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, y_reference, atol=2e-2)
    np.testing.assert_allclose(state["moving_variance"], expected["moving_variance"], rtol=2e-2)
    np.testing.assert_allclose(state["moving_mean"], expected["moving_mean"], rtol=1e-6)


def degenerate_case(rng, name):
    """(input, mask) where no channel has two values in the training batch."""
    if name == "empty-batch":
        return np.zeros((0, 3), "float32"), None
    if name == "one-sample":
        return random_inputs(rng, (1, 3), -1), None
    if name == "all-masked":
        return random_inputs(rng, (4, 5, 3), -1), np.zeros((4, 5), bool)
    if name == "one-unmasked-value":
        mask = np.zeros((4, 5), bool)
        mask[2, 3] = True
        return random_inputs(rng, (4, 5, 3), -1), mask
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["empty-batch", "one-sample", "all-masked", "one-unmasked-value"])
def test_degenerate_batch_normalizes_with_moving_statistics_and_skips_update(name):
    rng = np.random.default_rng(12)
    x, mask = degenerate_case(rng, name)
    layer = make_layer((None, *x.shape[1:]), rng, momentum=None)
    before = layer_state(layer)
    y = numpy(layer(x, training=True, mask=mask))
    assert y.shape == x.shape and np.all(np.isfinite(y))
    np.testing.assert_allclose(
        y, reference_call(x, before, training=False)[0], rtol=1e-5, atol=1e-5
    )
    assert_state_close(layer, before, rtol=0, atol=0)  # includes count == 0


def test_ghost_batch_without_values_is_left_out_of_the_update():
    rng = np.random.default_rng(13)
    x = random_inputs(rng, (8, 5, 3), -1)
    mask = rng.random((8, 5)) < 0.7
    mask[4:] = False
    options = {"virtual_batch_size": 4, "momentum": 0.5}
    layer = make_layer(x.shape, rng, **options)
    state = layer_state(layer)
    y = numpy(layer(x, training=True, mask=mask))
    y_reference, state = reference_call(x, state, training=True, mask=mask, **options)
    np.testing.assert_allclose(y, y_reference, rtol=1e-4, atol=output_tolerance(y_reference))
    assert_state_close(layer, state)


@pytest.mark.tensorflow_only
def test_degenerate_batches_in_a_graph_with_unknown_batch_size():
    import tensorflow as tf

    rng = np.random.default_rng(14)
    layer = make_layer((None, 3), rng, momentum=0.5, unbiased_moving_variance=True)
    before = layer_state(layer)
    step = tf.function(
        lambda x: layer(x, training=True), input_signature=[tf.TensorSpec((None, 3), tf.float32)]
    )
    for x in (np.zeros((0, 3), "float32"), random_inputs(rng, (1, 3), -1)):
        y = step(x).numpy()
        np.testing.assert_allclose(y, reference_call(x, before, training=False)[0], rtol=1e-5)
        assert_state_close(layer, before, rtol=0, atol=0)
    x = random_inputs(rng, (5, 3), -1)
    y_reference, expected = reference_call(
        x, before, training=True, momentum=0.5, unbiased_moving_variance=True
    )
    np.testing.assert_allclose(step(x).numpy(), y_reference, rtol=1e-4, atol=1e-4)
    assert_state_close(layer, expected)


# Masks ------------------------------------------------------------------------------------


class ChannelsFirst(keras.layers.Layer):
    """(B, T, C) -> (B, C, T), passing the (B, T) mask on (Permute drops masks)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs):
        return keras.ops.transpose(inputs, (0, 2, 1))


def test_channels_first_sequence_mask_from_a_masking_layer():
    """(B, T) mask from Masking, BN over axis 1 of (B, C, T): stock crashes here."""
    rng = np.random.default_rng(15)
    sequences = random_inputs(rng, (4, 6, 3), -1)
    sequences[0, 4:] = 0.0
    sequences[2, 1:] = 0.0
    inputs = keras.Input((6, 3))
    masked = keras.layers.Masking(0.0)(inputs)
    channels_first = ChannelsFirst()(masked)  # (B, 3, 6), mask stays (B, 6)
    layer = BatchNormalization(axis=1, momentum=0.0)
    outputs = layer(channels_first, training=True)
    model = keras.Model(inputs, outputs)
    y = numpy(model(sequences, training=True))
    mask = np.any(sequences != 0.0, axis=-1)
    x = np.transpose(sequences, (0, 2, 1))
    state = {**layer_state(layer), "moving_mean": np.zeros(3), "moving_variance": np.ones(3)}
    y_reference, expected = reference_call(x, state, axis=1, training=True, mask=mask, momentum=0.0)
    np.testing.assert_allclose(y, y_reference, rtol=1e-4, atol=1e-4)
    assert_state_close(layer, expected)


def keras_mask_reference(x, mask, axis, state, momentum):
    """Reference for a mask in Keras's convention: `mask[..., None]` covers the leading axes.

    Each channel keeps its own unmasked values (the mask may differ per channel).
    """
    full_mask = np.broadcast_to(np.asarray(mask, bool)[..., None], x.shape)
    values = channel_columns(np.asarray(x, np.float64), [axis])
    keep = channel_columns(full_mask, [axis])
    mean = np.array([values[keep[:, c], c].mean() for c in range(values.shape[1])])
    variance = np.array([values[keep[:, c], c].var() for c in range(values.shape[1])])
    shape = [x.shape[i] if i == axis else 1 for i in range(x.ndim)]
    gamma, beta = state["gamma"].reshape(shape), state["beta"].reshape(shape)
    y = (x - mean.reshape(shape)) / np.sqrt(variance.reshape(shape) + 1e-3) * gamma + beta
    expected = {
        "moving_mean": state["moving_mean"] * momentum + mean * (1 - momentum),
        "moving_variance": state["moving_variance"] * momentum + variance * (1 - momentum),
    }
    return y, expected


@pytest.mark.parametrize(
    "shape, axis, mask_shape, ghost",
    [
        pytest.param((4, 5, 3), 1, (4, 5), None, id="masking-mask-axis=1"),
        pytest.param((4, 3, 5), 1, (4, 3), None, id="per-channel-mask-axis=1"),
        pytest.param((4, 5, 2, 3), 3, (1, 5, 1), None, id="broadcast-mask-rank4"),
        pytest.param((4, 5, 2, 3), 2, (1, 5, 2), None, id="broadcast-mask-axis=2"),
        pytest.param((8, 5, 3), 1, (8, 5), 4, id="masking-mask-axis=1-ghost"),
    ],
)
def test_masks_in_keras_convention_cover_the_leading_axes(shape, axis, mask_shape, ghost):
    rng = np.random.default_rng(19)
    options = {"axis": axis, "momentum": 0.5, "virtual_batch_size": ghost}
    layer = make_layer(shape, rng, **options)
    state = layer_state(layer)
    x = random_inputs(rng, shape, axis)
    mask = rng.random(mask_shape) < 0.7
    y = numpy(layer(x, training=True, mask=mask))
    if ghost is None:
        y_reference, expected = keras_mask_reference(x, mask, axis, state, 0.5)
    else:  # each ghost batch alone, then the average of their statistics
        halves = [
            keras_mask_reference(x[i : i + ghost], mask[i : i + ghost], axis, state, 0.5)
            for i in range(0, shape[0], ghost)
        ]
        y_reference = np.concatenate([half[0] for half in halves])
        expected = {
            name: np.mean([half[1][name] for half in halves], axis=0) for name in STATISTICS
        }
    np.testing.assert_allclose(y, y_reference, rtol=1e-4, atol=output_tolerance(y_reference))
    assert_state_close(layer, expected)


def test_channel_without_values_keeps_its_moving_statistics():
    """A per-channel mask that empties one channel: that channel alone is not updated."""
    rng = np.random.default_rng(20)
    layer = make_layer((4, 3, 5), rng, axis=1, momentum=None)
    before = layer_state(layer)
    x = random_inputs(rng, (4, 3, 5), 1)
    mask = np.ones((4, 3), bool)
    mask[:, 1] = False
    y = numpy(layer(x, training=True, mask=mask))
    after = layer_state(layer)
    y_inference, _ = reference_call(x, before, axis=1, training=False)
    np.testing.assert_allclose(y[:, 1], y_inference[:, 1], rtol=1e-5, atol=1e-5)
    for name in STATISTICS:
        assert after[name][1] == before[name][1], name
        assert np.all(after[name][[0, 2]] != before[name][[0, 2]]), name
    assert after["count"] == 1


# Saving, inference_affine -----------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="defaults"),
        pytest.param(
            {
                "axis": (1, 2),
                "momentum": None,
                "unbiased_moving_variance": True,
                "virtual_batch_size": 2,
                "epsilon": 1e-5,
            },
            id="new-options",
        ),
        pytest.param({"renorm": True, "freeze_statistics": True}, id="renorm-frozen"),
    ],
)
def test_keras_file_round_trip(tmp_path, options):
    rng = np.random.default_rng(16)
    model = keras.Sequential([keras.Input((4, 3)), BatchNormalization(**options)])
    randomize_weights(model.layers[0], rng)
    model.compile(optimizer="sgd", loss="mse")
    x = random_inputs(rng, (8, 4, 3), -1)
    model.fit(x, x, batch_size=4, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # safe_mode: the class is registered
    layer = loaded.layers[0]
    assert type(layer) is BatchNormalization
    assert keras.saving.get_registered_name(BatchNormalization) == "keras_bn>BatchNormalization"
    assert layer.get_config() == model.layers[0].get_config()
    for name, value in layer_state(model.layers[0]).items():
        np.testing.assert_array_equal(layer_state(layer)[name], value, err_msg=name)
    np.testing.assert_allclose(numpy(loaded(x)), numpy(model(x)), rtol=1e-6)
    if options.get("momentum", 0.99) is None:
        assert layer_state(layer)["count"] == 2


@pytest.mark.parametrize(
    "shape, options",
    [
        pytest.param((5, 3), {}, id="defaults"),
        pytest.param((5, 4, 3), {"axis": 1, "scale": False}, id="axis=1-no-scale"),
        pytest.param((5, 4, 3), {"axis": (1, 2), "center": False}, id="multi-axis-no-center"),
    ],
)
def test_inference_affine_is_the_inference_map(shape, options):
    rng = np.random.default_rng(17)
    layer = make_layer(shape, rng, epsilon=1e-5, **options)
    scale, offset = layer.inference_affine()
    state = layer_state(layer)
    assert scale.dtype == np.float64 and offset.dtype == np.float64
    assert scale.shape == offset.shape == tuple(layer.moving_mean.shape)
    gamma = state["gamma"] if options.get("scale", True) else 1.0
    beta = state["beta"] if options.get("center", True) else 0.0
    expected_scale = gamma / np.sqrt(state["moving_variance"] + 1e-5)
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-12)
    np.testing.assert_allclose(offset, beta - state["moving_mean"] * expected_scale, rtol=1e-12)
    x = random_inputs(rng, shape, options.get("axis", -1))
    axes = sorted(a % len(shape) for a in np.atleast_1d(options.get("axis", -1)))
    broadcast = [shape[i] if i in axes else 1 for i in range(len(shape))]
    np.testing.assert_allclose(
        numpy(layer(x)),
        x * scale.reshape(broadcast) + offset.reshape(broadcast),
        rtol=1e-4,
        atol=1e-4,
    )


def test_inference_affine_needs_a_built_layer():
    with pytest.raises(ValueError, match="expected a built layer"):
        BatchNormalization().inference_affine()


def test_symbolic_call_with_several_axes():
    inputs = keras.Input((4, 5, 6))
    layer = BatchNormalization(axis=(1, -1))
    outputs = layer(inputs)
    assert tuple(outputs.shape) == (None, 4, 5, 6)
    assert tuple(layer.gamma.shape) == tuple(layer.moving_variance.shape) == (4, 6)


# Bad arguments -----------------------------------------------------------------------------

BAD_ARGUMENTS = [
    pytest.param({"axis": 0}, "batch axis", id="axis=0"),
    pytest.param({"axis": (1, 1)}, "distinct", id="axis-duplicated"),
    pytest.param({"axis": []}, "non-empty", id="axis-empty"),
    pytest.param({"axis": "channels"}, "integer", id="axis-string"),
    pytest.param({"axis": True}, "integer", id="axis-bool"),
    pytest.param({"axis": 1.0}, "integer", id="axis-float"),
    pytest.param({"momentum": 1.5}, r"\[0, 1\]", id="momentum>1"),
    pytest.param({"momentum": -0.1}, r"\[0, 1\]", id="momentum<0"),
    pytest.param({"momentum": "0.9"}, r"\[0, 1\]", id="momentum-string"),
    pytest.param({"momentum": True}, r"\[0, 1\]", id="momentum-bool"),
    pytest.param({"renorm_momentum": None}, r"renorm_momentum", id="renorm_momentum=None"),
    pytest.param({"epsilon": 0.0}, "epsilon", id="epsilon=0"),
    pytest.param({"epsilon": -1e-3}, "epsilon", id="epsilon<0"),
    pytest.param({"epsilon": float("nan")}, "epsilon", id="epsilon=nan"),
    pytest.param({"epsilon": float("inf")}, "epsilon", id="epsilon=inf"),
    pytest.param({"virtual_batch_size": 0}, "virtual_batch_size", id="ghost=0"),
    pytest.param({"virtual_batch_size": 2.5}, "virtual_batch_size", id="ghost-float"),
    pytest.param(
        {"virtual_batch_size": 4, "synchronized": True}, "cannot be combined", id="ghost+sync"
    ),
    pytest.param(
        {"renorm": True, "renorm_clipping": {"rmax": 0.5, "rmin": 1.0}}, "rmax", id="rmax<rmin"
    ),
]


@pytest.mark.parametrize("options, message", BAD_ARGUMENTS)
def test_bad_constructor_arguments_raise_value_error(options, message):
    with pytest.raises(ValueError, match=message) as error:
        BatchNormalization(**options)
    assert "Received" in str(error.value)


@pytest.mark.parametrize(
    "axis, rank",
    [
        pytest.param(3, 3, id="axis=3-rank3"),
        pytest.param(-4, 3, id="axis=-4-rank3"),
        pytest.param(-3, 3, id="axis=-3-is-batch"),
        pytest.param((1, -3), 4, id="axis=(1,-3)-same-axis"),
        pytest.param(-1, 1, id="rank1-only-batch"),
    ],
)
def test_axis_out_of_range_or_batch_for_input_rank_raises(axis, rank):
    layer = BatchNormalization(axis=axis)
    with pytest.raises(ValueError, match=rf"Invalid axis.*inputs of rank {rank}.*Received: axis="):
        layer.build((2,) * rank)


def test_bad_mask_and_batch_raise_value_error():
    x = np.ones((6, 4, 3), "float32")
    with pytest.raises(ValueError, match=r"Invalid mask.*Received: mask.shape=\(6, 4, 3\)"):
        BatchNormalization()(x, training=True, mask=np.ones((6, 4, 3), bool))
    with pytest.raises(ValueError, match=r"Invalid mask.*Received: mask.shape=\(6, 5\)"):
        BatchNormalization(axis=1)(x, training=False, mask=np.ones((6, 5), bool))
    with pytest.raises(ValueError, match="multiple of virtual_batch_size=4"):
        BatchNormalization(virtual_batch_size=4)(x, training=True)

"""Test models: walking them, giving their BatchNormalizations non-trivial statistics,
and the small models several test modules build.

- Walking: :func:`walk_layers`, :func:`batch_norm_layers`, :func:`nested_batch_norms`.
- BatchNormalization statistics: :func:`randomize_batch_norms` (random),
  :func:`calibrate_batch_norms` (measured on data, then perturbed),
  :func:`settle_batch_norms` (trained-looking), :func:`randomize_weights` (one layer,
  renormalization weights too).
- Small models: :func:`conv_bn_stack`, :func:`channels_first_models` (folded by
  test_folding.py in a JAX subprocess), :func:`conv_bn_classifier`, :func:`tiny_model`.
"""

from __future__ import annotations

import keras
import numpy as np

L = keras.layers

# ------------------------------------------------------------------------------------
# Walking models.


def walk_layers(model):
    """Every layer of ``model`` that is not itself a model, nested models walked, once each."""
    seen = set()

    def walk(parent):
        for layer in parent.layers:
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            if isinstance(layer, keras.Model):
                yield from walk(layer)
            else:
                yield layer

    yield from walk(model)


def batch_norm_layers(model) -> list:
    """Every BatchNormalization layer (keras_bn's subclass included) inside ``model``."""
    return [layer for layer in walk_layers(model) if isinstance(layer, L.BatchNormalization)]


def nested_batch_norms(model) -> list:
    """Every BatchNormalization inside ``model``, in custom layers' sublayers too."""
    from keras_bn import _keras_internals as internals

    found, seen = [], set()
    for layer in internals.flatten_layers(model):
        if isinstance(layer, L.BatchNormalization) and id(layer) not in seen:
            seen.add(id(layer))
            found.append(layer)
    return found


# ------------------------------------------------------------------------------------
# BatchNormalization statistics.


def weights_by_name(layer) -> dict:
    """A layer's variables keyed by name (``gamma``, ``moving_mean``, ...)."""
    return {weight.name: weight for weight in layer.weights}


def randomize_weights(layer, rng, *, variance_decades=2.0, stddev_decades=1.0):
    """Non-trivial BN weights, renorm ones too: gamma != 1 (some negative), beta and
    means != 0, variances over +-``variance_decades`` decades (renorm stddevs over
    +-``stddev_decades``)."""
    for name, weight in weights_by_name(layer).items():
        shape = tuple(weight.shape)
        if name == "gamma":
            value = rng.uniform(0.5, 2.0, shape) * rng.choice([-1, 1], shape)
        elif name in ("beta", "moving_mean", "renorm_mean"):
            value = rng.uniform(-3.0, 3.0, shape)
        elif name == "moving_variance":
            value = 10.0 ** rng.uniform(-variance_decades, variance_decades, shape)
        elif name in ("moving_stddev", "renorm_stddev"):
            value = 10.0 ** rng.uniform(-stddev_decades, stddev_decades, shape)
        else:
            continue
        weight.assign(value.astype(weight.dtype))


def randomize_batch_norms(
    model,
    seed=0,
    *,
    variance_decades: tuple[float, float] | None = None,
    gain: tuple[float, float] | None = None,
):
    """Give every BatchNormalization in ``model`` non-trivial statistics; return ``model``.

    Default-initialized BN folds to the identity and proves nothing, so per channel:
    moving_mean ~ N(0, 2) (not 0), moving_variance = 10 ** U(-3, 1) (orders of
    magnitude apart), |gamma| ~ U(0.3, 2) with a random sign (not 1;
    trained networks have negative ones too), beta ~ N(0, 1). A layer built with
    ``scale=False`` / ``center=False`` has no gamma / beta and keeps none; any
    ``axis`` works (the shapes come from the weights). Weights are read and written
    by name, never by ``get_weights()`` position.

    Args:
        model: a model (nested models are walked) or one BatchNormalization layer.
        seed: an int, or a ``np.random.Generator`` whose stream continues.
        variance_decades: the range of ``log10(moving_variance)``: (-3, 1) by
            default, (-2, 1.5) with ``gain``; widen it to put folded weights near
            float16's limits.
        gain: for deep networks (Keras Applications): ``(low, high)`` sets
            ``gamma = sqrt(moving_variance + epsilon) * U(low, high)``, so each BN
            scales its input by a factor in that range and 50 of them neither blow
            up nor vanish. Layers without gamma then get variances within half a
            decade of 1 (their factor is ``1 / sqrt(variance)``), gamma stays
            positive, and offsets are drawn narrower (mean ~ N(0.2, 0.5),
            beta ~ N(0, 0.2)): deep networks add them up.
    """
    if variance_decades is None:
        variance_decades = (-3.0, 1.0) if gain is None else (-2.0, 1.5)
    rng = np.random.default_rng(seed)
    layers = [model] if isinstance(model, L.BatchNormalization) else batch_norm_layers(model)
    # Each branch keeps the draw order of the copy it replaced, so the figures
    # recorded with those copies (BENCHMARKS.md) reproduce.
    for layer in layers:
        shape = tuple(layer.moving_mean.shape)
        if gain is None:
            layer.moving_mean.assign(rng.normal(0.0, 2.0, shape))
            layer.moving_variance.assign(10.0 ** rng.uniform(*variance_decades, shape))
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.3, 2.0, shape) * rng.choice([-1.0, 1.0], shape))
            if layer.beta is not None:
                layer.beta.assign(rng.normal(0.0, 1.0, shape))
            continue
        decades = variance_decades if layer.gamma is not None else (-0.5, 0.5)
        variance = 10.0 ** rng.uniform(*decades, shape)
        layer.moving_mean.assign(rng.normal(0.2, 0.5, shape))
        layer.moving_variance.assign(variance)
        if layer.gamma is not None:
            layer.gamma.assign(np.sqrt(variance + layer.epsilon) * rng.uniform(*gain, shape))
        if layer.beta is not None:
            layer.beta.assign(rng.normal(0.0, 0.2, shape))
    return model


def calibrate_batch_norms(
    model, data, seed=0, *, variance_decades=0.5, gamma=(0.5, 2.0), beta_std=0.5
):
    """Moving statistics measured on ``data`` (as training leaves them), then perturbed.

    Sets every BN's momentum to 0, runs ``model(data, training=True)``, then per
    channel multiplies moving_variance by 10 ** U(-variance_decades,
    variance_decades) and draws gamma ~ U(*gamma) and beta ~ N(0, beta_std).
    Returns ``model``.
    """
    rng = np.random.default_rng(seed)
    layers = batch_norm_layers(model)
    for layer in layers:
        layer.momentum = 0.0
    model(data, training=True)
    for layer in layers:
        shape = tuple(layer.moving_mean.shape)
        variance = keras.ops.convert_to_numpy(layer.moving_variance)
        spread = 10.0 ** rng.uniform(-variance_decades, variance_decades, shape)
        layer.moving_variance.assign(variance * spread)
        if layer.gamma is not None:
            layer.gamma.assign(rng.uniform(*gamma, shape))
        if layer.beta is not None:
            layer.beta.assign(rng.normal(0.0, beta_std, shape))
    return model


def settle_batch_norms(model, data, seed=0, spread=0.05):
    """Trained-looking statistics that keep a deep network well conditioned.

    ``calibrate_batch_norms`` perturbing a little: moving_variance times
    10 ** U(-spread, spread), gamma ~ U(1 - 2 spread, 1 + 2 spread), beta ~
    N(0, spread). (Its default perturbation is far larger, which saturates the
    softmax of a deep classifier and leaves nothing to compare.)
    """
    return calibrate_batch_norms(
        model,
        data,
        seed,
        variance_decades=spread,
        gamma=(1 - 2 * spread, 1 + 2 * spread),
        beta_std=spread,
    )


# ------------------------------------------------------------------------------------
# Small models.


def conv_bn_stack(blocks, channels, dtype, seed):
    """``blocks`` x (Conv2D 3x3 -> BN(epsilon=1e-10) -> ReLU) on (12, 12, channels)."""
    rng = np.random.default_rng(seed)
    x = keras.Input((12, 12, channels), dtype=dtype)
    y = x
    for i in range(blocks):
        conv = L.Conv2D(channels, 3, padding="same", dtype=dtype, name=f"conv_{i}")
        y = conv(y)
        # Channel gains over 8 decades, as trained networks have: the BN undoes them.
        kernel = rng.normal(0, 1 / np.sqrt(9 * channels), (3, 3, channels, channels))
        conv.kernel.assign(kernel * 10.0 ** rng.uniform(-4, 4, channels))
        conv.bias.assign(rng.normal(0, 0.1, channels))
        y = L.BatchNormalization(epsilon=1e-10, dtype=dtype, name=f"bn_{i}")(y)
        y = L.ReLU(dtype=dtype)(y)
    return keras.Model(x, y)


def _channels_first_bn(name):
    return L.BatchNormalization(axis=1, name=name)


def channels_first_models():
    """channels_first models covering every rule in both directions: (model, BNs kept)."""
    cf = {"data_format": "channels_first"}
    bn = _channels_first_bn
    x = keras.Input((4, 9, 9))
    y = bn("bn_conv")(L.Conv2D(4, 3, groups=2, use_bias=False, **cf)(x))
    y = bn("bn_dw")(L.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, **cf)(y))
    y = bn("bn_sep")(L.SeparableConv2D(6, 3, depth_multiplier=2, padding="same", **cf)(y))
    y = L.Conv2D(6, 3, groups=3, activation="relu", **cf)(bn("bn_back_conv")(L.ReLU()(y)))
    y = L.Conv2DTranspose(4, 3, strides=2, output_padding=1, **cf)(y)
    y = bn("bn_back_dw")(L.ReLU()(bn("bn_deconv")(y)))
    y = L.DepthwiseConv2D(1, padding="same", depth_multiplier=2, **cf)(y)
    model_2d = keras.Model(x, y)

    x = keras.Input((3, 12))
    y = bn("bn_conv")(L.Conv1D(4, 3, dilation_rate=2, **cf)(x))
    y = bn("bn_dw")(L.DepthwiseConv1D(3, depth_multiplier=2, **cf)(y))
    y = bn("bn_sep")(L.SeparableConv1D(4, 2, depth_multiplier=2, **cf)(y))
    y = bn("bn_deconv")(L.Conv1DTranspose(3, 3, dilation_rate=2, **cf)(L.ReLU()(y)))
    y = L.Conv1D(2, 3, padding="same", **cf)(bn("bn_kept_padding")(L.ReLU()(y)))
    model_1d = keras.Model(x, y)

    x = keras.Input((2, 5, 5, 5))
    y = bn("bn_conv")(L.Conv3D(4, 2, groups=2, **cf)(x))
    y = L.Conv3D(4, 2, **cf)(bn("bn_back_conv")(L.ReLU()(y)))
    y = bn("bn_deconv")(L.Conv3DTranspose(3, 2, strides=2, **cf)(y))
    model_3d = keras.Model(x, y)
    return [(model_2d, 0), (model_1d, 1), (model_3d, 0)]


def conv_bn_classifier(seed: int = 0) -> keras.Model:
    """Conv-BN-ReLU-Conv-BN-ReLU-GlobalAveragePooling-Dense(softmax), input (8, 8, 3).

    Its BNs get ``randomize_batch_norms(gain=(0.6, 1.4))``: the default statistics
    scale activations up to ~60x per BN and saturate the softmax, so that two seeds'
    models give the same outputs and int8 flips near-ties.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(4, 3, padding="same")(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.Conv2D(6, 3, padding="same", use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(3, activation="softmax")(x)
    model = keras.Model(inputs, outputs, name="classifier")
    return randomize_batch_norms(model, seed, gain=(0.6, 1.4))


def tiny_model() -> keras.Model:
    """Pad-Conv-BN-ReLU-GlobalAveragePooling-Dense, input (6, 6, 3) named "image"."""
    x = keras.Input((6, 6, 3), name="image")
    h = L.ZeroPadding2D(1, name="pad")(x)
    h = L.Conv2D(4, 3, strides=2, name="conv")(h)
    h = L.BatchNormalization(name="bn")(h)
    h = L.GlobalAveragePooling2D(name="gap")(L.ReLU(name="relu")(h))
    return keras.Model(x, L.Dense(3, name="logits")(h), name="tiny")

"""The float64 twin's depthwise convolution as a sum over kernel taps, checked against a
direct NumPy convolution and against Keras's own float64 layer."""

import keras
import numpy as np
import pytest

from keras_bn.converters.float64_kernels import (
    TWIN_LAYERS,
    TapsDepthwiseConv1D,
    TapsDepthwiseConv2D,
    depthwise_conv_taps,
    replaced_class_name,
)

L = keras.layers

# (kernel_size, strides, padding, dilation_rate, depth_multiplier, data_format, input size);
# a 1-D case takes the first entry of a pair.
CASES = {
    "3x3-same": (3, 1, "same", 1, 1, "channels_last", 7),
    "3x3-stride2-same-mult2-first": (3, 2, "same", 1, 2, "channels_first", 7),
    "5x5-same": (5, 1, "same", 1, 1, "channels_last", 8),
    "4x4-stride2-valid-mult3": (4, 2, "valid", 1, 3, "channels_last", 9),
    "3x3-dilation2-valid-first": (3, 1, "valid", 2, 1, "channels_first", 8),
    "5x5-dilation2-same-mult2": (5, 1, "same", 2, 2, "channels_last", 7),
    "2x2-stride3-same-first": (2, 3, "same", 1, 1, "channels_first", 8),
    "3x2-stride2x1-dilation1x2-same": ((3, 2), (2, 1), "same", (1, 2), 1, "channels_last", 7),
    "5x5-on-4x4-same": (5, 1, "same", 1, 1, "channels_last", 4),  # EfficientNet's slow case
}


def _tuple(value, rank):
    return tuple(value)[:rank] if isinstance(value, tuple) else (value,) * rank


def _numpy_depthwise(x, kernel, strides, padding, dilation, data_format):
    """Direct float64 depthwise convolution: every output element summed on its own."""
    rank = kernel.ndim - 2
    if data_format == "channels_first":
        x = np.moveaxis(x, 1, -1)
    channels, multiplier = kernel.shape[-2:]
    sizes, ks = x.shape[1:-1], kernel.shape[:rank]
    if padding == "same":
        pads = []
        for size, k, s, d in zip(sizes, ks, strides, dilation, strict=True):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        x = np.pad(x, [(0, 0), *pads, (0, 0)])
    sizes = x.shape[1:-1]
    counts = [
        (size - (k - 1) * d - 1) // s + 1
        for size, k, s, d in zip(sizes, ks, strides, dilation, strict=True)
    ]
    out = np.zeros((x.shape[0], *counts, channels * multiplier))
    for position in np.ndindex(*counts):
        for c in range(channels):
            for m in range(multiplier):
                total = np.zeros(x.shape[0])
                for tap in np.ndindex(*ks):
                    where = tuple(
                        p * s + t * d
                        for p, s, t, d in zip(position, strides, tap, dilation, strict=True)
                    )
                    total += x[(slice(None), *where, c)] * kernel[(*tap, c, m)]
                out[(slice(None), *position, c * multiplier + m)] = total
    return np.moveaxis(out, -1, 1) if data_format == "channels_first" else out


def _case_arrays(rank, case, seed=0):
    kernel_size, _, _, _, multiplier, data_format, size = case
    rng = np.random.default_rng(seed)
    spatial = tuple(range(size, size + rank))  # unequal sizes
    channels = 5
    shape = (2, *spatial, channels) if data_format == "channels_last" else (2, channels, *spatial)
    x = rng.standard_normal(shape)
    kernel = rng.standard_normal((*_tuple(kernel_size, rank), channels, multiplier))
    return x, kernel


@pytest.mark.parametrize("rank", [1, 2], ids=["1d", "2d"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_taps_equal_a_direct_numpy_convolution(rank, case):
    _, strides, padding, dilation, _, data_format, _ = case
    x, kernel = _case_arrays(rank, case)
    strides, dilation = _tuple(strides, rank), _tuple(dilation, rank)
    want = _numpy_depthwise(x, kernel, strides, padding, dilation, data_format)
    got = keras.ops.convert_to_numpy(
        depthwise_conv_taps(x, kernel, strides, padding, dilation, data_format)
    )
    assert got.dtype == np.float64 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("rank", [1, 2], ids=["1d", "2d"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_taps_layer_equals_the_keras_layer_in_float64(rank, case):
    """Same config, same weights (bias and activation included): the layer's own result."""
    kernel_size, strides, padding, dilation, multiplier, data_format, _ = case
    native_class = L.DepthwiseConv2D if rank == 2 else L.DepthwiseConv1D
    native = native_class(
        _tuple(kernel_size, rank),
        strides=_tuple(strides, rank),
        padding=padding,
        dilation_rate=_tuple(dilation, rank),
        depth_multiplier=multiplier,
        data_format=data_format,
        activation="tanh",
        bias_initializer="random_normal",
        dtype="float64",
    )
    taps = TWIN_LAYERS[native_class].from_config(native.get_config())
    x, _ = _case_arrays(rank, case, seed=1)
    want = keras.ops.convert_to_numpy(native(x))
    taps.build(x.shape)
    assert [w.path.split("/")[-1] for w in taps.weights] == [
        w.path.split("/")[-1] for w in native.weights
    ]
    for source, target in zip(native.weights, taps.weights, strict=True):
        target.assign(keras.ops.convert_to_numpy(source))
    got = keras.ops.convert_to_numpy(taps(x))
    assert got.dtype == np.float64 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


def test_only_the_exact_keras_classes_are_replaced():
    assert TWIN_LAYERS == {
        L.DepthwiseConv1D: TapsDepthwiseConv1D,
        L.DepthwiseConv2D: TapsDepthwiseConv2D,
    }
    assert issubclass(TapsDepthwiseConv2D, L.DepthwiseConv2D)


def test_the_jax_twin_uses_taps_and_one_compiled_pass(run_python):
    """On JAX the twin's depthwise convolutions are the taps layers, the pass is compiled
    once, and the result is NumPy's float64 convolution."""
    code = """
import sys
sys.path.insert(0, "tests/validation")
import keras
import numpy as np
import test_float64_kernels as t
from keras_bn.converters.float64_kernels import TapsDepthwiseConv2D
from keras_bn.converters.reference import float64_twin

inputs = keras.Input((4, 4, 6))
outputs = keras.layers.DepthwiseConv2D(5, padding="same", use_bias=False, name="dw")(inputs)
model = keras.Model(inputs, outputs)
x = np.random.default_rng(0).standard_normal((3, 4, 4, 6)).astype("float32")
twin = float64_twin(model, [x])
assert isinstance(twin.model.get_layer("dw"), TapsDepthwiseConv2D)
assert twin._jitted is not None  # one compiled pass
kernel = np.asarray(keras.ops.convert_to_numpy(model.get_layer("dw").kernel), np.float64)
want = t._numpy_depthwise(x.astype(np.float64), kernel, (1, 1), "same", (1, 1), "channels_last")
(got,) = twin([x])
assert got.dtype == np.float64
assert np.abs(got - want).max() < 1e-12, np.abs(got - want).max()
(again,) = twin([x[:1]])  # another shape: compiled again, same function
assert np.abs(again - want[:1]).max() < 1e-12
print("ok")
"""
    result = run_python(["-c", code], env={"KERAS_BACKEND": "jax"})
    assert result.stdout.strip().endswith("ok")


def test_a_failing_replacement_is_named_as_the_keras_class():
    """float64_twin keeps a failing layer class float32 by the name in the error."""
    assert replaced_class_name("TapsDepthwiseConv2D") == "DepthwiseConv2D"
    assert replaced_class_name("TapsDepthwiseConv1D") == "DepthwiseConv1D"
    assert replaced_class_name("Conv2D") == "Conv2D"

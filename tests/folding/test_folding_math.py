"""The folding maths against independent NumPy references (no Keras).

Each property test builds a random layer configuration, applies BatchNormalization
the slow way (convolve, then normalize; or normalize, then convolve) with NumPy
reference convolutions written out loop by loop, and checks the folded kernel and
bias give the same outputs in float64. Hundreds of cases run in seconds; the Keras
adapter is tested end to end in test_folding.py.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_bn.converters.folding import maths as folding_math

# ---------------------------------------------------------------------------
# Independent NumPy references (channels_last; kernels in Keras 3 layouts).


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow/Keras "same": output ceil(size / stride), extra padding after."""
    extent = (kernel - 1) * dilation + 1
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


def conv_reference(x, kernel, bias, *, strides, dilations, padding, groups=1):
    """Grouped N-d convolution: x (batch, *spatial, in), kernel (*k, in/groups, out)."""
    rank = kernel.ndim - 2
    ksize = kernel.shape[:rank]
    if padding == "same":
        pads = [(0, 0)]
        for size, k, s, d in zip(x.shape[1:-1], ksize, strides, dilations, strict=True):
            pads.append(_same_padding(size, k, s, d))
        pads.append((0, 0))
        x = np.pad(x, pads)
    out_sizes = [
        (size - (k - 1) * d - 1) // s + 1
        for size, k, s, d in zip(x.shape[1:-1], ksize, strides, dilations, strict=True)
    ]
    in_per_group, out = kernel.shape[-2], kernel.shape[-1]
    out_per_group = out // groups
    y = np.zeros((x.shape[0], *out_sizes, out))
    for position in np.ndindex(*ksize):
        window = tuple(
            slice(p * d, p * d + (o - 1) * s + 1, s)
            for p, d, o, s in zip(position, dilations, out_sizes, strides, strict=True)
        )
        patch = x[(slice(None), *window)]
        for g in range(groups):
            inputs = patch[..., g * in_per_group : (g + 1) * in_per_group]
            outputs = slice(g * out_per_group, (g + 1) * out_per_group)
            y[..., outputs] += inputs @ kernel[position][:, outputs]
    return y if bias is None else y + bias


def depthwise_reference(x, kernel, bias, *, strides, dilations, padding):
    """Depthwise conv written out: output channel c * dm + m reads input channel c."""
    channels, depth_multiplier = kernel.shape[-2:]
    outputs = []
    for c in range(channels):
        for m in range(depth_multiplier):
            single = kernel[..., c : c + 1, m : m + 1]
            outputs.append(
                conv_reference(
                    x[..., c : c + 1],
                    single,
                    None,
                    strides=strides,
                    dilations=dilations,
                    padding=padding,
                )
            )
    y = np.concatenate(outputs, axis=-1)
    return y if bias is None else y + bias


def conv_transpose_reference(x, kernel, bias, *, strides):
    """Full transposed convolution (no cropping): kernel (*k, out, in)."""
    rank = kernel.ndim - 2
    ksize = kernel.shape[:rank]
    out_sizes = [(n - 1) * s + k for n, s, k in zip(x.shape[1:-1], strides, ksize, strict=True)]
    y = np.zeros((x.shape[0], *out_sizes, kernel.shape[-2]))
    for position in np.ndindex(*ksize):
        window = tuple(
            slice(p, p + (n - 1) * s + 1, s)
            for p, n, s in zip(position, x.shape[1:-1], strides, strict=True)
        )
        y[(slice(None), *window)] += x @ kernel[position].T
    return y if bias is None else y + bias


def batch_norm_reference(x, stats, axis=-1):
    """Inference BN exactly as written in the Keras docs, float64."""
    gamma, beta, mean, variance, epsilon = stats
    shape = [1] * x.ndim
    shape[axis] = -1
    gamma = 1.0 if gamma is None else gamma.reshape(shape)
    beta = 0.0 if beta is None else beta.reshape(shape)
    return gamma * (x - mean.reshape(shape)) / np.sqrt(variance.reshape(shape) + epsilon) + beta


# ---------------------------------------------------------------------------
# Strategies.


def random_stats(rng, channels, *, center=True, scale=True, epsilon=1e-3):
    """Non-trivial BN statistics: mean != 0, variance over 6 decades, gamma != 1."""
    gamma = rng.uniform(0.2, 3.0, channels) * rng.choice([-1.0, 1.0], channels)
    beta = rng.normal(0.0, 2.0, channels)
    mean = rng.normal(0.0, 3.0, channels)
    variance = 10.0 ** rng.uniform(-4.0, 2.0, channels)
    return (gamma if scale else None, beta if center else None, mean, variance, epsilon)


def affine_of(stats):
    gamma, beta, mean, variance, epsilon = stats
    return folding_math.batch_norm_affine(mean, variance, epsilon, gamma=gamma, beta=beta)


@st.composite
def conv_cases(draw, *, max_groups=3):
    rank = draw(st.integers(1, 3))
    groups = draw(st.integers(1, max_groups))
    in_channels = groups * draw(st.integers(1, 2))
    out_channels = groups * draw(st.integers(1, 2))
    ksize = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    strided = draw(st.booleans())
    strides = tuple(draw(st.integers(1, 3)) if strided else 1 for _ in range(rank))
    dilations = tuple(1 if strided else draw(st.integers(1, 2)) for _ in range(rank))
    spatial = tuple(
        draw(st.integers((k - 1) * d + 1, (k - 1) * d + 4))
        for k, d in zip(ksize, dilations, strict=True)
    )
    if rank == 3:  # keep 3-D cases small
        spatial = tuple(
            min(s, max(4, (k - 1) * d + 1))
            for s, k, d in zip(spatial, ksize, dilations, strict=True)
        )
    return {
        "groups": groups,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "ksize": ksize,
        "strides": strides,
        "dilations": dilations,
        "spatial": spatial,
        "padding": draw(st.sampled_from(["valid", "same"])),
        "use_bias": draw(st.booleans()),
        "center": draw(st.booleans()),
        "scale": draw(st.booleans()),
        "epsilon": draw(st.sampled_from([1e-3, 1e-5, 1e-10])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _conv_arrays(case):
    rng = np.random.default_rng(case["seed"])
    x = rng.normal(size=(2, *case["spatial"], case["in_channels"]))
    kernel = rng.normal(
        size=(*case["ksize"], case["in_channels"] // case["groups"], case["out_channels"])
    )
    bias = rng.normal(size=case["out_channels"]) if case["use_bias"] else None
    return rng, x, kernel, bias


def _assert_close(received, expected):
    np.testing.assert_allclose(received, expected, rtol=1e-9, atol=1e-9 * np.max(np.abs(expected)))


# ---------------------------------------------------------------------------
# The BN affine.


@given(st.booleans(), st.booleans(), st.sampled_from([1e-3, 1e-8]), st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_batch_norm_affine_is_inference_batch_norm(center, scale, epsilon, seed):
    rng = np.random.default_rng(seed)
    stats = random_stats(rng, 5, center=center, scale=scale, epsilon=epsilon)
    x = rng.normal(size=(3, 5)) * 10
    scale_, offset = affine_of(stats)
    assert scale_.dtype == offset.dtype == np.float64
    _assert_close(x * scale_ + offset, batch_norm_reference(x, stats))


def test_compose_affines_applies_first_then_second():
    rng = np.random.default_rng(0)
    first = affine_of(random_stats(rng, 4))
    second = affine_of(random_stats(rng, 4))
    x = rng.normal(size=(6, 4))
    scale, offset = folding_math.compose_affines(first, second)
    expected = (x * first[0] + first[1]) * second[0] + second[1]
    _assert_close(x * scale + offset, expected)


# ---------------------------------------------------------------------------
# Forward folding: layer -> BN.


@given(conv_cases())
@settings(max_examples=250, deadline=None)
def test_fold_forward_conv_matches_conv_then_batch_norm(case):
    rng, x, kernel, bias = _conv_arrays(case)
    stats = random_stats(
        rng,
        case["out_channels"],
        center=case["center"],
        scale=case["scale"],
        epsilon=case["epsilon"],
    )
    options = dict(
        strides=case["strides"],
        dilations=case["dilations"],
        padding=case["padding"],
        groups=case["groups"],
    )
    expected = batch_norm_reference(conv_reference(x, kernel, bias, **options), stats)
    new_kernel, new_bias = folding_math.fold_forward(
        kernel, bias, *affine_of(stats), channel_axis=-1
    )
    _assert_close(conv_reference(x, new_kernel, new_bias, **options), expected)


@given(
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(1, 6),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
@settings(max_examples=60, deadline=None)
def test_fold_forward_dense_on_any_rank(rank, units_in, units_out, use_bias, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2,) * rank + (units_in,))
    kernel = rng.normal(size=(units_in, units_out))
    bias = rng.normal(size=units_out) if use_bias else None
    stats = random_stats(rng, units_out)
    expected = batch_norm_reference(x @ kernel + (0 if bias is None else bias), stats)
    new_kernel, new_bias = folding_math.fold_forward(kernel, bias, *affine_of(stats))
    _assert_close(x @ new_kernel + new_bias, expected)


@given(conv_cases(max_groups=1), st.integers(1, 3))
@settings(max_examples=120, deadline=None)
def test_fold_forward_depthwise_matches_written_out_depthwise(case, depth_multiplier):
    rng = np.random.default_rng(case["seed"])
    channels = case["in_channels"] + 1
    x = rng.normal(size=(2, *case["spatial"], channels))
    kernel = rng.normal(size=(*case["ksize"], channels, depth_multiplier))
    out = channels * depth_multiplier
    bias = rng.normal(size=out) if case["use_bias"] else None
    stats = random_stats(rng, out, center=case["center"], scale=case["scale"])
    options = dict(strides=case["strides"], dilations=case["dilations"], padding=case["padding"])
    expected = batch_norm_reference(depthwise_reference(x, kernel, bias, **options), stats)
    new_kernel, new_bias = folding_math.fold_forward(
        kernel, bias, *affine_of(stats), channel_axis=(-2, -1)
    )
    assert new_kernel.shape == kernel.shape
    _assert_close(depthwise_reference(x, new_kernel, new_bias, **options), expected)


@given(
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(1, 4),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
@settings(max_examples=80, deadline=None)
def test_fold_forward_conv_transpose_uses_output_axis_minus_two(
    rank, k, stride, cin, cout, use_bias, seed
):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2,) + (3,) * rank + (cin,))
    kernel = rng.normal(size=(k,) * rank + (cout, cin))
    bias = rng.normal(size=cout) if use_bias else None
    stats = random_stats(rng, cout)
    strides = (stride,) * rank
    expected = batch_norm_reference(
        conv_transpose_reference(x, kernel, bias, strides=strides), stats
    )
    new_kernel, new_bias = folding_math.fold_forward(
        kernel, bias, *affine_of(stats), channel_axis=-2
    )
    _assert_close(conv_transpose_reference(x, new_kernel, new_bias, strides=strides), expected)


# ---------------------------------------------------------------------------
# Backward folding: BN -> layer.


@given(conv_cases())
@settings(max_examples=250, deadline=None)
def test_fold_backward_conv_is_exact_without_padding(case):
    rng, x, kernel, bias = _conv_arrays(case)
    stats = random_stats(
        rng,
        case["in_channels"],
        center=case["center"],
        scale=case["scale"],
        epsilon=case["epsilon"],
    )
    padding = "valid" if any(k > 1 for k in case["ksize"]) else case["padding"]
    options = dict(
        strides=case["strides"], dilations=case["dilations"], padding=padding, groups=case["groups"]
    )
    expected = conv_reference(batch_norm_reference(x, stats), kernel, bias, **options)
    new_kernel, new_bias = folding_math.fold_backward(
        kernel, bias, *affine_of(stats), groups=case["groups"]
    )
    _assert_close(conv_reference(x, new_kernel, new_bias, **options), expected)


@given(conv_cases(max_groups=1), st.integers(1, 3))
@settings(max_examples=100, deadline=None)
def test_fold_backward_depthwise_through_grouped_form(case, depth_multiplier):
    rng = np.random.default_rng(case["seed"])
    channels = case["in_channels"] + 1
    x = rng.normal(size=(2, *case["spatial"], channels))
    kernel = rng.normal(size=(*case["ksize"], channels, depth_multiplier))
    bias = rng.normal(size=channels * depth_multiplier) if case["use_bias"] else None
    stats = random_stats(rng, channels, center=case["center"], scale=case["scale"])
    options = dict(strides=case["strides"], dilations=case["dilations"], padding="valid")
    expected = depthwise_reference(batch_norm_reference(x, stats), kernel, bias, **options)
    grouped, groups = folding_math.depthwise_as_grouped(kernel)
    assert groups == channels
    new_grouped, new_bias = folding_math.fold_backward(
        grouped, bias, *affine_of(stats), groups=groups
    )
    new_kernel = folding_math.grouped_as_depthwise(new_grouped, channels)
    _assert_close(depthwise_reference(x, new_kernel, new_bias, **options), expected)


@given(
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(1, 6),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
@settings(max_examples=60, deadline=None)
def test_fold_backward_dense_on_any_rank(rank, units_in, units_out, use_bias, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2,) * rank + (units_in,))
    kernel = rng.normal(size=(units_in, units_out))
    bias = rng.normal(size=units_out) if use_bias else None
    stats = random_stats(rng, units_in)
    expected = batch_norm_reference(x, stats) @ kernel + (0 if bias is None else bias)
    new_kernel, new_bias = folding_math.fold_backward(kernel, bias, *affine_of(stats))
    _assert_close(x @ new_kernel + new_bias, expected)


@pytest.mark.parametrize("groups", [1, 2], ids=["plain", "grouped"])
def test_fold_backward_is_wrong_at_zero_padded_borders(groups):
    """Why backward folding refuses padding: exact inside, wrong where zeros are padded."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 6, 6, 2))
    kernel = rng.normal(size=(3, 3, 2 // groups, 4))
    stats = random_stats(rng, 2)
    options = dict(strides=(1, 1), dilations=(1, 1), padding="same", groups=groups)
    expected = conv_reference(batch_norm_reference(x, stats), kernel, None, **options)
    folded = conv_reference(
        x, *folding_math.fold_backward(kernel, None, *affine_of(stats), groups=groups), **options
    )
    _assert_close(folded[:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1])
    border_error = np.max(np.abs(folded - expected))
    assert border_error > 1e-3 * np.max(np.abs(expected))


def test_grouped_backward_reads_each_groups_own_input_channels():
    """A kernel entry of group g scales with input channel g * in_per_group + j."""
    kernel = np.ones((1, 2, 4))  # 2 groups: in 4 = 2 x 2, out 4 = 2 x 2
    scale = np.array([1.0, 2.0, 3.0, 4.0])
    new_kernel, new_bias = folding_math.fold_backward(kernel, None, scale, scale * 10, groups=2)
    np.testing.assert_array_equal(new_kernel[0], [[1, 1, 3, 3], [2, 2, 4, 4]])
    np.testing.assert_array_equal(new_bias, [30, 30, 70, 70])


# ---------------------------------------------------------------------------
# Rounding and float16 risks.


def test_round_to_dtype_rounds_float64_once_to_nearest():
    values = np.array([1.0 + 2.0**-24 + 2.0**-50, np.pi, -1e-30])
    rounded = folding_math.round_to_dtype(values, "float32")
    assert rounded.dtype == np.float32
    # Nearest float32 above 1 + 2**-24 (a tie that double rounding would send down).
    assert rounded[0] == np.nextafter(np.float32(1), np.float32(2))
    np.testing.assert_array_equal(rounded[1:], np.array(values[1:], np.float32))
    bf16 = folding_math.round_to_dtype(np.array([1.0 + 2.0**-8 + 2.0**-30]), "bfloat16")
    assert float(bf16[0]) == 1.0 + 2.0**-7


def test_float16_risks_flag_channels_a_float16_cast_damages():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 2, 4))
    scale = np.array([1.0, 1e6, 1e-6, 1.0])  # channel 1 overflows, channel 2 underflows
    offset = np.array([0.0, 0.0, 0.0, 1e5])  # channel 3 overflows through its bias
    new_kernel, new_bias = folding_math.fold_forward(kernel, None, scale, offset)
    risks = folding_math.float16_risks(new_kernel, new_bias, channel_axis=-1)
    assert [(r.channel, r.kind) for r in risks] == [
        (1, "overflow"),
        (2, "underflow"),
        (3, "overflow"),
    ]
    # Independent check: what a float16 cast does to those channels.
    with np.errstate(over="ignore"):
        as_float16 = new_kernel.astype(np.float16)
        assert np.isinf(new_bias.astype(np.float16)[3])
    assert np.isinf(as_float16[..., 1]).any()
    assert not np.isinf(as_float16[..., [0, 2, 3]]).any()
    relative_error = np.abs(as_float16[..., 2] - new_kernel[..., 2]) / np.abs(new_kernel[..., 2])
    assert relative_error.max() > 1e-2  # subnormal float16: few significant bits left
    assert risks[0].value == pytest.approx(np.max(np.abs(new_kernel[..., 1])))


def test_float16_risks_per_depthwise_output_channel():
    kernel = np.ones((3, 3, 2, 2))
    scale = np.array([1.0, 1.0, 1e5, 1.0])  # output channel 2 = input 1, multiplier 0
    new_kernel, new_bias = folding_math.fold_forward(
        kernel, None, scale, np.zeros(4), channel_axis=(-2, -1)
    )
    risks = folding_math.float16_risks(new_kernel, new_bias, channel_axis=(-2, -1))
    assert [(r.channel, r.kind, r.value) for r in risks] == [(2, "overflow", 1e5)]


@pytest.mark.parametrize(
    "shape, channel_axis",
    [((3, 3, 8, 6), -1), ((5, 7), -1), ((3, 3, 4, 2), (-2, -1)), ((2, 2, 6, 5), -2)],
    ids=["conv", "dense", "depthwise", "conv-transpose"],
)
@pytest.mark.parametrize("kernel_dtype", ["float32", "float64"])
def test_a_deferred_fold_gives_the_same_bits_as_the_multiplied_out_one(
    shape, channel_axis, kernel_dtype
):
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=shape).astype(kernel_dtype)
    axes = [a % len(shape) for a in np.atleast_1d(channel_axis)]
    channels = int(np.prod([shape[a] for a in axes]))
    # scales spanning float16 overflow and underflow, some negative
    scale = rng.choice([-1.0, 1.0], channels) * 10.0 ** rng.uniform(-9, 6, channels)
    offset = rng.normal(size=channels)
    eager = folding_math.fold_forward(kernel, None, scale, offset, channel_axis=channel_axis)
    deferred = folding_math.fold_forward(
        kernel, None, scale, offset, channel_axis=channel_axis, deferred=True
    )
    assert isinstance(deferred[0], folding_math.ScaledKernel)
    np.testing.assert_array_equal(deferred[1], eager[1])
    np.testing.assert_array_equal(np.asarray(deferred[0]), eager[0])
    for dtype in ("float32", "float16", "bfloat16"):
        with np.errstate(over="ignore"):  # float16: the large scales overflow to inf
            expected = folding_math.round_to_dtype(eager[0], dtype)
            actual = folding_math.round_to_dtype(deferred[0], dtype)
        assert actual.dtype == expected.dtype
        np.testing.assert_array_equal(actual.view(np.uint8), expected.view(np.uint8))
    assert folding_math.float16_risks(*deferred, channel_axis=channel_axis) == (
        folding_math.float16_risks(*eager, channel_axis=channel_axis)
    )
    # a deferred kernel folded again, or read as float64 by the other maths
    again = folding_math.fold_forward(
        deferred[0], deferred[1], scale, offset, channel_axis=channel_axis
    )
    expected = folding_math.fold_forward(
        eager[0], eager[1], scale, offset, channel_axis=channel_axis
    )
    np.testing.assert_array_equal(again[0], expected[0])


# ---------------------------------------------------------------------------
# Bad arguments.


def test_bad_shapes_raise_value_errors():
    kernel = np.ones((3, 2, 4))
    with pytest.raises(ValueError, match="Expected 4 channels"):
        folding_math.fold_forward(kernel, None, np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="groups=3"):
        folding_math.fold_backward(kernel, None, np.ones(6), np.ones(6), groups=3)
    with pytest.raises(ValueError, match="Expected 4 input channels"):
        folding_math.fold_backward(kernel, None, np.ones(3), np.ones(3), groups=2)
    with pytest.raises(ValueError, match="adjacent"):
        folding_math.fold_forward(
            np.ones((2, 3, 4)), None, np.ones(8), np.ones(8), channel_axis=(0, 2)
        )


def _dense_error(x, scale, offset, kernel, folded):
    """The float32 error of ``(x * scale + offset) @ kernel``, unfolded or folded
    (:func:`fold_backward`), relative to its largest float64 output."""
    exact = (x.astype(np.float64) * scale + offset) @ kernel
    if folded:
        new_kernel, bias = folding_math.fold_backward(kernel, None, scale, offset)
        got = x @ new_kernel.astype(np.float32) + bias.astype(np.float32)
    else:
        got = (x * scale.astype(np.float32) + offset.astype(np.float32)) @ kernel.astype(np.float32)
    return float(np.abs(got - exact).max() / np.abs(exact).max())


def test_backward_cancellation_predicts_the_precision_a_backward_fold_loses():
    """Raw readings far from 0 (1000 +- 1) folded into the next Dense: the folded layer
    sums terms about 1000x its output, and its float32 error is far beyond the
    unfolded layer's; readings near 0 lose nothing. The measure is 1 + |mean| / spread
    for an uncentred BN, and a scale-0 channel counts for nothing."""
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((32, 8)) / 6
    spread = rng.uniform(0.5, 2.0, 32)
    errors, measures = {}, {}
    for offset_in_spreads in (0.5, 1000.0):
        mean = offset_in_spreads * spread * rng.choice([-1.0, 1.0], 32)
        scale, offset = folding_math.batch_norm_affine(mean, spread**2, 0.0)
        measures[offset_in_spreads] = folding_math.backward_cancellation(
            scale, offset, mean, spread**2
        )
        assert measures[offset_in_spreads] == pytest.approx(1 + offset_in_spreads)
        x = (mean + spread * rng.standard_normal((2048, 32))).astype(np.float32)
        errors[offset_in_spreads] = [_dense_error(x, scale, offset, kernel, f) for f in (0, 1)]
    (near_unfolded, near_folded), (far_unfolded, far_folded) = errors[0.5], errors[1000.0]
    # The folded layer's error grows as the measure does (667x from near to far; 430-920x
    # measured over seeds, BLAS kernels and accumulation orders).
    predicted = measures[1000.0] / measures[0.5]
    assert predicted / 2 < far_folded / near_folded < 2 * predicted
    # Keras's own BN (``x * inv + (offset - mean * inv)``) already cancels per element,
    # so the unfolded error grows too, but less (110-330x): the folded sums cancel
    # across the layer's inputs on top of it. By how much depends on how the float32
    # sums are accumulated: 1.7-3.7x over seeds with OpenBLAS's AVX-512 kernels, 2.5-6.8x
    # summed in input order, 4.6-12x with the AVX2 kernels this was first measured on.
    assert near_folded <= 2 * near_unfolded
    assert far_folded > 1.5 * far_unfolded
    assert 1.0 + 1000.0 > folding_math.BACKWARD_CANCELLATION_LIMIT > 1.0 + 0.5
    scale, offset = np.array([0.0, 1.0]), np.array([0.0, 0.0])
    assert folding_math.backward_cancellation(scale, offset, [1e6, 0.0], [1.0, 1.0]) == 1.0

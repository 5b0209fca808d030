"""Every ONNX rule against Keras: export a tiny model, run it in onnxruntime, compare.

The reference is the Keras model itself (``model(x, training=False)``); the ONNX
side runs in onnxruntime with graph optimizations disabled so that what is tested
is the graph we wrote. Channels-first layers (which TensorFlow cannot run on CPU)
are tested on the JAX backend in ``test_onnx_export.py``.
"""

import warnings

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from keras import layers, ops
from support.models import randomize_batch_norms

from keras_bn import BatchNormalization as KerasBnBatchNormalization
from keras_bn.converters.onnx.export import export_onnx
from keras_bn.converters.onnx.rules import ACTIVATIONS, RULES, SHADOWED_OPS, find_rule
from keras_bn.converters.onnx.rules import OPS as OP_RULES


def _session(path):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _inputs(model, batch=3, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    arrays = []
    for tensor in model.inputs:
        shape = (batch, *tensor.shape[1:])
        if "int" in str(tensor.dtype):
            arrays.append(rng.integers(0, 10, size=shape).astype(tensor.dtype))
        else:
            arrays.append((scale * rng.standard_normal(shape)).astype(tensor.dtype))
    return arrays


def export_and_compare(model, tmp_path, inputs=None, *, opset=None, atol=2e-5, rtol=1e-4):
    """Export ``model``, run both, assert the outputs match; return (result, onnx model)."""
    path = tmp_path / f"{model.name}.onnx"
    result = export_onnx(model, path, opset=opset)
    arrays = _inputs(model) if inputs is None else inputs
    expected = model(arrays if len(arrays) > 1 else arrays[0], training=False)
    expected = [keras.ops.convert_to_numpy(e) for e in keras.tree.flatten(expected)]
    session = _session(path)
    feed = {i.name: a for i, a in zip(session.get_inputs(), arrays, strict=True)}
    actual = session.run(None, feed)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, atol=atol, rtol=rtol)
    return result, onnx.load(str(path))


def sequential(input_shape, *stack, dtype="float32", name="model"):
    return keras.Sequential([keras.Input(input_shape, dtype=dtype), *stack], name=name)


# --------------------------------------------------------------------------------------
# Core layers.

CORE = {
    "dense-rank2-relu": lambda: sequential((6,), layers.Dense(4, activation="relu")),
    "dense-rank2-no-bias": lambda: sequential((6,), layers.Dense(4, use_bias=False)),
    "dense-rank3-tanh": lambda: sequential((5, 6), layers.Dense(4, activation="tanh")),
    "dense-rank4-keras-layout": lambda: sequential((3, 2, 6), layers.Dense(4)),
    "embedding": lambda: sequential(
        (5,), layers.Embedding(10, 4), layers.Flatten(), layers.Dense(3), dtype="int32"
    ),
    "relu-layer": lambda: sequential((8,), layers.ReLU()),
    "relu-max-value": lambda: sequential((8,), layers.ReLU(max_value=1.5)),
    "relu-negative-slope": lambda: sequential((8,), layers.ReLU(negative_slope=0.1)),
    "relu-threshold": lambda: sequential((8,), layers.ReLU(threshold=0.5)),
    "relu-all-arguments": lambda: sequential(
        (8,), layers.ReLU(max_value=1.0, negative_slope=0.2, threshold=0.3)
    ),
    "relu-max-and-slope": lambda: sequential((8,), layers.ReLU(max_value=0.8, negative_slope=0.3)),
    "leaky-relu": lambda: sequential((8,), layers.LeakyReLU(negative_slope=0.25)),
    "prelu-rank2": lambda: sequential(
        (8,), layers.PReLU(alpha_initializer=keras.initializers.RandomUniform(0.1, 0.5))
    ),
    "prelu-shared-after-conv": lambda: sequential(
        (6, 6, 3),
        layers.Conv2D(4, 3),
        layers.PReLU(
            alpha_initializer=keras.initializers.RandomUniform(0.1, 0.5), shared_axes=[1, 2]
        ),
    ),
    "elu": lambda: sequential((8,), layers.ELU(alpha=0.7)),
    "softmax-layer-axis1": lambda: sequential((4, 5), layers.Softmax(axis=1)),
    "softmax-layer-two-axes": lambda: sequential((4, 5), layers.Softmax(axis=(1, 2))),
    "softmax-after-conv": lambda: sequential(
        (5, 5, 3), layers.Conv2D(4, 3), layers.Activation("softmax")
    ),
    "repeat-vector": lambda: sequential((6,), layers.Dense(4), layers.RepeatVector(3)),
}


@pytest.mark.parametrize("build", CORE.values(), ids=CORE.keys())
def test_core_layers(build, tmp_path):
    export_and_compare(build(), tmp_path)


def test_dense_on_channels_first_tensor_is_a_1x1_convolution(tmp_path):
    model = sequential((6, 6, 3), layers.Conv2D(4, 3), layers.Dense(5, activation="relu"))
    result, _ = export_and_compare(model, tmp_path)
    assert result.op_counts.get("MatMul", 0) == 0
    assert result.op_counts["Conv"] == 2
    assert result.op_counts["Transpose"] == 2  # at the input, and back for the output


@pytest.mark.parametrize("activation", list(ACTIVATIONS), ids=[fn.__name__ for fn in ACTIVATIONS])
def test_every_activation_function(activation, tmp_path):
    model = sequential((4, 6), layers.Activation(activation))
    # Wide inputs reach every regime (saturation of hard_sigmoid, shrink thresholds).
    export_and_compare(model, tmp_path, _inputs(model, scale=3.0))


@pytest.mark.parametrize("opset", [17, 20], ids=["decomposed", "gelu-op"])
@pytest.mark.parametrize("approximate", [False, True], ids=["exact", "tanh"])
def test_gelu(approximate, opset, tmp_path):
    x = keras.Input((10,))
    model = keras.Model(x, ops.gelu(x, approximate=approximate), name="gelu")
    result, _ = export_and_compare(model, tmp_path, _inputs(model, scale=3.0), opset=opset)
    assert ("Gelu" in result.op_counts) == (opset >= 20)


@pytest.mark.parametrize("opset", [17, 18])
def test_mish_decomposed_and_native(opset, tmp_path):
    model = sequential((10,), layers.Activation("mish"))
    result, _ = export_and_compare(model, tmp_path, opset=opset)
    assert ("Mish" in result.op_counts) == (opset >= 18)


def test_hard_swish_before_opset_14(tmp_path):
    model = sequential((10,), layers.Activation("hard_swish"))
    result, _ = export_and_compare(model, tmp_path, _inputs(model, scale=4.0), opset=13)
    assert "HardSwish" not in result.op_counts


OPS = {
    "add-scalar": lambda x: x + 3.0,
    "scalar-minus": lambda x: 2.0 - x,
    "divide-scalar": lambda x: x / 6.0,
    "multiply-self": lambda x: x * x,
    "maximum-scalar": lambda x: ops.maximum(x, 0.5),
    "minimum-scalar": lambda x: ops.minimum(x, 0.5),
    "negative": lambda x: -x,
    "relu": ops.relu,
    "relu6": ops.relu6,
    "sigmoid": ops.sigmoid,
    "silu": ops.silu,
    "tanh": ops.tanh,
    "hard-sigmoid": ops.hard_sigmoid,
    "hard-silu": ops.hard_silu,
    "softmax-axis1": lambda x: ops.softmax(x, axis=1),
    "per-channel-constant": lambda x: x * np.arange(1, 5, dtype="float32"),
    # comparisons, mod, round and normalize keep the conv's layout too
    "compare": lambda x: ops.cast(x > 0.5, "float32") - ops.cast(ops.not_equal(x, 0.0), "int32"),
    "mod-scalar": lambda x: ops.mod(x, 0.7) + ops.mod(x, -0.7),
    "round": lambda x: ops.round(ops.floor(4.0 * x) / 2.0),
    "normalize-channels": lambda x: ops.normalize(x, axis=-1),
}


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
def test_keras_ops_after_convolution(op, tmp_path):
    x = keras.Input((5, 5, 3))
    y = op(layers.Conv2D(4, 3, name="conv")(x))
    model = keras.Model(x, y, name="ops")
    result, _ = export_and_compare(model, tmp_path, _inputs(model, scale=2.0))
    assert result.op_counts["Transpose"] == 2  # the ops run in the conv's NCHW layout


def test_binary_op_on_two_tensors(tmp_path):
    a, b = keras.Input((4, 4, 2), name="a"), keras.Input((4, 4, 2), name="b")
    y = ops.subtract(layers.Conv2D(3, 1)(a), ops.divide(layers.Conv2D(3, 1)(b), 4.0))
    export_and_compare(keras.Model([a, b], y, name="binary"), tmp_path)


# --------------------------------------------------------------------------------------
# Convolutions.

CONVOLUTIONS = {
    "conv2d-valid": lambda: layers.Conv2D(4, 3),
    "conv2d-same-stride2-asymmetric": lambda: layers.Conv2D(4, 3, strides=2, padding="same"),
    "conv2d-same-even-kernel": lambda: layers.Conv2D(4, 4, padding="same"),
    "conv2d-same-stride-2x1": lambda: layers.Conv2D(4, (3, 2), strides=(2, 1), padding="same"),
    "conv2d-dilated-same": lambda: layers.Conv2D(4, 3, dilation_rate=2, padding="same"),
    "conv2d-groups": lambda: layers.Conv2D(6, 3, groups=2, padding="same"),
    "conv2d-no-bias-relu6": lambda: layers.Conv2D(4, 3, use_bias=False, activation="relu6"),
    "depthwise2d-multiplier2-same-stride2": lambda: layers.DepthwiseConv2D(
        3, depth_multiplier=2, strides=2, padding="same"
    ),
    "depthwise2d-valid-dilated": lambda: layers.DepthwiseConv2D(3, dilation_rate=2),
    "separable2d-same": lambda: layers.SeparableConv2D(5, 3, depth_multiplier=2, padding="same"),
    "separable2d-stride2-swish": lambda: layers.SeparableConv2D(
        5, 3, strides=2, activation="swish", padding="same"
    ),
    "transpose2d-valid-stride2": lambda: layers.Conv2DTranspose(3, 3, strides=2),
    "transpose2d-same-stride2": lambda: layers.Conv2DTranspose(3, 3, strides=2, padding="same"),
    "transpose2d-same-stride2-even": lambda: layers.Conv2DTranspose(
        3, 4, strides=2, padding="same"
    ),
    "transpose2d-valid-stride3-small-kernel": lambda: layers.Conv2DTranspose(3, 2, strides=3),
    "transpose2d-same-output-padding": lambda: layers.Conv2DTranspose(
        3, 3, strides=2, padding="same", output_padding=1
    ),
    "transpose2d-valid-output-padding": lambda: layers.Conv2DTranspose(
        3, 3, strides=2, output_padding=1
    ),
}


@pytest.mark.parametrize("build", CONVOLUTIONS.values(), ids=CONVOLUTIONS.keys())
def test_convolutions_2d(build, tmp_path):
    model = sequential((10, 9, 4), build(), name="conv")
    result, _ = export_and_compare(model, tmp_path)
    assert result.op_counts["Transpose"] == 2


CONVOLUTIONS_1D_3D = {
    "conv1d-valid": ((11, 3), lambda: layers.Conv1D(4, 3)),
    "conv1d-same-stride2": ((11, 3), lambda: layers.Conv1D(4, 4, strides=2, padding="same")),
    "conv1d-causal-dilated": (
        (11, 3),
        lambda: layers.Conv1D(4, 3, dilation_rate=2, padding="causal"),
    ),
    "depthwise1d": ((11, 3), lambda: layers.DepthwiseConv1D(3, depth_multiplier=3)),
    "separable1d": ((11, 3), lambda: layers.SeparableConv1D(4, 3, padding="same")),
    "transpose1d-same-stride2": (
        (7, 3),
        lambda: layers.Conv1DTranspose(4, 3, strides=2, padding="same"),
    ),
    "conv3d-same-stride2": ((6, 7, 5, 2), lambda: layers.Conv3D(3, 3, strides=2, padding="same")),
    "transpose3d-valid-stride2": ((3, 4, 3, 2), lambda: layers.Conv3DTranspose(3, 2, strides=2)),
}


@pytest.mark.parametrize(
    ("shape", "build"), CONVOLUTIONS_1D_3D.values(), ids=CONVOLUTIONS_1D_3D.keys()
)
def test_convolutions_1d_and_3d(shape, build, tmp_path):
    export_and_compare(sequential(shape, build(), name="conv"), tmp_path)


def test_shared_convolution_stores_its_kernel_once(tmp_path):
    a, b = keras.Input((6, 6, 3), name="a"), keras.Input((6, 6, 3), name="b")
    shared = layers.Conv2D(4, 3, name="shared")
    model = keras.Model([a, b], layers.Add()([shared(a), shared(b)]), name="shared")
    _, proto = export_and_compare(model, tmp_path)
    kernels = [t for t in proto.graph.initializer if t.name.startswith("shared/kernel")]
    assert len(kernels) == 1
    assert sum(node.op_type == "Conv" for node in proto.graph.node) == 2


# --------------------------------------------------------------------------------------
# Padding, pooling, cropping, resampling.


def test_zero_padding_is_absorbed_by_a_valid_convolution(tmp_path):
    model = sequential(
        (8, 8, 3),
        layers.ZeroPadding2D(((1, 2), (0, 1))),
        layers.Conv2D(4, 3, strides=2),
        layers.ZeroPadding2D(1),
        layers.DepthwiseConv2D(3),
    )
    result, _ = export_and_compare(model, tmp_path)
    assert "Pad" not in result.op_counts


@pytest.mark.parametrize(
    "after",
    [
        pytest.param(lambda: layers.MaxPooling2D(3, strides=2), id="max-pooling"),
        pytest.param(lambda: layers.Conv2D(4, 3, padding="same"), id="same-convolution"),
        pytest.param(lambda: layers.Activation("sigmoid"), id="elementwise"),
    ],
)
def test_zero_padding_is_applied_when_not_absorbable(after, tmp_path):
    model = sequential((7, 7, 3), layers.ZeroPadding2D(((1, 0), (2, 1))), after())
    result, _ = export_and_compare(model, tmp_path)
    assert result.op_counts["Pad"] == 1


PADDING_AND_CROPPING = {
    "zero-padding1d+conv": ((9, 3), [layers.ZeroPadding1D((2, 1)), layers.Conv1D(2, 3)]),
    "zero-padding3d+conv": ((4, 4, 4, 2), [layers.ZeroPadding3D(1), layers.Conv3D(2, 3)]),
    "zero-padding2d-output": ((4, 4, 2), [layers.ZeroPadding2D(((1, 0), (0, 2)))]),
    "cropping1d": ((9, 3), [layers.Cropping1D((2, 1))]),
    "cropping2d-after-conv": (
        (8, 8, 3),
        [layers.Conv2D(4, 1), layers.Cropping2D(((1, 0), (0, 2)))],
    ),
    "cropping3d": ((5, 6, 5, 2), [layers.Cropping3D(((1, 1), (0, 2), (2, 0)))]),
    "nasnet-pad-then-crop": (
        (6, 6, 3),
        [
            layers.Conv2D(4, 1),
            layers.ZeroPadding2D(((0, 1), (0, 1))),
            layers.Cropping2D(((1, 0), (1, 0))),
            layers.AveragePooling2D(1, strides=2),
        ],
    ),
}


@pytest.mark.parametrize(
    ("shape", "stack"), PADDING_AND_CROPPING.values(), ids=PADDING_AND_CROPPING.keys()
)
def test_padding_and_cropping(shape, stack, tmp_path):
    export_and_compare(sequential(shape, *stack, name="pad"), tmp_path)


POOLING = {
    "max2d-valid": ((8, 8, 3), lambda: layers.MaxPooling2D(2)),
    "max2d-same-stride2-asymmetric": ((10, 9, 3), lambda: layers.MaxPooling2D(3, 2, "same")),
    "avg2d-valid": ((8, 8, 3), lambda: layers.AveragePooling2D(3, strides=2)),
    "avg2d-same-excludes-padding": ((10, 9, 3), lambda: layers.AveragePooling2D(3, 2, "same")),
    "max1d-same": ((9, 3), lambda: layers.MaxPooling1D(2, padding="same")),
    "avg1d-valid": ((9, 3), lambda: layers.AveragePooling1D(3)),
    "max3d": ((4, 6, 6, 2), lambda: layers.MaxPooling3D(2)),
    "avg3d-same": ((5, 5, 5, 2), lambda: layers.AveragePooling3D(2, padding="same")),
    "global-avg2d": ((5, 5, 3), lambda: layers.GlobalAveragePooling2D()),
    "global-avg2d-keepdims": ((5, 5, 3), lambda: layers.GlobalAveragePooling2D(keepdims=True)),
    "global-max2d": ((5, 5, 3), lambda: layers.GlobalMaxPooling2D()),
    "global-avg1d": ((7, 3), lambda: layers.GlobalAveragePooling1D()),
    "global-max1d-keepdims": ((7, 3), lambda: layers.GlobalMaxPooling1D(keepdims=True)),
    "global-avg3d": ((3, 4, 5, 2), lambda: layers.GlobalAveragePooling3D()),
    "global-max3d-keepdims": ((3, 4, 5, 2), lambda: layers.GlobalMaxPooling3D(keepdims=True)),
}


@pytest.mark.parametrize(("shape", "build"), POOLING.values(), ids=POOLING.keys())
@pytest.mark.parametrize("after_conv", [False, True], ids=["input", "after-conv"])
def test_pooling(shape, build, after_conv, tmp_path):
    stack = (
        [
            layers.Conv1D(4, 1)
            if len(shape) == 2
            else layers.Conv2D(4, 1)
            if len(shape) == 3
            else layers.Conv3D(4, 1)
        ]
        if after_conv
        else []
    )
    export_and_compare(sequential(shape, *stack, build(), name="pool"), tmp_path)


UPSAMPLING = {
    "nearest2d": ((4, 5, 3), lambda: layers.UpSampling2D((2, 3))),
    "bilinear2d": ((4, 5, 3), lambda: layers.UpSampling2D(2, interpolation="bilinear")),
    "nearest1d": ((5, 3), lambda: layers.UpSampling1D(3)),
    "nearest3d": ((2, 3, 4, 2), lambda: layers.UpSampling3D((2, 1, 2))),
}


@pytest.mark.parametrize(("shape", "build"), UPSAMPLING.values(), ids=UPSAMPLING.keys())
def test_upsampling(shape, build, tmp_path):
    export_and_compare(sequential(shape, build(), name="upsampling"), tmp_path)


# --------------------------------------------------------------------------------------
# Merges and reshaping.


def _two_branch(merge, count=2, shape=(6, 6, 3)):
    x = keras.Input(shape)
    branches = [layers.Conv2D(4, 3, padding="same", name=f"branch{i}")(x) for i in range(count)]
    return keras.Model(x, merge(branches), name="merge")


MERGES = {
    "add": lambda: _two_branch(layers.Add()),
    "add-three": lambda: _two_branch(layers.Add(), 3),
    "subtract": lambda: _two_branch(layers.Subtract()),
    "multiply-three": lambda: _two_branch(layers.Multiply(), 3),
    "average-three": lambda: _two_branch(layers.Average(), 3),
    "maximum-three": lambda: _two_branch(layers.Maximum(), 3),
    "minimum": lambda: _two_branch(layers.Minimum()),
    "concatenate-channels": lambda: _two_branch(layers.Concatenate(), 3),
    "concatenate-height": lambda: _two_branch(layers.Concatenate(axis=1)),
}


@pytest.mark.parametrize("build", MERGES.values(), ids=MERGES.keys())
def test_merges_in_channels_first_layout(build, tmp_path):
    result, _ = export_and_compare(build(), tmp_path)
    assert result.op_counts["Transpose"] == 2


def test_merges_with_mixed_layouts_and_ranks(tmp_path):
    x = keras.Input((5, 5, 3), name="image")
    v = keras.Input((4,), name="vector")
    conv = layers.Conv2D(4, 3, padding="same")(x)
    keras_layout = layers.Dense(4)(x)  # Dense on the raw input stays channels-last
    scaled = layers.Multiply()([conv, v])  # (N, C) expands to (N, 1, 1, C), as in Keras
    y = layers.Concatenate()([layers.Add()([scaled, keras_layout]), conv])
    export_and_compare(keras.Model([x, v], y, name="mixed"), tmp_path)


RESHAPES = {
    "reshape-rank2-to-rank3": ((12,), [layers.Reshape((3, 4)), layers.Dense(2)]),
    "reshape-with-minus-one": ((12,), [layers.Reshape((-1, 2))]),
    "reshape-conv-output": ((4, 4, 3), [layers.Conv2D(5, 1), layers.Reshape((16, 5))]),
    "squeeze-excite-reshape": (
        (5, 5, 3),
        [
            layers.Conv2D(4, 1),
            layers.GlobalAveragePooling2D(),
            layers.Reshape((1, 1, 4)),
            layers.Conv2D(6, 1),
        ],
    ),
    "flatten-conv-output": ((5, 5, 3), [layers.Conv2D(4, 3), layers.Flatten(), layers.Dense(2)]),
    "flatten-1x1-spatial": ((3, 3, 2), [layers.Conv2D(4, 3), layers.Flatten()]),
    "flatten-rank3": ((4, 3), [layers.Flatten()]),
    "permute-then-conv": ((4, 5, 3), [layers.Permute((2, 1, 3)), layers.Conv2D(2, 3)]),
    "conv-then-permute": ((4, 5, 3), [layers.Conv2D(2, 3), layers.Permute((3, 1, 2))]),
    "permute-rank3-dense": ((4, 3), [layers.Permute((2, 1)), layers.Dense(2)]),
}


@pytest.mark.parametrize(("shape", "stack"), RESHAPES.values(), ids=RESHAPES.keys())
def test_reshaping(shape, stack, tmp_path):
    export_and_compare(sequential(shape, *stack, name="reshape"), tmp_path)


def test_squeeze_excite_reshape_needs_no_transpose(tmp_path):
    x = keras.Input((5, 5, 3))
    h = layers.Conv2D(4, 1)(x)
    s = layers.Reshape((1, 1, 4))(layers.GlobalAveragePooling2D()(h))
    s = layers.Conv2D(4, 1, activation="sigmoid")(s)
    model = keras.Model(x, layers.Flatten()(layers.Multiply()([h, s])), name="se")
    result, _ = export_and_compare(model, tmp_path)
    assert result.op_counts["Transpose"] == 2  # input, and before the final Flatten


def test_permuted_and_original_tensor_get_their_own_transposes(tmp_path):
    x = keras.Input((4, 6, 3))
    a = layers.Flatten()(layers.Conv2D(2, 3, name="a")(x))
    b = layers.Flatten()(layers.Conv2D(2, 3, name="b")(layers.Permute((2, 1, 3))(x)))
    model = keras.Model(x, layers.Concatenate()([a, b]), name="permuted")
    export_and_compare(model, tmp_path)


def test_permute_costs_no_node(tmp_path):
    model = sequential((4, 5, 3), layers.Permute((2, 1, 3)), layers.Conv2D(2, 3))
    result, _ = export_and_compare(model, tmp_path)
    assert result.op_counts["Transpose"] == 2


IDENTITIES = {
    "dropout": lambda: layers.Dropout(0.5),
    "spatial-dropout": lambda: layers.SpatialDropout2D(0.5),
    "gaussian-noise": lambda: layers.GaussianNoise(1.0),
    "gaussian-dropout": lambda: layers.GaussianDropout(0.5),
    "alpha-dropout": lambda: layers.AlphaDropout(0.5),
    "activity-regularization": lambda: layers.ActivityRegularization(0.1),
    "identity": lambda: layers.Identity(),
}


@pytest.mark.parametrize("build", IDENTITIES.values(), ids=IDENTITIES.keys())
@pytest.mark.parametrize("last", [False, True], ids=["inside", "as-output"])
def test_inference_identities(build, last, tmp_path):
    stack = [layers.Conv2D(3, 3), build()] + ([] if last else [layers.Conv2D(2, 1)])
    result, _ = export_and_compare(sequential((5, 5, 2), *stack, name="identity"), tmp_path)
    assert not {"RandomNormal", "RandomUniform", "Dropout"} & set(result.op_counts)


# --------------------------------------------------------------------------------------
# Preprocessing and normalization.


def _adapted_normalization(axis=-1):
    layer = layers.Normalization(axis=axis)
    rng = np.random.default_rng(1)
    layer.adapt(rng.normal(3.0, [0.5, 2.0, 10.0], size=(64, 4, 4, 3)).astype("float32"))
    return layer


PREPROCESSING = {
    "rescaling-scalar": lambda: [layers.Rescaling(1 / 127.5, offset=-1)],
    "rescaling-per-channel": lambda: [layers.Rescaling([0.5, 2.0, -1.0], offset=[1.0, 0.0, 2.0])],
    "normalization-given": lambda: [
        layers.Normalization(mean=[1.0, 2.0, 3.0], variance=[4.0, 0.25, 1e-9])
    ],
    "normalization-adapted-then-conv": lambda: [_adapted_normalization(), layers.Conv2D(2, 3)],
    "normalization-invert": lambda: [layers.Normalization(mean=2.0, variance=9.0, invert=True)],
    "normalization-two-axes": lambda: [_adapted_normalization(axis=(2, 3))],
}


@pytest.mark.parametrize("stack", PREPROCESSING.values(), ids=PREPROCESSING.keys())
def test_preprocessing(stack, tmp_path):
    export_and_compare(sequential((4, 4, 3), *stack(), name="preprocessing"), tmp_path)


def _layer_norm_model(rank_shape, stack, **kwargs):
    norm = layers.LayerNormalization(**kwargs)
    model = sequential(rank_shape, *stack, norm, name="layer_norm")
    rng = np.random.default_rng(2)
    for weight in norm.weights:
        weight.assign(rng.normal(1.0, 0.5, weight.shape))
    return model


LAYER_NORMS = {  # (input shape, layers before, arguments, one LayerNormalization node at 17)
    "rank2": ((6,), [], {}, True),
    "after-conv": ((5, 5, 3), [layers.Conv2D(4, 3)], {"epsilon": 1e-6}, True),
    "after-conv-all-axes": ((5, 5, 3), [layers.Conv2D(4, 3)], {"axis": (1, 2, 3)}, True),
    "spatial-axes": ((5, 6, 3), [], {"axis": (1, 2)}, False),  # decomposed, no transposes
    "no-center-no-scale": ((4, 6), [], {"center": False, "scale": False}, True),
    "rms-scaling": ((4, 6), [], {"rms_scaling": True}, False),
}


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize(
    ("shape", "stack", "kwargs", "fused"), LAYER_NORMS.values(), ids=LAYER_NORMS.keys()
)
def test_layer_normalization(shape, stack, kwargs, fused, opset, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rms_scaling=True is deprecated in Keras, still exported
        model = _layer_norm_model(shape, stack, **kwargs)
        result, _ = export_and_compare(model, tmp_path, opset=opset)
    assert ("LayerNormalization" in result.op_counts) == (fused and opset >= 17)


@pytest.mark.parametrize(
    ("shape", "groups", "kwargs"),
    [
        pytest.param((5, 5, 6), 2, {}, id="groups2"),
        pytest.param((5, 5, 6), 1, {"epsilon": 1e-5}, id="groups1"),
        pytest.param((5, 5, 6), 6, {}, id="instance"),
        pytest.param((7, 4), 2, {"center": False, "scale": False}, id="rank3"),
    ],
)
def test_group_normalization(shape, groups, kwargs, tmp_path):
    norm = layers.GroupNormalization(groups=groups, **kwargs)
    model = sequential(shape, norm, name="group_norm")
    rng = np.random.default_rng(3)
    for weight in norm.weights:
        weight.assign(rng.normal(1.0, 0.5, weight.shape))
    export_and_compare(model, tmp_path, _inputs(model, scale=3.0))


BATCH_NORMS = {
    "stock-after-conv": ((5, 5, 3), [layers.Conv2D(4, 3)], lambda: layers.BatchNormalization()),
    "stock-rank2": ((6,), [], lambda: layers.BatchNormalization(center=False, scale=False)),
    "stock-axis1": ((4, 6), [], lambda: layers.BatchNormalization(axis=1, epsilon=1e-5)),
    "keras-bn-after-conv": ((5, 5, 3), [layers.Conv2D(4, 3)], lambda: KerasBnBatchNormalization()),
    "keras-bn-two-axes": ((4, 5, 3), [], lambda: KerasBnBatchNormalization(axis=(1, 3))),
}


@pytest.mark.parametrize(("shape", "stack", "build"), BATCH_NORMS.values(), ids=BATCH_NORMS.keys())
def test_unfolded_batch_normalization(shape, stack, build, tmp_path):
    norm = build()
    model = sequential(shape, *stack, norm, name="batch_norm")
    randomize_batch_norms(norm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unfolded-BN warning is tested elsewhere
        result, _ = export_and_compare(model, tmp_path, atol=1e-4)
    assert "BatchNormalization" not in result.op_counts
    assert result.op_counts["Mul"] == 1 and result.op_counts["Add"] >= 1


def test_applications_layers(tmp_path):
    from keras.src.applications.convnext import LayerScale
    from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

    x = keras.Input((5, 5, 3))
    h = layers.Conv2D(4, 3, padding="same")(x)
    scale = LayerScale(0.5, 4)
    scaled = scale(h)
    scale.gamma.assign(np.array([0.5, -1.0, 2.0, 0.1], dtype="float32"))
    y = CustomScaleLayer(0.17)([h, scaled])
    export_and_compare(keras.Model(x, y, name="applications"), tmp_path)


DOT_SHAPES = {1: ((4, 3), (4, 5)), 2: ((4, 3), (5, 3)), (2, 1): ((4, 3), (3, 5))}


@pytest.mark.parametrize("normalize", [False, True], ids=["dot", "cosine"])
@pytest.mark.parametrize("axes", list(DOT_SHAPES), ids=str)
def test_dot_layer(axes, normalize, tmp_path):
    """Dot is traced: ops.normalize (normalize=True) then batch_dot's ops."""
    a, b = (
        keras.Input(shape, name=name) for shape, name in zip(DOT_SHAPES[axes], "ab", strict=True)
    )
    y = layers.Dot(axes=axes, normalize=normalize)([a, b])
    export_and_compare(keras.Model([a, b], y, name="dot"), tmp_path)


# --------------------------------------------------------------------------------------
# The tables themselves.


def test_rules_are_looked_up_by_exact_class():
    class MyDense(layers.Dense):
        def call(self, inputs):
            return super().call(inputs) * 2.0

    assert find_rule(layers.Dense(2)) is RULES[layers.Dense]
    assert find_rule(MyDense(2)) is None  # a subclass may compute something else
    assert find_rule(KerasBnBatchNormalization()) is RULES[layers.BatchNormalization]


def _table_entries(module, table_name):
    """The classes a literal table in ``module`` registers, once per registration:
    its own keys, and the keys of every ``**other`` table it spreads (read from the
    source, since a dict keeps one value per key)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(module))
    (table,) = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.AnnAssign | ast.Assign)
        and isinstance(node.value, ast.Dict)
        and table_name in [t.id for t in getattr(node, "targets", [getattr(node, "target", None)])]
    ]
    entries = []
    for key, value in zip(table.keys, table.values, strict=True):
        if key is None:  # **spread
            entries += list(eval(compile(ast.Expression(value), "<table>", "eval"), vars(module)))
        else:
            entries.append(eval(compile(ast.Expression(key), "<table>", "eval"), vars(module)))
    return entries


@pytest.mark.parametrize(
    "table", ["rules.table:RULES", "rules.ops.table:OPS"], ids=["layers", "ops"]
)
def test_no_class_is_registered_twice(table):
    import collections
    import importlib

    module_name, name = table.split(":")
    module = importlib.import_module(f"keras_bn.converters.onnx.{module_name}")
    entries = _table_entries(module, name)
    twice = [cls.__name__ for cls, n in collections.Counter(entries).items() if n > 1]
    assert not twice, f"registered twice in {name}: {twice}"
    assert set(entries) == set(getattr(module, name))


def test_the_duplicate_check_sees_a_repeated_key(tmp_path, monkeypatch):
    """The check above reads the source: a repeated key, which the dict silently
    keeps once, is found."""
    import sys

    source = "from keras import layers as L\nT = {L.Dense: 1, L.Conv2D: 2, L.Dense: 3}\n"
    (tmp_path / "fake_table.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_table as module

    assert _table_entries(module, "T") == [layers.Dense, layers.Conv2D, layers.Dense]
    sys.modules.pop("fake_table", None)


def test_layer_rules_shadow_op_rules_only_with_a_reason():
    """A keras.ops operation class with a layer rule too is looked up in the layer
    table (find_rule); that is allowed only with a stated reason."""
    both = set(RULES) & set(OP_RULES)
    assert both == set(SHADOWED_OPS), sorted(cls.__name__ for cls in both ^ set(SHADOWED_OPS))
    assert all(reason.strip() for reason in SHADOWED_OPS.values())
    layer_keys = [cls for cls in RULES if not issubclass(cls, keras.layers.Layer)]
    assert not layer_keys, f"operations in the layer table: {layer_keys}"
    assert not [cls for cls in OP_RULES if issubclass(cls, keras.layers.Layer)]

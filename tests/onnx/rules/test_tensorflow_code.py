"""TensorFlow code in a model (``tf.*`` in Lambdas, custom layers and activations),
exported natively on the TensorFlow backend (converters/tf_graph.py and
converters/onnx/rules/tensorflow.py).

Every model is exported with ``fold=True`` and judged by onnxruntime against a
float64 run of the Keras model at batch sizes 1 and 3 (``assert_exports_exactly``;
the float64 model is built again by the same code under the float64 policy, since
Lambdas and TensorFlow functions do not clone from their configs):
the dynamic batch must survive the TensorFlow graph (``tf.shape(x)[0]``, ``-1`` in
a reshape). The JAX backend cannot run such code: it gets one clear message.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import onnx
import pytest
import tensorflow as tf
from support.checks import assert_exports_exactly, float64_build
from support.models import randomize_batch_norms

from keras_bn.converters import cli
from keras_bn.converters.onnx.export import UnsupportedLayersError, export_onnx
from keras_bn.converters.onnx.rules.activations import ACTIVATIONS
from keras_bn.converters.onnx.rules.tensorflow import TENSORFLOW_RULES

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TensorFlow code runs on TensorFlow only"
)

SHAPE = (4, 4, 8)


def _images(batch: int, shape=SHAPE, seed: int = 0) -> list[np.ndarray]:
    return [np.random.default_rng(seed).normal(size=(batch, *shape)).astype("float32")]


def _exports_exactly(build, path, inputs_for_batch=_images):
    """Build the model, export it and judge it against its float64 build."""
    model = build()
    return assert_exports_exactly(model, path, inputs_for_batch, twin=float64_build(build, model))


def _onnx_ops(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def _lambda_model(function, shape=SHAPE, output_shape=None) -> keras.Model:
    """Conv2D -> Lambda(function): the Lambda reads a tensor the exporter holds
    channels-first, so the TensorFlow graph must get it back in Keras layout."""
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(shape[-1], 3, padding="same", name="conv")(inputs)
    outputs = keras.layers.Lambda(function, output_shape=output_shape, name="tf_code")(x)
    return keras.Model(inputs, outputs)


# Lambdas as users write them; each id names what it exercises.
LAMBDAS = {
    "l2_normalize": lambda t: tf.nn.l2_normalize(t, axis=-1),
    "reduce_mean_keepdims": lambda t: t - tf.reduce_mean(t, axis=[1, 2], keepdims=True),
    "concat_relu": lambda t: tf.concat([tf.nn.relu(t), tf.nn.relu(-t)], axis=-1),
    "reshape_minus_one": lambda t: tf.reshape(t, [-1, 4 * 4 * 8]),
    "reshape_runtime_batch": lambda t: tf.reshape(t, [tf.shape(t)[0], 4, 32]) * 2.0,
    "keras_backend_mean": lambda t: tf.keras.backend.mean(t, axis=-1, keepdims=True),
    "slices": lambda t: tf.concat([t[:, 1:, ::-1, :4], t[:, :3, :, 4:]], axis=-1)[..., 0],
    "new_axis_and_stack": lambda t: tf.stack([t[:, 0, :, tf.newaxis, 1], t[:, -1, :, None, 2]], 1),
    "unstack_squeeze": lambda t: tf.add_n(tf.unstack(tf.squeeze(t[:, :1], axis=1), axis=1)),
    "matmul_softmax": lambda t: tf.nn.softmax(
        tf.matmul(tf.reshape(t, [-1, 16, 8]), tf.reshape(t, [-1, 16, 8]), transpose_b=True)
    ),
    "where_compare": lambda t: tf.where(t > 0.1, t, tf.where(t < -0.5, -t, 0.1 * t)),
    "arithmetic": lambda t: (
        tf.sqrt(tf.abs(t) + 1.0) * tf.math.rsqrt(tf.square(t) + 2.0)
        + tf.exp(-tf.abs(t)) / tf.maximum(tf.math.log(tf.abs(t) + 2.0), 0.5)
        - tf.minimum(tf.pow(tf.abs(t), 1.5), 2.0)
        + tf.sigmoid(t) * tf.tanh(t)
        + tf.nn.relu6(3.0 * t)
    ),
    "pad_tile": lambda t: tf.tile(tf.pad(t, [[0, 0], [1, 0], [0, 2], [0, 0]]), [1, 1, 1, 2]),
    "gather_split": lambda t: tf.concat(
        [
            *tf.split(tf.gather(t, [3, 0, 2], axis=2), [1, -1], axis=2),
            tf.transpose(t, [0, 2, 1, 3]),
        ],
        axis=2,
    ),
    "cumsum_argmax": lambda t: (
        tf.cumsum(t, axis=1, reverse=True)
        + tf.cast(tf.expand_dims(tf.argmax(t, axis=-1), -1), t.dtype)
    ),
    "zeros_ones_fill": lambda t: (
        tf.ones_like(t) * 3.0
        + tf.zeros_like(t)
        + tf.fill(tf.shape(t), tf.constant(0.5, t.dtype)) * t
    ),
    # Bilinear resize computes in float32 (the float64 build too).
    "resize_bilinear": lambda t: tf.cast(tf.image.resize(t, (7, 9)), t.dtype),
    "resize_nearest": lambda t: tf.image.resize(t, (8, 6), method="nearest"),
    "resize_v1_align_corners": lambda t: tf.cast(
        tf.compat.v1.image.resize(t, (7, 5), align_corners=True), t.dtype
    ),
    "resize_v1_nearest": lambda t: tf.compat.v1.image.resize_nearest_neighbor(t, (7, 5)),
    "resize_v1_nearest_align_corners": lambda t: tf.compat.v1.image.resize_nearest_neighbor(
        t, (7, 10), align_corners=True
    ),
    "reduce_sum_max_min": lambda t: (
        tf.reduce_sum(t, axis=1) + tf.reduce_max(t, axis=1) - tf.reduce_min(t, axis=[1])
    ),
}


@pytest.mark.parametrize("name", sorted(LAMBDAS))
def test_lambda_calling_tensorflow_exports_exactly(tmp_path, name):
    result = _exports_exactly(lambda: _lambda_model(LAMBDAS[name]), tmp_path / "model.onnx")
    assert not result.used_fallback and len(result.input_names) == 1


def test_dynamic_batch_reaches_the_tensorflow_graph(tmp_path):
    """``tf.shape(t)[0]`` is read from the input at runtime, not fixed while recording."""
    path = tmp_path / "model.onnx"
    _exports_exactly(lambda: _lambda_model(LAMBDAS["reshape_runtime_batch"]), path)
    onnx_model = onnx.load(str(path))
    assert onnx_model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert "Shape" in _onnx_ops(path)


class ScaledResidual(keras.layers.Layer):
    """A custom layer whose call() computes with tf.* and its own weight."""

    def build(self, input_shape):
        self.scale = self.add_weight(
            shape=(input_shape[-1],), initializer=keras.initializers.RandomNormal(seed=3)
        )

    def call(self, x):
        centred = x - tf.reduce_mean(x, axis=[1, 2], keepdims=True)
        return tf.nn.relu(centred) * self.scale + tf.nn.l2_normalize(x, axis=-1)


def test_custom_layer_calling_tensorflow_with_a_weight(tmp_path):
    def build(scale=None):
        inputs = keras.Input(SHAPE)
        x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
        layer = ScaledResidual(name="scaled_residual")
        outputs = layer(x)
        if scale is not None:
            layer.scale.assign(scale.astype(layer.scale.dtype))
        return keras.Model(inputs, outputs)

    _exports_exactly(build, tmp_path / "model.onnx")
    # The weight is read when exporting, whatever its value.
    _exports_exactly(lambda: build(np.linspace(-2.0, 2.0, 8)), tmp_path / "model2.onnx")


TENSORFLOW_ACTIVATIONS = {
    "tf.nn.relu": tf.nn.relu,
    "tf.nn.relu6": tf.nn.relu6,
    "tf.nn.gelu": tf.nn.gelu,
    "tf.nn.silu": tf.nn.silu,
    "tf.nn.swish": tf.nn.swish,
    "tf.sigmoid": tf.sigmoid,
    "tf.math.sigmoid": tf.math.sigmoid,
    "tf.tanh": tf.tanh,
    "tf.nn.elu": tf.nn.elu,
    "tf.nn.selu": tf.nn.selu,
    "tf.nn.softplus": tf.nn.softplus,
    "tf.math.softplus": tf.math.softplus,
    "tf.nn.leaky_relu": tf.nn.leaky_relu,
    "tf.nn.softmax": tf.nn.softmax,
}


def test_tensorflow_activations_map_to_their_rules():
    for label, function in TENSORFLOW_ACTIVATIONS.items():
        assert function in ACTIVATIONS, label


@pytest.mark.parametrize("label", sorted(TENSORFLOW_ACTIVATIONS))
def test_dense_with_a_tensorflow_activation(tmp_path, label):
    def build():
        inputs = keras.Input((6,))
        outputs = keras.layers.Dense(5, activation=TENSORFLOW_ACTIVATIONS[label])(inputs)
        return keras.Model(inputs, outputs)

    result = _exports_exactly(build, tmp_path / "model.onnx", lambda n: _images(n, (6,)))
    assert result.op_counts.get("Gemm") == 1  # the Dense rule, not a recorded graph


def scaled_swish(x):
    """A custom activation written with TensorFlow (elementwise: any layout)."""
    return x * tf.sigmoid(1.702 * x) + tf.nn.relu(-x) * 0.25


def channel_softmax(x):
    """A custom activation that reads an axis: computed in Keras layout."""
    return tf.nn.softmax(x, axis=-1) * tf.cast(tf.shape(x)[-1], x.dtype)


@pytest.mark.parametrize("activation", [scaled_swish, channel_softmax], ids=lambda f: f.__name__)
def test_custom_tensorflow_activation_in_conv_and_dense(tmp_path, activation):
    def build():
        inputs = keras.Input(SHAPE)
        x = keras.layers.Conv2D(6, 3, padding="same", activation=activation)(inputs)
        x = keras.layers.Conv2D(4, 1)(x)
        x = keras.layers.Flatten()(x)
        outputs = keras.layers.Dense(3, activation=activation)(x)
        return keras.Model(inputs, outputs)

    result = _exports_exactly(build, tmp_path / "model.onnx")
    assert result.op_counts.get("Conv") == 2 and result.op_counts.get("Gemm") == 1


class TensorFlowRelu(keras.layers.Layer):
    def call(self, x):
        return tf.nn.relu(x)


def doubled_relu(x):
    return tf.nn.relu(x) * 2.0


@pytest.mark.parametrize(
    "make_layer",
    [TensorFlowRelu, lambda name: keras.layers.Activation(doubled_relu, name=name)],
    ids=["custom-layer", "activation-layer"],
)
def test_layers_that_tracing_refuses_export_from_their_tensorflow_graph(tmp_path, make_layer):
    """What tracing refuses ("A KerasTensor cannot be used as input to a TensorFlow
    function") exports, on a tensor the exporter holds channels-first."""

    def build():
        inputs = keras.Input(SHAPE)
        x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
        return keras.Model(inputs, keras.layers.Dense(2)(make_layer(name="odd")(x)))

    result = _exports_exactly(build, tmp_path / "model.onnx")
    assert result.op_counts.get("Relu") == 1


def _conv_bn_lambda_conv_bn() -> keras.Model:
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv_1")(inputs)
    x = keras.layers.BatchNormalization(name="bn_1")(x)
    x = keras.layers.Lambda(lambda t: tf.nn.l2_normalize(t, axis=-1) * 4.0, name="tf_code")(x)
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv_2")(x)
    outputs = keras.layers.BatchNormalization(name="bn_2")(x)
    model = keras.Model(inputs, outputs)
    randomize_batch_norms(model, np.random.default_rng(7))
    return model


def test_batch_norms_around_tensorflow_code_still_fold(tmp_path):
    result = _exports_exactly(_conv_bn_lambda_conv_bn, tmp_path / "model.onnx")
    assert result.fold_report is not None
    assert result.fold_report.folded_count == 2 and result.fold_report.not_folded_count == 0
    assert result.op_counts.get("Conv") == 2
    assert not result.warnings  # no Mul+Add left after a Conv


def test_unsupported_tensorflow_op_names_the_layer_and_the_op(tmp_path):
    model = _lambda_model(lambda t: tf.math.lgamma(tf.abs(t) + 1.0))
    with pytest.raises(UnsupportedLayersError) as caught:
        export_onnx(model, tmp_path / "model.onnx")
    message = str(caught.value)
    assert "'tf_code' (Lambda:" in message and "TensorFlow op 'Lgamma'" in message
    assert len(caught.value.layers) == 1
    assert not (tmp_path / "model.onnx").exists()


def test_python_control_flow_on_tensor_values_is_refused_clearly(tmp_path):
    def branchy(t):
        if tf.reduce_sum(t) > 0:  # Python bool of a tensor: neither traced nor recorded
            return t
        return -t

    model = _lambda_model(branchy, output_shape=SHAPE)
    with pytest.raises(UnsupportedLayersError) as caught:
        export_onnx(model, tmp_path / "model.onnx")
    assert "recording Lambda.call() as a TensorFlow graph failed" in str(caught.value)


def test_every_tensorflow_rule_is_a_function():
    assert all(callable(rule) for rule in TENSORFLOW_RULES.values())
    for op_type in ("AddV2", "StridedSlice", "Shape", "Pack", "Reshape", "ConcatV2", "Conv2D"):
        assert op_type in TENSORFLOW_RULES


def test_tensorflow_conv_and_batch_norm_inside_a_custom_layer(tmp_path):
    """Layers with rules called from a custom layer's TensorFlow code end up in its
    graph (Conv2D, DepthwiseConv2D, a BN at inference, pooling): their TF ops convert."""

    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = keras.layers.Conv2D(6, 3, strides=2, padding="same")
            self.depthwise = keras.layers.DepthwiseConv2D(3, padding="valid", depth_multiplier=2)
            self.bn = keras.layers.BatchNormalization()

        def build(self, input_shape):
            self.conv.build(input_shape)
            self.depthwise.build((None, 4, 4, 6))
            self.bn.build((None, 2, 2, 12))

        def call(self, x):
            y = self.bn(self.depthwise(tf.nn.relu(self.conv(x))))
            pooled = tf.nn.avg_pool2d(x, 2, 2, "SAME") + tf.nn.max_pool2d(x, 3, 2, "SAME")
            return tf.concat([tf.reduce_mean(y, axis=[1, 2]), tf.reduce_mean(pooled, [1, 2])], -1)

    def build():
        inputs = keras.Input((8, 8, 3))
        model = keras.Model(inputs, Block(name="block")(inputs))
        randomize_batch_norms(model, np.random.default_rng(1))
        return model

    _exports_exactly(build, tmp_path / "model.onnx", lambda n: _images(n, (8, 8, 3)))


TF_CODE_MODULE = """
import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="tf_code_test")
def l2_scale(t):
    return tf.nn.l2_normalize(t, axis=-1) * 4.0


@keras.saving.register_keras_serializable(package="tf_code_test")
class Centre(keras.layers.Layer):
    def call(self, x):
        return x - tf.reduce_mean(x, axis=[1, 2], keepdims=True)
"""


def test_cli_exports_a_saved_model_with_tensorflow_code(tmp_path, capsys):
    """keras-bn export on a .keras file whose Lambda and custom layer call tf.*, as a
    user runs it: loaded with --custom-objects, exported, validated, BNs folded.
    (A Python lambda reading a global ``tf``: the next test.)"""
    import importlib.util

    source = tmp_path / "tf_code.py"
    source.write_text(TF_CODE_MODULE)
    spec = importlib.util.spec_from_file_location("tf_code", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Lambda(module.l2_scale)(x)
    x = module.Centre()(x)
    x = keras.layers.Conv2D(6, 3, padding="same")(x)
    model = keras.Model(inputs, keras.layers.BatchNormalization()(x))
    randomize_batch_norms(model, np.random.default_rng(2))
    saved = tmp_path / "model.keras"
    model.save(saved)
    output = tmp_path / "model.onnx"
    objects = [f"{source}:l2_scale", "--custom-objects", f"{source}:Centre"]
    code = cli.main(
        ["export", str(saved), "-o", str(output), "--custom-objects", *objects, "--json"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["status"] == "ok", report
    assert report["validation"]["passed"], report["validation"]
    ops = _onnx_ops(output)
    assert "BatchNormalization" not in ops and "Conv" in ops and "ReduceMean" in ops


def _closure_lambda() -> keras.layers.Lambda:
    import tensorflow as local_tf  # a closure variable of the lambda, not a global

    return keras.layers.Lambda(lambda t: local_tf.nn.relu(t) - 0.5 * local_tf.math.tanh(t))


def test_cli_reloads_a_python_lambda_calling_tf(tmp_path, capsys):
    """A Keras-2-era ``Lambda(lambda t: tf.nn.relu6(t) ...)`` in a module that imports
    ``tf``: Keras 3 rebuilds the saved lambda with the globals of its own module, where
    ``tf`` is undefined, so the file did not load at all ("could not infer the shape
    of the Lambda's output"). With --unsafe it loads (``tf``, ``np`` given to the
    lambda), exports and validates. So does a lambda written inside a function that
    imports ``tf`` itself: Keras gives its closure back as ``{"class_name": "module",
    ...}``, which becomes the module again."""
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Lambda(lambda t: tf.nn.relu6(t) * tf.math.sigmoid(t))(x)
    x = _closure_lambda()(x)
    model = keras.Model(inputs, keras.layers.Conv2D(4, 1)(x))
    randomize_batch_norms(model, np.random.default_rng(3))
    saved, output = tmp_path / "model.keras", tmp_path / "model.onnx"
    model.save(saved)
    code = cli.main(["export", str(saved), "-o", str(output), "--unsafe", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["validation"]["passed"]
    assert "BatchNormalization" not in _onnx_ops(output)


JAX_SCRIPT = """
import keras, tensorflow as tf
from keras_bn.converters.onnx.export import UnsupportedLayersError, export_onnx
inputs = keras.Input((4, 4, 8))
x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
x = keras.layers.Lambda(lambda t: tf.nn.l2_normalize(t, axis=-1), output_shape=(4, 4, 8))(x)
try:
    export_onnx(keras.Model(inputs, x), "unused.onnx")
except UnsupportedLayersError as error:
    print(error)
else:
    raise SystemExit("exported TensorFlow code on JAX")
"""


def test_jax_backend_says_tensorflow_code_needs_tensorflow(run_python, tmp_path):
    result = run_python(
        ["-c", JAX_SCRIPT.replace("unused.onnx", str(tmp_path / "m.onnx"))],
        env={"KERAS_BACKEND": "jax"},
    )
    message = result.stdout.strip().splitlines()[-1]
    assert "calls TensorFlow functions" in message and "KERAS_BACKEND=tensorflow" in message

"""Tracing layers without a rule: custom layers written the way users write them.

Each model exports natively with ``fold=True``, BNs inside custom blocks fold and
are named by path, no BatchNormalization is left, and onnxruntime agrees with a
float64 run of the same model at batch 1 and 3. Layers that cannot be traced are
one error naming the layer and the source line. The module reruns on JAX.
"""

import concurrent.futures
import os
import re

import keras
import numpy as np
import pytest
from keras import layers, ops
from support.checks import assert_exports_exactly
from support.jax_speed import keras_outputs
from support.models import nested_batch_norms, randomize_batch_norms

from keras_bn import _keras_internals as internals
from keras_bn.converters import graph as graph_lib
from keras_bn.converters import tracing
from keras_bn.converters.onnx.export import UnsupportedLayersError, export_onnx
from keras_bn.converters.onnx.rules import needs_tracing

# --------------------------------------------------------------------------------------
# Custom layers, as users write them.


class ConvBnRelu(layers.Layer):
    """Conv -> BN -> relu, the BN inside the block."""

    def __init__(self, filters, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)
        self.bn = layers.BatchNormalization(name="bn")

    def call(self, x, training=None):
        return ops.relu(self.bn(self.conv(x), training=training))


class ResidualBlock(layers.Layer):
    """Two ConvBnRelu-like paths and a projection shortcut, added with ops.add."""

    def __init__(self, filters, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.first = ConvBnRelu(filters, strides, name="first")
        self.conv = layers.Conv2D(filters, 3, padding="same", use_bias=False, name="conv")
        self.bn = layers.BatchNormalization(name="bn")
        self.shortcut = layers.Conv2D(filters, 1, strides=strides, name="shortcut")

    def call(self, x, training=None):
        h = self.bn(self.conv(self.first(x, training=training)), training=training)
        return ops.relu(ops.add(h, self.shortcut(x)))


class ScaleShift(layers.Layer):
    """Weights created in build, used directly with keras.ops."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")
        self.shift = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="shift")

    def call(self, x):
        x = self.scale * x + self.shift  # variable * tensor: recorded while tracing
        # a backend array (abs of a variable) * tensor, as D-FINE writes abs(reg_scale)
        return (0.5 + abs(self.scale)) * x


class SqueezeExcite(layers.Layer):
    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.reduce = layers.Dense(max(channels // 4, 1), activation="relu")
        self.expand = layers.Dense(channels, activation="sigmoid")

    def call(self, x):
        weights = self.expand(self.reduce(ops.mean(x, axis=(1, 2), keepdims=True)))
        return ops.multiply(x, weights)


def _conv_blocks_model():
    inputs = keras.Input((16, 16, 3), name="image")
    x = ConvBnRelu(8, 2, name="stem")(inputs)
    x = ResidualBlock(8, name="block_1_0")(x)
    x = ResidualBlock(16, 2, name="block_2_0")(x)
    x = ScaleShift(name="affine")(x)
    x = SqueezeExcite(16, name="se")(x)
    x = ops.max(x, axis=(1, 2))
    return keras.Model(inputs, layers.Dense(4, name="head")(x), name="conv_blocks")


class TransformerEncoder(layers.Layer):
    """A small pre-norm encoder block from keras.ops and layers."""

    def __init__(self, dim, heads, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.heads = dim, heads
        self.norm1 = layers.LayerNormalization(epsilon=1e-6)
        self.qkv = layers.Dense(3 * dim)
        self.proj = layers.Dense(dim)
        self.norm2 = layers.LayerNormalization(epsilon=1e-6)
        self.fc1 = layers.Dense(2 * dim)
        self.fc2 = layers.Dense(dim)

    def call(self, x):
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        head_dim = self.dim // self.heads
        qkv = ops.reshape(self.qkv(self.norm1(x)), (batch, length, 3, self.heads, head_dim))
        qkv = ops.transpose(qkv, (2, 0, 3, 1, 4))
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = ops.softmax(ops.matmul(q, ops.swapaxes(k, -1, -2)) / np.sqrt(head_dim))
        attended = ops.einsum("bhqk,bhkd->bqhd", scores, v)
        x = x + self.proj(ops.reshape(attended, (batch, length, self.dim)))
        return x + self.fc2(ops.gelu(self.fc1(self.norm2(x)), approximate=False))


class PatchEmbedding(layers.Layer):
    """Patches, a class token tiled to the batch, learned position embeddings."""

    def __init__(self, dim, patches, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.patches = dim, patches
        self.conv = layers.Conv2D(dim, 4, strides=4)
        self.positions = layers.Embedding(patches + 1, dim)

    def build(self, input_shape):
        self.class_token = self.add_weight(shape=(1, 1, self.dim), name="class_token")

    def call(self, images):
        x = self.conv(images)
        x = ops.reshape(x, (ops.shape(x)[0], -1, self.dim))
        token = ops.tile(self.class_token, (ops.shape(x)[0], 1, 1))
        x = ops.concatenate([ops.cast(token, x.dtype), x], axis=1)
        return x + self.positions(ops.expand_dims(ops.arange(self.patches + 1), 0))


def _transformer_model():
    inputs = keras.Input((16, 16, 3), name="image")
    x = PatchEmbedding(16, 16, name="embedding")(inputs)
    x = TransformerEncoder(16, 2, name="encoder_0")(x)
    x = TransformerEncoder(16, 2, name="encoder_1")(x)
    x = ops.gelu(layers.LayerNormalization(name="norm")(x), approximate=True)
    cls = x[:, 0]
    pooled = ops.mean(x[:, 1::2], axis=1)  # strided slice
    logits = layers.Dense(3, name="head")(ops.concatenate([cls, pooled], axis=-1))
    probabilities = ops.where(logits > 0, logits, 0.1 * logits)
    return keras.Model(inputs, probabilities, name="transformer")


class ProbePooling(layers.Layer):
    """SigLIP's pooling head: attention from a learned probe repeated to the batch."""

    def __init__(self, dim, **kwargs):
        super().__init__(**kwargs)
        self.attention = layers.MultiHeadAttention(2, dim // 2, name="attention")

    def build(self, input_shape):
        self.probe = self.add_weight(shape=(1, 2, input_shape[-1]), name="probe")
        self.attention.build(self.probe.shape, input_shape, input_shape)

    def call(self, x):
        probes = ops.repeat(self.probe, repeats=ops.shape(x)[0], axis=0)
        return self.attention(probes, x, x)


def _probe_pooling_model():
    inputs = keras.Input((16, 16, 3), name="image")
    x = layers.BatchNormalization(name="bn")(layers.Conv2D(8, 3, strides=2, name="conv")(inputs))
    x = ProbePooling(8, name="pool")(layers.Reshape((49, 8))(x))
    # an activation function the table lacks: the Dense is traced through it
    head = layers.Dense(3, activation=lambda t: ops.gelu(t, approximate=True), name="head")
    return keras.Model(inputs, head(x), name="probe_pooling")


class ScoredBlock(layers.Layer):
    """Returns ``(output, None)`` unless asked for its scores, as KerasHub's DeiT blocks do."""

    def __init__(self, dim, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(dim, name="dense")
        self.bn = layers.BatchNormalization(name="bn")

    def call(self, x, return_scores=False, training=None):
        h = self.bn(self.dense(x), training=training)
        scores = ops.softmax(h) if return_scores else None
        return ops.relu(h) + x, scores


class ScoredStack(layers.Layer):
    """Unpacks its blocks' ``(x, None)`` and returns constants beside its output, as
    DeiT's encoder returns ``ops.empty(...)`` for the hidden states it was not asked for."""

    def __init__(self, dim, depth, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [ScoredBlock(dim, name=f"block_{i}") for i in range(depth)]

    def call(self, x):
        for block in self.blocks:
            x, _ = block(x)
        return x, ops.arange(1.0, 4.0), ops.zeros((0, x.shape[-1]))


def _optional_outputs_model():
    inputs = keras.Input((6,), name="x")
    h, offsets, _ = ScoredStack(6, 2, name="stack")(layers.Dense(6, name="first")(inputs))
    logits = layers.Dense(3, name="head")(h) + offsets  # a constant output, used
    return keras.Model(inputs, logits, name="optional_outputs")


class PlainNorm(layers.Layer):
    """An RMS norm whose call() takes no ``training``: its caller passes one anyway."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")

    def call(self, x):
        return x * ops.rsqrt(ops.mean(ops.square(x), axis=-1, keepdims=True) + 1e-6) * self.scale


class ConvNormAct(layers.Layer):
    """KerasHub's MobileNetV5 idioms: training passed on, an Activation of a lambda."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv2D(filters, 3, padding="same", name="conv")
        self.bn = layers.BatchNormalization(name="bn")
        self.norm = PlainNorm(name="norm")
        self.act = layers.Activation(lambda x: keras.activations.gelu(x, approximate=False))

    def call(self, x, training=False):
        x = self.bn(self.conv(x), training=training)
        return self.act(self.norm(x, training=training))


class SinusoidalTable(layers.Layer):
    """An output computed from static shapes only, as DINOv3's RoPE table is."""

    def call(self, x):
        positions = ops.arange(x.shape[1], dtype="float32")[:, None]
        frequencies = ops.arange(1, x.shape[-1] + 1, dtype="float32")[None, :] / x.shape[1]
        return ops.sin(positions * frequencies)


def _keras_hub_idioms_model():
    inputs = keras.Input((16, 16, 3), name="image")
    x = layers.Reshape((256, 4))(ConvNormAct(4, name="stem")(inputs))
    x = x + SinusoidalTable(name="table")(x)
    return keras.Model(inputs, layers.Dense(3, name="head")(x), name="keras_hub_idioms")


MODELS = {
    "conv_blocks": _conv_blocks_model,
    "transformer": _transformer_model,
    "optional_outputs": _optional_outputs_model,
    "keras_hub_idioms": _keras_hub_idioms_model,
    "probe_pooling": _probe_pooling_model,
}


def _float64_twin(build, model):
    from support.checks import float64_build

    return float64_build(build, model)


def _images(batch):
    return [np.random.default_rng(batch).standard_normal((batch, 16, 16, 3)).astype("float32")]


def _inputs_for(name):
    if name == "optional_outputs":
        return lambda batch: [np.random.default_rng(batch).standard_normal((batch, 6), "float32")]
    return _images


@pytest.mark.parametrize("name", list(MODELS))
def test_custom_model_exports_natively_and_exactly(name, tmp_path):
    keras.utils.set_random_seed(1)
    model = MODELS[name]()
    for layer in nested_batch_norms(model):
        randomize_batch_norms(layer, np.random.default_rng(len(layer.name)))
    twin = _float64_twin(MODELS[name], model)
    result = assert_exports_exactly(model, tmp_path / "m.onnx", _inputs_for(name), twin=twin)
    report = result.fold_report
    assert report.folded_count == len(report.entries) == len(nested_batch_norms(model))
    if name == "conv_blocks":
        folded = {entry.batch_norm: entry.target for entry in report.entries}
        assert folded["block_1_0/bn"] == "block_1_0/conv"
        assert folded["block_1_0/first/bn"].startswith("block_1_0/first/")
        assert "stem/bn" in folded
    if name == "optional_outputs":  # blocks returning (x, None) are traced through
        folded = {entry.batch_norm: entry.target for entry in report.entries}
        assert folded == {f"stack/block_{i}/bn": f"stack/block_{i}/dense" for i in (0, 1)}
        # its constant outputs: the one the head reads is kept, the unread one dropped
        graph = graph_lib.flatten(model, needs_tracing)
        constants = [node.name for node in graph.nodes if not node.inputs]
        assert constants == ["stack/output_1"]
    if name == "keras_hub_idioms":
        graph = graph_lib.flatten(model, needs_tracing)
        names = {node.name for node in graph.nodes}
        assert "table/output_0" in names, names  # the table: a constant
        assert any(name.startswith("stem/norm/") for name in names), names  # traced
        assert not any(type(node.layer) is layers.Activation for node in graph.nodes)


def test_tracing_leaves_the_model_as_it_was():
    model = _conv_blocks_model()
    layers_inside = internals.flatten_layers(model)
    before = [(len(layer._inbound_nodes), len(layer._outbound_nodes)) for layer in layers_inside]
    graph = graph_lib.flatten(model, needs_tracing)
    after = [(len(layer._inbound_nodes), len(layer._outbound_nodes)) for layer in layers_inside]
    assert before == after
    assert any(node.name == "block_2_0/first/bn" for node in graph.nodes)
    assert graph_lib.flatten(model).nodes[1].name == "block_1_0"  # untraced by default


def test_shared_block_is_traced_at_each_call(tmp_path):
    """A block called twice: its BN is shared, so it stays (Mul+Add), exactly."""
    block = ConvBnRelu(3, name="shared")
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, block(block(inputs)), name="shared_twice")
    randomize_batch_norms(block.bn, 0)
    result = assert_exports_exactly(
        model,
        tmp_path / "s.onnx",
        lambda n: [np.random.default_rng(n).standard_normal((n, 8, 8, 3)).astype("float32")],
        twin=_float64_twin(lambda: _shared_model_like(model), model),
    )
    assert result.fold_report.folded_count == 0
    assert all("shared" in entry.reason for entry in result.fold_report.entries)


def _shared_model_like(model):
    block = ConvBnRelu(3, name="shared")
    inputs = keras.Input((8, 8, 3))
    return keras.Model(inputs, block(block(inputs)), name="shared_twice")


class DataDependent(layers.Layer):
    def compute_output_shape(self, input_shape):  # Keras builds it without running call()
        return input_shape

    def call(self, x):
        if ops.mean(x) > 0:  # Python control flow on a tensor value
            return x
        return -x


@pytest.mark.parametrize(
    "layer, fragment",
    [
        pytest.param(DataDependent, "if ops.mean(x) > 0:", id="control-flow"),
        # tf.* code in call() or an activation exports on TensorFlow since issue 22:
        # tests/test_tensorflow_code.py.
    ],
)
def test_untraceable_layer_is_one_error_with_its_source_line(layer, fragment, tmp_path):
    inputs = keras.Input((4,))
    try:
        outputs = layer(name="odd")(inputs)
    except Exception:  # Keras itself cannot build it on this backend
        pytest.skip("Keras cannot build this layer symbolically on this backend")
    model = keras.Model(inputs, layers.Dense(2)(outputs))
    with pytest.raises(UnsupportedLayersError) as error:
        export_onnx(model, tmp_path / "m.onnx")
    message = str(error.value)
    assert "'odd'" in message and "test_tracing.py:" in message and fragment in message
    assert "\n" not in message
    assert not (tmp_path / "m.onnx").exists()


def test_lambda_exports_through_the_cli_with_unsafe(tmp_path, capsys):
    from keras_bn.converters.cli import main

    inputs = keras.Input((6,), name="x")
    h = layers.Dense(4, name="dense")(inputs)
    h = layers.BatchNormalization(name="bn")(h)
    outputs = layers.Lambda(lambda t: t * t * 2.0 - t, output_shape=(4,), name="square")(h)
    model = keras.Model(inputs, outputs)
    randomize_batch_norms(model, 0)
    model.save(tmp_path / "l.keras")
    code = main(["export", str(tmp_path / "l.keras"), "-o", str(tmp_path / "l.onnx"), "--unsafe"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "fallback" not in captured.out.lower()
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "l.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 6)).astype("float32")
        expected = keras.ops.convert_to_numpy(model(x, training=False))
        np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.first
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the JAX rerun itself")
def test_tracing_on_jax(run_python):
    """This module and the traced KerasHub models on the JAX backend, in one subprocess
    (KERAS_BACKEND is read once per process)."""
    here = os.path.dirname(os.path.abspath(__file__))
    traced_hub_models = (
        "mobilenet_v3 or mobilenet_v5 or hgnetv2 or vit or swin or deit or dinov or depth_anything"
        " or clip or siglip or blip2 or vae or sam"
    )
    selection = f"(test_tracing and not on_jax) or (test_keras_hub and ({traced_hub_models}))"
    args = ["-m", "pytest", os.path.join(here, "test_tracing.py")]
    args += [os.path.join(here, "..", "onnx", "test_keras_hub.py"), "-q", "-p", "no:cacheprovider"]
    args += ["-p", "no:xdist", "-k", selection]
    result = run_python(args, env={"KERAS_BACKEND": "jax"}, timeout=900)
    summary = result.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 12, summary
    assert not re.search(r"failed|error", summary), summary


@pytest.mark.first
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the JAX rerun itself")
def test_d_fine_on_jax(run_python):
    """KerasHub D-FINE (backbone and detector) on the JAX backend, in a subprocess of its
    own so that it runs beside :func:`test_tracing_on_jax` (the largest models: every
    operation of the two builds and their float64 twins compiles once)."""
    here = os.path.dirname(os.path.abspath(__file__))
    args = ["-m", "pytest", os.path.join(here, "..", "onnx", "test_keras_hub.py"), "-q"]
    args += ["-p", "no:cacheprovider", "-p", "no:xdist", "-k", "d_fine"]
    result = run_python(args, env={"KERAS_BACKEND": "jax"}, timeout=900)
    summary = result.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) == 2, summary
    assert not re.search(r"failed|error", summary), summary


# --------------------------------------------------------------------------------------
# One keras.ops function per rule, in custom layers, against Keras.


class Ops(layers.Layer):
    """A custom layer whose call() is one keras.ops expression."""

    def __init__(self, function, **kwargs):
        super().__init__(**kwargs)
        self.function = function

    def call(self, x):
        return self.function(x)


class KernelConv(layers.Layer):
    """ops.conv / ops.depthwise_conv with a kernel the layer owns."""

    def __init__(self, depthwise=False, **options):
        super().__init__()
        self.depthwise, self.options = depthwise, options

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(3, 3, input_shape[-1], 2 if self.depthwise else 4))

    def call(self, x):
        if self.depthwise:
            return ops.depthwise_conv(x, self.kernel, **self.options)
        return ops.conv(x, self.kernel, **self.options)


SEQUENCE_OPS = {
    "cumsum": lambda x: ops.cumsum(x, axis=1),
    "cumsum-flat": lambda x: ops.cumsum(x),
    "cumprod": lambda x: ops.cumprod(1.0 + 0.3 * x, axis=-1),
    "argmax": lambda x: ops.argmax(x, axis=1),
    "argmin-keepdims": lambda x: ops.argmin(x, axis=-1, keepdims=True),
    "sort": lambda x: ops.sort(x, axis=1),
    "sort-last": lambda x: ops.sort(x),
    "top_k": lambda x: ops.top_k(x, 3),
    "stop_gradient": lambda x: ops.stop_gradient(x) * 2.0,
    "convert_to_tensor": lambda x: ops.convert_to_tensor(x) - 1.0,
    "zeros_like": lambda x: (ops.zeros_like(x) + x[:, :1], ops.zeros_like(x, dtype="int32")),
    "logical": lambda x: ops.logical_and(
        ops.logical_or(x > 0.5, x < -1.0), ops.logical_not(x > 1.5)
    ),
    "logical-of-numbers": lambda x: ops.logical_or(ops.cast(x > 0.5, "int32"), x < -1.0),
    # the batch-sized size read while tracing; an int32 start beside Python ints (D-FINE)
    "slice": lambda x: ops.slice(x, (0, 2, 1), (ops.shape(x)[0], 3, 4)),
    "slice-tensor-start": lambda x: ops.slice(
        x, (0, ops.convert_to_tensor(1, "int32"), 0), (ops.shape(x)[0], 4, 5)
    ),
    # a per-sample gather of the top-k rows, as D-FINE selects its queries; two outputs
    "map-take-top-k": lambda x: ops.map(
        lambda e: ops.take(e[0], e[1], axis=0), (x, ops.top_k(ops.max(x, axis=-1), 3)[1])
    ),
    "map-two-outputs": lambda x: ops.map(lambda e: (ops.sum(e, axis=0), ops.relu(e) * 2.0), x),
    # integer index arithmetic, clipped, then gathered (D-FINE's "discrete" sampling)
    "integer-arithmetic": lambda x: ops.clip(ops.cast(3.0 * x, "int32") * 5 + 2 - 7, -4, 6),
    "integer-maximum": lambda x: ops.maximum(
        ops.cast(2.0 * x, "int32"), ops.argmax(x, axis=-1)[:, :, None]
    ),
    "take-along-axis": lambda x: ops.take_along_axis(
        x, ops.clip(ops.cast(3.0 * x[:, :, :1], "int32") + 2, 0, 4), axis=2
    ),
    # rows picked per column (top-k along axis 1); the data's size-1 last axis broadcasts
    "take-along-axis-rows": lambda x: ops.take_along_axis(
        x[:, :, :1], ops.swapaxes(ops.top_k(ops.swapaxes(x, 1, 2), 4)[1], 1, 2), axis=1
    ),
    "trigonometry": lambda x: (
        ops.tan(x),
        ops.arcsin(ops.tanh(x)),
        ops.arccos(ops.tanh(x)),
        ops.arctan(x),
        ops.sinh(x),
        ops.cosh(x),
        ops.arcsinh(x),
        ops.arccosh(2.0 + x * x),
        ops.arctanh(0.9 * ops.tanh(x)),
        ops.isnan(ops.log(x)),
    ),
    # halves (multiples of 0.5) round to even, as in ONNX Round
    "round-halves": lambda x: ops.round(ops.floor(4.0 * x) / 2.0),
    "round-decimals": lambda x: (ops.round(x, 2), ops.round(30.0 * x, -1)),
    "round-integers": lambda x: ops.round(ops.cast(30.0 * x, "int32"), -1),
    # Python's sign rule: the remainder takes the divisor's sign (divisors of both signs)
    "mod-floats": lambda x: (ops.mod(3.0 * x, 0.7), ops.mod(3.0 * x, x[:, :, ::-1] + 0.05)),
    "mod-integers": lambda x: (
        ops.mod(ops.cast(5.0 * x, "int32"), 3),
        ops.mod(ops.cast(5.0 * x, "int32"), -3),
        ops.mod(ops.cast(5.0 * x, "int32"), ops.cast(2.0 * x[:, :1], "int32") + 7),
    ),
    # negative and too-large indices give rows of zeros
    "one-hot": lambda x: ops.one_hot(ops.cast(3.0 * x[:, 0], "int32"), 4),
    "one-hot-axis": lambda x: ops.one_hot(ops.cast(3.0 * x, "int32"), 3, axis=1, dtype="int32"),
    "prod": lambda x: (ops.prod(1.0 + 0.2 * x, axis=1), ops.prod(1.0 + 0.2 * x)),
    "prod-integers": lambda x: ops.prod(ops.cast(2.0 * x, "int32"), axis=-1, keepdims=True),
    # the element count at runtime (it scales with the batch size)
    "size": lambda x: x * ops.cast(ops.size(x), "float32"),
    "normalize": lambda x: (ops.normalize(x), ops.normalize(x, axis=1, order=1)),
    "normalize-two-axes": lambda x: ops.normalize(x, axis=(1, 2)),
    "normalize-order-3": lambda x: ops.normalize(x, order=3),
    "index-ellipsis-newaxis": lambda x: (x[..., None], x[:, None, :], x[..., 1:], x[:, ..., 2]),
    "index-mixed": lambda x: (x[:, None, 1:4, None, ::2], x[..., None, -1], x[:, 2, ..., None]),
}
IMAGE_OPS = {  # after a Conv2D: the ops read a channels-first exported tensor
    "cumsum-rows": lambda x: ops.cumsum(x, axis=1),
    "cumprod-columns": lambda x: ops.cumprod(ops.tanh(x), axis=2),
    "argmax-channels": lambda x: ops.argmax(x, axis=-1),
    "resize-bilinear": lambda x: ops.image.resize(x, (12, 5), interpolation="bilinear"),
    "resize-nearest": lambda x: ops.image.resize(x, (5, 13), interpolation="nearest"),
    "resize-nearest-up": lambda x: ops.image.resize(x, (16, 16), interpolation="nearest"),
    # KerasHub DepthAnything's resize (backend code inside): recorded, not entered
    "resize-aligned-corners": lambda x: _depth_anything_resize(x, (13, 5)),
    "resize-aligned-corners-first": lambda x: _depth_anything_resize(
        x, (3, 11), data_format="channels_first"
    ),
    # KerasHub D-FINE's bilinear grid sampling (batch offsets inside): recorded, not entered
    "grid-sample": lambda x: _d_fine_grid_sample(x, align_corners=False),
    "grid-sample-aligned-corners": lambda x: _d_fine_grid_sample(x, align_corners=True),
    "max-pool": lambda x: ops.max_pool(x, 2, strides=2),
    "max-pool-same": lambda x: ops.max_pool(x, (3, 2), strides=(2, 1), padding="same"),
    "average-pool": lambda x: ops.average_pool(x, 3, strides=1),
    # Keras averages the real elements only at the borders
    "average-pool-same": lambda x: ops.average_pool(x, 3, strides=2, padding="same"),
    "normalize-channels": lambda x: ops.normalize(x, axis=-1),
    "one-hot-of-argmax": lambda x: ops.one_hot(ops.argmax(x, axis=-1), 4, axis=1),
}


def _d_fine_grid_sample(x, align_corners):
    """D-FINE's grid_sample of the (N, C, H, W) image at points in and beyond [-1, 1]."""
    from keras_hub.src.models.d_fine import d_fine_utils

    data = ops.transpose(x, (0, 3, 1, 2))
    grid = 1.3 * ops.tanh(3.0 * x[:, :5, :3, :2])
    height, width = x.shape[1], x.shape[2]
    return d_fine_utils.grid_sample(data, grid, align_corners, height=height, width=width)


def _depth_anything_resize(x, size, data_format=None):
    from keras_hub.src.models.depth_anything import depth_anything_layers

    return depth_anything_layers.interpolate(x, size, data_format=data_format)


def _aligned_corners_reference(images, size):
    """NumPy: bilinear, output pixel i sampling the input at i * (in - 1) / (out - 1)."""
    out = images.astype(np.float64)
    for axis, length in zip((1, 2), size, strict=True):
        where = np.arange(length) * (out.shape[axis] - 1) / (length - 1)
        low = np.clip(np.floor(where).astype(int), 0, out.shape[axis] - 2)
        weight = (where - low).reshape([-1 if a == axis else 1 for a in range(4)])
        first, second = np.take(out, low, axis=axis), np.take(out, low + 1, axis=axis)
        out = first * (1 - weight) + second * weight
    return out


def test_depth_anything_resize_samples_aligned_corners():
    """The semantics the AlignedResize rule exports, checked on this backend's Keras."""
    images = np.random.default_rng(4).standard_normal((2, 7, 6, 3)).astype("float32")
    for size in ((13, 5), (3, 11), (7, 6)):
        inputs = keras.Input(images.shape[1:])
        resize = keras.layers.Lambda(lambda x, size=size: _depth_anything_resize(x, size))
        (got,) = keras_outputs(keras.Model(inputs, resize(inputs)), images)
        np.testing.assert_allclose(got, _aligned_corners_reference(images, size), atol=1e-5)


CONV_OPS = {
    "conv": dict(strides=2, padding="same"),
    "conv-dilated": dict(padding="valid", dilation_rate=2),
    # equal strides: TensorFlow's CPU kernel has no other (unequal ones are proven below)
    "depthwise-conv": dict(depthwise=True, strides=2, padding="same"),
}


def _ops_model(name):
    if name in SEQUENCE_OPS:
        inputs = keras.Input((6, 5), name="x")
        return keras.Model(inputs, Ops(SEQUENCE_OPS[name], name="op")(inputs))
    inputs = keras.Input((8, 8, 3), name="x")
    x = layers.Conv2D(4, 1, name="conv")(inputs)
    layer = KernelConv(**CONV_OPS[name]) if name in CONV_OPS else Ops(IMAGE_OPS[name], name="op")
    return keras.Model(inputs, layer(x))


@pytest.mark.parametrize("name", [*SEQUENCE_OPS, *IMAGE_OPS, *CONV_OPS])
def test_keras_ops_rule_agrees_with_keras(name, tmp_path):
    import onnxruntime as ort

    keras.utils.set_random_seed(2)
    model = _ops_model(name)
    result = export_onnx(model, tmp_path / "m.onnx")
    assert not result.used_fallback
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    shape = tuple(model.inputs[0].shape[1:])
    x = np.random.default_rng(5).standard_normal((3, *shape)).astype("float32")
    for batch in (1, 3):
        expected = keras_outputs(model, x[:batch])
        actual = session.run(None, {"x": x[:batch]})
        assert len(actual) == len(expected)
        for got, want in zip(actual, expected, strict=True):
            assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
            if want.dtype.kind == "f":
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            else:
                np.testing.assert_array_equal(got, want)


def _same_padding(size, kernel, stride):
    """Keras/TensorFlow "same" padding of one axis: (before, after)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("strides", [(1, 2), (2, 1), (3, 2)], ids=str)
def test_depthwise_conv_rule_with_unequal_strides(strides, padding, tmp_path):
    """Unequal strides, which TensorFlow's CPU depthwise kernel rejects: the reference is
    Keras's own depthwise conv at stride 1 on the input padded as `padding` pads for
    `strides`, subsampled by the strides (exactly what a strided conv computes), so it
    runs on every backend."""
    import onnxruntime as ort

    keras.utils.set_random_seed(2)
    inputs = keras.Input((9, 10, 3), name="x")
    conv = KernelConv(depthwise=True, strides=strides, padding=padding)
    model = keras.Model(inputs, conv(inputs))
    result = export_onnx(model, tmp_path / "m.onnx")
    assert not result.used_fallback
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(5).standard_normal((2, 9, 10, 3)).astype("float32")
    pads = [(0, 0), (0, 0), (0, 0), (0, 0)]
    if padding == "same":
        pads[1:3] = [_same_padding(n, 3, s) for n, s in zip((9, 10), strides, strict=True)]
    dense = ops.depthwise_conv(np.pad(x, pads), conv.kernel, strides=1, padding="valid")
    expected = keras.ops.convert_to_numpy(dense)[:, :: strides[0], :: strides[1]]
    (actual,) = session.run(None, {"x": x})
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_grid_sampling_before_opset_16_is_one_clear_error(tmp_path):
    with pytest.raises(UnsupportedLayersError, match="needs opset 16 or later"):
        export_onnx(_ops_model("grid-sample"), tmp_path / "m.onnx", opset=15)


def test_map_of_a_function_that_does_not_trace_names_it(tmp_path):
    import importlib

    backend_numpy = importlib.import_module(f"keras.src.backend.{keras.backend.backend()}.numpy")

    def per_sample(row):
        return backend_numpy.tanh(row)  # backend code, as tf.* or jax.* in a user's function

    inputs = keras.Input((6, 5), name="x")
    model = keras.Model(inputs, Ops(lambda x: ops.map(per_sample, x), name="op")(inputs))
    with pytest.raises(UnsupportedLayersError, match="per_sample"):
        export_onnx(model, tmp_path / "m.onnx")


def test_keras_level_fold_names_the_batch_norms_it_cannot_reach():
    """fold_batch_norms keeps a custom layer whole (its call() is code): every BN inside
    is reported not folded, by its path, with the reason and where it does fold; the
    ones in the Functional graph fold as usual, and the folded model still matches."""
    from keras_bn.converters.folding import fold_batch_norms

    keras.utils.set_random_seed(2)
    model = _conv_blocks_model()
    for layer in nested_batch_norms(model):
        randomize_batch_norms(layer, np.random.default_rng(len(layer.name)))
    images = np.random.default_rng(3).standard_normal((2, 16, 16, 3)).astype("float32")
    folded, report = fold_batch_norms(model, sample_inputs=images)
    inside = {e.batch_norm: e for e in report.entries if e.blocked_by == ("inside-custom-layer",)}
    expected = {"stem/bn", "block_1_0/bn", "block_1_0/first/bn"}
    expected |= {"block_2_0/bn", "block_2_0/first/bn"}
    assert set(inside) == expected
    assert all(not e.folded and "keras-bn export" in e.reason for e in inside.values())
    assert report.not_folded_count == len(expected) == len(nested_batch_norms(model))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(folded(images, training=False)),
        keras.ops.convert_to_numpy(model(images, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )


# --------------------------------------------------------------------------------------
# Unknown non-batch sizes: read with ops.shape, computed in the graph at runtime.


class AttendOverPixels(layers.Layer):
    """VAE-style: pixels flattened to a sequence, then reshaped back to the input's
    shape, whose height and width are both unknown."""

    def call(self, x):
        shape = ops.shape(x)
        tokens = ops.reshape(x, (shape[0], -1, shape[-1]))
        scores = ops.softmax(ops.einsum("bic,bjc->bij", tokens, tokens), axis=-1)
        mixed = ops.einsum("bij,bjc->bic", scores, tokens)
        return ops.reshape(mixed, shape)


class PointsAndLabels(layers.Layer):
    """SAM-style: labels (batch, n) broadcast to the points' shape (batch, n, 2) - two
    inputs whose unknown sizes must be equal - and reshaped by ``n * 2``."""

    def call(self, points, labels):
        shape = ops.shape(points)
        labels = ops.broadcast_to(labels[..., None], shape)
        marked = ops.where(labels == 0, -points, points)  # == on a tensor: ops.equal
        return ops.reshape(marked, (shape[0], shape[1] * 2))


class ReshapeToStridedShape(layers.Layer):
    """Reads a size a strided convolution derived from an unknown size: not a product
    of input sizes, so the export cannot compute it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv2D(4, 3, strides=2, padding="same")

    def call(self, x):
        y = self.conv(x)
        return ops.reshape(ops.reshape(y, (ops.shape(y)[0], -1, 4)), ops.shape(y))


def _attend_over_pixels_reference(x):
    tokens = x.reshape(x.shape[0], -1, x.shape[-1]).astype(np.float64)
    scores = np.einsum("bic,bjc->bij", tokens, tokens)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    scores /= scores.sum(axis=-1, keepdims=True)
    return np.einsum("bij,bjc->bic", scores, tokens).reshape(x.shape)


def test_reshape_to_several_unknown_sizes_is_computed_at_runtime(tmp_path):
    """ops.reshape(y, ops.shape(x)) with unknown height and width: exported as the
    input's Shape, sliced and concatenated; onnxruntime agrees with NumPy and Keras at
    sizes other than any seen while tracing, and the graph keeps both sizes unknown."""
    import onnx
    import onnxruntime as ort

    inputs = keras.Input((None, None, 3), name="image")
    model = keras.Model(inputs, AttendOverPixels(name="attend")(inputs))
    result = export_onnx(model, tmp_path / "attend.onnx")
    assert result.op_counts.get("Shape", 0) >= 1 and "Concat" in result.op_counts
    dims = onnx.load(str(tmp_path / "attend.onnx")).graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, True, True, False]
    session = ort.InferenceSession(
        str(tmp_path / "attend.onnx"), providers=["CPUExecutionProvider"]
    )
    for shape in [(1, 5, 7, 3), (3, 4, 2, 3)]:
        x = np.random.default_rng(shape[1]).standard_normal(shape).astype("float32") * 0.5
        got = session.run(None, {"image": x})[0]
        assert got.shape == shape
        np.testing.assert_allclose(got, _attend_over_pixels_reference(x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got, keras.ops.convert_to_numpy(model(x)), rtol=1e-5, atol=1e-5)


def test_unknown_size_shared_by_two_inputs_is_read_from_the_right_one(tmp_path):
    """Points (batch, n, 2) and labels (batch, n): their unknown sizes must be equal for
    the broadcast, so the trace shares them; the final reshape's ``n * 2`` is computed
    from the input it depends on. ``labels == 0`` is the elementwise comparison."""
    import onnxruntime as ort

    points = keras.Input((None, 2), name="points")
    labels = keras.Input((None,), name="labels")
    model = keras.Model([points, labels], PointsAndLabels(name="prompts")(points, labels))
    path = tmp_path / "prompts.onnx"
    export_onnx(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, count in [(1, 3), (2, 5)]:
        rng = np.random.default_rng(count)
        p = rng.standard_normal((batch, count, 2)).astype("float32")
        q = rng.integers(0, 2, (batch, count)).astype("float32")
        want = np.where(q[..., None] == 0, -p, p).reshape(batch, count * 2)
        got = session.run(None, {"points": p, "labels": q})[0]
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, keras.ops.convert_to_numpy(model([p, q])))


def test_size_derived_by_a_strided_convolution_is_refused_or_computed(tmp_path):
    """A reshape to ops.shape(conv(x)) with x of unknown size: the keras.ops trace's
    two recordings disagree otherwise than by a product of input sizes. On JAX the
    layer is not exported (one error naming it), rather than exported with a
    baked-in size; on TensorFlow its recorded TensorFlow graph computes the size at
    runtime, and the file is exact at sizes the trace never saw."""
    import onnxruntime as ort

    inputs = keras.Input((None, None, 3), name="image")
    model = keras.Model(inputs, ReshapeToStridedShape(name="strided")(inputs))
    if keras.backend.backend() != "tensorflow":
        with pytest.raises(UnsupportedLayersError) as caught:
            export_onnx(model, tmp_path / "strided.onnx")
        message = str(caught.value)
        assert "'strided'" in message and "depends on an unknown input size" in message
        return
    export_onnx(model, tmp_path / "strided.onnx")
    session = ort.InferenceSession(str(tmp_path / "strided.onnx"))
    rng = np.random.default_rng(0)
    for shape in ((2, 9, 7, 3), (1, 16, 11, 3)):
        x = rng.standard_normal(shape).astype("float32")
        expected = keras.ops.convert_to_numpy(model(x))
        (actual,) = session.run(None, {"image": x})
        assert actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


class _PositionTable(layers.Layer):
    """Adds a learned position table sliced to the sequence length (KerasHub's
    PositionEmbedding idiom) and the positions ``arange`` counts."""

    def __init__(self, length, **kwargs):
        super().__init__(**kwargs)
        self.length = length

    def build(self, input_shape):
        self.table = self.add_weight(
            shape=(self.length, input_shape[-1]), initializer="random_normal", name="table"
        )

    def call(self, x):
        n = ops.shape(x)[1]
        positions = ops.cast(ops.arange(n), x.dtype)[:, None]
        table = ops.convert_to_tensor(self.table)  # as KerasHub's PositionEmbedding reads it
        return x + ops.slice(table, (0, 0), (n, ops.shape(x)[-1])) + positions

    def compute_output_shape(self, input_shape):  # JAX cannot slice to a symbolic size
        return input_shape


class _RunsKerasBeside(_PositionTable):
    """While its call is traced, runs its own call eagerly in another thread, as
    ``keras-bn export`` runs the Keras reference pass beside the trace, on a sequence
    as long as the stand-in size the trace gives the unknown length."""

    def call(self, x):
        if isinstance(x, keras.KerasTensor):
            eager = np.random.default_rng(0).standard_normal((2, *x.shape[1:])).astype("float32")
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                beside = pool.submit(
                    lambda: _PositionTable.call(self, ops.convert_to_tensor(eager))
                )
            self.beside = eager, beside.exception() or ops.convert_to_numpy(beside.result())
        return super().call(x)


def test_a_trace_leaves_keras_in_other_threads_unpatched():
    """Tracing patches Keras process-wide (``keras.ops.slice`` of a weight at an unknown
    size records an operation); the Keras reference pass that ``keras-bn export``
    runs beside the trace saw those patches: a position table sliced at a stand-in
    length became a recorded operation inside an eager call, and Keras failed
    ("'EagerTensor' object has no attribute 'sparse'", the error of an order-dependent
    BERT failure in the suite). The patches now act in the tracing thread only: the
    other thread's call computes what NumPy does."""
    inputs = keras.Input((None, 4))
    layer = _RunsKerasBeside(2048, name="beside")  # longer than the stand-in sizes
    model = keras.Model(inputs, layer(inputs))
    graph = graph_lib.flatten(model, needs_tracing)
    assert any(node.name.startswith("beside/") for node in graph.nodes)  # it was traced
    eager, got = layer.beside
    assert not isinstance(got, BaseException), got
    table = keras.ops.convert_to_numpy(layer.table)
    n = eager.shape[1]
    assert n in tracing.UNKNOWN_SIZES[0] + tracing.UNKNOWN_SIZES[1]
    expected = eager + table[:n] + np.arange(n, dtype="float32")[:, None]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)

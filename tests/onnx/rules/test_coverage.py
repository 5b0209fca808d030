"""Coverage you can see: every public keras.ops function and keras.layers class has an
ONNX rule, is traced, or is refused with a stated reason (rules/coverage.py), and
docs/COVERAGE.md is the table generated from that data."""

import pathlib

import keras
import numpy as np
import onnxruntime as ort
import pytest
from keras import layers

from keras_bn.converters.onnx.export import export_onnx
from keras_bn.converters.onnx.rules import coverage

ROOT = pathlib.Path(__file__).resolve().parents[3]


def test_every_public_op_is_exported_traced_or_refused_with_a_reason():
    missing = [name for name, f in coverage.public_ops() if coverage.op_status(name, f) is None]
    assert not missing, f"keras.ops functions in no category (add to rules/coverage.py): {missing}"


def test_every_public_layer_is_exported_traced_or_refused_with_a_reason():
    missing = [
        name for name, cls in coverage.public_layers() if coverage.layer_status(name, cls) is None
    ]
    assert not missing, f"keras.layers classes in no category (rules/coverage.py): {missing}"


@pytest.mark.parametrize("kind", ["ops", "layers"])
def test_coverage_entries_are_current(kind):
    """An entry names a public op/layer without a rule, in one category only, with a
    reason: one that gets a rule, or leaves Keras, fails here."""
    if kind == "ops":
        public = dict(coverage.public_ops())
        traced, refused = coverage.TRACED_OPS, coverage.REFUSED_OPS
        statuses = {name: coverage.op_status(name, f) for name, f in public.items()}
    else:
        public = dict(coverage.public_layers())
        traced, refused = coverage.TRACED_LAYERS, coverage.REFUSED_LAYERS
        statuses = {name: coverage.layer_status(name, cls) for name, cls in public.items()}
    assert not set(traced) & set(refused)
    assert not (set(traced) | set(refused)) - set(public)
    has_rule = [n for n in [*traced, *refused] if statuses[n][0] == "rule"]
    assert not has_rule, f"entries that now have a rule: {has_rule}"
    assert all(reason.strip() for reason in [*traced.values(), *refused.values()])


def test_operation_class_is_the_recorded_operation():
    """The op -> operation mapping agrees with what a symbolic call records."""
    x = keras.Input((3, 4))
    for name in ("add", "mean", "cast", "pad", "one_hot", "max_pool", "normalize", "round"):
        function = getattr(keras.ops, name)
        args = {
            "add": (x, 1.0),
            "cast": (x, "int32"),
            "pad": (x, ((0, 0), (1, 1), (0, 0))),
            "one_hot": (keras.ops.cast(x, "int32"), 3),
            "max_pool": (x, 2),
        }.get(name, (x,))
        y = function(*args)
        recorded = type(y._keras_history.operation)
        assert coverage.operation_class(function) is recorded, name


def _self_attention(layer):
    return lambda x: layer(x, x)


# Each traced layer, exported and compared with Keras at inference.
TRACED_LAYERS = {
    "Dot": (lambda: layers.Dot(axes=2, normalize=True), [(4, 6), (5, 6)]),
    "RMSNormalization": (lambda: layers.RMSNormalization(), [(4, 6)]),
    "Lambda": (lambda: layers.Lambda(lambda x: x * 2.0 + 1.0), [(4, 6)]),
    "CenterCrop": (lambda: layers.CenterCrop(4, 3), [(6, 6, 3)]),
    "Attention": (lambda: layers.Attention(), [(4, 6), (5, 6)]),
    "AdditiveAttention": (lambda: layers.AdditiveAttention(), [(4, 6), (5, 6)]),
    "GroupQueryAttention": (  # self-attention: query and value the same tensor
        lambda: _self_attention(layers.GroupQueryAttention(4, 4, 2)),
        [(5, 8)],
    ),
    "CategoryEncoding": (lambda: layers.CategoryEncoding(5, output_mode="one_hot"), "int"),
    "SpectralNormalization": (lambda: layers.SpectralNormalization(layers.Dense(3)), [(6,)]),
    "ReversibleEmbedding": (lambda: layers.ReversibleEmbedding(10, 4), "int"),
    "RandomFlip": (lambda: layers.RandomFlip(), [(6, 6, 3)]),
    "RandomRotation": (lambda: layers.RandomRotation(0.1), [(6, 6, 3)]),
    "RandomZoom": (lambda: layers.RandomZoom(0.1), [(6, 6, 3)]),
    "RandomContrast": (lambda: layers.RandomContrast(0.1), [(6, 6, 3)]),
}


@pytest.mark.parametrize("name", list(TRACED_LAYERS))
def test_traced_layer_exports(name, tmp_path):
    layer_class = name.split("-")[0]  # "TimeDistributed-relu": a TimeDistributed
    assert coverage.layer_status(layer_class, getattr(layers, layer_class))[0] == "traced"
    make, shapes = TRACED_LAYERS[name]
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(1)
    if shapes == "int":
        inputs = [keras.Input((4,), dtype="int32", name="x")]
        arrays = [rng.integers(0, 5, (3, 4)).astype("int32")]
    else:
        inputs = [keras.Input(shape, name=f"x{i}") for i, shape in enumerate(shapes)]
        arrays = [rng.standard_normal((3, *shape)).astype("float32") for shape in shapes]
    layer = make()
    model = keras.Model(inputs, layer(inputs if len(inputs) > 1 else inputs[0]))
    export_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: a for i, a in zip(session.get_inputs(), arrays, strict=True)}
    (actual,) = session.run(None, feed)
    expected = model(arrays if len(arrays) > 1 else arrays[0], training=False)
    np.testing.assert_allclose(actual, keras.ops.convert_to_numpy(expected), rtol=1e-5, atol=1e-5)


def test_coverage_document_is_current():
    """docs/COVERAGE.md is coverage.markdown() (regenerate it with the command below)."""
    document = (ROOT / "docs" / "COVERAGE.md").read_text()
    assert document == coverage.markdown(), (
        "docs/COVERAGE.md is stale: python -c 'from keras_bn.converters.onnx.rules import "
        'coverage; open("docs/COVERAGE.md", "w").write(coverage.markdown())\''
    )


def test_a_leaky_relu_activation_op_is_refused_by_name(tmp_path):
    """keras.activations.relu with a negative slope, recorded as its own op (inside
    TimeDistributed), is refused with the reason, not exported as a plain ReLU."""
    from keras_bn.converters.onnx.export import UnsupportedLayersError

    def leaky(x):
        return keras.activations.relu(x, negative_slope=0.1)

    inputs = keras.Input((4, 6))
    model = keras.Model(inputs, layers.TimeDistributed(layers.Dense(3, activation=leaky))(inputs))
    with pytest.raises(UnsupportedLayersError, match="negative_slope"):
        export_onnx(model, tmp_path / "m.onnx")

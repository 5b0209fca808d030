"""EinsumDense, MultiHeadAttention and UnitNormalization exported natively
(rules/attention.py, rules/normalization.py), judged against float64 at batch 1 and 3
(``support.checks.export_and_judge``)."""

import keras
import numpy as np
import pytest
from support.checks import export_and_judge
from support.models import batch_norm_layers, randomize_batch_norms

from keras_bn.converters.onnx.export import UnsupportedLayersError, export_onnx
from keras_bn.converters.onnx.rules.attention import projection_plan

L = keras.layers
TIME, FEATURES = 5, 8


def _floats(*shapes, seed=0):
    def make(batch):
        rng = np.random.default_rng(seed)
        return [rng.normal(0.0, 1.5, (batch, *shape)).astype("float32") for shape in shapes]

    return make


def _randomized(model, seed=0):
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        weight.assign(rng.normal(0.0, 0.5, tuple(weight.shape)).astype("float32"))
    return model


EINSUMS = {
    "projection": ("abc,cd->abd", (None, 6), "d"),
    "two-new-axes": ("abc,cde->abde", (None, 2, 3), "de"),
    "bias-last-axis": ("abc,cde->abde", (None, 2, 3), "e"),
    "bias-on-time": ("abc,cd->abd", (TIME, 6), "b"),
    "reduce-time": ("abc,cd->ad", (6,), None),
    "flatten": ("abc,bcd->ad", (6,), "d"),
    "ellipsis": ("...b,bc->...c", 6, "c"),
    "transposed-kernel": ("abc,dc->abd", (None, 6), None),
}


@pytest.mark.parametrize("spec", EINSUMS.values(), ids=EINSUMS.keys())
def test_einsum_dense(spec, tmp_path):
    equation, output_shape, bias_axes = spec
    inputs = keras.Input((TIME, FEATURES))
    layer = L.EinsumDense(equation, output_shape, bias_axes=bias_axes, activation="tanh")
    model = _randomized(keras.Model(inputs, layer(inputs)))
    result, _ = export_and_judge(model, _floats((TIME, FEATURES)), tmp_path / "model.onnx")
    plain = projection_plan(equation, 3) is not None
    assert ("MatMul" in result.op_counts) == plain
    assert ("Einsum" in result.op_counts) == (not plain)


ATTENTION = {
    "self": ({}, {}),
    "value-dim-output-shape-no-bias": (dict(value_dim=3, output_shape=5, use_bias=False), {}),
    "causal": ({}, dict(use_causal_mask=True)),
    "scores": ({}, dict(return_attention_scores=True)),
}


@pytest.mark.parametrize("spec", ATTENTION.values(), ids=ATTENTION.keys())
def test_self_attention(spec, tmp_path):
    config, call = spec
    inputs = keras.Input((TIME, FEATURES))
    outputs = L.MultiHeadAttention(2, 4, dropout=0.3, **config)(inputs, inputs, **call)
    model = _randomized(keras.Model(inputs, outputs))
    result, _ = export_and_judge(model, _floats((TIME, FEATURES)), tmp_path / "model.onnx")
    assert result.op_counts["Softmax"] == 1


def test_cross_attention_with_key_and_mask_input(tmp_path):
    query = keras.Input((TIME, FEATURES))
    value, key = keras.Input((7, 6)), keras.Input((7, 6))
    mask = keras.Input((TIME, 7), dtype="bool")
    outputs = L.MultiHeadAttention(3, 2)(query, value, key=key, attention_mask=mask)
    model = _randomized(keras.Model([query, value, key, mask], outputs))

    def make(batch):
        arrays = _floats((TIME, FEATURES), (7, 6), (7, 6))(batch)
        keep = np.random.default_rng(2).random((batch, TIME, 7)) > 0.4
        keep[..., 0] = True  # no fully masked row
        return [*arrays, keep]

    export_and_judge(model, make, tmp_path / "model.onnx")


def test_causal_attention_over_any_length(tmp_path):
    inputs = keras.Input((None, FEATURES))
    outputs = L.MultiHeadAttention(2, 4)(inputs, inputs, use_causal_mask=True)
    model = _randomized(keras.Model(inputs, outputs))
    result, _ = export_and_judge(model, _floats((TIME, FEATURES)), tmp_path / "model.onnx")
    assert result.op_counts["Trilu"] == 1


def test_a_keras_mask_on_the_query_is_refused(tmp_path):
    ids = keras.Input((TIME,), dtype="int32")
    x = L.Embedding(10, FEATURES, mask_zero=True)(ids)
    model = keras.Model(ids, L.MultiHeadAttention(2, 4)(x, x))
    with pytest.raises(UnsupportedLayersError, match="carries a Keras mask"):
        export_onnx(model, tmp_path / "model.onnx")


@pytest.mark.parametrize(
    "consumer",
    [
        lambda x: L.Attention()([x, x]),
        lambda x: L.AdditiveAttention()([x, x]),
    ],
    ids=["attention", "additive-attention"],
)
def test_a_keras_mask_a_layer_would_apply_is_refused(consumer, tmp_path):
    """Masking's mask reaches Attention and AdditiveAttention as their call's mask=,
    which changes their outputs; the export refuses them by name rather than writing
    the unmasked layer, traced or (TensorFlow) recorded as a graph (validation on
    inputs without the mask value passed such a file)."""
    inputs = keras.Input((TIME, FEATURES), name="series")
    model = keras.Model(inputs, consumer(L.Dense(FEATURES)(L.Masking(0.0)(inputs))))
    with pytest.raises(UnsupportedLayersError, match="carries a Keras mask"):
        export_onnx(model, tmp_path / "model.onnx")


def test_a_masks_explicit_or_unused_pass_through(tmp_path):
    """The same attention given its mask explicitly is exported and exact on padded
    samples; a Lambda whose function takes no mask is not refused."""
    inputs = keras.Input((TIME, FEATURES), name="series")
    keep = L.Lambda(lambda x: keras.ops.any(keras.ops.not_equal(x, 0.0), axis=-1))(inputs)
    hidden = L.Dense(FEATURES)(inputs)
    attended = L.Attention()([hidden, hidden], mask=[keep, keep])
    doubled = L.Lambda(lambda x: 2.0 * x)(L.Masking(0.0)(attended))
    model = _randomized(keras.Model(inputs, doubled))

    def make(batch):
        x = _floats((TIME, FEATURES))(batch)[0]
        x[:, TIME // 2 :] = 0.0  # padded, as Masking expects
        return [x]

    export_and_judge(model, make, tmp_path / "model.onnx")


@pytest.mark.parametrize("axis", [-1, [1, 2]], ids=["last", "two-axes"])
def test_unit_normalization(axis, tmp_path):
    inputs = keras.Input((TIME, FEATURES))
    model = keras.Model(inputs, L.UnitNormalization(axis=axis)(inputs))
    export_and_judge(model, _floats((TIME, FEATURES)), tmp_path / "model.onnx")


LAYER_NORMS = {
    "rms": dict(rms_scaling=True),
    "no-center-no-scale": dict(center=False, scale=False),
    "two-axes": dict(axis=[1, 2]),
    "middle-axis": dict(axis=1),
}


@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")
@pytest.mark.parametrize("config", LAYER_NORMS.values(), ids=LAYER_NORMS.keys())
def test_layer_normalization_configurations(config, tmp_path):
    inputs = keras.Input((TIME, FEATURES))
    model = _randomized(keras.Model(inputs, L.LayerNormalization(**config)(inputs)))
    export_and_judge(model, _floats((TIME, FEATURES)), tmp_path / "model.onnx")


@pytest.mark.parametrize(
    "config", [dict(groups=2), dict(groups=4, center=False, scale=False)], ids=["2", "4-plain"]
)
def test_group_normalization_on_sequences(config, tmp_path):
    inputs = keras.Input((TIME, FEATURES))
    model = _randomized(keras.Model(inputs, L.GroupNormalization(**config)(inputs)))
    export_and_judge(model, _floats((TIME, FEATURES)), tmp_path / "model.onnx")


# --------------------------------------------------------------------------------------
# A model users write.


def transformer_encoder(width=16, heads=2, hidden=32):
    """Self-attention, residual and LayerNormalization, then a feed-forward block whose
    Dense layers are each followed by BatchNormalization (foldable)."""
    inputs = keras.Input((TIME, width), name="embedded")
    attended = L.MultiHeadAttention(heads, width // heads, dropout=0.1)(inputs, inputs)
    x = L.LayerNormalization(epsilon=1e-6)(L.Add()([inputs, attended]))
    y = L.Dense(hidden)(x)
    y = L.BatchNormalization()(y)
    y = L.Activation("gelu")(y)
    y = L.Dense(width)(y)
    y = L.BatchNormalization()(y)
    x = L.LayerNormalization(epsilon=1e-6)(L.Add()([x, y]))
    outputs = L.Dense(3)(L.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs, name="transformer_encoder")


def test_users_model_transformer_encoder_folds_its_batch_norms(tmp_path):
    model = randomize_batch_norms(_randomized(transformer_encoder()))
    assert len(batch_norm_layers(model)) == 2
    result, _ = export_and_judge(model, _floats((TIME, 16)), tmp_path / "model.onnx", fold=True)
    assert result.fold_report.not_folded_count == 0
    assert "BatchNormalization" not in result.op_counts
    assert result.op_counts["Softmax"] == 1

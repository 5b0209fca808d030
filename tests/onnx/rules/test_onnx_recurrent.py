"""Recurrent layers exported natively (rules/recurrent.py), judged against float64.

Each configuration is exported with a dynamic batch, run in onnxruntime at batch 1
and 3, and its error against a float64 run of the same Keras model must be no
worse than Keras float32's own (``support.checks.export_and_judge``). Masks come from
Masking layers over right-padded sequences (ONNX's ``sequence_lens`` form) and over
any pattern: left padding, gaps, a fully masked sequence.
"""

import keras
import numpy as np
import onnx
import pytest
from support.checks import export_and_judge
from support.models import batch_norm_layers, randomize_batch_norms

from keras_bn.converters.onnx.export import UnsupportedLayersError, export_onnx
from keras_bn.converters.onnx.rules import recurrent

L = keras.layers
TIME, FEATURES, UNITS = 6, 4, 3


def _sequences(batch, seed=0, padded=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.5, (batch, TIME, FEATURES)).astype("float32")
    if padded:  # right padding of varied length; the first sequence is full
        for i in range(1, batch):
            x[i, TIME - 1 - (i % (TIME - 1)) :] = 0.0
    return [x]


def _model(layer, masked=False):
    inputs = keras.Input((TIME, FEATURES))
    x = L.Masking(0.0)(inputs) if masked else inputs
    return keras.Model(inputs, layer(x), name=f"{layer.name}_model")


def _weights_of_every_size(model, seed=0):
    """Weights spread enough that every gate matters (default init is near-linear)."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        shape = tuple(weight.shape)
        weight.assign(rng.normal(0.0, 0.6, shape).astype("float32"))
    return model


CLASSES = {"SimpleRNN": L.SimpleRNN, "GRU": L.GRU, "LSTM": L.LSTM}
CONFIGS = {
    "last": {},
    "sequences": {"return_sequences": True},
    "backwards": {"go_backwards": True},
    "backwards-sequences": {"go_backwards": True, "return_sequences": True},
    "no-bias-states": {"use_bias": False, "return_state": True, "return_sequences": True},
    "activations": {"activation": "relu", "unroll": True},
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("name", CLASSES)
def test_recurrent_layer(name, config, tmp_path):
    config = dict(config)
    if name != "SimpleRNN" and "activation" in config:
        config["recurrent_activation"] = "hard_sigmoid"
    model = _weights_of_every_size(_model(CLASSES[name](UNITS, **config)))
    result, _ = export_and_judge(model, _sequences, tmp_path / "model.onnx")
    op_type = {"SimpleRNN": "RNN"}.get(name, name)
    assert result.op_counts[op_type] == 1


@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_reset_after_is_linear_before_reset(reset_after, tmp_path):
    model = _weights_of_every_size(_model(L.GRU(UNITS, reset_after=reset_after)))
    export_and_judge(model, _sequences, tmp_path / "model.onnx")
    (node,) = [n for n in onnx.load(tmp_path / "model.onnx").graph.node if n.op_type == "GRU"]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes["linear_before_reset"] == int(reset_after)


@pytest.mark.parametrize(
    "activation, recurrent_activation",
    [("linear", "sigmoid"), ("softsign", "hard_sigmoid"), ("elu", "sigmoid")],
)
def test_recurrent_activations(activation, recurrent_activation, tmp_path):
    layer = L.LSTM(UNITS, activation=activation, recurrent_activation=recurrent_activation)
    model = _weights_of_every_size(_model(layer))
    export_and_judge(model, _sequences, tmp_path / "model.onnx")


def test_rnn_of_a_cell_and_initial_state(tmp_path):
    inputs = keras.Input((TIME, FEATURES))
    h, c = keras.Input((UNITS,)), keras.Input((UNITS,))
    outputs = L.RNN(L.LSTMCell(UNITS), return_sequences=True)(inputs, initial_state=[h, c])
    model = _weights_of_every_size(keras.Model([inputs, h, c], outputs))

    def make(batch):
        rng = np.random.default_rng(1)
        states = [rng.normal(0, 1, (batch, UNITS)).astype("float32") for _ in range(2)]
        return _sequences(batch) + states

    export_and_judge(model, make, tmp_path / "model.onnx")


@pytest.mark.parametrize(
    "config",
    [{}, {"return_sequences": True}, {"go_backwards": True, "return_sequences": True}],
    ids=["last", "sequences", "backwards-sequences"],
)
@pytest.mark.parametrize("name", CLASSES)
def test_masked_right_padded_sequences(name, config, tmp_path):
    model = _weights_of_every_size(_model(CLASSES[name](UNITS, **config), masked=True))
    result, _ = export_and_judge(
        model, lambda batch: _sequences(batch, padded=True), tmp_path / "model.onnx"
    )
    node = [n for n in onnx.load(tmp_path / "model.onnx").graph.node if n.op_type in "RNNGRULSTM"]
    assert node[0].input[4], "sequence_lens is wired"


def _holey_sequences(batch, seed=0):
    """Masked steps anywhere: sample k has its own pattern (full, left-padded, gaps,
    right-padded, fully masked, one kept step), cycling over the batch."""
    patterns = [
        [1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1],
        [1, 0, 1, 1, 0, 1],
        [0, 1, 0, 0, 1, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
    ]
    (x,) = _sequences(batch, seed)
    for i in range(batch):
        x[i, np.asarray(patterns[(i + seed) % len(patterns)]) == 0] = 0.0
    return [x]


MASKED_CONFIGS = {
    "last": {},
    "sequences": {"return_sequences": True},
    "sequences-zeros": {"return_sequences": True, "zero_output_for_mask": True},
    "backwards-sequences-states": {
        "go_backwards": True,
        "return_sequences": True,
        "return_state": True,
    },
}


@pytest.mark.parametrize("config", MASKED_CONFIGS.values(), ids=MASKED_CONFIGS.keys())
@pytest.mark.parametrize("name", CLASSES)
def test_masks_with_left_padding_and_gaps_are_exact(name, config, tmp_path):
    """Keras skips masked steps anywhere; the export moves kept steps first, exactly."""
    model = _weights_of_every_size(_model(CLASSES[name](UNITS, **config), masked=True))
    for seed in (0, 3):  # batch 1 and 3 of two pattern cycles: all seven patterns
        export_and_judge(
            model, lambda batch, seed=seed: _holey_sequences(batch, seed), tmp_path / "m.onnx"
        )


@pytest.mark.parametrize("return_sequences", [True, False], ids=["sequences", "last"])
def test_bidirectional_masks_with_gaps_are_exact(return_sequences, tmp_path):
    layer = L.Bidirectional(L.GRU(UNITS, return_sequences=return_sequences, return_state=True))
    model = _weights_of_every_size(_model(layer, masked=True))
    for seed in (0, 3):
        result, _ = export_and_judge(
            model, lambda batch, seed=seed: _holey_sequences(batch, seed), tmp_path / "m.onnx"
        )
    assert result.op_counts["GRU"] == 1


def test_holey_masks_at_the_lowest_opset(tmp_path):
    import onnxruntime as ort

    from keras_bn.converters.onnx.export import MIN_OPSET

    layer = L.Bidirectional(L.LSTM(UNITS, return_sequences=True))
    model = _weights_of_every_size(_model(layer, masked=True))
    export_onnx(model, tmp_path / "m.onnx", opset=MIN_OPSET)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (x,) = _holey_sequences(7)
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    (actual,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_holey_masks_differ_from_their_right_padded_reading():
    """The patterns matter: reading them as right-padded lengths (sum(mask), what
    sequence_lens alone expresses) gives other outputs, so the tests above can fail."""
    model = _weights_of_every_size(_model(L.GRU(UNITS, return_sequences=True), masked=True))
    (x,) = _holey_sequences(7)
    lengths = (x != 0).any(axis=-1).sum(axis=1)
    compacted = np.zeros_like(x)
    for i, row in enumerate(x):
        kept = row[(row != 0).any(axis=-1)]
        compacted[i, : len(kept)] = kept
    holey = keras.ops.convert_to_numpy(model(x, training=False))
    right_padded = keras.ops.convert_to_numpy(model(compacted, training=False))
    assert lengths.tolist() == [6, 4, 4, 2, 3, 0, 1]
    differs = np.abs(holey - right_padded).max(axis=(1, 2)) > 1e-3
    assert differs[[1, 2, 3, 6]].all()  # left padding and gaps move the outputs


MERGES = [
    ("concat", False),
    ("concat", True),
    ("sum", True),
    ("mul", False),
    ("ave", True),
    (None, False),
]


@pytest.mark.parametrize(
    "merge_mode, return_sequences",
    MERGES,
    ids=[f"{mode}-{'sequences' if sequences else 'last'}" for mode, sequences in MERGES],
)
def test_bidirectional(merge_mode, return_sequences, tmp_path):
    layer = L.Bidirectional(L.GRU(UNITS, return_sequences=return_sequences), merge_mode=merge_mode)
    model = _weights_of_every_size(_model(layer))
    result, _ = export_and_judge(model, _sequences, tmp_path / "model.onnx")
    assert result.op_counts["GRU"] == 1  # one direction="bidirectional" node


def test_bidirectional_of_different_halves_with_states_and_mask(tmp_path):
    layer = L.Bidirectional(
        L.LSTM(UNITS, return_sequences=True, return_state=True),
        backward_layer=L.LSTM(
            UNITS, return_sequences=True, return_state=True, go_backwards=True, activation="relu"
        ),
    )
    model = _weights_of_every_size(_model(layer, masked=True))
    result, judged = export_and_judge(
        model, lambda batch: _sequences(batch, padded=True), tmp_path / "model.onnx"
    )
    assert result.op_counts["LSTM"] == 2  # the halves differ: one node each
    assert len(judged) == 2 * 5  # the sequence and four states, at two batch sizes


@pytest.mark.parametrize("activation, nodes", [("tanh", 1), ("relu", 2)], ids=["one", "two"])
def test_bidirectional_initial_state(activation, nodes, tmp_path):
    inputs = keras.Input((TIME, FEATURES))
    states = [keras.Input((UNITS,)) for _ in range(4)]  # forward h, c; backward h, c
    forward = L.LSTM(UNITS, return_sequences=True)
    backward = L.LSTM(UNITS, return_sequences=True, go_backwards=True, activation=activation)
    layer = L.Bidirectional(forward, backward_layer=backward, merge_mode="sum")
    outputs = layer(inputs, initial_state=states)
    model = _weights_of_every_size(keras.Model([inputs, *states], outputs))

    def make(batch):
        rng = np.random.default_rng(3)
        return _sequences(batch) + [
            rng.normal(0, 1, (batch, UNITS)).astype("float32") for _ in states
        ]

    result, _ = export_and_judge(model, make, tmp_path / "model.onnx")
    assert result.op_counts["LSTM"] == nodes


def test_stacked_recurrences_transpose_once(tmp_path):
    inputs = keras.Input((TIME, FEATURES))
    x = L.LSTM(UNITS, return_sequences=True)(inputs)
    x = L.GRU(UNITS, return_sequences=True)(x)
    outputs = L.SimpleRNN(UNITS)(x)
    model = _weights_of_every_size(keras.Model(inputs, outputs))
    result, _ = export_and_judge(model, _sequences, tmp_path / "model.onnx")
    assert result.op_counts.get("Transpose", 0) == 1  # the input, to time-major


def test_a_wrong_gate_order_is_caught(tmp_path, monkeypatch):
    """The judge is sharp enough to see Keras's i, f, c, o order written as ONNX's."""
    monkeypatch.setitem(recurrent._CELLS, L.LSTMCell, ("LSTM", (0, 1, 2, 3)))
    model = _weights_of_every_size(_model(L.LSTM(UNITS)))
    with pytest.raises(AssertionError, match="against float64"):
        export_and_judge(model, _sequences, tmp_path / "model.onnx")


@pytest.mark.parametrize(
    "layer, reason",
    [
        (lambda: L.LSTM(UNITS, stateful=True), "stateful"),
        (lambda: L.SimpleRNN(UNITS, activation="gelu"), "activation='gelu'"),
        (lambda: L.GRU(UNITS, recurrent_activation="softplus"), "recurrent_activation"),
        (lambda: L.RNN([L.GRUCell(2), L.GRUCell(2)]), "StackedRNNCells"),
    ],
    ids=["stateful", "activation", "softplus", "stacked-cells"],
)
def test_unsupported_configurations_name_the_reason(layer, reason, tmp_path):
    inputs = keras.Input((TIME, FEATURES), batch_size=2)
    model = keras.Model(inputs, layer()(inputs))
    with pytest.raises(UnsupportedLayersError, match=reason):
        export_onnx(model, tmp_path / "model.onnx")


# --------------------------------------------------------------------------------------
# Models users write.


def embedding_bidirectional_lstm():
    ids = keras.Input((TIME,), dtype="int32", name="tokens")
    x = L.Embedding(50, 8, mask_zero=True)(ids)
    x = L.Bidirectional(L.LSTM(6))(x)
    outputs = L.Dense(3, activation="softmax")(x)
    return keras.Model(ids, outputs, name="embedding_bilstm")


def token_ids(batch, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 50, (batch, TIME)).astype("int32")
    for i in range(1, batch):
        if i % 2:  # left padding: keras.utils.pad_sequences' default (padding="pre")
            ids[i, : 1 + i % (TIME - 1)] = 0
        else:
            ids[i, TIME - 1 - (i % (TIME - 1)) :] = 0
    return [ids]


def masked_gru_classifier():
    inputs = keras.Input((TIME, FEATURES), name="frames")
    x = L.Masking(0.0)(inputs)
    x = L.GRU(8, return_sequences=True)(x)
    x = L.GRU(8)(x)
    x = L.Dense(8)(x)
    x = L.BatchNormalization()(x)
    outputs = L.Dense(2, activation="softmax")(L.Activation("relu")(x))
    return keras.Model(inputs, outputs, name="masked_gru_classifier")


def test_users_model_embedding_bidirectional_lstm(tmp_path):
    model = _weights_of_every_size(embedding_bidirectional_lstm())
    result, _ = export_and_judge(model, token_ids, tmp_path / "model.onnx")
    assert result.op_counts["LSTM"] == 1


def test_users_model_masked_gru_classifier_folds_its_batch_norm(tmp_path):
    model = randomize_batch_norms(_weights_of_every_size(masked_gru_classifier()))
    assert len(batch_norm_layers(model)) == 1
    result, _ = export_and_judge(model, _holey_sequences, tmp_path / "model.onnx", fold=True)
    assert result.fold_report.not_folded_count == 0
    assert result.op_counts["GRU"] == 2


def test_batch_norm_after_a_returned_sequence_stays_unfolded(tmp_path):
    inputs = keras.Input((TIME, FEATURES))
    x = L.LSTM(UNITS, return_sequences=True)(inputs)
    outputs = L.BatchNormalization()(x)
    model = randomize_batch_norms(_weights_of_every_size(keras.Model(inputs, outputs)))
    result, _ = export_and_judge(model, _sequences, tmp_path / "model.onnx", fold=True)
    assert result.fold_report.not_folded_count == 1


@pytest.mark.first
def test_users_models_on_jax(run_python):
    """The users' models (recurrent and attention) export exactly on the JAX backend."""
    result = run_python(
        [
            "-m",
            "pytest",
            "tests/onnx/rules/test_onnx_recurrent.py",
            "tests/onnx/rules/test_onnx_attention.py",
            "-k",
            "users_model and not on_jax",  # not this test itself
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
        ],
        env={"KERAS_BACKEND": "jax", "JAX_ENABLE_X64": "1"},
        timeout=600,
    )
    summary = result.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "failed" not in summary and "skipped" not in summary, summary
    assert "backend jax" in result.stdout

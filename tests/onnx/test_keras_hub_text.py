"""KerasHub text (and audio) backbones, built offline from tiny constructor arguments.

Each exports natively with a dynamic sequence length (and batch): one ONNX file,
run by onnxruntime at two sequence lengths and two batch sizes, each judged
against a float64 build of the same model with the same weights. Random weights,
with KerasHub's zero-initialized biases, LayerNorm offsets and tables made
non-trivial; padding masks that pad the later samples of a batch.
"""

import functools
import re

import keras
import numpy as np
import pytest
from support.checks import float64_build
from support.jax_speed import keras_outputs

VOCABULARY = 60


def _bert():
    import keras_hub

    return keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=32,
    )


def _distil_bert():
    import keras_hub

    return keras_hub.models.DistilBertBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=32,
    )


def _roberta():
    import keras_hub

    return keras_hub.models.RobertaBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=32,
    )


def _albert():
    import keras_hub

    return keras_hub.models.AlbertBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=2,
        num_heads=2,
        embedding_dim=8,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=32,
    )


def _electra():
    import keras_hub

    return keras_hub.models.ElectraBackbone(
        vocab_size=VOCABULARY,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        embedding_dim=8,
        intermediate_dim=32,
        max_sequence_length=32,
    )


def _deberta_v3():
    import keras_hub

    return keras_hub.models.DebertaV3Backbone(
        vocabulary_size=VOCABULARY,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=32,
        bucket_size=8,
    )


def _f_net():
    import keras_hub

    return keras_hub.models.FNetBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=32,
    )


def _gpt2():
    import keras_hub

    return keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCABULARY,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=32,
    )


def _gemma():
    import keras_hub

    return keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )


def _llama():
    import keras_hub

    return keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
    )


def _mistral():
    import keras_hub

    return keras_hub.models.MistralBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
    )


def _qwen():
    import keras_hub

    return keras_hub.models.QwenBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
    )


def _phi3():
    import keras_hub

    return keras_hub.models.Phi3Backbone(
        vocabulary_size=VOCABULARY,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
    )


def _whisper():
    import keras_hub

    return keras_hub.models.WhisperBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        num_mels=8,
        max_encoder_sequence_length=64,
        max_decoder_sequence_length=32,
    )


MODELS = {
    "bert": _bert,
    "distil_bert": _distil_bert,
    "roberta": _roberta,
    "albert": _albert,
    "electra": _electra,
    "deberta_v3": _deberta_v3,
    "f_net": _f_net,
    "gpt2": _gpt2,
    "gemma": _gemma,
    "llama": _llama,
    "mistral": _mistral,
    "qwen": _qwen,
    "phi3": _phi3,
    "whisper": _whisper,
}

# The two sequence lengths each export is run at (the encoder's audio frames for Whisper:
# twice the decoder's, within its limits).
LENGTHS = (7, 12)
BATCH_SIZES = (1, 3)


def _randomize_zero_weights(model, rng):
    """KerasHub initializes biases, LayerNorm offsets and some tables to zero: make
    them non-trivial, so that a wrong sign or axis in their export shows."""
    for weight in model.weights:
        value = keras.ops.convert_to_numpy(weight)
        if value.dtype.kind == "f" and not value.any():
            weight.assign(rng.normal(0.0, 0.1, value.shape).astype(value.dtype))


@functools.cache
def _built(name):
    """The float32 model and its float64 twin's run, built once per session."""
    keras.utils.set_random_seed(0)
    model = MODELS[name]()
    _randomize_zero_weights(model, np.random.default_rng(0))
    return model, float64_build(MODELS[name], model)


def _inputs(model, batch, length, seed=0):
    """Arrays for every input of ``model``, by name: tokens, padding masks that pad
    the later samples, segment ids, audio features."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for tensor in model.inputs:
        name = tensor.name
        rank = len(tensor.shape)
        if name.endswith("padding_mask"):
            size = length
            keep = np.maximum(size - np.arange(batch) * 2, 1)
            arrays[name] = (np.arange(size)[None, :] < keep[:, None]).astype("int32")
        elif name.endswith("token_ids"):
            arrays[name] = rng.integers(1, VOCABULARY, (batch, length)).astype("int32")
        elif name == "segment_ids":
            arrays[name] = (np.arange(length)[None, :] >= length // 2).repeat(batch, 0)
            arrays[name] = arrays[name].astype("int32")
        elif name == "encoder_features":
            arrays[name] = rng.standard_normal((batch, 2 * length, tensor.shape[-1]))
            arrays[name] = arrays[name].astype("float32")
        else:
            raise AssertionError(f"unexpected input {name!r} of rank {rank}")
    return arrays


def _judge(model, twin, path, length):
    """onnxruntime on ``path`` at ``length``, batches 1 and 3, against the float64 run."""
    import onnxruntime as ort

    from keras_bn.converters.comparison import compare_arrays, judge_against_exact

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    arrays = _inputs(model, max(BATCH_SIZES), length, seed=length)
    expected_all = keras_outputs(model, arrays)  # on JAX compiled whole (support/jax_speed.py)
    exact_all = twin(arrays)
    for batch in BATCH_SIZES:
        feed = {item.name: arrays[item.name][:batch] for item in session.get_inputs()}
        actual = session.run(None, feed)
        assert len(actual) == len(expected_all) == len(exact_all)
        for onnx_out, keras_out, exact_out in zip(actual, expected_all, exact_all, strict=True):
            keras_out, exact_out = keras_out[:batch], exact_out[:batch]
            assert onnx_out.shape == keras_out.shape, (length, batch, onnx_out.shape)
            verdict = judge_against_exact(
                compare_arrays(onnx_out, keras_out), onnx_out, keras_out, exact_out
            )
            assert verdict.passed, (length, batch, verdict)


@pytest.mark.parametrize("name", list(MODELS))
def test_text_backbone_exports_with_a_dynamic_sequence_length(name, tmp_path):
    import onnx

    from keras_bn.converters.onnx.export import export_onnx

    model, twin = _built(name)
    path = tmp_path / f"{name}.onnx"
    result = export_onnx(model, path, fold=True)
    assert not result.used_fallback
    for item in onnx.load(str(path)).graph.input:
        dims = item.type.tensor_type.shape.dim
        assert all(d.dim_param for d in dims[:2]), (item.name, dims)  # batch and length
    for length in LENGTHS:
        _judge(model, twin, path, length)


def test_fixed_input_shapes_give_static_lengths(tmp_path):
    """``input_shapes`` fixes the sequence length: static in the ONNX inputs, exact there."""
    import onnx

    from keras_bn.converters.onnx.export import export_onnx

    model, twin = _built("bert")
    path = tmp_path / "bert.onnx"
    shapes = {tensor.name: (LENGTHS[1],) for tensor in model.inputs}
    result = export_onnx(model, path, fold=True, input_shapes=shapes)
    assert sorted(result.output_names) == sorted(
        export_onnx(model, tmp_path / "dynamic.onnx").output_names
    )
    for item in onnx.load(str(path)).graph.input:
        dims = item.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_value == LENGTHS[1], item
    _judge(model, twin, path, LENGTHS[1])


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"tokens": (8,)}, r"CLI: --input-shape\), which are not inputs of the model"),
        ({"token_ids": (8, 2)}, "expected the sizes after the batch"),
    ],
    ids=["unknown-name", "wrong-rank"],
)
def test_invalid_input_shapes_are_user_errors(shapes, message, tmp_path):
    from keras_bn.converters.errors import UserInputError
    from keras_bn.converters.onnx.export import export_onnx

    model, _ = _built("bert")
    with pytest.raises(UserInputError, match=message):
        export_onnx(model, tmp_path / "m.onnx", input_shapes=shapes)


def test_cli_exports_with_inputs_and_the_file_runs_at_another_length(tmp_path, capsys):
    """``keras-bn export model.keras -o m.onnx --inputs tokens.npz`` on a saved BERT:
    validated at the file's length, then the ONNX file runs exactly at two others."""
    from keras_bn.converters.cli import main

    model, twin = _built("bert")
    model.save(tmp_path / "bert.keras")
    np.savez(tmp_path / "tokens.npz", **_inputs(model, 2, 9))
    code = main(
        [
            "export",
            str(tmp_path / "bert.keras"),
            "-o",
            str(tmp_path / "m.onnx"),
            "--inputs",
            str(tmp_path / "tokens.npz"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "validation" in captured.out and "passed" in captured.out
    for length in LENGTHS:
        _judge(model, twin, tmp_path / "m.onnx", length)


def _too_long(arrays):
    return {name: np.concatenate([array] * 4, axis=1)[:, :33] for name, array in arrays.items()}


def _token_id(arrays, value):
    return {**arrays, "token_ids": np.where(np.arange(9) == 4, value, arrays["token_ids"])}


def _segment_id(arrays, value):
    return {**arrays, "segment_ids": np.full_like(arrays["segment_ids"], value)}


@pytest.mark.parametrize(
    "option, change, message",
    [
        ("--inputs", lambda a: _token_id(a, VOCABULARY), "holds the id 60, outside the "
         "vocabulary of 'token_embedding' (ReversibleEmbedding, ids 0 to 59)"),
        ("--calibration", lambda a: _segment_id(a, -1), "holds the id -1, outside the "
         "vocabulary of 'segment_embedding' (Embedding, ids 0 to 1)"),
        ("--inputs", _too_long, "input 'token_ids' holds sequences of 33; "
         "'position_embedding' (PositionEmbedding) has 32 positions"),
        ("--calibration", _too_long, "holds sequences of 33; 'position_embedding' "
         "(PositionEmbedding) has 32 positions: give sequences of at most 32"),
    ],
    ids=["id-beyond-vocabulary", "negative-segment", "long-inputs", "long-calibration"],
)  # fmt: skip
def test_ids_the_model_cannot_look_up_are_the_files_error(
    option, change, message, tmp_path, capsys
):
    """Token ids outside an Embedding's vocabulary, or sequences longer than BERT's
    position table, in ``--inputs`` or ``--calibration``: one line naming the file,
    the input and the layer, exit 2, nothing written. They used to end as an
    "internal error" traceback from onnxruntime's calibration run (int8), as
    "validation failed" with NaN from Keras on JAX, or as advice to re-save the model."""
    from keras_bn.converters.cli import main

    model, _ = _built("bert")
    model.save(tmp_path / "bert.keras")
    good = _inputs(model, 4, 9)
    np.savez(tmp_path / "good.npz", **good)
    np.savez(tmp_path / "bad.npz", **change(good))
    arguments = ["export", str(tmp_path / "bert.keras"), "-o", str(tmp_path / "m.onnx")]
    arguments += ["--inputs", str(tmp_path / ("bad.npz" if option == "--inputs" else "good.npz"))]
    if option == "--calibration":
        arguments += ["--precision", "int8", "--calibration", str(tmp_path / "bad.npz")]
    code = main(arguments)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = [line for line in captured.err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    file = "Inputs file" if option == "--inputs" else "Calibration file"
    assert f"{file} {str(tmp_path / 'bad.npz')!r}" in lines[0], lines[0]
    assert message in lines[0], lines[0]
    assert not (tmp_path / "m.onnx").exists()


def test_generated_inputs_fit_a_position_table_shorter_than_the_default_length(tmp_path, capsys):
    """Validation generates sequences of 32 where a size is unknown; a BERT built with
    13 positions took none of them (Keras and onnxruntime both refused), so
    ``keras-bn export`` without ``--inputs`` failed. Generated sequences now take
    the table's length, and the export validates."""
    import keras_hub

    from keras_bn.converters import samples
    from keras_bn.converters.cli import main

    model = keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY, num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=13,
    )  # fmt: skip
    assert [shape for shape, _ in samples.sample_specs(model, 2)] == [(2, 13)] * 3
    model.save(tmp_path / "bert.keras")
    code = main(["export", str(tmp_path / "bert.keras"), "-o", str(tmp_path / "m.onnx")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Validation PASSED" in captured.out


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_cli_converts_text_backbones_to_float16_and_int8(name, tmp_path, capsys):
    """``--precision float16`` and ``--precision int8`` on a saved text backbone pass
    validation against Keras. Each made a file onnxruntime refused, or ended in an
    error: BERT's pooler reads its sequence output, a graph output (the float16
    converter cast it back to float32 for the pooler too); GPT-2's position ids read
    one scalar in a Range and an Add (the converter kept it float32 for both); the
    int8 layer report declared every layer output float, the padding mask's too."""
    from keras_bn.converters.cli import main

    model, _ = _built(name)
    model.save(tmp_path / "m.keras")
    np.savez(tmp_path / "tokens.npz", **_inputs(model, 24, 9))
    for precision in ("float16", "int8"):
        out = tmp_path / f"m_{precision}.onnx"
        arguments = ["export", str(tmp_path / "m.keras"), "-o", str(out), "--precision", precision]
        arguments += ["--inputs", str(tmp_path / "tokens.npz")]
        if precision == "int8":
            arguments += ["--calibration", str(tmp_path / "tokens.npz")]
        code = main(arguments)
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "Validation PASSED" in captured.out and out.exists(), precision


def test_a_mixed_precision_decoder_is_judged_against_its_float64_run(tmp_path, capsys):
    """Llama trained under mixed_float16 computes in float16, and so does its file
    (the casts are Keras's): it misses float32's tolerances, and no float64 copy of it
    can be made (``LlamaTransformerDecoder.get_config`` raises). Validation judged
    nothing and failed ("the float64 copy of the model could not be made"); it now
    runs the model itself switched to float64 and passes. An independent float64
    build of the same weights agrees: the file is within Keras float16's own noise."""
    from keras_bn.converters.cli import main

    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = _llama()
    finally:
        keras.config.set_dtype_policy(policy)
    _randomize_zero_weights(model, np.random.default_rng(0))
    model.save(tmp_path / "m.keras")
    code = main(["export", str(tmp_path / "m.keras"), "-o", str(tmp_path / "m.onnx")])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "judged against the same model run in float64" in captured.out
    # Keras's own error, against which the file's is set, is float16's: said so
    assert "within float16 noise" in captured.out and "Keras float16's own" in captured.out
    _judge(model, float64_build(_llama, model), tmp_path / "m.onnx", LENGTHS[0])


@pytest.mark.parametrize("name", ["gemma", "llama"])
def test_int8_keeps_the_attention_masks_of_decoders(name, tmp_path, capsys):
    """A decoder's causal mask is computed from float positions (``arange + offset >=
    arange``) and fills masked scores with -1e9 (Gemma) or float32's lowest (Llama)
    before the softmax. Quantized, positions rounded into their neighbours (a token
    saw later ones) and one range spanned the fill (every real score the same level):
    Gemma failed validation at 7.5 dB, Llama passed at 21.9 dB with tokens that could
    not see themselves. Those nodes stay float: the int8 file passes validation and
    applies the float model's masks."""
    import onnxruntime as ort

    from keras_bn.converters.cli import main

    model, _ = _built(name)
    model.save(tmp_path / "m.keras")
    tokens = _inputs(model, 24, 9)
    np.savez(tmp_path / "tokens.npz", **tokens)
    out = tmp_path / "m.onnx"
    files = [
        "--inputs",
        str(tmp_path / "tokens.npz"),
        "--calibration",
        str(tmp_path / "tokens.npz"),
    ]
    code = main(
        ["export", str(tmp_path / "m.keras"), "-o", str(out), "--precision", "int8", *files]
    )
    assert code == 0, capsys.readouterr().err
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    received = session.run(None, {i.name: tokens[i.name] for i in session.get_inputs()})[0]
    expected = np.asarray(keras_outputs(model, tokens)[0], np.float64)
    noise = np.mean((received - expected) ** 2)
    assert 10 * np.log10(np.mean(expected**2) / noise) > 20
    # The masks the attention applies (each Where before a Softmax selects by one) are
    # the float model's, position for position.
    export = tmp_path / "float.onnx"
    assert main(["export", str(tmp_path / "m.keras"), "-o", str(export), *files[:2]]) == 0
    masks = _attention_masks(export, tokens)
    assert masks and all(mask.dtype == bool for mask in masks)
    quantized = _attention_masks(out, tokens)  # the same nodes, in the same order
    assert len(quantized) == len(masks)
    for index, (mask, expected) in enumerate(zip(quantized, masks, strict=True)):
        np.testing.assert_array_equal(mask, expected, err_msg=f"mask {index}")


def _attention_masks(path, feed) -> list:
    """The condition of each Where feeding a Softmax (each once, in graph order), run
    by onnxruntime on ``feed``."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    producers = {output: node for node in model.graph.node for output in node.output}
    names = []
    for node in model.graph.node:
        where = producers.get(node.input[0]) if node.op_type == "Softmax" else None
        while where is not None and where.op_type in ("DequantizeLinear", "QuantizeLinear"):
            where = producers.get(where.input[0])  # through a quantized softmax input
        if where is not None and where.op_type == "Where":
            names.append(where.input[0])
    names = list(dict.fromkeys(names))
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, {i.name: feed[i.name] for i in session.get_inputs()})


def test_cli_input_shape_option(tmp_path, capsys):
    import onnx

    from keras_bn.converters.cli import main

    model, _ = _built("distil_bert")
    model.save(tmp_path / "model.keras")
    options = [f"--input-shape={tensor.name}=10" for tensor in model.inputs]
    code = main(["export", str(tmp_path / "model.keras"), "-o", str(tmp_path / "m.onnx"), *options])
    assert code == 0, capsys.readouterr().err
    for item in onnx.load(str(tmp_path / "m.onnx")).graph.input:
        assert item.type.tensor_type.shape.dim[1].dim_value == 10
    code = main(
        [
            "export",
            str(tmp_path / "model.keras"),
            "-o",
            str(tmp_path / "x.onnx"),
            "--input-shape=ids",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "expected NAME=DIMS" in err and "Traceback" not in err


def test_embeddings_added_before_attention_carry_no_mask(tmp_path):
    """A hand-written Embedding + Embedding -> Add -> MultiHeadAttention: Add has mask
    logic of its own, but no input carries a mask, so none reaches the attention."""
    from support.checks import export_and_judge

    tokens = keras.Input((None,), dtype="int32")
    segments = keras.Input((None,), dtype="int32")
    x = keras.layers.Add()(
        [keras.layers.Embedding(VOCABULARY, 8)(tokens), keras.layers.Embedding(2, 8)(segments)]
    )
    model = keras.Model([tokens, segments], keras.layers.MultiHeadAttention(2, 4)(x, x))

    def make(batch):
        rng = np.random.default_rng(batch)
        return [
            rng.integers(0, VOCABULARY, (batch, 6)).astype("int32"),
            rng.integers(0, 2, (batch, 6)).astype("int32"),
        ]

    export_and_judge(model, make, tmp_path / "model.onnx")


def test_sequence_length_limits_bound_the_trace_sizes():
    """A layer holding a position table of 32 rows is traced at lengths below 32
    (distinct primes, one set per recording); one without a limit at the default sizes."""
    from keras_bn.converters import tracing

    model, _ = _built("bert")
    position = model.get_layer("position_embedding")
    first, second = tracing.unknown_sizes_for(position)
    assert max(first + second) <= 32 and not set(first) & set(second)
    assert tracing.unknown_sizes_for(keras.layers.Dense(4)) == tracing.UNKNOWN_SIZES


@pytest.mark.first
def test_decoder_and_deberta_families_on_jax(run_python):
    """The ``keras-bn`` command runs on JAX by default. The families whose layers
    call nested layers on unknown sizes (Llama's attention under the decoder's
    causal mask, DeBERTa's disentangled attention) trace differently there (a
    nested layer's output inference runs on JAX values): rerun them on JAX."""
    selected = "dynamic_sequence_length and (llama or deberta_v3 or gemma)"
    args = ["-m", "pytest", __file__, "-k", selected, "-p", "no:cacheprovider", "-p", "no:xdist"]
    result = run_python(args, env={"KERAS_BACKEND": "jax"}, timeout=600)
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(r"\b3 passed", summary) and "failed" not in summary, summary
    assert "backend jax" in result.stdout

"""Validation: the comparator, sample inputs, and validate_onnx with localization."""

import json
import math
import warnings

import keras
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from keras import layers
from onnx import numpy_helper
from support.models import randomize_batch_norms

from keras_bn.converters.errors import UserInputError
from keras_bn.converters.onnx.export import ExportWarning, export_onnx
from keras_bn.converters.reference import KerasReference
from keras_bn.converters.validation import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    ValidationReport,
    compare_arrays,
    make_sample_inputs,
    validate_onnx,
)

# --------------------------------------------------------------------------------------
# The comparator.


def test_identical_arrays_pass_with_zero_errors():
    a = np.linspace(-3, 3, 12, dtype="float32").reshape(3, 4)
    c = compare_arrays(a, a.copy(), atol=0.0, rtol=0.0)
    assert c.passed
    assert c.max_abs_error == c.max_rel_error == c.mean_abs_error == c.relative_to_max == 0.0
    assert c.required_atol == c.required_rtol == 0.0
    assert c.max_abs_reference == 3.0


def test_tolerance_boundary_is_polygraphy_elementwise():
    reference = np.array([1.0, -2.0, 0.0, 10.0])
    atol, rtol = 1e-3, 1e-2
    allowed = atol + rtol * np.abs(reference)
    assert compare_arrays(reference + 0.999 * allowed, reference, atol=atol, rtol=rtol).passed
    over = reference + np.array([0.0, 0.0, 1.001, 0.0]) * allowed
    failed = compare_arrays(over, reference, atol=atol, rtol=rtol)
    assert not failed.passed
    assert failed.max_abs_error == pytest.approx(1.001e-3)
    assert failed.max_rel_error == math.inf  # nonzero error where the reference is 0
    assert failed.relative_to_max == pytest.approx(1.001e-3 / 10.0)
    assert failed.required_atol == pytest.approx(1.001e-3)
    # Relative tolerance cannot excuse an error at a zero reference.
    assert failed.required_rtol == math.inf


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        st.integers(1, 20),
        elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False),
    ),
    st.floats(0.0, 1e-2),
    st.floats(0.0, 1e-1),
    st.integers(0, 2**32 - 1),
)
def test_required_tolerances_are_the_smallest_that_pass(reference, atol, rtol, seed):
    noise = np.random.default_rng(seed).normal(0, 1e-2, reference.shape)
    actual = reference + noise
    c = compare_arrays(actual, reference, atol=atol, rtol=rtol)
    slack = 1e-9
    assert compare_arrays(
        actual, reference, atol=c.required_atol * (1 + 1e-9) + slack, rtol=rtol
    ).passed
    if c.required_atol > slack:
        assert not compare_arrays(
            actual, reference, atol=c.required_atol * 0.99 - slack, rtol=rtol
        ).passed
    if math.isfinite(c.required_rtol):
        assert compare_arrays(
            actual, reference, atol=atol, rtol=c.required_rtol * (1 + 1e-9) + slack
        ).passed
    assert c.passed == bool(np.all(np.abs(actual - reference) <= atol + rtol * np.abs(reference)))


def test_nan_and_shape_handling():
    reference = np.array([1.0, np.nan, np.inf])
    assert compare_arrays(reference.copy(), reference, atol=0, rtol=0).passed
    assert not compare_arrays(np.array([1.0, 0.0, np.inf]), reference, atol=1, rtol=1).passed
    mismatch = compare_arrays(np.zeros((2, 3)), np.zeros((3, 2)), atol=1, rtol=1)
    assert not mismatch.passed and "shape" in mismatch.note


def test_report_truthiness_dict_and_text():
    good = compare_arrays(np.ones(3), np.ones(3), atol=1e-4, rtol=1e-3, name="y", batch_size=1)
    bad = compare_arrays(np.zeros(3), np.ones(3), atol=1e-4, rtol=1e-3, name="y", batch_size=4)
    assert ValidationReport("m.onnx", 1e-4, 1e-3, [good])
    report = ValidationReport("m.onnx", 1e-4, 1e-3, [good, bad], first_divergent_layer="conv")
    assert not report and not report.passed
    assert not ValidationReport("m.onnx", 1e-4, 1e-3, [])  # nothing compared is no pass
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is False and data["first_divergent_layer"] == "conv"
    assert data["required_atol"] == pytest.approx(1.0 - 1e-3)
    text = str(report)
    assert "FAILED" in text and "first divergent layer: conv" in text
    assert "would pass with atol >=" in text


# --------------------------------------------------------------------------------------
# Sample inputs.


def test_sample_inputs_for_images_features_and_tokens():
    image = keras.Input((6, 6, 3), name="image")
    features = keras.Input((5,), name="features")
    tokens = keras.Input((4,), dtype="int32", name="tokens")
    h = layers.GlobalAveragePooling2D()(layers.Rescaling(1 / 255.0)(image))
    e = layers.Flatten()(layers.Embedding(7, 2)(tokens))
    model = keras.Model([image, features, tokens], layers.Concatenate()([h, features, e]))
    inputs = make_sample_inputs(model, batch_size=64, seed=3)
    assert list(inputs) == ["image", "features", "tokens"]
    assert inputs["image"].shape == (64, 6, 6, 3) and inputs["image"].dtype == np.float32
    assert inputs["image"].min() >= 0 and inputs["image"].max() <= 255
    assert inputs["image"].max() > 200  # pixels, not unit noise
    assert abs(inputs["features"].mean()) < 0.2 and 0.8 < inputs["features"].std() < 1.2
    assert inputs["tokens"].dtype == np.int32
    assert set(np.unique(inputs["tokens"])) == set(range(7))
    again = make_sample_inputs(model, batch_size=64, seed=3)
    other = make_sample_inputs(model, batch_size=64, seed=4)
    assert all(np.array_equal(inputs[k], again[k]) for k in inputs)
    assert not np.array_equal(inputs["features"], other["features"])


def test_sample_inputs_unknown_dimensions_and_bad_batch():
    x = keras.Input((None, None, 2), name="x")
    model = keras.Model(x, layers.Conv2D(1, 1)(x))
    assert make_sample_inputs(model, 2)["x"].shape == (2, 32, 32, 2)
    for batch_size in (0, -1, 1.5, True):
        with pytest.raises(UserInputError, match="batch_size"):
            make_sample_inputs(model, batch_size)


# --------------------------------------------------------------------------------------
# validate_onnx.


def _conv_bn_model():
    x = keras.Input((8, 8, 3), name="image")
    h = layers.Conv2D(6, 3, name="conv1")(x)
    h = layers.BatchNormalization(name="bn1")(h)
    h = layers.ReLU(name="relu1")(h)
    h = layers.Conv2D(6, 3, name="conv2")(h)
    h = layers.BatchNormalization(name="bn2")(h)
    h = layers.ReLU(name="relu2")(h)
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    model = keras.Model(x, layers.Dense(4, name="logits")(h), name="conv_bn")
    randomize_batch_norms(model)
    return model


def _fold_by_hand(model):
    """The same model with each BN folded into the convolution before it (NumPy)."""
    x = keras.Input((8, 8, 3), name="image")
    h = x
    for index in (1, 2):
        conv, bn = model.get_layer(f"conv{index}"), model.get_layer(f"bn{index}")
        scale = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
        folded = layers.Conv2D(6, 3, name=f"conv{index}")
        h = layers.ReLU(name=f"relu{index}")(folded(h))
        folded.set_weights(
            [
                conv.kernel.numpy() * scale,
                (conv.bias.numpy() - bn.moving_mean.numpy()) * scale + bn.beta.numpy(),
            ]
        )
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    dense = layers.Dense(4, name="logits")
    out = keras.Model(x, dense(h), name="folded")
    dense.set_weights(model.get_layer("logits").get_weights())
    return out


def _export(model, path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)
        return export_onnx(model, path, **kwargs)


def _tamper(path, initializer, factor=1.05):
    proto = onnx.load(str(path))
    for tensor in proto.graph.initializer:
        if tensor.name == initializer:
            tensor.CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(tensor) * factor, tensor.name)
            )
            break
    else:
        raise AssertionError(f"no initializer {initializer}")
    onnx.save(proto, str(path))


def test_defaults():
    assert (DEFAULT_ATOL, DEFAULT_RTOL) == (1e-4, 1e-3)


def test_validate_passes_at_two_batch_sizes(tmp_path):
    model = _conv_bn_model()
    _export(model, tmp_path / "m.onnx")
    report = validate_onnx(model, tmp_path / "m.onnx")
    assert report and report.passed
    assert [(c.name, c.batch_size) for c in report.comparisons] == [("logits", 1), ("logits", 2)]
    assert all(c.relative_to_max < 1e-5 for c in report.comparisons)
    assert report.first_divergent_layer is None and report.layers == []
    assert "PASSED" in str(report)


def test_validate_folded_export_against_the_original(tmp_path):
    model = _conv_bn_model()
    folded = _fold_by_hand(model)
    result = _export(folded, tmp_path / "folded.onnx")
    assert result.warnings == [] and "Mul" not in result.op_counts
    assert validate_onnx(model, tmp_path / "folded.onnx")


def test_another_models_file_fails_naming_the_input_sizes(tmp_path):
    """An ONNX file of another model whose one input has other sizes: each row says
    which sizes the file takes and which the Keras model gives, not onnxruntime's
    INVALID_ARGUMENT text."""

    def dense(width: int) -> keras.Model:
        inputs = keras.Input((width,), name=f"features_{width}")
        return keras.Model(inputs, layers.Dense(3, name="scores")(inputs))

    _export(dense(6), tmp_path / "other.onnx")
    report = validate_onnx(dense(8), tmp_path / "other.onnx")
    assert not report.passed
    expected = "array 'features_6' has shape (1, 8); the ONNX model expects (N, 6)"
    assert report.comparisons and all(expected in c.note for c in report.comparisons)
    assert "onnxruntime error" not in str(report)


def test_user_inputs_in_every_form(tmp_path):
    model = _conv_bn_model()
    _export(model, tmp_path / "m.onnx")
    images = np.random.default_rng(5).standard_normal((3, 8, 8, 3)).astype("float32")
    for inputs in ({"image": images}, [images], images):
        report = validate_onnx(model, tmp_path / "m.onnx", inputs=inputs)
        assert report and [c.batch_size for c in report.comparisons] == [1, 3]
    with pytest.raises(UserInputError, match="expected exactly the model's inputs"):
        validate_onnx(model, tmp_path / "m.onnx", inputs={"pixels": images})
    with pytest.raises(UserInputError, match="has shape"):
        validate_onnx(model, tmp_path / "m.onnx", inputs=images[:, :4])


def test_a_keras_reference_given_is_the_reference(tmp_path):
    """Outputs the caller computed (or is computing in the background) stand in for
    Keras's pass: the right ones give the same verdict and errors, wrong ones fail."""
    model = _conv_bn_model()
    _export(model, tmp_path / "m.onnx")
    images = np.random.default_rng(6).standard_normal((2, 8, 8, 3)).astype("float32")
    computed = validate_onnx(model, tmp_path / "m.onnx", inputs=images)
    outputs = [np.asarray(keras.ops.convert_to_numpy(model(images, training=False)))]
    computed_already = KerasReference({"image": images}, outputs)
    started = KerasReference.start(model, {"image": images})
    for reference in (computed_already, started):
        report = validate_onnx(model, tmp_path / "m.onnx", reference=reference)
        assert report.passed
        assert [c.max_abs_error for c in report.comparisons] == [
            c.max_abs_error for c in computed.comparisons
        ]
    # Compared as given (the float64 rejudge would clear the file).
    wrong = KerasReference({"image": images}, [outputs[0] + 1.0])
    assert not validate_onnx(model, tmp_path / "m.onnx", reference=wrong, atol=1e-4, rtol=1e-3)
    with pytest.raises(UserInputError, match="not both"):
        validate_onnx(model, tmp_path / "m.onnx", inputs=images, reference=computed_already)


def test_float16_yardstick_is_made_only_for_an_output_beyond_the_floor(tmp_path, monkeypatch):
    """An error within FLOAT16_FLOOR passes whatever the model's float16 run says, so
    validation makes that run (a float16 copy of the model, compiled and run) only
    where an output is beyond the floor; there it decides, as the criterion says."""
    from keras_bn.converters import validation
    from keras_bn.converters.comparison import FLOAT16_FACTOR, FLOAT16_FLOOR, relative_error
    from keras_bn.converters.precision import convert_float16
    from keras_bn.converters.reference import float64_twin
    from keras_bn.converters.samples import call_model

    model = _conv_bn_model()
    _export(model, tmp_path / "m.onnx")
    half = tmp_path / "half.onnx"
    convert_float16(tmp_path / "m.onnx", half)
    images = np.random.default_rng(8).standard_normal((4, 8, 8, 3)).astype("float32")
    from keras_bn.converters import reference

    made = []  # the float16 copies of the model validation builds

    def counted(model, inputs, dtype="float64"):
        made.extend([dtype] if dtype == "float16" else [])
        return float64_twin(model, inputs, dtype=dtype)

    monkeypatch.setattr(reference, "float64_twin", counted)
    (keras32,) = call_model(model, {"image": images})  # as validation runs Keras
    within = validation.validate_onnx(model, half, inputs=images)
    assert within.passed and made == []
    for c in within.comparisons:
        assert c.verdict == "float16 criterion" and c.yardstick == "not needed"
        assert c.keras_exact_error is None and c.bound == FLOAT16_FLOOR
        assert 0 < c.exact_error <= FLOAT16_FLOOR
    assert "no float16 run was needed" in within.exact_note
    assert "no float16 run needed" in str(within)
    # The logits' weights 3% off: beyond the floor, so the float16 run is made and
    # the bound is FLOAT16_FACTOR times its error plus the floor.
    _tamper(half, _last_weight(half), factor=1.03)
    beyond = validation.validate_onnx(model, half, inputs=images)
    assert len(made) == 1
    run16 = float64_twin(model, [images], dtype="float16")([images])[0]
    for c in beyond.comparisons:
        exact = keras32[: c.batch_size]
        assert c.yardstick == "Keras float16" and c.exact_error > FLOAT16_FLOOR
        assert c.keras_exact_error == pytest.approx(relative_error(run16[: c.batch_size], exact))
        assert c.bound == pytest.approx(FLOAT16_FACTOR * c.keras_exact_error + FLOAT16_FLOOR)
        assert c.passed == (c.exact_error <= c.bound)


def _last_weight(path) -> str:
    """The weight initializer of the file's last Gemm, MatMul or Conv."""
    proto = onnx.load(str(path))
    initializers = {tensor.name for tensor in proto.graph.initializer}
    linear = [n for n in proto.graph.node if n.op_type in ("Gemm", "MatMul", "Conv")]
    return next(name for name in linear[-1].input if name in initializers)


def test_fixed_batch_export_validates_at_its_own_batch_size(tmp_path):
    # Regression: a fixed batch used to be fed the first sample alone too, which
    # onnxruntime rejects, so every fixed-batch export with inputs "failed".
    model = _conv_bn_model()
    _export(model, tmp_path / "m.onnx", batch_size=4)
    report = validate_onnx(model, tmp_path / "m.onnx")  # generated inputs
    assert report and [c.batch_size for c in report.comparisons] == [4]
    assert report.comparisons[0].shape == (4, 4) and report.comparisons[0].note == ""
    images = np.random.default_rng(6).standard_normal((10, 8, 8, 3)).astype("float32")
    for samples, batches in ((10, 3), (4, 1), (3, 1)):  # chunks, exact, filled up
        report = validate_onnx(model, tmp_path / "m.onnx", inputs=images[:samples])
        assert report, str(report)
        (comparison,) = report.comparisons
        assert comparison.batch_size == 4 and comparison.shape == (samples, 4)
        assert comparison.note == (
            "" if samples == 4 else f"{samples} sample(s) in {batches} batch(es) of 4"
        )


def test_fixed_batch_compares_every_chunk_and_localizes(tmp_path):
    model = _conv_bn_model()
    _export(model, tmp_path / "m.onnx", batch_size=4)
    images = np.random.default_rng(7).standard_normal((9, 8, 8, 3)).astype("float32")
    images[8] *= 100.0  # only in the last, filled-up chunk; dominates the outputs
    expected = keras.ops.convert_to_numpy(model(images, training=False))
    assert np.abs(expected[8]).max() > np.abs(expected[:8]).max()
    report = validate_onnx(model, tmp_path / "m.onnx", inputs=images)
    assert report, str(report)
    (comparison,) = report.comparisons
    np.testing.assert_allclose(comparison.max_abs_reference, np.abs(expected).max(), rtol=1e-6)
    _tamper(tmp_path / "m.onnx", "conv2/kernel")
    report = validate_onnx(model, tmp_path / "m.onnx", inputs=images)
    assert not report and report.first_divergent_layer == "conv2"


def test_channels_first_layout_is_read_from_the_file(tmp_path):
    model = _conv_bn_model()
    _export(model, tmp_path / "m.onnx", input_layout="channels_first")
    assert validate_onnx(model, tmp_path / "m.onnx")
    assert not validate_onnx(
        model, tmp_path / "m.onnx", input_layout="channels_last", localize=False
    )


def test_localization_names_the_broken_layer(tmp_path):
    model = _conv_bn_model()
    _export(model, tmp_path / "m.onnx")
    _tamper(tmp_path / "m.onnx", "conv2/kernel")
    report = validate_onnx(model, tmp_path / "m.onnx")
    assert not report
    assert report.first_divergent_layer == "conv2"
    by_layer = {c.layer: c for c in report.layers}
    assert by_layer["conv1"].passed and by_layer["bn1"].passed and by_layer["relu1"].passed
    assert not by_layer["conv2"].passed and not by_layer["logits"].passed
    assert "first divergent layer: conv2" in str(report)
    assert report.to_dict()["first_divergent_layer"] == "conv2"


def test_validation_sessions_do_not_spin(tmp_path, opened_sessions):
    """Both of validation's onnxruntime sessions (the file's, and localization's copy
    with every layer's value as an output) let idle threads sleep: the Keras reference
    pass runs beside them."""
    model = _conv_bn_model()
    _export(model, tmp_path / "m.onnx")
    _tamper(tmp_path / "m.onnx", "conv2/kernel")
    report = validate_onnx(model, tmp_path / "m.onnx")
    assert not report and report.first_divergent_layer == "conv2"
    assert len(opened_sessions) == 2
    assert all(kwargs.get("spinning") is False for kwargs in opened_sessions)


def test_localization_sees_through_folded_batch_norms(tmp_path):
    model = _conv_bn_model()
    _export(_fold_by_hand(model), tmp_path / "folded.onnx")
    _tamper(tmp_path / "folded.onnx", "logits/kernel", factor=1.5)
    report = validate_onnx(model, tmp_path / "folded.onnx")
    assert not report
    by_layer = {c.layer: c for c in report.layers}
    # conv1 now computes bn1's output: recognized as a fold, not a divergence.
    assert by_layer["conv1"].passed and "'bn1' folded into it" in by_layer["conv1"].note
    assert by_layer["conv2"].passed and by_layer["gap"].passed
    assert "bn1" not in by_layer  # no ONNX value of its own
    assert report.first_divergent_layer == "logits"


def test_localization_after_folding_while_exporting(tmp_path):
    """export_onnx(fold=True): conv2 + bn2 are one ONNX Conv, compared as bn2's output;
    a broken fused Conv is named by its BN (folding or export broke that pair)."""
    model = _conv_bn_model()
    _export(model, tmp_path / "fused.onnx", fold=True)
    assert validate_onnx(model, tmp_path / "fused.onnx")
    _tamper(tmp_path / "fused.onnx", "conv2/kernel")
    report = validate_onnx(model, tmp_path / "fused.onnx")
    assert not report
    by_layer = {c.layer: c for c in report.layers}
    assert "conv1" not in by_layer and "conv2" not in by_layer  # layer + BN: no own tensor
    assert by_layer["bn1"].passed and by_layer["relu1"].passed
    assert not by_layer["bn2"].passed
    assert report.first_divergent_layer == "bn2"


def test_localization_needs_the_layer_map(tmp_path):
    model = _conv_bn_model()
    _export(model, tmp_path / "m.onnx")
    _tamper(tmp_path / "m.onnx", "conv1/kernel")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "m.onnx"))
    report = validate_onnx(model, tmp_path / "m.onnx")
    assert not report and report.first_divergent_layer is None
    assert "cannot localize" in report.localization


def test_validate_rejects_bad_arguments(tmp_path):
    model = _conv_bn_model()
    with pytest.raises(UserInputError, match="does not exist"):
        validate_onnx(model, tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(UserInputError, match="not a readable ONNX file"):
        validate_onnx(model, tmp_path / "junk.onnx")
    _export(model, tmp_path / "m.onnx")
    with pytest.raises(UserInputError, match="atol"):
        validate_onnx(model, tmp_path / "m.onnx", atol=-1.0)
    with pytest.raises(UserInputError, match="batch_sizes"):
        validate_onnx(model, tmp_path / "m.onnx", batch_sizes=(0,))
    other = keras.Sequential([keras.Input((8, 24), name="pixels"), layers.Flatten()])
    with pytest.raises(UserInputError, match="ONNX model inputs"):
        validate_onnx(other, tmp_path / "m.onnx")

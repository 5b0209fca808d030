"""Checks shared by the test modules: running a model, comparing outputs, the float64
references, folding checked end to end, and native export judged against float64.

- Running models: :func:`inputs_for`, :func:`outputs_of`, :func:`assert_same_outputs`.
- float64 references: :func:`float64_twin` (a clone), :func:`float64_build` (a model
  built again under the float64 policy, for layers that do not clone from configs).
- Folding: :func:`fold_and_check`, :func:`check_channels_first_models`.
- Native ONNX export judged against float64: :func:`export_and_judge`,
  :func:`assert_exports_exactly`.
- Moving statistics: :func:`as_float64`, :func:`spread_features`,
  :func:`moving_statistics`, :func:`assert_moving_statistics`.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_bn._batch_norm_state import to_numpy
from keras_bn.converters.folding import fold_batch_norms
from support.jax_speed import keras_outputs
from support.models import batch_norm_layers, channels_first_models, randomize_batch_norms

# ------------------------------------------------------------------------------------
# Running models.


def inputs_for(model, seed=1, batch_size=2):
    """Random float32 inputs (mean 0.5, std 2) for every input of ``model``."""
    rng = np.random.default_rng(seed)
    arrays = [
        (rng.normal(0.5, 2.0, (batch_size, *tensor.shape[1:]))).astype("float32")
        for tensor in model.inputs
    ]
    return arrays if len(arrays) > 1 else arrays[0]


def outputs_of(model, x) -> list[np.ndarray]:
    """Every output of ``model(x, training=False)`` as a NumPy array (on JAX the pass
    compiled whole: support/jax_speed.py)."""
    return keras_outputs(model, x)


def assert_same_outputs(original, folded, x, rtol=2e-5):
    """Outputs equal within float32 rounding, relative to each output's magnitude."""
    for expected, received in zip(outputs_of(original, x), outputs_of(folded, x), strict=True):
        assert received.shape == expected.shape
        scale = max(float(np.max(np.abs(expected))), 1e-6)
        error = float(np.max(np.abs(received - expected)))
        assert error <= rtol * scale, f"max abs error {error:.3g} vs output scale {scale:.3g}"


def float64_twin(model):
    """The same single-input model in float64, with the same weights."""

    def clone(layer):
        config = layer.get_config()
        config["dtype"] = "float64"
        return type(layer).from_config(config)

    twin = keras.models.clone_model(
        model,
        clone_function=clone,
        input_tensors=keras.Input(model.input_shape[1:], dtype="float64"),
    )
    twin.set_weights([weight.astype(np.float64) for weight in model.get_weights()])
    return twin


def float64_build(build, model):
    """``build()`` run again under the float64 dtype policy, with ``model``'s weights:
    the float64 run of a model whose layers do not clone from their configs
    (KerasHub's), built the way the original was."""
    from keras_bn.converters.reference import float64_enabled

    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        with float64_enabled():  # on JAX, float64 is float32 without it
            twin = build()
            for source, target in zip(model.weights, twin.weights, strict=True):
                value = np.asarray(keras.ops.convert_to_numpy(source))
                target.assign(value.astype(np.float64) if value.dtype.kind == "f" else value)
    finally:
        keras.config.set_dtype_policy(policy)

    def run(arrays):
        def widen(a):
            return a.astype(np.float64) if a.dtype.kind == "f" else a

        if isinstance(arrays, dict):  # by input name (a model of named inputs)
            feed = {name: widen(a) for name, a in arrays.items()}
        else:
            feed = [widen(a) for a in arrays]
            feed = feed if len(feed) > 1 else feed[0]
        with float64_enabled():
            outputs = keras_outputs(twin, feed)
        assert all(y.dtype == np.float64 for y in outputs if y.dtype.kind == "f"), "not float64"
        return [np.asarray(y) for y in outputs]

    return run


# ------------------------------------------------------------------------------------
# Folding.


def fold_and_check(model, x=None, *, expected_remaining=0, backward=True, rtol=2e-5):
    """Randomize the BNs, fold, check the BNs left and the outputs; return (folded, report)."""
    randomize_batch_norms(model)
    x = inputs_for(model) if x is None else x
    folded, report = fold_batch_norms(model, backward=backward, sample_inputs=x)
    assert len(batch_norm_layers(folded)) == expected_remaining, str(report)
    assert report.not_folded_count == expected_remaining
    assert_same_outputs(model, folded, x, rtol=rtol)
    return folded, report


def check_channels_first_models():
    """Run in test_folding.py's JAX subprocess: fold the channels_first models, compare."""
    assert keras.backend.backend() == "jax", keras.backend.backend()
    for model, kept in channels_first_models():
        fold_and_check(model, expected_remaining=kept)
    print("channels_first models passed")


# ------------------------------------------------------------------------------------
# Native ONNX export judged against the exact answer.


def export_and_judge(model, make_inputs, path, *, batch_sizes=(1, 3), fold=False):
    """Export ``model`` natively (dynamic batch) and judge onnxruntime's outputs at each
    batch size by their error against a float64 run of the model, next to Keras
    float32's own (``comparison.judge_against_exact``). ``make_inputs(batch)`` returns
    one array per model input. Returns (export result, [judged comparisons]).
    """
    import onnxruntime as ort

    from keras_bn.converters.comparison import compare_arrays, judge_against_exact
    from keras_bn.converters.onnx.export import export_onnx
    from keras_bn.converters.reference import float64_twin

    result = export_onnx(model, path, fold=fold)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    twin = None
    judged = []
    for batch in batch_sizes:
        arrays = list(make_inputs(batch))
        twin = twin or float64_twin(model, arrays)
        assert twin.exact, twin.float32_classes
        exact = twin(arrays)
        keras_outputs = outputs_of(model, arrays if len(arrays) > 1 else arrays[0])
        feed = {i.name: a for i, a in zip(session.get_inputs(), arrays, strict=True)}
        onnx_outputs = session.run(None, feed)
        assert len(onnx_outputs) == len(keras_outputs) == len(exact)
        for index, (candidate, reference, truth) in enumerate(
            zip(onnx_outputs, keras_outputs, exact, strict=True)
        ):
            comparison = compare_arrays(
                candidate, reference, name=f"output {index}", batch_size=batch
            )
            verdict = judge_against_exact(comparison, candidate, reference, truth)
            assert verdict.passed, (
                f"batch {batch}, output {index}: error {verdict.exact_error} against float64, "
                f"Keras float32's {verdict.keras_exact_error}; shape {verdict.shape}"
            )
            judged.append(verdict)
    return result, judged


def assert_exports_exactly(
    model, path, inputs_for_batch, *, batch_sizes=(1, 3), twin=None, exported=None
):
    """Export ``model`` natively with ``fold=True`` and judge onnxruntime's outputs at
    each batch size against a float64 run of the same model (the project's judge:
    the export's error at most a few times Keras float32's own, plus a floor).

    ``inputs_for_batch(n)`` gives the model's input arrays (a list, or a dict by
    input name) for batch ``n`` (called once, for the largest batch);
    ``twin(arrays)`` the float64 outputs (default: keras_bn's float64 clone);
    ``exported``: the ExportResult of an earlier call that wrote ``path`` from the same
    model, to judge that file on other inputs without exporting it again.
    Returns the ExportResult.
    """
    import onnxruntime as ort

    from keras_bn.converters.comparison import compare_arrays, judge_against_exact
    from keras_bn.converters.onnx.export import export_onnx
    from keras_bn.converters.reference import float64_twin as twin_of

    result = export_onnx(model, path, fold=True) if exported is None else exported
    assert not result.used_fallback
    assert "BatchNormalization" not in result.op_counts, result.op_counts
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Keras and its float64 twin run once, on the largest batch; each smaller batch
    # is its first samples (inference is per sample), so onnxruntime still sees
    # every batch size while Keras (slow to compile shapes on JAX) runs twice only.
    arrays = inputs_for_batch(max(batch_sizes))
    if twin is None:
        twin = twin_of(model, arrays)
    named = isinstance(arrays, dict)
    structure = arrays if named or len(arrays) > 1 else arrays[0]
    expected_all = keras_outputs(model, structure)
    exact_all = twin(arrays)
    assert all(np.isfinite(a).all() for a in exact_all)
    for batch in batch_sizes:
        if named:
            feed = {item.name: arrays[item.name][:batch] for item in session.get_inputs()}
        else:
            feed = {
                item.name: array[:batch]
                for item, array in zip(session.get_inputs(), arrays, strict=True)
            }
        actual = session.run(None, feed)
        expected = [y[:batch] for y in expected_all]
        exact = [y[:batch] for y in exact_all]
        assert len(actual) == len(expected) == len(exact)
        for onnx_out, keras_out, exact_out in zip(actual, expected, exact, strict=True):
            assert onnx_out.shape == keras_out.shape, (onnx_out.shape, keras_out.shape)
            verdict = judge_against_exact(
                compare_arrays(onnx_out, keras_out), onnx_out, keras_out, exact_out
            )
            assert verdict.passed, (batch, verdict)
    return result


# ------------------------------------------------------------------------------------
# Moving statistics (the training utilities' tests).


def as_float64(value) -> np.ndarray:
    """A Keras variable or tensor as a float64 NumPy array."""
    return to_numpy(value).astype(np.float64)


def spread_features(rng, n, channels):
    """Inputs whose channels have means != 0 and scales over orders of magnitude."""
    scales = np.logspace(-2, 2, channels)
    means = rng.uniform(-50, 50, channels)
    return (rng.normal(size=(n, channels)) * scales + means).astype("float32")


def moving_statistics(layer):
    """A BatchNormalization layer's (moving_mean, moving_variance) in float64."""
    return as_float64(layer.moving_mean), as_float64(layer.moving_variance)


def assert_moving_statistics(layer, mean, variance, rtol=1e-5):
    """Moving statistics equal (mean, variance) up to float32 rounding.

    The mean error is measured against the standard deviation plus float32's
    resolution at the mean's magnitude (the values pass through float32).
    """
    got_mean, got_variance = moving_statistics(layer)
    tolerance = rtol * 10 * np.sqrt(variance) + 4 * np.finfo(np.float32).eps * np.abs(mean)
    assert np.all(np.abs(got_mean - mean) <= tolerance), (got_mean, mean)
    np.testing.assert_allclose(got_variance, variance, rtol=rtol)

"""Validation's default verdict: exact exports pass, classic converter bugs fail.

Keras Applications with trained-looking BN statistics are exported (folded), and
the untouched file must pass ``validate_onnx`` at default settings while a copy with
one classic converter bug injected must fail, every time (generated inputs are
seeded). The verdict is also checked against its definition: the ONNX model's error
against a float64 run of the same model, next to Keras float32's own.
"""

import keras
import numpy as np
import pytest
from support.faults import INJECTED_BUGS, inject_bug
from support.models import calibrate_batch_norms, settle_batch_norms

from keras_bn.converters import export_onnx, validate_onnx
from keras_bn.converters.comparison import DEFAULT_ATOL, DEFAULT_RTOL, EXACT_FACTOR, EXACT_FLOOR

SIZE = 64


def _mobilenet_v2():
    return keras.applications.MobileNetV2(
        weights=None, input_shape=(SIZE, SIZE, 3), alpha=0.35, classifier_activation=None
    )


def _efficientnet_b0():
    return keras.applications.EfficientNetB0(
        weights=None, input_shape=(SIZE, SIZE, 3), classifier_activation=None
    )


MODELS = {"MobileNetV2": _mobilenet_v2, "EfficientNetB0": _efficientnet_b0}


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    model = MODELS[request.param]()
    pixels = np.random.default_rng(0).uniform(0, 255, (16, SIZE, SIZE, 3)).astype("float32")
    settle_batch_norms(model, pixels)
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    export_onnx(model, path, fold=True)
    return request.param, model, path


def test_exact_export_passes_by_its_error_against_float64(exported):
    name, model, path = exported
    report = validate_onnx(model, path)
    assert report, str(report)
    # Where the float64 reference decided, the verdict is its documented rule.
    for comparison in report.comparisons:
        if comparison.exact_error is not None:
            assert comparison.verdict == "float64 reference"
            bound = EXACT_FACTOR * comparison.keras_exact_error + EXACT_FLOOR
            assert comparison.exact_error <= bound


def test_same_verdict_every_run(exported):
    name, model, path = exported
    first, second = validate_onnx(model, path), validate_onnx(model, path)
    assert [c.max_abs_error for c in first.comparisons] == [
        c.max_abs_error for c in second.comparisons
    ]
    assert bool(first) == bool(second)


@pytest.mark.parametrize("bug", sorted(INJECTED_BUGS))
def test_injected_bug_is_rejected(exported, bug, tmp_path):
    name, model, path = exported
    broken = inject_bug(path, tmp_path / "broken.onnx", bug)
    report = validate_onnx(model, broken)
    assert not report, f"{name}: {bug} accepted\n{report}"
    if bug == "two output channels swapped":  # the stem: localization names it
        assert report.first_divergent_layer is not None, str(report)


def test_explicit_tolerances_are_a_strict_elementwise_contract(exported):
    name, model, path = exported
    report = validate_onnx(model, path, atol=0.0, rtol=0.0)
    assert all(c.verdict == "elementwise" and c.exact_error is None for c in report.comparisons)
    assert not report  # float32 rounding differs somewhere: nothing is bit-exact


def test_exact_export_of_an_ill_conditioned_model_passes_where_elementwise_fails(tmp_path):
    """Wide BN statistics: Keras float32 itself is ~1e-4 off the exact result, more
    than the elementwise tolerance. The export is no less exact, so it passes; the
    old elementwise rule (the same tolerances given explicitly) rejects it."""
    model = _mobilenet_v2()
    pixels = np.random.default_rng(0).uniform(0, 255, (16, SIZE, SIZE, 3)).astype("float32")
    calibrate_batch_norms(model, pixels)
    path = tmp_path / "model.onnx"
    export_onnx(model, path, fold=True)
    report = validate_onnx(model, path)
    assert report, str(report)
    judged = [c for c in report.comparisons if c.verdict == "float64 reference"]
    assert judged and "float64" in report.exact_note
    for comparison in judged:
        assert comparison.keras_exact_error > 1e-5  # Keras float32 is visibly inexact
        assert comparison.exact_error <= EXACT_FACTOR * comparison.keras_exact_error
    assert not validate_onnx(model, path, atol=DEFAULT_ATOL, rtol=DEFAULT_RTOL)

"""converters/comparison.py, the one output comparison, against its definitions in NumPy.

Each measure is recomputed here from its formula (the module docstring's) on random
arrays, and each verdict is checked on both sides of its bound. End-to-end use of
the verdicts (real exports, injected bugs) is in test_validation.py and
test_precision_validation.py.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_bn.converters import comparison as cmp

FINITE = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def _pairs():
    """Two float32 arrays of one shape (rank 1 to 3, sides up to 5)."""
    return hnp.array_shapes(min_dims=1, max_dims=3, max_side=5).flatmap(
        lambda shape: st.tuples(
            hnp.arrays(np.float32, shape, elements=FINITE),
            hnp.arrays(np.float32, shape, elements=FINITE),
        )
    )


@settings(max_examples=200, deadline=None)
@given(pair=_pairs(), atol=st.sampled_from([0.0, 1e-4, 0.1]), rtol=st.sampled_from([0.0, 1e-3]))
def test_compare_arrays_is_polygraphys_elementwise_rule(pair, atol, rtol):
    actual, reference = pair
    a, b = actual.astype(np.float64), reference.astype(np.float64)
    difference = np.abs(a - b)
    result = cmp.compare_arrays(actual, reference, atol=atol, rtol=rtol, name="y", batch_size=3)
    assert (result.name, result.batch_size, result.shape) == ("y", 3, a.shape)
    assert result.passed == bool(np.all(difference <= atol + rtol * np.abs(b)))
    assert result.max_abs_error == difference.max()
    assert result.mean_abs_error == pytest.approx(difference.mean())
    assert result.max_abs_reference == np.abs(b).max()
    if np.abs(b).max() > 0:
        assert result.relative_to_max == pytest.approx(difference.max() / np.abs(b).max())
    # The required tolerances are the smallest that pass: a little less fails.
    assert np.all(difference <= result.required_atol + rtol * np.abs(b) + 1e-12)
    if result.required_atol > 1e-9:
        assert not cmp.compare_arrays(
            actual, reference, atol=result.required_atol * 0.999, rtol=rtol
        ).passed


def test_compare_arrays_counts_nan_and_inf_only_where_they_differ():
    nan, inf = math.nan, math.inf
    same = cmp.compare_arrays(np.array([nan, inf, 1.0]), np.array([nan, inf, 1.0]))
    assert same.passed and same.max_abs_error == 0.0
    for actual, reference in [
        ([nan, 1.0], [1.0, 1.0]),  # NaN against a number
        ([1.0, 1.0], [nan, 1.0]),  # a number against NaN
        ([-inf, 1.0], [inf, 1.0]),  # the other infinity
        ([5.0, 1.0], [inf, 1.0]),  # a non-finite reference excuses nothing
    ]:
        result = cmp.compare_arrays(np.array(actual), np.array(reference), atol=1e9)
        assert not result.passed and result.max_abs_error == inf, (actual, reference)
    relative = cmp.compare_arrays(np.array([1.0, 2.0]), np.array([0.0, 2.0]))
    assert relative.max_rel_error == inf and not relative.passed


def test_a_comparison_that_cannot_be_made_fails_with_a_note():
    result = cmp.compare_arrays(np.zeros((2, 3)), np.zeros((2, 4)), name="logits")
    assert not result.passed and result.shape == (2, 4)
    assert result.note == "shape (2, 3) != Keras shape (2, 4)"
    assert result.max_abs_error == result.relative_to_max == math.inf
    assert cmp.compare_arrays(np.zeros((0, 3)), np.zeros((0, 3))).passed


@settings(max_examples=100, deadline=None)
@given(pair=_pairs())
def test_relative_error_and_sqnr_follow_their_formulas(pair):
    values, exact = (array.astype(np.float64) for array in pair)
    scale, noise = np.abs(exact).max(), np.sum((values - exact) ** 2)
    relative = cmp.relative_error(values, exact)
    sqnr = cmp.sqnr_db(values, exact)
    if scale > 0:
        assert relative == pytest.approx(np.abs(values - exact).max() / scale)
    else:
        assert relative == (0.0 if not np.any(values) else math.inf)
    if noise == 0:
        assert sqnr == math.inf
    elif np.sum(exact**2) == 0:
        assert sqnr == -math.inf
    else:
        assert sqnr == pytest.approx(10 * np.log10(np.sum(exact**2) / noise))


def test_non_finite_values_are_infinitely_wrong():
    exact = np.array([1.0, -2.0])
    assert cmp.relative_error(np.array([1.0, math.nan]), exact) == math.inf
    assert cmp.sqnr_db(np.array([1.0, math.inf]), exact) == -math.inf


def test_top1_agreement_counts_argmax_matches_of_class_scores():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(50, 4))
    values = reference.copy()
    values[:10] = values[:10, ::-1]  # reversed scores: argmax changes unless symmetric
    expected = np.mean(np.argmax(values, 1) == np.argmax(reference, 1))
    assert cmp.top1_agreement(values, reference) == expected < 1.0
    assert cmp.top1_agreement(values[:, :1], reference[:, :1]) is None  # one class
    assert cmp.top1_agreement(values[0], reference[0]) is None  # not rank 2


def test_decided_top1_agreement_ignores_near_ties():
    exact = np.array([[1.0, 0.0], [0.51, 0.5], [0.0, 1.0], [0.2, 0.3]])  # range 1
    values = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    # Margins 1, 0.01, 1, 0.1: at a 5% margin rows 0, 2 and 3 are decided.
    assert cmp.decided_top1_agreement(values, exact, margin=0.05) == (pytest.approx(2 / 3), 3)
    assert cmp.decided_top1_agreement(values, exact, margin=2.0) == (None, 0)
    assert cmp.decided_top1_agreement(values[:, :1], exact[:, :1]) == (None, 0)


def _judged(candidate, keras, exact, **kwargs):
    comparison = cmp.compare_arrays(candidate, keras, atol=0.0, rtol=0.0)
    return cmp.judge_against_exact(comparison, candidate, keras, exact, **kwargs)


def test_judge_against_exact_allows_four_times_keras_error_plus_the_floor():
    exact = np.linspace(-1.0, 1.0, 11)
    keras = exact + 1e-4  # Keras float32's own error: 1e-4 of the range
    bound = cmp.EXACT_FACTOR * 1e-4 + cmp.EXACT_FLOOR
    just_in = _judged(exact + 0.99 * bound, keras, exact)
    assert just_in.passed and just_in.verdict == "float64 reference"
    assert just_in.exact_error == pytest.approx(0.99 * bound)
    assert just_in.keras_exact_error == pytest.approx(1e-4)
    assert not _judged(exact + 1.01 * bound, keras, exact).passed
    assert _judged(exact + 5e-4, keras, exact, factor=10.0).passed
    mismatch = _judged(np.zeros(3), keras, exact)  # a shape mismatch stays a failure
    assert not mismatch.passed and mismatch.verdict == "elementwise"


def test_float16_criterion_scales_with_the_float16_runs_own_error():
    exact = np.linspace(-1.0, 1.0, 11)
    float16_run = exact + 1e-2
    bound = cmp.FLOAT16_FACTOR * 1e-2 + cmp.FLOAT16_FLOOR
    comparison = cmp.compare_arrays(exact, exact)

    def judge(candidate, run=float16_run):
        return cmp.judge_precision("float16", comparison, candidate, exact, float16_run=run)

    passed = judge(exact + 0.99 * bound)
    assert passed.passed and passed.bound == pytest.approx(bound)
    assert passed.yardstick == "Keras float16" and passed.verdict == "float16 criterion"
    assert not judge(exact + 1.01 * bound).passed
    fallback = cmp.FLOAT16_FACTOR * cmp.FLOAT16_FALLBACK + cmp.FLOAT16_FLOOR
    for run in (None, np.full_like(exact, math.inf)):  # missing or overflowed
        judged = judge(exact + 0.99 * fallback, run)
        assert judged.passed and judged.yardstick == "fallback"
        assert judged.bound == pytest.approx(fallback)
    assert not judge(np.full_like(exact, math.inf)).passed  # an overflowing candidate
    # No run made (none was needed): an error within the floor passes on its own, with
    # the floor as its bound; beyond it, a missing run means the fallback.
    inside = judge(exact + 0.99 * cmp.FLOAT16_FLOOR, None)
    assert inside.passed and inside.yardstick == "not needed"
    assert inside.bound == cmp.FLOAT16_FLOOR and inside.keras_exact_error is None
    assert cmp.within_float16_floor(exact + 0.99 * cmp.FLOAT16_FLOOR, exact)
    beyond = exact + 1.01 * cmp.FLOAT16_FLOOR
    assert not cmp.within_float16_floor(beyond, exact)
    assert judge(beyond, None).yardstick == "fallback"
    assert not cmp.within_float16_floor(exact[:-1], exact)  # shapes differ


def _judge_int8(candidate, exact):
    return cmp.judge_precision("int8", cmp.compare_arrays(candidate, exact), candidate, exact)


def test_int8_criterion_is_an_sqnr_floor():
    rng = np.random.default_rng(1)
    exact = rng.normal(size=(40, 5))
    noise = rng.normal(size=exact.shape)
    noise *= np.sqrt(np.sum(exact**2) / np.sum(noise**2) / 10**1.2)  # SQNR 12 dB
    judged = _judge_int8(exact + noise, exact)
    assert judged.sqnr_db == pytest.approx(12.0) and judged.verdict == "int8 criterion"
    assert judged.exact_error == pytest.approx(cmp.relative_error(exact + noise, exact))
    # 12 - 20 log10(3) = 2.5 dB: below the 8 dB floor (on a single output, no top-1).
    assert not _judge_int8((exact + 3 * noise)[:, :1], exact[:, :1]).passed
    assert _judge_int8((exact + noise)[:, :1], exact[:, :1]).passed


def test_int8_criterion_needs_top1_on_the_decided_samples():
    rng = np.random.default_rng(2)
    exact = 10.0 + rng.normal(size=(200, 5))  # class scores with a large common part
    quiet = _judge_int8(exact + 1e-3 * rng.normal(size=exact.shape), exact)
    assert quiet.passed and quiet.top1_agreement == 1.0
    order = np.argsort(exact, axis=1)
    swapped = exact.copy()  # the two best classes exchanged in every row
    rows = np.arange(len(exact))
    swapped[rows, order[:, -1]], swapped[rows, order[:, -2]] = (
        exact[rows, order[:, -2]],
        exact[rows, order[:, -1]],
    )
    judged = _judge_int8(swapped, exact)
    assert judged.sqnr_db >= cmp.INT8_SQNR_FLOOR_DB  # the noise alone would pass
    assert judged.top1_samples >= cmp.INT8_TOP1_MIN_SAMPLES
    assert judged.top1_agreement == 0.0 and not judged.passed


def test_judge_precision_float32_needs_keras_output():
    exact = np.ones(3)
    comparison = cmp.compare_arrays(exact, exact)
    with pytest.raises(ValueError, match="needs Keras float32's output"):
        cmp.judge_precision("float32", comparison, exact, exact)
    judged = cmp.judge_precision("float32", comparison, exact, exact, keras=exact)
    assert judged.passed and judged.verdict == "float64 reference"


def test_failed_comparison_is_infinitely_off_and_never_passes():
    result = cmp.failed_comparison("out", 2, (2, 3), "onnxruntime error")
    assert not result.passed and result.note == "onnxruntime error"
    assert result.shape == (2, 3) and result.max_abs_error == math.inf

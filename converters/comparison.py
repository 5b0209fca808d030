"""Comparing model outputs: one :class:`OutputComparison` per output and batch.

Every stage that compares outputs uses :func:`compare_arrays`: validation (ONNX
against Keras), precision (float16/int8 against float32), the fold self-check and
the CLI's folded-against-original comparison. Pure NumPy.

Two verdicts:

* **Elementwise** (Polygraphy's rule, an explicit contract when the user gives
  tolerances): ``|actual - reference| <= atol + rtol * |reference|``.
* **Against the exact answer** (the default when the elementwise check against
  Keras float32 does not pass outright): Keras's float32 output is itself off the
  exact result by float32 rounding, so it cannot be the yardstick. With ``exact``,
  the same model computed in float64 (:mod:`.reference`), each output is judged by

      e(candidate) <= EXACT_FACTOR * e(keras float32) + EXACT_FLOOR

  where ``e(x) = max |x - exact| / max |exact|`` (the error relative to the output's
  range): the candidate may be no less exact than Keras itself, within a factor for
  a different summation order, and any error below the floor (a few float32
  roundings of the output's range) is noise. A converter bug (a flipped kernel, a
  swapped channel, a dropped epsilon) shows as an error many times Keras's own.

An outright elementwise pass also requires ``relative_to_max <= OUTRIGHT`` under
the default verdict, so that small outputs (softmax over many classes) cannot hide
an error behind an absolute tolerance larger than the values themselves.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "EXACT_FACTOR",
    "EXACT_FLOOR",
    "OUTRIGHT",
    "judge_against_exact",
    "OutputComparison",
    "compare_arrays",
    "failed_comparison",
]

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
EXACT_FACTOR = 4.0  # the candidate's error may be up to 4x Keras float32's own
EXACT_FLOOR = 1e-5  # relative to the output's range: ~80 float32 roundings, noise
OUTRIGHT = 1e-5  # relative_to_max an elementwise pass needs to skip the exact answer


@dataclasses.dataclass
class OutputComparison:
    """One model output at one batch size.

    ``max_rel_error`` is the largest ``|a - b| / |b|`` (``inf`` where ``b`` is 0
    and ``a`` is not); ``relative_to_max`` is ``max |a - b| / max |b|``, the
    error relative to the output's range, which stays meaningful near zeros.
    ``required_atol`` is the smallest atol that passes at the given rtol,
    ``required_rtol`` the smallest rtol that passes at the given atol.
    """

    name: str
    batch_size: int
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    mean_abs_error: float
    max_abs_reference: float
    relative_to_max: float
    required_atol: float
    required_rtol: float
    passed: bool
    note: str = ""
    # Against the float64 run (None where it was not needed or not available):
    exact_error: float | None = None  # e(candidate) = max|candidate - exact| / max|exact|
    keras_exact_error: float | None = None  # e(Keras float32), the same measure
    verdict: str = "elementwise"  # or "float64 reference"


def compare_arrays(
    actual: np.ndarray,
    reference: np.ndarray,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    name: str = "output",
    batch_size: int = 0,
) -> OutputComparison:
    """Compare ``actual`` with ``reference`` elementwise (Polygraphy's rule).

    An element passes when ``|actual - reference| <= atol + rtol * |reference|``.
    """
    actual = np.asarray(actual)
    reference = np.asarray(reference)
    if actual.shape != reference.shape:
        return failed_comparison(
            name,
            batch_size,
            reference.shape,
            f"shape {tuple(actual.shape)} != Keras shape {tuple(reference.shape)}",
        )
    a = actual.astype(np.float64)
    b = reference.astype(np.float64)
    if a.size == 0:
        return OutputComparison(
            name, batch_size, tuple(b.shape), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, True
        )
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        # Equal entries (NaN included) differ by 0; NaN against a number by inf.
        equal = (a == b) | (np.isnan(a) & np.isnan(b))
        difference = np.where(equal, 0.0, np.abs(a - b))
        difference = np.where(np.isnan(difference), np.inf, difference)
        # A non-finite reference excuses nothing: it passes only when matched exactly.
        magnitude = np.where(np.isfinite(b), np.abs(b), 0.0)
        relative = np.where(difference == 0, 0.0, difference / magnitude)
        max_abs = float(difference.max())
        max_reference = float(magnitude.max())
        required_atol = float(np.maximum(difference - rtol * magnitude, 0).max())
        required_rtol = float(
            np.where(difference <= atol, 0.0, (difference - atol) / magnitude).max()
        )
        passed = bool(np.all(difference <= atol + rtol * magnitude))
    return OutputComparison(
        name=name,
        batch_size=batch_size,
        shape=tuple(int(d) for d in b.shape),
        max_abs_error=max_abs,
        max_rel_error=float(relative.max()),
        mean_abs_error=float(difference.mean()),
        max_abs_reference=max_reference,
        relative_to_max=max_abs / max_reference
        if max_reference > 0
        else (0.0 if max_abs == 0 else math.inf),
        required_atol=required_atol,
        required_rtol=required_rtol,
        passed=passed,
    )


def failed_comparison(
    name: str, batch_size: int, shape: Sequence[int], note: str
) -> OutputComparison:
    """A comparison that could not be made (shape mismatch, onnxruntime error)."""
    inf = math.inf
    return OutputComparison(
        name, batch_size, tuple(map(int, shape)), inf, inf, inf, inf, inf, inf, inf, False, note
    )


def relative_error(values: np.ndarray, exact: np.ndarray) -> float:
    """``max |values - exact| / max |exact|`` (inf where values is NaN and exact is not)."""
    exact = np.asarray(exact, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        difference = np.abs(np.asarray(values, np.float64) - exact)
    difference = np.where(np.isnan(difference), np.inf, difference)
    scale = float(np.abs(exact).max(initial=0.0))
    worst = float(difference.max(initial=0.0))
    if scale == 0.0:
        return 0.0 if worst == 0.0 else math.inf
    return worst / scale


def judge_against_exact(
    comparison: OutputComparison,
    candidate: np.ndarray,
    keras: np.ndarray,
    exact: np.ndarray,
    *,
    factor: float = EXACT_FACTOR,
    floor: float = EXACT_FLOOR,
) -> OutputComparison:
    """``comparison`` re-judged against the exact answer (see the module docstring)."""
    if np.shape(candidate) != np.shape(exact) or np.shape(keras) != np.shape(exact):
        return comparison  # a shape mismatch stays a failure
    candidate_error = relative_error(candidate, exact)
    keras_error = relative_error(keras, exact)
    return dataclasses.replace(
        comparison,
        exact_error=candidate_error,
        keras_exact_error=keras_error,
        verdict="float64 reference",
        passed=bool(candidate_error <= factor * keras_error + floor),
    )

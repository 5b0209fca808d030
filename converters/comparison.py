"""Comparing model outputs: one :class:`OutputComparison` per output and batch.

Every stage that compares outputs uses this module: validation (ONNX against
Keras, by the criterion of the file's precision), precision (float16/int8 against
float32: SQNR, top-1 agreement), the fold self-check and the CLI's
folded-against-original comparison. Pure NumPy.

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

float16 and int8 exports are never exact, so each has its own criterion against
the same float64 run (:func:`judge_precision`; the numbers come from
``benchmarks/precision_study.py``, BENCHMARKS.md section 6):

* **float16**: ``e(candidate) <= FLOAT16_FACTOR * e(float16 run) + FLOAT16_FLOOR``,
  where the float16 run is the Keras model with every layer computing in float16:
  the error float16 rounding makes on this model. It is model-dependent (6e-4 of
  the range on the README's digits CNN, 1-4% on untrained MobileNetV2 and
  EfficientNetB0), so no fixed tolerance fits; correct exports measured 0.4-0.75x
  of it. A candidate that overflows (inf/NaN) fails.
* **int8**: ``SQNR >= INT8_SQNR_FLOOR_DB`` and, for class scores, top-1 agreement
  ``>= INT8_TOP1_FLOOR`` on the samples whose top class leads by ``INT8_TOP1_MARGIN``
  of the range (at least ``INT8_TOP1_MIN_SAMPLES`` of them; near-ties say nothing). int8's
  error depends on the calibration data as much as on the model (the README
  example: 15.5 dB per channel, 26 dB per tensor, 97.5-99% top-1), so the floors
  are set where correct files measured above them and gross bugs (a flipped kernel,
  swapped channels, a scale off by 2x: 1 dB or less) below. Bugs smaller than
  int8's own noise (a weight scale off by 2%) change no output measurably; no
  output comparison can see them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "power_ratio_db",
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "EXACT_FACTOR",
    "EXACT_FLOOR",
    "OUTRIGHT",
    "FLOAT16_FACTOR",
    "FLOAT16_FALLBACK",
    "FLOAT16_FLOOR",
    "FLOAT16_SQNR_FLOOR_DB",
    "FLOAT16_UNIT_ROUNDOFF",
    "INT8_SQNR_FLOOR_DB",
    "INT8_TOP1_FLOOR",
    "INT8_TOP1_MARGIN",
    "INT8_TOP1_MIN_SAMPLES",
    "NOTHING_FINITE",
    "decided_top1_agreement",
    "float16_rule",
    "within_float16_floor",
    "int8_rule",
    "judge_against_exact",
    "judge_float16",
    "judge_int8",
    "judge_precision",
    "relative_error",
    "sqnr_db",
    "top1_agreement",
    "OutputComparison",
    "compare_arrays",
    "compare_output",
    "failed_comparison",
]

# An output Keras computes no finite value of: NaN matching NaN proves nothing.
NOTHING_FINITE = (
    "Keras's own output has no finite value on these inputs (NaN or inf everywhere), so "
    "nothing could be compared: give inputs the model computes finite outputs on "
    "(--inputs FILE.npz)"
)

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
EXACT_FACTOR = 4.0  # the candidate's error may be up to 4x Keras float32's own
EXACT_FLOOR = 1e-5  # relative to the output's range: ~80 float32 roundings, noise
OUTRIGHT = 1e-5  # relative_to_max an elementwise pass needs to skip the exact answer

# float16 and int8 criteria (judge_precision; BENCHMARKS.md section 6):
FLOAT16_UNIT_ROUNDOFF = 2.0**-11  # float16's relative rounding error (half its epsilon)
FLOAT16_FACTOR = 2.0  # the export's error may be up to 2x the float16 Keras run's
FLOAT16_FLOOR = 4 * FLOAT16_UNIT_ROUNDOFF  # ~2e-3 of the range: noise, whatever the run says
FLOAT16_FALLBACK = 32 * FLOAT16_UNIT_ROUNDOFF  # the expectation when no float16 run is finite
INT8_SQNR_FLOOR_DB = 8.0  # below it the int8 output is mostly noise (BENCHMARKS.md section 6)
# float16 too: an output float16 cannot hold (scores of 1e-10, below its smallest
# value, become zeros: SQNR 0 dB) is lost, even where Keras's float16 run loses it too.
FLOAT16_SQNR_FLOOR_DB = INT8_SQNR_FLOOR_DB
INT8_TOP1_FLOOR = 0.9  # top-1 agreement a classifier's int8 export must keep...
INT8_TOP1_MIN_SAMPLES = 20  # ...judged on at least this many samples (one flip <= 5%)...
INT8_TOP1_MARGIN = 0.05  # ...whose top class leads by 5% of the output's range or more


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
    verdict: str = "elementwise"  # or "float64 reference", "float16 criterion", "int8 criterion"
    # float16/int8 criteria (see judge_float16, judge_int8):
    yardstick: str = "Keras float32"  # whose error keras_exact_error is
    bound: float | None = None  # the largest exact_error that passes (float16)
    sqnr_db: float | None = None  # against the float64 run
    top1_agreement: float | None = None  # argmax agreement with the float64 run...
    top1_samples: int | None = None  # ...on this many decided samples (int8)
    exact_answer: str = "Keras float32"  # what the float16/int8 errors are measured against

    @property
    def noise(self) -> str:
        """The rounding the float64 rule finds the candidate within: Keras's own
        (``"float32 noise"``; ``"float16 noise"`` where Keras computes in float16)."""
        return self.yardstick.removeprefix("Keras ") + " noise"


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


def compare_output(actual: np.ndarray, reference: np.ndarray, **options: Any) -> OutputComparison:
    """:func:`compare_arrays` for a model output against Keras's (``reference``); a
    failed comparison saying so (:data:`NOTHING_FINITE`) where Keras's output has no
    finite value: NaN matching NaN proves nothing."""
    values = np.asarray(reference)
    if values.size and values.dtype.kind == "f" and not np.isfinite(values).any():
        name, batch_size = options.get("name", "output"), options.get("batch_size", 0)
        return failed_comparison(name, batch_size, values.shape, NOTHING_FINITE)
    return compare_arrays(actual, reference, **options)


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
    keras_noise: float = 0.0,
) -> OutputComparison:
    """``comparison`` re-judged against the exact answer (see the module docstring).

    ``keras_noise``: Keras's own error measured on more samples of the same output
    (the larger batch the samples of this comparison are part of). The yardstick is
    the larger of the two: on one sample of a few values, Keras's error can be a
    lucky near-zero that no correct file matches (a mixed_float16 model's two
    logits: 1e-5 of the range on one sample, 1e-4 on sixteen)."""
    if np.shape(candidate) != np.shape(exact) or np.shape(keras) != np.shape(exact):
        return comparison  # a shape mismatch stays a failure
    candidate_error = relative_error(candidate, exact)
    keras_error = max(relative_error(keras, exact), keras_noise)
    return dataclasses.replace(
        comparison,
        exact_error=candidate_error,
        keras_exact_error=keras_error,
        verdict="float64 reference",
        passed=bool(candidate_error <= factor * keras_error + floor),
    )


def sqnr_db(values: np.ndarray, exact: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum exact^2 / sum (values -
    exact)^2)`` (inf when equal; -inf when values are not finite and exact is)."""
    exact = np.asarray(exact, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        noise = np.asarray(values, np.float64) - exact
        noise_power = float(np.sum(np.where(np.isnan(noise), np.inf, noise) ** 2))
    return power_ratio_db(float(np.sum(exact**2)), noise_power)


def power_ratio_db(signal_power: float, noise_power: float) -> float:
    """``10 log10(signal / noise)``: inf without noise; -inf when the noise is not
    finite or there is no signal."""
    if noise_power == 0.0:
        return math.inf
    if not math.isfinite(noise_power) or signal_power == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


def decided_top1_agreement(
    values: np.ndarray, exact: np.ndarray, margin: float = INT8_TOP1_MARGIN
) -> tuple[float | None, int]:
    """Top-1 agreement over the samples the exact answer decides: those whose top class
    leads the runner-up by at least ``margin`` of the output's range (``max |exact|``).
    A near-tie (an untrained model's scores differ by less than int8's rounding) says
    nothing about the file. Returns ``(agreement or None, decided samples)``."""
    values, exact = np.asarray(values), np.asarray(exact, np.float64)
    if exact.ndim != 2 or exact.shape[1] < 2 or values.shape != exact.shape:
        return None, 0
    top2 = np.sort(exact, axis=1)[:, -2:]
    scale = float(np.abs(exact).max(initial=0.0))
    decided = (top2[:, 1] - top2[:, 0]) >= margin * scale
    count = int(np.count_nonzero(decided))
    if count == 0:
        return None, 0
    return top1_agreement(values[decided], exact[decided]), count


def top1_agreement(values: np.ndarray, reference: np.ndarray) -> float | None:
    """Fraction of samples whose argmax over the last axis agrees, for class scores
    (rank 2, at least two classes); None for other outputs."""
    values, reference = np.asarray(values), np.asarray(reference)
    if reference.ndim != 2 or reference.shape[1] < 2 or values.shape != reference.shape:
        return None
    return float(np.mean(np.argmax(values, axis=1) == np.argmax(reference, axis=1)))


# --------------------------------------------------------------------------------------
# float16 and int8: their own criteria, against the same float64 run.


def judge_float16(
    comparison: OutputComparison,
    candidate: np.ndarray,
    exact: np.ndarray,
    float16_run: np.ndarray | None,
    *,
    factor: float = FLOAT16_FACTOR,
    floor: float = FLOAT16_FLOOR,
) -> OutputComparison:
    """``comparison`` judged by the float16 criterion (see :func:`judge_precision`).
    Without ``float16_run``, an error within ``floor`` passes on its own (the yardstick
    "not needed": whatever a float16 run says, the bound is at least the floor)."""
    if np.shape(candidate) != np.shape(exact):
        return comparison
    error = relative_error(candidate, exact)
    run_error = math.inf if float16_run is None else relative_error(float16_run, exact)
    expected: float | None = run_error
    yardstick = "Keras float16"
    if float16_run is None and error <= floor:
        expected, yardstick = None, "not needed"
    elif not math.isfinite(run_error):  # no float16 run, or it overflowed
        expected, yardstick = FLOAT16_FALLBACK, "fallback"
    bound = floor if expected is None else factor * expected + floor
    sqnr = sqnr_db(candidate, exact)
    signal = bool(np.any(np.asarray(exact) != 0))  # an output that is all zeros has no SQNR
    return dataclasses.replace(
        comparison,
        exact_error=error,
        keras_exact_error=expected,
        yardstick=yardstick,
        bound=bound,
        sqnr_db=sqnr,
        top1_agreement=top1_agreement(candidate, exact),
        verdict="float16 criterion",
        passed=bool(error <= bound and (not signal or sqnr >= FLOAT16_SQNR_FLOOR_DB)),
    )


def within_float16_floor(candidate: np.ndarray, exact: np.ndarray) -> bool:
    """Whether ``candidate`` passes the float16 criterion whatever a float16 run of the
    model would say: its error is within ``FLOAT16_FLOOR`` (the run is then not needed)."""
    if np.shape(candidate) != np.shape(exact):
        return False
    return relative_error(candidate, exact) <= FLOAT16_FLOOR


def float16_rule(float16_ran: bool, missing: str | None = None, needed: bool = True) -> str:
    """The float16 criterion's pass condition, in words, as :func:`judge_float16` applies
    it with or without a finite float16 run of the model (``missing``: why there is
    none, when no float16 copy of the model could be made or run; ``needed``: False
    when every output was within the floor, so no float16 run was made)."""
    held = f", and the SQNR at least {FLOAT16_SQNR_FLOOR_DB:g} dB (an output float16 cannot hold is lost)"
    if float16_ran or not needed:
        rule = (
            f"the error is at most {FLOAT16_FACTOR:g}x that of the same model run in "
            f"float16, plus {FLOAT16_FLOOR:.2g} of the output's range"
        )
        if not needed:
            rule += (
                f" (every output was within {FLOAT16_FLOOR:.2g} of its range: "
                "no float16 run was needed)"
            )
        return rule + held
    bound = FLOAT16_FACTOR * FLOAT16_FALLBACK + FLOAT16_FLOOR
    return (
        f"the error is at most {bound:.2g} of the output's range ({FLOAT16_FACTOR:g}x "
        f"float16's expected {FLOAT16_FALLBACK:.2g}, plus {FLOAT16_FLOOR:.2g}: "
        + (f"{missing})" if missing else "no finite float16 run)")
        + held
    )


def int8_rule() -> str:
    """The int8 criterion's pass condition, in words, as :func:`judge_int8` applies it."""
    return (
        f"the SQNR is at least {INT8_SQNR_FLOOR_DB:g} dB and, for class scores, the top-1 "
        f"agreement at least {INT8_TOP1_FLOOR:.0%} on the samples whose top class leads "
        f"by {INT8_TOP1_MARGIN:.0%} of the range ({INT8_TOP1_MIN_SAMPLES}+ of them)"
    )


def judge_int8(
    comparison: OutputComparison,
    candidate: np.ndarray,
    exact: np.ndarray,
    *,
    sqnr_floor_db: float = INT8_SQNR_FLOOR_DB,
    top1_floor: float = INT8_TOP1_FLOOR,
    scores: bool = True,
) -> OutputComparison:
    """``comparison`` judged by the int8 criterion (see :func:`judge_precision`);
    ``scores=False``: not class scores (an embedding, pooled features), judged by the
    SQNR alone."""
    if np.shape(candidate) != np.shape(exact):
        return comparison
    sqnr = sqnr_db(candidate, exact)
    top1, decided = decided_top1_agreement(candidate, exact) if scores else (None, 0)
    passed = sqnr >= sqnr_floor_db
    if top1 is not None and decided >= INT8_TOP1_MIN_SAMPLES:
        passed = passed and top1 >= top1_floor
    return dataclasses.replace(
        comparison,
        exact_error=relative_error(candidate, exact),
        sqnr_db=sqnr,
        top1_agreement=top1,
        top1_samples=decided,
        verdict="int8 criterion",
        passed=bool(passed),
    )


def judge_precision(
    precision: str,
    comparison: OutputComparison,
    candidate: np.ndarray,
    exact: np.ndarray,
    *,
    keras: np.ndarray | None = None,
    float16_run: np.ndarray | None = None,
    keras_noise: float = 0.0,
    scores: bool = True,
) -> OutputComparison:
    """``comparison`` judged against the exact answer by ``precision``'s criterion.

    * ``"float32"``: :func:`judge_against_exact` (needs ``keras``, Keras float32's
      output; ``keras_noise``, its error on the other samples of the output judged).
    * ``"float16"``: the yardstick is the same model run in float16 (``float16_run``,
      the Keras model with every layer computing in float16): float16 rounding
      leaves a model-dependent error (a few float16 roundings of the range on a
      small CNN, 1-3% of it on MobileNetV2), so no fixed tolerance fits. Passes when
      ``e(candidate) <= FLOAT16_FACTOR * e(float16 run) + FLOAT16_FLOOR``; where the
      float16 run is missing or not finite (the model overflows float16 as written;
      a folded export may not) the expectation is ``FLOAT16_FALLBACK``. A candidate
      that overflows (inf/NaN where the exact answer is finite) fails.
    * ``"int8"``: int8 rounding is far coarser, and its error depends on the
      calibration, not only on the model: passes when the SQNR against the exact
      answer is at least ``INT8_SQNR_FLOOR_DB`` and, for class scores (rank 2, two
      or more classes; ``scores=False``: the output is not), the argmax agrees with
      the exact answer's on at least ``INT8_TOP1_FLOOR`` of the samples it decides
      (top class ahead by ``INT8_TOP1_MARGIN`` of the range:
      :func:`decided_top1_agreement`), when there are ``INT8_TOP1_MIN_SAMPLES`` of
      them or more. Errors below int8's own noise (a weight off by 2%) cannot be told
      from it by any comparison of outputs; BENCHMARKS.md section 6 says which bugs
      each criterion detects.
    """
    if precision == "float16":
        return judge_float16(comparison, candidate, exact, float16_run)
    if precision == "int8":
        return judge_int8(comparison, candidate, exact, scores=scores)
    if keras is None:
        raise ValueError("the float32 criterion needs Keras float32's output")
    return judge_against_exact(comparison, candidate, keras, exact, keras_noise=keras_noise)

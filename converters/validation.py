"""Validate an exported ONNX model against the original Keras model in onnxruntime.

:func:`validate_onnx` runs the Keras model in inference mode and the ONNX file in
onnxruntime on the same inputs, at batch size 1 and a larger one (2 by default; it proves
the batch dimension is dynamic; a model exported with a fixed batch size runs at
that size only), and compares every output elementwise the way Polygraphy does::

    |onnx - keras| <= atol + rtol * |keras|

That rule is the verdict when the user gives ``atol``/``rtol`` (an explicit
contract). By default it only decides the clear cases: an output that passes it
and is within ``OUTRIGHT`` of Keras relative to its range passes outright; any
other is judged against the exact answer - the same model run in float64
(:mod:`.reference`) - by its error next to Keras float32's own error against it
(:func:`.comparison.judge_against_exact`). Keras float32 is not exact either: a deep
network's float32 output is off the exact result by more than the elementwise
tolerance, and so is a correct export, on the other side. The report gives all
three numbers per output. A model whose float64 copy cannot run keeps the
elementwise verdict, with a note saying so.

onnxruntime runs the file with its graph optimizations up to the extended level
(``ORT_ENABLE_EXTENDED``: constant folding, node fusions), not ``ORT_ENABLE_ALL``'s
layout transform, which rewrites convolutions into blocked NCHWc kernels: preparing
those costs more than the check itself (most of a validation: BENCHMARKS.md appendix)
and changes only the order of float32 roundings, not what the graph computes. An
int8 file runs at ``ORT_ENABLE_ALL``, onnxruntime's default and so its deployment's:
there the level's own rewrite puts the integer convolutions in NHWC, which is cheaper
to prepare and to run than the extended level's, with the same outputs on the vision
models measured (BENCHMARKS.md, section 47; :func:`.runtime.validation_optimization`).
``keras-bn bench`` measures latency at both levels. Its worker threads sleep between
operations rather than spin (:func:`.runtime.open_session`): the ``keras-bn`` command
runs the Keras reference pass meanwhile, which the spinning would take CPU from
(BENCHMARKS.md section 26).

A float16 or int8 file is judged by its own criterion
(:func:`.comparison.judge_precision`): every output against Keras float32's run
(whose own rounding error is far below either criterion's: no float64 run is
needed), a float16 file by its error next to that of the same model run once in
float16, an int8 file by its SQNR and top-1 agreement, with no Keras run beyond
the reference. The report gives each criterion's numbers.

When an output fails and ``localize`` is on, it compares intermediate tensors
layer by layer: Keras layer outputs (running the flattened graph eagerly) against
the matching ONNX values (exposed as extra graph outputs of an in-memory copy; the
exporter records which ONNX value computes which Keras layer in the file's
metadata) and names the first layer whose output diverges - so the user knows
whether folding or export broke the model. A BatchNormalization folded away is
recognized: the layer it was folded into must match the BN's output instead.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from keras_bn.converters import graph as graph_lib
from keras_bn.converters import onnx_graph, runtime
from keras_bn.converters.comparison import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    FLOAT16_SQNR_FLOOR_DB,
    INT8_SQNR_FLOOR_DB,
    INT8_TOP1_MIN_SAMPLES,
    NOTHING_FINITE,
    OUTRIGHT,
    OutputComparison,
    compare_arrays,
    compare_output,
    failed_comparison,
    float16_rule,
    int8_rule,
)
from keras_bn.converters.errors import UserInputError
from keras_bn.converters.onnx.layout import InputLayout, check_input_layout, decode_input_layout
from keras_bn.converters.onnx.metadata import (
    METADATA_INPUT_LAYOUT,
    LayerMap,
    decode_layer_map,
)
from keras_bn.converters.options import PRECISIONS
from keras_bn.converters.prepared import ModelLike, PreparedModel, prepare
from keras_bn.converters.reference import (
    Doubtful,
    KerasReference,
    float16_yardstick,
    keras_run,
    rejudge_against_float64,
)
from keras_bn.converters.samples import (
    call_model,
    describe_generated_inputs,
    make_sample_inputs,
    normalize_inputs,
)

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "OutputComparison",
    "LayerComparison",
    "ValidationReport",
    "KerasReference",
    "validate_onnx",
    "make_sample_inputs",
    "compare_arrays",
    "call_model",
    "VALIDATION_OPTIMIZATION",
]

# onnxruntime's graph optimization level for validation (see the module docstring);
# an int8 file's: runtime.validation_optimization("int8").
VALIDATION_OPTIMIZATION = runtime.VALIDATION_OPTIMIZATION


# --------------------------------------------------------------------------------------
# Reports.


@dataclasses.dataclass
class LayerComparison:
    """A Keras layer's output against the ONNX value that computes it."""

    layer: str
    onnx_value: str
    max_abs_error: float
    max_abs_reference: float
    relative_to_max: float
    passed: bool
    note: str = ""


@dataclasses.dataclass
class ValidationReport:
    """Result of :func:`validate_onnx`; truthy iff every output passed."""

    path: str
    atol: float
    rtol: float
    comparisons: list[OutputComparison]
    first_divergent_layer: str | None = None
    layers: list[LayerComparison] = dataclasses.field(default_factory=list)
    localization: str = ""
    exact_note: str = ""  # how the float64 reference judged (or why it could not)
    precision: str = "float32"  # whose default criterion judged (comparison.judge_precision)
    inputs: str = ""  # what was compared on: given, or generated (how, why, how many)

    @property
    def passed(self) -> bool:
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def required_atol(self) -> float:
        return max((c.required_atol for c in self.comparisons), default=0.0)

    @property
    def required_rtol(self) -> float:
        return max((c.required_rtol for c in self.comparisons), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["passed"] = self.passed
        data["required_atol"] = self.required_atol
        data["required_rtol"] = self.required_rtol
        return _json_safe(data)

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        by_float64 = [c for c in self.comparisons if c.verdict == "float64 reference"]
        if any(c.verdict.endswith("criterion") for c in self.comparisons):
            criterion = f"{self.precision} criterion"
        elif by_float64 and len(by_float64) == len(self.comparisons):
            criterion = "judged against a float64 run of the Keras model"
        elif by_float64:
            criterion = (
                f"atol={self.atol:g}, rtol={self.rtol:g}; outputs beyond them judged against "
                "a float64 run"
            )
        else:
            criterion = f"atol={self.atol:g}, rtol={self.rtol:g}"
        lines = [f"Validation {verdict}: {self.path} vs Keras ({criterion})"]
        if self.inputs:
            lines.append(f"  inputs: {self.inputs}")
        if self.exact_note:
            lines.append(f"  {self.exact_note}")
        header = (
            f"  {'output':<24} {'batch':>5} {'max abs':>10} {'max rel':>10} "
            f"{'mean abs':>10} {'rel to max':>10}  result"
        )
        lines.append(header)
        for c in self.comparisons:
            if not math.isfinite(c.max_abs_error) and c.note:  # nothing was compared
                lines.append(f"  {c.name[:24]:<24} {c.batch_size:>5} FAIL: {_not_compared(c)}")
                continue
            lines.append(
                f"  {c.name[:24]:<24} {c.batch_size:>5} {c.max_abs_error:>10.3g} "
                f"{c.max_rel_error:>10.3g} {c.mean_abs_error:>10.3g} "
                f"{c.relative_to_max:>10.3g}  {'pass' if c.passed else 'FAIL'}"
                + (f" ({c.note})" if c.note else "")
            )
            if c.exact_error is not None:
                lines.append(f"  {'':<24} {'':>5} {_exact_line(c)}")
        if by_float64 and all(c.passed for c in by_float64):
            worst = max(by_float64, key=lambda c: c.exact_error or 0.0)
            lines.append(
                f"  passed: within {worst.noise} of a float64 run (error "
                f"{worst.exact_error:.3g} vs {worst.yardstick}'s own "
                f"{worst.keras_exact_error:.3g}, relative to max)"
            )
        elementwise_failed = [
            c
            for c in self.comparisons
            if c.verdict == "elementwise" and not c.passed and math.isfinite(c.required_atol)
        ]
        if elementwise_failed:
            lines.append(
                f"  would pass with atol >= {self.required_atol:.3g} (at rtol={self.rtol:g}) "
                f"or rtol >= {self.required_rtol:.3g} (at atol={self.atol:g})"
            )
        if not self.passed:
            if self.first_divergent_layer:
                lines.append(f"  first divergent layer: {self.first_divergent_layer}")
            if self.localization:
                lines.append(f"  {self.localization}")
        return "\n".join(lines)


def _not_compared(c: OutputComparison) -> str:
    """Why an output could not be compared: the shapes differ, or onnxruntime failed."""
    if c.note.startswith("shape "):
        onnx_shape, keras_shape = c.note[len("shape ") :].split(" != Keras shape ")
        return f"the shapes differ: ONNX {onnx_shape} vs Keras {keras_shape}"
    return c.note


def _exact_line(c: OutputComparison) -> str:
    """The verdict against the float64 run: the criterion's three numbers."""
    result = "pass" if c.passed else "FAIL"
    if c.verdict == "float16 criterion" and c.keras_exact_error is None:
        return (
            f"vs {c.exact_answer}: ONNX {c.exact_error:.3g}, within the floor {c.bound:.3g} "
            f"(relative to max; SQNR {c.sqnr_db:.1f} dB; no float16 run needed): {result}"
        )
    if c.verdict == "float16 criterion":
        return (
            f"vs {c.exact_answer}: ONNX {c.exact_error:.3g}, {c.yardstick} {c.keras_exact_error:.3g}, "
            f"bound {c.bound:.3g} (relative to max; SQNR {c.sqnr_db:.1f} dB, floor "
            f"{FLOAT16_SQNR_FLOOR_DB:g}): {result}"
        )
    if c.verdict == "int8 criterion":
        top1 = (
            ""
            if c.top1_agreement is None
            else f", top-1 agreement {c.top1_agreement:.1%} of {c.top1_samples} decided"
        )
        return (
            f"vs {c.exact_answer}: SQNR {c.sqnr_db:.1f} dB (floor {INT8_SQNR_FLOOR_DB:g})"
            f"{top1}, error {c.exact_error:.3g} of max: {result}"
        )
    return (
        f"vs float64: ONNX {c.exact_error:.3g}, {c.yardstick} {c.keras_exact_error:.3g} "
        f"(relative to max): {result}"
    )


def _json_safe(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _json_safe(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_json_safe(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    return data


# --------------------------------------------------------------------------------------
# Running ONNX.


def _batch_plan(
    count: int, fixed: int | None, batch_sizes: list[int] | None, per_sample: bool
) -> list[tuple[int, list[np.ndarray]]]:
    """What to run: ``(samples compared, sample indices of each onnxruntime batch)``.

    A dynamic batch runs each generated batch size (``batch_sizes``), or for user
    inputs their first sample alone and then all of them. A fixed batch runs only
    batches of that size: every sample in order, split into consecutive chunks of
    the fixed size, the last chunk (or a single one, when there are fewer samples
    than the batch) filled up by wrapping around to the first samples, so every
    sample is compared exactly once. Outputs that are not batch-major cannot be
    stitched together: then only the first chunk is compared.
    """
    if fixed is None:
        sizes = batch_sizes if batch_sizes is not None else ([1, count] if count > 1 else [1])
        return [(size, [np.arange(size)]) for size in sizes]
    chunks = [np.arange(start, start + fixed) % count for start in range(0, count, fixed)]
    if not per_sample:
        return [(fixed, chunks[:1])]
    return [(count, chunks)]


def _check_layout(input_layout: object) -> None:
    check_input_layout(input_layout)


def _open_and_run(
    path: Path,
    full: Mapping[str, np.ndarray],
    batch_sizes: list[int] | None,
    input_layout: InputLayout | None,
    known: list[np.ndarray] | None = None,
    optimization: str = VALIDATION_OPTIMIZATION,
) -> tuple[Any, int | None, InputLayout, list, list | None]:
    """Open the ONNX file in onnxruntime and run it on ``full`` as validation plans.

    ``batch_sizes``: those of generated inputs (None for user inputs). ``known``: the
    file's outputs on all of ``full`` in one run, already computed (validate_onnx's
    ``onnx_outputs``): that run is not repeated. The session
    reads the file once: the ONNX proto itself is parsed only to localize a failure.
    Returns ``(session, fixed batch size, input layout, plan, runs)``; the runs are
    None when the batch is fixed at a size the generated inputs do not have.
    """
    session = runtime.open_session(path, optimization=optimization, spinning=False)
    if input_layout is None:
        metadata = session.get_modelmeta().custom_metadata_map
        recorded = metadata.get(METADATA_INPUT_LAYOUT, "channels_last")
        input_layout = decode_input_layout(recorded)
        if input_layout is None:
            raise UserInputError(
                f"ONNX file {str(path)!r} records the input layout {recorded!r}: expected "
                "'channels_last', 'channels_first' or a JSON dict of them by input name; "
                "pass input_layout (CLI: --input-layout)."
            )
    fixed = runtime.fixed_batch_size(runtime.input_specs(session))
    count = int(next(iter(full.values())).shape[0])
    if fixed is not None and batch_sizes is not None and fixed != count:
        return session, fixed, input_layout, [], None
    planned = _batch_plan(count, fixed, batch_sizes, per_sample=True)
    ran = [
        _run_batches(
            session,
            full,
            chunks,
            input_layout,
            known if fixed is None and len(chunks) == 1 and len(chunks[0]) == count else None,
        )
        for _, chunks in planned
    ]
    return session, fixed, input_layout, planned, ran


def _run_batches(
    session: Any,
    full: Mapping[str, np.ndarray],
    chunks: list[np.ndarray],
    input_layout: InputLayout,
    known: list[np.ndarray] | None = None,
) -> tuple[list[tuple[dict, dict, list]], Exception | None]:
    """onnxruntime on each chunk of the samples, in order (``known``: the outputs of
    a single chunk, already computed).

    Returns the runs as ``(Keras inputs, ONNX feed, outputs)`` and the error that
    stopped them (None when all ran).
    """
    specs = runtime.input_specs(session)
    batches = [{name: array[chunk] for name, array in full.items()} for chunk in chunks]
    feeds = [
        runtime.match_inputs(
            specs, batch, "The Keras model's input", input_layout=input_layout, check_shapes=False
        )
        for batch in batches
    ]
    if known is not None:
        return [(batches[0], feeds[0], list(known))], None
    runs = []
    try:
        for batch, feed in zip(batches, feeds, strict=True):
            runs.append((batch, feed, session.run(None, feed)))
    except Exception as error:
        return runs, error
    return runs, None


def _first_failing_run(
    runs: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[np.ndarray]]],
    expected: list[np.ndarray],
    batch_size: int,
    atol: float,
    rtol: float,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The (Keras inputs, ONNX feed) of the first onnxruntime batch that fails."""
    for index, (batch, feed, outputs) in enumerate(runs):
        rows = np.arange(index * batch_size, (index + 1) * batch_size)
        for a, b in zip(outputs, expected, strict=True):
            reference = np.asarray(b)[rows % len(b)] if len(runs) > 1 else b
            if not compare_arrays(a, reference, atol=atol, rtol=rtol).passed:
                return batch, feed
    return runs[0][0], runs[0][1]


# --------------------------------------------------------------------------------------
# float16 and int8: each criterion's one reference run.


def judge_by_precision(
    model: keras.Model,
    inputs: list[np.ndarray],
    comparisons: list[OutputComparison],
    doubtful: list[Doubtful],
    precision: str,
) -> str:
    """Judge the ``doubtful`` comparisons of a float16 or int8 file (in place) by
    ``precision``'s criterion (:func:`.comparison.judge_precision`); a note for the report.

    The exact answer is Keras float32's output, already computed (``Doubtful.expected``):
    float32's rounding error is ~2^-13 of float16's (unit roundoffs 2^-24 and 2^-11)
    and far below int8's, so a float64 run would move neither criterion's numbers
    by anything they can resolve (BENCHMARKS.md section 17 measures it). int8 needs
    no other run; float16 needs its yardstick, the model run once in float16 on
    ``inputs`` (one array per model input, every sample the comparisons cover),
    only where an output's error is beyond the floor that passes whatever it says.
    """
    from keras_bn.converters.comparison import judge_precision

    half = half_outputs = missing = None
    needed = True
    if precision == "float16":
        candidates = [(item.actual, item.expected) for item in doubtful]
        half, half_outputs, missing, needed = float16_yardstick(model, inputs, candidates)
    for item in doubtful:
        float16_run = None
        if half is not None and half_outputs is not None:
            if item.chunk is None:
                float16_run = half_outputs[item.output][: item.samples]
            else:  # outputs not batch-major: the chunk the comparison covers
                float16_run = half([array[item.chunk] for array in inputs])[item.output]
        comparisons[item.index] = judge_precision(
            precision,
            comparisons[item.index],
            item.actual,
            item.expected,
            keras=item.expected,
            float16_run=float16_run,
            scores=item.scores,
        )
    return _precision_note(precision, half is not None, missing, needed)


def _precision_note(
    precision: str, float16_ran: bool, missing: str | None = None, needed: bool = True
) -> str:
    if precision == "float16":
        return (
            "float16 criterion, against Keras float32 (its rounding error is ~2^-13 of "
            "float16's): pass when " + float16_rule(float16_ran, missing, needed)
        )
    return (
        "int8 criterion, against Keras float32 (its error is far below int8's): pass when "
        + int8_rule()
    )


# --------------------------------------------------------------------------------------
# Localization.


def _is_batch_norm(layer: Any) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


def _lookup(layer_map: LayerMap, node: graph_lib.Node) -> list | None:
    """``node``'s entries in the layer map: by key, or by the name folding gave its copy."""
    for candidate in (
        node.key,
        node.layer.name,
        f"{node.scope.replace('/', '_')}_{node.layer.name}",
    ):
        if candidate in layer_map:
            return layer_map[candidate]
    return None


def _matched_values(
    graph: graph_lib.Graph, onnx_model: Any, layer_map: LayerMap
) -> list[tuple[graph_lib.Node, graph_lib.Tensor, str, tuple[int, ...]]]:
    """``(node, Keras tensor, ONNX value, perm)`` for each output the layer map names."""
    produced = {name for node in onnx_model.graph.node for name in node.output}
    matched = []
    for node in graph.nodes:
        entries = _lookup(layer_map, node)
        for tensor, entry in zip(node.outputs, entries or [], strict=False):
            if entry is not None and entry[0] in produced:
                matched.append((node, tensor, entry[0], tuple(entry[1])))
    return matched


def _onnx_values(onnx_model: Any, matched: list, feed: Mapping[str, np.ndarray]) -> dict:
    """The matched ONNX values, exposed as extra outputs of an in-memory copy (untyped:
    onnxruntime infers each one's type, float16 in a float16 file, whatever the Keras
    tensor's dtype)."""
    serialized = onnx_graph.with_outputs(onnx_model, [name for _, _, name, _ in matched])
    session = runtime.open_session(serialized, optimization=VALIDATION_OPTIMIZATION, spinning=False)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, dict(feed)), strict=True))


def _localize(
    model: PreparedModel,
    onnx_model: Any,
    inputs: Mapping[str, np.ndarray],
    feed: Mapping[str, np.ndarray],
    atol: float,
    rtol: float,
) -> tuple[str | None, list[LayerComparison], str]:
    layer_map = decode_layer_map({p.key: p.value for p in onnx_model.metadata_props})
    if layer_map is None:
        return (
            None,
            [],
            (
                "cannot localize: the ONNX file has no keras-bn layer map "
                "(it was not exported by keras-bn)"
            ),
        )
    graph = model.graph
    matched = _matched_values(graph, onnx_model, layer_map)
    if not matched:
        return None, [], "cannot localize: no layer of this model appears in the ONNX layer map"
    onnx_values = _onnx_values(onnx_model, matched, feed)
    keras_values = graph_lib.evaluate(graph, inputs)

    in_export = {node.key for node, *_ in matched}
    comparisons: list[LayerComparison] = []
    first = None
    for node, tensor, name, perm in matched:
        actual = np.transpose(onnx_values[name], np.argsort(perm))
        reference = keras.ops.convert_to_numpy(keras_values[id(tensor)])
        result = _layer_comparison(node.key, name, actual, reference, atol, rtol)
        if not result.passed:
            # Folded BN: the layer it was folded into computes the BN's output instead.
            after = tensor.consumers
            if len(after) == 1 and _is_batch_norm(after[0].layer):
                bn = after[0]
                if bn.key not in in_export and _lookup(layer_map, bn) is None:
                    bn_reference = keras.ops.convert_to_numpy(keras_values[id(bn.outputs[0])])
                    folded = _layer_comparison(node.key, name, actual, bn_reference, atol, rtol)
                    if folded.passed:
                        folded.note = f"matches {bn.key!r} folded into it"
                        result = folded
        comparisons.append(result)
        if not result.passed and first is None:
            first = node.key
    return first, comparisons, _localization_note(first, comparisons)


def _localization_note(first: str | None, comparisons: list[LayerComparison]) -> str:
    if first is None:
        return (
            "no intermediate tensor diverges; the outputs differ only after the last compared layer"
        )
    return f"first divergent layer {first!r}: " + next(
        (
            f"max abs error {c.max_abs_error:.3g} vs max |Keras| {c.max_abs_reference:.3g}"
            + (f" ({c.note})" if c.note else "")
        )
        if math.isfinite(c.max_abs_error) or not c.note
        else c.note.replace("shape ", "the shapes differ: ONNX ", 1).replace(
            " != Keras shape ", " vs Keras "
        )
        for c in comparisons
        if c.layer == first
    )


def _layer_comparison(
    key: str, name: str, actual: np.ndarray, reference: np.ndarray, atol: float, rtol: float
) -> LayerComparison:
    """Scale-aware: diverges when max |a - b| > atol + rtol * max |b|."""
    if actual.shape != reference.shape:
        return LayerComparison(
            key,
            name,
            math.inf,
            math.inf,
            math.inf,
            False,
            note=f"shape {actual.shape} != Keras shape {reference.shape}",
        )
    difference = np.abs(actual.astype(np.float64) - reference.astype(np.float64))
    max_abs = float(np.nan_to_num(difference, nan=np.inf).max()) if difference.size else 0.0
    max_reference = float(np.abs(reference).max()) if reference.size else 0.0
    passed = max_abs <= atol + rtol * max_reference
    return LayerComparison(
        key,
        name,
        max_abs,
        max_reference,
        max_abs / max_reference if max_reference else (0.0 if max_abs == 0 else math.inf),
        passed,
    )


# --------------------------------------------------------------------------------------
# The entry point.


def validate_onnx(
    model: ModelLike,
    path: str | os.PathLike,
    *,
    inputs: Any = None,
    batch_sizes: Sequence[int] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    localize: bool = True,
    input_layout: InputLayout | None = None,
    seed: int = 0,
    precision: str | None = None,
    reference: KerasReference | None = None,
    onnx_outputs: Sequence[np.ndarray] | None = None,
    class_scores: Sequence[bool] | None = None,
    signed_int8: bool | None = None,
) -> ValidationReport:
    """Compare the ONNX model at ``path`` with the Keras ``model`` in onnxruntime.

    Args:
        model: the original Keras model (before folding; or the run's
            :class:`~.prepared.PreparedModel` of it), run in inference mode.
        path: the exported ``.onnx`` file.
        inputs: arrays to compare on (a dict by input name, a list in input order,
            or one array); they are used as given and, when their batch is larger
            than 1, also their first sample alone. By default, generated with
            :func:`make_sample_inputs` at each of ``batch_sizes``.
        batch_sizes: batch sizes of generated inputs (a size above 1 proves the batch
            dimension dynamic); default ``(1, 2)``, for int8 ``(1, INT8_TOP1_MIN_SAMPLES)``
            (enough to judge top-1 agreement).
            A fixed ONNX batch size N (``batch_size=N`` at export) overrides them:
            generated inputs have N samples; user inputs run in consecutive chunks
            of N, the last one filled up with the first samples, and every sample
            is compared once (each comparison's ``batch_size`` is N).
        atol, rtol: an element passes when ``|onnx - keras| <= atol + rtol * |keras|``.
            Given (either one), this is the verdict. Left None, ``DEFAULT_ATOL``/
            ``DEFAULT_RTOL`` decide outright passes only, and other outputs are judged
            against a float64 run of ``model`` (the module docstring).
        localize: when an output fails, name the first layer whose output diverges.
        input_layout: the ONNX inputs' order; by default the file's (else channels_last).
        seed: seed of the generated inputs.
        precision: ``"float32"``, ``"float16"`` or ``"int8"``: whose criterion judges the
            outputs (:func:`.comparison.judge_precision`); by default the file's
            (:func:`.precision.detect_precision`). float16 and int8 outputs are all judged
            against Keras float32 (:func:`judge_by_precision`), and never localized.
        reference: Keras's run of ``model`` (a :class:`.reference.KerasReference`,
            awaited while onnxruntime opens the file): compared on its inputs without
            running Keras again. Not with ``inputs``.
        onnx_outputs, class_scores, signed_int8: where the caller knows them, the
            file's outputs on every given sample, one run (see _run_both); which hold
            class scores (int8); whether its activations are int8 (:func:`_signed_int8`).

    Returns: a :class:`ValidationReport` (truthy iff every output passed).
    """
    path = Path(path)
    explicit, atol, rtol = _tolerances(atol, rtol)
    _check_arguments(path, inputs, batch_sizes, atol, rtol, input_layout, precision, reference)
    prepared = prepare(model)
    if precision is None:
        precision = _detect_precision(path)
    if batch_sizes is None:
        batch_sizes = (1, INT8_TOP1_MIN_SAMPLES) if precision == "int8" else (1, 2)
    level = runtime.validation_optimization(precision, _signed_int8(path, precision, signed_int8))
    runs = _run_both(
        prepared, path, inputs, batch_sizes, input_layout, seed, reference, onnx_outputs, level
    )
    # float16/int8 outputs are never exact: every one is judged by its criterion.
    outright = None if explicit else (OUTRIGHT if precision == "float32" else -1.0)
    comparisons, failing_batch, doubtful = _compare_outputs(prepared, runs, atol, rtol, outright)
    report = ValidationReport(str(path), float(atol), float(rtol), comparisons, precision=precision)
    report.inputs = _describe_inputs(prepared, runs, inputs, reference)
    if doubtful:
        arrays = [runs.full[name] for name in prepared.input_names]
        judged = (prepared.model, arrays, comparisons, doubtful, precision)
        report.exact_note = _judge(*judged, path, class_scores)
    failed = [c for c in report.comparisons if not c.passed]
    if localize and failed and any(c.note != NOTHING_FINITE for c in failed):
        _explain_failure(report, prepared, path, failing_batch, explicit)
    return report


def _mark_class_scores(
    path: str | os.PathLike, doubtful: list[Doubtful], scores: Sequence[bool] | None
) -> None:
    """Mark which doubtful outputs hold class scores, by what computes them in the
    file (:func:`.onnx_graph.class_score_outputs`; ``scores`` where already known:
    reading the file again takes 0.14 s on ResNet50's int8 file): int8's top-1
    agreement is judged on those only, not on a tanh embedding or pooled features."""
    if scores is None:
        import onnx

        from keras_bn.converters.onnx_graph import class_score_outputs

        scores = class_score_outputs(onnx.load(str(path), load_external_data=False))
    for item in doubtful:
        item.scores = item.output >= len(scores) or scores[item.output]


def _judge(
    model: keras.Model,
    arrays: list[np.ndarray],
    comparisons: list[OutputComparison],
    doubtful: list[Doubtful],
    precision: str,
    path: str | os.PathLike,
    class_scores: Sequence[bool] | None = None,
) -> str:
    """The doubtful comparisons re-judged (float32: against float64; else by the
    precision's criterion). float16 and int8 take Keras's own output as the exact
    answer only where Keras computes in float32: a mixed-precision model's output
    carries float16's error itself, so there they are judged against float64 too.
    int8 judges top-1 agreement on the file's class scores only."""
    if precision == "int8":
        _mark_class_scores(path, doubtful, class_scores)
    if precision == "float32" or keras_run(model) != "Keras float32":  # 16-bit in places
        return rejudge_against_float64(model, arrays, comparisons, doubtful, precision)
    return judge_by_precision(model, arrays, comparisons, doubtful, precision)


def _tolerances(atol: float | None, rtol: float | None) -> tuple[bool, float, float]:
    """Whether the caller gave a tolerance (a strict contract), and both tolerances."""
    explicit = atol is not None or rtol is not None
    atol = DEFAULT_ATOL if atol is None else atol
    rtol = DEFAULT_RTOL if rtol is None else rtol
    return explicit, atol, rtol


def _describe_inputs(
    prepared: PreparedModel, runs: Any, inputs: Any, reference: KerasReference | None
) -> str:
    """What the comparison ran on: generated (how, why, how many) or given."""
    count = int(next(iter(runs.full.values())).shape[0])
    if inputs is None and (reference is None or reference.generated):
        return describe_generated_inputs(prepared, count)
    return f"given, {count} sample(s)"


def _explain_failure(
    report: ValidationReport,
    prepared: PreparedModel,
    path: Path,
    failing_batch: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]] | None,
    explicit: bool,
) -> None:
    """Name the first divergent layer of a failed validation (float32 criteria only)."""
    if report.precision != "float32" and not explicit:
        overflow = None
        if report.precision == "float16" and failing_batch is not None:
            overflow = _first_overflow(path, failing_batch[1])
        report.localization = overflow or (
            f"not localized: layer outputs are compared at float32 tolerances; validate "
            f"the float32 export to find a converter bug, or see the {report.precision} "
            "numbers above"
        )
    elif failing_batch is not None:
        import onnx

        first, layers, note = _localize(
            prepared, onnx.load(str(path)), *failing_batch, report.atol, report.rtol
        )
        report.first_divergent_layer = first
        report.layers = layers
        report.localization = note


def _first_overflow(path: Path, feed: Mapping[str, np.ndarray]) -> str | None:
    """Where a float16 model first leaves float16's range on ``feed``: the first node
    (in graph order) whose output holds an inf or NaN while its inputs are finite, as
    the failure's note; None when nothing does."""
    import onnx

    model = onnx.load(str(path))
    known = {output.name for output in model.graph.output}
    for node in model.graph.node:
        model.graph.output.extend(
            onnx.ValueInfoProto(name=name) for name in node.output if name and name not in known
        )
    session = runtime.open_session(model.SerializeToString(), spinning=False)
    names = [output.name for output in session.get_outputs()]
    values = dict(zip(names, session.run(None, dict(feed)), strict=True))
    values.update(feed)

    def finite(name: str) -> bool:
        value = values.get(name)
        return (
            not isinstance(value, np.ndarray)
            or value.dtype.kind != "f"
            or bool(np.isfinite(value).all())
        )

    for node in model.graph.node:
        broken = [name for name in node.output if name and not finite(name)]
        if broken and all(finite(name) for name in node.input if name):
            return (
                f"float16 overflow: {broken[0]!r} ({node.op_type}) is the first value "
                "beyond float16's range (largest 65504) while its inputs are finite: this "
                "model's activations need float32 there (or --precision int8, whose ranges "
                "are calibrated)"
            )
    return None


def _signed_int8(path: Path, precision: str, known: bool | None) -> bool:
    """Whether ``path``, judged as ``precision``, is an int8 file with int8 activations
    (``known`` where the caller knows); read from the file only where the answer
    changes how it runs (:func:`.int8_storage.kernels_saturate`)."""
    from keras_bn.converters.int8_storage import kernels_saturate, signed_activations

    if known is not None:
        return known
    if precision != "int8" or not kernels_saturate():
        return False
    import onnx

    try:
        return signed_activations(onnx.load(str(path), load_external_data=False))
    except Exception:  # not ONNX: onnxruntime says so in one line when it opens the file
        return False


def _detect_precision(path: Path) -> str:
    import onnx

    from keras_bn.converters.precision import detect_precision

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX: onnxruntime says so in one line when it opens the file
        return "float32"
    return detect_precision(model)


def _check_arguments(
    path: Path,
    inputs: Any,
    batch_sizes: Sequence[int] | None,
    atol: float,
    rtol: float,
    input_layout: InputLayout | None,
    precision: str | None,
    reference: KerasReference | None = None,
) -> None:
    if reference is not None and inputs is not None:
        raise UserInputError("reference holds its inputs: pass inputs or reference, not both.")
    if precision is not None and precision not in PRECISIONS:
        raise UserInputError(
            f"precision must be one of {', '.join(map(repr, PRECISIONS))}; received {precision!r}."
        )
    if not path.is_file():
        raise UserInputError(f"ONNX file {str(path)!r} does not exist; export the model first.")
    for label, tolerance in (("atol", atol), ("rtol", rtol)):
        if not isinstance(tolerance, int | float) or not tolerance >= 0:
            raise UserInputError(f"{label} must be a non-negative number; received {tolerance!r}.")
    if (
        inputs is None
        and batch_sizes is not None
        and (
            not batch_sizes
            or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes)
        )
    ):
        raise UserInputError(
            f"batch_sizes must be positive integers, e.g. (1, 2); received {batch_sizes!r}."
        )
    if input_layout is not None:
        _check_layout(input_layout)


@dataclasses.dataclass
class _Runs:
    """Both sides of a validation: the inputs, Keras's outputs and onnxruntime's runs."""

    full: dict[str, np.ndarray]  # every sample, by Keras input name
    full_expected: list[np.ndarray]  # Keras's outputs on them
    session: Any
    fixed: int | None  # the ONNX batch size when fixed
    sizes: list[int] | None  # batch sizes of generated inputs (None: user inputs)
    input_layout: InputLayout
    checks: list[tuple[int, list[np.ndarray]]]  # what to compare (see _batch_plan)
    ran: list  # per check: (runs, error) as from _run_batches


def _run_both(
    model: PreparedModel,
    path: Path,
    inputs: Any,
    batch_sizes: Sequence[int],
    input_layout: InputLayout | None,
    seed: int,
    reference: KerasReference | None = None,
    onnx_outputs: Sequence[np.ndarray] | None = None,
    level: str = runtime.VALIDATION_OPTIMIZATION,
) -> _Runs:
    """Run Keras (unless ``reference`` has) and onnxruntime on the same inputs
    (generated, the user's, or the reference's).

    ``onnx_outputs``: the file's outputs on every given sample (``inputs`` or
    ``reference``'s) in one onnxruntime run at ``level`` (the file's criterion's), when
    the caller has them (``quantize_int8``'s comparison on the same samples,
    :attr:`.precision.PrecisionReport.outputs`): that run is reused, and only the
    one-sample run (the dynamic batch) is added.
    """
    if onnx_outputs is not None and inputs is None and reference is None:
        raise ValueError("onnx_outputs are the file's outputs on given inputs or reference's")
    if reference is not None:
        inputs = reference.inputs
    if inputs is None:  # generated again below if the ONNX batch is fixed at another size
        full = make_sample_inputs(model, max(batch_sizes), seed=seed)
    else:
        full = normalize_inputs(model, inputs)
    sizes = list(dict.fromkeys(batch_sizes)) if inputs is None else None
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        # onnxruntime opens the file and runs its batches while Keras computes the
        # reference (both release the GIL): BENCHMARKS.md appendix for what it saves.
        known = None if onnx_outputs is None else list(onnx_outputs)
        onnx_side = pool.submit(_open_and_run, path, full, sizes, input_layout, known, level)
        # once; each check compares a prefix
        if reference is None:
            full_expected = call_model(model, full)
        else:
            full_expected = reference.outputs()
        session, fixed, input_layout, planned, ran = onnx_side.result()
    if ran is None:  # a fixed ONNX batch size: generate inputs of that size instead
        assert fixed is not None  # _open_and_run runs nothing only for a fixed batch
        full = make_sample_inputs(model, fixed, seed=seed)
        planned = _batch_plan(fixed, fixed, None, per_sample=True)
        ran = [_run_batches(session, full, chunks, input_layout) for _, chunks in planned]
        full_expected = call_model(model, full)
    count = int(next(iter(full.values())).shape[0])
    per_sample = all(np.ndim(o) >= 1 and np.shape(o)[0] == count for o in full_expected)
    checks = _batch_plan(count, fixed, sizes, per_sample)
    if len(checks[0][1]) < len(planned[0][1]):  # not batch-major: the first chunk only
        runs, error = ran[0]
        ran = [(runs[:1], error if not runs else None)]
    return _Runs(full, full_expected, session, fixed, sizes, input_layout, checks, ran)


def _input_mismatch(runs: _Runs) -> str | None:
    """Why onnxruntime refused the Keras model's inputs, where their sizes after the
    batch are not the file's (another model's file): None where they are."""
    specs = runtime.input_specs(runs.session)
    first = {name: array[:1] for name, array in runs.full.items()}
    try:
        runtime.match_inputs(
            specs, first, "The Keras model's input", input_layout=runs.input_layout
        )
    except UserInputError as error:
        return f"{error} Was the file exported from this model?"
    return None


def _compare_outputs(
    model: PreparedModel, runs: _Runs, atol: float, rtol: float, outright: float | None
) -> tuple[
    list[OutputComparison],
    tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]] | None,
    list[Doubtful],
]:
    """Every output at every checked batch size; the first failing batch's inputs; and
    (when ``outright`` is given) the outputs left for the float64 reference to judge."""
    full, full_expected = runs.full, runs.full_expected
    count = int(next(iter(full.values())).shape[0])
    per_sample = all(np.ndim(o) >= 1 and np.shape(o)[0] == count for o in full_expected)
    output_names = [o.name for o in runs.session.get_outputs()]
    comparisons: list[OutputComparison] = []
    failing_batch = None
    doubtful: list[Doubtful] = []
    for (samples, chunks), (batch_runs, error) in zip(runs.checks, runs.ran, strict=True):
        label = len(chunks[0])  # the batch size onnxruntime runs
        if samples == count:
            expected = full_expected
        elif per_sample:
            expected = [o[:samples] for o in full_expected]
        else:  # outputs not batch-major: Keras runs on exactly the batch ONNX runs
            expected = call_model(model, {n: a[chunks[0]] for n, a in full.items()})
        if error is not None:  # onnxruntime's Fail/InvalidArgument: e.g. a fixed batch
            message = _input_mismatch(runs) or (
                f"onnxruntime error: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
            )
            for name, b in zip(output_names, expected, strict=False):
                comparisons.append(failed_comparison(name, label, np.shape(b), message[:300]))
            continue
        if len(batch_runs[0][2]) != len(expected):
            raise UserInputError(
                f"the ONNX model has {len(batch_runs[0][2])} outputs, the Keras model "
                f"{len(expected)}; was the file exported from this model?"
            )
        # Chunks cover the samples in order (the last one padded by wrapping around).
        actual = [
            np.concatenate([outputs[i] for *_, outputs in batch_runs])[:samples]
            if len(batch_runs) > 1 or samples != label
            else batch_runs[0][2][i]
            for i in range(len(expected))
        ]
        note = ""
        if len(chunks) > 1 or samples != label:
            note = f"{samples} sample(s) in {len(chunks)} batch(es) of {label}"
        failed = False
        for index, (name, a, b) in enumerate(zip(output_names, actual, expected, strict=True)):
            comparison = compare_output(a, b, atol=atol, rtol=rtol, name=name, batch_size=label)
            comparison.note = comparison.note or note
            if (
                outright is not None
                and np.shape(a) == np.shape(b)
                and comparison.note != NOTHING_FINITE
            ):
                if not comparison.passed or comparison.relative_to_max > outright:
                    chunk = None if samples == count or per_sample else chunks[0]
                    doubtful.append(Doubtful(len(comparisons), index, a, b, samples, chunk))
            comparisons.append(comparison)
            failed = failed or not comparison.passed
        if failed and failing_batch is None:
            failing_batch = _first_failing_run(batch_runs, expected, label, atol, rtol)
    return comparisons, failing_batch, doubtful

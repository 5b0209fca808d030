"""``keras-bn fold``: fold BatchNormalization into its neighbours, save the Keras model."""

from __future__ import annotations

import argparse
from typing import Any

from keras_bn.converters.cli import steps
from keras_bn.converters.cli.args import ComparisonArgs, ModelLoadingArgs
from keras_bn.converters.cli.run import (
    EXIT_OK,
    Run,
    as_dict,
    check_output,
    file_size,
    validation_failed,
    writing,
)

SUMMARY = "write the folded Keras model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.keras")
    parser.add_argument("-o", "--output", metavar="OUT.keras", required=True)
    parser.add_argument(
        "--no-validate",
        action="store_true",
        help="skip comparing folded and original outputs (default: compare)",
    )
    ModelLoadingArgs().add_to(parser)
    ComparisonArgs(defaults="float32").add_to(parser)


def fold_command(args: argparse.Namespace, run: Run) -> int:
    """Fold BN into neighbouring layers and save the folded Keras model."""
    output = check_output(args, ".keras")
    samples = steps.requested_samples(args)  # a conflict is told before any work
    model = steps.preflight(steps.load_model(args, run), run)  # flattened once, passed on
    inputs = steps.load_inputs(args.inputs, model, "Inputs file")
    # Keras runs the original model on validation's inputs while the fold is built,
    # as in export: the one pass that checks Keras can run it and the reference.
    reference = steps.keras_reference(
        model,
        run,
        inputs,
        batch=1 if args.no_validate else samples,  # then only the check, on one sample
        label="Running the model in Keras (beside the fold)",
    )
    from keras_bn.converters.folding import fold_batch_norms

    with run.progress.step("Folding BatchNormalization", unit="layers") as step:
        try:
            # The plan export folds with, replayed once as a Keras model; measured
            # below against the reference, not by fold_batch_norms's own passes.
            folded, report = fold_batch_norms(
                model, measure=False, progress=step.update, copy=False
            )
        except Exception:
            reference.outputs()  # a model Keras cannot run: that is the error to report
            raise
    run.summary += [
        ["folded", str(report.folded_count)],
        ["not folded", str(report.not_folded_count)],
    ]
    steps.warn_unfolded(run, report, "stay in the folded model")
    passed, at = True, len(run.text)
    if args.no_validate:
        reference.outputs()  # still the check that Keras can run the model
        report.measured_on = "not measured (--no-validate)"
    else:
        passed = _compare_folded(model, folded, report, reference, args, run)
    # The fold report (measured by the comparison) comes before the comparison's line.
    run.report["fold"] = as_dict(report)
    run.text.insert(at, report.format(verbose=args.verbose))
    if not passed:
        return validation_failed(run, "the folded model's outputs differ from the original's")
    with run.progress.step(f"Writing {output}"), writing(output, replace=args.force) as tmp:
        folded.save(tmp)
    run.report["output"] = {"path": str(output), "bytes": output.stat().st_size}
    run.summary.append(["output", f"{output} ({file_size(output)})"])
    run.next = f"keras-bn export {output} -o {output.with_suffix('.onnx')}"
    return EXIT_OK


def _keyed_for(folded: Any, model: Any, inputs: dict) -> dict:
    """``inputs`` (by ``model``'s input names) keyed by ``folded``'s (both prepared): a
    model with nothing to fold comes back as a copy made by its class's constructor,
    whose inputs may have other generated names (``input_layer_1``), in the same order."""
    theirs, ours = model.input_names, folded.input_names
    if theirs == ours:
        return inputs
    return {new: inputs[old] for old, new in zip(theirs, ours, strict=True)}


def _count(inputs) -> int:
    return int(len(next(iter(inputs.values()))))


def _compare_folded(model, folded, report, reference, args: argparse.Namespace, run: Run) -> bool:
    """Compare the folded Keras model with the reference run of the original (prepared)
    on its inputs, with validation's verdict; the fold ``report`` records the largest
    difference."""
    from keras_bn.converters.comparison import (
        DEFAULT_ATOL,
        DEFAULT_RTOL,
        NOTHING_FINITE,
        OUTRIGHT,
        compare_output,
    )
    from keras_bn.converters.prepared import prepare
    from keras_bn.converters.reference import Doubtful, rejudge_against_float64
    from keras_bn.converters.samples import call_model, describe_generated_inputs

    explicit = args.atol is not None or args.rtol is not None
    atol = args.atol if args.atol is not None else DEFAULT_ATOL
    rtol = args.rtol if args.rtol is not None else DEFAULT_RTOL
    with run.progress.step("Comparing folded and original models"):
        inputs = reference.inputs
        folded = prepare(folded)  # flattened once: for its input names and its run
        try:  # one compiled pass on JAX, beside the reference's if it still runs
            received = call_model(folded, _keyed_for(folded, model, inputs))
        except Exception:
            reference.outputs()  # a model Keras cannot run: that is the error to report
            raise
        expected = reference.outputs()
        batch_size = _count(inputs)
        comparisons = [
            compare_output(b, a, atol=atol, rtol=rtol, name=f"output {i}", batch_size=batch_size)
            for i, (a, b) in enumerate(zip(expected, received, strict=True))
        ]
        # The same verdict as validation: doubtful outputs are judged against float64.
        doubtful = [
            Doubtful(i, i, received[i], expected[i], batch_size, None)
            for i, c in enumerate(comparisons)
            if not explicit
            and (not c.passed or c.relative_to_max > OUTRIGHT)
            and c.note != NOTHING_FINITE  # Keras has no finite value to judge by
        ]
        note = ""
        if doubtful:
            arrays = [inputs[name] for name in model.input_names]
            note = rejudge_against_float64(model.model, arrays, comparisons, doubtful)
    if reference.generated:
        described = describe_generated_inputs(model, batch_size)
    else:
        described = f"given, {batch_size} sample(s) from {args.inputs}"
    report.max_abs_diff = max(c.max_abs_error for c in comparisons)
    report.measured_on = f"the comparison's {batch_size} sample(s)"
    passed = all(c.passed for c in comparisons)
    outputs: list[Any] = [as_dict(c) for c in comparisons]
    run.report["validation"] = {
        "passed": passed,
        "atol": atol,
        "rtol": rtol,
        "inputs": described,
        "outputs": outputs,
    }
    if note:
        run.report["validation"]["exact_note"] = note
        run.text.append(note)
    verdict = _verdict(comparisons, passed, atol, rtol)
    run.text.append(f"Folded vs original Keras model: {verdict}\n  inputs: {described}")
    run.summary.append(["validation", "passed" if passed else "FAILED"])
    return passed


def _verdict(comparisons: list, passed: bool, atol: float, rtol: float) -> str:
    """The fold comparison's verdict line: the float64 rule's numbers where it decided,
    why nothing could be compared, or the tolerances."""
    from keras_bn.converters.comparison import NOTHING_FINITE

    worst_abs = max(c.max_abs_error for c in comparisons)
    worst_rel = max(c.max_rel_error for c in comparisons)
    by_float64 = [c for c in comparisons if c.verdict == "float64 reference"]
    result = "passed" if passed else "FAILED"
    if by_float64:  # the float64 rule decided: name it, not a tolerance it did not meet
        worst = max(by_float64, key=lambda c: c.exact_error or 0.0)
        verdict = (f"{result}: within {worst.noise} of a float64 run" if passed else result) + (
            f" (error {worst.exact_error:.3g} vs {worst.yardstick}'s own "
            f"{worst.keras_exact_error:.3g}, relative to max; max abs error {worst_abs:.3g})"
        )
    elif any(c.note == NOTHING_FINITE for c in comparisons):
        verdict = f"{result}: {NOTHING_FINITE}"
    else:
        verdict = (
            f"max abs error {worst_abs:.3g}, max rel error {worst_rel:.3g} "
            f"(atol {atol:g}, rtol {rtol:g}): {result}"
        )
    return verdict

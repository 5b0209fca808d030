"""``keras-bn export``: fold, export to ONNX, convert precision, validate, write.

The steps, in order: check the options and output paths (before any work), load
the model, export it (folding on the way unless ``--no-fold``) into a work
directory beside the output, convert to float16/int8, describe the file that
will be written, validate it against the Keras model, move it into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keras_bn.converters.cli import args as args_lib
from keras_bn.converters.cli import steps
from keras_bn.converters.cli.args import (
    ComparisonArgs,
    DataArgs,
    InputLayoutArgs,
    Int8Args,
    ModelLoadingArgs,
    positive_int,
)
from keras_bn.converters.cli.run import (
    EXIT_OK,
    Run,
    as_dict,
    check_not_an_input,
    check_output,
    file_size,
    replace_files,
    validation_failed,
    work_directory,
)
from keras_bn.converters.cli.statistics import StatisticsStep
from keras_bn.converters.errors import UserInputError
from keras_bn.converters.files import check_output_path
from keras_bn.converters.options import CALIBRATION_METHODS, PRECISIONS

SUMMARY = "fold, export to ONNX, convert precision, validate, write"

# The exporter's warning about BatchNormalization left as Mul+Add after a layer it
# could fold into; the CLI words it for the command that was run (see _warn_about).
_UNFOLDED_MUL_ADD = "exported as Mul+Add"


def _add_int8_arguments(parser: argparse.ArgumentParser) -> None:
    """int8's scheme options (issue 23)."""
    Int8Args().add_to(parser)
    parser.add_argument(
        "--no-layer-report",
        action="store_true",
        help="int8: skip the per-layer comparison with the float model (one more run of "
        "each on up to 8 calibration samples) (default: report the worst layers)",
    )
    parser.add_argument(
        "--calibration-method",
        choices=list(CALIBRATION_METHODS),
        default=None,
        help="int8 activation ranges: onnxruntime's calibration method (default: Percentile, "
        "99.99%% of |x|; the model's outputs keep their whole range)",
    )
    parser.add_argument(
        "--bias-correction",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="int8: correct each layer's mean output shift on the calibration data (default: on)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.keras")
    parser.add_argument("-o", "--output", metavar="OUT.onnx", required=True)
    InputLayoutArgs(
        "channels_last",
        "layout of the ONNX model's inputs of rank >= 3: channels_last keeps the Keras "
        "shapes, channels_first moves the channel axis to 1 (NHWC -> NCHW); "
        "NAME=LAYOUT sets one input's, repeatable (image=channels_first) "
        "(default: channels_last)",
    ).add_to(parser)
    parser.add_argument("--opset", type=positive_int, help="ONNX opset (default: 17)")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        help="fixed batch size of the ONNX model (default: dynamic)",
    )
    parser.add_argument(
        "--input-shape",
        type=args_lib.input_shape,
        action="append",
        default=[],
        metavar="NAME=DIMS",
        help="fixed sizes after the batch for an input of unknown sizes, repeatable "
        "(token_ids=16; ? leaves a size unknown) (default: unknown sizes stay dynamic)",
    )
    parser.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="float32",
        help="; ".join(f"{p.name}: {p.description}" for p in PRECISIONS.values())
        + " (default: float32)",
    )
    parser.add_argument(
        "--calibration",
        metavar="FILE.npz",
        help="int8 calibration inputs (representative data, Keras layout, batch first) "
        "(default: none; required with --precision int8)",
    )
    _add_int8_arguments(parser)
    parser.add_argument(
        "--keep-io-types",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="float16: keep float32 model inputs and outputs (default: keep)",
    )
    parser.add_argument(
        "--no-fold", action="store_true", help="export without folding BN (default: fold)"
    )
    parser.add_argument(
        "--no-validate",
        action="store_true",
        help="skip validation against the Keras model (default: validate)",
    )
    parser.add_argument(
        "--external-data",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store the weights in OUT.onnx.data beside the model (those over 1 KiB; "
        "default: only when they exceed 2 GB, the protobuf limit)",
    )
    parser.add_argument(
        "--fallback",
        action="store_true",
        help="export unsupported layers through Keras's own model.export(format='onnx') "
        "(default: an unsupported layer is an error)",
    )
    DataArgs(required=False, purpose="check the BN moving statistics against").add_to(parser)
    parser.add_argument(
        "--no-statistics-check",
        action="store_true",
        help="skip comparing the BN moving statistics with --data/--inputs/--calibration "
        "(a compiled pass over the data, a second over its first 16 samples) (default: checked "
        "whenever data is given)",
    )
    ModelLoadingArgs().add_to(parser)
    ComparisonArgs(defaults="precision").add_to(parser)


def export_command(args: argparse.Namespace, run: Run) -> int:
    """Fold, export to ONNX, convert precision, validate against the Keras model, write."""
    output = _check_options(args)
    input_shapes = dict(args.input_shape)
    model = steps.load_model(args, run)
    if input_shapes:  # export, samples and validation all see the fixed sizes
        from keras_bn.converters.samples import with_input_shapes

        model = with_input_shapes(model, input_shapes)
    model = steps.preflight(model, run)  # flattened once, passed on
    inputs = steps.load_inputs(args.inputs, model, "Inputs file")
    calibration = steps.load_inputs(args.calibration, model, "Calibration file")
    statistics = StatisticsStep(  # before any other Keras pass: it swaps statistics
        model,
        run,
        args.data or args.inputs or args.calibration,
        what="the ONNX model will be faithful to them",
        skip=args.no_statistics_check,
    )
    given = (model, run, args, inputs, calibration)
    gate = threading.Event()  # set once the export has read the weights
    reference = _start_keras(statistics, given, gate)
    # Work beside the target, each file under the output's own name: an ONNX model
    # refers to its external data file (``<name>.onnx.data``) by file name, so the
    # files keep their names and are moved, not renamed, into place.
    try:
        with work_directory(output) as work:
            try:
                result = _export(model, work / output.name, args, run)
            except Exception:
                gate.set()  # the check must not wait for it
                if reference is None:
                    reference = _reference(statistics.start(), *given)
                reference.outputs()  # a model Keras cannot run: that is the error to report
                raise
            fold = (model, getattr(result, "fold_report", None))
            bn_statistics = _equalization_statistics(args, fold)  # before the check swaps them
            gate.set()  # the weights are read: the check may swap statistics
            float_outputs = (
                reference.outputs if reference is not None else _checked_outputs(statistics)
            )
            final, precision_report = _convert_precision(
                work / output.name,
                work,
                args,
                run,
                inputs=inputs,
                calibration=calibration,
                bn_statistics=bn_statistics,
                float_outputs=float_outputs,
            )
            if reference is None:  # the check is done: its pass, else Keras's own
                reference = _reference(statistics, *given)
            _describe_export(result, final, output, run, model.graph)
            _describe_precision(precision_report, output, args, run)
            if args.no_validate:
                reference.outputs()  # still the check that Keras can run the model
            elif not _validate(
                model,
                final,
                output,
                args,
                run,
                reference,
                _inputs_note(args, inputs, calibration),
                precision_report,
                inputs is None,  # int8 on the calibration data: its run is validation's
            ):
                return validation_failed(
                    run, f"the {args.precision} ONNX model's outputs differ from the Keras model's"
                )
            native = final == Path(result.path) and not getattr(result, "used_fallback", True)
            known = ([result.external_data] if result.external_data else []) if native else None
            with run.progress.step(f"Writing {output}"):
                data_files = _move_onnx_into_place(final, output, args, known)
    finally:
        gate.set()  # whatever happened: the check never waits for the export in vain
    _describe_output(output, data_files, run, asked=bool(args.external_data))
    run.next = f"keras-bn bench {output}"
    return EXIT_OK


# --------------------------------------------------------------------------------------
# Before any work.


def _check_options(args: argparse.Namespace) -> Path:
    """Option conflicts, input files and output paths; the checked output path."""
    from keras_bn.converters.model_io import check_input_file

    output = check_output(args, ".onnx")
    if args.external_data:
        if args.precision != "float32":
            raise UserInputError(
                f"--external-data works with --precision float32 only (received --precision "
                f"{args.precision}, whose conversion stores the weights inside the model); "
                "drop one of them."
            )
        _check_data_output(output.with_name(f"{output.name}.data"), args)
    if args.precision == "int8" and args.calibration is None:
        raise UserInputError(
            "--precision int8 needs calibration data: pass --calibration FILE.npz with a few "
            "hundred representative inputs (np.savez(path, input_name=array))."
        )
    if args.calibration is not None and args.precision != "int8":
        raise UserInputError(
            f"--calibration is only used with --precision int8 (received --precision "
            f"{args.precision}); drop it or pass --precision int8."
        )
    if (
        args.per_tensor
        or args.signed_int8
        or (args.equalize, args.tune_biases, args.round_weights) != (None, None, None)
    ) and (args.precision != "int8"):
        raise UserInputError(
            "--per-tensor, --equalize, --round-weights, --tune-biases and --signed-int8 are "
            "only used with "
            f"--precision int8 "
            f"(received --precision {args.precision}); drop them or pass --precision int8."
        )
    if args.precision != "int8" and (args.bias_correction, args.calibration_method) != (None,) * 2:
        raise UserInputError(
            "--calibration-method and --bias-correction apply to --precision int8 only "
            f"(received --precision {args.precision}); drop them or pass --precision int8."
        )
    for given, what in ((args.inputs, "Inputs file"), (args.calibration, "Calibration file")):
        if given is not None:
            check_input_file(given, what, (".npz",))
    compared_on = None
    if args.precision == "int8":
        compared_on = "int8 validation compares on the calibration data"
    elif args.batch_size is not None and args.samples not in (None, args.batch_size):
        compared_on = f"--batch-size {args.batch_size} fixes the batch validation runs"
    steps.requested_samples(args, compared_on)
    return output


def _check_data_output(path: Path, args: argparse.Namespace) -> None:
    check_not_an_input(path, args)
    if path.exists() and not args.force:
        raise UserInputError(
            f"External data file {str(path)!r} already exists; pass --force to replace it."
        )
    check_output_path(path, force=True)  # a directory, or an unwritable one


def _reference(
    statistics: StatisticsStep,
    model: Any,
    run: Run,
    args: argparse.Namespace,
    inputs: dict[str, Any] | None,
    calibration: dict[str, Any] | None,
) -> Any:
    """Keras's reference run: the statistics check's (waited for), else one started
    in the background on validation's inputs."""
    reference = _reference_from_check(statistics.result(), args, inputs, calibration)
    if reference is None:  # Keras runs the model on validation's inputs while exporting
        reference = steps.keras_reference(
            model,
            run,
            inputs if inputs is not None else calibration,
            # --no-validate: only the check that Keras runs the model, on one sample
            batch=1 if args.no_validate else args.samples,
            label="Running the model in Keras (beside the export)",
        )
    return reference


def _start_keras(statistics: StatisticsStep, given: tuple, gate: threading.Event) -> Any:
    """Start Keras's work beside the export: Keras's reference run, or None for int8
    with the check. That check runs beside the calibration (its pass is the reference:
    no other Keras pass to wait for); its first pass only reads the layers and starts
    now, and it writes population statistics once ``gate`` is set (the export has read
    the weights)."""
    _, _, args, *_ = given
    if args.precision == "int8" and statistics.runs and args.data is None:
        statistics.start(background=True, gate=gate)
        return None
    return _reference(statistics.start(), *given)


def _checked_outputs(statistics: StatisticsStep) -> Callable[[], Any]:
    """int8's float side on the calibration data, from the background statistics check
    (the check's data without --data or --inputs): a callable that waits for the
    check's outputs, or gives None (then quantize_int8 runs the float file)."""

    def outputs() -> Any:
        check = statistics.checked()
        return None if check is None else check.moving_outputs

    return outputs


def _reference_from_check(
    check: Any,
    args: argparse.Namespace,
    inputs: dict[str, Any] | None,
    calibration: dict[str, Any] | None,
) -> Any:
    """Keras's reference run taken from the statistics check's first pass, when the
    check ran on the very samples validation compares on (``--inputs``, else
    ``--calibration``, and no other ``--data``); else None."""
    given = inputs if inputs is not None else calibration
    if check is None or check.moving_outputs is None or args.data is not None or given is None:
        return None
    outputs = check.moving_outputs
    if any(len(output) != len(next(iter(given.values()))) for output in outputs):
        return None
    from keras_bn.converters.reference import KerasReference

    return KerasReference(given, outputs)


# --------------------------------------------------------------------------------------
# Exporting and converting.


def _export(model, path: Path, args: argparse.Namespace, run: Run):
    """``export_onnx`` into ``path``; its warnings and fold report go to ``run``."""
    from keras_bn.converters.onnx.export import export_onnx

    step = "Exporting to ONNX" if args.no_fold else "Folding BatchNormalization, exporting"
    with run.progress.step(step), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Folding while exporting: the same weights as fold_batch_norms without
        # building the folded Keras model; validation compares the file with the
        # original model.
        result = export_onnx(
            model,
            path,
            fold=not args.no_fold,
            opset=args.opset,
            input_layout=args.input_layout,
            batch_size=args.batch_size,
            fallback=args.fallback,
            external_data=args.external_data,
        )
    # What was exported, per input (Keras's exporter, falling back, keeps Keras's):
    # what precision conversion and validation feed.
    from keras_bn.converters.onnx.layout import decode_input_layout

    recorded = getattr(result, "input_layout", None)
    args.input_layout = decode_input_layout(recorded) or args.input_layout
    fold_report = getattr(result, "fold_report", None)
    if fold_report is not None:
        run.report["fold"] = as_dict(fold_report)
        run.text.append(fold_report.format(verbose=args.verbose))
        run.summary += [
            ["folded", str(fold_report.folded_count)],
            ["not folded", str(fold_report.not_folded_count)],
        ]
    _warn_about(caught, fold_report, args, run)
    return result


def _warn_about(caught: list, fold_report, args: argparse.Namespace, run: Run) -> None:
    """The exporter's warnings, once each; an unfolded BN with advice for this command.

    Only the exporter's own ``ExportWarning``s reach the user: notices that
    Keras, NumPy or tf2onnx raise from inside (deprecations, NumPy 2 changes) are
    not about the user's model.
    """
    from keras_bn.converters.onnx.export import ExportWarning

    ours = [w for w in caught if issubclass(w.category, ExportWarning)]
    for message in dict.fromkeys(str(w.message) for w in ours):
        if _UNFOLDED_MUL_ADD in message:
            if args.no_fold:  # the exporter's advice names the Python API
                run.warn(
                    message.partition("; fold_batch_norms")[0] + "; drop --no-fold to fold them"
                )
            continue  # with folding, warn_unfolded below names each BN that stays
        run.warn(message)
    if fold_report is not None:
        steps.warn_unfolded(run, fold_report, "are exported as separate operators")
    if args.no_fold and args.precision == "int8":
        run.warn(
            "--no-fold with --precision int8: BatchNormalization stays a separate float "
            "operator and its input gets its own quantization step; fold first for better "
            "int8 accuracy."
        )


def _equalization(args: argparse.Namespace) -> bool | None:
    """``quantize_int8``'s ``equalize``: ``--equalize``/``--no-equalize`` as given, every
    pair with ``--per-tensor``, else None (its default: with per-channel weights, the
    pairs into depthwise layers)."""
    if args.equalize is not None:
        return args.equalize
    return True if args.per_tensor else None


def _equalization_statistics(args: argparse.Namespace, fold: tuple[Any, Any]) -> Any:
    """The folded BN statistics equalization reads (int8 with equalization), else None."""
    if args.precision != "int8" or _equalization(args) is not True or fold[1] is None:
        return None
    from keras_bn.converters.equalization import batch_norm_statistics

    return batch_norm_statistics(*fold)


def _int8_label(details: dict[str, Any]) -> str:
    """The finished int8 step's name in the step table: the stages that ran."""
    stages = ["calibrated"]
    if (details.get("weight_rounding") or {}).get("rounded"):
        stages.append("rounding weights")
    if "bias_tuning" in details:
        stages.append("tuning biases")
    return f"Quantizing to int8 ({', '.join(stages)})"


def _stage_progress(step: Any, stage: str, unit: str) -> Callable[[int, int], None]:
    """The int8 step's progress during one of its stages after calibration (tuning
    biases: layers; rounding weights: float runs, then layers)."""

    def update(done: int, total: int) -> None:
        step.label, step.unit = f"Quantizing to int8 (calibrated, {stage})", unit
        step.update(done, total)

    return update


def _convert_precision(
    exported: Path,
    work: Path,
    args: argparse.Namespace,
    run: Run,
    *,
    inputs: dict[str, Any] | None,
    calibration: dict[str, Any] | None,
    bn_statistics: Any = None,
    float_outputs: Callable[[], Any] | None = None,
) -> tuple[Path, Any]:
    """The float16/int8 conversion of ``exported`` (its path and report), else itself.

    ``bn_statistics``: the folded BN statistics equalization reads. int8 is compared
    with the float model on the calibration data; when Keras's reference run is on
    those samples (no ``--inputs``), ``float_outputs()`` gives its outputs (waiting
    for them), rather than a second float run in onnxruntime."""
    if args.precision == "float32":
        return exported, None
    final = work / args.precision / exported.name
    final.parent.mkdir()
    if args.precision == "float16":
        from keras_bn.converters.precision import convert_float16

        sample = None if inputs is None else steps.to_onnx_layout(inputs, args.input_layout)
        with run.progress.step("Converting to float16"):
            report = convert_float16(
                exported, final, keep_io_types=args.keep_io_types, sample_inputs=sample
            )
        _warn_clamped(report, run)
        return final, report
    from keras_bn.converters.precision import quantize_int8

    assert calibration is not None  # _check_options requires it for int8
    with run.progress.step("Quantizing to int8 (calibrating)", unit="batches") as step:
        report = quantize_int8(
            exported,
            final,
            steps.to_onnx_layout(calibration, args.input_layout),
            per_channel=not args.per_tensor,
            signed=args.signed_int8,
            tune_biases=args.per_tensor if args.tune_biases is None else args.tune_biases,
            round_weights=args.round_weights,  # None: depthwise layers per-channel, all per-tensor
            tuning_progress=_stage_progress(step, "tuning biases", "layers"),
            rounding_progress=_stage_progress(step, "rounding weights", "steps"),
            equalize=_equalization(args),
            batch_norm_statistics=bn_statistics,
            layer_report=not args.no_layer_report,
            float_outputs=None if inputs is not None else float_outputs,
            progress=step.update,
            **{  # unset: quantize_int8's defaults
                name: value
                for name, value in (
                    ("calibration_method", args.calibration_method),
                    ("bias_correction", args.bias_correction),
                )
                if value is not None
            },
        )
        step.label = _int8_label(report.details)
    worst = report.divergence.worst(1) if report.divergence is not None else []
    if worst:
        run.summary.append(
            ["worst int8 layer", f"{worst[0].layer} ({worst[0].local_sqnr_db:.1f} dB alone)"]
        )
    return final, report


def _warn_clamped(report, run: Run) -> None:
    """A warning for the weights float16 changed in ways that can matter: values
    clamped at its limits, not a masking constant (the report lists those, and the
    nonzero values under 2**-24 raised to it, each off by less than 6e-8)."""
    clamped = [issue for issue in report.range_issues if issue.overflow and not issue.masking]
    if clamped:
        run.warn(
            f"{sum(issue.overflow for issue in clamped)} weight value(s) above the float16 "
            "range were clamped to its limit: "
            + "; ".join(str(issue) for issue in clamped[:3])
            + ("; ..." if len(clamped) > 3 else "")
        )


# --------------------------------------------------------------------------------------
# Describing, validating, writing.


def _input_labels(flat, layout: str) -> str:
    """The inputs line: each layout named only for image-like inputs (float, rank >= 3),
    the ones ``--input-layout`` applies to; token ids and tabular inputs get none."""
    import numpy as np

    from keras_bn.converters.onnx.layout import decode_input_layout, layout_of

    layouts = decode_input_layout(layout) or layout
    labels = []
    for name, tensor in zip(flat.input_names, flat.inputs, strict=True):
        image_like = len(tensor.shape) >= 3 and np.dtype(tensor.dtype).kind == "f"
        labels.append(f"{name} ({layout_of(layouts, name)})" if image_like else name)
    return ", ".join(labels)


def _describe_export(result, final: Path, output: Path, run: Run, flat) -> None:
    """The "Exported ..." block and report, with the node counts of the file written."""
    if dataclasses.is_dataclass(result) and hasattr(result, "path"):
        changes: dict[str, Any] = {"path": str(output)}  # not the temporary path
        if hasattr(result, "node_count") and final != Path(result.path):
            # float16/int8 files differ from the float graph
            import collections

            import onnx

            nodes = onnx.load(str(final), load_external_data=False).graph.node
            changes["op_counts"] = dict(collections.Counter(node.op_type for node in nodes))
            changes["node_count"] = len(nodes)
        result = dataclasses.replace(result, **changes)  # type: ignore[type-var]
    exported = as_dict(result)
    run.report["export"] = {key: value for key, value in exported.items() if key != "fold_report"}
    if hasattr(result, "warnings"):  # already on stderr, once
        result = dataclasses.replace(result, warnings=[])
    text = str(result)
    layout = getattr(result, "input_layout", None)
    if layout is not None:
        names = ", ".join(getattr(result, "input_names", []))
        text = text.replace(
            f"inputs: {names} ({layout});", f"inputs: {_input_labels(flat, layout)};"
        )
    run.text.append(text)
    if "node_count" in exported:
        run.summary.append(["ONNX nodes", str(exported["node_count"])])


def _describe_precision(report, output: Path, args: argparse.Namespace, run: Run) -> None:
    if report is None:
        return
    report.path = str(output)  # not the temporary path
    run.report["precision"] = report.to_dict()
    run.text.append(str(report))
    comparison = report.comparison
    if comparison is not None:
        sqnr = "" if comparison.sqnr_db is None else f", SQNR {comparison.sqnr_db:.1f} dB"
        run.summary.append(
            [f"{args.precision} vs float32", f"max |diff| {comparison.max_abs_diff:.3g}{sqnr}"]
        )
        if comparison.top1_agreement is not None:
            run.summary.append(["top-1 agreement", f"{comparison.top1_agreement:.1%}"])


def _inputs_note(
    args: argparse.Namespace, inputs: dict[str, Any] | None, calibration: dict[str, Any] | None
) -> str | None:
    """What validation runs on when the user gave it data (None: generated)."""
    if inputs is not None:
        return f"given, {len(next(iter(inputs.values())))} sample(s) from {args.inputs}"
    if calibration is not None:
        count = len(next(iter(calibration.values())))
        return (
            f"the calibration data, {count} sample(s) from {args.calibration}: int8 is "
            "judged on the samples "
            "it was calibrated on (in-sample); pass --inputs FILE.npz with other samples "
            "for a held-out check"
        )
    return None


def _validate(
    model,
    final: Path,
    output: Path,
    args: argparse.Namespace,
    run: Run,
    reference,
    inputs_note: str | None,
    precision_report: Any = None,
    on_calibration: bool = False,
) -> bool:
    """Validation of ``final``: the int8 report's run of the file (``on_calibration``:
    on the calibration data, validation's samples) and its class-score outputs, reused."""
    return steps.validate_onnx(
        model,
        final,
        run,
        input_layout=args.input_layout,
        inputs=None,
        atol=args.atol,
        rtol=args.rtol,
        precision=args.precision,
        shown_path=output,
        reference=reference,
        exported_here=True,
        inputs_note=inputs_note,
        onnx_outputs=getattr(precision_report, "outputs", None) if on_calibration else None,
        class_scores=getattr(precision_report, "class_scores", None),
        signed_int8=args.signed_int8 if args.precision == "int8" else None,
    )


def _external_data_locations(onnx_path: Path) -> list[str]:
    """The file names an ONNX model's initializers are stored in, relative to the model."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(onnx_path), load_external_data=False)
    locations = [
        ExternalDataInfo(tensor).location
        for tensor in model.graph.initializer
        if uses_external_data(tensor)
    ]
    return list(dict.fromkeys(locations))


def _move_onnx_into_place(
    final: Path, output: Path, args: argparse.Namespace, locations: list[str] | None = None
) -> list[Path]:
    """Move the finished model and its external data files (if any) onto the targets.

    ``locations``: the data files' names when known (keras-bn's own float export
    says where it put the weights), else read from the file.

    ``final`` lies in a work directory beside ``output`` and has its file name, so
    the data files it refers to (``<output name>.data``) keep their names: each is
    moved first, then the model, with ``os.replace`` (atomic per file).
    """
    moves = []
    if locations is None:
        locations = _external_data_locations(final)
    replaced = _replaced_data_files(output, args)
    for location in locations:
        if Path(location).name != location:  # not written by keras-bn
            raise RuntimeError(f"external data location {location!r} is not a file name")
        target = output.with_name(location)
        _check_data_output(target, args)
        moves.append((final.with_name(location), target))
    replace_files([*moves, (final, output)], shown=output, replace=args.force)
    for stale in replaced - {target for _, target in moves}:
        stale.unlink(missing_ok=True)  # the replaced file's weights: no file refers to them
    return [target for _, target in moves]


def _replaced_data_files(output: Path, args: argparse.Namespace) -> set[Path]:
    """The external data file of the model ``output`` replaces (--force): written
    beside it under its name (``<output>.data``), it would outlive it (an export with
    --external-data, then one without). Inputs and unreadable files are left alone.
    The model is read only where that file exists: reading a replaced ResNet50 file
    took 0.26 s of each ``export --force``."""
    data = output.with_name(f"{output.name}.data")
    if not output.is_file() or not data.is_file():
        return set()
    try:
        locations = _external_data_locations(output)
    except Exception:  # noqa: BLE001 - not a readable ONNX file: nothing of it to remove
        return set()
    if data.name not in locations:
        return set()
    try:
        check_not_an_input(data, args)
    except UserInputError:
        return set()
    return {data}


def _describe_output(output: Path, data_files: list[Path], run: Run, asked: bool = False) -> None:
    run.report["output"] = {
        "path": str(output),
        "bytes": output.stat().st_size,
        "external_data": [{"path": str(path), "bytes": path.stat().st_size} for path in data_files],
    }
    run.summary.append(["output", f"{output} ({file_size(output)})"])
    for path in data_files:
        run.summary.append(["external data", f"{path} ({file_size(path)})"])
    if asked and not data_files:  # --external-data
        run.summary.append(["external data", "none: every weight is 1 KiB or less (inline)"])

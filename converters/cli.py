"""The ``keras-bn`` command line: inspect, fold, export, validate, bench.

Each subcommand is one function taking the parsed arguments and a :class:`Run`
(report, human-readable text, progress) and returning the exit status:

* 0: success;
* 1: validation failed (the exported or folded model's outputs differ from the
  original Keras model's beyond ``--atol``/``--rtol``; nothing is written);
* 2: bad input or usage: one line on stderr naming the problem, no traceback,
  no output file left behind.

Only :class:`UserInputError` becomes a one-line message; any other exception is a
bug in keras-bn and keeps its traceback. Heavy packages (keras, tensorflow, onnx,
onnxruntime) are imported inside the subcommands, so ``keras-bn --help`` is instant.
Outputs are checked before any work and written atomically; inputs are only read.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from keras_bn.converters.errors import UserInputError
from keras_bn.converters.files import atomic_output, check_output_path
from keras_bn.converters.options import INPUT_LAYOUTS, PRECISIONS
from keras_bn.converters.progress import Progress, format_table

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_VALIDATION_FAILED", "EXIT_BAD_INPUT"]

EXIT_OK = 0
EXIT_VALIDATION_FAILED = 1
EXIT_BAD_INPUT = 2

EPILOG = """\
examples:
  keras-bn inspect model.keras
  keras-bn fold model.keras -o folded.keras
  keras-bn export model.keras -o model.onnx
  keras-bn export model.keras -o model.onnx --input-layout channels_first --batch-size 1
  keras-bn export model.keras -o model_fp16.onnx --precision float16
  keras-bn export model.keras -o model_int8.onnx --precision int8 --calibration calib.npz
  keras-bn validate model.keras model.onnx --inputs samples.npz --atol 1e-5
  keras-bn bench model.onnx model_int8.onnx --batch-size 8
  keras-bn export model.keras -o model.onnx --json --report export.json

exit status: 0 success, 1 validation failed, 2 bad input or usage.
.npz inputs hold one array per model input, keyed by input name (any name for a
single-input model), batch first, in the Keras model's layout (bench: the ONNX
model's layout). Set KERAS_BN_TRACEBACK=1 to see the traceback behind a
model-loading error.
"""


# --------------------------------------------------------------------------------------
# Run state and output.


@dataclasses.dataclass
class Run:
    """What a subcommand produces besides its exit status."""

    command: str
    progress: Progress
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    text: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    summary: list[list[str]] = dataclasses.field(default_factory=list)  # [label, value]

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"keras-bn {self.command}: warning: {message}", file=sys.stderr)


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def _to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=_json_default, allow_nan=True)


def _as_dict(obj: Any) -> Any:
    """A report object from another module as plain data (to_dict, dataclass, dict)."""
    if obj is None or isinstance(obj, dict):
        return obj
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return str(obj)


# --------------------------------------------------------------------------------------
# Shared steps.


def _check_output(args: argparse.Namespace, suffix: str) -> Path:
    """Validate ``-o/--output`` before any work: suffix, not the input, writable."""
    output = Path(args.output)
    if output.suffix.lower() != suffix:
        raise UserInputError(
            f"Output file {str(output)!r} has suffix {output.suffix!r}; expected a {suffix} "
            f"file name, e.g. -o {output.with_suffix(suffix).name}."
        )
    _check_not_an_input(output, args)
    return check_output_path(output, args.force)


def _check_not_an_input(output: Path, args: argparse.Namespace) -> None:
    inputs = [getattr(args, name, None) for name in ("model", "inputs", "calibration")]
    inputs += list(getattr(args, "onnx", None) or [])
    for given in inputs:
        if given and output.exists() and Path(given).exists():
            if os.path.samefile(output, given):
                raise UserInputError(
                    f"Output file {str(output)!r} is also an input; inputs are never "
                    "overwritten: choose another output name."
                )


def _check_report_path(args: argparse.Namespace) -> None:
    if args.report:
        report = Path(args.report)
        _check_not_an_input(report, args)
        output = getattr(args, "output", None)
        if output is not None and report.resolve() == Path(output).resolve():
            raise UserInputError(
                f"--report {str(report)!r} is the same file as --output; give another name."
            )
        check_output_path(report, args.force)


def _load(args: argparse.Namespace, run: Run):
    from keras_bn.converters.model_io import check_model_file, load_model

    check_model_file(args.model)  # fails fast on a bad file, before importing Keras
    with run.progress.step("Importing Keras"):
        import keras  # noqa: F401
    with run.progress.step("Loading model"):
        model = load_model(args.model, unsafe=args.unsafe, custom_objects=args.custom_objects)
    run.report["model"] = {"path": str(args.model), "name": model.name}
    return model


def _preflight(model, run: Run, *, check_statistics: bool = True):
    """Check the model can be converted at all: a layer graph and sane BN statistics."""
    from keras_bn.converters import graph
    from keras_bn.converters.folding import check_batch_norm_statistics

    try:
        flat = graph.flatten(model)
    except ValueError as error:  # subclassed model, unbuilt Sequential
        raise UserInputError(" ".join(str(error).split())) from None
    if check_statistics:
        with run.progress.step("Checking BatchNormalization statistics"):
            check_batch_norm_statistics(model)
    return flat


def _load_inputs(path: str | None, model, what: str) -> dict[str, Any] | None:
    if path is None:
        return None
    from keras_bn.converters.model_io import load_inputs, model_input_specs

    return load_inputs(path, model_input_specs(model), what=what)


def _keras_feed(model, inputs: dict[str, Any]) -> Any:
    """Inputs keyed by name -> what ``model(...)`` takes (array or list in input order)."""
    from keras_bn.converters.model_io import model_input_specs

    arrays = [inputs[name] for name, _ in model_input_specs(model)]
    return arrays[0] if len(arrays) == 1 else arrays


def _to_onnx_layout(inputs: dict[str, Any], layout: str) -> dict[str, Any]:
    """Keras-layout arrays -> the exported ONNX model's layout."""
    if layout == "channels_last":
        return dict(inputs)
    import numpy as np

    return {
        name: np.moveaxis(array, -1, 1) if array.ndim >= 3 else array
        for name, array in inputs.items()
    }


def _validate(
    model,
    onnx_path: Path,
    args: argparse.Namespace,
    run: Run,
    *,
    inputs: dict[str, Any] | None,
    atol: float | None,
    rtol: float | None,
    shown_path: Path | None = None,
) -> bool:
    from keras_bn.converters.validation import validate_onnx

    kwargs: dict[str, Any] = {"input_layout": args.input_layout}
    if inputs is not None:
        kwargs["inputs"] = inputs
    if atol is not None:
        kwargs["atol"] = atol
    if rtol is not None:
        kwargs["rtol"] = rtol
    with run.progress.step("Validating against the Keras model in onnxruntime"):
        report = validate_onnx(model, onnx_path, **kwargs)
        passed = bool(report)
    if shown_path is not None and dataclasses.is_dataclass(report) and hasattr(report, "path"):
        report = dataclasses.replace(report, path=str(shown_path))  # not the temporary path
    run.report["validation"] = _as_dict(report)
    run.text.append(str(report))
    run.summary.append(["validation", "passed" if passed else "FAILED"])
    return passed


def _onnx_facts(onnx_path: Path) -> tuple[str, str | None]:
    """The precision an ONNX model was converted to, and the input layout it records."""
    import onnx

    from keras_bn.converters.onnx.metadata import METADATA_INPUT_LAYOUT

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as error:  # protobuf DecodeError and friends: a bad file
        raise UserInputError(
            f"ONNX model {str(onnx_path)!r} cannot be parsed ({type(error).__name__}); "
            "expected an .onnx file written by keras-bn export."
        ) from None
    precision = "float32"
    if any(node.op_type in ("QuantizeLinear", "QLinearConv") for node in model.graph.node):
        precision = "int8"
    elif any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer):
        precision = "float16"
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    layout = metadata.get(METADATA_INPUT_LAYOUT)
    return precision, layout if layout in INPUT_LAYOUTS else None


def _validation_failed(run: Run, what: str) -> int:
    print(
        f"keras-bn {run.command}: validation failed: {what}; nothing was written. Loosen "
        "--atol/--rtol, or pass --no-validate to write the output anyway.",
        file=sys.stderr,
    )
    run.report["status"] = "validation_failed"
    return EXIT_VALIDATION_FAILED


@contextlib.contextmanager
def _writing(path: str | os.PathLike) -> Iterator[Path]:
    """``atomic_output`` with file-system errors (disk full, permissions) as one line."""
    try:
        with atomic_output(path) as tmp:
            yield tmp
    except OSError as error:
        raise UserInputError(
            f"Cannot write {str(path)!r}: {error.strerror or error}; check the disk space "
            "and permissions of its directory."
        ) from None


@contextlib.contextmanager
def _work_directory(output: Path) -> Iterator[Path]:
    """A hidden temporary directory beside ``output`` (same file system), removed after."""
    parent = output.parent if str(output.parent) else Path(".")
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=parent))
    except OSError as error:
        raise UserInputError(
            f"Cannot write in {str(parent)!r}: {error.strerror or error}; check the disk "
            "space and permissions of the output directory."
        ) from None
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


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


def _check_data_output(path: Path, args: argparse.Namespace) -> None:
    _check_not_an_input(path, args)
    if path.exists() and not args.force:
        raise UserInputError(
            f"External data file {str(path)!r} already exists; pass --force to replace it."
        )
    check_output_path(path, force=True)  # a directory, or an unwritable one


def _move_onnx_into_place(final: Path, output: Path, args: argparse.Namespace) -> list[Path]:
    """Move the finished model and its external data files (if any) onto the targets.

    ``final`` lies in a work directory beside ``output`` and has its file name, so
    the data files it refers to (``<output name>.data``) keep their names: each is
    moved first, then the model, with ``os.replace`` (atomic per file).
    """
    moves = []
    for location in _external_data_locations(final):
        if Path(location).name != location:  # not written by keras-bn
            raise RuntimeError(f"external data location {location!r} is not a file name")
        target = output.with_name(location)
        _check_data_output(target, args)
        moves.append((final.with_name(location), target))
    try:
        for source, target in moves:
            os.replace(source, target)
        os.replace(final, output)
    except OSError as error:
        raise UserInputError(
            f"Cannot write {str(output)!r}: {error.strerror or error}; check the disk space "
            "and permissions of its directory."
        ) from None
    return [target for _, target in moves]


def _file_size(path: Path) -> str:
    size = path.stat().st_size
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"  # pragma: no cover


# --------------------------------------------------------------------------------------
# Subcommands.


def inspect_command(args: argparse.Namespace, run: Run) -> int:
    """The model's BN layers, their statistics and the fold plan."""
    import keras
    import numpy as np

    from keras_bn.converters.folding import plan_folds

    model = _load(args, run)
    flat = _preflight(model, run)
    with run.progress.step("Planning folds"):
        plan = plan_folds(model)
    batch_norms = []
    for node in flat.nodes:
        layer = node.layer
        if not isinstance(layer, keras.layers.BatchNormalization):  # keras_bn's included
            continue
        variance = np.asarray(keras.ops.convert_to_numpy(layer.moving_variance), np.float64)
        mean = np.asarray(keras.ops.convert_to_numpy(layer.moving_mean), np.float64)
        batch_norms.append(
            {
                "name": node.name,
                "class": type(layer).__name__,
                "axis": layer.axis,
                "channels": int(variance.size),
                "epsilon": float(layer.epsilon),
                "moving_mean_abs_max": float(np.abs(mean).max(initial=0.0)),
                "moving_variance_min": float(variance.min(initial=np.inf)),
                "moving_variance_max": float(variance.max(initial=-np.inf)),
            }
        )
    op_counts: dict[str, int] = {}
    for node in flat.nodes:
        op_counts[type(node.layer).__name__] = op_counts.get(type(node.layer).__name__, 0) + 1
    run.report.update(
        {
            "inputs": [
                {"name": n, "shape": list(t.shape)}
                for n, t in zip(flat.input_names, flat.inputs, strict=True)
            ],
            "outputs": [
                {"name": n, "shape": list(t.shape)}
                for n, t in zip(flat.output_names, flat.outputs, strict=True)
            ],
            "parameters": int(model.count_params()),
            "nodes": len(flat.nodes),
            "layer_counts": dict(sorted(op_counts.items())),
            "batch_norms": batch_norms,
            "fold_plan": _as_dict(plan),
        }
    )
    run.text.append(
        f"Model {model.name!r}: {model.count_params():,} parameters, {len(flat.nodes)} layer "
        f"calls, inputs "
        + ", ".join(
            f"{n} {tuple(t.shape)}" for n, t in zip(flat.input_names, flat.inputs, strict=True)
        )
    )
    run.text.append(
        "Layers: " + ", ".join(f"{name} x{count}" for name, count in sorted(op_counts.items()))
    )
    if batch_norms:
        rows = [["batch_norm", "channels", "epsilon", "max |moving_mean|", "moving_variance range"]]
        for bn in batch_norms:
            rows.append(
                [
                    bn["name"],
                    str(bn["channels"]),
                    f"{bn['epsilon']:g}",
                    f"{bn['moving_mean_abs_max']:.3g}",
                    f"{bn['moving_variance_min']:.3g} .. {bn['moving_variance_max']:.3g}",
                ]
            )
        run.text.append(format_table(rows))
    else:
        run.text.append("No BatchNormalization layers.")
    run.text.append(str(plan))
    run.summary += [
        ["batch norms", str(len(batch_norms))],
        ["would fold", str(plan.folded_count)],
        ["would not fold", str(plan.not_folded_count)],
    ]
    return EXIT_OK


def fold_command(args: argparse.Namespace, run: Run) -> int:
    """Fold BN into neighbouring layers and save the folded Keras model."""
    from keras_bn.converters.folding import fold_batch_norms

    output = _check_output(args, ".keras")
    model = _load(args, run)
    _preflight(model, run)
    inputs = _load_inputs(args.inputs, model, "Inputs file")
    if inputs is None and not args.no_validate:
        from keras_bn.converters.validation import make_sample_inputs

        inputs = make_sample_inputs(model, 4, seed=0)
    with run.progress.step("Folding BatchNormalization"):
        feed = None if inputs is None else _keras_feed(model, inputs)
        folded, report = fold_batch_norms(model, sample_inputs=feed)
    run.report["fold"] = _as_dict(report)
    run.text.append(str(report))
    run.summary += [
        ["folded", str(report.folded_count)],
        ["not folded", str(report.not_folded_count)],
    ]
    if not args.no_validate:
        passed = _compare_folded(model, folded, inputs, args, run)
        if not passed:
            return _validation_failed(run, "the folded model's outputs differ from the original's")
    with run.progress.step(f"Writing {output}"), _writing(output) as tmp:
        folded.save(tmp)
    run.report["output"] = {"path": str(output), "bytes": output.stat().st_size}
    run.summary.append(["output", f"{output} ({_file_size(output)})"])
    return EXIT_OK


def _compare_folded(model, folded, inputs, args: argparse.Namespace, run: Run) -> bool:
    """Compare the folded Keras model with the original, as validation compares ONNX."""
    from keras_bn.converters.validation import (
        DEFAULT_ATOL,
        DEFAULT_RTOL,
        call_model,
        compare_arrays,
    )

    atol = args.atol if args.atol is not None else DEFAULT_ATOL
    rtol = args.rtol if args.rtol is not None else DEFAULT_RTOL
    batch_size = int(len(next(iter(inputs.values()))))
    with run.progress.step("Comparing folded and original models"):
        expected = call_model(model, inputs)
        received = call_model(folded, inputs)
    comparisons = [
        compare_arrays(b, a, atol=atol, rtol=rtol, name=f"output {i}", batch_size=batch_size)
        for i, (a, b) in enumerate(zip(expected, received, strict=True))
    ]
    passed = all(c.passed for c in comparisons)
    run.report["validation"] = {
        "passed": passed,
        "atol": atol,
        "rtol": rtol,
        "outputs": [_as_dict(c) for c in comparisons],
    }
    worst_abs = max(c.max_abs_error for c in comparisons)
    worst_rel = max(c.max_rel_error for c in comparisons)
    run.text.append(
        f"Folded vs original Keras model on {batch_size} sample(s): max abs error "
        f"{worst_abs:.3g}, max rel error {worst_rel:.3g} (atol {atol:g}, rtol {rtol:g}): "
        + ("passed" if passed else "FAILED")
    )
    run.summary.append(["validation", "passed" if passed else "FAILED"])
    return passed


def export_command(args: argparse.Namespace, run: Run) -> int:
    """Fold, export to ONNX, convert precision, validate against the Keras model, write."""
    from keras_bn.converters.model_io import check_input_file

    output = _check_output(args, ".onnx")
    if args.external_data:
        if args.precision != "float32":
            raise UserInputError(
                f"--external-data works with --precision float32 only (received --precision "
                f"{args.precision}, whose conversion stores the weights inside the model); "
                "drop one of them."
            )
        _check_data_output(output.with_name(f"{output.name}.data"), args)
    precision = PRECISIONS[args.precision]
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
    for given, what in ((args.inputs, "Inputs file"), (args.calibration, "Calibration file")):
        if given is not None:
            check_input_file(given, what, (".npz",))
    if args.batch_size is not None and args.batch_size < 1:
        raise UserInputError(f"--batch-size must be at least 1; received {args.batch_size}.")

    model = _load(args, run)
    _preflight(model, run)
    inputs = _load_inputs(args.inputs, model, "Inputs file")
    calibration = _load_inputs(args.calibration, model, "Calibration file")
    if args.no_fold and args.precision == "int8":
        run.warn(
            "--no-fold with --precision int8: BatchNormalization stays a separate float "
            "operator and its input gets its own quantization step; fold first for better "
            "int8 accuracy."
        )
    from keras_bn.converters.onnx.export import export_onnx

    # Work beside the target, each file under the output's own name: an ONNX model
    # refers to its external data file (``<name>.onnx.data``) by file name, so the
    # files keep their names and are moved, not renamed, into place.
    with _work_directory(output) as work:
        exported = work / output.name
        step = "Exporting to ONNX" if args.no_fold else "Folding BatchNormalization, exporting"
        with run.progress.step(step), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Folding while exporting: the same weights as fold_batch_norms without
            # building the folded Keras model; validation below compares the file
            # with the original model.
            result = export_onnx(
                model,
                exported,
                fold=not args.no_fold,
                opset=args.opset,
                input_layout=args.input_layout,
                batch_size=args.batch_size,
                fallback=args.fallback,
                external_data=args.external_data,
            )
        for message in dict.fromkeys(str(w.message) for w in caught):
            if "__array__" not in message:  # a NumPy 2 notice from inside Keras
                run.warn(message)
        if dataclasses.is_dataclass(result) and hasattr(result, "path"):
            result = dataclasses.replace(result, path=str(output))  # not the temporary path
        fold_report = getattr(result, "fold_report", None)
        if fold_report is not None:
            run.report["fold"] = _as_dict(fold_report)
            run.text.append(str(fold_report))
            run.summary += [
                ["folded", str(fold_report.folded_count)],
                ["not folded", str(fold_report.not_folded_count)],
            ]
        run.report["export"] = {
            key: value for key, value in _as_dict(result).items() if key != "fold_report"
        }
        run.text.append(str(result))
        final = exported
        if args.precision == "float16":
            from keras_bn.converters.precision import convert_float16

            final = work / "float16" / output.name
            final.parent.mkdir()
            with run.progress.step("Converting to float16"):
                precision_report = convert_float16(
                    exported,
                    final,
                    keep_io_types=args.keep_io_types,
                    sample_inputs=None
                    if inputs is None
                    else _to_onnx_layout(inputs, args.input_layout),
                )
            if precision_report.range_issues:
                run.warn(
                    f"{precision_report.clamped_count} weight value(s) outside the float16 "
                    "range were clamped to its limits: "
                    + "; ".join(str(issue) for issue in precision_report.range_issues[:3])
                    + ("; ..." if len(precision_report.range_issues) > 3 else "")
                )
        elif args.precision == "int8":
            from keras_bn.converters.precision import quantize_int8

            final = work / "int8" / output.name
            final.parent.mkdir()
            with run.progress.step("Quantizing to int8 (calibrating)"):
                precision_report = quantize_int8(
                    exported, final, _to_onnx_layout(calibration, args.input_layout)
                )
        if args.precision != "float32":
            precision_report.path = str(output)  # not the temporary path
            run.report["precision"] = precision_report.to_dict()
            run.text.append(str(precision_report))
            if precision_report.comparison is not None:
                comparison = precision_report.comparison
                run.summary.append(
                    [f"{args.precision} vs float32", f"max |diff| {comparison.max_abs_diff:.3g}"]
                )
                if comparison.top1_agreement is not None:
                    run.summary.append(["top-1 agreement", f"{comparison.top1_agreement:.1%}"])

        if not args.no_validate:
            validation_inputs = inputs if inputs is not None else calibration
            atol = args.atol if args.atol is not None else precision.atol
            rtol = args.rtol if args.rtol is not None else precision.rtol
            if not _validate(
                model,
                final,
                args,
                run,
                inputs=validation_inputs,
                atol=atol,
                rtol=rtol,
                shown_path=output,
            ):
                return _validation_failed(
                    run, f"the {args.precision} ONNX model's outputs differ from the Keras model's"
                )
        with run.progress.step(f"Writing {output}"):
            data_files = _move_onnx_into_place(final, output, args)
    run.report["output"] = {
        "path": str(output),
        "bytes": output.stat().st_size,
        "external_data": [{"path": str(path), "bytes": path.stat().st_size} for path in data_files],
    }
    run.summary.append(["output", f"{output} ({_file_size(output)})"])
    for path in data_files:
        run.summary.append(["external data", f"{path} ({_file_size(path)})"])
    return EXIT_OK


def validate_command(args: argparse.Namespace, run: Run) -> int:
    """Compare an ONNX model with the Keras model it came from."""
    from keras_bn.converters.model_io import check_input_file

    onnx_path = check_input_file(args.onnx[0], "ONNX model", (".onnx",))
    model = _load(args, run)
    _preflight(model, run, check_statistics=False)
    inputs = _load_inputs(args.inputs, model, "Inputs file")
    run.report["onnx"] = str(onnx_path)
    detected, recorded_layout = _onnx_facts(onnx_path)
    if args.input_layout is None:
        args.input_layout = recorded_layout or "channels_last"
    precision = PRECISIONS[detected]
    run.report["precision"] = precision.name
    run.report["input_layout"] = args.input_layout
    atol = args.atol if args.atol is not None else precision.atol
    rtol = args.rtol if args.rtol is not None else precision.rtol
    passed = _validate(model, onnx_path, args, run, inputs=inputs, atol=atol, rtol=rtol)
    if not passed:
        print(
            f"keras-bn validate: validation failed: {onnx_path} does not match {args.model}.",
            file=sys.stderr,
        )
        run.report["status"] = "validation_failed"
        return EXIT_VALIDATION_FAILED
    return EXIT_OK


def bench_command(args: argparse.Namespace, run: Run) -> int:
    """onnxruntime latency of one or two ONNX models, optimizations off and on."""
    from keras_bn.converters.benchmarking import bench_onnx
    from keras_bn.converters.model_io import check_input_file
    from keras_bn.converters.precision import onnx_input_specs

    if len(args.onnx) > 2:
        raise UserInputError(
            f"bench takes one or two ONNX models; received {len(args.onnx)}: " + " ".join(args.onnx)
        )
    paths = [check_input_file(p, "ONNX model", (".onnx",)) for p in args.onnx]
    inputs = None
    if args.inputs is not None:
        from keras_bn.converters.model_io import load_inputs

        specs = [(name, shape) for name, shape, _ in onnx_input_specs(paths[0])]
        inputs = load_inputs(args.inputs, specs, what="Inputs file")
    with run.progress.step("Benchmarking in onnxruntime"):
        report = bench_onnx(
            paths,
            runs=args.runs,
            warmup=args.warmup,
            batch_size=args.batch_size,
            inputs=inputs,
            threads=args.threads,
        )
    run.report["bench"] = report.to_dict()
    run.text.append(str(report))
    for path in report.models:
        on = report.get(path, "on")
        run.summary.append([Path(path).name, f"median {on.median_ms:.3f} ms (optimizations on)"])
    return EXIT_OK


# --------------------------------------------------------------------------------------
# The parser.


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, received {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, received {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, received {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (no heavy imports: ``--help`` stays instant)."""
    from keras_bn import __version__

    parser = argparse.ArgumentParser(
        prog="keras-bn",
        description="Fold BatchNormalization in Keras 3 models, export them to ONNX, "
        "validate them in onnxruntime, convert to float16/int8 and benchmark them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"keras-bn {__version__}")

    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("report options")
    group.add_argument(
        "--json", action="store_true", help="print a machine-readable JSON report on stdout"
    )
    group.add_argument("--report", metavar="FILE", help="also write the JSON report to FILE")
    group.add_argument(
        "--force", action="store_true", help="replace existing output (and report) files"
    )

    loading = argparse.ArgumentParser(add_help=False)
    group = loading.add_argument_group("model loading")
    group.add_argument(
        "--unsafe",
        action="store_true",
        help="load with safe_mode=False (needed for Lambda layers); only for trusted files",
    )
    group.add_argument(
        "--custom-objects",
        metavar="MODULE:NAME",
        action="append",
        default=[],
        help="custom layer class or function (MODULE importable or a .py path); repeatable",
    )

    comparing = argparse.ArgumentParser(add_help=False)
    group = comparing.add_argument_group("validation")
    group.add_argument("--atol", type=_tolerance, help="absolute tolerance")
    group.add_argument("--rtol", type=_tolerance, help="relative tolerance")
    group.add_argument(
        "--inputs",
        metavar="FILE.npz",
        help="inputs to validate on (one array per model input, batch first); "
        "default: generated standard-normal inputs",
    )

    def add_input_layout(sub: argparse.ArgumentParser, default: str | None, text: str) -> None:
        sub.add_argument("--input-layout", choices=INPUT_LAYOUTS, default=default, help=text)

    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, function: Callable, parents: list, help_text: str):
        sub = commands.add_parser(
            name,
            parents=[*parents, common],
            help=help_text,
            description=function.__doc__,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(handler=function)
        return sub

    sub = add("inspect", inspect_command, [loading], "BN layers, statistics and the fold plan")
    sub.add_argument("model", metavar="MODEL.keras")

    sub = add("fold", fold_command, [loading, comparing], "write the folded Keras model")
    sub.add_argument("model", metavar="MODEL.keras")
    sub.add_argument("-o", "--output", metavar="OUT.keras", required=True)
    sub.add_argument(
        "--no-validate", action="store_true", help="skip comparing folded and original outputs"
    )

    sub = add(
        "export",
        export_command,
        [loading, comparing],
        "fold, export to ONNX, convert precision, validate, write",
    )
    sub.add_argument("model", metavar="MODEL.keras")
    add_input_layout(
        sub,
        "channels_last",
        "layout of the ONNX model's inputs of rank >= 3: channels_last keeps the Keras "
        "shapes, channels_first moves the channel axis to 1 (NHWC -> NCHW); default "
        "channels_last",
    )
    sub.add_argument("-o", "--output", metavar="OUT.onnx", required=True)
    sub.add_argument("--opset", type=_positive_int, help="ONNX opset (default: the exporter's)")
    sub.add_argument(
        "--batch-size",
        type=_positive_int,
        help="fixed batch size of the ONNX model (default: dynamic)",
    )
    sub.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="float32",
        help="; ".join(f"{p.name}: {p.description}" for p in PRECISIONS.values()),
    )
    sub.add_argument(
        "--calibration",
        metavar="FILE.npz",
        help="int8 calibration inputs (representative data, Keras layout, batch first)",
    )
    sub.add_argument(
        "--keep-io-types",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="float16: keep float32 model inputs and outputs (default: keep)",
    )
    sub.add_argument("--no-fold", action="store_true", help="export without folding BN")
    sub.add_argument(
        "--no-validate", action="store_true", help="skip validation against the Keras model"
    )
    sub.add_argument(
        "--external-data",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store the weights in OUT.onnx.data beside the model (default: only when "
        "they exceed 2 GB, the protobuf limit)",
    )
    sub.add_argument(
        "--fallback",
        action="store_true",
        help="export unsupported layers through Keras's own model.export(format='onnx')",
    )

    sub = add(
        "validate",
        validate_command,
        [loading, comparing],
        "compare an ONNX model with its Keras model",
    )
    sub.add_argument("model", metavar="MODEL.keras")
    add_input_layout(
        sub,
        None,
        "layout of the ONNX model's inputs (default: the one recorded at export, else "
        "channels_last)",
    )
    sub.add_argument("onnx", metavar="MODEL.onnx", nargs=1)

    sub = add("bench", bench_command, [], "onnxruntime latency of one or two ONNX models")
    sub.add_argument("onnx", metavar="MODEL.onnx", nargs="+", help="one or two ONNX models")
    sub.add_argument("--runs", type=_positive_int, default=50, help="timed runs (default 50)")
    sub.add_argument(
        "--warmup", type=_non_negative_int, default=5, help="untimed runs first (default 5)"
    )
    sub.add_argument(
        "--batch-size", type=_positive_int, default=1, help="batch of generated inputs (default 1)"
    )
    sub.add_argument(
        "--inputs",
        metavar="FILE.npz",
        help="inputs in the ONNX model's layout instead of random ones",
    )
    sub.add_argument(
        "--threads", type=_positive_int, help="onnxruntime intra-op threads (default: all)"
    )
    return parser


# --------------------------------------------------------------------------------------
# Entry point.


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status (0 ok, 1 validation failed, 2 bad input)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors (argparse exits 2)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(
            "keras-bn: error: a command is required (inspect, fold, export, validate, bench)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    run = Run(command=args.command, progress=Progress.for_terminal(quiet=args.json))
    run.report["command"] = args.command
    try:
        _check_report_path(args)
        code = args.handler(args, run)
    except (UserInputError, OSError) as error:
        if isinstance(error, UserInputError):
            message = " ".join(str(error).split())
        else:  # disk full, permissions, a vanished file
            message = (
                f"{error.strerror or error}; check the disk space and permissions of the "
                "output directory."
            )
        print(f"keras-bn {args.command}: error: {message}", file=sys.stderr)
        if args.json:
            print(
                _to_json(
                    {
                        "command": args.command,
                        "status": "error",
                        "exit_code": EXIT_BAD_INPUT,
                        "error": message,
                    }
                )
            )
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"keras-bn {args.command}: interrupted", file=sys.stderr)
        return 130
    run.report.setdefault("status", "ok" if code == EXIT_OK else "failed")
    run.report["exit_code"] = code
    run.report["warnings"] = run.warnings
    run.report["steps"] = [
        {"step": step.label, "seconds": round(step.seconds, 4), "status": step.status}
        for step in run.progress.steps
    ]
    if args.report:
        try:
            with _writing(args.report) as tmp:
                tmp.write_text(_to_json(run.report) + "\n")
        except UserInputError as error:
            print(f"keras-bn {args.command}: error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
    if args.json:
        print(_to_json(run.report))
    else:
        for block in run.text:
            print(block)
            print()
        rows = [["summary", ""], *run.summary]
        rows += [[f"{step.label}", f"{step.seconds:.2f} s"] for step in run.progress.steps]
        print(format_table(rows))
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

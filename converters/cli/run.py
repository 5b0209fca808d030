"""What every subcommand shares: the run's state, its output, and safe file writing.

A :class:`Run` collects what a subcommand produces besides its exit status (the
JSON report, human-readable blocks, warnings, summary rows, timed steps);
:func:`print_run` prints it at the end. Output paths are checked before any work
(:func:`check_output`) and written atomically (:func:`writing`,
:func:`work_directory`), so a failed run leaves nothing behind.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keras_bn.converters.errors import UserInputError, one_line
from keras_bn.converters.files import atomic_output, check_output_path, place
from keras_bn.converters.progress import Progress, format_table

__all__ = [
    "EXIT_OK",
    "EXIT_VALIDATION_FAILED",
    "EXIT_BAD_INPUT",
    "EXIT_INTERNAL_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
    "replaces_report",
    "Run",
    "as_dict",
    "to_json",
    "finish_report",
    "print_run",
    "check_output",
    "check_not_an_input",
    "check_report_path",
    "validation_failed",
    "writing",
    "work_directory",
    "replace_files",
    "file_size",
]

EXIT_OK = 0
EXIT_VALIDATION_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL_ERROR = 3  # a bug in keras-bn: traceback plus a request to report it
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM: a job runner's timeout or kill, after the clean-up
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a pipe's writer exits with when its reader leaves


@dataclasses.dataclass
class Run:
    """What a subcommand produces besides its exit status."""

    command: str
    progress: Progress
    json: bool = False  # --json: the report goes to stdout instead of text
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    text: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    summary: list[list[str]] = dataclasses.field(default_factory=list)  # [label, value]
    next: str = ""  # the command's last line: what to run next ("next: ...")
    # The ``keras-bn`` program, which exits when the command ends, not a caller's
    # ``main()``: process-wide settings are then the command's to choose.
    owns_process: bool = False

    def warn(self, message: str) -> None:
        """One line on stderr (once per distinct message) and an entry in the report."""
        message = one_line(message)
        if message in self.warnings:
            return
        self.warnings.append(message)
        print(f"keras-bn {self.command}: warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------
# The report.


def _json_default(value: Any) -> Any:
    import numpy as np  # only reached for values numpy made, so it is imported already

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


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=_json_default, allow_nan=True)


def as_dict(obj: Any) -> Any:
    """A report object from another module as plain data (to_dict, dataclass, dict)."""
    if obj is None or isinstance(obj, dict):
        return obj
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return str(obj)


def finish_report(run: Run, code: int) -> None:
    """Status, exit code, warnings and step timings: the report's common tail."""
    run.report.setdefault("status", "ok" if code == EXIT_OK else "failed")
    run.report["exit_code"] = code
    run.report["warnings"] = run.warnings
    run.report["steps"] = [
        {"step": step.label, "seconds": round(step.seconds, 4), "status": step.status}
        for step in run.progress.steps
    ]
    run.report["seconds"] = round(run.progress.elapsed(), 4)
    if run.next and code == EXIT_OK:
        run.report["next"] = run.next


def print_run(run: Run, as_json: bool) -> None:
    """The JSON report, or the text blocks and a summary table with the step times."""
    if as_json:
        print(to_json(run.report))
        return
    for block in run.text:
        print(block)
        print()
    rows = [["summary", ""], *run.summary]
    rows += [[step.label, f"{step.seconds:.2f} s"] for step in run.progress.steps]
    if run.progress.steps:
        rows.append(["total", f"{run.progress.elapsed():.2f} s"])
    print(format_table(rows))
    if "next" in run.report:
        print(f"\nnext: {run.report['next']}")


def validation_failed(run: Run, what: str) -> int:
    from keras_bn.converters.comparison import FLOAT16_SQNR_FLOOR_DB, NOTHING_FINITE

    validation = run.report.get("validation") or {}
    comparisons = validation.get("comparisons") or validation.get("outputs") or []
    failed = [c for c in comparisons if isinstance(c, dict) and not c.get("passed")]
    advice = "Loosen --atol/--rtol"
    if failed and all(c.get("note") == NOTHING_FINITE for c in failed):
        what = "the Keras model's own outputs are NaN or inf on the validation inputs"
        advice = "Give inputs it computes finite outputs on (--inputs FILE.npz)"
    elif validation.get("precision") == "float16" and all(
        (c.get("sqnr_db") or 0.0) < FLOAT16_SQNR_FLOOR_DB for c in failed
    ):
        what = f"float16 cannot hold the model's outputs (SQNR below {FLOAT16_SQNR_FLOOR_DB:g} dB)"
        advice = "Keep float32 (the default --precision)"
    elif validation.get("precision") == "int8":  # judged by SQNR and top-1, not atol
        tuned = "bias_tuning" in (run.report.get("precision") or {})
        advice = "Calibrate on data that looks like deployment data (--calibration)" + (
            "" if tuned else ", try --tune-biases"
        )
    elif run.command == "export" and (run.report.get("fold") or {}).get("folded_count"):
        # A fold can cost float32 precision (a BN of inputs far from 0 cancels in the
        # folded bias): the BatchNormalizations as they are may pass.
        advice = "Loosen --atol/--rtol, export without folding (--no-fold)"
    print(
        f"keras-bn {run.command}: validation failed: {what}; nothing was written. {advice}, "
        "or pass --no-validate to write the output anyway.",
        file=sys.stderr,
    )
    run.report["status"] = "validation_failed"
    return EXIT_VALIDATION_FAILED


# --------------------------------------------------------------------------------------
# Output paths, checked before any work.


def check_output(args: argparse.Namespace, suffix: str) -> Path:
    """Validate ``-o/--output`` before any work: suffix, not the input, writable."""
    output = Path(args.output)
    if not output.name or output.is_dir():
        raise UserInputError(
            f"Output {str(output)!r} is a directory; give a {suffix} file name, e.g. "
            f"-o {Path(output, 'model' + suffix)}."
        )
    if output.suffix.lower() != suffix:
        raise UserInputError(
            f"Output file {str(output)!r} has suffix {output.suffix!r}; expected a {suffix} "
            f"file name, e.g. -o {output.with_suffix(suffix).name}."
        )
    check_not_an_input(output, args)
    return check_output_path(output, args.force)


def check_not_an_input(output: Path, args: argparse.Namespace) -> None:
    inputs = [getattr(args, name, None) for name in ("model", "inputs", "calibration", "data")]
    inputs += list(getattr(args, "onnx", None) or [])
    # MODULE:NAME specs whose module is a file: a --data loader, --custom-objects
    code = [getattr(args, "data", None) or "", *(getattr(args, "custom_objects", None) or [])]
    inputs += [spec.rpartition(":")[0] for spec in code if ":" in spec]
    for given in inputs:
        if given and output.exists() and Path(given).exists():
            if os.path.samefile(output, given):
                raise UserInputError(
                    f"Output file {str(output)!r} is also an input; inputs are never "
                    "overwritten: choose another output name."
                )


def check_report_path(args: argparse.Namespace) -> None:
    if args.report:
        report = Path(args.report)
        check_not_an_input(report, args)
        output = getattr(args, "output", None)
        if output is not None and report.resolve() == Path(output).resolve():
            raise UserInputError(
                f"--report {str(report)!r} is the same file as --output; give another name."
            )
        check_output_path(report, replaces_report(args))


def replaces_report(args: argparse.Namespace) -> bool:
    """Whether ``--report`` may replace an existing file: a command that writes no model
    (inspect, validate, bench) replaces its report as a report, not a model (written
    atomically all the same); one that writes a model, only with --force."""
    return bool(args.force or getattr(args, "output", None) is None)


# --------------------------------------------------------------------------------------
# Writing.


def _cannot_write(path: str | os.PathLike, error: OSError) -> UserInputError:
    return UserInputError(
        f"Cannot write {str(path)!r}: {error.strerror or error}; check the disk space "
        "and permissions of its directory."
    )


def _written_meanwhile(path: str | os.PathLike) -> UserInputError:
    return UserInputError(
        f"Output file {str(path)!r} was written by another run meanwhile; nothing was "
        "replaced: pass --force to replace it."
    )


@contextlib.contextmanager
def writing(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """``atomic_output`` with file-system errors (disk full, permissions) as one line;
    ``replace=False`` (no --force): a file another run wrote meanwhile stays."""
    try:
        with atomic_output(path, replace=replace) as tmp:
            yield tmp
    except FileExistsError:
        raise _written_meanwhile(path) from None
    except OSError as error:
        raise _cannot_write(path, error) from None


@contextlib.contextmanager
def work_directory(output: Path) -> Iterator[Path]:
    """A hidden temporary directory beside ``output`` (same file system), removed after.
    Its files are keras-bn's: onnxruntime refusing one is an internal error
    (:func:`.runtime.files_we_wrote`)."""
    from keras_bn.converters.runtime import files_we_wrote

    parent = output.parent if str(output.parent) else Path(".")
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=parent))
    except OSError as error:
        raise UserInputError(
            f"Cannot write in {str(parent)!r}: {error.strerror or error}; check the disk "
            "space and permissions of the output directory."
        ) from None
    try:
        with files_we_wrote(work):
            yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def replace_files(moves: list[tuple[Path, Path]], shown: Path, *, replace: bool = True) -> None:
    """Move each (source, target) in order (:func:`~keras_bn.converters.files.place`);
    an OSError becomes one line. ``replace=False`` (no --force): where another run
    wrote a target meanwhile, the targets placed before it are taken back and none
    is replaced."""
    placed: list[Path] = []
    try:
        for source, target in moves:
            place(source, target, replace=replace)
            placed.append(target)
    except FileExistsError:
        for target in placed:
            target.unlink(missing_ok=True)
        raise _written_meanwhile(shown) from None
    except OSError as error:
        raise _cannot_write(shown, error) from None


def file_size(path: Path) -> str:
    size: float = path.stat().st_size
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"  # pragma: no cover

"""The ``keras-bn`` program: the parser, the subcommand table and :func:`main`."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import NoReturn

from keras_bn.converters.cli import bench, export, fold, inspect, recalibrate, validate
from keras_bn.converters.cli.allocator import tune_allocator
from keras_bn.converters.cli.args import Parser, ReportArgs, UsageError
from keras_bn.converters.cli.quiet import quiet_environment
from keras_bn.converters.cli.run import (
    EXIT_BAD_INPUT,
    EXIT_BROKEN_PIPE,
    EXIT_INTERNAL_ERROR,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    Run,
    check_report_path,
    finish_report,
    print_run,
    replaces_report,
    to_json,
    writing,
)
from keras_bn.converters.errors import UserInputError
from keras_bn.converters.progress import Progress

__all__ = ["main", "console_main", "build_parser", "COMMANDS", "EPILOG"]

EPILOG = """\
examples:
  keras-bn inspect model.keras
  keras-bn fold model.keras -o folded.keras
  keras-bn recalibrate model.keras --data train.npz -o recalibrated.keras
  keras-bn export model.keras -o model.onnx
  keras-bn export model.keras -o model.onnx --input-layout channels_first --batch-size 1
  keras-bn export model.keras -o model_fp16.onnx --precision float16
  keras-bn export model.keras -o model_int8.onnx --precision int8 --calibration calib.npz
  keras-bn validate model.keras model.onnx --inputs samples.npz --atol 1e-5
  keras-bn bench model.onnx model_int8.onnx --batch-size 8
  keras-bn export model.keras -o model.onnx --json --report export.json

exit status: 0 success, 1 validation failed, 2 bad input or usage, 3 internal
error (a bug in keras-bn: the traceback is printed; please report it), 130
interrupted (Ctrl-C), 143 terminated (SIGTERM); either leaves no file behind.
.npz inputs hold one array per model input, keyed by input name (any name for a
single-input model), batch first, in the Keras model's layout (bench: the ONNX
model's layout). Set KERAS_BN_TRACEBACK=1 to see the traceback behind a
model-loading error.
"""

# Subcommand name -> (its module, the function that runs it). Each module declares
# its arguments (``add_arguments``) and a one-line ``SUMMARY`` for ``keras-bn --help``.
COMMANDS: dict[str, tuple[ModuleType, Callable[[argparse.Namespace, Run], int]]] = {
    "inspect": (inspect, inspect.inspect_command),
    "fold": (fold, fold.fold_command),
    "recalibrate": (recalibrate, recalibrate.recalibrate_command),
    "export": (export, export.export_command),
    "validate": (validate, validate.validate_command),
    "bench": (bench, bench.bench_command),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (no heavy imports: ``--help`` stays instant)."""
    from keras_bn import __version__

    parser = Parser(  # usage errors: one line, with "did you mean"
        prog="keras-bn",
        description="Fold BatchNormalization in Keras 3 models, export them to ONNX, "
        "validate them in onnxruntime, convert to float16/int8 and benchmark them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"keras-bn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, function) in COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=module.SUMMARY,
            description=function.__doc__,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        ReportArgs().add_to(sub)
        sub.set_defaults(handler=function)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or the exit status of --help, --version or a usage error."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors (argparse exits 2)
        if isinstance(exit_, UsageError) and "--json" in (sys.argv[1:] if argv is None else argv):
            # --json asks for a report on stdout, a usage error's too
            print(to_json({"status": "error", "exit_code": EXIT_BAD_INPUT, "error": exit_.line}))
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    if args.command is None:
        print(
            f"keras-bn: error: a command is required ({', '.join(COMMANDS)}) (see keras-bn --help)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    return args


def _internal_error(args: argparse.Namespace, error: Exception) -> int:
    """A bug in keras-bn: the traceback, a line asking to report it, its own exit status."""
    traceback.print_exc(file=sys.stderr)
    print(
        f"keras-bn {args.command}: internal error ({type(error).__name__}): this is a bug "
        "in keras-bn, not a problem with your input; please report it with the traceback "
        "above.",
        file=sys.stderr,
    )
    if args.json:
        report = {"command": args.command, "status": "internal_error"}
        print(to_json({**report, "exit_code": EXIT_INTERNAL_ERROR, "error": repr(error)}))
    return EXIT_INTERNAL_ERROR


def _user_error(args: argparse.Namespace, error: Exception) -> int:
    """A problem the user can fix: one line on stderr (and a JSON error report)."""
    if isinstance(error, UserInputError):
        message = " ".join(str(error).split())
    else:  # OSError: disk full, permissions, a vanished file
        message = (
            f"{getattr(error, 'strerror', None) or error}; check the disk space and "
            "permissions of the output directory."
        )
    print(f"keras-bn {args.command}: error: {message}", file=sys.stderr)
    if args.json:
        report = {"command": args.command, "status": "error", "exit_code": EXIT_BAD_INPUT}
        print(to_json({**report, "error": message}))
    return EXIT_BAD_INPUT


_OUT_OF_MEMORY = (
    "out of memory: the run needs more than this machine has; give smaller --samples, "
    "--batch-size or input sizes."
)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job's timeout, ``kill``), raised in the main thread: the command
    ends as on Ctrl-C, its temporary files removed and nothing half-written (Python's
    default for SIGTERM ends the process on the spot, leaving the work folder beside
    the output). A second SIGTERM during that clean-up ends the process at once."""


def _on_terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise _Terminated


def main(argv: Sequence[str] | None = None, *, owns_process: bool = False) -> int:
    """Run the CLI; return the exit status (0 ok, 1 validation failed, 2 bad input,
    3 internal error). ``owns_process``: the caller exits when this returns (the
    ``keras-bn`` program), so the command may set process-wide things such as the
    garbage collector's."""
    args = _parse(argv)
    if isinstance(args, int):
        return args
    if owns_process:
        # process-wide: the program's to set (allocator.py)
        tune_allocator(arenas=getattr(COMMANDS[args.command][0], "MALLOC_ARENAS", None))
        signal.signal(signal.SIGTERM, _on_terminate)
    quiet_environment()
    run = Run(
        command=args.command,
        # The program shows slow steps in a log too; a caller's main() only on a terminal.
        progress=Progress.for_terminal(
            quiet=args.json or args.quiet, lines=owns_process, prefix=f"keras-bn {args.command}: "
        ),
        owns_process=owns_process,
    )
    run.json = args.json
    run.report["command"] = args.command
    # With --json, stdout holds the report alone: what user code prints meanwhile (a
    # --custom-objects module at import, a layer's call while traced) goes to stderr.
    keep_stdout = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    try:
        with keep_stdout:
            check_report_path(args)
            code = args.handler(args, run)
    except BrokenPipeError:  # the reader of our output left (`| head`): console_main's
        raise
    except (UserInputError, OSError) as error:
        return _user_error(args, error)
    except MemoryError:  # a size asked for (--samples, --batch-size, --input-shape)
        return _user_error(args, UserInputError(_OUT_OF_MEMORY))
    except KeyboardInterrupt as interrupt:
        terminated = isinstance(interrupt, _Terminated)
        print(
            f"keras-bn {args.command}: {'terminated' if terminated else 'interrupted'}",
            file=sys.stderr,
        )
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except Exception as error:  # ours, never the user's: keep the traceback
        return _internal_error(args, error)
    finish_report(run, code)
    if args.report:
        try:
            with writing(args.report, replace=replaces_report(args)) as tmp:
                tmp.write_text(to_json(run.report) + "\n")
        except UserInputError as error:
            print(f"keras-bn {args.command}: error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
    print_run(run, args.json)
    return code


def console_main() -> NoReturn:
    """The ``keras-bn`` program: :func:`main`, then exit without the interpreter's
    teardown.

    Tearing down a process that imported JAX or TensorFlow and held a model (module
    finalizers, every array freed one by one) takes a noticeable time after exporting
    ResNet50 on JAX (BENCHMARKS.md appendix), and does nothing a finished command
    needs: :func:`main` has written and
    closed its files (atomically) and joined its threads' work before it returns.
    The standard streams are flushed first. When the reader of stdout has gone
    (``keras-bn ... | head``), the program stops quietly as other writers into a pipe do.
    """
    try:
        code = main(owns_process=True)
    except KeyboardInterrupt:  # Ctrl-C before main's own handling (its first steps)
        print("keras-bn: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush
        os._exit(EXIT_BROKEN_PIPE)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing left to show
            stream.flush()
    os._exit(code)

"""The ``keras-bn`` command line: inspect, fold, export, validate, bench.

Each subcommand is one module with one function taking the parsed arguments and a
:class:`~keras_bn.converters.cli.run.Run` (report, human-readable text, progress)
and returning the exit status:

* 0: success;
* 1: validation failed (the exported or folded model's outputs differ from the
  original Keras model's beyond ``--atol``/``--rtol``; nothing is written);
* 2: bad input or usage: one line on stderr naming the problem, no traceback,
  no output file left behind;
* 3: internal error (a bug in keras-bn: the traceback, and a request to report it);
* 130 and 143: interrupted (Ctrl-C) or terminated (SIGTERM, the program only),
  after the same clean-up.

Only :class:`UserInputError` becomes a one-line message; any other exception is a
bug in keras-bn and keeps its traceback. Heavy packages (keras, tensorflow, onnx,
onnxruntime, numpy) are imported inside the subcommands, so ``keras-bn --help``,
``--version`` and usage errors are instant; framework start-up output is kept off
the terminal (:mod:`.quiet`). Outputs are checked before any work and written
atomically; inputs are only read.

Layout: :mod:`.app` (parser, command table, :func:`main`), :mod:`.args` (argument
groups shared by the subcommands), :mod:`.run` (run state, output, atomic
writing), :mod:`.steps` (loading, checking, validating), :mod:`.quiet`, and one
module per subcommand (:mod:`.inspect`, :mod:`.fold`, :mod:`.export`,
:mod:`.validate`, :mod:`.bench`).
"""

from __future__ import annotations

from keras_bn.converters.cli.app import build_parser, console_main, main
from keras_bn.converters.cli.run import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL_ERROR,
    EXIT_OK,
    EXIT_VALIDATION_FAILED,
)
from keras_bn.converters.options import INPUT_LAYOUTS, PRECISIONS

__all__ = [
    "main",
    "console_main",
    "build_parser",
    "EXIT_OK",
    "EXIT_VALIDATION_FAILED",
    "EXIT_BAD_INPUT",
    "EXIT_INTERNAL_ERROR",
    "INPUT_LAYOUTS",
    "PRECISIONS",
]

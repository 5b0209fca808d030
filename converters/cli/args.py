"""Argument groups shared by the subcommands, and the argument types they use.

One class per group (Polygraphy's ``tools/args``): a subcommand adds the groups it
needs with ``Group(...).add_to(parser)``, so an option reads and behaves the same
in every command. Every help text states the option's default. Choices come from
:mod:`keras_bn.converters.options`, so the CLI cannot drift from the library.
Nothing here imports a heavy package: ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from keras_bn.converters.options import INPUT_LAYOUTS, PRECISIONS

__all__ = [
    "ReportArgs",
    "ModelLoadingArgs",
    "ComparisonArgs",
    "InputLayoutArgs",
    "positive_int",
    "non_negative_int",
    "tolerance",
    "FLOAT32_ATOL",
    "FLOAT32_RTOL",
]

# validate_onnx's float32 defaults, repeated here so that --help needs no Keras
# import (tests/cli/test_cli.py checks they match keras_bn.converters.validation).
FLOAT32_ATOL = 1e-4
FLOAT32_RTOL = 1e-3


# --------------------------------------------------------------------------------------
# Argument types.


def int_at_least(minimum: int) -> Callable[[str], int]:
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


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def tolerance(text: str) -> float:
    """An argparse ``type``: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, received {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, received {text!r}")
    return value


# --------------------------------------------------------------------------------------
# Groups.


class ReportArgs:
    """``--json``, ``--report FILE``, ``--force``: how results and outputs are written."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("report options")
        group.add_argument(
            "--json",
            action="store_true",
            help="print a machine-readable JSON report on stdout (default: text and a summary)",
        )
        group.add_argument(
            "--report", metavar="FILE", help="also write the JSON report to FILE (default: none)"
        )
        group.add_argument(
            "--force",
            action="store_true",
            help="replace existing output (and report) files (default: refuse to replace)",
        )


class ModelLoadingArgs:
    """``--unsafe``, ``--custom-objects``: how the ``.keras`` file is loaded."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("model loading")
        group.add_argument(
            "--unsafe",
            action="store_true",
            help="load with safe_mode=False (needed for Lambda layers); only for trusted "
            "files (default: safe mode)",
        )
        group.add_argument(
            "--custom-objects",
            metavar="MODULE:NAME",
            action="append",
            default=[],
            help="custom layer class or function (MODULE importable or a .py path); "
            "repeatable (default: none)",
        )


class ComparisonArgs:
    """``--atol``, ``--rtol``, ``--inputs``: what a comparison feeds and accepts.

    ``defaults`` says where the default tolerances come from: ``"float32"`` (the
    folded Keras model), ``"precision"`` (the ``--precision`` exported) or
    ``"detected"`` (the precision found in the ONNX file).
    """

    def __init__(self, defaults: str) -> None:
        if defaults not in ("float32", "precision", "detected"):
            raise ValueError(f"unknown tolerance defaults {defaults!r}")
        self.defaults = defaults

    def _default_text(self, kind: str) -> str:
        value = FLOAT32_ATOL if kind == "atol" else FLOAT32_RTOL
        if self.defaults == "float32":
            return f"default: {value:g}"
        return f"default: none; {value:g} decides float32 outright passes"

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        description = (
            "A float32 output that does not pass the default tolerances outright is "
            "judged against the same Keras model run in float64: it passes when its error "
            "is no worse than a few times Keras float32's own. Giving --atol or --rtol "
            "makes them a strict elementwise contract instead."
        )
        if self.defaults != "float32":
            by = "--precision" if self.defaults == "precision" else "the ONNX model's precision"
            description += (
                f" By default the criterion follows {by}: "
                + "; ".join(f"{p.name}: {p.criterion}" for p in PRECISIONS.values())
                + "."
            )
        group = parser.add_argument_group("validation", description)
        group.add_argument(
            "--atol", type=tolerance, help=f"absolute tolerance ({self._default_text('atol')})"
        )
        group.add_argument(
            "--rtol", type=tolerance, help=f"relative tolerance ({self._default_text('rtol')})"
        )
        group.add_argument(
            "--inputs",
            metavar="FILE.npz",
            help="inputs to validate on (one array per model input, batch first) "
            "(default: generated standard-normal inputs)",
        )


class InputLayoutArgs:
    """``--input-layout``: the ONNX model's input layout (choices from the registry)."""

    def __init__(self, default: str | None, help_text: str) -> None:
        self.default = default
        self.help_text = help_text

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--input-layout", choices=INPUT_LAYOUTS, default=self.default, help=self.help_text
        )

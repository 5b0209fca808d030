"""Argument groups shared by the subcommands, and the argument types they use.

One class per group (Polygraphy's ``tools/args``): a subcommand adds the groups it
needs with ``Group(...).add_to(parser)``, so an option reads and behaves the same
in every command. Every help text states the option's default. Choices come from
:mod:`keras_bn.converters.options`, so the CLI cannot drift from the library.
Nothing here imports a heavy package: ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from keras_bn.converters.errors import one_line
from keras_bn.converters.options import INPUT_LAYOUTS, PRECISIONS

__all__ = [
    "Parser",
    "UsageError",
    "suggest_option",
    "ReportArgs",
    "ModelLoadingArgs",
    "ComparisonArgs",
    "InputLayoutArgs",
    "DataArgs",
    "positive_int",
    "MAX_COUNT",
    "non_negative_int",
    "tolerance",
    "FLOAT32_ATOL",
    "FLOAT32_RTOL",
]

# samples.VALIDATION_SAMPLES and MIN_VALIDATION_SAMPLES, repeated here so that --help
# needs no Keras import (tests/cli/test_cli.py checks they match).
VALIDATION_SAMPLES = 16
MIN_VALIDATION_SAMPLES = 2
# validate_onnx's float32 defaults, repeated here so that --help needs no Keras
# import (tests/cli/test_cli.py checks they match keras_bn.converters.validation).
FLOAT32_ATOL = 1e-4
FLOAT32_RTOL = 1e-3


# --------------------------------------------------------------------------------------
# The parser: usage errors as one line, with the option meant.

# Flags other tools use -> what keras-bn spells them (offered only where the
# subcommand has the option). Misspellings of our own flags need no entry:
# difflib finds them among the parser's option strings.
OPTION_ALIASES: dict[str, str] = {
    "--fp16": "--precision float16",
    "--float16": "--precision float16",
    "--half": "--precision float16",
    "--fp32": "--precision float32",
    "--float32": "--precision float32",
    "--int8": "--precision int8",
    "--quantize": "--precision int8",
    "--nchw": "--input-layout channels_first",
    "--channels-first": "--input-layout channels_first",
    "--nhwc": "--input-layout channels_last",
    "--channels-last": "--input-layout channels_last",
    "--out": "-o",
    "--output-file": "-o",
    "--overwrite": "--force",
    "--calib": "--calibration",
    "--calibration-data": "--calibration",
    "--cle": "--equalize",
    "--cross-layer-equalization": "--equalize",
    "--input": "--inputs",
    "--samples": "--inputs",
    "--batch": "--batch-size",
}
# Values other tools use -> ours, per option.
VALUE_ALIASES: dict[str, dict[str, str]] = {
    "precision": {"fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"},
    "input_layout": {"nchw": "channels_first", "nhwc": "channels_last"},
}


def suggest_option(parser: argparse.ArgumentParser, given: str) -> str | None:
    """The option (with its value, for an alias) ``parser`` has and ``given`` meant."""
    flag = given.split("=", 1)[0]
    options = [o for action in parser._actions for o in action.option_strings]
    alias = OPTION_ALIASES.get(flag.lower().replace("_", "-"))
    if alias is not None and alias.split()[0] in options:
        return alias
    if not flag.startswith("-"):
        return None
    close = difflib.get_close_matches(flag, options, n=1, cutoff=0.75)
    return close[0] if close else None


class UsageError(SystemExit):
    """argparse's exit 2 for a usage error, with its line."""

    def __init__(self, line: str) -> None:
        super().__init__(2)
        self.line = line


class Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line on stderr (exit 2), no usage dump.

    An unknown flag gets "did you mean": a misspelling of the subcommand's own
    options (difflib), or another tool's spelling (:data:`OPTION_ALIASES`,
    ``--fp16`` -> ``--precision float16``). Subparsers are this class too
    (argparse makes them with the parent's class).
    """

    def error(self, message: str) -> NoReturn:
        hint = ""
        if "invalid choice" in message:
            hint = self._value_hint(message)
        self.fail(f"{message}{hint}")

    def fail(self, message: str) -> NoReturn:
        """A usage error: one line on stderr, exit 2 (a :class:`UsageError`, which is a
        ``SystemExit``, holding the line for a --json report)."""
        line = f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)"
        print(line, file=sys.stderr)
        raise UsageError(line)

    def _value_hint(self, message: str) -> str:
        for action in self._actions:
            name = argparse._get_action_name(action)  # how argparse's message names it
            if not action.choices or not message.startswith(f"argument {name}:"):
                continue
            received = message.split("invalid choice: ", 1)[1].split(" ", 1)[0].strip("'\"")
            meant = VALUE_ALIASES.get(action.dest, {}).get(received.lower())
            if meant is None:
                choices = [str(choice) for choice in action.choices]
                close = difflib.get_close_matches(received, choices, n=1, cutoff=0.6)
                meant = close[0] if close else None
            if meant is not None:
                flag = action.option_strings[-1] if action.option_strings else self.prog
                return f"; did you mean {flag} {meant}?"
        return ""

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._subcommand_parser(parsed) or self
            unknown = [e for e in extras if e.startswith("-")] or extras
            meant = suggest_option(parser, unknown[0])
            if meant is not None:
                parser.fail(f"unrecognized argument {unknown[0]}; did you mean {meant}?")
            parser.fail(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def _subcommand_parser(self, parsed: argparse.Namespace) -> Parser | None:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                found = action.choices.get(getattr(parsed, action.dest, None) or "")
                return found if isinstance(found, Parser) else None
        return None


# --------------------------------------------------------------------------------------
# Argument types.


MAX_COUNT = 2**31 - 1  # a count no run can use more of (onnx refuses larger dimensions)


def int_at_least(minimum: int, maximum: int = MAX_COUNT) -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``minimum`` to ``maximum``."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, received {text!r}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"expected at most {maximum}, received {text!r}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def input_shape(text: str) -> tuple[str, tuple[int | None, ...]]:
    """An argparse ``type``: ``NAME=DIMS``, an input's sizes after the batch,
    comma-separated, ``?`` for a size left unknown (``token_ids=16``, ``images=224,224,3``)."""
    name, equals, dims = text.partition("=")
    try:
        if not equals or not name or not dims:
            raise ValueError
        sizes = tuple(None if d.strip() == "?" else int(d) for d in dims.split(","))
        if any(size is not None and size < 1 for size in sizes):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NAME=DIMS, the sizes after the batch separated by commas, ? for an "
            f"unknown one (token_ids=16, images=224,224,3), received {text!r}"
        ) from None
    return name, sizes


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
    """``--json``, ``--report FILE``, ``--force``, ``--verbose``, ``--quiet``: how
    results, outputs and progress are written."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("report options")
        group.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="print every table in full, e.g. one row per folded BatchNormalization "
            "(default: summaries; --json always has everything)",
        )
        group.add_argument(
            "--json",
            action="store_true",
            help="print a machine-readable JSON report on stdout (default: text and a summary)",
        )
        group.add_argument(
            "-q",
            "--quiet",
            action="store_true",
            help="show no progress on stderr (default: a live line on a terminal, else a "
            "line for each step still running after 2 s; never with --json)",
        )
        group.add_argument(
            "--report",
            metavar="FILE",
            help="also write the JSON report to FILE; an existing FILE is replaced by "
            "inspect, validate and bench, by fold and export only with --force (default: none)",
        )
        group.add_argument(
            "--force",
            action="store_true",
            help="replace existing output files, and the report of fold and export "
            "(default: refuse to replace)",
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
            "is no worse than a few times Keras's own (in the precision Keras computes in). "
            "Giving --atol or --rtol "
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
            "(default: generated samples in the range the model gives its inputs: a "
            "Rescaling's, a Normalization's, an Embedding's vocabulary, the first BN's "
            "statistics; the report says which)",
        )
        group.add_argument(
            "--samples",
            metavar="N",
            type=int_at_least(1),
            help="how many samples to generate (default: "
            f"{VALIDATION_SAMPLES}, fewer where each holds many values, down to "
            f"{MIN_VALIDATION_SAMPLES}: 6 for a 128x128 RGB image, 2 for a 224x224 one)",
        )


class InputLayoutArgs:
    """``--input-layout [NAME=]LAYOUT``: the ONNX model's input layout, for every input
    or, repeated, per input name (layouts from the registry). The namespace gets a
    layout, or a dict of them by input name."""

    def __init__(self, default: str | None, help_text: str) -> None:
        self.default = default
        self.help_text = help_text

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--input-layout",
            metavar="[NAME=]{" + ",".join(INPUT_LAYOUTS) + "}",
            action=_InputLayoutAction,
            choices=_LayoutChoices(INPUT_LAYOUTS),
            default=self.default,
            help=self.help_text,
        )


class _LayoutChoices(tuple):
    """The layouts, as argparse's choices (its check, its did-you-mean); a value naming
    an input (``NAME=LAYOUT``) passes to :class:`_InputLayoutAction`, which checks it."""

    def __contains__(self, value: object) -> bool:
        return "=" in str(value) or super().__contains__(value)


class _InputLayoutAction(argparse.Action):
    """``--input-layout LAYOUT`` (every input) or ``NAME=LAYOUT``, repeatable (by name);
    the two forms do not mix."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None):
        name, named, layout = str(values).rpartition("=")
        if layout not in INPUT_LAYOUTS:
            meant = VALUE_ALIASES["input_layout"].get(layout.lower()) or next(
                iter(difflib.get_close_matches(layout, INPUT_LAYOUTS, n=1, cutoff=0.6)), None
            )
            hint = f"; did you mean --input-layout {name + '=' if named else ''}{meant}?"
            parser.error(
                f"argument --input-layout: invalid layout {layout!r}: expected "
                f"{' or '.join(INPUT_LAYOUTS)}, optionally after NAME= for one input"
                + (hint if meant else "")
            )
        given = getattr(namespace, "input_layout_named", None)
        if given is not None and given != bool(named):
            parser.error(
                "argument --input-layout: give one layout for every input or NAME=LAYOUT "
                f"per input, not both; received {values!r} after the other form"
            )
        namespace.input_layout_named = bool(named)
        if named:
            if not name:
                parser.error(f"argument --input-layout: {values!r} names no input before '='")
            current = getattr(namespace, self.dest, None)
            layouts = dict(current) if isinstance(current, dict) else {}
            layouts[name] = layout
            setattr(namespace, self.dest, layouts)
        else:
            setattr(namespace, self.dest, layout)


class Int8Args:
    """``--per-tensor``, ``--equalize``, ``--round-weights``, ``--tune-biases``,
    ``--signed-int8``: how ``--precision int8`` quantizes and stores."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--per-tensor",
            action="store_true",
            help="int8: one weight scale per layer, for targets without per-channel scales "
            "(default: one per output channel)",
        )
        parser.add_argument(
            "--equalize",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="int8: cross-layer equalization of every layer pair, and high-bias "
            "absorption up to each channel's lowest calibration value, before quantizing "
            "(default: every pair with --per-tensor; with per-channel weights only the pairs "
            "into depthwise layers, which lose no weight precision, where that rounds their "
            "activation finer on the calibration data; --no-equalize: none)",
        )
        parser.add_argument(
            "--round-weights",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="int8: choose every layer's int8 weights against its inputs on 64 "
            "calibration samples (GPTQ: each weight's rounding error is carried onto the "
            "weights not yet rounded, so that the layer's output error is smallest), instead "
            "of rounding each to nearest (default: every layer with --per-tensor; with "
            "per-channel weights the depthwise layers only; --no-round-weights: none)",
        )
        parser.add_argument(
            "--tune-biases",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="int8: after bias correction, tune each layer's bias in the int8 model "
            "itself, layer by layer, keeping each change that brings its outputs closer to "
            "the float model's on 32 calibration samples: also removes the mean shifts that "
            "activation rounding causes (+2 to +3 dB logit SQNR on MobileNetV2 and "
            "EfficientNet-Lite0; two to three times the int8 export's time) (default: on "
            "with --per-tensor, whose targets need every dB; off with per-channel weights)",
        )
        parser.add_argument(
            "--signed-int8",
            action="store_true",
            help="int8: store weights and activations as int8, for runtimes that require "
            "signed int8 (TensorRT, TFLite-style NPU compilers) (default: the same values "
            "stored as uint8, which onnxruntime's x86 kernels cannot saturate on CPUs "
            "without VNNI)",
        )


class DataArgs:
    """``--data``: samples streamed through the model (recalibrate; the statistics check)."""

    def __init__(self, required: bool, purpose: str) -> None:
        self.required = required
        self.purpose = purpose

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--data",
            metavar="DATA",
            required=self.required,
            help=f"{self.purpose}: FILE.npz (one array per model input, keyed by input name, "
            "batch first; labels as 'y' or 'labels'), a DIRECTORY of images "
            "(subdirectories = classes) or MODULE:FUNCTION returning a tf.data.Dataset, "
            "a keras.utils.PyDataset or an iterator of x or (x, y) batches "
            + ("(required, no default)" if self.required else "(default: none, not checked)"),
        )

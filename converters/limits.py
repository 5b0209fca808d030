"""How much work a user's file may ask for: the limits, their defaults and overrides.

A hostile or broken file can declare sizes that exhaust memory or time long before
anything fails (a Dense layer of a billion units, a zip member that inflates to
terabytes, an ``.npz`` header promising an array of 10^12 floats). The readers in
:mod:`keras_bn.converters.user_files` compare what a file *declares* with these
limits before allocating anything, and refuse with one line that names the limit
and the environment variable that raises it. Every limit lies far above what a
real model needs; raise one only for a file you trust.

This module imports nothing heavy: the CLI's ``--help`` may read the table.
"""

from __future__ import annotations

import dataclasses
import os

from keras_bn.converters.errors import UserInputError

__all__ = ["Limit", "LIMITS", "limit_value", "refuse"]


@dataclasses.dataclass(frozen=True)
class Limit:
    """One bound on a user's file: its environment variable, default and meaning."""

    variable: str  # KERAS_BN_MAX_..., an integer that replaces the default
    default: int
    what: str  # "keras-bn allows at most {value} {what}"
    example: str  # why the default suffices: what a real model needs


# The table documented in README.md ("Limits on input files"); keep the two in step.
LIMITS: dict[str, Limit] = {
    limit.variable: limit
    for limit in (
        Limit(
            "KERAS_BN_MAX_CONFIG_DEPTH",
            200,
            "levels of nesting in a .keras config.json",
            "a real model needs a few dozen",
        ),
        Limit(
            "KERAS_BN_MAX_DIMENSION",
            2**24,
            "per size declared in a model (units, filters, input shapes, ...)",
            "the largest vocabularies and images need under a million",
        ),
        Limit(
            "KERAS_BN_MAX_PARAMETERS",
            2**30,
            "parameters declared by a model (estimated from a .keras config before Keras "
            "builds it; counted over an ONNX file's initializers)",
            "ConvNeXtXLarge has 350 million",
        ),
        Limit(
            "KERAS_BN_MAX_INPUT_ELEMENTS",
            2**26,
            "values per sample of a model input",
            "a 4096x4096 RGB image has 50 million",
        ),
        Limit(
            "KERAS_BN_MAX_ARCHIVE_BYTES",
            2**34,
            "bytes unpacked from a .keras or .npz archive (declared sizes of its members)",
            "16 GiB; a 1-billion-parameter float32 model needs 4",
        ),
        Limit(
            "KERAS_BN_MAX_COMPRESSION_RATIO",
            200,
            "unpacked bytes per packed byte of an archive member over 1 MiB",
            "Keras stores members uncompressed; deflate compresses weights under 10x",
        ),
        Limit(
            "KERAS_BN_MAX_ARCHIVE_MEMBERS",
            10_000,
            "members in a .keras or .npz archive",
            "a .keras file holds 3 plus its assets",
        ),
        Limit(
            "KERAS_BN_MAX_ARRAY_BYTES",
            2**32,
            "bytes of arrays in an .npz file (declared by their headers)",
            "4 GiB",
        ),
        Limit(
            "KERAS_BN_MAX_ONNX_BYTES",
            2**34,
            "bytes of an ONNX model with its external data",
            "16 GiB; a 1-billion-parameter float32 model needs 4",
        ),
    )
}


def limit_value(variable: str) -> int:
    """The limit in force: the environment variable's integer if set, else the default."""
    limit = LIMITS[variable]
    text = os.environ.get(variable)
    if text is None or not text.strip():
        return limit.default
    try:
        value = int(text)
    except ValueError:
        raise UserInputError(
            f"{variable} must be a positive integer; received {text!r}. Unset it to use "
            f"the default {limit.default:,}."
        ) from None
    if value < 1:
        raise UserInputError(f"{variable} must be a positive integer; received {text!r}.")
    return value


def refuse(variable: str, where: str, received: str) -> UserInputError:
    """The one-line error for a file beyond a limit: what, the limit, how to raise it.

    ``where`` names the file (and part), ``received`` what it declares, e.g.
    ``refuse("KERAS_BN_MAX_DIMENSION", "Model file 'm.keras'", "declares units=10**12
    in layer 'dense'")``.
    """
    limit = LIMITS[variable]
    return UserInputError(
        f"{where} {received}; keras-bn allows at most {limit_value(variable):,} {limit.what} "
        f"({limit.example}). Set the environment variable {variable} to raise the limit "
        "for a file you trust."
    )

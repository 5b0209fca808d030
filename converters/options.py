"""The converter's user-facing choices, as light tables (no numpy, Keras or ONNX import).

The CLI builds its ``choices`` from these tables and the library validates against
them, so the two cannot drift; importing this module costs nothing, so ``--help``
stays instant.
"""

from __future__ import annotations

import dataclasses

__all__ = ["CALIBRATION_METHODS", "INPUT_LAYOUTS", "PRECISIONS", "Precision"]

# onnxruntime's CalibrationMethod names offered for int8 (quantize_int8, the CLI's choices).
CALIBRATION_METHODS = ("MinMax", "Percentile", "Entropy")

# Layout of the exported ONNX model's inputs of rank >= 3.
INPUT_LAYOUTS: tuple[str, ...] = ("channels_last", "channels_first")


@dataclasses.dataclass(frozen=True)
class Precision:
    """A target precision and how validation judges its exported model by default.

    ``criterion`` says it in words (the rule itself is
    ``keras_bn.converters.comparison.judge_precision``; a test keeps the two in step).
    """

    name: str
    description: str
    criterion: str


PRECISIONS: dict[str, Precision] = {
    "float32": Precision(
        "float32",
        "float32 weights and compute (no conversion)",
        "error vs a float64 run of the Keras model at most 4x Keras's own (float32's, or "
        "float16's for a mixed-precision model) + 1e-5 of the output's range",
    ),
    "float16": Precision(
        "float16",
        "float16 weights and compute",
        "error vs Keras float32 at most 2x a float16 run of the Keras model's own + "
        "4 float16 roundings (2^-11) of the output's range",
    ),
    "int8": Precision(
        "int8",
        "int8 QDQ static quantization, per-channel weights",
        "SQNR vs Keras float32 at least 8 dB and, for class scores, top-1 agreement at "
        "least 90% on the 20+ samples whose top class leads by 5% of the range",
    ),
}

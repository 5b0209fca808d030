"""The converter's user-facing choices, as light tables (no numpy, Keras or ONNX import).

The CLI builds its ``choices`` from these tables and the library validates against
them, so the two cannot drift; importing this module costs nothing, so ``--help``
stays instant.
"""

from __future__ import annotations

import dataclasses

__all__ = ["INPUT_LAYOUTS", "PRECISIONS", "Precision"]

# Layout of the exported ONNX model's inputs of rank >= 3.
INPUT_LAYOUTS: tuple[str, ...] = ("channels_last", "channels_first")


@dataclasses.dataclass(frozen=True)
class Precision:
    """A target precision: the default validation tolerances for its exported model.

    ``atol``/``rtol`` of ``None`` mean the validator's own defaults (float32).
    """

    name: str
    atol: float | None
    rtol: float | None
    description: str


PRECISIONS: dict[str, Precision] = {
    "float32": Precision("float32", None, None, "float32 weights and compute (no conversion)"),
    "float16": Precision("float16", 1e-2, 1e-2, "float16 weights and compute"),
    "int8": Precision("int8", 1e-1, 1e-1, "int8 QDQ static quantization, per-channel weights"),
}

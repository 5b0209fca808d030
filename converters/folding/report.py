"""What folding decided: :class:`FoldReport` of :class:`FoldEntry` per BN call, and
the names of every reason a fold can be refused (:data:`PRECONDITIONS`)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

__all__ = ["PRECONDITIONS", "Blocked", "Direction", "FoldEntry", "FoldReport", "Fp16Risk"]

Direction = Literal["forward", "backward"]

# Every reason a fold can be refused, by name. Report entries list these names in
# `blocked_by`; their `reason` adds the specifics.
PRECONDITIONS: dict[str, str] = {
    "batch-norm-class": "the layer subclasses BatchNormalization but is not a class "
    "whose inference maths is known (keras.layers or keras_bn BatchNormalization)",
    "batch-norm-training": "the BN is called with training=True, so it normalizes "
    "with batch statistics, not its moving averages",
    "batch-norm-axis": "the BN does not normalize exactly the neighbour's channel axis",
    "producer-missing": "the BN's input is a model input, not a layer's output",
    "producer-rule": "the layer before the BN has no forward fold rule",
    "producer-activation": "the layer before the BN has a nonlinear activation",
    "producer-weights": "the layer before the BN has weights other than a float "
    "kernel and bias (quantized or LoRA-enabled)",
    "producer-shared": "the layer before the BN is called at several places",
    "producer-fanout": "the output of the layer before the BN is also used elsewhere "
    "(another layer or a model output)",
    "consumer-missing": "the BN's output feeds no layer (it is a model output)",
    "consumer-fanout": "the BN's output feeds several layers or is also a model output",
    "consumer-rule": "the layer after the BN has no backward fold rule",
    "consumer-weights": "the layer after the BN has weights other than a float "
    "kernel and bias (quantized or LoRA-enabled)",
    "consumer-shared": "the layer after the BN is called at several places",
    "consumer-padding": "the layer after the BN zero-pads its input, and the padded "
    "zeros would not be shifted by the BN offset",
    "consumer-precision": "the BN's input lies far from 0 against its spread (raw "
    "readings such as 1000 +- 1): folded into the layer after it, that layer would "
    "sum terms many times larger than its output in float32 and lose precision",
    "inside-wrapper": "the BN is wrapped in TimeDistributed: the export runs it on the "
    "merged batch and time axes as its per-channel Mul and Add, not folded",
    "inside-custom-layer": "the BN is called inside a custom layer's call() (Python "
    "code, not a graph of layers): the folded Keras model keeps it; the ONNX export "
    "(export_onnx(fold=True), keras-bn export) traces that call and folds it",
}


class Blocked(Exception):
    """A precondition that blocks one fold (internal control flow, never raised out)."""

    def __init__(self, precondition: str, detail: str):
        assert precondition in PRECONDITIONS, precondition
        super().__init__(f"{precondition}: {detail}")
        self.precondition = precondition


@dataclasses.dataclass(frozen=True)
class FoldEntry:
    """What happened to one BatchNormalization call.

    ``batch_norm`` and ``target`` are layer names in the input model (prefixed
    ``outer/inner/`` for layers of nested models). ``blocked_by`` names the
    preconditions (keys of :data:`PRECONDITIONS`) that blocked the forward and then
    the backward fold; ``reason`` says the same in words.
    """

    batch_norm: str
    folded: bool
    target: str | None = None
    direction: Direction | None = None
    reason: str | None = None
    blocked_by: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "blocked_by": list(self.blocked_by)}


@dataclasses.dataclass(frozen=True)
class Fp16Risk:
    """An output channel of a folded layer whose weights a float16 cast would damage.

    ``kind``: ``"overflow"`` (``value``, the largest absolute weight or bias, is
    beyond float16's 65504) or ``"underflow"`` (``value``, the channel's largest
    absolute weight, is below float16's smallest normal 6.1e-5).
    """

    layer: str
    channel: int
    value: float
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FoldReport:
    """The outcome of folding (or planning to fold) a model's BatchNormalization calls.

    ``max_abs_diff`` is the largest absolute difference between the original and
    folded models' outputs on ``measured_on`` inputs (None when nothing was measured,
    as with :func:`plan_folds`).
    """

    model: str
    entries: list[FoldEntry]
    fp16_risks: list[Fp16Risk]
    max_abs_diff: float | None = None
    measured_on: str | None = None

    @property
    def folded_count(self) -> int:
        return sum(entry.folded for entry in self.entries)

    @property
    def not_folded_count(self) -> int:
        return len(self.entries) - self.folded_count

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "folded_count": self.folded_count,
            "not_folded_count": self.not_folded_count,
            "max_abs_diff": self.max_abs_diff,
            "measured_on": self.measured_on,
            "entries": [entry.to_dict() for entry in self.entries],
            "fp16_risks": [risk.to_dict() for risk in self.fp16_risks],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        return self.format(verbose=True)

    def format(self, verbose: bool = True, planned: bool = False) -> str:
        """The report as text. ``verbose=False`` (what ``keras-bn`` prints without
        ``--verbose``): one line when every BN folded, else the table of those that
        did not; an output difference only when one was measured. ``planned``: the
        report of :func:`plan_folds` (its summary says "would fold")."""
        total = len(self.entries)
        if not verbose and total and self.not_folded_count == 0:
            verb = "would fold" if planned else "folded"
            layers = "layer" if total == 1 else "layers"
            lines = [f"{self.folded_count} of {total} BatchNormalization {layers} {verb}"]
        else:
            lines = [
                f"BatchNormalization folding of {self.model!r}: {self.folded_count} folded, "
                f"{self.not_folded_count} not folded"
            ]
            shown = self.entries if verbose else [e for e in self.entries if not e.folded]
            if shown:
                lines += _table(shown)
        if self.fp16_risks:
            lines.append(f"float16 risks ({len(self.fp16_risks)} channels):")
            for risk in self.fp16_risks if verbose else self.fp16_risks[:5]:
                lines.append(
                    f"  {risk.layer} channel {risk.channel}: {risk.kind}, |value| = {risk.value:.6g}"
                )
            if not verbose and len(self.fp16_risks) > 5:
                lines.append(f"  ... {len(self.fp16_risks) - 5} more (--verbose lists them)")
        if verbose and self.max_abs_diff is not None:
            lines.append(f"max abs output difference ({self.measured_on}): {self.max_abs_diff:.3g}")
        elif verbose and self.measured_on:
            lines.append(f"max abs output difference: {self.measured_on}")
        return "\n".join(lines)


def _table(entries: list[FoldEntry]) -> list[str]:
    rows = [("batch_norm", "folded", "direction", "target", "reason")]
    for entry in entries:
        rows.append(
            (
                entry.batch_norm,
                "yes" if entry.folded else "no",
                entry.direction or "-",
                entry.target or "-",
                entry.reason or "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  " + "  ".join([*cells, row[4]]).rstrip())
    return lines

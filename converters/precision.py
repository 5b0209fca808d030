"""Edge precision: float16 conversion and int8 static quantization of ONNX models.

Both passes use the maintained tools rather than hand-written graph surgery:
``onnxconverter_common.float16`` for float16 and ``onnxruntime.quantization`` for
int8. This module adds what they leave out: a range check before float16 conversion
and a comparison of the converted model against the float model.

Float16. The converter clamps every initializer into ``[-1e4, 1e4]`` by default
and lifts tiny values to ``1e-7``, with only a Python warning. We pass float16's
real limits instead (``65504`` and the smallest subnormal ``2**-24``), so values
are changed only where a plain cast would have turned them into ``inf`` or ``0``,
and :func:`check_float16_range` lists every initializer where that happens, with
counts, before converting. Folding makes this check matter: the folded kernel is
``kernel * gamma / sqrt(moving_variance + epsilon)``, so a channel with a tiny
moving variance gets a large scale that may not fit in float16.

Int8. Static quantization with QDQ nodes, per-channel symmetric int8 weights and
activation ranges calibrated on user data (MinMax). Fold BatchNormalization
*before* quantizing, for three reasons:

* Per-channel weight quantization then sees the effective kernel ``kernel * scale``.
  The BN scale differs per output channel, often by orders of magnitude; quantizing
  the unfolded kernel and applying the scale afterwards in a separate operator
  multiplies each channel's rounding error by that scale.
* Without folding, the activation between Conv and BN gets its own quantize/
  dequantize pair, calibrated on pre-normalization values whose per-channel ranges
  differ widely: one per-tensor int8 scale leaves the small channels a few levels.
  After folding that tensor no longer exists, so there is one rounding step less.
* Integer kernels (QLinearConv / ConvInteger) have no BatchNormalization
  counterpart; an unfolded BN stays in float between them, costing two extra
  conversions per layer on the device.

Every function writes its output atomically and never modifies its input.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import os
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keras_bn.converters import divergence, onnx_graph, runtime
from keras_bn.converters.comparison import (
    OutputComparison,
    compare_arrays,
    sqnr_db,
    top1_agreement,
)
from keras_bn.converters.errors import UserInputError
from keras_bn.converters.files import atomic_output
from keras_bn.converters.options import CALIBRATION_METHODS, PRECISIONS, Precision
from keras_bn.converters.runtime import onnx_input_specs  # the CLI's import

__all__ = [
    "CALIBRATION_METHODS",
    "FLOAT16_MAX",
    "FLOAT16_SMALLEST_SUBNORMAL",
    "PRECISIONS",
    "Precision",
    "Float16RangeIssue",
    "ModelComparison",
    "PrecisionReport",
    "check_float16_range",
    "compare_onnx_models",
    "compare_outputs",
    "convert_float16",
    "detect_precision",
    "onnx_input_specs",
    "quantize_int8",
]

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504.0
# The int8 file's comparison with the float model runs at validation's optimization
# level for int8 files (``runtime.validation_optimization``: the int8 kernels a
# deployment gets, or exact QDQ arithmetic for a signed file where they saturate), all
# samples in one run up to this many, so that ``keras-bn export``'s validation on the
# calibration data reuses that run (PrecisionReport.outputs).
_ONE_RUN_SAMPLES = 256
FLOAT16_SMALLEST_SUBNORMAL = float(2.0**-24)  # ~5.96e-8; a cast gives 0 below 2**-25
_PROTOBUF_LIMIT = 2**31 - 1  # bytes: a larger ModelProto cannot be serialized in memory
# Activations kept from the calibration run to judge each pair into a depthwise layer
# (per-channel equalization): the first samples' values of every such tensor, in all.
JUDGED_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class Float16RangeIssue:
    """An initializer with values that float16 cannot hold."""

    initializer: str
    overflow: int  # |x| > 65504: clamped to +-65504 (a cast would give inf)
    underflow: int  # 0 < |x| < 2**-24: set to +-2**-24 (a cast rounds to 0 below 2**-25)
    max_abs: float
    min_abs_nonzero: float
    # One value that only masks before a Softmax (attention's -1e9): at float16's
    # limit the Softmax gives the same probabilities, so its clamping changes nothing.
    masking: bool = False

    def __str__(self) -> str:
        if self.masking:
            return (
                f"{self.initializer}: a masking constant (|x| = {self.max_abs:.3g}) written "
                f"at float16's limit, +-{FLOAT16_MAX:g} (the Softmax it masks gives the same "
                "probabilities)"
            )
        parts = []
        if self.overflow:
            parts.append(
                f"{self.overflow} value(s) above {FLOAT16_MAX:g} (max |x| = {self.max_abs:.6g}) "
                f"clamped to {FLOAT16_MAX:g}"
            )
        if self.underflow:
            parts.append(
                f"{self.underflow} nonzero value(s) below {FLOAT16_SMALLEST_SUBNORMAL:.3g} "
                f"(min |x| = {self.min_abs_nonzero:.3g}) raised to "
                f"{FLOAT16_SMALLEST_SUBNORMAL:.3g}"
            )
        return f"{self.initializer}: " + "; ".join(parts)


@dataclasses.dataclass(frozen=True)
class ModelComparison:
    """How far a converted model's outputs are from the float model's on some data.

    ``outputs``: one :class:`~keras_bn.converters.comparison.OutputComparison` per
    model output (converted against float); the fields above summarize them.
    """

    samples: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float | None  # fraction of samples with the same argmax (classifiers)
    outputs: tuple[OutputComparison, ...] = ()
    sqnr_db: float | None = None  # the worst output's, against the float model

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff,
            "sqnr_db": self.sqnr_db,
            "top1_agreement": self.top1_agreement,
        }

    def __str__(self) -> str:
        text = (
            f"on {self.samples} sample(s): max |diff| {self.max_abs_diff:.3g}, "
            f"mean |diff| {self.mean_abs_diff:.3g}"
        )
        if self.sqnr_db is not None:
            text += f", SQNR {self.sqnr_db:.1f} dB"
        if self.top1_agreement is not None:
            text += f", top-1 agreement {self.top1_agreement:.1%}"
        return text


@dataclasses.dataclass
class PrecisionReport:
    """What a precision conversion did."""

    precision: str
    path: str
    seconds: float
    range_issues: list[Float16RangeIssue] = dataclasses.field(default_factory=list)
    comparison: ModelComparison | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    divergence: Any = None  # int8: divergence.DivergenceReport, per Keras layer
    # int8: the file's outputs on all the calibration samples, as onnxruntime gave them
    # in one run at validation's optimization level (None: run in several batches, or
    # not run): validation on the same samples reuses them (validate_onnx's
    # ``onnx_outputs``) instead of running the file again.
    outputs: list[np.ndarray] | None = dataclasses.field(default=None, repr=False)
    # int8: which of the file's outputs hold class scores (onnx_graph.class_score_outputs),
    # for validation's top-1 verdict without reading the file again.
    class_scores: list[bool] | None = dataclasses.field(default=None, repr=False)

    @property
    def clamped_count(self) -> int:
        return sum(issue.overflow + issue.underflow for issue in self.range_issues)

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "path": self.path,
            "seconds": round(self.seconds, 4),
            "clamped_count": self.clamped_count,
            "range_issues": [dataclasses.asdict(issue) for issue in self.range_issues],
            "comparison": None if self.comparison is None else self.comparison.to_dict(),
            **self.details,
            **({} if self.divergence is None else {"divergence": self.divergence.to_dict()}),
        }

    def __str__(self) -> str:
        lines = [f"{self.precision} model written to {self.path} in {self.seconds:.2f} s"]
        for issue in self.range_issues:
            lines.append(f"  out of float16 range: {issue}")
        if self.precision == "int8" and "calibration_method" in self.details:
            lines.append(f"  scheme: {_int8_scheme(self.details)}")
        rounding = self.details.get("weight_rounding")
        if rounding is not None and (rounding["rounded"] or not rounding["depthwise_only"]):
            from keras_bn.converters.weight_rounding import WeightRoundingReport

            lines.append(f"  {WeightRoundingReport(**rounding)}")
        if "bias_tuning" in self.details:
            from keras_bn.converters.bias_tuning import BiasTuningReport

            lines.append(f"  {BiasTuningReport(**self.details['bias_tuning'])}")
        if self.comparison is not None:
            # int8 is compared on the data it was calibrated on: say so (in-sample).
            where = "its calibration data, " if self.precision == "int8" else ""
            compared = str(self.comparison).removeprefix("on ")
            lines.append(f"  vs the float32 model on {where}{compared}")
        if "equalization" in self.details:
            from keras_bn.converters.equalization import describe

            lines += ["  " + line for line in describe(self.details["equalization"])]
        if self.divergence is not None:
            lines.append(self.divergence.format())
        return "\n".join(lines)


def _int8_scheme(details: Mapping[str, Any]) -> str:
    """One line on the int8 choices: weights, calibration, bias correction."""
    weights = "per-channel" if details.get("per_channel") else "per-tensor"
    text = (
        f"QDQ, {weights} symmetric int8 weights, asymmetric int8 activations, "
        f"{details['calibration_method']} calibration"
    )
    if "percentile" in details:
        text += f" ({details['percentile']}% of |x|)"
    rounding = details.get("weight_rounding")
    if rounding is not None and rounding["rounded"]:
        kind = "depthwise " if rounding.get("depthwise_only") else ""
        text += f", GPTQ weight rounding of {len(rounding['rounded'])} {kind}layer(s)"
    correction = details.get("bias_correction")
    if correction is not None:
        text += f", bias correction of {len(correction['layers'])} layer(s)"
    tuning = details.get("bias_tuning")
    if tuning is not None:
        text += f", bias tuning ({len(tuning['changed'])} layer(s) changed)"
    if details.get("storage") == "uint8":
        text += (
            "; stored as uint8 plus 128, the same values, which onnxruntime's x86 kernels "
            "cannot saturate on CPUs without VNNI (signed=True, --signed-int8: int8)"
        )
    elif runtime.validation_optimization("int8", signed=True) == runtime.EXACT_QDQ_OPTIMIZATION:
        text += (
            "; stored as int8, which onnxruntime's integer kernels saturate on this CPU "
            "(no VNNI): judged in exact QDQ arithmetic, as int32-accumulating runtimes "
            "compute it (run it in onnxruntime here without --signed-int8)"
        )
    return text


def _onnx():
    try:
        import onnx
    except ModuleNotFoundError as error:  # pragma: no cover - a declared dependency
        raise ModuleNotFoundError(
            "keras-bn's precision conversion needs onnx: pip install 'keras-bn' "
            "(onnx, onnxruntime and onnxconverter-common are its dependencies)."
        ) from error
    return onnx


def _load_onnx(path: str | os.PathLike):
    onnx = _onnx()
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"ONNX model {str(path)!r} does not exist; expected an .onnx file.")
    try:
        return onnx.load(str(path))
    except Exception as error:  # protobuf's DecodeError and friends: a bad file
        raise UserInputError(
            f"ONNX model {str(path)!r} cannot be parsed ({type(error).__name__}); "
            "expected an .onnx file written by keras-bn export."
        ) from None


def _float_tensors(model) -> Iterator[tuple[str, Any]]:
    """Every float32 tensor stored in the graph: initializers and Constant attributes."""
    onnx = _onnx()
    from onnx import numpy_helper

    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for initializer in graph.initializer:
            if initializer.data_type == onnx.TensorProto.FLOAT:
                yield initializer.name, numpy_helper.to_array(initializer)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    if attribute.t.data_type == onnx.TensorProto.FLOAT:
                        yield (
                            f"{node.name or node.op_type}.{attribute.name}",
                            (numpy_helper.to_array(attribute.t)),
                        )
                elif attribute.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(attribute.graphs)


def detect_precision(model) -> str:
    """The precision an ONNX model (a loaded ``ModelProto``) was converted to:
    ``"int8"`` (quantize nodes), ``"float16"`` (float16 initializers) or ``"float32"``."""
    onnx = _onnx()
    if any(node.op_type in ("QuantizeLinear", "QLinearConv") for node in model.graph.node):
        return "int8"
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer):
        return "float16"
    return "float32"


def check_float16_range(model_or_path) -> list[Float16RangeIssue]:
    """List the float32 initializers with values outside float16's range.

    ``overflow`` counts finite values with magnitude above 65504 (a cast gives inf),
    ``underflow`` nonzero values below the smallest subnormal 2**-24 (a cast gives 0
    below 2**-25). Values in the subnormal range above it lose relative precision
    but keep their magnitude.
    """
    model = (
        _load_onnx(model_or_path) if isinstance(model_or_path, str | os.PathLike) else model_or_path
    )
    issues = []
    masking: set[str] | None = None  # found where one value overflows
    for name, values in _float_tensors(model):
        # float32 compares exactly with both limits (powers of two, and 65504)
        magnitude = np.abs(values.ravel())
        big = magnitude > FLOAT16_MAX  # inf too, NaN never
        overflow = int(np.count_nonzero(big & np.isfinite(magnitude))) if big.any() else 0
        small = magnitude < FLOAT16_SMALLEST_SUBNORMAL
        underflow = int(np.count_nonzero(small & (magnitude > 0))) if small.any() else 0
        if overflow or underflow:
            finite = magnitude[np.isfinite(magnitude)].astype(np.float64)
            nonzero = finite[finite > 0]
            if overflow and values.size == 1 and masking is None:
                masking = _masking_constants(model.graph)
            issues.append(
                Float16RangeIssue(
                    initializer=name,
                    overflow=overflow,
                    underflow=underflow,
                    max_abs=float(finite.max()),
                    min_abs_nonzero=float(nonzero.min()),
                    masking=bool(overflow) and values.size == 1 and name in (masking or ()),
                )
            )
    return issues


# What a masking constant passes through on its way to the Softmax it masks
# (``Where(mask, scores, -1e9)``, ``scores + (1 - mask) * -1e9``).
_MASK_PASSING = {"Where", "Add", "Sub", "Mul", "Neg", "Cast", "Expand", "Unsqueeze", "Reshape"}


def _masking_constants(graph: Any) -> set[str]:
    """The stored values of ``graph`` (names as :func:`_float_tensors` gives them)
    that reach nothing but Softmax/LogSoftmax nodes, through ``_MASK_PASSING`` nodes."""
    readers = onnx_graph.readers(graph)
    outputs = {output.name for output in graph.output}
    stored = {tensor.name: tensor.name for tensor in graph.initializer}
    stored.update(
        {node.output[0]: f"{node.name or node.op_type}.value" for node in graph.node
         if node.op_type == "Constant"}
    )  # fmt: skip
    found = set()
    for tensor, name in stored.items():
        frontier, ends, seen = [tensor], set[str](), set[int]()
        while frontier and len(seen) < 64:
            value = frontier.pop()
            if value in outputs:  # the constant reaches an output: its value matters
                ends.add("output")
            for node in readers.get(value, ()):
                if node.op_type in _MASK_PASSING and id(node) not in seen:
                    seen.add(id(node))
                    frontier.extend(node.output)
                elif node.op_type not in _MASK_PASSING:
                    ends.add(node.op_type)
        if ends and ends <= {"Softmax", "LogSoftmax"} and not frontier:
            found.add(name)
    return found


def convert_float16(
    onnx_in: str | os.PathLike,
    onnx_out: str | os.PathLike,
    keep_io_types: bool = True,
    *,
    sample_inputs: Mapping[str, np.ndarray] | None = None,
) -> PrecisionReport:
    """Convert an ONNX model's weights and compute to float16.

    Args:
        onnx_in: the float32 model (not modified).
        onnx_out: where to write the float16 model (atomically).
        keep_io_types: keep float32 graph inputs and outputs (Cast nodes are added
            inside the graph), so callers feed and read float32 as before.
        sample_inputs: optional inputs (keyed by ONNX input name, float32) on which
            to compare the float16 model with the float32 one.

    Returns:
        A :class:`PrecisionReport` whose ``range_issues`` list every initializer
        with values float16 cannot hold (clamped to the float16 limits; nothing
        else is changed) and, with ``sample_inputs``, the output comparison.
    """
    from onnxconverter_common import float16

    start = time.perf_counter()
    model = _load_onnx(onnx_in)
    float32_compute(model)  # a mixed-precision export: converted from float32 as any other
    issues = check_float16_range(model)
    _outputs_read_once(model)
    _constants_unshared(model, float16.DEFAULT_OP_BLOCK_LIST)
    kept_float32 = _transposes_into_matmul(model)
    with warnings.catch_warnings():
        # The converter warns once per clamped tensor; check_float16_range reports them.
        warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
        converted = float16.convert_float_to_float16(
            model,
            min_positive_val=FLOAT16_SMALLEST_SUBNORMAL,
            max_finite_val=FLOAT16_MAX,
            keep_io_types=keep_io_types,
            check_fp16_ready=False,  # float32_compute made any float16 graph float32
            node_block_list=kept_float32,
        )
    _casts_to_float16(converted)
    _save_onnx(converted, onnx_out)
    report = PrecisionReport(
        precision="float16",
        path=str(onnx_out),
        seconds=0.0,
        range_issues=issues,
        details={"keep_io_types": keep_io_types},
    )
    if sample_inputs is not None:
        report.comparison = compare_onnx_models(onnx_in, onnx_out, sample_inputs)
    report.seconds = time.perf_counter() - start
    return report


def _outputs_read_once(model) -> None:
    """Give each graph output that nodes of the graph also read an Identity of its
    own, in place: the nodes read the producer's output under a new name, the graph
    output keeps its name. The float16 converter, keeping float32 outputs, casts such
    an output back to float32 for its readers too (a text backbone's pooler reads its
    sequence output), and onnxruntime refused the file."""
    onnx = _onnx()
    graph = model.graph
    read = {name for node in graph.node for name in node.input}
    shared = [output.name for output in graph.output if output.name in read]
    renamed = {name: f"{name}/graph_output_source" for name in shared}
    if not renamed:
        return
    for node in graph.node:
        node.output[:] = [renamed.get(name, name) for name in node.output]
        node.input[:] = [renamed.get(name, name) for name in node.input]
    graph.node.extend(
        onnx.helper.make_node("Identity", [source], [name], name=f"{name}/graph_output")
        for name, source in renamed.items()
    )


def _constants_unshared(model, kept_float32: Collection[str]) -> None:
    """Give the nodes the float16 converter keeps in float32 (``kept_float32``: its
    block list, Range among them) copies of the float initializers they share with
    other nodes, in place. The converter leaves such a shared initializer float32 for
    every reader, and onnxruntime refused the file (GPT-2's position ids: a Range and
    an Add of the same scalar)."""
    onnx = _onnx()
    graph = model.graph
    floats = {
        tensor.name: tensor
        for tensor in graph.initializer
        if tensor.data_type == onnx.TensorProto.FLOAT
    }
    kept: set[str] = set()
    other: set[str] = set()
    for node in graph.node:
        (kept if node.op_type in kept_float32 else other).update(node.input)
    copies = {}
    for name in sorted(kept & other & floats.keys()):
        copy = graph.initializer.add()
        copy.CopyFrom(floats[name])
        copy.name = copies[name] = f"{name}/float32"
    for node in graph.node:
        if node.op_type in kept_float32:
            node.input[:] = [copies.get(name, name) for name in node.input]


def _transposes_into_matmul(model) -> list[str]:
    """The names of the 3-D Transposes that a MatMul reads (every node named first, in
    place, where it has no name), for the float16 converter to keep in float32 between
    Casts of its own. In float16, ``Transpose -> MatMul`` on a 3-D tensor crashes
    onnxruntime's x86 session set-up at its default optimization level (a
    segmentation fault: its NCHWc transformer dereferences the Cast it inserted in
    front of the MatMul, which has no float16 kernel there: onnxruntime issue
    28392). An LSTM's sequence output into a Dense layer has that pattern. The MatMul
    computes in float32 on those CPUs either way."""
    graph = model.graph
    for index, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}/float16_named"
    matmul_inputs = {name for node in graph.node if node.op_type == "MatMul" for name in node.input}
    return [
        node.name
        for node in graph.node
        if node.op_type == "Transpose"
        and node.output[0] in matmul_inputs
        and len(next((a.ints for a in node.attribute if a.name == "perm"), ())) == 3
    ]


def _casts_to_float16(model) -> None:
    """Make each Cast to float32 whose output the float16 converter declared float16 a
    Cast to float16, in place. The converter retypes every float tensor but keeps a
    Cast's ``to``: a model's own cast to float32 (the embedding lookups of KerasHub's
    text backbones) left a file onnxruntime refuses. Its own casts at the inputs and
    outputs are declared float32 and stay."""
    onnx = _onnx()
    declared = {
        info.name: info.type.tensor_type.elem_type
        for info in [*model.graph.value_info, *model.graph.output]
    }
    for node in model.graph.node:
        if node.op_type != "Cast" or declared.get(node.output[0]) != onnx.TensorProto.FLOAT16:
            continue
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == onnx.TensorProto.FLOAT:
                attribute.i = onnx.TensorProto.FLOAT16


def float32_compute(model) -> bool:
    """Make a mixed-precision graph compute in float32, in place; whether anything changed.

    The export is faithful to a Keras mixed-precision policy (``mixed_float16``: float16
    kernels, a Cast to float16 in front of each layer, a float32 graph output). Converting
    such a file to float16 or int8 starts from the float32 computation instead, as it
    would for a model trained in float32: float16 initializers and constants become
    float32 (exactly), Casts to a 16-bit float cast to float32, and tensors declared
    16-bit float are declared float32. A graph input or output declared 16-bit float
    keeps its type, through a Cast."""
    onnx = _onnx()
    from onnx import numpy_helper

    halves = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    changed = False

    def widened(tensor) -> Any:
        return numpy_helper.from_array(
            numpy_helper.to_array(tensor).astype(np.float32), tensor.name
        )

    widened_casts: list[Any] = []
    kept = {  # a graph output's own Cast to its 16-bit type stays
        info.name for info in model.graph.output if info.type.tensor_type.elem_type in halves
    }
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for index, tensor in enumerate(graph.initializer):
            if tensor.data_type in halves:
                graph.initializer[index].CopyFrom(widened(tensor))
                changed = True
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type in halves:
                    attribute.t.CopyFrom(widened(attribute.t))
                    changed = True
                elif (
                    node.op_type == "Cast"
                    and attribute.name == "to"
                    and attribute.i in halves
                    and node.output[0] not in kept
                ):
                    attribute.i = onnx.TensorProto.FLOAT
                    widened_casts.append((graph, node))
                    changed = True
                elif attribute.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(attribute.graphs)
        for info in graph.value_info:
            if info.type.tensor_type.elem_type in halves:
                info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
                changed = True
    if changed:
        _edges_keep_their_types(model.graph, halves)
        _float_casts_removed(model, widened_casts)
    return changed


def _float_casts_removed(model, casts: list[tuple[Any, Any]]) -> None:
    """Remove each of ``casts`` (``(graph, node)``, now casting to float32) whose input is
    float32 too: its readers read that input. onnxconverter-common's float16 converter
    drops such a Cast after a graph input and then reads the input as float16."""
    onnx = _onnx()
    inferred, _ = _shape_inferred(model)
    types = {
        info.name: info.type.tensor_type.elem_type
        for info in [*inferred.graph.value_info, *inferred.graph.input]
    }
    types.update({tensor.name: tensor.data_type for tensor in model.graph.initializer})
    outputs = {info.name for info in model.graph.output}
    renamed = {
        node.output[0]: node.input[0]
        for graph, node in casts
        if graph is model.graph
        and node.output[0] not in outputs
        and types.get(node.input[0]) == onnx.TensorProto.FLOAT
    }
    if not renamed:
        return
    kept = [
        node
        for node in model.graph.node
        if not (node.op_type == "Cast" and node.output[0] in renamed)
    ]
    for node in kept:  # a removed Cast's input may itself be a removed Cast's output
        node.input[:] = [_followed(renamed, name) for name in node.input]
    del model.graph.node[:]
    model.graph.node.extend(kept)


def _followed(renamed: Mapping[str, str], name: str) -> str:
    while name in renamed:
        name = renamed[name]
    return name


def _edges_keep_their_types(graph, halves: tuple[int, ...]) -> None:
    """After :func:`float32_compute`: a graph input declared 16-bit float gets a Cast to
    float32 in front of its readers, a graph output one back to its type."""
    onnx = _onnx()
    from onnx import helper

    for info in graph.input:
        kind = info.type.tensor_type.elem_type
        if kind in halves and not any(i.name == info.name for i in graph.initializer):
            inside = f"{info.name}/float32"
            for node in graph.node:
                node.input[:] = [inside if name == info.name else name for name in node.input]
            cast = helper.make_node("Cast", [info.name], [inside], to=onnx.TensorProto.FLOAT)
            graph.node.insert(0, cast)
    producers = onnx_graph.producers(graph)
    for info in graph.output:
        kind = info.type.tensor_type.elem_type
        if kind in halves and getattr(producers.get(info.name), "op_type", None) != "Cast":
            inside = f"{info.name}/float32"
            for node in graph.node:
                node.output[:] = [inside if name == info.name else name for name in node.output]
                node.input[:] = [inside if name == info.name else name for name in node.input]
            graph.node.append(helper.make_node("Cast", [inside], [info.name], to=kind))


def _save_onnx(model, path: str | os.PathLike) -> None:
    onnx = _onnx()
    with atomic_output(path, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))


def compare_onnx_models(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    inputs: Mapping[str, np.ndarray],
) -> ModelComparison:
    """Run two ONNX models on ``inputs`` and measure how far the candidate is.

    The measures are :mod:`.comparison`'s, those validation judges float16 and int8
    by: the SQNR (the worst output's) and, when the (first) output looks like class
    scores (rank 2 with at least two classes), the top-1 agreement. The verdict
    itself is validation's, against the Keras model (``validate_onnx``).
    """
    expected = runtime.run(runtime.open_session(reference, spinning=False), inputs)
    received = runtime.run(runtime.open_session(candidate, spinning=False), inputs)
    return compare_outputs(expected, received)


def compare_outputs(
    expected: Sequence[np.ndarray], received: Sequence[np.ndarray], *, scores: bool = True
) -> ModelComparison:
    """:func:`compare_onnx_models`'s measures of outputs already computed: the float
    model's (``expected``) against the converted one's (``received``), in output order;
    ``scores=False``: the first output is not class scores (no top-1 agreement)."""
    if len(expected) != len(received):
        raise ValueError(
            f"the float model has {len(expected)} output(s), the converted one {len(received)}"
        )
    expected = [np.asarray(e) for e in expected]
    received = [np.asarray(r) for r in received]
    outputs = tuple(
        compare_arrays(r, e, name=f"output {i}")
        for i, (e, r) in enumerate(zip(expected, received, strict=True))
    )
    sizes = [max(int(np.prod(c.shape)), 0) for c in outputs]
    first_expected, first_received = expected[0], received[0]
    return ModelComparison(
        samples=int(first_expected.shape[0]),
        max_abs_diff=max(c.max_abs_error for c in outputs),
        mean_abs_diff=sum(c.mean_abs_error * n for c, n in zip(outputs, sizes, strict=True))
        / max(sum(sizes), 1),
        top1_agreement=top1_agreement(first_received, first_expected) if scores else None,
        outputs=outputs,
        sqnr_db=min(sqnr_db(r, e) for e, r in zip(expected, received, strict=True)),
    )


def quantize_int8(
    onnx_in: str | os.PathLike,
    onnx_out: str | os.PathLike,
    calibration_inputs: Mapping[str, np.ndarray],
    *,
    per_channel: bool = True,
    signed: bool = False,
    calibration_batch_size: int = 16,
    equalize: bool | str | None = None,
    batch_norm_statistics: Mapping[str, Any] | None = None,
    layer_report: bool = True,
    float_outputs: Sequence[np.ndarray] | Callable[[], Sequence[np.ndarray] | None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    calibration_method: str = "Percentile",
    bias_correction: bool = True,
    percentile: float = 99.99,
    tune_biases: bool = False,
    tuning_progress: Callable[[int, int], None] | None = None,
    round_weights: bool | str | None = None,
    rounding_progress: Callable[[int, int], None] | None = None,
) -> PrecisionReport:
    """Quantize an ONNX model to int8 (static, QDQ, per-channel weights).

    Args:
        onnx_in: the float32 model (not modified). Fold BatchNormalization first.
        onnx_out: where to write the quantized model (atomically).
        calibration_inputs: inputs that look like deployment data, keyed by ONNX input
            name (any key for one input), batch first, in the ONNX model's layout.
        per_channel: one weight scale per output channel (recommended).
        signed: store int8 (S8S8); else the same values as uint8 (:mod:`.int8_storage`).
        calibration_batch_size: samples per calibration run (for dynamic batches).
        equalize: cross-layer equalization and high-bias absorption (:mod:`.equalization`;
            ``batch_norm_statistics`` serve pairs without ReLU); ``"depthwise"``: only the
            pairs into depthwise layers; None: those with per-channel weights, none per-tensor.
        layer_report: compare the two models at every Keras layer output too (on the
            first calibration samples, :mod:`.divergence`).
        float_outputs: the float model's outputs on ``calibration_inputs`` (or a
            callable giving them, or None, later), instead of running ``onnx_in``.
        progress: called as ``progress(done, total)`` after each calibration batch.
        calibration_method: ``"MinMax"``, ``"Percentile"`` (keeps ``percentile`` % of
            |x|; the best on the testbeds, BENCHMARKS 19b) or ``"Entropy"``.
        bias_correction: then correct the mean output shift that rounding each layer's
            weights causes, from the calibration data (:mod:`.bias_correction`).
        tune_biases: then tune each bias in the quantized model itself, keeping each
            change that brings its outputs closer to the float model's (:mod:`.bias_tuning`;
            two runs per layer, each reported as ``tuning_progress(done, total)``).
        round_weights: choose the int8 weights against each layer's inputs on the
            calibration data (GPTQ, :mod:`.weight_rounding`), before bias correction;
            reported as ``rounding_progress(done, total)``. ``"depthwise"``: only the
            depthwise layers' (9 weights per channel, the coarsest); None: those with
            per-channel weights, every layer's per-tensor.

    Returns:
        A :class:`PrecisionReport`: ``comparison`` (with the float model on the
        calibration data), ``divergence`` (``layer_report``'s worst layers).
    """
    start = time.perf_counter()
    model, matched, batches = _calibration(
        onnx_in, calibration_inputs, calibration_batch_size, calibration_method, percentile
    )
    onnx_out = Path(onnx_out)
    with _float32_source(onnx_in, model) as source:
        with atomic_output(onnx_out, suffix=".onnx") as tmp:
            steps = _write_int8(
                source, model, tmp, matched, batches,
                per_channel=per_channel, signed=signed, calibration_method=calibration_method,
                progress=progress, batch_norm_statistics=batch_norm_statistics,
                equalize=equalize,
                round_weights=round_weights, rounding_progress=rounding_progress,
                bias_correction=bias_correction, tune_biases=tune_biases,
                tuning_progress=tuning_progress, layer_report=layer_report, percentile=percentile,
            )  # fmt: skip
        expected = float_outputs() if callable(float_outputs) else float_outputs
        weights = (per_channel, signed)
        report = _int8_report(source, onnx_out, matched, expected, weights, steps.int8_run, model)
    _record_steps(report, calibration_method, percentile, steps)
    report.divergence = steps.divergence
    report.seconds = time.perf_counter() - start
    return report


@dataclasses.dataclass
class _Int8Steps:
    """What :func:`_write_int8`'s steps reported, each None where it did not run, and
    the int8 file's run on the matched samples (:func:`_int8_outputs`)."""

    equalization: Any = None
    weight_rounding: Any = None
    bias_correction: Any = None
    bias_tuning: Any = None
    divergence: Any = None
    int8_run: Any = None

    def reports(self) -> dict[str, Any]:
        """The steps' reports by ``details`` key, in the order they ran."""
        keys = ("equalization", "weight_rounding", "bias_correction", "bias_tuning")
        return {key: getattr(self, key) for key in keys if getattr(self, key) is not None}


def _record_steps(
    report: PrecisionReport, calibration_method: str, percentile: float, steps: _Int8Steps
) -> None:
    """The int8 scheme in ``report.details``: the calibration method, and the reports of
    the steps that ran."""
    report.details["calibration_method"] = calibration_method
    report.details.update({"percentile": percentile} if calibration_method == "Percentile" else {})
    report.details.update({key: step.to_dict() for key, step in steps.reports().items()})


@contextlib.contextmanager
def _float32_source(onnx_in: str | os.PathLike, model: Any) -> Iterator[Path]:
    """The file int8 quantization reads: ``onnx_in``, or where ``model`` (``onnx_in``
    loaded) is a mixed-precision graph, its :func:`float32_compute` copy in a temporary
    folder (``model`` is made that copy too) for the duration."""
    if not float32_compute(model):
        yield Path(onnx_in)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="keras-bn-float32-") as folder:
        source = Path(folder) / Path(onnx_in).name
        _onnx().save(model, str(source))
        yield source


def _int8_report(
    onnx_in: str | os.PathLike,
    onnx_out: Path,
    matched: Mapping[str, np.ndarray],
    float_outputs: Sequence[np.ndarray] | None,
    weights: tuple[bool, bool],
    int8_run: tuple[list[np.ndarray] | None, list[np.ndarray]],
    model: Any,
) -> PrecisionReport:
    """The int8 file's outputs (``int8_run``, :func:`_int8_outputs`) compared with the
    float model's (or ``float_outputs``) on ``matched``; ``weights``: (per-channel,
    signed); ``model``: the float ``ModelProto``, whose outputs that hold class scores
    get a top-1 agreement (the first) and are named for validation."""
    scores = onnx_graph.class_score_outputs(model)
    per_channel, signed = weights
    kept, received = int8_run
    if float_outputs is None:
        float_outputs = runtime.run(runtime.open_session(onnx_in, spinning=False), matched)
    return PrecisionReport(
        precision="int8",
        path=str(onnx_out),
        seconds=0.0,
        comparison=compare_outputs(float_outputs, received, scores=scores[:1] == [True]),
        details={
            "quant_format": "QDQ",
            "per_channel": per_channel,
            "storage": "int8" if signed else "uint8",
            "calibration_samples": int(len(next(iter(matched.values())))),
        },
        outputs=kept,
        class_scores=scores,
    )


def _int8_outputs(
    path: Path, matched: Mapping[str, np.ndarray], signed: bool
) -> tuple[list[np.ndarray] | None, list[np.ndarray]]:
    """The int8 file's outputs on ``matched``, in float64, and the raw outputs when they
    came from one run of every sample (as validation runs them), else None."""
    level = runtime.validation_optimization("int8", signed)
    session = runtime.open_session(path, optimization=level, spinning=False)
    count = int(len(next(iter(matched.values()))))
    one_run = runtime.fixed_batch_size(runtime.input_specs(session)) is None
    if one_run and count <= _ONE_RUN_SAMPLES:
        feed = runtime.match_inputs(runtime.input_specs(session), matched, "Calibration data")
        kept = [np.asarray(output) for output in session.run(None, feed)]
        return kept, [output.astype(np.float64) for output in kept]
    return None, runtime.run(session, matched)


def _calibration(
    onnx_in: str | os.PathLike,
    calibration_inputs: Mapping[str, np.ndarray],
    batch_size: int,
    method: str,
    percentile: float = 99.99,
) -> tuple[Any, dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """The float model (loaded), its calibration inputs matched to its graph inputs,
    and those in batches; one-line errors for bad inputs or an unknown method."""
    if method not in CALIBRATION_METHODS:
        raise UserInputError(
            f"Unknown calibration method {method!r}; expected one of "
            f"{', '.join(CALIBRATION_METHODS)}."
        )
    if not 50 <= percentile <= 100:
        raise UserInputError(
            f"Invalid percentile: expected a share of |x| in [50, 100]. Received: {percentile!r}"
        )
    model = _load_onnx(onnx_in)  # a clear error for a missing or unparsable file
    specs = _graph_input_specs(model)
    matched = runtime.match_inputs(specs, calibration_inputs, "Calibration data")
    batches = list(runtime.batches(matched, runtime.fixed_batch_size(specs), batch_size))
    return model, matched, batches


def _write_int8(
    onnx_in: Path,
    model: Any,
    tmp: Path,
    matched: Mapping[str, np.ndarray],
    batches: list[dict[str, np.ndarray]],
    *,
    per_channel: bool,
    signed: bool,
    calibration_method: str,
    progress: Callable[[int, int], None] | None,
    equalize: bool | str | None,
    batch_norm_statistics: Mapping[str, Any] | None,
    bias_correction: bool,
    layer_report: bool,
    percentile: float = 99.99,
    tune_biases: bool = False,
    tuning_progress: Callable[[int, int], None] | None = None,
    round_weights: bool | str | None = False,
    rounding_progress: Callable[[int, int], None] | None = None,
) -> _Int8Steps:
    """:func:`quantize_int8`'s steps, writing ``tmp``: their reports, and the int8
    file's run on ``matched`` (:func:`_int8_outputs`, beside the layer report)."""
    steps = _Int8Steps()
    equalize, round_weights = _choices(per_channel, equalize, round_weights)
    # The equalized float file lies beside the output while quantizing; bias correction
    # and the layer report compare against it (equalization rescales channels).
    target = tmp.with_name(tmp.stem + ".equalized.onnx")
    source = onnx_in
    try:
        if equalize:
            steps.equalization = _equalize(
                onnx_in, model, target, batches, batch_norm_statistics, per_channel,
                depthwise_only=equalize == "depthwise",
                percentile=percentile if calibration_method == "Percentile" else 100.0,
            )  # fmt: skip
        if steps.equalization is not None:
            source = target
            model = _load_onnx(source)
        # The layer report's float side: the calibration pass keeps its values.
        keep = divergence.compared_values(model) if layer_report else []
        keep_samples = divergence.compared_samples(
            _graph_input_specs(model), len(next(iter(matched.values())))
        )
        quantized, moments, float_values = _quantize_static(
            source,
            model,
            tmp,
            batches,
            per_channel,
            calibration_method,
            progress,
            percentile,
            measure_biases=bool(bias_correction),
            keep=keep,
            keep_samples=keep_samples,
        )
        quantized = _refine(
            model, quantized, batches, moments, steps,
            round_weights=round_weights, rounding_progress=rounding_progress,
            bias_correction=bias_correction,
            tune_biases=tune_biases, tuning_progress=tuning_progress,
        )  # fmt: skip
        _save_int8(quantized, tmp, signed)
        int8_run = _start(_int8_outputs, tmp, matched, signed)
        if layer_report:  # both models as they are in memory (the files hold the same)
            steps.divergence = divergence.layer_divergence(
                model, quantized, matched, float_values=float_values
            )
    finally:
        target.unlink(missing_ok=True)
    steps.int8_run = int8_run.result()  # before tmp is moved
    return steps


def _choices(
    per_channel: bool, equalize: bool | str | None, round_weights: bool | str | None
) -> tuple[bool | str, bool | str]:
    """``equalize`` and ``round_weights`` checked, None replaced by the default: the
    depthwise layers' with per-channel weights (the others lose little there); per-tensor
    every layer's rounding and no equalization (the CLI's ``--per-tensor`` asks for it)."""
    for name, value in (("equalize", equalize), ("round_weights", round_weights)):
        if value not in (True, False, "depthwise", None):
            raise UserInputError(
                f"{name}: expected True, False or 'depthwise'. Received: {value!r}"
            )
    if equalize is None:
        equalize = "depthwise" if per_channel else False
    if round_weights is None:
        round_weights = "depthwise" if per_channel else True
    return equalize, round_weights


def _refine(
    model: Any,
    quantized: Any,
    batches: list[dict[str, np.ndarray]],
    moments: Any,
    steps: _Int8Steps,
    *,
    round_weights: bool | str,
    rounding_progress: Callable[[int, int], None] | None,
    bias_correction: bool,
    tune_biases: bool,
    tuning_progress: Callable[[int, int], None] | None,
) -> Any:
    """The steps after onnxruntime's quantizer, in order, each recorded in ``steps``:
    GPTQ weight rounding (``"depthwise"``: those layers only), bias correction (from the
    calibration pass's ``moments``), bias tuning."""
    if round_weights:
        from keras_bn.converters import weight_rounding

        quantized, steps.weight_rounding = weight_rounding.round_weights(
            model, quantized, batches, depthwise_only=round_weights == "depthwise",
            progress=rounding_progress,
        )  # fmt: skip
    if bias_correction:
        quantized, steps.bias_correction = _correct_biases(model, quantized, batches, moments)
    if tune_biases:
        from keras_bn.converters import bias_tuning

        quantized, steps.bias_tuning = bias_tuning.tune_biases(
            model, quantized, batches, progress=tuning_progress
        )
    return quantized


def _save_int8(quantized: Any, path: Path, signed: bool) -> None:
    """Write the QDQ model, its integers stored as uint8 unless ``signed``
    (:mod:`.int8_storage`)."""
    if not signed:
        from keras_bn.converters.int8_storage import store_unsigned

        store_unsigned(quantized)
    _onnx().save(quantized, str(path))


def _equalize(
    onnx_in: Path,
    model: Any,
    onnx_out: Path,
    batches: list[dict[str, np.ndarray]],
    batch_norm_statistics: Mapping[str, Any] | None,
    per_channel: bool,
    *,
    depthwise_only: bool = False,
    percentile: float = 100.0,
) -> Any:
    """:func:`.equalization.equalize_file` of ``onnx_in`` (``model`` loaded) to
    ``onnx_out``, or None when ``depthwise_only`` finds no pair into a depthwise layer.
    With ``per_channel`` weights there, each pair is judged on the first calibration
    samples (up to ``JUDGED_BYTES`` of its activations; tensor ranges at
    ``percentile``) and left unscaled where equalizing would round it coarser.

    Each bias is absorbed through a ReLU up to its channel's lowest value on the
    calibration ``batches``, not the BN statistics' ``mean - 3 std`` (which
    EfficientNet-Lite0's pre-activations pass often enough to take its float model to
    24 dB SQNR). With ``per_channel`` weights the activation ranges that bound the
    factors are the measured ones too: there only the activations' rounding moves
    (+1 to 2 dB on both testbeds); with per-tensor weights the statistics' guess lets
    the factors equalize more weights, which did better on EfficientNet-Lite0
    (BENCHMARKS.md, section 30). The same float run gives the outputs the equalized
    model is compared with (``float_sqnr_db``, on the first batch)."""
    from keras_bn.converters import calibration
    from keras_bn.converters.equalization import ChannelExtremes, equalize_file, pair_outputs

    sources = pair_outputs(model, depthwise_only)
    if depthwise_only and not sources:
        return None
    judging = per_channel and depthwise_only
    measured, expected, kept = calibration.channel_extremes(
        model, batches, sources.values(), kept_bytes=JUDGED_BYTES if judging else 0
    )
    extremes = {
        first: ChannelExtremes(measured[tensor][0], measured[tensor][1] if per_channel else None)
        for first, tensor in sources.items()
    }
    report = equalize_file(
        onnx_in,
        onnx_out,
        batch_norm_statistics,
        extremes,
        depthwise_only,
        judged_on={first: kept[tensor] for first, tensor in sources.items()} if kept else None,
        percentile=percentile,
    )
    # The equalized model against the original on the first calibration batch (a
    # check of the rewrite: one more float run of every sample would cost more).
    first = batches[0]
    count = len(next(iter(first.values())))
    received = runtime.run(runtime.open_session(onnx_out, spinning=False), first)
    report.float_sqnr_db = compare_outputs([e[:count] for e in expected], received).sqnr_db
    report.float_samples = count
    return report


def _start(function: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
    """``function(*args)`` in a background thread (onnxruntime runs without the GIL)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(function, *args)
    pool.shutdown(wait=False)
    return future


def _graph_input_specs(model: Any) -> list[runtime.InputSpec]:
    """The graph inputs of a loaded ONNX model, as :func:`.runtime.input_specs` reads
    them from a session (initializers listed as inputs left out), without opening one."""
    from onnx.helper import tensor_dtype_to_np_dtype

    initializers = {tensor.name for tensor in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        specs.append(
            runtime.InputSpec(value.name, shape, str(tensor_dtype_to_np_dtype(tensor.elem_type)))
        )
    return specs


def _preprocess(model: Any) -> Any:
    """``quant_pre_process(skip_optimization=True, skip_symbolic_shape=True)``'s work on
    a model in memory: ONNX shape inference and the pre-processed mark (a new
    ``ModelProto``; ``model`` is left as it was).

    Shape inference runs on a copy whose large float initializers have no data (shapes
    come from integer tensors; the weights only cost two trips of their bytes through
    protobuf, a third of a second on ResNet50), and their data is put back after."""
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    inferred, emptied = _shape_inferred(model)
    for index in emptied:
        inferred.graph.initializer[index].raw_data = model.graph.initializer[index].raw_data
    _pad_within_max_pooling(inferred)
    add_pre_process_metadata(inferred)
    return inferred


def _shape_inferred(model: Any) -> tuple[Any, list[int]]:
    """ONNX shape inference on a copy of ``model`` whose large float initializers have no
    data (:func:`_preprocess`), and the indices of those initializers."""
    onnx = _onnx()
    light = onnx.ModelProto()
    light.CopyFrom(model)
    emptied = [
        index
        for index, tensor in enumerate(light.graph.initializer)
        if tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.raw_data) > _DATA_KEPT
    ]
    for index in emptied:
        light.graph.initializer[index].ClearField("raw_data")
    return onnx.shape_inference.infer_shapes(light), emptied


def _pad_within_max_pooling(model: Any) -> None:
    """Give each MaxPool the -inf padding a Pad node in front of it adds (KerasHub's
    ResNetV2 pads with ``ops.pad(x, constant_values=-inf)`` before max pooling) as its
    own ``pads``, which pad with -inf by definition, in place. Quantized, the Pad would
    read its -inf as a weight (scale inf, a NaN pad value); MaxPool keeps its input's
    scale. Only a Pad read by that MaxPool alone, padding the spatial axes by less
    than the kernel (onnxruntime's limit) of a MaxPool without padding of its own."""
    onnx = _onnx()
    from onnx import numpy_helper

    graph = model.graph
    arrays = {tensor.name: tensor for tensor in graph.initializer}
    producers, readers = onnx_graph.producers(graph), onnx_graph.readers(graph)
    outputs = {output.name for output in graph.output}
    merged = []
    for pool in graph.node:
        pad = producers.get(pool.input[0]) if pool.op_type == "MaxPool" else None
        if pad is None or pad.op_type != "Pad" or len(pad.input) != 3:
            continue
        if pad.output[0] in outputs or len(readers[pad.output[0]]) != 1:
            continue
        if pad.input[1] not in arrays or pad.input[2] not in arrays:
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in pool.attribute}
        mode = {a.name: a.s for a in pad.attribute}.get("mode", b"constant")
        value = numpy_helper.to_array(arrays[pad.input[2]])
        widths = numpy_helper.to_array(arrays[pad.input[1]]).reshape(2, -1)
        kernel = list(attributes["kernel_shape"])
        if mode != b"constant" or value.size != 1 or float(value.reshape(-1)[0]) != -np.inf:
            continue
        if widths.shape[1] != 2 + len(kernel) or widths[:, :2].any() or (widths < 0).any():
            continue
        if (widths[:, 2:] >= np.array(kernel)).any() or any(attributes.get("pads", [])):
            continue
        if attributes.get("auto_pad", b"NOTSET") != b"NOTSET":
            continue
        for attribute in [a for a in pool.attribute if a.name == "pads"]:
            pool.attribute.remove(attribute)
        pool.attribute.append(
            onnx.helper.make_attribute("pads", widths[:, 2:].reshape(-1).tolist())
        )
        pool.input[0] = pad.input[0]
        merged.append(pad)
    for pad in merged:
        graph.node.remove(pad)
    if merged:
        from keras_bn.converters.onnx.export import all_nodes

        read = {name for node in all_nodes(graph) for name in node.input}  # subgraphs too
        constants = {name for pad in merged for name in pad.input[1:]} - read
        for tensor in [t for t in graph.initializer if t.name in constants]:
            graph.initializer.remove(tensor)
        gone = {pad.output[0] for pad in merged}
        for info in [v for v in graph.value_info if v.name in gone]:
            graph.value_info.remove(info)


_DATA_KEPT = 4096  # bytes of a float initializer's data that shape inference still sees

MASK_FILL = -1e4  # a constant at or below it, selected by a Where into a Softmax: a mask
_FLOAT_TYPES = (1, 10, 11, 16)  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def float_nodes(model: Any) -> list[str]:
    """The nodes int8 leaves in float. Those of attention masks: each Softmax whose
    input is a ``Where`` that fills masked positions with a large negative constant
    (KerasHub's decoders fill with -1e9 or float32's lowest), and that Where; and the
    arithmetic computing the mask (:func:`_comparison_inputs`). One int8 range for the
    filled scores spans the fill, and every real score rounds to the same level:
    attention turned uniform (Gemma's output at 7.5 dB SQNR, failing validation).
    A transformer's residual stream (:func:`_residual_stream`). And the probabilities
    a model outputs (:func:`_output_probabilities`)."""
    from onnx import numpy_helper

    graph = model.graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    producers, readers = onnx_graph.producers(graph), onnx_graph.readers(graph)

    def fills(name: str) -> bool:
        if name not in constants or constants[name].data_type not in _FLOAT_TYPES:
            return False
        value = numpy_helper.to_array(constants[name])
        return value.size == 1 and float(value.reshape(-1)[0]) <= MASK_FILL

    excluded = []
    for node in graph.node:
        where = producers.get(node.input[0]) if node.op_type == "Softmax" else None
        if where is not None and where.op_type == "Where" and any(map(fills, where.input[1:])):
            excluded += [where.name, node.name]
    excluded += _comparison_inputs(graph, producers, readers)
    return excluded + _residual_stream(graph, producers) + _output_probabilities(graph)


def _output_probabilities(graph: Any) -> list[str]:
    """The Softmax, LogSoftmax and Sigmoid nodes that write a graph output. Quantized,
    probabilities come out in steps of 1/255 of their range: a 1000-class classifier's
    scores below 0.004 all read 0, and its top-5 ranks ties. Left float, its input the
    dequantized int8 logits, the output is the function of those logits; the cost is
    one activation of the output's size."""
    outputs = {output.name for output in graph.output}
    return [
        node.name
        for node in graph.node
        if node.op_type in ("Softmax", "LogSoftmax", "Sigmoid") and node.output[0] in outputs
    ]


def _residual_stream(graph: Any, producers: dict[str, Any]) -> list[str]:
    """Each LayerNormalization, and each Add whose output reaches a LayerNormalization's
    input through Adds alone: a transformer's residual sums (after each block in a
    post-norm model, the running sum in a pre-norm one, the token + position + segment
    embeddings, the bias Adds of the Dense layers into them). One per-tensor int8 range
    for a residual sum, then for the normalization of it, cost KerasHub BERT,
    DistilBERT and GPT-2 backbones 2 to 8 dB of output SQNR against these in float,
    their matrix products int8 either way (BENCHMARKS.md, section 55). ``producers``:
    :func:`.onnx_graph.producers` of ``graph``."""
    norms = [node for node in graph.node if node.op_type == "LayerNormalization"]
    marked = {node.name for node in norms}
    pending = [node.input[0] for node in norms]
    while pending:
        node = producers.get(pending.pop())
        if node is not None and node.op_type == "Add" and node.name and node.name not in marked:
            marked.add(node.name)
            pending += list(node.input)
    return [node.name for node in graph.node if node.name in marked]


_COMPARISONS = frozenset({"Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual"})


def _comparison_inputs(
    graph: Any, producers: dict[str, Any], readers: dict[str, list[Any]]
) -> list[str]:
    """The nodes whose outputs go only into comparisons, directly or through other such
    nodes: the float arithmetic of masks (KerasHub's decoders build the causal mask
    from float positions, ``arange(n) + offset >= arange(n)``). Quantized, positions
    round to their neighbours and the comparison flips: a causal mask that lets a
    token see the next ones. ``producers``, ``readers``: :mod:`.onnx_graph`'s maps."""
    outputs = {output.name for output in graph.output}
    marked = {node.name for node in graph.node if node.op_type in _COMPARISONS}
    pending = [name for node in graph.node if node.name in marked for name in node.input]
    while pending:
        node = producers.get(pending.pop())
        if node is None or node.name in marked or any(name in outputs for name in node.output):
            continue
        if all(r.name in marked for name in node.output for r in readers.get(name, [])):
            marked.add(node.name)
            pending += node.input
    return [
        node.name for node in graph.node if node.name in marked and node.op_type not in _COMPARISONS
    ]


def _correct_biases(
    float_model: Any,
    quantized: Any,
    batches: list[dict[str, np.ndarray]],
    moments: Mapping[str, Any] | None,
) -> tuple[Any, Any]:
    """:func:`.bias_correction.correct_biases` of ``quantized`` (both models in
    memory), with the calibration pass's ``moments`` when it measured them: the
    corrected model and the report."""
    from keras_bn.converters.bias_correction import correct_biases

    return correct_biases(float_model, quantized, batches, moments=moments)


_INT8_OPTIONS = {"ActivationSymmetric": False, "WeightSymmetric": True}


def _output_names(model: Any) -> list[str]:
    """The graph outputs, which are quantized to their whole range whatever the method.

    Percentile (and Entropy) trade the rare largest values of a tensor for resolution;
    in a model's outputs those are the answer: a classifier's winning logit (or
    probability). Clipped, several classes tie at the clip value and top-1 flips
    (MobileNetV2 at Percentile 99.9: 59% top-1 agreement at 14 dB SQNR; BENCHMARKS.md
    section 27)."""
    return [output.name for output in model.graph.output]


def _output_extremes(
    onnx_in: Path, names: list[str], batches: list[dict[str, np.ndarray]]
) -> dict[str, Any]:
    """onnxruntime's per-tensor override of the range of each graph output in
    ``names``: its signed extremes over ``batches`` (one float run of ``onnx_in``), for
    ``quantize_static``'s own calibrators."""
    session = runtime.open_session(onnx_in, optimization="ORT_DISABLE_ALL", spinning=False)
    lowest: dict[str, float] = {}
    highest: dict[str, float] = {}
    for batch in batches:
        for name, values in zip(names, session.run(names, dict(batch)), strict=True):
            if values.size and values.dtype.kind == "f":
                low, high = float(np.min(values)), float(np.max(values))
                lowest[name] = min(low, lowest.get(name, low))
                highest[name] = max(high, highest.get(name, high))
    return {
        name: [{"rmin": np.float32(lowest[name]), "rmax": np.float32(highest[name])}]
        for name in lowest
    }


def _quantize_static(
    onnx_in: Path,
    model: Any,
    onnx_out: Path,
    batches: list[dict[str, np.ndarray]],
    per_channel: bool,
    calibration_method: str = "MinMax",
    progress: Callable[[int, int], None] | None = None,
    percentile: float = 99.99,
    *,
    measure_biases: bool = False,
    keep: Sequence[str] = (),
    keep_samples: int = 0,
) -> tuple[Any, dict[str, Any] | None, dict[str, np.ndarray] | None]:
    """Static QDQ quantization of ``model`` (``onnx_in`` loaded; not modified),
    calibrated on ``batches``: the quantized ``ModelProto``, with ``measure_biases``
    the float tensors' moments bias correction reads, and the float values of
    ``keep`` on the first ``keep_samples`` samples (None when not run here).

    MinMax and Percentile: one float onnxruntime pass measures the ranges and the
    moments (:mod:`.calibration`) and onnxruntime's quantizer rewrites the model in
    memory. Entropy, models over protobuf's 2 GB and an onnxruntime whose internals
    changed (:func:`.calibration.reliance_problem`): onnxruntime's ``quantize_static``
    with its own calibrator, through ``onnx_out``; no moments (bias correction then
    runs the float model itself)."""
    from keras_bn.converters import calibration

    if (
        calibration_method in calibration.FAST_METHODS
        and _serializable(onnx_in, model)
        and calibration.reliance_problem() is None
    ):
        from keras_bn.converters.bias_correction import tensors_to_measure

        preprocessed = _preprocess(model)
        exclude = float_nodes(preprocessed)
        measured = calibration.calibrate(
            preprocessed,
            batches,
            calibration_method,
            percentile=percentile,
            moments_of=tensors_to_measure(model) if measure_biases else (),
            progress=progress,
            whole=_output_names(model),
            keep=keep,
            keep_samples=keep_samples,
            quantizer_exclude=exclude,
        )
        calibration.share_bound_ranges(preprocessed, measured.ranges)
        calibration.share_concat_ranges(preprocessed, measured.ranges)
        overrides = calibration.output_overrides(preprocessed, measured.ranges, exclude)
        quantized = calibration.quantize_qdq(
            preprocessed,
            measured.ranges,
            per_channel=per_channel,
            extra_options={
                **_INT8_OPTIONS,
                **({"TensorQuantOverrides": overrides} if overrides else {}),
            },
            exclude=exclude,
        )
        return quantized, measured.moments if measure_biases else None, measured.kept
    _quantize_static_file(
        onnx_in, model, onnx_out, batches, per_channel, calibration_method, progress, percentile
    )
    return _onnx().load(str(onnx_out)), None, None


def _serializable(onnx_in: Path, model: Any) -> bool:
    """Whether ``model`` (``onnx_in`` loaded, with any external data) stays under
    protobuf's 2 GB: :func:`_size_bound` first, which costs no serialization
    (``ByteSize`` serializes the whole model: 0.16 s for ResNet50's 100 MB), then
    ``ByteSize`` only where that bound reaches the limit."""
    return _size_bound(onnx_in, model) < _PROTOBUF_LIMIT or model.ByteSize() < _PROTOBUF_LIMIT


def _size_bound(onnx_in: Path, model: Any) -> int:
    """An upper bound of ``model``'s serialized size (``onnx_in`` loaded): the file
    holds every field but external tensor data, and the loaded tensors' data lengths
    (initializers, sparse ones, attribute tensors, in every subgraph) bound that,
    counting the file's own data twice; 64 bytes per tensor for its data's header."""
    graphs, data, tensors = [model.graph], 0, 0
    while graphs:
        graph = graphs.pop()
        stored = [*graph.initializer]
        stored += [
            p for sparse in graph.sparse_initializer for p in (sparse.values, sparse.indices)
        ]
        for node in graph.node:
            for attribute in node.attribute:
                stored += [attribute.t] if attribute.HasField("t") else []
                stored += attribute.tensors
                graphs += [attribute.g] if attribute.HasField("g") else []
                graphs += attribute.graphs
        data += sum(len(tensor.raw_data) for tensor in stored)
        tensors += len(stored)
    return Path(onnx_in).stat().st_size + data + 64 * tensors


def _static_options(
    onnx_in: Path, model: Any, batches: list, calibration_method: str, percentile: float
) -> dict[str, Any]:
    """``quantize_static``'s extra options: ours, per-batch merging, the percentile,
    and the graph outputs' whole ranges (:func:`_output_names`; with MinMax, which
    measures them whole, those the quantizer would give an activation's range)."""
    from keras_bn.converters import calibration

    options: dict[str, Any] = {
        **_INT8_OPTIONS,
        # Every method merges per batch: histograms do not hold all outputs.
        "CalibStridedMinMax": 1,
        "CalibPercentile": percentile,
    }
    if calibration_method != "MinMax":
        names = _output_names(model)
    else:
        names = calibration.activation_outputs(model, float_nodes(model))
    if names:
        options["TensorQuantOverrides"] = _output_extremes(onnx_in, names, batches)
    return options


def _quantize_static_file(
    onnx_in: Path,
    model: Any,
    onnx_out: Path,
    batches: list[dict[str, np.ndarray]],
    per_channel: bool,
    calibration_method: str,
    progress: Callable[[int, int], None] | None,
    percentile: float,
) -> None:
    """onnxruntime's pre-processing and ``quantize_static`` (its own calibrator) of
    ``model`` (``onnx_in`` loaded), calibrated on ``batches``, written to ``onnx_out``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class ArrayCalibrationReader(CalibrationDataReader):
        """Feeds the calibration arrays to onnxruntime's calibrator, batch by batch
        (each asked for once the previous one has run: the progress count)."""

        def __init__(self) -> None:
            self.set_range(0, len(batches))

        def __len__(self) -> int:
            return len(batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            # onnxruntime's CalibStridedMinMax: calibrate (and free) one slice at a time.
            self._indices = iter(range(start_index, end_index))
            self._handed: int | None = None  # the batch last handed out

        def get_next(self) -> dict[str, np.ndarray] | None:
            if progress is not None and self._handed is not None:
                progress(self._handed + 1, len(batches))  # it has run
            self._handed = next(self._indices, None)
            return None if self._handed is None else batches[self._handed]

    preprocessed = onnx_out.with_name(onnx_out.stem + ".pre.onnx")
    try:
        # Shape inference and graph clean-up, as onnxruntime recommends before
        # quantizing; the optimizer step is ours to skip (folding already ran).
        # ONNX's own shape inference resolves every shape of our exports (static
        # but for the batch), so the symbolic pass (which needs sympy) is skipped.
        if model.ByteSize() < _PROTOBUF_LIMIT:
            _onnx().save(_preprocess(model), str(preprocessed))
        else:  # over protobuf's limit: onnxruntime's file-based shape inference
            quant_pre_process(
                str(onnx_in), str(preprocessed), skip_optimization=True, skip_symbolic_shape=True
            )
        # The histogram calibrators print progress to stdout (keep --json pure).
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(preprocessed),
                str(onnx_out),
                ArrayCalibrationReader(),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod[calibration_method],
                nodes_to_exclude=float_nodes(model),
                extra_options=_static_options(
                    onnx_in, model, batches, calibration_method, percentile
                ),
            )
    finally:
        for leftover in (preprocessed, Path(str(preprocessed) + ".data")):
            if leftover.exists():
                leftover.unlink()

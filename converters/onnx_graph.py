"""Reading an ONNX graph's wiring, and adding outputs to a model for a session.

The modules that check, rewrite or run exported and quantized models (export's checks,
precision conversion, calibration, equalization, bias correction and tuning, the
divergence report) all ask which node writes a tensor and which nodes read it, and
several fetch intermediate tensors from onnxruntime; both are written once, here.
Only the top-level graph is read (not the bodies of If/Loop/Scan).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "batch_is_fixed",
    "batch_major",
    "class_score_outputs",
    "producers",
    "readers",
    "sample_sizes",
    "with_outputs",
]


def producers(graph: Any) -> dict[str, Any]:
    """Each tensor written in ``graph`` (a ``GraphProto``) -> the node that writes it."""
    return {name: node for node in graph.node for name in node.output}


def readers(graph: Any) -> dict[str, list[Any]]:
    """Each tensor read in ``graph`` -> the nodes that read it, in graph order (a node
    that reads it twice is listed twice)."""
    found: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


# What a classifier's scores pass through on their way out (a QDQ or float16 file's
# conversions among them), and what computes scores: a linear layer's logits or their
# (log-)probabilities. A tanh embedding, pooled features or a normalized sequence are not.
_SCORE_PASSING = {"DequantizeLinear", "QuantizeLinear", "Cast", "Identity", "Reshape",
                  "Flatten", "Squeeze", "Unsqueeze", "Transpose"}  # fmt: skip
_SCORING = {"Gemm", "MatMul", "Conv", "ConvTranspose", "Einsum", "Softmax", "LogSoftmax"}


def class_score_outputs(model: Any) -> list[bool]:
    """For each graph output of ``model`` (a ``ModelProto``), whether it holds class
    scores: computed by a linear layer (logits, a bias or a constant factor after it
    allowed) or a Softmax/LogSoftmax, through reshapes and (de)quantization. Top-1
    agreement means something for those only."""
    graph = model.graph
    written = producers(graph)
    constants = {tensor.name for tensor in graph.initializer}
    constants.update(n.output[0] for n in graph.node if n.op_type == "Constant")
    found = []
    for output in graph.output:
        node = written.get(output.name)
        while node is not None and node.op_type not in _SCORING:
            data = [name for name in node.input[:2] if name and name not in constants]
            if node.op_type in _SCORE_PASSING:
                data = node.input[:1]
            elif node.op_type not in ("Add", "Sub", "Mul", "Div") or len(data) != 1:
                break
            node = written.get(data[0])
        found.append(node is not None and node.op_type in _SCORING)
    return found


def with_outputs(model: Any, names: Sequence[str], *, in_place: bool = False) -> bytes:
    """``model`` (a ``ModelProto``) serialized with the tensors ``names`` added to its
    graph outputs, untyped (onnxruntime infers each one's type: a float tensor, or a
    text model's integer mask), for a session that fetches them. ``in_place``: add
    them to ``model`` itself for the serialization and take them out again, without a
    copy (only where no other thread reads ``model`` meanwhile)."""
    from onnx import ModelProto, ValueInfoProto

    if not in_place:
        copy = ModelProto()
        copy.CopyFrom(model)
        model = copy
    outputs = model.graph.output
    kept = len(outputs)
    existing = {output.name for output in outputs}
    outputs.extend(
        ValueInfoProto(name=name) for name in dict.fromkeys(names) if name not in existing
    )
    try:
        return model.SerializeToString()
    finally:
        del outputs[kept:]


def batch_major(model: Any, names: Iterable[str]) -> list[str]:
    """Those of ``names`` whose inferred shape (``model``'s value infos and outputs:
    shape inference must have run) starts with the first graph input's batch dimension
    (its first ``dim_param``); none when that dimension is fixed or unnamed."""
    inputs = [info for info in model.graph.input if info.type.HasField("tensor_type")]
    dims = inputs[0].type.tensor_type.shape.dim if inputs else []
    batch = dims[0].dim_param if len(dims) else ""
    if not batch:
        return []
    infos = {info.name: info for info in (*model.graph.value_info, *model.graph.output)}
    chosen = []
    for name in names:
        info = infos.get(name)
        if info is None or not info.type.HasField("tensor_type"):
            continue
        shape = info.type.tensor_type.shape.dim
        if len(shape) and shape[0].dim_param == batch:
            chosen.append(name)
    return chosen


def sample_sizes(model: Any) -> dict[str, int]:
    """Elements per sample of each tensor (graph inputs too) whose shape ONNX infers,
    batch first: a memory estimate for the tensors a session is asked for."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - sizes are a memory estimate; unknown is safe
        return {}
    sizes = {}
    graph = inferred.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        dims = info.type.tensor_type.shape.dim[1:]
        if info.type.tensor_type.HasField("shape") and all(d.dim_value > 0 for d in dims):
            sizes[info.name] = math.prod(d.dim_value for d in dims)
    return sizes


def batch_is_fixed(model: Any) -> bool:
    """Whether a graph input of ``model`` has a fixed batch size: onnxruntime then
    takes only batches of that size, so samples go in whole batches."""
    initializers = {initializer.name for initializer in model.graph.initializer}
    for info in model.graph.input:
        dims = info.type.tensor_type.shape.dim
        if info.name not in initializers and dims and dims[0].dim_value > 0:
            return True
    return False

"""Reading an ONNX graph's wiring, and adding outputs to a model for a session.

The modules that check, rewrite or run exported and quantized models (export's checks,
precision conversion, calibration, equalization, bias correction and tuning, the
divergence report) all ask which node writes a tensor and which nodes read it, and
several fetch intermediate tensors from onnxruntime; both are written once, here.
Only the top-level graph is read (not the bodies of If/Loop/Scan).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["producers", "readers", "with_outputs"]


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


def with_outputs(model: Any, names: Sequence[str], *, in_place: bool = False) -> bytes:
    """``model`` (a ``ModelProto``) serialized with the float tensors ``names`` added
    to its graph outputs, for a session that fetches them. ``in_place``: add them to
    ``model`` itself for the serialization and take them out again, without a copy
    (only where no other thread reads ``model`` meanwhile)."""
    from onnx import ModelProto, TensorProto, helper

    if not in_place:
        copy = ModelProto()
        copy.CopyFrom(model)
        model = copy
    outputs = model.graph.output
    kept = len(outputs)
    existing = {output.name for output in outputs}
    outputs.extend(
        helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
        for name in names
        if name not in existing
    )
    try:
        return model.SerializeToString()
    finally:
        del outputs[kept:]

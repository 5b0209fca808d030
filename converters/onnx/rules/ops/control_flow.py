"""``keras.ops`` rules: control flow (``ops.map`` as an ONNX Scan)."""

from __future__ import annotations

from typing import Any

from keras import tree

from keras_bn.converters.graph import Node, Tensor
from keras_bn.converters.onnx.builder import Builder, Unsupported
from keras_bn.converters.tracing import TraceError, trace_function

__all__ = ["map_op"]


def map_op(b: Builder, node: Node) -> None:
    """``ops.map(f, xs)``: ``f`` traced once on placeholders for one element of each
    ``xs`` tensor, and run by ONNX Scan over their first axis (the batch, for
    KerasHub D-FINE's per-sample gathers), its outputs stacked along it, as Keras's."""
    function, xs = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["xs"]
    elements = tree.flatten(xs)
    if not elements or not all(isinstance(x, Tensor) and x.rank for x in elements):
        raise Unsupported("ops.map over constants (mapped over symbolic tensors it is exported)")
    if any(size is None for x in elements for size in x.shape[1:]):
        raise Unsupported("ops.map over elements of unknown size")
    element = tree.map_structure(
        lambda x: Tensor(x.name, x.shape[1:], x.dtype) if isinstance(x, Tensor) else x, xs
    )

    def spec(x: Any) -> tuple[tuple[int | None, ...], str] | None:
        return (x.shape, x.dtype) if isinstance(x, Tensor) else None

    try:
        traced = trace_function(function, (element,), spec, node.layer.name)
    except TraceError as error:
        raise Unsupported(f"its function does not trace ({error})") from error
    if traced.model is None or any(not hasattr(x, "shape") for x in traced.outputs):
        raise Unsupported("ops.map of a function whose outputs do not depend on its input")
    body = b.export_subgraph(traced.model, node.name, b.unique(f"{node.name}/body"))
    names = [b.get(x, cast=False) for x in elements]
    count = len(node.outputs)
    outs = b.op("Scan", names, outputs=count, body=body, num_scan_inputs=len(names))
    for out, name in zip(node.outputs, outs if count > 1 else [outs], strict=True):
        b.set(out, name)

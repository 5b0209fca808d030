"""Rules: layers that wrap another layer (TimeDistributed).

Keras's ``TimeDistributed.call`` loops over the timesteps, calling the wrapped
layer's ``call`` once per step, so a trace of it unrolls one copy of the layer per
timestep (30 MatMuls for 30 steps, each its own int8 range) and reaches the wrapped
layer's operations rather than the layer (a BatchNormalization's
``ops.batch_normalization``, which has no rule). The rule here merges the batch and
time axes instead, runs the wrapped layer's own rule once on the merged tensor and
splits the axes again: what the layer computes on each timestep, as one node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keras import layers as L

from keras_bn import _keras_internals as internals
from keras_bn.converters.graph import Node, Tensor
from keras_bn.converters.onnx.builder import Builder, Unsupported

__all__ = ["time_distributed", "time_distributed_has_rule"]


def time_distributed_has_rule(layer: Any, needs_tracing: Any) -> bool:
    """Whether :func:`time_distributed` exports ``layer`` (a TimeDistributed): the
    wrapped layer has a rule of its own (``needs_tracing`` false for it) and was built
    for steps whose sizes are all known. Otherwise the wrapper is traced, as before."""
    if needs_tracing(layer.layer):
        return False
    shapes = internals.build_shapes(layer)  # the wrapper's: (batch, time, *step)
    if not shapes or len(shapes) != 1:
        return False
    (shape,) = shapes.values()
    return shape is not None and None not in tuple(shape)[2:]


def time_distributed(b: Builder, node: Node, find_rule: Callable[[Any], Any]) -> None:
    """TimeDistributed: ``(batch, time, *step)`` reshaped to ``(batch * time, *step)``,
    the wrapped layer's rule (``find_rule``: the table's lookup, which imports this
    module), and the result reshaped to ``(batch, time, *out)``."""
    layer, tensor, output = node.layer, node.inputs[0], node.outputs[0]
    inner = layer.layer
    rule = find_rule(inner)
    if rule is None or len(node.inputs) != 1 or len(node.outputs) != 1:
        raise Unsupported(f"a wrapped {type(inner).__name__} with no rule of its own")
    masked = tensor.carries_mask or isinstance(node.kwargs.get("mask"), Tensor)
    if (
        masked
        and internals.call_receives_mask(inner)
        and not isinstance(inner, L.BatchNormalization)
    ):  # BatchNormalization reads a mask in training only
        raise Unsupported(f"a mask handed to the wrapped {type(inner).__name__}")
    if None in tensor.shape[2:] or None in output.shape[2:]:
        raise Unsupported("timesteps of unknown size")
    step = [int(size) for size in tensor.shape[2:] if size is not None]
    out = [int(size) for size in output.shape[2:] if size is not None]
    merged_in = Tensor(f"{tensor.name}/merged", (None, *step), tensor.dtype)
    merged_out = Tensor(f"{output.name}/merged", (None, *out), output.dtype)
    b.set(merged_in, b.op("Reshape", [b.get(tensor), b.ints([-1, *step], "shape")]))
    call = Node(
        inner, (merged_in,), {}, [merged_in], [merged_out], merged_out, node.scope, node.key
    )
    rule(b, call)
    if tensor.shape[1] is not None:  # a known number of steps: the batch is what is left
        shape = b.ints([-1, tensor.shape[1], *out], "shape")
    else:
        sizes = [b.size(tensor, 0), b.size(tensor, 1), b.ints(out, "shape")]
        shape = b.op("Concat", sizes, axis=0)
    b.set(output, b.op("Reshape", [b.get(merged_out), shape]))

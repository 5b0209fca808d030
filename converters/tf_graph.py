"""Recording TensorFlow code as a TensorFlow graph (the TensorFlow backend only).

A Lambda, a custom layer's ``call()`` or an activation function that calls
``tf.*`` (or ``tf.keras.backend``) cannot be traced to ``keras.ops``: TensorFlow
functions refuse symbolic Keras tensors. On the TensorFlow backend such code runs
on TensorFlow tensors, so :func:`record_call` and :func:`record_function` run it
once under ``tf.function`` on input specs shaped like the call's inputs (unknown
sizes stay unknown: a dynamic batch stays dynamic), freeze the variables it reads
into constants (TensorFlow's ``convert_variables_to_constants_v2``, what tf2onnx
does too), and return the operations that compute its outputs as plain data
(:class:`TFGraph`): op type, input and output tensor names, attributes as Python
and NumPy values, each tensor's static shape and dtype, and its value where
TensorFlow knows it without running the graph (constants, weights, and what
TensorFlow folds from them).

This is the project's one module that reads TensorFlow's graphs (and its one
private TensorFlow import); the ONNX rules of
:mod:`keras_bn.converters.onnx.rules.tensorflow` read the plain data only.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import tree

__all__ = [
    "RecordError",
    "TFGraph",
    "TFOp",
    "TFTensor",
    "available",
    "record_call",
    "record_function",
]

# The op type of the recorded function's inputs.
PLACEHOLDER = "Placeholder"


class RecordError(Exception):
    """The code does not run under ``tf.function`` on the given input specs."""


@dataclasses.dataclass(frozen=True)
class TFTensor:
    """A tensor of the recorded graph: static shape (None: unknown rank, None
    entries: unknown sizes), dtype, and its value when TensorFlow knows it
    statically."""

    name: str
    shape: tuple[int | None, ...] | None
    dtype: np.dtype
    value: np.ndarray | None = None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)


@dataclasses.dataclass(frozen=True)
class TFOp:
    """One operation: ``type`` (``"AddV2"``), its name in the graph, the names of
    its data inputs and outputs, and its attributes (dtypes as NumPy dtypes, byte
    strings as ``str``, tensors as arrays)."""

    type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, Any]


@dataclasses.dataclass
class TFGraph:
    """A recorded call: its input placeholders' and outputs' tensor names (in
    order), the ops computing the outputs (topologically ordered, only those the
    outputs need), and every tensor they read or write, by name."""

    inputs: list[str]
    outputs: list[str]
    ops: list[TFOp]
    tensors: dict[str, TFTensor]


def available() -> bool:
    """Whether TensorFlow code can be recorded: Keras runs on TensorFlow."""
    return keras.backend.backend() == "tensorflow"


def record_call(
    layer: Any,
    args: Any,
    kwargs: dict,
    spec: Callable[[Any], tuple[Sequence[int | None], str] | None],
) -> TFGraph:
    """Record ``layer(*args, **kwargs)`` at inference: every leaf of ``(args,
    kwargs)`` for which ``spec`` gives ``(shape, dtype)`` becomes an input (in
    ``tree.flatten`` order), the others are passed as they are.

    Raises:
        RecordError: the call does not run on TensorFlow tensors (the message
            says why).
    """
    flat = tree.flatten((tuple(args), dict(kwargs)))
    positions = [index for index, leaf in enumerate(flat) if spec(leaf) is not None]
    specs = [spec(flat[index]) for index in positions]

    def call(*tensors: Any) -> Any:
        leaves = list(flat)
        for index, tensor in zip(positions, tensors, strict=True):
            leaves[index] = tensor
        call_args, call_kwargs = tree.pack_sequence_as((tuple(args), dict(kwargs)), leaves)
        if _takes_training(layer):
            call_kwargs["training"] = False  # export is inference
        return layer(*call_args, **call_kwargs)

    return _record(call, specs)  # type: ignore[arg-type]


def record_function(
    function: Callable[..., Any], specs: Sequence[tuple[Sequence[int | None], str]]
) -> TFGraph:
    """Record ``function(*inputs)`` (an activation function) on inputs of these
    ``(shape, dtype)``. Raises RecordError as :func:`record_call` does."""
    return _record(function, specs)


def _takes_training(layer: Any) -> bool:
    try:
        return "training" in inspect.signature(layer.call).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def _record(
    function: Callable[..., Any], specs: Sequence[tuple[Sequence[int | None], str]]
) -> TFGraph:
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    input_specs = [
        tf.TensorSpec([None if size is None else int(size) for size in shape], tf.as_dtype(dtype))
        for shape, dtype in specs
    ]
    # autograph=False: Python control flow on tensor values stays an error, rather
    # than becoming tf.cond / tf.while_loop graphs export cannot write.
    try:
        concrete = tf.function(function, autograph=False).get_concrete_function(*input_specs)
        frozen = convert_variables_to_constants_v2(concrete)
    except Exception as error:  # noqa: BLE001 - any failure is the code's, reported as one
        first = str(error).strip().splitlines()
        raise RecordError(f"{type(error).__name__}: {first[0] if first else ''}") from error
    return _plain(frozen)


def _plain(frozen: Any) -> TFGraph:
    """The ops of a frozen concrete function that its outputs need, as plain data."""
    outputs = list(frozen.outputs)
    needed: set[str] = set()
    stack = [tensor.op for tensor in outputs]
    while stack:
        op = stack.pop()
        if op.name in needed:
            continue
        needed.add(op.name)
        stack.extend(tensor.op for tensor in op.inputs)  # data inputs only, no control
    tensors: dict[str, TFTensor] = {}
    ops = []
    for op in frozen.graph.get_operations():  # creation order is topological
        if op.name not in needed:
            continue
        for tensor in (*op.inputs, *op.outputs):
            if tensor.name not in tensors:
                tensors[tensor.name] = _tensor(tensor)
        ops.append(
            TFOp(
                type=op.type,
                name=op.name,
                inputs=tuple(tensor.name for tensor in op.inputs),
                outputs=tuple(tensor.name for tensor in op.outputs),
                attributes=_attributes(op),
            )
        )
    return TFGraph(
        inputs=[tensor.name for tensor in frozen.inputs],
        outputs=[tensor.name for tensor in outputs],
        ops=ops,
        tensors=tensors,
    )


def _tensor(tensor: Any) -> TFTensor:
    import tensorflow as tf

    shape = None if tensor.shape.rank is None else tuple(tensor.shape.as_list())
    value = None
    if tensor.dtype != tf.resource and tensor.dtype != tf.variant:
        try:
            static = tf.get_static_value(tensor)
        except Exception:  # noqa: BLE001 - TensorFlow cannot fold it: not static
            static = None
        if static is not None:
            value = np.asarray(static)
    return TFTensor(tensor.name, shape, np.dtype(tensor.dtype.as_numpy_dtype), value)


def _attributes(op: Any) -> dict[str, Any]:
    """An op's attributes as plain values; TensorFlow's private ones (``_...``) left out."""
    return {
        name: _attribute(op.get_attr(name)) for name in op.node_def.attr if not name.startswith("_")
    }


def _attribute(value: Any) -> Any:
    import tensorflow as tf

    if isinstance(value, tf.DType):
        return np.dtype(value.as_numpy_dtype) if value not in (tf.resource, tf.variant) else value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [_attribute(item) for item in value]
    if type(value).__name__ == "TensorProto":
        return tf.make_ndarray(value)
    return value

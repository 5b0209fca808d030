"""Rules: TensorFlow code in a layer (a Lambda or custom layer calling ``tf.*``).

On the TensorFlow backend, a layer without a rule whose ``call()`` does not trace
to ``keras.ops`` because it calls TensorFlow is exported from its TensorFlow graph:
:func:`tensorflow_call` records the call
(:func:`keras_bn.converters.tf_graph.record_call`, on inputs shaped like the
node's, the batch size unknown) and converts each TensorFlow op with its rule in
:data:`TENSORFLOW_RULES`, one small function per op type, exactly like the
``keras.ops`` rules. The layer's inputs enter in Keras layout (the exporter may
hold image tensors channels-first; :meth:`Builder.get` transposes them back) and
its outputs leave in Keras layout; the rest of the model is exported natively
around it. :func:`activation_from_tensorflow` does the same for an activation
function (``Dense(activation=my_tf_function)``).

A rule ``rule(graph, op) -> [ONNX names of op's outputs]`` reads its inputs with
``graph.name(tensor)`` (ONNX value) or ``graph.constant(tensor)`` (NumPy value,
where TensorFlow knows it statically: axes, shapes, weights). An op whose outputs
are all static is not converted: its values become initializers when a rule reads
them. Every ONNX value keeps its TensorFlow dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from onnx import numpy_helper

from keras_bn.converters import tf_graph
from keras_bn.converters.graph import MASK_NOT_PASSED, Node, Tensor
from keras_bn.converters.onnx.builder import Builder, Unsupported, Value, tensor_type
from keras_bn.converters.onnx.layout import Perm, identity_perm

__all__ = ["TENSORFLOW_RULES", "activation_from_tensorflow", "rule_for", "tensorflow_call"]

_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min
# Keras's message when a TensorFlow function receives a symbolic Keras tensor.
_TENSORFLOW_REFUSED = "cannot be used as input to a TensorFlow function"


class Graph:
    """A recorded TensorFlow graph being converted: ONNX values by TF tensor name."""

    def __init__(self, b: Builder, recorded: tf_graph.TFGraph, what: str):
        self.b = b
        self.recorded = recorded
        self.what = what  # "Lambda.call()", for messages
        self.names: dict[str, str] = {}
        self.op: tf_graph.TFOp | None = None

    def tensor(self, name: str) -> tf_graph.TFTensor:
        return self.recorded.tensors[name]

    def constant(self, name: str) -> np.ndarray | None:
        """The tensor's value when TensorFlow knows it statically, else None."""
        return self.tensor(name).value

    def require(self, name: str, what: str) -> np.ndarray:
        """The tensor's static value; Unsupported when it is computed at runtime."""
        value = self.constant(name)
        if value is None:
            raise self.unsupported(f"its {what} computed at runtime (expected a constant)")
        return value

    def name(self, tensor_name: str) -> str:
        """The ONNX value of a TensorFlow tensor (a static one becomes an initializer)."""
        if tensor_name not in self.names:
            value = self.constant(tensor_name)
            if value is None:  # an output a rule does not export (training statistics)
                raise self.unsupported(f"it reads {tensor_name!r}, which export does not compute")
            self.names[tensor_name] = self.const(value, tensor_name.rsplit("/", 1)[-1])
        return self.names[tensor_name]

    def const(self, value: np.ndarray, hint: str) -> str:
        """A constant of ``value``'s dtype and shape: a scalar as a Constant node
        (the builder's initializers hold at least one axis), else an initializer."""
        value = np.asarray(value)
        if value.ndim == 0:
            tensor = numpy_helper.from_array(value)
            return self.b.op("Constant", [], value=tensor, name=f"{self.b.scope_name}/{hint}")
        return self.b.const(value, hint.split(":")[0], dtype=value.dtype)

    def int64(self, tensor_name: str) -> str:
        """The tensor as int64 (what ONNX shape, repeat and pad inputs take)."""
        value = self.constant(tensor_name)
        if value is not None:
            return self.b.ints(np.asarray(value).reshape(-1).tolist(), "shape")
        name = self.name(tensor_name)
        if self.tensor(tensor_name).dtype != np.int64:
            name = self.b.op("Cast", [name], to=tensor_type("int64"))
        return name

    def scalar(self, number: float, like: str) -> str:
        """A scalar of ``like``'s dtype."""
        return self.const(np.asarray(number, dtype=self.tensor(like).dtype), "constant")

    def rank(self, tensor_name: str) -> int:
        rank = self.tensor(tensor_name).rank
        if rank is None:
            raise self.unsupported("an input of unknown rank")
        return rank

    def unsupported(self, reason: str) -> Unsupported:
        op = self.op
        where = f"TensorFlow op {op.type!r} ({op.name})" if op is not None else "TensorFlow"
        return Unsupported(f"{self.what} runs {where}: {reason}")


TensorFlowRule = Callable[[Graph, tf_graph.TFOp], list[str]]


# --------------------------------------------------------------------------------------
# Driving the conversion.


def convert(b: Builder, recorded: tf_graph.TFGraph, inputs: Sequence[str], what: str) -> list[str]:
    """The ONNX names of ``recorded``'s outputs, its inputs fed by ONNX ``inputs``."""
    graph = Graph(b, recorded, what)
    for tensor_name, onnx_name in zip(recorded.inputs, inputs, strict=True):
        graph.names[tensor_name] = onnx_name
    for op in recorded.ops:
        if op.type == tf_graph.PLACEHOLDER:
            continue
        if all(graph.constant(name) is not None for name in op.outputs):
            continue  # static: an initializer where read
        graph.op = op
        rule = TENSORFLOW_RULES.get(op.type)
        if rule is None:
            raise graph.unsupported(
                "which has no ONNX rule (the op types with one are the keys of "
                "keras_bn.converters.onnx.rules.tensorflow.TENSORFLOW_RULES)"
            )
        results = rule(graph, op)
        for tensor_name, onnx_name in zip(op.outputs, results):  # noqa: B905 - may be fewer
            graph.names[tensor_name] = onnx_name
    graph.op = None
    outputs = []
    for tensor_name in recorded.outputs:
        name = graph.name(tensor_name)
        if graph.constant(tensor_name) is not None:  # computed from constants only
            name = b.op("Identity", [name])
        outputs.append(name)
    return outputs


def _graph_tensors(node: Node) -> list[Tensor]:
    from keras import tree

    return [x for x in tree.flatten((tuple(node.args), dict(node.kwargs))) if isinstance(x, Tensor)]


def _spec(x: Any) -> tuple[tuple[int | None, ...], str] | None:
    return (x.shape, x.dtype) if isinstance(x, Tensor) else None


def tensorflow_call(b: Builder, node: Node) -> None:
    """A layer whose ``call()`` runs TensorFlow code: its recorded TensorFlow graph."""
    what = f"{type(node.layer).__name__}.call()"
    try:
        recorded = tf_graph.record_call(node.layer, node.args, node.kwargs, _spec)
    except tf_graph.RecordError as error:
        raise Unsupported(f"recording {what} as a TensorFlow graph failed: {error}") from error
    if len(recorded.outputs) != len(node.outputs):
        raise Unsupported(
            f"{what} as a TensorFlow graph has {len(recorded.outputs)} outputs, "
            f"its recorded call {len(node.outputs)}"
        )
    inputs = [b.get(tensor, cast=False) for tensor in _graph_tensors(node)]  # Keras layout
    for tensor, name in zip(node.outputs, convert(b, recorded, inputs, what), strict=True):
        b.set(tensor, name)


def _tensorflow_refused(b: Builder, node: Node) -> None:
    """A layer calling TensorFlow on another backend: it cannot run there at all."""
    raise Unsupported(
        f"{type(node.layer).__name__}.call() calls TensorFlow functions, which export "
        "natively on the TensorFlow backend only (set KERAS_BACKEND=tensorflow)"
    )


def rule_for(node: Node) -> Callable[[Builder, Node], None] | None:
    """The rule for a layer without a rule whose ``call()`` did not trace: its
    TensorFlow graph on the TensorFlow backend; elsewhere, where the trace failed
    on a TensorFlow function, a rule that says which backend to use; else None."""
    if node.trace_error is None or node.trace_error == MASK_NOT_PASSED:
        return None  # a call run without its Keras mask: not recorded either
    if tf_graph.available():
        return tensorflow_call
    if _TENSORFLOW_REFUSED in node.trace_error:
        return _tensorflow_refused
    return None


# Op types that compute each element from the same element of their one varying
# input (and scalar constants): an activation made of these runs in any layout.
# fmt: off
_ELEMENTWISE = frozenset(
    {
        "Identity", "Neg", "Abs", "Sqrt", "Rsqrt", "Square", "Exp", "Log", "Log1p",
        "Reciprocal", "Inv", "Relu", "Relu6", "Elu", "Selu", "Softplus", "Softsign",
        "Sigmoid", "Tanh", "Erf", "LeakyRelu", "Sin", "Cos", "Floor", "Ceil", "Round",
        "Sign", "Add", "AddV2", "Sub", "Mul", "RealDiv", "Div", "Maximum", "Minimum", "Pow",
        "SquaredDifference", "Cast", "Greater", "GreaterEqual", "Less", "LessEqual",
        "Equal", "NotEqual", "Select", "SelectV2", "ClipByValue", "StopGradient",
    }
)
# fmt: on


def activation_from_tensorflow(b: Builder, function: Any, name: str, perm: Perm) -> str:
    """An activation function without a rule (``Dense(activation=my_function)``)
    recorded as a TensorFlow graph on the node's output shape; ``name`` holds its
    input in layout ``perm``, and so does the result. A graph of elementwise ops
    on scalar constants runs in that layout; any other in Keras layout."""
    label = getattr(function, "__name__", repr(function))
    what = f"activation {label!r}"
    node = b.node
    if node is None or not node.outputs or not tf_graph.available():
        raise Unsupported(f"{what} has no ONNX rule")
    output = node.outputs[0]
    try:
        recorded = tf_graph.record_function(function, [(output.shape, output.dtype)])
    except tf_graph.RecordError as error:
        raise Unsupported(
            f"{what} has no ONNX rule, and recording it as a TensorFlow graph failed: {error}"
        ) from error
    if len(recorded.outputs) != 1:
        raise Unsupported(f"{what} returns {len(recorded.outputs)} tensors, expected one")
    keras_order = identity_perm(len(perm))
    if tuple(perm) == keras_order or _elementwise(recorded):
        return convert(b, recorded, [name], what)[0]
    x = b.transpose(Value(name, tuple(perm)), keras_order)
    (y,) = convert(b, recorded, [x], what)
    return b.transpose(Value(y, keras_order), tuple(perm))


def _elementwise(recorded: tf_graph.TFGraph) -> bool:
    """Whether every converted op is elementwise, its constant operands scalars."""
    for op in recorded.ops:
        if op.type == tf_graph.PLACEHOLDER:
            continue
        if all(recorded.tensors[name].value is not None for name in op.outputs):
            continue
        if op.type not in _ELEMENTWISE:
            return False
        for name in op.inputs:
            value = recorded.tensors[name].value
            if value is not None and np.ndim(value) > 0:
                return False
    return True


# --------------------------------------------------------------------------------------
# Elementwise rules.


def _unary(onnx_type: str, **attributes: Any) -> TensorFlowRule:
    def rule(g: Graph, op: tf_graph.TFOp) -> list[str]:
        return [g.b.op(onnx_type, [g.name(op.inputs[0])], **attributes)]

    return rule


def _binary(onnx_type: str) -> TensorFlowRule:
    def rule(g: Graph, op: tf_graph.TFOp) -> list[str]:
        return [g.b.op(onnx_type, [g.name(op.inputs[0]), g.name(op.inputs[1])])]

    return rule


def _identity(g: Graph, op: tf_graph.TFOp) -> list[str]:
    return [g.name(name) for name in op.inputs[: len(op.outputs)]]


def _not_equal(g: Graph, op: tf_graph.TFOp) -> list[str]:
    equal = g.b.op("Equal", [g.name(op.inputs[0]), g.name(op.inputs[1])])
    return [g.b.op("Not", [equal])]


def _rsqrt(g: Graph, op: tf_graph.TFOp) -> list[str]:
    return [g.b.op("Reciprocal", [g.b.op("Sqrt", [g.name(op.inputs[0])])])]


def _square(g: Graph, op: tf_graph.TFOp) -> list[str]:
    x = g.name(op.inputs[0])
    return [g.b.op("Mul", [x, x])]


def _squared_difference(g: Graph, op: tf_graph.TFOp) -> list[str]:
    difference = g.b.op("Sub", [g.name(op.inputs[0]), g.name(op.inputs[1])])
    return [g.b.op("Mul", [difference, difference])]


def _log1p(g: Graph, op: tf_graph.TFOp) -> list[str]:
    x = op.inputs[0]
    return [g.b.op("Log", [g.b.op("Add", [g.name(x), g.scalar(1.0, x)])])]


def _relu6(g: Graph, op: tf_graph.TFOp) -> list[str]:
    x = op.inputs[0]
    return [g.b.op("Clip", [g.name(x), g.scalar(0.0, x), g.scalar(6.0, x)])]


def _leaky_relu(g: Graph, op: tf_graph.TFOp) -> list[str]:
    return [g.b.op("LeakyRelu", [g.name(op.inputs[0])], alpha=float(op.attributes["alpha"]))]


def _clip_by_value(g: Graph, op: tf_graph.TFOp) -> list[str]:
    x, low, high = (g.name(name) for name in op.inputs)
    return [g.b.op("Min", [g.b.op("Max", [x, low]), high])]


def _floor_div(g: Graph, op: tf_graph.TFOp) -> list[str]:
    x, y = g.name(op.inputs[0]), g.name(op.inputs[1])
    if g.tensor(op.inputs[0]).dtype.kind == "f":
        return [g.b.op("Floor", [g.b.op("Div", [x, y])])]
    # Integers: (x - floormod(x, y)) / y divides exactly, so truncation is the floor.
    return [g.b.op("Div", [g.b.op("Sub", [x, g.b.op("Mod", [x, y], fmod=0)]), y])]


def _floor_mod(g: Graph, op: tf_graph.TFOp) -> list[str]:
    x, y = g.name(op.inputs[0]), g.name(op.inputs[1])
    if g.tensor(op.inputs[0]).dtype.kind != "f":
        return [g.b.op("Mod", [x, y], fmod=0)]  # the sign of the divisor, as TensorFlow's
    quotient = g.b.op("Floor", [g.b.op("Div", [x, y])])
    return [g.b.op("Sub", [x, g.b.op("Mul", [quotient, y])])]


def _add_n(g: Graph, op: tf_graph.TFOp) -> list[str]:
    return [g.b.op("Sum", [g.name(name) for name in op.inputs])]


def _select(g: Graph, op: tf_graph.TFOp) -> list[str]:
    condition, x, y = op.inputs
    if op.type == "Select" and g.rank(condition) not in (0, g.rank(x)):
        raise g.unsupported("a condition of another rank than its values (tf.compat.v1.where)")
    return [g.b.op("Where", [g.name(condition), g.name(x), g.name(y)])]


def _bias_add(g: Graph, op: tf_graph.TFOp) -> list[str]:
    x, bias = op.inputs
    bias_name = g.name(bias)
    if op.attributes.get("data_format", "NHWC") == "NCHW" and g.rank(x) > 2:
        shape = [-1] + [1] * (g.rank(x) - 2)
        bias_name = g.b.op("Reshape", [bias_name, g.b.ints(shape, "bias_shape")])
    return [g.b.op("Add", [g.name(x), bias_name])]


def _cast(g: Graph, op: tf_graph.TFOp) -> list[str]:
    target = np.dtype(op.attributes["DstT"])
    x = op.inputs[0]
    if g.tensor(x).dtype == target:
        return [g.name(x)]
    return [g.b.op("Cast", [g.name(x)], to=tensor_type(target.name))]


def _softmax(onnx_type: str) -> TensorFlowRule:
    def rule(g: Graph, op: tf_graph.TFOp) -> list[str]:
        return [g.b.op(onnx_type, [g.name(op.inputs[0])], axis=-1)]

    return rule


# --------------------------------------------------------------------------------------
# Reductions and products.


def _axes(g: Graph, name: str) -> list[int]:
    return [int(axis) for axis in np.asarray(g.require(name, "axes")).reshape(-1)]


def _reduce(onnx_type: str) -> TensorFlowRule:
    def rule(g: Graph, op: tf_graph.TFOp) -> list[str]:
        x, axes_name = op.inputs
        axes = _axes(g, axes_name)
        if not axes:  # TensorFlow reduces nothing; ONNX would reduce everything
            return [g.name(x)]
        keepdims = bool(op.attributes.get("keep_dims", False))
        return [g.b.reduce(onnx_type, g.name(x), axes, keepdims)]

    return rule


def _arg_reduce(onnx_type: str) -> TensorFlowRule:
    def rule(g: Graph, op: tf_graph.TFOp) -> list[str]:
        x, axis_name = op.inputs
        (axis,) = _axes(g, axis_name)
        out = g.b.op(onnx_type, [g.name(x)], axis=axis, keepdims=0)
        target = np.dtype(op.attributes.get("output_type", np.int64))
        if target != np.int64:
            out = g.b.op("Cast", [out], to=tensor_type(target.name))
        return [out]

    return rule


def _swap_last(g: Graph, name: str) -> str:
    rank = g.rank(name)
    perm = [*range(rank - 2), rank - 1, rank - 2]
    return g.b.op("Transpose", [g.name(name)], perm=perm)


def _matmul(g: Graph, op: tf_graph.TFOp) -> list[str]:
    a, b = op.inputs
    flags = ("transpose_a", "transpose_b") if op.type == "MatMul" else ("adj_x", "adj_y")
    left = _swap_last(g, a) if op.attributes.get(flags[0]) else g.name(a)
    right = _swap_last(g, b) if op.attributes.get(flags[1]) else g.name(b)
    return [g.b.op("MatMul", [left, right])]


def _einsum(g: Graph, op: tf_graph.TFOp) -> list[str]:
    equation = op.attributes["equation"]
    return [g.b.op("Einsum", [g.name(name) for name in op.inputs], equation=equation)]


def _cumsum(g: Graph, op: tf_graph.TFOp) -> list[str]:
    x, axis = op.inputs
    return [
        g.b.op(
            "CumSum",
            [g.name(x), g.name(axis)],
            exclusive=int(bool(op.attributes.get("exclusive"))),
            reverse=int(bool(op.attributes.get("reverse"))),
        )
    ]


# --------------------------------------------------------------------------------------
# Shapes, slicing and joining.


def _reshape(g: Graph, op: tf_graph.TFOp) -> list[str]:
    x, shape = op.inputs
    static = g.constant(shape)
    allowzero: dict[str, Any] = {}
    if static is not None and 0 in np.asarray(static).reshape(-1):
        if g.b.opset < 14:
            raise g.unsupported("a size 0 in the new shape before ONNX opset 14")
        allowzero = {"allowzero": 1}  # TensorFlow's 0 is a size, ONNX's copies the input's
    return [g.b.op("Reshape", [g.name(x), g.int64(shape)], **allowzero)]


def _transpose(g: Graph, op: tf_graph.TFOp) -> list[str]:
    x, perm = op.inputs
    return [g.b.op("Transpose", [g.name(x)], perm=_axes(g, perm))]


def _concat(g: Graph, op: tf_graph.TFOp) -> list[str]:
    if op.type == "ConcatV2":
        *values, axis_name = op.inputs
    else:  # Concat: the axis first
        axis_name, *values = op.inputs
    (axis,) = _axes(g, axis_name)
    return [g.b.op("Concat", [g.name(name) for name in values], axis=axis)]


def _pack(g: Graph, op: tf_graph.TFOp) -> list[str]:
    axis = int(op.attributes.get("axis", 0))
    axes = g.b.ints([axis], "axes")
    parts = [g.b.op("Unsqueeze", [g.name(name), axes]) for name in op.inputs]
    return [parts[0] if len(parts) == 1 else g.b.op("Concat", parts, axis=axis)]


def _split_equal(g: Graph, x: str, axis: int, count: int) -> list[str]:
    if count == 1:
        return [g.name(x)]
    size = (g.tensor(x).shape or [None] * (axis + 1))[axis]
    if size is None:
        raise g.unsupported("splitting an axis of unknown size")
    if size % count:
        raise g.unsupported(f"splitting {size} into {count} equal parts")
    sizes = g.b.ints([size // count] * count, "split")
    return g.b.op("Split", [g.name(x), sizes], axis=axis, outputs=count)


def _unpack(g: Graph, op: tf_graph.TFOp) -> list[str]:
    axis = int(op.attributes.get("axis", 0))
    x = op.inputs[0]
    rank = g.rank(x)
    parts = _split_equal(g, x, axis % rank, len(op.outputs))
    axes = g.b.ints([axis % rank], "axes")
    return [g.b.op("Squeeze", [part, axes]) for part in parts]


def _split(g: Graph, op: tf_graph.TFOp) -> list[str]:
    axis_name, x = op.inputs
    (axis,) = _axes(g, axis_name)
    return _split_equal(g, x, axis % g.rank(x), len(op.outputs))


def _split_v(g: Graph, op: tf_graph.TFOp) -> list[str]:
    x, sizes_name, axis_name = op.inputs
    (axis,) = _axes(g, axis_name)
    sizes = _axes(g, sizes_name)
    if -1 in sizes:
        total = (g.tensor(x).shape or [None] * (axis % g.rank(x) + 1))[axis]
        if total is None:
            raise g.unsupported("a size -1 along an axis of unknown size")
        sizes[sizes.index(-1)] = total - (sum(sizes) + 1)
    if len(sizes) == 1:
        return [g.name(x)]
    return g.b.op("Split", [g.name(x), g.b.ints(sizes, "split")], axis=axis, outputs=len(sizes))


def _expand_dims(g: Graph, op: tf_graph.TFOp) -> list[str]:
    x, axis_name = op.inputs
    return [g.b.op("Unsqueeze", [g.name(x), g.b.ints(_axes(g, axis_name), "axes")])]


def _squeeze(g: Graph, op: tf_graph.TFOp) -> list[str]:
    x = op.inputs[0]
    axes = [int(axis) for axis in op.attributes.get("squeeze_dims", [])]
    if not axes:  # every axis of size 1, known statically (never the batch's)
        shape = g.tensor(x).shape
        if shape is None:
            raise g.unsupported("squeezing an input of unknown rank")
        axes = [axis for axis, size in enumerate(shape) if size == 1]
        if not axes:
            return [g.name(x)]
    return [g.b.op("Squeeze", [g.name(x), g.b.ints(axes, "axes")])]


def _strided_slice(g: Graph, op: tf_graph.TFOp) -> list[str]:
    """``x[...]``: ONNX Slice on the input's axes, then Squeeze for the indexed axes
    and Unsqueeze for the new ones (``tf.newaxis``)."""
    x, begin_name, end_name, strides_name = op.inputs
    rank = g.rank(x)
    begin = _axes(g, begin_name)
    end = _axes(g, end_name)
    strides = _axes(g, strides_name)
    attributes = op.attributes

    def bit(mask: str, index: int) -> bool:
        return bool(int(attributes.get(mask, 0)) >> index & 1)

    consumed = sum(1 for i in range(len(begin)) if not bit("new_axis_mask", i))
    starts, ends, axes, steps = [], [], [], []
    shrink: list[int] = []  # input axes indexed away
    new_axes: list[int] = []  # output axes inserted
    axis = 0  # the input axis the next entry reads
    output_axis = 0
    for i in range(len(begin)):
        if bit("ellipsis_mask", i):
            covered = rank - (consumed - 1)
            axis += covered
            output_axis += covered
            continue
        if bit("new_axis_mask", i):
            new_axes.append(output_axis)
            output_axis += 1
            continue
        step = strides[i]
        if step == 0:
            raise g.unsupported("a slice with step 0")
        if bit("shrink_axis_mask", i):
            start = begin[i]
            starts.append(start)
            ends.append(start + 1 if start != -1 else _INT64_MAX)
            axes.append(axis)
            steps.append(1)
            shrink.append(axis)
        else:
            start = begin[i] if not bit("begin_mask", i) else (0 if step > 0 else _INT64_MAX)
            stop = end[i] if not bit("end_mask", i) else (_INT64_MAX if step > 0 else _INT64_MIN)
            if (start, stop, step) != (0, _INT64_MAX, 1):
                starts.append(start)
                ends.append(stop)
                axes.append(axis)
                steps.append(step)
            output_axis += 1
        axis += 1
    out = g.name(x)
    if axes:
        out = g.b.op(
            "Slice",
            [
                out,
                g.b.ints(starts, "starts"),
                g.b.ints(ends, "ends"),
                g.b.ints(axes, "axes"),
                g.b.ints(steps, "steps"),
            ],
        )
    if shrink:
        out = g.b.op("Squeeze", [out, g.b.ints(shrink, "axes")])
    if new_axes:
        out = g.b.op("Unsqueeze", [out, g.b.ints(new_axes, "axes")])
    if not (axes or shrink or new_axes):
        out = g.b.op("Identity", [out])
    return [out]


def _slice(g: Graph, op: tf_graph.TFOp) -> list[str]:
    x, begin_name, size_name = op.inputs
    begin = _axes(g, begin_name)
    size = _axes(g, size_name)
    ends = [
        _INT64_MAX if length == -1 else start + length
        for start, length in zip(begin, size, strict=True)
    ]
    inputs = [g.name(x), g.b.ints(begin, "starts"), g.b.ints(ends, "ends")]
    return [g.b.op("Slice", [*inputs, g.b.ints(range(len(begin)), "axes")])]


def _shape(g: Graph, op: tf_graph.TFOp) -> list[str]:
    out = g.b.op("Shape", [g.name(op.inputs[0])])
    target = np.dtype(op.attributes.get("out_type", np.int32))
    return [out if target == np.int64 else g.b.op("Cast", [out], to=tensor_type(target.name))]


def _size(g: Graph, op: tf_graph.TFOp) -> list[str]:
    out = g.b.op("Size", [g.name(op.inputs[0])])
    target = np.dtype(op.attributes.get("out_type", np.int32))
    return [out if target == np.int64 else g.b.op("Cast", [out], to=tensor_type(target.name))]


def _fill(g: Graph, op: tf_graph.TFOp) -> list[str]:
    dims, value = op.inputs
    return [g.b.op("Expand", [g.name(value), g.int64(dims)])]


def _fill_like(number: float) -> TensorFlowRule:
    def rule(g: Graph, op: tf_graph.TFOp) -> list[str]:
        x = op.inputs[0]
        return [g.b.op("Expand", [g.scalar(number, x), g.b.op("Shape", [g.name(x)])])]

    return rule


def _pad(g: Graph, op: tf_graph.TFOp) -> list[str]:
    x, paddings_name, *rest = op.inputs
    paddings = np.asarray(g.require(paddings_name, "paddings")).reshape(-1, 2)
    pads = g.b.ints([*paddings[:, 0].tolist(), *paddings[:, 1].tolist()], "pads")
    if op.type == "MirrorPad":
        mode = str(op.attributes.get("mode", "REFLECT")).upper()
        if mode != "REFLECT":
            raise g.unsupported(f"mode {mode!r} (REFLECT has an ONNX equivalent)")
        return [g.b.op("Pad", [g.name(x), pads], mode="reflect")]
    inputs = [g.name(x), pads] + ([g.name(rest[0])] if rest else [])
    return [g.b.op("Pad", inputs, mode="constant")]


def _tile(g: Graph, op: tf_graph.TFOp) -> list[str]:
    x, multiples = op.inputs
    return [g.b.op("Tile", [g.name(x), g.int64(multiples)])]


def _gather(g: Graph, op: tf_graph.TFOp) -> list[str]:
    if op.type == "GatherV2":
        params, indices, axis_name = op.inputs
        (axis,) = _axes(g, axis_name)
    else:
        params, indices = op.inputs
        axis = 0
    if int(op.attributes.get("batch_dims", 0)):
        raise g.unsupported("batch_dims other than 0")
    return [g.b.op("Gather", [g.name(params), g.name(indices)], axis=axis)]


def _gather_nd(g: Graph, op: tf_graph.TFOp) -> list[str]:
    params, indices = op.inputs
    return [g.b.op("GatherND", [g.name(params), g.int64(indices)])]


def _resize(mode: str) -> TensorFlowRule:
    """ResizeBilinear / ResizeNearestNeighbor of NHWC images: ONNX Resize on NCHW."""

    def rule(g: Graph, op: tf_graph.TFOp) -> list[str]:
        images, size = op.inputs
        if g.rank(images) != 4:
            raise g.unsupported("images of another rank than 4")
        # TensorFlow's sampling: bilinear at (i + 0.5) * in / out - 0.5 (half pixel),
        # i * (in - 1) / (out - 1) (align_corners) or i * in / out; nearest rounds the
        # same (round half up), with half pixel at floor((i + 0.5) * in / out), which is
        # ONNX's half_pixel rounded half up.
        if op.attributes.get("align_corners"):
            coordinates, rounding = "align_corners", "round_prefer_ceil"
        elif op.attributes.get("half_pixel_centers"):
            coordinates, rounding = "half_pixel", "round_prefer_ceil"
        else:
            coordinates, rounding = "asymmetric", "floor"
        nearest: dict[str, Any] = {"nearest_mode": rounding} if mode == "nearest" else {}
        x = g.b.op("Transpose", [g.name(images)], perm=[0, 3, 1, 2])
        shape = g.b.op("Shape", [x])
        leading = g.b.op("Slice", [shape, g.b.ints([0], "starts"), g.b.ints([2], "ends")])
        sizes = g.b.op("Concat", [leading, g.int64(size)], axis=0)
        out = g.b.op(
            "Resize",
            [x, "", "", sizes],
            mode=mode,
            coordinate_transformation_mode=coordinates,
            **nearest,
        )
        return [g.b.op("Transpose", [out], perm=[0, 2, 3, 1])]

    return rule


# --------------------------------------------------------------------------------------
# Convolution, pooling and batch normalization (NHWC, as TensorFlow computes them).


def _nchw(g: Graph, name: str) -> str:
    if op_format(g) == "NCHW":
        return g.name(name)
    return g.b.op("Transpose", [g.name(name)], perm=[0, 3, 1, 2])


def _nhwc(g: Graph, name: str) -> str:
    if op_format(g) == "NCHW":
        return name
    return g.b.op("Transpose", [name], perm=[0, 2, 3, 1])


def op_format(g: Graph) -> str:
    assert g.op is not None
    return str(g.op.attributes.get("data_format", "NHWC"))


def _spatial(values: Sequence[int], data_format: str) -> list[int]:
    values = [int(v) for v in values]
    return values[2:4] if data_format == "NCHW" else values[1:3]


def _padding(g: Graph, op: tf_graph.TFOp) -> dict[str, Any]:
    padding = str(op.attributes.get("padding", "VALID"))
    if padding == "SAME":
        return {"auto_pad": "SAME_UPPER"}  # TensorFlow puts the odd pixel at the end
    if padding == "EXPLICIT":
        explicit = np.asarray(op.attributes.get("explicit_paddings", []), dtype=np.int64)
        pairs = explicit.reshape(-1, 2)
        pairs = pairs[2:4] if op_format(g) == "NCHW" else pairs[1:3]
        return {"pads": [*pairs[:, 0].tolist(), *pairs[:, 1].tolist()]}
    return {}


def _conv2d(g: Graph, op: tf_graph.TFOp) -> list[str]:
    x, kernel_name = op.inputs
    kernel = g.require(kernel_name, "kernel")  # (height, width, in / groups, out)
    data_format = op_format(g)
    channels = (g.tensor(x).shape or [None] * 4)[1 if data_format == "NCHW" else 3]
    if op.type == "DepthwiseConv2dNative":  # (height, width, channels, multiplier)
        height, width, in_channels, multiplier = kernel.shape
        weight = kernel.reshape(height, width, 1, in_channels * multiplier)
        groups = in_channels
    else:
        weight = kernel
        if channels is None:
            raise g.unsupported("an input with an unknown number of channels")
        groups = int(channels) // kernel.shape[2]
    weight = np.transpose(weight, (3, 2, 0, 1))  # ONNX: (out, in / groups, height, width)
    out = g.b.op(
        "Conv",
        [_nchw(g, x), g.b.const(weight, "kernel", dtype=weight.dtype)],
        strides=_spatial(op.attributes.get("strides", [1, 1, 1, 1]), data_format),
        dilations=_spatial(op.attributes.get("dilations", [1, 1, 1, 1]), data_format),
        group=groups,
        kernel_shape=list(weight.shape[2:]),
        **_padding(g, op),
    )
    return [_nhwc(g, out)]


def _pool(onnx_type: str) -> TensorFlowRule:
    def rule(g: Graph, op: tf_graph.TFOp) -> list[str]:
        data_format = op_format(g)
        extra: dict[str, Any] = {"count_include_pad": 0} if onnx_type == "AveragePool" else {}
        out = g.b.op(
            onnx_type,
            [_nchw(g, op.inputs[0])],
            kernel_shape=_spatial(op.attributes["ksize"], data_format),
            strides=_spatial(op.attributes["strides"], data_format),
            **_padding(g, op),
            **extra,
        )
        return [_nhwc(g, out)]

    return rule


def _fused_batch_norm(g: Graph, op: tf_graph.TFOp) -> list[str]:
    """``FusedBatchNorm*`` at inference: ``x * scale' + offset'`` on the channel axis."""
    if op.attributes.get("is_training", False):
        raise g.unsupported("a batch normalization in training mode")
    x = op.inputs[0]
    epsilon = float(op.attributes.get("epsilon", 1e-3))
    values = [np.asarray(g.require(name, "statistics"), np.float64) for name in op.inputs[1:5]]
    gamma, beta, moving_mean, moving_variance = values
    multiplier = gamma / np.sqrt(moving_variance + epsilon)
    shift = beta - moving_mean * multiplier
    dtype = g.tensor(x).dtype
    if op_format(g) == "NCHW":
        multiplier, shift = multiplier.reshape(-1, 1, 1), shift.reshape(-1, 1, 1)
    scaled = g.b.op("Mul", [g.name(x), g.b.const(multiplier, "multiplier", dtype=dtype)])
    out = g.b.op("Add", [scaled, g.b.const(shift, "shift", dtype=dtype)])
    return [out]  # the batch statistics outputs are for training


# --------------------------------------------------------------------------------------
# The table: TensorFlow op type -> rule.

TENSORFLOW_RULES: dict[str, TensorFlowRule] = {
    # Pass-through
    "Identity": _identity,
    "IdentityN": _identity,
    "StopGradient": _identity,
    "PreventGradient": _identity,
    "Snapshot": _identity,
    "EnsureShape": _identity,
    "CheckNumerics": _identity,
    # Arithmetic
    "Add": _binary("Add"),
    "AddV2": _binary("Add"),
    "AddN": _add_n,
    "Sub": _binary("Sub"),
    "Mul": _binary("Mul"),
    "RealDiv": _binary("Div"),
    "Div": _binary("Div"),
    "FloorDiv": _floor_div,
    "FloorMod": _floor_mod,
    "Maximum": _binary("Max"),
    "Minimum": _binary("Min"),
    "Pow": _binary("Pow"),
    "SquaredDifference": _squared_difference,
    "BiasAdd": _bias_add,
    "Neg": _unary("Neg"),
    "Abs": _unary("Abs"),
    "Sqrt": _unary("Sqrt"),
    "Rsqrt": _rsqrt,
    "Square": _square,
    "Reciprocal": _unary("Reciprocal"),
    "Inv": _unary("Reciprocal"),
    "Exp": _unary("Exp"),
    "Log": _unary("Log"),
    "Log1p": _log1p,
    "Sin": _unary("Sin"),
    "Cos": _unary("Cos"),
    "Erf": _unary("Erf"),
    "Floor": _unary("Floor"),
    "Ceil": _unary("Ceil"),
    "Round": _unary("Round"),  # both round half to even
    "Sign": _unary("Sign"),
    "ClipByValue": _clip_by_value,
    "Cast": _cast,
    # Activations
    "Relu": _unary("Relu"),
    "Relu6": _relu6,
    "Elu": _unary("Elu", alpha=1.0),
    "Selu": _unary("Selu"),
    "LeakyRelu": _leaky_relu,
    "Softplus": _unary("Softplus"),
    "Softsign": _unary("Softsign"),
    "Sigmoid": _unary("Sigmoid"),
    "Tanh": _unary("Tanh"),
    "Softmax": _softmax("Softmax"),
    "LogSoftmax": _softmax("LogSoftmax"),
    # Comparisons and selection
    "Greater": _binary("Greater"),
    "GreaterEqual": _binary("GreaterOrEqual"),
    "Less": _binary("Less"),
    "LessEqual": _binary("LessOrEqual"),
    "Equal": _binary("Equal"),
    "NotEqual": _not_equal,
    "LogicalAnd": _binary("And"),
    "LogicalOr": _binary("Or"),
    "LogicalNot": _unary("Not"),
    "Select": _select,
    "SelectV2": _select,
    # Reductions and products
    "Mean": _reduce("ReduceMean"),
    "Sum": _reduce("ReduceSum"),
    "Max": _reduce("ReduceMax"),
    "Min": _reduce("ReduceMin"),
    "Prod": _reduce("ReduceProd"),
    "ArgMax": _arg_reduce("ArgMax"),
    "ArgMin": _arg_reduce("ArgMin"),
    "Cumsum": _cumsum,
    "MatMul": _matmul,
    "BatchMatMul": _matmul,
    "BatchMatMulV2": _matmul,
    "BatchMatMulV3": _matmul,
    "Einsum": _einsum,
    # Shapes, slicing and joining
    "Shape": _shape,
    "Size": _size,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "ExpandDims": _expand_dims,
    "Squeeze": _squeeze,
    "ConcatV2": _concat,
    "Concat": _concat,
    "Pack": _pack,
    "Unpack": _unpack,
    "Split": _split,
    "SplitV": _split_v,
    "StridedSlice": _strided_slice,
    "Slice": _slice,
    "Fill": _fill,
    "ZerosLike": _fill_like(0.0),
    "OnesLike": _fill_like(1.0),
    "Pad": _pad,
    "PadV2": _pad,
    "MirrorPad": _pad,
    "Tile": _tile,
    "GatherV2": _gather,
    "Gather": _gather,
    "GatherNd": _gather_nd,
    # Images
    "ResizeBilinear": _resize("linear"),
    "ResizeNearestNeighbor": _resize("nearest"),
    "Conv2D": _conv2d,
    "DepthwiseConv2dNative": _conv2d,
    "AvgPool": _pool("AveragePool"),
    "MaxPool": _pool("MaxPool"),
    "FusedBatchNorm": _fused_batch_norm,
    "FusedBatchNormV2": _fused_batch_norm,
    "FusedBatchNormV3": _fused_batch_norm,
}

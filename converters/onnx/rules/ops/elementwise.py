"""``keras.ops`` rules: elementwise operations, binary operations and activations.

Elementwise rules keep whatever layout their input has (a tensor a convolution
left channels-first stays so). :data:`BINARY_OPS` is the one map of binary
operations (arithmetic, comparisons, logical and/or, mod): one rule,
:func:`binary`, exports them all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from keras import activations

from keras_bn._keras_internals import numpy_ops
from keras_bn.converters.graph import Node, Tensor, to_numpy
from keras_bn.converters.onnx.builder import Builder, Unsupported, tensor_type
from keras_bn.converters.onnx.rules.activations import ACTIVATIONS, gelu
from keras_bn.converters.onnx.rules.common import (
    Rule,
    common_layout,
    constant_input,
    softmax_nodes,
)
from keras_bn.converters.onnx.rules.ops.common import axes_of, boolean, cast_to, operand
from keras_bn.converters.tracing import batch_multiple

__all__ = [
    "BINARY_OPS",
    "binary",
    "cast",
    "clip",
    "constant",
    "erf",
    "gelu_op",
    "identity",
    "log_softmax",
    "logical_not",
    "negative",
    "round_op",
    "rsqrt",
    "softmax_op",
    "square",
    "unary",
    "unary_activation",
    "where",
    "zeros_like",
]


def constant(b: Builder, node: Node) -> None:
    """A traced call's output computed from constants only (flatten drops the ones
    nothing reads); an Identity gives a graph output of its own."""
    out = constant_input(b, node.layer.value)
    b.set(node.outputs[0], out if node.outputs[0].consumers else b.op("Identity", [out]))


def unary(op_type: str) -> Rule:
    """The rule of an operation that is one ONNX operator of one input."""

    def rule(b: Builder, node: Node) -> None:
        value = b.value(node.inputs[0])
        b.set(node.outputs[0], b.op(op_type, [b.get(node.inputs[0], value.perm)]), value.perm)

    rule.__name__ = f"op_{op_type.lower()}"
    return rule


def square(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    x = b.get(node.inputs[0], value.perm)
    b.set(node.outputs[0], b.op("Mul", [x, x]), value.perm)


def rsqrt(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    root = b.op("Sqrt", [b.get(node.inputs[0], value.perm)])
    b.set(node.outputs[0], b.op("Reciprocal", [root]), value.perm)


def erf(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    b.set(node.outputs[0], b.op("Erf", [b.get(node.inputs[0], value.perm)]), value.perm)


def negative(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    b.set(node.outputs[0], b.op("Neg", [b.get(node.inputs[0], value.perm)]), value.perm)


def round_op(b: Builder, node: Node) -> None:
    """``ops.round(x, decimals)``: ONNX Round rounds half to even, as Keras does;
    ``decimals`` scales by ``10**decimals`` around it, as Keras's backends do.
    Integers are their own rounding unless ``decimals`` is negative (then rounded
    in float32 and cast back, as Keras does)."""
    tensor, out = node.inputs[0], node.outputs[0]
    decimals = int(node.layer.decimals)
    value = b.value(tensor)
    dtype = np.dtype(tensor.dtype)
    if dtype.kind != "f" and decimals >= 0:
        b.set(out, b.op("Identity", [b.get(tensor, value.perm, cast=False)]), value.perm)
        return
    compute = b.dtype if dtype.kind == "f" else np.dtype("float32")  # Keras: floatx
    x = cast_to(b, b.get(tensor, value.perm), dtype if dtype.kind != "f" else compute, compute)
    if decimals == 0:
        rounded = b.op("Round", [x])
    else:
        factor = b.const(np.asarray(10.0**decimals), "factor", dtype=compute)
        rounded = b.op("Div", [b.op("Round", [b.op("Mul", [x, factor])]), factor])
    b.set(out, cast_to(b, rounded, compute, out.dtype), value.perm)


def cast(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    x = b.get(node.inputs[0], value.perm, cast=False)
    b.set(node.outputs[0], b.op("Cast", [x], to=tensor_type(node.outputs[0].dtype)), value.perm)


def identity(b: Builder, node: Node) -> None:
    """``ops.stop_gradient`` (the identity at inference) and ``ops.convert_to_tensor``
    of a tensor (a Cast where it changes the dtype)."""
    tensor, out = node.inputs[0], node.outputs[0]
    value = b.value(tensor, keep_pads=True)
    if np.dtype(tensor.dtype) == np.dtype(out.dtype):
        b.set(out, value)
        return
    x = b.get(tensor, value.perm, cast=False)
    b.set(out, b.op("Cast", [x], to=tensor_type(out.dtype)), value.perm)


def zeros_like(b: Builder, node: Node) -> None:
    """Zeros of the input's shape (and the op's dtype), in the input's layout."""
    value = b.value(node.inputs[0])
    shape = b.op("Shape", [b.get(node.inputs[0], value.perm, cast=False)])
    dtype = np.dtype(node.outputs[0].dtype)
    zero = b.const(np.zeros((1,), dtype=dtype), "zero", dtype=dtype)
    b.set(node.outputs[0], b.op("Expand", [zero, shape]), value.perm)


def logical_not(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    x = boolean(b, b.get(node.inputs[0], value.perm, cast=False), node.inputs[0].dtype)
    b.set(node.outputs[0], b.op("Not", [x]), value.perm)


def clip(b: Builder, node: Node) -> None:
    """Clip of floats, or of integers (D-FINE's pixel indices) with integer bounds."""
    tensor, out = node.inputs[0], node.outputs[0]
    value = b.value(tensor)
    dtype = np.dtype(out.dtype)
    if dtype.kind == "f":
        x = b.get(tensor, value.perm)
        low = b.scalar(float(node.layer.x_min), "min")
        high = b.scalar(float(node.layer.x_max), "max")
    else:
        x = cast_to(b, b.get(tensor, value.perm, cast=False), tensor.dtype, out.dtype)
        low = b.const(np.asarray(to_numpy(node.layer.x_min), dtype), "min", dtype=dtype)
        high = b.const(np.asarray(to_numpy(node.layer.x_max), dtype), "max", dtype=dtype)
    b.set(out, b.op("Clip", [x, low, high]), value.perm)


def where(b: Builder, node: Node) -> None:
    if len(node.args) != 3 or node.args[1] is None:
        raise Unsupported("only where(condition, x1, x2) is exported")
    like = next((arg for arg in node.args[1:] if isinstance(arg, Tensor)), None)
    condition = operand(b, node.args[0])
    if not isinstance(node.args[0], Tensor) or np.dtype(node.args[0].dtype) != np.bool_:
        condition = b.op("Cast", [condition], to=tensor_type("bool"))
    operands = [operand(b, arg, like) for arg in node.args[1:]]
    b.set(node.outputs[0], b.op("Where", [condition, *operands]))


# --------------------------------------------------------------------------------------
# Binary operations: one map, one rule.

# Emits a binary operation from its two operands, in the dtype they were brought to.
BinaryEmitter = Callable[[Builder, list[str], np.dtype], str]


def _not_equal(b: Builder, operands: list[str], dtype: np.dtype) -> str:
    return b.op("Not", [b.op("Equal", operands)])


def _mod(b: Builder, operands: list[str], dtype: np.dtype) -> str:
    """NumPy's (Python's) mod: the remainder takes the divisor's sign. ONNX Mod
    computes it for integers (``fmod=0``); floats take C's fmod (``fmod=1``, the
    dividend's sign) plus the divisor where the signs differ, as NumPy does."""
    if dtype.kind != "f":
        return b.op("Mod", operands, fmod=0)
    remainder = b.op("Mod", operands, fmod=1)
    zero = b.scalar(0.0, "zero")
    signs_differ = b.op("Xor", [b.op("Less", [remainder, zero]), b.op("Less", [operands[1], zero])])
    adjust = b.op("And", [signs_differ, b.op("Not", [b.op("Equal", [remainder, zero])])])
    return b.op("Where", [adjust, b.op("Add", [remainder, operands[1]]), remainder])


# keras.ops binary operation -> the ONNX operator computing it, or an emitter.
BINARY_OPS: dict[type, str | BinaryEmitter] = {
    numpy_ops.Add: "Add",
    numpy_ops.Subtract: "Sub",
    numpy_ops.Multiply: "Mul",
    numpy_ops.Divide: "Div",
    numpy_ops.TrueDivide: "Div",
    numpy_ops.Maximum: "Max",
    numpy_ops.Minimum: "Min",
    numpy_ops.Power: "Pow",
    numpy_ops.Mod: _mod,
    numpy_ops.Greater: "Greater",
    numpy_ops.GreaterEqual: "GreaterOrEqual",
    numpy_ops.Less: "Less",
    numpy_ops.LessEqual: "LessOrEqual",
    numpy_ops.Equal: "Equal",
    numpy_ops.NotEqual: _not_equal,
    numpy_ops.LogicalAnd: "And",
    numpy_ops.LogicalOr: "Or",
}
_LOGICAL = {"And", "Or"}


def _operand_dtype(node: Node, operation: Any, args: Sequence[Any]) -> np.dtype:
    """The dtype both operands are brought to: Keras's result type (the output's)
    for arithmetic, bool for logical and/or, and for comparisons the operands'
    common type (a float if either is)."""
    if operation in _LOGICAL:
        return np.dtype(np.bool_)
    output = np.dtype(node.outputs[0].dtype)
    if output.kind != "b":
        return output
    dtypes = [np.dtype(a.dtype) if isinstance(a, Tensor) else np.asarray(a).dtype for a in args]
    floats = [dtype for dtype in dtypes if dtype.kind == "f"]
    if floats:
        return floats[0]  # computed in the node's float dtype (see binary)
    tensor_dtypes = [np.dtype(a.dtype) for a in args if isinstance(a, Tensor)]
    return np.result_type(*tensor_dtypes)


def binary(b: Builder, node: Node) -> None:
    """``x + 3.0``, ``a * b``, ``x > 0.5``, ``ops.mod(i, 7)``...: the operands in the
    layout most of them have (NumPy broadcasting of a lower-rank operand needs Keras
    order), brought to one dtype (:func:`_operand_dtype`); floats compute in the
    node's float dtype, integers (indices computed in ``call()``: D-FINE's ``y *
    width + x``) in their own, except true division."""
    operation = BINARY_OPS[type(node.layer)]
    args = list(node.args[:2])
    if len(node.args) != 2 or not any(isinstance(arg, Tensor) for arg in args):
        raise Unsupported("only binary operations of two operands, one symbolic, are exported")
    dtype = _operand_dtype(node, operation, args)
    if dtype.kind not in "fiub" or (operation == "Div" and dtype.kind != "f"):
        raise Unsupported("only binary operations on float, integer or boolean tensors")
    tensors = [arg for arg in args if isinstance(arg, Tensor)]
    batch_sized = any(
        not isinstance(arg, Tensor) and np.ndim(arg) and batch_multiple(np.shape(arg)[0]) == 1
        for arg in args
    )
    if batch_sized:  # a constant tiled to the batch (constant_input): Keras order
        names, perm = [b.get(t) for t in tensors], tuple(range(node.outputs[0].rank))
    else:
        names, perm = common_layout(b, tensors, expand=False)
    compute = b.dtype if dtype.kind == "f" else dtype  # floats: the node's float dtype
    names = [  # float tensors arrive in the node's float dtype (Builder.get)
        name
        if compute.kind == "f" and np.dtype(t.dtype).kind == "f"
        else cast_to(b, name, t.dtype, compute)
        for name, t in zip(names, tensors, strict=True)
    ]
    by_tensor = dict(zip(map(id, tensors), names, strict=True))
    operands = [
        by_tensor[id(arg)] if id(arg) in by_tensor else _constant(b, arg, dtype, perm, batch_sized)
        for arg in args
    ]
    if callable(operation):
        out = operation(b, operands, compute)
    else:
        out = b.op(operation, operands)
    b.set(node.outputs[0], out, perm)


def _constant(b: Builder, arg: Any, dtype: np.dtype, perm: Any, batch_sized: bool) -> str:
    """A constant operand in ``dtype`` (floats: the node's float dtype)."""
    floats = dtype.kind == "f"
    array = np.asarray(to_numpy(arg), dtype=np.float64 if floats else dtype)
    if batch_sized:
        return constant_input(b, array, dtype=None if floats else dtype)
    if array.ndim > len(perm):
        raise Unsupported(f"a constant of shape {array.shape} widens the tensor")
    return b.broadcast_const(array, len(perm), perm, "constant", dtype=None if floats else dtype)


# --------------------------------------------------------------------------------------
# Activations and softmax.


def unary_activation(function: Any) -> Rule:
    """The rule of a ``keras.ops`` activation op: the activation's own emitter."""
    emit = ACTIVATIONS[function]

    def rule(b: Builder, node: Node) -> None:
        value = b.value(node.inputs[0])
        b.set(node.outputs[0], emit(b, b.get(node.inputs[0], value.perm), value.perm), value.perm)

    rule.__name__ = f"op_{emit.__name__.removeprefix('_act_')}"
    return rule


def activation_relu_op(b: Builder, node: Node) -> None:
    """``keras.activations.relu`` recorded as its own operation: ReLU, or ReLU6 with a
    maximum of 6; a negative slope, another maximum or a threshold is not exported."""
    op = node.layer
    if op.negative_slope or op.threshold or op.max_value not in (None, 6):
        raise Unsupported(
            "keras.activations.relu with a negative_slope, threshold or max_value other "
            "than 6 is not exported"
        )
    function = activations.relu if op.max_value is None else activations.relu6
    unary_activation(function)(b, node)


def gelu_op(b: Builder, node: Node) -> None:
    value = b.value(node.inputs[0])
    out = gelu(b, b.get(node.inputs[0], value.perm), bool(node.layer.approximate))
    b.set(node.outputs[0], out, value.perm)


def softmax_op(b: Builder, node: Node) -> None:
    tensor = node.inputs[0]
    value = b.value(tensor)
    axes = axes_of(node.layer.axis, tensor.rank)
    b.set(node.outputs[0], softmax_nodes(b, b.get(tensor, value.perm), value, axes), value.perm)


def log_softmax(b: Builder, node: Node) -> None:
    tensor = node.inputs[0]
    value = b.value(tensor)
    axes = axes_of(node.layer.axis, tensor.rank)
    x = b.get(tensor, value.perm)
    b.set(node.outputs[0], b.op("Log", [softmax_nodes(b, x, value, axes)]), value.perm)

"""Export a Keras model to ONNX natively: read layer configs and weights, write nodes.

No TensorFlow tracing: :func:`export_onnx` walks the flattened layer graph
(:func:`keras_bn.converters.graph.flatten`) and asks one rule per layer class
(:data:`keras_bn.converters.onnx_rules.RULES`) to emit ONNX nodes through a
:class:`Builder`. Export therefore works the same on every Keras backend and costs
little more than serializing the weights.

Layout. Keras tensors are channels-last, ONNX convolutions channels-first. Every
exported tensor carries a *layout*: a permutation ``perm`` such that ONNX axis
``i`` holds Keras axis ``perm[i]`` (``(0, 3, 1, 2)`` is NCHW for an NHWC Keras
tensor). Rules that need an order ask for it and the builder inserts one cached
Transpose; elementwise rules, per-channel affines, concatenation and reductions
work in whatever layout their input has by remapping axes, so a convolutional
network gets one Transpose at its input and none inside.

After the graph is assembled, :func:`check_structure` runs the checks the ONNX
checker misses (graph inputs exactly the model's, no unused initializer, no
BatchNormalization left) and warns about batch normalizations exported unfolded;
then the model is written atomically and passes ``onnx.checker`` with
``full_check=True`` before it replaces the target file.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from keras_bn.converters import graph as graph_lib
from keras_bn.converters.errors import UserInputError
from keras_bn.converters.files import atomic_output
from keras_bn.converters.folding import (
    FoldedWeights,
    FoldReport,
    fold_batch_norms,
    fold_weights,
)
from keras_bn.converters.options import INPUT_LAYOUTS

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "MAX_OPSET",
    "ExportResult",
    "ExportWarning",
    "Builder",
    "Unsupported",
    "UnsupportedLayersError",
    "Value",
    "export_onnx",
    "check_structure",
    "identity_perm",
    "channels_first_perm",
]

DEFAULT_OPSET = 17  # LayerNormalization; supported by onnxruntime >= 1.14, TensorRT 8.6
MIN_OPSET = 13  # Softmax on one axis, Resize, axes as inputs of Squeeze/ReduceSum
MAX_OPSET = 23  # checked against onnxruntime 1.32
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of weights; protobuf caps files at 2 GiB
METADATA_LAYER_OUTPUTS = "keras_bn.layer_outputs"
METADATA_INPUT_LAYOUT = "keras_bn.input_layout"
BATCH_DIM = "batch"

Perm = tuple[int, ...]


class ExportWarning(UserWarning):
    """The export succeeded but the ONNX graph is not what an edge runtime wants."""


class Unsupported(Exception):
    """Raised by a rule for a layer (or configuration) it cannot export."""


class UnsupportedLayersError(UserInputError):
    """Some layers have no native ONNX rule; ``layers`` lists them (name, reason)."""

    def __init__(self, message: str, layers: list[str]):
        super().__init__(message)
        self.layers = layers


# --------------------------------------------------------------------------------------
# Layouts.


def identity_perm(rank: int) -> Perm:
    return tuple(range(rank))


def channels_first_perm(rank: int, channel_axis: int = -1) -> Perm:
    """The layout that moves Keras axis ``channel_axis`` to ONNX axis 1."""
    channel_axis %= rank
    if rank < 3:
        return identity_perm(rank)
    return (0, channel_axis, *(a for a in range(1, rank) if a != channel_axis))


def inverse_perm(perm: Sequence[int]) -> Perm:
    inverse = [0] * len(perm)
    for onnx_axis, keras_axis in enumerate(perm):
        inverse[keras_axis] = onnx_axis
    return tuple(inverse)


def same_memory_order(perm_a: Sequence[int], perm_b: Sequence[int], shape: Sequence) -> bool:
    """True if both layouts list the axes of size other than 1 in the same order.

    Two such layouts hold the same elements in the same row-major order, so a
    Reshape/Flatten of one equals the other's.
    """

    def big(perm):
        return [axis for axis in perm if shape[axis] != 1]

    return big(perm_a) == big(perm_b)


@dataclasses.dataclass(frozen=True)
class Value:
    """An exported Keras tensor: ONNX value ``name`` in layout ``perm``.

    ``pads`` is zero padding not yet applied (per Keras axis, ``(begin, end)``):
    ZeroPadding layers leave it pending so that a following valid convolution can
    take it as its own ``pads`` attribute instead of a separate Pad node.
    """

    name: str
    perm: Perm
    pads: tuple[tuple[int, int], ...] | None = None

    @property
    def rank(self) -> int:
        return len(self.perm)

    def axis(self, keras_axis: int) -> int:
        """The ONNX axis holding Keras axis ``keras_axis`` (negative counts from the end)."""
        return self.perm.index(keras_axis % self.rank)


# --------------------------------------------------------------------------------------
# The builder the rules write through.


def _tensor_type(dtype: str) -> int:
    try:
        return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except TypeError as error:
        raise Unsupported(f"dtype {dtype!r} has no ONNX tensor type") from error


class Builder:
    """Collects ONNX nodes and initializers while the rules run.

    Rules read their inputs with :meth:`value` / :meth:`get`, emit nodes with
    :meth:`op`, constants with :meth:`const`, and publish their outputs with
    :meth:`set`. Names derive from the Keras node being exported (:attr:`node`),
    so the ONNX graph reads like the Keras model.
    """

    def __init__(self, opset: int, reserved_names: Iterable[str] = ()):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, np.ndarray] = {}
        self.node: graph_lib.Node | None = None
        self._values: dict[int, Value] = {}
        self._transposed: dict[tuple[str, Perm, Perm], str] = {}
        self._names: set[str] = set(reserved_names)
        self._small_constants: dict[tuple, str] = {}
        self._keyed_constants: dict[Any, str] = {}
        self._first_op_named = False
        # Weights that replace a node's layer weights (a fold applied while
        # exporting), by id(node) then variable name; see folded_weight().
        self.folded_weights: dict[int, dict[str, np.ndarray]] = {}

    def folded_weight(self, node: graph_lib.Node, name: str) -> np.ndarray | None:
        """The folded value of ``node``'s weight ``name``, or None to read the layer's."""
        return self.folded_weights.get(id(node), {}).get(name)

    # Naming.
    def unique(self, base: str) -> str:
        name, suffix = base, 0
        while name in self._names:
            suffix += 1
            name = f"{base}_{suffix}"
        self._names.add(name)
        return name

    def begin(self, node: graph_lib.Node | None) -> None:
        self.node = node
        self._first_op_named = False

    @property
    def scope_name(self) -> str:
        return self.node.name if self.node is not None else "graph"

    @property
    def dtype(self) -> np.dtype:
        """The floating dtype the current node computes in (its first output's)."""
        if self.node is not None and self.node.outputs:
            dtype = np.dtype(self.node.outputs[0].dtype)
            if dtype.kind == "f":
                return dtype
        return np.dtype("float32")

    # Values.
    def declare(self, tensor: graph_lib.Tensor, value: Value) -> None:
        """Register a graph input (no node produces it)."""
        self._values[id(tensor)] = value

    def has(self, tensor: graph_lib.Tensor) -> bool:
        return id(tensor) in self._values

    def value(self, tensor: graph_lib.Tensor, *, keep_pads: bool = False) -> Value:
        """The current Value of ``tensor``; pending padding applied unless ``keep_pads``."""
        value = self._values[id(tensor)]
        if value.pads is not None and not keep_pads:
            value = self._apply_pads(value)
            self._values[id(tensor)] = value
        return value

    def get(self, tensor: graph_lib.Tensor, perm: Perm | None = None, *, cast: bool = True) -> str:
        """Name of ``tensor`` in layout ``perm`` (Keras order when None), cast to :attr:`dtype`.

        Transposes are cached, so asking twice for the same layout emits one node.
        """
        value = self.value(tensor)
        name = self.transpose(value, identity_perm(value.rank) if perm is None else perm)
        if cast:
            name = self.cast_float(name, tensor.dtype)
        return name

    def transpose(self, value: Value, perm: Perm) -> str:
        perm = tuple(perm)
        if value.perm == perm:
            return value.name
        key = (value.name, value.perm, perm)  # Permute re-labels a name's layout
        if key not in self._transposed:
            inverse = inverse_perm(value.perm)
            order = [inverse[keras_axis] for keras_axis in perm]
            self._transposed[key] = self.op(
                "Transpose", [value.name], perm=order, name=f"{value.name}/Transpose"
            )
        return self._transposed[key]

    def cast_float(self, name: str, dtype: str) -> str:
        """Cast a float input to the node's compute dtype (mixed precision)."""
        source = np.dtype(dtype)
        if source.kind == "f" and source != self.dtype:
            return self.op("Cast", [name], to=_tensor_type(self.dtype.name))
        return name

    def set(self, tensor: graph_lib.Tensor, name: str | Value, perm: Perm | None = None) -> None:
        """Publish the ONNX value computing Keras ``tensor`` (in layout ``perm``)."""
        if isinstance(name, Value):
            value = name
        else:
            value = Value(name, tuple(perm) if perm is not None else identity_perm(tensor.rank))
        if len(value.perm) != tensor.rank:
            raise RuntimeError(
                f"Internal error exporting {self.scope_name!r}: layout {value.perm} for a "
                f"tensor of rank {tensor.rank}."
            )
        self._values[id(tensor)] = value

    def _apply_pads(self, value: Value) -> Value:
        assert value.pads is not None
        begins = [value.pads[keras_axis][0] for keras_axis in value.perm]
        ends = [value.pads[keras_axis][1] for keras_axis in value.perm]
        name = self.op(
            "Pad", [value.name, self.ints(begins + ends)], mode="constant", name=f"{value.name}/Pad"
        )
        return Value(name, value.perm)

    # Nodes and constants.
    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        outputs: int = 1,
        name: str | None = None,
        domain: str | None = None,
        **attributes: Any,
    ) -> Any:
        """Append a node; return its output name (a list when ``outputs`` > 1)."""
        if name is not None:
            base = name
        elif not self._first_op_named:  # the node's first op carries the layer's name
            base = self.scope_name
            self._first_op_named = True
        else:
            base = f"{self.scope_name}/{op_type}"
        node_name = self.unique(base)
        output_names = (
            [node_name]
            if outputs == 1
            else [self.unique(f"{node_name}:{i}") for i in range(outputs)]
        )
        attributes = {key: value for key, value in attributes.items() if value is not None}
        self.nodes.append(
            helper.make_node(
                op_type, list(inputs), output_names, name=node_name, domain=domain, **attributes
            )
        )
        return output_names[0] if outputs == 1 else output_names

    def const(
        self,
        array: Any,
        hint: str,
        *,
        dtype: Any = None,
        key: Any = None,
    ) -> str:
        """An initializer holding ``array``; floats take :attr:`dtype` unless ``dtype`` is given.

        Small constants are shared by content; weights are shared by ``key`` (a
        shared layer called twice stores its kernel once).
        """
        if key is not None and key in self._keyed_constants:
            return self._keyed_constants[key]
        array = np.asarray(array)
        if dtype is not None:
            array = array.astype(dtype, copy=False)
        elif array.dtype.kind == "f":
            array = array.astype(self.dtype, copy=False)
        elif array.dtype.kind in "iub" and array.dtype != np.bool_:
            array = array.astype(np.int64, copy=False)
        content_key = None
        if array.size <= 64:
            content_key = (array.dtype.str, array.shape, array.tobytes())
            if content_key in self._small_constants:
                return self._small_constants[content_key]
        name = self.unique(f"{self.scope_name}/{hint}")
        self.initializers[name] = np.ascontiguousarray(array)
        if content_key is not None:
            self._small_constants[content_key] = name
        if key is not None:
            self._keyed_constants[key] = name
        return name

    def ints(self, values: Sequence[int], hint: str = "ints") -> str:
        return self.const(np.asarray(list(values), dtype=np.int64), hint, dtype=np.int64)

    def scalar(self, number: float, hint: str = "constant") -> str:
        return self.const(np.asarray(number, dtype=self.dtype), hint)

    def broadcast_const(
        self,
        array: Any,
        rank: int,
        perm: Perm,
        hint: str,
        *,
        axes: Sequence[int] | None = None,
        key: Any = None,
    ) -> str:
        """A constant that broadcasts against a rank-``rank`` Keras tensor in layout ``perm``.

        ``array`` broadcasts NumPy-style against the Keras tensor, or, with ``axes``,
        holds one entry per index of those Keras axes (BatchNormalization's
        ``moving_mean`` for ``axis=(1, 3)``).
        """
        array = np.asarray(array)
        if array.ndim == 0:
            return self.const(array, hint, key=key)
        if axes is not None:
            axes = sorted(axis % rank for axis in axes)
            shape = [1] * rank
            for axis, size in zip(
                axes, array.shape if array.ndim == len(axes) else (array.size,), strict=True
            ):
                shape[axis] = size
            array = array.reshape(shape)
        if array.ndim > rank:
            raise Unsupported(f"a constant of shape {array.shape} for a rank-{rank} tensor")
        array = array.reshape((1,) * (rank - array.ndim) + array.shape)
        if all(size == 1 for size in array.shape):
            return self.const(array.reshape(()), hint, key=key)
        array = np.transpose(array, perm)
        # Leading size-1 axes broadcast by themselves: drop them for a compact constant.
        while array.ndim > 1 and array.shape[0] == 1:
            array = array[0]
        return self.const(array, hint, key=key)

    def reduce(self, op_type: str, name: str, axes: Sequence[int], keepdims: bool) -> str:
        """A Reduce* node over ``axes`` (attribute before opset 18, input from 18)."""
        keep = int(bool(keepdims))
        if self.opset >= 18 or op_type == "ReduceSum":
            return self.op(op_type, [name, self.ints(axes, "axes")], keepdims=keep)
        return self.op(op_type, [name], axes=list(axes), keepdims=keep)


# --------------------------------------------------------------------------------------
# Results and structural checks.


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_onnx` wrote."""

    path: str
    opset: int
    op_counts: dict[str, int]
    node_count: int
    seconds: float
    input_names: list[str]
    output_names: list[str]
    input_layout: str = "channels_last"
    used_fallback: bool = False
    external_data: str | None = None  # file name of the weights when stored beside
    warnings: list[str] = dataclasses.field(default_factory=list)
    fold_report: FoldReport | None = None  # with fold=True

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(dataclasses.replace(self, fold_report=None))
        data["fold_report"] = None if self.fold_report is None else self.fold_report.to_dict()
        return data

    def __str__(self) -> str:
        ops = ", ".join(f"{op} {count}" for op, count in sorted(self.op_counts.items()))
        how = "Keras exporter (fallback)" if self.used_fallback else "native"
        lines = [
            f"Exported {self.path} ({how}, opset {self.opset}, {self.node_count} nodes, "
            f"{self.seconds:.2f} s)",
            f"  inputs: {', '.join(self.input_names)} ({self.input_layout}); "
            f"outputs: {', '.join(self.output_names)}",
            f"  ops: {ops}",
        ]
        lines += [f"  warning: {message}" for message in self.warnings]
        return "\n".join(lines)


_FOLDABLE_PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclasses.dataclass
class StructureReport:
    errors: list[str]  # the ONNX graph is wrong for this model
    warnings: list[str]  # valid, but not what was asked for (an unfolded BN)


def check_structure(model: onnx.ModelProto, input_names: Sequence[str]) -> StructureReport:
    """Checks ``onnx.checker`` misses.

    Errors: graph inputs differ from ``input_names`` (tf2onnx turns EfficientNet's
    Normalization constants into extra required inputs), an initializer no node
    uses, a BatchNormalization node. Warnings: a Mul+Add by per-channel constants
    right after a Conv/ConvTranspose/Gemm/MatMul, the trace of a batch
    normalization that was exported instead of folded.
    """
    graph = model.graph
    errors: list[str] = []
    found_warnings: list[str] = []
    graph_inputs = [value.name for value in graph.input]
    initializer_names = {tensor.name for tensor in graph.initializer}
    graph_inputs_only = [name for name in graph_inputs if name not in initializer_names]
    if graph_inputs_only != list(input_names):
        errors.append(
            f"graph inputs are {graph_inputs_only}, expected exactly the model's inputs "
            f"{list(input_names)}"
        )
    used = {name for node in graph.node for name in node.input}
    unused = sorted(initializer_names - used)
    if unused:
        shown = ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else "")
        errors.append(f"{len(unused)} initializers are used by no node: {shown}")
    batch_norms = [node.name for node in graph.node if node.op_type == "BatchNormalization"]
    if batch_norms:
        errors.append(f"BatchNormalization nodes remain: {batch_norms[:5]}")

    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    outputs = {value.name for value in graph.output}

    def constant_operand(node: onnx.NodeProto, other: str) -> bool:
        rest = [name for name in node.input if name != other]
        return len(rest) == 1 and rest[0] in initializer_names

    unfolded = []
    for mul in graph.node:
        if mul.op_type != "Mul" or len(mul.input) != 2:
            continue
        for operand in mul.input:
            producer = producers.get(operand)
            if producer is None or producer.op_type not in _FOLDABLE_PRODUCERS:
                continue
            if len(consumers[operand]) != 1 or operand in outputs:
                continue
            if not constant_operand(mul, operand):
                continue
            after = consumers.get(mul.output[0], [])
            if (
                len(after) == 1
                and after[0].op_type == "Add"
                and constant_operand(after[0], mul.output[0])
            ):
                unfolded.append(f"{producer.name} -> {mul.name} -> {after[0].name}")
    if unfolded:
        shown = "; ".join(unfolded[:3]) + (" ..." if len(unfolded) > 3 else "")
        found_warnings.append(
            f"{len(unfolded)} batch normalizations exported as Mul+Add after a foldable "
            f"layer ({shown}); fold_batch_norms or export_onnx(fold=True) folds them "
            "where that is exact, and its report says why any stays"
        )
    return StructureReport(errors, found_warnings)


# --------------------------------------------------------------------------------------
# The driver.


def _check_opset(opset: int | None) -> int:
    if opset is None:
        return DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int | np.integer):
        raise UserInputError(
            f"opset must be an integer in [{MIN_OPSET}, {MAX_OPSET}]; received opset={opset!r}."
        )
    limit = min(MAX_OPSET, onnx.defs.onnx_opset_version())
    if not MIN_OPSET <= int(opset) <= limit:
        raise UserInputError(
            f"opset {opset} is not supported: expected {MIN_OPSET} to {limit} "
            f"(default {DEFAULT_OPSET}); pass e.g. --opset {DEFAULT_OPSET}."
        )
    return int(opset)


def _check_arguments(input_layout: str, batch_size: int | None) -> None:
    if input_layout not in INPUT_LAYOUTS:
        raise UserInputError(
            f"input_layout must be 'channels_last' or 'channels_first'; received {input_layout!r}."
        )
    if batch_size is not None and (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int | np.integer)
        or batch_size < 1
    ):
        raise UserInputError(
            f"batch_size must be a positive integer or None (dynamic); received {batch_size!r}."
        )


def _dims(shape: Sequence[int | None], batch_size: int | None, prefix: str) -> list:
    dims: list[Any] = []
    for axis, size in enumerate(shape):
        if axis == 0:
            dims.append(BATCH_DIM if batch_size is None else int(batch_size))
        elif size is None:
            dims.append(f"{prefix}_dim{axis}")
        else:
            dims.append(int(size))
    return dims


def _node_keys(graph: graph_lib.Graph) -> list[str]:
    """A key per node: its name, with ``#k`` for the k-th further call of a shared layer."""
    seen: collections.Counter[str] = collections.Counter()
    keys = []
    for node in graph.nodes:
        count = seen[node.name]
        seen[node.name] += 1
        keys.append(node.name if count == 0 else f"{node.name}#{count}")
    return keys


def _unique_names(names: Sequence[str], taken: set[str]) -> list[str]:
    result = []
    for name in names:
        candidate, suffix = name, 0
        while candidate in taken:
            suffix += 1
            candidate = f"{name}_{suffix}"
        taken.add(candidate)
        result.append(candidate)
    return result


def build_onnx_model(
    model: Any,
    *,
    opset: int = DEFAULT_OPSET,
    input_layout: str = "channels_last",
    batch_size: int | None = None,
    graph: graph_lib.Graph | None = None,
    folded: FoldedWeights | None = None,
) -> onnx.ModelProto:
    """Build the ONNX ModelProto for ``model`` in memory (no checks, no file).

    ``folded``: folds to apply while exporting (``graph`` is then ``folded.graph``).
    Raises UnsupportedLayersError naming every layer that has no rule.
    """
    from keras_bn.converters import onnx_rules  # the rules import this module

    if graph is None:
        graph = graph_lib.flatten(model)
    input_names = list(graph.input_names)
    output_names = _unique_names(graph.output_names, set(input_names))
    builder = Builder(opset, reserved_names=[*input_names, *output_names])
    if folded is not None:
        builder.folded_weights = folded.weights

    onnx_inputs = []
    for tensor, name in zip(graph.inputs, input_names, strict=True):
        perm = (
            channels_first_perm(tensor.rank)
            if input_layout == "channels_first"
            else identity_perm(tensor.rank)
        )
        builder.declare(tensor, Value(name, perm))
        shape = [tensor.shape[axis] for axis in perm]
        onnx_inputs.append(
            helper.make_tensor_value_info(
                name, _tensor_type(tensor.dtype), _dims(shape, batch_size, name)
            )
        )

    failures: list[str] = []
    layer_outputs: dict[str, list] = {}
    for key, node in zip(_node_keys(graph), graph.nodes, strict=True):
        builder.begin(node)
        fused = folded is not None and id(node) in folded.fused
        rule = onnx_rules.find_rule(node.layer)
        if folded is not None and id(node) in folded.removed:  # now inside its neighbour
            rule = onnx_rules.identity
        try:
            if rule is None:
                raise Unsupported("no ONNX rule for this class")
            rule(builder, node)
            missing = [t for t in node.outputs if not builder.has(t)]
            if missing:
                raise RuntimeError(f"Rule for {node.name!r} did not set all of its outputs.")
        except Unsupported as reason:
            failures.append(f"{node.name!r} ({type(node.layer).__name__}: {reason})")
            for tensor in node.outputs:
                if not builder.has(tensor):
                    builder.set(tensor, f"<unsupported {node.name}>")
            continue
        entries = []
        for tensor in node.outputs:
            value = builder.value(tensor, keep_pads=True)
            # A fused node's Keras output has no ONNX tensor (the layer + BN pair's).
            entries.append(None if value.pads or fused else [value.name, list(value.perm)])
        layer_outputs[key] = entries
    if failures:
        raise UnsupportedLayersError(
            f"Cannot export {len(failures)} layer(s) natively to ONNX: {'; '.join(failures)}. "
            "Expected layers with a rule in keras_bn.converters.onnx_rules.RULES; replace "
            "them, or pass fallback=True (CLI: --fallback) to use Keras's own exporter "
            "(needs tf2onnx).",
            failures,
        )

    # Outputs in Keras layout, renamed after the model's outputs.
    builder.begin(None)
    renames: dict[str, str] = {}
    onnx_outputs = []
    graph_input_names = set(input_names)
    for tensor, name in zip(graph.outputs, output_names, strict=True):
        current = builder.get(tensor, cast=False)
        if current in graph_input_names or current in renames:
            builder.op("Identity", [renames.get(current, current)], name=name)
            builder.nodes[-1].output[0] = name
        else:
            renames[current] = name
        onnx_outputs.append(
            helper.make_tensor_value_info(
                name, _tensor_type(tensor.dtype), _dims(tensor.shape, batch_size, name)
            )
        )
    for node in builder.nodes:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for i, name in enumerate(node.output):
            if name in renames:
                node.output[i] = renames[name]
    for entries in layer_outputs.values():
        for entry in entries:
            if entry is not None and entry[0] in renames:
                entry[0] = renames[entry[0]]

    onnx_graph = helper.make_graph(builder.nodes, graph.name, onnx_inputs, onnx_outputs)
    opset_imports = [helper.make_opsetid("", opset)]
    onnx_model = helper.make_model(
        onnx_graph,
        opset_imports=opset_imports,
        producer_name="keras-bn",
        producer_version=_version(),
        doc_string=f"Keras model {graph.name!r} exported by keras-bn",
    )
    onnx_model.ir_version = helper.find_min_ir_version_for(opset_imports)
    helper.set_model_props(
        onnx_model,
        {
            METADATA_INPUT_LAYOUT: input_layout,
            METADATA_LAYER_OUTPUTS: json.dumps(layer_outputs, separators=(",", ":")),
        },
    )
    # Weights go straight into the model's graph (make_model copies the graph it gets).
    for name, array in builder.initializers.items():
        tensor = onnx_model.graph.initializer.add()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.raw_data = array.tobytes()
    return onnx_model


def _version() -> str:
    try:
        from keras_bn import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover
        return "unknown"


def _weights_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for tensor in model.graph.initializer:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total


def _move_weights_out(model: onnx.ModelProto, data_file: Path, location: str) -> None:
    """Store every initializer over 1 KiB in ``data_file`` (named ``location`` in the model)."""
    offset = 0
    with open(data_file, "wb") as stream:
        for tensor in model.graph.initializer:
            if len(tensor.raw_data) <= 1024:
                continue
            padding = (-offset) % 4096  # page-aligned, as onnx's own writer does
            stream.write(b"\0" * padding)
            offset += padding
            raw = tensor.raw_data
            stream.write(raw)
            del tensor.external_data[:]
            for key, value in (
                ("location", location),
                ("offset", str(offset)),
                ("length", str(len(raw))),
            ):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
            offset += len(raw)


def _finish(
    onnx_model: onnx.ModelProto,
    path: Path,
    input_names: Sequence[str],
    *,
    native: bool,
    external_data: bool | None,
) -> tuple[list[str], str | None]:
    """Run the structural checks, write atomically, run onnx.checker's full check."""
    report = check_structure(onnx_model, input_names)
    if report.errors:
        message = "; ".join(report.errors)
        if native:
            raise RuntimeError(
                f"Internal error in keras-bn's ONNX export: {message}. Please report it."
            )
        report.warnings.extend(report.errors)
    for message in report.warnings:
        warnings.warn(message, ExportWarning, stacklevel=3)

    if external_data is None:
        external_data = _weights_bytes(onnx_model) > EXTERNAL_DATA_THRESHOLD
    location = f"{path.name}.data" if external_data else None
    with atomic_output(path) as temporary:
        if location is None:
            onnx.save_model(onnx_model, str(temporary))
            onnx.checker.check_model(str(temporary), full_check=True)
        else:
            data_path = path.with_name(location)
            with atomic_output(data_path) as temporary_data:
                _move_weights_out(onnx_model, temporary_data, location)
            try:
                onnx.save_model(onnx_model, str(temporary))
                onnx.checker.check_model(str(temporary), full_check=True)
            except BaseException:
                data_path.unlink(missing_ok=True)
                raise
    return report.warnings, location


def export_onnx(
    model: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    input_layout: str = "channels_last",
    batch_size: int | None = None,
    fallback: bool = False,
    external_data: bool | None = None,
    fold: bool = False,
) -> ExportResult:
    """Export a built Sequential/Functional Keras model to an ONNX file.

    Args:
        model: the Keras model (not modified). An unfolded BatchNormalization is
            exported as Mul+Add, with a warning where it follows a foldable layer:
            pass ``fold=True``, or export ``fold_batch_norms``'s model.
        path: the ``.onnx`` file to write (atomically; an existing file is replaced).
        opset: ONNX opset, ``MIN_OPSET`` to ``MAX_OPSET``; default ``DEFAULT_OPSET``.
        input_layout: ``"channels_last"`` keeps each input's Keras shape;
            ``"channels_first"`` moves the last axis of inputs of rank >= 3 to
            axis 1 (NHWC -> NCHW), what most edge runtimes prefer.
        batch_size: None for a dynamic batch dimension (named ``"batch"``), or a
            fixed positive size.
        fallback: when some layer has no native rule, use Keras's own
            ``model.export(format="onnx")`` (tf2onnx) instead of raising.
        external_data: store weights in ``<path>.data`` beside the model; by
            default only when they exceed the 2 GiB protobuf limit.
        fold: fold BatchNormalization as ``fold_batch_norms`` does (same decisions,
            same operators, weights equal bit for bit) while exporting, without
            building the folded Keras model: the fast path when the ONNX file is
            all you need. The decisions are in ``result.fold_report``.

    Returns:
        An :class:`ExportResult`.

    Raises:
        UserInputError: a layer has no rule (all are named) and ``fallback`` is
            False, or an argument is invalid.
    """
    start = time.perf_counter()
    opset = _check_opset(opset)
    _check_arguments(input_layout, batch_size)
    path = Path(path)
    folded = None
    try:
        if fold:
            folded = fold_weights(model)
            graph = folded.graph
        else:
            graph = graph_lib.flatten(model)
    except ValueError as error:  # a subclassed model, an unbuilt Sequential
        raise UserInputError(str(error)) from error
    graph_input_names = graph.input_names
    try:
        onnx_model = build_onnx_model(
            model,
            opset=opset,
            input_layout=input_layout,
            batch_size=batch_size,
            graph=graph,
            folded=folded,
        )
    except UnsupportedLayersError as error:
        if not fallback:
            raise
        warnings.warn(f"{error} Falling back to Keras's exporter.", ExportWarning, stacklevel=2)
        fold_report = None
        if fold:
            model, fold_report = fold_batch_norms(model, measure=False)
        result = _export_with_keras(model, path, opset, graph_input_names, start)
        return dataclasses.replace(result, fold_report=fold_report)
    found_warnings, location = _finish(
        onnx_model, path, graph_input_names, native=True, external_data=external_data
    )
    result = _result(
        onnx_model,
        path,
        opset,
        start,
        input_layout,
        found_warnings,
        used_fallback=False,
        external=location,
    )
    return dataclasses.replace(result, fold_report=folded and folded.report)


def _result(
    onnx_model: onnx.ModelProto,
    path: Path,
    opset: int,
    start: float,
    input_layout: str,
    found_warnings: list[str],
    *,
    used_fallback: bool,
    external: str | None,
) -> ExportResult:
    counts = collections.Counter(node.op_type for node in onnx_model.graph.node)
    initializers = {tensor.name for tensor in onnx_model.graph.initializer}
    return ExportResult(
        path=str(path),
        opset=opset,
        op_counts=dict(sorted(counts.items())),
        node_count=len(onnx_model.graph.node),
        seconds=time.perf_counter() - start,
        input_names=[v.name for v in onnx_model.graph.input if v.name not in initializers],
        output_names=[v.name for v in onnx_model.graph.output],
        input_layout=input_layout,
        used_fallback=used_fallback,
        external_data=external,
        warnings=list(found_warnings),
    )


def _export_with_keras(
    model: Any, path: Path, opset: int, input_names: Sequence[str], start: float
) -> ExportResult:
    """Keras's own exporter (TensorFlow tracing + tf2onnx), checked like ours."""
    import importlib.util

    import keras

    if keras.backend.backend() == "tensorflow" and importlib.util.find_spec("tf2onnx") is None:
        raise UserInputError(
            "fallback=True needs tf2onnx for Keras's ONNX exporter, which is not installed; "
            "run `pip install tf2onnx` (or `pip install keras-bn[bench]`)."
        )
    from keras_bn.converters.validation import call_model, make_sample_inputs

    call_model(model, make_sample_inputs(model, 1, seed=0))  # Keras refuses never-called models
    with atomic_output(path) as temporary:
        model.export(str(temporary), format="onnx", verbose=False, opset_version=opset)
        onnx_model = onnx.load(str(temporary), load_external_data=False)
        report = check_structure(onnx_model, input_names)
        messages = [*report.errors, *report.warnings]
        for message in messages:
            warnings.warn(f"Keras's exporter: {message}", ExportWarning, stacklevel=3)
        onnx.checker.check_model(str(temporary), full_check=False)
    return _result(
        onnx_model, path, opset, start, "channels_last", messages, used_fallback=True, external=None
    )

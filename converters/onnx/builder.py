"""The builder ONNX rules write through: values, layouts, nodes and constants.

Rules that need an order ask for it (``builder.get(tensor, perm)``) and the builder
inserts one cached Transpose; elementwise rules, per-channel affines, concatenation
and reductions work in whatever layout their input has by remapping axes, so a
convolutional network gets one Transpose at its input and none inside (see
:mod:`.layout`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from keras_bn import _keras_internals as internals
from keras_bn.converters import graph as graph_lib
from keras_bn.converters.onnx.layout import Perm, identity_perm, inverse_perm

__all__ = ["Builder", "Unsupported", "Value", "tensor_type"]


class Unsupported(Exception):
    """Raised by a rule for a layer (or configuration) it cannot export."""


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


def tensor_type(dtype: str) -> int:
    try:
        return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (TypeError, ValueError) as error:  # onnx raises either, by version
        raise Unsupported(f"dtype {dtype!r} has no ONNX tensor type") from error


class Builder:
    """Collects ONNX nodes and initializers while the rules run.

    Rules read their inputs with :meth:`value` / :meth:`get`, emit nodes with
    :meth:`op`, constants with :meth:`const`, and publish their outputs with
    :meth:`set`. Names derive from the Keras node being exported (:attr:`node`),
    so the ONNX graph reads like the Keras model.
    """

    def __init__(
        self, opset: int, reserved_names: Iterable[str] = (), *, parent: Builder | None = None
    ):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.node: graph_lib.Node | None = None
        self._values: dict[int, Value] = {}
        self._transposed: dict[tuple[str, Perm, Perm], str] = {}
        self._float_names: dict[str, np.dtype] = {}  # names known to hold this float dtype
        self._first_op_named = False
        self.batch_source: str | None = None  # a graph input with the batch on axis 0
        self._batch_size: str | None = None
        if parent is None:
            self.initializers: dict[str, np.ndarray] = {}
            self._names: set[str] = set(reserved_names)
            self._small_constants: dict[tuple, str] = {}
            self._keyed_constants: dict[Any, str] = {}
        else:  # a subgraph's: see subgraph_builder
            self.initializers = parent.initializers
            self._names = parent.names_taken()
            self._small_constants, self._keyed_constants = parent.constants_by_key()
        self._sizes: dict[tuple[str, int], str] = {}
        # Exports a traced model as a subgraph of this graph (the driver flattens it
        # and runs the rules; a rule cannot import them): set by the driver.
        self.subgraph_exporter: Callable[[Builder, Any, str, str], onnx.GraphProto] | None = (
            None if parent is None else parent.subgraph_exporter
        )

    def export_subgraph(self, model: Any, scope: str, name: str) -> onnx.GraphProto:
        """The ONNX subgraph ``name`` (a Scan body) computing a traced Keras ``model``,
        its nodes named under ``scope``, exported through a :meth:`subgraph_builder` by
        the driver that made this builder."""
        if self.subgraph_exporter is None:
            raise Unsupported("a subgraph, outside export_onnx (no driver to export it)")
        return self.subgraph_exporter(self, model, scope, name)

    def subgraph_builder(self) -> Builder:
        """A builder for a subgraph of this graph (a Scan body): its names never clash
        with this graph's, and its constants are this graph's initializers (a subgraph
        sees the names of the graph around it). It has no batch size of its own."""
        return Builder(self.opset, parent=self)

    def names_taken(self) -> set[str]:
        """The set of names used so far (shared, not copied, with a subgraph builder)."""
        return self._names

    def constants_by_key(self) -> tuple[dict[tuple, str], dict[Any, str]]:
        """The constants shared by content and by key (shared with a subgraph builder)."""
        return self._small_constants, self._keyed_constants

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
            if value.name in self._float_names:
                self._float_names[self._transposed[key]] = self._float_names[value.name]
        return self._transposed[key]

    def cast_float(self, name: str, dtype: str) -> str:
        """Cast a float input to the node's compute dtype (mixed precision)."""
        source = self._float_names.get(name, np.dtype(dtype))
        if source.kind == "f" and source != self.dtype:
            cast = self.op("Cast", [name], to=tensor_type(self.dtype.name))
            self._float_names[cast] = self.dtype
            return cast
        return name

    def autocast_inputs(self, node: graph_lib.Node) -> Callable[[], None]:
        """Keras's autocast for ``node``'s rule: a layer whose compute dtype is a float
        (a mixed-precision policy's float16) casts its float inputs of another float
        dtype to it on entry (``DTypePolicy.convert_input``), so the rule reads them
        cast, whatever it does with them (a Dropout or ZeroPadding passes its input on
        as it is). Returns the call that restores the inputs' own values for later
        nodes, dropping each Cast the rule did not read."""
        layer = node.layer
        compute = np.dtype(getattr(layer, "compute_dtype", None) or "float32")
        if not getattr(layer, "autocast", False) or compute.kind != "f":
            return lambda: None
        if not internals.converts_input_args(layer):
            return lambda: None
        own: dict[int, Value] = {}
        casts: list[onnx.NodeProto] = []
        first = len(self.nodes)  # only the casts and the rule's nodes can read a cast
        for tensor in node.inputs:
            dtype = np.dtype(tensor.dtype)
            if dtype.kind != "f" or dtype == compute or id(tensor) in own or not self.has(tensor):
                continue
            value = own[id(tensor)] = self._values[id(tensor)]
            cast = self.op("Cast", [value.name], to=tensor_type(compute.name))
            self._float_names[cast] = compute
            casts.append(self.nodes[-1])
            self._values[id(tensor)] = Value(cast, value.perm, value.pads)

        def restore() -> None:
            published = {self._values[id(t)].name for t in node.outputs if self.has(t)}
            for tensor_id, value in own.items():
                self._values[tensor_id] = value
            if not casts:
                return
            read = {name for emitted in self.nodes[first:] for name in emitted.input} | published
            for cast in casts:
                if cast.output[0] not in read:
                    self.nodes.remove(cast)

        return restore

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

    def batch_size(self) -> str:
        """The runtime batch size as a 1-D int64 tensor of one element (computed once)."""
        if self._batch_size is None:
            if self.batch_source is None:
                raise Unsupported("a batch-sized constant in a model without inputs")
            shape = self.op("Shape", [self.batch_source], name="batch_size/Shape")
            self._batch_size = self.op(
                "Slice",
                [shape, self.ints([0], "starts"), self.ints([1], "ends")],
                name="batch_size",
            )
        return self._batch_size

    def size(self, tensor: graph_lib.Tensor, axis: int) -> str:
        """The runtime size of Keras axis ``axis`` of ``tensor`` as a 1-D int64 tensor
        of one element (computed once per tensor and axis)."""
        value = self.value(tensor)
        onnx_axis = value.axis(axis)
        key = (value.name, onnx_axis)
        if key not in self._sizes:
            shape = self.op("Shape", [value.name], name=f"{value.name}/Shape")
            self._sizes[key] = self.op(
                "Slice",
                [shape, self.ints([onnx_axis], "starts"), self.ints([onnx_axis + 1], "ends")],
                name=f"{value.name}/size{onnx_axis}",
            )
        return self._sizes[key]

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
        # np.ascontiguousarray would make a 0-d array 1-d: a scalar stays a scalar
        self.initializers[name] = array if array.flags.c_contiguous else array.copy(order="C")
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
        dtype: Any = None,
    ) -> str:
        """A constant that broadcasts against a rank-``rank`` Keras tensor in layout ``perm``.

        ``array`` broadcasts NumPy-style against the Keras tensor, or, with ``axes``,
        holds one entry per index of those Keras axes (BatchNormalization's
        ``moving_mean`` for ``axis=(1, 3)``). ``dtype`` as in :meth:`const`.
        """
        array = np.asarray(array)
        if array.ndim == 0:
            return self.const(array, hint, key=key, dtype=dtype)
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
            return self.const(array.reshape(()), hint, key=key, dtype=dtype)
        array = np.transpose(array, perm)
        # Leading size-1 axes broadcast by themselves: drop them for a compact constant.
        while array.ndim > 1 and array.shape[0] == 1:
            array = array[0]
        return self.const(array, hint, key=key, dtype=dtype)

    def reduce(self, op_type: str, name: str, axes: Sequence[int], keepdims: bool) -> str:
        """A Reduce* node over ``axes`` (attribute before opset 18, input from 18)."""
        keep = int(bool(keepdims))
        if self.opset >= 18 or op_type == "ReduceSum":
            return self.op(op_type, [name, self.ints(axes, "axes")], keepdims=keep)
        return self.op(op_type, [name], axes=list(axes), keepdims=keep)

"""The converter's graph IR: a flat, topologically ordered view of a Keras model.

Keras 3 Functional models keep their layer graph in private attributes, which
``keras_bn._keras_internals`` (the project's one module of private Keras access)
reads for this module. The converter needs that graph twice: folding rebuilds it with some layers changed or
removed, export walks it to emit ONNX nodes. Both go through :func:`flatten`,
which turns any built Sequential/Functional model - nested models inlined - into a
flat, topologically ordered list of :class:`Node` objects over :class:`Tensor`
handles.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import keras
import numpy as np
from keras import tree

from keras_bn import _keras_internals as internals
from keras_bn.converters import tracing

__all__ = [
    "Graph",
    "Node",
    "Tensor",
    "flatten",
    "rebuild",
    "is_model",
    "node_keys",
    "with_graph",
]


@dataclasses.dataclass(eq=False)
class Tensor:
    """A symbolic tensor of the flattened graph (compared by identity)."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    producer: Node | None = None  # None for graph inputs
    consumers: list[Node] = dataclasses.field(default_factory=list)
    # Whether Keras's symbolic tensor carries a mask (``Embedding(mask_zero=True)``,
    # ``Masking``, passed on by layers that support masking): what layers reading
    # masks (MultiHeadAttention) would apply at runtime.
    carries_mask: bool = False

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"Tensor({self.name!r}, shape={self.shape}, dtype={self.dtype})"


@dataclasses.dataclass(eq=False)
class Node:
    """One call of a layer (or a ``keras.ops`` operation) in the flattened graph.

    ``args``/``kwargs`` are the call's arguments with every symbolic tensor replaced
    by its :class:`Tensor`; ``inputs`` lists those tensors in order, ``outputs`` the
    tensors the call produced (flattened).
    """

    layer: Any  # keras.Layer or keras.Operation
    args: tuple
    kwargs: dict
    inputs: list[Tensor]
    outputs: list[Tensor]
    output_structure: Any  # the call's output with Tensors in place of KerasTensors
    scope: str = ""  # "outer/inner" names of the nested models this call sits in
    # The call's key: its name, with ``#k`` for the k-th further call of a shared
    # layer (unique in the graph; see :func:`node_keys`).
    key: str = ""
    # Values that replace the layer's variables of these names for this call only
    # (a rewrite's, e.g. folded weights); read every weight through :meth:`weight`.
    weights: dict[str, np.ndarray] | None = None
    # Why the call could not be traced (a layer without a rule whose ``call()`` does
    # not record as layers and keras.ops); None when it was not tried or not needed.
    trace_error: str | None = None
    # For a traced operation whose arguments hold unknown non-batch sizes: marker
    # size -> (Tensor, axis), what :func:`keras_bn.converters.tracing.traced_size` reads.
    unknown_sizes: dict[int, tuple[Tensor, int]] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.scope}/{self.layer.name}" if self.scope else self.layer.name

    def has_weight_override(self, name: str) -> bool:
        return self.weights is not None and name in self.weights

    def weight(self, name: str) -> np.ndarray:
        """The call's weight ``name``: its override, else the layer's variable, as NumPy."""
        if self.weights is not None and name in self.weights:
            return self.weights[name]
        return to_numpy(getattr(self.layer, name))

    def __repr__(self) -> str:
        return f"Node({type(self.layer).__name__} {self.name!r})"


@dataclasses.dataclass(eq=False)
class Graph:
    """A flattened model: inputs, outputs and nodes in topological order."""

    name: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    nodes: list[Node]
    input_names: list[str]
    output_names: list[str]
    output_structure: Any  # the model's output structure with Tensors as leaves
    # For a graph rewritten from another (folded): by node key of the original
    # graph, the tensor that now holds each output of that call, None where no
    # tensor holds it on its own. None: every node holds its own outputs.
    output_map: dict[str, list[Tensor | None]] | None = None

    def keyed_outputs(self) -> dict[str, list[Tensor | None]]:
        """Node key -> the tensors holding that call's outputs (see ``output_map``)."""
        if self.output_map is not None:
            return self.output_map
        return {node.key: list(node.outputs) for node in self.nodes}

    def call_sites(self, layer: Any) -> list[Node]:
        """All nodes that call ``layer`` (more than one for a shared layer)."""
        return [node for node in self.nodes if node.layer is layer]

    def layers(self) -> Iterator[Any]:
        """Distinct layers/operations in call order."""
        seen: set[int] = set()
        for node in self.nodes:
            if id(node.layer) not in seen:
                seen.add(id(node.layer))
                yield node.layer


def is_model(layer: Any) -> bool:
    """A model with a layer graph (Sequential, Functional): :func:`flatten` inlines
    its calls. A subclassed model (its own ``call()``) is traced like a layer."""
    return internals.is_sequential_or_functional(layer)


def with_graph(model: keras.Model) -> keras.Model:
    """``model`` itself when it has a layer graph; for a subclassed model, a
    Functional model of the same name that calls it once on inputs of the shapes it
    was built for (its build shapes, batch size unknown), which :func:`flatten`
    traces like a subclassed layer.

    Raises ``ValueError`` for a subclassed model never built or called, and for an
    unbuilt Sequential model (:func:`keras_bn._keras_internals.functional_of`).
    """
    if not isinstance(model, keras.Model) or is_model(model):
        return model
    shapes = internals.build_shapes(model)
    if not shapes or len(shapes) != 1:
        raise ValueError(
            f"Subclassed model {model.name!r} of class {type(model).__name__} has no known "
            f"input shape{'' if not shapes else f' (built with {sorted(shapes)})'}. "
            "Expected a model called once on sample inputs or built with "
            "`model.build(input_shape)`; call it on a batch of inputs first."
        )
    (shape,) = shapes.values()
    single = _is_shape(shape)
    if single:
        structure: Any = keras.Input(batch_shape=(None, *shape[1:]), name="input")
    elif isinstance(shape, Mapping) and all(_is_shape(s) for s in shape.values()):
        structure = {
            name: keras.Input(batch_shape=(None, *s[1:]), name=name) for name, s in shape.items()
        }
    elif isinstance(shape, list | tuple) and all(_is_shape(s) for s in shape):
        structure = [
            keras.Input(batch_shape=(None, *s[1:]), name=f"input_{index}")
            for index, s in enumerate(shape)
        ]
    else:
        raise ValueError(
            f"Subclassed model {model.name!r} was built with input shapes {shape!r}: "
            "expected one shape, or a list or dict of shapes."
        )
    return keras.Model(structure, model(structure), name=model.name)


def _is_shape(shape: Any) -> bool:
    return isinstance(shape, list | tuple) and all(
        size is None or isinstance(size, int | np.integer) for size in shape
    )


def flatten(model: keras.Model, trace: Callable[[Any], bool] | None = None) -> Graph:
    """Flatten a built Sequential or Functional model into a :class:`Graph`.

    Nested models are inlined: their calls are replaced by the calls they contain,
    in the scope of the nested model's name. With ``trace``, a call of a layer (not
    a model, not a ``keras.ops`` operation) for which ``trace(layer)`` is true is
    traced (:func:`keras_bn.converters.tracing.trace_call`) and inlined the same
    way, in the scope of the layer's name, its nested layers tested in turn; a
    call that does not trace stays one node with the reason in ``trace_error``.
    A traced call's None outputs are none of its outputs (Keras records them so
    too); an output computed from constants only is a
    :class:`~keras_bn.converters.tracing.Constant` node, left out when nothing
    reads it. A subclassed model is flattened through :func:`with_graph`. The model
    is not modified.
    """
    model = with_graph(model)
    functional = internals.functional_of(model)
    flattener = _Flattener(trace)
    tensor_map: dict[int, Tensor] = {}
    inputs: list[Tensor] = []
    input_names: list[str] = []
    for kt in tree.flatten(internals.inputs_struct(functional)):
        input_layer = internals.producing_operation(kt)
        tensor = flattener.new_tensor(kt, None, input_layer.name)
        tensor_map[id(kt)] = tensor
        inputs.append(tensor)
        input_names.append(input_layer.name)
    flattener.walk(functional, tensor_map, "")
    output_structure = tree.map_structure(
        lambda x: tensor_map[id(x)], internals.outputs_struct(functional)
    )
    outputs = [tensor_map[id(x)] for x in tree.flatten(internals.outputs_struct(functional))]
    nodes = _read_constants_only(flattener.nodes, outputs)
    for node, key in zip(nodes, node_keys(nodes), strict=True):
        node.key = key
    return Graph(
        name=model.name,
        inputs=inputs,
        outputs=outputs,
        nodes=nodes,
        input_names=input_names,
        output_names=internals.output_names(model),
        output_structure=output_structure,
    )


def _read_constants_only(nodes: list[Node], outputs: list[Tensor]) -> list[Node]:
    """``nodes`` without a traced call's constant output that nothing reads (DeiT's
    empty attention scores)."""
    return [
        node
        for node in nodes
        if not isinstance(node.layer, tracing.Constant)
        or node.outputs[0].consumers
        or any(node.outputs[0] is tensor for tensor in outputs)
    ]


# Why a layer is not traced (nor recorded as a TensorFlow graph): its call would run
# without the mask Keras hands it, and compute the unmasked result.
MASK_NOT_PASSED = (
    "its input carries a Keras mask (from Masking, Embedding(mask_zero=True) or a layer "
    "passing one on) that Keras hands its call() as mask=, and a traced call would not "
    "apply it; pass the mask to the layer explicitly"
)


def _drops_a_mask(operation: Any, knode: Any, tensor_map: dict[int, Tensor]) -> bool:
    """Whether tracing ``operation``'s call would drop a Keras mask: Keras passes the
    mask its inputs carry to a call that takes one, a traced call gets only the
    arguments the graph records (an explicit ``mask=`` among them)."""
    if not internals.call_receives_mask(operation) or knode.kwargs.get("mask") is not None:
        return False
    return any(tensor_map[id(x)].carries_mask for x in knode.input_tensors)


class _Flattener:
    """:func:`flatten`'s walk: the nodes found so far, in topological order, and the
    counter that numbers their tensors."""

    def __init__(self, trace: Callable[[Any], bool] | None) -> None:
        self.trace = trace
        self.counter = itertools.count()
        self.nodes: list[Node] = []

    def new_tensor(
        self,
        keras_tensor: Any,
        producer: Node | None,
        prefix: str,
        traced: bool = False,
        shapes: Mapping[int, Any] | None = None,
    ) -> Tensor:
        recorded_shape = (shapes or {}).get(id(keras_tensor), keras_tensor.shape)
        shape = tuple(
            None if d is None or (traced and tracing.batch_multiple(d)) else int(d)
            for d in recorded_shape
        )
        return Tensor(
            name=f"{prefix}:{next(self.counter)}",
            shape=shape,
            dtype=str(keras_tensor.dtype),
            producer=producer,
            carries_mask=internals.keras_mask(keras_tensor) is not None,
        )

    def walk(
        self,
        functional: Any,
        tensor_map: dict[int, Tensor],
        scope: str,
        traced: bool = False,
        recorded_call: tracing.TracedCall | None = None,
    ) -> None:
        """Add the calls of ``functional`` (its inputs already in ``tensor_map``)."""
        for knode in internals.ordered_nodes(functional):
            if not all(id(x) in tensor_map for x in knode.input_tensors):
                continue  # a branch that does not feed this model's outputs
            operation = knode.operation
            args = tree.map_structure(
                lambda x: tensor_map[id(x)] if _is_keras_tensor(x) else x, knode.args
            )
            kwargs = tree.map_structure(
                lambda x: tensor_map[id(x)] if _is_keras_tensor(x) else x, knode.kwargs
            )
            inputs = [tensor_map[id(x)] for x in knode.input_tensors]
            inner_scope = f"{scope}/{operation.name}" if scope else operation.name
            trace_error = None
            if self.trace is not None and traceable(operation) and self.trace(operation):
                trace_error = self.inline_trace(
                    knode, args, kwargs, tensor_map, inner_scope, recorded_call
                )
                if trace_error is None:
                    continue
            if is_model(operation):
                self.inline_model(operation, knode, inputs, tensor_map, inner_scope, traced)
                continue
            node = Node(operation, args, kwargs, inputs, [], None, scope, trace_error=trace_error)
            self.add(node, knode, tensor_map, traced, recorded_call)

    def inline_trace(
        self,
        knode: Any,
        args: Any,
        kwargs: Any,
        tensor_map: dict[int, Tensor],
        scope: str,
        recorded_call: tracing.TracedCall | None,
    ) -> str | None:
        """Trace a layer call and inline what it recorded; why it could not be, else None.

        ``recorded_call``: the traced call this one sits in, if any (its recorded
        shapes are those of this call's outputs)."""
        operation = knode.operation
        shapes = recorded_call.shapes if recorded_call is not None else None
        if _drops_a_mask(operation, knode, tensor_map):
            return MASK_NOT_PASSED
        try:
            with tracing.tracing(operation):
                recorded = tracing.trace_call(operation, args, kwargs, _spec)
                inner_map: dict[int, Tensor] = {}
                if recorded.model is not None:
                    placeholders = tree.flatten(internals.inputs_struct(recorded.model))
                    for kt, source in zip(placeholders, recorded.sources, strict=True):
                        inner_map[id(kt)] = source
                    self.walk(recorded.model, inner_map, scope, True, recorded)
            if len(recorded.outputs) != len(knode.outputs):
                raise tracing.TraceError(
                    f"tracing {type(operation).__name__}.call(): it returned "
                    f"{len(recorded.outputs)} outputs, its recorded call has "
                    f"{len(knode.outputs)}"
                )
        except tracing.TraceError as error:
            return str(error)
        for index, (kt, inner) in enumerate(zip(knode.outputs, recorded.outputs, strict=True)):
            if _is_keras_tensor(inner):
                tensor_map[id(kt)] = inner_map[id(inner)]
            else:  # computed from constants only: a Constant node
                constant = tracing.Constant(inner, name=f"output_{index}")
                node = Node(constant, (), {}, [], [], None, scope=scope)
                tensor = self.new_tensor(kt, node, constant.name, True, shapes)
                tensor_map[id(kt)] = tensor
                node.outputs.append(tensor)
                self.nodes.append(node)
        return None

    def inline_model(
        self,
        model: Any,
        knode: Any,
        inputs: list[Tensor],
        tensor_map: dict[int, Tensor],
        scope: str,
        traced: bool,
    ) -> None:
        """Replace a nested model's call by the calls it contains."""
        inner = internals.functional_of(model)
        inner_map: dict[int, Tensor] = {}
        inner_inputs = tree.flatten(internals.inputs_struct(inner))
        if len(inner_inputs) != len(inputs):
            raise ValueError(
                f"Nested model {model.name!r} is called with "
                f"{len(inputs)} tensors but has {len(inner_inputs)} inputs."
            )
        for inner_input, outer in zip(inner_inputs, inputs, strict=True):
            inner_map[id(inner_input)] = outer
        self.walk(inner, inner_map, scope, traced)
        inner_outputs = tree.flatten(internals.outputs_struct(inner))
        for kt, inner_kt in zip(knode.outputs, inner_outputs, strict=True):
            tensor_map[id(kt)] = inner_map[id(inner_kt)]

    def add(
        self,
        node: Node,
        knode: Any,
        tensor_map: dict[int, Tensor],
        traced: bool,
        recorded_call: tracing.TracedCall | None,
    ) -> None:
        """Add ``node`` (a call not inlined) with new tensors for its outputs."""
        operation = node.layer
        if recorded_call is not None:
            read = recorded_call.unknown_sizes.get(id(operation), {})
            node.unknown_sizes = {
                size: (tensor_map[id(kt)], axis) for size, (kt, axis) in read.items()
            }
        shapes = recorded_call.shapes if recorded_call is not None else None
        for kt in knode.outputs:
            tensor = self.new_tensor(kt, node, operation.name, traced, shapes)
            tensor_map[id(kt)] = tensor
            node.outputs.append(tensor)
        for tensor in node.inputs:
            tensor.consumers.append(node)
        self.nodes.append(node)


def traceable(operation: Any) -> bool:
    """A layer call :func:`flatten` may trace: a layer, or a subclassed model, not a
    model with a layer graph (inlined instead)."""
    return isinstance(operation, keras.Layer) and not is_model(operation)


def _spec(x: Any) -> tuple[tuple[int | None, ...], str] | None:
    return (x.shape, x.dtype) if isinstance(x, Tensor) else None


def node_keys(nodes: list[Node]) -> list[str]:
    """A key per node: its name, with ``#k`` for the k-th further call of a shared layer."""
    seen: dict[str, int] = {}
    keys = []
    for node in nodes:
        count = seen.get(node.name, 0)
        seen[node.name] = count + 1
        keys.append(node.name if count == 0 else f"{node.name}#{count}")
    return keys


def _is_keras_tensor(x: Any) -> bool:
    return isinstance(x, keras.KerasTensor)


def copy_weights(source: Any, target: Any) -> None:
    """Copy every variable of ``source`` into the built ``target`` (same class/config)."""
    target.set_weights(source.get_weights())


def rebuild(
    graph: Graph,
    call: Callable[[Node, tuple, dict], Any],
    name: str | None = None,
) -> keras.Model:
    """Build a new Functional model by replaying ``graph``.

    ``call(node, args, kwargs)`` receives each node with its arguments already mapped
    to the new symbolic tensors and returns the node's new output (the same
    structure as the original call's output). Returning the first input unchanged
    removes the node from the new model.
    """
    tensor_map: dict[int, Any] = {}
    new_inputs = []
    for tensor, input_name in zip(graph.inputs, graph.input_names, strict=True):
        new_input = keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype, name=input_name)
        tensor_map[id(tensor)] = new_input
        new_inputs.append(new_input)
    for node in graph.nodes:
        args = tree.map_structure(
            lambda x: tensor_map[id(x)] if isinstance(x, Tensor) else x, node.args
        )
        kwargs = tree.map_structure(
            lambda x: tensor_map[id(x)] if isinstance(x, Tensor) else x, node.kwargs
        )
        result = call(node, args, kwargs)
        flat = tree.flatten(result)
        if len(flat) != len(node.outputs):
            raise RuntimeError(
                f"Rebuilding {node.name!r} produced {len(flat)} outputs, "
                f"expected {len(node.outputs)}."
            )
        for tensor, new in zip(node.outputs, flat, strict=True):
            tensor_map[id(tensor)] = new
    new_outputs = tree.map_structure(lambda x: tensor_map[id(x)], graph.output_structure)
    if isinstance(new_outputs, list | tuple) and len(new_outputs) == 1:
        new_outputs = new_outputs[0]
    return keras.Model(
        new_inputs if len(new_inputs) > 1 else new_inputs[0], new_outputs, name=name or graph.name
    )


def to_numpy(variable: Any) -> np.ndarray:
    """A variable's (or tensor's) value as a NumPy array, read once."""
    value = getattr(variable, "value", variable)
    if keras.backend.backend() == "tensorflow" and hasattr(value, "numpy"):
        return np.asarray(value.numpy())  # skips convert_to_numpy's per-call overhead
    return np.asarray(keras.ops.convert_to_numpy(value))


def value_of(
    graph: Graph,
    inputs: Mapping[str, Any],
    target: Tensor,
    until: Callable[[Node], bool] | None = None,
) -> np.ndarray:
    """One tensor of ``graph`` computed in inference mode (see :func:`evaluate`), as
    NumPy. On JAX the nodes it needs run as one compiled program: eagerly, JAX
    compiles every operation on its own, several times slower than one compiled
    program (BENCHMARKS.md appendix)."""

    def compute(arrays: Mapping[str, Any]) -> Any:
        return evaluate(graph, arrays, until)[id(target)]

    if keras.backend.backend() == "jax":
        import jax

        try:
            return np.asarray(jax.jit(compute)(dict(inputs)))
        except Exception:  # Python in a layer's call that jax.jit cannot trace
            pass
    return np.asarray(keras.ops.convert_to_numpy(compute(inputs)))


def evaluate(
    graph: Graph,
    inputs: Mapping[str, Any],
    until: Callable[[Node], bool] | None = None,
) -> dict[int, Any]:
    """Every tensor of ``graph`` computed eagerly in inference mode, by ``id(tensor)``.

    ``inputs`` are keyed by input name. With ``until``, evaluation stops before the
    first node for which it returns True (that node's inputs are computed).
    """
    values: dict[int, Any] = {
        id(t): inputs[name] for t, name in zip(graph.inputs, graph.input_names, strict=True)
    }

    def resolve(x: Any) -> Any:
        return values[id(x)] if isinstance(x, Tensor) else x

    for node in graph.nodes:
        if until is not None and until(node):
            break
        args = tree.map_structure(resolve, node.args)
        kwargs = dict(tree.map_structure(resolve, node.kwargs))
        call = getattr(node.layer, "call", None)
        if call is not None and "training" in inspect.signature(call).parameters:
            kwargs.setdefault("training", False)
        result = node.layer(*args, **kwargs)
        for tensor, value in zip(node.outputs, tree.flatten(result), strict=True):
            values[id(tensor)] = value
    return values

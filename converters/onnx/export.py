"""Export a Keras model to ONNX natively: read layer configs and weights, write nodes.

No TensorFlow tracing: :func:`export_onnx` walks a flattened layer graph
(:func:`keras_bn.converters.graph.flatten`, or the folded graph of
:func:`keras_bn.converters.folding.fold_graph` with ``fold=True``) and asks one rule
per layer class (:data:`keras_bn.converters.onnx.rules.RULES`) to emit ONNX nodes
through a :class:`~.builder.Builder`. Export therefore works the same on every
Keras backend and costs little more than serializing the weights. The exporter
exports the graph it is given: folding is done before, as a graph rewrite.

After the graph is assembled, :func:`check_structure` runs the checks the ONNX
checker misses (graph inputs exactly the model's, no unused initializer, no
BatchNormalization left) and warns about batch normalizations exported unfolded;
then the model passes ``onnx.checker`` with ``full_check=True`` and is written
atomically (:mod:`.writing`: the weights stay arrays until they are written).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from keras_bn.converters import graph as graph_lib
from keras_bn.converters import onnx_graph
from keras_bn.converters.errors import UserInputError
from keras_bn.converters.files import atomic_output
from keras_bn.converters.folding import FoldReport, fold_batch_norms, fold_graph
from keras_bn.converters.onnx.builder import Builder, Unsupported, Value, tensor_type
from keras_bn.converters.onnx.layout import (
    InputLayout,
    channels_first_perm,
    check_input_layout,
    encode_input_layout,
    identity_perm,
    layout_of,
    resolve_input_layouts,
)
from keras_bn.converters.onnx.metadata import (
    METADATA_INPUT_LAYOUT,
    METADATA_LAYER_OUTPUTS,
    LayerMap,
    encode_layer_map,
)
from keras_bn.converters.onnx.rules import READS_UNKNOWN_SIZES, find_rule, needs_tracing
from keras_bn.converters.onnx.rules.tensorflow import rule_for as tensorflow_rule_for
from keras_bn.converters.onnx.writing import (
    Weights,
    add_initializer,
    check_model,
    fill,
    write_model,
    write_weights,
)
from keras_bn.converters.prepared import ModelLike, PreparedModel, prepare
from keras_bn.converters.samples import with_input_shapes

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "MAX_OPSET",
    "ExportResult",
    "ExportWarning",
    "StructureReport",
    "UnsupportedLayersError",
    "build_onnx_model",
    "check_structure",
    "export_onnx",
]

DEFAULT_OPSET = 17  # LayerNormalization; supported by onnxruntime >= 1.14, TensorRT 8.6
MIN_OPSET = 13  # Softmax on one axis, Resize, axes as inputs of Squeeze/ReduceSum
MAX_OPSET = 23  # checked against onnxruntime 1.32
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of weights; protobuf caps files at 2 GiB
BATCH_DIM = "batch"


class ExportWarning(UserWarning):
    """The export succeeded but the ONNX graph is not what an edge runtime wants."""


class UnsupportedLayersError(UserInputError):
    """Some layers have no native ONNX rule; ``layers`` lists them (name, reason)."""

    def __init__(self, message: str, layers: list[str]):
        super().__init__(message)
        self.layers = layers


# --------------------------------------------------------------------------------------
# Results and structural checks.


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_onnx` wrote."""

    path: str
    opset: int
    op_counts: dict[str, int]  # subgraphs' nodes (a Scan's body) counted too
    node_count: int
    seconds: float
    input_names: list[str]
    output_names: list[str]
    # "channels_last", "channels_first" (every input of rank >= 3), or JSON by input
    # name where they differ (onnx.layout.encode_input_layout)
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


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes of ``graph`` and of every subgraph inside it (a Scan's body)."""
    nodes = []
    graphs = [graph]
    while graphs:
        current = graphs.pop()
        for node in current.node:
            nodes.append(node)
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)
    return nodes


def check_structure(
    model: onnx.ModelProto, input_names: Sequence[str], *, folded: bool = False
) -> StructureReport:
    """Checks ``onnx.checker`` misses.

    Errors: graph inputs differ from ``input_names`` (tf2onnx turns EfficientNet's
    Normalization constants into extra required inputs), an initializer no node
    uses, a BatchNormalization node. Warnings: a Mul+Add by per-channel constants
    right after a Conv/ConvTranspose/Gemm/MatMul, the trace of a batch
    normalization that was exported instead of folded; none with ``folded`` (the
    export folded every BN it could, and its fold report says why any stays).
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
    used = {name for node in all_nodes(graph) for name in node.input}  # subgraphs see them
    unused = sorted(initializer_names - used)
    if unused:
        shown = ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else "")
        errors.append(f"{len(unused)} initializers are used by no node: {shown}")
    batch_norms = [node.name for node in all_nodes(graph) if node.op_type == "BatchNormalization"]
    if batch_norms:
        errors.append(f"BatchNormalization nodes remain: {batch_norms[:5]}")

    producers = onnx_graph.producers(graph)
    consumers = onnx_graph.readers(graph)
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
            if len(consumers.get(operand, [])) != 1 or operand in outputs:
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
    if unfolded and not folded:
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


def _check_arguments(input_layout: InputLayout, batch_size: int | None) -> None:
    check_input_layout(input_layout)
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


def _distinct_from(names: Sequence[str], taken: set[str]) -> list[str]:
    """``names`` made distinct from each other and from ``taken`` (suffixes ``_1``...)."""
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
    graph: graph_lib.Graph,
    *,
    opset: int = DEFAULT_OPSET,
    input_layout: InputLayout = "channels_last",
    batch_size: int | None = None,
) -> onnx.ModelProto:
    """Build the ONNX ModelProto of a flattened (possibly rewritten) graph in memory.

    No checks, no file. Raises UnsupportedLayersError naming every layer that has
    no rule.
    """
    return fill(*_build(graph, opset, input_layout, batch_size))


def _build(
    graph: graph_lib.Graph, opset: int, input_layout: InputLayout, batch_size: int | None
) -> tuple[onnx.ModelProto, Weights]:
    """:func:`build_onnx_model`'s model without its weights' bytes, and the weights."""
    input_names = list(graph.input_names)
    output_names = _distinct_from(graph.output_names, set(input_names))
    builder = Builder(opset, reserved_names=[*input_names, *output_names])
    builder.subgraph_exporter = build_subgraph
    onnx_inputs = _declare_inputs(builder, graph, input_layout, batch_size)
    recorded = _run_rules(builder, graph)
    layer_map: LayerMap = {
        key: [None if t is None else recorded.get(id(t)) for t in tensors]
        for key, tensors in graph.keyed_outputs().items()
    }
    onnx_outputs = _declare_outputs(builder, graph, output_names, batch_size, layer_map)
    return _assemble(builder, graph, onnx_inputs, onnx_outputs, opset, input_layout, layer_map)


def build_subgraph(parent: Builder, model: Any, scope: str, name: str) -> onnx.GraphProto:
    """The ONNX subgraph ``name`` (a Scan body) computing a traced Keras model, its
    inputs and outputs in Keras order, its nodes named under ``scope``, written through
    ``parent``'s subgraph builder.

    Raises Unsupported naming the graph's nodes that have no working rule.
    """
    graph = graph_lib.flatten(model, needs_tracing)
    for inner in graph.nodes:
        inner.scope = f"{scope}/{inner.scope}" if inner.scope else scope
    builder = parent.subgraph_builder()
    inputs = []
    for tensor, input_name in zip(graph.inputs, graph.input_names, strict=True):
        onnx_name = builder.unique(f"{name}/{input_name}")
        builder.declare(tensor, Value(onnx_name, identity_perm(tensor.rank)))
        inputs.append(
            helper.make_tensor_value_info(onnx_name, tensor_type(tensor.dtype), tensor.shape)
        )
    try:
        _run_rules(builder, graph)
    except UnsupportedLayersError as error:
        raise Unsupported("; ".join(error.layers)) from error
    outputs = []
    builder.begin(None)
    for index, tensor in enumerate(graph.outputs):
        output_name = builder.op(
            "Identity", [builder.get(tensor, cast=False)], name=f"{name}/output_{index}"
        )
        outputs.append(
            helper.make_tensor_value_info(output_name, tensor_type(tensor.dtype), tensor.shape)
        )
    return helper.make_graph(builder.nodes, name, inputs, outputs)


def _declare_inputs(
    builder: Builder, graph: graph_lib.Graph, input_layout: InputLayout, batch_size: int | None
) -> list[onnx.ValueInfoProto]:
    """The graph inputs, each in its requested layout."""
    onnx_inputs = []
    for tensor, name in zip(graph.inputs, graph.input_names, strict=True):
        perm = (
            channels_first_perm(tensor.rank)
            if layout_of(input_layout, name) == "channels_first"
            else identity_perm(tensor.rank)
        )
        builder.declare(tensor, Value(name, perm))
        if builder.batch_source is None and tensor.rank:
            builder.batch_source = name  # every layout keeps the batch on axis 0
        shape = [tensor.shape[axis] for axis in perm]
        onnx_inputs.append(
            helper.make_tensor_value_info(
                name, tensor_type(tensor.dtype), _dims(shape, batch_size, name)
            )
        )
    return onnx_inputs


def _run_rules(builder: Builder, graph: graph_lib.Graph) -> dict[int, list | None]:
    """Run every node's rule; return each output tensor's ``[ONNX name, perm]`` (by id).

    An output with padding still pending has no ONNX value of its own (None).
    Raises UnsupportedLayersError naming every node without a working rule.
    """
    failures: list[str] = []
    recorded: dict[int, list | None] = {}
    for node in graph.nodes:
        builder.begin(node)
        rule = find_rule(node.layer)
        if rule is None:  # tfcode hook: a call() running TensorFlow code (rules.tensorflow)
            rule = tensorflow_rule_for(node)
        try:
            if rule is None:
                raise Unsupported(node.trace_error or "no ONNX rule for this class")
            if node.unknown_sizes and rule not in READS_UNKNOWN_SIZES:
                raise Unsupported(
                    "its arguments hold unknown input sizes (ops.shape(x) of an input of "
                    "unknown size), which only reshape, tile and broadcast_to compute at runtime"
                )
            restore = builder.autocast_inputs(node)
            try:
                rule(builder, node)
            finally:
                restore()
            missing = [t for t in node.outputs if not builder.has(t)]
            if missing:
                raise RuntimeError(f"Rule for {node.name!r} did not set all of its outputs.")
        except Unsupported as reason:
            # A layer with a rule that was traced too (an Activation of a function the
            # table lacks): why the trace failed says where in the user's code.
            traced = f"; {node.trace_error}" if rule is not None and node.trace_error else ""
            failures.append(f"{node.name!r} ({type(node.layer).__name__}: {reason}{traced})")
            for tensor in node.outputs:
                if not builder.has(tensor):
                    builder.set(tensor, f"<unsupported {node.name}>")
            continue
        for tensor in node.outputs:
            value = builder.value(tensor, keep_pads=True)
            recorded[id(tensor)] = None if value.pads else [value.name, list(value.perm)]
    if failures:
        raise UnsupportedLayersError(
            f"Cannot export {len(failures)} layer(s) natively to ONNX: {'; '.join(failures)}. "
            "Expected layers and keras.ops operations with a rule in keras_bn.converters.onnx.rules "
            "(RULES, OPS; docs/COVERAGE.md); replace "
            "them, or pass fallback=True (CLI: --fallback) to use Keras's own exporter "
            "(needs tf2onnx on TensorFlow, jax2onnx on JAX).",
            failures,
        )
    return recorded


def _declare_outputs(
    builder: Builder,
    graph: graph_lib.Graph,
    output_names: Sequence[str],
    batch_size: int | None,
    layer_map: LayerMap,
) -> list[onnx.ValueInfoProto]:
    """The graph outputs in Keras layout, renamed after the model's outputs."""
    builder.begin(None)
    renames: dict[str, str] = {}
    onnx_outputs = []
    graph_input_names = set(graph.input_names)
    for tensor, name in zip(graph.outputs, output_names, strict=True):
        current = builder.get(tensor, cast=False)
        if current in graph_input_names or current in renames:
            builder.op("Identity", [renames.get(current, current)], name=name)
            builder.nodes[-1].output[0] = name
        else:
            renames[current] = name
        onnx_outputs.append(
            helper.make_tensor_value_info(
                name, tensor_type(tensor.dtype), _dims(tensor.shape, batch_size, name)
            )
        )
    for node in builder.nodes:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for i, name in enumerate(node.output):
            if name in renames:
                node.output[i] = renames[name]
    for entries in layer_map.values():
        for entry in entries:
            if entry is not None and entry[0] in renames:
                entry[0] = renames[entry[0]]
    return onnx_outputs


def _assemble(
    builder: Builder,
    graph: graph_lib.Graph,
    onnx_inputs: list[onnx.ValueInfoProto],
    onnx_outputs: list[onnx.ValueInfoProto],
    opset: int,
    input_layout: InputLayout,
    layer_map: LayerMap,
) -> tuple[onnx.ModelProto, Weights]:
    """The ModelProto (nodes, opset, metadata, initializers) and its weights."""
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
            METADATA_INPUT_LAYOUT: _encoded_layout(graph, input_layout),
            METADATA_LAYER_OUTPUTS: encode_layer_map(layer_map),
        },
    )
    # Initializers go straight into the model's graph (make_model copies the graph it
    # gets); the large ones' bytes stay arrays until the file is written.
    weights: Weights = {}
    for name, array in builder.initializers.items():
        add_initializer(onnx_model, name, array, weights)
    return onnx_model, weights


def _encoded_layout(graph: graph_lib.Graph, input_layout: InputLayout) -> str:
    """The layout the metadata records (:func:`~.layout.encode_input_layout`)."""
    layouts = {name: layout_of(input_layout, name) for name in graph.input_names}
    ranks = {name: t.rank for name, t in zip(graph.input_names, graph.inputs, strict=True)}
    return encode_input_layout(layouts, ranks)


def _channels_first_inputs(graph: graph_lib.Graph) -> list[str]:
    """The inputs a ``data_format="channels_first"`` layer reads: already channels_first."""
    return [
        name
        for name, tensor in zip(graph.input_names, graph.inputs, strict=True)
        if any(getattr(c.layer, "data_format", None) == "channels_first" for c in tensor.consumers)
    ]


def _version() -> str:
    try:
        from keras_bn import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover
        return "unknown"


def _finish(
    onnx_model: onnx.ModelProto,
    weights: Weights,
    path: Path,
    input_names: Sequence[str],
    *,
    external_data: bool | None,
    folded: bool = False,
) -> tuple[list[str], str | None]:
    """Run the structural checks and onnx.checker's full check, write atomically."""
    report = check_structure(onnx_model, input_names, folded=folded)
    if report.errors:
        raise RuntimeError(
            f"Internal error in keras-bn's ONNX export: {'; '.join(report.errors)}. "
            "Please report it."
        )
    for message in report.warnings:
        warnings.warn(message, ExportWarning, stacklevel=3)
    check_model(onnx_model, weights)

    if external_data is None:
        external_data = sum(array.nbytes for array in weights.values()) > EXTERNAL_DATA_THRESHOLD
    # Weights of INLINE_LIMIT bytes or less stay in the model, as onnx's own writer
    # keeps them: with none larger there is no data file (not an empty one).
    location = f"{path.name}.data" if external_data and weights else None
    with atomic_output(path) as temporary:
        if location is None:
            write_model(onnx_model, weights, temporary)
        else:
            data_path = path.with_name(location)
            with atomic_output(data_path) as temporary_data:
                write_weights(onnx_model, weights, temporary_data, location)
            try:
                onnx.save_model(onnx_model, str(temporary))
            except BaseException:
                data_path.unlink(missing_ok=True)
                raise
    return report.warnings, location


def export_onnx(
    model: ModelLike,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    input_layout: InputLayout = "channels_last",
    batch_size: int | None = None,
    fallback: bool = False,
    external_data: bool | None = None,
    fold: bool = False,
    input_shapes: Mapping[str, Sequence[int | None]] | None = None,
) -> ExportResult:
    """Export a built Sequential/Functional Keras model to an ONNX file.

    Args:
        model: the Keras model (not modified), or the run's
            :class:`~keras_bn.converters.prepared.PreparedModel` of it. An unfolded BatchNormalization is
            exported as Mul+Add, with a warning where it follows a foldable layer:
            pass ``fold=True``, or export ``fold_batch_norms``'s model.
        path: the ``.onnx`` file to write (atomically; an existing file is replaced).
        opset: ONNX opset, ``MIN_OPSET`` to ``MAX_OPSET``; default ``DEFAULT_OPSET``.
        input_layout: ``"channels_last"`` keeps each input's Keras shape;
            ``"channels_first"`` moves the last axis of inputs of rank >= 3 to
            axis 1 (NHWC -> NCHW), what most edge runtimes prefer; or a dict by
            input name (``{"image": "channels_first"}``; inputs not named keep
            channels_last). A change that does not apply is refused: a named input
            of rank < 3, an input a ``data_format="channels_first"`` layer reads.
        batch_size: None for a dynamic batch dimension (named ``"batch"``), or a
            fixed positive size.
        fallback: when some layer has no native rule, use Keras's own
            ``model.export(format="onnx")`` (tf2onnx) instead of raising.
        external_data: store weights over 1 KiB in ``<path>.data`` beside the model
            (none: no file); by default only when they exceed the 2 GiB protobuf limit.
        fold: fold BatchNormalization as ``fold_batch_norms`` does (same decisions,
            same operators, weights equal bit for bit) while exporting, without
            building the folded Keras model: the fast path when the ONNX file is
            all you need. The decisions are in ``result.fold_report``.
        input_shapes: fixed sizes after the batch for inputs of unknown sizes, by
            input name (``{"token_ids": (16,)}``, None for a size left unknown);
            by default an unknown size stays dynamic in the ONNX model.

    Returns:
        An :class:`ExportResult`.

    Raises:
        UserInputError: a layer has no rule (all are named) and ``fallback`` is
            False, or an argument is invalid.
    """
    start, opset, path = time.perf_counter(), _check_opset(opset), Path(path)
    _check_arguments(input_layout, batch_size)
    if input_shapes:  # a wrapper with those sizes (a new model: prepared anew)
        model = with_input_shapes(prepare(model).model, input_shapes)
    prepared, graph, fold_report = _graph_to_export(model, fold)
    layouts = resolve_input_layouts(
        input_layout,
        [(spec.name, spec.shape) for spec in prepared.inputs],
        _channels_first_inputs(prepared.graph),
        prepared.name,
    )
    try:
        onnx_model, weights = _build(graph, opset, layouts, batch_size)
    except UnsupportedLayersError as error:
        if not fallback:
            raise
        return _fall_back(error, prepared, path, opset, start, fold=fold)
    found_warnings, location = _finish(
        onnx_model, weights, path, graph.input_names, external_data=external_data, folded=fold
    )
    result = _result(
        onnx_model,
        path,
        opset,
        start,
        _encoded_layout(graph, layouts),
        found_warnings,
        used_fallback=False,
        external=location,
    )
    return dataclasses.replace(result, fold_report=fold_report)


def _graph_to_export(
    model: ModelLike, fold: bool
) -> tuple[PreparedModel, graph_lib.Graph, FoldReport | None]:
    """The prepared model, the graph to export (traced where a layer has no rule;
    folded with ``fold``) and the fold report."""
    try:
        prepared = prepare(model)
        if fold:
            graph, fold_report = fold_graph(prepared, trace=needs_tracing)
            return prepared, graph, fold_report
        return prepared, prepared.traced(needs_tracing), None
    except ValueError as error:  # a subclassed model, an unbuilt Sequential
        raise UserInputError(str(error)) from error


def _fall_back(
    error: UnsupportedLayersError,
    prepared: PreparedModel,
    path: Path,
    opset: int,
    start: float,
    *,
    fold: bool,
) -> ExportResult:
    """Keras's own exporter, for a model with layers that have no rule (folded first
    with ``fold``)."""
    warnings.warn(
        f"{len(error.layers)} layer(s) have no native ONNX rule: {'; '.join(error.layers)}. "
        "Falling back to Keras's own exporter (fallback=True).",
        ExportWarning,
        stacklevel=3,
    )
    model: ModelLike = prepared
    fold_report = None
    # Folding rebuilds the model from its layers' configs (some, KerasHub's, do not
    # rebuild): only when a BatchNormalization of the model's own graph folds.
    import keras

    has_batch_norm = any(
        isinstance(node.layer, keras.layers.BatchNormalization) for node in prepared.graph.nodes
    )
    if fold and has_batch_norm:
        folded, fold_report = fold_batch_norms(prepared, measure=False)
        if fold_report.folded_count:
            model = folded
    result = _export_with_keras(model, path, opset, prepared.input_names, start)
    return dataclasses.replace(result, fold_report=fold_report)


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
    nodes = all_nodes(onnx_model.graph)  # a Scan body's too
    counts = collections.Counter(node.op_type for node in nodes)
    initializers = {tensor.name for tensor in onnx_model.graph.initializer}
    return ExportResult(
        path=str(path),
        opset=opset,
        op_counts=dict(sorted(counts.items())),
        node_count=len(nodes),
        seconds=time.perf_counter() - start,
        input_names=[v.name for v in onnx_model.graph.input if v.name not in initializers],
        output_names=[v.name for v in onnx_model.graph.output],
        input_layout=input_layout,
        used_fallback=used_fallback,
        external_data=external,
        warnings=list(found_warnings),
    )


# The package Keras's ONNX exporter needs, per backend.
_KERAS_EXPORTER_PACKAGES = {"tensorflow": "tf2onnx", "jax": "jax2onnx", "torch": "onnx"}


def _export_with_keras(
    model: ModelLike, path: Path, opset: int, input_names: Sequence[str], start: float
) -> ExportResult:
    """Keras's own exporter (tf2onnx on TensorFlow, jax2onnx on JAX), checked like
    ours. Its failure is the user's to act on (a layer Keras cannot export either):
    UserInputError with its message."""
    import importlib.util

    import keras

    backend = keras.backend.backend()
    package = _KERAS_EXPORTER_PACKAGES.get(backend)
    if package is not None and importlib.util.find_spec(package) is None:
        extra = " (or `pip install keras-bn[bench]`)" if package == "tf2onnx" else ""
        raise UserInputError(
            f"fallback=True needs {package} for Keras's ONNX exporter on the {backend} "
            f"backend, which is not installed; run `pip install {package}`{extra}."
        )
    from keras_bn.converters.samples import make_sample_inputs

    prepared = prepare(model)
    # Keras's exporter refuses a model never called eagerly (on JAX, validation's
    # compiled pass does not count): one eager call on one sample.
    from keras import tree

    from keras_bn import _keras_internals as internals

    sample = make_sample_inputs(prepared, 1, seed=0)
    structure = tree.pack_sequence_as(
        internals.inputs_struct(internals.functional_of(prepared.model)),
        [sample[name] for name in prepared.input_names],
    )
    prepared.model(structure, training=False)
    with atomic_output(path) as temporary:
        try:
            prepared.model.export(str(temporary), format="onnx", verbose=False, opset_version=opset)
            # a file with operators ONNX does not define (tf2onnx writes what it
            # cannot convert as the TensorFlow op) is its failure too
            onnx.checker.check_model(str(temporary), full_check=False)
        except Exception as error:  # Keras's exporter, not ours: the user's to act on
            message = " ".join(str(error).split())[:400]
            raise UserInputError(
                f"Keras's own ONNX exporter (fallback=True) failed on {prepared.name!r} with "
                f"{type(error).__name__}: {message}; expected layers it can export too: "
                "replace the layers without a native rule, or give them a keras-bn rule."
            ) from error
        onnx_model = onnx.load(str(temporary), load_external_data=False)
        report = check_structure(onnx_model, input_names)
        messages = [*report.errors, *report.warnings]
        for message in messages:
            warnings.warn(f"Keras's exporter: {message}", ExportWarning, stacklevel=3)
    return _result(
        onnx_model, path, opset, start, "channels_last", messages, used_fallback=True, external=None
    )

"""The rewrite: a planned fold becomes a folded graph, and that graph a Keras model.

:func:`fold_graph` turns the plan into a rewritten :class:`~keras_bn.converters.graph.Graph`:
folded BatchNormalization calls are gone (their consumers read their input), the
layers that absorbed them carry their folded weights (``Node.weights``, rounded
once to the layer's variable dtype, a bias added where there was none), and
``Graph.output_map`` says which tensor now holds each original call's output.
The exporter exports that graph like any other; :func:`fold_batch_norms` replays
it as a new Keras model. Both give the same weights, bit for bit.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import tree

from keras_bn import _keras_internals as internals
from keras_bn.converters import graph as graph_lib
from keras_bn.converters.comparison import compare_arrays
from keras_bn.converters.errors import UserInputError, one_line
from keras_bn.converters.folding import maths
from keras_bn.converters.folding.plan import Plan, checked_statistics, make_plan
from keras_bn.converters.folding.report import FoldReport
from keras_bn.converters.prepared import ModelLike, prepare
from keras_bn.converters.samples import sample_arrays

__all__ = ["fold_batch_norms", "fold_graph", "folded_graph"]

# Told (layer calls done, layer calls in all) as a folded model is built.
Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------------------
# The folded graph.


def folded_graph(plan: Plan) -> graph_lib.Graph:
    """The graph of ``plan`` with its folds applied (``plan.graph`` is not modified)."""
    graph = plan.graph
    new: dict[int, graph_lib.Tensor] = {}  # id(tensor of plan.graph) -> its copy

    def copy(tensor: graph_lib.Tensor, producer: graph_lib.Node | None) -> graph_lib.Tensor:
        new[id(tensor)] = graph_lib.Tensor(
            tensor.name, tensor.shape, tensor.dtype, producer, carries_mask=tensor.carries_mask
        )
        return new[id(tensor)]

    def mapped(x: Any) -> Any:
        return new[id(x)] if isinstance(x, graph_lib.Tensor) else x

    inputs = [copy(tensor, None) for tensor in graph.inputs]
    nodes = []
    for node in graph.nodes:
        if id(node) in plan.removed:  # a folded BN: whatever read its output reads its input
            new[id(node.outputs[0])] = new[id(node.inputs[0])]
            continue
        target = plan.targets.get(id(node))
        weights = None
        if target is not None:
            dtype = node.layer.variable_dtype
            weights = {
                name: maths.round_to_dtype(values, dtype) for name, values in target.weights.items()
            }
        rewritten = graph_lib.Node(
            layer=node.layer,
            args=tree.map_structure(mapped, node.args),
            kwargs=tree.map_structure(mapped, node.kwargs),
            inputs=[new[id(tensor)] for tensor in node.inputs],
            outputs=[],
            output_structure=None,
            scope=node.scope,
            key=node.key,
            weights=weights,
            trace_error=node.trace_error,
            unknown_sizes={
                size: (new[id(source)], axis) for size, (source, axis) in node.unknown_sizes.items()
            },
        )
        rewritten.outputs = [copy(tensor, rewritten) for tensor in node.outputs]
        for tensor in rewritten.inputs:
            tensor.consumers.append(rewritten)
        nodes.append(rewritten)
    folded_away = plan.folded_away()
    output_map: dict[str, list[graph_lib.Tensor | None]] = {
        node.key: [None if id(node) in folded_away else new[id(t)] for t in node.outputs]
        for node in graph.nodes
    }
    return graph_lib.Graph(
        name=graph.name,
        inputs=inputs,
        outputs=[new[id(tensor)] for tensor in graph.outputs],
        nodes=nodes,
        input_names=list(graph.input_names),
        output_names=list(graph.output_names),
        output_structure=tree.map_structure(mapped, graph.output_structure),
        output_map=output_map,
    )


def fold_graph(
    model: ModelLike,
    *,
    backward: bool = True,
    trace: Callable[[Any], bool] | None = None,
) -> tuple[graph_lib.Graph, FoldReport]:
    """Decide and apply the folds of ``model`` (not modified) as a graph; build no model.

    The same decisions, weights and checks as :func:`fold_batch_norms`; the report
    is not measured (compare the exported file with ``model`` instead). Exporting
    the graph gives the operators and weights (bit for bit) of exporting
    :func:`fold_batch_norms`'s model, without building that model in Keras (about
    a quarter of fold + export + validate on ResNet50). ``trace`` as for
    :func:`~keras_bn.converters.graph.flatten`: a BN inside a traced layer folds
    into the Conv/Dense before it in that layer.
    """
    prepared = prepare(model)
    plan = make_plan(prepared, backward, checked_statistics(prepared.model), trace)
    report = FoldReport(prepared.name, plan.entries, plan.fp16_risks())
    report.measured_on = "not measured (folded while exporting)"
    return folded_graph(plan), report


# --------------------------------------------------------------------------------------
# Rebuilding a Keras model.


def _initializer_keys(layer: Any, config: dict[str, Any]) -> list[str]:
    """Config keys of ``layer``'s weight initializers that it keeps as attributes.

    Keras layers store each ``*_initializer`` argument under the same attribute
    name (``kernel_initializer``, ``depthwise_initializer``, ``gamma_initializer``,
    ...), which is what ``get_config`` serializes.
    """
    return [
        key
        for key, value in config.items()
        if key.endswith("_initializer")
        and isinstance(value, (dict, str))
        and isinstance(getattr(layer, key, None), keras.initializers.Initializer)
        and _settable(layer, key)
    ]


def _settable(layer: Any, key: str) -> bool:
    """Whether ``layer.key`` can be assigned: SimpleRNN/GRU/LSTM expose their cell's
    initializers as read-only properties, so those keep their own initializers."""
    attribute = inspect.getattr_static(type(layer), key, None)
    return not isinstance(attribute, property) or attribute.fset is not None


class _NumpyZeros(keras.initializers.Initializer):
    """Zeros made by NumPy, never by the backend.

    ``keras.initializers.Zeros`` calls ``ops.zeros``: on JAX an XLA program compiled
    for every new weight shape (ResNet50 has dozens), most of a rebuild's time for
    values that are overwritten at once.
    """

    def __call__(self, shape: Any, dtype: Any = None) -> np.ndarray:
        name = keras.backend.standardize_dtype(dtype or "float32")
        try:
            return np.zeros(shape, name)
        except TypeError:  # bfloat16 and float8 types: NumPy knows them from ml_dtypes
            import ml_dtypes

            return np.zeros(shape, getattr(ml_dtypes, name))


def _clone_uninitialized(layer: Any, config_updates: dict[str, Any]) -> Any:
    """A fresh copy of ``layer`` whose weights will be zeros when built.

    Every weight of the copy is overwritten right after it is built (with folded
    or copied values), so drawing random initial values (glorot on every kernel:
    a third of a rebuild's time) is wasted work, and so is computing zeros on the
    backend (:class:`_NumpyZeros`). :func:`_restore_initializers` puts the original
    initializers back afterwards, so ``get_config`` and a saved ``.keras`` file are
    the same as with a plain clone.
    """
    config = layer.get_config()
    zeros = {key: _NumpyZeros() for key in _initializer_keys(layer, config)}
    return type(layer).from_config({**config, **config_updates, **zeros})


def _restore_initializers(clone: Any, original: Any) -> None:
    """Give ``clone`` copies of the initializers of ``original`` (undo the zeros)."""
    if clone is original:
        return
    for key in _initializer_keys(original, original.get_config()):
        if hasattr(clone, key):
            initializer = keras.initializers.serialize(getattr(original, key))
            setattr(clone, key, keras.initializers.get(initializer))


def _not_rebuilt(layer: Any, error: Exception) -> UserInputError:
    """The error for a layer whose config does not rebuild it (raises, or builds a
    layer with other weights: KerasHub's D-FINE decoder gets 87 for its 86)."""
    return UserInputError(
        f"Layer {layer.name!r} ({type(layer).__name__}) cannot be rebuilt from its "
        f"get_config() ({one_line(str(error))}); the folded Keras model is made of fresh "
        "copies of its layers. Make the layer's get_config() return its constructor's "
        "arguments, or fold it into an ONNX file (keras-bn export), which needs no copy."
    )


def _unchanged_copy(model: keras.Model) -> keras.Model | None:
    """``model`` rebuilt as Keras loads it (its class's ``from_config``), with its
    weights; None where that fails. A model with nothing to fold needs no rewrite, and
    some layers of such models cannot be copied one by one (KerasHub's ViT, DeiT, MiT
    and Swin layers' configs do not rebuild them; their backbones' do)."""
    try:
        copy = type(model).from_config(model.get_config())
        copy.set_weights(model.get_weights())
    except Exception:  # noqa: BLE001 - then the layer-by-layer rebuild, or its error
        return None
    return copy


def _rebuild(graph: graph_lib.Graph, progress: Progress | None = None) -> keras.Model:
    """A new Keras model replaying the folded ``graph``: every layer a fresh copy.

    ``progress(done, total)`` is called after each of the ``total`` layer calls."""
    clones: dict[int, Any] = {}
    used_names: set[str] = set(graph.input_names)
    done, total = 0, len(graph.nodes)

    def fresh_copy(node: graph_lib.Node, updates: dict[str, Any]) -> Any:
        layer = node.layer
        name = layer.name
        if name in used_names:  # two nested models each had a layer of this name
            base = f"{node.scope.replace('/', '_')}_{name}"
            name, suffix = base, 1
            while name in used_names:
                suffix += 1
                name = f"{base}_{suffix}"
        used_names.add(name)
        try:
            return _clone_uninitialized(layer, {**updates, "name": name})
        except (TypeError, ValueError, NotImplementedError) as error:
            # A stateless layer that will not rebuild from its config (a Lambda of a
            # Python lambda, a keras.ops operation without one): share it with the
            # input model, which it cannot change.
            if updates or getattr(layer, "weights", None) or name != layer.name:
                raise _not_rebuilt(layer, error) from error
            return layer

    def call(node: graph_lib.Node, args: tuple, kwargs: dict) -> Any:
        nonlocal done
        outputs = replay(node, args, kwargs)
        done += 1
        if progress is not None:
            progress(done, total)
        return outputs

    def replay(node: graph_lib.Node, args: tuple, kwargs: dict) -> Any:
        if node.weights is not None:  # absorbed a fold: its own folded weights
            updates = {"use_bias": True} if hasattr(node.layer, "use_bias") else {}
            layer = fresh_copy(node, updates)
            outputs = layer(*args, **kwargs)
            for variable in layer.weights:
                variable.assign(node.weights[variable.name])
            _restore_initializers(layer, node.layer)
            return outputs
        first_call = id(node.layer) not in clones
        if first_call:
            clones[id(node.layer)] = fresh_copy(node, {})
        layer = clones[id(node.layer)]
        outputs = layer(*args, **kwargs)
        if first_call and layer is not node.layer:
            if getattr(node.layer, "weights", None):
                try:
                    graph_lib.copy_weights(node.layer, layer)
                except ValueError as error:  # the copy holds other weights than the layer
                    raise _not_rebuilt(node.layer, error) from error
            _restore_initializers(layer, node.layer)
        return outputs

    with internals.tensorflow_probe_deferred():  # get_config: no TensorFlow import on JAX
        return graph_lib.rebuild(graph, call, name=graph.name)


# --------------------------------------------------------------------------------------
# Measuring.


def _outputs(model: keras.Model, inputs: Any, restore_state: bool = False) -> list[np.ndarray]:
    """The model's inference outputs as float64 arrays.

    With ``restore_state``, non-trainable variables are put back afterwards: a BN
    called with ``training=True`` updates its moving statistics even here, and the
    input model must not change.
    """
    state = [(v, keras.ops.convert_to_numpy(v)) for v in model.non_trainable_variables]
    try:
        outputs = keras.tree.flatten(model(inputs, training=False))
    finally:
        if restore_state:
            for variable, value in state:
                variable.assign(value)
    return [np.asarray(keras.ops.convert_to_numpy(y), np.float64) for y in outputs]


def _max_abs_diff(expected: list[np.ndarray], received: list[np.ndarray]) -> float:
    return max(
        (compare_arrays(b, a).max_abs_error for a, b in zip(expected, received, strict=True)),
        default=0.0,
    )


def _generated_inputs(graph: graph_lib.Graph) -> Any:
    """Sample inputs (batch of 2, seed 0) as the model takes them, or None if a
    non-batch size is unknown."""
    if any(size is None for tensor in graph.inputs for size in tensor.shape[1:]):
        return None
    try:
        arrays = list(sample_arrays(graph, batch_size=2, seed=0).values())
    except UserInputError:  # a dtype with no generator (strings): nothing to measure on
        return None
    return arrays if len(arrays) > 1 else arrays[0]


# --------------------------------------------------------------------------------------
# The entry point.


def fold_batch_norms(
    model: ModelLike,
    *,
    backward: bool = True,
    sample_inputs: Any = None,
    measure: bool = True,
    progress: Progress | None = None,
    copy: bool = True,
) -> tuple[keras.Model, FoldReport]:
    """Fold every foldable BatchNormalization call of ``model`` into a linear layer.

    Forward folding (Dense/Conv/DepthwiseConv/SeparableConv/ConvTranspose -> BN) is
    tried first; where it is blocked and ``backward`` is true, backward folding
    (BN -> Dense, or BN -> Conv/DepthwiseConv that pads nothing). BN calls that
    cannot fold stay, with the reason in the report. Folded weights are computed
    in float64 and rounded once to each layer's variable dtype; a layer without a
    bias gains one. Nested models are inlined, so the folded model is flat.

    Args:
        model: a built Sequential or Functional model (not modified).
        backward: also fold BN into the layer after it.
        sample_inputs: inputs to compare the original and folded models on
            (anything ``model(...)`` accepts). If None, a batch of 2 inputs from
            ``make_sample_inputs`` is generated where every input shape is known (one forward pass
            of each model); ``report.max_abs_diff`` stays None where shapes are
            unknown or the original model cannot run on this backend (say why in
            ``report.measured_on``).
        measure: compare the original and folded models at all. ``False`` skips
            the two forward passes (``report.max_abs_diff`` stays None), for
            pipelines that validate the exported model against the original
            anyway (``validate_onnx``); it cannot be combined with
            ``sample_inputs``.
        progress: called as ``progress(done, total)`` while the folded model is
            built, after each of its ``total`` layer calls (a progress display).
        copy: False: a model with nothing to fold comes back as itself, not as a copy
            (for a caller that only saves it: rebuilding a KerasHub ViT runs every
            layer's initializers again, longer than its export).

    Returns:
        ``(folded_model, report)``.

    Raises:
        UserInputError: a BatchNormalization holds NaN/Inf or negative statistics
            (see :func:`check_batch_norm_statistics`).
    """
    if not measure and sample_inputs is not None:
        raise ValueError(
            "fold_batch_norms: sample_inputs are only used to measure the folded model; "
            "expected measure=True with sample_inputs, or no sample_inputs. "
            "Received: measure=False and sample_inputs"
        )
    prepared = prepare(model)
    model = prepared.model
    plan = make_plan(prepared, backward, checked_statistics(model))
    report = FoldReport(model.name, plan.entries, plan.fp16_risks())
    folded = None if report.folded_count else (_unchanged_copy(model) if copy else model)
    if folded is None:
        folded = _rebuild(folded_graph(plan), progress)
    if not measure:
        report.measured_on = "not measured (measure=False)"
        return folded, report
    if sample_inputs is not None:
        expected = _outputs(model, sample_inputs, restore_state=True)
        report.max_abs_diff = _max_abs_diff(expected, _outputs(folded, sample_inputs))
        report.measured_on = "sample_inputs"
        return folded, report
    inputs = _generated_inputs(plan.graph)
    if inputs is None:
        return folded, report
    try:
        expected = _outputs(model, inputs, restore_state=True)
    except Exception as error:  # noqa: BLE001 - made-up inputs are best effort
        # e.g. channels_first convolutions on TensorFlow's CPU kernels: the original
        # model cannot run here either, so there is nothing to compare with.
        report.measured_on = f"not measured: the model does not run here ({type(error).__name__})"
        return folded, report
    report.max_abs_diff = _max_abs_diff(expected, _outputs(folded, inputs))
    report.measured_on = "generated inputs (make_sample_inputs), batch of 2, seed 0"
    return folded, report

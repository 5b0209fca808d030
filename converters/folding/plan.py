"""The fold decisions and the folded float64 weights, without building a model.

:func:`plan` walks the flattened graph: every BatchNormalization call is tried
forward (into the layer before it), then backward (into the layer after it); a
fold that cannot apply records the precondition that blocked it (a
:class:`.report.Blocked`, never raised out). :func:`check_batch_norm_statistics`
refuses statistics no fold can use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from keras_bn import _keras_internals as internals
from keras_bn.converters import graph as graph_lib
from keras_bn.converters.errors import UserInputError
from keras_bn.converters.folding import maths
from keras_bn.converters.folding.report import Blocked, FoldEntry, FoldReport, Fp16Risk
from keras_bn.converters.folding.rules import (
    BATCH_NORM_CLASSES,
    FOLD_RULES,
    FoldRule,
    Weights,
    layer_affine,
    variables_by_name,
)
from keras_bn.converters.prepared import ModelLike, prepare

__all__ = [
    "Plan",
    "Target",
    "check_batch_norm_statistics",
    "checked_statistics",
    "make_plan",
    "plan_folds",
]


# --------------------------------------------------------------------------------------
# Statistics check.


def _walk_layers(model: Any, scope: str = ""):
    """Every layer with its path; the sublayers of custom layers too (a traced
    export folds the BNs inside them)."""
    for layer in model.layers:
        name = f"{scope}/{layer.name}" if scope else layer.name
        if graph_lib.is_model(layer):
            yield from _walk_layers(layer, name)
            continue
        yield name, layer
        for sublayer in internals.flatten_layers(layer)[1:]:
            yield f"{name}/{sublayer.name}", sublayer


def check_batch_norm_statistics(model: keras.Model) -> None:
    """Raise UserInputError if a BatchNormalization holds statistics that cannot fold.

    Checks every BatchNormalization layer (nested models included): gamma, beta,
    moving_mean and moving_variance finite, moving_variance non-negative and
    ``moving_variance + epsilon`` positive. The message names the layer and channel.
    """
    checked_statistics(model)


def checked_statistics(model: keras.Model) -> dict[int, dict[str, np.ndarray]]:
    """:func:`check_batch_norm_statistics`, returning each BN's variables by ``id(layer)``."""
    checked: dict[int, dict[str, np.ndarray]] = {}
    for name, layer in _walk_layers(model):
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        variables = checked[id(layer)] = variables_by_name(layer)
        for weight in ("gamma", "beta", "moving_mean", "moving_variance"):
            values = variables.get(weight)
            if values is None:
                continue
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                channel = int(bad[0])
                raise UserInputError(
                    f"BatchNormalization layer {name!r} has {weight}={float(values.flat[channel])!r} "
                    f"in channel {channel} ({bad.size} non-finite values); expected finite "
                    "statistics. Recalibrate the layer on training data "
                    "(keras_bn.recalibrate_batch_norm) or retrain before folding."
                )
        variance = variables.get("moving_variance")
        if variance is None:
            continue
        negative = np.flatnonzero(variance < 0)
        if negative.size:
            channel = int(negative[0])
            raise UserInputError(
                f"BatchNormalization layer {name!r} has moving_variance="
                f"{float(variance.flat[channel])!r} in channel {channel}; expected a "
                "variance >= 0. Recalibrate the layer on training data "
                "(keras_bn.recalibrate_batch_norm) before folding."
            )
        zero = np.flatnonzero(variance.astype(np.float64) + float(layer.epsilon) <= 0)
        if zero.size:
            channel = int(zero[0])
            raise UserInputError(
                f"BatchNormalization layer {name!r} has moving_variance + epsilon = 0 in "
                f"channel {channel} (epsilon={layer.epsilon!r}); expected a positive "
                "value. Set a positive epsilon or recalibrate the layer."
            )
    return checked


# --------------------------------------------------------------------------------------
# Planning.


def _channel_axis(layer: Any, rank: int) -> int:
    """The channel axis of a layer's inputs and outputs (both the same axis)."""
    return 1 if getattr(layer, "data_format", None) == "channels_first" else rank - 1


def _batch_norm_axes(layer: Any, rank: int) -> tuple[int, ...]:
    axis = layer.axis
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(int(a) % rank for a in axes))


def _called_in_training(node: graph_lib.Node) -> bool:
    """Whether the call normalizes with batch statistics even at inference."""
    training = node.kwargs.get("training", node.args[1] if len(node.args) > 1 else None)
    layer = node.layer
    frozen = not layer.trainable or getattr(layer, "freeze_statistics", False)
    return training is True and not frozen


@dataclasses.dataclass
class Target:
    """A layer that absorbs one or more BN calls, with its folded float64 weights."""

    node: graph_lib.Node
    rule: FoldRule
    weights: Weights


@dataclasses.dataclass
class Plan:
    graph: graph_lib.Graph
    entries: list[FoldEntry]
    targets: dict[int, Target]  # by id(node)
    removed: set[int]  # ids of folded BN nodes
    forward_into: dict[int, graph_lib.Node] = dataclasses.field(default_factory=dict)

    def folded_away(self) -> set[int]:
        """Ids of nodes whose output no longer exists on its own once folded.

        A layer that absorbed a forward fold computes layer + BN; a BN folded
        backward vanishes into the next layer; a BN folded forward that another
        forward-folded BN follows (Conv -> BN -> BN) has its output only inside
        the target. The last BN of a forward fold keeps its output (the target's),
        and a layer that absorbed only backward folds computes what it did.
        """
        folded_away = {id(target) for target in self.forward_into.values()}
        folded_away |= self.removed - self.forward_into.keys()
        for node in self.graph.nodes:
            if id(node) in self.forward_into:
                consumers = node.outputs[0].consumers
                if any(
                    self.forward_into.get(id(c)) is self.forward_into[id(node)] for c in consumers
                ):
                    folded_away.add(id(node))
        return folded_away

    def fp16_risks(self) -> list[Fp16Risk]:
        risks = []
        for target in self.targets.values():
            for risk in maths.float16_risks(
                target.weights[target.rule.kernel],
                target.weights.get("bias"),
                channel_axis=target.rule.output_axis,
            ):
                risks.append(Fp16Risk(target.node.name, risk.channel, risk.value, risk.kind))
        return risks


def _check_layer(node: graph_lib.Node, graph: graph_lib.Graph, role: str) -> FoldRule:
    """Checks shared by the producer (forward) and consumer (backward) of a fold."""
    layer = node.layer
    rule = FOLD_RULES.get(type(layer))
    if rule is None or (role == "consumer" and rule.backward is None):
        raise Blocked(
            f"{role}-rule",
            f"{type(layer).__name__} {node.name!r} has no "
            f"{'forward' if role == 'producer' else 'backward'} fold rule",
        )
    unexpected = sorted({v.name for v in layer.weights} - set(rule.weights))
    if unexpected or getattr(layer.dtype_policy, "quantization_mode", None):
        raise Blocked(f"{role}-weights", f"{node.name!r} has weights {unexpected or 'quantized'}")
    if len(graph.call_sites(layer)) > 1:
        raise Blocked(
            f"{role}-shared",
            f"{node.name!r} is called at {len(graph.call_sites(layer))} places",
        )
    return rule


def _check_axis(bn_node: graph_lib.Node, node: graph_lib.Node, rank: int) -> None:
    axes = _batch_norm_axes(bn_node.layer, rank)
    channel = _channel_axis(node.layer, rank)
    if axes != (channel,):
        raise Blocked(
            "batch-norm-axis",
            f"BN axes {axes} (rank {rank}) are not the channel axis {channel} of {node.name!r}",
        )


def _forward_target(
    bn_node: graph_lib.Node, plan: Plan, folded_into: dict[int, graph_lib.Node]
) -> graph_lib.Node:
    """The layer call that absorbs ``bn_node`` forward, or raise Blocked."""
    tensor = bn_node.inputs[0]
    direct = tensor.producer
    if direct is None:
        raise Blocked("producer-missing", f"input {tensor.name!r} is a model input")
    # A BN folded into its producer hands that producer on (Conv -> BN -> BN).
    producer = folded_into.get(id(direct), direct)
    _check_layer(producer, plan.graph, "producer")
    activation = getattr(producer.layer, "activation", None)
    if activation not in (None, keras.activations.linear):
        raise Blocked(
            "producer-activation",
            f"{producer.name!r} has activation {getattr(activation, '__name__', activation)!r}",
        )
    if tensor.consumers != [bn_node] or tensor in plan.graph.outputs:
        raise Blocked(
            "producer-fanout",
            f"the output of {direct.name!r} feeds {len(tensor.consumers)} layers"
            + (" and is a model output" if tensor in plan.graph.outputs else ""),
        )
    _check_axis(bn_node, producer, tensor.rank)
    return producer


def _backward_target(
    bn_node: graph_lib.Node, plan: Plan, folded_into: dict[int, graph_lib.Node]
) -> graph_lib.Node:
    """The layer call that absorbs ``bn_node`` backward, or raise Blocked."""
    tensor = bn_node.outputs[0]
    is_output = tensor in plan.graph.outputs
    if not tensor.consumers:
        raise Blocked("consumer-missing", "the BN output is a model output only")
    if len(tensor.consumers) > 1 or is_output:
        raise Blocked(
            "consumer-fanout",
            f"the BN output feeds {len(tensor.consumers)} layers"
            + (" and is a model output" if is_output else ""),
        )
    consumer = tensor.consumers[0]
    consumer = folded_into.get(id(consumer), consumer)  # BN -> BN -> Conv
    _check_layer(consumer, plan.graph, "consumer")
    if len(consumer.inputs) != 1:
        raise Blocked("consumer-rule", f"{consumer.name!r} takes {len(consumer.inputs)} inputs")
    _check_axis(bn_node, consumer, tensor.rank)
    return consumer


def _check_cancellation(
    bn_node: graph_lib.Node,
    affine: tuple[np.ndarray, np.ndarray],
    known: dict[str, np.ndarray] | None,
) -> None:
    """Raise Blocked where folding ``bn_node`` backward would lose float32 precision
    (:func:`.maths.backward_cancellation` above the limit): its input lies far from 0
    against its spread, as raw sensor readings do. ``known``: its variables, if read."""
    variables = known if known is not None else variables_by_name(bn_node.layer)
    if "moving_mean" not in variables or "moving_variance" not in variables:
        return
    ratio = maths.backward_cancellation(
        *affine, variables["moving_mean"], variables["moving_variance"]
    )
    if ratio > maths.BACKWARD_CANCELLATION_LIMIT:
        raise Blocked(
            "consumer-precision",
            f"its input lies far from 0 against its spread (moving mean up to "
            f"{ratio - 1:.0f} standard deviations): folded, the next layer would sum "
            f"terms {ratio:.0f}x larger and lose float32 precision",
        )


def _current_weights(plan: Plan, node: graph_lib.Node) -> Weights:
    """The weights of ``node``'s layer with the folds decided so far, for float64
    arithmetic: float32 ones as they are (each :mod:`.maths` function computes in
    float64, and a float32 array times a float64 one is the float64 product, without
    a float64 copy of ResNet50's 100 MB of kernels first), others in float64."""
    if id(node) in plan.targets:
        return plan.targets[id(node)].weights
    return {
        name: values if values.dtype in maths.FLOAT64_EXACT else values.astype(np.float64)
        for name, values in variables_by_name(node.layer).items()
    }


def _commit(plan: Plan, node: graph_lib.Node, weights: Weights) -> None:
    plan.targets[id(node)] = Target(node, FOLD_RULES[type(node.layer)], weights)


def _fold_forward(target: graph_lib.Node, weights: Weights, scale, offset) -> Weights:
    rule = FOLD_RULES[type(target.layer)]
    kernel, bias = maths.fold_forward(
        weights[rule.kernel],
        weights.get("bias"),
        scale,
        offset,
        channel_axis=rule.output_axis,
        deferred=True,  # multiplied out as it is rounded
    )
    return {**weights, rule.kernel: kernel, "bias": bias}


def make_plan(
    model: ModelLike,
    backward: bool,
    batch_norm_variables: dict[int, dict[str, np.ndarray]] | None = None,
    trace: Callable[[Any], bool] | None = None,
) -> Plan:
    """The fold decisions; ``batch_norm_variables`` as from :func:`checked_statistics`;
    ``trace`` as for :func:`~keras_bn.converters.graph.flatten` (the layers whose
    calls are traced, so that BNs inside them fold too): the plan reads the prepared
    model's graph for it (:meth:`~keras_bn.converters.prepared.PreparedModel.traced`)."""
    graph = prepare(model).traced(trace)
    plan = Plan(graph, [], {}, set())
    batch_norms = [n for n in graph.nodes if isinstance(n.layer, keras.layers.BatchNormalization)]
    folded: dict[int, FoldEntry] = {}
    # (direction, precondition) pairs that blocked each BN call, in the order tried.
    blocked: dict[int, list[tuple[str | None, Blocked]]] = {id(n): [] for n in batch_norms}
    candidates = []
    for bn_node in batch_norms:
        if type(bn_node.layer) not in BATCH_NORM_CLASSES:
            detail = f"{type(bn_node.layer).__name__} is not a known BN class"
            blocked[id(bn_node)].append((None, Blocked("batch-norm-class", detail)))
        elif _called_in_training(bn_node):
            detail = "called with training=True"
            blocked[id(bn_node)].append((None, Blocked("batch-norm-training", detail)))
        else:
            candidates.append(bn_node)
    known = batch_norm_variables or {}
    affines = {id(n): layer_affine(n.layer, known.get(id(n.layer))) for n in candidates}

    forward_into = plan.forward_into  # folded BN node id -> target node
    for bn_node in candidates:  # topological order: Conv -> BN -> BN folds in turn
        try:
            producer = _forward_target(bn_node, plan, forward_into)
        except Blocked as reason:
            blocked[id(bn_node)].append(("forward", reason))
            continue
        weights = _fold_forward(producer, _current_weights(plan, producer), *affines[id(bn_node)])
        _commit(plan, producer, weights)
        forward_into[id(bn_node)] = producer
        folded[id(bn_node)] = FoldEntry(bn_node.name, True, producer.name, "forward")

    backward_into: dict[int, graph_lib.Node] = {}
    for bn_node in reversed(candidates) if backward else ():  # BN -> BN -> Conv: later first
        if id(bn_node) in folded:
            continue
        try:
            consumer = _backward_target(bn_node, plan, backward_into)
            rule = FOLD_RULES[type(consumer.layer)]
            assert rule.backward is not None  # _backward_target checked it
            weights = rule.backward(
                consumer.layer, _current_weights(plan, consumer), *affines[id(bn_node)]
            )  # its own preconditions first (padding), then precision
            _check_cancellation(bn_node, affines[id(bn_node)], known.get(id(bn_node.layer)))
        except Blocked as reason:
            blocked[id(bn_node)].append(("backward", reason))
            continue
        _commit(plan, consumer, weights)
        backward_into[id(bn_node)] = consumer
        folded[id(bn_node)] = FoldEntry(bn_node.name, True, consumer.name, "backward")

    plan.entries.extend(_batch_norms_inside_calls(graph))
    for bn_node in batch_norms:
        entry = folded.get(id(bn_node))
        if entry is not None:
            plan.removed.add(id(bn_node))
        else:
            reasons = blocked[id(bn_node)]
            entry = FoldEntry(
                bn_node.name,
                False,
                reason="; ".join(f"{d}: {r}" if d else str(r) for d, r in reasons),
                blocked_by=tuple(r.precondition for _, r in reasons),
            )
        plan.entries.append(entry)
    return plan


def _batch_norms_inside_calls(graph: graph_lib.Graph) -> list[FoldEntry]:
    """Not-folded entries for the BNs inside calls the graph keeps whole (custom
    layers not traced), so that the report names every BN the model runs."""
    entries = []
    for node in graph.nodes:
        layer = node.layer
        if (
            not isinstance(layer, keras.layers.Layer)  # a keras.ops operation
            or isinstance(layer, keras.layers.BatchNormalization)
            or graph_lib.is_model(layer)
        ):
            continue
        wrapper = type(layer) is keras.layers.TimeDistributed
        for path, sublayer in internals.sublayer_paths(node.layer, node.name):
            if isinstance(sublayer, keras.layers.BatchNormalization):
                blocked = _inside_call(layer, node.name, wrapper)
                entries.append(
                    FoldEntry(path, False, reason=str(blocked), blocked_by=(blocked.precondition,))
                )
    return entries


def _inside_call(layer: Any, name: str, wrapper: bool) -> Blocked:
    """Why a BN called inside ``layer``'s call stays: a TimeDistributed the export runs
    through its wrapped layer's rule, or a custom layer the export traces."""
    if wrapper:
        return Blocked(
            "inside-wrapper",
            f"wrapped in TimeDistributed {name!r}, which folding keeps whole: the export "
            "computes it as its per-channel Mul and Add on the merged batch and time axes",
        )
    return Blocked(
        "inside-custom-layer",
        f"called inside {type(layer).__name__} {name!r}'s call(), which the folded Keras "
        "model keeps whole; export_onnx(fold=True) and keras-bn export trace that call and "
        "fold it",
    )


def plan_folds(model: ModelLike, *, backward: bool = True) -> FoldReport:
    """Decide which BatchNormalization calls would fold, without building a model.

    The same decisions and float16 risks as :func:`fold_batch_norms`;
    ``max_abs_diff`` is None.
    """
    prepared = prepare(model)
    result = make_plan(prepared, backward)
    return FoldReport(prepared.name, result.entries, result.fp16_risks())

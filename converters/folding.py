"""Fold trained BatchNormalization layers into neighbouring Dense/Conv layers.

:func:`fold_batch_norms` returns a new Keras model in which every BatchNormalization
call that can be folded exactly is gone, its inference affine
``x * scale + offset`` absorbed into the kernel and bias of the linear layer before
it (**forward**) or, failing that, after it (**backward**), plus a
:class:`FoldReport` saying, for each BN call, what happened and why. A fold that
cannot apply is not an error: it is recorded with the names of the preconditions
that blocked it (:data:`PRECONDITIONS`) and the BN stays.

The maths is :mod:`folding_math` (pure NumPy, float64, rounded once to each
layer's dtype); this module is the Keras adapter: the rule table
:data:`FOLD_RULES`, the preconditions, and the rebuild through :mod:`graph`. The
input model is never mutated: every layer of the folded model is a fresh copy.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable
from typing import Any, Literal

import keras
import numpy as np

from keras_bn.converters import folding_math
from keras_bn.converters import graph as graph_lib
from keras_bn.converters.errors import UserInputError
from keras_bn.layers import BatchNormalization as KerasBnBatchNormalization

__all__ = [
    "BATCH_NORM_CLASSES",
    "FOLD_RULES",
    "PRECONDITIONS",
    "batch_norm_affine",
    "FoldEntry",
    "FoldReport",
    "FoldedWeights",
    "FoldRule",
    "Fp16Risk",
    "check_batch_norm_statistics",
    "fold_batch_norms",
    "fold_weights",
    "plan_folds",
]

Weights = dict[str, np.ndarray]  # float64 arrays by Keras variable name
Direction = Literal["forward", "backward"]

# Every reason a fold can be refused, by name. Report entries list these names in
# `blocked_by`; their `reason` adds the specifics.
PRECONDITIONS: dict[str, str] = {
    "batch-norm-class": "the layer subclasses BatchNormalization but is not a class "
    "whose inference maths is known (keras.layers or keras_bn BatchNormalization)",
    "batch-norm-training": "the BN is called with training=True, so it normalizes "
    "with batch statistics, not its moving averages",
    "batch-norm-axis": "the BN does not normalize exactly the neighbour's channel axis",
    "producer-missing": "the BN's input is a model input, not a layer's output",
    "producer-rule": "the layer before the BN has no forward fold rule",
    "producer-activation": "the layer before the BN has a nonlinear activation",
    "producer-weights": "the layer before the BN has weights other than a float "
    "kernel and bias (quantized or LoRA-enabled)",
    "producer-shared": "the layer before the BN is called at several places",
    "producer-fanout": "the output of the layer before the BN is also used elsewhere "
    "(another layer or a model output)",
    "consumer-missing": "the BN's output feeds no layer (it is a model output)",
    "consumer-fanout": "the BN's output feeds several layers or is also a model output",
    "consumer-rule": "the layer after the BN has no backward fold rule",
    "consumer-weights": "the layer after the BN has weights other than a float "
    "kernel and bias (quantized or LoRA-enabled)",
    "consumer-shared": "the layer after the BN is called at several places",
    "consumer-padding": "the layer after the BN zero-pads its input, and the padded "
    "zeros would not be shifted by the BN offset",
}


class _Blocked(Exception):
    """A precondition that blocks one fold (internal control flow, never raised out)."""

    def __init__(self, precondition: str, detail: str):
        assert precondition in PRECONDITIONS, precondition
        super().__init__(f"{precondition}: {detail}")
        self.precondition = precondition


# --------------------------------------------------------------------------------------
# The rule table.


def _require_no_padding(layer: Any) -> None:
    """Backward folding into a conv is exact only where it pads nothing."""
    if layer.padding == "valid" or all(size == 1 for size in layer.kernel_size):
        return
    raise _Blocked(
        "consumer-padding",
        f"{layer.name!r} has padding={layer.padding!r} with "
        f"kernel_size={tuple(layer.kernel_size)}: border outputs would see unshifted zeros",
    )


def _fold_into_dense_input(layer: Any, weights: Weights, scale, offset) -> Weights:
    kernel, bias = folding_math.fold_backward(weights["kernel"], weights.get("bias"), scale, offset)
    return {**weights, "kernel": kernel, "bias": bias}


def _fold_into_conv_input(layer: Any, weights: Weights, scale, offset) -> Weights:
    _require_no_padding(layer)
    kernel, bias = folding_math.fold_backward(
        weights["kernel"], weights.get("bias"), scale, offset, groups=layer.groups
    )
    return {**weights, "kernel": kernel, "bias": bias}


def _fold_into_depthwise_input(layer: Any, weights: Weights, scale, offset) -> Weights:
    _require_no_padding(layer)
    grouped, channels = folding_math.depthwise_as_grouped(weights["kernel"])
    kernel, bias = folding_math.fold_backward(
        grouped, weights.get("bias"), scale, offset, groups=channels
    )
    return {**weights, "kernel": folding_math.grouped_as_depthwise(kernel, channels), "bias": bias}


BackwardRule = Callable[[Any, Weights, np.ndarray, np.ndarray], Weights]


@dataclasses.dataclass(frozen=True)
class FoldRule:
    """How BatchNormalization folds into one layer class.

    Forward folding is the same maths for every class, told apart by data: which
    kernel holds the output channels and on which axis (``folding_math.fold_forward``).
    Backward folding needs a function, which also checks its own preconditions;
    ``None`` means the class takes no backward fold.
    """

    kernel: str  # the variable that holds the output channels
    output_axis: int | tuple[int, int]  # its output-channel axis
    backward: BackwardRule | None
    weights: tuple[str, ...] = ("kernel", "bias")  # every variable the layer may have


_SEPARABLE_WEIGHTS = ("depthwise_kernel", "pointwise_kernel", "bias")

# Keras 3 kernel layouts: Dense (in, out); Conv (*k, in/groups, out); DepthwiseConv
# (*k, in, depth_multiplier); SeparableConv pointwise (1.., in*dm, out); ConvTranspose
# (*k, out, in). Transposed and separable convolutions take no backward fold: a
# transposed conv sums a varying number of kernel taps per output position (the
# BN offset term is not per channel), and separable is left out of scope.
FOLD_RULES: dict[type, FoldRule] = {
    keras.layers.Dense: FoldRule("kernel", -1, _fold_into_dense_input),
    keras.layers.Conv1D: FoldRule("kernel", -1, _fold_into_conv_input),
    keras.layers.Conv2D: FoldRule("kernel", -1, _fold_into_conv_input),
    keras.layers.Conv3D: FoldRule("kernel", -1, _fold_into_conv_input),
    keras.layers.DepthwiseConv1D: FoldRule("kernel", (-2, -1), _fold_into_depthwise_input),
    keras.layers.DepthwiseConv2D: FoldRule("kernel", (-2, -1), _fold_into_depthwise_input),
    keras.layers.SeparableConv1D: FoldRule("pointwise_kernel", -1, None, _SEPARABLE_WEIGHTS),
    keras.layers.SeparableConv2D: FoldRule("pointwise_kernel", -1, None, _SEPARABLE_WEIGHTS),
    keras.layers.Conv1DTranspose: FoldRule("kernel", -2, None),
    keras.layers.Conv2DTranspose: FoldRule("kernel", -2, None),
    keras.layers.Conv3DTranspose: FoldRule("kernel", -2, None),
}


# BatchNormalization classes whose inference maths is known: exact classes, since a
# third-party subclass may change what `call` computes.
BATCH_NORM_CLASSES: tuple[type, ...] = (keras.layers.BatchNormalization, KerasBnBatchNormalization)


# --------------------------------------------------------------------------------------
# The report.


@dataclasses.dataclass(frozen=True)
class FoldEntry:
    """What happened to one BatchNormalization call.

    ``batch_norm`` and ``target`` are layer names in the input model (prefixed
    ``outer/inner/`` for layers of nested models). ``blocked_by`` names the
    preconditions (keys of :data:`PRECONDITIONS`) that blocked the forward and then
    the backward fold; ``reason`` says the same in words.
    """

    batch_norm: str
    folded: bool
    target: str | None = None
    direction: Direction | None = None
    reason: str | None = None
    blocked_by: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "blocked_by": list(self.blocked_by)}


@dataclasses.dataclass(frozen=True)
class Fp16Risk:
    """An output channel of a folded layer whose weights a float16 cast would damage.

    ``kind``: ``"overflow"`` (``value``, the largest absolute weight or bias, is
    beyond float16's 65504) or ``"underflow"`` (``value``, the channel's largest
    absolute weight, is below float16's smallest normal 6.1e-5).
    """

    layer: str
    channel: int
    value: float
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FoldReport:
    """The outcome of folding (or planning to fold) a model's BatchNormalization calls.

    ``max_abs_diff`` is the largest absolute difference between the original and
    folded models' outputs on ``measured_on`` inputs (None when nothing was measured,
    as with :func:`plan_folds`).
    """

    model: str
    entries: list[FoldEntry]
    fp16_risks: list[Fp16Risk]
    max_abs_diff: float | None = None
    measured_on: str | None = None

    @property
    def folded_count(self) -> int:
        return sum(entry.folded for entry in self.entries)

    @property
    def not_folded_count(self) -> int:
        return len(self.entries) - self.folded_count

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "folded_count": self.folded_count,
            "not_folded_count": self.not_folded_count,
            "max_abs_diff": self.max_abs_diff,
            "measured_on": self.measured_on,
            "entries": [entry.to_dict() for entry in self.entries],
            "fp16_risks": [risk.to_dict() for risk in self.fp16_risks],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        lines = [
            f"BatchNormalization folding of {self.model!r}: {self.folded_count} folded, "
            f"{self.not_folded_count} not folded"
        ]
        if self.entries:
            rows = [("batch_norm", "folded", "direction", "target", "reason")]
            for entry in self.entries:
                rows.append(
                    (
                        entry.batch_norm,
                        "yes" if entry.folded else "no",
                        entry.direction or "-",
                        entry.target or "-",
                        entry.reason or "",
                    )
                )
            widths = [max(len(row[i]) for row in rows) for i in range(4)]
            for row in rows:
                cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
                lines.append("  " + "  ".join([*cells, row[4]]).rstrip())
        if self.fp16_risks:
            lines.append(f"float16 risks ({len(self.fp16_risks)} channels):")
            for risk in self.fp16_risks:
                lines.append(
                    f"  {risk.layer} channel {risk.channel}: {risk.kind}, |value| = {risk.value:.6g}"
                )
        if self.max_abs_diff is not None:
            lines.append(f"max abs output difference ({self.measured_on}): {self.max_abs_diff:.3g}")
        elif self.measured_on:
            lines.append(f"max abs output difference: {self.measured_on}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Statistics check.


def _walk_layers(model: Any, scope: str = ""):
    for layer in model.layers:
        name = f"{scope}/{layer.name}" if scope else layer.name
        if graph_lib.is_model(layer):
            yield from _walk_layers(layer, name)
        else:
            yield name, layer


def _variables_by_name(layer: Any) -> dict[str, np.ndarray]:
    return {variable.name: graph_lib.to_numpy(variable) for variable in layer.weights}


def check_batch_norm_statistics(model: keras.Model) -> None:
    """Raise UserInputError if a BatchNormalization holds statistics that cannot fold.

    Checks every BatchNormalization layer (nested models included): gamma, beta,
    moving_mean and moving_variance finite, moving_variance non-negative and
    ``moving_variance + epsilon`` positive. The message names the layer and channel.
    """
    _checked_statistics(model)


def _checked_statistics(model: keras.Model) -> dict[int, dict[str, np.ndarray]]:
    """:func:`check_batch_norm_statistics`, returning each BN's variables by ``id(layer)``."""
    checked: dict[int, dict[str, np.ndarray]] = {}
    for name, layer in _walk_layers(model):
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        variables = checked[id(layer)] = _variables_by_name(layer)
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
# Planning: the decisions and the folded float64 weights, without building a model.


def _channel_axis(layer: Any, rank: int) -> int:
    """The channel axis of a layer's inputs and outputs (both the same axis)."""
    return 1 if getattr(layer, "data_format", None) == "channels_first" else rank - 1


def _batch_norm_axes(layer: Any, rank: int) -> tuple[int, ...]:
    axis = layer.axis
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(int(a) % rank for a in axes))


def batch_norm_affine(
    layer: Any, variables: dict[str, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, offset)`` of the BN's inference affine, float64.

    ``variables``: the layer's variables by name, if already read.
    """
    if hasattr(layer, "inference_affine"):  # keras_bn.BatchNormalization
        scale, offset = layer.inference_affine()
        return np.asarray(scale, np.float64), np.asarray(offset, np.float64)
    if variables is None:
        variables = _variables_by_name(layer)
    return folding_math.batch_norm_affine(
        variables["moving_mean"],
        variables["moving_variance"],
        layer.epsilon,
        gamma=variables.get("gamma") if layer.scale else None,
        beta=variables.get("beta") if layer.center else None,
    )


def _called_in_training(node: graph_lib.Node) -> bool:
    """Whether the call normalizes with batch statistics even at inference."""
    training = node.kwargs.get("training", node.args[1] if len(node.args) > 1 else None)
    layer = node.layer
    frozen = not layer.trainable or getattr(layer, "freeze_statistics", False)
    return training is True and not frozen


@dataclasses.dataclass
class _Target:
    """A layer that absorbs one or more BN calls, with its folded float64 weights."""

    node: graph_lib.Node
    rule: FoldRule
    weights: Weights


@dataclasses.dataclass
class _Plan:
    graph: graph_lib.Graph
    entries: list[FoldEntry]
    targets: dict[int, _Target]  # by id(node)
    removed: set[int]  # ids of folded BN nodes
    forward_into: dict[int, graph_lib.Node] = dataclasses.field(default_factory=dict)

    def fused(self) -> set[int]:
        """Ids of nodes whose output no longer exists on its own once folded.

        A layer that absorbed a forward fold computes layer + BN; a BN folded
        backward vanishes into the next layer; a BN folded forward that another
        forward-folded BN follows (Conv -> BN -> BN) has its output only inside
        the target. The last BN of a forward fold keeps its output (the target's),
        and a layer that absorbed only backward folds computes what it did.
        """
        fused = {id(target) for target in self.forward_into.values()}
        fused |= self.removed - self.forward_into.keys()
        for node in self.graph.nodes:
            if id(node) in self.forward_into:
                consumers = node.outputs[0].consumers
                if any(
                    self.forward_into.get(id(c)) is self.forward_into[id(node)] for c in consumers
                ):
                    fused.add(id(node))
        return fused

    def fp16_risks(self) -> list[Fp16Risk]:
        risks = []
        for target in self.targets.values():
            for risk in folding_math.float16_risks(
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
        raise _Blocked(
            f"{role}-rule",
            f"{type(layer).__name__} {node.name!r} has no "
            f"{'forward' if role == 'producer' else 'backward'} fold rule",
        )
    unexpected = sorted({v.name for v in layer.weights} - set(rule.weights))
    if unexpected or getattr(layer.dtype_policy, "quantization_mode", None):
        raise _Blocked(f"{role}-weights", f"{node.name!r} has weights {unexpected or 'quantized'}")
    if len(graph.call_sites(layer)) > 1:
        raise _Blocked(
            f"{role}-shared",
            f"{node.name!r} is called at {len(graph.call_sites(layer))} places",
        )
    return rule


def _check_axis(bn_node: graph_lib.Node, node: graph_lib.Node, rank: int) -> None:
    axes = _batch_norm_axes(bn_node.layer, rank)
    channel = _channel_axis(node.layer, rank)
    if axes != (channel,):
        raise _Blocked(
            "batch-norm-axis",
            f"BN axes {axes} (rank {rank}) are not the channel axis {channel} of {node.name!r}",
        )


def _forward_target(
    bn_node: graph_lib.Node, plan: _Plan, folded_into: dict[int, graph_lib.Node]
) -> graph_lib.Node:
    """The layer call that absorbs ``bn_node`` forward, or raise _Blocked."""
    tensor = bn_node.inputs[0]
    producer = tensor.producer
    if producer is None:
        raise _Blocked("producer-missing", f"input {tensor.name!r} is a model input")
    # A BN folded into its producer hands that producer on (Conv -> BN -> BN).
    producer = folded_into.get(id(producer), producer)
    _check_layer(producer, plan.graph, "producer")
    activation = getattr(producer.layer, "activation", None)
    if activation not in (None, keras.activations.linear):
        raise _Blocked(
            "producer-activation",
            f"{producer.name!r} has activation {getattr(activation, '__name__', activation)!r}",
        )
    if tensor.consumers != [bn_node] or tensor in plan.graph.outputs:
        raise _Blocked(
            "producer-fanout",
            f"the output of {tensor.producer.name!r} feeds {len(tensor.consumers)} layers"
            + (" and is a model output" if tensor in plan.graph.outputs else ""),
        )
    _check_axis(bn_node, producer, tensor.rank)
    return producer


def _backward_target(
    bn_node: graph_lib.Node, plan: _Plan, folded_into: dict[int, graph_lib.Node]
) -> graph_lib.Node:
    """The layer call that absorbs ``bn_node`` backward, or raise _Blocked."""
    tensor = bn_node.outputs[0]
    is_output = tensor in plan.graph.outputs
    if not tensor.consumers:
        raise _Blocked("consumer-missing", "the BN output is a model output only")
    if len(tensor.consumers) > 1 or is_output:
        raise _Blocked(
            "consumer-fanout",
            f"the BN output feeds {len(tensor.consumers)} layers"
            + (" and is a model output" if is_output else ""),
        )
    consumer = tensor.consumers[0]
    consumer = folded_into.get(id(consumer), consumer)  # BN -> BN -> Conv
    _check_layer(consumer, plan.graph, "consumer")
    if len(consumer.inputs) != 1:
        raise _Blocked("consumer-rule", f"{consumer.name!r} takes {len(consumer.inputs)} inputs")
    _check_axis(bn_node, consumer, tensor.rank)
    return consumer


def _current_weights(plan: _Plan, node: graph_lib.Node) -> Weights:
    """The float64 weights of ``node``'s layer with the folds decided so far."""
    if id(node) in plan.targets:
        return plan.targets[id(node)].weights
    return {
        name: values.astype(np.float64) for name, values in _variables_by_name(node.layer).items()
    }


def _commit(plan: _Plan, node: graph_lib.Node, weights: Weights) -> None:
    plan.targets[id(node)] = _Target(node, FOLD_RULES[type(node.layer)], weights)


def _fold_forward(target: graph_lib.Node, weights: Weights, scale, offset) -> Weights:
    rule = FOLD_RULES[type(target.layer)]
    kernel, bias = folding_math.fold_forward(
        weights[rule.kernel], weights.get("bias"), scale, offset, channel_axis=rule.output_axis
    )
    return {**weights, rule.kernel: kernel, "bias": bias}


def _plan(
    model: keras.Model,
    backward: bool,
    batch_norm_variables: dict[int, dict[str, np.ndarray]] | None = None,
) -> _Plan:
    """The fold decisions; ``batch_norm_variables`` as from :func:`_checked_statistics`."""
    graph = graph_lib.flatten(model)
    plan = _Plan(graph, [], {}, set())
    batch_norms = [n for n in graph.nodes if isinstance(n.layer, keras.layers.BatchNormalization)]
    folded: dict[int, FoldEntry] = {}
    # (direction, precondition) pairs that blocked each BN call, in the order tried.
    blocked: dict[int, list[tuple[str | None, _Blocked]]] = {id(n): [] for n in batch_norms}
    candidates = []
    for bn_node in batch_norms:
        if type(bn_node.layer) not in BATCH_NORM_CLASSES:
            detail = f"{type(bn_node.layer).__name__} is not a known BN class"
            blocked[id(bn_node)].append((None, _Blocked("batch-norm-class", detail)))
        elif _called_in_training(bn_node):
            detail = "called with training=True"
            blocked[id(bn_node)].append((None, _Blocked("batch-norm-training", detail)))
        else:
            candidates.append(bn_node)
    known = batch_norm_variables or {}
    affines = {id(n): batch_norm_affine(n.layer, known.get(id(n.layer))) for n in candidates}

    forward_into = plan.forward_into  # folded BN node id -> target node
    for bn_node in candidates:  # topological order: Conv -> BN -> BN folds in turn
        try:
            producer = _forward_target(bn_node, plan, forward_into)
        except _Blocked as reason:
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
            weights = rule.backward(
                consumer.layer, _current_weights(plan, consumer), *affines[id(bn_node)]
            )
        except _Blocked as reason:
            blocked[id(bn_node)].append(("backward", reason))
            continue
        _commit(plan, consumer, weights)
        backward_into[id(bn_node)] = consumer
        folded[id(bn_node)] = FoldEntry(bn_node.name, True, consumer.name, "backward")

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


# --------------------------------------------------------------------------------------
# Rebuilding.


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


def _clone_uninitialized(layer: Any, config_updates: dict[str, Any]) -> Any:
    """A fresh copy of ``layer`` whose weights will be zeros when built.

    Every weight of the copy is overwritten right after it is built (with folded
    or copied values), so drawing random initial values (glorot on every kernel:
    a third of a rebuild's time) is wasted work. :func:`_restore_initializers` puts
    the original initializers back afterwards, so ``get_config`` and a saved
    ``.keras`` file are the same as with a plain clone.
    """
    config = layer.get_config()
    zeros = {key: "zeros" for key in _initializer_keys(layer, config)}
    return type(layer).from_config({**config, **config_updates, **zeros})


def _restore_initializers(clone: Any, original: Any) -> None:
    """Give ``clone`` copies of the initializers of ``original`` (undo the zeros)."""
    if clone is original:
        return
    for key in _initializer_keys(original, original.get_config()):
        if hasattr(clone, key):
            initializer = keras.initializers.serialize(getattr(original, key))
            setattr(clone, key, keras.initializers.get(initializer))


def _rebuild(plan: _Plan) -> keras.Model:
    clones: dict[int, Any] = {}
    used_names: set[str] = set(plan.graph.input_names)

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
        except (TypeError, ValueError, NotImplementedError):
            # A stateless layer that will not rebuild from its config (a Lambda of a
            # Python lambda, a keras.ops operation without one): share it with the
            # input model, which it cannot change.
            if updates or getattr(layer, "weights", None) or name != layer.name:
                raise
            return layer

    def call(node: graph_lib.Node, args: tuple, kwargs: dict) -> Any:
        if id(node) in plan.removed:
            return args[0] if args else kwargs["inputs"]
        target = plan.targets.get(id(node))
        if target is not None:
            updates = {"use_bias": True} if hasattr(node.layer, "use_bias") else {}
            layer = fresh_copy(node, updates)
            outputs = layer(*args, **kwargs)
            for variable in layer.weights:
                variable.assign(
                    folding_math.round_to_dtype(target.weights[variable.name], variable.dtype)
                )
            _restore_initializers(layer, node.layer)
            return outputs
        first_call = id(node.layer) not in clones
        if first_call:
            clones[id(node.layer)] = fresh_copy(node, {})
        layer = clones[id(node.layer)]
        outputs = layer(*args, **kwargs)
        if first_call and layer is not node.layer:
            if getattr(node.layer, "weights", None):
                graph_lib.copy_weights(node.layer, layer)
            _restore_initializers(layer, node.layer)
        return outputs

    return graph_lib.rebuild(plan.graph, call, name=plan.graph.name)


# --------------------------------------------------------------------------------------
# Measuring.


def _generated_inputs(graph: graph_lib.Graph, batch_size: int = 2, seed: int = 0):
    """Random inputs for every model input, or None if a shape is not fully known."""
    rng = np.random.default_rng(seed)
    inputs = []
    for tensor in graph.inputs:
        dims = tensor.shape[1:]
        if any(dim is None for dim in dims):
            return None
        shape = (batch_size, *dims)
        if "int" in tensor.dtype:
            inputs.append(rng.integers(0, 2, size=shape).astype(tensor.dtype))
        elif tensor.dtype == "bool":
            inputs.append(rng.random(shape) < 0.5)
        else:
            inputs.append(rng.standard_normal(shape).astype(tensor.dtype))
    return inputs if len(inputs) > 1 else inputs[0]


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
        float(np.max(np.abs(a - b), initial=0.0)) for a, b in zip(expected, received, strict=True)
    )


# --------------------------------------------------------------------------------------
# Public API.


def plan_folds(model: keras.Model, *, backward: bool = True) -> FoldReport:
    """Decide which BatchNormalization calls would fold, without building a model.

    The same decisions and float16 risks as :func:`fold_batch_norms`;
    ``max_abs_diff`` is None.
    """
    plan = _plan(model, backward)
    return FoldReport(model.name, plan.entries, plan.fp16_risks())


@dataclasses.dataclass(frozen=True)
class FoldedWeights:
    """The folds of a model as weights only, for an exporter to write directly.

    ``graph``: the flattened input model; ``weights``: by ``id(node)`` of its nodes,
    each absorbing call's variables by name (folded, rounded once to the layer's
    variable dtype, a bias added where there was none); ``removed``: ids of the
    folded BN nodes, which become the identity; ``fused``: ids of the nodes whose
    Keras output no longer exists on its own (see ``_Plan.fused``). Exporting
    ``graph`` with these gives the operators and weights (bit for bit) of exporting
    :func:`fold_batch_norms`'s model, without building that model in Keras (about
    a quarter of fold + export + validate on ResNet50).
    """

    graph: graph_lib.Graph
    report: FoldReport
    weights: dict[int, dict[str, np.ndarray]]
    removed: frozenset[int]
    fused: frozenset[int]


def fold_weights(model: keras.Model, *, backward: bool = True) -> FoldedWeights:
    """Decide and compute the folds of ``model`` (not modified); build no model.

    The same decisions, weights and checks as :func:`fold_batch_norms`; the report
    is not measured (compare the exported file with ``model`` instead).
    """
    plan = _plan(model, backward, _checked_statistics(model))
    weights = {}
    for node_id, target in plan.targets.items():
        dtype = target.node.layer.variable_dtype
        weights[node_id] = {
            name: folding_math.round_to_dtype(values, dtype)
            for name, values in target.weights.items()
        }
    report = FoldReport(model.name, plan.entries, plan.fp16_risks())
    report.measured_on = "not measured (folded while exporting)"
    return FoldedWeights(
        plan.graph, report, weights, frozenset(plan.removed), frozenset(plan.fused())
    )


def fold_batch_norms(
    model: keras.Model,
    *,
    backward: bool = True,
    sample_inputs: Any = None,
    measure: bool = True,
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
            (anything ``model(...)`` accepts). If None, a batch of 2 standard-normal
            inputs is generated where every input shape is known (one forward pass
            of each model); ``report.max_abs_diff`` stays None where shapes are
            unknown or the original model cannot run on this backend (say why in
            ``report.measured_on``).
        measure: compare the original and folded models at all. ``False`` skips
            the two forward passes (``report.max_abs_diff`` stays None), for
            pipelines that validate the exported model against the original
            anyway (``validate_onnx``); it cannot be combined with
            ``sample_inputs``.

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
    plan = _plan(model, backward, _checked_statistics(model))
    folded = _rebuild(plan)
    report = FoldReport(model.name, plan.entries, plan.fp16_risks())
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
    report.measured_on = "generated inputs, batch of 2, standard normal, seed 0"
    return folded, report

"""A model prepared for one run: flattened once, with what is known about its inputs.

:func:`prepare` flattens a Keras model into its :class:`~.graph.Graph` once; the
:class:`PreparedModel` it returns is what samples, the fold plan, export and
validation take, so that none of them flattens the model again (torch.fx hands
one ``GraphModule`` from pass to pass the same way). It carries:

- the untraced graph (:attr:`PreparedModel.graph`), made at once;
- the traced graph export and folding work on (:meth:`PreparedModel.traced`),
  made on first request, once per trace predicate, and the untraced graph itself
  when no layer of it is traced;
- each input's name, shape and dtype (:attr:`PreparedModel.inputs`), and the value
  range generated samples take (:attr:`PreparedModel.domains`), inferred once, on
  first request, from what the model says about its input: a Rescaling to pixels,
  a leading Normalization, or its first BatchNormalization's moving statistics
  (:func:`input_domains`).

Public functions of the converter take a ``keras.Model`` or a ``PreparedModel``
(:data:`ModelLike`) and pass the prepared one down.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any, TypeAlias

import keras
import numpy as np

from keras_bn.converters import graph as graph_lib

__all__ = [
    "FLOAT_DOMAINS",
    "NORMALIZATION_DOMAIN",
    "InputSpec",
    "ModelLike",
    "PreparedModel",
    "domain_details",
    "input_domains",
    "normalization_statistics",
    "prepare",
]


# The value ranges a float input may be in: standard normal (the default), or one of
# the usual image conventions. A trained model says which one it was trained on
# through its first BatchNormalization's moving statistics (see _domain_by_statistics).
FLOAT_DOMAINS: dict[str, Any] = {
    "standard normal": lambda rng, shape: rng.standard_normal(size=shape),
    "uniform 0..255 (pixels)": lambda rng, shape: rng.uniform(0.0, 255.0, size=shape),
    "uniform -128..128 (centred pixels)": lambda rng, shape: rng.uniform(-128.0, 128.0, size=shape),
    "uniform -1..1": lambda rng, shape: rng.uniform(-1.0, 1.0, size=shape),
    "uniform 0..1": lambda rng, shape: rng.uniform(0.0, 1.0, size=shape),
}
NORMALIZATION_DOMAIN = "normal with the leading Normalization layer's mean and variance"
# The input-domain probe's samples per domain: enough for this many values per
# channel at the first BatchNormalization, at most _PROBE_BATCH. One 224x224 image
# gives ResNet50's first BN 12,544 values per channel; four samples of a small
# input, five times the work, would add nothing but time.
_PROBE_VALUES = 4096
_PROBE_BATCH = 4


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One model input: its name, shape (batch first, None where unknown) and dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str


class PreparedModel:
    """A Keras model flattened once for a run (see the module docstring).

    A subclassed model is prepared as the Functional model that calls it
    (:func:`~.graph.with_graph`), traced like a subclassed layer. Raises
    ``ValueError`` for a model with no known input shape: an unbuilt Sequential, a
    subclassed model never built or called.
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = graph_lib.with_graph(model)  # a subclassed model: called in a wrapper
        self.graph = graph_lib.flatten(self.model)
        self.inputs = [
            InputSpec(name, tensor.shape, tensor.dtype)
            for name, tensor in zip(self.graph.input_names, self.graph.inputs, strict=True)
        ]
        self._traced: dict[Callable[[Any], bool], graph_lib.Graph] = {}
        self._traced_lock = threading.Lock()
        self._domains: dict[str, tuple[str, str, Any]] | None = None
        self._domains_lock = threading.Lock()

    @property
    def name(self) -> str:
        return str(self.model.name)

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    def traced(self, trace: Callable[[Any], bool] | None) -> graph_lib.Graph:
        """The graph flattened with ``trace`` (:func:`~.graph.flatten`), made once.

        When ``trace`` is None, or true for no layer the untraced graph calls, that
        is the untraced graph itself: flattening again would give the same graph.
        """
        if trace is None:
            return self.graph
        with self._traced_lock:
            graph = self._traced.get(trace)
            if graph is None:
                traced = any(
                    graph_lib.traceable(n.layer) and trace(n.layer) for n in self.graph.nodes
                )
                graph = graph_lib.flatten(self.model, trace) if traced else self.graph
                self._traced[trace] = graph
            return graph

    @property
    def domains(self) -> dict[str, str]:
        """The domain generated values take, per float input name (:func:`input_domains`)."""
        return {name: domain for name, (domain, _, _) in self.domain_details.items()}

    @property
    def domain_details(self) -> dict[str, tuple[str, str, Any]]:
        """``(domain, why, sampler)`` per float input name (:func:`domain_details`),
        inferred on first request."""
        with self._domains_lock:
            if self._domains is None:
                self._domains = domain_details(self.graph)
            return self._domains

    def __repr__(self) -> str:
        return f"PreparedModel({self.name!r}, {len(self.graph.nodes)} nodes)"


ModelLike: TypeAlias = "keras.Model | PreparedModel"


def prepare(model: keras.Model | PreparedModel) -> PreparedModel:
    """``model`` flattened for a run; a :class:`PreparedModel` is returned as it is."""
    return model if isinstance(model, PreparedModel) else PreparedModel(model)


# --------------------------------------------------------------------------------------
# Input domains: what the model says about the values of its inputs.


def input_domains(graph: graph_lib.Graph) -> dict[str, str]:
    """The domain generated values take, per float input name (a ``FLOAT_DOMAINS``
    entry, ``uniform 0..HIGH`` for a Rescaling's range, or ``NORMALIZATION_DOMAIN``)."""
    return {name: domain for name, (domain, _, _) in domain_details(graph).items()}


def domain_details(graph: graph_lib.Graph) -> dict[str, tuple[str, str, Any]]:
    """``(domain, why, sampler)`` per float input name, from what the model says:
    a Rescaling's scale and offset, a Normalization's statistics, the first
    BatchNormalization's moving statistics; else standard normal."""
    domains = {}
    for tensor, name in zip(graph.inputs, graph.input_names, strict=True):
        if np.dtype(tensor.dtype).kind != "f":
            continue
        rescaling = _rescaling_range(tensor)
        if rescaling is not None:
            high, why = rescaling
            pixels = np.isclose(high, 255.0)
            domain = "uniform 0..255 (pixels)" if pixels else f"uniform 0..{high:.4g}"
            domains[name] = (domain, why, _uniform(high))
        elif normalization_statistics(tensor) is not None:
            domains[name] = (
                NORMALIZATION_DOMAIN,
                "the model's Normalization layer reads it",
                FLOAT_DOMAINS["standard normal"],  # sample_arrays applies the statistics
            )
        else:
            found = _domain_by_statistics(graph) if len(graph.inputs) == 1 else None
            if found is not None:
                bn = _first_batch_norm(graph)
                why = (
                    "of the usual input ranges, the one whose statistics at the first "
                    f"BatchNormalization ({bn.layer.name if bn else '?'}) best match its "
                    "moving statistics"
                )
                domains[name] = (found, why, FLOAT_DOMAINS[found])
            else:
                why = (
                    "nothing in the model gives its range: no Rescaling, Normalization "
                    "or trained BatchNormalization statistics"
                )
                domains[name] = ("standard normal", why, FLOAT_DOMAINS["standard normal"])
    return domains


def _rescaling_range(tensor: graph_lib.Tensor) -> tuple[float, str] | None:
    """``(high, why)`` when a Rescaling layer that shrinks reads the input: inputs are
    ``uniform 0..high``, the range it maps onto ``[0, 1]`` (offset >= 0) or onto
    ``[offset, -offset]`` (a negative offset: ``1/127.5, -1`` maps 0..255 onto -1..1)."""
    for consumer in tensor.consumers:
        layer = consumer.layer
        if not isinstance(layer, keras.layers.Rescaling):
            continue
        scale = np.abs(np.asarray(graph_lib.to_numpy(layer.scale), np.float64))
        offset = np.asarray(graph_lib.to_numpy(layer.offset), np.float64)
        if not scale.size or not np.all(np.isfinite(scale)) or not np.all(np.isfinite(offset)):
            continue
        largest, shift = float(scale.max()), float(offset.mean()) if offset.size else 0.0
        if not 0.0 < largest < 1.0:
            continue  # not a shrinking rescale: it says nothing about a range
        high = -2.0 * shift / largest if shift < 0 else 1.0 / largest
        low_out, high_out = (shift, -shift) if shift < 0 else (shift, shift + 1.0)
        why = (
            f"the model's Rescaling(scale={largest:.4g}, offset={shift:g}) maps "
            f"0..{high:.4g} onto {low_out:g}..{high_out:g}"
        )
        return high, why
    return None


def _uniform(high: float):
    return lambda rng, shape: rng.uniform(0.0, high, size=shape)


def _first_batch_norm(graph: graph_lib.Graph) -> graph_lib.Node | None:
    for node in graph.nodes:
        if isinstance(node.layer, keras.layers.BatchNormalization):
            return node
    return None


def _domain_by_statistics(graph: graph_lib.Graph) -> str | None:
    """The float domain whose statistics at the first BN best match its moving ones.

    None when there is no BN, its statistics are the initial ones (mean 0, variance
    1: nothing was learnt), or the probe cannot run (unknown sizes, a layer that
    fails eagerly).
    """
    bn = _first_batch_norm(graph)
    if bn is None or any(size is None for size in graph.inputs[0].shape[1:]):
        return None
    layer = bn.layer
    mean = np.asarray(graph_lib.to_numpy(layer.moving_mean), np.float64).reshape(-1)
    variance = np.asarray(graph_lib.to_numpy(layer.moving_variance), np.float64).reshape(-1)
    if np.all(mean == 0.0) and np.all(variance == 1.0):
        return None
    rank = len(bn.inputs[0].shape)
    axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    kept = sorted(a % rank for a in axes)
    reduced = tuple(a for a in range(rank) if a not in kept)
    positions = int(np.prod([bn.inputs[0].shape[a] or 1 for a in reduced if a != 0]))
    batch = min(_PROBE_BATCH, -(-_PROBE_VALUES // positions))
    everything = _probe(graph, bn, batch)
    if everything is None or everything.shape[:1] != (batch * len(FLOAT_DOMAINS),):
        return None  # a layer mixes the batch up (a Reshape over it): no opinion
    scores = {}
    epsilon = float(layer.epsilon)
    for index, domain in enumerate(FLOAT_DOMAINS):
        x = everything[index * batch : (index + 1) * batch]
        batch_mean = x.mean(axis=reduced, dtype=np.float64).reshape(-1)
        batch_variance = x.var(axis=reduced, dtype=np.float64).reshape(-1)
        if batch_mean.shape != mean.shape or not np.all(np.isfinite(batch_variance)):
            return None
        scores[domain] = float(
            np.mean(np.abs(np.log((batch_variance + epsilon) / (variance + epsilon))))
            + np.mean(np.abs(batch_mean - mean) / np.sqrt(variance + epsilon))
        )
    return min(scores, key=lambda domain: scores[domain])


def _probe(graph: graph_lib.Graph, bn: graph_lib.Node, batch: int) -> np.ndarray | None:
    """The first BN's input on ``batch`` samples of each domain (in ``FLOAT_DOMAINS``
    order, one batch: one eager pass), None when a layer will not run eagerly here."""
    shape = (batch, *graph.inputs[0].shape[1:])
    dtype = np.dtype(graph.inputs[0].dtype)
    probes = [
        np.asarray(sample(np.random.default_rng(0), shape), dtype)
        for sample in FLOAT_DOMAINS.values()
    ]
    try:
        return graph_lib.value_of(
            graph,
            {graph.input_names[0]: np.concatenate(probes)},
            bn.inputs[0],
            until=lambda node: node is bn,
        )
    except Exception:  # a layer that will not run eagerly here: no opinion
        return None


def normalization_statistics(tensor: graph_lib.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mean, std)`` broadcastable to the input, when a Normalization layer reads it."""
    for consumer in tensor.consumers:
        layer = consumer.layer
        if not isinstance(layer, keras.layers.Normalization) or getattr(layer, "invert", False):
            continue
        mean, variance = getattr(layer, "mean", None), getattr(layer, "variance", None)
        if mean is None or variance is None:
            return None
        mean = np.asarray(keras.ops.convert_to_numpy(mean), np.float64)
        variance = np.asarray(keras.ops.convert_to_numpy(variance), np.float64)
        if mean.ndim > len(tensor.shape) or not np.all(np.isfinite(variance)):
            return None
        return mean, np.sqrt(np.maximum(variance, 0.0))
    return None

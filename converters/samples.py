"""Inputs for a Keras model: generated samples, user inputs matched, and the run.

:func:`make_sample_inputs` is the one generator of made-up inputs (validation,
the fold self-check, the fallback exporter, the CLI); :func:`normalize_inputs`
checks user inputs against the model; :func:`call_model` runs the model on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from keras_bn.converters import graph as graph_lib
from keras_bn.converters.errors import UserInputError

__all__ = [
    "UNKNOWN_DIMENSION_SIZE",
    "call_model",
    "make_sample_inputs",
    "normalize_inputs",
    "sample_arrays",
    "sample_specs",
]

UNKNOWN_DIMENSION_SIZE = 32  # generated inputs use this size for unknown non-batch axes
_IMAGE_SCALE_LIMIT = 0.1  # a leading Rescaling(scale <= this) means pixels in [0, 255]

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
# input, five times the work, would add nothing but time (BENCHMARKS.md appendix).
_PROBE_VALUES = 4096
_PROBE_BATCH = 4


def call_model(model: keras.Model, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The Keras model's outputs (inference mode) on named inputs, flattened."""
    graph = graph_lib.flatten(model)
    return graph_lib.call_model(model, [inputs[name] for name in graph.input_names])


def _is_pixel_input(tensor: graph_lib.Tensor) -> bool:
    for consumer in tensor.consumers:
        layer = consumer.layer
        if isinstance(layer, keras.layers.Rescaling):
            scale = np.asarray(
                keras.ops.convert_to_numpy(layer.scale)
                if not np.isscalar(layer.scale)
                else layer.scale
            )
            if scale.size and float(np.max(np.abs(scale))) <= _IMAGE_SCALE_LIMIT:
                return True
    return False


def make_sample_inputs(
    model: keras.Model, batch_size: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs for every model input, keyed by input name.

    Float inputs read by a Rescaling layer that scales by 0.1 or less (Keras
    Applications' ``1/255``, ``1/127.5``) are pixels: uniform in [0, 255]. For the
    other float inputs of a single-input model with trained BatchNormalization
    statistics, the model says what it was trained on: of ``FLOAT_DOMAINS``, the
    range whose batch statistics at the first BatchNormalization best match its
    moving statistics (a model trained on 0..255 pixels without a Rescaling layer,
    like ResNet50, gets pixels, not standard-normal noise that its first BN would
    map far outside anything it saw). A float input read by a ``Normalization``
    layer is normal with that layer's mean and variance. Other float inputs are
    standard normal. Integer inputs feeding an Embedding are
    uniform in ``[0, input_dim)``, other integer inputs in ``[0, 10)``; boolean
    inputs are fair coin flips. Unknown non-batch dimensions get size
    ``UNKNOWN_DIMENSION_SIZE`` (32).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserInputError(f"batch_size must be a positive integer; received {batch_size!r}.")
    return sample_arrays(graph_lib.flatten(model), batch_size, seed)


def sample_specs(
    graph: graph_lib.Graph, batch_size: int = 1
) -> list[tuple[tuple[int, ...], np.dtype]]:
    """The ``(shape, dtype)`` of each array :func:`sample_arrays` makes, in input order."""
    return [
        (
            (batch_size,)
            + tuple(UNKNOWN_DIMENSION_SIZE if size is None else size for size in tensor.shape[1:]),
            np.dtype(tensor.dtype),
        )
        for tensor in graph.inputs
    ]


def sample_arrays(
    graph: graph_lib.Graph, batch_size: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """:func:`make_sample_inputs` for a flattened graph."""
    rng = np.random.default_rng(seed)
    domains = input_domains(graph)
    inputs = {}
    for tensor, name, (shape, dtype) in zip(
        graph.inputs, graph.input_names, sample_specs(graph, batch_size), strict=True
    ):
        array: np.ndarray
        if dtype.kind == "f":
            normalization = _normalization_statistics(tensor)
            if normalization is not None:
                mean, std = normalization
                array = mean + std * rng.standard_normal(size=shape)
            else:
                array = np.asarray(FLOAT_DOMAINS[domains[name]](rng, shape))
        elif dtype.kind in "iu":
            high = 10
            for consumer in tensor.consumers:
                if isinstance(consumer.layer, keras.layers.Embedding):
                    high = int(consumer.layer.input_dim)
            array = rng.integers(0, high, size=shape)
        elif dtype.kind == "b":
            array = rng.random(size=shape) < 0.5
        else:
            raise UserInputError(
                f"Cannot generate values for input {name!r} of dtype {dtype}; pass inputs."
            )
        inputs[name] = np.asarray(array).astype(dtype)
    return inputs


def normalize_inputs(model: keras.Model, inputs: Any) -> dict[str, np.ndarray]:
    """User inputs (a dict by input name, a list in input order, or one array) checked
    against the model's inputs, keyed by input name, cast to their dtypes."""
    graph = graph_lib.flatten(model)
    names = graph.input_names
    if isinstance(inputs, Mapping):
        missing = [name for name in names if name not in inputs]
        extra = [name for name in inputs if name not in names]
        if missing or extra:
            raise UserInputError(
                f"inputs have keys {sorted(inputs)}; expected exactly the model's inputs "
                f"{names}. Rename the arrays after the model's input names."
            )
        arrays = [inputs[name] for name in names]
    elif isinstance(inputs, list | tuple):
        arrays = list(inputs)
    else:
        arrays = [inputs]
    if len(arrays) != len(names):
        raise UserInputError(
            f"received {len(arrays)} input arrays; expected {len(names)} ({names})."
        )
    result = {}
    for tensor, name, array in zip(graph.inputs, names, arrays, strict=True):
        array = np.asarray(array)
        expected = tensor.shape
        if array.ndim != len(expected) or any(
            size is not None and size != actual
            for size, actual in zip(expected[1:], array.shape[1:], strict=True)
        ):
            raise UserInputError(
                f"input {name!r} has shape {array.shape}; expected {expected} (None: any size)."
            )
        if array.shape[0] < 1:
            raise UserInputError(f"input {name!r} is empty; pass at least one sample.")
        result[name] = array.astype(np.dtype(tensor.dtype), copy=False)
    return result


def input_domains(graph: graph_lib.Graph) -> dict[str, str]:
    """The ``FLOAT_DOMAINS`` entry generated values take, per float input name."""
    domains = {}
    for tensor, name in zip(graph.inputs, graph.input_names, strict=True):
        if np.dtype(tensor.dtype).kind != "f":
            continue
        if _is_pixel_input(tensor):
            domains[name] = "uniform 0..255 (pixels)"
        elif _normalization_statistics(tensor) is not None:
            domains[name] = NORMALIZATION_DOMAIN
        elif len(graph.inputs) == 1:
            domains[name] = _domain_by_statistics(graph) or "standard normal"
        else:
            domains[name] = "standard normal"
    return domains


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
    shape = (batch, *graph.inputs[0].shape[1:])
    dtype = np.dtype(graph.inputs[0].dtype)
    # Every domain's probe in one batch: one eager pass (on JAX, one compile per op).
    probes = [
        np.asarray(sample(np.random.default_rng(0), shape), dtype)
        for sample in FLOAT_DOMAINS.values()
    ]
    try:
        everything = graph_lib.value_of(
            graph,
            {graph.input_names[0]: np.concatenate(probes)},
            bn.inputs[0],
            until=lambda node: node is bn,
        )
    except Exception:  # a layer that will not run eagerly here: no opinion
        return None
    if everything.shape[:1] != (batch * len(probes),):
        return None  # a layer mixes the batch up (a Reshape over it): no opinion
    scores = {}
    for index, domain in enumerate(FLOAT_DOMAINS):
        x = everything[index * batch : (index + 1) * batch]
        batch_mean = x.mean(axis=reduced, dtype=np.float64).reshape(-1)
        batch_variance = x.var(axis=reduced, dtype=np.float64).reshape(-1)
        if batch_mean.shape != mean.shape or not np.all(np.isfinite(batch_variance)):
            return None
        epsilon = float(layer.epsilon)
        scores[domain] = float(
            np.mean(np.abs(np.log((batch_variance + epsilon) / (variance + epsilon))))
            + np.mean(np.abs(batch_mean - mean) / np.sqrt(variance + epsilon))
        )
    return min(scores, key=lambda domain: scores[domain])


def _normalization_statistics(tensor: graph_lib.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
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

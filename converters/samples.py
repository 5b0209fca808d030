"""Inputs for a Keras model: generated samples, user inputs matched, and the run.

:func:`make_sample_inputs` is the one generator of made-up inputs (validation,
the fold self-check, the fallback exporter, the CLI); :func:`normalize_inputs`
checks user inputs against the model; :func:`call_model` runs the model on them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import tree

from keras_bn.converters import graph as graph_lib
from keras_bn.converters.errors import UserInputError

__all__ = [
    "UNKNOWN_DIMENSION_SIZE",
    "VALIDATION_SAMPLES",
    "describe_generated_inputs",
    "call_model",
    "make_sample_inputs",
    "normalize_inputs",
    "sample_arrays",
    "sample_specs",
    "with_input_shapes",
]

UNKNOWN_DIMENSION_SIZE = 32  # generated inputs use this size for unknown non-batch axes
# Samples the CLI validates on by default (generated in the model's input domain):
# enough that a sample-dependent bug shows (a channel that only some inputs reach),
# few enough that validating ResNet50 stays a matter of seconds. The library's
# validate_onnx keeps its own default batch sizes.
VALIDATION_SAMPLES = 16
_INTEGER_HIGH = 10  # integer inputs no Embedding reads: uniform in [0, this)

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


def with_input_shapes(
    model: keras.Model, input_shapes: Mapping[str, Sequence[int | None]]
) -> keras.Model:
    """``model`` called on inputs of the given sizes after the batch, by input name
    (a fixed sequence length where the model takes any): a Functional model around
    it, with the same input names, whose export has those static sizes. Inputs not
    named keep their shapes."""
    from keras_bn import _keras_internals as internals

    functional = internals.functional_of(model)
    struct = internals.inputs_struct(functional)
    names = [internals.producing_operation(kt).name for kt in tree.flatten(struct)]
    unknown = sorted(set(input_shapes) - set(names))
    if unknown:
        raise UserInputError(
            f"input_shapes names {unknown}, which are not inputs of the model; "
            f"expected some of {names}."
        )

    def new_input(kt: Any) -> Any:
        name = internals.producing_operation(kt).name
        shape = tuple(kt.shape)
        if name in input_shapes:
            sizes = tuple(input_shapes[name])
            if len(sizes) != len(shape) - 1 or any(
                size is not None and known is not None and size != known
                for size, known in zip(sizes, shape[1:], strict=True)
            ):
                raise UserInputError(
                    f"input shape {sizes} for input {name!r}: expected the sizes after the "
                    f"batch of its shape {shape} (None: any size)."
                )
            shape = (shape[0], *sizes)
        return keras.Input(batch_shape=shape, dtype=kt.dtype, name=name)

    new_struct = tree.map_structure(new_input, struct)
    wrapper = keras.Model(new_struct, model(new_struct), name=model.name)
    wrapper.output_names = internals.output_names(model)  # the model's, not the call's
    return wrapper


def call_model(model: keras.Model, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The Keras model's outputs (inference mode) on named inputs, flattened."""
    graph = graph_lib.flatten(model)
    return graph_lib.call_model(model, [inputs[name] for name in graph.input_names])


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


def make_sample_inputs(
    model: keras.Model, batch_size: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs for every model input, keyed by input name.

    Float inputs read by a Rescaling layer that shrinks (scale below 1) are
    uniform over the range it maps onto [0, 1] (a negative offset: onto
    [offset, -offset]): ``1/255`` and ``1/127.5, offset=-1`` give pixels in
    [0, 255], ``1/16`` gives [0, 16]. For the
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
    domains = _input_domains(graph)
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
                array = np.asarray(domains[name][2](rng, shape))
        elif dtype.kind in "iu":
            array = rng.integers(0, _integer_high(tensor), size=shape)
        elif dtype.kind == "b":
            array = rng.random(size=shape) < 0.5
        else:
            raise UserInputError(
                f"Cannot generate values for input {name!r} of dtype {dtype}; pass inputs."
            )
        inputs[name] = np.asarray(array).astype(dtype)
    return inputs


def _integer_high(tensor: graph_lib.Tensor) -> int:
    """Integer inputs are uniform in ``[0, high)``: an Embedding's vocabulary, else 10."""
    high = _INTEGER_HIGH
    for consumer in tensor.consumers:
        if isinstance(consumer.layer, keras.layers.Embedding):
            high = int(consumer.layer.input_dim)
    return high


def describe_generated_inputs(graph: graph_lib.Graph, count: int) -> str:
    """How :func:`make_sample_inputs` makes ``count`` samples, and why, in one line."""
    domains = _input_domains(graph)
    parts = []
    for tensor, name in zip(graph.inputs, graph.input_names, strict=True):
        kind = np.dtype(tensor.dtype).kind
        if name in domains:
            domain, why, _ = domains[name]
            parts.append(f"{name}: {domain} ({why})")
        elif kind in "iu":
            embedding = any(isinstance(c.layer, keras.layers.Embedding) for c in tensor.consumers)
            why = "the Embedding's vocabulary" if embedding else "no Embedding gives a range"
            high = _integer_high(tensor)
            parts.append(f"{name}: integers 0..{high - 1} ({why})")
        else:
            parts.append(f"{name}: fair coin flips")
    where = "; ".join(parts)
    return (
        f"generated, {count} sample(s): {where}; give your own with --inputs FILE.npz (inputs=...)"
    )


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
    """The domain generated values take, per float input name (a ``FLOAT_DOMAINS``
    entry, ``uniform 0..HIGH`` for a Rescaling's range, or ``NORMALIZATION_DOMAIN``)."""
    return {name: domain for name, (domain, _, _) in _input_domains(graph).items()}


def _input_domains(graph: graph_lib.Graph) -> dict[str, tuple[str, str, Any]]:
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
        elif _normalization_statistics(tensor) is not None:
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

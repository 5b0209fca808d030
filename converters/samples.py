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
]

UNKNOWN_DIMENSION_SIZE = 32  # generated inputs use this size for unknown non-batch axes
_IMAGE_SCALE_LIMIT = 0.1  # a leading Rescaling(scale <= this) means pixels in [0, 255]


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
    Applications' ``1/255``, ``1/127.5``) are pixels: uniform in [0, 255]. Other
    float inputs are standard normal. Integer inputs feeding an Embedding are
    uniform in ``[0, input_dim)``, other integer inputs in ``[0, 10)``; boolean
    inputs are fair coin flips. Unknown non-batch dimensions get size
    ``UNKNOWN_DIMENSION_SIZE`` (32).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserInputError(f"batch_size must be a positive integer; received {batch_size!r}.")
    return sample_arrays(graph_lib.flatten(model), batch_size, seed)


def sample_arrays(
    graph: graph_lib.Graph, batch_size: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """:func:`make_sample_inputs` for a flattened graph."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for tensor, name in zip(graph.inputs, graph.input_names, strict=True):
        shape = (batch_size,) + tuple(
            UNKNOWN_DIMENSION_SIZE if size is None else size for size in tensor.shape[1:]
        )
        dtype = np.dtype(tensor.dtype)
        if dtype.kind == "f":
            array: np.ndarray
            if _is_pixel_input(tensor):
                array = rng.uniform(0.0, 255.0, size=shape)
            else:
                array = rng.standard_normal(size=shape)
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

"""Finding the BatchNormalization layers of a model and reading/writing their variables.

Shared by the training utilities (recalibration, monitor, replacement, PyTorch
interop). Every BatchNormalization layer is found by
``isinstance(layer, keras.layers.BatchNormalization)``, so the stock layer, ours
and other subclasses are all handled, inside nested models and custom layers too.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_bn._keras_internals import flatten_layers

# Options of keras_bn.BatchNormalization, read with getattr so that these utilities
# work on the stock layer (which has neither) and on other subclasses alike.
_UNBIASED_ATTRIBUTE = "unbiased_moving_variance"
_COUNT_VARIABLE = "num_batches_tracked"  # exists with momentum=None


def batch_norm_layers(model) -> list:
    """Every BatchNormalization layer inside ``model`` (nested ones too), once each.

    Includes the layers of nested models and of custom layers that hold
    sublayers (Keras's own recursive walk over tracked layers).
    """
    return [
        layer
        for layer in flatten_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def unique_names(layers) -> list[str]:
    """Layer names, with ``_1``, ``_2``... appended to repeats (nested models may reuse names)."""
    names: list[str] = []
    seen: dict[str, int] = {}
    for layer in layers:
        name = layer.name
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name] - 1}")
    return names


def is_unbiased(layer) -> bool:
    """Whether the layer keeps the unbiased moving variance (our option; False for stock)."""
    return bool(getattr(layer, _UNBIASED_ATTRIBUTE, False))


def count_variable(layer):
    """Our layer's batch-count variable (``momentum=None``), or None."""
    variable = getattr(layer, _COUNT_VARIABLE, None)
    return variable if isinstance(variable, keras.Variable) else None


def snapshot_variables(variables) -> list:
    """``(variable, a copy of its value)`` for each of ``variables``: what
    :func:`restore_variables` writes back."""
    return [(variable, to_numpy(variable).copy()) for variable in variables]


def restore_variables(snapshot) -> None:
    """Writes each value of a :func:`snapshot_variables` back into its variable."""
    for variable, value in snapshot:
        variable.assign(value)


def to_numpy(value) -> np.ndarray:
    """A Keras/backend tensor, NumPy array or torch tensor as a NumPy array."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
        return np.asarray(value.detach().cpu().numpy())
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, keras.Variable):
        return np.asarray(value.numpy())  # convert_to_numpy(variable) warns on TF
    return np.asarray(keras.ops.convert_to_numpy(value))


def assign(variable, value) -> None:
    """Writes ``value`` into ``variable``, cast to its dtype and reshaped to its shape."""
    variable.assign(np.asarray(value).astype(variable.dtype).reshape(variable.shape))


def sync_moving_stddev(layer, variance) -> None:
    """Sets a renorm layer's ``moving_stddev`` to ``sqrt(variance + epsilon)``.

    The renorm path tracks the moving standard deviation beside the moving
    variance; whoever writes the variance keeps the two consistent. No-op for a
    layer without renorm.
    """
    if getattr(layer, "renorm", False) and getattr(layer, "moving_stddev", None) is not None:
        assign(layer.moving_stddev, np.sqrt(variance + layer.epsilon))

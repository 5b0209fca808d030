"""PyTorch BatchNorm interoperability: hyperparameters and ``state_dict`` loading.

Torch is never imported: tensors are read with ``.detach().cpu().numpy()``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import keras
import numpy as np

from keras_bn._batch_norm_state import assign, count_variable, sync_moving_stddev, to_numpy

__all__ = ["load_torch_batch_norm", "torch_batch_norm_kwargs"]


def torch_batch_norm_kwargs(
    momentum=0.1, eps=1e-5, affine=True, track_running_stats=True, *, channels_first=True
):
    """Keras BatchNormalization arguments equivalent to a PyTorch BatchNorm's.

    The correspondence (PyTorch -> Keras):

    ============================  =====================================
    ``momentum=m`` (default 0.1)  ``momentum=1 - m`` (default 0.9)
    ``momentum=None``             ``momentum=None`` (our layer only:
                                  cumulative moving average)
    ``eps`` (default 1e-5)        ``epsilon`` (Keras default is 1e-3)
    ``affine=False``              ``center=False, scale=False``
    channel dimension 1           ``axis=1``, or ``-1`` once the model is
                                  channels-last
    ============================  =====================================

    PyTorch updates ``running = (1 - m) * running + m * batch_stat``; Keras
    updates ``moving = momentum * moving + (1 - momentum) * batch_stat``. PyTorch
    keeps the *unbiased* running variance (Bessel's correction on each batch)
    while the stock Keras layer keeps the biased one; our layer's
    ``unbiased_moving_variance=True`` (returned here) matches PyTorch. Both normalize with the
    running variance directly at inference, so loaded statistics give the same
    inference outputs either way (see :func:`load_torch_batch_norm`).

    Args:
        momentum: PyTorch ``momentum`` (float in [0, 1] or None).
        eps: PyTorch ``eps``.
        affine: PyTorch ``affine``.
        track_running_stats: PyTorch ``track_running_stats``; must be True (a
            PyTorch BN without running statistics normalizes with batch statistics
            even in eval mode, which Keras cannot express).
        channels_first: whether the Keras model keeps PyTorch's channels-first
            layout (``axis=1``) or is channels-last (``axis=-1``).

    Returns:
        A dict of keyword arguments for ``keras_bn.BatchNormalization`` (drop
        ``unbiased_moving_variance`` for the stock layer, which cannot take
        ``momentum=None`` either).
    """
    if not track_running_stats:
        raise ValueError(
            "A PyTorch BatchNorm with track_running_stats=False uses batch statistics "
            "at inference too, which a Keras BatchNormalization cannot do. Received: "
            "track_running_stats=False. Train it with running statistics instead."
        )
    if momentum is not None and not (0.0 <= float(momentum) <= 1.0):
        raise ValueError(
            "Invalid PyTorch momentum: expected a float in [0, 1] or None. Received: "
            f"momentum={momentum!r}"
        )
    if not float(eps) > 0:
        raise ValueError(f"Invalid PyTorch eps: expected a float > 0. Received: eps={eps!r}")
    kwargs = {
        "axis": 1 if channels_first else -1,
        "momentum": None if momentum is None else 1.0 - float(momentum),
        "epsilon": float(eps),
        "center": bool(affine),
        "scale": bool(affine),
        "unbiased_moving_variance": True,
    }
    return kwargs


def load_torch_batch_norm(layer, state_dict, *, prefix="", eps=None):
    """Loads a PyTorch BatchNorm state into a built Keras BatchNormalization layer.

    Reads ``{prefix}weight``, ``{prefix}bias`` (absent for ``affine=False``),
    ``{prefix}running_mean``, ``{prefix}running_var`` and, optionally,
    ``{prefix}num_batches_tracked`` from ``state_dict`` (a mapping of NumPy arrays
    or torch tensors; other keys are ignored, so a whole model's ``state_dict()``
    with ``prefix="layer1.0.bn1."`` works). Torch is never imported: tensors are
    read with ``.detach().cpu().numpy()``.

    Mapping: ``gamma = weight``, ``beta = bias``, ``moving_mean = running_mean``,
    ``moving_variance = running_var``. PyTorch's eval mode computes
    ``(x - running_mean) / sqrt(running_var + eps) * weight + bias`` with the
    running variance as stored (unbiased), and Keras's inference mode computes the
    same with ``moving_variance``; so the running variance is loaded unchanged into
    both the stock layer and ours, whatever ``unbiased_moving_variance`` says, and
    the layer's inference output equals PyTorch's eval output provided
    ``layer.epsilon`` equals the PyTorch ``eps`` (pass ``eps=`` to have that
    checked). With ``unbiased_moving_variance=True`` (see
    :func:`torch_batch_norm_kwargs`), further training also updates the moving
    variance as PyTorch would. ``affine=False`` states load into a layer
    with ``center=False, scale=False``, or into one with gamma/beta, which are then
    set to 1/0. ``num_batches_tracked`` is loaded into our layer's batch count when
    it has one (``momentum=None``: PyTorch's cumulative average uses that count).

    Args:
        layer: a built ``keras.layers.BatchNormalization`` (ours or stock) whose
            moving statistics have the PyTorch channel count.
        state_dict: mapping of names to NumPy arrays or torch tensors.
        prefix: prefix of the keys, e.g. ``"bn1."``.
        eps: the PyTorch layer's ``eps``; if given, must equal ``layer.epsilon``.

    Returns:
        The layer.

    Example:

    >>> layer = keras_bn.BatchNormalization(**torch_batch_norm_kwargs(eps=1e-5))
    >>> layer.build((None, 16, 8, 8))  # doctest: +SKIP
    >>> load_torch_batch_norm(layer, torch_bn.state_dict())  # doctest: +SKIP
    """
    _check_arguments(layer, state_dict, prefix, eps)

    def read(key):
        return _read_channels(layer, state_dict, prefix + key)

    running_mean, running_var = read("running_mean"), read("running_var")
    if np.any(running_var < 0) or not np.all(np.isfinite(running_var)):
        raise ValueError(
            f"load_torch_batch_norm: {prefix}running_var has negative or non-finite "
            "values; expected finite values >= 0. Check the checkpoint."
        )
    values = _affine_values(layer, state_dict, prefix, read)
    for keras_name, value in values.items():
        assign(getattr(layer, keras_name), value)
    assign(layer.moving_mean, running_mean)
    assign(layer.moving_variance, running_var)
    sync_moving_stddev(layer, running_var)
    count = count_variable(layer)
    if count is not None and prefix + "num_batches_tracked" in state_dict:
        assign(count, to_numpy(state_dict[prefix + "num_batches_tracked"]))
    return layer


def _check_arguments(layer, state_dict, prefix, eps) -> None:
    """load_torch_batch_norm's argument checks, each a ValueError naming the fix."""
    if not isinstance(layer, keras.layers.BatchNormalization):
        raise ValueError(
            "load_torch_batch_norm expects a keras.layers.BatchNormalization layer. "
            f"Received: layer of type {type(layer).__name__}"
        )
    if layer.moving_mean is None:
        raise ValueError(
            f"load_torch_batch_norm needs a built layer; {layer.name!r} has no weights "
            "yet. Call layer.build(input_shape) first, e.g. layer.build((None, C, H, W))."
        )
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            "load_torch_batch_norm expects a mapping of names to arrays/tensors (a "
            f"PyTorch state_dict). Received: {type(state_dict).__name__}"
        )
    if eps is not None and not math.isclose(float(eps), layer.epsilon, rel_tol=1e-6):
        raise ValueError(
            f"The PyTorch eps ({eps!r}) differs from the epsilon of layer {layer.name!r} "
            f"({layer.epsilon!r}), so inference outputs would differ. Create the layer "
            f"with epsilon={eps!r}."
        )
    missing = [
        f"{prefix}{key}"
        for key in ("running_mean", "running_var")
        if prefix + key not in state_dict
    ]
    if missing:
        available = sorted(key for key in state_dict if str(key).startswith(prefix))[:8]
        raise ValueError(
            f"load_torch_batch_norm: missing {missing} in the state dict. Keys with "
            f"prefix {prefix!r}: {available}. Pass the right prefix= (a PyTorch "
            "BatchNorm created with track_running_stats=False has no running statistics "
            "and cannot be loaded)."
        )


def _read_channels(layer, state_dict, key) -> np.ndarray:
    """``state_dict[key]`` in float64, shaped like the layer's moving_mean."""
    shape = tuple(layer.moving_mean.shape)
    size = int(np.prod(shape))
    value = to_numpy(state_dict[key]).astype(np.float64)
    if value.size != size or value.ndim != 1 and value.shape != shape:
        raise ValueError(
            f"load_torch_batch_norm: {key} has shape {value.shape}; layer "
            f"{layer.name!r} expects {size} channels (moving_mean shape {shape}). "
            "Check the layer's axis and the state dict prefix."
        )
    return value.reshape(shape)


def _affine_values(layer, state_dict, prefix, read) -> dict:
    """gamma/beta to write from weight/bias (1/0 for ``affine=False``), by variable name.

    A layer without gamma (beta) takes none, which is an error unless the state's
    weight (bias) is the identity.
    """
    shape = tuple(layer.moving_mean.shape)
    affine = {"gamma": "weight", "beta": "bias"}
    identity = {"gamma": 1.0, "beta": 0.0}
    values = {}
    for keras_name, torch_name in affine.items():
        present = prefix + torch_name in state_dict
        value = read(torch_name) if present else np.full(shape, identity[keras_name])
        variable = getattr(layer, keras_name, None)
        if variable is None:
            if present and not np.all(value == identity[keras_name]):
                option = "scale" if keras_name == "gamma" else "center"
                raise ValueError(
                    f"load_torch_batch_norm: {prefix + torch_name} is not the identity "
                    f"but layer {layer.name!r} has {option}=False. Create the layer with "
                    f"{option}=True."
                )
            continue
        values[keras_name] = value
    return values

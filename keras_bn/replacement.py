"""Cloning a model with every BatchNormalization layer replaced by ours, weights kept."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from keras_bn import _keras_internals as internals
from keras_bn._batch_norm_state import assign, batch_norm_layers, to_numpy
from keras_bn._keras_internals import is_sequential_or_functional
from keras_bn.layers import BatchNormalization

__all__ = ["replace_batch_norm"]


def replace_batch_norm(model, **layer_kwargs):
    """Clones a model with every BatchNormalization layer as ours, weights kept.

    Returns a copy of a Sequential or Functional ``model`` (nested Sequential and
    Functional models included, shared layers stay shared) in which every stock
    ``keras.layers.BatchNormalization`` - and every ``keras_bn.BatchNormalization``,
    so that options can be changed - is a ``keras_bn.BatchNormalization`` built
    from the same config updated with ``layer_kwargs``, holding the same gamma,
    beta and moving statistics. Every other layer is a fresh copy of the original
    (same config, same weights, same ``trainable`` flag). The original model is not
    modified and shares no variable with the copy. Other BN subclasses are copied
    unchanged. The copy is not compiled.

    Without overrides the copy's inference outputs equal the original's. Options
    that our layer adds start from their initial state: with ``momentum=None`` the
    batch count starts at 0 (the first training batch then replaces the moving
    statistics); enabling ``renorm`` initializes its moving standard deviations from
    the moving variance.

    Args:
        model: a Sequential or Functional Keras model.
        **layer_kwargs: arguments of ``keras_bn.BatchNormalization`` overriding the
            copied configs, e.g. ``momentum=None`` or ``epsilon=1e-5``.

    Returns:
        The new model.

    Example:

    >>> ours = replace_batch_norm(model, momentum=None)  # doctest: +SKIP
    """
    if "name" in layer_kwargs:
        raise ValueError(
            "replace_batch_norm keeps each layer's name; it cannot be overridden for "
            f"every layer at once. Received: name={layer_kwargs['name']!r}"
        )
    if not is_sequential_or_functional(model):
        raise ValueError(
            "replace_batch_norm supports Sequential and Functional models. Received: "
            f"a model of type {type(model).__name__}. For a subclassed model, build its "
            "layers with keras_bn.BatchNormalization instead."
        )
    BatchNormalization(**layer_kwargs)  # reject bad overrides before cloning
    cache: dict[int, Any] = {}
    pairs: list[tuple[Any, Any]] = []

    def clone_function(layer):
        if id(layer) in cache:
            return cache[id(layer)]
        if isinstance(layer, keras.Model) and is_sequential_or_functional(layer):
            new = keras.models.clone_model(layer, clone_function=clone_function)
        elif isinstance(layer, keras.Model) and batch_norm_layers(layer):
            raise ValueError(
                "replace_batch_norm cannot look inside the nested subclassed model "
                f"{layer.name!r} ({type(layer).__name__}), which contains "
                "BatchNormalization layers. Rebuild it with keras_bn.BatchNormalization."
            )
        elif type(layer) is keras.layers.BatchNormalization or type(layer) is BatchNormalization:
            config = {**layer.get_config(), **layer_kwargs}
            new = BatchNormalization.from_config(config)
        else:
            new = layer.__class__.from_config(layer.get_config())
        cache[id(layer)] = new
        pairs.append((layer, new))
        return new

    with internals.tensorflow_probe_deferred():  # get_config: no TensorFlow import on JAX
        new_model = keras.models.clone_model(model, clone_function=clone_function)
    cache[id(model)] = new_model
    for old, new in pairs:
        if isinstance(old, keras.Layer) and not isinstance(old, keras.Model):
            _copy_weights(old, new)
    _copy_trainable(model, new_model, cache)
    return new_model


def _copy_weights(old, new) -> None:
    """Copies the values of ``old``'s weights into ``new``'s, by position.

    Values go through a NumPy copy (``assign`` casts, which copies), never
    ``target.assign(source)``: on JAX that makes both variables hold the same
    array, which the copy's compiled ``fit``/``predict`` then donates, deleting
    the original model's weights.
    """
    if not old.weights:
        return
    if isinstance(old, keras.layers.BatchNormalization):
        _copy_batch_norm_weights(old, new)
        return
    if len(old.weights) != len(new.weights):
        raise ValueError(
            f"replace_batch_norm could not copy the weights of layer {old.name!r}: the "
            f"copy has {len(new.weights)} weights, the original {len(old.weights)}."
        )
    for source, target in zip(old.weights, new.weights, strict=True):
        assign(target, to_numpy(source))


def _copy_batch_norm_weights(old, new) -> None:
    """Copies BN weights by name; fails if a non-identity weight would be dropped."""
    old_weights = {variable.name: variable for variable in old.weights}
    new_weights = {variable.name: variable for variable in new.weights}
    for name, variable in old_weights.items():
        if name in new_weights:
            assign(new_weights[name], to_numpy(variable))
            continue
        value = to_numpy(variable)
        identity = {"gamma": 1.0, "beta": 0.0}.get(name)
        if identity is None or not np.all(value == identity):
            raise ValueError(
                f"replace_batch_norm would drop the weight {name!r} of layer "
                f"{old.name!r}, whose values are not the identity. Keep "
                "center=True/scale=True (or fold that weight elsewhere first)."
            )
    if getattr(new, "renorm", False) and not getattr(old, "renorm", False):
        stddev = np.sqrt(to_numpy(old.moving_variance) + new.epsilon)
        assign(new.moving_stddev, stddev)
        assign(new.renorm_mean, to_numpy(old.moving_mean))
        assign(new.renorm_stddev, stddev)


def _copy_trainable(old, new, cache) -> None:
    """Sets ``trainable`` like the original's, outer models first (it propagates)."""
    new.trainable = old.trainable
    if isinstance(old, keras.Model):
        for layer in old.layers:
            if id(layer) in cache:
                _copy_trainable(layer, cache[id(layer)], cache)

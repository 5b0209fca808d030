"""What makes the JAX reruns cheap without changing what they prove.

Eager JAX compiles every operation for every new shape and dtype it meets. Two places
pay this for nothing the tests check:

- :func:`use_numpy_initializers`: building a model draws every weight with
  ``jax.random`` (several compiled operations per weight shape, twice more for a float64
  rebuild), ~10 s for a small KerasHub model on 2 cores. The tests overwrite or
  randomize the weights anyway and only need them random and reproducible: drawn by
  NumPy from the key Keras's seed generator gives (so ``keras.utils.set_random_seed``
  still fixes them), with the same distributions.
- :func:`keras_outputs`: a Keras model called eagerly compiles each of its operations;
  ``jax.jit`` of its stateless call compiles the pass whole, several times faster, as
  keras-bn's own validation and ``model.predict`` run it. Same model, same weights;
  a model whose Python ``call`` jit cannot trace runs eagerly.

Both are no-ops on other backends.
"""

from __future__ import annotations

import keras
import numpy as np


def use_numpy_initializers() -> None:
    """On JAX: Keras's normal, uniform and truncated-normal draws (the random
    initializers) come from NumPy, seeded by the key JAX would have used."""
    if keras.backend.backend() != "jax":
        return
    import jax.numpy as jnp
    from keras.src.backend.jax import random

    originals = random.normal, random.uniform, random.truncated_normal

    def draw(original, shape, seed, *arguments):
        """(NumPy generator, None) from the key JAX would draw with; inside a trace
        (a layer built while a model is traced) (None, JAX's own draw)."""
        key = random.jax_draw_seed(seed)  # drawn once: a seed generator advances
        try:
            return np.random.default_rng(np.asarray(key).astype(np.uint64).tolist()), None
        except Exception:  # a tracer
            return None, original(shape, *arguments, seed=key)

    def dtype_of(dtype):
        return keras.backend.standardize_dtype(dtype or keras.config.floatx())

    def normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
        rng, traced = draw(originals[0], shape, seed, mean, stddev, dtype)
        if rng is None:
            return traced
        values = rng.standard_normal(shape) * stddev + mean
        return jnp.asarray(values.astype(dtype_of(dtype)))

    def uniform(shape, minval=0.0, maxval=1.0, dtype=None, seed=None):
        rng, traced = draw(originals[1], shape, seed, minval, maxval, dtype)
        if rng is None:
            return traced
        values = rng.uniform(minval, maxval, shape)
        return jnp.asarray(values.astype(dtype_of(dtype)))

    def truncated_normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
        rng, traced = draw(originals[2], shape, seed, mean, stddev, dtype)
        if rng is None:
            return traced
        values = rng.standard_normal(shape)
        outside = np.abs(values) > 2.0  # jax.random.truncated_normal's bounds: [-2, 2]
        while outside.any():
            values[outside] = rng.standard_normal(int(outside.sum()))
            outside = np.abs(values) > 2.0
        return jnp.asarray((values * stddev + mean).astype(dtype_of(dtype)))

    random.normal, random.uniform, random.truncated_normal = normal, uniform, truncated_normal


def keras_outputs(model, structure) -> list[np.ndarray]:
    """``model(structure, training=False)``, flattened, as NumPy arrays; on JAX the
    pass compiled whole (in the caller's dtype context: float64 under x64)."""
    outputs = None
    if keras.backend.backend() == "jax":
        import jax

        def call(trainable, non_trainable, inputs):
            return model.stateless_call(trainable, non_trainable, inputs, training=False)[0]

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        try:
            outputs = jax.jit(call)(trainable, non_trainable, structure)
        except Exception:  # Python in a layer's call that jax.jit cannot trace
            outputs = None
    if outputs is None:
        outputs = model(structure, training=False)
    return [np.asarray(keras.ops.convert_to_numpy(y)) for y in keras.tree.flatten(outputs)]

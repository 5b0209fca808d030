"""The exact answer to compare against: a float64 twin of a Keras model.

Keras's own float32 output is not the truth: a deep network in float32 drifts from
the exact result by float32 rounding, and an exported model drifts differently
(other summation order, folded weights rounded once). Judging the export by its
distance to Keras float32 therefore rejects exact exports (the gap is the sum of two
roundings) and cannot tell a small real bug from noise. The float64 twin is the same
model - same layers, same weights, every floating layer computing in float64 - whose
output is exact to float32's resolution. Validation measures both the exported model
and Keras float32 against it and compares the two errors.

Layers that cannot compute in float64 on the current backend (TensorFlow's CPU
kernels have no float64 3-D pooling, for example) stay in float32 in the twin; the
twin names them, and a reference with float32 layers in it is reported as such.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np

from keras_bn import _keras_internals as internals
from keras_bn.converters.comparison import (
    EXACT_FACTOR,
    EXACT_FLOOR,
    OutputComparison,
    judge_against_exact,
)

__all__ = [
    "Doubtful",
    "Float64Twin",
    "float64_enabled",
    "float64_twin",
    "rejudge_against_float64",
]

# Keras wraps an error inside a layer's call as "... when calling Conv3D.call() ...".
_FAILED_CALL = re.compile(r"calling (\w+)\.call\(\)")
_MAX_RETRIES = 8


@dataclasses.dataclass
class Float64Twin:
    """A float64 copy of a model, and the layer classes that had to stay float32."""

    model: keras.Model
    float32_classes: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        """Whether every floating layer computes in float64."""
        return not self.float32_classes

    def __call__(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Outputs (flattened, float64) for ``inputs`` (one array per model input)."""
        feed = [_as_float64(array) for array in inputs]
        with float64_enabled():
            outputs = self.model(feed if len(feed) > 1 else feed[0], training=False)
            return [
                np.asarray(keras.ops.convert_to_numpy(y), np.float64)
                for y in keras.tree.flatten(outputs)
            ]


@contextlib.contextmanager
def float64_enabled() -> Iterator[None]:
    """Let the backend compute in float64 for the duration of the block.

    JAX silently computes float64 arrays in float32 unless its x64 mode is on, and
    Keras's type promotion turns float64 into float32 on every backend but TensorFlow
    (a float64 "twin" would then be a float32 copy).
    The twin is built and run inside this block, so the rest of the process keeps
    JAX's default 32-bit types.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(internals.float64_type_promotion())
        if backend == "jax":
            import jax

            enable_x64 = getattr(jax, "enable_x64", None)
            if enable_x64 is None:  # jax < 0.7
                from jax.experimental import enable_x64
            stack.enter_context(enable_x64(True))
        yield


def float64_twin(model: keras.Model, sample_inputs: list[np.ndarray]) -> Float64Twin:
    """Build the float64 twin of a Sequential/Functional ``model`` and check it runs.

    ``sample_inputs`` (one array per model input) are used to run the twin once; a
    layer class whose call fails in float64 is moved back to float32 and the twin is
    rebuilt, at most a few times. ``model`` is not modified.

    Raises:
        RuntimeError: the twin does not run even with the failing layers in float32.
    """
    float32_classes: list[str] = []
    for _ in range(_MAX_RETRIES):
        twin = Float64Twin(_clone_float64(model, float32_classes), tuple(float32_classes))
        try:
            twin(sample_inputs)
            return twin
        except Exception as error:  # a backend kernel missing for float64
            match = _FAILED_CALL.search(str(error))
            if match is None or match.group(1) in float32_classes:
                raise RuntimeError(
                    f"The float64 copy of model {model.name!r} does not run on the "
                    f"{keras.backend.backend()} backend ({type(error).__name__})."
                ) from error
            float32_classes.append(match.group(1))
    raise RuntimeError(f"The float64 copy of model {model.name!r} does not run.")


def _is_floating(dtype: Any) -> bool:
    return dtype is not None and "float" in str(dtype)


def _as_float64(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    return array.astype(np.float64) if _is_floating(array.dtype) else array


def _clone_float64(model: keras.Model, float32_classes: list[str]) -> keras.Model:
    with float64_enabled(), internals.random_initializers_skipped():  # weights copied below
        return _clone_float64_enabled(model, float32_classes)


def _clone_float64_enabled(model: keras.Model, float32_classes: list[str]) -> keras.Model:
    pairs: list[tuple[Any, Any]] = []  # (original layer, its float64 copy)

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        if (
            "dtype" in config
            and _is_floating(getattr(layer, "compute_dtype", None))
            and type(layer).__name__ not in float32_classes
        ):
            config = {**config, "dtype": "float64"}
        copy = type(layer).from_config(config)
        pairs.append((layer, copy))
        return copy

    inputs = [
        keras.Input(
            batch_shape=tensor.shape,
            dtype="float64" if _is_floating(tensor.dtype) else tensor.dtype,
            name=getattr(tensor, "name", None),
        )
        for tensor in model.inputs
    ]
    twin = keras.models.clone_model(
        model,
        input_tensors=inputs if len(inputs) > 1 else inputs[0],
        clone_function=clone,
        recursive=True,
    )
    for original, copy in pairs:
        # keras.ops operations (a Masking layer's mask comparison) are cloned too: no weights.
        weights = zip(getattr(original, "weights", ()), getattr(copy, "weights", ()), strict=True)
        for source, target in weights:
            value = np.asarray(keras.ops.convert_to_numpy(source))
            target.assign(value.astype(np.float64) if _is_floating(target.dtype) else value)
    return twin


@dataclasses.dataclass
class Doubtful:
    """A comparison the elementwise check did not pass outright, to judge against float64."""

    index: int  # in the comparisons
    output: int  # which model output
    actual: np.ndarray  # the candidate's (onnxruntime's, or the folded model's)
    expected: np.ndarray  # Keras float32's
    samples: int  # the first `samples` samples, or...
    chunk: np.ndarray | None  # ...exactly these (outputs that are not batch-major)


def rejudge_against_float64(
    model: keras.Model,
    inputs: list[np.ndarray],
    comparisons: list[OutputComparison],
    doubtful: list[Doubtful],
) -> str:
    """Re-judge the ``doubtful`` comparisons (in place) against a float64 run of ``model``
    on ``inputs`` (one array per model input, every sample the comparisons cover).

    Returns a note for the report: how the reference was made, or why it could not be
    (then the elementwise verdicts stand).
    """
    full = inputs
    try:
        twin = float64_twin(model, full)
        exact_full = twin(full)
    except Exception as error:  # a layer that cannot be cloned or run in float64
        return (
            f"elementwise verdict: the float64 copy of the model could not be made or run "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''})"
        )
    for item in doubtful:
        if item.chunk is None:
            exact = exact_full[item.output][: item.samples]
        else:
            exact = twin([array[item.chunk] for array in full])[item.output]
        comparisons[item.index] = judge_against_exact(
            comparisons[item.index], item.actual, item.expected, exact
        )
    where = (
        "every layer in float64"
        if twin.exact
        else "float64 except " + ", ".join(twin.float32_classes) + " (no float64 kernel)"
    )
    return (
        f"judged against the same model run in float64 ({where}): pass when the error is "
        f"at most {EXACT_FACTOR:g}x Keras float32's own error plus {EXACT_FLOOR:g} of the "
        "output's range"
    )

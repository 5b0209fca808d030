"""Tracing a layer's ``call()`` into a Functional graph of layers and ``keras.ops``.

A layer the exporter has no rule for (a subclassed block, a KerasHub layer, a
Lambda) is not refused: :func:`trace_call` runs its ``call()`` on symbolic
tensors (``keras.Input`` placeholders with the static shapes the outer graph
knows). Every ``keras.ops`` function called on a symbolic tensor records an
operation node, and every nested layer records its own call, exactly as in a
Functional model; the recorded calls between the placeholders and the outputs
become a small Functional model, which :func:`keras_bn.converters.graph.flatten`
inlines in the scope of the layer's name (``block_1/bn``), tracing nested layers
without a rule in turn. Folding and export then see through the block.

Tracing runs Keras's own symbolic machinery, so it works the same on every
backend. What cannot be recorded - Python control flow on tensor values
(``if ops.any(x > 0):``), backend-specific code (``tf.*``, ``jax.*``) inside
``call()``, arithmetic on an unknown batch size - stops the trace with a
:class:`TraceError` naming the layer, the error and the source line. A few known
functions that hold backend code or that one ONNX operator computes better
(:data:`RECORDED_FUNCTIONS`: KerasHub DepthAnything's resize, D-FINE's bilinear
grid sampling) are recorded as one operation each instead of entered.
:func:`trace_function` records a plain function the same way (the function that
``keras.ops.map`` applies to each element).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
from keras import tree

from keras_bn import _keras_internals as internals

__all__ = [
    "BATCH",
    "RECORDED_FUNCTIONS",
    "AlignedResize",
    "Constant",
    "GridSample",
    "TraceError",
    "TracedCall",
    "batch_multiple",
    "trace_call",
    "trace_function",
]

# The batch size placeholders get while tracing. Keras code reads the batch size
# as a Python number (``ops.shape(x)[0]``) to tile class tokens or reshape windows,
# which fails on an unknown (None) size; a concrete but unusual size lets that
# code run, and every size that is a multiple of it is read back as "k x batch"
# (:func:`batch_multiple`): the traced graph's tensors get an unknown batch
# dimension again, and rules turn such sizes in operation attributes into the
# runtime batch size. A prime, so that products of ordinary sizes never hit it.
BATCH = 1009

# Packages whose frames are machinery, not the traced layer's own code.
_MACHINERY = ("keras", "tensorflow", "jax", "jaxlib", "numpy", "optree", "keras_bn")


class TraceError(Exception):
    """A layer's ``call()`` could not be recorded as layers and ``keras.ops``."""


class Constant(keras.Operation):
    """A traced call's output that depends on no input: ``ops.zeros(...)``, a weight.

    KerasHub's DeiT encoder returns ``ops.empty((0, length, dim))`` beside its
    hidden states when asked for no attention scores. In the flattened graph such
    an output is produced by a node of this operation, with no inputs; the
    exporter writes it as an ONNX Constant.
    """

    def __init__(self, value: np.ndarray, name: str | None = None):
        super().__init__(name=name)
        self.value = value

    def call(self) -> Any:
        return keras.ops.convert_to_tensor(self.value)

    def compute_output_spec(self) -> keras.KerasTensor:
        return keras.KerasTensor(self.value.shape, dtype=str(self.value.dtype))


class AlignedResize(keras.Operation):
    """Bilinear resize of a batch of images with aligned corners.

    PyTorch's ``F.interpolate(x, size, mode="bilinear", align_corners=True)``: output
    pixel ``i`` samples the input at ``i * (in - 1) / (out - 1)``. KerasHub's
    DepthAnything resizes so with a function that calls backend code
    (``tf.compat.v1.image.resize(..., align_corners=True)`` on TensorFlow,
    ``jax.image.scale_and_translate`` with the same sampling on JAX), which
    tracing cannot record: inside a trace the function records this operation
    instead (:data:`RECORDED_FUNCTIONS`), which the exporter writes as ONNX Resize
    with ``align_corners`` coordinates. On eager tensors it runs the original.
    """

    def __init__(
        self,
        size: tuple[int, int],
        data_format: str,
        function: Callable[..., Any],
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.size = (int(size[0]), int(size[1]))
        self.data_format = data_format
        self.interpolation = "bilinear"
        self.function = function

    def call(self, images: Any) -> Any:
        return self.function(images, size=self.size, data_format=self.data_format)

    def compute_output_spec(self, images: Any) -> keras.KerasTensor:
        shape = list(images.shape)
        spatial = (1, 2) if self.data_format == "channels_last" else (2, 3)
        for axis, size in zip(spatial, self.size, strict=True):
            shape[axis] = size
        return keras.KerasTensor(tuple(shape), dtype=images.dtype)


def _aligned_resize(function: Callable[..., Any]) -> Callable[..., Any]:
    """KerasHub's ``interpolate(x, size, data_format=None)``, recorded as
    :class:`AlignedResize` on a symbolic tensor."""

    def interpolate(x: Any, size: Any, data_format: str | None = None) -> Any:
        if not _is_symbolic(x):
            return function(x, size, data_format=data_format)
        data_format = data_format or keras.config.image_data_format()
        return AlignedResize(size, data_format, function)(x)

    return interpolate


class GridSample(keras.Operation):
    """Bilinear sampling of ``(N, C, H, W)`` data at ``(N, Ho, Wo, 2)`` grid points.

    PyTorch's ``F.grid_sample(data, grid, mode="bilinear", padding_mode="zeros")``:
    grid ``(x, y)`` in [-1, 1] spans the data's width and height (pixel centres at
    the ends with ``align_corners``, pixel edges without), and the four neighbours
    of each point are weighted bilinearly, those outside the data counting as 0.
    KerasHub's D-FINE (deformable attention) writes it in ``keras.ops``: four
    flattened gathers with batch offsets computed from the batch size, which a trace
    would fix to the tracing batch. Inside a trace its function records this
    operation instead (:data:`RECORDED_FUNCTIONS`), exported as ONNX GridSample. On
    eager tensors it runs the original.
    """

    def __init__(self, align_corners: bool, function: Callable[..., Any], name: str | None = None):
        super().__init__(name=name)
        self.align_corners = bool(align_corners)
        self.function = function

    def call(self, data: Any, grid: Any) -> Any:
        return self.function(data, grid, align_corners=self.align_corners)

    def compute_output_spec(self, data: Any, grid: Any) -> keras.KerasTensor:
        shape = (data.shape[0], data.shape[1], grid.shape[1], grid.shape[2])
        return keras.KerasTensor(shape, dtype=data.dtype)


def _grid_sample(function: Callable[..., Any]) -> Callable[..., Any]:
    """KerasHub D-FINE's ``grid_sample(data, grid, align_corners, height, width)``,
    recorded as :class:`GridSample` on symbolic tensors whose size it reads from the
    data (``height``/``width`` as the data's own, or not given)."""

    def grid_sample(
        data: Any, grid: Any, align_corners: bool = False, height: Any = None, width: Any = None
    ) -> Any:
        sizes_of_data = (height is None or height == data.shape[2]) and (
            width is None or width == data.shape[3]
        )
        if not (_is_symbolic(data) or _is_symbolic(grid)) or not sizes_of_data:
            return function(data, grid, align_corners=align_corners, height=height, width=width)
        return GridSample(align_corners, function)(data, grid)

    return grid_sample


# Functions of other packages that call backend code (``tf.*``, ``jax.*``), or compute
# what one ONNX operator does from sizes a trace would fix, and that a trace records
# as one operation instead of entering them: (module, attribute) ->
# a function that, given the original, returns its stand-in for the trace's duration.
# A module not imported is left alone (its layers cannot be in the model).
RECORDED_FUNCTIONS: dict[tuple[str, str], Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    ("keras_hub.src.models.depth_anything.depth_anything_layers", "interpolate"): _aligned_resize,
    ("keras_hub.src.models.d_fine.d_fine_utils", "grid_sample"): _grid_sample,
}


@contextlib.contextmanager
def _functions_recorded() -> Iterator[None]:
    """Inside the block, the functions of :data:`RECORDED_FUNCTIONS` are replaced."""
    replaced = []
    for (module_name, attribute), stand_in in RECORDED_FUNCTIONS.items():
        module = sys.modules.get(module_name)
        original = getattr(module, attribute, None)
        if original is not None:
            replaced.append((module, attribute, original))
            setattr(module, attribute, stand_in(original))
    try:
        yield
    finally:
        for module, attribute, original in replaced:
            setattr(module, attribute, original)


@dataclasses.dataclass
class TracedCall:
    """A layer call recorded as a Functional model over fresh placeholders.

    ``model``'s inputs are placeholders for ``sources`` (the call's tensor
    arguments, in order). ``outputs`` are the call's outputs, flattened, without
    its None outputs (``return x, None``: Keras records the call with its tensors
    only): each a ``KerasTensor`` of ``model``'s outputs, or a NumPy array for an
    output computed from constants only.
    """

    model: keras.Model | None  # None when no output depends on the inputs
    sources: list[Any]
    outputs: list[keras.KerasTensor | np.ndarray]


def trace_call(layer: Any, args: Any, kwargs: dict, spec: Callable[[Any], Any]) -> TracedCall:
    """Record ``layer.call(*args, **kwargs)`` on symbolic tensors.

    Args:
        layer: the layer (not a model) whose call to record.
        args, kwargs: the call's arguments; every leaf for which ``spec`` returns
            ``(shape, dtype)`` (shape with the batch dimension) is one of the call's
            tensors and is replaced by a placeholder of that shape and dtype; ``spec``
            returns None for the other arguments.

    Returns:
        The recorded call; ``sources`` lists the tensor leaves in the order of the
        placeholders (``tree.flatten`` order of ``(args, kwargs)``).

    Raises:
        TraceError: the call does not trace (the message names the layer, the
            error and the line of the layer's code that raised it).
    """
    call = layer.call
    try:
        signature = dict(inspect.signature(call).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        signature = {}
    parameters = set(signature)
    kwargs = dict(kwargs)
    if "training" in parameters:
        kwargs["training"] = False  # export is inference
    elif not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values()):
        # Keras's __call__ passes training and mask only to a call() that takes them.
        for name in ("training", "mask"):
            if name not in parameters:
                kwargs.pop(name, None)
    return _record(call, f"{type(layer).__name__}.call()", layer.name, args, kwargs, spec)


def trace_function(
    function: Callable[..., Any], args: Any, spec: Callable[[Any], Any], name: str
) -> TracedCall:
    """Record ``function(*args)`` on symbolic tensors, as :func:`trace_call` records a
    layer's call: the function ``keras.ops.map`` applies to each element, traced once
    on placeholders for one element (``spec`` gives their shapes, without the mapped
    axis, which are not batch-sized). ``name`` names the recorded model."""
    what = f"{getattr(function, '__qualname__', type(function).__name__)}()"
    return _record(function, what, name, args, {}, spec)


def _record(
    call: Callable[..., Any], what: str, name: str, args: Any, kwargs: dict, spec: Callable
) -> TracedCall:
    sources: list[Any] = []
    placeholders: list[keras.KerasTensor] = []

    def placeholder(x: Any) -> Any:
        found = spec(x)
        if found is None:
            return x
        shape, dtype = found
        if shape and shape[0] is None:
            shape = (BATCH, *shape[1:])
        sources.append(x)
        placeholders.append(keras.Input(batch_shape=shape, dtype=dtype))
        return placeholders[-1]

    symbolic_args, symbolic_kwargs = tree.map_structure(placeholder, (tuple(args), dict(kwargs)))
    try:
        with (
            internals.symbolic_variable_arithmetic(),
            internals.none_outputs_recorded(),
            internals.static_python_arguments(),
            internals.output_specs_without_call_context(),
            internals.backend_calls_recorded(),
            internals.backend_arrays_defer_to_symbolic(),
            _functions_recorded(),
        ):
            outputs = call(*symbolic_args, **symbolic_kwargs)
    except Exception as error:  # noqa: BLE001 - any failure is the layer's, reported as one
        raise TraceError(_describe(what, error)) from error
    flat = [x for x in tree.flatten(outputs) if x is not None]
    tensors = [x for x in flat if _is_symbolic(x)]
    if not flat:
        raise TraceError(f"tracing {what}: it returned no output")
    try:
        flat = [x if _is_symbolic(x) else _constant_value(x) for x in flat]
    except (TypeError, ValueError) as error:
        raise TraceError(
            f"tracing {what}: an output is neither a tensor nor "
            f"a number ({type(error).__name__}: {_first_line(error)})"
        ) from error
    if not tensors:  # every output computed from weights or constants (a RoPE table)
        return TracedCall(None, sources, flat)
    try:
        model = keras.Model(placeholders, tensors, name=f"{name}_traced")
    except Exception as error:  # noqa: BLE001
        raise TraceError(
            f"tracing {what}: the recorded calls do not form a graph "
            f"({type(error).__name__}: {_first_line(error)})"
        ) from error
    return TracedCall(model, sources, flat)


def _is_symbolic(x: Any) -> bool:
    return isinstance(x, keras.KerasTensor)


def _constant_value(x: Any) -> np.ndarray:
    """An eager output (backend tensor, array, number) as a numeric NumPy array."""
    value = np.asarray(keras.ops.convert_to_numpy(x))
    if value.dtype.kind not in "biuf":
        raise TypeError(f"an output of dtype {value.dtype}")
    return value


def batch_multiple(size: Any) -> int | None:
    """``k`` where a traced size is ``k`` times the batch size, else None."""
    if isinstance(size, int | np.integer) and size > 0 and size % BATCH == 0:
        return int(size) // BATCH
    return None


def tracing(layer: Any) -> Any:
    """A context in which calls recorded on ``layer``'s sublayers are undone at exit."""
    return internals.keeping_layer_nodes(layer)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= 240 else line[:237] + "..."


def _machinery_directories() -> list[str]:
    directories = []
    for name in _MACHINERY:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            directories.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    return directories


def _describe(what: str, error: BaseException) -> str:
    """``tracing Class.call() failed at file:line `source`: Error: message``."""
    machinery = _machinery_directories()
    where = ""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = os.path.abspath(frame.filename)
        if not any(path.startswith(directory) for directory in machinery):
            source = f" `{frame.line.strip()}`" if frame.line else ""
            where = f" at {os.path.basename(frame.filename)}:{frame.lineno}{source}"
            break
    return (
        f"tracing {what} failed{where}: "
        f"{type(error).__name__}: {_first_line(error)}; expected keras.ops and Keras "
        "layers only, with no Python control flow on tensor values and no "
        "backend-specific (tf.*, jax.*) code"
    )

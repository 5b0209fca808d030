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

Unknown non-batch sizes (an image of any height and width, a number of prompt
points) are traced like the batch size: each gets a concrete marker size
(:data:`UNKNOWN_SIZES`), so that code reading it (``ops.shape(x)[1] * 2``,
``ops.reshape(y, ops.shape(x))``) runs. The call is traced twice, with two sets
of markers, and the two recordings are compared: a tensor size that differs is
unknown in the traced graph, and a size in an operation's attributes or
arguments that differs must be the same product of the same unknown sizes in
both (:class:`Size`), which rules compute at runtime from the input's shape; any
other dependence (a strided convolution's output size read back into a reshape,
a constant whose length is an unknown size) stops the trace. Where one marker per
size fails (two inputs whose sizes must be equal, SAM's points and labels), the
markers are shared per axis, and each size is read from the operation's own input
or the one input it depends on. Keras's input checks see markers as unknown; an
``ops.cond`` on a predicate known while tracing runs its branch (one computed from
markers is taken as they select it); ``tensor == number`` records ``ops.equal``.
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
    "UNKNOWN_SIZES",
    "AlignedResize",
    "AnchoredConstant",
    "Constant",
    "GridSample",
    "Range",
    "Size",
    "TraceError",
    "TracedCall",
    "batch_multiple",
    "trace_call",
    "trace_function",
    "traced_size",
]

# The batch size placeholders get while tracing. Keras code reads the batch size
# as a Python number (``ops.shape(x)[0]``) to tile class tokens or reshape windows,
# which fails on an unknown (None) size; a concrete but unusual size lets that
# code run, and every size that is a multiple of it is read back as "k x batch"
# (:func:`batch_multiple`): the traced graph's tensors get an unknown batch
# dimension again, and rules turn such sizes in operation attributes into the
# runtime batch size. A prime, so that products of ordinary sizes never hit it.
BATCH = 1009


def _primes_after(start: int, count: int) -> tuple[int, ...]:
    primes: list[int] = []
    candidate = start
    while len(primes) < count:
        candidate += 1
        if all(candidate % divisor for divisor in range(2, int(candidate**0.5) + 1)):
            primes.append(candidate)
    return tuple(primes)


# The marker sizes of unknown non-batch dimensions in the two recordings of a call
# (see the module docstring): distinct primes above BATCH, so that a size that is a
# product of unknown sizes factors back into them. Small enough that an attention
# score tensor over two of them stays within int64 while Keras infers shapes.
_MAX_UNKNOWN_SIZES = 16
UNKNOWN_SIZES: tuple[tuple[int, ...], tuple[int, ...]] = (
    _primes_after(BATCH, _MAX_UNKNOWN_SIZES),
    _primes_after(BATCH, 2 * _MAX_UNKNOWN_SIZES)[_MAX_UNKNOWN_SIZES:],
)

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


def _static_cond(function: Callable[..., Any]) -> Callable[..., Any]:
    """``ops.cond(pred, true_fn, false_fn)`` with a predicate known while tracing (one
    computed from sizes): the branch it selects, called directly, as TensorFlow's
    eager ``tf.cond`` does (JAX's ``lax.cond`` would trace both on symbolic tensors)."""

    def cond(pred: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
        if _is_symbolic(pred):
            return function(pred, true_fn, false_fn)
        return true_fn() if bool(keras.ops.convert_to_numpy(pred)) else false_fn()

    return cond


def _batched_gather(function: Callable[..., Any]) -> Callable[..., Any]:
    """TensorFlow's ``tf.gather(params, indices, batch_dims=k)`` on symbolic tensors
    where every axis but the last is a batch axis: ``ops.take_along_axis`` on the
    last axis, what KerasHub's DeBERTa-v3 calls on the TensorFlow backend (its other
    backends call ``take_along_axis``). Any other call runs the original."""

    def gather(params: Any, indices: Any, *args: Any, batch_dims: int = 0, **kwargs: Any) -> Any:
        rank = len(getattr(params, "shape", ()))
        if (
            (_is_symbolic(params) or _is_symbolic(indices))
            and not args
            and kwargs.get("axis") in (None, batch_dims)
            and batch_dims == rank - 1 == len(getattr(indices, "shape", ())) - 1
        ):
            return keras.ops.take_along_axis(params, indices, axis=batch_dims)
        return function(params, indices, *args, batch_dims=batch_dims, **kwargs)

    return gather


# Functions of other packages that call backend code (``tf.*``, ``jax.*``), or compute
# what one ONNX operator does from sizes a trace would fix, and that a trace records as one operation instead of entering them, or runs another way:
# (module, attribute) -> a function that, given the original, returns its stand-in
# for the trace's duration. A module not imported is left alone (its layers cannot
# be in the model).
RECORDED_FUNCTIONS: dict[tuple[str, str], Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    ("keras_hub.src.models.depth_anything.depth_anything_layers", "interpolate"): _aligned_resize,
    ("keras_hub.src.models.d_fine.d_fine_utils", "grid_sample"): _grid_sample,
    ("keras.ops", "cond"): _static_cond,
    ("tensorflow", "gather"): _batched_gather,
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
            setattr(module, attribute, internals.in_this_thread(stand_in(original), original))
    try:
        yield
    finally:
        for module, attribute, original in replaced:
            setattr(module, attribute, original)


class AnchoredConstant(keras.Operation):
    """A constant recorded as an operation of a traced input (its ``anchor``), which
    it ignores: what a trace records in place of a weight or number that an
    operation of unknown size reads (a position table sliced to the sequence
    length), so that the operation is part of the traced graph."""

    def __init__(self, value: np.ndarray, name: str | None = None):
        super().__init__(name=name)
        self.value = value

    def call(self, anchor: Any) -> Any:
        return keras.ops.convert_to_tensor(self.value)

    def compute_output_spec(self, anchor: Any) -> keras.KerasTensor:
        return keras.KerasTensor(self.value.shape, dtype=str(self.value.dtype))


class Range(keras.Operation):
    """``keras.ops.arange(start, stop, step)`` of a length read from a traced input
    (its ``anchor``, which only says where the size comes from): what a trace
    records for ``ops.arange(ops.shape(x)[1])``, so that the exported range
    follows the runtime length."""

    def __init__(self, start: Any, stop: Any, step: Any, dtype: str, name: str | None = None):
        super().__init__(name=name)
        self.start, self.stop, self.step = start, stop, step
        self.dtype = dtype

    def call(self, anchor: Any) -> Any:
        return keras.ops.arange(self.start, self.stop, self.step, dtype=self.dtype)

    def compute_output_spec(self, anchor: Any) -> keras.KerasTensor:
        length = max(0, int(np.ceil((self.stop - self.start) / self.step)))
        return keras.KerasTensor((length,), dtype=self.dtype)


@contextlib.contextmanager
def _unknown_sized_results_recorded(
    unknown: tuple[int, ...], anchors: Callable[[int], Any]
) -> Iterator[None]:
    """Inside the block, ``keras.ops.arange`` and ``keras.ops.slice`` of constants
    (weights, numbers) whose result size is an unknown input size read while
    tracing (``ops.arange(ops.shape(x)[1])``, a position table sliced to the
    sequence length) record operations of the input that size is read from
    (:class:`Range`, :class:`AnchoredConstant` then ``Slice``) instead of computing
    a constant of the marker's size: rules compute such sizes at runtime.
    ``anchors(size)`` is the placeholder whose size ``size`` is a multiple of."""

    def unknown_sized(values: Any) -> int | None:
        for value in tree.flatten(values):
            if (
                isinstance(value, int | np.integer)
                and not isinstance(value, bool | np.bool_)
                and _is_unknown_size(int(value), unknown)
            ):
                return int(value)
        return None

    def symbolic(values: Any) -> bool:
        return any(_is_symbolic(value) for value in tree.flatten(values))

    original_arange, original_slice = keras.ops.arange, keras.ops.slice

    def arange(start: Any, stop: Any = None, step: Any = None, dtype: Any = None) -> Any:
        size = unknown_sized((start, stop, step))
        # A nested layer's output inference runs on the backend's values: not recorded.
        if symbolic((start, stop, step)) or size is None or internals.inferring_output_spec():
            return original_arange(start, stop, step=step, dtype=dtype)
        if stop is None:
            start, stop = 0, start
        step = 1 if step is None else step
        if dtype is None:  # what Keras's Arange infers from the arguments
            dtype = internals.numpy_ops.Arange().compute_output_spec(start, stop, step).dtype
        dtype = keras.backend.standardize_dtype(dtype)
        return Range(start, stop, step, dtype)(anchors(size))

    def slice_(inputs: Any, start_indices: Any, shape: Any) -> Any:
        size = unknown_sized(shape)
        if symbolic((inputs, start_indices)) or size is None or internals.inferring_output_spec():
            return original_slice(inputs, start_indices, shape)
        value = np.asarray(keras.ops.convert_to_numpy(inputs))
        return original_slice(AnchoredConstant(value)(anchors(size)), start_indices, shape)

    keras.ops.arange = internals.in_this_thread(arange, original_arange)
    keras.ops.slice = internals.in_this_thread(slice_, original_slice)
    try:
        yield
    finally:
        keras.ops.arange, keras.ops.slice = original_arange, original_slice


@contextlib.contextmanager
def _einsum_dense_shapes_known() -> Iterator[None]:
    """Inside the block, an EinsumDense called on symbolic tensors infers every output
    size its equation determines, where Keras keeps the None of its partial
    ``output_shape`` (KerasHub's attention projections declare ``(None, heads,
    head_dim)``): code that reads the sequence length back (``ops.shape(query)[1]``)
    then reads the traced size, as it does on real tensors."""
    cls = keras.layers.EinsumDense
    original = cls.compute_output_shape

    def compute_output_shape(self: Any, input_shape: Any) -> Any:
        shape = tuple(original(self, input_shape))
        equation = self.equation.replace(" ", "")
        if None not in shape[1:] or "..." in equation:
            return shape
        operands, output = equation.split("->")
        source, kernel = operands.split(",")
        sizes = dict(zip(kernel, self.kernel.shape, strict=False))
        sizes.update((c, d) for c, d in zip(source, input_shape, strict=False) if d is not None)
        if len(output) != len(shape):
            return shape
        return tuple(
            sizes.get(c) if size is None and axis else size
            for axis, (c, size) in enumerate(zip(output, shape, strict=True))
        )

    cls.compute_output_shape = internals.in_this_thread(compute_output_shape, original)
    try:
        yield
    finally:
        cls.compute_output_shape = original


@dataclasses.dataclass(frozen=True)
class Size:
    """A size read while tracing: ``coefficient`` times the runtime batch size (when
    ``batch``) times the runtime size of each ``(source, axis)`` in ``dims``."""

    coefficient: int
    batch: bool = False
    dims: tuple[tuple[Any, int], ...] = ()

    @property
    def static(self) -> bool:
        return not self.batch and not self.dims


def _factor(size: int, markers: dict[int, Any]) -> tuple[int, tuple[Any, ...]]:
    """``size`` as a coefficient times a product of marker sizes (their keys)."""
    keys = []
    if size > 0:
        for marker, key in markers.items():
            while size % marker == 0:
                size //= marker
                keys.append(key)
    return size, tuple(keys)


def traced_size(size: Any, unknown_sizes: dict[int, tuple[Any, int]] | None = None) -> Size:
    """What a size recorded by a trace stands for: a static size, a multiple of the
    batch size (:func:`batch_multiple`), and products of the unknown sizes in
    ``unknown_sizes`` (marker -> ``(source, axis)``, a traced node's map)."""
    coefficient, dims = _factor(int(size), unknown_sizes or {})
    k = batch_multiple(coefficient)
    return Size(coefficient if k is None else k, k is not None, dims)


@dataclasses.dataclass
class TracedCall:
    """A layer call recorded as a Functional model over fresh placeholders.

    ``model``'s inputs are placeholders for ``sources`` (the call's tensor
    arguments, in order). ``outputs`` are the call's outputs, flattened, without
    its None outputs (``return x, None``: Keras records the call with its tensors
    only): each a ``KerasTensor`` of ``model``'s outputs, or a NumPy array for an
    output computed from constants only. A call with unknown non-batch sizes also
    has ``shapes``, the shape of each of ``model``'s tensors whose recorded shape
    holds marker sizes (by ``id``), with None for those, and ``unknown_sizes``,
    by ``id`` of each operation whose attributes or arguments hold unknown sizes,
    the map from marker to the ``(tensor, axis)`` of ``model`` (an input of the
    operation, or a placeholder) whose runtime size it stands for.
    """

    model: keras.Model | None  # None when no output depends on the inputs
    sources: list[Any]
    outputs: list[keras.KerasTensor | np.ndarray]
    shapes: dict[int, tuple[int | None, ...]] = dataclasses.field(default_factory=dict)
    unknown_sizes: dict[int, dict[int, tuple[Any, int]]] = dataclasses.field(default_factory=dict)


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
    what = f"{type(layer).__name__}.call()"
    markers_used = unknown_sizes_for(layer)

    def record(unknown: tuple[int, ...], shared: bool) -> tuple[TracedCall, dict]:
        return _record(call, what, layer.name, args, kwargs, spec, unknown, shared)

    if not _has_unknown_sizes((args, kwargs), spec):
        return record(markers_used[0], False)[0]
    # Unknown sizes of different inputs may have to be equal (SAM's points and labels
    # share the number of points): when the call fails with one marker per size, it
    # is traced again with one marker per axis, each shared by the inputs' sizes there.
    shared = False
    try:
        first, markers = record(markers_used[0], False)
    except TraceError as error:
        try:
            first, markers = record(markers_used[0], True)
        except TraceError:
            raise error from error.__cause__
        shared = True
    second, second_markers = record(markers_used[1], shared)
    _compare(what, first, second, markers, second_markers, markers_used)
    return first


def trace_function(
    function: Callable[..., Any], args: Any, spec: Callable[[Any], Any], name: str
) -> TracedCall:
    """Record ``function(*args)`` on symbolic tensors, as :func:`trace_call` records a
    layer's call: the function ``keras.ops.map`` applies to each element, traced once
    on placeholders for one element (``spec`` gives their shapes, without the mapped
    axis, which are not batch-sized). ``name`` names the recorded model."""
    what = f"{getattr(function, '__qualname__', type(function).__name__)}()"
    return _record(function, what, name, args, {}, spec, UNKNOWN_SIZES[0], shared=False)[0]


# Attributes of KerasHub and Keras layers that bound the length of a sequence axis
# (PositionEmbedding's table rows, a backbone's own limit): a traced call of a layer
# that holds one gets marker sizes below it, so that its slices of position tables run.
_LENGTH_LIMITS = ("sequence_length", "max_sequence_length", "max_position_embeddings")
# Markers below a limit are primes from this size up: smaller primes divide ordinary
# sizes too often (a head size of 6) for a product of markers to factor back.
_SMALLEST_MARKER = 11


def _primes_between(low: int, high: int) -> list[int]:
    """The primes ``p`` with ``low <= p <= high``, largest first."""
    return [
        n
        for n in range(high, low - 1, -1)
        if n > 1 and all(n % divisor for divisor in range(2, int(n**0.5) + 1))
    ]


def length_limit(layer: Any) -> int | None:
    """The smallest sequence-length limit held by ``layer`` or its sublayers
    (:data:`_LENGTH_LIMITS`), None when none holds one."""
    limits = []
    for sublayer in internals.flatten_layers(layer):
        for attribute in _LENGTH_LIMITS:
            value = getattr(sublayer, attribute, None)
            if isinstance(value, int | np.integer) and not isinstance(value, bool) and value > 0:
                limits.append(int(value))
    return min(limits) if limits else None


def unknown_sizes_for(layer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The marker sizes of the two recordings of ``layer``'s call: distinct primes
    at or below the layer's sequence-length limit (:func:`length_limit`) where it
    has one that :data:`UNKNOWN_SIZES` exceed, the largest first, alternating
    between the recordings; else :data:`UNKNOWN_SIZES`."""
    limit = length_limit(layer)
    if limit is None or limit >= max(UNKNOWN_SIZES[1]):
        return UNKNOWN_SIZES
    primes = [p for p in _primes_between(_SMALLEST_MARKER, limit) if p != BATCH]
    primes = primes[: 2 * _MAX_UNKNOWN_SIZES]
    if len(primes) < 2:
        return UNKNOWN_SIZES  # no room below the limit: the trace says what fails
    return tuple(primes[0::2]), tuple(primes[1::2])


def _is_unknown_size(
    size: int, markers: tuple[int, ...] = UNKNOWN_SIZES[0] + UNKNOWN_SIZES[1]
) -> bool:
    """Whether a size recorded by a trace depends on an unknown input size."""
    return size > 0 and any(size % marker == 0 for marker in markers)


def _has_unknown_sizes(arguments: Any, spec: Callable[[Any], Any]) -> bool:
    for x in tree.flatten(arguments):
        found = spec(x)
        if found is not None and None in tuple(found[0])[1:]:
            return True
    return False


def _record(
    call: Callable[..., Any],
    what: str,
    name: str,
    args: Any,
    kwargs: dict,
    spec: Callable[[Any], Any],
    unknown: tuple[int, ...],
    shared: bool,
) -> tuple[TracedCall, dict[int, list[tuple[int, int]]]]:
    """One recording; unknown non-batch sizes of the placeholders take the sizes
    ``unknown``, one each or, when ``shared``, one per axis. Returns the recording
    and each marker size's ``(placeholder index, axis)`` pairs."""
    sources: list[Any] = []
    placeholders: list[keras.KerasTensor] = []
    markers: dict[int, list[tuple[int, int]]] = {}

    def placeholder(x: Any) -> Any:
        found = spec(x)
        if found is None:
            return x
        shape, dtype = found
        shape = list(shape)
        if shape and shape[0] is None:
            shape[0] = BATCH
        for axis in range(1, len(shape)):
            if shape[axis] is None:
                index = axis - 1 if shared else len(markers)
                if index >= len(unknown):
                    raise TraceError(
                        f"tracing {what}: its inputs have more "
                        f"than {len(unknown)} unknown non-batch sizes"
                    )
                shape[axis] = unknown[index]
                markers.setdefault(shape[axis], []).append((len(sources), axis))
        sources.append(x)
        placeholders.append(keras.Input(batch_shape=tuple(shape), dtype=dtype))
        return placeholders[-1]

    symbolic_args, symbolic_kwargs = tree.map_structure(placeholder, (tuple(args), dict(kwargs)))

    def anchor(size: int) -> keras.KerasTensor:
        """The placeholder holding the first marker that divides ``size``."""
        marker = next(marker for marker in markers if size % marker == 0)
        return placeholders[markers[marker][0][0]]

    try:
        with _recording(unknown, markers, anchor):
            outputs = call(*symbolic_args, **symbolic_kwargs)
    except Exception as error:  # noqa: BLE001 - any failure is the layer's, reported as one
        raise TraceError(_describe(what, error)) from error
    return _traced_call(what, name, outputs, placeholders, sources), markers


@contextlib.contextmanager
def _recording(
    unknown: tuple[int, ...],
    markers: dict[int, list[tuple[int, int]]],
    anchor: Callable[[int], Any],
) -> Iterator[None]:
    """Everything a recording patches: Keras's symbolic call as the trace needs it,
    and, with unknown sizes (``markers``), what reads them."""
    with contextlib.ExitStack() as stack:
        for context in (
            internals.symbolic_variable_arithmetic(),
            internals.symbolic_equality(),
            internals.none_outputs_recorded(),
            internals.static_python_arguments(),
            internals.output_specs_without_call_context(),
            internals.backend_calls_recorded(),
            internals.backend_arrays_defer_to_symbolic(),
            _functions_recorded(),
            _einsum_dense_shapes_known(),
        ):
            stack.enter_context(context)
        if markers:
            stack.enter_context(_unknown_sized_results_recorded(unknown, anchor))
            stack.enter_context(
                internals.input_checks_ignoring(lambda size: _is_unknown_size(size, unknown))
            )
        yield


def _traced_call(
    what: str, name: str, outputs: Any, placeholders: list[Any], sources: list[Any]
) -> TracedCall:
    """The recording of a call that returned ``outputs`` from ``placeholders``."""
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


def _compare(
    traced: str,
    first: TracedCall,
    second: TracedCall,
    markers: dict[int, list[tuple[int, int]]],
    second_markers: dict[int, list[tuple[int, int]]],
    unknown_sizes: tuple[tuple[int, ...], tuple[int, ...]] = UNKNOWN_SIZES,
) -> None:
    """Fill ``first.shapes`` and ``first.unknown_sizes`` from two recordings of one
    call with different unknown sizes; raise TraceError where they differ otherwise
    than by the same product of unknown sizes, or where an unknown size is shared
    by several inputs and the operation depends on more than one of them.
    ``traced`` names the call (``Class.call()``)."""

    def fail(what: str) -> TraceError:
        return TraceError(
            f"tracing {traced}: {what} depends on an unknown input size in a way "
            "export cannot compute at runtime (expected sizes that are products of the "
            "inputs' sizes, as ops.shape(x) gives them)"
        )

    for a, b in zip(first.outputs, second.outputs, strict=True):
        if isinstance(a, np.ndarray) and np.shape(a) != np.shape(b):
            raise fail("a constant output")
    if first.model is None or second.model is None:
        return
    nodes = internals.ordered_nodes(first.model)
    second_nodes = internals.ordered_nodes(second.model)
    if len(nodes) != len(second_nodes) or any(
        type(a.operation) is not type(b.operation) for a, b in zip(nodes, second_nodes, strict=True)
    ):
        raise fail("the sequence of recorded operations")
    # Markers by position, the same in both recordings.
    positions = {marker: i for i, marker in enumerate(unknown_sizes[0])}
    second_positions = {marker: i for i, marker in enumerate(unknown_sizes[1])}
    # Which placeholders each tensor depends on.
    placeholders = tree.flatten(internals.inputs_struct(first.model))
    depends: dict[int, set[int]] = {id(x): {i} for i, x in enumerate(placeholders)}
    for a, b in zip(nodes, second_nodes, strict=True):
        inputs = set().union(*(depends.get(id(x), set()) for x in a.input_tensors))
        for tensor, other in zip(a.outputs, b.outputs, strict=True):
            depends[id(tensor)] = inputs
            if tuple(tensor.shape) != tuple(other.shape):
                first.shapes[id(tensor)] = tuple(
                    None if size != size_b else size
                    for size, size_b in zip(tensor.shape, other.shape, strict=True)
                )
        differences: list[tuple[Any, Any]] = []
        _differences((a.args, a.kwargs), (b.args, b.kwargs), differences)
        if a.operation is not b.operation and not isinstance(a.operation, keras.Layer):
            _differences(_attributes(a.operation), _attributes(b.operation), differences)
        where = f"a size in the call of {a.operation.name!r}"
        read: set[int] = set()
        for size, size_b in differences:
            factors = None if size is None else _factor(size, positions)
            if factors is None or factors != _factor(size_b, second_positions):
                raise fail(where)
            read.update(unknown_sizes[0][position] for position in factors[1])
        sizes = {}
        for marker in read:
            second_marker = unknown_sizes[1][positions[marker]]
            source = _size_source(marker, second_marker, a, b, inputs, markers, first, placeholders)
            if source is None:
                raise fail(f"{where} (one of several inputs' sizes)")
            sizes[marker] = source
        if sizes:
            first.unknown_sizes[id(a.operation)] = sizes


def _size_source(
    marker: int,
    second_marker: int,
    a: Any,
    b: Any,
    inputs: set[int],
    markers: dict[int, list[tuple[int, int]]],
    first: TracedCall,
    placeholders: list[Any],
) -> tuple[Any, int] | None:
    """Where the operation recorded as ``a`` (``b`` in the second recording) reads the
    unknown size ``marker`` (``second_marker`` in the second recording): ``(tensor,
    axis)``, or None when several inputs could
    hold it. Where the operation's own input has that size on one axis, the size is
    read there (the data the operation reshapes); else from the one input of the
    call with that size (``markers``: ``(input index, axis)`` by size) that the
    operation depends on (``inputs``: the indices of the inputs it depends on)."""
    found = [
        (tensor, axis)
        for tensor, other in zip(a.input_tensors, b.input_tensors, strict=True)
        for axis, (size, size_b) in enumerate(zip(tensor.shape, other.shape, strict=True))
        if size == marker and size_b == second_marker
    ]
    if len({(id(tensor), axis) for tensor, axis in found}) == 1:
        return found[0]
    carriers = markers[marker]
    candidates = [
        (index, axis) for index, axis in carriers if len(carriers) == 1 or index in inputs
    ]
    if len({(id(first.sources[i]), axis) for i, axis in candidates}) != 1:
        return None
    return placeholders[candidates[0][0]], candidates[0][1]


def _attributes(operation: Any) -> dict[str, Any]:
    """An operation's public attributes (its arguments: ``newshape``, ``repeats``)."""
    return {
        key: value
        for key, value in vars(operation).items()
        if not key.startswith("_") and key != "name"
    }


def _differences(a: Any, b: Any, found: list[tuple[Any, Any]]) -> None:
    """Append to ``found`` each pair of integers that differ between two recorded
    argument structures, and ``(None, None)`` for any other difference."""
    if isinstance(a, keras.KerasTensor) or isinstance(b, keras.KerasTensor):
        return
    if isinstance(a, bool | np.bool_) or isinstance(b, bool | np.bool_):
        if a != b:
            found.append((None, None))
    elif isinstance(a, int | np.integer) and isinstance(b, int | np.integer):
        if a != b:
            found.append((int(a), int(b)))
    elif isinstance(a, float) and isinstance(b, float):
        if a != b and not (a != a and b != b):
            found.append((None, None))
    elif isinstance(a, slice) and isinstance(b, slice):
        _differences((a.start, a.stop, a.step), (b.start, b.stop, b.step), found)
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            found.append((None, None))
        else:
            for x, y in zip(a, b, strict=True):
                _differences(x, y, found)
    elif isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            found.append((None, None))
        else:
            for key in a:
                _differences(a[key], b[key], found)
    elif hasattr(a, "shape") and hasattr(b, "shape") and not isinstance(a, keras.Variable):
        if tuple(a.shape) != tuple(b.shape):
            found.append((None, None))
        elif int(np.prod(a.shape)) <= 64:
            x = np.asarray(keras.ops.convert_to_numpy(a))
            y = np.asarray(keras.ops.convert_to_numpy(b))
            if not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
                found.append((None, None))


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

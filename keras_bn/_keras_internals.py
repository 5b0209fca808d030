"""Every access to Keras's private API in keras-bn lives in this module.

Keras 3 keeps some things keras-bn needs behind private names: the class of
``keras.Model(inputs, outputs)`` models (``Functional``), a model's recursive walk
over its layers (``Layer._flatten_layers``), the layer graph of a Functional
model (``_nodes_by_depth``, ``Node.arguments``, ``KerasTensor._keras_history``,
``_inputs_struct``...), and a few ``keras.src`` classes with no public name (the
operation classes behind ``keras.ops`` calls, two Keras Applications layers).
Each is reached here through one small named function or name, so that a Keras
upgrade that moves one breaks this file only, and ``tests/test_keras_internals.py``
says which accessor broke. Each patch of a Keras or JAX internal (a function replaced
for the duration of a block) checks, when it is installed, that the internal is still
the one it was written for, and installs nothing otherwise: :data:`RELIANCES` names
them, and ``tests/test_upgrade_safety.py`` fails on a changed one with the patch's name.

The rule: nothing else in the package (``keras_bn`` or ``keras_bn.converters``)
reads a ``keras.src`` module or an attribute starting with ``_`` on a Keras
object; it imports what it needs from here. This module imports nothing from
keras-bn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import keras

# Private classes with no public name. `import keras` already imports these
# modules, so importing them here costs nothing.
from keras.src.activations.activations import ReLU as ActivationReLU
from keras.src.applications.convnext import LayerScale
from keras.src.applications.inception_resnet_v2 import CustomScaleLayer
from keras.src.models.functional import Functional
from keras.src.models.functional import operation_fn as _functional_operation_fn
from keras.src.ops import core as core_ops
from keras.src.ops import image as image_ops
from keras.src.ops import math as math_ops
from keras.src.ops import nn as nn_ops
from keras.src.ops import numpy as numpy_ops

__all__ = [
    # private classes and modules
    "ActivationReLU",
    "Functional",
    "LayerScale",
    "CustomScaleLayer",
    "core_ops",
    "image_ops",
    "math_ops",
    "nn_ops",
    "numpy_ops",
    # layers and models
    "flatten_layers",
    "sublayer_paths",
    "is_functional",
    "is_sequential_or_functional",
    # Functional graphs
    "KerasNode",
    "functional_of",
    "build_shapes",
    "ordered_nodes",
    "converts_input_args",
    "inputs_struct",
    "outputs_struct",
    "keras_mask",
    "producing_operation",
    "output_names",
    "standardized_inputs",
    "inference_call",
    "runs_its_graph",
    # loading
    "saved_weights_loading",
    "saving_temp_dirs_in",
    "tensorflow_probe_answered",
    "tensorflow_probe_deferred",
    # float64
    "float64_type_promotion",
    "jax_x64_slice_indices",
    # running on JAX
    "jax_depthwise_convolutions",
    # tracing a layer's call
    "keeping_layer_nodes",
    "symbolic_variable_arithmetic",
    "none_outputs_recorded",
    "static_python_arguments",
    "output_specs_without_call_context",
    "backend_calls_recorded",
    "backend_arrays_defer_to_symbolic",
    "input_checks_ignoring",
    "symbolic_equality",
    "in_this_thread",
    # what the patches rely on
    "Reliance",
    "RELIANCES",
]

# ``ActivationReLU``: the operation ``keras.activations.relu`` records when a layer's
# call runs it outside the layer's own call (TimeDistributed's per-step
# ``self.layer.call``), with its negative slope, maximum and threshold.
# ``Functional``: the class of every ``keras.Model(inputs, outputs)`` model (and of
# a built Sequential's inner graph); no public name tells it apart from a
# subclassed model.
# ``LayerScale`` (ConvNeXt) and ``CustomScaleLayer`` (InceptionResNetV2): layers of
# Keras Applications models, defined privately in their application modules.
# ``nn_ops`` / ``numpy_ops`` / ``core_ops`` / ``math_ops`` / ``image_ops``: the modules
# holding the ``keras.Operation`` classes that ``keras.ops`` functions (``keras.ops.relu``,
# ``keras.ops.add``, ``keras.ops.cast``, ``keras.ops.rsqrt``...) record in a
# Functional graph or a traced call, e.g. ``nn_ops.Relu``, ``numpy_ops.Add``.


# ------------------------------------------------------------- layers and models


def flatten_layers(layer: Any) -> list:
    """``layer`` and every layer tracked inside it, recursively, each once.

    Keras's own walk (``Layer._flatten_layers``): it finds the layers of nested
    models and of custom layers that hold sublayers as attributes, which
    ``model.layers`` (one level) does not.
    """
    return list(layer._flatten_layers(include_self=True, recursive=True))


def sublayer_paths(layer: Any, scope: str) -> Iterator[tuple[str, Any]]:
    """Every layer tracked inside ``layer``, recursively, with its path
    (``scope/child/grandchild``); a sublayer held at two places has two paths."""
    for child in layer._flatten_layers(include_self=False, recursive=False):
        path = f"{scope}/{child.name}"
        yield path, child
        yield from sublayer_paths(child, path)


def is_functional(model: Any) -> bool:
    """Whether ``model`` is a Functional model (``keras.Model(inputs, outputs)``).

    True for subclasses of Functional too; False for Sequential models and for
    subclassed models (``class M(keras.Model)`` with its own ``call``).
    """
    return isinstance(model, Functional)


def is_sequential_or_functional(model: Any) -> bool:
    """A Sequential or Functional model: what ``keras.models.clone_model`` rebuilds."""
    return isinstance(model, keras.Sequential | Functional)


# -------------------------------------------------------------- Functional graphs


@dataclasses.dataclass(frozen=True, eq=False)
class KerasNode:
    """One call of an operation recorded in a Functional graph (a Keras ``Node``).

    Attributes:
        operation: the called ``keras.Layer`` / ``keras.Operation`` (a nested
            model for a call of a model).
        is_input: whether this is a graph input's node (an ``InputLayer``'s).
        input_tensors: the call's symbolic input tensors (``KerasTensor``), flat,
            in argument order.
        args: the call's positional arguments, symbolic tensors included.
        kwargs: the call's keyword arguments, symbolic tensors included.
        outputs: the call's output tensors, flattened.
    """

    operation: Any
    is_input: bool
    input_tensors: tuple
    args: tuple
    kwargs: dict
    outputs: tuple


def _keras_node(node: Any) -> KerasNode:
    """The facts of a Keras ``Node`` (``keras.src.ops.node.Node``)."""
    return KerasNode(
        operation=node.operation,
        is_input=bool(node.is_input),
        input_tensors=tuple(node.input_tensors),
        args=tuple(node.arguments.args),
        kwargs=dict(node.arguments.kwargs),
        outputs=tuple(node.outputs),
    )


def functional_of(model: keras.Model) -> Any:
    """The Functional graph behind a model, or raise a clear ValueError.

    A Functional model is its own graph; a built Sequential model keeps one
    inside. Subclassed models, and Sequential models without a known input
    shape, have none.
    """
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            raise ValueError(
                f"Sequential model {model.name!r} has no known input shape, so it has "
                "no graph to convert. Build it with an `keras.Input(shape=...)` first "
                "layer or call `model.build(input_shape)`."
            )
        return functional
    if hasattr(model, "_nodes_by_depth") and getattr(model, "_is_graph_network", True):
        if getattr(model, "inputs", None) is not None and hasattr(model, "_run_through_graph"):
            return model
    raise ValueError(
        f"Model {model.name!r} of class {type(model).__name__} is a subclassed model "
        "with no layer graph. Only Sequential and Functional models (which may nest "
        "each other) can be converted: rebuild it with the Functional API."
    )


def build_shapes(layer: Any) -> dict[str, Any] | None:
    """The shapes a layer was built for, by ``build`` argument name (``{"input_shape":
    (2, 32, 32, 3)}`` once a subclassed model has been called or built), else None."""
    shapes = getattr(layer, "_build_shapes_dict", None)
    return dict(shapes) if shapes else None


def ordered_nodes(functional: Any) -> list[KerasNode]:
    """The operation calls of a Functional graph in execution order.

    The order Functional itself runs them (deepest nodes first); input nodes are
    left out. A call of a nested model is one node whose ``operation`` is that
    model (walk it with ``functional_of(node.operation)``). A node may belong to
    a branch that does not feed the outputs; its inputs are then unknown to a
    walk that starts from ``inputs_struct``.
    """
    ordered = []
    for depth in sorted(functional._nodes_by_depth.keys(), reverse=True):
        for node in functional._nodes_by_depth[depth]:
            if node.operation is None or node.is_input:
                continue
            ordered.append(_keras_node(node))
    return ordered


def converts_input_args(layer: Any) -> bool:
    """Whether Keras casts a layer's float call arguments to its compute dtype on entry
    (``Layer._convert_input_args``; lookup and hashing layers turn it off)."""
    return bool(getattr(layer, "_convert_input_args", True))


def inputs_struct(functional: Any) -> Any:
    """The graph's input ``KerasTensor``s in the structure the model is called with."""
    return functional._inputs_struct


def outputs_struct(functional: Any) -> Any:
    """The graph's output ``KerasTensor``s in the structure the model returns."""
    return functional._outputs_struct


def keras_mask(keras_tensor: keras.KerasTensor) -> Any:
    """The Keras mask a symbolic tensor carries (``_keras_mask``), None when none."""
    return getattr(keras_tensor, "_keras_mask", None)


def call_receives_mask(layer: Any) -> bool:
    """Whether Keras hands ``layer.call`` the Keras mask its inputs carry (a ``mask``
    argument, ``_call_has_mask_arg``): for a Lambda, whether its function takes one;
    for a TimeDistributed, whether the layer it wraps does."""
    if isinstance(layer, keras.layers.Lambda):
        return bool(getattr(layer, "_fn_expects_mask_arg", False))
    if isinstance(layer, keras.layers.TimeDistributed):
        return call_receives_mask(layer.layer)
    return bool(getattr(layer, "_call_has_mask_arg", False))


def producing_operation(keras_tensor: keras.KerasTensor) -> Any:
    """The operation whose call produced a symbolic tensor (its ``InputLayer`` for an input)."""
    return keras_tensor._keras_history.operation


def standardized_inputs(functional: Any, x: Any) -> list:
    """``x`` as ``Functional.call`` reads it (``_standardize_inputs``): one tensor per
    graph input, in ``ordered_nodes``' input order, converted to the inputs' dtypes."""
    return list(functional._standardize_inputs(x))


def runs_its_graph(model: Any) -> bool:
    """Whether calling ``model`` runs its layer graph and nothing else: a Functional or
    Sequential model whose class keeps Keras's ``call`` (a subclass may override it)."""
    if isinstance(model, keras.Sequential):
        return type(model).call is keras.Sequential.call
    return isinstance(model, Functional) and type(model).call is Functional.call


def inference_call(operation: Any) -> Callable[..., Any]:
    """``operation`` as ``Functional.call(..., training=False)`` calls it (Keras's
    ``operation_fn``: ``training=False`` passed where the operation takes it)."""
    return _functional_operation_fn(operation, training=False)


def output_names(model: keras.Model) -> list[str]:
    """The model's output names: ``model.output_names``, else each output's producer's name."""
    names = getattr(model, "output_names", None)
    if names:
        return list(names)
    return [producing_operation(tensor).name for tensor in model.outputs]


# --------------------------------------------------------------------------------------
# Loading: a saved model's weights overwrite whatever the layers were built with.


_SAVING_TEMP_DIRS = threading.local()  # .directory: where this thread's loads unpack


@contextlib.contextmanager
def saving_temp_dirs_in(directory: str) -> Iterator[None]:
    """Keras's saving code makes its temporary directories (a ``.keras`` archive's
    assets, unpacked) inside ``directory`` while the block runs, in this thread only.

    Keras asks ``saving_lib.get_temp_dir()`` (``tempfile.mkdtemp()``) and leaves the
    directory behind when unpacking fails. Setting ``tempfile.tempdir`` instead
    would move every thread's temporary files, the user's own too, for the duration.
    """
    from keras.src.saving import saving_lib

    original: Any = getattr(saving_lib, "get_temp_dir", None)
    if not getattr(original, "_keras_bn_hook", False) and _patchable("saving_temp_dirs_in"):

        def get_temp_dir() -> str:
            directory = getattr(_SAVING_TEMP_DIRS, "directory", None)
            return original() if directory is None else tempfile.mkdtemp(dir=directory)

        get_temp_dir._keras_bn_hook = True  # type: ignore[attr-defined]
        saving_lib.get_temp_dir = get_temp_dir  # installed once, for every thread
    previous = getattr(_SAVING_TEMP_DIRS, "directory", None)
    _SAVING_TEMP_DIRS.directory = directory
    try:
        yield
    finally:
        _SAVING_TEMP_DIRS.directory = previous


@contextlib.contextmanager
def lambda_globals(names: Mapping[str, Any]) -> Iterator[None]:
    """Rebuild saved Python lambdas with ``names`` among their globals, in the block.

    Keras rebuilds a Lambda layer's saved lambda with the globals of its own module
    (``keras.src.utils.python_utils.func_load`` without ``globs``), where a Keras-2-era
    ``lambda t: tf.nn.relu6(t)`` finds no ``tf``: the model does not reload at all
    (Keras then reports that it cannot infer the Lambda's output shape). Here the
    rebuilt function sees that module's globals and ``names`` (``tf``, ``np``, ...).
    A lambda written inside a function that imports ``tf`` there holds it in its
    closure instead, which Keras saves as ``{"class_name": "module", "config":
    "tensorflow", ...}`` and gives back as that dict: a closure value naming the module
    of one of ``names`` becomes that module again.
    Only reached with ``safe_mode=False``, which runs the file's code anyway.
    Not thread-safe: it patches the module's function for the duration."""
    if not _patchable("lambda_globals"):
        yield
        return
    from keras.src.utils import python_utils

    original = python_utils.func_load
    modules = {value.__name__: value for value in names.values() if inspect.ismodule(value)}

    def restored(value: Any) -> Any:
        if isinstance(value, dict) and value.get("class_name") == "module":
            return modules.get(str(value.get("config")), value)
        return value

    def func_load(code: Any, defaults: Any = None, closure: Any = None, globs: Any = None) -> Any:
        if globs is None:
            globs = {**names, **vars(python_utils)}
        if closure is not None:
            closure = tuple(restored(value) for value in closure)
        return original(code, defaults=defaults, closure=closure, globs=globs)

    python_utils.func_load = func_load
    try:
        yield
    finally:
        python_utils.func_load = original


@contextlib.contextmanager
def saved_weights_loading() -> Iterator[None]:
    """Build layers whose weights are about to be overwritten, without backend work.

    ``keras.saving.load_model`` builds every layer (drawing its initial weights) and
    then assigns the saved ones; the initial values are thrown away. On JAX each
    random draw of a new shape compiles an XLA program (most of the time it took to
    load ResNet50 there), and so does every ``jnp.asarray`` of a NumPy array of a new
    shape (a jitted copy: 28 programs for ResNet50's variables; BENCHMARKS.md
    appendix). In the block:

    * random initializers give zeros instead of draws; ``Zeros``, ``Ones`` and scalar
      ``Constant`` give their own values; all are computed by NumPy. Other initializers
      (a seed generator's state, custom ones) run as usual;
    * on JAX, NumPy values given to a variable (its initial value, the saved weights)
      are placed on the device with ``jax.device_put``, which compiles nothing.

    Not thread-safe: it patches the backend's variable class for the duration.
    """
    if not _patchable("saved_weights_loading"):
        yield
        return
    import numpy as np
    from keras.src.backend import Variable
    from keras.src.initializers.constant_initializers import Constant, Ones, Zeros
    from keras.src.initializers.random_initializers import RandomInitializer

    initialize_with, convert = Variable._initialize_with_initializer, Variable._convert_to_tensor

    def host_value(variable: Any, initializer: Any) -> Any:
        shape, dtype = variable._shape, variable._dtype
        if isinstance(initializer, RandomInitializer | Zeros):
            return np.zeros(shape, dtype=dtype)
        if isinstance(initializer, Ones):
            return np.ones(shape, dtype=dtype)
        if type(initializer) is Constant and np.isscalar(initializer.value):
            return np.full(shape, initializer.value, dtype=dtype)
        return None

    # Parameter names as Keras's own: a check of the precondition (nested blocks) reads them.
    def initialize(self: Any, initializer: Any) -> None:
        value = host_value(self, initializer) if self._layout is None else None
        if value is None:
            initialize_with(self, initializer)
        else:
            self._initialize(self._convert_to_tensor(value))

    def device_put(self: Any, value: Any, dtype: Any = None) -> Any:
        if type(value) is np.ndarray and self._layout is None:
            import jax

            try:
                target = np.dtype(keras.backend.standardize_dtype(dtype or value.dtype))
            except TypeError:  # a dtype NumPy does not know by name: Keras converts it
                return convert(self, value, dtype)
            return jax.device_put(value.astype(target, copy=False))
        return convert(self, value, dtype)

    Variable._initialize_with_initializer = initialize
    if keras.backend.backend() == "jax":
        Variable._convert_to_tensor = device_put
    try:
        yield
    finally:
        Variable._initialize_with_initializer = initialize_with
        Variable._convert_to_tensor = convert


def tensorflow_probe_answered() -> None:
    """Keras's "is TensorFlow installed?" probe answers without importing it, when the
    process has not imported TensorFlow.

    ``serialize_keras_object`` (every ``get_config``: cloning, saving) asks
    ``module_utils.tensorflow.available`` to tell whether an object is a
    ``tf.TensorShape``, which imports all of TensorFlow on every backend (seconds:
    BENCHMARKS.md appendix) and its start-up lines on stderr, for a question whose
    answer is no while TensorFlow is
    not imported (no object can be one). For a process that runs another backend
    (the CLI on JAX): the probe then says "not available" for the rest of it.
    """
    import sys

    from keras.src.utils import module_utils

    if "tensorflow" in sys.modules or not _patchable("tensorflow_probe_answered"):
        return
    probe = module_utils.tensorflow
    if probe._available is None:
        probe._available = False


@contextlib.contextmanager
def tensorflow_probe_deferred() -> Iterator[None]:
    """Within the block, Keras's "is TensorFlow installed?" probe answers no without
    importing it, when the process has not imported TensorFlow (as
    :func:`tensorflow_probe_answered`, but for a library call: afterwards the probe
    asks again). Cloning a model calls ``get_config`` on every layer, whose
    serialization asks the probe: on JAX or torch that imported all of TensorFlow
    in a user's process for a question whose answer is no (no object can be a
    ``tf.TensorShape`` before TensorFlow is imported). Not thread-safe.
    """
    import sys

    from keras.src.utils import module_utils

    if "tensorflow" in sys.modules or not _patchable("tensorflow_probe_deferred"):
        yield
        return
    probe = module_utils.tensorflow
    if probe._available is not None:  # answered already (by Keras or the CLI)
        yield
        return
    probe._available = False
    try:
        yield
    finally:
        if probe._available is False and "tensorflow" not in sys.modules:
            probe._available = None


@contextlib.contextmanager
def float64_type_promotion() -> Iterator[None]:
    """Let Keras's type promotion yield float64 on every backend within the block.

    ``keras.backend.result_type`` maps float64 to float32 on every backend but
    TensorFlow (``BIT64_TO_BIT32_DTYPE``, to mimic JAX's default 32-bit mode), so a
    float64 BatchNormalization, which computes in ``result_type(inputs, "float32")``,
    silently runs in float32 on JAX and torch. Not thread-safe.
    """
    from keras.src.backend.common import dtypes

    if not _patchable("float64_type_promotion"):
        yield
        return
    table = dtypes.BIT64_TO_BIT32_DTYPE
    saved = table["float64"]
    table["float64"] = "float64"
    try:
        yield
    finally:
        table["float64"] = saved


@contextlib.contextmanager
def jax_x64_slice_indices() -> Iterator[None]:
    """Let ``keras.ops.slice`` on JAX take start indices of mixed integer types in x64 mode.

    Keras's JAX ``slice`` hands its start indices to ``jax.lax.dynamic_slice``, which
    requires them all of one integer type; with JAX's x64 mode on (a float64 run),
    Python ints become int64 beside int32 tensors, and ``ops.slice(x, (0, 0, start),
    ...)`` with an int32 ``start`` (KerasHub D-FINE's deformable attention) raises
    "index arguments to dynamic_slice must be integers of the same type". Within the
    block the indices are cast to int64 first. Not thread-safe: it patches
    ``keras.src.backend.jax.core.slice`` for the duration of the block.
    """
    from keras.src.backend.jax import core

    if not _patchable("jax_x64_slice_indices"):
        yield
        return
    original = core.slice

    def slice_(inputs: Any, start_indices: Any, shape: Any) -> Any:
        if isinstance(start_indices, list | tuple):
            import jax.numpy as jnp

            start_indices = tuple(jnp.asarray(index, dtype="int64") for index in start_indices)
        return original(inputs, start_indices, shape)

    core.slice = slice_
    try:
        yield
    finally:
        core.slice = original


# ------------------------------------------------------------- running on JAX


def _spatial(value: Any, rank: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, list | tuple) else (int(value),) * rank


def _depthwise_or_keras_own(
    depthwise: Callable[..., Any],
    max_taps: int | None,
    keras_own: Callable[..., Any],
    inputs: Any,
    kernel: Any,
    strides: Any,
    padding: str,
    data_format: Any,
    dilation_rate: Any,
) -> Any:
    """``depthwise``'s depthwise convolution (``kernel``: ``(*kernel_size, channels,
    multiplier)``), or ``keras_own(...)`` for a call it does not take: one Keras rejects,
    one whose output is empty (Keras's own error then), or a kernel of more than
    ``max_taps`` taps (None: any)."""
    data_format = data_format or keras.config.image_data_format()
    rank = len(inputs.shape) - 2
    channels = inputs.shape[-1 if data_format == "channels_last" else 1]
    strides, dilation_rate = _spatial(strides, rank), _spatial(dilation_rate, rank)
    sizes = inputs.shape[1:-1] if data_format == "channels_last" else inputs.shape[2:]
    if kernel.shape[-2] != channels or {len(strides), len(dilation_rate)} != {rank}:
        return keras_own()
    if max_taps is not None and math.prod(kernel.shape[:rank]) > max_taps:
        return keras_own()
    extents = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:rank], dilation_rate, strict=True)]
    if padding.lower() == "valid" and any(s < e for s, e in zip(sizes, extents, strict=True)):
        return keras_own()
    import jax.numpy as jnp

    inputs, kernel = jnp.asarray(inputs), jnp.asarray(kernel)
    return depthwise(inputs, kernel, strides, padding.lower(), dilation_rate, data_format)


def _keras_convolution(body: Callable[..., Any]) -> Callable[..., Any]:
    """``body(inputs, kernel, strides, padding, data_format, dilation_rate)`` with the
    signature and defaults of Keras's backend convolutions."""

    def convolution(
        inputs: Any,
        kernel: Any,
        strides: Any = 1,
        padding: str = "valid",
        data_format: Any = None,
        dilation_rate: Any = 1,
    ) -> Any:
        return body(inputs, kernel, strides, padding, data_format, dilation_rate)

    return convolution


@contextlib.contextmanager
def jax_depthwise_convolutions(
    depthwise: Callable[..., Any], max_taps: int | None = None
) -> Iterator[None]:
    """Within the block, Keras's JAX depthwise convolutions are computed by ``depthwise``
    (those of at most ``max_taps`` kernel taps; None: all).

    ``depthwise(inputs, kernel, strides, padding, dilation_rate, data_format)``
    computes ``keras.ops.depthwise_conv`` with ``kernel`` shaped ``(*kernel_size,
    channels, multiplier)`` and tuples for ``strides`` and ``dilation_rate``. It
    replaces ``keras.src.backend.jax.nn.depthwise_conv`` (DepthwiseConv1D/2D,
    SeparableConv's first half, ``keras.ops.depthwise_conv``) and the grouped
    ``keras.src.backend.jax.nn.conv`` with one input channel per group (``Conv2D(...,
    groups=channels)``, ConvNeXt's), which is the same convolution; any other
    convolution, and a call Keras would reject, goes to Keras's own. Not thread-safe:
    it patches both for the duration of the block.
    """
    from keras.src.backend.jax import nn

    if not _patchable("jax_depthwise_convolutions"):
        yield
        return
    depthwise_conv, conv = nn.depthwise_conv, nn.conv

    def depthwise_conv_(*arguments: Any) -> Any:
        keras_own = functools.partial(depthwise_conv, *arguments)
        return _depthwise_or_keras_own(depthwise, max_taps, keras_own, *arguments)

    def conv_(*arguments: Any) -> Any:
        inputs, kernel, strides, padding, data_format, dilation_rate = arguments
        last = (data_format or keras.config.image_data_format()) == "channels_last"
        channels = inputs.shape[-1 if last else 1]
        if kernel.shape[-2] != 1 or channels == 1 or kernel.shape[-1] % channels:
            return conv(*arguments)
        import jax.numpy as jnp

        kernel = jnp.reshape(kernel, (*kernel.shape[:-2], channels, kernel.shape[-1] // channels))
        inputs = jnp.asarray(inputs, dtype=kernel.dtype)  # as Keras's conv casts
        grouped = (inputs, kernel, strides, padding, data_format, dilation_rate)
        keras_own = functools.partial(conv, *arguments)
        return _depthwise_or_keras_own(depthwise, max_taps, keras_own, *grouped)

    nn.depthwise_conv = _keras_convolution(depthwise_conv_)
    nn.conv = _keras_convolution(conv_)
    try:
        yield
    finally:
        nn.depthwise_conv = depthwise_conv
        nn.conv = conv


# ------------------------------------------------------------- tracing a layer's call


@contextlib.contextmanager
def keeping_layer_nodes(layer: Any) -> Iterator[None]:
    """Undo the graph nodes recorded on ``layer`` and its sublayers inside the block.

    Calling layers on symbolic tensors (what tracing a layer's ``call`` does)
    appends a Keras ``Node`` to each called layer's ``_inbound_nodes`` /
    ``_outbound_nodes``; on exit these lists get back their former length, so
    tracing leaves the user's model as it was.
    """
    layers = flatten_layers(layer)
    lengths = [
        (item, len(getattr(item, "_inbound_nodes", ())), len(getattr(item, "_outbound_nodes", ())))
        for item in layers
    ]
    try:
        yield
    finally:
        for item, inbound, outbound in lengths:
            if hasattr(item, "_inbound_nodes"):
                del item._inbound_nodes[inbound:]
            if hasattr(item, "_outbound_nodes"):
                del item._outbound_nodes[outbound:]


_VARIABLE_OPERATORS = {
    "__add__": ("add", False),
    "__radd__": ("add", True),
    "__sub__": ("subtract", False),
    "__rsub__": ("subtract", True),
    "__mul__": ("multiply", False),
    "__rmul__": ("multiply", True),
    "__truediv__": ("true_divide", False),
    "__rtruediv__": ("true_divide", True),
    "__matmul__": ("matmul", False),
    "__rmatmul__": ("matmul", True),
    "__pow__": ("power", False),
}


def in_this_thread(
    stand_in: Callable[..., Any], original: Callable[..., Any]
) -> Callable[..., Any]:
    """A function that calls ``stand_in`` from the thread that makes it and
    ``original`` from every other thread: what a patch installs, so that it acts only
    where it was asked for.

    The patches below replace process-wide attributes while one thread traces a
    call, and keras-bn runs Keras beside the trace: ``keras-bn export`` runs the
    Keras reference pass in a background thread while the main thread traces. A
    patch seen by that pass changed what it computed: a position table sliced to a
    sequence length the trace reads as unknown became a recorded operation, and
    Keras's eager call of a BERT failed (``'EagerTensor' object has no attribute
    'sparse'``).
    """
    owner = threading.get_ident()

    @functools.wraps(original)
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        chosen = stand_in if threading.get_ident() == owner else original
        return chosen(*args, **kwargs)

    return dispatch


@contextlib.contextmanager
def symbolic_variable_arithmetic() -> Iterator[None]:
    """Inside the block, ``variable * keras_tensor`` records ``keras.ops.multiply``.

    A Keras variable's operators call the backend's own functions
    (``Variable.__mul__`` is ``backend.numpy.multiply(self.value, other)``), which
    reject a symbolic tensor, while ``keras_tensor * variable`` records an operation
    node; KerasHub layers write both (``self.scale * x + self.bias``). Tracing a
    call patches the operators of ``keras.Variable`` for its duration so that a
    symbolic operand records the ``keras.ops`` operation; everything else is
    unchanged. The operators are restored on exit.
    """
    from keras import ops

    if not _patchable("symbolic_variable_arithmetic"):
        yield
        return
    cls = keras.Variable
    originals = {name: cls.__dict__.get(name) for name in _VARIABLE_OPERATORS}

    def patched(name: str, function: str, reflected: bool) -> Any:
        original = getattr(cls, name)
        op = getattr(ops, function)

        def operator(self: Any, other: Any) -> Any:
            if isinstance(other, keras.KerasTensor):
                return op(other, self) if reflected else op(self, other)
            return original(self, other)

        return in_this_thread(operator, original)

    for name, (function, reflected) in _VARIABLE_OPERATORS.items():
        setattr(cls, name, patched(name, function, reflected))
    try:
        yield
    finally:
        for name, original in originals.items():
            if original is None:
                delattr(cls, name)
            else:
                setattr(cls, name, original)


@contextlib.contextmanager
def none_outputs_recorded() -> Iterator[None]:
    """Inside the block, a layer called on symbolic tensors may return None leaves.

    Keras records a symbolic call as a ``Node`` whose outputs must all be tensors
    (``Node.__init__`` raises "All operation outputs must be tensors"), so a block
    returning ``(x, None)`` - KerasHub's DeiT encoder blocks return their attention
    scores that way when not asked for them - cannot be called inside a traced
    ``call()``. Within the block the ``Node`` records only the output tensors; the
    call still returns its structure with the None leaves, which the caller's code
    then ignores or passes on. Not thread-safe: it patches ``Node.__init__`` for the
    duration of the block.
    """
    from keras import tree
    from keras.src.ops.node import Node

    if not _patchable("none_outputs_recorded"):
        yield
        return
    original = Node.__init__

    def init(
        self: Any,
        operation: Any,
        call_args: Any = None,
        call_kwargs: Any = None,
        outputs: Any = None,
    ) -> None:
        if outputs is not None:
            outputs = [x for x in tree.flatten(outputs) if x is not None]
        original(self, operation, call_args, call_kwargs, outputs)

    Node.__init__ = in_this_thread(init, original)
    try:
        yield
    finally:
        Node.__init__ = original


_PYTHON_SCALARS = (type(None), int, float, str, bool, complex, bytes)


def _python_only(value: Any) -> bool:
    from keras import tree

    return all(isinstance(leaf, _PYTHON_SCALARS) for leaf in tree.flatten(value))


_INFERRING = threading.local()  # depth of static_python_arguments' output-spec calls


def inferring_output_spec() -> bool:
    """Whether this thread is inside a symbolic call's output inference (a nested
    layer's ``call()`` run by the backend's ``compute_output_spec``, within
    :func:`static_python_arguments`): values made there are the backend's (JAX
    tracers), never recorded operations."""
    return getattr(_INFERRING, "depth", 0) > 0


@contextlib.contextmanager
def static_python_arguments() -> Iterator[None]:
    """Inside the block, a layer called on symbolic tensors keeps tuples of Python
    numbers static while Keras infers its output.

    Keras infers a symbolic call's output by running ``call()`` under the backend's
    ``compute_output_spec``; on JAX (``jax.eval_shape``) only top-level Python
    scalars stay static, so ``query_size=(4, 4)`` arrives as JAX tracers and
    ``max(query_size)`` fails (KerasHub ViTDet's relative position embedding). Within
    the block, arguments made only of Python scalars are bound to ``call`` before
    ``backend.compute_output_spec`` sees them. Not thread-safe: it patches
    ``keras.src.backend.compute_output_spec`` for the duration of the block.
    """
    import functools

    from keras.src import backend

    if not _patchable("static_python_arguments"):
        yield
        return
    original = backend.compute_output_spec

    def compute_output_spec(fn: Any, *args: Any, **kwargs: Any) -> Any:
        _INFERRING.depth = getattr(_INFERRING, "depth", 0) + 1
        try:
            return _bound_output_spec(fn, *args, **kwargs)
        finally:
            _INFERRING.depth -= 1

    def _bound_output_spec(fn: Any, *args: Any, **kwargs: Any) -> Any:
        static = {
            key: value
            for key, value in kwargs.items()
            if not isinstance(value, _PYTHON_SCALARS) and _python_only(value)
        }
        positions = [
            index
            for index, value in enumerate(args)
            if not isinstance(value, _PYTHON_SCALARS) and _python_only(value)
        ]
        if not static and not positions:
            return original(fn, *args, **kwargs)
        fixed = {index: args[index] for index in positions}
        count = len(args)

        def bound(*rest: Any, **rest_kwargs: Any) -> Any:
            values = iter(rest)
            merged = [fixed[i] if i in fixed else next(values) for i in range(count)]
            return fn(*merged, *values, **rest_kwargs, **static)

        rest = [value for index, value in enumerate(args) if index not in fixed]
        rest_kwargs = {key: value for key, value in kwargs.items() if key not in static}
        return original(functools.wraps(fn)(bound), *rest, **rest_kwargs)

    backend.compute_output_spec = in_this_thread(compute_output_spec, original)
    try:
        yield
    finally:
        backend.compute_output_spec = original


@contextlib.contextmanager
def output_specs_without_call_context() -> Iterator[None]:
    """Inside the block, a layer's own ``compute_output_spec`` is not handed the
    ``training`` and ``mask`` arguments its signature does not take.

    A layer called on symbolic tensors gets its output from
    ``Layer.symbolic_call``, which passes ``compute_output_spec`` every argument of
    the call, including the ones Keras adds itself (``training``, resolved from the
    outer call, and ``mask``). A layer that overrides ``compute_output_spec`` with
    only its tensor arguments (KerasHub D-FINE's encoder and prediction heads) then
    raises ``TypeError: compute_output_spec() got an unexpected keyword argument
    'training'``. A Functional model never meets this when such a layer is nested in
    another one (the outer layer's spec answers for it), but tracing the outer
    layer's ``call()`` calls the nested layer symbolically. Within the block those
    arguments, which select a mode and never an output shape, are dropped from a
    ``compute_output_spec`` call whose signature does not accept them; the recorded
    node keeps them. Not thread-safe: it patches ``Layer.symbolic_call`` for the
    duration of the block.
    """
    if not _patchable("output_specs_without_call_context"):
        yield
        return
    cls = keras.Layer
    original = cls.__dict__["symbolic_call"]

    def symbolic_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            parameters = inspect.signature(self.compute_output_spec).parameters.values()
        except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
            return original(self, *args, **kwargs)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            accepted = {p.name for p in parameters}
            context = set(getattr(self, "_call_context_args", ())) | {"mask"}
            for name in context - accepted:
                kwargs.pop(name, None)
            # Arguments left at None (KerasHub's CachedMultiHeadAttention's ``cache``)
            # that an inherited compute_output_spec does not take select no shape.
            for name in [k for k, v in kwargs.items() if v is None and k not in accepted]:
                kwargs.pop(name)
        return original(self, *args, **kwargs)

    cls.symbolic_call = in_this_thread(symbolic_call, original)
    try:
        yield
    finally:
        cls.symbolic_call = original


class _KerasOpsNamespace:
    """``keras.ops`` (or one of its submodules) where a backend module was asked for."""

    def __init__(self, ops_module: Any, backend_module: Any):
        self._ops = ops_module
        self._backend = backend_module

    def __getattr__(self, name: str) -> Any:
        return _ops_instead(self._ops, name, getattr(self._backend, name))


def _ops_instead(ops_module: Any, name: str, fallback: Any) -> Any:
    """``ops_module.name`` where it exists (a submodule as a :class:`_KerasOpsNamespace`
    over ``fallback``: ``backend.numpy.split`` is ``keras.ops``'s numpy module's), else
    ``fallback``, the backend's own."""
    value = getattr(ops_module, name, None)
    if value is None:
        return fallback
    if inspect.ismodule(value):
        return _KerasOpsNamespace(value, fallback)
    return value


@contextlib.contextmanager
def backend_calls_recorded() -> Iterator[None]:
    """Inside the block, Keras code that calls backend functions through a
    ``DynamicBackend`` calls the ``keras.ops`` function of the same name instead.

    Keras's bounding-box utilities (``keras.utils.bounding_boxes.convert_format``,
    which KerasHub's D-FINE decoder calls) and its preprocessing layers compute with
    ``self.backend.cast(...)``, ``self.backend.numpy.split(...)``: the backend's own
    modules, which reject a symbolic tensor. The ``keras.ops`` functions of the same
    names compute the same thing and record an operation on a symbolic tensor (on
    other values they run the backend's code as before). Names ``keras.ops`` lacks
    still reach the backend. Not thread-safe: it patches ``DynamicBackend.__getattr__``
    for the duration of the block.
    """
    from keras.src import ops
    from keras.src.utils.backend_utils import DynamicBackend

    if not _patchable("backend_calls_recorded"):
        yield
        return
    original = DynamicBackend.__getattr__

    def getattr_(self: Any, name: str) -> Any:
        return _ops_instead(ops, name, original(self, name))

    DynamicBackend.__getattr__ = in_this_thread(getattr_, original)
    try:
        yield
    finally:
        DynamicBackend.__getattr__ = original


@contextlib.contextmanager
def backend_arrays_defer_to_symbolic() -> Iterator[None]:
    """Inside the block, ``jax_array + keras_tensor`` records ``keras.ops.add``.

    A JAX array's operators convert the other operand through its ``__jax_array__``,
    which a ``KerasTensor`` defines only to raise ("A KerasTensor cannot be used as
    input to a JAX function"); without it the array's operator returns
    NotImplemented and Python calls the symbolic tensor's reflected operator, which
    records the ``keras.ops`` operation (TensorFlow tensors already defer so).
    KerasHub D-FINE writes ``(0.5 * abs(self.reg_scale) + distance)``: ``abs`` of a
    variable is an array. Within the block ``KerasTensor.__jax_array__`` is
    removed; a JAX function handed a symbolic tensor still raises. Not
    thread-safe: it patches ``KerasTensor`` for the duration of the block.
    """
    cls = keras.KerasTensor
    original = (
        cls.__dict__.get("__jax_array__")
        if _patchable("backend_arrays_defer_to_symbolic")
        else None
    )
    if original is not None:
        delattr(cls, "__jax_array__")
    try:
        yield
    finally:
        if original is not None:
            cls.__jax_array__ = original


@contextlib.contextmanager
def input_checks_ignoring(unknown: Callable[[int], bool]) -> Iterator[None]:
    """Inside the block, Keras's input checks see each size for which ``unknown``
    is true as unknown (None).

    Tracing gives unknown input sizes concrete stand-in values; a nested model or a
    layer with an ``input_spec`` built for a static size (KerasHub SAM's mask
    downscaler, built for 4x its embedding size) would refuse them, where Keras
    accepts the unknown size they stand for. Patches
    ``keras.src.layers.input_spec.assert_input_compatibility`` and
    ``Function._assert_input_compatibility`` for the duration of the block.
    """
    from keras import tree
    from keras.src.layers import input_spec
    from keras.src.ops.function import Function

    def relaxed(x: Any) -> Any:
        if not isinstance(x, keras.KerasTensor):
            return x
        shape = tuple(None if isinstance(d, int) and unknown(d) else d for d in x.shape)
        return keras.KerasTensor(shape, dtype=x.dtype)

    if not _patchable("input_checks_ignoring"):
        yield
        return
    check_layer = input_spec.assert_input_compatibility
    check_function = Function.__dict__["_assert_input_compatibility"]

    def assert_input_compatibility(input_spec: Any, inputs: Any, layer_name: Any) -> Any:
        return check_layer(input_spec, tree.map_structure(relaxed, inputs), layer_name)

    def function_check(self: Any, inputs: Any) -> Any:
        return check_function(self, tree.map_structure(relaxed, inputs))

    input_spec.assert_input_compatibility = in_this_thread(assert_input_compatibility, check_layer)
    Function._assert_input_compatibility = in_this_thread(function_check, check_function)
    try:
        yield
    finally:
        input_spec.assert_input_compatibility = check_layer
        Function._assert_input_compatibility = check_function


def _symbolic_equal(self: Any, other: Any) -> Any:
    """``KerasTensor.__eq__`` inside :func:`symbolic_equality`."""
    import numpy as np
    from keras import ops

    if isinstance(other, bool | int | float | np.number | np.ndarray):
        return ops.equal(self, other)
    return NotImplemented


@contextlib.contextmanager
def symbolic_equality() -> Iterator[None]:
    """Inside the block, ``keras_tensor == number`` records ``keras.ops.equal``.

    ``KerasTensor`` defines ``!=``, ``<``, ``>`` as operations but not ``==`` (it
    stays hashable), so ``labels == 0`` on a symbolic tensor is Python's identity
    test, ``False``, where on eager tensors it is elementwise: KerasHub SAM's prompt
    encoder writes ``ops.where(labels == 0, ...)``. Tracing a call patches
    ``KerasTensor.__eq__`` for its duration so that a comparison with a number or
    an array records the operation; between tensors it stays identity (Keras's own
    bookkeeping compares tensors so). Restored on exit.
    """
    if not _patchable("symbolic_equality"):
        yield
        return
    cls = keras.KerasTensor
    original = cls.__dict__.get("__eq__")
    cls.__eq__ = in_this_thread(_symbolic_equal, cls.__eq__)
    try:
        yield
    finally:
        if original is None:
            del cls.__eq__
        else:
            cls.__eq__ = original


# --------------------------------------------------------- what the patches rely on
#
# Each patch above replaces a Keras (or JAX) internal for the duration of a block. A
# release can move or reshape that internal without a deprecation notice, so each
# patch names what it relies on here and checks it when it is installed: when the
# internal is not what the patch was written for, the patch installs nothing (the
# block runs on Keras's own code, which then fails, if it must, with Keras's own
# message) rather than replacing a function of another shape. KERAS_BN_DEBUG=1 turns
# such a skip into a RuntimeWarning; tests/test_upgrade_safety.py fails on it with the
# same sentence.


@dataclasses.dataclass(frozen=True)
class Reliance:
    """What one patch relies on.

    Attributes:
        patch: the patch, as ``module.function``.
        internal: the internal it relies on, as a reader would look it up.
        check: None while the internal is as relied on, else what changed.
        library: whose release can change it (``"keras"`` or ``"jax"``).
    """

    patch: str
    internal: str
    check: Callable[[], str | None]
    library: str = "keras"

    def problem(self) -> str | None:
        """None while the internal is as relied on; else one sentence naming the
        patch, the internal, the installed release and what changed."""
        try:
            change = self.check()
        except Exception as error:  # an import or attribute that moved
            change = f"{type(error).__name__}: {error}"
        if change is None:
            return None
        from importlib import metadata

        try:
            release = f"{self.library.capitalize()} {metadata.version(self.library)}"
        except metadata.PackageNotFoundError:  # pragma: no cover - not installed this way
            release = self.library.capitalize()
        return (
            f"keras_bn patch {self.patch} relies on {self.internal}; {release} changed it: {change}"
        )


@functools.lru_cache(maxsize=256)
def _parameter_names(function: Any) -> tuple[str, ...] | None:
    try:
        return tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return None


def _parameters_are(function: Any, *names: str) -> str | None:
    """None when ``function`` takes exactly the parameters ``names``, else what it takes."""
    if not callable(function):
        return f"it is {function!r}, not a function"
    found = _parameter_names(function)
    if found is None:
        return "it has no signature to read"
    if found != names:
        return f"it takes ({', '.join(found)}), not ({', '.join(names)})"
    return None


def _defined(owner: Any, *names: str) -> str | None:
    """None when ``owner`` has every attribute of ``names``, else the first one missing."""
    for name in names:
        if not hasattr(owner, name):
            return f"{getattr(owner, '__name__', owner)!r} has no attribute {name!r}"
    return None


def _first(*problems: Callable[[], str | None]) -> str | None:
    for problem in problems:
        found = problem()
        if found is not None:
            return found
    return None


def _python_utils() -> Any:
    from keras.src.utils import python_utils

    return python_utils


def _saving_lib() -> Any:
    from keras.src.saving import saving_lib

    return saving_lib


def _backend_variable() -> Any:
    from keras.src.backend import Variable

    return Variable


def _initializer_classes() -> str | None:
    from keras.src.initializers import constant_initializers, random_initializers

    return _first(
        lambda: _defined(constant_initializers, "Constant", "Ones", "Zeros"),
        lambda: _defined(random_initializers, "RandomInitializer"),
    )


def _tensorflow_probe() -> str | None:
    from keras.src.utils import module_utils

    probe = module_utils.LazyModule("tensorflow")  # a fresh one: nothing answered yet
    if getattr(probe, "_available", "missing") is not None:
        return "a new LazyModule has no `_available = None` slot for the answer"
    if not isinstance(getattr(type(probe), "available", None), property):
        return "LazyModule.available is no longer a property"
    probe._available = False
    if probe.available is not False:
        return "LazyModule.available no longer returns `_available` once it is set"
    return _defined(module_utils, "tensorflow")


def _float64_table() -> str | None:
    from keras.src.backend.common import dtypes

    table = getattr(dtypes, "BIT64_TO_BIT32_DTYPE", None)
    if not isinstance(table, dict) or "float64" not in table:
        return f"keras.src.backend.common.dtypes.BIT64_TO_BIT32_DTYPE is {table!r}"
    return None


def _jax_core() -> Any:
    from keras.src.backend.jax import core

    return core


def _jax_convolutions() -> str | None:
    from keras.src.backend.jax import nn

    names = ("inputs", "kernel", "strides", "padding", "data_format", "dilation_rate")
    return _first(
        lambda: _parameters_are(getattr(nn, "depthwise_conv", None), *names),
        lambda: _parameters_are(getattr(nn, "conv", None), *names),
    )


def _operators_exist() -> str | None:
    from keras import ops

    return _first(
        lambda: _defined(keras.Variable, *_VARIABLE_OPERATORS),
        lambda: _defined(ops, *{function for function, _ in _VARIABLE_OPERATORS.values()}),
    )


def _node_class() -> Any:
    from keras.src.ops.node import Node

    return Node


def _backend_compute_output_spec() -> str | None:
    from keras.src import backend

    function = getattr(backend, "compute_output_spec", None)
    return _parameters_are(function, "fn", "args", "kwargs")


def _symbolic_call() -> str | None:
    if "symbolic_call" not in keras.Layer.__dict__:
        return "keras.Layer no longer defines symbolic_call itself"
    return None


def _dynamic_backend_getattr() -> str | None:
    from keras.src.utils.backend_utils import DynamicBackend

    if "__getattr__" not in DynamicBackend.__dict__:
        return "DynamicBackend no longer defines __getattr__"
    return _parameters_are(DynamicBackend.__dict__["__getattr__"], "self", "name")


def _input_checks() -> str | None:
    from keras.src.layers import input_spec
    from keras.src.ops.function import Function

    if "_assert_input_compatibility" not in Function.__dict__:
        return "Function no longer defines _assert_input_compatibility"
    return _first(
        lambda: _parameters_are(
            getattr(input_spec, "assert_input_compatibility", None),
            "input_spec",
            "inputs",
            "layer_name",
        ),
        lambda: _parameters_are(Function.__dict__["_assert_input_compatibility"], "self", "inputs"),
    )


# Patch (this module's function) -> what it relies on.
RELIANCES: dict[str, Reliance] = {
    reliance.patch.rpartition(".")[2]: reliance
    for reliance in (
        Reliance(
            "_keras_internals.lambda_globals",
            "keras.src.utils.python_utils.func_load(code, defaults, closure, globs), "
            "looked up at call time by the Lambda layer",
            lambda: _parameters_are(
                _python_utils().func_load, "code", "defaults", "closure", "globs"
            ),
        ),
        Reliance(
            "_keras_internals.saving_temp_dirs_in",
            "keras.src.saving.saving_lib.get_temp_dir(), looked up at call time",
            lambda: _parameters_are(_saving_lib().get_temp_dir),
        ),
        Reliance(
            "_keras_internals.saved_weights_loading",
            "keras.src.backend.Variable._initialize_with_initializer(self, initializer) "
            "and ._convert_to_tensor(self, value, dtype)",
            lambda: _first(
                lambda: _parameters_are(
                    _backend_variable()._initialize_with_initializer, "self", "initializer"
                ),
                lambda: _parameters_are(
                    _backend_variable()._convert_to_tensor, "self", "value", "dtype"
                ),
                lambda: _defined(_backend_variable(), "_initialize"),
                _initializer_classes,
            ),
        ),
        Reliance(
            "_keras_internals.tensorflow_probe_answered",
            "keras.src.utils.module_utils.tensorflow (a LazyModule answering `available` "
            "from its `_available`)",
            _tensorflow_probe,
        ),
        Reliance(
            "_keras_internals.tensorflow_probe_deferred",
            "keras.src.utils.module_utils.tensorflow (a LazyModule answering `available` "
            "from its `_available`)",
            _tensorflow_probe,
        ),
        Reliance(
            "_keras_internals.float64_type_promotion",
            "keras.src.backend.common.dtypes.BIT64_TO_BIT32_DTYPE['float64']",
            _float64_table,
        ),
        Reliance(
            "_keras_internals.jax_x64_slice_indices",
            "keras.src.backend.jax.core.slice(inputs, start_indices, shape)",
            lambda: _parameters_are(
                getattr(_jax_core(), "slice", None), "inputs", "start_indices", "shape"
            ),
        ),
        Reliance(
            "_keras_internals.jax_depthwise_convolutions",
            "keras.src.backend.jax.nn.depthwise_conv and .conv(inputs, kernel, strides, "
            "padding, data_format, dilation_rate), looked up at call time by keras.ops",
            _jax_convolutions,
        ),
        Reliance(
            "_keras_internals.symbolic_variable_arithmetic",
            "keras.Variable's arithmetic operators and the keras.ops functions of the same names",
            _operators_exist,
        ),
        Reliance(
            "_keras_internals.none_outputs_recorded",
            "keras.src.ops.node.Node.__init__(self, operation, call_args, call_kwargs, outputs)",
            lambda: _parameters_are(
                _node_class().__init__,
                "self",
                "operation",
                "call_args",
                "call_kwargs",
                "outputs",
            ),
        ),
        Reliance(
            "_keras_internals.static_python_arguments",
            "keras.src.backend.compute_output_spec(fn, *args, **kwargs)",
            _backend_compute_output_spec,
        ),
        Reliance(
            "_keras_internals.output_specs_without_call_context",
            "keras.Layer.symbolic_call(self, *args, **kwargs)",
            _symbolic_call,
        ),
        Reliance(
            "_keras_internals.backend_calls_recorded",
            "keras.src.utils.backend_utils.DynamicBackend.__getattr__(self, name)",
            _dynamic_backend_getattr,
        ),
        Reliance(
            "_keras_internals.backend_arrays_defer_to_symbolic",
            "keras.KerasTensor.__jax_array__ (defined on the class itself)",
            lambda: (
                None
                if "__jax_array__" in keras.KerasTensor.__dict__
                else "keras.KerasTensor no longer defines __jax_array__ itself"
            ),
        ),
        Reliance(
            "_keras_internals.input_checks_ignoring",
            "keras.src.layers.input_spec.assert_input_compatibility(input_spec, inputs, "
            "layer_name) and keras.src.ops.function.Function._assert_input_compatibility"
            "(self, inputs)",
            _input_checks,
        ),
        Reliance(
            "_keras_internals.symbolic_equality",
            "keras.KerasTensor without an elementwise __eq__ of its own",
            lambda: (
                None
                if keras.KerasTensor.__dict__.get("__eq__") in (None, _symbolic_equal)
                else "keras.KerasTensor now defines __eq__ itself"
            ),
        ),
    )
}


def _patchable(patch: str) -> bool:
    """Whether the internal ``patch`` relies on is as it was written for; if not, say so
    under KERAS_BN_DEBUG=1 (the caller then installs nothing)."""
    problem = RELIANCES[patch].problem()
    if problem is None:
        return True
    import os

    if os.environ.get("KERAS_BN_DEBUG"):
        import warnings

        warnings.warn(f"{problem}; not patching it", RuntimeWarning, stacklevel=4)
    return False

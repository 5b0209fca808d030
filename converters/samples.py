"""Inputs for a Keras model: generated samples, user inputs matched, and the run.

:func:`make_sample_inputs` is the one generator of made-up inputs (validation,
the fold self-check, the fallback exporter, the CLI); :func:`normalize_inputs`
checks user inputs against the model; :func:`call_model` runs the model on them
(on JAX, compiled whole, ahead of time with :func:`prepare_call`). Each takes a
``keras.Model`` or the run's :class:`~.prepared.PreparedModel`, whose inputs'
names, shapes and value ranges (:mod:`.prepared`) they read.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import tree

from keras_bn import _keras_internals as internals
from keras_bn import _xla as xla
from keras_bn.converters import graph as graph_lib
from keras_bn.converters.errors import UserInputError
from keras_bn.converters.prepared import (
    FLOAT_DOMAINS,
    NORMALIZATION_DOMAIN,
    ModelLike,
    domain_details,
    input_domains,
    normalization_statistics,
    prepare,
)

__all__ = [
    "FLOAT_DOMAINS",
    "NORMALIZATION_DOMAIN",
    "UNKNOWN_DIMENSION_SIZE",
    "VALIDATION_SAMPLES",
    "MIN_VALIDATION_SAMPLES",
    "VALIDATION_VALUES",
    "validation_samples",
    "describe_generated_inputs",
    "call_model",
    "input_domains",
    "make_sample_inputs",
    "normalize_inputs",
    "check_input_values",
    "prepare_call",
    "sample_arrays",
    "sample_specs",
    "with_input_shapes",
]

UNKNOWN_DIMENSION_SIZE = 32  # generated inputs use this size for unknown non-batch axes
# Samples the CLI validates on by default (generated in the model's input domain):
# enough that a sample-dependent bug shows (a channel that only some inputs reach).
# What shows it is how many values reach a channel, and a convolution's channel sees
# every position of every sample: so up to VALIDATION_SAMPLES, fewer where one
# sample holds many values (validation_samples). The library's validate_onnx keeps
# its own default batch sizes.
VALIDATION_SAMPLES = 16
VALIDATION_VALUES = 2**18  # 16 samples of up to 16,384 values each ... 2 of 131,072 or more
MIN_VALIDATION_SAMPLES = 2  # more than one: a bug in the batch axis shows
_INTEGER_HIGH = 10  # integer inputs no Embedding reads: uniform in [0, this)


def with_input_shapes(
    model: keras.Model, input_shapes: Mapping[str, Sequence[int | None]]
) -> keras.Model:
    """``model`` called on inputs of the given sizes after the batch, by input name
    (a fixed sequence length where the model takes any): a Functional model around
    it, with the same input names, whose export has those static sizes. Inputs not
    named keep their shapes."""
    from keras_bn import _keras_internals as internals

    model = graph_lib.with_graph(model)  # a subclassed model: the Functional model calling it
    functional = internals.functional_of(model)
    struct = internals.inputs_struct(functional)
    names = [internals.producing_operation(kt).name for kt in tree.flatten(struct)]
    unknown = sorted(set(input_shapes) - set(names))
    if unknown:
        raise UserInputError(
            f"input sizes given for {unknown} (input_shapes; CLI: --input-shape), which "
            f"are not inputs of the model; expected some of {names}."
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


def make_sample_inputs(
    model: ModelLike, batch_size: int = 1, seed: int = 0
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
    uniform in ``[0, input_dim)``; a padding mask (an integer or boolean
    ``(batch, length)`` input named ``...mask``) is 1 then 0 from a random length on
    (the first sample unpadded); other integer inputs are uniform in ``[0, 10)``,
    boolean inputs fair coin flips. Unknown non-batch dimensions get size
    ``UNKNOWN_DIMENSION_SIZE`` (32), or a learned position embedding's length where
    that is shorter.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserInputError(f"batch_size must be a positive integer; received {batch_size!r}.")
    prepared = prepare(model)
    return _arrays(prepared.graph, prepared.domain_details, batch_size, seed)


def sample_specs(
    model: ModelLike | graph_lib.Graph, batch_size: int = 1
) -> list[tuple[tuple[int, ...], np.dtype]]:
    """The ``(shape, dtype)`` of each array :func:`make_sample_inputs` makes, in input order."""
    graph = model if isinstance(model, graph_lib.Graph) else prepare(model).graph
    unknown = _unknown_size(graph)
    return [
        (
            (batch_size,) + tuple(unknown if size is None else size for size in tensor.shape[1:]),
            np.dtype(tensor.dtype),
        )
        for tensor in graph.inputs
    ]


def _unknown_size(graph: graph_lib.Graph) -> int:
    """The size of generated inputs' unknown non-batch dimensions:
    ``UNKNOWN_DIMENSION_SIZE``, or fewer where a learned position embedding holds
    fewer positions (a BERT built with ``max_sequence_length=16``)."""
    limits = [found[1] for node in graph.nodes if (found := _positions(node)) is not None]
    return min([UNKNOWN_DIMENSION_SIZE, *limits])


def validation_samples(model: ModelLike) -> int:
    """How many samples the CLI generates to validate ``model`` on: enough that the
    inputs hold ``VALIDATION_VALUES`` values (by :func:`sample_specs`' shapes), at
    most ``VALIDATION_SAMPLES``, at least ``MIN_VALIDATION_SAMPLES``. A 64x64 RGB
    image gets 16 samples; a 128x128 one 6; a 224x224 one 2."""
    needed = -(-VALIDATION_VALUES // max(_values_per_sample(model), 1))
    return max(MIN_VALIDATION_SAMPLES, min(VALIDATION_SAMPLES, needed))


def _values_per_sample(model: ModelLike) -> int:
    """How many values one generated sample holds, over every input."""
    return sum(int(np.prod(shape)) for shape, _ in sample_specs(model))


def sample_arrays(
    graph: graph_lib.Graph, batch_size: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """:func:`make_sample_inputs` for a flattened graph."""
    return _arrays(graph, domain_details(graph), batch_size, seed)


def _arrays(
    graph: graph_lib.Graph, domains: Mapping[str, tuple], batch_size: int, seed: int
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = {}
    for tensor, name, (shape, dtype) in zip(
        graph.inputs, graph.input_names, sample_specs(graph, batch_size), strict=True
    ):
        array: np.ndarray
        if dtype.kind == "f":
            normalization = normalization_statistics(tensor)
            if normalization is not None:
                mean, std = normalization
                array = mean + std * rng.standard_normal(size=shape)
            else:
                array = np.asarray(domains[name][2](rng, shape))
        elif _is_padding_mask(name, shape, dtype):
            array = _padding_mask(rng, shape)
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


def _is_padding_mask(name: str, shape: Sequence[int | None], dtype: np.dtype) -> bool:
    """Whether an input is a padding mask by its name (KerasHub's ``padding_mask``,
    ``encoder_padding_mask``; an ``attention_mask``): an integer or boolean
    ``(batch, length)`` input whose name ends in "mask"."""
    return name.lower().endswith("mask") and dtype.kind in "iub" and len(shape) == 2


def _padding_mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Padding masks as a tokenizer makes them: each sample's first ``n`` positions 1,
    the rest 0 (padding at the end), ``n`` uniform in ``[1, length]``; the first
    sample unpadded."""
    batch, length = shape
    kept = rng.integers(1, length + 1, size=batch) if length else np.zeros(batch, np.int64)
    kept[:1] = length
    return np.arange(length)[None, :] < kept[:, None]


def _integer_high(tensor: graph_lib.Tensor) -> int:
    """Integer inputs are uniform in ``[0, high)``: an Embedding's vocabulary, else 10."""
    high = _INTEGER_HIGH
    for consumer in tensor.consumers:
        size = _vocabulary(consumer.layer)
        if size is not None:
            high = size
    return high


def describe_generated_inputs(model: ModelLike, count: int) -> str:
    """How :func:`make_sample_inputs` makes ``count`` samples, and why, in one line
    (from the domains the prepared model inferred for them: no second probe)."""
    prepared = prepare(model)
    graph, domains = prepared.graph, prepared.domain_details
    parts = []
    for tensor, name in zip(graph.inputs, graph.input_names, strict=True):
        kind = np.dtype(tensor.dtype).kind
        if name in domains:
            domain, why, _ = domains[name]
            parts.append(f"{name}: {domain} ({why})")
        elif _is_padding_mask(name, tuple(tensor.shape), np.dtype(tensor.dtype)):
            parts.append(f"{name}: 1s then 0s (a padding mask, by its name; lengths vary)")
        elif kind in "iu":
            embedding = any(_vocabulary(c.layer) is not None for c in tensor.consumers)
            why = "the Embedding's vocabulary" if embedding else "no Embedding gives a range"
            high = _integer_high(tensor)
            parts.append(f"{name}: integers 0..{high - 1} ({why})")
        else:
            parts.append(f"{name}: fair coin flips")
    where = "; ".join(parts)
    fewer = ""
    if count < VALIDATION_SAMPLES and count == validation_samples(prepared):
        values = _values_per_sample(prepared)
        fewer = f" (not {VALIDATION_SAMPLES}: {values:,} values each; --samples N for more)"
    return (
        f"generated, {count} sample(s){fewer}: {where}; give your own with --inputs FILE.npz "
        "(inputs=...)"
    )


def normalize_inputs(model: ModelLike, inputs: Any) -> dict[str, np.ndarray]:
    """User inputs (a dict by input name, a list in input order, or one array) checked
    against the model's inputs, keyed by input name, cast to their dtypes."""
    specs = prepare(model).inputs
    names = [spec.name for spec in specs]
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
    for spec, array in zip(specs, arrays, strict=True):
        array = np.asarray(array)
        expected = spec.shape
        if array.ndim != len(expected) or any(
            size is not None and size != actual
            for size, actual in zip(expected[1:], array.shape[1:], strict=True)
        ):
            raise UserInputError(
                f"input {spec.name!r} has shape {array.shape}; expected {expected} (None: any "
                "size)."
            )
        if array.shape[0] < 1:
            raise UserInputError(f"input {spec.name!r} is empty; pass at least one sample.")
        result[spec.name] = array.astype(np.dtype(spec.dtype), copy=False)
    return result


def _vocabulary(layer: Any) -> int | None:
    """The ids ``layer`` looks up, ``[0, n)``: an Embedding's ``input_dim``, or a layer
    built around one (KerasHub's ``TokenAndPositionEmbedding``); else None."""
    if isinstance(layer, keras.layers.Embedding):
        return int(layer.input_dim)
    inner = getattr(layer, "token_embedding", None)
    return int(inner.input_dim) if isinstance(inner, keras.layers.Embedding) else None


def _positions(node: graph_lib.Node) -> tuple[graph_lib.Tensor, int] | None:
    """A learned position embedding's (KerasHub's ``PositionEmbedding``, or one built
    into ``TokenAndPositionEmbedding``) integer graph input and its number of
    positions: the ids' last axis may not be longer. The ids reach a
    ``PositionEmbedding`` through their Embedding (``(batch, length)`` to ``(batch,
    length, features)``, whose length axis it reads); None for any other node."""
    from keras_bn.converters.tracing import length_limit

    if not type(node.layer).__name__.endswith("PositionEmbedding") or not node.inputs:
        return None
    limit = length_limit(node.layer)
    if limit is None:
        return None
    tensor = node.inputs[0]
    if _vocabulary(node.layer) is None:  # a PositionEmbedding: back through one Embedding
        producer = tensor.producer
        if producer is None or not isinstance(producer.layer, keras.layers.Embedding):
            return None
        tensor = producer.inputs[0]
    if tensor.producer is not None or np.dtype(tensor.dtype).kind not in "iu":
        return None
    return tensor, limit


def check_input_values(model: ModelLike, inputs: Mapping[str, np.ndarray], where: str) -> None:
    """User inputs' integer ids checked against what the model can look up: an
    Embedding's vocabulary (onnxruntime refuses an id outside it, and Keras on JAX
    returns NaN for it) and a learned position embedding's length. One
    :class:`UserInputError` line naming ``where`` (``"Calibration file 'c.npz'"``),
    the input and the layer, rather than a failure deep inside a run."""
    prepared = prepare(model)
    graph = prepared.graph
    names = {id(tensor): name for tensor, name in zip(graph.inputs, graph.input_names, strict=True)}
    for tensor, name in zip(graph.inputs, graph.input_names, strict=True):
        array = inputs.get(name)
        if array is None or np.asarray(array).dtype.kind not in "iub":
            continue
        for consumer in tensor.consumers:
            size = _vocabulary(consumer.layer)
            if size is None or array.size == 0:
                continue
            low, high = int(np.min(array)), int(np.max(array))
            if low < 0 or high >= size:
                found = low if low < 0 else high
                raise UserInputError(
                    f"{where}: input {name!r} holds the id {found}, outside the vocabulary "
                    f"of {consumer.name!r} ({type(consumer.layer).__name__}, ids 0 to "
                    f"{size - 1}); give ids the model was built for."
                )
    for node in graph.nodes:
        position = _positions(node)
        if position is None:
            continue
        ids, limit = position
        ids_name = names.get(id(ids))
        given = inputs.get(ids_name) if ids_name is not None else None
        if given is not None and np.ndim(given) >= 2 and np.shape(given)[-1] > limit:
            raise UserInputError(
                f"{where}: input {ids_name!r} holds sequences of {np.shape(given)[-1]}; "
                f"{node.name!r} ({type(node.layer).__name__}) has {limit} positions: give "
                f"sequences of at most {limit}."
            )


# --------------------------------------------------------------------------------------
# Running the model.


def call_model(model: ModelLike, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The Keras model's outputs (inference mode) on ``inputs`` (arrays by input name),
    as NumPy arrays, flattened in the order of the model's outputs.

    On JAX the pass runs as one compiled XLA program per input shape (see
    :func:`prepare_call`); a model whose Python ``call`` jax.jit cannot trace runs
    eagerly.
    """
    prepared = prepare(model)
    keras_model = prepared.model
    functional = internals.functional_of(keras_model)
    arrays = [inputs[name] for name in prepared.input_names]
    structure = tree.pack_sequence_as(internals.inputs_struct(functional), arrays)
    outputs = None
    if keras.backend.backend() == "jax":
        try:
            outputs = _compiled_forward(keras_model)(structure)
        except Exception:  # Python in a layer's call that jax.jit cannot trace
            outputs = None
    if outputs is None:
        outputs = keras_model(structure, training=False)
    return [keras.ops.convert_to_numpy(output) for output in tree.flatten(outputs)]


def prepare_call(model: ModelLike, batch_size: int) -> None:
    """Get :func:`call_model` ready for :func:`make_sample_inputs`'s inputs of
    ``batch_size`` samples: on JAX, compile the model's pass for their shapes now (a
    thread can do it while the inputs are being made); nothing on other backends. A
    model that cannot be compiled is left to :func:`call_model`, which says why."""
    if keras.backend.backend() != "jax":
        return
    import jax

    prepared = prepare(model)
    functional = internals.functional_of(prepared.model)
    avals = [
        jax.ShapeDtypeStruct(tuple(shape), dtype)
        for shape, dtype in sample_specs(prepared, batch_size)
    ]
    structure = tree.pack_sequence_as(internals.inputs_struct(functional), avals)
    try:
        _compiled_forward(prepared.model).compile(structure)
    except Exception:  # call_model falls back to running it eagerly
        pass


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _CompiledForward:
    """On JAX: the model's inference pass compiled as one XLA program per input
    shape (kept as long as the model lives), as ``model.predict`` does.

    Called eagerly, JAX compiles every operation on its own, several times slower
    than compiling the pass whole (BENCHMARKS.md).
    """

    def __init__(self, model: keras.Model) -> None:
        ref: Callable[[], Any] = weakref.ref(model)  # the cache must not keep the model alive

        def call(trainable: list, non_trainable: list, inputs: Any) -> Any:
            outputs, _ = ref().stateless_call(trainable, non_trainable, inputs, training=False)
            return outputs

        self._model = ref
        # A quick compile (keras_bn._xla): the few samples a check or validation runs.
        self._jitted = xla.jit(call, quick=True)
        self._executables: dict[Any, Any] = {}

    def _state(self) -> tuple[list, list]:
        live = self._model()
        return (
            [v.value for v in live.trainable_variables],
            [v.value for v in live.non_trainable_variables],
        )

    @staticmethod
    def _key(structure: Any) -> Any:
        return tuple((tuple(x.shape), str(x.dtype)) for x in tree.flatten(structure))

    def compile(self, structure: Any) -> Any:
        """The executable for inputs shaped like ``structure`` (arrays or avals)."""
        key = self._key(structure)
        executable = self._executables.get(key)
        if executable is None:
            trainable, non_trainable = self._state()
            executable = self._jitted.lower(trainable, non_trainable, structure).compile()
            self._executables[key] = executable
        return executable

    def __call__(self, structure: Any) -> Any:
        return self.compile(structure)(*self._state(), structure)


def _compiled_forward(model: keras.Model) -> _CompiledForward:
    forward = _COMPILED.get(model)
    if forward is None:
        forward = _COMPILED[model] = _CompiledForward(model)
    return forward

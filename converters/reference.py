"""What an export is compared against: Keras's own run, and a float64 twin of the model.

:class:`KerasReference` is Keras float32's outputs on the inputs a validation
compares on: computed in a background thread while the caller exports (the
``keras-bn`` command's one Keras pass), or given. :func:`~.validation.validate_onnx`
takes it instead of running Keras again.

The float64 twin is the exact answer.

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

import concurrent.futures
import contextlib
import dataclasses
import importlib
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import keras
import numpy as np

from keras_bn import _keras_internals as internals
from keras_bn import _xla as xla
from keras_bn.converters.comparison import (
    EXACT_FACTOR,
    EXACT_FLOOR,
    OutputComparison,
    float16_rule,
    int8_rule,
    judge_precision,
    relative_error,
    within_float16_floor,
)
from keras_bn.converters.float64_kernels import replaced_class_name, twin_layer_class
from keras_bn.converters.prepared import ModelLike, PreparedModel, prepare
from keras_bn.converters.samples import call_model, make_sample_inputs, prepare_call

__all__ = [
    "Doubtful",
    "KerasReference",
    "Float64Twin",
    "error_summary",
    "float64_enabled",
    "float16_yardstick",
    "float64_twin",
    "rejudge_against_float64",
    "keras_run",
]

# Keras wraps an error inside a layer's call as "... when calling Conv3D.call() ...".
_FAILED_CALL = re.compile(r"calling (\w+)\.call\(\)")
_MAX_RETRIES = 8


class KerasReference:
    """Keras's outputs (inference mode) on the inputs a validation compares on.

    ``KerasReference(inputs, outputs)`` holds outputs already computed;
    :meth:`start` computes them in a background thread while the caller works on
    (XLA compilation, TensorFlow kernels and NumPy release the GIL). Either way
    :attr:`inputs` and :meth:`outputs` wait for what is not ready yet, and
    :meth:`outputs` raises what the run raised.
    """

    def __init__(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[np.ndarray]) -> None:
        """The reference of already computed ``outputs`` (flattened, as
        :func:`.samples.call_model` returns them) on ``inputs`` (by input name)."""
        self._inputs: concurrent.futures.Future = concurrent.futures.Future()
        self._outputs: concurrent.futures.Future = concurrent.futures.Future()
        self.generated = False  # the inputs were given, not made by :meth:`start`
        self.batch_size = len(next(iter(inputs.values()))) if inputs else 0
        self._inputs.set_result(dict(inputs))
        self._outputs.set_result([np.asarray(output) for output in outputs])

    @classmethod
    def start(
        cls,
        model: ModelLike,
        inputs: Mapping[str, np.ndarray] | None = None,
        *,
        batch_size: int = 2,
        seed: int = 0,
        context: Callable[[], contextlib.AbstractContextManager] | None = None,
        guard: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> KerasReference:
        """Run ``model`` on ``inputs`` in a background thread; return at once.

        ``inputs`` by input name; by default ``make_sample_inputs(model,
        batch_size, seed=seed)``, what validation would generate. On JAX the pass
        compiles for their shapes while a second thread makes them. The whole run
        happens inside ``context()`` (a progress display), the Keras pass itself
        inside ``guard()`` (which may turn its errors into the caller's).
        """
        started = cls.__new__(cls)
        return started.begin(prepare(model), inputs, batch_size, seed, context, guard)

    def begin(
        self,
        prepared: PreparedModel,
        inputs: Mapping[str, np.ndarray] | None,
        batch_size: int,
        seed: int,
        context: Callable[[], contextlib.AbstractContextManager] | None,
        guard: Callable[[], contextlib.AbstractContextManager] | None,
    ) -> KerasReference:
        """:meth:`start`'s work on a new, empty reference; returns it."""
        self.generated, self.batch_size = inputs is None, batch_size
        self._inputs = concurrent.futures.Future()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._outputs = pool.submit(self._run, prepared, inputs, batch_size, seed, context, guard)
        pool.shutdown(wait=False)
        return self

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        """The inputs (generated ones once they are made)."""
        return self._inputs.result()

    def outputs(self) -> list[np.ndarray]:
        """The outputs, once the run is done; its error if Keras failed."""
        return self._outputs.result()

    def _run(
        self,
        prepared: PreparedModel,
        given: Mapping[str, np.ndarray] | None,
        batch_size: int,
        seed: int,
        context: Callable[[], contextlib.AbstractContextManager] | None,
        guard: Callable[[], contextlib.AbstractContextManager] | None,
    ) -> list[np.ndarray]:
        with context() if context is not None else contextlib.nullcontext():
            try:
                if given is None:
                    inputs = self._make(prepared, batch_size, seed)
                else:
                    inputs = dict(given)
                    self._inputs.set_result(inputs)
            except BaseException as error:
                if not self._inputs.done():
                    self._inputs.set_exception(error)
                raise
            with guard() if guard is not None else contextlib.nullcontext():
                return call_model(prepared, inputs)

    def _make(self, prepared: PreparedModel, batch_size: int, seed: int) -> dict[str, np.ndarray]:
        """Generated inputs, available to :attr:`inputs` as soon as they are made; on
        JAX the pass compiles for their shapes meanwhile (XLA compiles without the
        GIL, and making them may run the layers before the first BatchNormalization:
        the input-domain probe)."""

        def make() -> dict[str, np.ndarray]:
            inputs = make_sample_inputs(prepared, batch_size, seed=seed)
            self._inputs.set_result(inputs)  # onnxruntime can run on them meanwhile
            return inputs

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            made = pool.submit(make)
            prepare_call(prepared, batch_size)
            return made.result()


@dataclasses.dataclass
class Float64Twin:
    """A float64 (or float16) copy of a model, and the layer classes that had to stay
    float32."""

    model: keras.Model
    float32_classes: tuple[str, ...] = ()
    dtype: str = "float64"
    # The run :func:`float64_twin` checked it with: (its inputs, its outputs), reused
    # by :meth:`__call__` for the same arrays rather than run again.
    checked: tuple[list[np.ndarray], list[np.ndarray]] | None = None
    # True: ``model`` is the model itself, not a copy (no copy could be made), its
    # floating layers switched to ``dtype`` for each run (:func:`_switched_policies`).
    switched: bool = False
    _jitted: Any = dataclasses.field(default=None, init=False, repr=False)

    @property
    def exact(self) -> bool:
        """Whether every floating layer computes in ``dtype``."""
        return not self.float32_classes

    def __call__(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Outputs (flattened, as float64) for ``inputs`` (one array per model input);
        the check run's outputs when given the arrays :func:`float64_twin` checked with.

        On JAX the pass runs as one compiled XLA program per input shape (eagerly, JAX
        would compile every operation on its own); a model jax.jit cannot trace runs
        eagerly, which also gives a failing layer's error its class name.
        """
        if self.checked is not None and _same_arrays(self.checked[0], inputs):
            return self.checked[1]
        feed = [_as_float(array, self.dtype) for array in inputs]
        structure = _called_with(self.model, feed)
        with (
            float64_enabled() if self.dtype == "float64" else contextlib.nullcontext(),
            _switched_policies(self.model, self.dtype, self.float32_classes)
            if self.switched
            else contextlib.nullcontext(),
        ):
            outputs = None
            if keras.backend.backend() == "jax":
                try:
                    outputs = self._compiled(structure)
                except Exception:  # Python jax.jit cannot trace, or a kernel that fails
                    outputs = None
            if outputs is None:
                outputs = self.model(structure, training=False)
            return [
                np.asarray(keras.ops.convert_to_numpy(y), np.float64)
                for y in keras.tree.flatten(outputs)
            ]

    def _compiled(self, structure: Any) -> Any:
        """The twin's pass as one XLA program, compiled once per input shape (JAX)."""
        if self._jitted is None:
            model = self.model

            def call(trainable: list, non_trainable: list, inputs: Any) -> Any:
                return model.stateless_call(trainable, non_trainable, inputs, training=False)[0]

            # A quick compile (as samples.call_model's): at XLA's optimization level 0
            # EfficientNetB0's float64 pass compiles in about half the time for a slower
            # run, less in all (BENCHMARKS.md section 15).
            self._jitted = xla.jit(call, quick=True)
        trainable = [v.value for v in self.model.trainable_variables]
        non_trainable = [v.value for v in self.model.non_trainable_variables]
        return self._jitted(trainable, non_trainable, structure)


def _same_arrays(first: list[np.ndarray], second: list[np.ndarray]) -> bool:
    """The same arrays (objects, or equal shapes, dtypes and values)."""
    return len(first) == len(second) and all(
        a is b
        or (
            np.shape(a) == np.shape(b)
            and np.asarray(a).dtype == np.asarray(b).dtype
            and np.array_equal(a, b)
        )
        for a, b in zip(first, second, strict=True)
    )


@contextlib.contextmanager
def float64_enabled() -> Iterator[None]:
    """Let the backend compute in float64 for the duration of the block.

    JAX silently computes float64 arrays in float32 unless its x64 mode is on, and
    Keras's type promotion turns float64 into float32 on every backend but TensorFlow
    (a float64 "twin" would then be a float32 copy). The twin is built and run
    inside this block, so the rest of the process keeps JAX's default 32-bit types.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(internals.float64_type_promotion())
        if backend == "jax":
            import jax

            enable_x64: Any = getattr(jax, "enable_x64", None)
            if enable_x64 is None:  # older jax
                enable_x64 = importlib.import_module("jax.experimental").enable_x64
            stack.enter_context(enable_x64(True))
            stack.enter_context(internals.jax_x64_slice_indices())
        yield


def float64_twin(
    model: keras.Model, sample_inputs: list[np.ndarray], dtype: str = "float64"
) -> Float64Twin:
    """Build the float64 twin of a Sequential/Functional ``model`` and check it runs.

    ``sample_inputs`` (one array per model input) are used to run the twin once; a
    layer class whose call fails in float64 is moved back to float32 and the twin is
    rebuilt, at most a few times. ``model`` is not modified. ``dtype="float16"``
    builds the float16 twin instead: the same computation rounded to float16, whose
    error is what a float16 export can be expected to make (:mod:`.comparison`).

    Where no copy can be made (a layer whose ``get_config`` raises, or whose config
    its constructor refuses: KerasHub's ``LlamaTransformerDecoder`` and
    ``ViTPatchingAndEmbedding``), the twin is the model itself, each floating layer's
    dtype policy switched to ``dtype`` for the twin's runs and restored after each:
    its inputs are cast to ``dtype`` and its float32 variables promoted where they
    meet them (exactly), so that arithmetic on variables alone stays float32. No
    other thread may run the model meanwhile (validation runs twins after Keras's own
    pass); a model whose policies hold quantization has no such twin.

    Raises:
        RuntimeError: the twin does not run even with the failing layers in float32.
    """
    float32_classes: list[str] = []
    switched = False
    for _ in range(_MAX_RETRIES):
        copy = model
        if not switched:
            try:
                copy = _clone_as(model, dtype, float32_classes)
            except Exception as error:
                if not _switchable(model):
                    raise
                switched, cloning = True, error_summary(error)
        twin = Float64Twin(copy, tuple(float32_classes), dtype, switched=switched)
        try:
            twin.checked = (list(sample_inputs), twin(sample_inputs))
            return twin
        except Exception as error:  # a backend kernel missing for float64
            match = _FAILED_CALL.search(str(error))
            failed = None if match is None else replaced_class_name(match.group(1))
            if failed is None or failed in float32_classes:
                copy_of = f"The {dtype} copy of model {model.name!r}"
                if switched:  # no copy: the model itself, its layers switched
                    copy_of = f"No copy ({cloning}): model {model.name!r} switched to {dtype}"
                raise RuntimeError(
                    f"{copy_of} does not run on the {keras.backend.backend()} backend "
                    f"({type(error).__name__})."
                ) from error
            float32_classes.append(failed)
    raise RuntimeError(f"The {dtype} copy of model {model.name!r} does not run.")


def _switchable(model: keras.Model) -> bool:
    """Whether every layer of ``model`` has a plain dtype policy (none quantized or
    mapped), which :func:`_switched_policies` can switch and restore."""
    return all(
        type(policy) is keras.DTypePolicy and policy.quantization_mode is None
        for policy in (layer.dtype_policy for layer in internals.flatten_layers(model))
    )


@contextlib.contextmanager
def _switched_policies(
    model: keras.Model, dtype: str, float32_classes: Sequence[str]
) -> Iterator[None]:
    """``model``'s own floating layers (but ``float32_classes``) computing in ``dtype``
    for the block (their dtype policies, Keras's public setter), restored after it.
    float16 is Keras's ``mixed_float16``: float32 variables are cast to float16 where
    read, as a float16 copy's would hold them (a plain float16 policy would leave
    them float32, and their products too). Under the cloning lock: one twin at a time
    switches or clones."""
    policy = "mixed_float16" if dtype == "float16" else dtype
    saved: list[tuple[Any, Any]] = []
    with _CLONING:
        try:
            for layer in internals.flatten_layers(model):
                if _retyped(layer, float32_classes):
                    saved.append((layer, layer.dtype_policy))
                    layer.dtype_policy = policy
            yield
        finally:
            for layer, original in reversed(saved):
                layer.dtype_policy = original


def _retyped(layer: Any, float32_classes: Sequence[str]) -> bool:
    """Whether a twin computes ``layer`` in its own dtype: a floating layer whose class
    has that dtype's kernels (not one of ``float32_classes``)."""
    return (
        _is_floating(getattr(layer, "compute_dtype", None))
        and type(layer).__name__ not in float32_classes
    )


def _is_floating(dtype: Any) -> bool:
    return dtype is not None and "float" in str(dtype)


def _as_float(array: np.ndarray, dtype: str = "float64") -> np.ndarray:
    array = np.asarray(array)
    return array.astype(dtype) if _is_floating(array.dtype) else array


def float16_yardstick(
    model: keras.Model, inputs: list[np.ndarray], judged: Iterable[tuple[np.ndarray, np.ndarray]]
) -> tuple[Float64Twin | None, list[np.ndarray] | None, str | None, bool]:
    """float16's yardstick for the ``judged`` outputs (``(candidate, exact)`` pairs):
    where every one is within the floor, which passes whatever it says, none is made
    (``(None, None, None, False)``); else the model's float16 copy, its outputs on
    ``inputs``, None and True; or, where no copy can be made or run, (None, None, why,
    True) and judge_float16 falls back."""
    if all(within_float16_floor(candidate, exact) for candidate, exact in judged):
        return None, None, None, False
    try:
        half = float64_twin(model, inputs, dtype="float16")
        return half, half(inputs), None, True  # the check run's outputs on these inputs
    except Exception as error:
        return None, None, f"the model's float16 copy failed: {error_summary(error)}", True


def error_summary(error: BaseException) -> str:
    """``Type: first line of the message`` (about 120 characters), for a report line."""
    text = str(error).splitlines()[0] if str(error) else ""
    text = text if len(text) <= 120 else text[:117].rstrip() + "..."
    return f"{type(error).__name__}: {text}"


def _called_with(model: keras.Model, flat: list[Any]) -> Any:
    """``flat`` (one item per model input, in ``model.inputs``' order) in the structure
    ``model`` is called with: a dict for a model built on a dict of inputs (KerasHub's
    text backbones, SAM), which Keras's cloning and calls require."""
    try:
        structure = internals.inputs_struct(internals.functional_of(model))
    except ValueError:  # no graph: the plain list, or the one input
        return flat if len(flat) > 1 else flat[0]
    return keras.tree.pack_sequence_as(structure, flat)


# One twin is cloned at a time: the patches below are process-wide, and two builds in
# two threads (a library caller validating in threads of its own) would each restore
# what the other patched, leaving Keras patched for good.
_CLONING = threading.Lock()


def _clone_as(model: keras.Model, dtype: str, float32_classes: list[str]) -> keras.Model:
    # get_config of every layer: no TensorFlow import on JAX (tensorflow_probe_deferred)
    with (
        _CLONING,
        # a float16 twin needs no 64-bit mode (which would patch Keras for the block)
        float64_enabled() if dtype == "float64" else contextlib.nullcontext(),
        internals.saved_weights_loading(),
        internals.tensorflow_probe_deferred(),
    ):
        return _clone_enabled(model, dtype, float32_classes)


def _clone_enabled(model: keras.Model, dtype: str, float32_classes: list[str]) -> keras.Model:
    pairs: list[tuple[Any, Any]] = []  # (original layer, its float64 copy)

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        if "dtype" in config and _retyped(layer, float32_classes):
            config = {**config, "dtype": dtype}
        # float64 only: a float16 twin stands for Keras's own float16 kernels
        replace = dtype == "float64" and config.get("dtype") == dtype
        copy = (twin_layer_class(layer) if replace else type(layer)).from_config(config)
        pairs.append((layer, copy))
        return copy

    inputs = [
        keras.Input(
            batch_shape=tensor.shape,
            dtype=dtype if _is_floating(tensor.dtype) else tensor.dtype,
            name=getattr(tensor, "name", None),
        )
        for tensor in model.inputs
    ]
    twin = keras.models.clone_model(
        model,
        input_tensors=_called_with(model, inputs),
        clone_function=clone,
        recursive=True,
    )
    for original, copy in pairs:
        # keras.ops operations (a Masking layer's mask comparison) are cloned too: no weights.
        weights = zip(getattr(original, "weights", ()), getattr(copy, "weights", ()), strict=True)
        for source, target in weights:
            value = np.asarray(keras.ops.convert_to_numpy(source))
            if _is_floating(target.dtype):
                with np.errstate(over="ignore"):  # float16: the twin's run shows the overflow
                    value = value.astype(target.dtype)
            target.assign(value)
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
    scores: bool = True  # class scores (int8 judges their top-1 agreement too)


def _outputs_for(
    item: Doubtful,
    copy: Float64Twin | None,
    outputs: list[np.ndarray] | None,
    full: list[np.ndarray],
) -> np.ndarray | None:
    """``copy``'s output for the samples ``item`` compares (None without a copy)."""
    if copy is None or outputs is None:
        return None
    if item.chunk is None:
        return outputs[item.output][: item.samples]
    return copy([array[item.chunk] for array in full])[item.output]


def _keras_noise(doubtful: list[Doubtful], exacts: list[np.ndarray | None]) -> dict[int, float]:
    """Keras's own error against float64 per model output, on its comparison with the
    most samples (the larger batch the others' samples are part of): float32's
    yardstick beside each comparison's own. Not the largest over the comparisons: each
    error is relative to its own comparison's range, and one sample's range can be a
    fraction of the batch's (its error then stood as the batch's yardstick, several
    times Keras's error on the batch)."""
    noise: dict[int, tuple[int, float]] = {}
    for item, exact in zip(doubtful, exacts, strict=True):
        if exact is not None and np.shape(item.expected) == np.shape(exact):
            measured = (item.samples, relative_error(item.expected, exact))
            noise[item.output] = max(noise.get(item.output, measured), measured)
    return {output: error for output, (_, error) in noise.items()}


def rejudge_against_float64(
    model: keras.Model,
    inputs: list[np.ndarray],
    comparisons: list[OutputComparison],
    doubtful: list[Doubtful],
    precision: str = "float32",
) -> str:
    """Re-judge the ``doubtful`` comparisons (in place) against a float64 run of ``model``
    on ``inputs`` (one array per model input, every sample the comparisons cover), by
    ``precision``'s criterion (:func:`.comparison.judge_precision`; float16 also runs
    the model in float16 for its yardstick, where an output's error is beyond the
    floor that passes whatever the yardstick says).

    Returns a note for the report: how the reference was made, or why it could not be
    (then float32's elementwise verdicts stand; float16 and int8 are judged against
    Keras float32, whose own error is far below their criteria).
    """
    full = inputs
    twin: Float64Twin | None = None
    exact_full: list[np.ndarray] | None = None
    try:
        twin = float64_twin(model, full)
        exact_full = twin(full)
    except Exception as error:  # a layer that cannot be cloned or run in float64
        reason = error_summary(error)
        if precision == "float32":
            return (
                "elementwise verdict: the float64 copy of the model could not be made or "
                f"run ({reason})"
            )
        twin, exact_full = None, None
    exacts = [_outputs_for(item, twin, exact_full, full) for item in doubtful]
    keras_side = keras_run(model)  # whose error float32's criterion sets the file's against
    half = half_full = missing = None
    needed = True
    if precision == "float16":
        candidates = [
            (item.actual, item.expected if exact is None else exact)
            for item, exact in zip(doubtful, exacts, strict=True)
        ]
        half, half_full, missing, needed = float16_yardstick(model, full, candidates)
    keras_noise = _keras_noise(doubtful, exacts)
    for item, exact in zip(doubtful, exacts, strict=True):
        judged = judge_precision(
            precision,
            comparisons[item.index],
            item.actual,
            item.expected if exact is None else exact,
            keras=item.expected,
            float16_run=_outputs_for(item, half, half_full, full),
            keras_noise=keras_noise.get(item.output, 0.0),
            scores=item.scores,
        )
        if exact is not None and precision != "float32":
            judged = dataclasses.replace(judged, exact_answer="float64")
        elif precision == "float32":
            judged = dataclasses.replace(judged, yardstick=keras_side)
        comparisons[item.index] = judged
    if twin is None:
        return (
            f"{precision} criterion against Keras float32: the float64 copy of the model "
            f"could not be made or run ({reason})"
        )
    return _float64_note(precision, twin, keras_side, (half is not None, missing, needed))


def _float64_note(
    precision: str, twin: Float64Twin, keras_side: str, float16: tuple[bool, Any, bool]
) -> str:
    """The report's note on a judgement against ``twin``'s float64 run: which layers
    ran in float64, and ``precision``'s rule (``float16``: :func:`float16_rule`'s)."""
    where = (
        "every layer in float64"
        if twin.exact
        else "float64 except " + ", ".join(twin.float32_classes) + " (no float64 kernel)"
    )
    if precision == "float16":
        return (
            f"float16 criterion, against the same model run in float64 ({where}): pass when "
            + float16_rule(*float16)
        )
    if precision == "int8":
        return (
            f"int8 criterion, against the same model run in float64 ({where}): pass when "
            + int8_rule()
        )
    return (
        f"judged against the same model run in float64 ({where}): pass when the error is "
        f"at most {EXACT_FACTOR:g}x {keras_side}'s own error plus {EXACT_FLOOR:g} of "
        "the output's range"
    )


def keras_run(model: keras.Model) -> str:
    """How Keras computes ``model``, for the reports: ``"Keras float32"``, or the 16-bit
    float its layers compute in under a mixed-precision policy (``"Keras float16"``,
    ``"Keras bfloat16"``), whose rounding Keras's own error then carries."""
    halves = {
        str(layer.compute_dtype)
        for layer in internals.flatten_layers(model)
        if str(getattr(layer, "compute_dtype", None)) in ("float16", "bfloat16")
    }
    return "Keras " + ("float16" if "float16" in halves else next(iter(halves), "float32"))

"""Steps several subcommands take: load the model, check it, load inputs, validate.

Each step is timed under the name it shows in the summary table, and imports
what it needs when it runs (``keras-bn --help`` imports none of it). Framework
output is hidden while Keras is imported and the model loaded
(:mod:`.quiet`); Python warnings from loading become ``keras-bn CMD: warning:``
lines.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keras_bn.converters.cli.quiet import framework_output_hidden, import_keras
from keras_bn.converters.cli.run import Run, as_dict
from keras_bn.converters.errors import UserInputError

__all__ = [
    "load_model",
    "preflight",
    "keras_reference",
    "load_inputs",
    "keras_feed",
    "to_onnx_layout",
    "validate_onnx",
    "warn_unfolded",
]


def _forward_warnings(caught: list[warnings.WarningMessage], run: Run) -> None:
    for warning in caught:
        message = str(warning.message)
        if issubclass(warning.category, DeprecationWarning) or "__array__" in message:
            continue  # library internals (a NumPy 2 notice from inside Keras)
        run.warn(message)


@contextlib.contextmanager
def _long_lived_objects(run: Run) -> Iterator[None]:
    """In the ``keras-bn`` program: no cyclic garbage collection in the block, and
    what it made is frozen after it.

    Importing Keras and loading a model make objects that live until the command
    exits (modules, layers, variables: 200,000 for ResNet50 on JAX) and little
    garbage. The collector cannot know that: as the heap grows it runs full
    collections over all of it, a large share of ``keras-bn export`` on ResNet50
    (BENCHMARKS.md section 10 and appendix). Frozen, they are left out of every later
    collection, which still frees the garbage tracing and exporting make. A
    caller's ``main()`` keeps its collector as it is: freezing would keep its
    uncollected garbage for good.
    """
    if not run.owns_process:
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


# What the program sets for the rest of its process: never undone, the process exits.
_PROCESS_WIDE = contextlib.ExitStack()
_ROUTED: list[str] = []  # "jax" once its depthwise convolutions are routed
# Below this many samples through Keras, the taps' longer XLA compile costs more than
# their faster pass saves; a kernel of more taps (ConvNeXt's 7x7) compiles slowly and
# runs only 2-3x faster than XLA's, so it keeps XLA's (BENCHMARKS.md section 40).
TAPS_SAMPLES = 32
MAX_TAPS = 25


def _runs_keras_on_data(args: argparse.Namespace) -> bool:
    """Whether the command runs Keras over data worth the taps: the user's (a file:
    calibration, recalibration, validation inputs), an int8 export's calibration
    samples, or at least :data:`TAPS_SAMPLES` generated ones."""
    if any(getattr(args, name, None) for name in ("calibration", "data", "inputs")):
        return True
    if getattr(args, "precision", None) == "int8":
        return True
    return (getattr(args, "samples", None) or 0) >= TAPS_SAMPLES


def _route_kernels(args: argparse.Namespace, run: Run, backend: str) -> None:
    """In the ``keras-bn`` program on JAX, running Keras over data: Keras's depthwise
    convolutions computed as sums over the kernel taps for the rest of the process.

    XLA's CPU backend runs grouped (depthwise) convolutions very slowly: one 3x3
    depthwise convolution over 16x32x32x144 takes 68 ms, the same products summed tap
    by tap 1.5 ms. Over 64 samples at 128 px MobileNetV2's compiled pass takes 0.35 s
    instead of 1.8 s, EfficientNetB0's 0.45 s instead of 2.4 s; their XLA compile takes
    0.3-0.9 s longer, so a command that runs Keras on a few generated samples (the
    float32 export's 6) keeps XLA's own, and so do kernels of more than :data:`MAX_TAPS`
    taps (BENCHMARKS.md section 40). The sum is the convolution's own products in
    another order: outputs within float32 rounding of XLA's, and in float64 the exact
    result, as the float64 twin computes it. Process-wide, so the program's to set,
    not a caller's ``main()``'s.
    """
    if not run.owns_process or backend != "jax" or backend in _ROUTED:
        return
    if not _runs_keras_on_data(args):
        return
    import jax

    from keras_bn._keras_internals import jax_depthwise_convolutions
    from keras_bn.converters.float64_kernels import depthwise_conv_taps

    # One compiled call per convolution where Keras runs eagerly (recalibrate's passes),
    # rather than two dozen dispatched slices and products; inlined in a compiled program.
    taps = jax.jit(depthwise_conv_taps, static_argnums=(2, 3, 4, 5))
    _PROCESS_WIDE.enter_context(jax_depthwise_convolutions(taps, MAX_TAPS))
    _ROUTED.append(backend)


def load_model(args: argparse.Namespace, run: Run):
    """The ``.keras`` model named by ``args.model``, loaded as ``--unsafe`` etc. say."""
    from keras_bn.converters import model_io

    path = model_io.check_model_file(args.model, unsafe=args.unsafe)  # fails before Keras
    with _long_lived_objects(run):
        with run.progress.step("Importing Keras") as step:
            backend = import_keras()
            step.label = f"Importing Keras ({backend} backend)"
        _route_kernels(args, run, backend)
        run.report["backend"] = backend
        with (
            run.progress.step("Loading model"),
            framework_output_hidden(),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            model = model_io.load_model(
                path, unsafe=args.unsafe, custom_objects=args.custom_objects, checked=True
            )
    _forward_warnings(caught, run)
    run.report["model"] = {"path": str(args.model), "name": model.name}
    return model


def preflight(model, run: Run, *, check_statistics: bool = True):
    """Check the model can be converted at all: a layer graph and sane BN statistics.

    Returns the run's :class:`~keras_bn.converters.prepared.PreparedModel`: the
    model flattened once, which every later step takes. Whether Keras can run it
    is :func:`keras_reference`'s check."""
    from keras_bn.converters.folding import check_batch_norm_statistics
    from keras_bn.converters.prepared import prepare

    try:
        prepared = prepare(model)
    except ValueError as error:  # subclassed model, unbuilt Sequential
        raise UserInputError(" ".join(str(error).split())) from None
    if check_statistics:
        with run.progress.step("Checking BatchNormalization statistics"):
            check_batch_norm_statistics(model)
    return prepared


def requested_samples(args: argparse.Namespace, compared_on: str | None = None) -> int | None:
    """``--samples``, or None for the default: one line when something else says
    what validation compares on (``compared_on``: what, when the command decides it)."""
    samples = getattr(args, "samples", None)
    if samples is None:
        return None
    if getattr(args, "inputs", None) is not None:
        compared_on = "--inputs gives the samples"
    if getattr(args, "no_validate", False):
        compared_on = "--no-validate skips validation"
    if compared_on is not None:
        raise UserInputError(
            f"--samples sets how many samples validation generates, but {compared_on}; "
            "drop one of them."
        )
    return samples


def keras_reference(
    prepared,
    run: Run,
    inputs: dict[str, Any] | None,
    batch: int | None = None,
    label: str = "Running the model once in Keras",
):
    """Keras's outputs on the validation inputs, computed in a background thread
    (:meth:`~keras_bn.converters.reference.KerasReference.start`).

    The command's one Keras pass is both the check that Keras can run the model at
    all (a file that loads but whose model cannot run - a stride of 10^12, a config
    edited by hand - is the file's problem, not a bug in keras-bn: one line) and
    validation's reference. It runs while the main thread folds and exports, which
    need only the weights, and is timed as a background step.

    ``inputs`` are the user's (Keras layout, by input name); by default generated:
    ``make_sample_inputs(model, batch, seed=0)``, ``batch`` defaulting to
    ``samples.validation_samples(model)``.
    """
    from keras_bn.converters.reference import KerasReference
    from keras_bn.converters.samples import validation_samples

    batch_size = validation_samples(prepared) if batch is None else batch
    where = f"Model file {run.report.get('model', {}).get('path', '')!r}"
    step = run.progress.background(label)

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        from keras_bn.converters.model_io import tensorflow_code_error
        from keras_bn.converters.user_files import guarded

        with guarded(where, *_cannot_run(prepared, inputs)):
            try:
                yield
            except Exception as error:
                mismatch = tensorflow_code_error(error, where)
                if mismatch is not None:
                    raise mismatch from None
                raise

    return KerasReference.start(
        prepared, inputs, batch_size=batch_size, seed=0, context=lambda: step, guard=guard
    )


def _cannot_run(prepared, inputs: dict[str, Any] | None) -> tuple[str, str]:
    """What a model that loads but does not run is told: on generated inputs, which of
    its inputs had sizes to make up (SAM's prompt encoder takes one mask, not 32)."""
    if inputs is not None:
        return "loads, but Keras cannot run it", "re-save it from the model's code"
    unknown = [
        f"{spec.name} {tuple(spec.shape)}" for spec in prepared.inputs if None in spec.shape[1:]
    ]
    made_up = f" (sizes made up for {', '.join(unknown)})" if unknown else ""
    return (
        f"loads, but Keras cannot run it on generated inputs{made_up}",
        "give inputs it takes with --inputs FILE.npz, or re-save it from the model's code",
    )


def load_inputs(path: str | None, prepared, what: str) -> dict[str, Any] | None:
    """Arrays from an ``.npz`` file, keyed by model input name and checked against the
    prepared model's inputs: their shapes, and integer ids against the Embeddings and
    position embeddings that read them (:func:`~keras_bn.converters.samples.check_input_values`)."""
    if path is None:
        return None
    from keras_bn.converters.model_io import load_inputs as load
    from keras_bn.converters.samples import check_input_values

    inputs = load(path, [(spec.name, spec.shape) for spec in prepared.inputs], what=what)
    check_input_values(prepared, inputs, f"{what} {str(path)!r}")
    return inputs


def keras_feed(prepared, inputs: dict[str, Any]) -> Any:
    """Inputs keyed by name -> what ``model(...)`` takes (array or list in input order)."""
    arrays = [inputs[name] for name in prepared.input_names]
    return arrays[0] if len(arrays) == 1 else arrays


def to_onnx_layout(inputs: dict[str, Any], layout: Any) -> dict[str, Any]:
    """Keras-layout arrays -> the exported ONNX model's layout (one for every input,
    or a dict by input name)."""
    import numpy as np

    from keras_bn.converters.onnx.layout import layout_of

    return {
        name: np.moveaxis(array, -1, 1)
        if array.ndim >= 3 and layout_of(layout, name) == "channels_first"
        else array
        for name, array in inputs.items()
    }


# How validation's messages ask whether the ONNX file belongs to the model at all.
_MISMATCH = re.compile(r"[;.]?\s*was the (?:ONNX )?file exported from this model\?", re.I)


def validate_onnx(
    model,
    onnx_path: Path,
    run: Run,
    *,
    input_layout: str,
    inputs: dict[str, Any] | None,
    atol: float | None,
    rtol: float | None,
    precision: str = "float32",
    shown_path: Path | None = None,
    reference=None,
    exported_here: bool = False,
    inputs_note: str | None = None,
    onnx_outputs=None,
    class_scores=None,
    signed_int8: bool | None = None,
) -> bool:
    """Compare ``onnx_path`` in onnxruntime with ``model`` in Keras; report; passed?

    ``precision`` picks the default criterion (``comparison.judge_precision``);
    ``atol``/``rtol``, when given, are a strict elementwise contract instead. With
    ``reference``, validation compares on its inputs and reuses its Keras outputs.
    ``exported_here``: keras-bn wrote the file from ``model`` in this run, so a file
    that does not fit the model is keras-bn's bug, not a question for the user.
    ``inputs_note``: what the inputs are, for the report (by default: generated by
    ``reference``, described by the model; or the given ones, counted).
    ``onnx_outputs``: the file's run on those inputs, already made (validate_onnx's);
    ``class_scores``: which outputs hold class scores, where known (validate_onnx's);
    ``signed_int8``: whether an int8 file stores int8 activations, where known (validate_onnx's).
    """
    from keras_bn.converters.validation import validate_onnx as validate

    kwargs: dict[str, Any] = {"input_layout": input_layout, "precision": precision}
    if reference is not None:
        kwargs["reference"] = reference
    elif inputs is not None:
        kwargs["inputs"] = inputs
    if atol is not None:
        kwargs["atol"] = atol
    if rtol is not None:
        kwargs["rtol"] = rtol
    if onnx_outputs is not None:
        kwargs["onnx_outputs"] = onnx_outputs
    if class_scores is not None:
        kwargs["class_scores"] = class_scores
    if signed_int8 is not None:
        kwargs["signed_int8"] = signed_int8
    with run.progress.step("Validating against the Keras model in onnxruntime"):
        try:
            report = validate(model, onnx_path, **kwargs)
        except UserInputError as error:
            if exported_here and _MISMATCH.search(str(error)):
                message = _MISMATCH.sub("", str(error)).strip()
                raise RuntimeError(
                    f"the ONNX file keras-bn exported from this model does not fit it: {message}"
                ) from None  # the user's question ("was the file exported from...") is moot
            raise
        passed = bool(report)
    if shown_path is not None and dataclasses.is_dataclass(report) and hasattr(report, "path"):
        report = dataclasses.replace(report, path=str(shown_path))  # not the temporary path
    described = inputs_note or _describe_inputs(model, reference, kwargs.get("inputs"))
    if described and hasattr(report, "inputs"):  # else validate_onnx's own description
        report.inputs = described
    run.report["validation"] = as_dict(report)
    run.text.append(str(report))
    run.summary.append(["validation", "passed" if passed else "FAILED"])
    return passed


def _describe_inputs(prepared, reference, inputs: Any) -> str:
    """What validation compared on: generated (how, why, how many) or given."""
    if reference is not None and reference.generated:
        from keras_bn.converters.samples import describe_generated_inputs

        return describe_generated_inputs(prepared, reference.batch_size)
    if reference is not None:
        inputs = reference.inputs
    if inputs is None:
        return ""  # validate_onnx generated them and said so
    count = int(len(next(iter(inputs.values()))))
    return f"given, {count} sample(s) from --inputs"


def warn_unfolded(run: Run, fold_report, where: str) -> None:
    """One warning naming the BatchNormalization layers that stay unfolded, if any."""
    names = [entry.batch_norm for entry in getattr(fold_report, "entries", ()) if not entry.folded]
    if not names:
        return
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    reasons = "in the JSON report" if run.json else "above"
    run.warn(
        f"{len(names)} BatchNormalization layer(s) could not be folded and {where}: "
        f"{shown} (the fold report {reasons} says why for each)"
    )

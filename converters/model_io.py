"""Loading the user's ``.keras`` models in Keras, and their ``.npz`` inputs for a model.

The bytes are checked first by :mod:`keras_bn.converters.user_files` (path, zip
container, CRCs, config.json and the sizes it declares, limits); only then does
Keras's own loader run (in ``safe_mode`` unless the user passed ``unsafe=True``),
and its exceptions are translated into one line by :func:`_explain_keras_error`.
Arrays read from an ``.npz`` file are checked against the model's inputs here.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import shutil
import tempfile
import traceback
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keras_bn.converters.errors import UserInputError
from keras_bn.converters.user_files import (
    check_input_file,
    check_keras_file,
    one_line,
    read_npz,
    resolve_custom_objects,
)

__all__ = [
    "load_model",
    "load_inputs",
    "model_input_specs",
    "resolve_custom_objects",
    "check_input_file",
    "check_model_file",
    "tensorflow_code_error",
]


def check_model_file(path: str | os.PathLike, *, unsafe: bool = False) -> Path:
    """Check a ``.keras`` file without Keras (see :func:`user_files.check_keras_file`)."""
    return check_keras_file(path, unsafe=unsafe)


@contextlib.contextmanager
def _scratch_directory() -> Iterator[None]:
    """Keras's temporary files (while this thread loads) go to a directory of ours,
    removed afterwards.

    Keras unpacks a ``.keras`` archive's members into a temporary directory to read
    its assets and leaves that directory behind when unpacking fails; a failed run
    must leave nothing. Other threads' temporary files stay where they were.
    """
    from keras_bn import _keras_internals as internals

    scratch = tempfile.mkdtemp(prefix="keras-bn-load-")
    try:
        with internals.saving_temp_dirs_in(scratch):
            yield
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def tensorflow_code_error(error: BaseException, where: str) -> UserInputError | None:
    """The error to report when ``error`` is about the backend, not the model: a
    Lambda or custom layer calling ``tf.*`` on another backend, or a channels_first
    layer TensorFlow's CPU kernels refuse (they take NHWC only where oneDNN does not
    run the layer: float64 convolutions everywhere; float16 ones and 3-D pooling on
    CPUs without AVX512-FP16); else None."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        if _is_channels_first_kernel_gap(error):
            return UserInputError(
                f"{where} has channels_first layers that TensorFlow cannot run on CPU (its "
                "kernels take channels_last only); run the same command on another Keras "
                "backend: KERAS_BACKEND=jax keras-bn ..."
            )
        return None
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for frame in traceback.extract_tb(current.__traceback__):
            if re.search(r"[/\\]tensorflow[/\\]python[/\\]", frame.filename):
                return UserInputError(
                    f"{where} holds code that calls TensorFlow (a Lambda or custom layer "
                    f"using tf.*), which cannot run on the {backend} backend Keras uses "
                    "here; run keras-bn with KERAS_BACKEND=tensorflow."
                )
        current = current.__cause__ or current.__context__
    return None


def _is_channels_first_kernel_gap(error: BaseException) -> bool:
    """TensorFlow's "only supports the NHWC tensor format on the CPU" (and kin)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if "NHWC" in text and ("CPU" in text or "NCHW" in text):
            return True
        current = current.__cause__ or current.__context__
    return False


def _explain_keras_error(path: Path, error: Exception) -> UserInputError:
    """Translate an exception from ``keras.saving.load_model`` into one clear line."""
    where = f"Model file {str(path)!r}"
    mismatch = tensorflow_code_error(error, where)
    if mismatch is not None:
        return mismatch
    text = str(error)
    # Keras wraps errors raised while deserializing a layer; the cause is at the end.
    inner = text.rsplit("Exception encountered:", 1)[-1]
    if "deserialization of a `Lambda` layer" in text or (
        "Lambda" in inner and "safe_mode" in inner
    ):
        return UserInputError(
            f"{where} contains a Lambda layer, whose Python code is only loaded in unsafe "
            "mode; pass --unsafe (unsafe=True) if you trust the file."
        )
    if "safe_mode" in text or "unsafe deserialization" in text:
        return UserInputError(
            f"{where} needs unsafe deserialization (it contains Python code); pass --unsafe "
            "(unsafe=True) if you trust the file."
        )
    match = re.search(r"Could not locate (?:class|function) '([^']+)'", text)
    if match is None:
        match = re.search(
            r"Could not deserialize '([^']+)' because it is not a KerasSaveable", text
        )
    if match is not None:
        name = match.group(1).rsplit(".", 1)[-1]
        return UserInputError(
            f"{where} uses the unknown class or function {name!r}; pass --custom-objects "
            f"MODULE:{name} (custom_objects=...) naming the module that defines it."
        )
    if isinstance(error, OSError):
        return UserInputError(
            f"{where} has corrupted weights ({one_line(error)}); re-save or re-download it."
        )
    detail = " ".join(inner.split()) or type(error).__name__
    if len(detail) > 240:
        detail = detail[:237] + "..."
    return UserInputError(
        f"{where} could not be loaded by Keras ({type(error).__name__}: {detail}); "
        "check that it was saved by Keras 3 from the same model code."
    )


def _lambda_names() -> dict[str, Any]:
    """The names a Keras-2-era Lambda's code uses without importing them (the module
    that defined it is gone): ``np``, ``keras``, ``ops``, and ``tf`` on TensorFlow."""
    import keras
    import numpy as np

    names: dict[str, Any] = {"np": np, "keras": keras, "ops": keras.ops}
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        names["tf"] = tf
    return names


def load_model(
    path: str | os.PathLike,
    *,
    unsafe: bool = False,
    custom_objects: Iterable[str | tuple[str, Any]] | Mapping[str, Any] = (),
    checked: bool = False,
):
    """Load a Keras 3 ``.keras`` model, turning every failure into a UserInputError.

    Args:
        path: the ``.keras`` file. It is only read.
        unsafe: load with ``safe_mode=False`` (needed for Lambda layers holding
            Python code). Only for files you trust.
        custom_objects: ``module:name`` strings (or a name -> object mapping) for
            custom layers that are not registered with Keras.
        checked: the caller has just run :func:`check_model_file` on ``path`` with the
            same ``unsafe``; the file is not read and checked a second time (its CRC
            check reads every byte of the weights).

    Returns:
        The loaded ``keras.Model``.
    """
    path = Path(path) if checked else check_keras_file(path, unsafe=unsafe)
    objects = resolve_custom_objects(custom_objects)
    import keras

    from keras_bn import _keras_internals as internals

    with contextlib.suppress(ModuleNotFoundError):
        importlib.import_module("keras_bn.layers")  # registers keras_bn>BatchNormalization
    with warnings.catch_warnings(record=True) as caught, _scratch_directory():
        warnings.simplefilter("always")
        try:
            lambdas = internals.lambda_globals(_lambda_names()) if unsafe else None
            with internals.saved_weights_loading(), lambdas or contextlib.nullcontext():
                model = keras.saving.load_model(
                    path, custom_objects=objects or None, compile=False, safe_mode=not unsafe
                )
        except UserInputError:
            raise
        except Exception as error:  # any loader failure is a problem with the file
            if os.environ.get("KERAS_BN_TRACEBACK"):
                raise
            raise _explain_keras_error(path, error) from None
    for warning in caught:  # the load worked: let its warnings through
        if issubclass(warning.category, DeprecationWarning) or "__array__" in str(warning.message):
            continue
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if not isinstance(model, keras.Model):
        raise UserInputError(
            f"Model file {str(path)!r} holds a {type(model).__name__}, not a model; "
            "expected a Keras Sequential or Functional model saved with model.save()."
        )
    return model


def model_input_specs(model) -> list[tuple[str, tuple[int | None, ...]]]:
    """``(name, shape)`` of each model input, batch dimension included."""
    from keras_bn.converters import graph

    flat = graph.flatten(model)
    return [(name, t.shape) for name, t in zip(flat.input_names, flat.inputs, strict=True)]


def load_inputs(
    path: str | os.PathLike,
    specs: Sequence[tuple[str, tuple[int | None, ...]]],
    *,
    what: str = "Inputs file",
) -> dict[str, np.ndarray]:
    """Load a ``.npz`` of model inputs and check it against ``specs``.

    ``specs`` lists ``(input name, shape)`` with the batch dimension first (``None``
    for unknown sizes). A single-input model accepts any one array name (``arr_0``
    from ``np.savez(f, x)``); otherwise the archive keys must be the input names.
    Float arrays are returned as float32.
    """
    path = check_input_file(path, what, (".npz",))
    where = f"{what} {str(path)!r}"
    arrays = {key: np.asarray(array) for key, array in read_npz(path, what).items()}
    expected_names = [name for name, _ in specs]
    if not arrays:
        raise UserInputError(f"{where} holds no arrays; expected {expected_names!r}.")
    if len(specs) == 1 and len(arrays) == 1:
        arrays = {expected_names[0]: next(iter(arrays.values()))}
    if set(arrays) != set(expected_names):
        raise UserInputError(
            f"{where} holds arrays {sorted(arrays)!r}; expected exactly the model inputs "
            f"{expected_names!r} (np.savez(path, **{{name: array}}))."
        )
    result: dict[str, np.ndarray] = {}
    batch_sizes = set()
    for name, shape in specs:
        array = arrays[name]
        if array.dtype.kind not in "fiub":
            raise UserInputError(
                f"{where}: array {name!r} has dtype {array.dtype}; expected numbers."
            )
        if array.ndim != len(shape) or any(
            want is not None and got != want
            for got, want in zip(array.shape[1:], shape[1:], strict=False)
        ):
            raise UserInputError(
                f"{where}: array {name!r} has shape {array.shape}; expected "
                f"{_shape_text(shape)} (batch first)."
            )
        if array.shape[0] == 0:
            raise UserInputError(f"{where}: array {name!r} is empty; give at least one sample.")
        if array.dtype.kind == "f":
            if not np.all(np.isfinite(array)):
                raise UserInputError(
                    f"{where}: array {name!r} contains NaN or Inf; give finite inputs."
                )
            with np.errstate(over="ignore"):
                array = array.astype(np.float32)
            if not np.all(np.isfinite(array)):
                raise UserInputError(
                    f"{where}: array {name!r} holds values beyond float32's range "
                    "(|x| > 3.4e38), which the model computes in; give inputs in range."
                )
        batch_sizes.add(array.shape[0])
        result[name] = array
    if len(batch_sizes) > 1:
        raise UserInputError(
            f"{where}: arrays have different batch sizes {sorted(batch_sizes)}; "
            "give every input the same number of samples."
        )
    return result


def _shape_text(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"

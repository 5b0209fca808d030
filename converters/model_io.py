"""Loading the user's files: ``.keras`` models and ``.npz`` input arrays.

Everything here turns a bad file into a one-line :class:`UserInputError` that says
what was received, what was expected and how to fix it. The checks run in order of
cost: the path, the zip container and its CRCs, ``config.json``, and only then
Keras's own loader (in ``safe_mode`` unless the user passed ``unsafe=True``), whose
exceptions are translated by :func:`_explain_keras_error`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keras_bn.converters.errors import UserInputError

# A .keras config nested deeper than this is refused before it is parsed (Python's JSON
# decoder and Keras's deserializer recurse per level); real models need a few dozen.
# KERAS_BN_MAX_CONFIG_DEPTH raises it for a file you trust.
MAX_CONFIG_DEPTH = 200
_JSON_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_BRACKETS = re.compile(rb"[\[\]{}]")

__all__ = [
    "load_model",
    "load_inputs",
    "model_input_specs",
    "resolve_custom_objects",
    "check_input_file",
    "check_model_file",
]

_WEIGHT_MEMBERS = ("model.weights.h5", "model.weights.npz")


def check_input_file(path: str | os.PathLike, what: str, suffixes: Sequence[str]) -> Path:
    """Return ``path`` as a Path if it is an existing, readable file with a known suffix."""
    path = Path(path)
    expected = " or ".join(suffixes)
    if not path.exists():
        raise UserInputError(f"{what} {str(path)!r} does not exist; expected a {expected} file.")
    if path.is_dir():
        raise UserInputError(f"{what} {str(path)!r} is a directory; expected a {expected} file.")
    if not os.access(path, os.R_OK):
        raise UserInputError(f"{what} {str(path)!r} is not readable; check its permissions.")
    if path.suffix.lower() not in suffixes:
        hint = ""
        if path.suffix.lower() in (".h5", ".hdf5") and ".keras" in suffixes:
            hint = " Legacy H5 models are not supported: load it in Keras and re-save it "
            hint += "with model.save('model.keras')."
        raise UserInputError(
            f"{what} {str(path)!r} has suffix {path.suffix!r}; expected a {expected} file.{hint}"
        )
    return path


def check_model_file(path: str | os.PathLike) -> Path:
    """Check a ``.keras`` file without Keras: path, zip container, CRCs, config.json."""
    path = check_input_file(path, "Model file", (".keras",))
    _check_keras_archive(path)
    return path


def _check_keras_archive(path: Path) -> None:
    """Check the zip container of a ``.keras`` file without building anything."""
    where = f"Model file {str(path)!r}"
    if path.stat().st_size == 0:
        raise UserInputError(f"{where} is empty; expected a .keras zip archive saved by Keras 3.")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            bad_member = archive.testzip()  # reads every member and checks its CRC
            if bad_member is not None:
                raise UserInputError(
                    f"{where} is corrupted: {bad_member!r} fails its CRC check; "
                    "re-save or re-download the model."
                )
            if "config.json" not in names:
                raise UserInputError(
                    f"{where} has no config.json; it is not a .keras model saved by Keras 3 "
                    f"(archive holds {sorted(names)!r})."
                )
            if not names.intersection(_WEIGHT_MEMBERS):
                raise UserInputError(
                    f"{where} has no model.weights.h5; re-save the model with model.save()."
                )
            raw_config = archive.read("config.json")
    except UserInputError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as error:
        raise UserInputError(
            f"{where} is not a readable .keras zip archive (truncated or corrupted: "
            f"{_one_line(error)}); re-save or re-download the model."
        ) from None
    depth, limit = _nesting_depth(raw_config), _max_config_depth()
    if depth > limit:
        raise UserInputError(
            f"{where} has a config.json nested {depth} levels deep; keras-bn reads at most "
            f"{limit} (a real model needs a few dozen). Set the environment variable "
            "KERAS_BN_MAX_CONFIG_DEPTH to raise the limit for a file you trust."
        )
    try:
        config = json.loads(raw_config)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise UserInputError(
            f"{where} has a config.json that is not valid JSON ({_one_line(error)}); "
            "re-save the model."
        ) from None
    if not isinstance(config, dict) or "class_name" not in config:
        raise UserInputError(
            f"{where} has a config.json that does not describe a Keras object "
            f"(received {type(config).__name__} without 'class_name'); re-save the model."
        )


def _max_config_depth() -> int:
    text = os.environ.get("KERAS_BN_MAX_CONFIG_DEPTH")
    if text is None:
        return MAX_CONFIG_DEPTH
    try:
        return int(text)
    except ValueError:
        raise UserInputError(
            f"KERAS_BN_MAX_CONFIG_DEPTH must be an integer; received {text!r}."
        ) from None


def _nesting_depth(raw: bytes) -> int:
    """The deepest nesting of JSON objects/arrays in ``raw`` (strings skipped)."""
    depth = deepest = 0
    for token in _JSON_BRACKETS.findall(_JSON_STRINGS.sub(b"", raw)):
        depth += 1 if token in (b"{", b"[") else -1
        deepest = max(deepest, depth)
    return deepest


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _explain_keras_error(path: Path, error: Exception) -> UserInputError:
    """Translate an exception from ``keras.saving.load_model`` into one clear line."""
    where = f"Model file {str(path)!r}"
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
            f"{where} has corrupted weights ({_one_line(error)}); re-save or re-download it."
        )
    detail = " ".join(inner.split()) or type(error).__name__
    if len(detail) > 240:
        detail = detail[:237] + "..."
    return UserInputError(
        f"{where} could not be loaded by Keras ({type(error).__name__}: {detail}); "
        "check that it was saved by Keras 3 from the same model code."
    )


def resolve_custom_objects(specs: Iterable[str | tuple[str, Any]] | Mapping[str, Any]) -> dict:
    """Turn ``module:name`` strings (or a mapping) into a ``custom_objects`` dict.

    ``module`` is an importable module name or a path to a ``.py`` file; the current
    directory is searched first. Each object is registered under its attribute name
    and, for registered Keras objects, under its ``package>Name`` too.
    """
    if isinstance(specs, Mapping):
        return dict(specs)
    resolved: dict[str, Any] = {}
    for spec in specs:
        if isinstance(spec, tuple):
            name, obj = spec
            resolved[name] = obj
            continue
        module_name, sep, attribute = str(spec).rpartition(":")
        if not sep or not module_name or not attribute:
            raise UserInputError(
                f"Invalid custom object {spec!r}: expected MODULE:NAME, e.g. "
                "'my_layers:ScaleLayer' or 'path/to/layers.py:ScaleLayer'."
            )
        module = _import_user_module(module_name, spec)
        if not hasattr(module, attribute):
            raise UserInputError(
                f"Invalid custom object {spec!r}: module {module_name!r} has no attribute "
                f"{attribute!r}."
            )
        obj = getattr(module, attribute)
        resolved[attribute] = obj
        registered = _registered_name(obj)
        if registered:
            resolved[registered] = obj
    return resolved


def _registered_name(obj: Any) -> str | None:
    import keras

    with contextlib.suppress(Exception):
        return keras.saving.get_registered_name(obj)
    return None


def _import_user_module(module_name: str, spec: str):
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise UserInputError(
                    f"Invalid custom object {spec!r}: file {module_name!r} does not exist."
                )
            unique = f"_keras_bn_custom_{abs(hash(str(file.resolve())))}"
            if unique in sys.modules:
                return sys.modules[unique]
            module_spec = importlib.util.spec_from_file_location(unique, file)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[unique] = module
            module_spec.loader.exec_module(module)
            return module
        cwd = os.getcwd()
        added = cwd not in sys.path
        if added:
            sys.path.insert(0, cwd)
        try:
            return importlib.import_module(module_name)
        finally:
            if added:
                with contextlib.suppress(ValueError):
                    sys.path.remove(cwd)
    except ModuleNotFoundError as error:
        raise UserInputError(
            f"Invalid custom object {spec!r}: cannot import module {module_name!r} "
            f"({error}); run from the directory that holds it or give a .py path."
        ) from None


def load_model(
    path: str | os.PathLike,
    *,
    unsafe: bool = False,
    custom_objects: Iterable[str | tuple[str, Any]] | Mapping[str, Any] = (),
):
    """Load a Keras 3 ``.keras`` model, turning every failure into a UserInputError.

    Args:
        path: the ``.keras`` file. It is only read.
        unsafe: load with ``safe_mode=False`` (needed for Lambda layers holding
            Python code). Only for files you trust.
        custom_objects: ``module:name`` strings (or a name -> object mapping) for
            custom layers that are not registered with Keras.

    Returns:
        The loaded ``keras.Model``.
    """
    path = check_model_file(path)
    objects = resolve_custom_objects(custom_objects)
    import keras

    from keras_bn import _keras_internals as internals

    with contextlib.suppress(ModuleNotFoundError):
        importlib.import_module("keras_bn.layers")  # registers keras_bn>BatchNormalization
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with internals.random_initializers_skipped():  # the file's weights follow
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
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: np.asarray(archive[key]) for key in archive.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as error:
        raise UserInputError(
            f"{where} is not a readable .npz archive ({_one_line(error)}); "
            "save inputs with numpy.savez(path, input_name=array)."
        ) from None
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
            array = array.astype(np.float32)
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

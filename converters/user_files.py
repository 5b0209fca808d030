"""The one door for the user's bytes: ``.keras`` archives, ``.npz`` arrays, ``.onnx`` files.

Every file a user hands keras-bn is opened here first, and every failure to parse,
decode or resolve it - whichever library raises it - leaves as one
:class:`UserInputError` line (:func:`guarded`). The checks run in order of cost and
before anything is allocated from what the file *declares*:

- the path (exists, a readable file, the expected suffix);
- a zip container (``.keras``, ``.npz``): member count, names (no ``..`` or absolute
  paths), declared unpacked sizes and compression ratios (:func:`check_archive`),
  then the CRCs;
- a ``.keras`` config: nesting depth before parsing, then every declared size,
  the parameter count it implies and each input's size per sample, and, unless
  ``unsafe``, no Python bytecode (Lambda layers) - all before Keras builds a layer;
- an ``.npz`` file: each array's header (dtype, shape) before its data, never a
  pickle (object arrays are refused);
- an ``.onnx`` file: its size, then the declared size of every tensor and the place
  of every external data file, which must lie inside the model's directory.

The bounds come from :mod:`keras_bn.converters.limits` (each one raised by an
environment variable). Custom-object specs (``module:name``) are resolved here too.
What Keras's own loader makes of a checked file is translated in
:mod:`keras_bn.converters.model_io`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import json
import math
import os
import re
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from keras_bn.converters.errors import UserInputError
from keras_bn.converters.limits import limit_value, refuse

__all__ = [
    "check_input_file",
    "check_archive",
    "check_keras_file",
    "check_keras_config",
    "read_npz",
    "load_onnx",
    "resolve_custom_objects",
    "guarded",
    "one_line",
]

WEIGHT_MEMBERS = ("model.weights.h5", "model.weights.npz")
_RATIO_FLOOR = 1 << 20  # small members may compress well (a config of zeros)

# ---------------------------------------------------------------------------------------
# Paths and the guard.


def check_input_file(path: str | os.PathLike, what: str, suffixes: Sequence[str]) -> Path:
    """Return ``path`` as a Path if it is an existing, readable file with a known suffix."""
    path = Path(path)
    expected = " or ".join(suffixes)
    if not path.exists():
        raise UserInputError(f"{what} {str(path)!r} does not exist; expected a {expected} file.")
    if path.is_dir():
        raise UserInputError(f"{what} {str(path)!r} is a directory; expected a {expected} file.")
    if not path.is_file():
        raise UserInputError(f"{what} {str(path)!r} is not a regular file; expected a {expected}.")
    if not os.access(path, os.R_OK):
        raise UserInputError(f"{what} {str(path)!r} is not readable; check its permissions.")
    if path.suffix.lower() not in suffixes:
        hint = ""
        if path.suffix.lower() in (".h5", ".hdf5") and ".keras" in suffixes:
            hint = _h5_hint(path)
        raise UserInputError(
            f"{what} {str(path)!r} has suffix {path.suffix!r}; expected a {expected} file.{hint}"
        )
    return path


def _h5_hint(path: Path) -> str:
    """What to do with an HDF5 file given as a model: weights only, or a legacy model."""
    if path.name.lower().endswith((".weights.h5", ".weights.hdf5")) or not _holds_model_config(
        path
    ):
        return (
            " It holds weights only, not a model: build the model in code, load them "
            f"with model.load_weights({str(path)!r}), save it with "
            "model.save('model.keras') and pass model.keras."
        )
    return (
        " Legacy H5 models are not supported: load it in Keras "
        f"(keras.saving.load_model({str(path)!r})) and re-save it with "
        "model.save('model.keras')."
    )


def _holds_model_config(path: Path) -> bool:
    """Whether an HDF5 file has the ``model_config`` a whole legacy model carries
    (True when it cannot be read: the legacy-model advice then names Keras's loader,
    which says what is wrong with it)."""
    try:
        import h5py

        with h5py.File(path, "r") as file:
            return "model_config" in file.attrs
    except Exception:
        return True


def one_line(error: BaseException, limit: int = 200) -> str:
    """``Type: message`` on one line, at most ``limit`` characters of message."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def guarded(where: str, problem: str, fix: str) -> Iterator[None]:
    """Whatever a parser raises inside becomes ``{where} {problem} (error); {fix}.``

    MemoryError and RecursionError included: past the limits checked first, a file
    that still exhausts them is the file's problem. KeyboardInterrupt passes.
    """
    try:
        yield
    except UserInputError:
        raise
    except Exception as error:  # any library's parse/decode error: the file is bad
        raise UserInputError(f"{where} {problem} ({one_line(error)}); {fix}.") from None


# ---------------------------------------------------------------------------------------
# Zip containers (.keras, .npz).

_DRIVE = re.compile(r"^[A-Za-z]:")


def check_archive(
    archive: zipfile.ZipFile, where: str, allowed: Callable[[str], bool] | None = None
) -> None:
    """Refuse unsafe member names and declared sizes before any member is read.

    ``allowed``, if given, says which member names the format may hold.
    """
    infos = archive.infolist()
    if len(infos) > limit_value("KERAS_BN_MAX_ARCHIVE_MEMBERS"):
        raise refuse("KERAS_BN_MAX_ARCHIVE_MEMBERS", where, f"holds {len(infos):,} members")
    ratio = limit_value("KERAS_BN_MAX_COMPRESSION_RATIO")
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = info.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or _DRIVE.match(name) or ".." in parts or "\0" in name:
            raise UserInputError(
                f"{where} holds a member named {name!r}, a path that leaves the archive "
                "(absolute or with '..'); keras-bn reads no such archive: re-save the file."
            )
        if any(len(part.encode()) > 255 for part in parts) or (allowed and not allowed(name)):
            raise UserInputError(
                f"{where} holds an unexpected member {name[:80]!r}; {_EXPECTED_MEMBERS}"
                if allowed
                else f"{where} holds a member whose name is too long ({name[:80]!r}...)."
            )
        if name in seen:
            raise UserInputError(
                f"{where} holds two members named {name!r}; re-save the file (a tool that "
                "reads the first and one that reads the last would see different files)."
            )
        seen.add(name)
        if info.file_size > _RATIO_FLOOR and info.file_size > ratio * max(info.compress_size, 1):
            raise refuse(
                "KERAS_BN_MAX_COMPRESSION_RATIO",
                where,
                f"holds member {name!r} that unpacks {info.compress_size:,} bytes into "
                f"{info.file_size:,} (a compression bomb?)",
            )
        total += info.file_size
    if total > limit_value("KERAS_BN_MAX_ARCHIVE_BYTES"):
        raise refuse("KERAS_BN_MAX_ARCHIVE_BYTES", where, f"unpacks into {total:,} bytes")


# ---------------------------------------------------------------------------------------
# .keras files.

_EXPECTED_MEMBERS = (
    "a .keras archive holds config.json, metadata.json, model.weights.h5 and assets/ "
    "only: re-save the model with model.save() (Keras unpacks every member to disk)."
)


def _keras_member(name: str) -> bool:
    return name in ("config.json", "metadata.json", *WEIGHT_MEMBERS) or (
        name.startswith("assets/") and len(name.encode()) <= 1024
    )


_JSON_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_BRACKETS = re.compile(rb"[\[\]{}]")


def check_keras_file(path: str | os.PathLike, *, unsafe: bool = False) -> Path:
    """Check a ``.keras`` file without Keras: path, zip container, CRCs, config.json."""
    path = check_input_file(path, "Model file", (".keras",))
    where = f"Model file {str(path)!r}"
    if path.stat().st_size == 0:
        raise UserInputError(f"{where} is empty; expected a .keras zip archive saved by Keras 3.")
    with guarded(
        where,
        "is not a readable .keras zip archive: truncated or corrupted",
        "re-save or re-download the model",
    ):
        with zipfile.ZipFile(path) as archive:
            check_archive(archive, where, _keras_member)
            names = set(archive.namelist())
            bad_member = archive.testzip()  # reads every member and checks its CRC
            if bad_member is not None:
                raise UserInputError(
                    f"{where} is corrupted: {bad_member!r} fails its CRC check; "
                    "re-save or re-download the model."
                )
            if "config.json" not in names:
                shown = sorted(names)[:10]
                raise UserInputError(
                    f"{where} has no config.json; it is not a .keras model saved by Keras 3 "
                    f"(archive holds {shown!r})."
                )
            if not names.intersection(WEIGHT_MEMBERS):
                raise UserInputError(
                    f"{where} has no model.weights.h5; re-save the model with model.save()."
                )
            raw_config = archive.read("config.json")
    depth, limit = _nesting_depth(raw_config), limit_value("KERAS_BN_MAX_CONFIG_DEPTH")
    if depth > limit:
        raise refuse("KERAS_BN_MAX_CONFIG_DEPTH", where, f"has a config.json nested {depth} deep")
    with guarded(where, "has a config.json that is not valid JSON", "re-save the model"):
        config = json.loads(raw_config)
    check_keras_config(config, where, unsafe=unsafe)
    return path


def _nesting_depth(raw: bytes) -> int:
    """The deepest nesting of JSON objects/arrays in ``raw`` (strings skipped)."""
    depth = deepest = 0
    for token in _JSON_BRACKETS.findall(_JSON_STRINGS.sub(b"", raw)):
        depth += 1 if token in (b"{", b"[") else -1
        deepest = max(deepest, depth)
    return deepest


# Sizes Keras allocates from: a layer's widths, and the shapes it is built on.
_WIDTH_KEYS = (
    "units",
    "filters",
    "output_dim",
    "input_dim",
    "depth_multiplier",
    "intermediate_dim",
    "hidden_dim",
)
_HEAD_KEYS = ("num_heads", "key_dim", "value_dim")
_CHANNEL_MAPPING_KEYS = ("units", "filters", "depth_multiplier", "intermediate_dim", "hidden_dim")
_SIZE_KEYS = (
    *_WIDTH_KEYS,
    *_HEAD_KEYS,
    "max_tokens",
    "num_tokens",
    "output_sequence_length",
    "sequence_length",
    "vocabulary_size",
    "height",
    "width",
    "n",
    "kernel_size",
    "pool_size",
    "size",
    "batch_shape",
    "batch_input_shape",
    "shape",
    "input_shape",
    "target_shape",
    "output_shape",
    "build_input_shape",
    "cropping",
    "padding",
    "strides",
    "dilation_rate",
    "groups",
    "output_padding",
)


def check_keras_config(config: Any, where: str, *, unsafe: bool = False) -> None:
    """Refuse a parsed config.json that is no Keras object, declares absurd sizes, or
    (unless ``unsafe``) holds Python bytecode - before Keras builds anything from it."""
    if not isinstance(config, dict) or "class_name" not in config:
        raise UserInputError(
            f"{where} has a config.json that does not describe a Keras object "
            f"(received {type(config).__name__} without 'class_name'); re-save the model."
        )
    max_dimension = limit_value("KERAS_BN_MAX_DIMENSION")
    max_elements = limit_value("KERAS_BN_MAX_INPUT_ELEMENTS")
    total, largest = 0, (0, "")
    stack: list[tuple[Any, str]] = [(config, "the model")]
    while stack:  # iterative: a raised depth limit must not overflow our own stack
        node, layer = stack.pop()
        if isinstance(node, list | tuple):
            stack.extend((item, layer) for item in node)
            continue
        if not isinstance(node, dict):
            continue
        if node.get("class_name") == "__lambda__" and not unsafe:
            raise UserInputError(
                f"{where} holds Python bytecode in {layer} (a Lambda layer), which is only "
                "loaded in unsafe mode; pass --unsafe (unsafe=True) if you trust the file."
            )
        inner = node.get("config")
        if "class_name" in node and isinstance(inner, dict):
            name = inner.get("name")
            layer = f"layer {name!r}" if isinstance(name, str) else repr(node["class_name"])
            build = node.get("build_config")
            _check_sizes(inner, build, where, layer, max_dimension)
            if node["class_name"] == "InputLayer":
                _check_input_size(inner, where, layer, max_elements)
            parameters = _parameter_estimate(inner, build)
            total += parameters
            largest = max(largest, (parameters, layer))
        stack.extend((value, layer) for value in node.values())
    if total > limit_value("KERAS_BN_MAX_PARAMETERS"):
        raise refuse(
            "KERAS_BN_MAX_PARAMETERS",
            where,
            f"declares about {total:,} parameters ({largest[1]} alone about {largest[0]:,})",
        )


def _numbers(value: Any) -> list[float]:
    """Every number (not bool) in ``value``, nested lists and dicts walked."""
    found: list[float] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            continue
        if isinstance(item, int | float):
            found.append(item)
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


def _check_sizes(config: dict, build: Any, where: str, layer: str, limit: int) -> None:
    values = [(key, config.get(key)) for key in _SIZE_KEYS if key in config]
    if isinstance(build, dict):
        values.append(("build_config", build))
    for key, value in values:
        for number in _numbers(value):
            if not math.isfinite(number) or number > limit:
                raise refuse(
                    "KERAS_BN_MAX_DIMENSION", where, f"declares {key}={number!r} in {layer}"
                )


def _check_input_size(config: dict, where: str, layer: str, limit: int) -> None:
    shape = config.get("batch_shape", config.get("batch_input_shape"))
    if not isinstance(shape, list | tuple) or len(shape) < 2:
        return
    sizes = [d for d in shape[1:] if isinstance(d, int) and not isinstance(d, bool) and d > 0]
    elements = math.prod(sizes)
    if elements > limit:
        raise refuse(
            "KERAS_BN_MAX_INPUT_ELEMENTS",
            where,
            f"declares input {layer} of shape {tuple(shape)}: {elements:,} values per sample",
        )


def _parameter_estimate(config: dict, build: Any) -> int:
    """Roughly the parameters a layer allocates, from its config and build shape."""

    def size(key: str) -> int:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return 0
        return int(value) if math.isfinite(value) and value > 0 else 0

    widths = [size(key) for key in _WIDTH_KEYS if size(key)]
    heads = size("num_heads") * max(size("key_dim"), size("value_dim"))
    if not widths and not heads:
        return 0
    shapes = _shapes(build)
    estimate = math.prod(widths) * (4 * heads if heads else 1)
    kernel = [int(k) for k in _numbers(config.get("kernel_size")) if k > 0]
    if len(kernel) == 1 and shapes:  # an int kernel_size: the same size along each axis
        kernel = kernel * max(1, len(shapes[0]) - 2)
    estimate *= math.prod(kernel)
    if heads or any(size(key) for key in _CHANNEL_MAPPING_KEYS):
        channels = [int(s[-1]) for s in shapes if s and isinstance(s[-1], int | float)]
        estimate *= max([c for c in channels if c > 0], default=1)
    return estimate // max(1, size("groups"))  # a grouped convolution sees cin / groups


def _shapes(build: Any) -> list[list]:
    """The flat shapes (lists of numbers and None) inside a ``build_config``."""
    found: list[list] = []
    stack = [build]
    while stack:
        item = stack.pop()
        if isinstance(item, list | tuple):
            if item and all(d is None or isinstance(d, int | float) for d in item):
                found.append(list(item))
            else:
                stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


# ---------------------------------------------------------------------------------------
# .npz files.


def read_npz(path: str | os.PathLike, what: str = "Inputs file") -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file; headers checked before data, never unpickled."""
    path = check_input_file(path, what, (".npz",))
    where = f"{what} {str(path)!r}"
    arrays: dict[str, np.ndarray] = {}
    with guarded(
        where,
        "is not a readable .npz archive",
        "save inputs with numpy.savez(path, input_name=array)",
    ):
        with zipfile.ZipFile(path) as archive:
            check_archive(archive, where)
            infos = [info for info in archive.infolist() if not info.is_dir()]
            total = 0
            for info in infos:
                with archive.open(info) as member:
                    shape, dtype = _npy_header(member, where, info.filename)
                size = math.prod(shape) * dtype.itemsize
                if size > info.file_size:  # NumPy would allocate it before reading
                    raise UserInputError(
                        f"{where}: array {info.filename.removesuffix('.npy')!r} declares shape "
                        f"{shape} ({size:,} bytes) but its member holds {info.file_size:,}; "
                        "the file is truncated or forged: save it again with numpy.savez."
                    )
                total += size
            if total > limit_value("KERAS_BN_MAX_ARRAY_BYTES"):
                raise refuse("KERAS_BN_MAX_ARRAY_BYTES", where, f"declares {total:,} bytes")
            for info in infos:
                with archive.open(info) as member:
                    key = info.filename.removesuffix(".npy")
                    arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
    return arrays


def _npy_header(member: Any, where: str, name: str) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise UserInputError(
            f"{where}: member {name!r} has .npy format version {version}; expected 1.0 or "
            "2.0 (numbers); save inputs with numpy.savez(path, input_name=array)."
        )
    if dtype.hasobject:
        raise UserInputError(
            f"{where}: array {name.removesuffix('.npy')!r} holds Python objects (dtype "
            f"{dtype}), which only unpickling could read; keras-bn never unpickles: save "
            "numeric arrays."
        )
    return tuple(int(d) for d in shape), dtype


# ---------------------------------------------------------------------------------------
# .onnx files.


def load_onnx(path: str | os.PathLike, what: str = "ONNX model") -> Any:
    """The checked ``onnx.ModelProto`` at ``path``, external data not loaded.

    Refuses a file beyond KERAS_BN_MAX_ONNX_BYTES, tensors declaring more than
    KERAS_BN_MAX_PARAMETERS values in all, and external data outside the model's
    directory, missing, or shorter than declared.
    """
    path = check_input_file(path, what, (".onnx",))
    where = f"{what} {str(path)!r}"
    size = path.stat().st_size
    if size > limit_value("KERAS_BN_MAX_ONNX_BYTES"):
        raise refuse("KERAS_BN_MAX_ONNX_BYTES", where, f"has {size:,} bytes")
    import onnx

    with guarded(where, "cannot be parsed", "expected an .onnx file written by keras-bn export"):
        model = onnx.load(str(path), load_external_data=False)
    if not model.graph.output:
        raise UserInputError(
            f"{where} has no graph outputs (an empty or foreign protobuf); expected an .onnx "
            "file written by keras-bn export."
        )
    with guarded(where, "holds malformed tensors", "export the model again"):
        _check_onnx_tensors(model, path, where)
        _check_onnx_inputs(model, where)
    return model


def _check_onnx_inputs(model: Any, where: str) -> None:
    """Each graph input's fixed sizes: generated inputs are allocated from them."""
    max_dimension = limit_value("KERAS_BN_MAX_DIMENSION")
    max_elements = limit_value("KERAS_BN_MAX_INPUT_ELEMENTS")
    initializers = {tensor.name for tensor in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        sizes = [d.dim_value for d in value.type.tensor_type.shape.dim if d.HasField("dim_value")]
        if any(size > max_dimension for size in sizes):
            raise refuse(
                "KERAS_BN_MAX_DIMENSION", where, f"declares input {value.name!r} of sizes {sizes}"
            )
        per_sample = math.prod(s for s in sizes[1:] if s > 0)
        if per_sample > max_elements:
            raise refuse(
                "KERAS_BN_MAX_INPUT_ELEMENTS",
                where,
                f"declares input {value.name!r} of sizes {sizes}: {per_sample:,} values per sample",
            )


def _tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of a model: initializers and attributes, subgraphs walked."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)


def _check_onnx_tensors(model: Any, path: Path, where: str) -> None:
    from onnx import TensorProto

    directory = path.parent.resolve()
    elements = 0
    external = 0
    for tensor in _tensors(model):
        if any(d < 0 for d in tensor.dims):
            raise UserInputError(
                f"{where}: tensor {tensor.name!r} has negative dimensions {list(tensor.dims)}; "
                "export the model again."
            )
        elements += math.prod(tensor.dims)
        if tensor.data_location == TensorProto.EXTERNAL:
            external += _check_external_data(tensor, directory, where)
    if elements > limit_value("KERAS_BN_MAX_PARAMETERS"):
        raise refuse("KERAS_BN_MAX_PARAMETERS", where, f"declares {elements:,} tensor values")
    if path.stat().st_size + external > limit_value("KERAS_BN_MAX_ONNX_BYTES"):
        total = path.stat().st_size + external
        raise refuse("KERAS_BN_MAX_ONNX_BYTES", where, f"has {total:,} bytes with external data")


def _check_external_data(tensor: Any, directory: Path, where: str) -> int:
    """The bytes one tensor reads from its external file, which must lie in ``directory``."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    parts = PurePosixPath(location.replace("\\", "/")).parts
    outside = (
        not location
        or os.path.isabs(location)
        or location.startswith(("/", "\\"))
        or _DRIVE.match(location)
        or ".." in parts
    )
    target = directory / location
    if not outside:
        outside = not target.resolve().is_relative_to(directory)  # a symlink out
    if outside:
        raise UserInputError(
            f"{where}: tensor {tensor.name!r} keeps its data at {location!r}, outside the "
            "model's directory; keras-bn reads external data only from files beside the model."
        )
    if not target.is_file():
        raise UserInputError(
            f"{where}: tensor {tensor.name!r} keeps its data in {location!r}, which does not "
            "exist beside the model; copy the .onnx file together with its data files."
        )
    offset = int(info.get("offset", 0) or 0)
    length = int(info["length"]) if info.get("length") else target.stat().st_size - offset
    if offset < 0 or length < 0 or offset + length > target.stat().st_size:
        raise UserInputError(
            f"{where}: tensor {tensor.name!r} reads bytes {offset}..{offset + length} of "
            f"{location!r}, which holds {target.stat().st_size}; the data file is truncated "
            "or belongs to another model."
        )
    needed = _stored_bytes(tensor)
    if needed is not None and length != needed:  # ONNX reads all of it: a malformed tensor
        from onnx import TensorProto

        raise UserInputError(
            f"{where}: tensor {tensor.name!r} reads {length} bytes of {location!r} where its "
            f"shape {list(tensor.dims)} ({TensorProto.DataType.Name(tensor.data_type)}) needs "
            f"{needed}; the data file belongs to another model or the .onnx file was edited."
        )
    return length


def _stored_bytes(tensor: Any) -> int | None:
    """The bytes ``tensor``'s values take stored raw, for the types of whole bytes per
    value; None for the others (strings; 2-, 4- and 6-bit types, packed; any type newer
    than this list), which onnxruntime checks itself."""
    from onnx import TensorProto, helper

    try:
        name = TensorProto.DataType.Name(tensor.data_type)
    except ValueError:
        return None
    if name not in _WHOLE_BYTE_TYPES and not name.startswith("FLOAT8"):
        return None
    return math.prod(tensor.dims) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


_WHOLE_BYTE_TYPES = frozenset(
    "BOOL INT8 UINT8 INT16 UINT16 INT32 UINT32 INT64 UINT64 FLOAT16 BFLOAT16 FLOAT DOUBLE "
    "COMPLEX64 COMPLEX128".split()
)


# ---------------------------------------------------------------------------------------
# Custom objects: ``module:name`` specs (the user's own code, run because asked to).


def resolve_custom_objects(specs: Iterable[str | tuple[str, Any]] | Mapping[str, Any]) -> dict:
    """Turn ``module:name`` strings (or a mapping) into a ``custom_objects`` dict.

    ``module`` is an importable module name or a path to a ``.py`` file; the current
    directory is searched first. Each object is registered under its attribute name
    and, for registered Keras objects, under its ``package>Name`` too. A module that
    cannot be imported (missing, a syntax error, raising on import) is a UserInputError.
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
        module = import_user_module(
            module_name,
            f"Invalid custom object {spec!r}",
            functools.partial(_import_failure, spec, module_name),
        )
        if not hasattr(module, attribute):
            raise UserInputError(
                f"Invalid custom object {spec!r}: module {module_name!r} has no attribute "
                f"{attribute!r}."
            )
        obj = getattr(module, attribute)
        if not callable(obj):  # a layer, model or other class, or a function
            raise UserInputError(
                f"Invalid custom object {spec!r}: {attribute!r} in {module_name!r} is not "
                f"a class or function (it is {type(obj).__name__} {' '.join(repr(obj).split())[:40]})."
            )
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


def import_user_module(
    module_name: str, where: str, failing: Callable[[], contextlib.AbstractContextManager]
) -> Any:
    """The user's module ``module_name`` (a dotted name importable from the working
    directory, or a ``.py`` path), imported once; ``failing()`` turns its import
    errors into the caller's one-line message, ``where`` starts the one for a
    missing file."""
    if module_name.endswith(".py"):
        file = Path(module_name)
        if not file.is_file():
            raise UserInputError(f"{where}: file {module_name!r} does not exist.")
        unique = f"_keras_bn_user_{abs(hash(str(file.resolve())))}"
        if unique in sys.modules:
            return sys.modules[unique]
        with failing():
            module_spec = importlib.util.spec_from_file_location(unique, file)
            if module_spec is None or module_spec.loader is None:
                raise ImportError(f"{module_name!r} is not a Python module")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[unique] = module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[unique]
                raise
        return module
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        with failing():
            return importlib.import_module(module_name)
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


@contextlib.contextmanager
def _import_failure(spec: str, module_name: str) -> Iterator[None]:
    try:
        yield
    except UserInputError:
        raise
    except ModuleNotFoundError as error:
        raise UserInputError(
            f"Invalid custom object {spec!r}: cannot import module {module_name!r} "
            f"({error}); run from the directory that holds it or give a .py path."
        ) from None
    except Exception as error:  # the user's module failed while importing
        raise UserInputError(
            f"Invalid custom object {spec!r}: importing {module_name!r} failed "
            f"({one_line(error)}); fix the module or run it alone to see the traceback."
        ) from None
    except SystemExit as exit_:  # its status would have become the command's
        raise UserInputError(
            f"Invalid custom object {spec!r}: importing {module_name!r} called "
            f"sys.exit({exit_.code!r}); a module of layers must not end the program."
        ) from None

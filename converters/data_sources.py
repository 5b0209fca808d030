"""Data the CLI streams through a model: an ``.npz`` file, a folder of images, or a loader.

``--data`` (``keras-bn recalibrate``, ``inspect``, ``export``) names one of:

- ``FILE.npz``: one array per model input, keyed by input name (any name for a
  single-input model), batch first, Keras layout; an array named ``y`` or ``labels``
  holds the labels (class indices or one-hot rows). Arrays are read in batches
  from the archive, never whole.
- ``DIRECTORY``: image files (PNG, JPEG, BMP, GIF), resized to the model's single
  image input with PIL (bilinear) and given as float32 pixels 0..255, as
  ``keras.utils.image_dataset_from_directory`` gives them; when every image lies
  in a subdirectory, the subdirectories are the classes (sorted names, index =
  label), as there.
- ``MODULE:FUNCTION`` (``MODULE`` importable from the current directory, or a
  ``.py`` path): called with no argument, it returns a ``tf.data.Dataset``, a
  ``keras.utils.PyDataset``, an iterator or an iterable of batches, each ``x`` or
  ``(x, y[, sample_weight])``. A one-shot iterator is not kept: each pass over the
  data calls ``FUNCTION`` again, so it must give the same batches each time.

A :class:`DataSource` is re-iterable: each ``iter()`` is a new pass yielding
``(x, y)`` batches (``y`` None without labels), in bounded memory. Every problem
with the data is a :class:`UserInputError` line.
"""

from __future__ import annotations

import contextlib
import math
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keras_bn.converters.errors import UserInputError
from keras_bn.converters.user_files import check_archive, guarded, one_line

__all__ = ["DataSource", "open_data", "LABEL_NAMES", "IMAGE_SUFFIXES"]

LABEL_NAMES = ("y", "labels")  # .npz arrays holding the labels
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")

Specs = Sequence[tuple[str, tuple[int | None, ...]]]  # (input name, shape with batch)


class DataSource:
    """Re-iterable ``(x, y)`` batches; ``x`` is what ``model(x)`` takes."""

    def __init__(self, description: str, passes: Callable[[], Iterator[tuple[Any, Any]]]):
        self.description = description
        self._passes = passes
        self.batches_per_pass: int | None = None  # known after a pass, or up front
        self.passes = 0  # passes started
        # Progress: called with (pass number, batch number) before each batch is used.
        self.on_batch: Callable[[int, int], None] | None = None

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        self.passes += 1
        count = 0
        for batch in self._passes():
            count += 1
            if self.on_batch is not None:
                self.on_batch(self.passes, count)
            yield batch
        if count == 0:
            raise UserInputError(f"{self.description} holds no samples; give at least one batch.")
        self.batches_per_pass = count

    def inputs(self) -> _Inputs:
        """The same passes, ``x`` only (what ``BatchNormInputs.measure`` reads)."""
        return _Inputs(self)

    def elements(self) -> _Inputs:
        """The same passes as Keras dataset elements ``(x,)`` (what
        ``recalibrate_batch_norm`` reads): Keras unpacks a bare list as ``(x, y)``, so a
        multi-input model's list of arrays is wrapped to stay its ``x``."""
        return _Inputs(self, wrapped=True)


class _Inputs:
    def __init__(self, source: DataSource, *, wrapped: bool = False):
        self.source = source
        self.wrapped = wrapped

    def __iter__(self) -> Iterator[Any]:
        return ((x,) if self.wrapped else x for x, _ in self.source)


def open_data(spec: str, specs: Specs, *, batch_size: int = 64) -> DataSource:
    """The data ``spec`` names, checked against the model inputs ``specs``."""
    path = Path(spec)
    if path.is_dir():
        return _image_folder(path, specs, batch_size)
    if path.suffix.lower() == ".npz":
        return _npz(path, specs, batch_size)
    if ":" in spec and not path.exists():
        return _loader(spec, specs)
    raise UserInputError(
        f"Data {spec!r} is neither an .npz file, a directory of images nor "
        "MODULE:FUNCTION (a Python function returning a tf.data.Dataset, a "
        "keras.utils.PyDataset or an iterator of batches)."
        + ("" if path.exists() or ":" in spec else " No such file or directory.")
    )


# --------------------------------------------------------------------------------------
# .npz files, read in batches.


def _npz(path: Path, specs: Specs, batch_size: int) -> DataSource:
    from keras_bn.converters.user_files import check_input_file

    check_input_file(path, "Data file", (".npz",))
    where = f"Data file {str(path)!r}"
    headers = _npz_headers(path, where)
    labels = [name for name in headers if name in LABEL_NAMES]
    if len(labels) > 1:
        raise UserInputError(f"{where} holds both {labels}; keep one array of labels.")
    names = [name for name in headers if name not in LABEL_NAMES]
    expected = [name for name, _ in specs]
    keys = dict(zip(expected, names, strict=True)) if len(specs) == len(names) == 1 else {}
    if not keys:
        if set(names) != set(expected):
            raise UserInputError(
                f"{where} holds arrays {sorted(names)!r}; expected the model inputs "
                f"{expected!r} (and optionally labels named 'y' or 'labels')."
            )
        keys = {name: name for name in expected}
    lengths = {headers[key][0][0] if headers[key][0] else 0 for key in [*names, *labels]}
    if len(lengths) != 1 or 0 in lengths:
        raise UserInputError(
            f"{where}: arrays have {sorted(lengths)} samples; give every array the same, "
            "non-zero number of samples (batch first)."
        )
    for input_name, shape in specs:
        got = headers[keys[input_name]][0]
        if len(got) != len(shape) or any(
            want is not None and have != want for have, want in zip(got[1:], shape[1:], strict=True)
        ):
            raise UserInputError(
                f"{where}: array {keys[input_name]!r} has shape {got}; the model input "
                f"{input_name!r} takes {tuple(shape)} (None: any size, batch first)."
            )
    members = [keys[name] for name, _ in specs] + labels
    count = lengths.pop()
    description = f"{where} ({count} samples{', labelled' if labels else ''})"

    def passes() -> Iterator[tuple[Any, Any]]:
        with guarded(where, "could not be read", "save it with numpy.savez"):
            with zipfile.ZipFile(path) as archive:
                readers = [_RowReader(archive, name, headers[name], where) for name in members]
                for start in range(0, count, batch_size):
                    rows = min(batch_size, count - start)
                    arrays = [reader.read(rows) for reader in readers]
                    x = [_as_input(a, name, where) for a, name in zip(arrays, members, strict=True)]
                    yield (
                        x[0] if len(specs) == 1 else x[: len(specs)],
                        arrays[-1] if labels else None,
                    )

    source = DataSource(description, passes)
    source.batches_per_pass = math.ceil(count / batch_size)
    return source


def _npz_headers(path: Path, where: str) -> dict[str, tuple[tuple[int, ...], np.dtype, bool]]:
    headers = {}
    with guarded(where, "is not a readable .npz archive", "save it with numpy.savez"):
        with zipfile.ZipFile(path) as archive:
            check_archive(archive, where)
            for info in archive.infolist():
                if info.is_dir():
                    continue
                with archive.open(info) as member:
                    headers[info.filename.removesuffix(".npy")] = _header(member, where)
    if not headers:
        raise UserInputError(f"{where} holds no arrays.")
    return headers


def _header(member: Any, where: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    version = np.lib.format.read_magic(member)
    read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
        version, np.lib.format.read_array_header_2_0
    )
    shape, fortran_order, dtype = read(member)
    if dtype.hasobject or dtype.kind not in "fiub":
        raise UserInputError(f"{where}: an array has dtype {dtype}; expected numbers.")
    return tuple(int(d) for d in shape), dtype, bool(fortran_order)


class _RowReader:
    """Reads an ``.npy`` member of an open archive ``rows`` samples at a time."""

    def __init__(self, archive: zipfile.ZipFile, name: str, header: tuple, where: str):
        self.shape, self.dtype, fortran = header
        self.member = archive.open(f"{name}.npy")
        _header(self.member, where)  # past the header
        self.whole = None
        if fortran:  # column-major: no row is contiguous, read it once
            self.whole = np.lib.format.read_array(archive.open(f"{name}.npy"))
        self.position = 0
        self.row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])

    def read(self, rows: int) -> np.ndarray:
        start, self.position = self.position, self.position + rows
        if self.whole is not None:
            return np.ascontiguousarray(self.whole[start : self.position])
        data = self.member.read(rows * self.row_bytes)
        if len(data) != rows * self.row_bytes:
            raise ValueError("the archive member ends before its declared shape")
        return np.frombuffer(data, self.dtype).reshape((rows, *self.shape[1:]))


def _as_input(array: np.ndarray, name: str, where: str) -> np.ndarray:
    if array.dtype.kind != "f":
        return np.array(array)
    values = array.astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise UserInputError(
            f"{where}: array {name!r} holds NaN, Inf or values beyond float32; give finite inputs."
        )
    return values


# --------------------------------------------------------------------------------------
# A folder of images.


def _image_folder(directory: Path, specs: Specs, batch_size: int) -> DataSource:
    where = f"Data directory {str(directory)!r}"
    if len(specs) != 1 or len(specs[0][1]) != 4 or specs[0][1][3] not in (1, 3, 4):
        raise UserInputError(
            f"{where}: a folder of images feeds a model with one image input "
            f"(batch, height, width, 1, 3 or 4 channels); this model takes "
            f"{[tuple(s) for _, s in specs]}. Give an .npz file or a MODULE:FUNCTION."
        )
    _, height, width, channels = specs[0][1]
    assert channels is not None  # checked above
    files = sorted(
        p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise UserInputError(f"{where} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
    classes = sorted({p.relative_to(directory).parts[0] for p in files})
    labelled = all(len(p.relative_to(directory).parts) >= 2 for p in files)
    index = {name: i for i, name in enumerate(classes)}
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]

    def load(path: Path) -> np.ndarray:
        from PIL import Image

        with guarded(f"Image {str(path)!r}", "could not be read", "remove or replace it"):
            with Image.open(path) as opened:
                image = opened.convert(mode)
            size = (width or image.width, height or image.height)
            if image.size != size:
                image = image.resize(size, Image.Resampling.BILINEAR)
            pixels = np.asarray(image, np.float32)
        return pixels.reshape((*pixels.shape[:2], channels))

    def passes() -> Iterator[tuple[Any, Any]]:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            images = [load(p) for p in chunk]
            if len({image.shape for image in images}) > 1:
                raise UserInputError(
                    f"{where}: images of different sizes for a model input of unknown size "
                    "cannot share a batch; resize them or use --batch-size 1."
                )
            labels = np.array([index[p.relative_to(directory).parts[0]] for p in chunk])
            yield np.stack(images), labels if labelled else None

    description = f"{where} ({len(files)} images"
    description += f", {len(classes)} classes)" if labelled else ")"
    source = DataSource(description, passes)
    source.batches_per_pass = math.ceil(len(files) / batch_size)
    return source


# --------------------------------------------------------------------------------------
# MODULE:FUNCTION.


def _loader(spec: str, specs: Specs) -> DataSource:
    module_name, _, attribute = spec.rpartition(":")
    where = f"Data loader {spec!r}"
    if not module_name or not attribute:
        raise UserInputError(f"{where}: expected MODULE:FUNCTION, e.g. my_data:calibration.")
    module = _import(module_name, where)
    function = getattr(module, attribute, None)
    if not callable(function):
        raise UserInputError(f"{where}: module {module_name!r} has no function {attribute!r}.")

    def passes() -> Iterator[tuple[Any, Any]]:
        with _user_code(where, "failed"):
            data = function()
        yield from _elements(data, where)

    return DataSource(where, passes)


def _elements(data: Any, where: str) -> Iterator[tuple[Any, Any]]:
    import keras

    if isinstance(data, keras.utils.PyDataset):
        if data.num_batches is None:
            raise UserInputError(f"{where} returned an infinite PyDataset; give a finite one.")
        elements: Any = (data[i] for i in range(data.num_batches))
    elif hasattr(data, "as_numpy_iterator"):  # tf.data.Dataset
        elements = data.as_numpy_iterator()
    elif hasattr(data, "__iter__") and not isinstance(data, str | bytes | dict | np.ndarray):
        elements = iter(data)
    else:
        raise UserInputError(
            f"{where} returned a {type(data).__name__}; expected a tf.data.Dataset, a "
            "keras.utils.PyDataset, an iterator or an iterable of batches."
        )
    while True:
        with _user_code(where, "failed while yielding a batch"):
            element = next(elements, None)
        if element is None:
            return
        x, y, _ = keras.utils.unpack_x_y_sample_weight(element)
        yield x, (None if y is None else np.asarray(y))


def _import(module_name: str, where: str) -> Any:
    from keras_bn.converters.user_files import import_user_module

    return import_user_module(
        module_name, where, lambda: _user_code(where, "failed while importing")
    )


@contextlib.contextmanager
def _user_code(where: str, what: str) -> Iterator[None]:
    """The user's code raising is their problem: one line naming it."""
    try:
        yield
    except UserInputError:
        raise
    except ModuleNotFoundError as error:
        raise UserInputError(
            f"{where}: {error}; run from the directory that holds the module or give a .py path."
        ) from None
    except Exception as error:
        raise UserInputError(
            f"{where} {what} ({one_line(error)}); run it alone to see the traceback."
        ) from None
    except SystemExit as exit_:  # its status would have become the command's
        raise UserInputError(
            f"{where} called sys.exit({exit_.code!r}); the data loader must not end the program."
        ) from None

"""Atomic output files: write to a temporary file beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from keras_bn.converters.errors import UserInputError


def check_output_path(path: str | os.PathLike, force: bool = False) -> Path:
    """Validate an output path before any work is done; return it as a Path."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise UserInputError(f"Output path {str(path)!r} is a directory; give a file name.")
    if path.exists() and not force:
        raise UserInputError(
            f"Output file {str(path)!r} already exists; pass --force to replace it."
        )
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserInputError(f"Output directory {str(parent)!r} does not exist.")
    if not os.access(parent, os.W_OK):
        raise UserInputError(f"Output directory {str(parent)!r} is not writable.")
    return path


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike, suffix: str | None = None, *, replace: bool = True
) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    ``suffix`` defaults to the target's suffix (Keras insists on ``.keras``).
    ``replace=False``: never replace a file that appeared meanwhile (another run
    writing the same output): :class:`FileExistsError`, see :func:`place`.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.",
        suffix=suffix if suffix is not None else path.suffix,
        dir=parent,
    )
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    try:
        yield tmp
        place(tmp, path, replace=replace)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def place(source: Path, target: Path, *, replace: bool = True) -> None:
    """Move ``source`` onto ``target`` atomically. ``replace=False``: only where no
    ``target`` exists, also against a run that writes it meanwhile (a hard link,
    which the file system refuses over an existing file: :class:`FileExistsError`);
    on a file system without hard links, the check just before the rename."""
    if replace:
        os.replace(source, target)
        return
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, some network shares)
        if os.path.lexists(target):
            raise FileExistsError(f"{target} exists") from None
        os.replace(source, target)
        return
    os.unlink(source)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

"""Keep framework start-up noise off the terminal.

TensorFlow 2.21 writes absl and CPU-feature lines straight to file descriptor 2
when it is imported, even with ``TF_CPP_MIN_LOG_LEVEL=3``; a GPU build adds more
when the first tensor is made. They come from C++, so ``sys.stderr`` cannot catch
them: :func:`framework_output_hidden` points descriptor 2 at a temporary file for
the duration of a step and puts it back afterwards. What was captured is shown
only when the step fails with an internal error (a :class:`UserInputError` keeps
its one-line message clean), so nothing useful for a bug report is lost.

Numerics are left alone: ``TF_ENABLE_ONEDNN_OPTS`` is not touched, only its notice
is hidden.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import tempfile
import types
from collections.abc import Iterator
from typing import Any

from keras_bn.converters.cli.backend import select_backend
from keras_bn.converters.errors import UserInputError

__all__ = ["framework_output_hidden", "import_keras", "quiet_environment"]


def quiet_environment() -> None:
    """Ask the frameworks for less output (the user's own setting wins)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@contextlib.contextmanager
def framework_output_hidden() -> Iterator[None]:
    """Redirect OS-level stderr (fd 2) to a temporary file while the block runs."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (a daemon): nothing to keep clean
        yield
        return
    with tempfile.TemporaryFile() as captured:
        _flush_stderr()
        os.dup2(captured.fileno(), 2)
        internal_error = False
        try:
            yield
        except UserInputError:
            raise
        except BaseException:
            internal_error = True
            raise
        finally:
            _restore(saved)
            if internal_error:
                _replay(captured)


def _flush_stderr() -> None:
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stderr.flush()


def _restore(saved: int) -> None:
    _flush_stderr()  # Python-level text written meanwhile belongs to the capture
    with contextlib.suppress(OSError):
        os.dup2(saved, 2)
        os.close(saved)


def _replay(captured) -> None:
    captured.seek(0)
    text = captured.read().decode(errors="replace")
    if text:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(text)
            sys.stderr.flush()


def import_keras() -> str:
    """Import Keras on the backend :func:`~.backend.select_backend` picks (when Keras is
    not imported yet), without noise; register keras_bn's layer; return the backend.

    Keras imports scikit-learn, matplotlib and requests when they are installed, for
    wrappers, plotting helpers and the RemoteMonitor callback the command never uses
    (their import times: BENCHMARKS.md appendix): they are hidden during the import
    (requests only on JAX: TensorFlow's own import needs it), and import normally
    afterwards. On JAX, the modules its backend imports only to call later (sparse
    linear algebra, TPU splash attention) are imported when first used. On other backends
    than TensorFlow, Keras's serializer stops importing TensorFlow.
    """
    quiet_environment()
    if "keras" not in sys.modules:
        select_backend()
    hidden: tuple[str, ...] = _UNUSED_BY_KERAS_IMPORT
    deferred: dict[str, tuple[str, ...]] = {}
    if os.environ.get("KERAS_BACKEND") == "jax":
        hidden += _UNUSED_BY_KERAS_IMPORT_ON_JAX  # TensorFlow's import needs requests
        deferred = _DEFERRED_BY_KERAS_IMPORT_ON_JAX
    with framework_output_hidden(), _modules_hidden(hidden), _modules_deferred(deferred):
        try:
            import keras
        except ModuleNotFoundError as error:
            _check_backend_installed(error)
            raise
        backend = keras.backend.backend()
    if backend != "tensorflow":
        from keras_bn import _keras_internals

        _keras_internals.tensorflow_probe_answered()  # no TensorFlow import when saving
    return backend


def _check_backend_installed(error: ModuleNotFoundError) -> None:
    """Raise a UserInputError where Keras's import failed because the backend's own
    package is not installed (``KERAS_BACKEND=torch`` without torch): the user's
    environment, not a keras-bn bug."""
    backend = os.environ.get("KERAS_BACKEND", "")
    missing = (error.name or "").split(".")[0]
    if missing and missing == backend:
        raise UserInputError(
            f"KERAS_BACKEND={backend} needs the {missing!r} package, which is not "
            f"installed: pip install {missing}, or pick an installed backend "
            "(KERAS_BACKEND=jax or tensorflow)."
        ) from error


_UNUSED_BY_KERAS_IMPORT = ("sklearn", "matplotlib")
_UNUSED_BY_KERAS_IMPORT_ON_JAX = ("requests",)
# Imported by Keras's JAX backend, used only when called: sparse linear algebra
# (its import pulls in scipy.sparse.linalg) and TPU splash attention (BENCHMARKS.md appendix).
# Module -> its submodules that Keras imports from it.
_DEFERRED_BY_KERAS_IMPORT_ON_JAX: dict[str, tuple[str, ...]] = {
    "jax.experimental.sparse.linalg": (),
    "jax.experimental.pallas.ops.tpu.splash_attention": (
        "splash_attention_kernel",
        "splash_attention_mask",
    ),
}


@contextlib.contextmanager
def _modules_hidden(names: tuple[str, ...]) -> Iterator[None]:
    """``import name`` raises ImportError in the block (Keras then skips the extras
    that need it) unless the module is imported already."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


class _Deferred(types.ModuleType):
    """Stands in for a module until one of its attributes is read, then imports it.

    ``submodules``: names that ``from module import name`` takes from it; each is a
    deferred module of its own.
    """

    def __init__(self, name: str, submodules: tuple[str, ...] = ()) -> None:
        super().__init__(name)
        self._submodules = submodules

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__") or attribute == "_submodules":
            raise AttributeError(attribute)  # the import system probing, or __init__
        if attribute in self._submodules:
            return _Deferred(f"{self.__name__}.{attribute}")
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        return getattr(importlib.import_module(name), attribute)


@contextlib.contextmanager
def _modules_deferred(modules: dict[str, tuple[str, ...]]) -> Iterator[None]:
    """``import module`` in the block gives a stand-in that imports the module on
    first use (unless it is imported already); afterwards ``import module`` imports
    it. ``modules``: name -> the submodules imported from it (see :class:`_Deferred`).

    A module that its package no longer ships (a JAX release moved it) is not deferred:
    a stand-in would turn the ImportError Keras expects into a later AttributeError."""
    deferred = [
        name for name in modules if name not in sys.modules and _has_source(name, modules[name])
    ]
    for name in deferred:
        sys.modules[name] = _Deferred(name, modules[name])
    try:
        yield
    finally:
        for name in deferred:
            if isinstance(sys.modules.get(name), _Deferred):
                del sys.modules[name]


def _has_source(name: str, submodules: tuple[str, ...] = ()) -> bool:
    """Whether module ``name`` and its ``submodules`` are files of its top-level
    package, found without importing anything (``find_spec`` of a dotted name would
    import its parents, the cost deferring avoids)."""
    top, _, rest = name.partition(".")
    package = sys.modules.get(top)
    spec = getattr(package, "__spec__", None) if package else importlib.util.find_spec(top)
    folders = list(getattr(spec, "submodule_search_locations", None) or ())
    paths = [rest.replace(".", os.sep)]
    paths += [os.path.join(paths[0], submodule) for submodule in submodules]
    return all(
        any(
            os.path.isfile(os.path.join(folder, path + ".py"))
            or os.path.isfile(os.path.join(folder, path, "__init__.py"))
            for folder in folders
        )
        for path in paths
    )

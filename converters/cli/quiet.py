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
import os
import sys
import tempfile
from collections.abc import Iterator

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
    (1.3 s, 0.45 s and 0.1 s on JAX): they are hidden during the import (requests only
    on JAX: TensorFlow's own import needs it), and import normally afterwards. On other backends than TensorFlow, Keras's serializer stops
    importing TensorFlow.
    """
    quiet_environment()
    if "keras" not in sys.modules:
        select_backend()
    hidden: tuple[str, ...] = _UNUSED_BY_KERAS_IMPORT
    if os.environ.get("KERAS_BACKEND") == "jax":
        hidden += _UNUSED_BY_KERAS_IMPORT_ON_JAX  # TensorFlow's import needs requests
    with framework_output_hidden(), _modules_hidden(hidden):
        import keras

        backend = keras.backend.backend()
    if backend != "tensorflow":
        from keras_bn import _keras_internals

        _keras_internals.tensorflow_probe_answered()  # no TensorFlow import when saving
    return backend


_UNUSED_BY_KERAS_IMPORT = ("sklearn", "matplotlib")
_UNUSED_BY_KERAS_IMPORT_ON_JAX = ("requests",)


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

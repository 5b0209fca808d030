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


def import_keras() -> None:
    """Import Keras and its backend (and register keras_bn's layer) without noise."""
    quiet_environment()
    with framework_output_hidden():
        import keras

        keras.backend.backend()

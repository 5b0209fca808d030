"""Which Keras backend the ``keras-bn`` command runs on.

Keras reads its backend once, when it is first imported: ``KERAS_BACKEND``, else the
``backend`` entry of ``keras.json`` in the Keras home (``$KERAS_HOME``, else
``~/.keras``), else TensorFlow. The converter itself is backend-neutral (it reads
configs and weights and runs the model only as the reference), so the command picks,
before importing Keras:

1. ``KERAS_BACKEND`` when it is set: the user's choice, always honoured.
2. The backend of a ``keras.json`` the user wrote. Keras writes that file itself on
   its first import, with ``"backend": "tensorflow"``; a file that is exactly what
   Keras writes says nothing about the user, so it does not count.
3. Otherwise the fastest installed backend for a whole ``keras-bn`` run: JAX (it
   imports several times faster than TensorFlow; BENCHMARKS.md section 10 and
   appendix), then TensorFlow, then torch.

A model whose layers need one backend (a Lambda layer holding ``tf.*`` code) fails
on another with a message naming ``KERAS_BACKEND``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["BACKENDS", "choose_backend", "select_backend"]

BACKENDS = ("jax", "tensorflow", "torch")  # in order of preference
# What Keras writes to keras.json on its first import when the file is missing.
_KERAS_WRITTEN_CONFIG = {
    "floatx": "float32",
    "epsilon": 1e-07,
    "backend": "tensorflow",
    "image_data_format": "channels_last",
}


def choose_backend(environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """``(backend, why)``: the backend the command should run on and the rule that
    chose it (shown by ``keras-bn --version`` and in the report)."""
    chosen = environ.get("KERAS_BACKEND")
    if chosen:
        return chosen, "KERAS_BACKEND"
    config = _user_keras_config(environ)
    if config is not None and isinstance(config.get("backend"), str):
        return config["backend"], str(_keras_config_path(environ))
    for backend in BACKENDS:
        if importlib.util.find_spec(backend) is not None:
            return backend, "fastest installed"
    return "tensorflow", "none installed"  # Keras's own default; its import error says more


def select_backend() -> str:
    """Set ``KERAS_BACKEND`` for this process (before Keras is imported); return it."""
    backend, why = choose_backend()
    if why != "KERAS_BACKEND":
        os.environ["KERAS_BACKEND"] = backend
    return backend


def _keras_config_path(environ: Mapping[str, str]) -> Path:
    if environ.get("KERAS_HOME"):
        return Path(environ["KERAS_HOME"]) / "keras.json"
    home = Path(os.path.expanduser("~"))
    if not os.access(home, os.W_OK):  # where Keras itself falls back to
        home = Path("/tmp")
    return home / ".keras" / "keras.json"


def _user_keras_config(environ: Mapping[str, str]) -> dict | None:
    """The keras.json contents when the user wrote it; None when absent, unreadable or
    exactly what Keras writes by itself."""
    try:
        config = json.loads(_keras_config_path(environ).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config == _KERAS_WRITTEN_CONFIG:
        return None
    return config

"""keras-bn: batch normalization for Keras 3 that ships to edge runtimes.

``import keras_bn`` is cheap: it imports neither Keras nor a backend. The public
names below are imported on first use (PEP 562), so ``keras-bn --help`` starts in
a blink. Our layer must still be registered with Keras (as
``keras_bn>BatchNormalization``) whenever Keras is in use, so that
``keras.saving.load_model`` finds it without ``custom_objects``:

* if Keras is already imported, :mod:`keras_bn.layers` is imported right away;
* otherwise a one-shot import hook (:class:`_RegisterAfterKeras`) imports
  :mod:`keras_bn.layers` as soon as ``import keras`` finishes, then removes itself.
"""

from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

# Public name -> module that defines it (imported on first attribute access).
_EXPORTS: dict[str, str] = {
    "BatchNormalization": "keras_bn.layers",
    "BatchNormMonitor": "keras_bn.monitor",
    "load_torch_batch_norm": "keras_bn.torch_interop",
    "recalibrate_batch_norm": "keras_bn.recalibration",
    "replace_batch_norm": "keras_bn.replacement",
    "torch_batch_norm_kwargs": "keras_bn.torch_interop",
}
# Submodules that ``import keras_bn`` used to import, still reachable as attributes.
_SUBMODULES = ("layers", "training")

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> object:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))


class _RegisterAfterKeras:
    """Imports :mod:`keras_bn.layers` right after ``keras`` finishes importing.

    A ``sys.meta_path`` finder (duck-typed: ``importlib.abc`` costs more to import
    than all of keras-bn's CLI) that finds nothing itself: for ``keras`` it asks the
    other finders for the spec, wraps that loader's ``exec_module`` and removes
    itself from ``sys.meta_path``, so it runs at most once and costs nothing for
    any other import.
    """

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname != "keras":
            return None
        import importlib.util

        _remove_hook()
        spec = importlib.util.find_spec("keras")  # the other finders (this one is gone)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_keras = loader.exec_module

        def exec_module(module: object) -> None:
            exec_keras(module)
            try:
                del loader.exec_module  # back to the loader's own method
            except AttributeError:  # pragma: no cover - a loader with __slots__
                pass
            importlib.import_module("keras_bn.layers")  # registers the layer

        loader.exec_module = exec_module
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterKeras)]


def _register_layer_with_keras() -> None:
    if "keras" in sys.modules:
        importlib.import_module("keras_bn.layers")
    elif not any(isinstance(f, _RegisterAfterKeras) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterKeras())  # type: ignore[arg-type]


_register_layer_with_keras()

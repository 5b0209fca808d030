"""The keras-bn converter: fold BatchNormalization, export to ONNX, validate.

Three stages, one room each: :mod:`.folding` rewrites a model's graph without
foldable BatchNormalization layers (and rebuilds it as a Keras model),
:mod:`.onnx` exports a graph as ONNX, :mod:`.validation` runs the Keras model and
the ONNX file (through :mod:`.runtime`) and compares them (:mod:`.comparison`).
:mod:`.graph` is the flattened-graph IR they share, :mod:`.prepared` the model
flattened once per run (what each stage takes), :mod:`.samples` the Keras-side
inputs, :mod:`.precision` converts an exported model to float16 or int8,
:mod:`.benchmarking` times it, and :mod:`.cli` is the ``keras-bn`` command.

The public names below are imported on first use, so ``import keras_bn.converters``
stays cheap (the CLI's ``--help`` needs no onnx, no onnxruntime)::

    from keras_bn.converters import fold_batch_norms, export_onnx, validate_onnx

    folded, report = fold_batch_norms(model)
    export_onnx(folded, "model.onnx")
    assert validate_onnx(model, "model.onnx")
"""

from __future__ import annotations

import importlib
from typing import Any

from keras_bn.converters.errors import UserInputError

# Public name -> module (relative to this package) that defines it.
_EXPORTS: dict[str, str] = {
    "fold_batch_norms": "folding",
    "plan_folds": "folding",
    "check_batch_norm_statistics": "folding",
    "FoldReport": "folding",
    "FoldEntry": "folding",
    "Fp16Risk": "folding",
    "export_onnx": "onnx.export",
    "ExportResult": "onnx.export",
    "ExportWarning": "onnx.export",
    "UnsupportedLayersError": "onnx.export",
    "validate_onnx": "validation",
    "KerasReference": "reference",
    "prepare": "prepared",
    "make_sample_inputs": "samples",
    "ValidationReport": "validation",
    "compare_arrays": "comparison",
    "convert_float16": "precision",
    "quantize_int8": "precision",
    "bench_onnx": "benchmarking",
    "load_model": "model_io",
}

__all__ = ["UserInputError", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""When each stage of a ``keras-bn`` command starts and ends, and on which thread.

Runs the command in this process as the ``keras-bn`` program runs it
(``main(owns_process=True)``: the program's process-wide settings, such as JAX's
depthwise convolutions by taps, apply), with the stages below wrapped so that each
call's thread, start and end (seconds since this script started) are printed to
stderr when it returns, sorted by start at the end. The command's own output goes
where it always goes. Used for the int8 export, whose Keras chain (the statistics
check, on a worker thread) and quantization chain (the main thread) run side by
side::

    KERAS_BACKEND=jax python benchmarks/command_timeline.py export model.keras \\
        -o int8.onnx --precision int8 --calibration calibration.npz --force -q

BENCHMARKS.md section 61.
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

START = time.perf_counter()

# (module, function or Class.method) wrapped when the command runs.
STAGES = (
    ("keras_bn.converters.statistics_check", "check_statistics"),
    ("keras_bn.recalibration", "BatchNormInputs.measure"),
    ("keras_bn.converters.onnx.export", "export_onnx"),
    ("keras_bn.converters.precision", "quantize_int8"),
    ("keras_bn.converters.precision", "_equalize"),
    ("keras_bn.converters.calibration", "calibrate"),
    ("keras_bn.converters.calibration", "quantize_qdq"),
    ("keras_bn.converters.weight_rounding", "round_weights"),
    ("keras_bn.converters.bias_correction", "correct_biases"),
    ("keras_bn.converters.precision", "_save_int8"),
    ("keras_bn.converters.divergence", "layer_divergence"),
    ("keras_bn.converters.precision", "_int8_outputs"),
    ("keras_bn.converters.precision", "convert_float16"),
    ("keras_bn.converters.validation", "validate_onnx"),
)

_records: list[tuple[float, float, str, str]] = []


def _timed(function: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter() - START
        try:
            return function(*args, **kwargs)
        finally:
            end = time.perf_counter() - START
            _records.append((start, end, threading.current_thread().name, name))

    return timed


def _wrap_stages() -> None:
    for module_name, name in STAGES:
        module = importlib.import_module(module_name)
        owner_name, _, attribute = name.rpartition(".")
        owner = getattr(module, owner_name) if owner_name else module
        setattr(owner, attribute, _timed(getattr(owner, attribute), name))


def main(argv: list[str]) -> int:
    from keras_bn.converters.cli import app, quiet

    quiet.import_keras()  # the program's own import, before the stages' modules load Keras
    _wrap_stages()
    try:
        return app.main(argv, owns_process=True)
    finally:
        for start, end, thread, name in sorted(_records):
            print(
                f"{thread[:24]:24s} {start:7.2f} -> {end:7.2f} s ({end - start:6.2f} s) {name}",
                file=sys.stderr,
            )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Latency of ONNX models in onnxruntime, with graph optimizations off and on.

:func:`bench_onnx` times ``session.run`` for each model at each optimization level
in :data:`OPTIMIZATION_LEVELS` and reports the median and 90th percentile. Given two
models (say, exported with and without folding) it lays them out side by side.
"Optimizations off" shows the graph as exported; "on" shows what onnxruntime's own
fusions (which include folding BatchNormalization into Conv) recover at load time.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keras_bn.converters import runtime
from keras_bn.converters.errors import UserInputError
from keras_bn.converters.user_files import guarded

__all__ = ["OPTIMIZATION_LEVELS", "BenchResult", "BenchReport", "bench_onnx", "random_inputs"]

_RUN_FIX = "check the inputs it declares, or give --inputs FILE.npz (inputs=...)"

# Label -> onnxruntime.GraphOptimizationLevel member name.
OPTIMIZATION_LEVELS: dict[str, str] = {
    "off": "ORT_DISABLE_ALL",
    "on": "ORT_ENABLE_ALL",
}


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """Latency of one model at one graph optimization level, in milliseconds."""

    model: str
    optimization: str
    batch_size: int
    runs: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float


@dataclasses.dataclass
class BenchReport:
    """All timings of one :func:`bench_onnx` call."""

    models: list[str]
    results: list[BenchResult]
    threads: int | None

    def get(self, model: str, optimization: str) -> BenchResult:
        for result in self.results:
            if result.model == model and result.optimization == optimization:
                return result
        raise KeyError((model, optimization))

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": self.models,
            "threads": self.threads,
            "results": [dataclasses.asdict(result) for result in self.results],
        }

    def table(self) -> list[list[str]]:
        """Rows of the side-by-side table (header first)."""
        header = ["optimizations"]
        for index, model in enumerate(self.models):
            label = (
                Path(model).name if len(self.models) == 1 else f"[{index + 1}] {Path(model).name}"
            )
            header += [f"{label} median ms", "p90 ms"]
        if len(self.models) == 2:
            header.append("[2]/[1] median")
        rows = [header]
        for level in OPTIMIZATION_LEVELS:
            row = [level]
            for model in self.models:
                result = self.get(model, level)
                row += [f"{result.median_ms:.3f}", f"{result.p90_ms:.3f}"]
            if len(self.models) == 2:
                first, second = (self.get(model, level).median_ms for model in self.models)
                row.append(f"{second / first:.2f}x" if first > 0 else "-")
            rows.append(row)
        return rows

    def __str__(self) -> str:
        from keras_bn.converters.progress import format_table

        first = self.results[0]
        title = f"onnxruntime latency, batch size {first.batch_size}, {first.runs} runs"
        if self.threads:
            title += f", {self.threads} thread(s)"
        return title + "\n" + format_table(self.table())


def random_inputs(
    specs: Sequence[tuple[str, tuple[int | None, ...], str]], batch_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Standard-normal inputs for ONNX input ``specs``; dynamic batch -> ``batch_size``."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, shape, dtype in specs:
        if any(d is None for d in shape[1:]):
            raise UserInputError(
                f"ONNX input {name!r} has dynamic dimensions {shape}; give inputs with "
                "--inputs FILE.npz (inputs=...) to benchmark it."
            )
        full = tuple(
            int(batch_size if size is None else size)
            for size in ((shape[0], *shape[1:]) if shape else ())
        )
        if np.dtype(dtype).kind == "f":
            inputs[name] = rng.standard_normal(full).astype(dtype)
        else:
            inputs[name] = rng.integers(0, 2, size=full).astype(dtype)
    return inputs


def bench_onnx(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    runs: int = 50,
    warmup: int = 5,
    batch_size: int = 1,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    threads: int | None = None,
    seed: int = 0,
) -> BenchReport:
    """Time one or more ONNX models in onnxruntime (CPU).

    Args:
        paths: one model path or a sequence of them (two give a side-by-side table).
        runs: timed runs per model and optimization level (median and p90 over them).
        warmup: untimed runs first.
        batch_size: batch size of the generated inputs (for a dynamic batch axis).
        inputs: inputs to use instead of random ones, keyed by ONNX input name (or a
            single array for single-input models), in the ONNX model's layout. Each
            model gets them cast to its own input dtypes.
        threads: ``intra_op_num_threads`` (``None``: onnxruntime's default).
        seed: seed of the random inputs.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    paths = [str(path) for path in paths]
    if not paths:
        raise UserInputError("No ONNX model given; expected one or two .onnx paths.")
    if runs < 1 or warmup < 0 or batch_size < 1:
        raise UserInputError(
            f"Invalid benchmark settings: runs={runs}, warmup={warmup}, "
            f"batch_size={batch_size}; expected runs >= 1, warmup >= 0, batch_size >= 1."
        )
    for path in paths:
        if not Path(path).is_file():
            raise UserInputError(f"ONNX model {path!r} does not exist; expected an .onnx file.")
    results = []
    for path in paths:
        # Opened first: a clear error for a file onnxruntime rejects.
        specs = runtime.input_specs(runtime.open_session(path, optimization="ORT_DISABLE_ALL"))
        if inputs is None:  # the same seed for every model: equal data where shapes match
            feed = random_inputs(specs, batch_size, seed)
        else:
            feed = runtime.match_inputs(specs, inputs, "Benchmark inputs")
        actual_batch = len(next(iter(feed.values())))
        for level in OPTIMIZATION_LEVELS:
            session = runtime.open_session(
                path, optimization=OPTIMIZATION_LEVELS[level], threads=threads
            )
            times = np.empty(runs)
            # A model onnxruntime loads but cannot run on inputs of its declared
            # shapes is the file's problem (a shape that contradicts its graph).
            with guarded(f"ONNX model {path!r}", "fails to run in onnxruntime", _RUN_FIX):
                for _ in range(warmup):
                    session.run(None, feed)
                for index in range(runs):
                    start = time.perf_counter()
                    session.run(None, feed)
                    times[index] = time.perf_counter() - start
            times *= 1000.0
            results.append(
                BenchResult(
                    model=str(path),
                    optimization=level,
                    batch_size=actual_batch,
                    runs=runs,
                    median_ms=float(np.median(times)),
                    p90_ms=float(np.percentile(times, 90)),
                    mean_ms=float(times.mean()),
                    min_ms=float(times.min()),
                )
            )
    return BenchReport(models=[str(p) for p in paths], results=results, threads=threads)

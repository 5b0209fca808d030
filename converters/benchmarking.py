"""Latency of ONNX models in onnxruntime, with graph optimizations off and on.

:func:`bench_onnx` times ``session.run`` for each model at each optimization level
in :data:`OPTIMIZATION_LEVELS` and reports the median and 90th percentile. Given
several models (float32, float16 and int8 exports of one model, say) it lays them
out side by side with their sizes and speed-ups against the first.
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

__all__ = [
    "OPTIMIZATION_LEVELS",
    "BenchResult",
    "BenchReport",
    "bench_onnx",
    "model_bytes",
    "speedup_text",
    "random_inputs",
]

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
    """All timings of one :func:`bench_onnx` call, and each model's size on disk."""

    models: list[str]
    results: list[BenchResult]
    threads: int | None
    sizes: list[int] = dataclasses.field(default_factory=list)  # bytes, as ``models``

    def get(self, model: str, optimization: str) -> BenchResult:
        for result in self.results:
            if result.model == model and result.optimization == optimization:
                return result
        raise KeyError((model, optimization))

    def speedup(self, model: str, optimization: str) -> float | None:
        """How many times faster than the first model (median latency), at one level."""
        first = self.get(self.models[0], optimization).median_ms
        this = self.get(model, optimization).median_ms
        return first / this if this > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": self.models,
            "threads": self.threads,
            "bytes": dict(zip(self.models, self.sizes, strict=False)),
            "speedup_vs_first": {
                model: {level: self.speedup(model, level) for level in OPTIMIZATION_LEVELS}
                for model in self.models
            },
            "results": [dataclasses.asdict(result) for result in self.results],
        }

    def table(self) -> list[list[str]]:
        """Rows of the table (header first): one row per model, side by side."""
        several = len(self.models) > 1
        header = ["model", "size"]
        for level in OPTIMIZATION_LEVELS:
            header += [f"{level}: median ms", "p90 ms"] + (["speed-up"] if several else [])
        rows = [header]
        for index, model in enumerate(self.models):
            label = f"[{index + 1}] {Path(model).name}" if several else Path(model).name
            size = _size_text(self.sizes[index]) if index < len(self.sizes) else "-"
            row = [label, size]
            for level in OPTIMIZATION_LEVELS:
                result = self.get(model, level)
                row += [f"{result.median_ms:.3f}", f"{result.p90_ms:.3f}"]
                if several:
                    speedup = self.speedup(model, level)
                    row.append("-" if speedup is None else speedup_text(speedup))
            rows.append(row)
        return rows

    def __str__(self) -> str:
        from keras_bn.converters.progress import format_table

        first = self.results[0]
        title = f"onnxruntime latency, batch size {first.batch_size}, {first.runs} runs"
        if self.threads:
            title += f", {self.threads} thread(s)"
        legend = "off: the graph as exported; on: with onnxruntime's fusions"
        if len(self.models) > 1:
            legend += "; speed-up: [1]'s median latency / this model's"
        return f"{title}\n{legend}\n{format_table(self.table())}"


def speedup_text(speedup: float) -> str:
    """``1.85x``; two significant digits below 0.1 (``0.012x``)."""
    return f"{speedup:.2f}x" if speedup >= 0.1 else f"{speedup:.2g}x"


def _size_text(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def model_bytes(path: str | os.PathLike) -> int:
    """The bytes an ONNX model takes on disk: the file and its external data files."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    path = Path(path)
    total = path.stat().st_size
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # onnxruntime's own message comes when it opens the file
        return total
    locations = {
        ExternalDataInfo(tensor).location
        for tensor in model.graph.initializer
        if uses_external_data(tensor)
    }
    for location in locations:
        data = path.parent / location
        if data.is_file():
            total += data.stat().st_size
    return total


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
        paths: one model path or a sequence of them, laid out side by side with
            their sizes and speed-ups against the first.
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
        raise UserInputError("No ONNX model given; expected one or more .onnx paths.")
    if runs < 1 or warmup < 0 or batch_size < 1:
        raise UserInputError(
            f"Invalid benchmark settings: runs={runs}, warmup={warmup}, "
            f"batch_size={batch_size}; expected runs >= 1, warmup >= 0, batch_size >= 1."
        )
    for path in paths:
        if not Path(path).is_file():
            raise UserInputError(f"ONNX model {path!r} does not exist; expected an .onnx file.")
    labels = _labels([str(path) for path in paths])
    results = []
    for path, label in zip(paths, labels, strict=True):
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
                    model=label,
                    optimization=level,
                    batch_size=actual_batch,
                    runs=runs,
                    median_ms=float(np.median(times)),
                    p90_ms=float(np.percentile(times, 90)),
                    mean_ms=float(times.mean()),
                    min_ms=float(times.min()),
                )
            )
    sizes = [model_bytes(path) for path in paths]
    return BenchReport(models=labels, results=results, threads=threads, sizes=sizes)


def _labels(paths: Sequence[str]) -> list[str]:
    """Each model's name in the report: its path, and ``PATH (k)`` for its k-th time
    when it is given again (``bench a.onnx a.onnx``: the run-to-run spread), so that
    every run keeps its own row and JSON entry."""
    seen: dict[str, int] = {}
    labels = []
    for path in paths:
        seen[path] = seen.get(path, 0) + 1
        labels.append(path if seen[path] == 1 else f"{path} ({seen[path]})")
    return labels

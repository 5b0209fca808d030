"""keras-bn's fold + export + validate against Keras's own ONNX exporter (tf2onnx).

For each Keras Applications model (weights=None, randomized BN statistics, logits):

1. end to end, ours: ``export_onnx(model, path, fold=True)`` (folds while
   exporting) + ``validate_onnx`` (against the original model, batch 1 and 2),
   against Keras's
   ``model.export(path, format="onnx")`` (TensorFlow tracing + tf2onnx), timed in
   the same process on the same model, with the ratio; also the two-step path
   (``fold_batch_norms`` building the folded Keras model, then ``export_onnx``);
2. the graphs: node counts, Transpose / BatchNormalization / Mul+Add counts, our
   structural check on both files (extra graph inputs, unused initializers), and
   each file's error against Keras;
3. onnxruntime latency (CPU, batch 1, one thread) of both graphs with graph
   optimizations disabled and enabled, timed in interleaved rounds (ours, theirs,
   ours, ...) so that load from other processes on a shared machine hits both alike.

Needs tf2onnx (``pip install keras-bn[bench]``) on the TensorFlow backend. Usage::

    python benchmarks/bench_export.py --models ResNet50 MobileNetV2 --runs 30 \\
        --json benchmarks/results_export.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The test suite's helpers: the same BN statistics as tests/onnx/test_onnx_applications.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from support.models import randomize_batch_norms  # noqa: E402

from keras_bn.converters.folding import fold_batch_norms  # noqa: E402
from keras_bn.converters.onnx.export import ExportWarning, check_structure, export_onnx  # noqa: E402
from keras_bn.converters.validation import validate_onnx  # noqa: E402

DEFAULT_MODELS = ["ResNet50", "MobileNetV2", "MobileNetV3Small", "EfficientNetB0"]
LEVELS = {"off": "ORT_DISABLE_ALL", "on": "ORT_ENABLE_ALL"}


def graph_summary(path: Path, input_names: list[str]) -> dict:
    proto = onnx.load(str(path))
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    structure = check_structure(proto, input_names)
    initializers = {t.name for t in proto.graph.initializer}
    return {
        "nodes": len(proto.graph.node),
        "transposes": counts.get("Transpose", 0),
        "batch_norms": counts.get("BatchNormalization", 0),
        "mul": counts.get("Mul", 0),
        "add": counts.get("Add", 0),
        "graph_inputs": [i.name for i in proto.graph.input if i.name not in initializers],
        "structure_errors": structure.errors,
        "structure_warnings": structure.warnings,
        "megabytes": round(path.stat().st_size / 1e6, 1),
    }


def session(path: Path, level: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def extra_inputs(path: Path, model: keras.Model) -> dict[str, np.ndarray] | None:
    """Values for the graph inputs Keras's exporter adds beyond the model's own.

    tf2onnx turns a Normalization layer's mean and variance into required inputs
    (``.../normalization_1/Sub/y:0`` and ``.../Sqrt/x:0``); feeding them their
    values from the Keras layer makes the graph runnable for the latency
    comparison. None when an extra input is something else.
    """
    values = {}
    for spec in session(path, "off").get_inputs()[1:]:
        parts = spec.name.split("/")
        if len(parts) < 3:
            return None
        layer = None
        for candidate in (parts[-3], re.sub(r"_\d+$", "", parts[-3])):
            try:
                layer = model.get_layer(candidate)
                break
            except ValueError:
                continue
        operation = "/".join(parts[-2:])
        if layer is None or not isinstance(layer, keras.layers.Normalization):
            return None
        if operation.startswith("Sub/y"):
            value = layer.mean
        elif operation.startswith("Sqrt/x"):
            value = layer.variance
        else:
            return None
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        values[spec.name] = np.asarray(keras.ops.convert_to_numpy(value), np.float32).reshape(shape)
    return values


def error_against_keras(
    path: Path, model: keras.Model, x: np.ndarray, extra: dict | None = None
) -> float:
    """max |onnx - keras| / max |keras| at batch 1 (feeding the first graph input)."""
    s = session(path, "on")
    actual = s.run(None, {s.get_inputs()[0].name: x, **(extra or {})})[0]
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def interleaved_latency(
    paths: dict[str, Path], x: np.ndarray, runs: int, warmup: int, extra: dict | None = None
) -> dict:
    """Median and p90 milliseconds per (graph, optimization level), interleaved rounds.

    ``extra`` maps a graph's name to values for its additional inputs.
    """
    extra = extra or {}
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in paths}
    for level in LEVELS:
        sessions = {name: session(path, level) for name, path in paths.items()}
        feeds = {
            name: {s.get_inputs()[0].name: x, **extra.get(name, {})} for name, s in sessions.items()
        }
        for name, s in sessions.items():
            for _ in range(warmup):
                s.run(None, feeds[name])
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(runs):
            for name, s in sessions.items():
                start = time.perf_counter()
                s.run(None, feeds[name])
                times[name].append((time.perf_counter() - start) * 1000.0)
        for name, values in times.items():
            results[name][level] = {
                "median_ms": round(float(np.median(values)), 2),
                "p90_ms": round(float(np.percentile(values, 90)), 2),
            }
    return results


def bench_model(name: str, size: int, runs: int, warmup: int, directory: Path) -> dict:
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classifier_activation=None
    )
    randomize_batch_norms(model, gain=(0.6, 1.4))
    x = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype("float32")
    model(x, training=False)  # Keras's exporter refuses a never-called model; warms TF up

    ours = directory / f"{name}_keras_bn.onnx"
    ours_start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)
        result = export_onnx(model, ours, fold=True)
    exported_at = time.perf_counter()
    validation = validate_onnx(model, ours)
    ours_seconds = time.perf_counter() - ours_start
    report = result.fold_report

    # The two-step path: the folded Keras model first (measure=False: no self-check).
    two_step_start = time.perf_counter()
    folded, _ = fold_batch_norms(model, measure=False)
    folded_at = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)
        export_onnx(folded, directory / f"{name}_two_step.onnx")
    two_step_end = time.perf_counter()
    timings = {
        "fold_and_export_s": round(exported_at - ours_start, 2),
        "validate_s": round(ours_seconds - (exported_at - ours_start), 2),
        "total_s": round(ours_seconds, 2),
        "two_step_fold_s": round(folded_at - two_step_start, 2),
        "two_step_export_s": round(two_step_end - folded_at, 2),
    }

    theirs = directory / f"{name}_keras_export.onnx"
    keras_start = time.perf_counter()
    try:
        model.export(str(theirs), format="onnx", verbose=False)
        failure = None
    except Exception as error:
        failure = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
    keras_seconds = time.perf_counter() - keras_start
    if failure is None:
        try:
            session(theirs, "off")
        except Exception as error:  # tf2onnx writes unsupported TF ops (ConvNeXt: Erfc)
            failure = "onnxruntime cannot load it: " + " ".join(str(error).split())[:300]

    input_names = result.input_names
    if failure is not None:
        return {
            "model": name,
            "input": [size, size, 3],
            "parameters": int(model.count_params()),
            "keras_bn": {
                **timings,
                "validated": bool(validation),
                "graph": graph_summary(ours, input_names),
                "latency": interleaved_latency({"keras_bn": ours}, x, runs, warmup)["keras_bn"],
            },
            "keras_export": {"total_s": round(keras_seconds, 2), "failed": failure},
        }
    entry = {
        "model": name,
        "input": [size, size, 3],
        "parameters": int(model.count_params()),
        "keras_bn": {
            **timings,
            "folded": report.folded_count,
            "not_folded": report.not_folded_count,
            "validated": bool(validation),
            "relative_to_max": max(c.relative_to_max for c in validation.comparisons),
            "graph": graph_summary(ours, input_names),
        },
        "keras_export": {
            "total_s": round(keras_seconds, 2),
            "graph": graph_summary(theirs, input_names),
        },
        "speedup": round(keras_seconds / ours_seconds, 1),
        "speedup_fold_and_export": round(keras_seconds / (exported_at - ours_start), 1),
        "speedup_two_step_with_validation": round(
            keras_seconds / (two_step_end - two_step_start + timings["validate_s"]),
            1,
        ),
    }
    entry["keras_bn"]["error_vs_keras"] = error_against_keras(ours, model, x)
    extra = extra_inputs(theirs, model)
    entry["keras_export"]["extra_inputs_fed"] = sorted(extra or {})
    if extra is not None:
        entry["keras_export"]["error_vs_keras"] = error_against_keras(theirs, model, x, extra)
        latency = interleaved_latency(
            {"keras_bn": ours, "keras_export": theirs}, x, runs, warmup, {"keras_export": extra}
        )
        entry["keras_bn"]["latency"] = latency["keras_bn"]
        entry["keras_export"]["latency"] = latency["keras_export"]
    else:
        entry["keras_export"]["error_vs_keras"] = None
        entry["keras_bn"]["latency"] = interleaved_latency({"keras_bn": ours}, x, runs, warmup)[
            "keras_bn"
        ]
        entry["keras_export"]["latency"] = None  # needs inputs we cannot supply
    return entry


def table(entries: list[dict]) -> str:
    lines = [
        "| model | ours: fold + export, validate (s) | Keras export (s) | speedup "
        "| speedup: fold + export only / two-step fold, export, validate "
        "| nodes ours / Keras | Transpose ours / Keras | BN-like Mul, Add ours / Keras "
        "| latency off: ours / Keras (ms) | latency on: ours / Keras (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        ours, theirs = e["keras_bn"], e["keras_export"]
        if "failed" in theirs:
            lines.append(
                f"| {e['model']} {e['input'][0]}px | {ours['total_s']} "
                f"({ours['fold_and_export_s']} + {ours['validate_s']}) "
                f"| failed after {theirs['total_s']} s: {theirs['failed'][:80]} | | "
                f"| {ours['graph']['nodes']} / - | {ours['graph']['transposes']} / - | | "
                f"{ours['latency']['off']['median_ms']} / - "
                f"| {ours['latency']['on']['median_ms']} / - |"
            )
            continue
        og, tg = ours["graph"], theirs["graph"]

        def latency(level, ours=ours, theirs=theirs):
            mine = ours["latency"][level]["median_ms"]
            if theirs["latency"] is None:
                return f"{mine} / n.a. (extra inputs)"
            note = "*" if theirs["extra_inputs_fed"] else ""
            return f"{mine} / {theirs['latency'][level]['median_ms']}{note}"

        lines.append(
            f"| {e['model']} {e['input'][0]}px | {ours['total_s']} "
            f"({ours['fold_and_export_s']} + {ours['validate_s']}) "
            f"| {theirs['total_s']} | {e['speedup']}x "
            f"| {e['speedup_fold_and_export']}x / {e['speedup_two_step_with_validation']}x "
            f"| {og['nodes']} / {tg['nodes']} "
            f"| {og['transposes']} / {tg['transposes']} "
            f"| {og['mul']}, {og['add']} / {tg['mul']}, {tg['add']} "
            f"| {latency('off')} | {latency('on')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--runs", type=int, default=30, help="timed latency rounds")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if keras.backend.backend() != "tensorflow":
        parser.error("Keras's ONNX exporter is compared on the TensorFlow backend.")
    entries = []
    with tempfile.TemporaryDirectory() as directory:
        for name in args.models:
            entry = bench_model(name, args.size, args.runs, args.warmup, Path(directory))
            entries.append(entry)
            print(json.dumps(entry), flush=True)
    environment = {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    print(table(entries))
    print(json.dumps(environment))
    if args.json:
        args.json.write_text(json.dumps({"environment": environment, "models": entries}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

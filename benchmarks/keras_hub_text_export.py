"""keras-bn's native export against Keras's own exporter on KerasHub text backbones.

The tiny text (and audio) backbones of ``tests/onnx/test_keras_hub_text.py`` (its
``MODELS``, built from constructor arguments, random weights with KerasHub's zero
biases and offsets made non-trivial), each exported by keras-bn
``export_onnx(model, path, fold=True)`` and by Keras's
``model.export(path, format="onnx")`` (TensorFlow: tf2onnx; JAX: jax2onnx). Every
file is run by onnxruntime at two sequence lengths and two batch sizes (the test's
``LENGTHS`` and ``BATCH_SIZES``, its padding masks and token ids) and judged against
a float64 build of the same model with the same weights (``judge_against_exact``:
the file's error ``max |y - exact| / max |exact|`` against Keras float32's own).

Per exporter: works (the export call returns and the file runs at the first length
with outputs of Keras's shapes), the worst error over the runs and Keras float32's
worst, whether each run passes the float64 judge, whether the one file runs at the
second length too (dynamic length), ONNX nodes (a Scan body's included) and the
export call's time (median of ``--repeats``). The model is called once before either
exporter sees it (Keras's exporter needs a called model).

Usage::

    python benchmarks/keras_hub_text_export.py [--models bert gpt2] [--repeats 2]
        [--backends tensorflow jax] [--json out.json]

Each backend runs in a subprocess of its own (``KERAS_BACKEND``), one after another.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _text_test_module():
    """tests/onnx/test_keras_hub_text.py, imported by path (``tests/onnx`` is no package,
    and its folder name would shadow the ``onnx`` package)."""
    path = ROOT / "tests" / "onnx" / "test_keras_hub_text.py"
    spec = importlib.util.spec_from_file_location("keras_hub_text_cases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _first_line(error: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    text = re.sub(r"Load model from \S+ failed:", "", text)
    node = re.search(r'In Node, \("[^"]*", (\w+), "([^"]*)".*?Error (.*)', " ".join(text.split()))
    if node:  # onnxruntime's INVALID_GRAPH: the op and its error, not the node's name
        return f"onnxruntime: {node.group(1)} node: {node.group(3)}"[:200]
    traced = re.search(r"\((\w+): tracing \S+ failed at (\S+) `[^`]*`: ([^;]*)", text)
    if traced:  # keras-bn's refusal: the first layer, where its trace stopped, and why
        layer, where, cause = traced.groups()
        return f"{type(error).__name__}: {layer} at {where}: {cause}"[:200]
    lines = [part.strip() for part in text.splitlines() if part.strip()] or [""]
    line = lines[0]
    if line.startswith("Exception encountered when calling") and len(lines) > 1:
        line += " " + lines[1]  # Keras's wrapper: the cause is on the next line
    frames = traceback.extract_tb(error.__traceback__)
    if isinstance(error, IndexError | KeyError | AttributeError | AssertionError) and frames:
        line += f" (in {'/'.join(Path(frames[-1].filename).parts[-2:])})"  # whose bug
    return f"{type(error).__name__}: {line}"[:200]


def _feed(session, arrays: dict, batch: int) -> dict:
    """The session's inputs from ``arrays`` by name (tf2onnx may add ``:0``), else in order."""
    feeds = {}
    names = list(arrays)
    graph_inputs = [item.name for item in session.get_inputs()]
    if len(graph_inputs) != len(names):
        raise RuntimeError(f"extra graph inputs: {graph_inputs}, the model's {names}")
    for position, item in enumerate(session.get_inputs()):
        name = item.name.split(":")[0]
        key = name if name in arrays else names[position]
        feeds[item.name] = arrays[key][:batch]
    return feeds


def _ordered(session, outputs: list, keras_names: list[str] | None) -> list:
    """ONNX outputs in Keras's flattened order: by name where every name matches."""
    if keras_names is None:
        return outputs
    names = [item.name.split(":")[0] for item in session.get_outputs()]
    if sorted(names) != sorted(keras_names):
        return outputs
    return [outputs[names.index(name)] for name in keras_names]


def _run_file(path, model, twin, cases) -> dict:
    """onnxruntime on ``path`` at each (length, batch): errors against float64 or the failure."""
    import keras
    import numpy as np
    import onnxruntime as ort

    from keras_bn.converters.comparison import compare_arrays, judge_against_exact

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    output = model.output
    keras_names = sorted(output) if isinstance(output, dict) else None
    runs = {}
    for length in cases.LENGTHS:
        arrays = cases._inputs(model, max(cases.BATCH_SIZES), length, seed=length)
        keras_all = [
            np.asarray(keras.ops.convert_to_numpy(y))
            for y in keras.tree.flatten(model(arrays, training=False))
        ]
        exact_all = twin(arrays)
        for batch in cases.BATCH_SIZES:
            key = f"L{length}/B{batch}"
            try:
                actual = _ordered(
                    session, session.run(None, _feed(session, arrays, batch)), keras_names
                )
                if len(actual) != len(keras_all):
                    raise RuntimeError(f"{len(actual)} outputs, Keras {len(keras_all)}")
                errors, keras_errors, passed = [], [], True
                for onnx_out, keras_out, exact_out in zip(
                    actual, keras_all, exact_all, strict=True
                ):
                    keras_out, exact_out = keras_out[:batch], exact_out[:batch]
                    if onnx_out.shape != keras_out.shape:
                        raise RuntimeError(
                            f"output shape {onnx_out.shape}, Keras {keras_out.shape}"
                        )
                    verdict = judge_against_exact(
                        compare_arrays(onnx_out, keras_out), onnx_out, keras_out, exact_out
                    )
                    errors.append(verdict.exact_error)
                    keras_errors.append(verdict.keras_exact_error)
                    passed = passed and verdict.passed
                runs[key] = {
                    "error": max(errors),
                    "keras_error": max(keras_errors),
                    "exact": passed,
                }
            except Exception as error:  # noqa: BLE001 - a benchmark records failures
                runs[key] = {"failure": _first_line(error)}
    return runs


def _measure(name: str, cases, exporter: str, repeats: int, workdir: Path) -> dict:
    import keras
    import numpy as np
    import onnx
    from support.checks import float64_build

    from keras_bn.converters.onnx.export import all_nodes, export_onnx

    keras.utils.set_random_seed(0)
    model = cases.MODELS[name]()
    cases._randomize_zero_weights(model, np.random.default_rng(0))
    twin = float64_build(cases.MODELS[name], model)
    model(cases._inputs(model, 2, cases.LENGTHS[0]), training=False)  # Keras's exporter needs it
    row: dict = {"model": name, "exporter": exporter, "backend": keras.backend.backend()}
    path = workdir / f"{name}_{exporter}_{row['backend']}.onnx"
    seconds = []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if exporter == "keras-bn":
                    export_onnx(model, path, fold=True)
                else:
                    model.export(str(path), format="onnx", verbose=False)
            seconds.append(time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001
        row.update(works=False, failure=_first_line(error))
        if os.environ.get("BENCH_DEBUG"):
            traceback.print_exc()
        return row
    row["seconds"] = round(statistics.median(seconds), 2)
    row["nodes"] = len(all_nodes(onnx.load(str(path)).graph))
    try:
        runs = _run_file(path, model, twin, cases)
    except Exception as error:  # noqa: BLE001 - onnxruntime refuses the file
        row.update(works=False, failure=_first_line(error))
        return row
    row["runs"] = runs
    first = [v for k, v in runs.items() if k.startswith(f"L{cases.LENGTHS[0]}/")]
    second = [v for k, v in runs.items() if k.startswith(f"L{cases.LENGTHS[1]}/")]
    row["works"] = all("failure" not in v for v in first)
    if not row["works"]:
        row["failure"] = next(v["failure"] for v in first if "failure" in v)
        return row
    row["dynamic"] = all("failure" not in v for v in second)
    if not row["dynamic"]:
        row["dynamic_failure"] = next(v["failure"] for v in second if "failure" in v)
    ran = [v for v in runs.values() if "failure" not in v]
    row["error"] = max(v["error"] for v in ran)
    row["keras_error"] = max(v["keras_error"] for v in ran)
    row["exact"] = all(v["exact"] for v in ran)
    return row


def _worker(names: list[str], repeats: int, out: Path) -> None:
    cases = _text_test_module()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for exporter in ("keras-bn", "keras"):
                row = _measure(name, cases, exporter, repeats, Path(tmp))
                rows.append(row)
                print(json.dumps(row, default=str), flush=True)
                out.write_text(json.dumps(rows, indent=1, default=str))


def _cell(row: dict) -> str:
    if not row.get("works"):
        return f"fails: {row['failure']} | | |"
    error = f"{row['error']:.1e} ({row['keras_error']:.1e})"
    if not row["exact"]:
        error += " **wrong**"
    dynamic = "yes" if row["dynamic"] else f"no: {row['dynamic_failure'][:80]}"
    return f"{error} | {dynamic} | {row['nodes']} | {row['seconds']}"


def _table(rows: list[dict]) -> str:
    by_key = {(r["backend"], r["model"], r["exporter"]): r for r in rows}
    lines = []
    for backend in dict.fromkeys(r["backend"] for r in rows):
        tool = "tf2onnx" if backend == "tensorflow" else "jax2onnx"
        lines += [
            f"\n{backend}:\n",
            "| model | keras-bn: error vs float64 (Keras f32) | dynamic length | nodes | s "
            f"| Keras exporter ({tool}): error vs float64 (Keras f32) | dynamic length "
            "| nodes | s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for model in dict.fromkeys(r["model"] for r in rows if r["backend"] == backend):
            ours = by_key[(backend, model, "keras-bn")]
            theirs = by_key[(backend, model, "keras")]
            lines.append(f"| {model} | {_cell(ours)} | {_cell(theirs)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--backends", nargs="*", default=["tensorflow", "jax"])
    parser.add_argument("--repeats", type=int, default=1, help="export calls per file (median)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.models, args.repeats, Path(args.worker))
        return
    names = args.models or list(_text_test_module().MODELS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            out = Path(tmp) / f"{backend}.json"
            command = [
                sys.executable,
                __file__,
                "--worker",
                str(out),
                "--repeats",
                str(args.repeats),
            ]
            command += ["--models", *names]
            env = {**os.environ, "KERAS_BACKEND": backend}
            subprocess.run(command, env=env, check=False)
            if out.exists():
                rows += json.loads(out.read_text())
    print(_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()

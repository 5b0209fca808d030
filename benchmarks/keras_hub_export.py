"""keras-bn's native export against Keras's own exporter on KerasHub models.

For each small KerasHub vision model (``support.keras_hub_zoo.keras_hub_models``: random weights,
32x32 images, non-trivial BN statistics) and a few Keras Applications
(weights=None, 64x64): keras-bn ``export_onnx(model, path, fold=True)`` against
Keras's ``model.export(path, format="onnx")`` on the current backend (TensorFlow:
tf2onnx; JAX: jax2onnx where installed). Per exporter: success (a file that
onnxruntime runs, outputs of the right shape), export time, node count,
Transposes, BN-like nodes left (BatchNormalization nodes + Mul+Add by constants
right after a Conv/Gemm/MatMul, as ``check_structure`` counts them), and the
error against a float64 build of the same model (``max |y - exact| / max |exact|``
at batch 3), next to Keras float32's own error.

Usage::

    python benchmarks/keras_hub_export.py [--models vit swin] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from support.checks import float64_build  # noqa: E402
from support.keras_hub_zoo import keras_hub_models  # noqa: E402
from support.models import nested_batch_norms, randomize_batch_norms  # noqa: E402

from keras_bn._keras_internals import producing_operation  # noqa: E402
from keras_bn.converters.comparison import relative_error  # noqa: E402
from keras_bn.converters.onnx.export import all_nodes, check_structure, export_onnx  # noqa: E402
from keras_bn.converters.samples import UNKNOWN_DIMENSION_SIZE  # noqa: E402

APPLICATIONS = {
    "app:MobileNetV3Small": lambda: keras.applications.MobileNetV3Small(
        input_shape=(64, 64, 3), weights=None, include_preprocessing=False
    ),
    "app:ResNet50": lambda: keras.applications.ResNet50(input_shape=(64, 64, 3), weights=None),
    "app:EfficientNetB0": lambda: keras.applications.EfficientNetB0(
        input_shape=(64, 64, 3), weights=None
    ),
}


def _graph_facts(path: Path, input_names: list[str]) -> dict:
    model = onnx.load(str(path))
    ops = [node.op_type for node in all_nodes(model.graph)]  # a Scan body's too
    report = check_structure(model, input_names)
    mul_add = 0
    for message in report.warnings:
        found = re.match(r"(\d+) batch normalizations exported as Mul\+Add", message)
        if found:
            mul_add = int(found.group(1))
    return {
        "nodes": len(ops),
        "transposes": ops.count("Transpose"),
        "bn_like": ops.count("BatchNormalization") + mul_add,
        "extra_inputs": [e for e in report.errors if "graph inputs" in e],
    }


def _run_onnx(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = session.get_inputs()
    if len(feeds) != 1:
        raise RuntimeError(f"{len(feeds)} graph inputs: {[f.name for f in feeds]}")
    return session.run(None, {feeds[0].name: x})


def _measure(name: str, build, exporter: str, workdir: Path) -> dict:
    keras.utils.set_random_seed(0)
    model = build()
    rng = np.random.default_rng(0)
    for layer in nested_batch_norms(model):
        randomize_batch_norms(layer, rng, gain=(0.5, 1.5))
    shape = tuple(UNKNOWN_DIMENSION_SIZE if d is None else d for d in model.inputs[0].shape[1:])
    x = np.random.default_rng(3).standard_normal((3, *shape)).astype("float32")
    keras_out = [
        np.asarray(keras.ops.convert_to_numpy(y))
        for y in keras.tree.flatten(model(x, training=False))
    ]
    exact = float64_build(build, model)([x])
    path = workdir / f"{name.replace(':', '_')}_{exporter}.onnx"
    row: dict = {"model": name, "exporter": exporter}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "keras-bn":
                export_onnx(model, path, fold=True)
            else:
                model.export(str(path), format="onnx", verbose=False)
        row["seconds"] = round(time.perf_counter() - start, 2)
        row.update(_graph_facts(path, [producing_operation(model.inputs[0]).name]))
        outputs = _run_onnx(path, x)
        if [o.shape for o in outputs] != [k.shape for k in keras_out]:
            raise RuntimeError(f"output shapes {[o.shape for o in outputs]}")
        row["error"] = max(relative_error(o, e) for o, e in zip(outputs, exact, strict=True))
        row["keras_error"] = max(
            relative_error(k, e) for k, e in zip(keras_out, exact, strict=True)
        )
        row["ok"] = True
    except Exception as error:  # noqa: BLE001 - a benchmark records failures
        row["ok"] = False
        text = re.sub(r"Load model from \S+ failed:", "", " ".join(str(error).split()))
        row["failure"] = f"{type(error).__name__}: {text[:200]}"
        if os.environ.get("BENCH_DEBUG"):
            traceback.print_exc()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    models = {**keras_hub_models(), **APPLICATIONS}
    names = args.models or list(models)
    exporters = ["keras-bn", "keras"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for exporter in exporters:
                row = _measure(name, models[name], exporter, Path(tmp))
                rows.append(row)
                print(json.dumps(row, default=str), flush=True)
    print(
        f"\n| model | exporter ({keras.backend.backend()}) | ok | s | nodes | Transpose | "
        "BN-like | error vs float64 (Keras f32) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["ok"]:
            print(
                f"| {r['model']} | {r['exporter']} | yes | {r['seconds']} | {r['nodes']} | "
                f"{r['transposes']} | {r['bn_like']} | {r['error']:.1e} ({r['keras_error']:.1e}) |"
            )
        else:
            print(f"| {r['model']} | {r['exporter']} | no: {r['failure'][:140]} | | | | | |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()

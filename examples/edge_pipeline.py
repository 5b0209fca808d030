"""The edge pipeline end to end: train with BN, fold it away, ship ONNX float32 and int8.

On scikit-learn's bundled handwritten digits (8x8 grayscale, 10 classes; nothing is
downloaded), split with a fixed seed into train / calibration / held-out images:

1. train a small CNN that uses ``keras_bn.BatchNormalization`` for a few epochs;
2. recalibrate the BN moving statistics on the training images
   (``keras_bn.recalibrate_batch_norm``): after a short run the moving averages still
   remember their initial values and the model does worse in inference mode;
3. fold every BN into the convolution before it (``fold_batch_norms``);
4. export the folded model - and, for comparison, the unfolded one - to ONNX
   (``export_onnx``);
5. validate the folded ONNX model against the original Keras model in onnxruntime
   (``validate_onnx``); the script exits with status 1 if validation fails;
6. quantize the folded model to int8 with the calibration images (``quantize_int8``);
7. benchmark every ONNX model in onnxruntime (``bench_onnx``) and the Keras model.

It ends with a summary table: held-out accuracy, file size, ONNX node count,
latency and the largest output difference from the Keras model for each stage.

Run (under a minute on 2 CPU cores)::

    python examples/edge_pipeline.py

Options: ``--epochs``, ``--output-dir`` (default ``./edge_pipeline_out``), ``--seed``,
``--bench-runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

NUM_CLASSES = 10
HELD_OUT_SIZE = 400
CALIBRATION_SIZE = 200


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Train a small CNN with keras_bn.BatchNormalization on the digits data set, "
            "recalibrate BN, fold it, export to ONNX, validate in onnxruntime, quantize "
            "to int8 and benchmark; print a summary table."
        ),
        epilog=(
            "examples:\n"
            "  python examples/edge_pipeline.py\n"
            "  python examples/edge_pipeline.py --epochs 1 --bench-runs 20 "
            "--output-dir /tmp/edge"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="default 32")
    parser.add_argument("--seed", type=int, default=0, help="data split and weights seed")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("edge_pipeline_out"),
        help="where the models and summary.json go (default ./edge_pipeline_out)",
    )
    parser.add_argument(
        "--bench-runs",
        type=int,
        default=200,
        help="timed runs per model in the latency benchmark (default 200)",
    )
    parser.add_argument(
        "--atol",
        type=float,
        default=None,
        help="validation absolute tolerance (default: validate_onnx's float32 default)",
    )
    parser.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="validation relative tolerance (default: validate_onnx's float32 default)",
    )
    args = parser.parse_args(argv)
    for flag in ("epochs", "batch_size", "bench_runs"):
        if getattr(args, flag) < 1:
            parser.error(
                f"--{flag.replace('_', '-')} must be at least 1, received {getattr(args, flag)}"
            )
    return args


def load_data(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Digits as (N, 8, 8, 1) float32 in [0, 1], split train / calibration / held-out.

    The calibration images feed int8 quantization; the held-out images are used only
    to measure accuracy. Both splits are stratified by class.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]
    labels = digits.target.astype("int64")
    x_rest, x_held, y_rest, y_held = train_test_split(
        images, labels, test_size=HELD_OUT_SIZE, stratify=labels, random_state=seed
    )
    x_train, x_calib, y_train, y_calib = train_test_split(
        x_rest, y_rest, test_size=CALIBRATION_SIZE, stratify=y_rest, random_state=seed
    )
    return {
        "train": (x_train, y_train),
        "calibration": (x_calib, y_calib),
        "held_out": (x_held, y_held),
    }


def build_model():
    """Conv-BN-ReLU x3 (16, 32, 32 filters, one max-pool), global average pool, Dense(10).

    The convolutions have no bias: BN's beta takes its place, and folding puts it back.
    """
    import keras

    from keras_bn import BatchNormalization

    inputs = keras.Input((8, 8, 1), name="image")
    x = inputs
    for index, (filters, pool) in enumerate([(16, False), (32, True), (32, False)], 1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{index}")(x)
        x = BatchNormalization(name=f"bn{index}")(x)
        x = keras.layers.ReLU(name=f"relu{index}")(x)
        if pool:
            x = keras.layers.MaxPooling2D(name=f"pool{index}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(NUM_CLASSES, name="logits")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def keras_logits(model, images: np.ndarray, batch_size: int = 200) -> np.ndarray:
    """Inference-mode logits of a Keras model, as float64."""
    parts = [
        np.asarray(model(images[start : start + batch_size], training=False))
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(parts).astype(np.float64)


def onnx_logits(path: Path, images: np.ndarray, batch_size: int = 200) -> np.ndarray:
    """Logits of an ONNX model in onnxruntime (CPU), as float64."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    parts = [
        session.run(None, {input_name: images[start : start + batch_size]})[0]
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(parts).astype(np.float64)


def onnx_input_name(path: Path) -> str:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {initializer.name for initializer in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in initializers)


def onnx_node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def time_keras(model, image: np.ndarray, runs: int) -> float:
    """Median seconds of ``model.predict_on_batch`` (Keras's compiled inference) on one image."""
    for _ in range(10):
        model.predict_on_batch(image)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        model.predict_on_batch(image)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def save_keras(model, path: Path) -> None:
    from keras_bn.converters.files import atomic_output

    with atomic_output(path) as temporary:
        model.save(temporary)


def write_json(payload: dict, path: Path) -> None:
    from keras_bn.converters.files import atomic_output

    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")


def step(number: int, text: str) -> None:
    print(f"\n[{number}/7] {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    output_dir = args.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"output directory: {output_dir.resolve()}", flush=True)

    import keras

    import keras_bn
    from keras_bn.converters.benchmarking import bench_onnx
    from keras_bn.converters.folding import fold_batch_norms
    from keras_bn.converters.onnx.export import ExportWarning, export_onnx
    from keras_bn.converters.precision import quantize_int8
    from keras_bn.converters.validation import validate_onnx

    data = load_data(args.seed)
    x_train, y_train = data["train"]
    x_calib, _ = data["calibration"]
    x_held, y_held = data["held_out"]
    print(
        f"digits: {len(x_train)} train / {len(x_calib)} calibration / "
        f"{len(x_held)} held-out images, 8x8x1, {NUM_CLASSES} classes"
    )

    # 1. Train.
    step(1, f"training for {args.epochs} epoch(s) (Keras backend: {keras.backend.backend()})")
    keras.utils.set_random_seed(args.seed)
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    train_started = time.perf_counter()
    model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_held, y_held),
        # A progress bar on a terminal; one line per epoch in logs and CI.
        verbose=1 if sys.stdout.isatty() else 2,
    )
    train_seconds = time.perf_counter() - train_started
    logits_trained = keras_logits(model, x_held)
    accuracy_trained = accuracy(logits_trained, y_held)
    print(f"held-out accuracy (inference mode, moving statistics): {accuracy_trained:.1%}")

    # 2. Recalibrate the moving statistics on the training images.
    step(2, "recalibrating the BN moving statistics on the training images")
    keras_bn.recalibrate_batch_norm(model, x_train, batch_size=200)
    reference = keras_logits(model, x_held)
    accuracy_keras = accuracy(reference, y_held)
    print(f"held-out accuracy after recalibration: {accuracy_keras:.1%}")
    keras_path = output_dir / "model.keras"
    save_keras(model, keras_path)

    # 3. Fold.
    step(3, "folding BatchNormalization into the convolutions")
    folded, fold_report = fold_batch_norms(model, sample_inputs=x_calib)
    print(fold_report)

    # 4. Export.
    step(4, "exporting to ONNX (folded, and unfolded for comparison)")
    unfolded_path = output_dir / "model_unfolded.onnx"
    folded_path = output_dir / "model_folded.onnx"
    with warnings.catch_warnings():
        # Exporting an unfolded BN warns (it becomes Mul + Add); here that is the point.
        warnings.simplefilter("ignore", ExportWarning)
        print(export_onnx(model, unfolded_path))
    print(export_onnx(folded, folded_path))

    # 5. Validate the folded ONNX model against the original (unfolded) Keras model.
    step(5, "validating the folded ONNX model against the Keras model in onnxruntime")
    tolerances = {
        name: value
        for name, value in (("atol", args.atol), ("rtol", args.rtol))
        if value is not None
    }
    validation = validate_onnx(model, folded_path, inputs=x_held, **tolerances)
    print(validation)
    write_json(validation.to_dict(), output_dir / "validation.json")
    if not validation:
        print(
            f"error: the folded ONNX model does not match the Keras model; see "
            f"{output_dir / 'validation.json'}",
            file=sys.stderr,
        )
        return 1

    # 6. Quantize to int8, calibrated on images the model was not trained on.
    step(6, f"quantizing to int8 with {len(x_calib)} calibration images")
    int8_path = output_dir / "model_folded_int8.onnx"
    print(quantize_int8(folded_path, int8_path, {onnx_input_name(folded_path): x_calib}))

    # 7. Accuracy, differences and latency of every stage.
    step(
        7,
        f"measuring held-out accuracy and batch-1 latency ({args.bench_runs} runs, "
        "onnxruntime with 1 thread)",
    )
    onnx_stages = [
        ("ONNX float32, BN not folded", unfolded_path),
        ("ONNX float32, BN folded", folded_path),
        ("ONNX int8, BN folded", int8_path),
    ]
    bench = bench_onnx(
        [path for _, path in onnx_stages],
        runs=args.bench_runs,
        inputs={onnx_input_name(folded_path): x_held[:1]},
        threads=1,
    )
    rows = [
        {"stage": "Keras, as trained", "logits": logits_trained},
        {
            "stage": "Keras, recalibrated (reference)",
            "path": keras_path,
            "logits": reference,
            "latency_ms": time_keras(model, x_held[:1], args.bench_runs) * 1e3,
        },
    ]
    for stage, path in onnx_stages:
        rows.append(
            {
                "stage": stage,
                "path": path,
                "logits": onnx_logits(path, x_held),
                "nodes": onnx_node_count(path),
                "latency_ms": bench.get(str(path), "off").median_ms,
                "latency_ort_optimized_ms": bench.get(str(path), "on").median_ms,
            }
        )
    for row in rows:
        if "logits" in row:
            logits = row.pop("logits")
            row["accuracy"] = accuracy(logits, y_held)
            row["correct"] = int(np.sum(np.argmax(logits, axis=1) == y_held))
            row["total"] = len(y_held)
            row["max_abs_diff"] = float(np.max(np.abs(logits - reference)))
            row["top1_agreement"] = float(
                np.mean(np.argmax(logits, axis=1) == np.argmax(reference, axis=1))
            )
        if "path" in row:
            row["size_bytes"] = row["path"].stat().st_size
            row["path"] = str(row["path"].resolve())

    summary = {
        "command": " ".join(["python", *sys.argv]),
        "settings": {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed},
        "keras_backend": keras.backend.backend(),
        "held_out_images": len(y_held),
        "train_seconds": train_seconds,
        "fold": {"folded": fold_report.folded_count, "not_folded": fold_report.not_folded_count},
        "validation_passed": bool(validation),
        "stages": rows,
        "total_seconds": time.perf_counter() - started,
    }
    write_json(summary, output_dir / "summary.json")

    print()
    print(f"Summary on {len(y_held)} held-out images:")
    print(format_summary(rows))
    print(
        "latency: median for one image; Keras: predict_on_batch; ONNX: onnxruntime, 1 thread,\n"
        "  graph optimizations off (the graph as exported). ORT-opt: optimizations on.\n"
        "max |diff|, top-1 agree: logits against the recalibrated Keras model.\n"
        "nodes: ONNX graph nodes. The int8 graph has more: QDQ format puts a\n"
        "  QuantizeLinear/DequantizeLinear pair on each quantized tensor, which\n"
        "  onnxruntime fuses into integer kernels when it loads the model."
    )
    print()
    print(f"artifacts: {output_dir.resolve()}")
    print(f"total time: {summary['total_seconds']:.0f} s")
    return 0


def format_summary(rows: list[dict]) -> str:
    header = (
        f"{'stage':<32} {'accuracy (right/all)':>20} {'size':>9} {'nodes':>5} {'latency':>9} "
        f"{'ORT-opt':>9} {'max |diff|':>10} {'top-1 agree':>11}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = [
            f"{row['accuracy']:.1%} ({row['correct']}/{row['total']})",
            f"{row['size_bytes'] / 1024:.1f} KiB" if "size_bytes" in row else "-",
            str(row["nodes"]) if "nodes" in row else "-",
            f"{row['latency_ms']:.3f} ms" if "latency_ms" in row else "-",
            f"{row['latency_ort_optimized_ms']:.3f} ms"
            if "latency_ort_optimized_ms" in row
            else "-",
            f"{row['max_abs_diff']:.2e}" if "max_abs_diff" in row else "-",
            f"{row['top1_agreement']:.1%}" if "top1_agreement" in row else "-",
        ]
        widths = [20, 9, 5, 9, 9, 10, 11]
        lines.append(
            f"{row['stage']:<32} "
            + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

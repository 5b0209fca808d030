"""Whole-process timing: `keras-bn fold` against `keras-bn export` (float32) of the same file.

Issue 24's bar: folding a model to a `.keras` file costs at most twice exporting it
(both load the model, fold it with the same plan and validate against the same
Keras reference run; fold builds and runs the folded Keras model and saves it, export
writes ONNX and runs it in onnxruntime). Usage::

    python benchmarks/bench_fold.py make /tmp/fold_bench          # the model files
    python benchmarks/bench_fold.py time /tmp/fold_bench/unet.keras --runs 3
    KERAS_BACKEND=tensorflow python benchmarks/bench_fold.py time /tmp/fold_bench/unet.keras

`time` runs the two commands in turn (fold, export, fold, export, ...) after one
warm-up of each, each a fresh process, and prints the medians of their wall times and
the median of the pairwise ratios fold/export (robust to a machine whose speed
drifts). Models: ResNet50 and MobileNetV2 (Keras Applications, `weights=None`,
128x128) and a small U-Net, each with trained-looking BN statistics (the test
suite's ``randomize_batch_norms``). BENCHMARKS.md section 16 has the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

KERAS_BN = Path(sys.executable).with_name("keras-bn")


def small_unet(size: int = 128, widths: tuple[int, ...] = (16, 32, 64)):
    """A U-Net: (Conv-BN-ReLU) x2 per level, max pooling down, transposed
    convolutions up, skip connections concatenated; 1x1 convolution to 2 classes."""
    import keras

    def block(x, width: int):
        for _ in range(2):
            x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
            x = keras.layers.BatchNormalization()(x)
            x = keras.layers.ReLU()(x)
        return x

    inputs = keras.Input((size, size, 3))
    x, skips = inputs, []
    for width in widths[:-1]:
        x = block(x, width)
        skips.append(x)
        x = keras.layers.MaxPooling2D()(x)
    x = block(x, widths[-1])
    for width, skip in zip(reversed(widths[:-1]), reversed(skips), strict=True):
        x = keras.layers.Conv2DTranspose(width, 2, strides=2)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.Concatenate()([x, skip])
        x = block(x, width)
    outputs = keras.layers.Conv2D(2, 1)(x)
    return keras.Model(inputs, outputs, name="unet")


def make(directory: Path, size: int) -> None:
    """resnet50.keras, mobilenetv2.keras and unet.keras in ``directory``."""
    import keras

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.models import randomize_batch_norms

    directory.mkdir(parents=True, exist_ok=True)
    models = {
        "resnet50": lambda: keras.applications.ResNet50(
            weights=None, input_shape=(size, size, 3), classifier_activation=None
        ),
        "mobilenetv2": lambda: keras.applications.MobileNetV2(
            weights=None, input_shape=(size, size, 3), classifier_activation=None
        ),
        "unet": lambda: small_unet(size),
    }
    for name, build in models.items():
        model = build()
        randomize_batch_norms(model, gain=(0.6, 1.4))
        model.save(directory / f"{name}.keras")
        print(directory / f"{name}.keras")


def _wall(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds


def time_pair(model: Path, runs: int) -> None:
    """fold and export of ``model``, alternating; medians and the median ratio."""
    with tempfile.TemporaryDirectory() as work:
        fold = [str(KERAS_BN), "fold", str(model), "-o", f"{work}/f.keras", "--force"]
        export = [str(KERAS_BN), "export", str(model), "-o", f"{work}/m.onnx", "--force"]
        _wall(fold), _wall(export)  # warm-up: page cache, byte-compiled modules
        folds, exports = [], []
        for _ in range(runs):
            folds.append(_wall(fold))
            exports.append(_wall(export))
    ratios = [f / e for f, e in zip(folds, exports, strict=True)]
    backend = os.environ.get("KERAS_BACKEND", "jax (the command's default)")
    print(f"{model.name} on {backend}, {runs} pairs")
    print(f"  fold   median {statistics.median(folds):.2f} s")
    print(f"  export median {statistics.median(exports):.2f} s")
    print(
        f"  fold/export median {statistics.median(ratios):.2f} "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    made = commands.add_parser("make", help="write the benchmark models")
    made.add_argument("directory", type=Path)
    made.add_argument("--size", type=int, default=128)
    timed = commands.add_parser("time", help="time fold against export, alternating")
    timed.add_argument("model", type=Path)
    timed.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "make":
        make(args.directory, args.size)
    else:
        time_pair(args.model, args.runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

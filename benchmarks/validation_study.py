"""Validation's default verdict on the Keras Applications, and injected converter bugs.

For each model: ``weights=None``, trained-looking BN statistics (a training-mode pass
over uniform 0..255 pixels, then perturbed a little: tests/support/models.py
``settle_batch_norms``), exported folded, validated at default settings. Printed per
model: the ONNX error against a float64 run of the same model, Keras float32's own
error against it (both relative to the output's range; "-" where the elementwise
check passed outright and no float64 run was needed, then the elementwise error
is shown), and the verdict. Then each classic converter bug of
``support.faults.INJECTED_BUGS`` is injected into the exported file and validated again.

    python benchmarks/validation_study.py --size 128 --models all --bugs ResNet50,MobileNetV2,EfficientNetB0,InceptionV3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from support.faults import INJECTED_BUGS, inject_bug  # noqa: E402
from support.models import settle_batch_norms  # noqa: E402

from keras_bn.converters import export_onnx, validate_onnx  # noqa: E402

APPLICATIONS = [
    "ResNet50",
    "ResNet50V2",
    "MobileNet",
    "MobileNetV2",
    "MobileNetV3Small",
    "EfficientNetB0",
    "EfficientNetV2B0",
    "DenseNet121",
    "InceptionV3",
    "Xception",
    "NASNetMobile",
    "ConvNeXtTiny",
]


def build(name: str, size: int) -> keras.Model:
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    pixels = np.random.default_rng(0).uniform(0, 255, (8, size, size, 3)).astype("float32")
    return settle_batch_norms(model, pixels)


def worst(report) -> tuple[str, str, str]:
    judged = [c for c in report.comparisons if c.exact_error is not None]
    if judged:
        c = max(judged, key=lambda c: c.exact_error)
        return f"{c.exact_error:.2g}", f"{c.keras_exact_error:.2g}", "float64"
    c = max(report.comparisons, key=lambda c: c.relative_to_max)
    return f"{c.relative_to_max:.2g} (elementwise)", "-", "outright"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--models", default="all", help="comma-separated, or 'all'")
    parser.add_argument("--bugs", default="", help="models to inject the bugs into")
    args = parser.parse_args()
    names = APPLICATIONS if args.models == "all" else args.models.split(",")
    bug_models = [n for n in args.bugs.split(",") if n]
    work = Path(tempfile.mkdtemp())
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}, {args.size}x{args.size}")
    print(
        "| model | ONNX error vs float64 | Keras float32 error vs float64 | decided by | verdict | seconds |"
    )
    print("|---|---|---|---|---|---|")
    exported = {}
    for name in dict.fromkeys(names + bug_models):
        model = build(name, args.size)
        path = work / f"{name}.onnx"
        export_onnx(model, path, fold=True)
        exported[name] = (model, path)
        if name not in names:
            continue
        start = time.perf_counter()
        report = validate_onnx(model, path)
        seconds = time.perf_counter() - start
        onnx_error, keras_error, how = worst(report)
        verdict = "pass" if report else "FAIL"
        print(f"| {name} | {onnx_error} | {keras_error} | {how} | {verdict} | {seconds:.1f} |")
    if bug_models:
        print()
        print("| bug | " + " | ".join(bug_models) + " |")
        print("|---|" + "---|" * len(bug_models))
        for bug in INJECTED_BUGS:
            cells = []
            for name in bug_models:
                model, path = exported[name]
                broken = inject_bug(path, work / f"{name}-broken.onnx", bug)
                report = validate_onnx(model, broken, localize=False)
                onnx_error, keras_error, _ = worst(report)
                cells.append(
                    f"{'detected' if not report else 'MISSED'} ({onnx_error} vs {keras_error})"
                )
            print(f"| {bug} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

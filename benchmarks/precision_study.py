"""float16 and int8 exports against the exact answer: what correct and broken files measure.

For each model: the folded float32 ONNX export is converted to float16
(``convert_float16``) and quantized to int8 (``quantize_int8``, per channel and per
tensor), and every file is run on evaluation inputs the calibration never saw. Each
output is measured against the same Keras model run in float64 (``reference``):
the error relative to the output's range ``max|x - exact| / max|exact|``, the SQNR
in dB and the top-1 agreement (rank-2 outputs), next to the same numbers for Keras
float32. Then classic bugs are injected into the float16 file
(``support.faults.INJECTED_BUGS``) and into the int8 file (``support.faults.QUANTIZED_BUGS``), and
one model whose activations overflow float16 is converted, to see where the
criteria must separate correct files from broken ones. The last column is the
verdict of ``comparison.judge_precision``.

Models: the README example (examples/edge_pipeline.py's CNN trained briefly on
scikit-learn digits; evaluated on held-out digits, calibrated on the calibration
split) and Keras Applications at 64x64 (``weights=None``, logits, trained-looking BN
statistics: tests/support/models.py ``settle_batch_norms``; inputs from
``make_sample_inputs``, calibration and evaluation with different seeds).

    python benchmarks/precision_study.py --models digits,MobileNetV2,EfficientNetB0,ResNet50
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from support.faults import QUANTIZED_BUGS, inject_bug, inject_quantized_bug  # noqa: E402
from support.models import settle_batch_norms  # noqa: E402

from keras_bn.converters import export_onnx, runtime  # noqa: E402
from keras_bn.converters.comparison import (  # noqa: E402
    compare_arrays,
    judge_precision,
    relative_error,
    sqnr_db,
    top1_agreement,
)
from keras_bn.converters.precision import convert_float16, quantize_int8  # noqa: E402
from keras_bn.converters.reference import float64_twin  # noqa: E402
from keras_bn.converters.samples import call_model, make_sample_inputs  # noqa: E402

SIZE = 64
FLOAT16_BUGS = [
    "two output channels swapped",
    "epsilon dropped (x1.02)",
    "bias shifted by 1% of its range",
    "flipped 3x3 kernel",
]


def edge_pipeline():
    spec = importlib.util.spec_from_file_location(
        "edge_pipeline", ROOT / "examples/edge_pipeline.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digits_model(epochs: int = 3):
    import keras_bn

    example = edge_pipeline()
    data = example.load_data(0)
    keras.utils.set_random_seed(0)
    model = example.build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(*data["train"], batch_size=64, epochs=epochs, verbose=0)
    keras_bn.recalibrate_batch_norm(model, data["train"][0], batch_size=200)
    return model, {"image": data["calibration"][0]}, {"image": data["held_out"][0]}


def application(name: str):
    kwargs = {"alpha": 0.35} if name == "MobileNetV2" else {}
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(SIZE, SIZE, 3), classifier_activation=None, **kwargs
    )
    pixels = make_sample_inputs(model, 16, seed=5)
    settle_batch_norms(model, next(iter(pixels.values())))
    return model, make_sample_inputs(model, 64, seed=1), make_sample_inputs(model, 64, seed=2)


def overflow_model():
    """The README CNN with conv1's kernel x1e6 and bn1's statistics to match: the same
    function, but exported unfolded its conv1 activations (~1e6) overflow float16."""
    model, calibration, evaluation = digits_model(epochs=1)
    conv, bn = model.get_layer("conv1"), model.get_layer("bn1")
    conv.kernel.assign(keras.ops.convert_to_numpy(conv.kernel) * 1e6)
    bn.moving_mean.assign(keras.ops.convert_to_numpy(bn.moving_mean) * 1e6)
    variance = keras.ops.convert_to_numpy(bn.moving_variance)
    bn.moving_variance.assign((variance + bn.epsilon) * 1e12 - bn.epsilon)
    return model, calibration, evaluation


def run_onnx(path: Path, inputs: dict) -> list[np.ndarray]:
    return [np.asarray(y, np.float64) for y in runtime.run(runtime.open_session(path), inputs)]


def measure(label: str, outputs, exact, keras32, precision: str, float16_run=None) -> str:
    cells = []
    verdicts = []
    for index, (y, x, k) in enumerate(zip(outputs, exact, keras32, strict=True)):
        top1 = top1_agreement(y, k)
        cells.append(
            f"{relative_error(y, x):.2g} | {sqnr_db(y, x):.1f} | "
            + ("-" if top1 is None else f"{top1:.1%}")
        )
        verdicts.append(
            judge_precision(
                precision,
                compare_arrays(y, k),
                y,
                x,
                keras=k,
                float16_run=None if float16_run is None else float16_run[index],
            )
        )
    if precision == "float16":
        bound = max(v.bound for v in verdicts)
        rule = f"error <= {bound:.2g}"
    elif precision == "int8":
        rule = "SQNR, top-1"
    else:  # a reference run, not judged
        return f"| {label} | " + " | ".join(cells) + " | - | - |"
    verdict = "pass" if all(v.passed for v in verdicts) else "FAIL"
    return f"| {label} | " + " | ".join(cells) + f" | {rule} | {verdict} |"


def study(name: str, model, calibration, evaluation, work: Path, bugs: bool):
    path = work / f"{name}.onnx"
    export_onnx(model, path, fold=True)
    feed = list(evaluation.values())
    keras32 = call_model(model, evaluation)
    exact = float64_twin(model, feed)(feed)
    keras16 = float64_twin(model, feed, dtype="float16")(feed)
    rows = [
        measure(
            f"{name}: Keras float32",
            [np.asarray(k, np.float64) for k in keras32],
            exact,
            keras32,
            "reference",
        ),
        measure(f"{name}: Keras float16", keras16, exact, keras32, "reference"),
    ]
    half = work / f"{name}-fp16.onnx"
    convert_float16(path, half)
    rows.append(
        measure(f"{name}: float16", run_onnx(half, evaluation), exact, keras32, "float16", keras16)
    )
    if bugs:
        for bug in FLOAT16_BUGS:
            broken = inject_bug(half, work / f"{name}-fp16-broken.onnx", bug)
            rows.append(
                measure(
                    f"{name}: float16, {bug}",
                    run_onnx(broken, evaluation),
                    exact,
                    keras32,
                    "float16",
                    keras16,
                )
            )
    for per_channel in (True, False):
        int8 = work / f"{name}-int8-{per_channel}.onnx"
        quantize_int8(path, int8, calibration, per_channel=per_channel)
        label = f"{name}: int8 per-{'channel' if per_channel else 'tensor'}"
        rows.append(measure(label, run_onnx(int8, evaluation), exact, keras32, "int8"))
        if bugs and per_channel:
            for bug in QUANTIZED_BUGS:
                broken = inject_quantized_bug(int8, work / f"{name}-int8-broken.onnx", bug)
                rows.append(
                    measure(
                        f"{name}: int8, {bug}", run_onnx(broken, evaluation), exact, keras32, "int8"
                    )
                )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,MobileNetV2,EfficientNetB0,ResNet50")
    parser.add_argument("--bugs", default="digits,MobileNetV2,EfficientNetB0")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}")
    print("| file | error vs float64 | SQNR dB | top-1 vs Keras | criterion | verdict |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        built = digits_model() if name == "digits" else application(name)
        for row in study(name, *built, work, name in args.bugs.split(",")):
            print(row, flush=True)
    model, calibration, evaluation = overflow_model()
    feed = list(evaluation.values())
    keras32 = call_model(model, evaluation)
    exact = float64_twin(model, feed)(feed)
    keras16 = float64_twin(model, feed, dtype="float16")(feed)
    print(measure("overflow: Keras float16", keras16, exact, keras32, "reference"))
    for fold in (False, True):
        path = work / "overflow.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(model, path, fold=fold)
        convert_float16(path, work / "overflow-fp16.onnx")
        outputs = run_onnx(work / "overflow-fp16.onnx", evaluation)
        label = f"overflow: float16, {'folded' if fold else 'unfolded (activations > 65504)'}"
        print(measure(label, outputs, exact, keras32, "float16", keras16))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""int8 schemes on trained networks: calibration method, per-channel/per-tensor, bias correction.

Issue 23 part 2: which int8 scheme should ``keras-bn export --precision int8`` use?
Each scheme is ``quantize_int8`` of the same folded float32 export with one choice of
calibration method (onnxruntime's MinMax, Percentile at 99.99% of |x| or as given, Entropy;
all fed one batch at a time, so memory stays bounded), weight scales per channel or
per tensor, and with or without empirical bias correction
(``converters/bias_correction.py``, on the calibration crops). Every file is
measured against the float ONNX model on the evaluation crops, in exact QDQ
arithmetic (graph optimizations off) and, with ``--kernels``, on onnxruntime's
integer kernels too; the measures are ``int8_testbed.py``'s (top-1 agreement on the
crops where the float model is confident, top-5, top-1 on all crops, logit SQNR).

Models: the two testbeds of ``int8_testbed.py`` (MobileNetV2, EfficientNet-Lite0;
crops of scikit-image photos, calibration seed 0, evaluation seed 1) and ``digits``,
the README pipeline's CNN (``precision_study.digits_model``: 3 epochs on scikit-learn
digits, calibrated on its calibration split, evaluated on its 400 held-out images).

    python benchmarks/int8_schemes.py --model mobilenet_v2 --calibration 128 --evaluation 512
    python benchmarks/int8_schemes.py --model digits --schemes MinMax/channel,MinMax/tensor
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402
from int8_testbed import TESTBEDS, agreement, run_onnx  # noqa: E402

from keras_bn.converters import runtime  # noqa: E402
from keras_bn.converters.precision import quantize_int8  # noqa: E402

DEFAULT_SCHEMES = (
    "MinMax/channel",
    "MinMax/channel/bc",
    "Percentile/channel",
    "Percentile/channel/bc",
    "Entropy/channel",
    "MinMax/tensor",
    "MinMax/tensor/bc",
    "Percentile/tensor/bc",
)


def float_export(name: str, calibration: int, evaluation: int, work: Path):
    """The folded float32 export of a model and its calibration/evaluation inputs."""
    from keras_bn.converters import export_onnx
    from keras_bn.converters.equalization import batch_norm_statistics
    from keras_bn.converters.folding import plan_folds

    path = work / f"{name}.onnx"
    if name == "digits":
        import precision_study

        model, calibration_inputs, evaluation_inputs = precision_study.digits_model()
        export_onnx(model, path, fold=True)
        statistics = batch_norm_statistics(model, plan_folds(model))
        return path, statistics, calibration_inputs["image"], evaluation_inputs["image"]
    from support import testbeds

    checkpoint, builder, preprocessing = TESTBEDS[name]
    model = builder(testbeds.read_torch_checkpoint(checkpoint()))
    export_onnx(model, path, fold=True)
    return (
        path,
        batch_norm_statistics(model, plan_folds(model)),
        testbeds.crops(calibration, seed=0, **preprocessing),
        testbeds.crops(evaluation, seed=1, **preprocessing),
    )


def quantize(float_path: Path, scheme: str, calibration: np.ndarray, work: Path, statistics):
    """``quantize_int8`` with the scheme
    ``METHOD[@percentile]/channel|tensor[/eq|/dw][/gq|/gqdw][/bc][/tune]`` (``eq``:
    equalization and absorption from the BN statistics, ``dw``: only the pairs into
    depthwise layers, the per-channel default; ``gq``: GPTQ weight rounding of every
    layer, ``gqdw``: of the depthwise layers, the per-channel default; ``bc``: bias
    correction of the weights' shift; ``tune``: bias tuning, checked on the outputs);
    path, seconds."""
    method, weights, *rest = scheme.split("/")
    method, _, percentile = method.partition("@")
    path = work / (scheme.replace("/", "_").replace("@", "_") + ".onnx")
    name = runtime.onnx_input_specs(float_path)[0].name
    start = time.perf_counter()
    quantize_int8(
        float_path,
        path,
        {name: calibration},
        per_channel=weights == "channel",
        calibration_method=method,
        **({"percentile": float(percentile)} if percentile else {}),
        equalize="depthwise" if "dw" in rest else "eq" in rest,
        batch_norm_statistics=statistics,
        bias_correction="bc" in rest,
        tune_biases="tune" in rest,
        round_weights="depthwise" if "gqdw" in rest else "gq" in rest,
        layer_report=False,
    )
    return path, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=[*TESTBEDS, "digits"], default="mobilenet_v2")
    parser.add_argument("--calibration", type=int, default=128, help="calibration crops")
    parser.add_argument("--evaluation", type=int, default=512, help="evaluation crops")
    parser.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES))
    parser.add_argument("--kernels", action="store_true", help="also on the integer kernels")
    parser.add_argument("--work", type=Path, default=None, help="keep the files here")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="int8_schemes_"))
    work.mkdir(parents=True, exist_ok=True)
    float_path, statistics, calibration, evaluation = float_export(
        args.model, args.calibration, args.evaluation, work
    )
    reference, _ = run_onnx(float_path, evaluation, "ORT_ENABLE_ALL")
    print(
        f"{args.model}: {len(calibration)} calibration, {len(evaluation)} evaluation inputs; "
        f"confident: {agreement(reference, reference)['confident']}"
    )
    print("| scheme | arithmetic | top-1 (confident) | top-5 | top-1 (all) | SQNR | quantize s |")
    print("|---|---|---|---|---|---|---|")
    modes = [("exact QDQ", "ORT_DISABLE_ALL")] + ([("kernels", "ORT_ENABLE_ALL")] * args.kernels)
    for scheme in args.schemes.split(","):
        path, seconds = quantize(float_path, scheme, calibration, work, statistics)
        for mode, optimization in modes:
            measures = agreement(run_onnx(path, evaluation, optimization)[0], reference)
            print(
                f"| {scheme} | {mode} | {measures['top1']:.1%} | {measures['top5']:.1%} "
                f"| {measures['top1_all']:.1%} | {measures['sqnr_db']:.1f} dB | {seconds:.0f} |",
                flush=True,
            )
    print(f"(files in {work})")


if __name__ == "__main__":
    main()

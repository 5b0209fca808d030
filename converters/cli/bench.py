"""``keras-bn bench``: onnxruntime latency, size and speed-up of ONNX models side by side."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from keras_bn.converters.cli.args import int_at_least, non_negative_int, positive_int
from keras_bn.converters.cli.run import EXIT_OK, Run

SUMMARY = "onnxruntime latency and size of ONNX models, side by side"
# onnxruntime threads beyond a few per core only cost memory (100,000 took 16 GB).
MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "onnx",
        metavar="MODEL.onnx",
        nargs="+",
        help="ONNX models (float32, float16, int8 exports, ...): speed-ups are against the first",
    )
    parser.add_argument("--runs", type=positive_int, default=50, help="timed runs (default: 50)")
    parser.add_argument(
        "--warmup", type=non_negative_int, default=5, help="untimed runs first (default: 5)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=1, help="batch of generated inputs (default: 1)"
    )
    parser.add_argument(
        "--inputs",
        metavar="FILE.npz",
        help="inputs in the ONNX model's layout (default: generated standard-normal inputs)",
    )
    parser.add_argument(
        "--threads",
        type=int_at_least(1, MAX_THREADS),
        help="onnxruntime intra-op threads (default: all cores)",
    )


def bench_command(args: argparse.Namespace, run: Run) -> int:
    """onnxruntime latency of ONNX models, optimizations off and on, with their sizes
    and speed-ups against the first."""
    from keras_bn.converters.user_files import load_onnx

    paths = [Path(p) for p in args.onnx]
    models = [load_onnx(path) for path in paths]  # checked: size, tensors, external data
    inputs = None
    if args.inputs is not None:
        from keras_bn.converters.model_io import load_inputs
        from keras_bn.converters.precision import onnx_input_specs

        specs = [(name, shape) for name, shape, _ in onnx_input_specs(paths[0])]
        inputs = load_inputs(args.inputs, specs, what="Inputs file")
    from keras_bn.converters.benchmarking import bench_onnx, speedup_text

    with run.progress.step("Benchmarking in onnxruntime"):
        report = bench_onnx(
            paths,
            runs=args.runs,
            warmup=args.warmup,
            batch_size=args.batch_size,
            inputs=inputs,
            threads=args.threads,
        )
    run.report["bench"] = report.to_dict()
    run.text.append(str(report))
    for index, model in enumerate(report.models):
        on = report.get(model, "on")
        value = f"median {on.median_ms:.3f} ms (optimizations on)"
        speedup = report.speedup(model, "on")
        if index and speedup is not None:
            value += f", {speedup_text(speedup)} vs {Path(report.models[0]).name}"
        run.summary.append([Path(model).name, value])
    run.next = _next_step(paths, models[0])
    return EXIT_OK


def _next_step(paths: list[Path], first: Any) -> str:
    """What to try next: with one file, the same model at the next precision down
    (float32 -> float16 -> int8; an int8 file against float32)."""
    from keras_bn.converters.precision import detect_precision

    if len(paths) > 1:
        return (
            "keep the fastest file that passes validation "
            "(keras-bn validate MODEL.keras FILE.onnx checks one)"
        )
    stem = paths[0].with_suffix("")
    other, option = {
        "float32": ("fp16", "--precision float16"),
        "float16": ("int8", "--precision int8 --calibration CALIBRATION.npz"),
        "int8": ("fp32", ""),
    }[detect_precision(first)]
    return (
        f"compare precisions: keras-bn export MODEL.keras -o {stem}_{other}.onnx"
        f"{' ' + option if option else ''}, then keras-bn bench {paths[0]} {stem}_{other}.onnx"
    )

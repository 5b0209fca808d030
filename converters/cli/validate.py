"""``keras-bn validate``: compare an ONNX model with the Keras model it came from."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keras_bn.converters.cli import steps
from keras_bn.converters.cli.args import ComparisonArgs, InputLayoutArgs, ModelLoadingArgs
from keras_bn.converters.cli.run import EXIT_OK, EXIT_VALIDATION_FAILED, Run
from keras_bn.converters.options import INPUT_LAYOUTS, PRECISIONS

SUMMARY = "compare an ONNX model with its Keras model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.keras")
    parser.add_argument("onnx", metavar="MODEL.onnx", nargs=1)
    InputLayoutArgs(
        None,
        "layout of the ONNX model's inputs (default: the one recorded at export, else "
        "channels_last)",
    ).add_to(parser)
    ModelLoadingArgs().add_to(parser)
    ComparisonArgs(defaults="detected").add_to(parser)


def validate_command(args: argparse.Namespace, run: Run) -> int:
    """Compare an ONNX model with the Keras model it came from."""
    from keras_bn.converters.user_files import load_onnx

    onnx_path = Path(args.onnx[0])
    onnx_model = load_onnx(onnx_path)  # checked before Keras: size, tensors, external data
    model = steps.load_model(args, run)
    steps.preflight(model, run, check_statistics=False, run_once=True)
    inputs = steps.load_inputs(args.inputs, model, "Inputs file")
    run.report["onnx"] = str(onnx_path)
    detected, recorded_layout = onnx_facts(onnx_model)
    input_layout = args.input_layout or recorded_layout or "channels_last"
    run.report["precision"] = PRECISIONS[detected].name
    run.report["input_layout"] = input_layout
    passed = steps.validate_onnx(
        model,
        onnx_path,
        run,
        input_layout=input_layout,
        inputs=inputs,
        atol=args.atol,
        rtol=args.rtol,
        precision=detected,
    )
    if not passed:
        print(
            f"keras-bn validate: validation failed: {onnx_path} does not match {args.model}.",
            file=sys.stderr,
        )
        run.report["status"] = "validation_failed"
        return EXIT_VALIDATION_FAILED
    return EXIT_OK


def onnx_facts(model) -> tuple[str, str | None]:
    """The precision an ONNX model was converted to, and the input layout it records."""

    from keras_bn.converters.onnx.metadata import METADATA_INPUT_LAYOUT
    from keras_bn.converters.precision import detect_precision

    precision = detect_precision(model)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    layout = metadata.get(METADATA_INPUT_LAYOUT)
    return precision, layout if layout in INPUT_LAYOUTS else None

"""``keras-bn validate``: compare an ONNX model with the Keras model it came from."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from keras_bn.converters.cli import steps
from keras_bn.converters.cli.args import ComparisonArgs, InputLayoutArgs, ModelLoadingArgs
from keras_bn.converters.cli.run import EXIT_OK, EXIT_VALIDATION_FAILED, Run
from keras_bn.converters.errors import UserInputError
from keras_bn.converters.options import PRECISIONS

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
    samples = steps.requested_samples(args)
    onnx_model = load_onnx(onnx_path)  # checked before Keras: size, tensors, external data
    model = steps.preflight(steps.load_model(args, run), run, check_statistics=False)
    inputs = steps.load_inputs(args.inputs, model, "Inputs file")
    # Keras's pass (the check that it can run the model) is validation's reference;
    # it runs while onnxruntime opens the file.
    detected, recorded_layout = onnx_facts(onnx_model)
    reference = steps.keras_reference(
        model, run, inputs, batch=_generated_batch(onnx_model, detected, model, samples)
    )
    run.report["onnx"] = str(onnx_path)
    input_layout = args.input_layout or recorded_layout or "channels_last"
    run.report["precision"] = PRECISIONS[detected].name
    run.report["input_layout"] = input_layout
    passed = steps.validate_onnx(
        model,
        onnx_path,
        run,
        input_layout=input_layout,
        inputs=None,  # the reference's
        atol=args.atol,
        rtol=args.rtol,
        precision=detected,
        reference=reference,
    )
    if not passed:
        print(
            f"keras-bn validate: validation failed: {onnx_path} does not match {args.model}.",
            file=sys.stderr,
        )
        run.report["status"] = "validation_failed"
        return EXIT_VALIDATION_FAILED
    run.next = f"keras-bn bench {onnx_path}"
    return EXIT_OK


def _generated_batch(onnx_model, precision: str, model, samples: int | None) -> int:
    """How many samples validation generates for this ONNX model: its fixed batch
    size, else ``samples`` (``--samples``) or ``validation_samples(model)`` (at least
    enough to judge int8 top-1 agreement)."""
    from keras_bn.converters.samples import validation_samples
    from keras_bn.converters.validation import INT8_TOP1_MIN_SAMPLES

    least = INT8_TOP1_MIN_SAMPLES if precision == "int8" else 1
    initializers = {tensor.name for tensor in onnx_model.graph.initializer}
    for value in onnx_model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name not in initializers and dims and dims[0].dim_value > 0:
            fixed = int(dims[0].dim_value)
            if samples is not None and samples != fixed:
                raise UserInputError(
                    f"--samples {samples}: the ONNX model's batch size is fixed at {fixed}, "
                    "so validation generates that many; drop --samples."
                )
            return fixed
    if samples is not None and samples < least:
        raise UserInputError(
            f"--samples {samples}: int8 validation judges top-1 agreement on at least "
            f"{least} samples; pass --samples {least} or more."
        )
    return max(validation_samples(model) if samples is None else samples, least)


def onnx_facts(model) -> tuple[str, Any]:
    """The precision an ONNX model was converted to, and the input layout it records."""

    from keras_bn.converters.onnx.layout import decode_input_layout
    from keras_bn.converters.onnx.metadata import METADATA_INPUT_LAYOUT
    from keras_bn.converters.precision import detect_precision

    precision = detect_precision(model)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    return precision, decode_input_layout(metadata.get(METADATA_INPUT_LAYOUT))

"""``keras-bn recalibrate``: exact BatchNormalization statistics over data, saved."""

from __future__ import annotations

import argparse

from keras_bn.converters.cli import steps
from keras_bn.converters.cli.args import DataArgs, ModelLoadingArgs, positive_int
from keras_bn.converters.cli.run import EXIT_OK, Run, check_output, file_size, writing
from keras_bn.converters.errors import UserInputError

SUMMARY = "recompute BN moving statistics exactly over data"
# Keras runs layer by layer here, its tensors allocated by threads other than the main
# one on JAX: one arena, so that freed whole-batch blocks are reused (allocator.py).
MALLOC_ARENAS = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.keras")
    parser.add_argument("-o", "--output", metavar="OUT.keras", required=True)
    DataArgs(required=True, purpose="the data whose statistics the BN layers take").add_to(parser)
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="samples per batch read from an .npz file or a directory (the statistics do "
        "not depend on it; memory does, about in proportion) (default: 32)",
    )
    ModelLoadingArgs().add_to(parser)


def recalibrate_command(args: argparse.Namespace, run: Run) -> int:
    """Recompute every BatchNormalization layer's moving statistics as the exact
    population statistics of --data (float64, keras_bn.recalibrate_batch_norm in
    inference mode), report the change, and save the model."""
    import numpy as np

    from keras_bn.converters.data_sources import open_data
    from keras_bn.converters.model_io import model_input_specs
    from keras_bn.converters.statistics_check import check_statistics

    output = check_output(args, ".keras")
    model = steps.load_model(args, run)
    steps.preflight(model, run, check_statistics=False)  # stale or NaN: what we fix
    source = open_data(args.data, model_input_specs(model), batch_size=args.batch_size)
    layers = _batch_norm_count(model)
    if layers == 0:
        raise UserInputError(
            f"Model {str(args.model)!r} has no BatchNormalization layer: nothing to recalibrate."
        )
    label = "Recalibrating BatchNormalization statistics"
    with run.progress.step(label) as step:
        # Inference mode: one pass through a Functional graph (else a first batch to
        # find the call order and one pass per BN layer), then one comparing outputs.
        def show(pass_number: int, batch: int) -> None:
            total = f"/{source.batches_per_pass}" if source.batches_per_pass else ""
            step.label = f"{label} (pass {pass_number}, batch {batch}{total})"

        source.on_batch = show
        with np.errstate(over="ignore"):  # an overflow is _check_finite's one line
            check = check_statistics(model, source, keep_population=True)
        step.label = label
    _check_finite(model, source.description)
    check.before_name, check.after_name = "old moving statistics", "recalibrated statistics"
    run.report["recalibration"] = check.to_dict()
    run.text.append(str(check))
    run.summary.append(["stale before", f"{len(check.stale)} of {len(check.layers)}"])
    if check.accuracy_before is not None and check.accuracy_after is not None:
        run.summary.append(
            ["accuracy", f"{100 * check.accuracy_before:.1f}% -> {100 * check.accuracy_after:.1f}%"]
        )
    with run.progress.step(f"Writing {output}"), writing(output, replace=args.force) as tmp:
        model.save(tmp)
    run.report["output"] = {"path": str(output), "bytes": output.stat().st_size}
    run.summary.append(["output", f"{output} ({file_size(output)})"])
    return EXIT_OK


def _check_finite(model, data: str) -> None:
    """The recalibrated statistics, before anything is written: finite values can still
    overflow float32 in a layer's input (values of 1e38 squared), and a model saved with
    an infinite variance is one no command can use."""
    import numpy as np

    from keras_bn._batch_norm_state import batch_norm_layers

    for layer in batch_norm_layers(model):
        for name in ("moving_mean", "moving_variance"):
            values = np.asarray(getattr(layer, name).numpy())
            if not np.all(np.isfinite(values)):
                raise UserInputError(
                    f"{data}: {layer.name!r}'s {name} over this data is not finite (its "
                    "input overflows float32); nothing was written. Give data in the range "
                    "the model takes."
                )


def _batch_norm_count(model) -> int:
    from keras_bn._batch_norm_state import batch_norm_layers

    return len(batch_norm_layers(model))

"""``keras-bn inspect``: a model's BatchNormalization layers, statistics and fold plan."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from keras_bn.converters.cli import steps
from keras_bn.converters.cli.args import DataArgs, ModelLoadingArgs
from keras_bn.converters.cli.run import EXIT_OK, Run, as_dict
from keras_bn.converters.cli.statistics import check_batch_norm_statistics
from keras_bn.converters.progress import format_table

SUMMARY = "BN layers, statistics and the fold plan"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.keras")
    DataArgs(required=False, purpose="check the BN moving statistics against").add_to(parser)
    ModelLoadingArgs().add_to(parser)


def inspect_command(args: argparse.Namespace, run: Run) -> int:
    """The model's BN layers, their statistics and the fold plan."""
    model = steps.load_model(args, run)
    prepared = steps.preflight(model, run)
    flat = prepared.graph
    from keras_bn.converters.folding import plan_folds

    with run.progress.step("Planning folds"):
        plan = plan_folds(prepared)
    batch_norms = _batch_norm_statistics(flat)
    layer_counts: dict[str, int] = {}
    for node in flat.nodes:
        name = type(node.layer).__name__
        layer_counts[name] = layer_counts.get(name, 0) + 1
    run.report.update(
        {
            "inputs": _tensors(flat.input_names, flat.inputs),
            "outputs": _tensors(flat.output_names, flat.outputs),
            "parameters": int(model.count_params()),
            "nodes": len(flat.nodes),
            "layer_counts": dict(sorted(layer_counts.items())),
            "batch_norms": batch_norms,
            "fold_plan": as_dict(plan),
        }
    )
    _describe(model, flat, layer_counts, batch_norms, run)
    run.text.append(plan.format(verbose=args.verbose, planned=True))
    check_batch_norm_statistics(prepared, run, args.data, what="inference uses them")
    run.summary += [
        ["batch norms", str(len(batch_norms))],
        ["would fold", str(plan.folded_count)],
        ["would not fold", str(plan.not_folded_count)],
    ]
    model_path = Path(args.model)
    run.next = f"keras-bn export {model_path} -o {model_path.with_suffix('.onnx').name}"
    return EXIT_OK


def _tensors(names, tensors) -> list[dict[str, Any]]:
    return [{"name": n, "shape": list(t.shape)} for n, t in zip(names, tensors, strict=True)]


def _batch_norm_statistics(flat) -> list[dict[str, Any]]:
    """Name, class, axis, channels, epsilon and moving statistics' ranges of every BN."""
    import keras
    import numpy as np

    batch_norms = []
    for node in flat.nodes:
        layer = node.layer
        if not isinstance(layer, keras.layers.BatchNormalization):  # keras_bn's included
            continue
        variance = np.asarray(keras.ops.convert_to_numpy(layer.moving_variance), np.float64)
        mean = np.asarray(keras.ops.convert_to_numpy(layer.moving_mean), np.float64)
        batch_norms.append(
            {
                "name": node.name,
                "class": type(layer).__name__,
                "axis": layer.axis,
                "channels": int(variance.size),
                "epsilon": float(layer.epsilon),
                "moving_mean_abs_max": float(np.abs(mean).max(initial=0.0)),
                "moving_variance_min": float(variance.min(initial=np.inf)),
                "moving_variance_max": float(variance.max(initial=-np.inf)),
            }
        )
    return batch_norms


def _describe(model, flat, layer_counts: dict[str, int], batch_norms: list, run: Run) -> None:
    """The text blocks: model line, layer counts, BN statistics table."""
    inputs = zip(flat.input_names, flat.inputs, strict=True)
    run.text.append(
        f"Model {model.name!r}: {model.count_params():,} parameters, {len(flat.nodes)} layer "
        "calls, inputs " + ", ".join(f"{n} {tuple(t.shape)}" for n, t in inputs)
    )
    run.text.append(
        "Layers: " + ", ".join(f"{name} x{count}" for name, count in sorted(layer_counts.items()))
    )
    if not batch_norms:
        run.text.append("No BatchNormalization layers.")
        return
    rows = [["batch_norm", "channels", "epsilon", "max |moving_mean|", "moving_variance range"]]
    for bn in batch_norms:
        rows.append(
            [
                bn["name"],
                str(bn["channels"]),
                f"{bn['epsilon']:g}",
                f"{bn['moving_mean_abs_max']:.3g}",
                f"{bn['moving_variance_min']:.3g} .. {bn['moving_variance_max']:.3g}",
            ]
        )
    run.text.append(format_table(rows))

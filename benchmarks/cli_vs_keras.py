"""Whole-process comparison: `keras-bn export` against Keras's exporter from a script.

What a deployment pipeline runs, from a fresh interpreter each time: load a `.keras`
file, then either `keras-bn export MODEL -o OUT.onnx` (load, fold, export, validate in
onnxruntime) or the few lines a user writes for Keras's own exporter (load, call once,
`model.export(format="onnx")`: no folding check, no validation). Usage::

    python benchmarks/cli_vs_keras.py make /tmp/resnet50.keras         # the model file
    /usr/bin/time -v keras-bn export /tmp/resnet50.keras -o /tmp/ours.onnx --force
    /usr/bin/time -v python benchmarks/cli_vs_keras.py keras-export /tmp/resnet50.keras \\
        /tmp/theirs.onnx

Time the two commands alternately, several runs each, and compare medians
(BENCHMARKS.md has the figures). Where ``keras-bn export``'s CPU time goes, phase by
phase, in one process (BENCHMARKS.md section 26)::

    KERAS_BACKEND=jax python benchmarks/cli_vs_keras.py phases /tmp/resnet50.keras
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def make(path: Path, name: str, size: int) -> None:
    """A Keras Applications model (weights=None) with bench_export's BN statistics
    (the test suite's ``randomize_batch_norms(model, gain=...)``)."""
    import keras

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.models import randomize_batch_norms

    model = getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classifier_activation=None
    )
    randomize_batch_norms(model, gain=(0.6, 1.4))
    model.save(path)


def keras_export(model_path: Path, output: Path) -> None:
    """Keras's exporter as a user calls it (it refuses a model that was never called)."""
    import keras
    import numpy as np

    # onnx refuses to overwrite an external data file (jax2onnx writes one): start clean.
    for stale in (output, output.with_name(f"{output.name}.data")):
        stale.unlink(missing_ok=True)
    model = keras.saving.load_model(model_path)
    model(np.zeros((1, *model.input_shape[1:]), "float32"), training=False)
    model.export(str(output), format="onnx", verbose=False)


def phases(model_path: Path, output: Path, samples: int) -> None:
    """CPU seconds (all threads) of each phase ``keras-bn export`` runs, in its order,
    one after the other (the command overlaps the Keras pass with the export)."""
    import gc
    import time

    from keras_bn.converters.cli.quiet import import_keras

    last = [time.process_time()]

    def mark(name: str) -> None:
        now = time.process_time()
        print(f"{name:48s} {now - last[0]:6.2f} s CPU")
        last[0] = now

    gc.disable()  # as the command: no collection while importing and loading, then frozen
    backend = import_keras()
    mark(f"import Keras ({backend})")
    from keras_bn.converters import model_io, runtime
    from keras_bn.converters.onnx.export import export_onnx
    from keras_bn.converters.prepared import prepare
    from keras_bn.converters.samples import call_model, make_sample_inputs, prepare_call
    from keras_bn.converters.validation import VALIDATION_OPTIMIZATION

    model = model_io.load_model(model_path, unsafe=False, custom_objects=[])
    gc.freeze()
    gc.enable()
    mark("load the .keras file")
    prepared = prepare(model)
    inputs = make_sample_inputs(prepared, samples, seed=0)
    mark(f"input-domain probe, {samples} inputs made")
    prepare_call(prepared, samples)
    mark("Keras reference: trace + compile (JAX only)")
    call_model(prepared, inputs)
    mark(f"Keras reference: run {samples} samples")
    export_onnx(prepared, output)
    mark("fold + export + write")
    session = runtime.open_session(output, optimization=VALIDATION_OPTIMIZATION, spinning=False)
    mark("onnxruntime: open the file")
    session.run(None, {name: array[:1] for name, array in inputs.items()})
    session.run(None, inputs)
    mark(f"onnxruntime: run batch 1 and batch {samples}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    made = commands.add_parser("make", help="write the benchmark model")
    made.add_argument("path", type=Path)
    made.add_argument("--model", default="ResNet50")
    made.add_argument("--size", type=int, default=224)
    exported = commands.add_parser("keras-export", help="Keras's own ONNX export")
    exported.add_argument("model", type=Path)
    exported.add_argument("output", type=Path)
    timed = commands.add_parser("phases", help="CPU time of keras-bn export's phases")
    timed.add_argument("model", type=Path)
    timed.add_argument("--output", type=Path, default=Path("phases.onnx"))
    timed.add_argument("--samples", type=int, default=16)
    args = parser.parse_args(argv)
    if args.command == "make":
        make(args.path, args.model, args.size)
    elif args.command == "phases":
        phases(args.model, args.output, args.samples)
    else:
        keras_export(args.model, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""int8 per-channel vs per-tensor on the README CNN and a trained depthwise 1-D network.

Issue 23's bar: per-channel logit SQNR not below per-tensor on the README pipeline's
model and on a trained depthwise net. Models: ``readme``, the CNN of
``examples/edge_pipeline.py`` trained as the script trains it (Adam 3e-3, batch 32,
``--readme-epochs`` epochs, BN recalibrated; its calibration and 400 held-out digits),
and ``depthwise_1d``, ``tests/support/depthwise_1d.py`` (Conv1D / DepthwiseConv1D /
SeparableConv1D with BN and ReLU6, digits read as 8-step sequences; the test's model).
Each scheme (``int8_schemes.py``'s ``METHOD[@percentile]/channel|tensor[/eq][/bc]``)
quantizes the folded float32 export; the file is measured on the held-out inputs in
exact QDQ arithmetic (and on onnxruntime's kernels with ``--kernels``): logit SQNR
against the float ONNX model and against the Keras model run in float64, top-1
agreement with the float model, and accuracy.

``--seeds N`` trains the 1-D net with N seeds and prints per-channel minus per-tensor
SQNR per scheme. ``--draws N`` separates chance from method: the weights alone
rounded to int8 (activations float) on N grids 0-2% wider than ``max |w| / 127``, each
a different rounding of the same weights, with and without the weights-only bias
correction (``bias_correction.output_shift``).

    python benchmarks/int8_depthwise_1d.py
    python benchmarks/int8_depthwise_1d.py --seeds 5 --draws 40
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402
from int8_schemes import quantize  # noqa: E402

from keras_bn.converters import runtime  # noqa: E402
from keras_bn.converters.comparison import sqnr_db  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCHEMES = (
    "Percentile/channel/bc",
    "Percentile/tensor/bc",
    "Percentile/tensor/eq/bc",
    "Percentile/channel",
    "Percentile/tensor",
    "MinMax/channel/bc",
    "MinMax/tensor/bc",
    "MinMax/channel",
    "MinMax/tensor",
    "MinMax/tensor/eq",
    "MinMax/channel/eq",
)
SEED_SCHEMES = ("Percentile/{}/bc", "Percentile/{}", "MinMax/{}/bc", "MinMax/{}")


def readme_model(epochs: int, seed: int = 0):
    """The README pipeline's CNN, trained and recalibrated as the script does."""
    import importlib.util

    import keras

    import keras_bn

    spec = importlib.util.spec_from_file_location(
        "edge_pipeline", ROOT / "examples/edge_pipeline.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    data = example.load_data(seed)
    keras.utils.set_random_seed(seed)
    model = example.build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(*data["train"], batch_size=32, epochs=epochs, verbose=0)
    keras_bn.recalibrate_batch_norm(model, data["train"][0], batch_size=200)
    return model, data


def prepared(name: str, work: Path, epochs: int, seed: int = 0):
    """The folded float export of a model, its BN statistics, and its data."""
    from support.depthwise_1d import trained_model

    from keras_bn.converters import export_onnx
    from keras_bn.converters.equalization import batch_norm_statistics
    from keras_bn.converters.folding import plan_folds

    model, data = readme_model(epochs, seed) if name == "readme" else trained_model(seed)
    path = work / f"{name}-{seed}.onnx"
    export_onnx(model, path, fold=True)
    return model, path, batch_norm_statistics(model, plan_folds(model)), data


def logits(path: Path, inputs: np.ndarray, optimization: str = "ORT_DISABLE_ALL") -> np.ndarray:
    session = runtime.open_session(path, optimization=optimization)
    return runtime.run(session, {runtime.input_specs(session)[0].name: inputs})[0]


def weight_spread(path: Path) -> str:
    """Each Conv/Gemm's largest over smallest per-output-channel ``max |w|``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    weights = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    spreads = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            weight = np.abs(weights[node.input[1]])
            axis = 0 if node.op_type == "Conv" else 1
            ranges = weight.max(axis=tuple(i for i in range(weight.ndim) if i != axis))
            spreads.append(f"{node.name} {ranges.max() / ranges.min():.1f}x")
    return ", ".join(spreads)


def scheme_table(name: str, work: Path, epochs: int, kernels: bool) -> None:
    from keras_bn.converters.reference import float64_twin

    model, path, statistics, data = prepared(name, work, epochs)
    held_out, labels = data["held_out"]
    exact = float64_twin(model, [held_out])([held_out])[0]
    reference = logits(path, held_out)
    print(
        f"\n{name}: {len(data['calibration'][0])} calibration, {len(held_out)} held-out inputs; "
        f"float accuracy {np.mean(reference.argmax(1) == labels):.1%}, float32 export vs "
        f"float64 {sqnr_db(reference, exact):.1f} dB"
    )
    print(f"weight range, widest / narrowest output channel: {weight_spread(path)}")
    print("| scheme | arithmetic | SQNR vs float | SQNR vs float64 | top-1 agreement | accuracy |")
    print("|---|---|---|---|---|---|")
    modes = [("exact QDQ", "ORT_DISABLE_ALL")] + [("kernels", "ORT_ENABLE_ALL")] * kernels
    for scheme in SCHEMES:
        quantized, _ = quantize(path, scheme, data["calibration"][0], work, statistics)
        for mode, optimization in modes:
            out = logits(quantized, held_out, optimization)
            print(
                f"| {scheme} | {mode} | {sqnr_db(out, reference):.1f} dB "
                f"| {sqnr_db(out, exact):.1f} dB "
                f"| {np.mean(out.argmax(1) == reference.argmax(1)):.1%} "
                f"| {np.mean(out.argmax(1) == labels):.1%} |",
                flush=True,
            )


def seed_table(work: Path, seeds: int) -> None:
    print("\ndepthwise_1d by seed: per-channel / per-tensor SQNR (difference), exact QDQ")
    print("| seed | float accuracy | " + " | ".join(s.format("*") for s in SEED_SCHEMES) + " |")
    print("|---" * (2 + len(SEED_SCHEMES)) + "|")
    for seed in range(seeds):
        _, path, statistics, data = prepared("depthwise_1d", work, 0, seed)
        held_out, labels = data["held_out"]
        reference = logits(path, held_out)
        cells = [f"{np.mean(reference.argmax(1) == labels):.1%}"]
        for scheme in SEED_SCHEMES:
            measured = [
                sqnr_db(logits(quantized, held_out), reference)
                for quantized, _ in (
                    quantize(path, scheme.format(w), data["calibration"][0], work, statistics)
                    for w in ("channel", "tensor")
                )
            ]
            cells.append(
                f"{measured[0]:.1f} / {measured[1]:.1f} ({measured[0] - measured[1]:+.1f})"
            )
        print(f"| {seed} | " + " | ".join(cells) + " |", flush=True)


def rounded_weights(model, means, per_channel: bool, widen: float, correct: bool):
    """A copy of the float ONNX ``model`` with its Conv/Gemm weights rounded to int8
    (symmetric, step ``max |w| / 127 * widen``), biases corrected when ``correct``."""
    import copy

    from onnx import numpy_helper

    from keras_bn.converters.bias_correction import output_shift

    model = copy.deepcopy(model)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        tensor = initializers[node.input[1]]
        weight = numpy_helper.to_array(tensor).astype(np.float64)
        axis = 0 if node.op_type == "Conv" else 1
        others = tuple(i for i in range(weight.ndim) if i != axis)
        step = np.max(np.abs(weight), axis=others if per_channel else None, keepdims=True)
        step = step / 127 * widen
        rounded = np.clip(np.rint(weight / step), -127, 127) * step
        tensor.CopyFrom(numpy_helper.from_array(rounded.astype(np.float32), tensor.name))
        if correct and len(node.input) > 2:
            bias = initializers[node.input[2]]
            shift = output_shift(node, rounded - weight, means[node.input[0]])
            value = numpy_helper.to_array(bias) - shift
            bias.CopyFrom(numpy_helper.from_array(value.astype(np.float32), bias.name))
    return model


def input_means(path: Path, calibration: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel means of every Conv/Gemm input of the float model on ``calibration``."""
    import onnx

    model = onnx.load(path)
    names = [node.input[0] for node in model.graph.node if node.op_type in ("Conv", "Gemm")]
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, 1, None))
    outputs = logits_all(model, calibration)[1:]
    return {
        name: value.mean(axis=tuple(i for i in range(value.ndim) if i != 1))
        for name, value in zip(names, outputs, strict=True)
    }


def logits_all(model, inputs: np.ndarray) -> list[np.ndarray]:
    session = runtime.open_session(model.SerializeToString(), optimization="ORT_DISABLE_ALL")
    return runtime.run(session, {runtime.input_specs(session)[0].name: inputs})


def draw_table(work: Path, epochs: int, draws: int) -> None:
    import onnx

    print(f"\nweights only, {draws} rounding draws: per-channel / per-tensor SQNR vs float")
    print(
        "| model | bias correction | per-channel mean [min, max] | per-tensor mean [min, max]"
        " | difference mean [min] | draws per-channel loses |"
    )
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name in ("readme", "depthwise_1d"):
        _, path, _, data = prepared(name, work, epochs)
        model, held_out = onnx.load(path), data["held_out"][0]
        means = input_means(path, data["calibration"][0])
        reference = logits_all(model, held_out)[0]
        widths = 1 + rng.uniform(0, 0.02, draws)
        for correct in (False, True):
            measured = np.array(
                [
                    [
                        sqnr_db(
                            logits_all(rounded_weights(model, means, per, w, correct), held_out)[0],
                            reference,
                        )
                        for per in (True, False)
                    ]
                    for w in widths
                ]
            )
            channel, tensor = measured.T
            difference = channel - tensor
            print(
                f"| {name} | {'yes' if correct else 'no'} "
                f"| {channel.mean():.1f} [{channel.min():.1f}, {channel.max():.1f}] dB "
                f"| {tensor.mean():.1f} [{tensor.min():.1f}, {tensor.max():.1f}] dB "
                f"| {difference.mean():+.1f} [{difference.min():+.1f}] dB "
                f"| {np.mean(difference < 0):.0%} |",
                flush=True,
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="readme,depthwise_1d")
    parser.add_argument("--readme-epochs", type=int, default=5, help="the script's default")
    parser.add_argument("--kernels", action="store_true", help="also on the integer kernels")
    parser.add_argument("--seeds", type=int, default=0, help="1-D net seeds to compare")
    parser.add_argument("--draws", type=int, default=0, help="weights-only rounding draws")
    parser.add_argument("--work", type=Path, default=None, help="keep the files here")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="int8_depthwise_1d_"))
    work.mkdir(parents=True, exist_ok=True)
    for name in filter(None, args.models.split(",")):
        scheme_table(name, work, args.readme_epochs, args.kernels)
    if args.seeds:
        seed_table(work, args.seeds)
    if args.draws:
        draw_table(work, args.readme_epochs, args.draws)
    print(f"(files in {work})")


if __name__ == "__main__":
    main()

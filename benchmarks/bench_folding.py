"""Numerics and cost of BatchNormalization folding (numbers for BENCHMARKS.md, section 2).

    python benchmarks/bench_folding.py            # 20-block stacks, seeds 0-3
    python benchmarks/bench_folding.py --apps     # also the Keras Applications

Relative error = max |y - y64| / max |y64| where y64 is a float64 run of the
unfolded model with the same weights.
"""

import argparse
import sys
import time
from pathlib import Path

import keras
import numpy as np

# The test suite's helpers: the same models and statistics as tests/folding/test_folding.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.checks import float64_twin  # noqa: E402
from support.models import batch_norm_layers, calibrate_batch_norms, conv_bn_stack  # noqa: E402

from keras_bn.converters.folding import fold_batch_norms  # noqa: E402


def errors(model, data):
    reference = np.asarray(float64_twin(model)(data.astype(np.float64), training=False))
    start = time.perf_counter()
    folded, report = fold_batch_norms(model, sample_inputs=data.astype("float32"))
    seconds = time.perf_counter() - start
    magnitude = np.max(np.abs(reference))
    original = np.asarray(model(data.astype("float32"), training=False))
    received = np.asarray(folded(data.astype("float32"), training=False))
    return {
        "original": np.max(np.abs(original - reference)) / magnitude,
        "folded": np.max(np.abs(received - reference)) / magnitude,
        "folded_vs_original": np.max(np.abs(received - original)) / magnitude,
        "folded_count": report.folded_count,
        "not_folded": report.not_folded_count,
        "fp16_risks": len(report.fp16_risks),
        "seconds": seconds,
    }


def stacks():
    print(
        "| seed | moving_variance range | original vs float64 | folded vs float64 | folded vs original |"
    )
    print("|---:|---|---:|---:|---:|")
    for seed in range(4):
        data = np.random.default_rng(3 + seed).normal(size=(4, 12, 12, 8))
        model = conv_bn_stack(20, 8, "float32", seed)
        calibrate_batch_norms(model, data.astype("float32"), seed=1 + seed)
        variances = np.concatenate(
            [keras.ops.convert_to_numpy(bn.moving_variance) for bn in batch_norm_layers(model)]
        )
        e = errors(model, data)
        print(
            f"| {seed} | {variances.min():.1e} .. {variances.max():.1e} | {e['original']:.2g} "
            f"| {e['folded']:.2g} | {e['folded_vs_original']:.2g} |"
        )


def applications():
    print(
        "| model | input | BN folded / kept | fold time (s) | original vs float64 | folded vs float64 |"
    )
    print("|---|---|---|---:|---:|---:|")
    for constructor, size in [
        (keras.applications.ResNet50, 64),
        (keras.applications.MobileNetV2, 64),
        (keras.applications.DenseNet121, 64),
        (keras.applications.Xception, 71),
    ]:
        model = constructor(
            weights=None, include_top=False, input_shape=(size, size, 3), pooling="avg"
        )
        rng = np.random.default_rng(1)
        for layer in batch_norm_layers(model):
            shape = tuple(layer.gamma.shape)
            layer.gamma.assign(rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape))
            layer.beta.assign(rng.normal(0.0, 0.5, shape))
            layer.momentum = 0.0
        model(
            np.random.default_rng(0).normal(size=(4, size, size, 3)).astype("float32"),
            training=True,
        )
        data = np.random.default_rng(5).normal(size=(2, size, size, 3))
        e = errors(model, data)
        print(
            f"| {constructor.__name__} | {size}x{size} | {e['folded_count']} / {e['not_folded']} "
            f"| {e['seconds']:.1f} | {e['original']:.2g} | {e['folded']:.2g} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", action="store_true", help="also fold Keras Applications")
    args = parser.parse_args()
    stacks()
    if args.apps:
        applications()

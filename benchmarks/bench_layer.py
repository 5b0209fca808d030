"""Time keras_bn.BatchNormalization against the stock layer in a small CNN.

Both models are built, compiled and warmed up in the same process, then timed
in interleaved rounds (stock then ours, ours then stock, ...) so that load from
other processes hits both alike. Reported: the median over rounds of the mean
time per call in one round, the ratio ours / stock as the median of the
per-round ratios, and the fastest round of each with their ratio. Target:
ratio <= 1.05 with no new option used.

    python benchmarks/bench_layer.py                      # TensorFlow (default backend)
    KERAS_BACKEND=jax python benchmarks/bench_layer.py
    python benchmarks/bench_layer.py --option momentum=None   # time a new option
"""

import argparse
import ast
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_bn import layers as keras_bn_layers  # noqa: E402


def small_cnn(batch_norm_class, image_size, seed, **bn_kwargs):
    """Conv-BN-ReLU x 3 and a classifier: BN is a realistic share of the step."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3))
    x = inputs
    for filters in (16, 32, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = batch_norm_class(**bn_kwargs)(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10)(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def time_per_call(function, calls):
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


def parse_options(pairs):
    options = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        options[name] = ast.literal_eval(value)
    return options


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--predict-samples", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10, help="calls per round")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        help="NAME=VALUE passed to our layer only (e.g. momentum=None); default: none",
    )
    args = parser.parse_args(argv)
    options = parse_options(args.option)

    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (args.batch_size, args.image_size, args.image_size, 3))
    x = x.astype("float32")
    y = rng.integers(0, 10, args.batch_size)
    x_predict = rng.normal(2.0, 3.0, (args.predict_samples, args.image_size, args.image_size, 3))
    x_predict = x_predict.astype("float32")

    models = {
        "stock": small_cnn(keras.layers.BatchNormalization, args.image_size, 0),
        "keras_bn": small_cnn(keras_bn_layers.BatchNormalization, args.image_size, 0, **options),
    }
    tasks = {
        "train step": lambda model: model.train_on_batch(x, y),
        "predict": lambda model: model.predict(x_predict, batch_size=256, verbose=0),
    }
    times = {(task, name): [] for task in tasks for name in models}
    for task, run in tasks.items():
        for model in models.values():  # warm-up: tracing and compilation
            for _ in range(3):
                run(model)
        for round_index in range(args.rounds):
            order = list(models) if round_index % 2 == 0 else list(models)[::-1]
            for name in order:
                model = models[name]
                times[task, name].append(time_per_call(lambda m=model, r=run: r(m), args.calls))

    print(f"keras {keras.__version__}, backend {keras.backend.backend()}, ")
    print(
        f"batch {args.batch_size}, image {args.image_size}x{args.image_size}x3, "
        f"predict {args.predict_samples} samples, {args.rounds} rounds x {args.calls} calls, "
        f"our options: {options or 'none'}"
    )
    print(
        f"{'task':<12} {'stock ms':>10} {'keras_bn ms':>12} {'ratio':>7} "
        f"{'min stock':>10} {'min ours':>9} {'ratio':>7}"
    )
    ratios = {}
    for task in tasks:
        stock, ours = times[task, "stock"], times[task, "keras_bn"]
        # Each round times both models back to back: the median of the paired
        # ratios cancels most of the load that other processes put on the machine.
        ratios[task] = statistics.median(o / s for o, s in zip(ours, stock, strict=True))
        print(
            f"{task:<12} {statistics.median(stock) * 1e3:>10.2f} "
            f"{statistics.median(ours) * 1e3:>12.2f} {ratios[task]:>7.3f} "
            f"{min(stock) * 1e3:>10.2f} {min(ours) * 1e3:>9.2f} {min(ours) / min(stock):>7.3f}"
        )
    return ratios


if __name__ == "__main__":
    main()

"""What batch normalization buys, measured: the same CNN trained with and without BN.

The literature on batch normalization (Ioffe & Szegedy, 2015) claims three things:
faster convergence, tolerance of higher learning rates, and less sensitivity to the
scale of the initial weights. This example measures them on scikit-learn's bundled
handwritten digits (8x8 grayscale, 10 classes; nothing is downloaded).

For every learning rate and initial weight scale of a small grid it trains the same
three-convolution network twice from the same seed - once with
``keras_bn.BatchNormalization`` after each convolution, once without (the
convolutions then get a bias instead) - with SGD + momentum 0.9. It records the
training loss and the held-out accuracy (inference mode, moving statistics) after every
epoch, prints a table and draws the curves into a PNG figure. Whatever the result is,
it is reported as measured.

Run (about 3 minutes on 2 CPU cores)::

    python examples/why_batch_norm.py

Shorter::

    python examples/why_batch_norm.py --epochs 3 --learning-rates 0.1 --init-scales 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

NUM_CLASSES = 10
HELD_OUT_SIZE = 400
CALIBRATION_SIZE = 200
# "Epochs to reach X" column: the first epoch with held-out accuracy >= this.
TARGET_ACCURACY = 0.9
# A run that ends at or below this held-out accuracy has not learned (chance is 0.1).
NO_LEARNING_ACCURACY = 0.2
# An epoch's mean training loss above this "blew up": ten times the loss of a uniform
# guess over the 10 classes (ln 10 = 2.30).
BLOW_UP_LOSS = 10 * math.log(NUM_CLASSES)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Train the same CNN with and without batch normalization over a grid of "
            "learning rates and initial weight scales on the digits data set; print a "
            "table and write loss/accuracy curves to a PNG figure."
        ),
        epilog=(
            "examples:\n"
            "  python examples/why_batch_norm.py\n"
            "  python examples/why_batch_norm.py --epochs 3 --learning-rates 0.1 "
            "--init-scales 1 --output-dir /tmp/why_bn"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10)")
    parser.add_argument(
        "--learning-rates",
        type=_float_list,
        default=[0.01, 0.1, 1.0],
        help="comma-separated SGD learning rates (default 0.01,0.1,1.0)",
    )
    parser.add_argument(
        "--init-scales",
        type=_float_list,
        default=[0.1, 1.0, 10.0],
        help=(
            "comma-separated multipliers of the He-normal initial weight standard "
            "deviation (default 0.1,1,10)"
        ),
    )
    parser.add_argument("--batch-size", type=int, default=32, help="default 32")
    parser.add_argument(
        "--bn-momentum",
        type=float,
        default=0.9,
        help=(
            "momentum of the BN moving statistics (default 0.9: the runs are a few "
            "hundred steps, too short for Keras's default 0.99 to settle)"
        ),
    )
    parser.add_argument("--seed", type=int, default=0, help="data split and weights seed")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("why_batch_norm_out"),
        help="where the figure and results.json go (default ./why_batch_norm_out)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, received {args.epochs}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, received {args.batch_size}")
    if not 0.0 <= args.bn_momentum < 1.0:
        parser.error(f"--bn-momentum must be in [0, 1), received {args.bn_momentum}")
    return args


def _float_list(text: str) -> list[float]:
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.01,0.1, received {text!r}"
        ) from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected positive finite numbers such as 0.01,0.1, received {text!r}"
        )
    return values


def load_data(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Digits as (N, 8, 8, 1) float32 in [0, 1], split train / calibration / held-out.

    The same split as ``edge_pipeline.py``; this example only uses train and held-out.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]
    labels = digits.target.astype("int64")
    x_rest, x_held, y_rest, y_held = train_test_split(
        images, labels, test_size=HELD_OUT_SIZE, stratify=labels, random_state=seed
    )
    x_train, x_calib, y_train, y_calib = train_test_split(
        x_rest, y_rest, test_size=CALIBRATION_SIZE, stratify=y_rest, random_state=seed
    )
    return {
        "train": (x_train, y_train),
        "calibration": (x_calib, y_calib),
        "held_out": (x_held, y_held),
    }


def build_model(*, batch_norm: bool, init_scale: float, bn_momentum: float):
    """Three 3x3 convolutions (16, 32, 32 filters), ReLU, one max-pool, GAP, Dense(10).

    With ``batch_norm`` each convolution is followed by BatchNormalization and has no
    bias (BN's beta replaces it); without, the convolution has a bias. ``init_scale``
    multiplies the He-normal standard deviation of every kernel.
    """
    import keras

    from keras_bn import BatchNormalization

    initializer = keras.initializers.VarianceScaling(
        scale=2.0 * init_scale**2, mode="fan_in", distribution="truncated_normal"
    )
    inputs = keras.Input((8, 8, 1), name="image")
    x = inputs
    for index, (filters, pool) in enumerate([(16, False), (32, True), (32, False)], 1):
        x = keras.layers.Conv2D(
            filters,
            3,
            padding="same",
            use_bias=not batch_norm,
            kernel_initializer=initializer,
            name=f"conv{index}",
        )(x)
        if batch_norm:
            x = BatchNormalization(momentum=bn_momentum, name=f"bn{index}")(x)
        x = keras.layers.ReLU(name=f"relu{index}")(x)
        if pool:
            x = keras.layers.MaxPooling2D(name=f"pool{index}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(NUM_CLASSES, kernel_initializer=initializer, name="logits")(x)
    name = "with_bn" if batch_norm else "without_bn"
    return keras.Model(inputs, outputs, name=name)


def train_one(
    data: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    batch_norm: bool,
    learning_rate: float,
    init_scale: float,
    args: argparse.Namespace,
) -> dict:
    """Train one configuration; return its per-epoch curves and summary numbers."""
    import keras

    keras.utils.set_random_seed(args.seed)
    model = build_model(batch_norm=batch_norm, init_scale=init_scale, bn_momentum=args.bn_momentum)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x_train, y_train = data["train"]
    x_held, y_held = data["held_out"]
    started = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_held, y_held),
        verbose=0,
        callbacks=[keras.callbacks.TerminateOnNaN()],
    ).history
    seconds = time.perf_counter() - started

    # TerminateOnNaN stops mid-epoch; pad the curves with NaN so every run has
    # `epochs` points and the table can say where it broke.
    def curve(key: str) -> list[float]:
        values = [float(v) for v in history.get(key, [])]
        return values + [math.nan] * (args.epochs - len(values))

    train_loss = curve("loss")
    held_out_accuracy = curve("val_accuracy")
    held_out_loss = curve("val_loss")
    return {
        "batch_norm": batch_norm,
        "learning_rate": learning_rate,
        "init_scale": init_scale,
        "train_loss": train_loss,
        "held_out_accuracy": held_out_accuracy,
        "held_out_loss": held_out_loss,
        "seconds": seconds,
        **summarize(train_loss, held_out_accuracy),
    }


def summarize(train_loss: list[float], held_out_accuracy: list[float]) -> dict:
    """Final/best accuracy, first epoch reaching TARGET_ACCURACY, and the outcome.

    Outcomes: "diverged" (a NaN/inf training loss), "stuck at chance" (final held-out
    accuracy <= NO_LEARNING_ACCURACY), "trained"; a mean epoch loss above BLOW_UP_LOSS
    is noted as the loss blowing up.
    """
    finite_accuracy = [a for a in held_out_accuracy if math.isfinite(a)]
    first_bad = next((i for i, v in enumerate(train_loss) if not math.isfinite(v)), None)
    reached = next((i + 1 for i, a in enumerate(held_out_accuracy) if a >= TARGET_ACCURACY), None)
    blew_up = next((i for i, v in enumerate(train_loss) if v > BLOW_UP_LOSS), None)
    final_accuracy = held_out_accuracy[-1]
    if first_bad is not None:
        outcome = f"diverged (NaN loss, epoch {first_bad + 1})"
    elif final_accuracy <= NO_LEARNING_ACCURACY:
        outcome = "stuck at chance"
        if blew_up is not None:
            outcome += f" after loss blew up (epoch {blew_up + 1})"
    elif blew_up is not None:
        outcome = f"trained, loss blew up (epoch {blew_up + 1})"
    else:
        outcome = "trained"
    return {
        "final_accuracy": final_accuracy,
        "best_accuracy": max(finite_accuracy) if finite_accuracy else math.nan,
        "epochs_to_target": reached,
        "final_train_loss": train_loss[-1],
        "outcome": outcome,
    }


def format_table(runs: list[dict], epochs: int) -> str:
    header = (
        f"{'BN':<4} {'lr':>6} {'init':>6} {'final acc':>9} {'best acc':>8} "
        f"{f'ep->{TARGET_ACCURACY:.0%}':>8} {'train loss':>10}  outcome"
    )
    lines = [header, "-" * len(header)]
    for run in runs:
        reached = run["epochs_to_target"]
        lines.append(
            f"{'yes' if run['batch_norm'] else 'no':<4} {run['learning_rate']:>6g} "
            f"{run['init_scale']:>6g} {_percent(run['final_accuracy']):>9} "
            f"{_percent(run['best_accuracy']):>8} "
            f"{reached if reached is not None else f'>{epochs}':>8} "
            f"{run['final_train_loss']:>10.4f}  {run['outcome']}"
        )
    return "\n".join(lines)


def format_markdown_table(runs: list[dict], epochs: int) -> str:
    lines = [
        "| BN | learning rate | init scale | final held-out acc | best held-out acc "
        f"| epochs to {TARGET_ACCURACY:.0%} | final train loss | outcome |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        reached = run["epochs_to_target"]
        lines.append(
            f"| {'yes' if run['batch_norm'] else 'no'} | {run['learning_rate']:g} "
            f"| {run['init_scale']:g} | {_percent(run['final_accuracy'])} "
            f"| {_percent(run['best_accuracy'])} "
            f"| {reached if reached is not None else f'>{epochs}'} "
            f"| {run['final_train_loss']:.4f} | {run['outcome']} |"
        )
    return "\n".join(lines)


def _json_safe(value):
    """NaN/inf become null so results.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def _percent(value: float) -> str:
    return f"{value:.1%}" if math.isfinite(value) else "nan"


def draw_figure(runs: list[dict], args: argparse.Namespace, path: Path) -> None:
    """One column per learning rate; rows: training loss, held-out accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from keras_bn.converters.files import atomic_output

    learning_rates = args.learning_rates
    scales = args.init_scales
    epochs = np.arange(1, args.epochs + 1)
    colors = {True: "tab:blue", False: "tab:red"}
    styles = ["-", "--", ":", "-."]
    figure, axes = plt.subplots(
        2,
        len(learning_rates),
        figsize=(4.2 * len(learning_rates), 7.0),
        squeeze=False,
        sharex=True,
    )
    for column, learning_rate in enumerate(learning_rates):
        loss_axis, accuracy_axis = axes[0, column], axes[1, column]
        for run in runs:
            if run["learning_rate"] != learning_rate:
                continue
            style = styles[scales.index(run["init_scale"]) % len(styles)]
            label = f"{'BN' if run['batch_norm'] else 'no BN'}, init x{run['init_scale']:g}"
            plot_style = dict(
                color=colors[run["batch_norm"]], linestyle=style, marker="o", markersize=3
            )
            # Losses span orders of magnitude and can blow up: log scale, clipped to
            # [1e-4, 1e4] (results.json has the exact values).
            loss = np.clip(np.asarray(run["train_loss"], dtype=float), 1e-4, 1e4)
            loss_axis.plot(epochs, loss, label=label, **plot_style)
            accuracy_axis.plot(epochs, run["held_out_accuracy"], label=label, **plot_style)
        loss_axis.set_yscale("log")
        loss_axis.set_title(f"SGD lr={learning_rate:g}")
        loss_axis.set_ylabel("training loss (log, clipped at 1e4)")
        accuracy_axis.set_ylim(0.0, 1.02)
        accuracy_axis.axhline(TARGET_ACCURACY, color="grey", linewidth=0.8, linestyle=":")
        accuracy_axis.set_ylabel("held-out accuracy")
        accuracy_axis.set_xlabel("epoch")
        for axis in (loss_axis, accuracy_axis):
            axis.grid(True, alpha=0.3)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1, 0].legend(fontsize=8, loc="lower right")
    figure.suptitle(
        "Same CNN with and without batch normalization - digits "
        f"({len(runs) // 2} configurations, seed {args.seed})"
    )
    figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from keras_bn.converters.files import atomic_output

    args.output_dir.mkdir(parents=True, exist_ok=True)
    figure_path = args.output_dir / "why_batch_norm.png"
    results_path = args.output_dir / "results.json"

    data = load_data(args.seed)
    print(
        f"digits: {len(data['train'][0])} train / {len(data['held_out'][0])} held-out "
        f"images; {args.epochs} epochs per run, batch {args.batch_size}, "
        f"SGD momentum 0.9, BN momentum {args.bn_momentum}",
        flush=True,
    )
    grid = [
        (scale, learning_rate, batch_norm)
        for scale in args.init_scales
        for learning_rate in args.learning_rates
        for batch_norm in (True, False)
    ]
    runs = []
    started = time.perf_counter()
    for index, (scale, learning_rate, batch_norm) in enumerate(grid, 1):
        run = train_one(
            data,
            batch_norm=batch_norm,
            learning_rate=learning_rate,
            init_scale=scale,
            args=args,
        )
        runs.append(run)
        print(
            f"[{index}/{len(grid)}] {'BN   ' if batch_norm else 'no BN'} lr={learning_rate:g} "
            f"init x{scale:g}: held-out acc {_percent(run['final_accuracy'])}, "
            f"{run['outcome']} ({run['seconds']:.1f} s)",
            flush=True,
        )
    total_seconds = time.perf_counter() - started

    draw_figure(runs, args, figure_path)
    with atomic_output(results_path) as temporary:
        temporary.write_text(
            json.dumps(
                {
                    "command": " ".join(["python", *sys.argv]),
                    "settings": {
                        "epochs": args.epochs,
                        "learning_rates": args.learning_rates,
                        "init_scales": args.init_scales,
                        "batch_size": args.batch_size,
                        "bn_momentum": args.bn_momentum,
                        "seed": args.seed,
                        "target_accuracy": TARGET_ACCURACY,
                    },
                    "total_seconds": total_seconds,
                    "runs": _json_safe(runs),
                },
                indent=2,
                allow_nan=False,
            )
            + "\n"
        )

    print()
    print(f"Held-out accuracy after {args.epochs} epochs ({len(data['held_out'][0])} images):")
    print(format_table(runs, args.epochs))
    for batch_norm in (True, False):
        group = [run for run in runs if run["batch_norm"] == batch_norm]
        trained = sum(run["outcome"].startswith("trained") for run in group)
        reached = sum(run["epochs_to_target"] is not None for run in group)
        print(
            f"{'with BN:   ' if batch_norm else 'without BN:'} {trained}/{len(group)} "
            f"configurations trained, {reached}/{len(group)} reached "
            f"{TARGET_ACCURACY:.0%} held-out accuracy"
        )
    if args.markdown:
        print()
        print(format_markdown_table(runs, args.epochs))
    print()
    print(f"figure:  {figure_path.resolve()}")
    print(f"results: {results_path.resolve()}")
    print(f"total training time: {total_seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

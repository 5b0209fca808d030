"""Data-parallel recalibration throughput: images/second on 1 vs N devices.

Runs ``keras_bn.recalibrate_batch_norm`` (inference mode, the default) over
generated 16x16x3 images through a small CNN with three BN layers, once per
device count, each in a fresh process (JAX: ``keras.distribution.DataParallel``
over ``--xla_force_host_platform_device_count`` CPU devices; TensorFlow:
``MirroredStrategy`` over logical CPU devices). Images/second is the number of
samples divided by the wall time of the whole recalibration (one partial pass
per BN layer). Simulated CPU devices share the machine's cores: the figure shows
the overhead and scaling of the data-parallel path, not an accelerator's.

    KERAS_BACKEND=jax python benchmarks/bench_recalibration.py --samples 100000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def measure(devices: int, samples: int, batch_size: int, rounds: int) -> dict:
    import numpy as np

    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * devices
        )
    import keras

    from keras_bn.layers import BatchNormalization
    from keras_bn.recalibration import recalibrate_batch_norm

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((16, 16, 3))
        h = inputs
        for filters in (16, 32, 32):
            h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
            h = BatchNormalization()(h)
            h = keras.layers.ReLU()(h)
        outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(h))
        return keras.Model(inputs, outputs)

    if devices > 1 and backend == "jax":
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        model = build()
    elif devices > 1:
        names = [d.name for d in tf.config.list_logical_devices("CPU")]
        with tf.distribute.MirroredStrategy(names).scope():
            model = build()
    else:
        model = build()
    x = np.random.default_rng(0).normal(size=(samples, 16, 16, 3)).astype("float32")
    recalibrate_batch_norm(model, x[: batch_size * 2], batch_size=batch_size)  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        recalibrate_batch_norm(model, x, batch_size=batch_size)
        times.append(time.perf_counter() - start)
    best = sorted(times)[len(times) // 2]
    return {"backend": backend, "devices": devices, "seconds": best, "images_per_s": samples / best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="median of rounds")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.samples, args.batch_size, args.rounds)))
        return
    for devices in args.devices:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        command = [sys.executable, __file__, "--child", str(devices)]
        command += ["--samples", str(args.samples), "--batch-size", str(args.batch_size)]
        command += ["--rounds", str(args.rounds)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        print(
            f"{row['backend']:10s} devices={row['devices']}  {row['seconds']:.2f} s  "
            f"{row['images_per_s']:,.0f} images/s (median of {args.rounds})"
        )


if __name__ == "__main__":
    main()

"""How long XLA compiles whole KerasHub models on JAX, under this process's XLA_FLAGS.

Each model of ``support.keras_hub_zoo.keras_hub_models`` named on the command line is
built (random weights) and its inference pass (``stateless_call``, as keras-bn's
compiled passes run it) lowered once, then compiled and run once at batch 3; the
compile and run times are printed, then the total compile time. Run it once per set
of flags, one process each (XLA reads XLA_FLAGS when its backend starts)::

    XLA_FLAGS=--xla_backend_optimization_level=0 python benchmarks/xla_compile_options.py
    XLA_FLAGS="--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false" \\
        python benchmarks/xla_compile_options.py swin vit

BENCHMARKS.md section 60 (``keras_bn/_xla.py``'s options).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ["KERAS_BACKEND"] = "jax"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from support.jax_speed import use_numpy_initializers  # noqa: E402
from support.keras_hub_zoo import KERAS_HUB_IMAGE_SHAPE, keras_hub_models  # noqa: E402

DEFAULT_MODELS = ("swin", "vit", "mobilenet_v3", "hgnetv2", "depth_anything")


def compile_and_run(model: keras.Model) -> tuple[float, float]:
    """(compile seconds, run seconds) of the model's inference pass at batch 3."""
    x = np.random.default_rng(0).standard_normal((3, *KERAS_HUB_IMAGE_SHAPE)).astype("float32")

    def call(trainable, non_trainable, inputs):
        return model.stateless_call(trainable, non_trainable, inputs, training=False)[0]

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    lowered = jax.jit(call).lower(trainable, non_trainable, x)
    start = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    jax.block_until_ready(compiled(trainable, non_trainable, x))
    return compiled_at - start, time.perf_counter() - compiled_at


def main(names: list[str]) -> None:
    use_numpy_initializers()
    zoo = keras_hub_models()
    total = 0.0
    for name in names or DEFAULT_MODELS:
        keras.utils.set_random_seed(0)
        compile_seconds, run_seconds = compile_and_run(zoo[name]())
        total += compile_seconds
        print(f"{name}: compile {compile_seconds:.2f} s, run {run_seconds:.3f} s")
    print(f"total compile {total:.2f} s (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")


if __name__ == "__main__":
    main(sys.argv[1:])

"""How keras-bn compiles the passes it runs on JAX: XLA's options, in one place.

keras-bn compiles a model's whole inference pass on JAX wherever it runs Keras over
data (the statistics check and recalibration's recorder, the Keras reference of a
validation, the float64 twin). Those programs run a few batches once, so XLA's compile
time is much of their cost. Two options shorten it:

- ``xla_cpu_use_fusion_emitters=False``: XLA's CPU backend emits its fused loops with
  its older direct LLVM emitters instead of the newer MLIR fusion emitters. The same
  operations, compiled in about half the time: five small KerasHub models' whole passes
  at optimization level 0 compiled in 1.3-1.4 s together instead of 2.5-2.8 s
  (BENCHMARKS.md section 60). An option of the CPU backend only.
- ``xla_backend_optimization_level=0`` (``quick``): no backend optimizations. They
  cost more compile time than they save on the few samples a check or a validation
  runs; a pass run over a whole dataset (recalibration's recorder) keeps them.

What the options change is float32 rounding, which every comparison here judges against
float64 or Keras's own error. An XLA that does not know an option refuses it when a
program compiles (an error, not the abort an unknown ``XLA_FLAGS`` entry causes), so
:func:`compile_options` keeps those this XLA accepts, tried once per process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

__all__ = ["compile_options", "jit"]

# Each group is kept or dropped whole, in this order of value.
_FAST_CODEGEN: dict[str, Any] = {"xla_cpu_use_fusion_emitters": False}
_QUICK: dict[str, Any] = {"xla_backend_optimization_level": 0}


@functools.cache
def compile_options(quick: bool) -> dict[str, Any] | None:
    """The compile options for a keras-bn pass that this JAX and XLA accept (``quick``:
    with optimization level 0); None for a JAX before ``jax.jit(compiler_options=)``."""
    import jax
    import numpy as np

    groups = [_FAST_CODEGEN, _QUICK] if quick else [_FAST_CODEGEN]
    accepted: dict[str, Any] = {}
    for group in groups:
        options = {**accepted, **group}
        try:
            jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
        except TypeError:  # a JAX before compiler_options
            return None
        except Exception:  # an option this XLA does not know: compile without it
            continue
        accepted = options
    return accepted


def jit(function: Callable[..., Any], *, quick: bool) -> Any:
    """``jax.jit(function)`` compiled with :func:`compile_options`."""
    import jax

    options = compile_options(quick)
    if not options:
        return jax.jit(function)
    return jax.jit(function, compiler_options=options)

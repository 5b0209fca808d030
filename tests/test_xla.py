"""keras_bn/_xla.py: the XLA compile options of keras-bn's compiled passes on JAX.

Runs on any Keras backend: JAX is a dependency, and these compile plain JAX functions.
"""

import inspect

import numpy as np
import pytest

from keras_bn import _xla as xla

jax = pytest.importorskip("jax")
# The oldest JAX allowed (0.4.30, .ci/upgrade-check) has no jax.jit(compiler_options=):
# compile_options is then None and xla.jit is plain jax.jit.
TAKES_OPTIONS = "compiler_options" in inspect.signature(jax.jit).parameters


@pytest.fixture
def fresh_options():
    """compile_options recomputed in the test, and again after it."""
    xla.compile_options.cache_clear()
    yield
    xla.compile_options.cache_clear()


def test_quick_passes_turn_optimizations_off_and_dataset_passes_keep_them(fresh_options):
    """Both get the quicker code generation (that this XLA knows it:
    test_upgrade_safety.py)."""
    quick, full = xla.compile_options(quick=True), xla.compile_options(quick=False)
    if not TAKES_OPTIONS:
        assert quick is None and full is None
        return
    assert "xla_backend_optimization_level" not in full
    assert quick == {**full, "xla_backend_optimization_level": 0}


def test_an_option_this_xla_does_not_know_is_left_out(monkeypatch, fresh_options):
    monkeypatch.setattr(xla, "_FAST_CODEGEN", {"xla_cpu_no_such_option_in_any_xla": False})
    if TAKES_OPTIONS:
        assert xla.compile_options(quick=True) == {"xla_backend_optimization_level": 0}
        assert xla.compile_options(quick=False) == {}
    doubled = xla.jit(lambda x: 2 * x, quick=False)  # plain jax.jit: no options left
    np.testing.assert_array_equal(np.asarray(doubled(np.ones(3, "float32"))), [2.0, 2.0, 2.0])


@pytest.mark.parametrize("quick", [True, False])
def test_compiled_programs_compute_the_function_within_float32_rounding(quick):
    """A small network's pass (convolution, transcendental activations, a reduction)
    compiled with the options, against the same maths in NumPy float64."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 9, 3)).astype("float32")
    kernel = rng.standard_normal((3, 3, 3, 4)).astype("float32")

    def network(x, kernel):
        y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jax.numpy.tanh(y).mean(axis=(1, 2)) + jax.nn.sigmoid(y).max(axis=(1, 2))

    actual = np.asarray(xla.jit(network, quick=quick)(x, kernel), np.float64)
    x64, k64 = x.astype(np.float64), kernel.astype(np.float64)
    windows = np.lib.stride_tricks.sliding_window_view(x64, (3, 3), axis=(1, 2))  # n,7,7,c,3,3
    y = np.einsum("nhwcij,ijco->nhwo", windows, k64)
    expected = np.tanh(y).mean(axis=(1, 2)) + (1 / (1 + np.exp(-y))).max(axis=(1, 2))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)

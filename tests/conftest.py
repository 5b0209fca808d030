"""Fixtures and settings for every test module (shared functions live in tests/support/)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

REPO_ROOT = Path(__file__).resolve().parent.parent

# CI replays the same examples every run (a red CI must be reproducible); local runs
# keep exploring new ones. Per-test @settings still set the number of examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# XLA's quick compile for everything the tests compile (JAX, and TensorFlow's jit), in
# this process and the subprocesses it starts (they inherit the environment). Most
# programs here run a few samples once, so XLA's backend optimizations cost more than
# they save: without them the default run took 0.87x the test time (BENCHMARKS.md,
# section 49). The product compiles its own quick passes this way too
# (keras_bn/_xla.py); what the optimizations change is float32 rounding, which every
# numeric test judges against float64 or a tolerance. A developer's own optimization
# level comes first; run_python adds a test's XLA_FLAGS to these. This long-standing
# flag is set outright: XLA aborts the process on a flag its version does not know.
_QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_QUICK_XLA_FLAGS}".strip()

# XLA's CPU code generation by its older direct emitters (keras_bn/_xla.py, which the
# product passes per compile): the same programs compiled in about half the time; the
# JAX reruns took 0.72-0.75x their test time (BENCHMARKS.md, section 60). A newer flag
# than the one above, so a child process tries it first (an unknown flag aborts the
# process that reads it; TensorFlow 2.20 and 2.21 know it); the controller's answer
# reaches the workers and subprocesses through the environment.
_FAST_CODEGEN_FLAG = "--xla_cpu_use_fusion_emitters=false"
_PROBED = "KERAS_BN_TESTS_XLA_PROBED"


def _xla_accepts(flag: str) -> bool:
    probe = "import jax; jax.jit(lambda x: x + 1)(1.0).block_until_ready()"
    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"] and _PROBED not in os.environ:
    os.environ[_PROBED] = "1"
    if _xla_accepts(_FAST_CODEGEN_FLAG):
        os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {_FAST_CODEGEN_FLAG}"


@pytest.fixture(scope="session")
def run_python():
    """Run Python code or a module in a fresh interpreter; fail with its output.

    Usage: `run_python(["-c", code], env={"KERAS_BACKEND": "jax"}, timeout=300)`.
    For settings that must precede TensorFlow/JAX initialization (logical
    devices, XLA_FLAGS, the Keras backend). ``env``'s XLA_FLAGS are added to this
    process's (the quick compile above), not put in their place. Returns the
    CompletedProcess.
    """

    def run(args, env=None, timeout=300):
        full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
        if env and "XLA_FLAGS" in env:
            full_env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {env['XLA_FLAGS']}".strip()
        result = subprocess.run(
            [sys.executable, *args],
            cwd=REPO_ROOT,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            pytest.fail(
                f"subprocess {args[:2]} exited with {result.returncode}\n"
                f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
            )
        return result

    return run


@pytest.fixture(scope="session", autouse=True)
def _numpy_initializers():
    """On JAX, random initializers drawn by NumPy (support/jax_speed.py says why)."""
    from support.jax_speed import use_numpy_initializers

    use_numpy_initializers()


def pytest_configure(config):
    """``-n 2`` without ``--dist``: work stealing rather than xdist's default chunks.
    Each worker starts on half of the tests (the long ones below first); one that runs
    out takes the other's last pending tests, so neither waits at the end while the
    other finishes a long test."""
    explicit = any(arg.startswith(("--dist", "-d")) for arg in config.invocation_params.args)
    if getattr(config.option, "dist", "no") == "load" and not explicit:
        config.option.dist = "worksteal"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``first`` (whole modules rerun on another backend in a subprocess)
    start the run; the order is pytest's otherwise."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("first") else 1)


def pytest_report_header(config):
    import keras

    return f"keras {keras.__version__}, backend {keras.backend.backend()}"


@pytest.fixture
def opened_sessions(monkeypatch):
    """The keyword arguments of every ``runtime.open_session`` call the test makes
    (each session is still opened)."""
    from keras_bn.converters import runtime

    opened = []
    open_session = runtime.open_session

    def recording(model, **kwargs):
        opened.append(kwargs)
        return open_session(model, **kwargs)

    monkeypatch.setattr(runtime, "open_session", recording)
    return opened

"""The default test run covers more Keras backends than TensorFlow.

KERAS_BACKEND is read once, when Keras is first imported, so each backend gets
its own interpreter running tests/layers/test_layers.py (and, on JAX, the stock-parity
module tests/layers/test_layers_parity.py).
"""

import re

import pytest

BACKEND_RUNS = [
    # Both modules in one JAX process: its start-up and the compiles they share paid once.
    pytest.param(
        ("tests/layers/test_layers.py", "tests/layers/test_layers_parity.py"),
        "jax",
        "not tensorflow_only",
        None,
        id="jax",
    ),
    # Keras's numpy backend has no trainer (no fit, so no training round trip)
    # and its stock moments are one-pass, so the stock comparisons cannot hold.
    # It stands in for torch (not installed here): an eager, non-XLA backend.
    pytest.param(
        ("tests/layers/test_layers.py",),
        "numpy",
        "not tensorflow_only",
        "not fit and not keras_file and not matches_stock",
        id="numpy",
    ),
]


@pytest.mark.first
@pytest.mark.parametrize("modules, backend, markers, keywords", BACKEND_RUNS)
def test_layer_tests_pass_on_other_backends(run_python, modules, backend, markers, keywords):
    args = ["-m", "pytest", *modules, "-m", markers]
    if keywords:
        args += ["-k", keywords]
    args += ["-p", "no:cacheprovider", "-p", "no:xdist"]
    result = run_python(args, env={"KERAS_BACKEND": backend}, timeout=900)
    summary = result.stdout.strip().splitlines()[-1]  # "=== 85 passed, 1 deselected in 9s ==="
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0, summary
    for module in modules:  # every module collected and run
        assert module.rpartition("/")[2] in result.stdout, result.stdout[-3000:]
    assert not re.search(r"failed|error|skipped", summary), summary
    assert f"backend {backend}" in result.stdout, f"the subprocess did not run on {backend}"

"""The default test run covers more Keras backends than TensorFlow.

KERAS_BACKEND is read once, when Keras is first imported, so each backend gets
its own interpreter running tests/layers/test_layers.py (and, on JAX, the stock-parity
module tests/layers/test_layers_parity.py).
"""

import re

import pytest

BACKEND_RUNS = [
    pytest.param("tests/layers/test_layers.py", "jax", "not tensorflow_only", None, id="jax"),
    pytest.param(
        "tests/layers/test_layers_parity.py", "jax", "not tensorflow_only", None, id="jax-parity"
    ),
    # Keras's numpy backend has no trainer (no fit, so no training round trip)
    # and its stock moments are one-pass, so the stock comparisons cannot hold.
    # It stands in for torch (not installed here): an eager, non-XLA backend.
    pytest.param(
        "tests/layers/test_layers.py",
        "numpy",
        "not tensorflow_only",
        "not fit and not keras_file and not matches_stock",
        id="numpy",
    ),
]


@pytest.mark.parametrize("module, backend, markers, keywords", BACKEND_RUNS)
def test_layer_tests_pass_on_other_backends(run_python, module, backend, markers, keywords):
    args = ["-m", "pytest", module, "-m", markers]
    if keywords:
        args += ["-k", keywords]
    args += ["-p", "no:cacheprovider", "-p", "no:xdist"]
    result = run_python(args, env={"KERAS_BACKEND": backend}, timeout=900)
    summary = result.stdout.strip().splitlines()[-1]  # "=== 85 passed, 1 deselected in 9s ==="
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0, summary
    assert not re.search(r"failed|error|skipped", summary), summary
    assert f"backend {backend}" in result.stdout, f"the subprocess did not run on {backend}"

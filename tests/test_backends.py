"""The default test run covers a second Keras backend: tests/test_layers.py under JAX.

KERAS_BACKEND is read once, when Keras is first imported, so the other backend
needs its own interpreter.
"""

import re


def test_layer_tests_pass_on_jax(run_python):
    result = run_python(
        [
            "-m",
            "pytest",
            "tests/test_layers.py",
            "-m",
            "not tensorflow_only",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
        ],
        env={"KERAS_BACKEND": "jax"},
        timeout=900,
    )
    summary = result.stdout.strip().splitlines()[-1]  # "=== 85 passed, 1 deselected in 9s ==="
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0, summary
    assert not re.search(r"failed|error|skipped", summary), summary
    assert "backend jax" in result.stdout, "the subprocess did not run on JAX"

"""How the keras-bn command picks its Keras backend (converters/cli/backend.py)."""

import json
import os
import subprocess
import sys

import pytest
from support.console import without_progress

from keras_bn.converters.cli.backend import BACKENDS, choose_backend

KERAS_WRITTEN = {
    "floatx": "float32",
    "epsilon": 1e-07,
    "backend": "tensorflow",
    "image_data_format": "channels_last",
}


def _home(tmp_path, config=None):
    if config is not None:
        (tmp_path / "keras.json").write_text(json.dumps(config, indent=4))
    return {"KERAS_HOME": str(tmp_path)}


def _python(args, *, cwd=None, drop=(), **env):
    """``python ARGS`` in a fresh interpreter: this environment without ``drop``, plus ``env``."""
    environ = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _fastest_installed():
    import importlib.util

    return next(b for b in BACKENDS if importlib.util.find_spec(b) is not None)


def test_keras_backend_variable_always_wins(tmp_path):
    environ = {**_home(tmp_path, {**KERAS_WRITTEN, "backend": "jax"}), "KERAS_BACKEND": "torch"}
    assert choose_backend(environ) == ("torch", "KERAS_BACKEND")


def test_a_keras_json_the_user_wrote_is_honoured(tmp_path):
    environ = _home(tmp_path, {**KERAS_WRITTEN, "image_data_format": "channels_first"})
    assert choose_backend(environ) == ("tensorflow", str(tmp_path / "keras.json"))
    environ = _home(tmp_path, {"backend": "jax"})
    assert choose_backend(environ)[0] == "jax"


@pytest.mark.parametrize("config", [None, KERAS_WRITTEN, "not json", ["backend"]])
def test_otherwise_the_fastest_installed_backend(tmp_path, config):
    """No file, the file Keras writes by itself, or an unreadable one: no user choice."""
    if isinstance(config, str):
        (tmp_path / "keras.json").write_text(config)
        config = None
    assert choose_backend(_home(tmp_path, config)) == (_fastest_installed(), "fastest installed")


def test_the_command_runs_on_the_chosen_backend(tmp_path):
    """In a fresh process: the backend the report names is the one Keras runs on, and
    Keras's own config file is left as it was."""
    (tmp_path / "keras.json").write_text(json.dumps(KERAS_WRITTEN, indent=4))
    before = (tmp_path / "keras.json").read_text()
    code = (
        "import os, sys\n"
        "from keras_bn.converters.cli.quiet import import_keras\n"
        "backend = import_keras()\n"
        "import keras\n"
        "assert keras.backend.backend() == backend == os.environ['KERAS_BACKEND']\n"
        "assert 'sklearn' not in sys.modules and 'requests' not in sys.modules  # hidden...\n"
        "import sklearn  # ...and importable afterwards\n"
        "print(backend)\n"
    )
    result = _python(
        ["-c", code], drop=("KERAS_BACKEND",), KERAS_HOME=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [_fastest_installed()]
    assert (tmp_path / "keras.json").read_text() == before


def test_saving_on_jax_does_not_import_tensorflow(tmp_path):
    """Keras's serializer probes for TensorFlow (importing all of it: seconds, and its
    start-up lines on stderr); the command on JAX answers the probe instead, and a model
    it saves loads back with the same outputs."""
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from keras_bn.converters.cli.quiet import import_keras\n"
        "assert import_keras() == 'jax'\n"
        "import keras\n"
        "model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])\n"
        f"model.save({str(tmp_path / 'm.keras')!r})\n"
        f"again = keras.saving.load_model({str(tmp_path / 'm.keras')!r})\n"
        "x = np.ones((2, 4), 'float32')\n"
        "np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(again(x)))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))\n"
    )
    result = _python(["-c", code], drop=("TF_CPP_MIN_LOG_LEVEL",), KERAS_BACKEND="jax")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
    assert result.stderr == ""


def test_int8_export_on_jax_does_not_import_tensorflow(tmp_path):
    """The int8 path (stale-statistics check, quantization, bias correction, layer
    report, validation) on JAX imports no TensorFlow: a session once saw TensorFlow's
    start-up lines on stderr in a JAX export."""
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from keras_bn.converters.cli.quiet import import_keras\n"
        "assert import_keras() == 'jax'\n"
        "import keras\n"
        "from keras_bn.converters.cli import main\n"
        "inputs = keras.Input((8, 8, 3), name='image')\n"
        "h = keras.layers.Conv2D(4, 3)(inputs)\n"
        "h = keras.layers.BatchNormalization()(h)\n"
        "h = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(h))\n"
        "model = keras.Model(inputs, keras.layers.Dense(3)(h))\n"
        f"model.save({str(tmp_path / 'm.keras')!r})\n"
        "x = np.random.default_rng(0).normal(size=(32, 8, 8, 3)).astype('float32')\n"
        f"np.savez({str(tmp_path / 'c.npz')!r}, image=x)\n"
        f"argv = ['export', {str(tmp_path / 'm.keras')!r}, '-o', {str(tmp_path / 'q.onnx')!r},\n"
        f"        '--precision', 'int8', '--calibration', {str(tmp_path / 'c.npz')!r}, '-q']\n"
        "assert main(argv) == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))\n"
    )
    result = _python(["-c", code], drop=("TF_CPP_MIN_LOG_LEVEL",), KERAS_BACKEND="jax")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "q.onnx").is_file()


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_the_command_imports_keras_on_every_backend(backend):
    """What the command hides from Keras's import (scikit-learn, matplotlib, requests
    on JAX) is what that backend's import can do without."""
    code = (
        "from keras_bn.converters.cli.quiet import import_keras\n"
        "print(import_keras())\n"
        "import keras\n"
        "keras.layers.Dense(2)(keras.ops.ones((1, 3)))\n"
    )
    result = _python(["-c", code], KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [backend]


def test_what_keras_imports_on_jax_but_never_calls_is_imported_on_first_use():
    """Sparse linear algebra (scipy.sparse.linalg) and TPU splash attention are not
    imported with Keras by the command; the names Keras and JAX bound to them work
    when used, and importing them afterwards gives the real modules."""
    splash = "jax.experimental.pallas.ops.tpu.splash_attention"
    code = (
        "import sys, types\n"
        "from keras_bn.converters.cli.quiet import import_keras\n"
        "assert import_keras() == 'jax'\n"
        "print(sorted(m for m in ('scipy.sparse.linalg', 'jax.experimental.sparse.linalg',\n"
        f"    '{splash}', '{splash}.splash_attention_kernel') if m in sys.modules))\n"
        "import jax.experimental.sparse as sparse\n"
        "assert type(sparse.linalg.lobpcg_standard).__name__ == 'function'\n"
        "assert isinstance(sys.modules['jax.experimental.sparse.linalg'], types.ModuleType)\n"
        "assert type(sparse.linalg) is types.ModuleType  # the real module from now on\n"
        "from keras.src.backend.jax import nn\n"
        f"from {splash} import splash_attention_mask\n"
        "assert nn.splash_attention_mask.NumpyMask is splash_attention_mask.NumpyMask\n"
        "assert callable(nn.splash_attention_kernel.make_splash_mha)\n"
        "import keras\n"
        "print(keras.layers.Dense(2)(keras.ops.ones((1, 3))).shape)\n"
    )
    result = _python(["-c", code], KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["[]", "(1, 2)"]


def test_a_layer_calling_tensorflow_on_jax_is_named_with_the_fix(tmp_path):
    """A custom layer written with tf.* ops loads on JAX but cannot run there: one line
    saying so and how to run it, exit 2, no output file."""
    (tmp_path / "tflayers.py").write_text(
        "import keras\n"
        "import tensorflow as tf\n\n\n"
        "@keras.saving.register_keras_serializable(package='tflayers_test')\n"
        "class TFRelu6(keras.layers.Layer):\n"
        "    def call(self, x):\n"
        "        return tf.nn.relu6(x) * 2.0\n"
    )
    make = (
        "import sys; sys.path.insert(0, '.')\n"
        "import keras, tflayers\n"
        "x = keras.Input((8,))\n"
        "y = tflayers.TFRelu6()(keras.layers.Dense(4)(x))\n"
        "keras.Model(x, y).save('model.keras')\n"
    )
    made = _python(["-c", make], cwd=tmp_path, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    assert made.returncode == 0, made.stderr[-3000:]
    command = ["-m", "keras_bn", "export", "model.keras", "-o", "out.onnx"]
    result = _python(
        [*command, "--custom-objects", "tflayers:TFRelu6"], cwd=tmp_path, KERAS_BACKEND="jax"
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = without_progress(result.stderr).strip().splitlines()
    assert len(lines) == 1 and "calls TensorFlow" in lines[0], result.stderr
    assert "KERAS_BACKEND=tensorflow" in lines[0]
    assert not (tmp_path / "out.onnx").exists()


def test_a_backend_whose_package_is_missing_is_the_users_error(tmp_path):
    """KERAS_BACKEND=torch without torch (stood in for by blocking its import, so the
    test holds wherever torch is installed): one line naming the package, exit 2; it
    was an internal error, exit 3, "a bug in keras-bn"."""
    import keras

    inputs = keras.Input((2,))
    keras.Model(inputs, keras.layers.Dense(1)(inputs)).save(tmp_path / "model.keras")
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # import torch: ModuleNotFoundError, as uninstalled\n"
        "from keras_bn.converters.cli import app\n"
        "sys.exit(app.main(['inspect', 'model.keras'], owns_process=True))\n"
    )
    result = _python(["-c", code], cwd=tmp_path, KERAS_BACKEND="torch")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("keras-bn")]
    assert lines == [
        "keras-bn inspect: error: KERAS_BACKEND=torch needs the 'torch' package, which is not "
        "installed: pip install torch, or pick an installed backend (KERAS_BACKEND=jax or "
        "tensorflow)."
    ], result.stderr[-3000:]
    assert "Traceback" not in result.stderr

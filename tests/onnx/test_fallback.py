"""``fallback=True`` / ``--fallback``: Keras's own exporter for a model with a layer
that has no rule, working or saying why (exit 2, one line), on TensorFlow and JAX;
no rebuild when nothing folds."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import onnxruntime as ort
import pytest
from support.console import assert_rejected

from keras_bn.converters import cli
from keras_bn.converters.errors import UserInputError
from keras_bn.converters.onnx import export as export_module
from keras_bn.converters.onnx.export import ExportWarning, export_onnx

# A layer without a rule: traced, its ops.cbrt has none (no ONNX operator; Keras's
# exporter writes its backend's formula).
LAYER_SOURCE = textwrap.dedent(
    """
    import keras


    class Cbrt(keras.layers.Layer):
        def call(self, x):
            return keras.ops.cbrt(x)
    """
)


def _namespace():
    namespace: dict = {}
    exec(compile(LAYER_SOURCE, "cbrt_layer.py", "exec"), namespace)
    return namespace


def _model(with_batch_norm=True):
    layer = _namespace()["Cbrt"]
    inputs = keras.Input((6,), name="features")
    x = keras.layers.Dense(4, name="dense")(inputs)
    if with_batch_norm:
        bn = keras.layers.BatchNormalization(name="bn")
        x = bn(x)
        bn.moving_mean.assign([0.5, -1.0, 2.0, 0.0])
        bn.moving_variance.assign([0.25, 4.0, 1.0, 9.0])
    return keras.Model(inputs, layer(name="cbrt")(x), name="fb")


def _exporter_installed():
    return importlib.util.find_spec(export_module._KERAS_EXPORTER_PACKAGES["tensorflow"])


def test_fallback_exports_through_keras_or_names_the_package(tmp_path):
    model = _model()
    path = tmp_path / "fb.onnx"
    if not _exporter_installed():
        with pytest.raises(UserInputError, match=r"needs tf2onnx .* `pip install tf2onnx`"):
            export_onnx(model, path, fallback=True, fold=True)
        return
    with pytest.warns(ExportWarning, match="Falling back"):
        result = export_onnx(model, path, fallback=True, fold=True)
    assert result.used_fallback and result.fold_report.folded_count == 1
    x = np.random.default_rng(0).standard_normal((3, 6)).astype("float32")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(actual, keras.ops.convert_to_numpy(model(x)), rtol=1e-4, atol=1e-5)


def test_fallback_does_not_rebuild_a_model_with_nothing_to_fold(tmp_path, monkeypatch):
    """A model without BN goes to Keras's exporter as it is (KerasHub models do not
    rebuild from their configs): folding, which rebuilds, is never called."""

    def refuse(*args, **kwargs):
        raise AssertionError("fold_batch_norms called on a model without BatchNormalization")

    monkeypatch.setattr(export_module, "fold_batch_norms", refuse)
    model = _model(with_batch_norm=False)
    if not _exporter_installed():
        with pytest.raises(UserInputError, match="needs tf2onnx"):
            export_onnx(model, tmp_path / "fb.onnx", fallback=True, fold=True)
        return
    with pytest.warns(ExportWarning, match="Falling back"):
        result = export_onnx(model, tmp_path / "fb.onnx", fallback=True, fold=True)
    assert result.used_fallback and result.fold_report is None


def _broken_exporter(self, *args, **kwargs):
    # Keras's own precondition first: the model must have been called
    assert self._called, "Keras's exporter got a model never called"
    raise RuntimeError("Unsupported ops: Cbrt\nsecond line of the exporter's message")


def test_keras_exporter_failure_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_module, "_KERAS_EXPORTER_PACKAGES", {})  # installed or not
    monkeypatch.setattr(keras.Model, "export", _broken_exporter)
    with pytest.raises(UserInputError, match=r"Keras's own ONNX exporter .* failed .* Cbrt"):
        export_onnx(_model(), tmp_path / "fb.onnx", fallback=True, fold=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # the CLI: exit 2, one line (not exit 3, "a bug in keras-bn")
    module = tmp_path / "inputs" / "cbrt_layer.py"
    module.parent.mkdir()
    module.write_text(LAYER_SOURCE)
    _model().save(tmp_path / "inputs" / "fb.keras")
    out = tmp_path / "out"
    out.mkdir()
    code = cli.main(
        ["export", str(tmp_path / "inputs" / "fb.keras"), "-o", str(out / "fb.onnx")]
        + ["--fallback", "--custom-objects", f"{module}:Cbrt"]
    )
    err = capsys.readouterr().err
    err = "\n".join(line for line in err.splitlines() if "Falling back" not in line)
    assert_rejected(code, err, "Keras's own ONNX exporter", out)


# On JAX (a fresh process: the backend is read once): --fallback on a loaded model.
# Keras's exporter needs the model called once; validation's compiled pass does not
# count. The real exporter runs (the package check cleared): whatever it says, it is
# not "never called", and its failure is exit 2.
JAX_SCRIPT = textwrap.dedent(
    """
    import sys

    from keras_bn.converters import cli
    from keras_bn.converters.onnx import export

    if sys.argv[1] == "unchecked":
        export._KERAS_EXPORTER_PACKAGES.clear()
    sys.exit(cli.main(sys.argv[2:]))
    """
)


@pytest.mark.first
def test_fallback_on_jax_loaded_model(tmp_path):
    module = tmp_path / "cbrt_layer.py"
    module.write_text(LAYER_SOURCE)
    _model().save(tmp_path / "fb.keras")
    script = tmp_path / "run.py"
    script.write_text(JAX_SCRIPT)
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    args = ["export", str(tmp_path / "fb.keras"), "--fallback"]
    args += ["--custom-objects", f"{module}:Cbrt"]
    results = {}
    for mode in ("checked", "unchecked"):
        out = tmp_path / mode
        out.mkdir()
        results[mode] = subprocess.run(
            [sys.executable, str(script), mode, *args, "-o", str(out / "fb.onnx")],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
    checked, unchecked = results["checked"], results["unchecked"]
    if importlib.util.find_spec("jax2onnx") is None:
        lines = [line for line in checked.stderr.splitlines() if "error" in line]
        assert checked.returncode == 2, checked.stderr
        assert len(lines) == 1 and "`pip install jax2onnx`" in lines[0], checked.stderr
        assert unchecked.returncode == 2, unchecked.stderr
        assert "Keras's own ONNX exporter" in unchecked.stderr, unchecked.stderr
        assert "never called" not in unchecked.stderr and "jax2onnx" in unchecked.stderr
    else:  # Keras's exporter works: the file is validated like any other
        assert checked.returncode == 0, checked.stderr

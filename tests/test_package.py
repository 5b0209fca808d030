"""Tests of the package surface: public names, lazy converter imports, layering."""

import subprocess
import sys

import pytest

import keras_bn
import keras_bn.converters as converters


def test_every_converter_export_resolves():
    for name in converters.__all__:
        assert getattr(converters, name) is not None, name


def test_layer_package_imports_without_the_converter_stack():
    code = (
        "import sys, keras_bn\n"
        "heavy = {'onnx', 'onnxruntime', 'keras_bn.converters'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert keras_bn.BatchNormalization.__module__ == 'keras_bn.layers'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_layer_is_registered_for_deserialization():
    import keras

    assert keras.saving.get_registered_object("keras_bn>BatchNormalization") is (
        keras_bn.BatchNormalization
    )


def test_import_keras_bn_imports_no_framework(run_python):
    code = (
        "import sys, keras_bn\n"
        "heavy = {'keras', 'tensorflow', 'jax', 'torch', 'numpy'}\n"
        "loaded = heavy & {m.split('.')[0] for m in sys.modules}\n"
        "assert not loaded, loaded\n"
        "assert set(keras_bn.__all__) <= set(dir(keras_bn))\n"
    )
    run_python(["-c", code])


@pytest.fixture(scope="module")
def keras_bn_model_file(tmp_path_factory):
    """A .keras file holding a keras_bn.BatchNormalization (registered name needed)."""
    import keras

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras_bn.BatchNormalization()(keras.layers.Dense(3)(inputs)))
    path = tmp_path_factory.mktemp("registered") / "model.keras"
    model.save(path)
    return path


@pytest.mark.parametrize(
    "imports",
    ["import keras_bn; import keras", "import keras; import keras_bn", "import keras_bn.layers"],
    ids=["keras_bn-first", "keras-first", "layers-module"],
)
def test_layer_is_registered_whichever_is_imported_first(run_python, keras_bn_model_file, imports):
    code = (
        f"{imports}\n"
        "import sys, keras\n"
        f"model = keras.saving.load_model({str(keras_bn_model_file)!r})\n"
        "assert [type(l).__module__ for l in model.layers][-1] == 'keras_bn.layers'\n"
        "hooks = [f for f in sys.meta_path if type(f).__name__ == '_RegisterAfterKeras']\n"
        "assert not hooks, 'the one-shot import hook is still installed'\n"
    )
    run_python(["-c", code])


def test_public_names_resolve_lazily():
    for name in keras_bn.__all__:
        assert getattr(keras_bn, name) is not None, name
    assert keras_bn.training.recalibrate_batch_norm is keras_bn.recalibrate_batch_norm

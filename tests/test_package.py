"""Tests of the package surface: public names, lazy converter imports, layering."""

import subprocess
import sys

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

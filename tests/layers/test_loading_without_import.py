"""Loading a `.keras` file holding our layer in a fresh process, without our import.

Keras 3.15 looks a custom class up in its registry (filled when ``keras_bn`` is
imported) and imports the module named in the file only for its own packages
(``keras``, ``keras_hub``, ``keras_cv``, ``keras_nlp``: ``serialization_lib.
_retrieve_class_or_fn``), so no way of saving our layer makes Keras import
keras_bn by itself. These tests pin what the README says about it: without the
import the failure names keras_bn (never a silent stock layer), and the
``custom_objects`` form it shows loads the layer.
"""

import keras
import numpy as np
import pytest

from keras_bn.layers import BatchNormalization


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    inputs = keras.Input((4,))
    layer = BatchNormalization(unbiased_moving_variance=True, name="ours")
    model = keras.Model(inputs, layer(keras.layers.Dense(3)(inputs)))
    layer.moving_mean.assign(np.array([1.5, -2.0, 0.25], "float32"))
    path = tmp_path_factory.mktemp("without_import") / "model.keras"
    model.save(path)
    return path


def test_load_without_import_fails_naming_keras_bn(run_python, model_file):
    code = (
        "import sys, keras\n"
        "try:\n"
        f"    keras.saving.load_model({str(model_file)!r})\n"
        "except TypeError as error:\n"
        "    message = str(error)\n"
        "else:\n"
        "    raise AssertionError('loaded without keras_bn: a stock layer took its place')\n"
        "assert 'keras_bn' not in sys.modules, 'something imported keras_bn'\n"
        "assert \"Could not locate class 'BatchNormalization'\" in message, message[:300]\n"
        "assert \"'module': 'keras_bn.layers'\" in message, message[:300]\n"
        "assert \"'registered_name': 'keras_bn>BatchNormalization'\" in message\n"
        "print('refused')\n"
    )
    assert run_python(["-c", code]).stdout.strip().endswith("refused")


def test_load_with_custom_objects_as_the_readme_shows(run_python, model_file):
    code = (
        "import keras, keras_bn\n"
        f"model = keras.saving.load_model({str(model_file)!r},\n"
        "    custom_objects={'keras_bn>BatchNormalization': keras_bn.BatchNormalization})\n"
        "layer = model.get_layer('ours')\n"
        "assert type(layer) is keras_bn.BatchNormalization and layer.unbiased_moving_variance\n"
        "print(layer.moving_mean.numpy().tolist())\n"
    )
    printed = run_python(["-c", code]).stdout.strip().splitlines()[-1]
    assert printed == "[1.5, -2.0, 0.25]"

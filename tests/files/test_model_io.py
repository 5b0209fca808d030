"""Tests for keras_bn.converters.model_io: loading .keras models and .npz inputs."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from support.files import make_zip, sha256, zip_members
from support.models import randomize_batch_norms

from keras_bn.converters.errors import UserInputError
from keras_bn.converters.model_io import (
    load_inputs,
    load_model,
    model_input_specs,
    resolve_custom_objects,
)


def _small_model() -> keras.Model:
    inputs = keras.Input((6, 6, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3)(x)
    model = keras.Model(inputs, outputs, name="small")
    randomize_batch_norms(model)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, keras.Model]:
    model = _small_model()
    path = tmp_path_factory.mktemp("model_io") / "small.keras"
    model.save(path)
    return path, model


def test_load_model_matches_the_saved_model(saved):
    path, original = saved
    before = sha256(path)
    loaded = load_model(path)
    x = np.random.default_rng(1).normal(size=(4, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x, training=False)),
        keras.ops.convert_to_numpy(original(x, training=False)),
        rtol=1e-6,
        atol=1e-6,
    )
    assert sha256(path) == before  # the input is only read


def _variants(path: Path) -> dict[str, tuple[bytes, str]]:
    """Broken copies of a good .keras file and a fragment of the expected message."""
    data = path.read_bytes()
    members = zip_members(path)
    config = json.loads(members["config.json"])
    flipped = bytearray(data)
    # A byte inside the (stored, uncompressed) weights file: caught by the CRC check.
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("model.weights.h5")
    flipped[info.header_offset + 30 + len(info.filename) + 100] ^= 0xFF
    wrong_filters = json.dumps(config).replace('"filters": 4', '"filters": -4')
    unknown = json.dumps(config).replace('"Conv2D"', '"NoSuchConv"')
    other = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    other_path = path.with_name("other.keras")
    other.save(other_path)
    other_weights = zip_members(other_path)["model.weights.h5"]
    return {
        "empty": (b"", "is empty"),
        "text": (b"this is not a zip archive", "not a readable .keras zip archive"),
        "truncated": (data[: len(data) // 2], "not a readable .keras zip archive"),
        "crc": (bytes(flipped), "fails its CRC check"),
        "no-config": (
            make_zip({k: v for k, v in members.items() if k != "config.json"}),
            "has no config.json",
        ),
        "no-weights": (
            make_zip({k: v for k, v in members.items() if k != "model.weights.h5"}),
            "has no model.weights.h5",
        ),
        "config-not-json": (make_zip({**members, "config.json": b"{oops"}), "not valid JSON"),
        "config-null": (make_zip({**members, "config.json": b"null"}), "does not describe"),
        "config-bad-value": (
            make_zip({**members, "config.json": wrong_filters.encode()}),
            "filters",
        ),
        "unknown-class": (
            make_zip({**members, "config.json": unknown.encode()}),
            "--custom-objects MODULE:NoSuchConv",
        ),
        "weights-garbage": (
            make_zip({**members, "model.weights.h5": b"\x00garbage" * 50}),
            "corrupted weights",
        ),
        "weights-truncated": (
            make_zip({**members, "model.weights.h5": members["model.weights.h5"][:3000]}),
            "corrupted weights",
        ),
        "weights-of-another-model": (
            make_zip({**members, "model.weights.h5": other_weights}),
            "could not be loaded by Keras",
        ),
        "a-layer-not-a-model": (
            make_zip(
                {
                    **members,
                    "config.json": json.dumps(
                        {"module": "keras.layers", "class_name": "Dense", "config": {"units": 2}}
                    ).encode(),
                }
            ),
            "holds a Dense, not a model",
        ),
    }


def test_broken_archives_raise_one_line_user_errors(saved, tmp_path):
    path, _ = saved
    for label, (data, fragment) in _variants(path).items():
        broken = tmp_path / f"{label}.keras"
        broken.write_bytes(data)
        with pytest.raises(UserInputError) as caught:
            load_model(broken)
        message = str(caught.value)
        assert fragment in message, (label, message)
        assert "\n" not in message, label
        assert str(broken) in message, label


@pytest.mark.parametrize(
    ("name", "make", "fragment"),
    [
        ("missing.keras", None, "does not exist"),
        ("folder.keras", "dir", "is a directory"),
        ("model.h5", "file", "Legacy H5 models are not supported"),
        ("model.onnx", "file", "expected a .keras file"),
    ],
    ids=["missing", "directory", "legacy-h5", "wrong-suffix"],
)
def test_bad_paths(tmp_path, name, make, fragment):
    path = tmp_path / name
    if make == "dir":
        path.mkdir()
    elif make == "file":
        path.write_bytes(b"x")
    with pytest.raises(UserInputError, match=fragment):
        load_model(path)


def test_lambda_layer_needs_unsafe(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2.0 + 1.0)(inputs))
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(UserInputError, match="Lambda layer.*--unsafe"):
        load_model(path)
    loaded = load_model(path, unsafe=True)
    x = np.arange(6, dtype="float32").reshape(2, 3)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), x * 2.0 + 1.0)


CUSTOM_LAYER_SOURCE = """
import keras

class TimesThree(keras.layers.Layer):
    def call(self, x):
        return x * 3.0
"""


def test_custom_objects_from_a_file_and_a_module(tmp_path, monkeypatch):
    import importlib.util

    source = tmp_path / "my_layers_for_cli.py"
    source.write_text(CUSTOM_LAYER_SOURCE)
    spec = importlib.util.spec_from_file_location("my_layers_for_cli", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    inputs = keras.Input((2,))
    path = tmp_path / "custom.keras"
    keras.Model(inputs, module.TimesThree()(inputs)).save(path)

    with pytest.raises(UserInputError, match="unknown class or function 'TimesThree'"):
        load_model(path)
    x = np.ones((1, 2), "float32")
    by_file = load_model(path, custom_objects=[f"{source}:TimesThree"])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(by_file(x)), 3 * x)
    monkeypatch.chdir(tmp_path)  # a module name is looked up from the current directory
    by_module = load_model(path, custom_objects=["my_layers_for_cli:TimesThree"])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(by_module(x)), 3 * x)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("NoColon", "expected MODULE:NAME"),
        (":Name", "expected MODULE:NAME"),
        ("module:", "expected MODULE:NAME"),
        ("no_such_module_xyz:Layer", "cannot import module 'no_such_module_xyz'"),
        ("json:NoSuchName", "has no attribute 'NoSuchName'"),
        # a value, not a class: it was accepted, and loading then said the model "uses
        # the unknown class ...; pass --custom-objects MODULE:..."
        ("json:_default_decoder", r"in 'json' is not a class or function \(it is JSONDecoder"),
        ("missing_file.py:Layer", "does not exist"),
    ],
)
def test_bad_custom_object_specs(spec, fragment):
    with pytest.raises(UserInputError, match=fragment):
        resolve_custom_objects([spec])


# ------------------------------------------------------------------------------------
# .npz inputs.


@pytest.fixture(scope="module")
def two_input_model() -> keras.Model:
    image = keras.Input((4, 4, 2), name="image")
    extra = keras.Input((3,), name="extra")
    pooled = keras.layers.GlobalAveragePooling2D()(image)
    merged = keras.layers.Concatenate()([pooled, extra])
    return keras.Model([image, extra], keras.layers.Dense(2)(merged))


def test_model_input_specs(two_input_model):
    assert model_input_specs(two_input_model) == [
        ("image", (None, 4, 4, 2)),
        ("extra", (None, 3)),
    ]


def test_load_inputs_single_input_any_key(tmp_path):
    path = tmp_path / "x.npz"
    x = np.random.default_rng(0).normal(size=(5, 6, 6, 3))  # float64 on disk
    np.savez(path, x)
    loaded = load_inputs(path, [("image", (None, 6, 6, 3))])
    assert list(loaded) == ["image"]
    assert loaded["image"].dtype == np.float32
    np.testing.assert_allclose(loaded["image"], x.astype(np.float32))


def test_load_inputs_by_name(tmp_path, two_input_model):
    path = tmp_path / "x.npz"
    image = np.ones((2, 4, 4, 2), "float32")
    extra = np.zeros((2, 3), "float32")
    np.savez(path, extra=extra, image=image)
    loaded = load_inputs(path, model_input_specs(two_input_model))
    np.testing.assert_array_equal(loaded["image"], image)
    np.testing.assert_array_equal(loaded["extra"], extra)


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"image": np.ones((2, 4, 4, 2))}, "expected exactly the model inputs"),
        ({"image": np.ones((2, 4, 4, 2)), "other": np.ones((2, 3))}, "expected exactly"),
        ({"image": np.ones((2, 4, 4, 3)), "extra": np.ones((2, 3))}, "has shape (2, 4, 4, 3)"),
        ({"image": np.ones((4, 4, 2)), "extra": np.ones((2, 3))}, "(N, 4, 4, 2)"),
        ({"image": np.ones((2, 4, 4, 2)), "extra": np.ones((3, 3))}, "different batch sizes"),
        ({"image": np.ones((0, 4, 4, 2)), "extra": np.ones((0, 3))}, "is empty"),
        ({"image": np.full((2, 4, 4, 2), np.nan), "extra": np.ones((2, 3))}, "NaN or Inf"),
        ({"image": np.full((2, 4, 4, 2), "a"), "extra": np.ones((2, 3))}, "expected numbers"),
    ],
    ids=["missing", "extra-key", "shape", "rank", "batch", "empty", "nan", "strings"],
)
def test_load_inputs_rejects(tmp_path, two_input_model, arrays, fragment):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserInputError) as caught:
        load_inputs(path, model_input_specs(two_input_model))
    assert fragment in str(caught.value)


def test_load_inputs_rejects_non_npz(tmp_path):
    path = tmp_path / "x.npz"
    path.write_bytes(b"not an npz")
    with pytest.raises(UserInputError, match="not a readable .npz archive"):
        load_inputs(path, [("x", (None, 2))])
    with pytest.raises(UserInputError, match="expected a .npz file"):
        load_inputs(tmp_path / "x.npy", [("x", (None, 2))])


def test_user_code_calling_sys_exit_is_a_one_line_error(tmp_path):
    """A --custom-objects module, or a --data loader, that calls ``sys.exit``: its
    status became the command's (``sys.exit(0)``: exit 0 with no output at all, even
    under --json; ``sys.exit("bye")``: exit 1, "validation failed"). Each is the
    user's one-line error."""
    from keras_bn.converters.data_sources import open_data

    (tmp_path / "leaving_layers.py").write_text("import sys\nsys.exit(0)\n")
    with pytest.raises(UserInputError, match=r"called sys.exit\(0\)"):
        resolve_custom_objects([f"{tmp_path / 'leaving_layers.py'}:Layer"])
    (tmp_path / "leaving_data.py").write_text("import sys\n\ndef batches():\n    sys.exit('bye')\n")
    source = open_data(f"{tmp_path / 'leaving_data.py'}:batches", [("x", (None, 3))])
    with pytest.raises(UserInputError, match=r"called sys.exit\('bye'\)"):
        list(source)

"""Input layouts per input: ``input_layout={name: layout}`` and ``--input-layout
NAME=LAYOUT``; a layout change that does not apply is refused (rank < 3, an input
the model already reads channels_first)."""

from __future__ import annotations

import json

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from support.console import assert_rejected
from support.models import randomize_batch_norms

from keras_bn.converters import cli
from keras_bn.converters.errors import UserInputError
from keras_bn.converters.onnx.export import export_onnx
from keras_bn.converters.onnx.layout import decode_input_layout
from keras_bn.converters.validation import validate_onnx

L = keras.layers


def _two_images():
    """Two image inputs (a photo and a mask) and a feature vector."""
    photo = keras.Input((8, 8, 3), name="photo")
    mask = keras.Input((8, 8, 2), name="mask")
    extra = keras.Input((4,), name="extra")
    x = L.Conv2D(4, 3, padding="same", name="photo_conv")(photo)
    x = L.BatchNormalization(name="photo_bn")(x)
    y = L.Conv2D(4, 1, name="mask_conv")(mask)
    z = L.Concatenate(name="join")([L.Flatten()(L.Add()([x, y])), extra])
    model = keras.Model([photo, mask, extra], L.Dense(3, name="head")(z), name="two")
    return randomize_batch_norms(model)


def _already_channels_first(convolution=True):
    """A model that reads its image channels_first: through a convolution, or
    (``convolution=False``) a pooling, which TensorFlow's CPU kernels also run where
    they take no channels_first convolution (without oneDNN: AMD, older Intel), so
    that loading the saved file on TensorFlow succeeds on every CPU."""
    inputs = keras.Input((3, 8, 8), name="image")
    x = inputs
    if convolution:
        x = L.Conv2D(4, 3, data_format="channels_first", name="conv")(x)
    return keras.Model(inputs, L.GlobalAveragePooling2D(data_format="channels_first")(x))


@pytest.fixture(scope="module")
def two_images():
    return _two_images()


def _arrays(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "photo": rng.standard_normal((batch, 8, 8, 3)).astype("float32"),
        "mask": rng.standard_normal((batch, 8, 8, 2)).astype("float32"),
        "extra": rng.standard_normal((batch, 4)).astype("float32"),
    }


def _input_shapes(path):
    return {
        value.name: [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]
        for value in onnx.load(str(path)).graph.input
    }


def test_one_input_channels_first_by_name(two_images, tmp_path):
    path = tmp_path / "m.onnx"
    result = export_onnx(two_images, path, fold=True, input_layout={"photo": "channels_first"})
    assert _input_shapes(path) == {
        "photo": ["batch", 3, 8, 8],
        "mask": ["batch", 8, 8, 2],
        "extra": ["batch", 4],
    }
    expected = {"extra": "channels_last", "mask": "channels_last", "photo": "channels_first"}
    assert decode_input_layout(result.input_layout) == expected
    arrays = _arrays()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = dict(arrays, photo=np.transpose(arrays["photo"], (0, 3, 1, 2)))
    keras_out = keras.ops.convert_to_numpy(
        two_images([arrays[n] for n in ("photo", "mask", "extra")])
    )
    np.testing.assert_allclose(session.run(None, feed)[0], keras_out, rtol=1e-4, atol=1e-4)
    # validation reads each input's layout from the file
    assert validate_onnx(two_images, path, inputs=arrays)


def test_all_inputs_form_moves_every_image_input(two_images, tmp_path):
    path = tmp_path / "m.onnx"
    result = export_onnx(two_images, path, fold=True, input_layout="channels_first")
    assert result.input_layout == "channels_first"
    shapes = _input_shapes(path)
    assert shapes["photo"] == ["batch", 3, 8, 8] and shapes["mask"] == ["batch", 2, 8, 8]
    assert validate_onnx(two_images, path, inputs=_arrays())


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"extra": "channels_first"}, r"input 'extra' of shape \(None, 4\).*rank >= 3"),
        ({"nope": "channels_first"}, r"names \['nope'\], which are not inputs"),
        ({"photo": "nchw"}, r"must be 'channels_last' or 'channels_first'"),
    ],
    ids=["rank-2", "unknown-name", "bad-layout"],
)
def test_layout_that_does_not_apply_is_refused(two_images, tmp_path, layout, message):
    with pytest.raises(UserInputError, match=message):
        export_onnx(two_images, tmp_path / "m.onnx", input_layout=layout)
    assert not (tmp_path / "m.onnx").exists()


def test_model_without_image_inputs_refuses_channels_first(tmp_path):
    inputs = keras.Input((5,), name="features")
    model = keras.Model(inputs, L.Dense(2)(inputs))
    with pytest.raises(UserInputError, match="moves the channel axis of inputs of rank >= 3"):
        export_onnx(model, tmp_path / "m.onnx", input_layout="channels_first")


def test_already_channels_first_input_is_refused(tmp_path):
    model = _already_channels_first()
    with pytest.raises(UserInputError, match=r"'image' of shape \(None, 3, 8, 8\) is already"):
        export_onnx(model, tmp_path / "m.onnx", input_layout="channels_first")
    with pytest.raises(UserInputError, match="already channels_first"):
        export_onnx(model, tmp_path / "m.onnx", input_layout={"image": "channels_first"})


# ------------------------------------------------------------------------------------
# The CLI.


def _main(args, capsys):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def saved(tmp_path_factory, two_images):
    directory = tmp_path_factory.mktemp("layouts")
    two_images.save(directory / "two.keras")
    _already_channels_first(convolution=False).save(directory / "nchw.keras")
    np.savez(directory / "inputs.npz", **_arrays(batch=3, seed=1))
    return directory


def test_cli_layout_per_input_exports_and_validates(saved, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code, stdout, err = _main(
        ["export", saved / "two.keras", "-o", out, "--input-layout", "mask=channels_first"]
        + ["--input-layout", "photo=channels_last", "--json"],
        capsys,
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["status"] == "ok" and report["validation"]["passed"], report
    shapes = _input_shapes(out)
    assert shapes["mask"] == ["batch", 2, 8, 8] and shapes["photo"] == ["batch", 8, 8, 3]
    # keras-bn validate reads the per-input layout the file records
    code, _, err = _main(
        ["validate", saved / "two.keras", out, "--inputs", saved / "inputs.npz"], capsys
    )
    assert code == 0, err


@pytest.mark.parametrize(
    "layout_args, fragment",
    [
        (["--input-layout", "extra=channels_first"], "rank >= 3"),
        (["--input-layout", "channels_first", "--input-layout", "photo=channels_last"], "not both"),
        (["--input-layout", "photo=nchw"], "did you mean --input-layout photo=channels_first"),
        (["--input-layout", "=channels_first"], "names no input"),
    ],
    ids=["rank-2", "mixed-forms", "alias", "no-name"],
)
def test_cli_refuses_layout_that_does_not_apply(saved, tmp_path, capsys, layout_args, fragment):
    code, _, err = _main(
        ["export", saved / "two.keras", "-o", tmp_path / "m.onnx", *layout_args], capsys
    )
    assert_rejected(code, err, fragment, tmp_path)


def test_cli_refuses_channels_first_on_a_channels_first_model(saved, tmp_path, capsys):
    code, _, err = _main(
        [
            "export",
            saved / "nchw.keras",
            "-o",
            tmp_path / "m.onnx",
            "--input-layout",
            "channels_first",
        ],
        capsys,
    )
    assert_rejected(code, err, "is already channels_first", tmp_path)

"""Tests for keras_bn.converters.user_files: the guarded door for the user's bytes.

Each hostile file is built by hand the way an attacker would (a zip bomb, a member
named ``../x``, an ``.npz`` header promising 10^12 values, a pickled object whose
unpickling would write a marker file, an ONNX tensor whose data lies in
``/etc/passwd``) and must be refused with one UserInputError naming the problem,
before anything is allocated, executed or read outside its place. The CLI-level
contract for the same files is fuzzed in test_cli_hostile.py.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import keras
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from support.files import make_zip, zip_members
from support.models import conv_bn_classifier

from keras_bn.converters.errors import UserInputError
from keras_bn.converters.limits import LIMITS
from keras_bn.converters.user_files import (
    check_keras_config,
    check_keras_file,
    load_onnx,
    read_npz,
    resolve_custom_objects,
)


@pytest.fixture(scope="module")
def keras_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("user_files") / "model.keras"
    conv_bn_classifier().save(path)
    return path.read_bytes()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _refused(call, *fragments: str) -> str:
    with pytest.raises(UserInputError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ------------------------------------------------------------------------------------
# Zip containers.


@pytest.mark.parametrize(
    "name", ["../evil.py", "/etc/cron.d/evil", "assets/../../x", "C:\\evil.dll", "..\\x"]
)
def test_members_leaving_the_archive_are_refused(tmp_path, keras_bytes, name):
    members = {**zip_members(keras_bytes), name: b"print('pwned')"}
    path = _write(tmp_path / "m.keras", make_zip(members))
    _refused(lambda: check_keras_file(path), repr(name), "leaves the archive")
    npz = _write(tmp_path / "x.npz", make_zip({"x.npy": _npy(np.zeros(3)), name: b"1"}))
    _refused(lambda: read_npz(npz), repr(name))


@pytest.mark.parametrize("name", ["x" * 300, "run.sh", "assets/" + "a" * 300])
def test_members_a_keras_file_never_holds_are_refused(tmp_path, keras_bytes, name):
    """Keras unpacks every member to disk when it loads a file with assets."""
    path = _write(tmp_path / "m.keras", make_zip({**zip_members(keras_bytes), name: b"1"}))
    _refused(lambda: check_keras_file(path), repr(name[:80]))


def test_duplicate_members_are_refused(tmp_path, keras_bytes):
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate it writes
        for name, content in zip_members(keras_bytes).items():
            archive.writestr(name, content)
        archive.writestr("config.json", b'{"class_name": "Sequential"}')  # warns: duplicate
    path = _write(tmp_path / "m.keras", buffer.getvalue())
    _refused(lambda: check_keras_file(path), "two members named 'config.json'")


def test_a_compression_bomb_is_refused_before_it_is_unpacked(tmp_path, keras_bytes, monkeypatch):
    """64 MiB of zeros deflate to 64 KiB: refused from the declared sizes, never read."""
    bomb = make_zip(
        {**zip_members(keras_bytes), "assets/zeros": bytes(64 << 20)}, zipfile.ZIP_DEFLATED
    )
    path = _write(tmp_path / "m.keras", bomb)
    info = zipfile.ZipFile(path).getinfo("assets/zeros")
    assert info.file_size > 200 * info.compress_size  # the premise
    calls = []
    monkeypatch.setattr(zipfile.ZipFile, "testzip", lambda self: calls.append(1))
    _refused(
        lambda: check_keras_file(path),
        "'assets/zeros'",
        f"{64 << 20:,}",
        "compression bomb",
        "KERAS_BN_MAX_COMPRESSION_RATIO",
    )
    assert calls == []  # nothing was unpacked
    monkeypatch.setenv("KERAS_BN_MAX_COMPRESSION_RATIO", "100000")
    check_keras_file(path)  # raised: the same archive passes this check


def test_declared_sizes_and_member_counts_are_bounded(tmp_path, keras_bytes, monkeypatch):
    path = _write(tmp_path / "m.keras", keras_bytes)
    unpacked = sum(len(v) for v in zip_members(keras_bytes).values())
    monkeypatch.setenv("KERAS_BN_MAX_ARCHIVE_BYTES", str(unpacked - 1))
    _refused(lambda: check_keras_file(path), f"unpacks into {unpacked:,} bytes")
    monkeypatch.setenv("KERAS_BN_MAX_ARCHIVE_BYTES", str(unpacked))
    monkeypatch.setenv("KERAS_BN_MAX_ARCHIVE_MEMBERS", "2")
    _refused(lambda: check_keras_file(path), "holds 3 members", "KERAS_BN_MAX_ARCHIVE_MEMBERS")
    monkeypatch.setenv("KERAS_BN_MAX_ARCHIVE_MEMBERS", "two")
    _refused(lambda: check_keras_file(path), "KERAS_BN_MAX_ARCHIVE_MEMBERS must be a positive")


# ------------------------------------------------------------------------------------
# .keras configs: sizes checked before Keras builds anything.


def _config(keras_bytes: bytes) -> dict:
    return json.loads(zip_members(keras_bytes)["config.json"])


def _layer(config: dict, class_name: str) -> dict:
    return next(x for x in config["config"]["layers"] if x["class_name"] == class_name)


@pytest.mark.parametrize(
    ("class_name", "key", "value", "fragment"),
    [
        ("Dense", "units", 10**10, "units=10000000000 in layer 'dense"),
        ("Conv2D", "filters", 2**63, "KERAS_BN_MAX_DIMENSION"),
        ("Conv2D", "kernel_size", [3, 10**9], "kernel_size=1000000000"),
        ("Dense", "units", float("inf"), "units=inf"),
        ("InputLayer", "batch_shape", [None, 8, 10**8, 3], "batch_shape=100000000"),
        ("Dense", "units", 200_000, "KERAS_BN_MAX_PARAMETERS"),  # 6 x 200k: fine; see below
    ],
    ids=["units", "filters", "kernel", "infinite", "input-dimension", "parameters"],
)
def test_absurd_sizes_are_refused_before_keras(keras_bytes, class_name, key, value, fragment):
    config = _config(keras_bytes)
    _layer(config, class_name)["config"][key] = value
    if key == "units" and value == 200_000:  # legal alone; a wide input makes it absurd
        _layer(config, "Dense")["build_config"]["input_shape"] = [None, 100_000]
    _refused(lambda: check_keras_config(config, "Model file 'm.keras'"), fragment)


def test_input_values_per_sample_are_bounded(keras_bytes, monkeypatch):
    config = _config(keras_bytes)
    _layer(config, "InputLayer")["config"]["batch_shape"] = [None, 10**5, 10**5, 3]
    _refused(
        lambda: check_keras_config(config, "Model file 'm.keras'"),
        "30,000,000,000 values per sample",
        "KERAS_BN_MAX_INPUT_ELEMENTS",
    )
    monkeypatch.setenv("KERAS_BN_MAX_INPUT_ELEMENTS", str(3 * 10**10))
    check_keras_config(config, "Model file 'm.keras'")


@pytest.mark.parametrize(
    "build",
    [
        lambda: keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35),
        lambda: keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3)),
        lambda: _attention_model(),
    ],
    ids=["MobileNetV2", "ConvNeXtTiny", "attention"],
)
def test_parameter_estimate_tracks_real_models(build):
    """Models we did not write: the estimate from the saved config is of the order of
    Keras's own count (an upper-ish bound: limits must not refuse real models)."""
    from keras_bn.converters.user_files import _parameter_estimate

    model = build()
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(model)))  # as saved
    estimate = sum(
        _parameter_estimate(layer["config"], layer.get("build_config"))
        for layer in config["config"]["layers"]
    )
    assert 0.9 * model.count_params() <= estimate <= 1.5 * model.count_params()
    check_keras_config(config, "Model file 'm.keras'")


def _attention_model() -> keras.Model:
    inputs = keras.Input((16, 32))
    x = keras.layers.MultiHeadAttention(num_heads=4, key_dim=8)(inputs, inputs)
    x = keras.layers.Dense(64)(x)
    return keras.Model(inputs, keras.layers.Embedding(1000, 8)(keras.ops.argmax(x, axis=-1)))


def test_lambda_bytecode_is_refused_in_safe_mode_and_never_runs(tmp_path, monkeypatch):
    """The bytecode would create a marker file; safe mode refuses the file unrun."""
    marker = tmp_path / "pwned"
    name = str(marker)
    inputs = keras.Input((3,))
    outputs = keras.layers.Lambda(lambda t: (open(name, "w").close(), t)[1], name="evil")(inputs)
    marker.unlink()  # written once while building the model here
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    _refused(lambda: check_keras_file(path), "Python bytecode in layer 'evil'", "--unsafe")
    from keras_bn.converters.model_io import load_model

    _refused(lambda: load_model(path), "--unsafe")
    assert not marker.exists()
    check_keras_file(path, unsafe=True)


@pytest.mark.parametrize(
    ("module", "name"),
    [("os", "system"), ("subprocess", "getoutput"), ("keras.utils", "get_file")],
)
def test_python_callables_named_in_a_config_are_never_resolved(tmp_path, keras_bytes, module, name):
    """An activation naming a Python function outside Keras's modelling API is refused
    (Keras's safe mode resolves none; the CLI has no option that would)."""
    from keras_bn.converters.model_io import load_model

    config = _config(keras_bytes)
    _layer(config, "Dense")["config"]["activation"] = {
        "module": module,
        "class_name": "function",
        "config": name,
        "registered_name": name,
    }
    members = {**zip_members(keras_bytes), "config.json": json.dumps(config).encode()}
    path = _write(tmp_path / "m.keras", make_zip(members))
    _refused(lambda: load_model(path), repr(str(path)), name)


# ------------------------------------------------------------------------------------
# .npz files: headers first, never a pickle.


def _npy(array: np.ndarray, header_shape: tuple | None = None) -> bytes:
    """``array`` as .npy bytes; ``header_shape`` forges the shape its header declares."""
    buffer = io.BytesIO()
    if header_shape is None:
        np.lib.format.write_array(buffer, array, allow_pickle=True)
    else:
        header = {"descr": array.dtype.str, "fortran_order": False, "shape": header_shape}
        np.lib.format.write_array_header_1_0(buffer, header)
        buffer.write(array.tobytes())
    return buffer.getvalue()


class _Marker:
    """Unpickling this writes a file: proof that nothing was unpickled."""

    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_arrays_are_refused_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    _Marker.path = str(marker)
    objects = np.array([_Marker()], dtype=object)
    assert pickle.loads(pickle.dumps(_Marker())) and marker.exists()  # the premise
    marker.unlink()
    npz = _write(tmp_path / "x.npz", make_zip({"image.npy": _npy(objects)}))
    _refused(lambda: read_npz(npz), "'image' holds Python objects", "never unpickles")
    assert not marker.exists()


def test_a_gigantic_header_is_refused_before_reading(tmp_path, monkeypatch):
    """A header promising 4 TB over 24 bytes of data: NumPy would allocate it first."""
    small = np.zeros((2, 3), np.float32)
    npz = _write(tmp_path / "x.npz", make_zip({"x.npy": _npy(small, header_shape=(10**6, 10**6))}))
    _refused(lambda: read_npz(npz), "(1000000, 1000000) (4,000,000,000,000 bytes)", "holds 152")
    np.savez(tmp_path / "y.npz", x=np.zeros((8, 8), np.float32))
    monkeypatch.setenv("KERAS_BN_MAX_ARRAY_BYTES", "255")
    _refused(lambda: read_npz(tmp_path / "y.npz"), "declares 256 bytes", "KERAS_BN_MAX_ARRAY_BYTES")
    monkeypatch.setenv("KERAS_BN_MAX_ARRAY_BYTES", "256")
    assert read_npz(tmp_path / "y.npz")["x"].shape == (8, 8)


def test_npz_roundtrip_and_broken_members(tmp_path):
    arrays = {"a": np.arange(6.0).reshape(2, 3), "b": np.array([1, 2], np.int8)}
    np.savez(tmp_path / "ok.npz", **arrays)
    loaded = read_npz(tmp_path / "ok.npz")
    assert sorted(loaded) == ["a", "b"]
    for key, array in arrays.items():
        np.testing.assert_array_equal(loaded[key], array)
    cases = {
        "not-npy": make_zip({"x.npy": b"hello"}),
        "truncated-data": make_zip({"x.npy": _npy(np.zeros((4, 4)))[:-8]}),
        "version-9": make_zip({"x.npy": b"\x93NUMPY\x09\x00" + b"\x00" * 20}),
        "not-a-zip": b"PK\x03\x04 nope",
    }
    for name, data in cases.items():
        path = _write(tmp_path / f"{name}.npz", data)
        _refused(lambda path=path: read_npz(path), repr(str(path)))


def test_float64_inputs_beyond_float32_are_refused(tmp_path):
    from keras_bn.converters.model_io import load_inputs

    np.savez(tmp_path / "x.npz", x=np.array([[1.0, 1e300]]))
    _refused(lambda: load_inputs(tmp_path / "x.npz", [("x", (None, 2))]), "beyond float32's range")


# ------------------------------------------------------------------------------------
# .onnx files.


def _matmul_model(weight: TensorProto, input_dims=(None, 4)) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _external(location: str, **extra: str) -> TensorProto:
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4, 3])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, **extra}.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    return weight


@pytest.mark.parametrize(
    "location", ["../../../../etc/passwd", "/etc/passwd", "sub/../../x.bin", "link.bin"]
)
def test_external_data_outside_the_model_directory_is_refused(tmp_path, location):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "sub").mkdir()
    (tmp_path / "x.bin").write_bytes(bytes(48))
    os.symlink(tmp_path / "x.bin", model_dir / "link.bin")  # a link out of the directory
    path = model_dir / "evil.onnx"
    onnx.save(_matmul_model(_external(location)), path)
    _refused(lambda: load_onnx(path), repr(location), "outside the model's directory")


def test_external_data_missing_or_short_is_refused(tmp_path):
    (tmp_path / "w.bin").write_bytes(bytes(48))
    path = tmp_path / "m.onnx"
    onnx.save(_matmul_model(_external("none.bin")), path)
    _refused(lambda: load_onnx(path), "'none.bin', which does not exist")
    onnx.save(_matmul_model(_external("w.bin", offset="16", length="48")), path)
    _refused(lambda: load_onnx(path), "bytes 16..64", "holds 48")
    onnx.save(_matmul_model(_external("w.bin", length="48")), path)
    load_onnx(path)  # inside the directory, long enough: accepted


@pytest.mark.parametrize("extra", [{}, {"length": "32"}, {"offset": "4", "length": "52"}])
def test_external_data_of_another_size_than_the_shape_is_refused(tmp_path, extra):
    """A tensor's external data is the whole range it names (to the file's end without a
    length): 4x3 float32 values need 48 bytes. onnxruntime reads only those from a file
    path, but refuses the same model in memory; keras-bn refuses it up front."""
    (tmp_path / "w.bin").write_bytes(bytes(64))
    path = tmp_path / "m.onnx"
    onnx.save(_matmul_model(_external("w.bin", **extra)), path)
    length = extra.get("length", "64")
    _refused(lambda: load_onnx(path), f"reads {length} bytes of 'w.bin'", "[4, 3] (FLOAT) needs 48")
    onnx.save(_matmul_model(_external("w.bin", offset="16")), path)
    load_onnx(path)  # the last 48 bytes: accepted


def test_declared_tensor_and_input_sizes_are_bounded(tmp_path):
    path = tmp_path / "m.onnx"
    huge = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[10**6, 10**6])
    onnx.save(_matmul_model(huge), path)
    _refused(lambda: load_onnx(path), f"declares {10**12:,} tensor values")
    weight = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], np.zeros(12).tolist())
    onnx.save(_matmul_model(weight, input_dims=(1, 10**5, 10**5, 4)), path)
    _refused(lambda: load_onnx(path), "values per sample", "KERAS_BN_MAX_INPUT_ELEMENTS")
    onnx.save(_matmul_model(weight, input_dims=(1, 10**9)), path)
    _refused(lambda: load_onnx(path), "KERAS_BN_MAX_DIMENSION")


def test_unparsable_and_oversized_onnx_files(tmp_path, monkeypatch):
    for name, data in {"garbage": b"\x08\xff\xff\xff not protobuf", "empty": b""}.items():
        path = _write(tmp_path / f"{name}.onnx", data)
        _refused(lambda path=path: load_onnx(path), repr(str(path)))
    weight = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], np.zeros(12).tolist())
    path = tmp_path / "m.onnx"
    onnx.save(_matmul_model(weight), path)
    monkeypatch.setenv("KERAS_BN_MAX_ONNX_BYTES", str(path.stat().st_size - 1))
    _refused(lambda: load_onnx(path), "KERAS_BN_MAX_ONNX_BYTES")


# ------------------------------------------------------------------------------------
# Custom-object specs and the limits table.


@pytest.mark.parametrize(
    ("source", "fragment"),
    [("raise RuntimeError('boom')\n", "RuntimeError: boom"), ("def (:\n", "SyntaxError")],
    ids=["raises", "syntax-error"],
)
def test_a_custom_module_failing_on_import_is_a_user_error(tmp_path, source, fragment):
    module = tmp_path / "layers_broken.py"
    module.write_text(source)
    _refused(lambda: resolve_custom_objects([f"{module}:Layer"]), "importing", fragment)
    _refused(lambda: resolve_custom_objects([f"{module}:Layer"]), fragment)  # not cached


def test_every_limit_is_documented_in_the_readme():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for variable, limit in LIMITS.items():
        assert f"`{variable}`" in readme, variable
        assert f"{limit.default:,}" in readme, (variable, limit.default)


def test_one_line_errors_carry_no_terminal_escape_codes():
    """Keras's errors quote their cause in bold (``\\x1b[1m``): stripped when reported."""
    from keras_bn.converters.errors import UserInputError, one_line
    from keras_bn.converters.user_files import guarded

    keras_style = "Exception encountered when calling Conv2D.call().\n\n\x1b[1mbad shape\x1b[0m"
    with pytest.raises(UserInputError) as caught:
        with guarded("Model file 'm.keras'", "loads, but Keras cannot run it", "fix it"):
            raise ValueError(keras_style)
    assert "\x1b" not in str(caught.value) and "bad shape" in str(caught.value)
    assert str(UserInputError("a \x1b[31;1mred\x1b[0m word")) == "a red word"
    assert one_line("\x1b]8;;http://x\x07link\x1b]8;;\x07\n  text") == "link text"

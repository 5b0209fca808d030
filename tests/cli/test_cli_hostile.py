"""Fuzz every command with mutated ``.keras``, ``.onnx`` and ``.npz`` files.

Real files (a model saved by Keras, its ONNX export by keras-bn, an ``.npz`` of
inputs) are mutated the ways a broken disk or an attacker would: truncation, byte
flips, zip members added, removed, renamed or inflated (``..`` and absolute names,
a compression bomb), JSON edits of config.json (type changes, deletions, nesting,
huge sizes, Lambda bytecode), protobuf edits of the ONNX file (tensor dims and
data, external data, ops, attributes, input shapes, opsets), forged ``.npz``
headers, dtypes and values (a pickle that would create a directory included).
For every command that reads the mutated file:

- exit 2 with exactly one line on stderr (``keras-bn CMD: error: ...``); or
- exit 1 only where a comparison ran and failed (the JSON report holds it); or
- exit 0 where the mutation was harmless, and the output is then correct, judged
  against the model Keras itself loads from the same mutated file;
- never exit 3 or a traceback; the inputs' bytes unchanged; nothing written but
  the output on success, in the work directory or in the temporary directory.

Cases run in-process through ``main([...])``; a few through the console script.
CI replays the same examples (tests/conftest.py's derandomized profile).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from support.console import assert_rejected, run_many
from support.files import make_zip, zip_members
from support.models import conv_bn_classifier

from keras_bn.converters import cli

# Every command, with the files it reads ({dir} is the case's work directory).
COMMANDS = {
    "inspect": ["inspect", "{dir}/model.keras"],
    "fold": ["fold", "{dir}/model.keras", "-o", "{dir}/out/f.keras", "--inputs", "{dir}/x.npz"],
    "export": ["export", "{dir}/model.keras", "-o", "{dir}/out/m.onnx", "--inputs", "{dir}/x.npz"],
    "validate": ["validate", "{dir}/model.keras", "{dir}/model.onnx", "--inputs", "{dir}/x.npz"],
    "bench": ["bench", "{dir}/model.onnx", "--runs", "1", "--warmup", "0",
              "--inputs", "{dir}/x.npz"],
    "int8": ["export", "{dir}/model.keras", "-o", "{dir}/out/q.onnx", "--precision", "int8",
             "--calibration", "{dir}/x.npz", "--no-validate"],
}  # fmt: skip
OUTPUTS = {"fold": "out/f.keras", "export": "out/m.onnx", "int8": "out/q.onnx"}
READERS = {
    "model.keras": ["inspect", "fold", "export", "validate"],
    "model.onnx": ["validate", "bench"],
    "x.npz": ["fold", "export", "validate", "bench", "int8"],
}


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


class Quiet(dict):
    """A dict that hypothesis prints in a few characters (failing cases stay readable)."""

    def __repr__(self) -> str:
        return f"<{', '.join(self)}>"


class Mutated(bytes):
    """A mutated file's bytes, printed as the mutation that made them."""

    how = ""

    def __repr__(self) -> str:
        return f"<{self.how}: {len(self)} bytes>"


def mutated(data: bytes, how: str) -> Mutated:
    result = Mutated(data)
    result.how = how
    return result


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """The good files' bytes, the Keras model and the inputs they hold."""
    directory = tmp_path_factory.mktemp("hostile_sources")
    model = conv_bn_classifier()
    model.save(directory / "model.keras")
    x = np.random.default_rng(3).normal(size=(4, 8, 8, 3)).astype("float32")
    np.savez(directory / "x.npz", image=x)
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["export", str(directory / "model.keras"), "-o", str(directory / "m.onnx")])
    assert code == 0
    files = {
        "model.keras": (directory / "model.keras").read_bytes(),
        "model.onnx": (directory / "m.onnx").read_bytes(),
        "x.npz": (directory / "x.npz").read_bytes(),
    }
    return Quiet(files=files, model=model, x=x)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """Where cases run, and a private temporary directory that must stay empty."""
    root = tmp_path_factory.mktemp("hostile_cases")
    private_tmp = root / "tmp"
    private_tmp.mkdir()
    saved = tempfile.tempdir
    tempfile.tempdir = str(private_tmp)  # Keras's and our temporary files land here
    try:
        yield Quiet(root=root, tmp=private_tmp)
    finally:
        tempfile.tempdir = saved


LAST_STDERR: dict[str, str] = {}  # per command, for assertion messages


def run_case(sandbox, sources: dict, replaced: dict[str, bytes], command: str) -> int:
    """Run ``command`` on the good files with ``replaced`` ones swapped in; check the
    contract (exit status, stderr, report, leftovers, untouched inputs, output)."""
    root, private_tmp = sandbox["root"], sandbox["tmp"]
    work = Path(tempfile.mkdtemp(dir=root, prefix=f"{command}-"))
    files = {**sources["files"], **replaced}
    for name, data in files.items():
        (work / name).write_bytes(data)
    (work / "out").mkdir()
    argv = [arg.format(dir=work) for arg in COMMANDS[command]] + ["--json"]
    stdout, stderr = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(work)  # a relative write would land here and be seen
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(argv)
    finally:
        os.chdir(cwd)
    out, err = stdout.getvalue(), stderr.getvalue()
    LAST_STDERR[command] = err
    if currently_in_test_context():  # --hypothesis-show-statistics shows the spread
        event(f"{command}: exit {code}")
    assert "Traceback" not in err and code in (0, 1, 2), f"exit {code}\n{err[-3000:]}"
    for name, data in files.items():
        assert (work / name).read_bytes() == data, f"{name} modified"
    lines = [line for line in err.splitlines() if line.strip()]
    shown = argv[0]  # the subcommand ("export" for the int8 case)
    problems = [line for line in lines if not line.startswith(f"keras-bn {shown}: warning: ")]
    report = json.loads(out)
    left = sorted(p.relative_to(work).as_posix() for p in work.rglob("*"))
    inputs = sorted([*files, "out"])
    left_tmp = [str(p.relative_to(private_tmp)) for p in private_tmp.rglob("*")]
    assert left_tmp == [], f"temporary files left behind: {left_tmp}"
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith(f"keras-bn {shown}: error: "), err
        assert report["status"] == "error"
        assert left == inputs, "files left behind"
    elif code == 1:  # only a comparison that ran and failed
        assert len(problems) == 1 and "validation failed" in problems[0], err
        assert report["status"] == "validation_failed" and report["validation"]
        assert left == inputs, "files left behind"
    else:
        assert problems == [], err
        produced = [OUTPUTS[command]] if command in OUTPUTS else []
        assert left == sorted([*inputs, *produced]), left
        check_output(command, work, report, sources)
    return code


def _reference(work: Path) -> keras.Model:
    """The model Keras itself loads from the (possibly mutated) file: what a correct
    output must agree with.

    keras-bn never calls a layer's initializers when it loads weights (they would be
    overwritten), so it loads a file whose initializer configs Keras rejects when it
    calls them (a seed that is a dict: draw_seed's ValueError). Then the reference is
    Keras's load of the same file with the initializer entries left out: they set no
    loaded weight, so the function is the same, and any other edit still counts."""
    return _keras_load(work / "model.keras")


def _keras_load(path: Path) -> keras.Model:
    """Keras's load of ``path``; else of ``path`` without its initializer entries (a
    folded file keeps the model's configs, so it needs the same)."""
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception:
        members = zip_members(path)
        config = _without_initializers(json.loads(members["config.json"]))
        stripped = path.parent.parent / f"{path.stem}_without_initializers.keras"
        stripped.write_bytes(make_zip({**members, "config.json": json.dumps(config).encode()}))
        try:
            return keras.saving.load_model(stripped, compile=False)
        finally:
            stripped.unlink()


def _without_initializers(config):
    """``config`` (a Keras config tree) without its ``*_initializer`` entries."""
    if isinstance(config, dict):
        return {
            key: _without_initializers(value)
            for key, value in config.items()
            if not key.endswith("_initializer")
        }
    if isinstance(config, list):
        return [_without_initializers(value) for value in config]
    return config


def _onnx_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime on ``x``; a fixed batch size gets batches of it, the samples cycled."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (spec,) = session.get_inputs()
    step = spec.shape[0] if isinstance(spec.shape[0], int) and spec.shape[0] > 0 else len(x)
    rows = x[np.arange(-(-len(x) // step) * step) % len(x)]
    parts = [
        session.run(None, {spec.name: rows[i : i + step]})[0] for i in range(0, len(rows), step)
    ]
    return np.concatenate(parts)[: len(x)]


def check_output(command: str, work: Path, report: dict, sources: dict) -> None:
    """A successful run on a mutated file must still be right."""
    x = sources["x"]
    if command == "bench":
        assert all(row["median_ms"] > 0 for row in report["bench"]["results"])
        return
    if command == "int8":  # unvalidated on request: calibration data decides its accuracy
        assert _onnx_outputs(work / OUTPUTS["int8"], x).shape == (len(x), 3)
        return
    reference = _reference(work)
    if command == "inspect":  # nothing ran: the file only had to load
        assert report["parameters"] == reference.count_params()
        return
    expected = np.asarray(keras.ops.convert_to_numpy(reference(x, training=False)))
    if command == "fold":
        folded = _keras_load(work / OUTPUTS["fold"])
        received = np.asarray(keras.ops.convert_to_numpy(folded(x, training=False)))
    elif command == "export":
        received = _onnx_outputs(work / OUTPUTS["export"], x)
    else:  # validate passed: the ONNX file computes what the Keras file does
        received = _onnx_outputs(work / "model.onnx", x)
    np.testing.assert_allclose(received, expected, rtol=1e-2, atol=1e-3)


# ------------------------------------------------------------------------------------
# Mutations of any file's bytes.


def _shown(value) -> str:
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if isinstance(value, np.ndarray):
        return f"<array {value.dtype}{value.shape}>"
    return repr(value)[:80]


def labelled(function: Callable) -> Callable:
    """``st.composite`` whose result prints as the choices that made it."""

    @st.composite
    @functools.wraps(function)
    def strategy(draw, *args):
        drawn: list[str] = []

        def recording(inner):
            value = draw(inner)
            drawn.append(_shown(value))
            return value

        return mutated(function(recording, *args), f"{function.__name__}({', '.join(drawn)})")

    return strategy


@labelled
def byte_mutations(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "insert"]))
    position = draw(st.integers(0, len(data) - 1))
    if kind == "truncate":
        return data[:position]
    if kind == "insert":
        return data[:position] + draw(st.binary(min_size=1, max_size=16)) + data[position:]
    flipped = bytearray(data)
    for offset in range(draw(st.integers(1, 4))):
        flipped[(position + offset) % len(data)] ^= draw(st.integers(1, 255))
    return bytes(flipped)


MEMBER_NAMES = [
    "../evil.py",
    "/etc/evil",
    "assets/../../evil",
    "assets/notes.txt",
    "config.json",
    "model.weights.h5",
    "metadata.json",
    "image.npy",
    "x" * 300,
]


@labelled
def zip_mutations(draw, data: bytes) -> bytes:
    """Members added (bombs, escaping names, duplicates), removed, renamed or corrupted
    inside (HDF5 weights, .npy headers and data parsed with a valid CRC)."""
    members = zip_members(data)
    names = list(members)
    kinds = ["add", "remove", "rename", "deflate", "bomb", "duplicate", "inside", "inside"]
    kind = draw(st.sampled_from(kinds))
    if kind == "inside":  # a member's bytes flipped, its CRC recomputed: the parser sees it
        name = draw(st.sampled_from(names))
        content = bytearray(members[name])
        for _ in range(draw(st.integers(1, 8))):
            if content:
                content[draw(st.integers(0, len(content) - 1))] ^= draw(st.integers(1, 255))
        members[name] = bytes(content)
    elif kind == "add":
        members[draw(st.sampled_from(MEMBER_NAMES))] = draw(st.binary(max_size=64))
    elif kind == "remove":
        members.pop(draw(st.sampled_from(names)))
    elif kind == "rename":
        old = draw(st.sampled_from(names))
        members[draw(st.sampled_from(MEMBER_NAMES))] = members.pop(old)
    elif kind == "bomb":
        members["assets/zeros"] = bytes(4 << 20)  # 4 MiB deflating to a few KiB
        return make_zip(members, zipfile.ZIP_DEFLATED)
    elif kind == "duplicate":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, content in members.items():
                archive.writestr(name, content)
            with pytest.warns(UserWarning, match="Duplicate name"):
                archive.writestr(draw(st.sampled_from(names)), draw(st.binary(max_size=64)))
        return buffer.getvalue()
    return make_zip(members, zipfile.ZIP_DEFLATED if kind == "deflate" else zipfile.ZIP_STORED)


# ------------------------------------------------------------------------------------
# Mutations of config.json.

HUGE = [2**24 + 1, 10**9, 10**12, 2**63, 10**30, -(2**31), float("inf"), 1e308]
SIZE_KEYS = ["units", "filters", "kernel_size", "batch_shape", "axis", "strides", "pool_size"]
LAMBDA = {
    "module": "builtins",
    "class_name": "__lambda__",
    "config": {"code": "4wEAAAAAAAAAAAAAAAEAAAADAAAAQwAAAHMEAAAAfABTACkBTqkAKQHaAXhyAQAAAHIBAAAA"},
}


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    keys = st.sampled_from(["class_name", "config", "name", "units"])
    return st.one_of(st.lists(children, max_size=3), st.dictionaries(keys, children))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.sampled_from([0, 1, -1, 3, 7, *HUGE])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.just("relu")
    | st.just(LAMBDA),
    _containers,
    max_leaves=6,
)


def _positions(node, path=()) -> list[tuple]:
    """The path (keys and indices) of every value in a parsed JSON document."""
    found = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _positions(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _positions(value, (*path, index))
    return found


def _parent(document, path: tuple):
    for key in path[:-1]:
        document = document[key]
    return document


@labelled
def config_mutations(draw, data: bytes) -> bytes:
    members = zip_members(data)
    config = json.loads(members["config.json"])
    kind = draw(st.sampled_from(["replace", "delete", "wrap", "size", "nest", "rename"]))
    if kind == "nest":  # the whole config inside many levels of lists
        text = "[" * draw(st.integers(150, 400)) + members["config.json"].decode()
        members["config.json"] = (text + "]" * text.count("[", 0, text.index("{"))).encode()
        return make_zip(members)
    if kind == "size":  # a size key of one layer set to something absurd
        layer = draw(st.sampled_from(config["config"]["layers"]))
        key = draw(st.sampled_from(SIZE_KEYS))
        value = draw(st.sampled_from(HUGE))
        layer["config"][key] = draw(st.sampled_from([value, [value, value], [None, value, 3]]))
    else:
        path = draw(st.sampled_from(_positions(config)[1:]))
        parent = _parent(config, path)
        if kind == "replace":
            parent[path[-1]] = draw(json_values)
        elif kind == "delete":
            del parent[path[-1]]
        elif kind == "wrap":
            parent[path[-1]] = draw(st.sampled_from([[parent[path[-1]]], {"x": parent[path[-1]]}]))
        elif isinstance(parent, dict):  # rename a key
            parent[draw(st.text(min_size=1, max_size=6))] = parent.pop(path[-1])
    members["config.json"] = json.dumps(config).encode()
    return make_zip(members)


# ------------------------------------------------------------------------------------
# Mutations of the ONNX file.


@labelled
def onnx_mutations(draw, data: bytes) -> bytes:
    model = onnx.load_from_string(data)
    graph = model.graph
    kinds = ["dims", "raw", "external", "op", "drop-node", "input-dim", "opset", "ir"]
    kinds += ["metadata", "output", "attribute"]
    kind = draw(st.sampled_from(kinds))
    initializer = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
    node = graph.node[draw(st.integers(0, len(graph.node) - 1))]
    size = st.sampled_from([0, 1, 2, 3, 7, -1, 10**6, 2**40])
    if kind == "dims":
        initializer.ClearField("dims")
        initializer.dims.extend(draw(st.lists(size, max_size=4)))
    elif kind == "raw":
        raw = initializer.raw_data
        initializer.raw_data = raw[: draw(st.integers(0, len(raw)))] + draw(st.binary(max_size=8))
    elif kind == "external":
        location = draw(st.sampled_from(["../../../../etc/passwd", "/etc/passwd", "x.npz", "no"]))
        initializer.ClearField("raw_data")
        initializer.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", draw(st.sampled_from(["0", "64"])))):
            entry = initializer.external_data.add()
            entry.key, entry.value = key, value
    elif kind == "op":
        node.op_type = draw(st.sampled_from(["NoSuchOp", "Relu", "Conv", "Loop", ""]))
    elif kind == "drop-node":
        graph.node.remove(node)
    elif kind == "input-dim":
        dims = graph.input[0].type.tensor_type.shape.dim
        dims[draw(st.integers(0, len(dims) - 1))].dim_value = draw(size.filter(lambda v: v >= 0))
    elif kind == "opset":
        model.opset_import[0].version = draw(st.sampled_from([1, 7, 99, 10**6]))
    elif kind == "ir":
        model.ir_version = draw(st.sampled_from([0, 1, 99]))
    elif kind == "metadata":
        entry = model.metadata_props.add()
        entry.key = "keras_bn.input_layout"
        entry.value = draw(st.sampled_from(["channels_first", "channels_last", "nchw", ""]))
    elif kind == "output":
        graph.output[0].name = draw(st.sampled_from(["nowhere", graph.input[0].name, ""]))
    elif node.attribute:  # an attribute's numbers
        attribute = node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
        if attribute.ints:
            attribute.ints[0] = draw(size)
        else:
            attribute.f = draw(st.floats(allow_nan=True))
            attribute.i = draw(size)
    return model.SerializeToString()


# ------------------------------------------------------------------------------------
# Mutations of the .npz inputs.


class _Mkdir:
    """Unpickling this creates a directory: the proof would be left in the work dir."""

    def __reduce__(self):
        return (os.mkdir, ("pwned-by-pickle",))


def _npy(array: np.ndarray, shape: tuple | None = None, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    if shape is None:
        np.lib.format.write_array(buffer, array, allow_pickle=allow_pickle)
    else:  # a header that lies about the shape
        header = {"descr": array.dtype.str, "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(buffer, header)
        buffer.write(array.tobytes())
    return buffer.getvalue()


DTYPES = ["float64", "float16", "int64", "int8", "uint8", "bool", "complex64", "U3", "S2"]
DTYPES += ["datetime64[s]", "timedelta64[ms]"]


@labelled
def npz_mutations(draw, x: np.ndarray) -> bytes:
    kind = draw(st.sampled_from(["pickle", "header", "dtype", "values", "keys", "shape"]))
    members = {"image.npy": _npy(x)}
    if kind == "pickle":
        members["image.npy"] = _npy(np.array([_Mkdir()], dtype=object), allow_pickle=True)
    elif kind == "header":
        shapes = [(10**6, 10**6, 8, 3), (4, 8, 8, 3, 1), (0, 8, 8, 3), (8, 8, 8, 3), (2**62, 1)]
        members["image.npy"] = _npy(x, shape=draw(st.sampled_from(shapes)))
    elif kind == "dtype":
        members["image.npy"] = _npy(x.astype(draw(st.sampled_from(DTYPES))))
    elif kind == "values":
        changed = x.copy()
        if draw(st.booleans()):
            changed = changed.astype(np.float64)  # 1e300 fits float64, not the model's float32
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -0.0, 3e38, 1e300]))
        with np.errstate(over="ignore"):  # 1e300 into float32: inf, on purpose
            changed.flat[draw(st.integers(0, x.size - 1))] = value
        members["image.npy"] = _npy(changed)
    elif kind == "keys":
        extra = draw(st.sampled_from(["other", "image", "../x", "arr_0"]))
        if draw(st.booleans()):
            members = {f"{extra}.npy": members.pop("image.npy")}
        else:
            members[f"{extra}.npy"] = _npy(x[:1])
    else:
        shapes = [x[:0], x[..., 0], x.reshape(4, 64, 3), x.transpose(0, 3, 1, 2), x[:, :4]]
        members["image.npy"] = _npy(np.ascontiguousarray(draw(st.sampled_from(shapes))))
    return make_zip(members)


# ------------------------------------------------------------------------------------
# The properties.


def _case(sources, file: str, strategy: Callable) -> st.SearchStrategy:
    return st.tuples(st.sampled_from(READERS[file]), strategy(sources["files"][file]))


@fuzz_settings(60)
@given(data=st.data())
def test_keras_file_bytes_and_members(sandbox, sources, data):
    mutate = data.draw(st.sampled_from([byte_mutations, zip_mutations]))
    command, mutated = data.draw(_case(sources, "model.keras", mutate))
    run_case(sandbox, sources, {"model.keras": mutated}, command)


@fuzz_settings(100)
@given(data=st.data())
def test_keras_config_edits(sandbox, sources, data):
    command, mutated = data.draw(_case(sources, "model.keras", config_mutations))
    run_case(sandbox, sources, {"model.keras": mutated}, command)


@fuzz_settings(70)
@given(data=st.data())
def test_onnx_file_edits(sandbox, sources, data):
    mutate = data.draw(st.sampled_from([onnx_mutations, onnx_mutations, byte_mutations]))
    command, mutated = data.draw(_case(sources, "model.onnx", mutate))
    run_case(sandbox, sources, {"model.onnx": mutated}, command)


@fuzz_settings(70)
@given(data=st.data())
def test_npz_file_edits(sandbox, sources, data):
    mutate = data.draw(st.sampled_from(["bytes", "zip", "arrays", "arrays"]))
    strategy = {
        "bytes": byte_mutations(sources["files"]["x.npz"]),
        "zip": zip_mutations(sources["files"]["x.npz"]),
        "arrays": npz_mutations(sources["x"]),
    }[mutate]
    command = data.draw(st.sampled_from(READERS["x.npz"]))
    run_case(sandbox, sources, {"x.npz": data.draw(strategy)}, command)


def test_a_model_keras_loads_but_cannot_run_is_the_files_problem(sandbox, sources):
    """Softmax over axis 5 of a rank-2 tensor: Keras builds it, then fails calling it.
    Commands that run the model say so in one line (exit 2, not an internal error);
    inspect, which runs nothing, describes it."""
    members = zip_members(sources["files"]["model.keras"])
    config = json.loads(members["config.json"])
    dense = next(x for x in config["config"]["layers"] if x["class_name"] == "Dense")
    dense["config"]["activation"] = "linear"
    softmax = {
        "module": "keras.layers",
        "class_name": "Softmax",
        "config": {"name": "softmax", "axis": 5, "trainable": True, "dtype": "float32"},
        "registered_name": None,
        "build_config": {"input_shape": [None, 3]},
        "name": "softmax",
        "inbound_nodes": [{"args": [{"class_name": "__keras_tensor__", "config": {
            "shape": [None, 3], "dtype": "float32", "keras_history": [dense["name"], 0, 0]}}],
            "kwargs": {}}],
    }  # fmt: skip
    config["config"]["layers"].append(softmax)
    config["config"]["output_layers"] = [["softmax", 0, 0]]
    broken = make_zip({**members, "config.json": json.dumps(config).encode()})
    codes = {
        command: run_case(sandbox, sources, {"model.keras": broken}, command)
        for command in ("inspect", "fold", "export", "validate")
    }
    assert codes == {"inspect": 0, "fold": 2, "export": 2, "validate": 2}, LAST_STDERR
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        path = sandbox["root"] / "softmax5.keras"
        path.write_bytes(broken)
        code = cli.main(["fold", str(path), "-o", str(sandbox["root"] / "f.keras")])
    assert_rejected(code, stderr.getvalue(), "loads, but Keras cannot run it")


def test_an_initializer_keras_would_reject_changes_no_loaded_weight(sandbox, sources):
    """A kernel initializer whose seed is a dict (a fuzz draw): Keras's loader raises when
    it calls it; keras-bn never calls initializers (the file's weights overwrite them),
    so every command works and agrees with Keras's load of the file without them."""
    members = zip_members(sources["files"]["model.keras"])
    config = json.loads(members["config.json"])
    layer = next(x for x in config["config"]["layers"] if "kernel_initializer" in x["config"])
    layer["config"]["kernel_initializer"]["config"]["seed"] = {"x": None}
    edited = make_zip({**members, "config.json": json.dumps(config).encode()})
    path = sandbox["root"] / "seeded.keras"
    path.write_bytes(edited)
    with pytest.raises(ValueError, match="seed"):
        keras.saving.load_model(path, compile=False)
    codes = {
        command: run_case(sandbox, sources, {"model.keras": edited}, command)
        for command in ("inspect", "fold", "export", "validate")
    }
    assert codes == {"inspect": 0, "fold": 0, "export": 0, "validate": 0}, LAST_STDERR


def test_a_few_through_the_console_script(sources, tmp_path):
    """The same contract where a user meets it: the installed script, a fresh process."""
    members = zip_members(sources["files"]["model.keras"])
    cases = {
        "escaping-member": (
            "model.keras",
            make_zip({**members, "../evil.py": b"import os"}),
            ["export", "{dir}/model.keras", "-o", "{dir}/out/m.onnx"],
            "leaves the archive",
        ),
        "pickled-inputs": (
            "x.npz",
            make_zip({"image.npy": _npy(np.array([_Mkdir()], dtype=object), allow_pickle=True)}),
            ["bench", "{dir}/model.onnx", "--runs", "1", "--inputs", "{dir}/x.npz"],
            "never unpickles",
        ),
    }
    jobs = {}
    for name, (file, content, template, _) in cases.items():
        work = tmp_path / name
        (work / "out").mkdir(parents=True)
        for source, data in {**sources["files"], file: content}.items():
            (work / source).write_bytes(data)
        jobs[name] = ([arg.format(dir=work) for arg in template], work)
    for name, result in run_many(jobs).items():
        file, content, _, fragment = cases[name]
        work = tmp_path / name
        assert_rejected(result.returncode, result.stderr, fragment, work / "out")
        assert (work / file).read_bytes() == content
        assert sorted(p.name for p in work.iterdir()) == sorted([*sources["files"], "out"])

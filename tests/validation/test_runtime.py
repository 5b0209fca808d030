"""converters/runtime.py, everything keras-bn asks of onnxruntime, on hand-built models.

The models are written with onnx.helper (no exporter involved) and compute a NumPy
formula, so every run is checked against NumPy; input specs against the declared
graph inputs, matching and batching against the arrays given.
"""

import numpy as np
import pytest
from onnx import TensorProto, helper

from keras_bn.converters.errors import UserInputError
from keras_bn.converters.runtime import (
    InputSpec,
    batches,
    fixed_batch_size,
    input_specs,
    match_inputs,
    onnx_input_specs,
    open_session,
    run,
)


def _model_bytes(batch="N") -> bytes:
    """y = 2 * image + 1 (image: batch x 2 x 3 x 4, NCHW) and z = sum(counts, axis=1)
    (counts: int64 batch x 5, summed in float64)."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["image", "two"], ["scaled"]),
            helper.make_node("Add", ["scaled", "one"], ["y"]),
            helper.make_node("Cast", ["counts"], ["counts64"], to=TensorProto.DOUBLE),
            helper.make_node("ReduceSum", ["counts64", "axes"], ["z"], keepdims=0),
        ],
        "runtime_test",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 2, 3, 4]),
            helper.make_tensor_value_info("counts", TensorProto.INT64, [batch, 5]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2, 3, 4]),
            helper.make_tensor_value_info("z", TensorProto.DOUBLE, [batch]),
        ],
        [
            helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
            helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
            helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _inputs(batch, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(batch, 2, 3, 4)).astype("float32"),
        "counts": rng.integers(-100, 100, size=(batch, 5)),
    }


def _expected(inputs):
    return [
        2.0 * inputs["image"].astype(np.float64) + 1.0,
        inputs["counts"].sum(axis=1).astype(np.float64),
    ]


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory):
    path = tmp_path_factory.mktemp("runtime") / "dynamic.onnx"
    path.write_bytes(_model_bytes())
    return path


def test_sessions_open_from_a_path_or_bytes_and_list_their_inputs(dynamic):
    expected = [
        InputSpec("image", (None, 2, 3, 4), "float32"),
        InputSpec("counts", (None, 5), "int64"),
    ]
    assert input_specs(open_session(dynamic)) == expected
    assert input_specs(open_session(dynamic.read_bytes(), optimization="ORT_DISABLE_ALL")) == (
        expected
    )
    assert onnx_input_specs(dynamic) == expected
    assert input_specs(open_session(_model_bytes(batch=4), threads=1))[0].shape == (4, 2, 3, 4)


def test_a_session_without_spinning_sleeps_between_operations_and_computes_the_same(dynamic):
    def allow_spinning(session):
        try:
            return session.get_session_options().get_session_config_entry(
                "session.intra_op.allow_spinning"
            )
        except Exception:  # not set: onnxruntime's default, spinning
            return None

    quiet = open_session(dynamic, spinning=False)
    assert allow_spinning(quiet) == "0"
    assert allow_spinning(open_session(dynamic)) in (None, "1")
    inputs = _inputs(3)
    for got, expected in zip(run(quiet, inputs), _expected(inputs), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-7)


def test_sessions_leave_stdout_alone_and_never_fall_back(dynamic, monkeypatch):
    """onnxruntime's provider fallback prints "EP Error ... retrying" to stdout (a --json
    report must stay pure JSON): it is off. And sys.stdout is never swapped to hide
    it: sessions open in several threads at once, and two overlapping swaps leave it
    swapped for good (the CLI's report then goes nowhere)."""
    import concurrent.futures
    import sys

    import onnxruntime as ort

    seen = []
    original = ort.InferenceSession.__init__

    def recording(self, *args, **kwargs):
        seen.append((sys.stdout, kwargs.get("enable_fallback")))
        original(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "__init__", recording)
    stdout = sys.stdout
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        sessions = list(pool.map(lambda _: open_session(dynamic), range(8)))
    assert len(sessions) == 8 and sys.stdout is stdout
    assert len(seen) == 8 and all(out is stdout and fallback == 0 for out, fallback in seen)


def test_an_unreadable_model_file_is_one_user_error(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a protobuf at all")
    with pytest.raises(UserInputError, match="is not a readable ONNX file") as raised:
        open_session(path)
    assert "\n" not in str(raised.value)


def test_unreadable_models_keras_bn_made_are_internal_errors(tmp_path):
    """Bytes are always a copy keras-bn serialized, and a file under the directory
    where a command writes its own files is keras-bn's: onnxruntime refusing either
    is a bug in keras-bn (the CLI shows a traceback), not an error in the user's input.
    A user's file elsewhere stays a user error inside the same block."""
    from keras_bn.converters.runtime import files_we_wrote

    ours, theirs = tmp_path / "work", tmp_path / "input"
    for folder in (ours, theirs):
        folder.mkdir()
        (folder / "m.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(RuntimeError, match="keras-bn serialized") as raised:
        open_session((ours / "m.onnx").read_bytes())
    assert not isinstance(raised.value, UserInputError)
    with pytest.raises(RuntimeError, match="keras-bn wrote an ONNX file") as raised:
        with files_we_wrote(ours):
            open_session(ours / "m.onnx")
    assert not isinstance(raised.value, UserInputError)
    with pytest.raises(UserInputError, match="is not a readable ONNX file"):
        with files_we_wrote(ours):
            open_session(theirs / "m.onnx")


@pytest.mark.parametrize("batch", [1, 3, 130])
def test_run_matches_numpy_in_float64_across_batches(dynamic, batch):
    inputs = _inputs(batch)
    outputs = run(open_session(dynamic), inputs, batch_size=64)  # 130: three batches
    for got, expected in zip(outputs, _expected(inputs), strict=True):
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, expected, rtol=1e-7)  # float32 2x + 1


def test_run_splits_data_into_the_models_fixed_batch():
    session = open_session(_model_bytes(batch=4))
    inputs = _inputs(12, seed=1)
    for got, expected in zip(run(session, inputs), _expected(inputs), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-7)
    with pytest.raises(UserInputError, match="fixed batch size of 4 but the data has 10"):
        run(session, _inputs(10))


def test_fixed_batch_size_is_the_one_size_every_input_shares():
    assert fixed_batch_size([InputSpec("a", (None, 3), "float32")]) is None
    assert fixed_batch_size([InputSpec("a", (4, 3), "float32"), InputSpec("b", (4,), "int64")]) == 4
    assert fixed_batch_size([InputSpec("scalar", (), "float32")]) is None
    for specs in (
        [InputSpec("a", (4, 3), "float32"), InputSpec("b", (2, 3), "float32")],
        [InputSpec("a", (4, 3), "float32"), InputSpec("b", (None, 3), "float32")],
    ):
        with pytest.raises(UserInputError, match="expected one batch size shared by every"):
            fixed_batch_size(specs)


SPECS = [InputSpec("image", (None, 2, 3, 4), "float32"), InputSpec("counts", (None, 5), "int64")]


def test_match_inputs_keys_by_name_or_position_and_casts():
    inputs = {"counts": np.ones((2, 5), np.float32), "image": np.ones((2, 2, 3, 4), np.float64)}
    matched = match_inputs(SPECS, inputs, "data")
    assert list(matched) == ["image", "counts"]
    assert matched["image"].dtype == np.float32 and matched["counts"].dtype == np.int64
    assert all(array.flags.c_contiguous for array in matched.values())
    # Another exporter's names: matched by position (count and ranks agree).
    renamed = match_inputs(SPECS, {"input_1": inputs["image"], "input_2": inputs["counts"]}, "x")
    np.testing.assert_array_equal(renamed["counts"], inputs["counts"])


def test_match_inputs_transposes_channels_first_keras_arrays():
    keras_order = np.random.default_rng(2).normal(size=(2, 3, 4, 2)).astype("float32")  # NHWC
    counts = np.zeros((2, 5), np.int64)
    matched = match_inputs(
        SPECS, {"image": keras_order, "counts": counts}, "data", input_layout="channels_first"
    )
    np.testing.assert_array_equal(matched["image"], np.transpose(keras_order, (0, 3, 1, 2)))
    np.testing.assert_array_equal(matched["counts"], counts)  # rank 2: left as it is


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"image": np.ones((2, 2, 3, 4))}, "has arrays \\['image'\\]; expected the ONNX model"),
        (
            {"image": np.ones((2, 2, 3, 5)), "counts": np.ones((2, 5))},
            "array 'image' has shape \\(2, 2, 3, 5\\); the ONNX model expects \\(N, 2, 3, 4\\)",
        ),
        ({"image": np.ones((0, 2, 3, 4)), "counts": np.ones((0, 5))}, "'image' is empty"),
        (
            {"image": np.ones((2, 2, 3, 4)), "counts": np.ones((3, 5))},
            "arrays have different batch sizes \\[2, 3\\]",
        ),
    ],
    ids=["missing", "shape", "empty", "batch-sizes"],
)
def test_match_inputs_refuses_arrays_the_model_cannot_take(inputs, message):
    with pytest.raises(UserInputError, match=f"^data.*{message}"):
        match_inputs(SPECS, inputs, "data")


def test_match_inputs_can_leave_shapes_to_onnxruntime():
    inputs = {"image": np.ones((2, 2, 3, 5)), "counts": np.ones((2, 5))}
    assert match_inputs(SPECS, inputs, "data", check_shapes=False)["image"].shape == (2, 2, 3, 5)


def test_batches_cover_every_sample_once_in_order():
    inputs = {"a": np.arange(10), "b": np.arange(10) * 2}
    split = list(batches(inputs, None, 4))
    assert [len(batch["a"]) for batch in split] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([batch["b"] for batch in split]), inputs["b"])
    assert [len(batch["a"]) for batch in batches(inputs, 5, 4)] == [5, 5]  # fixed size wins
    with pytest.raises(UserInputError, match="give a multiple of 3"):
        list(batches(inputs, 3, 4))


def test_first_samples_in_chunks_or_whole_batches():
    from keras_bn.converters.runtime import first_samples

    feeds = [{"x": np.arange(6) + 10 * b} for b in range(3)]  # 3 batches of 6 samples
    chunked = first_samples(feeds, 9, 4)
    assert [feed["x"].tolist() for feed in chunked] == [[0, 1, 2, 3], [4, 5], [10, 11, 12]]
    whole = first_samples(feeds, 9, None)  # a fixed batch size: no batch cut
    assert [len(feed["x"]) for feed in whole] == [6, 6]
    assert sum(len(feed["x"]) for feed in first_samples(feeds, 100, 4)) == 18


def test_a_failing_run_raises_without_onnxruntimes_own_error_line(capfd):
    """An input onnxruntime cannot broadcast: the run raises (what keras-bn reports,
    in one line where it is the user's), and onnxruntime printed the same error as
    a coloured ``[E:onnxruntime ...]`` line of its own on stderr beside it."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", "k"]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", "j"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = open_session(model.SerializeToString())
    capfd.readouterr()
    with pytest.raises(Exception, match="Add"):
        session.run(None, {"a": np.ones((2, 4), np.float32), "b": np.ones((2, 3), np.float32)})
    assert "onnxruntime" not in capfd.readouterr().err

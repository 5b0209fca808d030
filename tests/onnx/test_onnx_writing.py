"""The ONNX writer: weights spliced into the file as onnx's own encoder would place them,
and onnx.checker's full check run on the model with its weights declared as inputs."""

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from keras import layers
from onnx import TensorProto, helper, numpy_helper
from support.models import randomize_batch_norms

from keras_bn.converters import graph as graph_lib
from keras_bn.converters.onnx.export import build_onnx_model, export_onnx
from keras_bn.converters.onnx.writing import (
    INLINE_LIMIT,
    add_initializer,
    check_model,
    fill,
    write_model,
)


def _model_with_weights(arrays):
    """A graph that adds each array to an input of its shape (one output each)."""
    nodes, inputs, outputs = [], [], []
    for index, array in enumerate(arrays):
        elem = helper.np_dtype_to_tensor_dtype(array.dtype.newbyteorder("<"))
        inputs.append(helper.make_tensor_value_info(f"x{index}", elem, list(array.shape)))
        outputs.append(helper.make_tensor_value_info(f"y{index}", elem, list(array.shape)))
        nodes.append(helper.make_node("Add", [f"x{index}", f"w{index}"], [f"y{index}"]))
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs), opset_imports=[helper.make_opsetid("", 17)]
    )
    weights = {}
    for index, array in enumerate(arrays):
        add_initializer(model, f"w{index}", array, weights)
    return model, weights


def test_written_bytes_are_onnx_serialization(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal((64, 33)).astype("float32"),  # a weight
        rng.standard_normal((3,)).astype("float32"),  # small: stays in the proto
        rng.integers(-(2**40), 2**40, size=(300,)).astype("int64"),
        rng.standard_normal((2, 700)).astype("float16"),
        np.asfortranarray(rng.standard_normal((40, 50))).astype("float64", order="F"),
        rng.standard_normal((20, 30)).astype(">f4"),  # big-endian: stored little-endian
    ]
    model, weights = _model_with_weights(arrays)
    assert sorted(weights) == ["w0", "w2", "w3", "w4", "w5"]
    assert all(weights[name].nbytes > INLINE_LIMIT for name in weights)
    path = tmp_path / "m.onnx"
    write_model(model, weights, path)
    reference = fill(model, weights).SerializeToString()
    assert path.read_bytes() == reference
    loaded = onnx.load(str(path))
    for index, array in enumerate(arrays):
        stored = numpy_helper.to_array(loaded.graph.initializer[index])
        np.testing.assert_array_equal(stored, array)


def test_fields_after_raw_data_still_parse(tmp_path):
    # raw_data (field 9) is spliced after the tensor's other fields: with a doc string
    # (field 12) the bytes differ from the encoder's order but parse to the same model.
    array = np.arange(1000, dtype="float32").reshape(10, 100)
    model, weights = _model_with_weights([array])
    model.graph.initializer[0].doc_string = "kernel"
    write_model(model, weights, tmp_path / "m.onnx")
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    assert loaded == fill(model, weights)
    x = np.ones((10, 100), "float32")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x0": x})[0], x + array)


def test_export_writes_what_build_onnx_model_builds(tmp_path):
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(32, 3)(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(40)(x))
    randomize_batch_norms(model)
    path = tmp_path / "m.onnx"
    export_onnx(model, path)
    built = build_onnx_model(graph_lib.flatten(model))
    assert path.read_bytes() == built.SerializeToString()


def _matmul_model(weight_shape):
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 300])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    weights = {}
    add_initializer(model, "w", np.zeros(weight_shape, "float32"), weights)
    assert "w" in weights  # large enough to be checked as a declared input
    return model, weights


def test_check_model_runs_shape_inference_with_weights_as_inputs():
    check_model(*_matmul_model((8, 300)))
    with pytest.raises(onnx.shape_inference.InferenceError, match="MatMul"):
        check_model(*_matmul_model((9, 300)))  # 9 rows for 8 input features
    onnx.checker.check_model(fill(*_matmul_model((8, 300))), full_check=True)
    with pytest.raises(onnx.shape_inference.InferenceError):  # the checker agrees
        onnx.checker.check_model(fill(*_matmul_model((9, 300))), full_check=True)


def test_check_model_refuses_a_weight_unlike_its_declaration():
    model, weights = _matmul_model((8, 300))
    weights["w"] = np.zeros((8, 301), "float32")
    with pytest.raises(ValueError, match="'w' is declared"):
        check_model(model, weights)

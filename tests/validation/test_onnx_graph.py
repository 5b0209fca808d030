"""Tests of the ONNX graph helpers: wiring maps, and outputs added for a session."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from keras_bn.converters import onnx_graph, runtime


def _model() -> onnx.ModelProto:
    """y = relu(x * w) + relu(x * w) ** 2 (``square`` reads ``r`` twice, ``y`` reads it once)."""
    w = numpy_helper.from_array(np.array([2.0, -1.0, 0.5], np.float32), "w")
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["m"], name="mul"),
        helper.make_node("Relu", ["m"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "r"], ["s"], name="square"),
        helper.make_node("Add", ["r", "s"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_producers_and_readers_follow_the_wiring():
    graph = _model().graph
    producers = onnx_graph.producers(graph)
    assert {name: node.name for name, node in producers.items()} == {
        "m": "mul",
        "r": "relu",
        "s": "square",
        "y": "add",
    }
    readers = onnx_graph.readers(graph)
    assert {name: [node.name for node in nodes] for name, nodes in readers.items()} == {
        "x": ["mul"],
        "w": ["mul"],
        "m": ["relu"],
        "r": ["square", "square", "add"],  # one entry per use
        "s": ["add"],
    }
    assert "y" not in readers  # a graph output nothing reads


@pytest.mark.parametrize("in_place", [False, True])
def test_with_outputs_fetches_intermediate_tensors_and_leaves_the_model_as_it_was(in_place):
    model = _model()
    before = model.SerializeToString()
    session = runtime.open_session(
        onnx_graph.with_outputs(model, ["m", "y", "s"], in_place=in_place)
    )
    assert model.SerializeToString() == before
    assert [output.name for output in session.get_outputs()] == ["y", "m", "s"]  # y once
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    y, m, s = session.run(["y", "m", "s"], {"x": x})
    expected_m = x * np.array([2.0, -1.0, 0.5], np.float32)
    relu = np.maximum(expected_m, 0.0)
    np.testing.assert_array_equal(m, expected_m)
    np.testing.assert_allclose(s, relu**2, rtol=1e-6)
    np.testing.assert_allclose(y, relu + relu**2, rtol=1e-6)


def test_with_outputs_fetches_integer_tensors_too():
    """A text model's mask is an integer tensor: fetched with its own type (declared
    float, onnxruntime refuses to load the model)."""
    model = _model()
    model.graph.node.extend(
        [
            helper.make_node("Cast", ["m"], ["mask"], name="cast", to=TensorProto.INT32),
            helper.make_node("Unsqueeze", ["mask", "axis"], ["expanded"], name="expand"),
        ]
    )
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axis"))
    session = runtime.open_session(onnx_graph.with_outputs(model, ["expanded", "m"]))
    x = np.ones((4, 3), np.float32)
    expanded, m = session.run(["expanded", "m"], {"x": x})
    assert expanded.dtype == np.int32 and expanded.shape == (4, 1, 3)
    np.testing.assert_array_equal(expanded[:, 0], m.astype(np.int32))
    assert m.dtype == np.float32


def test_sample_sizes_count_each_tensors_elements_per_sample():
    model = _model()
    sizes = onnx_graph.sample_sizes(model)
    assert sizes == {"x": 3, "m": 3, "r": 3, "s": 3, "y": 3}  # inputs and outputs too
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "width"  # unknown
    assert onnx_graph.sample_sizes(model) == {"m": 3, "r": 3, "s": 3, "y": 3}  # w's width


def test_batch_is_fixed_reads_the_first_dimension_of_the_inputs():
    model = _model()
    assert not onnx_graph.batch_is_fixed(model)  # [None, 3]
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    assert onnx_graph.batch_is_fixed(model)


def _scoring_model(nodes, outputs, initializers=()):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_class_score_outputs_follow_what_computes_each_output():
    """Logits (a linear layer, its bias after it, through (de)quantization) and
    probabilities are class scores; a tanh embedding, pooled features, a residual sum
    of two tensors are not."""
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    b = numpy_helper.from_array(np.ones(3, np.float32), "b")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zero")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["logits"]),  # a bias after the MatMul
        helper.make_node("Softmax", ["logits"], ["probabilities"]),
        helper.make_node("QuantizeLinear", ["logits", "scale", "zero"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dequantized"]),
        helper.make_node("Tanh", ["m"], ["embedding"]),
        helper.make_node("ReduceMean", ["m"], ["pooled"], keepdims=0),
        helper.make_node("Add", ["m", "x3"], ["residual"]),
        helper.make_node("MatMul", ["x", "w"], ["x3"]),
    ]
    outputs = ["logits", "probabilities", "dequantized", "embedding", "pooled", "residual"]
    model = _scoring_model(nodes, outputs, [w, b, scale, zero])
    assert onnx_graph.class_score_outputs(model) == [True, True, True, False, False, False]
    assert onnx_graph.class_score_outputs(_scoring_model([], ["x"])) == [False]  # an input

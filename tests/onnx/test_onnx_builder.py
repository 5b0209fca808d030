"""The Builder the ONNX rules write through (converters/onnx/builder.py), on its own.

Each test declares Keras tensors in some ONNX layout, asks the builder for values,
constants, sizes and reductions, wraps the nodes it wrote in a model, runs it in
onnxruntime (graph optimizations off: what runs is what the builder wrote) and
compares with the same computation in NumPy on the Keras-order arrays.
"""

from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from keras_bn.converters import graph as graph_lib
from keras_bn.converters.onnx.builder import Builder, Unsupported, Value, tensor_type

NHWC_AS_NCHW = (0, 3, 1, 2)  # ONNX axis i holds Keras axis perm[i]


def _tensor(shape, dtype="float32", name="x"):
    return graph_lib.Tensor(name, tuple(shape), dtype)


def _node(name, output_dtype="float32", scope=""):
    output = _tensor((None, 3), output_dtype, name=f"{name}_output")
    return graph_lib.Node(
        layer=SimpleNamespace(name=name),
        args=(),
        kwargs={},
        inputs=[],
        outputs=[output],
        output_structure=output,
        scope=scope,
    )


def _run(builder, feeds, outputs, opset=None):
    """Run the builder's nodes in onnxruntime: ``feeds`` maps graph input names to
    arrays (every dimension dynamic), ``outputs`` lists the values to return."""
    inputs = [
        helper.make_tensor_value_info(
            name,
            helper.np_dtype_to_tensor_dtype(array.dtype),
            [f"{name}_{axis}" for axis in range(array.ndim)],
        )
        for name, array in feeds.items()
    ]
    graph = helper.make_graph(
        builder.nodes,
        "builder_test",
        inputs,
        [helper.make_empty_tensor_value_info(name) for name in outputs],
        [numpy_helper.from_array(array, name) for name, array in builder.initializers.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset or builder.opset)]
    )
    model.ir_version = 8
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(outputs, feeds)


def _op_types(builder):
    return [node.op_type for node in builder.nodes]


@pytest.fixture
def nhwc():
    """A Keras NHWC tensor of shape (2, 3, 4, 5) held by ONNX as NCHW."""
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype("float32")
    return x, _tensor((None, 3, 4, 5))


# --------------------------------------------------------------------------------------
# Values and layouts.


def test_get_returns_each_layout_asked_for_with_one_cached_transpose(nhwc):
    x, tensor = nhwc
    builder = Builder(17)
    builder.declare(tensor, Value("x", NHWC_AS_NCHW))
    keras_order = builder.get(tensor)
    assert builder.get(tensor) == keras_order  # cached: asked twice, one node
    assert builder.get(tensor, NHWC_AS_NCHW) == "x"  # its own layout: no node
    other = builder.get(tensor, (0, 2, 3, 1))
    assert _op_types(builder) == ["Transpose", "Transpose"]
    got_keras, got_other = _run(builder, {"x": np.transpose(x, NHWC_AS_NCHW)}, [keras_order, other])
    np.testing.assert_array_equal(got_keras, x)
    np.testing.assert_array_equal(got_other, np.transpose(x, (0, 2, 3, 1)))


def test_pending_padding_is_applied_once_in_the_values_layout(nhwc):
    x, tensor = nhwc
    pads = ((0, 0), (1, 2), (0, 1), (0, 0))  # per Keras axis
    builder = Builder(17)
    builder.declare(tensor, Value("x", NHWC_AS_NCHW, pads))
    assert builder.value(tensor, keep_pads=True).pads == pads  # left for a convolution
    assert builder.nodes == []
    padded = builder.value(tensor)
    assert padded.perm == NHWC_AS_NCHW and padded.pads is None
    assert builder.value(tensor) == padded  # applied once
    keras_order = builder.get(tensor)
    assert _op_types(builder) == ["Pad", "Transpose"]
    (got,) = _run(builder, {"x": np.transpose(x, NHWC_AS_NCHW)}, [keras_order])
    np.testing.assert_array_equal(got, np.pad(x, pads))


def test_set_refuses_a_layout_of_another_rank(nhwc):
    _, tensor = nhwc
    with pytest.raises(RuntimeError, match="layout \\(0, 1\\) for a tensor of rank 4"):
        Builder(17).set(tensor, "y", (0, 1))


# --------------------------------------------------------------------------------------
# Constants.


@pytest.mark.parametrize(
    "constant, axes, keras_shape",
    [
        (np.arange(1.0, 6.0), None, (5,)),  # per channel, NumPy broadcasting
        (np.arange(1.0, 6.0), (3,), (1, 1, 1, 5)),  # per channel, by axis
        (np.arange(15.0).reshape(3, 5), (1, 3), (1, 3, 1, 5)),  # two axes (BN axis=(1, 3))
        (np.arange(4.0).reshape(4, 1), None, (4, 1)),  # broadcasting over H only
        (np.full((1, 1), 2.5), None, (1, 1)),  # all ones: a scalar
    ],
    ids=["channels", "channels-by-axis", "two-axes", "height", "scalar"],
)
@pytest.mark.parametrize("perm", [NHWC_AS_NCHW, (0, 1, 2, 3)], ids=["nchw", "keras-order"])
def test_broadcast_const_adds_like_numpy_in_any_layout(nhwc, perm, constant, axes, keras_shape):
    x, tensor = nhwc
    builder = Builder(17)
    name = builder.broadcast_const(constant, 4, perm, "c", axes=axes)
    total = builder.op("Add", ["x", name])
    (got,) = _run(builder, {"x": np.transpose(x, perm)}, [total])
    expected = x + constant.reshape(keras_shape).astype("float32")
    np.testing.assert_array_equal(got, np.transpose(expected, perm))
    if constant.size == 1:  # one value, whatever the layout (stored with shape (1,))
        assert builder.initializers[name].size == 1


def test_constants_are_shared_by_content_or_key_and_stored_in_the_nodes_dtype():
    builder = Builder(17)
    small = builder.const(np.array([1.0, 2.0]), "a")
    assert builder.const(np.array([1.0, 2.0]), "b") == small  # same small content
    assert builder.initializers[small].dtype == np.float32  # the node's float dtype
    large = np.arange(100.0)
    assert builder.const(large, "w") != builder.const(large, "w")  # weights: by key only
    assert builder.const(large, "w", key="kernel") == builder.const(large + 1, "v", key="kernel")
    assert builder.initializers[builder.ints([3, 4])].dtype == np.int64
    assert builder.initializers[builder.const(np.array([1, 2], np.int32), "i")].dtype == np.int64
    assert builder.initializers[builder.const(np.array([True]), "m")].dtype == np.bool_
    kept = builder.const(np.array([1.5]), "d", dtype=np.float64)
    assert builder.initializers[kept].dtype == np.float64


def test_constants_keep_their_shape_a_scalar_included():
    """A 0-d constant stays 0-d (a (1,) one would give a scalar op's output a rank),
    and a strided view is stored contiguous with its values."""
    builder = Builder(17)
    assert builder.initializers[builder.scalar(2.0)].shape == ()
    assert builder.initializers[builder.const(np.asarray(3), "n")].shape == ()
    view = np.arange(12.0).reshape(3, 4).T
    stored = builder.initializers[builder.const(view, "t", dtype=np.float64)]
    assert stored.flags.c_contiguous and stored.shape == (4, 3)
    np.testing.assert_array_equal(stored, view)


def test_a_float16_node_computes_in_float16_and_casts_its_float32_inputs():
    builder = Builder(17)
    builder.begin(_node("half", "float16"))
    assert builder.dtype == np.float16
    assert builder.initializers[builder.scalar(0.1)].dtype == np.float16
    assert builder.cast_float("ids", "int64") == "ids"  # integers are left alone
    assert builder.cast_float("h", "float16") == "h"
    cast = builder.cast_float("x", "float32")
    x = np.array([[1.0, 1e-8, 70000.0]], np.float32)
    (got,) = _run(builder, {"x": x}, [cast])
    with np.errstate(over="ignore"):  # 70000 overflows float16 to inf, as in ONNX's Cast
        expected = x.astype(np.float16)
    np.testing.assert_array_equal(got, expected)


def test_tensor_type_names_onnx_types_and_refuses_the_rest():
    assert tensor_type("float32") == TensorProto.FLOAT
    assert tensor_type("float16") == TensorProto.FLOAT16
    assert tensor_type("int64") == TensorProto.INT64
    with pytest.raises(Unsupported, match="dtype 'datetime64\\[s\\]' has no ONNX tensor type"):
        tensor_type("datetime64[s]")


# --------------------------------------------------------------------------------------
# Names.


def test_nodes_are_named_after_the_keras_node_and_never_clash():
    builder = Builder(17, reserved_names={"block/conv"})
    builder.begin(_node("conv", scope="block"))
    first = builder.op("Relu", ["x"])
    second = builder.op("Relu", [first])
    third = builder.op("Relu", [second])
    assert [first, second, third] == ["block/conv_1", "block/conv/Relu", "block/conv/Relu_1"]
    builder.begin(None)
    assert builder.op("Identity", [third]) == "graph"
    split = builder.op("Split", ["x"], outputs=2, axis=0, num_outputs=2)
    assert split == ["graph/Split:0", "graph/Split:1"]


def test_a_subgraph_builder_shares_names_and_constants_with_its_graph():
    builder = Builder(17)
    shared = builder.const(np.array([1.0, 2.0]), "c")
    body = builder.subgraph_builder()
    assert body.const(np.array([1.0, 2.0]), "c") == shared
    assert body.unique(shared) != shared
    assert body.names_taken() is builder.names_taken()
    assert body.initializers is builder.initializers
    with pytest.raises(Unsupported, match="outside export_onnx"):
        body.export_subgraph(None, "scope", "body")


# --------------------------------------------------------------------------------------
# Sizes known at run time, reductions.


@pytest.mark.parametrize("batch", [1, 7])
def test_batch_size_and_axis_sizes_are_read_at_run_time(batch):
    x = np.zeros((batch, 3, 4, 5), np.float32)  # Keras NHWC
    tensor = _tensor((None, 3, 4, 5))
    builder = Builder(17)
    with pytest.raises(Unsupported, match="without inputs"):
        builder.batch_size()
    builder.declare(tensor, Value("x", NHWC_AS_NCHW))
    builder.batch_source = "x"
    batch_size = builder.batch_size()
    assert builder.batch_size() == batch_size  # computed once
    sizes = [builder.size(tensor, axis) for axis in range(4)]
    assert builder.size(tensor, 2) == sizes[2]
    got = _run(builder, {"x": np.transpose(x, NHWC_AS_NCHW)}, [batch_size, *sizes])
    assert [list(value) for value in got] == [[batch], [batch], [3], [4], [5]]
    assert all(value.dtype == np.int64 for value in got)


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize(
    "op_type, reference",
    [("ReduceMean", np.mean), ("ReduceMax", np.max), ("ReduceSum", np.sum)],
    ids=["mean", "max", "sum"],
)
@pytest.mark.parametrize("keepdims", [False, True], ids=["dropped", "kept"])
def test_reduce_writes_the_opsets_form_and_reduces_like_numpy(opset, op_type, reference, keepdims):
    x = np.random.default_rng(1).normal(size=(2, 3, 4)).astype("float32")
    builder = Builder(opset)
    reduced = builder.reduce(op_type, "x", [1, 2], keepdims)
    node = builder.nodes[-1]
    axes_as_input = opset >= 18 or op_type == "ReduceSum"
    assert len(node.input) == (2 if axes_as_input else 1)
    assert any(a.name == "axes" for a in node.attribute) == (not axes_as_input)
    (got,) = _run(builder, {"x": x}, [reduced])
    expected = reference(x.astype(np.float64), axis=(1, 2), keepdims=keepdims)
    # float32 sums of 12 values near 1: within a few roundings of the float64 result
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)

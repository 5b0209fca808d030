"""Tests of keras_bn._keras_internals, the one module that touches private Keras API.

Each test exercises one accessor on Sequential, Functional and nested models, so that
after a Keras upgrade the failing test names exactly which private access moved.
"""

import re
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_bn import _keras_internals as internals

L = keras.layers


# ------------------------------------------------------------------ models


def _inner():
    return keras.Sequential(
        [keras.Input((8,)), L.Dense(4, name="inner_dense"), L.BatchNormalization(name="inner_bn")],
        name="inner",
    )


def _nested_shared_model():
    """Two inputs, a shared Dense, a nested Sequential called twice, an Add."""
    inner = _inner()
    x = keras.Input((8,), name="x")
    y = keras.Input((8,), name="y")
    shared = L.Dense(8, name="shared")
    out = L.Add(name="add")([inner(shared(x)), inner(shared(y))])
    return keras.Model([x, y], out, name="outer")


def _ops_model():
    """A Functional model with keras.ops calls and a keyword argument."""
    inputs = keras.Input((6,), name="features")
    h = L.Dense(6, name="dense")(inputs)
    h = L.BatchNormalization(name="bn")(h, training=False)
    h = keras.ops.relu(h)
    outputs = keras.ops.add(h, inputs)
    return keras.Model(inputs, outputs, name="ops_model")


class _Block(L.Layer):
    """A custom layer holding sublayers as attributes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(3, name="block_dense")
        self.bn = L.BatchNormalization(name="block_bn")

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)


class _Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(2)

    def call(self, x):
        return self.dense(x)


# ------------------------------------------------------- private classes


def test_private_classes_are_importable_and_of_the_expected_kind():
    assert issubclass(internals.Functional, keras.Model)
    assert issubclass(internals.LayerScale, keras.Layer)
    assert issubclass(internals.CustomScaleLayer, keras.Layer)


@pytest.mark.parametrize(
    "module, name",
    [
        ("numpy_ops", name)
        for name in (
            "Add",
            "Subtract",
            "Multiply",
            "Divide",
            "TrueDivide",
            "Maximum",
            "Minimum",
            "Negative",
            "Tanh",
        )
    ]
    + [
        ("nn_ops", name)
        for name in (
            "Relu",
            "Relu6",
            "Sigmoid",
            "Silu",
            "HardSigmoid",
            "HardSilu",
            "Gelu",
            "Softmax",
        )
    ],
    ids=lambda value: value,
)
def test_operation_classes_used_by_the_converter_exist(module, name):
    operation_class = getattr(getattr(internals, module), name)
    assert issubclass(operation_class, keras.Operation)


def test_keras_ops_calls_are_recorded_as_the_operation_classes():
    operations = [node.operation for node in internals.ordered_nodes(_ops_model())]
    assert isinstance(operations[-2], internals.nn_ops.Relu)
    assert isinstance(operations[-1], internals.numpy_ops.Add)


# ---------------------------------------------------- layers and models


def test_flatten_layers_finds_nested_and_custom_layers_once_each():
    inputs = keras.Input((8,))
    inner = _inner()
    h = inner(inputs)
    h = inner(L.Dense(8)(h))  # called twice: still listed once
    outputs = _Block(name="block")(h)
    model = keras.Model(inputs, outputs)
    layers = internals.flatten_layers(model)
    names = [layer.name for layer in layers]
    assert layers[0] is model  # the layer itself comes first
    assert len(layers) == len({id(layer) for layer in layers})
    for name in ("inner", "inner_dense", "inner_bn", "block", "block_dense", "block_bn"):
        assert names.count(name) == 1, names


def test_flatten_layers_of_a_plain_layer_is_itself():
    layer = L.Dense(3)
    assert internals.flatten_layers(layer) == [layer]


@pytest.mark.parametrize(
    "build, functional, sequential_or_functional",
    [
        (_inner, False, True),
        (_nested_shared_model, True, True),
        (lambda: _Subclassed(), False, False),
    ],
    ids=["sequential", "functional", "subclassed"],
)
def test_model_kinds(build, functional, sequential_or_functional):
    model = build()
    assert internals.is_functional(model) is functional
    assert internals.is_sequential_or_functional(model) is sequential_or_functional


def test_functional_subclass_counts_as_functional():
    class MyFunctional(internals.Functional):
        pass

    inputs = keras.Input((3,))
    model = MyFunctional(inputs, L.Dense(2)(inputs))
    assert internals.is_functional(model)
    assert internals.functional_of(model) is model


# ---------------------------------------------------- Functional graphs


def test_functional_of_functional_and_sequential():
    model = _nested_shared_model()
    assert internals.functional_of(model) is model
    sequential = _inner()
    functional = internals.functional_of(sequential)
    assert internals.is_functional(functional) and functional is not sequential


def test_functional_of_sequential_built_without_input():
    sequential = keras.Sequential([L.Dense(3)])
    with pytest.raises(ValueError, match="no known input shape"):
        internals.functional_of(sequential)
    sequential.build((None, 5))
    assert internals.is_functional(internals.functional_of(sequential))


def test_functional_of_subclassed_model_raises():
    model = _Subclassed(name="sub")
    model(keras.ops.zeros((1, 3)))
    with pytest.raises(ValueError, match="'sub' of class _Subclassed is a subclassed model"):
        internals.functional_of(model)


def test_ordered_nodes_are_topological_without_input_nodes():
    model = _nested_shared_model()
    nodes = internals.ordered_nodes(model)
    assert [node.operation.name for node in nodes].count("shared") == 2
    assert [node.operation.name for node in nodes].count("inner") == 2
    assert nodes[-1].operation.name == "add"
    assert not any(node.is_input for node in nodes)
    assert not any(isinstance(node.operation, L.InputLayer) for node in nodes)
    known = {id(tensor) for tensor in keras.tree.flatten(internals.inputs_struct(model))}
    for node in nodes:
        assert all(id(tensor) in known for tensor in node.input_tensors), node.operation.name
        assert all(isinstance(tensor, keras.KerasTensor) for tensor in node.outputs)
        known.update(id(tensor) for tensor in node.outputs)


def test_ordered_nodes_of_a_nested_model_call():
    model = _nested_shared_model()
    calls = [node for node in internals.ordered_nodes(model) if node.operation.name == "inner"]
    assert all(isinstance(node.operation, keras.Sequential) for node in calls)
    inner = internals.functional_of(calls[0].operation)
    inner_nodes = internals.ordered_nodes(inner)
    assert [node.operation.name for node in inner_nodes] == ["inner_dense", "inner_bn"]
    # The inner graph's own inputs/outputs connect its nodes.
    (inner_input,) = keras.tree.flatten(internals.inputs_struct(inner))
    (inner_output,) = keras.tree.flatten(internals.outputs_struct(inner))
    assert inner_nodes[0].input_tensors == (inner_input,)
    assert inner_nodes[-1].outputs == (inner_output,)


def test_node_arguments_keep_args_kwargs_and_tensors():
    model = _ops_model()
    nodes = {node.operation.name: node for node in internals.ordered_nodes(model)}
    bn = nodes["bn"]
    assert bn.kwargs == {"training": False}
    assert len(bn.args) == 1 and bn.args[0] is bn.input_tensors[0]
    assert internals.producing_operation(bn.args[0]).name == "dense"
    add = internals.ordered_nodes(model)[-1]
    assert len(add.input_tensors) == 2
    assert internals.producing_operation(add.input_tensors[1]).name == "features"


class _Training(L.Layer):
    """Doubles its input in training, which its call defaults to."""

    def call(self, x, training=True):
        return x * 2.0 if training else x


def test_standardized_inputs_and_inference_calls_are_functional_calls():
    """What Functional.call does with its inputs and to each operation in inference:
    a dict of inputs in graph order, in the inputs' dtypes; training=False passed to
    the operations that take it (Dropout is the identity), no other argument added."""
    a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b", dtype="float16")
    model = keras.Model([a, b], L.Concatenate()([a, L.Dense(2)(b)]))
    flat = internals.standardized_inputs(model, {"b": np.ones((4, 3)), "a": np.zeros((4, 2))})
    assert [tuple(x.shape) for x in flat] == [(4, 2), (4, 3)]
    assert [keras.backend.standardize_dtype(x.dtype) for x in flat] == ["float32", "float16"]
    x = np.ones((5, 4), "float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(_Training()(x)), 2 * x)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(internals.inference_call(_Training())(x)), x)  # fmt: skip
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(internals.inference_call(L.ReLU())(x - 2.0)), 0 * x
    )


class _OwnCall(keras.Model):
    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=training, mask=mask)


def test_runs_its_graph_only_where_keras_call_is_kept():
    inputs = keras.Input((3,))
    outputs = L.Dense(2)(inputs)
    assert internals.runs_its_graph(keras.Model(inputs, outputs))
    assert internals.runs_its_graph(keras.Sequential([keras.Input((3,)), L.Dense(2)]))
    assert not internals.runs_its_graph(_OwnCall(inputs, outputs))
    assert not internals.runs_its_graph(L.Dense(2))


def test_inputs_and_outputs_struct_keep_the_call_structure():
    a = keras.Input((2,), name="a")
    b = keras.Input((3,), name="b")
    merged = L.Concatenate(name="concat")([a, b])
    model = keras.Model(
        {"a": a, "b": b}, {"sum": L.Dense(1, name="sum")(merged), "same": merged}, name="dicts"
    )
    inputs = internals.inputs_struct(model)
    outputs = internals.outputs_struct(model)
    assert isinstance(inputs, dict) and set(inputs) == {"a", "b"}
    assert internals.producing_operation(inputs["b"]).name == "b"
    assert isinstance(outputs, dict) and set(outputs) == {"sum", "same"}
    assert internals.producing_operation(outputs["same"]).name == "concat"


def test_producing_operation_of_an_input_is_its_input_layer():
    inputs = keras.Input((4,), name="pixels")
    operation = internals.producing_operation(inputs)
    assert isinstance(operation, L.InputLayer) and operation.name == "pixels"


def test_output_names():
    model = _nested_shared_model()
    assert internals.output_names(model) == ["add"]
    assert internals.output_names(internals.functional_of(_inner())) == ["inner_bn"]


def test_walk_with_accessors_only_reaches_every_leaf_call():
    """The walk converters/graph.py does, written with the accessors alone."""
    model = _nested_shared_model()

    def walk(functional):
        calls = []
        for node in internals.ordered_nodes(functional):
            if isinstance(node.operation, keras.Model):
                inner = internals.functional_of(node.operation)
                calls.extend(walk(inner))
            else:
                calls.append(node.operation.name)
        return calls

    assert sorted(walk(model)) == sorted(
        ["shared", "shared", "inner_dense", "inner_dense", "inner_bn", "inner_bn", "add"]
    )


# argparse internals the CLI's "did you mean" reads (converters/cli/args.py).
ARGPARSE_PRIVATE = {"parser._actions", "argparse._get_action_name"}


def test_no_other_module_touches_private_keras_api():
    """keras_bn/ and converters/ reach private Keras API only through _keras_internals."""
    root = Path(internals.__file__).parent.parent
    private = re.compile(r"keras\.src|\b(?!self\b)\w+\._(?!_)[a-z]\w*")
    offenders = []
    sources = sorted((root / "keras_bn").rglob("*.py")) + sorted(
        (root / "converters").rglob("*.py")
    )
    for path in sources:
        if path.name == "_keras_internals.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            for match in private.finditer(code):
                text = match.group(0)
                if text.startswith("keras_bn._") or text == "os._exit":  # ours; the stdlib's
                    continue
                if text in ARGPARSE_PRIVATE:  # the stdlib's; test_upgrade_safety checks them
                    continue
                offenders.append(f"{path.name}:{number}: {text}")
    assert not offenders, offenders


def test_saved_weights_loading_only_inside_the_block():
    with internals.saved_weights_loading():
        skipped = keras.layers.Dense(8, bias_initializer="ones")
        skipped.build((None, 4))
        constant = keras.layers.Dense(3, bias_initializer=keras.initializers.Constant(0.25))
        constant.build((None, 2))
        normalization = keras.layers.BatchNormalization()
        normalization.build((None, 5))
        constant.kernel.assign(np.arange(6, dtype="float64").reshape(2, 3))  # a saved weight
    drawn = keras.layers.Dense(8)
    drawn.build((None, 4))
    assert keras.backend.standardize_dtype(constant.kernel.value.dtype) == "float32"
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(constant.kernel), np.arange(6.0).reshape(2, 3)
    )
    assert not np.any(keras.ops.convert_to_numpy(skipped.kernel))  # zeros, not drawn
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(skipped.bias), np.ones(8))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(constant.bias), np.full(3, 0.25))
    reference = keras.layers.BatchNormalization()
    reference.build((None, 5))
    for built, stock in zip(normalization.weights, reference.weights, strict=True):
        assert built.dtype == stock.dtype
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(built), keras.ops.convert_to_numpy(stock)
        )
    assert np.any(keras.ops.convert_to_numpy(drawn.kernel))  # patch removed again


def test_saving_temp_dirs_in_moves_only_this_threads_keras_temp_dirs(tmp_path):
    import tempfile
    import threading

    from keras.src.saving import saving_lib

    tempdir = tempfile.tempdir
    elsewhere = []
    with internals.saving_temp_dirs_in(str(tmp_path)):
        ours = Path(saving_lib.get_temp_dir())
        worker = threading.Thread(target=lambda: elsewhere.append(saving_lib.get_temp_dir()))
        worker.start()
        worker.join()
        assert tempfile.tempdir == tempdir  # the process's temporary files stay put
    after = Path(saving_lib.get_temp_dir())
    try:
        assert ours.parent == tmp_path and ours.is_dir()
        assert Path(elsewhere[0]).parent != tmp_path and after.parent != tmp_path
    finally:
        for path in (elsewhere[0], after):
            Path(path).rmdir()


def test_float64_type_promotion_only_inside_the_block():
    before = keras.backend.result_type("float64", "float32")
    with internals.float64_type_promotion():
        assert keras.backend.result_type("float64", "float32") == "float64"
    assert keras.backend.result_type("float64", "float32") == before


# ------------------------------------------------------------------ tracing


def test_symbolic_variable_arithmetic_records_ops_and_restores_operators():
    variable = keras.Variable([1.0, 2.0])
    tensor = keras.Input((2,))
    original = keras.Variable.__mul__
    with internals.symbolic_variable_arithmetic():
        product = variable * tensor
        difference = variable - tensor
        assert isinstance(product, keras.KerasTensor) and product.shape == (None, 2)
        assert isinstance(difference, keras.KerasTensor)
        # concrete operands keep the backend's own arithmetic
        assert keras.ops.convert_to_numpy(variable * 2.0).tolist() == [2.0, 4.0]
    assert type(internals.producing_operation(product)).__name__ == "Multiply"
    assert keras.ops.convert_to_numpy(variable * 3.0).tolist() == [3.0, 6.0]
    assert keras.Variable.__mul__ is original


def test_keeping_layer_nodes_undoes_symbolic_calls():
    block = _Block(name="kept")
    block(keras.Input((4,)))
    before = len(block.dense._inbound_nodes)
    with internals.keeping_layer_nodes(block):
        block.call(keras.Input((4,)))
        assert len(block.dense._inbound_nodes) == before + 1
    assert len(block.dense._inbound_nodes) == before


class _ScoresOrNone(keras.layers.Layer):
    def call(self, x):
        return x * 2.0, None


def test_none_outputs_recorded_lets_a_layer_return_none_and_restores_keras():
    layer = _ScoresOrNone(name="scores_or_none")
    x = keras.Input((3,))
    with pytest.raises(ValueError, match="must be tensors"):
        layer(x)  # Keras's own rule, which the accessor relaxes
    with internals.none_outputs_recorded():
        doubled, nothing = layer(x)
    assert nothing is None and isinstance(doubled, keras.KerasTensor)
    assert internals.producing_operation(doubled) is layer
    with pytest.raises(ValueError, match="must be tensors"):
        layer(x)


class _SizedScale(keras.layers.Layer):
    def call(self, x, size):
        if max(size) > 2:  # Python on a tuple of ints, as KerasHub ViTDet writes
            return x * float(max(size))
        return x


def test_static_python_arguments_keeps_tuples_of_numbers_static_and_restores_keras():
    from keras.src import backend

    layer = _SizedScale(name="sized")
    original = backend.compute_output_spec
    with internals.static_python_arguments():
        scaled = layer(keras.Input((3,)), size=(4, 3))
        assert backend.compute_output_spec is not original
    assert isinstance(scaled, keras.KerasTensor) and scaled.shape == (None, 3)
    assert backend.compute_output_spec is original


class _TensorOnlySpec(keras.layers.Layer):
    """A spec that takes the tensor only, as KerasHub D-FINE's prediction heads write it."""

    def call(self, x, training=None):
        return x * 2.0

    def compute_output_spec(self, x):
        return keras.KerasTensor(x.shape, dtype=x.dtype)


def test_output_specs_without_call_context_drops_training_and_restores_keras():
    layer = _TensorOnlySpec(name="tensor_only_spec")
    x = keras.Input((3,))
    with pytest.raises(TypeError, match="training"):
        layer(x, training=False)  # Keras hands the spec the call's training
    original = keras.Layer.symbolic_call
    with internals.output_specs_without_call_context():
        doubled = layer(x, training=False)
    assert isinstance(doubled, keras.KerasTensor) and doubled.shape == (None, 3)
    assert internals.producing_operation(doubled) is layer
    assert keras.Layer.symbolic_call is original
    with pytest.raises(TypeError, match="training"):
        layer(x, training=False)


def test_backend_calls_recorded_records_keras_ops_and_restores_keras():
    boxes = keras.Input((5, 4))
    convert = keras.utils.bounding_boxes.convert_format
    with pytest.raises((TypeError, ValueError)):  # backend code on a symbolic tensor
        convert(boxes, source="xyxy", target="center_xywh")
    with internals.backend_calls_recorded():
        centered = convert(boxes, source="xyxy", target="center_xywh")
        # on arrays the backend computes as before
        eager = convert(np.array([[0.0, 2.0, 4.0, 4.0]]), source="xyxy", target="xywh")
    assert isinstance(centered, keras.KerasTensor) and centered.shape == (None, 5, 4)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(eager), [[0.0, 2.0, 4.0, 2.0]])
    with pytest.raises((TypeError, ValueError)):
        convert(boxes, source="xyxy", target="center_xywh")


def test_backend_arrays_defer_to_symbolic_records_ops_and_restores_keras():
    array = keras.ops.abs(keras.Variable([-0.5, 2.0]))  # abs(variable): a backend array
    x = keras.Input((2,))
    with internals.backend_arrays_defer_to_symbolic():
        total = array + x  # the array's own operator, handing over to the KerasTensor
        assert isinstance(total, keras.KerasTensor) and total.shape == (None, 2)
        assert "__jax_array__" not in keras.KerasTensor.__dict__
    assert type(internals.producing_operation(total)).__name__ == "Add"
    assert "__jax_array__" in keras.KerasTensor.__dict__
    model = keras.Model(x, total)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(np.ones((1, 2)))), [[1.5, 3.0]])


_JAX_DEPTHWISE_CODE = """
import sys
sys.path.insert(0, "tests/validation")
import jax
import keras
import numpy as np
from keras.src.backend.jax import nn
import test_float64_kernels as t
from keras_bn._keras_internals import jax_depthwise_convolutions
from keras_bn.converters.float64_kernels import depthwise_conv_taps

L = keras.layers
EPS = float(np.finfo(np.float32).eps)
calls = []


def spy(*arguments):
    calls.append(arguments[0].shape)
    return depthwise_conv_taps(*arguments)


def depthwise_of(layer):
    # (kernel (*size, channels, multiplier), pointwise kernel or None) in float64
    weights = [np.asarray(w, np.float64) for w in layer.get_weights()]
    if isinstance(layer, L.SeparableConv2D):
        return weights[0], weights[1]
    kernel = weights[0]
    if isinstance(layer, L.Conv2D):  # one input channel per group: (k, k, 1, C * M)
        groups = layer.groups
        kernel = kernel.reshape(*kernel.shape[:-2], groups, kernel.shape[-1] // groups)
    return kernel, None


def float64_output(layer, x):
    # The layer in float64 (NumPy), and the same sum over absolute values: its scale.
    kernel, pointwise = depthwise_of(layer)
    strides = tuple(layer.strides)
    dilation = tuple(layer.dilation_rate)
    exact, scale = (
        t._numpy_depthwise(a, k, strides, layer.padding, dilation, layer.data_format)
        for a, k in ((x, kernel), (np.abs(x), np.abs(kernel)))
    )
    terms = np.prod(layer.kernel_size)  # products summed per output
    if pointwise is not None:
        exact, scale = exact @ pointwise[0, 0], scale @ np.abs(pointwise[0, 0])
        terms += pointwise.shape[-2]
    return exact, scale, terms


rng = np.random.default_rng(0)
CASES = [  # layer, input shape, routed to the replacement
    (L.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2), (2, 9, 8, 5), True),
    (L.DepthwiseConv2D(3, dilation_rate=2, data_format="channels_first"), (2, 5, 9, 8), True),
    (L.DepthwiseConv1D(5, padding="same", use_bias=False), (2, 11, 4), True),
    (L.SeparableConv2D(6, 3, padding="same", use_bias=False), (2, 7, 7, 4), True),
    (L.Conv2D(8, 3, groups=4, padding="same", use_bias=False), (2, 7, 7, 4), True),
    (L.Conv2D(8, 3, groups=4, data_format="channels_first", use_bias=False), (2, 4, 7, 6), True),
    (L.Conv2D(4, 3, groups=2), (2, 7, 7, 4), False),  # two inputs per group: Keras's own
    (L.Conv2D(4, 3), (2, 7, 7, 4), False),
]
keras_own = nn.depthwise_conv, nn.conv
for layer, shape, routed in CASES:
    x = rng.standard_normal(shape).astype("float32")
    layer.build(shape)  # its weights drawn eagerly, outside the traces
    # Each call compiled whole (cheaper than eagerly), traced anew (a new function).
    own = np.asarray(jax.jit(lambda x: layer(x))(x), np.float64)
    del calls[:]
    with jax_depthwise_convolutions(spy):
        got = np.asarray(jax.jit(lambda x: layer(x))(x), np.float64)
    assert (nn.depthwise_conv, nn.conv) == keras_own  # restored
    assert len(calls) == int(routed), (layer.name, calls)
    if not routed:
        assert np.array_equal(got, own)  # Keras's own code
        continue
    assert got.shape == own.shape, (got.shape, own.shape)
    exact, scale, terms = float64_output(layer, x.astype(np.float64))
    bound = (terms + 1) * EPS * scale  # float32 summation's forward error bound
    assert np.all(np.abs(own - exact) <= bound), layer.name  # Keras's own keeps it
    assert np.all(np.abs(got - exact) <= bound), (layer.name, np.max(np.abs(got - exact) / bound))

# A kernel of more taps than max_taps is Keras's own (a 7x7 has 49), a 5x5 is routed.
x = rng.standard_normal((2, 9, 9, 3)).astype("float32")
for size, routed in ((7, False), (5, True)):
    layer = L.DepthwiseConv2D(size, padding="same")
    layer.build(x.shape)
    del calls[:]
    with jax_depthwise_convolutions(spy, max_taps=25):
        jax.jit(lambda x: layer(x))(x)
    assert len(calls) == int(routed), (size, calls)

# An empty output is Keras's own error, inside the block too.
for block in (jax_depthwise_convolutions(spy), __import__("contextlib").nullcontext()):
    del calls[:]
    with block:
        try:
            keras.ops.conv(np.ones((1, 2, 2, 3), "float32"), np.ones((3, 3, 1, 3), "float32"))
        except ValueError as error:
            assert "empty output" in str(error), error
        else:
            raise AssertionError("no error")
    assert calls == []
print("ok")
"""


def test_jax_depthwise_convolutions_route_only_depthwise_ones_and_restore_keras(run_python):
    """On JAX, within the block, every depthwise convolution Keras computes (DepthwiseConv1D
    and 2D with strides, dilation, multipliers and either layout; SeparableConv's first
    half; Conv2D with one input channel per group) is the given function's, within float32
    summation's error bound of the float64 convolution as Keras's own is; other
    convolutions and one Keras rejects stay Keras's, and the block restores Keras's code."""
    result = run_python(["-c", _JAX_DEPTHWISE_CODE], env={"KERAS_BACKEND": "jax"})
    assert result.stdout.strip().endswith("ok")

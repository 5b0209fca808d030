"""The export driver: names, layouts, batch, opsets, checks, files, fallback, backends."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from keras import layers
from onnx import TensorProto, helper, numpy_helper
from support.models import randomize_batch_norms, tiny_model

from keras_bn.converters.errors import UserInputError
from keras_bn.converters.onnx.export import (
    DEFAULT_OPSET,
    ExportWarning,
    check_structure,
    export_onnx,
)
from keras_bn.converters.onnx.metadata import METADATA_LAYER_OUTPUTS


def _run(path, feed):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _keras(model, *arrays):
    outputs = model(list(arrays) if len(arrays) > 1 else arrays[0], training=False)
    return [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(outputs)]


def _images(batch, shape=(8, 8, 3), seed=0):
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype("float32")


def _small_cnn(name="cnn"):
    """A small ResNet-like model: convolutions, a residual add, pooling, a classifier."""
    x = keras.Input((8, 8, 3), name="image")
    h = layers.ZeroPadding2D(1, name="pad")(x)
    h = layers.Conv2D(8, 3, strides=2, activation="relu", name="stem")(h)
    r = layers.Conv2D(8, 3, padding="same", name="branch")(h)
    r = layers.DepthwiseConv2D(3, padding="same", name="depthwise")(r)
    h = layers.Add(name="residual")([h, layers.ReLU(6.0)(r)])
    h = layers.MaxPooling2D(2, name="pool")(h)
    h = layers.Concatenate(name="concat")([h, layers.AveragePooling2D(1)(h)])
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    y = layers.Dense(5, name="logits")(layers.Dropout(0.2)(h))
    return keras.Model(x, y, name=name)


def _with_batch_norm():
    x = keras.Input((8, 8, 3), name="image")
    h = layers.Conv2D(4, 3, name="conv")(x)
    bn = layers.BatchNormalization(name="bn")
    h = layers.ReLU()(bn(h))
    model = keras.Model(x, layers.Flatten()(h), name="with_bn")
    return randomize_batch_norms(model)


# --------------------------------------------------------------------------------------
# Names, batch, opset, layout.


def test_result_and_names(tmp_path):
    model = _small_cnn()
    result = export_onnx(model, tmp_path / "cnn.onnx")
    proto = onnx.load(str(tmp_path / "cnn.onnx"))
    assert result.path == str(tmp_path / "cnn.onnx")
    assert result.opset == DEFAULT_OPSET == proto.opset_import[0].version
    assert result.input_names == ["image"] == [i.name for i in proto.graph.input]
    assert result.output_names == ["logits"] == [o.name for o in proto.graph.output]
    assert result.node_count == len(proto.graph.node) == sum(result.op_counts.values())
    assert result.seconds > 0 and not result.used_fallback and result.external_data is None
    assert result.op_counts["Transpose"] == 1  # only at the input
    assert "Pad" not in result.op_counts  # the ZeroPadding went into the stem's pads
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 8, 8, 3]
    out_dims = proto.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in out_dims] == ["batch", 5]
    # Nodes are named after the Keras layers.
    assert {"stem", "branch", "depthwise", "residual", "pool", "concat", "gap"} <= {
        node.name for node in proto.graph.node
    }
    assert "opset" in str(result) and result.to_dict()["output_names"] == ["logits"]


@pytest.mark.parametrize("batch", [1, 5])
def test_batch_is_dynamic_by_default(batch, tmp_path):
    model = _small_cnn()
    export_onnx(model, tmp_path / "cnn.onnx")
    x = _images(batch)
    np.testing.assert_allclose(
        _run(tmp_path / "cnn.onnx", {"image": x})[0], _keras(model, x)[0], atol=1e-5, rtol=1e-4
    )


def test_fixed_batch_size(tmp_path):
    model = _small_cnn()
    export_onnx(model, tmp_path / "cnn.onnx", batch_size=2)
    proto = onnx.load(str(tmp_path / "cnn.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert _run(tmp_path / "cnn.onnx", {"image": _images(2)})[0].shape == (2, 5)
    with pytest.raises(Exception, match="(?i)dimension"):
        _run(tmp_path / "cnn.onnx", {"image": _images(3)})


@pytest.mark.parametrize("opset", [13, 17, 21])
def test_opsets(opset, tmp_path):
    model = _small_cnn()
    result = export_onnx(model, tmp_path / "cnn.onnx", opset=opset)
    proto = onnx.load(str(tmp_path / "cnn.onnx"))
    assert result.opset == opset == proto.opset_import[0].version
    assert proto.ir_version == helper.find_min_ir_version_for(list(proto.opset_import))
    x = _images(2)
    np.testing.assert_allclose(
        _run(tmp_path / "cnn.onnx", {"image": x})[0], _keras(model, x)[0], atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"opset": 12}, "opset 12 is not supported", id="opset-too-old"),
        pytest.param({"opset": 99}, "opset 99 is not supported", id="opset-too-new"),
        pytest.param({"opset": "17"}, "opset must be an integer", id="opset-string"),
        pytest.param({"input_layout": "NHWC"}, "input_layout must be", id="layout"),
        pytest.param({"batch_size": 0}, "batch_size must be", id="batch-zero"),
        pytest.param({"batch_size": 2.5}, "batch_size must be", id="batch-float"),
    ],
)
def test_invalid_arguments(kwargs, match, tmp_path):
    with pytest.raises(UserInputError, match=match):
        export_onnx(_small_cnn(), tmp_path / "cnn.onnx", **kwargs)
    assert not (tmp_path / "cnn.onnx").exists()


def test_channels_first_input_needs_no_transpose(tmp_path):
    x = keras.Input((8, 8, 3), name="image")
    meta = keras.Input((4,), name="meta")
    h = layers.Rescaling(1 / 255.0)(x)
    h = layers.Conv2D(6, 3, strides=2, padding="same", activation="relu")(h)
    h = layers.GlobalAveragePooling2D()(h)
    model = keras.Model([x, meta], layers.Dense(2)(layers.Concatenate()([h, meta])))
    result = export_onnx(model, tmp_path / "m.onnx", input_layout="channels_first")
    assert "Transpose" not in result.op_counts
    proto = onnx.load(str(tmp_path / "m.onnx"))
    image_dims = [
        d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim
    ]
    assert image_dims == ["batch", 3, 8, 8]
    images = np.random.default_rng(0).uniform(0, 255, (3, 8, 8, 3)).astype("float32")
    metas = _images(3, (4,))
    actual = _run(tmp_path / "m.onnx", {"image": images.transpose(0, 3, 1, 2), "meta": metas})
    np.testing.assert_allclose(actual[0], _keras(model, images, metas)[0], atol=1e-5, rtol=1e-4)


def test_nested_models_multiple_outputs_and_passthrough(tmp_path):
    inner = keras.Sequential(
        [keras.Input((6,)), layers.Dense(4, name="inner_dense"), layers.Activation("tanh")],
        name="inner",
    )
    a = keras.Input((6,), name="a")
    b = keras.Input((6,), name="b")
    first = layers.Dense(3, name="first")(inner(a))
    second = layers.Identity(name="second")(b)  # an output that is an input
    model = keras.Model([a, b], [first, second, layers.Add(name="sum")([inner(b), inner(a)])])
    result = export_onnx(model, tmp_path / "m.onnx")
    assert result.input_names == ["a", "b"]
    assert result.output_names == ["first", "second", "sum"]
    xa, xb = _images(2, (6,), 1), _images(2, (6,), 2)
    for actual, expected in zip(
        _run(tmp_path / "m.onnx", {"a": xa, "b": xb}), _keras(model, xa, xb), strict=True
    ):
        np.testing.assert_allclose(actual, expected, atol=1e-6, rtol=1e-5)


def test_layer_map_in_metadata(tmp_path):
    export_onnx(_small_cnn(), tmp_path / "cnn.onnx")
    proto = onnx.load(str(tmp_path / "cnn.onnx"))
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert metadata["keras_bn.input_layout"] == "channels_last"
    layer_map = json.loads(metadata[METADATA_LAYER_OUTPUTS])
    produced = {name for node in proto.graph.node for name in node.output}
    assert layer_map["stem"] == [["stem/Relu", [0, 3, 1, 2]]]
    assert layer_map["logits"] == [["logits", [0, 1]]]
    assert layer_map["pad"] == [None]  # pending padding: no ONNX value of its own
    for entries in layer_map.values():
        for entry in entries:
            assert entry is None or entry[0] in produced


# --------------------------------------------------------------------------------------
# Structural checks.


def _proto(nodes, initializers, inputs=("x",)):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 2, 3, 3]) for name in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[
            numpy_helper.from_array(np.ones(shape, np.float32), name)
            for name, shape in initializers
        ],
    )
    return helper.make_model(graph)


CONV = helper.make_node("Conv", ["x", "w"], ["c"], name="conv")
WEIGHT = ("w", (2, 2, 1, 1))


def test_structure_check_passes_a_clean_graph():
    proto = _proto([CONV, helper.make_node("Relu", ["c"], ["y"], name="relu")], [WEIGHT])
    report = check_structure(proto, ["x"])
    assert report.errors == [] and report.warnings == []


@pytest.mark.parametrize(
    ("nodes", "initializers", "inputs", "match"),
    [
        pytest.param(
            [CONV, helper.make_node("Add", ["c", "z"], ["y"])],
            [WEIGHT],
            ("x", "z"),
            "graph inputs are",
            id="extra-input",
        ),
        pytest.param(
            [CONV, helper.make_node("Relu", ["c"], ["y"])],
            [WEIGHT, ("unused", (2,))],
            ("x",),
            "used by no node",
            id="unused-initializer",
        ),
        pytest.param(
            [CONV, helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])],
            [WEIGHT] + [(n, (2,)) for n in "sbmv"],
            ("x",),
            "BatchNormalization nodes",
            id="batch-norm-node",
        ),
    ],
)
def test_structure_check_errors(nodes, initializers, inputs, match):
    report = check_structure(_proto(nodes, initializers, inputs), ["x"])
    assert any(match in error for error in report.errors), report.errors


def test_structure_check_warns_about_batch_norm_shaped_mul_add():
    nodes = [
        CONV,
        helper.make_node("Mul", ["c", "s"], ["m"], name="mul"),
        helper.make_node("Add", ["m", "t"], ["y"], name="add"),
    ]
    report = check_structure(_proto(nodes, [WEIGHT, ("s", (2, 1, 1)), ("t", (2, 1, 1))]), ["x"])
    assert report.errors == []
    assert len(report.warnings) == 1 and "conv -> mul -> add" in report.warnings[0]
    # A residual add (LayerScale, CustomScaleLayer) is not a batch normalization.
    residual = [
        CONV,
        helper.make_node("Mul", ["c", "s"], ["m"], name="mul"),
        helper.make_node("Add", ["m", "x"], ["y"], name="add"),
    ]
    assert check_structure(_proto(residual, [WEIGHT, ("s", (2, 1, 1))]), ["x"]).warnings == []


def test_unfolded_batch_norm_is_exported_with_a_warning(tmp_path):
    model = _with_batch_norm()
    with pytest.warns(ExportWarning, match=r"export_onnx\(fold=True\) folds them"):
        result = export_onnx(model, tmp_path / "bn.onnx")
    assert len(result.warnings) == 1 and "conv -> bn -> bn/Add" in result.warnings[0]
    assert "BatchNormalization" not in result.op_counts
    x = _images(2)
    np.testing.assert_allclose(
        _run(tmp_path / "bn.onnx", {"image": x})[0], _keras(model, x)[0], atol=1e-4, rtol=1e-4
    )


def test_folded_model_exports_without_warning(tmp_path):
    """Fold by hand (NumPy) and check the export is clean: no BN, no Mul/Add at all."""
    model = _with_batch_norm()
    conv, bn = model.get_layer("conv"), model.get_layer("bn")
    scale = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    x = keras.Input((8, 8, 3), name="image")
    folded_conv = layers.Conv2D(4, 3, name="conv")
    folded = keras.Model(x, layers.Flatten()(layers.ReLU()(folded_conv(x))))
    folded_conv.set_weights(
        [
            conv.kernel.numpy() * scale,
            (conv.bias.numpy() - bn.moving_mean.numpy()) * scale + bn.beta.numpy(),
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)
        result = export_onnx(folded, tmp_path / "folded.onnx")
    assert result.warnings == []
    assert not {"BatchNormalization", "Mul", "Add"} & set(result.op_counts)
    images = _images(2)
    np.testing.assert_allclose(
        _run(tmp_path / "folded.onnx", {"image": images})[0],
        _keras(model, images)[0],
        atol=1e-4,
        rtol=1e-4,
    )


def _every_fold_rule():
    """Every fold rule, forward and backward, inside a nested model too, and two BNs
    that stay: one after a shared layer, one between a ReLU and a padded conv."""
    inner_input = keras.Input((8, 8, 6))
    inner = keras.Model(
        inner_input,
        layers.BatchNormalization(name="inner_bn")(
            layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="inner_dw")(
                inner_input
            )
        ),
        name="inner",
    )
    shared = layers.Conv2D(6, 1, use_bias=False, name="shared")
    x = keras.Input((8, 8, 3), name="image")
    a = layers.BatchNormalization(name="bn_a")(shared(layers.Conv2D(6, 3, padding="same")(x)))
    b = shared(layers.Conv2D(6, 1, name="b_in")(x))  # the second call: no BN after it
    h = layers.Add()([layers.ReLU()(a), b])
    h = inner(h)
    h = layers.BatchNormalization(name="bn_sep")(
        layers.SeparableConv2D(8, 3, padding="same", depth_multiplier=2, name="sep")(h)
    )
    h = layers.BatchNormalization(name="bn_grouped")(
        layers.Conv2D(8, 3, groups=2, strides=2, name="grouped")(h)
    )
    h = layers.BatchNormalization(name="bn_up")(
        layers.Conv2DTranspose(4, 3, strides=2, output_padding=1, name="up")(h)
    )
    h = layers.BatchNormalization(name="bn_stays")(layers.ReLU()(h))
    h = layers.Conv2D(4, 3, padding="same", name="padded")(h)
    h = layers.GlobalAveragePooling2D()(h)
    h = layers.Dense(6, name="backward_dense")(layers.BatchNormalization(name="bn_back")(h))
    model = keras.Model(x, h, name="every_rule")
    return randomize_batch_norms(model, seed=1)


def test_fold_while_exporting_writes_the_folded_models_file(tmp_path):
    """export_onnx(fold=True) against fold_batch_norms + export_onnx: the same
    decisions, byte-identical weights, the same operators, identical outputs."""
    from keras_bn.converters.folding import fold_batch_norms

    model = _every_fold_rule()
    before = [w.copy() for w in model.get_weights()]
    folded, report = fold_batch_norms(model, measure=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)
        export_onnx(folded, tmp_path / "two_steps.onnx")
        result = export_onnx(model, tmp_path / "one_step.onnx", fold=True)

    assert [e.to_dict() for e in result.fold_report.entries] == [
        e.to_dict() for e in report.entries
    ]
    assert result.fold_report.folded_count == 5 and result.fold_report.not_folded_count == 2
    assert result.to_dict()["fold_report"]["folded_count"] == 5
    two, one = onnx.load(tmp_path / "two_steps.onnx"), onnx.load(tmp_path / "one_step.onnx")
    assert sorted(t.raw_data for t in two.graph.initializer) == sorted(
        t.raw_data for t in one.graph.initializer
    )
    assert sorted(n.op_type for n in two.graph.node) == sorted(n.op_type for n in one.graph.node)
    images = _images(3)
    np.testing.assert_array_equal(
        _run(tmp_path / "one_step.onnx", {"image": images})[0],
        _run(tmp_path / "two_steps.onnx", {"image": images})[0],
    )
    # Judged against a float64 run, not an elementwise tolerance: the weights are
    # unseeded draws, and a small output next to outputs of 1e4 missed rtol=1e-4 by
    # float32 noise on some draws.
    from keras_bn.converters.comparison import compare_arrays, judge_against_exact
    from keras_bn.converters.reference import float64_twin

    onnx_out = _run(tmp_path / "one_step.onnx", {"image": images})[0]
    keras_out = np.asarray(_keras(model, images)[0])
    exact_out = float64_twin(model, [images])([images])[0]
    verdict = judge_against_exact(
        compare_arrays(onnx_out, keras_out), onnx_out, keras_out, exact_out
    )
    assert verdict.passed, verdict
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)  # the input model is untouched


def test_fold_while_exporting_keeps_the_layer_map_comparable(tmp_path):
    """The layer map (for localization) lists only ONNX tensors that hold a Keras
    layer's output."""
    model = _every_fold_rule()
    with warnings.catch_warnings():
        # bn_a stays (after a shared layer): the fold report says why; no warning
        # advises export_onnx(fold=True) to a call that passed it (it did before)
        warnings.simplefilter("error", ExportWarning)
        result = export_onnx(model, tmp_path / "m.onnx", fold=True)
    (bn_a,) = [e for e in result.fold_report.entries if e.batch_norm == "bn_a"]
    assert not bn_a.folded and "producer-shared" in bn_a.blocked_by
    metadata = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    layer_map = json.loads(metadata[METADATA_LAYER_OUTPUTS])
    entries = {key.split("/")[-1].split(":")[0]: value for key, value in layer_map.items()}
    # A layer that absorbed a forward fold computes layer + BN: that is the BN's output.
    # A BN folded backward vanishes; the layer after it computes what it did.
    for name in ("inner_dw", "sep", "grouped", "up", "bn_back"):
        assert entries[name] == [None], name
    for name in ("inner_bn", "bn_sep", "bn_grouped", "bn_up", "backward_dense"):
        assert entries[name] != [None], name
    for name in ("shared", "bn_a", "bn_stays", "padded"):
        assert entries[name] != [None], name

    # Conv -> BN -> BN, both folded forward: only the last BN's output exists.
    x = keras.Input((8, 8, 3), name="image")
    h = layers.BatchNormalization(name="second")(
        layers.BatchNormalization(name="first")(layers.Conv2D(4, 3, name="conv")(x))
    )
    chain = keras.Model(x, layers.ReLU(name="relu")(h))
    result = export_onnx(chain, tmp_path / "chain.onnx", fold=True)
    assert result.fold_report.folded_count == 2
    metadata = {p.key: p.value for p in onnx.load(tmp_path / "chain.onnx").metadata_props}
    layer_map = json.loads(metadata[METADATA_LAYER_OUTPUTS])
    assert layer_map["conv"] == [None] and layer_map["first"] == [None]
    assert layer_map["second"] != [None] and layer_map["relu"] != [None]


# --------------------------------------------------------------------------------------
# Unsupported layers and the fallback.


def _unsupported_model():
    x = keras.Input((6,), name="x")
    # traced: its erfinv (no rule) is named by the Lambda's path
    h = layers.Lambda(lambda t: keras.ops.erfinv(0.1 * t), name="doubler")(x)
    # traced through its activation function, whose erfinv has no rule either
    h = layers.Dense(4, activation=lambda t: keras.ops.erfinv(0.1 * t), name="custom_activation")(h)
    h = layers.Lambda(lambda t: keras.ops.flip(t, axis=1), name="flipper")(h)
    return keras.Model(x, h, name="unsupported")


def test_unsupported_layers_are_all_named(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"previous")
    with pytest.raises(UserInputError) as error:
        export_onnx(_unsupported_model(), tmp_path / "m.onnx")
    message = str(error.value)
    assert "3 layer(s)" in message and "\n" not in message
    for name in (
        "'doubler/",
        "(Erfinv: no ONNX rule",
        "'custom_activation/",
        "'flipper/flip' (Flip: no ONNX rule",
    ):
        assert name in message
    assert "fallback=True" in message and "--fallback" in message
    assert (tmp_path / "m.onnx").read_bytes() == b"previous"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary left


def test_fallback_uses_keras_exporter(tmp_path):
    x = keras.Input((6,), name="x")
    cbrt = layers.Lambda(lambda t: keras.ops.cbrt(t))  # no rule for Cbrt; tf2onnx has one
    model = keras.Model(x, layers.Dense(3)(cbrt(x)), name="fb")
    import importlib.util

    if importlib.util.find_spec("tf2onnx") is None and keras.backend.backend() == "tensorflow":
        with pytest.raises(UserInputError, match="pip install tf2onnx"):
            export_onnx(model, tmp_path / "fb.onnx", fallback=True)
        return
    with pytest.warns(ExportWarning, match="Falling back"):
        result = export_onnx(model, tmp_path / "fb.onnx", fallback=True)
    assert result.used_fallback
    features = _images(3, (6,))
    session = ort.InferenceSession(str(tmp_path / "fb.onnx"), providers=["CPUExecutionProvider"])
    actual = session.run(None, {session.get_inputs()[0].name: features})[0]
    np.testing.assert_allclose(actual, _keras(model, features)[0], atol=1e-5, rtol=1e-4)


def test_fallback_with_fold_exports_the_folded_model(tmp_path):
    """fold=True + fallback: Keras's exporter gets the folded Keras model."""
    import importlib.util

    x = keras.Input((6,), name="x")
    bn = layers.BatchNormalization(name="bn")
    h = bn(layers.Dense(4, name="dense")(x))
    model = keras.Model(x, layers.Lambda(lambda t: keras.ops.cbrt(t))(h), name="fb_fold")
    bn.moving_mean.assign([0.5, -1.0, 2.0, 0.0])
    bn.moving_variance.assign([0.25, 4.0, 1.0, 9.0])
    if importlib.util.find_spec("tf2onnx") is None and keras.backend.backend() == "tensorflow":
        with pytest.raises(UserInputError, match="pip install tf2onnx"):
            export_onnx(model, tmp_path / "fb.onnx", fallback=True, fold=True)
        return
    with pytest.warns(ExportWarning, match="Falling back"):
        result = export_onnx(model, tmp_path / "fb.onnx", fallback=True, fold=True)
    assert result.used_fallback and result.fold_report.folded_count == 1
    assert "BatchNormalization" not in result.op_counts
    features = _images(3, (6,))
    session = ort.InferenceSession(str(tmp_path / "fb.onnx"), providers=["CPUExecutionProvider"])
    actual = session.run(None, {session.get_inputs()[0].name: features})[0]
    np.testing.assert_allclose(actual, _keras(model, features)[0], atol=1e-5, rtol=1e-4)


def test_never_called_subclassed_model_is_a_user_error(tmp_path):
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Subclassed()  # a called one exports: tests/graph/test_subclassed_models.py
    with pytest.raises(UserInputError, match="no known input shape"):
        export_onnx(model, tmp_path / "m.onnx")


# --------------------------------------------------------------------------------------
# Files.


def test_existing_file_is_replaced_atomically(tmp_path):
    path = tmp_path / "cnn.onnx"
    path.write_bytes(b"old")
    export_onnx(_small_cnn(), path)
    onnx.checker.check_model(str(path), full_check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]


def test_external_data(tmp_path):
    model = _small_cnn()
    result = export_onnx(model, tmp_path / "cnn.onnx", external_data=True)
    assert result.external_data == "cnn.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx", "cnn.onnx.data"]
    proto = onnx.load(str(tmp_path / "cnn.onnx"), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external and all(len(t.raw_data) == 0 for t in external)
    x = _images(2)
    np.testing.assert_allclose(
        _run(tmp_path / "cnn.onnx", {"image": x})[0], _keras(model, x)[0], atol=1e-5, rtol=1e-4
    )


def test_external_data_without_a_large_weight_writes_no_data_file(tmp_path):
    """Every initializer 1 KiB or less stays inline: no empty, unreferenced .data file."""
    inputs = keras.Input((3,), name="x")
    model = keras.Model(inputs, layers.Dense(2)(inputs))
    result = export_onnx(model, tmp_path / "tiny.onnx", external_data=True)
    assert result.external_data is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]
    x = np.random.default_rng(0).normal(size=(2, 3)).astype("float32")
    np.testing.assert_allclose(
        _run(tmp_path / "tiny.onnx", {"x": x})[0], _keras(model, x)[0], atol=1e-6
    )


def test_external_data_is_automatic_above_the_threshold(tmp_path, monkeypatch):
    from keras_bn.converters.onnx import export as onnx_export

    model = _small_cnn()
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1000)  # stands for 2 GB
    assert export_onnx(model, tmp_path / "big.onnx").external_data == "big.onnx.data"
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 10**9)
    assert export_onnx(model, tmp_path / "small.onnx").external_data is None
    x = _images(1)
    np.testing.assert_allclose(
        _run(tmp_path / "big.onnx", {"image": x})[0], _keras(model, x)[0], atol=1e-5, rtol=1e-4
    )


# --------------------------------------------------------------------------------------
# Channels-first layers. TensorFlow cannot run channels-first convolutions on CPU, but
# Keras stores kernels the same way for both data formats: a channels-first model equals
# its channels-last twin (same weights) between transposes, and the twin runs here.

CF = "channels_first"
CHANNELS_FIRST = {
    "conv-bn-pool-gap": (
        (3, 9, 9),
        lambda df: [
            layers.Conv2D(4, 3, strides=2, padding="same", data_format=df),
            layers.BatchNormalization(axis=1 if df == CF else -1),
            layers.MaxPooling2D(2, padding="same", data_format=df),
            layers.GlobalAveragePooling2D(data_format=df, keepdims=True),
        ],
    ),
    "depthwise-upsampling-padding": (
        (3, 6, 6),
        lambda df: [
            layers.DepthwiseConv2D(3, depth_multiplier=2, data_format=df),
            layers.UpSampling2D(2, data_format=df, interpolation="bilinear"),
            layers.ZeroPadding2D(1, data_format=df),
            layers.Conv2D(2, 3, data_format=df),
        ],
    ),
    "transpose-crop-average": (
        (2, 7, 6),
        lambda df: [
            layers.Conv2DTranspose(3, 3, strides=2, padding="same", data_format=df),
            layers.Cropping2D(1, data_format=df),
            layers.AveragePooling2D(2, data_format=df),
        ],
    ),
    "separable-conv1d-group-norm": (
        (3, 9),
        lambda df: [
            layers.SeparableConv1D(4, 3, data_format=df),
            layers.GroupNormalization(2, axis=1 if df == CF else -1),
        ],
    ),
    "conv3d-global-max": (
        (2, 5, 5, 4),
        lambda df: [
            layers.Conv3D(3, 2, data_format=df),
            layers.GlobalMaxPooling3D(data_format=df),
        ],
    ),
}


@pytest.mark.parametrize(("shape", "stack"), CHANNELS_FIRST.values(), ids=CHANNELS_FIRST.keys())
def test_channels_first_layers(shape, stack, tmp_path):
    first = keras.Sequential([keras.Input(shape, name="input"), *stack(CF)], name="first")
    last_shape = (*shape[1:], shape[0])
    last = keras.Sequential([keras.Input(last_shape), *stack("channels_last")], name="last")
    rng = np.random.default_rng(0)
    weights = [rng.normal(0.5, 0.5, w.shape).astype("float32") for w in first.get_weights()]
    first.set_weights(
        [
            np.abs(w) if "variance" in v.path else w
            for w, v in zip(weights, first.weights, strict=True)
        ]
    )
    last.set_weights(first.get_weights())
    result = export_onnx(first, tmp_path / "first.onnx")
    assert "Transpose" not in result.op_counts  # already channels-first
    x = rng.standard_normal((2, *shape)).astype("float32")
    rank = x.ndim
    to_last = (0, *range(2, rank), 1)
    expected = _keras(last, np.transpose(x, to_last))[0]
    if expected.ndim == rank:
        expected = np.transpose(expected, (0, rank - 1, *range(1, rank - 1)))
    actual = _run(tmp_path / "first.onnx", {"input": x})[0]
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-4)


def test_flatten_channels_first_data_format(tmp_path):
    x = keras.Input((3, 2, 4), name="input")
    model = keras.Model(x, layers.Flatten(data_format=CF)(x))
    export_onnx(model, tmp_path / "flatten.onnx")
    images = _images(2, (3, 2, 4))
    expected = images.transpose(0, 2, 3, 1).reshape(2, -1)  # Keras moves channels last first
    np.testing.assert_array_equal(_run(tmp_path / "flatten.onnx", {"input": images})[0], expected)


# --------------------------------------------------------------------------------------
# Another backend exports the same graph: the exporter reads configs and weights only.

JAX_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np, keras
    sys.path.insert(0, sys.argv[1])
    from support.models import tiny_model
    from keras_bn.converters.onnx.export import export_onnx

    assert keras.backend.backend() == "jax"
    model = tiny_model()
    weights = np.load(sys.argv[2])
    model.set_weights([weights[f"arr_{i}"] for i in range(len(weights.files))])
    export_onnx(model, sys.argv[3])
    """
)


@pytest.mark.slow
def test_jax_backend_exports_the_same_graph(tmp_path):
    model = tiny_model()
    rng = np.random.default_rng(0)
    model.set_weights(
        [np.abs(rng.normal(0.5, 0.5, w.shape)).astype("float32") for w in model.get_weights()]
    )
    np.savez(tmp_path / "weights.npz", *model.get_weights())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)  # the unfolded BN
        export_onnx(model, tmp_path / "tensorflow.onnx")
    script = tmp_path / "jax_script.py"
    script.write_text(JAX_SCRIPT)
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    completed = subprocess.run(
        [
            sys.executable,
            str(script),
            tests_dir,
            str(tmp_path / "weights.npz"),
            str(tmp_path / "jax.onnx"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    ours = onnx.load(str(tmp_path / "tensorflow.onnx"))
    theirs = onnx.load(str(tmp_path / "jax.onnx"))
    assert ours.graph.node == theirs.graph.node
    assert ours.graph.initializer == theirs.graph.initializer
    assert len(ours.graph.node) > 5


def test_mixed_precision_layers_that_pass_their_input_on_cast_it_as_keras_does(tmp_path):
    """Under mixed_float16 a layer casts its float32 inputs to float16 on entry (Keras's
    autocast), also one that passes its input on (Dropout, Identity, ZeroPadding2D left
    pending for the convolution, Permute, Cropping2D): the convolution after each reads
    float16. Before, each left its input float32 and the export was refused by onnx's
    checker (an internal error)."""
    mixed = {"dtype": "mixed_float16"}
    inputs = keras.Input((8, 8, 3), name="image")
    branches = [
        layers.Dropout(0.2, **mixed),
        layers.Identity(**mixed),
        layers.ZeroPadding2D(1, **mixed),
        layers.Permute((2, 1, 3), **mixed),
        layers.Cropping2D(1, **mixed),
        layers.GaussianNoise(0.1, **mixed),
    ]
    pooled = []
    for index, layer in enumerate(branches):
        x = layers.Conv2D(4, 3, name=f"conv_{index}", **mixed)(layer(inputs))
        pooled.append(layers.GlobalAveragePooling2D(**mixed)(x))
    outputs = layers.Dense(3, dtype="float32")(layers.Concatenate(**mixed)(pooled))
    model = keras.Model(inputs, outputs)
    path = tmp_path / "mixed.onnx"
    export_onnx(model, path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    x = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)).astype("float32")
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"image": x}
    )
    want = np.asarray(model(x, training=False), np.float64)
    # Keras and the file both compute in float16: a few of its roundings apart.
    assert np.abs(got[0] - want).max() <= 16 * 2.0**-11 * np.abs(want).max()

"""Subclassed ``keras.Model`` (research-style code): traced like a subclassed layer.

A model with its own ``call()`` has no layer graph; the converter calls it once in
a Functional wrapper on inputs of the shapes it was built for
(``graph.with_graph``) and traces that call, so its BatchNormalizations fold, at
the top level and nested in a Functional model, through the API and the CLI.
"""

from __future__ import annotations

import json
import textwrap

import keras
import numpy as np
import onnx
import pytest
from support.checks import assert_exports_exactly, float64_build
from support.models import batch_norm_layers, randomize_batch_norms

from keras_bn.converters import cli
from keras_bn.converters.errors import UserInputError
from keras_bn.converters.graph import flatten
from keras_bn.converters.onnx.export import export_onnx

SHAPE = (12, 12, 3)

# The research-style model, as source: the tests define it from this text, the CLI
# test writes it to a module loaded with --custom-objects.
NET_SOURCE = textwrap.dedent(
    '''
    import keras
    from keras import layers


    class ResidualNet(keras.Model):
        """Conv-BN-ReLU blocks, a residual add, global pooling and a classifier."""

        def __init__(self, filters=8, classes=5, **kwargs):
            super().__init__(**kwargs)
            self.filters, self.classes = filters, classes
            self.stem = layers.Conv2D(filters, 3, padding="same", use_bias=False)
            self.stem_bn = layers.BatchNormalization()
            self.conv = layers.Conv2D(filters, 3, padding="same")
            self.bn = layers.BatchNormalization()
            self.pool = layers.GlobalAveragePooling2D()
            self.head = layers.Dense(classes)

        def call(self, x, training=False):
            y = keras.ops.relu(self.stem_bn(self.stem(x), training=training))
            z = self.bn(self.conv(y), training=training)
            return self.head(self.pool(keras.ops.relu(y + z)))

        def get_config(self):
            return {**super().get_config(), "filters": self.filters, "classes": self.classes}
    '''
)
_namespace: dict = {}
exec(compile(NET_SOURCE, "residual_net.py", "exec"), _namespace)
ResidualNet = _namespace["ResidualNet"]


def _top_level():
    model = ResidualNet(name="net")
    model(np.zeros((2, *SHAPE), "float32"))  # built by a call, as research code does
    return model


def _nested():
    inputs = keras.Input(SHAPE, name="image")
    x = keras.layers.Conv2D(4, 1, name="entry")(inputs)
    x = keras.layers.BatchNormalization(name="entry_bn")(x)
    outputs = ResidualNet(name="body")(x)
    return keras.Model(inputs, outputs, name="outer")


def _inputs(batch):
    return [np.random.default_rng(batch).standard_normal((batch, *SHAPE)).astype("float32")]


@pytest.mark.parametrize("build", [_top_level, _nested], ids=["top-level", "nested"])
def test_subclassed_model_folds_and_exports_exactly(build, tmp_path):
    model = build()
    randomize_batch_norms(model)
    assert len(batch_norm_layers(model)) >= 2
    twin = float64_build(build, model)
    result = assert_exports_exactly(model, tmp_path / "m.onnx", _inputs, twin=twin)
    onnx_model = onnx.load(str(tmp_path / "m.onnx"))
    op_types = [node.op_type for node in onnx_model.graph.node]
    assert "BatchNormalization" not in op_types
    assert op_types.count("Conv") == (3 if build is _nested else 2), op_types
    # every BN folded into its convolution: no Mul/Add pair left for one
    assert "Mul" not in op_types, op_types
    folded = [entry for entry in result.fold_report.entries if entry.folded]
    assert len(folded) == len(batch_norm_layers(model)), result.fold_report


def test_subclassed_model_is_traced_not_inlined():
    model = _top_level()
    graph = flatten(model)  # untraced: one call of the model
    assert [type(node.layer).__name__ for node in graph.nodes] == ["ResidualNet"]
    assert graph.inputs[0].shape == (None, *SHAPE)  # the build's batch size left unknown
    traced = flatten(model, lambda layer: isinstance(layer, ResidualNet))
    kinds = [type(node.layer).__name__ for node in traced.nodes]
    assert kinds.count("BatchNormalization") == 2 and kinds[-1] == "Dense", kinds
    assert all(node.name.startswith("net/") for node in traced.nodes)


def test_unbuilt_subclassed_model_says_how_to_build_it(tmp_path):
    with pytest.raises(UserInputError, match=r"has no known input shape.*call it on a batch"):
        export_onnx(ResidualNet(name="fresh"), tmp_path / "m.onnx")


def test_cli_exports_saved_subclassed_model(tmp_path, capsys):
    module = tmp_path / "residual_net.py"
    module.write_text(NET_SOURCE)
    namespace: dict = {}
    exec(compile(NET_SOURCE, str(module), "exec"), namespace)
    model = namespace["ResidualNet"](name="net")  # unregistered: loading needs the module
    model(np.zeros((2, *SHAPE), "float32"))
    randomize_batch_norms(model)
    path = tmp_path / "net.keras"
    model.save(path)
    out_path = tmp_path / "net.onnx"
    code = cli.main(
        ["export", str(path), "-o", str(out_path)]
        + ["--custom-objects", f"{module}:ResidualNet", "--json"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["status"] == "ok", report
    onnx_model = onnx.load(str(out_path))
    assert "BatchNormalization" not in [node.op_type for node in onnx_model.graph.node]
    import onnxruntime as ort

    session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    x = _inputs(3)[0]
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(
        session.run(None, {session.get_inputs()[0].name: x})[0], expected, rtol=1e-4, atol=1e-4
    )

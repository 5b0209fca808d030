"""Tests of the Keras-internals module: flattening and rebuilding model graphs."""

import keras
import numpy as np
import pytest

from keras_bn.converters import graph as graph_lib


def _nested_shared_model():
    inner = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(4, name="inner_dense"),
            keras.layers.BatchNormalization(name="inner_bn"),
        ],
        name="inner",
    )
    x = keras.Input((8,), name="x")
    y = keras.Input((8,), name="y")
    shared = keras.layers.Dense(8, name="shared")
    out = keras.layers.Add(name="add")([inner(shared(x)), inner(shared(y))])
    return keras.Model([x, y], out, name="outer")


def test_flatten_inlines_nested_models_and_keeps_shared_calls():
    model = _nested_shared_model()
    graph = graph_lib.flatten(model)
    names = [node.name for node in graph.nodes]
    assert sorted(names) == sorted(
        [
            "shared",
            "shared",
            "inner/inner_dense",
            "inner/inner_dense",
            "inner/inner_bn",
            "inner/inner_bn",
            "add",
        ]
    )
    assert graph.input_names == ["x", "y"]
    shared = model.get_layer("shared")
    assert len(graph.call_sites(shared)) == 2
    # Topological order: every node's inputs are graph inputs or produced earlier.
    produced = {id(t) for t in graph.inputs}
    for node in graph.nodes:
        assert all(id(t) in produced for t in node.inputs), node
        produced.update(id(t) for t in node.outputs)
    add = graph.nodes[-1]
    assert add.layer.name == "add" and len(add.inputs) == 2
    assert all(t.producer.layer.name == "inner_bn" for t in add.inputs)
    assert graph.outputs == add.outputs


def test_rebuild_identity_reproduces_outputs():
    model = _nested_shared_model()
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(3, 8)).astype("float32") for _ in range(2)]
    rebuilt = graph_lib.rebuild(
        graph_lib.flatten(model), lambda node, args, kwargs: node.layer(*args, **kwargs)
    )
    np.testing.assert_allclose(rebuilt(inputs), model(inputs), rtol=1e-6, atol=1e-6)
    assert not any(graph_lib.is_model(layer) for layer in rebuilt.layers)


def test_rebuild_can_drop_nodes():
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(3, name="d"),
            keras.layers.BatchNormalization(name="bn"),
        ]
    )
    graph = graph_lib.flatten(model)

    def call(node, args, kwargs):
        if node.layer.name == "bn":
            return args[0]
        return node.layer(*args, **kwargs)

    rebuilt = graph_lib.rebuild(graph, call)
    assert [layer.name for layer in rebuilt.layers[1:]] == ["d"]
    x = np.ones((2, 5), "float32")
    np.testing.assert_allclose(rebuilt(x), model.get_layer("d")(x), rtol=1e-6)


def test_unbuilt_sequential_and_never_called_subclassed_models_are_rejected():
    with pytest.raises(ValueError, match="no known input shape"):
        graph_lib.flatten(keras.Sequential([keras.layers.Dense(2)]))

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="Subclassed model .* has no known input shape"):
        graph_lib.flatten(Sub())

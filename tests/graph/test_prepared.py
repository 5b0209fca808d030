"""The run object: a model flattened once, its inputs, and the stages that take it."""

import concurrent.futures
import inspect

import keras
import numpy as np
import pytest
from support.models import calibrate_batch_norms

import keras_bn.converters
from keras_bn.converters import cli
from keras_bn.converters import graph as graph_lib
from keras_bn.converters.onnx.rules import needs_tracing
from keras_bn.converters.prepared import InputSpec, prepare
from keras_bn.converters.reference import KerasReference
from keras_bn.converters.samples import call_model, make_sample_inputs
from keras_bn.converters.validation import validate_onnx

L = keras.layers


def _conv_bn(last=None):
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="conv")(inputs))
    if last is not None:
        x = last(x)
    outputs = L.Dense(2, name="dense")(L.GlobalAveragePooling2D(name="pool")(x))
    model = keras.Model(inputs, outputs, name="conv_bn")
    calibrate_batch_norms(model, np.random.default_rng(0).normal(size=(16, 8, 8, 3)))
    return model


@pytest.fixture
def flatten_calls(monkeypatch):
    """Every ``graph.flatten`` call from here on, as ``"untraced"``/``"traced"``."""
    calls = []
    flatten = graph_lib.flatten

    def counted(model, trace=None):
        calls.append("untraced" if trace is None else "traced")
        return flatten(model, trace)

    monkeypatch.setattr(graph_lib, "flatten", counted)
    return calls


def test_prepare_flattens_once_and_describes_the_inputs(flatten_calls):
    model = _conv_bn()
    prepared = prepare(model)
    assert prepare(prepared) is prepared
    assert flatten_calls == ["untraced"]
    assert prepared.inputs == [InputSpec("image", (None, 8, 8, 3), "float32")]
    assert prepared.input_names == ["image"] and prepared.name == "conv_bn"
    assert [node.name for node in prepared.graph.nodes] == [
        "conv",
        "bn",
        "pool",
        "dense",
    ]
    # No layer needs tracing: the traced graph is the graph itself, not flattened again.
    assert prepared.traced(needs_tracing) is prepared.graph
    assert flatten_calls == ["untraced"]


def test_the_traced_graph_is_made_once_on_request(flatten_calls):
    model = _conv_bn(L.Lambda(lambda t: t * 3.0 + 1.0, name="affine"))
    prepared = prepare(model)
    assert flatten_calls == ["untraced"]
    assert "affine" in [node.name for node in prepared.graph.nodes]  # one node, untraced
    traced = prepared.traced(needs_tracing)
    assert traced is prepared.traced(needs_tracing)
    assert flatten_calls == ["untraced", "traced"]
    # The Lambda's call is inlined as keras.ops operations in its scope.
    inside = [node for node in traced.nodes if node.scope == "affine"]
    assert inside and all(not isinstance(node.layer, L.Lambda) for node in inside)


def test_stages_take_the_prepared_model_without_flattening_again(tmp_path, flatten_calls):
    """Samples, the Keras run, export (with folding) and validation of one prepared
    model: the model is flattened once."""
    from keras_bn.converters.onnx.export import export_onnx

    prepared = prepare(_conv_bn())
    inputs = make_sample_inputs(prepared, 3, seed=1)
    outputs = call_model(prepared, inputs)
    expected = keras.ops.convert_to_numpy(prepared.model(inputs["image"], training=False))
    np.testing.assert_array_equal(outputs[0], expected)
    result = export_onnx(prepared, tmp_path / "m.onnx", fold=True)
    assert result.fold_report.folded_count == 1
    assert validate_onnx(prepared, tmp_path / "m.onnx")
    assert flatten_calls == ["untraced"]


def test_input_domains_are_inferred_once(monkeypatch):
    from keras_bn.converters import prepared as prepared_module

    model = _conv_bn()
    calls = []
    infer = prepared_module.domain_details
    monkeypatch.setattr(
        prepared_module, "domain_details", lambda graph: calls.append(1) or infer(graph)
    )
    prepared = prepare(model)
    first = make_sample_inputs(prepared, 2, seed=0)
    again = make_sample_inputs(prepared, 2, seed=0)
    np.testing.assert_array_equal(first["image"], again["image"])
    assert len(calls) == 1 and prepared.domain_details.keys() == infer(prepared.graph).keys()


def _bn_model_file(tmp_path, last=None):
    path = tmp_path / "model.keras"
    _conv_bn(last).save(path)
    return path


def test_one_flatten_per_export_run(tmp_path, flatten_calls, capsys):
    """``keras-bn export`` (fold, export, validate) of a model whose layers all have an
    ONNX rule flattens it exactly once, untraced: no tracing is needed, and the
    traced graph export asks for is that same graph."""
    path = _bn_model_file(tmp_path)
    flatten_calls.clear()  # saving may have flattened nothing, but count from here
    code = cli.main(["export", str(path), "-o", str(tmp_path / "m.onnx")])
    assert code == 0, capsys.readouterr().err
    assert flatten_calls == ["untraced"]


def test_one_untraced_and_one_traced_flatten_when_a_layer_is_traced(
    tmp_path, flatten_calls, capsys
):
    """A Lambda layer has no ONNX rule: export traces it. The model is flattened
    once untraced (samples, Keras's run, validation) and once traced (fold and
    export), no more."""
    path = _bn_model_file(tmp_path, L.Lambda(lambda t: t * 3.0 + 1.0, name="affine"))
    flatten_calls.clear()
    code = cli.main(["export", str(path), "--unsafe", "-o", str(tmp_path / "m.onnx")])
    assert code == 0, capsys.readouterr().err
    assert sorted(flatten_calls) == ["traced", "untraced"]


def test_keras_reference_started_in_the_background_is_validations_reference(tmp_path):
    from keras_bn.converters.onnx.export import export_onnx

    prepared = prepare(_conv_bn())
    export_onnx(prepared, tmp_path / "m.onnx", fold=True)
    started = KerasReference.start(prepared, batch_size=3, seed=4)
    assert started.inputs["image"].shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(
        started.inputs["image"], make_sample_inputs(prepared, 3, seed=4)["image"]
    )
    np.testing.assert_array_equal(started.outputs()[0], call_model(prepared, started.inputs)[0])
    report = validate_onnx(prepared, tmp_path / "m.onnx", reference=started)
    assert report and [c.batch_size for c in report.comparisons] == [1, 3]


def test_keras_reference_reraises_the_runs_error():
    class Broken(Exception):
        pass

    def guard():
        raise Broken("from the guard")

    reference = KerasReference.start(prepare(_conv_bn()), guard=guard)
    assert reference.inputs["image"].shape == (2, 8, 8, 3)
    with pytest.raises(Broken, match="from the guard"):
        reference.outputs()


def _public_callables():
    """Every public function, class and method of the converter's modules."""
    import importlib
    import pkgutil

    package = keras_bn.converters
    for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
        if info.name.endswith("__main__"):  # runs the command
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(value):
                for member_name, member in vars(value).items():
                    if not member_name.startswith("_") or member_name == "__init__":
                        member = getattr(member, "__func__", member)
                        if inspect.isfunction(member):
                            yield f"{info.name}.{name}.{member_name}", member
                if isinstance(value, type) and not issubclass(value, BaseException):
                    yield f"{info.name}.{name}", value
            elif inspect.isfunction(value):
                yield f"{info.name}.{name}", value


def test_no_public_signature_mentions_a_future():
    found = []
    checked = 0
    for where, value in _public_callables():
        try:
            signature = str(inspect.signature(value))
        except (TypeError, ValueError):  # a builtin without a signature
            continue
        checked += 1
        if concurrent.futures.Future.__name__ in signature:  # annotations are strings
            found.append(f"{where}{signature}")
    assert checked > 100  # the walk found the package's API
    assert not found, found


def test_validate_onnx_takes_a_keras_reference_not_a_future():
    parameter = inspect.signature(validate_onnx).parameters["reference"]
    assert "KerasReference" in str(parameter.annotation)
    assert "keras_outputs" not in inspect.signature(validate_onnx).parameters

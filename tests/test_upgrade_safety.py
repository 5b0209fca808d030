"""What keras-bn's patches and speed tricks rely on in Keras and JAX, checked one by one.

A Keras or JAX release can move or reshape an internal without notice. Each test
here checks one internal that a patch replaces or a speed trick leans on, and fails
with a sentence naming the patch and what changed, so that after an upgrade the
failing test says which patch to revisit. The inventory:

* ``keras_bn/_keras_internals.py``: every entry of ``RELIANCES`` (each patch checks
  its internal when installed and installs nothing when it changed; the tests below
  prove both halves), plus ``keeping_layer_nodes``'s ``_inbound_nodes`` lists;
* ``converters/cli/quiet.py``: modules hidden from ``import keras`` and modules
  deferred until first use on JAX;
* ``converters/cli/backend.py``: the ``keras.json`` Keras writes by itself;
* ``converters/tracing.py``: the functions replaced while tracing
  (``RECORDED_FUNCTIONS``);
* ``converters/reference.py``: JAX's x64 switch; ``keras_bn/_xla.py``: the XLA
  compile options.
* ``converters/calibration.py``: onnxruntime's quantizer internals behind int8's
  one-pass calibration (``ONNXRUNTIME_RELIANCES``; a changed one falls back to
  ``quantize_static``).

``gc.freeze`` (``converters/cli/steps.py``) and ``os._exit`` (``converters/cli/app.py``)
are the standard library's and rely on nothing of Keras or JAX. ``.ci/upgrade-check``
runs this module (and the suite) against the newest and the oldest allowed releases.
"""

import ast
import importlib
import inspect
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_bn import _keras_internals as internals
from keras_bn.converters import calibration

INTERNALS_SOURCE = Path(internals.__file__)


def _release(library: str) -> str:
    from importlib import metadata

    return f"{library.capitalize()} {metadata.version(library)}"


# --------------------------------------------------- _keras_internals: each patch


@pytest.mark.parametrize("patch", sorted(internals.RELIANCES))
def test_each_patch_finds_the_internal_it_relies_on(patch):
    problem = internals.RELIANCES[patch].problem()
    assert problem is None, problem


def _keras_src(module):
    return lambda: importlib.import_module(f"keras.src.{module}")


def _attribute(owner, name):
    return lambda: (owner(), name)


# patch -> (where the internal is: () -> (owner, attribute), a stand-in of another
# shape, the block the patch installs). A stand-in of None deletes the internal.
_DELETE = object()


def _node():
    from keras.src.ops.node import Node

    return Node


def _variable():
    from keras.src.backend import Variable

    return Variable


def _function():
    from keras.src.ops.function import Function

    return Function


def _dynamic_backend():
    from keras.src.utils.backend_utils import DynamicBackend

    return DynamicBackend


CHANGED = {
    "lambda_globals": (
        _attribute(_keras_src("utils.python_utils"), "func_load"),
        lambda code, defaults=None, closure=None: None,
        lambda tmp_path: internals.lambda_globals({}),
    ),
    "saving_temp_dirs_in": (
        _attribute(_keras_src("saving.saving_lib"), "get_temp_dir"),
        lambda prefix: "/nowhere",
        lambda tmp_path: internals.saving_temp_dirs_in(str(tmp_path)),
    ),
    "saved_weights_loading": (
        _attribute(_variable, "_initialize_with_initializer"),
        lambda self, initializer, layout: None,
        lambda tmp_path: internals.saved_weights_loading(),
    ),
    "float64_type_promotion": (
        lambda: (_keras_src("backend.common.dtypes")().BIT64_TO_BIT32_DTYPE, "float64"),
        _DELETE,
        lambda tmp_path: internals.float64_type_promotion(),
    ),
    "jax_x64_slice_indices": (
        _attribute(_keras_src("backend.jax.core"), "slice"),
        lambda x, begin, size: None,
        lambda tmp_path: internals.jax_x64_slice_indices(),
    ),
    "jax_depthwise_convolutions": (
        _attribute(_keras_src("backend.jax.nn"), "depthwise_conv"),
        lambda inputs, kernel, strides=1, padding="valid": None,
        lambda tmp_path: internals.jax_depthwise_convolutions(lambda *arguments: None),
    ),
    "symbolic_variable_arithmetic": (
        lambda: (keras.ops, "true_divide"),
        _DELETE,
        lambda tmp_path: internals.symbolic_variable_arithmetic(),
    ),
    "none_outputs_recorded": (
        _attribute(_node, "__init__"),
        lambda self, operation, call_args=None, call_kwargs=None, outputs=None, name=None: None,
        lambda tmp_path: internals.none_outputs_recorded(),
    ),
    "static_python_arguments": (
        _attribute(_keras_src("backend"), "compute_output_spec"),
        lambda function, *args: None,
        lambda tmp_path: internals.static_python_arguments(),
    ),
    "output_specs_without_call_context": (
        lambda: (keras.Layer, "symbolic_call"),
        _DELETE,
        lambda tmp_path: internals.output_specs_without_call_context(),
    ),
    "backend_calls_recorded": (
        _attribute(_dynamic_backend, "__getattr__"),
        lambda self, name, default=None: default,
        lambda tmp_path: internals.backend_calls_recorded(),
    ),
    "backend_arrays_defer_to_symbolic": (
        lambda: (keras.KerasTensor, "__jax_array__"),
        _DELETE,
        lambda tmp_path: internals.backend_arrays_defer_to_symbolic(),
    ),
    "input_checks_ignoring": (
        _attribute(_function, "_assert_input_compatibility"),
        lambda self, inputs, strict: None,
        lambda tmp_path: internals.input_checks_ignoring(lambda size: False),
    ),
    "symbolic_equality": (
        lambda: (keras.KerasTensor, "__eq__"),
        lambda self, other: "Keras's own",
        lambda tmp_path: internals.symbolic_equality(),
    ),
}

_MISSING = object()


def _current(owner, attribute):
    if isinstance(owner, dict):
        return owner.get(attribute, _MISSING)
    if isinstance(owner, type):
        return owner.__dict__.get(attribute, _MISSING)
    return getattr(owner, attribute, _MISSING)


def _change(monkeypatch, owner, attribute, stand_in):
    if isinstance(owner, dict):
        monkeypatch.delitem(owner, attribute)
    elif stand_in is _DELETE:
        monkeypatch.delattr(owner, attribute)
    else:
        monkeypatch.setattr(owner, attribute, stand_in)


def test_every_patch_has_a_changed_internal_case():
    probes = {"tensorflow_probe_answered", "tensorflow_probe_deferred"}  # tested below
    missing = set(internals.RELIANCES) - set(CHANGED) - probes
    assert not missing, f"add a CHANGED case for {sorted(missing)}"


@pytest.mark.parametrize("patch", sorted(CHANGED))
def test_a_patch_whose_internal_changed_says_so_and_installs_nothing(patch, monkeypatch, tmp_path):
    locate, stand_in, block = CHANGED[patch]
    owner, attribute = locate()
    _change(monkeypatch, owner, attribute, stand_in)
    changed = _current(owner, attribute)

    problem = internals.RELIANCES[patch].problem()
    assert problem is not None and problem.startswith(
        f"keras_bn patch _keras_internals.{patch} relies on "
    ), problem
    assert f"; {_release(internals.RELIANCES[patch].library)} changed it: " in problem

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silent unless debugging
        with block(tmp_path):
            assert _current(owner, attribute) is changed  # not patched
    assert _current(owner, attribute) is changed  # nothing to restore either

    monkeypatch.setenv("KERAS_BN_DEBUG", "1")
    with pytest.warns(RuntimeWarning, match=f"keras_bn patch _keras_internals.{patch} relies"):
        with block(tmp_path):
            pass


def test_the_tensorflow_probe_is_left_to_keras_when_lazymodule_changed(monkeypatch):
    from keras.src.utils import module_utils

    class LazyModuleWithoutAnswerSlot:
        def __init__(self, name):
            self.name = name

    probe = module_utils.LazyModule("tensorflow")
    monkeypatch.delitem(sys.modules, "tensorflow")  # as in a process on another backend
    monkeypatch.setattr(module_utils, "tensorflow", probe)
    with internals.tensorflow_probe_deferred():
        assert probe._available is False  # answered while cloning ...
    assert probe._available is None  # ... and asked again afterwards
    internals.tensorflow_probe_answered()
    assert probe._available is False  # answered: Keras is as relied on

    probe = module_utils.LazyModule("tensorflow")
    monkeypatch.setattr(module_utils, "tensorflow", probe)
    monkeypatch.setattr(module_utils, "LazyModule", LazyModuleWithoutAnswerSlot)
    problem = internals.RELIANCES["tensorflow_probe_answered"].problem()
    assert problem.startswith("keras_bn patch _keras_internals.tensorflow_probe_answered relies")
    internals.tensorflow_probe_answered()
    assert probe._available is None  # left alone
    with internals.tensorflow_probe_deferred():
        assert probe._available is None  # left alone


def test_every_function_that_patches_keras_names_its_reliance():
    """A function of _keras_internals that assigns, deletes or setattr()s an attribute or
    an item of something it did not create is a patch: it must be in RELIANCES (or be
    one of the reviewed exceptions below)."""
    reviewed = {
        # deletes the Keras Nodes a trace appended; defensive getattr/hasattr, and
        # test_keeping_layer_nodes_relies_on_inbound_node_lists checks the lists
        "keeping_layer_nodes",
    }
    tree = ast.parse(INTERNALS_SOURCE.read_text())
    patching = set()
    for function in tree.body:
        if not isinstance(function, ast.FunctionDef):
            continue
        for node in ast.walk(function):
            targets = []
            if isinstance(node, ast.Assign | ast.Delete):
                targets = node.targets
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in (
                "setattr",
                "delattr",
            ):
                patching.add(function.name)
            if any(isinstance(target, ast.Attribute | ast.Subscript) for target in targets):
                patching.add(function.name)
    patching -= {"_tensorflow_probe"}  # writes to a LazyModule it made itself
    missing = patching - set(internals.RELIANCES) - reviewed
    assert not missing, f"patches with no entry in _keras_internals.RELIANCES: {sorted(missing)}"
    assert set(internals.RELIANCES) <= patching


def test_keeping_layer_nodes_relies_on_inbound_node_lists():
    layer = keras.layers.Identity()
    before = {name: getattr(layer, name, None) for name in ("_inbound_nodes", "_outbound_nodes")}
    layer(keras.Input((2,)))
    assert isinstance(before["_inbound_nodes"], list) and len(layer._inbound_nodes) == 1, (
        "keras_bn patch _keras_internals.keeping_layer_nodes relies on Layer._inbound_nodes, "
        f"a list growing by one Node per symbolic call; {_release('keras')} changed it: "
        f"{before['_inbound_nodes']!r}"
    )
    assert isinstance(before["_outbound_nodes"], list), (
        "keras_bn patch _keras_internals.keeping_layer_nodes relies on Layer._outbound_nodes "
        f"(a list); {_release('keras')} changed it: {before['_outbound_nodes']!r}"
    )


def test_the_x64_slice_patch_makes_mixed_index_types_work():
    """What jax_x64_slice_indices assumes: in x64 mode Keras's JAX slice rejects start
    indices of mixed integer types, and int64 ones work."""
    jax = pytest.importorskip("jax")
    from keras.src.backend.jax import core

    x = jax.numpy.arange(24.0).reshape(2, 3, 4)
    start = jax.numpy.asarray(1, dtype="int32")
    with _enable_x64(jax):
        with internals.jax_x64_slice_indices():
            sliced = core.slice(x, (0, 0, start), (2, 3, 2))
    np.testing.assert_array_equal(np.asarray(sliced), np.arange(24.0).reshape(2, 3, 4)[..., 1:3])


# ---------------------------------------------------- converters: other reliances


def _enable_x64(jax):
    enable_x64 = getattr(jax, "enable_x64", None)
    if enable_x64 is None:
        from jax import experimental

        enable_x64 = experimental.enable_x64
    return enable_x64(True)


def test_jax_x64_switch_of_the_float64_reference():
    """converters/reference.py turns on JAX's x64 mode with ``jax.enable_x64`` (older:
    ``jax.experimental.enable_x64``) for the float64 run."""
    jax = pytest.importorskip("jax")
    message = (
        "keras_bn converters.reference (float64 run on JAX) relies on jax.enable_x64(True) "
        "or jax.experimental.enable_x64(True) as a context manager; "
        f"{_release('jax')} changed it"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        try:
            with _enable_x64(jax):
                dtype = jax.numpy.asarray(1.0, dtype="float64").dtype
        except Exception as error:
            pytest.fail(f"{message}: {type(error).__name__}: {error}")
    assert dtype == np.float64, f"{message}: float64 arrays are {dtype} inside it"
    assert jax.numpy.asarray(1.0, dtype="float32").dtype == np.float32


def test_xla_compile_options_of_the_compiled_passes():
    """keras_bn/_xla.py compiles keras-bn's passes on JAX with XLA's quicker CPU code
    generation and (quick passes) its backend optimizations off; an XLA that rejects an
    option compiles without it, silently slower: this names the option it dropped."""
    jax = pytest.importorskip("jax")
    from keras_bn import _xla as xla

    xla.compile_options.cache_clear()
    try:
        options = xla.compile_options(quick=True)
    finally:
        xla.compile_options.cache_clear()
    if "compiler_options" not in inspect.signature(jax.jit).parameters:
        # A JAX before the option (the minimum pinned, 0.4.30): _xla.py's documented
        # fallback, the default compile.
        assert options is None
        return
    wanted = {**xla._FAST_CODEGEN, **xla._QUICK}
    dropped = sorted(set(wanted) - set(options or {}))
    assert not dropped, (
        f"keras_bn speed-up keras_bn._xla relies on jax.jit(compiler_options={wanted}); "
        f"{_release('jax')} no longer accepts {dropped}: its compiles are slower"
    )


# (module, attribute) of converters.tracing.RECORDED_FUNCTIONS -> the parameters its
# stand-in calls the original with.
RECORDED_SIGNATURES = {
    ("keras.ops", "cond"): ("pred", "true_fn", "false_fn"),
    ("tensorflow", "gather"): (
        "params",
        "indices",
        "validate_indices",
        "axis",
        "batch_dims",
        "name",
    ),
    ("keras_hub.src.models.depth_anything.depth_anything_layers", "interpolate"): (
        "x",
        "size",
        "data_format",
    ),
    ("keras_hub.src.models.d_fine.d_fine_utils", "grid_sample"): (
        "data",
        "grid",
        "align_corners",
        "height",
        "width",
    ),
}


@pytest.mark.parametrize(
    "module, attribute", sorted(RECORDED_SIGNATURES), ids=lambda value: value.rpartition(".")[2]
)
def test_functions_replaced_while_tracing(module, attribute):
    from keras_bn.converters import tracing

    assert set(tracing.RECORDED_FUNCTIONS) == set(RECORDED_SIGNATURES), (
        "add the parameters of each RECORDED_FUNCTIONS entry to RECORDED_SIGNATURES"
    )
    if module.startswith(("keras_hub", "tensorflow")):
        pytest.importorskip(module.partition(".")[0])
    name = f"{module}.{attribute}"
    try:
        function = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as error:
        pytest.fail(
            f"keras_bn patch converters.tracing.RECORDED_FUNCTIONS[{name}] relies on "
            f"{name}; it moved: {error}"
        )
    found = tuple(inspect.signature(function).parameters)
    expected = RECORDED_SIGNATURES[(module, attribute)]
    assert found == expected, (
        f"keras_bn patch converters.tracing.RECORDED_FUNCTIONS[{name}] relies on "
        f"{name}({', '.join(expected)}); it now takes ({', '.join(found)})"
    )


def test_modules_deferred_on_jax_exist_and_keras_imports_them():
    """converters/cli/quiet.py stands in for modules Keras's JAX backend imports but
    only calls later; a module JAX no longer ships is not deferred (checked here and
    when the stand-in is installed), and one Keras no longer imports is dead code."""
    jax = pytest.importorskip("jax")
    from keras_bn.converters.cli import quiet

    jax_root = Path(jax.__file__).parent
    importers = sorted((Path(keras.__file__).parent / "src" / "backend" / "jax").glob("*.py"))
    for name, submodules in quiet._DEFERRED_BY_KERAS_IMPORT_ON_JAX.items():
        patch = f"keras_bn patch converters.cli.quiet._DEFERRED_BY_KERAS_IMPORT_ON_JAX[{name!r}]"
        assert quiet._has_source(name, submodules), (
            f"{patch} relies on JAX shipping {name} with {submodules}; "
            f"{_release('jax')} does not: remove or rename the entry"
        )
        parent, _, leaf = name.rpartition(".")
        sources = [path.read_text() for path in importers]
        sources.append((jax_root.joinpath(*parent.split(".")[1:]) / "__init__.py").read_text())
        imported = any(
            f"import {name}" in text
            or f"from {name} import" in text
            or f"from {parent} import {leaf}" in text
            for text in sources
        )
        assert imported, (
            f"{patch} relies on Keras's JAX backend (or {parent}) importing {name}; "
            f"{_release('keras')} and {_release('jax')} no longer do: remove the entry"
        )
    assert not quiet._has_source("jax.experimental.no_such_module")


def test_hidden_modules_and_keras_json_on_a_fresh_jax_process(tmp_path):
    """In a fresh process on JAX with an empty Keras home: ``import keras`` succeeds with
    scikit-learn, matplotlib and requests hidden (converters/cli/quiet.py), without
    importing them, and the keras.json Keras writes by itself is the one
    converters/cli/backend.py recognises as nobody's choice."""
    pytest.importorskip("jax")
    from keras_bn.converters.cli import backend, quiet

    hidden = quiet._UNUSED_BY_KERAS_IMPORT + quiet._UNUSED_BY_KERAS_IMPORT_ON_JAX
    code = (
        "import json, sys\n"
        "from keras_bn.converters.cli.quiet import import_keras\n"
        "assert import_keras() == 'jax'\n"
        f"print(json.dumps(sorted(m for m in {hidden!r} if m in sys.modules)))\n"
    )
    environ = {**os.environ, "KERAS_BACKEND": "jax", "KERAS_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (
        f"keras_bn patch converters.cli.quiet._modules_hidden relies on `import keras` "
        f"working without {hidden}; {_release('keras')} changed it:\n{result.stderr[-3000:]}"
    )
    imported = json.loads(result.stdout.splitlines()[-1])
    assert imported == [], (
        f"converters.cli.quiet hid {hidden} from `import keras`, yet {imported} were imported"
    )
    written = json.loads((tmp_path / "keras.json").read_text())
    assert written == backend._KERAS_WRITTEN_CONFIG, (
        "keras_bn converters.cli.backend._KERAS_WRITTEN_CONFIG relies on the keras.json "
        f"Keras writes by itself; {_release('keras')} writes {written}"
    )
    assert backend.choose_backend({"KERAS_HOME": str(tmp_path)})[1] == "fastest installed"


def test_argparse_internals_of_did_you_mean():
    """converters/cli/args.py reads argparse's ``ArgumentParser._actions`` (every
    option of a parser) and ``argparse._get_action_name`` (how its messages name an
    argument) to suggest the option a misspelt flag meant."""
    import argparse

    parser = argparse.ArgumentParser()
    action = parser.add_argument("--precision", choices=["float32"])
    assert action in parser._actions, (
        "keras_bn's did-you-mean (converters/cli/args.py) relies on "
        "argparse.ArgumentParser._actions; this Python changed it"
    )
    assert argparse._get_action_name(action) == "--precision", (
        "keras_bn's did-you-mean relies on argparse._get_action_name; this Python changed it"
    )


def test_cloning_on_jax_imports_no_tensorflow_and_leaves_the_probe_unanswered(run_python):
    """fold_batch_norms, replace_batch_norm and the float64 twin clone the model through
    get_config; in a user's JAX process that used to import all of TensorFlow (Keras's
    serializer asks whether it is installed). The probe is answered only while they
    clone: afterwards Keras asks again, so a process that imports TensorFlow later
    still serializes its objects."""
    code = """
import sys
import keras, numpy as np
from keras.src.utils import module_utils
from keras_bn import replace_batch_norm
from keras_bn.converters import fold_batch_norms
from keras_bn.converters.reference import float64_twin
inputs = keras.Input((8, 8, 3))
h = keras.layers.Rescaling(1 / 255.0)(inputs)
h = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(h))
model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(h))
x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
fold_batch_norms(model, sample_inputs=x)
replace_batch_norm(model)
float64_twin(model, [x])
print("tensorflow imported:", "tensorflow" in sys.modules)
print("probe:", module_utils.tensorflow._available)
"""
    result = run_python(["-c", code], env={"KERAS_BACKEND": "jax"})
    assert "tensorflow imported: False" in result.stdout, result.stdout + result.stderr
    assert "probe: None" in result.stdout


@pytest.mark.parametrize("reliance", sorted(calibration.ONNXRUNTIME_RELIANCES))
def test_onnxruntime_quantization_internals_of_int8_calibration(reliance):
    """converters/calibration.py hands its ranges to onnxruntime's QDQQuantizer and
    replicates its Percentile histogram; each reliance names what it reads."""
    description, check = calibration.ONNXRUNTIME_RELIANCES[reliance]
    problem = check()
    assert problem is None, (
        f"keras_bn's int8 calibration (converters/calibration.py) relies on {description}; "
        f"this onnxruntime changed it ({problem}): int8 export falls back to quantize_static"
    )

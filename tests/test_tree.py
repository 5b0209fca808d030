"""The test tree mirrors the source tree: every source module has its test module.

``MIRROR`` is the map, one entry per source module (``keras_bn/`` and ``converters/``,
imported as ``keras_bn.converters``). The folders of tests/ follow the package's
rooms: ``layers/`` and ``training/`` for the layer package, ``graph/``, ``folding/``,
``onnx/`` (``onnx/rules/``), ``validation/``, ``files/`` and ``cli/`` for the
converter, as README's repository map groups them. A module is mapped to the test
module named after it where one exists; modules tested through another's entry
point (the CLI's rooms through ``main``, the fold plan and rules through
``fold_batch_norms``, the ONNX rules through ``export_onnx``) map to that test.
``WHOLE_PROGRAM`` lists the test modules that test no one module but the program as
a user runs it. A new source or test module fails here until it is placed.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

MIRROR = {
    # keras_bn/: the layer package.
    "keras_bn/__init__.py": "test_package.py",
    "keras_bn/__main__.py": "test_package.py",
    "keras_bn/_keras_internals.py": "test_keras_internals.py",
    "keras_bn/_xla.py": "test_xla.py",
    "keras_bn/layers.py": "layers/test_layers.py",
    "keras_bn/_moments.py": "layers/test_layers.py",
    "keras_bn/_batch_norm_state.py": "layers/test_layers.py",
    "keras_bn/training.py": "training/test_training.py",
    "keras_bn/recalibration.py": "training/test_recalibration.py",
    "keras_bn/_replicas.py": "training/test_recalibration_distributed.py",
    "keras_bn/running_moments.py": "training/test_running_moments.py",
    "keras_bn/monitor.py": "training/test_monitor.py",
    "keras_bn/replacement.py": "training/test_replacement.py",
    "keras_bn/torch_interop.py": "training/test_torch_interop.py",
    # converters/: the converter, in the order of its stages.
    "converters/__init__.py": "test_package.py",
    "converters/graph.py": "graph/test_graph.py",
    "converters/tracing.py": "graph/test_tracing.py",
    "converters/prepared.py": "graph/test_prepared.py",
    "converters/folding/__init__.py": "folding/test_folding.py",
    "converters/folding/maths.py": "folding/test_folding_math.py",
    "converters/folding/plan.py": "folding/test_folding.py",
    "converters/folding/report.py": "folding/test_folding.py",
    "converters/folding/rewrite.py": "folding/test_folding.py",
    "converters/folding/rules.py": "folding/test_folding.py",
    "converters/onnx/__init__.py": "onnx/test_onnx_export.py",
    "converters/onnx/builder.py": "onnx/test_onnx_builder.py",
    "converters/onnx/layout.py": "onnx/test_onnx_builder.py",
    "converters/onnx/export.py": "onnx/test_onnx_export.py",
    "converters/onnx/metadata.py": "onnx/test_onnx_export.py",
    "converters/onnx/writing.py": "onnx/test_onnx_writing.py",
    "converters/onnx/rules/__init__.py": "onnx/rules/test_onnx_rules.py",
    "converters/onnx/rules/table.py": "onnx/rules/test_onnx_rules.py",
    "converters/onnx/rules/common.py": "onnx/rules/test_onnx_rules.py",
    "converters/onnx/rules/activations.py": "onnx/rules/test_onnx_rules.py",
    "converters/onnx/rules/convolution.py": "onnx/rules/test_onnx_rules.py",
    "converters/onnx/rules/core.py": "onnx/rules/test_onnx_rules.py",
    "converters/onnx/rules/applications.py": "onnx/rules/test_onnx_rules.py",
    "converters/onnx/rules/coverage.py": "onnx/rules/test_coverage.py",
    "converters/onnx/rules/tensorflow.py": "onnx/rules/test_tensorflow_code.py",
    "converters/tf_graph.py": "onnx/rules/test_tensorflow_code.py",
    "converters/onnx/rules/ops/__init__.py": "onnx/rules/test_onnx_rules.py",
    "converters/onnx/rules/ops/table.py": "onnx/rules/test_onnx_rules.py",
    "converters/onnx/rules/ops/common.py": "onnx/rules/test_onnx_rules.py",
    "converters/onnx/rules/ops/elementwise.py": "graph/test_tracing.py",
    "converters/onnx/rules/ops/reductions.py": "graph/test_tracing.py",
    "converters/onnx/rules/ops/shapes.py": "graph/test_tracing.py",
    "converters/onnx/rules/ops/nn.py": "graph/test_tracing.py",
    "converters/onnx/rules/ops/control_flow.py": "graph/test_tracing.py",
    "converters/onnx/rules/ops/sequence.py": "onnx/test_keras_hub_text.py",
    "converters/onnx/rules/normalization.py": "onnx/rules/test_onnx_rules.py",
    "converters/onnx/rules/reshaping.py": "onnx/rules/test_onnx_rules.py",
    "converters/onnx/rules/attention.py": "onnx/rules/test_onnx_attention.py",
    "converters/onnx/rules/recurrent.py": "onnx/rules/test_onnx_recurrent.py",
    "converters/onnx/rules/wrappers.py": "onnx/rules/test_wrappers.py",
    "converters/runtime.py": "validation/test_runtime.py",
    "converters/onnx_graph.py": "validation/test_onnx_graph.py",
    "converters/comparison.py": "validation/test_comparison.py",
    "converters/reference.py": "validation/test_reference.py",
    "converters/float64_kernels.py": "validation/test_float64_kernels.py",
    "converters/samples.py": "validation/test_samples.py",
    "converters/validation.py": "validation/test_validation.py",
    "converters/equalization.py": "validation/test_equalization.py",
    "converters/precision.py": "validation/test_precision.py",
    "converters/divergence.py": "validation/test_divergence.py",
    "converters/bias_correction.py": "validation/test_bias_correction.py",
    "converters/bias_tuning.py": "validation/test_bias_tuning.py",
    "converters/weight_rounding.py": "validation/test_weight_rounding.py",
    "converters/calibration.py": "validation/test_calibration.py",
    "converters/int8_storage.py": "validation/test_int8_storage.py",
    "converters/benchmarking.py": "validation/test_benchmarking.py",
    "converters/user_files.py": "files/test_user_files.py",
    "converters/limits.py": "files/test_user_files.py",
    "converters/model_io.py": "files/test_model_io.py",
    "converters/files.py": "onnx/test_onnx_export.py",  # atomic outputs, by export
    "converters/errors.py": "cli/test_cli.py",  # user errors: one line, exit 2
    "converters/options.py": "cli/test_cli.py",  # the CLI's choices
    "converters/progress.py": "cli/test_cli.py",
    "converters/cli/__init__.py": "cli/test_cli.py",
    "converters/cli/__main__.py": "cli/test_cli.py",
    "converters/cli/app.py": "cli/test_cli.py",
    "converters/cli/args.py": "cli/test_cli.py",
    "converters/cli/run.py": "cli/test_cli.py",
    "converters/cli/steps.py": "cli/test_cli.py",
    "converters/cli/quiet.py": "cli/test_cli.py",
    "converters/cli/inspect.py": "cli/test_cli.py",
    "converters/cli/fold.py": "cli/test_cli.py",
    "converters/cli/export.py": "cli/test_cli.py",
    "converters/cli/validate.py": "cli/test_cli.py",
    "converters/cli/bench.py": "cli/test_cli.py",
    "converters/cli/recalibrate.py": "cli/test_recalibrate_cli.py",
    "converters/cli/statistics.py": "cli/test_recalibrate_cli.py",
    "converters/data_sources.py": "cli/test_recalibrate_cli.py",
    "converters/statistics_check.py": "cli/test_recalibrate_cli.py",
    "converters/cli/backend.py": "cli/test_cli_backend.py",
    "converters/cli/allocator.py": "cli/test_allocator.py",
}

# Test modules of the program as a whole (real models, user files, other backends).
WHOLE_PROGRAM = {
    "test_tree.py": "this map",
    "test_upgrade_safety.py": "every patched Keras/JAX internal still as relied on",
    "layers/test_layers_parity.py": "the layer against the stock one, argument by argument",
    "layers/test_layers_distributed.py": "the layer under data parallelism",
    "layers/test_backends.py": "the layer tests rerun on JAX and numpy",
    "folding/test_folding_applications.py": "Keras Applications folded",
    "folding/test_folding_sweep.py": "every public Keras layer next to a fold",
    "onnx/test_onnx_applications.py": "Keras Applications folded, exported, validated",
    "onnx/test_keras_hub.py": "KerasHub models exported through tracing",
    "graph/test_subclassed_models.py": "subclassed keras.Model traced, folded, exported",
    "cli/test_input_layouts.py": "input layouts per input, through the API and the CLI",
    "onnx/test_fallback.py": "Keras's exporter as the fallback, on TensorFlow and JAX",
    "training/test_model_untouched.py": "the original model after replace, fold and export",
    "cli/test_statistics_one_pass.py": "the stale-statistics check's one compiled pass",
    "layers/test_loading_without_import.py": "a saved model loaded in a fresh process",
    "validation/test_validation_exactness.py": "the float64 judge on real models and bugs",
    "validation/test_precision_validation.py": "float16 and int8 criteria on real exports",
    "validation/test_int8_testbed.py": "trained MobileNetV2 weights against PyTorch's logits",
    "validation/test_int8_per_channel.py": "per-channel int8 on a trained depthwise 1-D net",
    "cli/test_cli_fuzz.py": "corrupted .keras files through the CLI",
    "cli/test_cli_hostile.py": "mutated files through every command",
    "examples/test_examples.py": "the examples, run as a user runs them",
    "benchmarks/test_command_matrix.py": "the command matrix's rounds, ratios and table",
}


def _relative(paths, root):
    return {path.relative_to(root).as_posix() for path in paths}


def test_every_source_module_is_mapped_to_an_existing_test_module():
    sources = _relative(ROOT.glob("keras_bn/**/*.py"), ROOT)
    sources |= _relative(ROOT.glob("converters/**/*.py"), ROOT)
    assert sorted(sources - set(MIRROR)) == [], "source modules without a test: add to MIRROR"
    assert sorted(set(MIRROR) - sources) == [], "MIRROR names modules that no longer exist"
    missing = {source: test for source, test in MIRROR.items() if not (TESTS / test).is_file()}
    assert missing == {}


def test_every_test_module_tests_a_source_module_or_the_whole_program():
    tests = _relative(TESTS.glob("**/test_*.py"), TESTS)
    placed = set(MIRROR.values()) | set(WHOLE_PROGRAM)
    assert sorted(tests - placed) == [], "test modules not in MIRROR or WHOLE_PROGRAM"
    assert sorted(set(WHOLE_PROGRAM) - tests) == []
    # Basenames stay unique: the folders are not packages (pytest imports by basename).
    basenames = [Path(test).name for test in tests]
    assert len(basenames) == len(set(basenames)), sorted(basenames)


# Test modules named after a source module that test it through an entry point.
THROUGH_ENTRY_POINT = {
    "converters/tracing.py": "export_onnx traces the layers without a rule",
}


def test_a_module_named_after_its_source_tests_that_source():
    """Where the test module bears the source module's name, it imports that module."""
    for source, test in MIRROR.items():
        stem = Path(source).stem
        if not Path(test).stem.endswith(stem) or stem.startswith("_"):
            continue
        if source in THROUGH_ENTRY_POINT:
            continue
        dotted = source.removesuffix(".py").replace("/", ".")
        dotted = dotted.replace("converters.", "keras_bn.converters.", 1)
        package, _, name = dotted.rpartition(".")
        text = (TESTS / test).read_text()
        assert dotted in text or f"from {package} import {name}" in text, (source, test)


SHORT = [
    *sorted((TESTS / "support").glob("*.py")),
    *sorted(ROOT.glob("keras_bn/**/*.py")),
    *sorted(ROOT.glob("converters/**/*.py")),
]


@pytest.mark.parametrize("path", SHORT, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_functions_stay_short(path):
    """The package and tests/support: no function over 80 lines (nested ones too)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= 80, f"{path.name}: {node.name} has {length} lines"

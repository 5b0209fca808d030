"""Tests of the keras-bn command line, as a user runs it.

The console script ``keras-bn`` runs in a subprocess once per command and once per
bad-input case (those runs are started two at a time by module fixtures, since each
pays for importing TensorFlow); the finer behaviour is tested in-process through
``main([...])``, which is the same code without the interpreter start-up.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from support.console import KERAS_BN, PROGRESS_LINE, assert_rejected, run_many, without_progress
from support.files import sha256
from support.models import conv_bn_classifier, randomize_batch_norms

from keras_bn.converters import cli
from keras_bn.converters.comparison import (
    FLOAT16_FLOOR,
    INT8_SQNR_FLOOR_DB,
    INT8_TOP1_FLOOR,
)
from keras_bn.converters.model_io import load_model

CUSTOM_LAYERS = '''
import keras


class Doubling(keras.layers.Layer):
    """An unregistered custom layer: loading needs --custom-objects."""

    def call(self, x):
        return x * 2.0
'''


# ------------------------------------------------------------------------------------
# Models and files.


def _set_statistic(model: keras.Model, name: str, value: float) -> None:
    layer = next(x for x in model.layers if isinstance(x, keras.layers.BatchNormalization))
    values = keras.ops.convert_to_numpy(getattr(layer, name)).copy()
    values[1] = value
    getattr(layer, name).assign(values)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Every input file the tests need, in one read-only-by-convention directory."""
    directory = tmp_path_factory.mktemp("cli_inputs")
    paths: dict[str, Path] = {}

    def save(name: str, model: keras.Model) -> None:
        paths[name] = directory / f"{name}.keras"
        model.save(paths[name])

    save("model", conv_bn_classifier())
    save("other", conv_bn_classifier(seed=7))  # same architecture, other weights
    nan_model = conv_bn_classifier()
    _set_statistic(nan_model, "moving_mean", float("nan"))
    save("nan", nan_model)
    negative = conv_bn_classifier()
    _set_statistic(negative, "moving_variance", -0.5)
    save("negative", negative)
    huge = conv_bn_classifier()
    dense = huge.layers[-1]  # no BN folds into it, so the value reaches the ONNX file
    kernel = keras.ops.convert_to_numpy(dense.kernel).copy()
    kernel[0, 0] = 1e5  # beyond float16's 65504
    dense.kernel.assign(kernel)
    save("huge", huge)
    inputs = keras.Input((3,))
    save("lambda", keras.Model(inputs, keras.layers.Lambda(lambda t: t * 3.0 + 1.0)(inputs)))
    (directory / "custom_layers.py").write_text(CUSTOM_LAYERS)
    sys.path.insert(0, str(directory))
    try:
        import custom_layers  # the file written just above

        inputs = keras.Input((3,))
        save("custom", keras.Model(inputs, custom_layers.Doubling()(inputs)))
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop("custom_layers", None)
    paths["custom_layers"] = directory / "custom_layers.py"

    rng = np.random.default_rng(42)
    paths["inputs"] = directory / "inputs.npz"
    np.savez(paths["inputs"], image=rng.normal(size=(6, 8, 8, 3)).astype("float32"))
    paths["calibration"] = directory / "calibration.npz"
    np.savez(paths["calibration"], image=rng.normal(size=(64, 8, 8, 3)).astype("float32"))
    data = paths["model"].read_bytes()
    paths["truncated"] = directory / "truncated.keras"
    paths["truncated"].write_bytes(data[: len(data) * 2 // 3])
    paths["corrupted"] = directory / "corrupted.keras"
    corrupted = bytearray(data)
    corrupted[len(data) // 2] ^= 0x5A  # inside model.weights.h5 (stored, not compressed)
    paths["corrupted"].write_bytes(bytes(corrupted))
    paths["not_keras"] = directory / "notes.keras"
    paths["not_keras"].write_text("just some text, not a zip archive\n")
    paths["garbage_onnx"] = directory / "garbage.onnx"
    paths["garbage_onnx"].write_bytes(b"\x00\x01 not a protobuf \xff" * 10)
    return paths


def _keras_outputs(model: keras.Model, x: np.ndarray) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))


def _onnx_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _op_counts(path: Path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _batch_norm_layers(model: keras.Model) -> int:
    return sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)


def _sample(n: int = 5) -> np.ndarray:
    return np.random.default_rng(3).normal(size=(n, 8, 8, 3)).astype("float32")


# ------------------------------------------------------------------------------------
# Running the CLI.


def run_main(args, capsys) -> tuple[int, str, str]:
    """``main([...])`` in-process; returns (exit status, stdout, stderr)."""
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------
# The console script: every command once.


@pytest.fixture(scope="module")
def script_runs(files, tmp_path_factory):
    work = tmp_path_factory.mktemp("cli_script")
    hashes = {name: sha256(path) for name, path in files.items()}
    first = run_many(
        {
            "help": (["--help"], work),
            "inspect": (["python", "-m", "keras_bn", "inspect", files["model"], "--json"], work),
            "fold": (["fold", files["model"], "-o", work / "folded.keras"], work),
            "export": (
                ["export", files["model"], "-o", work / "model.onnx", "--report", "export.json"],
                work,
            ),
        }
    )
    second = run_many(
        {
            "validate": (["validate", files["model"], work / "model.onnx", "--json"], work),
            "bench": (
                ["bench", work / "model.onnx", work / "model.onnx", "--runs", "3", "--json"],
                work,
            ),
        }
    )
    assert {name: sha256(path) for name, path in files.items()} == hashes, "inputs modified"
    return {**first, **second}, work


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Exit 0 and nothing on stderr but the program's lines for steps over 2 s (no
    framework start-up lines, no warnings)."""
    assert result.returncode == 0, result.stderr[-3000:]
    assert without_progress(result.stderr) == "", result.stderr
    return result


def test_script_help_lists_commands_and_examples(script_runs):
    result = _ok(script_runs[0]["help"])
    for command in ("inspect", "fold", "export", "validate", "bench"):
        assert command in result.stdout
    assert "examples:" in result.stdout and "keras-bn export model.keras" in result.stdout
    assert "exit status: 0 success, 1 validation failed, 2 bad input" in result.stdout


def test_script_inspect_json(script_runs):
    report = json.loads(_ok(script_runs[0]["inspect"]).stdout)
    assert report["command"] == "inspect" and report["status"] == "ok"
    assert [bn["channels"] for bn in report["batch_norms"]] == [4, 6]
    assert report["fold_plan"]["folded_count"] == 2
    assert report["parameters"] == conv_bn_classifier().count_params()
    assert report["layer_counts"]["BatchNormalization"] == 2


def test_script_fold_writes_an_equivalent_model_without_batch_norm(script_runs, files):
    _ok(script_runs[0]["fold"])
    folded = load_model(script_runs[1] / "folded.keras")
    original = load_model(files["model"])
    assert _batch_norm_layers(original) == 2 and _batch_norm_layers(folded) == 0
    x = _sample()
    np.testing.assert_allclose(
        _keras_outputs(folded, x), _keras_outputs(original, x), rtol=1e-4, atol=1e-6
    )


def test_script_export_writes_a_validated_onnx_model_and_report(script_runs, files):
    result = _ok(script_runs[0]["export"])
    work = script_runs[1]
    path = work / "model.onnx"
    assert "Validation PASSED" in result.stdout
    ops = _op_counts(path)
    assert "BatchNormalization" not in ops and ops["Conv"] == 2
    x = _sample()
    np.testing.assert_allclose(
        _onnx_outputs(path, x), _keras_outputs(load_model(files["model"]), x), atol=1e-5
    )
    report = json.loads((work / "export.json").read_text())
    assert report["status"] == "ok" and report["exit_code"] == 0
    assert report["fold"]["folded_count"] == 2
    assert report["validation"]["passed"] is True
    assert report["output"]["path"] == str(path)
    seconds = {step["step"]: step["seconds"] for step in report["steps"]}
    backend = report["backend"]
    assert backend in ("jax", "tensorflow", "torch")
    # measured in a fresh process, not 0.00
    assert seconds[f"Importing Keras ({backend} backend)"] > 0.1
    # The Keras pass runs beside the export: the total is at least the longest step
    # and at most the sum of all of them.
    assert max(seconds.values()) <= report["seconds"] <= sum(seconds.values()) + 1.0
    assert "Running the model in Keras (beside the export)" in seconds
    leftovers = sorted(p.name for p in work.iterdir() if p.name.startswith("."))
    assert leftovers == []


def test_script_validate_json(script_runs):
    report = json.loads(_ok(script_runs[0]["validate"]).stdout)
    assert report["status"] == "ok" and report["validation"]["passed"] is True
    # The CLI's generated samples (VALIDATION_SAMPLES), alone and the first one alone.
    from keras_bn.converters.samples import VALIDATION_SAMPLES

    assert {c["batch_size"] for c in report["validation"]["comparisons"]} == {1, VALIDATION_SAMPLES}
    assert report["validation"]["inputs"].startswith(f"generated, {VALIDATION_SAMPLES} sample(s)")


def test_script_bench_json(script_runs):
    report = json.loads(_ok(script_runs[0]["bench"]).stdout)
    results = report["bench"]["results"]
    assert [(r["optimization"], r["runs"]) for r in results] == [("off", 3), ("on", 3)] * 2
    assert all(0 < r["median_ms"] <= r["p90_ms"] for r in results)


# ------------------------------------------------------------------------------------
# The console script: every bad input.

BAD_INPUTS = {
    # name: (arguments with {placeholders}, fragment of the message)
    "missing-file": (["inspect", "{dir}/missing.keras"], "does not exist"),
    "not-a-keras-model": (["fold", "{not_keras}", "-o", "{out}/x.keras"], "not a readable"),
    "truncated-archive": (["export", "{truncated}", "-o", "{out}/x.onnx"], "truncated or"),
    "corrupted-archive": (["fold", "{corrupted}", "-o", "{out}/x.keras"], "fails its CRC"),
    "unknown-custom-layer": (
        ["export", "{custom}", "-o", "{out}/x.onnx"],
        "--custom-objects MODULE:Doubling",
    ),
    "lambda-in-safe-mode": (["fold", "{lambda}", "-o", "{out}/x.keras"], "--unsafe"),
    "nan-statistics": (["export", "{nan}", "-o", "{out}/x.onnx"], "moving_mean=nan"),
    "negative-variance": (
        ["fold", "{negative}", "-o", "{out}/x.keras"],
        "moving_variance=-0.5",
    ),
    "unwritable-output": (
        ["export", "{model}", "-o", "{out}/no/such/dir/x.onnx"],
        "does not exist",
    ),
    "existing-output": (["fold", "{model}", "-o", "{existing}"], "--force"),
    # Every subcommand once through `python -m keras_bn`, failing after its framework
    # import, so TensorFlow's start-up lines would show if the CLI let them through.
    "inspect-unknown-custom-layer": (
        ["python", "-m", "keras_bn", "inspect", "{custom}"],
        "--custom-objects MODULE:Doubling",
    ),
    "validate-unparsable-onnx": (
        ["python", "-m", "keras_bn", "validate", "{model}", "{garbage_onnx}"],
        "cannot be parsed",
    ),
    "bench-unloadable-onnx": (
        ["python", "-m", "keras_bn", "bench", "{garbage_onnx}"],
        "cannot be parsed",
    ),
}


@pytest.fixture(scope="module")
def bad_input_runs(files, tmp_path_factory):
    jobs, out_dirs = {}, {}
    existing = tmp_path_factory.mktemp("existing") / "folded.keras"
    existing.write_bytes(b"an older output")
    for name, (template, _) in BAD_INPUTS.items():
        out = tmp_path_factory.mktemp(name)
        out_dirs[name] = out
        values = {key: str(path) for key, path in files.items()}
        values.update(dir=str(out), out=str(out), existing=str(existing))
        jobs[name] = ([arg.format(**values) for arg in template], out)
    hashes = {name: sha256(path) for name, path in files.items()}
    results = run_many(jobs)
    assert {name: sha256(path) for name, path in files.items()} == hashes, "inputs modified"
    assert existing.read_bytes() == b"an older output"
    return results, out_dirs


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_script_rejects_bad_input(bad_input_runs, case):
    results, out_dirs = bad_input_runs
    result = results[case]
    assert_rejected(result.returncode, result.stderr, BAD_INPUTS[case][1], out_dirs[case])
    assert result.stdout == ""


# ------------------------------------------------------------------------------------
# In-process: options and reports.


HEAVY_PACKAGES = {
    "keras", "tensorflow", "jax", "torch", "onnx", "onnxruntime", "onnxconverter_common", "numpy",
}  # fmt: skip


def test_help_version_and_usage_errors_import_no_heavy_package(run_python):
    """In a fresh interpreter: the parser, --help, --version and usage errors."""
    argvs = [["--help"], ["--version"], [], ["frobnicate"], ["export", "m.keras"]]
    argvs += [[command, "--help"] for command in ("inspect", "fold", "export", "validate", "bench")]
    code = (
        "import contextlib, io, sys\n"
        "from keras_bn.converters.cli import main\n"
        f"for argv in {argvs!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), "
        "contextlib.redirect_stderr(io.StringIO()):\n"
        "        assert main(argv) in (0, 2), argv\n"
        "import json\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    imported = set(json.loads(run_python(["-c", code]).stdout))
    assert not imported & HEAVY_PACKAGES, imported & HEAVY_PACKAGES


def _cpu_seconds(command: list[str], repeat: int = 5) -> float:
    """The least user+system CPU time of ``repeat`` fresh runs of ``command``."""
    import resource

    times = []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(command, stdout=subprocess.DEVNULL, check=True, timeout=60)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return min(times)


def test_help_is_instant():
    """``keras-bn --help`` costs at most 0.3 s more than a bare ``python -c pass``.

    Both are measured from scratch in fresh processes, as CPU time (what the
    process itself spends; wall time on a shared CI machine adds the wait for a
    core). Importing TensorFlow alone costs seconds.
    """
    bare = _cpu_seconds([sys.executable, "-c", "pass"])
    help_ = _cpu_seconds([str(KERAS_BN), "--help"])
    assert help_ - bare < 0.3, f"keras-bn --help {help_:.3f} s vs python -c pass {bare:.3f} s"


def test_every_option_states_its_default():
    parser = cli.build_parser()
    subcommands = parser._subparsers._group_actions[0].choices  # argparse's own API
    for name, sub in subcommands.items():
        for action in sub._actions:
            if action.option_strings and action.dest not in ("help", "output"):
                assert "default" in (action.help or ""), (name, action.option_strings)


def test_help_defaults_match_the_library():
    from keras_bn.converters import validation
    from keras_bn.converters.cli import args
    from keras_bn.converters.onnx.export import DEFAULT_OPSET

    assert (args.FLOAT32_ATOL, args.FLOAT32_RTOL) == (
        validation.DEFAULT_ATOL,
        validation.DEFAULT_RTOL,
    )
    from keras_bn.converters import samples

    assert args.VALIDATION_SAMPLES == samples.VALIDATION_SAMPLES
    assert args.MIN_VALIDATION_SAMPLES == samples.MIN_VALIDATION_SAMPLES
    export = cli.build_parser()._subparsers._group_actions[0].choices["export"]
    (opset,) = [action for action in export._actions if action.dest == "opset"]
    assert f"default: {DEFAULT_OPSET}" in opset.help


def test_parser_choices_come_from_the_registries():
    from keras_bn.converters.precision import PRECISIONS

    parser = cli.build_parser()
    export = parser._subparsers._group_actions[0].choices["export"]  # argparse's own API
    choices = {action.dest: action.choices for action in export._actions if action.choices}
    assert list(choices["precision"]) == list(PRECISIONS)
    assert tuple(choices["input_layout"]) == cli.INPUT_LAYOUTS


@pytest.mark.parametrize("layout", cli.INPUT_LAYOUTS)
def test_exporter_accepts_every_cli_input_layout(tmp_path, layout, capsys, files):
    code, _, err = run_main(
        ["export", files["model"], "-o", tmp_path / "m.onnx", "--input-layout", layout], capsys
    )
    assert code == 0, err
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    assert shape[1:] == ([3, 8, 8] if layout == "channels_first" else [8, 8, 3])
    x = _sample()
    feed = np.transpose(x, (0, 3, 1, 2)) if layout == "channels_first" else x
    np.testing.assert_allclose(
        _onnx_outputs(tmp_path / "m.onnx", np.ascontiguousarray(feed)),
        _keras_outputs(load_model(files["model"]), x),
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["export"],
        ["export", "m.keras"],  # -o is required
        ["export", "m.keras", "-o", "x.onnx", "--precision", "int4"],
        ["export", "m.keras", "-o", "x.onnx", "--input-layout", "nhwc"],
        ["export", "m.keras", "-o", "x.onnx", "--atol", "-1"],
        ["export", "m.keras", "-o", "x.onnx", "--batch-size", "0"],
        ["export", "m.keras", "-o", "x.onnx", "--samples", "0"],
        ["bench", "m.onnx", "--runs", "many"],
        ["fold", "m.keras", "-o", "x.keras", "--no-such-flag"],
        ["frobnicate"],
        [],
    ],
    ids=lambda argv: " ".join(argv) or "no-command",
)
def test_usage_errors_exit_2(argv, capsys):
    """One line naming the problem and where help is, no usage dump, no traceback."""
    code, out, err = run_main(argv, capsys)
    assert code == 2 and out == ""
    assert "usage:" not in err and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("keras-bn"), err
    assert ": error: " in err and err.rstrip().endswith("--help)"), err


@pytest.mark.parametrize(
    ("argv", "meant"),
    [
        (["export", "m.keras", "-o", "x.onnx", "--fp16"], "--precision float16"),
        (["export", "m.keras", "-o", "x.onnx", "--int8"], "--precision int8"),
        (["export", "m.keras", "-o", "x.onnx", "--precison", "float16"], "--precision"),
        (["export", "m.keras", "-o", "x.onnx", "--precision", "fp16"], "--precision float16"),
        (["export", "m.keras", "-o", "x.onnx", "--precision", "flaot16"], "--precision float16"),
        (["export", "m.keras", "-o", "x.onnx", "--nchw"], "--input-layout channels_first"),
        (
            ["export", "m.keras", "-o", "x.onnx", "--input-layuot", "channels_first"],
            "--input-layout",
        ),
        (["fold", "m.keras", "-o", "x.keras", "--atoll", "1e-3"], "--atol"),
        (["bench", "m.onnx", "--run", "3", "--treads", "2"], "--threads"),
        (["expor", "m.keras"], "keras-bn export"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_near_miss_flags_suggest_the_option_meant(argv, meant, capsys):
    code, out, err = run_main(argv, capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert f"did you mean {meant}?" in err, err


def test_suggestions_name_only_the_subcommands_own_options(capsys):
    """validate has no --precision: --fp16 gets no suggestion there, just the error."""
    code, _, err = run_main(["validate", "m.keras", "m.onnx", "--fp16"], capsys)
    assert code == 2 and "unrecognized arguments: --fp16" in err and "did you mean" not in err


def test_suggested_flags_are_accepted_by_the_parser():
    """Following the advice parses: every alias names an option its subcommands have."""
    from keras_bn.converters.cli.args import OPTION_ALIASES, VALUE_ALIASES

    parser = cli.build_parser()
    subcommands = parser._subparsers._group_actions[0].choices  # argparse's own API
    options = {o for sub in subcommands.values() for a in sub._actions for o in a.option_strings}
    for alias in OPTION_ALIASES.values():
        assert alias.split()[0] in options, alias
    export = parser.parse_args(["export", "m.keras", "-o", "x.onnx", "--precision", "float16"])
    assert export.precision == "float16"
    choices = {a.dest: a.choices for a in subcommands["export"]._actions if a.choices}
    for dest, values in VALUE_ALIASES.items():
        assert set(values.values()) <= set(choices[dest]), dest


def test_version(capsys):
    code, out, _ = run_main(["--version"], capsys)
    assert code == 0 and out.strip() == "keras-bn 0.1.0"


def test_success_is_quiet_on_stderr_and_json_is_pure(tmp_path, capsys, files):
    code, out, err = run_main(
        ["fold", files["model"], "-o", tmp_path / "f.keras", "--json", "--inputs", files["inputs"]],
        capsys,
    )
    assert code == 0 and err == ""  # no progress display when not on a terminal
    report = json.loads(out)
    assert report["status"] == "ok"
    assert report["validation"]["passed"] is True
    assert report["validation"]["outputs"][0]["batch_size"] == 6  # the given inputs
    assert [step["step"] for step in report["steps"]][-1].startswith("Writing")


def test_human_output_ends_with_a_summary_table(tmp_path, capsys, files):
    code, out, _ = run_main(["inspect", files["model"]], capsys)
    assert code == 0
    assert "batch_normalization" in out
    tail = out.strip().splitlines()
    summary_at = max(i for i, line in enumerate(tail) if line.startswith("summary"))
    assert any(
        line.startswith("would fold") and line.split()[-1] == "2" for line in tail[summary_at:]
    )


def test_the_program_freezes_what_loading_made_and_main_leaves_the_collector_alone(
    files, capsys, monkeypatch
):
    import gc

    from keras_bn.converters import model_io
    from keras_bn.converters.cli import steps
    from keras_bn.converters.cli.run import Run
    from keras_bn.converters.progress import Progress

    frozen = gc.get_freeze_count()
    code, _, _ = run_main(["inspect", files["model"]], capsys)  # a caller's main()
    assert code == 0 and gc.isenabled() and gc.get_freeze_count() == frozen

    args = cli.build_parser().parse_args(["inspect", str(files["model"])])
    run = Run(command="inspect", progress=Progress.for_terminal(quiet=True), owns_process=True)
    collector_while_loading = []
    real_load = model_io.load_model

    def load(*args, **kwargs):
        collector_while_loading.append(gc.isenabled())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(model_io, "load_model", load)
    try:
        model = steps.load_model(args, run)  # the keras-bn program's loading
        assert collector_while_loading == [False]
        assert gc.isenabled() and gc.get_freeze_count() > frozen
        assert model.built
    finally:
        gc.unfreeze()


def test_the_model_file_is_checked_once_per_command(files, capsys, monkeypatch):
    """The CLI checks the file before importing Keras; the loader does not read and
    CRC-check the whole archive a second time. A corrupted one is still refused."""
    from keras_bn.converters import model_io

    checked: list[str] = []
    real_check = model_io.check_keras_file

    def check(path, **kwargs):
        checked.append(str(path))
        return real_check(path, **kwargs)

    monkeypatch.setattr(model_io, "check_keras_file", check)
    code, _, _ = run_main(["inspect", files["model"]], capsys)
    assert code == 0 and checked == [str(files["model"])]
    code, _, err = run_main(["inspect", files["corrupted"]], capsys)
    assert code == 2 and "fails its CRC check" in err and len(checked) == 2


def test_force_replaces_and_output_cannot_be_the_input(tmp_path, capsys, files):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    code, _, err = run_main(["export", files["model"], "-o", target], capsys)
    assert_rejected(code, err, "already exists; pass --force")
    assert target.read_bytes() == b"old"
    code, _, err = run_main(["export", files["model"], "-o", target, "--force"], capsys)
    assert code == 0, err
    assert onnx.load(str(target)).graph.node  # replaced by a real model

    copy = tmp_path / "copy.keras"
    shutil.copyfile(files["model"], copy)
    before = sha256(copy)
    code, _, err = run_main(["fold", copy, "-o", copy, "--force"], capsys)
    assert_rejected(code, err, "is also an input")
    assert sha256(copy) == before


@pytest.mark.parametrize("given", ["data", "custom-objects"])
def test_a_report_never_replaces_the_data_or_the_custom_objects_file(
    given, tmp_path, capsys, files
):
    """``--report`` onto the ``--data`` file, or onto the .py file ``--custom-objects``
    loads, was written (with --force, or by inspect, which replaces reports): the
    input became JSON. It is refused as any input is."""
    if given == "data":
        victim = tmp_path / "data.npz"
        shutil.copyfile(files["inputs"], victim)
        arguments = ["inspect", files["model"], "--data", victim]
    else:
        victim = tmp_path / "layers.py"
        shutil.copyfile(files["custom_layers"], victim)
        arguments = ["inspect", files["custom"], "--custom-objects", f"{victim}:Doubling"]
    before = sha256(victim)
    code, _, err = run_main([*arguments, "--report", victim, "--force"], capsys)
    assert_rejected(code, err, "is also an input")
    assert sha256(victim) == before


def test_output_suffix_is_checked_before_any_work(tmp_path, capsys, files):
    code, _, err = run_main(["export", files["nan"], "-o", tmp_path / "m.keras"], capsys)
    assert_rejected(code, err, "expected a .onnx file name", tmp_path)  # not the NaN error


def test_json_error_report_and_no_report_file_on_bad_input(tmp_path, capsys, files):
    report = tmp_path / "report.json"
    code, out, err = run_main(
        ["fold", files["lambda"], "-o", tmp_path / "f.keras", "--json", "--report", report],
        capsys,
    )
    assert_rejected(code, err, "Lambda layer", tmp_path)
    data = json.loads(out)
    assert data["status"] == "error" and data["exit_code"] == 2 and "Lambda" in data["error"]


def test_unsafe_and_custom_objects(tmp_path, capsys, files):
    code, out, err = run_main(["inspect", files["lambda"], "--unsafe", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["batch_norms"] == []
    spec = f"{files['custom_layers']}:Doubling"
    code, out, err = run_main(["inspect", files["custom"], "--custom-objects", spec], capsys)
    assert code == 0, err
    assert "Doubling x1" in out
    code, _, err = run_main(["inspect", files["custom"], "--custom-objects", "nope:X"], capsys)
    assert_rejected(code, err, "cannot import module 'nope'")


def test_export_float16_of_masked_attention_warns_of_nothing(tmp_path, capsys):
    """Attention's -1e9 mask constant is written at float16's limit, which masks the
    same: the report names it, stderr carries no warning, validation passes."""
    tokens = keras.Input((6, 8), name="x")
    padding = keras.Input((6,), dtype="int32", name="padding_mask")
    mask = keras.ops.cast(padding, "bool")[:, None, :]
    attended = keras.layers.MultiHeadAttention(2, 4)(tokens, tokens, attention_mask=mask)
    keras.Model([tokens, padding], attended).save(tmp_path / "mha.keras")
    code, out, err = run_main(
        ["export", tmp_path / "mha.keras", "-o", tmp_path / "h.onnx", "--precision", "float16"],
        capsys,
    )
    assert code == 0, err
    assert "warning" not in err and "Validation PASSED" in out
    assert "large_negative: a masking constant (|x| = 1e+09)" in out


def test_export_float16_reports_clamped_weights(tmp_path, capsys, files):
    report_path = tmp_path / "r.json"
    code, out, err = run_main(
        [
            "export",
            files["huge"],
            "-o",
            tmp_path / "h.onnx",
            "--precision",
            "float16",
            "--report",
            report_path,
            "--no-validate",
        ],
        capsys,
    )
    assert code == 0, err
    assert "above the float16 range were clamped" in err  # a warning, not an error
    report = json.loads(report_path.read_text())
    assert report["precision"]["clamped_count"] == 1
    assert report["precision"]["range_issues"][0]["max_abs"] == pytest.approx(1e5)
    assert report["warnings"] and "validation" not in report
    initializers = onnx.load(str(tmp_path / "h.onnx")).graph.initializer
    assert {t.data_type for t in initializers} == {onnx.TensorProto.FLOAT16}


def test_export_float16_validates_against_keras(tmp_path, capsys, files):
    code, out, err = run_main(
        ["export", files["model"], "-o", tmp_path / "h.onnx", "--precision", "float16", "--json"],
        capsys,
    )
    assert code == 0, err
    report = json.loads(out)
    validation = report["validation"]
    assert validation["passed"] and validation["precision"] == "float16"
    # The float16 criterion's three numbers, per output and batch (comparison module).
    # Within the floor, which passes whatever a float16 run of the model says: none is
    # made (the run, where one is needed: tests/validation/test_validation.py).
    for comparison in validation["comparisons"]:
        assert comparison["verdict"] == "float16 criterion"
        assert 0 < comparison["exact_error"] <= comparison["bound"] == FLOAT16_FLOOR
        assert comparison["yardstick"] == "not needed"
        assert comparison["keras_exact_error"] is None
    assert report["export"]["node_count"] == sum(_op_counts(tmp_path / "h.onnx").values())
    x = _sample()
    expected = _keras_outputs(load_model(files["model"]), x)
    np.testing.assert_allclose(_onnx_outputs(tmp_path / "h.onnx", x), expected, atol=1e-2)


def test_export_int8_with_calibration(tmp_path, capsys, files, monkeypatch):
    import onnxruntime

    from keras_bn.converters.progress import Step

    counted = []  # the int8 step's calibration counts, as its progress line shows them
    original = Step.update
    monkeypatch.setattr(
        Step, "update", lambda s, *a: original(s, *a) or counted.append((s.label, s.shown()))
    )
    ran = []  # (model file, batch) of every onnxruntime run
    run = onnxruntime.InferenceSession.run
    monkeypatch.setattr(
        onnxruntime.InferenceSession,
        "run",
        lambda s, names, feed, *a, **k: (
            ran.append((str(s._model_path), len(next(iter(feed.values())))))
            or run(s, names, feed, *a, **k)
        ),
    )
    code, out, err = run_main(
        [
            "export",
            files["model"],
            "-o",
            tmp_path / "q.onnx",
            "--precision",
            "int8",
            "--calibration",
            files["calibration"],
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    shown = [text for label, text in counted if label == "Quantizing to int8 (calibrating)"]
    assert shown and shown[-1].endswith(": 4/4 batches"), shown  # 64 samples, 16 a batch
    report = json.loads(out)
    comparison = report["precision"]["comparison"]
    assert comparison["samples"] == 64 and comparison["top1_agreement"] >= 0.9
    validation = report["validation"]
    assert validation["passed"] and validation["precision"] == "int8"
    judged = validation["comparisons"][-1]  # the 64 calibration samples
    assert judged["verdict"] == "int8 criterion" and judged["shape"][0] == 64
    assert judged["sqnr_db"] >= INT8_SQNR_FLOOR_DB and judged["top1_agreement"] >= INT8_TOP1_FLOOR
    # One run of the int8 file over the 64 samples: the comparison's (of the file before
    # it is moved into place), reused by validation.
    int8_runs = [
        batch for path, batch in ran if Path(path).parent.name == "int8" and "q.onnx" in path
    ]
    assert int8_runs == [64, 1], ran
    assert judged["max_abs_error"] == pytest.approx(comparison["max_abs_diff"], rel=1e-6)
    ops = _op_counts(tmp_path / "q.onnx")
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    # The "Exported ..." numbers are the written int8 file's, not the float graph's.
    assert report["export"]["node_count"] == sum(ops.values())
    assert report["export"]["op_counts"] == dict(ops)
    # The report's numbers are what we measure: int8 model vs float Keras model.
    x = np.load(files["calibration"])["image"]
    difference = np.abs(
        _onnx_outputs(tmp_path / "q.onnx", x) - _keras_outputs(load_model(files["model"]), x)
    )
    assert difference.max() == pytest.approx(comparison["max_abs_diff"], abs=1e-4)


def test_export_int8_scheme_options(tmp_path, capsys, files):
    code, out, err = run_main(
        ["export", files["model"], "-o", tmp_path / "q.onnx", "--precision", "int8"]
        + ["--calibration", files["calibration"], "--json", "--no-validate"]
        + ["--calibration-method", "Percentile", "--bias-correction", "--tune-biases"],
        capsys,
    )
    assert code == 0, err
    precision = json.loads(out)["precision"]  # onnxruntime's histogram prints stay out
    assert precision["calibration_method"] == "Percentile"
    assert precision["bias_correction"]["samples"] == 64
    assert precision["bias_correction"]["layers"], precision["bias_correction"]
    assert precision["comparison"]["top1_agreement"] >= 0.9
    tuning = precision["bias_tuning"]  # every Conv/Dense, on the first 32 samples
    assert len(tuning["tried"]) == len(precision["bias_correction"]["layers"]), tuning
    assert tuning["samples"] == 32 and tuning["sqnr_db_after"] >= tuning["sqnr_db_before"]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--precision", "int8"], "needs calibration data"),
        (["--calibration", "{calibration}"], "only used with --precision int8"),
        (["--precision", "int8", "--calibration", "{dir}/missing.npz"], "does not exist"),
        (["--inputs", "{model}"], "expected a .npz file"),
        (["--bias-correction"], "apply to --precision int8 only"),
        (["--tune-biases"], "only used with --precision int8"),
        (["--samples", "4", "--inputs", "{inputs}"], "but --inputs gives the samples"),
        (["--samples", "4", "--no-validate"], "but --no-validate skips validation"),
        (["--samples", "4", "--batch-size", "3"], "but --batch-size 3 fixes the batch"),
        (
            ["--samples", "4", "--precision", "int8", "--calibration", "{calibration}"],
            "but int8 validation compares on the calibration data",
        ),
    ],
    ids=[
        "int8-without-calibration",
        "calibration-without-int8",
        "missing-calibration",
        "inputs",
        "bias-correction-without-int8",
        "tune-biases-without-int8",
        "samples-with-inputs",
        "samples-without-validation",
        "samples-with-another-fixed-batch",
        "samples-with-int8",
    ],
)
def test_export_option_errors(tmp_path, capsys, files, extra, fragment):
    values = {key: str(path) for key, path in files.items()}
    values["dir"] = str(tmp_path)
    extra = [arg.format(**values) for arg in extra]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run_main(["export", files["model"], "-o", out_dir / "m.onnx", *extra], capsys)
    assert_rejected(code, err, fragment, out_dir)


def test_export_with_bad_inputs_file(tmp_path, capsys, files):
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.ones((2, 8, 8, 4), "float32"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run_main(
        ["export", files["model"], "-o", out_dir / "m.onnx", "--inputs", bad], capsys
    )
    assert_rejected(code, err, "has shape (2, 8, 8, 4)", out_dir)


def test_export_no_fold_and_no_validate(tmp_path, capsys, files):
    code, out, err = run_main(
        ["export", files["model"], "-o", tmp_path / "u.onnx", "--no-fold", "--json"], capsys
    )
    assert code == 0, err
    report = json.loads(out)
    assert "fold" not in report and report["validation"]["passed"]
    code, out, err = run_main(
        ["export", files["model"], "-o", tmp_path / "f.onnx", "--no-validate", "--json"], capsys
    )
    assert code == 0, err
    assert "validation" not in json.loads(out)
    # The unfolded export computes BN separately: more nodes than the folded one.
    assert sum(_op_counts(tmp_path / "u.onnx").values()) > sum(
        _op_counts(tmp_path / "f.onnx").values()
    )


def test_export_fixed_batch_size(tmp_path, capsys, files):
    code, _, err = run_main(
        ["export", files["model"], "-o", tmp_path / "b.onnx", "--batch-size", "2"], capsys
    )
    assert code == 0, err
    session = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == 2


def test_validate_generates_the_batch_the_file_needs(tmp_path, capsys, files):
    """keras-bn validate without --inputs: a fixed-batch file is compared at its batch
    size, an int8 file on enough samples to judge top-1 agreement."""
    from keras_bn.converters.comparison import INT8_TOP1_MIN_SAMPLES

    fixed, quantized = tmp_path / "b.onnx", tmp_path / "q.onnx"
    code, _, err = run_main(["export", files["model"], "-o", fixed, "--batch-size", "3"], capsys)
    assert code == 0, err
    code, out, err = run_main(["validate", files["model"], fixed, "--json"], capsys)
    assert code == 0, err
    comparisons = json.loads(out)["validation"]["comparisons"]
    assert [(c["batch_size"], c["shape"][0]) for c in comparisons] == [(3, 3)]
    code, _, err = run_main(
        ["export", files["model"], "-o", quantized, "--precision", "int8"]
        + ["--calibration", files["calibration"]],
        capsys,
    )
    assert code == 0, err
    code, out, err = run_main(["validate", files["model"], quantized, "--json"], capsys)
    assert code in (0, 1), err  # the verdict is int8's own criterion, on generated data
    report = json.loads(out)
    assert report["precision"] == "int8"
    sizes = [c["batch_size"] for c in report["validation"]["comparisons"]]
    assert sizes == [1, INT8_TOP1_MIN_SAMPLES]


@pytest.fixture(scope="module")
def photo_sized(tmp_path_factory) -> Path:
    """A classifier of 224x224 RGB images, small enough to export in a moment."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((224, 224, 3), name="image")
    x = keras.layers.Conv2D(2, 3, strides=8, use_bias=False)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.BatchNormalization()(x))
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    path = tmp_path_factory.mktemp("photo_sized") / "photo.keras"
    randomize_batch_norms(model, 3).save(path)
    return path


def test_large_inputs_are_validated_on_fewer_samples_unless_asked(tmp_path, capsys, photo_sized):
    """150,528 values a sample: 2 samples hold VALIDATION_VALUES (samples.py), and
    --samples N asks for N, in export, validate and fold alike."""

    def validated(command: str, *extra) -> tuple[set, str]:
        output = tmp_path / ("f.keras" if command == "fold" else "m.onnx")
        where = [output] if command == "validate" else ["-o", output, "--force"]
        argv = [command, photo_sized, *where, "--json", *extra]
        code, out, err = run_main(argv, capsys)
        assert code == 0, err
        validation = json.loads(out)["validation"]
        compared = validation.get("comparisons", validation.get("outputs"))
        return {c["batch_size"] for c in compared}, validation["inputs"]

    sizes, inputs = validated("export")
    assert sizes == {1, 2}
    assert inputs.startswith("generated, 2 sample(s) (not 16: 150,528 values each; --samples N")
    sizes, inputs = validated("export", "--samples", "5")
    assert sizes == {1, 5} and inputs.startswith("generated, 5 sample(s): ")
    sizes, inputs = validated("validate", "--samples", "3")
    assert sizes == {1, 3} and inputs.startswith("generated, 3 sample(s): ")
    sizes, inputs = validated("validate")
    assert sizes == {1, 2}
    sizes, inputs = validated("fold", "--samples", "3")
    assert sizes == {3} and inputs.startswith("generated, 3 sample(s): ")
    sizes, inputs = validated("fold")
    assert sizes == {2} and "(not 16: 150,528 values each" in inputs


def test_validate_samples_that_the_file_cannot_take(tmp_path, capsys, files):
    fixed, quantized = tmp_path / "b.onnx", tmp_path / "q.onnx"
    code, _, err = run_main(["export", files["model"], "-o", fixed, "--batch-size", "3"], capsys)
    assert code == 0, err
    code, _, err = run_main(["validate", files["model"], fixed, "--samples", "4"], capsys)
    assert_rejected(code, err, "--samples 4: the ONNX model's batch size is fixed at 3")
    code, _, err = run_main(
        ["export", files["model"], "-o", quantized, "--precision", "int8"]
        + ["--calibration", files["calibration"]],
        capsys,
    )
    assert code == 0, err
    code, _, err = run_main(["validate", files["model"], quantized, "--samples", "4"], capsys)
    assert_rejected(code, err, "int8 validation judges top-1 agreement on at least 20 samples")


@pytest.mark.parametrize(
    "extra",
    [["--inputs", "inputs"], ["--precision", "int8", "--calibration", "calibration"]],
    ids=["user-inputs", "int8-calibration"],
)
def test_export_fixed_batch_size_validates_given_samples(tmp_path, capsys, files, extra):
    # Regression: the first sample alone was also fed to the batch-4 model, which
    # onnxruntime rejects, so export reported "validation failed" and wrote nothing.
    extra = [files.get(a, a) for a in extra]
    output = tmp_path / "b.onnx"
    code, out, err = run_main(
        ["export", files["model"], "-o", output, "--batch-size", "4", "--json", *extra], capsys
    )
    assert code == 0, err
    samples = len(np.load(extra[-1])["image"])  # 6 inputs, 64 calibration samples
    (comparison,) = json.loads(out)["validation"]["comparisons"]
    assert comparison["batch_size"] == 4 and comparison["shape"][0] == samples
    assert comparison["passed"]
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == 4


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> Path:
    """A Dense model with a 2 KiB kernel: the exporter stores kernels over 1 KiB externally."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8,), name="features")
    x = keras.layers.Dense(64)(inputs)
    x = keras.layers.BatchNormalization()(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.ReLU()(x)), name="wide")
    randomize_batch_norms(model, seed=1)
    path = tmp_path_factory.mktemp("wide") / "wide.keras"
    model.save(path)
    return path


def test_export_external_data_keeps_the_data_file_reference(tmp_path, capsys, wide_model):
    # Regression: the model was exported under a temporary name, so it referred to
    # "<temporary>.onnx.data", a file that was never written beside the output.
    output = tmp_path / "net.onnx"
    code, out, err = run_main(
        ["export", wide_model, "-o", output, "--external-data", "--json"], capsys
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["validation"]["passed"]
    data = tmp_path / "net.onnx.data"
    assert report["output"]["external_data"] == [{"path": str(data), "bytes": data.stat().st_size}]
    proto = onnx.load(str(output), load_external_data=False)
    locations = {
        entry.value
        for tensor in proto.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert locations == {"net.onnx.data"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "net.onnx.data"]
    x = np.random.default_rng(2).normal(size=(5, 8)).astype("float32")
    np.testing.assert_allclose(
        _onnx_outputs(output, x), _keras_outputs(load_model(wide_model), x), atol=1e-5
    )
    # Moved elsewhere together, the pair still loads: the reference is relative.
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("net.onnx", "net.onnx.data"):
        (tmp_path / name).rename(moved / name)
    assert _onnx_outputs(moved / "net.onnx", x).shape == (5, 3)


def test_replacing_an_export_removes_the_data_file_only_it_used(tmp_path, capsys, wide_model):
    """``export --external-data``, then ``export --force`` without it: the new file holds
    its weights, and the first one's ``net.onnx.data``, which nothing refers to any
    more, stayed beside it. It is removed with the file it belonged to; replaced by
    another external export, the new data file is kept."""
    output = tmp_path / "net.onnx"
    first = ["export", wide_model, "-o", output, "--external-data"]
    assert run_main(first, capsys)[0] == 0
    assert (tmp_path / "net.onnx.data").is_file()
    assert run_main(["export", wide_model, "-o", output, "--force"], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]
    x = np.random.default_rng(3).normal(size=(4, 8)).astype("float32")
    expected = _keras_outputs(load_model(wide_model), x)
    np.testing.assert_allclose(_onnx_outputs(output, x), expected, atol=1e-5)
    assert run_main([*first, "--force"], capsys)[0] == 0
    assert run_main([*first, "--force"], capsys)[0] == 0  # external over external
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "net.onnx.data"]
    np.testing.assert_allclose(_onnx_outputs(output, x), expected, atol=1e-5)


def test_replacing_an_export_without_a_data_file_does_not_read_it(
    tmp_path, capsys, wide_model, monkeypatch
):
    """``export --force`` over a model with no ``<output>.data`` beside it has no data
    file to remove: the replaced model is not read (0.26 s for ResNet50's)."""
    from keras_bn.converters.cli import export as export_cli

    output = tmp_path / "net.onnx"
    assert run_main(["export", wide_model, "-o", output], capsys)[0] == 0
    read = export_cli._external_data_locations
    monkeypatch.setattr(
        export_cli,
        "_external_data_locations",
        lambda path: pytest.fail(f"read {path}") if path == output else read(path),
    )
    assert run_main(["export", wide_model, "-o", output, "--force"], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]


def test_export_external_data_rejections(tmp_path, capsys, wide_model):
    output = tmp_path / "net.onnx"
    (tmp_path / "net.onnx.data").write_text("someone else's file")
    code, _, err = run_main(["export", wide_model, "-o", output, "--external-data"], capsys)
    assert_rejected(code, err, "--force")
    assert (tmp_path / "net.onnx.data").read_text() == "someone else's file"
    code, _, err = run_main(
        ["export", wide_model, "-o", output, "--external-data", "--precision", "float16"],
        capsys,
    )
    assert_rejected(code, err, "--precision float32 only")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx.data"]


def test_export_external_data_with_only_small_weights_says_so(tmp_path, capsys):
    """No weight over 1 KiB: no (empty) data file beside the model, and the summary
    says why, rather than leaving a .data file that nothing refers to."""
    inputs = keras.Input((3,), name="features")
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs), name="tiny")
    model.save(tmp_path / "tiny.keras")
    output = tmp_path / "net.onnx"
    code, out, err = run_main(
        ["export", tmp_path / "tiny.keras", "-o", output, "--external-data"], capsys
    )
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "tiny.keras"]
    assert re.search(r"external data +none: every weight is 1 KiB or less", out), out


def test_a_failed_folded_export_suggests_exporting_without_folding(tmp_path, capsys, files):
    """A float32 export whose folded file fails validation names --no-fold among the
    ways out (a fold can cost precision); one that folded nothing does not."""
    strict = ["--atol", "1e-12", "--rtol", "0"]
    code, _, err = run_main(["export", files["model"], "-o", tmp_path / "a.onnx", *strict], capsys)
    assert code == 1 and "export without folding (--no-fold)" in err
    code, _, err = run_main(
        ["export", files["model"], "-o", tmp_path / "b.onnx", "--no-fold", *strict], capsys
    )
    assert code == 1 and "validation failed" in err and "(--no-fold)" not in err


def test_validation_failure_exits_1_writes_report_not_model(tmp_path, capsys, files):
    report = tmp_path / "r.json"
    code, out, err = run_main(
        [
            "export",
            files["model"],
            "-o",
            tmp_path / "q.onnx",
            "--precision",
            "int8",
            "--calibration",
            files["calibration"],
            "--atol",
            "1e-9",
            "--rtol",
            "0",
            "--report",
            report,
        ],
        capsys,
    )
    assert code == 1
    assert "validation failed" in err and "nothing was written" in err
    assert "Traceback" not in err
    assert not (tmp_path / "q.onnx").exists()
    data = json.loads(report.read_text())
    assert data["status"] == "validation_failed" and data["exit_code"] == 1
    assert data["validation"]["passed"] is False


def test_validate_another_models_export_fails(tmp_path, capsys, files):
    code, _, err = run_main(["export", files["other"], "-o", tmp_path / "other.onnx"], capsys)
    assert code == 0, err
    code, out, err = run_main(
        ["validate", files["model"], tmp_path / "other.onnx", "--json"], capsys
    )
    assert code == 1
    assert json.loads(out)["validation"]["passed"] is False
    assert "validation failed" in err and "Traceback" not in err


def test_validate_rejects_a_non_onnx_file(tmp_path, capsys, files):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 not a protobuf \xff" * 10)
    code, _, err = run_main(["validate", files["model"], garbage], capsys)
    assert_rejected(code, err, "cannot be parsed")
    code, _, err = run_main(["validate", files["model"], tmp_path / "none.onnx"], capsys)
    assert_rejected(code, err, "does not exist")


def test_bench_errors(tmp_path, capsys):
    code, _, err = run_main(["bench", tmp_path / "missing.onnx"], capsys)
    assert_rejected(code, err, "does not exist")


def test_bench_of_one_file_twice_keeps_both_runs(tmp_path, capsys, files):
    """``bench m.onnx m.onnx`` (the run-to-run spread): the report was by path, so the
    second row repeated the first one's numbers and the JSON kept one entry. The
    second run is ``PATH (2)``, with its own row, numbers and JSON entries."""
    onnx_file = tmp_path / "m.onnx"
    assert run_main(["export", files["model"], "-o", onnx_file], capsys)[0] == 0
    code, out, err = run_main(["bench", onnx_file, onnx_file, "--runs", "3", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)["bench"]
    second = f"{onnx_file} (2)"
    assert report["models"] == [str(onnx_file), second]
    assert set(report["bytes"]) == set(report["speedup_vs_first"]) == {str(onnx_file), second}
    runs = {(r["model"], r["optimization"]) for r in report["results"]}
    assert len(runs) == 4 and {model for model, _ in runs} == {str(onnx_file), second}


def test_bench_compares_any_number_of_files(tmp_path, capsys, files):
    """float32, float16 and int8 exports side by side: sizes and speed-ups vs the first."""
    paths = {}
    for precision in ("float32", "float16", "int8"):
        paths[precision] = tmp_path / f"m_{precision}.onnx"
        argv = ["export", files["model"], "-o", paths[precision], "--precision", precision]
        argv += ["--calibration", files["calibration"]] if precision == "int8" else []
        assert run_main(argv, capsys)[0] == 0
    code, out, err = run_main(["bench", *paths.values(), "--runs", "3", "--warmup", "0"], capsys)
    assert code == 0 and err == "", err
    for index, path in enumerate(paths.values(), start=1):
        (row,) = [line for line in out.splitlines() if line.startswith(f"[{index}] {path.name}")]
        assert f"{path.stat().st_size / 1024:.1f} KiB" in row
        assert row.count("x") >= 2  # a speed-up at each optimization level
    assert out.rstrip().splitlines()[-1].startswith("next: ")
    code, out, _ = run_main(["bench", *paths.values(), "--runs", "3", "--json"], capsys)
    report = json.loads(out)["bench"]
    assert report["bytes"] == {str(p): p.stat().st_size for p in paths.values()}
    for path in paths.values():
        times = {
            r["optimization"]: r["median_ms"] for r in report["results"] if r["model"] == str(path)
        }
        first = {r["optimization"]: r["median_ms"] for r in report["results"]
                 if r["model"] == str(paths["float32"])}  # fmt: skip
        for level, ratio in report["speedup_vs_first"][str(path)].items():
            assert ratio == pytest.approx(first[level] / times[level])
    # One file: the next step is the same model at the next precision down, and the
    # int8 file against float32 (before: always "--precision float16", a float16 file too).
    suggested = {"float32": "--precision float16", "float16": "--precision int8", "int8": "_fp32"}
    for precision, path in paths.items():
        code, out, _ = run_main(["bench", path, "--runs", "2", "--warmup", "0"], capsys)
        (line,) = [line for line in out.splitlines() if line.startswith("next: ")]
        assert code == 0 and suggested[precision] in line, line


def test_inspect_report_replaces_an_existing_report(tmp_path, capsys, files):
    """inspect writes no model: its --report is replaced (atomically) without --force;
    fold and export still ask for --force before replacing theirs."""
    report = tmp_path / "inspect.json"
    report.write_text("old")
    code, _, err = run_main(["inspect", files["model"], "--report", report], capsys)
    assert code == 0, err
    assert json.loads(report.read_text())["command"] == "inspect"
    assert [p.name for p in tmp_path.iterdir()] == ["inspect.json"]  # no temporary left


def test_report_path_is_checked_up_front(tmp_path, capsys, files):
    existing = tmp_path / "r.json"
    existing.write_text("{}")
    code, _, err = run_main(
        ["fold", files["model"], "-o", tmp_path / "f.keras", "--report", existing], capsys
    )
    assert_rejected(code, err, "already exists")
    assert not (tmp_path / "f.keras").exists() and existing.read_text() == "{}"


def test_progress_draws_on_a_terminal_only():
    import io

    from keras_bn.converters.progress import Progress

    stream = io.StringIO()
    progress = Progress(enabled=True, stream=stream)
    with progress.step("Folding"):
        pass
    with pytest.raises(ValueError), progress.step("Exporting"):
        raise ValueError("boom")
    text = stream.getvalue()
    assert "ok  Folding" in text and "FAILED  Exporting" in text
    assert [(s.label, s.status) for s in progress.steps] == [
        ("Folding", "ok"),
        ("Exporting", "failed"),
    ]
    assert Progress.for_terminal(quiet=False).enabled is False  # pytest captures: no TTY


def test_progress_shows_counts_on_a_terminal():
    import io
    import time

    from keras_bn.converters.progress import Progress

    stream = io.StringIO()
    progress = Progress(enabled=True, stream=stream)
    with progress.step("Validating", unit="samples") as step:
        step.update(5, 16)
        time.sleep(0.35)  # the spinner redraws every 0.1 s
    assert "Validating: 5/16 samples (" in stream.getvalue()
    assert "ok  Validating (" in stream.getvalue().splitlines()[-1]


def test_progress_lines_in_a_log_name_slow_steps_only(monkeypatch):
    """Not on a terminal (the program's stderr in a log): a step still running after
    ``slow`` seconds gets one line, then one more when its counts move; fast steps
    and background steps none."""
    import io
    import time

    from keras_bn.converters import progress as progress_lib

    monkeypatch.setattr(progress_lib, "LINE_EVERY", 0.2)
    stream = io.StringIO()
    progress = progress_lib.Progress(
        enabled=False, stream=stream, lines=True, prefix="keras-bn fold: ", slow=0.3
    )
    with progress.step("Loading model"):
        pass
    with progress.background("Running the model in Keras (beside the fold)"):
        time.sleep(0.5)
    with progress.step("Folding BatchNormalization", unit="layers") as step:
        step.update(3, 176)
        time.sleep(0.45)
        step.update(120, 176)
        time.sleep(1.0)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("keras-bn fold: Folding BatchNormalization: 3/176 layers... (")
    assert lines[1].startswith("keras-bn fold: Folding BatchNormalization: 120/176 layers... (")
    assert all(PROGRESS_LINE.fullmatch(line) for line in lines), lines
    assert [s.label for s in progress.steps][-1] == "Folding BatchNormalization"
    # The program (lines=True) shows them unless quiet; a caller's main() never.
    assert progress_lib.Progress.for_terminal(quiet=False, lines=True).lines is True
    assert progress_lib.Progress.for_terminal(quiet=True, lines=True).lines is False
    assert progress_lib.Progress.for_terminal(quiet=False).lines is False


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(
    tmp_path, capsys, files, monkeypatch
):
    import errno

    from keras_bn.converters.onnx import writing

    class FullDisk:
        """A file the ONNX writer opens, on a disk that fills after its first write."""

        def __init__(self, path, mode):
            self.file = open(path, mode)  # noqa: SIM115 - closed by __exit__
            self.writes = 0

        def __enter__(self):
            return self

        def __exit__(self, *exception):
            self.file.close()

        def write(self, data):
            self.writes += 1
            if self.writes > 1:  # the first chunk landed: a partial file is on disk
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.file.write(data)

    monkeypatch.setattr(writing, "open", FullDisk, raising=False)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run_main(["export", files["model"], "-o", out_dir / "m.onnx"], capsys)
    assert_rejected(code, err, "No space left on device", out_dir)


def test_export_traces_custom_layers(tmp_path, capsys, files):
    """A custom layer without a rule (Doubling: x * 2.0) is traced, not refused."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    spec = f"{files['custom_layers']}:Doubling"
    code, out, err = run_main(
        ["export", files["custom"], "--custom-objects", spec, "-o", out_dir / "m.onnx"], capsys
    )
    assert code == 0, err
    assert (out_dir / "m.onnx").exists() and "fallback" not in out.lower()


def test_export_float16_without_io_types_validates(tmp_path, capsys, files):
    path = tmp_path / "h.onnx"
    code, out, err = run_main(
        [
            "export", files["model"], "-o", path, "--precision", "float16",
            "--no-keep-io-types", "--json",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["validation"]["passed"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float16)"
    x = _sample()
    received = session.run(None, {session.get_inputs()[0].name: x.astype(np.float16)})[0]
    assert received.dtype == np.float16
    np.testing.assert_allclose(received, _keras_outputs(load_model(files["model"]), x), atol=1e-2)


@pytest.fixture(scope="module")
def unfoldable(tmp_path_factory) -> Path:
    """Conv-BN (folds), then ReLU-BN 'stuck'-Conv(padding='same') (cannot fold)."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.BatchNormalization(name="stuck")(x)
    x = keras.layers.Conv2D(4, 3, padding="same")(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name="unfoldable")
    randomize_batch_norms(model, seed=2)
    path = tmp_path_factory.mktemp("unfoldable") / "unfoldable.keras"
    model.save(path)
    return path


@pytest.mark.parametrize(
    ("command", "suffix"), [("fold", ".keras"), ("export", ".onnx")], ids=["fold", "export"]
)
def test_an_unfoldable_batch_norm_is_warned_about_once(
    tmp_path, capsys, unfoldable, command, suffix
):
    code, out, err = run_main([command, unfoldable, "-o", tmp_path / f"m{suffix}"], capsys)
    assert code == 0, err
    (line,) = err.splitlines()
    assert line.startswith(f"keras-bn {command}: warning: 1 BatchNormalization") and "stuck" in line
    # Both commands fold already: no advice to fold (fold_batch_norms, fold=True).
    assert "fold_batch_norms" not in err and "fold=True" not in err
    assert "warning:" not in out


def test_no_fold_warning_advises_dropping_the_flag(tmp_path, capsys, unfoldable):
    code, out, err = run_main(
        ["export", unfoldable, "-o", tmp_path / "m.onnx", "--no-fold"], capsys
    )
    assert code == 0, err
    (line,) = err.splitlines()
    assert line.startswith("keras-bn export: warning: ") and "drop --no-fold" in line
    assert "fold_batch_norms" not in line and "warning:" not in out


def test_internal_error_keeps_its_traceback_and_exits_3(files, capsys, monkeypatch):
    """A bug in keras-bn is neither 'validation failed' (1) nor 'bad input' (2)."""
    import keras_bn.converters.folding as folding

    def broken(*args, **kwargs):
        raise RuntimeError("planted bug")

    monkeypatch.setattr(folding, "plan_folds", broken)
    code, out, err = run_main(["inspect", files["model"]], capsys)
    assert code == cli.EXIT_INTERNAL_ERROR == 3
    assert "Traceback" in err and "planted bug" in err
    assert "internal error (RuntimeError): this is a bug in keras-bn" in err.splitlines()[-1]
    assert out == ""


def test_fold_judges_doubtful_outputs_against_float64(tmp_path, capsys):
    """An ill-conditioned model: Keras float32 is itself visibly off the exact result,
    so the folded model fails the elementwise tolerances but is no less exact."""
    from support.models import calibrate_batch_norms

    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(64, 64, 3), alpha=0.35, classifier_activation=None
    )
    pixels = np.random.default_rng(0).uniform(0, 255, (16, 64, 64, 3)).astype("float32")
    calibrate_batch_norms(model, pixels)
    model.save(tmp_path / "m.keras")
    args = ["fold", tmp_path / "m.keras", "-o", tmp_path / "f.keras", "--json"]
    code, out, err = run_main(args, capsys)
    validation = json.loads(out)["validation"]
    assert code == 0, err
    assert "float64" in validation["exact_note"]
    judged = [o for o in validation["outputs"] if o["verdict"] == "float64 reference"]
    assert judged and all(o["passed"] for o in judged)
    # The same comparison under the elementwise contract fails: float32 noise.
    args = [*args[:3], tmp_path / "g.keras", "--json", "--atol", "1e-4", "--rtol", "1e-3"]
    code, out, err = run_main(args, capsys)
    assert code == 1, err
    assert not (tmp_path / "g.keras").exists()


def test_fold_runs_each_model_once_and_builds_the_folded_model_once(
    tmp_path, capsys, files, monkeypatch
):
    """As export does: one Keras pass of the original (the background reference, on
    validation's inputs), the fold plan replayed once as a Keras model, one pass of
    it; the fold report's difference is the comparison's."""
    from keras_bn.converters import reference as reference_lib
    from keras_bn.converters import samples
    from keras_bn.converters.folding import rewrite

    runs, rebuilds = [], []
    real_call, real_rebuild = samples.call_model, rewrite._rebuild

    def call_model(model, inputs):
        runs.append((getattr(model, "model", model).name, len(next(iter(inputs.values())))))
        return real_call(model, inputs)

    def rebuild(*args, **kwargs):
        rebuilds.append(1)
        return real_rebuild(*args, **kwargs)

    monkeypatch.setattr(samples, "call_model", call_model)
    monkeypatch.setattr(reference_lib, "call_model", call_model)
    monkeypatch.setattr(rewrite, "_rebuild", rebuild)
    out_path = tmp_path / "f.keras"
    code, out, err = run_main(["fold", files["model"], "-o", out_path, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    name = load_model(files["model"]).name
    assert sorted(runs) == [(name, 16), (name, 16)], runs  # original, then the folded copy
    assert len(rebuilds) == 1
    steps = [step["step"] for step in report["steps"]]
    assert steps.count("Folding BatchNormalization") == 1
    assert "Running the model in Keras (beside the fold)" in steps
    worst = max(o["max_abs_error"] for o in report["validation"]["outputs"])
    assert report["fold"]["max_abs_diff"] == worst
    # and the file holds the folded model: no BN, the original's outputs
    folded = load_model(out_path)
    assert _batch_norm_layers(folded) == 0
    x = _sample()
    np.testing.assert_allclose(
        _keras_outputs(folded, x),
        _keras_outputs(load_model(files["model"]), x),
        rtol=1e-4,
        atol=1e-6,
    )


def _deep_keras_file(path: Path, levels: int) -> Path:
    """A .keras archive whose config.json nests ``levels`` Sequential models."""
    import zipfile

    config = '{"class_name": "Sequential", "config": {"name": "s", "layers": [' * levels
    config += "]}}" * levels
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", config)
        archive.writestr("metadata.json", json.dumps({"keras_version": keras.__version__}))
        archive.writestr("model.weights.h5", b"")
    return path


@pytest.mark.parametrize("limit", [None, "100000"], ids=["default-limit", "limit-raised"])
def test_deeply_nested_config_is_one_line_exit_2(tmp_path, capsys, monkeypatch, limit):
    """1,000 nested models: refused before parsing (or, past a raised limit, the JSON
    decoder's RecursionError is still the file's problem, not an internal error)."""
    if limit is not None:
        monkeypatch.setenv("KERAS_BN_MAX_CONFIG_DEPTH", limit)
    deep = _deep_keras_file(tmp_path / "deep.keras", 1000)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for command in (["inspect", deep], ["export", deep, "-o", out_dir / "d.onnx"]):
        code, _, err = run_main(command, capsys)
        assert_rejected(code, err, "config.json", out_dir)


def test_onnx_external_data_outside_its_directory_is_one_line_exit_2(files, tmp_path, capsys):
    """An initializer whose external data points at ../../../../etc/passwd is never read."""
    from onnx import TensorProto, helper

    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4, 3])
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "../../../../etc/passwd"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "evil",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [weight],
    )
    evil = tmp_path / "evil.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), evil)
    for command in (["validate", files["model"], evil], ["bench", evil]):
        code, _, err = run_main(command, capsys)
        assert_rejected(code, err, "evil.onnx")


# ------------------------------------------------------------------------------------
# Advice that works: each message's advice, followed.


def _channels_first_float16_model() -> keras.Model:
    """channels_first float16 convolutions: TensorFlow's CPU kernels refuse them, except
    where oneDNN runs them (CPUs with AVX512-FP16: :func:`_tensorflow_cpu_runs_nchw`)."""
    inputs = keras.Input((3, 8, 8), name="image")
    x = keras.layers.Conv2D(4, 3, data_format="channels_first", dtype="mixed_float16")(inputs)
    x = keras.layers.BatchNormalization(axis=1, dtype="mixed_float16")(x)
    x = keras.layers.GlobalAveragePooling2D(data_format="channels_first")(x)
    outputs = keras.layers.Dense(2, dtype="float32")(x)
    return randomize_batch_norms(keras.Model(inputs, outputs), seed=3)


def _tensorflow_cpu_runs_nchw(dtype: str) -> bool:
    """Whether this CPU's TensorFlow kernels run an NCHW convolution in ``dtype``."""
    import tensorflow as tf

    try:
        tf.nn.conv2d(tf.zeros((1, 1, 2, 2), dtype), tf.zeros((1, 1, 1, 1), dtype), 1, "VALID", data_format="NCHW")  # fmt: skip
    except tf.errors.UnimplementedError:
        return False
    return True


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's CPU kernels")
def test_channels_first_on_tensorflow_cpu_advises_another_backend_which_works(tmp_path, capsys):
    """Where TensorFlow's CPU kernels refuse the model, one line advises JAX, and the
    advice works; where they run it (oneDNN on AVX512-FP16 CPUs), it exports there."""
    _channels_first_float16_model().save(tmp_path / "cf.keras")
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, err = run_main(["export", tmp_path / "cf.keras", "-o", out / "cf.onnx"], capsys)
    if _tensorflow_cpu_runs_nchw("float16"):
        assert code == 0 and "Validation PASSED" in stdout, err
        (out / "cf.onnx").unlink()
    else:
        assert_rejected(code, err, "KERAS_BACKEND=jax keras-bn", out)
        assert "re-save" not in err and "\x1b" not in err
    # The advice, followed: the same command with KERAS_BACKEND=jax.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [str(KERAS_BN), "export", tmp_path / "cf.keras", "-o", out / "cf.onnx", "--json"],
        env={**env, "KERAS_BACKEND": "jax"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["backend"] == "jax" and report["validation"]["passed"] is True
    assert (out / "cf.onnx").is_file()


def test_a_float64_convolution_onnxruntime_cannot_run_is_one_line_not_a_bug(tmp_path, capsys):
    """A model built in float64 exports float64 Conv nodes, valid ONNX that onnxruntime's
    CPU provider has no kernel for: exit 2 naming the node and the cause (it was an
    internal error), nothing written; --no-validate writes the file, and ONNX's own
    reference evaluator runs it to Keras's float64 answer."""
    inputs = keras.Input((8, 8, 3), name="image", dtype="float64")
    x = keras.layers.Conv2D(4, 3, name="conv", dtype="float64")(inputs)
    x = keras.layers.BatchNormalization(name="bn", dtype="float64")(x)
    x = keras.layers.GlobalAveragePooling2D(dtype="float64")(x)
    model = randomize_batch_norms(keras.Model(inputs, keras.layers.Dense(2, dtype="float64")(x)), 4)
    model.save(tmp_path / "f64.keras")
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run_main(["export", tmp_path / "f64.keras", "-o", out / "f64.onnx"], capsys)
    assert_rejected(code, err, "no CPU kernel for Conv", out)
    assert "'conv'" in err and "float64" in err and "internal error" not in err
    code, _, err = run_main(
        ["export", tmp_path / "f64.keras", "-o", out / "f64.onnx", "--no-validate"], capsys
    )
    assert code == 0, err
    from onnx.reference import ReferenceEvaluator

    image = np.random.default_rng(0).uniform(0.0, 1.0, (3, 8, 8, 3))
    (got,) = ReferenceEvaluator(str(out / "f64.onnx")).run(None, {"image": image})
    assert got.dtype == np.float64
    # NumPy float64 (JAX's Keras computes a float64 model in float32 unless x64 is on)
    kernel, bias = model.get_layer("conv").get_weights()
    gamma, beta, mean, variance = model.get_layer("bn").get_weights()
    windows = np.lib.stride_tricks.sliding_window_view(image, (3, 3), axis=(1, 2))
    h = np.einsum("bhwcij,ijco->bhwo", windows, kernel) + bias
    h = (h - mean) / np.sqrt(variance + model.get_layer("bn").epsilon) * gamma + beta
    dense_kernel, dense_bias = model.layers[-1].get_weights()
    expected = h.mean(axis=(1, 2)) @ dense_kernel + dense_bias
    # JAX without x64 keeps the variables in float32: the folding's rounding, 1e-8.
    tolerance = 1e-12 if keras.backend.backend() == "tensorflow" else 1e-6
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance)
    code, _, err = run_main(["validate", tmp_path / "f64.keras", out / "f64.onnx"], capsys)
    assert_rejected(code, err, "no CPU kernel for Conv")


def test_weights_only_file_advice_works(tmp_path, capsys):
    """A .weights.h5 holds no model: build it in code, load the weights, save .keras."""
    trained = conv_bn_classifier(seed=5)
    trained.save_weights(tmp_path / "model.weights.h5")
    code, _, err = run_main(
        ["export", tmp_path / "model.weights.h5", "-o", tmp_path / "m.onnx"], capsys
    )
    assert_rejected(code, err, "holds weights only")
    assert "model.load_weights(" in err and "model.save('model.keras')" in err
    # The advice, followed: the architecture from code (other initial weights).
    model = conv_bn_classifier(seed=0)
    model.load_weights(tmp_path / "model.weights.h5")
    model.save(tmp_path / "model.keras")
    code, _, err = run_main(["export", tmp_path / "model.keras", "-o", tmp_path / "m.onnx"], capsys)
    assert code == 0, err
    x = _sample()
    np.testing.assert_allclose(
        _onnx_outputs(tmp_path / "m.onnx", x), _keras_outputs(trained, x), atol=1e-5
    )


def test_legacy_h5_model_advice_works(tmp_path, capsys):
    """A whole legacy H5 model: Keras loads it; re-saved as .keras it exports."""
    trained = conv_bn_classifier(seed=5)
    trained.save(tmp_path / "model.h5")
    code, _, err = run_main(["export", tmp_path / "model.h5", "-o", tmp_path / "m.onnx"], capsys)
    assert_rejected(code, err, "Legacy H5 models are not supported")
    assert "weights only" not in err
    keras.saving.load_model(tmp_path / "model.h5").save(tmp_path / "model.keras")
    code, _, err = run_main(["export", tmp_path / "model.keras", "-o", tmp_path / "m.onnx"], capsys)
    assert code == 0, err


def test_own_export_that_does_not_fit_the_model_is_an_internal_error(
    tmp_path, capsys, files, monkeypatch
):
    """A file keras-bn wrote in this run that does not fit the model is keras-bn's bug:
    exit 3 with the traceback, never "was the file exported from this model?"."""
    from keras_bn.converters.onnx import export as onnx_export

    real = onnx_export.export_onnx
    first = keras.Input((3,), name="a")
    second = keras.Input((3,), name="b")
    two_inputs = keras.Model([first, second], keras.layers.Add()([first, second]))

    def broken(model, path, **kwargs):  # an exporter bug: the wrong graph
        return real(two_inputs, path, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    code, _, err = run_main(["export", files["model"], "-o", tmp_path / "m.onnx"], capsys)
    assert code == 3, err
    assert "Traceback" in err and "internal error" in err
    assert "exported from this model?" not in err
    assert "RuntimeError: the ONNX file keras-bn exported from this model does not fit" in err
    assert not (tmp_path / "m.onnx").exists()


# ------------------------------------------------------------------------------------
# Reports a person reads; validation that says what it checked.


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory) -> Path:
    """Keras's ResNet50 (53 BatchNormalization layers) at its smallest input, 32x32."""
    path = tmp_path_factory.mktemp("resnet50") / "resnet50.keras"
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)
    randomize_batch_norms(model, seed=1, gain=(0.9, 1.1))
    model.save(path)
    return path


def test_resnet50_export_fits_one_screen(tmp_path, capsys, resnet50_file):
    code, out, err = run_main(["export", resnet50_file, "-o", tmp_path / "r.onnx"], capsys)
    assert code == 0 and err == "", err
    lines = out.rstrip().splitlines()
    assert len(lines) <= 40, out
    assert lines[0] == "53 of 53 BatchNormalization layers folded"
    assert "conv2_block1_1_bn" not in out  # no 53-row table of "yes"
    for noise in ("not measured", "would pass with", "inf"):
        assert noise not in out, noise
    assert lines[-1] == f"next: keras-bn bench {tmp_path / 'r.onnx'}"
    # --verbose: the full table; --json: every entry.
    code, out, _ = run_main(
        ["export", resnet50_file, "-o", tmp_path / "r.onnx", "--force", "--verbose"], capsys
    )
    assert code == 0 and sum(" yes " in line for line in out.splitlines()) == 53
    code, out, _ = run_main(
        ["export", resnet50_file, "-o", tmp_path / "r.onnx", "--force", "--json"], capsys
    )
    report = json.loads(out)
    assert len(report["fold"]["entries"]) == 53 and report["next"].startswith("keras-bn bench")


def _rescaled_cnn(scale: float, offset: float = 0.0) -> keras.Model:
    inputs = keras.Input((8, 8, 1), name="digits")
    x = keras.layers.Rescaling(scale, offset)(inputs)
    x = keras.layers.Conv2D(4, 3)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    return randomize_batch_norms(keras.Model(inputs, keras.layers.Dense(3)(x)), seed=2)


def test_rescaling_model_is_validated_on_its_range_and_says_so(tmp_path, capsys, monkeypatch):
    """A CNN behind Rescaling(1/16) reads 0..16: validation runs there and says so."""
    from keras_bn.converters import reference, samples

    _rescaled_cnn(1 / 16).save(tmp_path / "digits.keras")
    made = []
    real = samples.make_sample_inputs

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(reference, "make_sample_inputs", recording)  # the Keras pass's
    argv = ["export", tmp_path / "digits.keras", "-o", tmp_path / "d.onnx"]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if line.startswith("  inputs: generated")]
    assert f"{samples.VALIDATION_SAMPLES} sample(s)" in line and "uniform 0..16 " in line
    assert "Rescaling(scale=0.0625, offset=0)" in line
    (x,) = made[-1].values()
    assert x.shape[0] == samples.VALIDATION_SAMPLES == 16
    assert 0 <= x.min() and x.max() <= 16 and x.max() > 12  # 0..16, not 0..255
    # The float64-backed report gives the same description in JSON.
    code, out, _ = run_main([*argv, "--force", "--json"], capsys)
    assert "uniform 0..16" in json.loads(out)["validation"]["inputs"]


def test_given_inputs_are_named_as_given(tmp_path, capsys, files):
    code, out, err = run_main(
        ["export", files["model"], "-o", tmp_path / "m.onnx", "--inputs", files["inputs"]], capsys
    )
    assert code == 0, err
    assert f"  inputs: given, 6 sample(s) from {files['inputs']}" in out


def test_int8_validation_on_calibration_data_says_so(tmp_path, capsys, files):
    argv = ["export", files["model"], "-o", tmp_path / "m.onnx", "--precision", "int8"]
    code, out, err = run_main([*argv, "--calibration", files["calibration"]], capsys)
    assert code == 0, err
    assert "int8 is judged on the samples it was calibrated on (in-sample)" in out
    assert "vs the float32 model on its calibration data, 64 sample(s)" in out


def test_input_labels_fit_the_inputs(tmp_path, capsys):
    """The layout is named for image-like inputs only, not token ids or tabular ones."""
    ids = keras.Input((5,), dtype="int32", name="token_ids")
    table = keras.Input((4,), name="features")
    image = keras.Input((6, 6, 2), name="image")
    x = keras.layers.Flatten()(keras.layers.Embedding(20, 3)(ids))
    y = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(3, 3)(image))
    outputs = keras.layers.Dense(2)(keras.layers.Concatenate()([x, table, y]))
    keras.Model([ids, table, image], outputs).save(tmp_path / "mixed.keras")
    code, out, err = run_main(
        ["export", tmp_path / "mixed.keras", "-o", tmp_path / "m.onnx"], capsys
    )
    assert code == 0, err
    assert "  inputs: token_ids, features, image (channels_last); outputs:" in out
    assert "token_ids: integers 0..19 (the Embedding's vocabulary)" in out


def _mixed_float16_classifier() -> keras.Model:
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(8, 3, dtype="mixed_float16")(inputs)
    x = keras.layers.BatchNormalization(dtype="mixed_float16")(x)
    x = keras.layers.ReLU(dtype="mixed_float16")(x)
    x = keras.layers.GlobalAveragePooling2D(dtype="mixed_float16")(x)
    outputs = keras.layers.Dense(3, dtype="float32")(x)
    return randomize_batch_norms(keras.Model(inputs, outputs), seed=4)


def test_fold_names_the_float64_rule_when_it_decided(tmp_path, capsys):
    """mixed_float16 outputs miss atol 1e-4 against the original and pass by the float64
    rule: the line says so rather than quoting a tolerance it did not meet, and sets
    the error against Keras's own, which is float16's here (it said float32's)."""
    _mixed_float16_classifier().save(tmp_path / "m16.keras")
    code, out, err = run_main(["fold", tmp_path / "m16.keras", "-o", tmp_path / "f.keras"], capsys)
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if line.startswith("Folded vs original")]
    assert "passed: within float16 noise of a float64 run (error " in line, line
    assert "Keras float16's own" in line and "atol" not in line
    report = json.loads(
        run_main(
            ["fold", tmp_path / "m16.keras", "-o", tmp_path / "f.keras", "--force", "--json"],
            capsys,
        )[1]
    )
    assert {c["verdict"] for c in report["validation"]["outputs"]} == {"float64 reference"}
    assert max(c["max_abs_error"] for c in report["validation"]["outputs"]) > 1e-4


def test_a_mixed_precision_model_exports_to_float16_and_int8(tmp_path, capsys, files):
    """A mixed_float16 model's export computes in float16 as Keras does; float16 and
    int8 start from its float32 computation (before: internal errors, "already
    converted to float16" and a float16 tensor fetched as float32). Each file passes
    its criterion, judged against a float64 run (Keras's own output carries float16's
    error here, so it is no exact answer), and the int8 file computes in float32 around
    its int8 layers (what onnxruntime's int8 kernels take)."""
    _mixed_float16_classifier().save(tmp_path / "m16.keras")
    calibration = ["--calibration", files["calibration"]]
    for precision, extra in (("float16", []), ("int8", calibration)):
        out = tmp_path / f"m_{precision}.onnx"
        argv = ["export", tmp_path / "m16.keras", "-o", out, "--precision", precision]
        code, stdout, err = run_main([*argv, *extra], capsys)
        assert code == 0, err
        assert f"Validation PASSED: {out} vs Keras ({precision} criterion)" in stdout, stdout
        assert f"{precision} criterion, against the same model run in float64" in stdout
        assert "vs float64: " in stdout and "vs Keras float32: " not in stdout
        model = onnx.load(out)
        halves = [
            i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16
        ]
        if precision == "int8":
            assert not halves and {"QuantizeLinear", "DequantizeLinear"} <= {
                node.op_type for node in model.graph.node
            }
        else:
            assert halves


def test_outputs_keras_computes_as_nan_everywhere_prove_nothing(tmp_path, capsys):
    """A model whose Keras output is NaN on every validation input (an overflow, a NaN
    weight): the file reproduces it, yet NaN matching NaN proves nothing. Before,
    validation passed with an error of 0; now it fails, says why and asks for inputs."""
    inputs = keras.Input((6,), name="x")
    hidden = keras.layers.BatchNormalization()(keras.layers.Dense(4)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))
    kernel, bias = model.get_layer("head").get_weights()
    model.get_layer("head").set_weights([kernel, np.full_like(bias, np.nan)])
    model.save(tmp_path / "nan.keras")
    for command, out in (("export", tmp_path / "nan.onnx"), ("fold", tmp_path / "f.keras")):
        code, stdout, err = run_main([command, tmp_path / "nan.keras", "-o", out], capsys)
        assert code == 1 and not out.exists()
        assert "Keras's own output has no finite value on these inputs" in stdout
        assert "the Keras model's own outputs are NaN or inf on the validation inputs" in err
        assert "--inputs FILE.npz" in err and "Loosen" not in err
        assert "first divergent layer" not in stdout  # nothing diverged: nothing to localize


def test_shape_mismatch_says_the_shapes_differ(tmp_path, capsys, files):
    other = keras.Sequential(
        [keras.Input((8, 8, 3), name="image"), keras.layers.Flatten(), keras.layers.Dense(5)]
    )
    other.save(tmp_path / "other.keras")
    assert run_main(["export", tmp_path / "other.keras", "-o", tmp_path / "o.onnx"], capsys)[0] == 0
    code, out, _ = run_main(["validate", files["model"], tmp_path / "o.onnx"], capsys)
    assert code == 1
    assert "FAIL: the shapes differ: ONNX (1, 5) vs Keras (1, 3)" in out, out
    assert "inf" not in out


def test_strict_tolerances_that_fail_say_what_would_pass(tmp_path, capsys, files):
    """Only a failed elementwise verdict quotes the tolerance that would pass: here
    another model's weights, at rtol 0, need atol = the largest difference."""
    assert run_main(["export", files["other"], "-o", tmp_path / "o.onnx"], capsys)[0] == 0
    argv = ["validate", files["model"], tmp_path / "o.onnx", "--atol", "0", "--rtol", "0"]
    code, out, _ = run_main(argv, capsys)
    assert code == 1
    (line,) = [line for line in out.splitlines() if "would pass with atol >= " in line]
    report = json.loads(run_main([*argv, "--json"], capsys)[1])["validation"]
    worst = max(c["max_abs_error"] for c in report["comparisons"])
    assert float(line.split("atol >= ")[1].split()[0]) == pytest.approx(worst, rel=1e-2)
    assert worst > 0


@pytest.mark.parametrize("command", ["inspect", "fold", "export", "validate"])
def test_every_command_ends_with_the_next_step(command, tmp_path, capsys, files):
    onnx_path = tmp_path / "m.onnx"
    assert run_main(["export", files["model"], "-o", onnx_path], capsys)[0] == 0
    argv = {
        "inspect": ["inspect", files["model"]],
        "fold": ["fold", files["model"], "-o", tmp_path / "f.keras"],
        "export": ["export", files["model"], "-o", tmp_path / "e.onnx"],
        "validate": ["validate", files["model"], onnx_path],
    }[command]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    expected = {
        "inspect": f"next: keras-bn export {files['model']} -o model.onnx",
        "fold": f"next: keras-bn export {tmp_path / 'f.keras'} -o {tmp_path / 'f.onnx'}",
        "export": f"next: keras-bn bench {tmp_path / 'e.onnx'}",
        "validate": f"next: keras-bn bench {onnx_path}",
    }[command]
    assert out.rstrip().splitlines()[-1] == expected
    # The advice, followed, runs (bench is tested on its own).
    if command in ("inspect", "fold"):
        follow = expected.removeprefix("next: keras-bn ").split()
        if command == "inspect":
            follow[-1] = str(tmp_path / follow[-1])
        assert run_main(follow, capsys)[0] == 0


def test_a_reader_that_leaves_ends_the_program_quietly(tmp_path):
    """``keras-bn ... --json | head``: the pipe's reader has gone when we print; the
    program stops like other writers into a closed pipe (128 + SIGPIPE), without a
    traceback and without calling it the user's error or ours."""
    read, write = os.pipe()
    os.close(read)
    try:
        args = ["export", str(tmp_path / "missing.keras"), "-o", str(tmp_path / "m.onnx"), "--json"]
        result = subprocess.run(
            [sys.executable, "-m", "keras_bn", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write)
    assert result.returncode == 141, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr


def test_fold_copies_a_model_with_nothing_to_fold_whole(tmp_path, capsys):
    """KerasHub's ViT has no BatchNormalization, and layers whose configs do not
    rebuild them (its backbone's config does): ``fold`` wrote nothing and ended in an
    internal error. It now writes a copy of the model, which loads and computes the
    original's outputs."""
    from support.keras_hub_zoo import KERAS_HUB_IMAGE_SHAPE, ZOO, build

    keras.utils.set_random_seed(0)
    model = build(ZOO["vit"])
    model.save(tmp_path / "vit.keras")
    code, out, err = run_main(["fold", tmp_path / "vit.keras", "-o", tmp_path / "f.keras"], capsys)
    assert code == 0, err
    images = np.random.default_rng(0).standard_normal((2, *KERAS_HUB_IMAGE_SHAPE))
    expected = keras.tree.flatten(model(images.astype("float32")))
    received = keras.tree.flatten(load_model(tmp_path / "f.keras")(images.astype("float32")))
    for a, b in zip(expected, received, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_fold_names_a_layer_that_its_config_cannot_rebuild():
    """A custom layer with weights whose get_config adds a key its constructor does
    not take (KerasHub's ViT patching layer does), or forgets one so that a copy holds
    other weights (KerasHub's D-FINE decoder), after a BN that folds: the folded model
    is made of copies of the layers, so the error names the layer and the way out, as
    a user error (no traceback)."""
    from keras_bn.converters.errors import UserInputError
    from keras_bn.converters.folding import fold_batch_norms

    class Scale(keras.layers.Layer):
        def __init__(self, units, **kwargs):
            super().__init__(**kwargs)
            self.units = units

        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], self.units))

        def call(self, x):
            return keras.ops.matmul(x, self.w)

        def get_config(self):
            return {**super().get_config(), "units": self.units, "fan_in": self.w.shape[0]}

    class Gated(keras.layers.Layer):  # its config forgets ``gate``: a copy has a gate
        def __init__(self, gate=True, **kwargs):
            super().__init__(**kwargs)
            self.gate = gate

        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], 3))
            self.g = self.add_weight(shape=(3,)) if self.gate else None

        def call(self, x):
            y = keras.ops.matmul(x, self.w)
            return y * self.g if self.gate else y

        def get_config(self):
            return {"name": self.name}

    for layer in (Scale(3, name="scale"), Gated(gate=False, name="gated")):
        inputs = keras.Input((6,))
        x = keras.layers.BatchNormalization()(keras.layers.Dense(5)(inputs))
        model = keras.Model(inputs, layer(x))
        kind = type(layer).__name__
        with pytest.raises(
            UserInputError, match=rf"Layer '{layer.name}' \({kind}\) cannot be rebuilt"
        ):
            fold_batch_norms(model, measure=False)


def test_a_model_that_cannot_run_on_generated_inputs_asks_for_inputs(tmp_path, capsys):
    """A model whose unknown size must be 1 (SAM's prompt encoder takes one mask):
    the generated inputs make one up, and Keras itself cannot run them. The one-line
    error says so and asks for --inputs (it said "re-save it from the model's code");
    with inputs it takes, the export passes."""
    inputs = keras.Input((None, 4))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Reshape((4,))(inputs)))
    model.save(tmp_path / "m.keras")
    for skip in ([], ["--no-validate"]):  # the check that Keras runs it is never skipped
        code, _, err = run_main(
            ["export", tmp_path / "m.keras", "-o", tmp_path / "m.onnx", *skip], capsys
        )
        assert_rejected(code, err, "cannot run it on generated inputs (sizes made up for")
        assert "--inputs FILE.npz" in err and not (tmp_path / "m.onnx").exists()
    np.savez(tmp_path / "in.npz", np.ones((3, 1, 4), "float32"))
    arguments = ["export", tmp_path / "m.keras", "-o", tmp_path / "m.onnx", "--inputs"]
    code, out, err = run_main([*arguments, tmp_path / "in.npz"], capsys)
    assert code == 0, err


def test_an_int8_validation_failure_advises_for_int8_not_tolerances(tmp_path, capsys):
    """int8 is judged by SQNR and top-1, which --atol/--rtol do not move: a failing int8
    export asks for better calibration data, and for --tune-biases until it was used.
    The model: one input feature a thousand times the others, which its first layer
    ignores, so one per-tensor int8 range leaves the others a level or two."""
    inputs = keras.Input((8,), name="x")
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(hidden))
    kernel, bias = model.get_layer("hidden").get_weights()
    kernel[0] = 1e-4
    model.get_layer("hidden").set_weights([kernel, bias])
    model.save(tmp_path / "m.keras")
    calibration = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    calibration[:, 0] *= 1000.0
    np.savez(tmp_path / "calibration.npz", x=calibration)
    argv = ["export", tmp_path / "m.keras", "-o", tmp_path / "q.onnx", "--precision", "int8"]
    argv += ["--calibration", tmp_path / "calibration.npz"]
    for extra, tune in (([], "try --tune-biases"), (["--tune-biases"], None)):
        code, out, err = run_main(argv + extra, capsys)
        assert code == 1 and not (tmp_path / "q.onnx").exists(), err
        sqnr = [float(v) for v in re.findall(r"SQNR (-?[\d.]+) dB \(floor 8\)", out)]
        assert sqnr and max(sqnr) < 8, out
        assert "--calibration" in err and "Loosen" not in err, err
        assert (tune in err) if tune else ("--tune-biases" not in err), err


_PROGRAM_DEPTHWISE_CODE = """
import sys
sys.path.insert(0, "tests")
import keras
from support.models import randomize_batch_norms
from keras_bn.converters import float64_kernels
from keras_bn.converters.cli import app

folder = sys.argv[1]
inputs = keras.Input((12, 12, 3))
x = keras.layers.Conv2D(8, 3, name="stem")(inputs)
x = keras.layers.BatchNormalization()(x)
x = keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
x = keras.layers.BatchNormalization()(x)
x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
model = randomize_batch_norms(keras.Model(inputs, keras.layers.Dense(3)(x)), seed=0)
model.save(f"{folder}/dw.keras")

calls = []
taps = float64_kernels.depthwise_conv_taps
float64_kernels.depthwise_conv_taps = lambda *a: calls.append(a[0].shape) or taps(*a)
# The program on generated samples (6), a caller's main() and the program on 32 samples.
for owns_process, samples in ((True, "6"), (False, "32"), (True, "32")):
    del calls[:]
    out = f"{folder}/{owns_process}-{samples}.onnx"
    argv = ["export", f"{folder}/dw.keras", "-o", out, "--samples", samples, "--json"]
    code = app.main(argv, owns_process=owns_process)
    print("routed:", owns_process, samples, code, len(calls))

# Routed, an eager depthwise convolution (recalibrate's passes) is one compiled call,
# computing what the taps compute op by op.
import jax
import numpy as np

rng = np.random.default_rng(0)
x = rng.standard_normal((2, 12, 12, 8)).astype("float32")
k = rng.standard_normal((3, 3, 8, 1)).astype("float32")
conv = lambda x, k: keras.ops.depthwise_conv(x, k, 2, "same")
print("dispatched:", *[eqn.primitive.name for eqn in jax.make_jaxpr(conv)(x, k).jaxpr.eqns])
routed, eager = np.asarray(conv(x, k)), np.asarray(taps(x, k, (2, 2), "same", (1, 1), "channels_last"))
print("apart:", float(np.max(np.abs(routed - eager)) / np.max(np.abs(eager))))
"""


def test_the_program_on_jax_computes_depthwise_convolutions_by_taps(tmp_path, run_python):
    """The keras-bn program on JAX (main(owns_process=True)), running Keras on 32 samples,
    computes Keras's depthwise convolutions as sums over the kernel taps (XLA's CPU grouped
    convolution is slow) and the export validates against that Keras run; on 6 samples
    (XLA compiles the taps longer than they save) and in a caller's main() Keras's own."""
    result = run_python(
        ["-c", _PROGRAM_DEPTHWISE_CODE, str(tmp_path)], env={"KERAS_BACKEND": "jax"}
    )
    lines = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("routed:")]
    assert lines[:2] == [["True", "6", "0", "0"], ["False", "32", "0", "0"]], result.stdout
    assert lines[2][:3] == ["True", "32", "0"] and int(lines[2][3]) > 0, result.stdout
    graphs = [onnx.load(tmp_path / f"{name}.onnx").graph for name in ("False-32", "True-32")]
    assert graphs[0] == graphs[1]  # the same export either way
    # Eagerly, one compiled call (not two dozen dispatched slices and products), giving
    # the taps' result within float32 rounding (a fused multiply-add may round once).
    assert "dispatched: jit" in result.stdout.splitlines(), result.stdout
    apart = float(result.stdout.split("apart:")[1].split()[0])
    assert apart <= 1e-6, result.stdout


@pytest.mark.parametrize(
    "argv, routed",
    [
        (["export", "m.keras", "-o", "m.onnx"], False),  # 6-16 generated samples
        (["export", "m.keras", "-o", "m.onnx", "--samples", "31"], False),
        (["export", "m.keras", "-o", "m.onnx", "--samples", "32"], True),
        (["export", "m.keras", "-o", "m.onnx", "--inputs", "x.npz"], True),
        (["export", "m.keras", "-o", "m.onnx", "--precision", "int8"], True),
        (["export", "m.keras", "-o", "m.onnx", "--precision", "float16"], False),
        (["validate", "m.keras", "m.onnx", "--inputs", "x.npz"], True),
        (["fold", "m.keras", "-o", "f.keras"], False),
        (["recalibrate", "m.keras", "--data", "x.npz", "-o", "r.keras"], True),
        (["inspect", "m.keras"], False),
    ],
)
def test_the_taps_serve_the_commands_that_run_keras_over_data(argv, routed):
    """Which commands the program computes depthwise convolutions by taps for on JAX:
    those running Keras over data (a file, an int8 calibration, >= TAPS_SAMPLES
    generated samples); on a few generated samples XLA's own compiles faster."""
    from keras_bn.converters.cli import steps

    assert (steps.TAPS_SAMPLES, steps.MAX_TAPS) == (32, 25)
    assert steps._runs_keras_on_data(cli.build_parser().parse_args(argv)) is routed


def test_sigterm_mid_export_removes_the_work_folder_and_exits_143(tmp_path, monkeypatch, capsys):
    """A job runner's timeout sends SIGTERM. Python's default ends the process on the
    spot, and a killed export left its hidden work folder beside the output. The
    program (``main(owns_process=True)``) ends as on Ctrl-C instead: clean-up,
    "terminated", exit 143. The signal arrives here while validation starts, the
    work folder full."""
    import signal
    import time

    from keras_bn.converters.cli import app, export

    conv_bn_classifier().save(tmp_path / "m.keras")
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    seen: list[Path] = []
    validate = export._validate

    def terminated_while_validating(*args, **kwargs):
        seen.extend(path for folder in out.parent.iterdir() for path in folder.iterdir())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises in here
        return validate(*args, **kwargs)

    monkeypatch.setattr(export, "_validate", terminated_while_validating)
    monkeypatch.setattr(app, "tune_allocator", lambda **_: False)  # process-wide: not in tests

    def not_ours(signum, frame):  # what runs unless main() installs its own handler
        raise RuntimeError("SIGTERM reached the test's handler")

    previous = signal.signal(signal.SIGTERM, not_ours)
    try:
        code = app.main(["export", str(tmp_path / "m.keras"), "-o", str(out)], owns_process=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    captured = capsys.readouterr()
    assert code == 143, captured.err[-2000:]
    assert captured.err.strip().splitlines()[-1] == "keras-bn export: terminated"
    assert [path.name for path in seen] == ["m.onnx"]  # the export, in the work folder
    assert list(out.parent.iterdir()) == []


def test_sizes_beyond_the_machine_are_the_users_one_line(tmp_path, capsys, files, monkeypatch):
    """Sizes no run can take: ``-o .`` (a ValueError while the message was built),
    ``--batch-size`` beyond onnx's dimensions (onnx's ValueError), ``--threads
    100000`` (16 GB of onnxruntime threads), and a run that exhausts memory
    (``--samples 10**9`` asked for 5.6 TiB): each was a traceback (exit 3) or a
    runaway; each is one line, exit 2, nothing written."""
    from keras_bn.converters.cli import export

    cases = [
        (["export", files["model"], "-o", "."], "is a directory; give a .onnx file name"),
        (["export", files["model"], "-o", tmp_path / "m.onnx", "--batch-size", "9" * 20],
         "expected at most 2147483647"),
        (["bench", files["model"], "--threads", "100000"], "argument --threads: expected at most"),
    ]  # fmt: skip
    for arguments, fragment in cases:
        code, _, err = run_main(arguments, capsys)
        assert_rejected(code, err, fragment)

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(export, "_export", exhausted)
    code, _, err = run_main(["export", files["model"], "-o", tmp_path / "m.onnx"], capsys)
    assert_rejected(code, err, "out of memory: the run needs more than this machine has")
    assert list(tmp_path.iterdir()) == []


def test_fold_with_nothing_to_fold_writes_the_model_without_rebuilding_it(
    tmp_path, capsys, monkeypatch
):
    """A model without a foldable BN (KerasHub's ViT has no BN at all) was rebuilt from
    its config before it was written: every layer's initializers ran again, and
    ``keras-bn fold`` took 3.5x the float32 export. The command writes the model as
    loaded; its outputs are the original's, bit for bit."""
    from keras_bn.converters.folding import rewrite

    def no_copy(model):
        raise AssertionError("rebuilt a model with nothing to fold")

    monkeypatch.setattr(rewrite, "_unchanged_copy", no_copy)
    inputs = keras.Input((6,), name="x")
    hidden = keras.layers.LayerNormalization()(keras.layers.Dense(5)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    model.save(tmp_path / "m.keras")
    code, _, err = run_main(["fold", tmp_path / "m.keras", "-o", tmp_path / "f.keras"], capsys)
    assert code == 0, err
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    folded = load_model(tmp_path / "f.keras")
    np.testing.assert_array_equal(_keras_outputs(folded, x), _keras_outputs(model, x))


NOISY_LAYERS = """
import keras

print("loading my layers")


class Doubling(keras.layers.Layer):
    def call(self, x):
        print("tracing Doubling")
        return x * 2.0
"""


def test_json_stays_pure_when_user_code_prints(tmp_path, capsys, files):
    """``--json``: stdout is the report alone. A --custom-objects module that prints at
    import, and a layer that prints in its call (while traced and run), wrote ahead of
    the JSON. What user code prints goes to stderr."""
    (tmp_path / "noisy_layers.py").write_text(NOISY_LAYERS)
    code, out, err = run_main(
        [
            "export",
            files["custom"],
            "-o",
            tmp_path / "m.onnx",
            "--custom-objects",
            f"{tmp_path / 'noisy_layers.py'}:Doubling",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads(out)["status"] == "ok"
    assert "loading my layers" in err and "tracing Doubling" in err


def test_an_output_another_run_wrote_meanwhile_is_not_replaced_without_force(tmp_path):
    """Two exports to one new output at once both checked that it did not exist, and
    the later silently replaced the earlier without --force. Placing the finished
    file refuses a target that appeared meanwhile (one line, the other run's file
    kept, no temporary left); with --force it is replaced. A group of files (a
    model and its external data) is placed whole or not at all."""
    from keras_bn.converters.cli.run import replace_files, writing
    from keras_bn.converters.errors import UserInputError

    target = tmp_path / "m.onnx"
    with pytest.raises(UserInputError, match="written by another run meanwhile"):
        with writing(target, replace=False) as tmp:
            tmp.write_bytes(b"ours")
            target.write_bytes(b"theirs")  # the other run finishes first
    assert target.read_bytes() == b"theirs" and sorted(tmp_path.iterdir()) == [target]
    with writing(target, replace=True) as tmp:
        tmp.write_bytes(b"ours")
    assert target.read_bytes() == b"ours"

    work = tmp_path / "work"
    work.mkdir()
    (work / "g.onnx.data").write_bytes(b"our data")
    (work / "g.onnx").write_bytes(b"our model")
    (tmp_path / "g.onnx").write_bytes(b"their model")  # written meanwhile
    moves = [
        (work / "g.onnx.data", tmp_path / "g.onnx.data"),
        (work / "g.onnx", tmp_path / "g.onnx"),
    ]
    with pytest.raises(UserInputError, match="written by another run meanwhile"):
        replace_files(moves, shown=tmp_path / "g.onnx", replace=False)
    assert (tmp_path / "g.onnx").read_bytes() == b"their model"
    assert not (tmp_path / "g.onnx.data").exists()  # ours, taken back


def test_a_usage_error_under_json_is_a_json_report_too(tmp_path, capsys, files):
    """``--json`` promises a report on stdout; a usage error (a missing -o, a wrong
    choice) printed only its line on stderr, and a --json caller got nothing to parse."""
    for arguments, fragment in [
        (["export", files["model"], "--json"], "the following arguments are required: -o"),
        (["export", files["model"], "-o", tmp_path / "m.onnx", "--precision", "int4", "--json"],
         "did you mean --precision int8?"),
    ]:  # fmt: skip
        code, out, err = run_main(arguments, capsys)
        assert code == 2 and fragment in err, err
        report = json.loads(out)
        assert report["status"] == "error" and report["exit_code"] == 2
        assert fragment in report["error"]
    code, out, _ = run_main(["export", files["model"]], capsys)  # without --json: stderr only
    assert code == 2 and out == ""


def test_ctrl_c_in_the_programs_first_steps_is_one_line_and_130(monkeypatch, capsys):
    """Ctrl-C in the first tenths of a second (before ``main`` reaches its own
    handling: arguments, allocator, Keras import) printed a bare KeyboardInterrupt
    traceback. The program says "interrupted" and exits 130."""
    from keras_bn.converters.cli import app

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    exits = []

    def exit_(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(app, "main", interrupted)
    monkeypatch.setattr(app.os, "_exit", exit_)
    try:
        app.console_main()
    except SystemExit:
        pass
    except KeyboardInterrupt:  # the program let it through: a traceback for the user
        pytest.fail("console_main let KeyboardInterrupt through")
    assert exits == [130]
    assert capsys.readouterr().err.strip() == "keras-bn: interrupted"

"""Every `keras-bn` command on four models and two backends, as whole processes (issue 24).

What a user runs, each command from a fresh interpreter on a `.keras` file, with
``KERAS_BACKEND`` set to each backend in turn:

- ``inspect M.keras``; ``fold M.keras -o folded.keras``;
- ``export M.keras -o OUT.onnx`` with ``--precision`` float32 (the yardstick), float16 and
  int8 (``--calibration`` with 64 samples generated as the CLI generates its own);
- ``validate M.keras float32.onnx``; ``bench float32.onnx`` (the CLI's defaults);
- Keras's own exporter (``benchmarks/cli_vs_keras.py keras-export``: load, call once,
  ``model.export(format="onnx")``; tf2onnx on TensorFlow, jax2onnx on JAX) on ResNet50;
- where the float32 export needed the float64 judgement (its report says so), the same
  export with ``--atol 1e30 --rtol 1e30``: a contract every output passes outright, so the
  pair prices the judgement on the same file.

Models (``weights=None``, trained-looking BN statistics: ``randomize_batch_norms(...,
gain=(0.6, 1.4))`` as in BENCHMARKS.md sections 3 and 10): ResNet50, MobileNetV2 and
EfficientNetB0 from ``keras.applications`` without their classifier activation, and
``hub:ResNet18``, KerasHub's ``ResNetBackbone`` with ResNet-18's constructor arguments
(no preset download). Each round runs the float32 export before and after every other
command (E c1 E c2 E ... E): a command's ratio is its wall time over the mean of the two
exports beside it, so a machine that slows down mid-run slows both; the table gives the
median over the rounds. Per run: wall, CPU (user + system) and peak resident memory
from the operating system's accounting of the finished process.

Usage::

    python benchmarks/command_matrix.py --runs 5 --markdown matrix.md --json matrix.json
    # smoke: every command once on one model per backend, small images
    python benchmarks/command_matrix.py --runs 1 --warmup 0 --size 64 \\
        --models ResNet50 --backends jax

Our modules are byte-compiled first (``compileall``), as a wheel install leaves them.
Prints the table, then issue 24's bar lines as measured ratios.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["ResNet50", "MobileNetV2", "EfficientNetB0", "hub:ResNet18"]
BACKENDS = ["jax", "tensorflow"]
BASELINE = "export-float32"
# Command name -> (column title, arguments after `keras-bn`); {m} the model file, {w}
# the model's work folder (one per backend), {c} the calibration file.
KERAS_BN_COMMANDS = {
    BASELINE: ("export float32", "export {m} -o {w}/float32.onnx --force"),
    "inspect": ("inspect", "inspect {m}"),
    "fold": ("fold", "fold {m} -o {w}/folded.keras --force"),
    "export-float16": (
        "export float16",
        "export {m} -o {w}/float16.onnx --precision float16 --force",
    ),
    "export-int8": (
        "export int8",
        "export {m} -o {w}/int8.onnx --precision int8 --calibration {c} --force",
    ),
    "validate": ("validate", "validate {m} {w}/float32.onnx"),
    "bench": ("bench", "bench {w}/float32.onnx"),
    "export-outright": (
        "export float32, outright contract",
        "export {m} -o {w}/outright.onnx --atol 1e30 --rtol 1e30 --force",
    ),
}
KERAS_EXPORT = "keras-export"
COMMANDS = [*KERAS_BN_COMMANDS, KERAS_EXPORT]
# The commands run unless --commands says otherwise (export-outright joins by itself).
DEFAULT_COMMANDS = [c for c in COMMANDS if c != "export-outright"]
KERAS_EXPORTERS = {"tensorflow": "tf2onnx", "jax": "jax2onnx"}
VERDICT_FLOAT64 = "float64 reference"  # a validation comparison judged against float64


# ------------------------------------------------------------------------------------
# The model files (made in a child process: this one never imports Keras).


def make_model(name: str, size: int):
    """A model with random weights and trained-looking BN statistics."""
    import keras
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    from support.models import nested_batch_norms, randomize_batch_norms

    if name == "hub:ResNet18":
        import keras_hub

        model = keras_hub.models.ResNetBackbone(
            input_conv_filters=[64],
            input_conv_kernel_sizes=[7],
            stackwise_num_filters=[64, 128, 256, 512],
            stackwise_num_blocks=[2, 2, 2, 2],
            stackwise_num_strides=[1, 2, 2, 2],
            block_type="basic_block",
            use_pre_activation=False,
            image_shape=(size, size, 3),
        )
    else:
        model = getattr(keras.applications, name)(
            weights=None, input_shape=(size, size, 3), classifier_activation=None
        )
    rng = np.random.default_rng(0)
    for layer in nested_batch_norms(model):
        randomize_batch_norms(layer, rng, gain=(0.6, 1.4))
    return model


def make_files(name: str, size: int, samples: int, folder: Path) -> None:
    """``folder/model.keras`` and ``folder/calibration.npz`` (``samples`` generated inputs)."""
    import numpy as np

    from keras_bn.converters.samples import make_sample_inputs

    model = make_model(name, size)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    np.savez(folder / "calibration.npz", **make_sample_inputs(model, samples, seed=1))
    facts = {"parameters": int(model.count_params()), "input": [size, size, 3]}
    (folder / "model.json").write_text(json.dumps(facts))


# ------------------------------------------------------------------------------------
# Timing one whole process.


@dataclass
class Run:
    wall_s: float
    cpu_s: float
    peak_mib: float
    exit_code: int  # -1: killed at the time limit
    message: str = ""  # the last line of stderr when it failed

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def run_process(argv: Sequence[str], env: dict, log: Path, limit_s: float) -> Run:
    """Run ``argv`` once; its wall, CPU and peak memory from ``wait4``'s accounting.

    Its stdout goes to ``log``, its stderr to ``log`` + ``.err``.
    """
    errors = log.with_name(log.name + ".err")
    with open(log, "w") as output, open(errors, "w") as error_output:
        start = time.perf_counter()
        process = subprocess.Popen(
            argv, env=env, stdout=output, stderr=error_output, start_new_session=True
        )
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            os.killpg(process.pid, signal.SIGKILL)

        timer = threading.Timer(limit_s, kill)
        timer.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        timer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    code = -1 if killed.is_set() else process.returncode
    run = Run(
        wall_s=round(wall, 3),
        cpu_s=round(usage.ru_utime + usage.ru_stime, 3),
        peak_mib=round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        exit_code=code,
    )
    if code == -1:
        run.message = f"killed after the {limit_s:g} s limit"
    elif code != 0:
        run.message = _last_line(errors) or _last_line(log)  # validation failed: stdout
    return run


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    return next((line for line in reversed(lines) if line), "")[:300]


# ------------------------------------------------------------------------------------
# One model on one backend: the rounds.


@dataclass
class Cell:
    """One command on one model and backend: its runs and their ratios to the export."""

    command: str
    runs: list[Run] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # wall / mean of the exports beside
    cpu_ratios: list[float] = field(default_factory=list)  # the same, of CPU seconds
    report: dict = field(default_factory=dict)  # from the last successful run's --report
    skipped: str = ""  # why it did not run (exporter missing, ...)

    @property
    def failure(self) -> Run | None:
        return next((run for run in self.runs if not run.ok), None)

    def summary(self) -> dict:
        good = [run for run in self.runs if run.ok]
        result: dict = {"command": self.command, "runs": len(good)}
        if good:
            result.update(
                wall_s=round(statistics.median(r.wall_s for r in good), 2),
                wall_min_s=min(r.wall_s for r in good),
                wall_max_s=max(r.wall_s for r in good),
                cpu_s=round(statistics.median(r.cpu_s for r in good), 2),
                peak_mib=max(r.peak_mib for r in good),
            )
        if self.ratios:
            result.update(
                ratio=round(statistics.median(self.ratios), 3),
                ratio_min=round(min(self.ratios), 3),
                ratio_max=round(max(self.ratios), 3),
                cpu_ratio=round(statistics.median(self.cpu_ratios), 3),
            )
        if self.failure is not None:
            result["failed"] = {
                "exit_code": self.failure.exit_code,
                "message": self.failure.message,
            }
        if self.skipped:
            result["skipped"] = self.skipped
        if self.report:
            result["report"] = self.report
        return result


def flanked_ratios(
    sequence: list[tuple[str, Run]], figure: str = "wall_s"
) -> dict[str, list[float]]:
    """Each command's ``figure`` over its mean in the baseline runs just before and after.

    ``sequence`` is one model's runs in order; a command with a failed run or no
    successful baseline on either side gets no ratio for that run.
    """
    ratios: dict[str, list[float]] = {}
    for index, (command, run) in enumerate(sequence):
        if command == BASELINE or not run.ok:
            continue
        beside = [
            getattr(other, figure)
            for step in (-1, 1)
            for position in [index + step]
            if 0 <= position < len(sequence)
            for name, other in [sequence[position]]
            if name == BASELINE and other.ok
        ]
        if beside:
            ratios.setdefault(command, []).append(getattr(run, figure) / statistics.mean(beside))
    return ratios


def report_facts(path: Path) -> dict:
    """What a keras-bn JSON report says about where the time went and how it judged."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    facts: dict = {
        "steps": {step["step"]: step["seconds"] for step in report.get("steps", [])},
        "backend": report.get("backend"),
    }
    comparisons = (report.get("validation") or {}).get("comparisons") or []
    if comparisons:
        facts["float64_judgement"] = any(c.get("verdict") == VERDICT_FLOAT64 for c in comparisons)
    return facts


@dataclass
class Plan:
    """How to run every command on one model file and backend."""

    model: str
    backend: str
    folder: Path  # the backend's work folder for this model
    keras_bn: list[str]  # the keras-bn executable (argv prefix)
    env: dict
    limit_s: float

    def argv(self, command: str) -> list[str]:
        model, work = self.folder.parent / "model.keras", self.folder
        if command == KERAS_EXPORT:
            script = str(ROOT / "benchmarks" / "cli_vs_keras.py")
            return [sys.executable, script, "keras-export", str(model), f"{work}/keras.onnx"]
        template = KERAS_BN_COMMANDS[command][1]
        calibration = self.folder.parent / "calibration.npz"
        words = template.format(m=model, w=work, c=calibration).split()
        return [*self.keras_bn, *words, "--report", f"{work}/{command}.json"]

    def run(self, command: str, cells: dict[str, Cell], sequence: list) -> Run:
        log = self.folder / f"{command}.log"
        run = run_process(self.argv(command), self.env, log, self.limit_s)
        cell = cells.setdefault(command, Cell(command))
        cell.runs.append(run)
        sequence.append((command, run))
        if run.ok and command != KERAS_EXPORT:
            cell.report = report_facts(self.folder / f"{command}.json")
        status = "ok" if run.ok else f"FAILED ({run.exit_code}): {run.message}"
        print(f"  {self.backend:10} {self.model:15} {command:16} {run.wall_s:8.2f} s  {status}")
        return run


def measure(plan: Plan, commands: list[str], runs: int, warmup: int) -> dict[str, Cell]:
    """``warmup`` float32 exports, then ``runs`` rounds of E c1 E c2 ... E."""
    cells: dict[str, Cell] = {}
    sequence: list[tuple[str, Run]] = []
    for _ in range(warmup):
        plan.run(BASELINE, {}, [])
    others = [c for c in commands if c != BASELINE]
    for round_number in range(runs):
        if not _round(plan, others, cells, sequence, first=round_number == 0):
            break  # validate and bench need the float32 file; the ratios need the export
    for command, ratios in flanked_ratios(sequence).items():
        cells[command].ratios = ratios
    for command, ratios in flanked_ratios(sequence, "cpu_s").items():
        cells[command].cpu_ratios = ratios
    return cells


def _round(plan: Plan, others: list[str], cells: dict[str, Cell], sequence: list, first: bool):
    """One round, E c1 E c2 ... E; False when a float32 export failed."""
    if not plan.run(BASELINE, cells, sequence).ok:
        return False
    if first and cells[BASELINE].report.get("float64_judgement"):
        if "export-outright" not in others:
            others.append("export-outright")
    for command in others:
        cell = cells.setdefault(command, Cell(command))
        if cell.failure is not None or cell.skipped:
            continue  # failed once: reported, not retried
        if command == KERAS_EXPORT and (reason := keras_exporter_missing(plan.backend)):
            cell.skipped = reason
            continue
        plan.run(command, cells, sequence)
        if not plan.run(BASELINE, cells, sequence).ok:
            return False
    return True


def keras_exporter_missing(backend: str) -> str:
    """Why Keras's exporter cannot run on ``backend`` here ('' when it can)."""
    package = KERAS_EXPORTERS.get(backend)
    if package is None:
        return f"Keras's exporter is not measured on {backend}"
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed (pip install {package}): Keras's exporter needs it"
    return ""


# ------------------------------------------------------------------------------------
# The table and the bar.


def _cell_text(summary: dict | None) -> str:
    if summary is None:
        return ""
    if "skipped" in summary:
        return f"not run: {summary['skipped']}"
    if "failed" in summary:
        failed = summary["failed"]
        return f"**failed** (exit {failed['exit_code']})"
    if "wall_s" not in summary:
        return ""
    text = f"{summary['wall_s']:.2f} s"
    if "ratio" in summary:
        text += f" ({summary['ratio']:.2f}x)"
    if summary.get("report", {}).get("float64_judgement"):
        text += " [f64]"
    return text


def markdown_table(rows: list[dict], commands: list[str]) -> str:
    """One line per model and backend, one column per command: median wall (ratio)."""
    present = [c for c in COMMANDS if c in commands or any(c in row["cells"] for row in rows)]
    titles = [
        KERAS_BN_COMMANDS[c][0] if c in KERAS_BN_COMMANDS else "Keras exporter" for c in present
    ]
    lines = [
        "| model | backend | " + " | ".join(titles) + " |",
        "| --- | --- |" + " --- |" * len(present),
    ]
    for row in rows:
        cells = [_cell_text(row["cells"].get(command)) for command in present]
        lines.append(f"| {row['model']} | {row['backend']} | " + " | ".join(cells) + " |")
    notes = [
        f"- {row['model']}, {row['backend']}, {command}: exit {s['failed']['exit_code']}: "
        f"{s['failed']['message']}"
        for row in rows
        for command, s in row["cells"].items()
        if "failed" in s
    ]
    legend = (
        "\nMedian wall seconds of whole processes; in brackets the median over rounds of "
        "the command's wall time over the float32 exports run just before and after it. "
        "[f64]: validation judged against a float64 run (did not pass outright)."
    )
    return "\n".join([*lines, legend, *(["", "Failures:", *notes] if notes else [])])


def details_table(rows: list[dict]) -> str:
    """One line per model, backend and command: CPU, peak memory, the slowest steps."""
    lines = [
        "| model | backend | command | wall s (min-max) | CPU s (ratio) | peak MiB "
        "| slowest steps (s; they overlap) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        for command, summary in row["cells"].items():
            if "wall_s" not in summary:
                continue
            steps = summary.get("report", {}).get("steps", {})
            slowest = sorted(steps.items(), key=lambda item: -item[1])[:3]
            named = ", ".join(f"{name.split(' /')[0]} {seconds:.1f}" for name, seconds in slowest)
            cpu_ratio = f" ({summary['cpu_ratio']:.2f}x)" if "cpu_ratio" in summary else ""
            lines.append(
                f"| {row['model']} | {row['backend']} | {command} "
                f"| {summary['wall_s']:.2f} ({summary['wall_min_s']:.2f}-{summary['wall_max_s']:.2f}) "
                f"| {summary['cpu_s']:.2f}{cpu_ratio} | {summary['peak_mib']:.0f} | {named} |"
            )
    return "\n".join(lines)


# Issue 24's bar, ratio at most: (command, bar, what the line says).
BAR = [
    ("export-float16", 2.0, "float16 export <= 2x the float32 export"),
    ("export-int8", 3.0, "int8 export (calibration samples) <= 3x the float32 export"),
    ("fold", 2.0, "fold <= 2x the float32 export"),
]


def bar_lines(rows: list[dict]) -> list[str]:
    """Issue 24's bar lines, each with the ratios measured for every model and backend."""
    lines = []
    for command, bar, text in BAR:
        measured = [
            (f"{row['model']}/{row['backend']}", row["cells"][command]["ratio"])
            for row in rows
            if "ratio" in row["cells"].get(command, {})
        ]
        lines.append(_bar_line(text, measured, lambda r, bar=bar: r <= bar))
    judged = [
        (f"{row['model']}/{row['backend']}", 1 / row["cells"]["export-outright"]["ratio"])
        for row in rows
        if "ratio" in row["cells"].get("export-outright", {})
    ]
    text = "export needing the float64 judgement <= 2x the same export passing outright"
    if not judged:
        text += " (no float32 export here needed the judgement)"
    lines.append(_bar_line(text, judged, lambda r: r <= 2.0))
    keras = [
        (f"{row['model']}/{row['backend']}", row["cells"][KERAS_EXPORT]["ratio"])
        for row in rows
        if "ratio" in row["cells"].get(KERAS_EXPORT, {})
    ]
    lines.append(
        _bar_line(
            "keras-bn export >= 10x faster than Keras's exporter (Keras / keras-bn)",
            keras,
            lambda r: r >= 10.0,
        )
    )
    return lines


def _bar_line(text: str, measured: list[tuple[str, float]], meets: Callable) -> str:
    if not measured:
        return f"{text}: not measured"
    figures = ", ".join(f"{where} {ratio:.2f}x" for where, ratio in measured)
    missed = [where for where, ratio in measured if not meets(ratio)]
    verdict = "met everywhere" if not missed else f"missed on {', '.join(missed)}"
    return f"{text}: {figures}: {verdict}"


# ------------------------------------------------------------------------------------
# The program.


def environment() -> dict:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    packages = ["keras", "keras-hub", "jax", "tensorflow-cpu", "tensorflow", "onnxruntime"]
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "python": platform.python_version(),
        "commit": commit,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        **{p: version(p) for p in [*packages, *KERAS_EXPORTERS.values()] if version(p)},
    }


def keras_bn_executable() -> list[str]:
    beside = Path(sys.executable).with_name("keras-bn")
    found = str(beside) if beside.exists() else shutil.which("keras-bn")
    if found is None:
        raise SystemExit("keras-bn is not installed here: pip install -e . (or the wheel)")
    return [found]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS)
    parser.add_argument(
        "--commands", nargs="+", default=DEFAULT_COMMANDS, choices=COMMANDS,
        help="the float32 export always runs (the yardstick); export-outright also runs "
        "by itself where the float32 export needed the float64 judgement",
    )  # fmt: skip
    parser.add_argument("--runs", type=int, default=5, help="rounds counted (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="float32 exports first, untimed")
    parser.add_argument("--size", type=int, default=128, help="image height and width")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument(
        "--keras-export-models", nargs="*", default=["ResNet50"], choices=MODELS,
        help="models on which Keras's exporter runs (default: ResNet50)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=900, help="seconds per process")
    parser.add_argument("--workdir", type=Path, help="keep the files here (default: temporary)")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    return parser.parse_args(argv)


def prepare_models(args: argparse.Namespace, workdir: Path) -> dict[str, dict]:
    """Each model's file and calibration data, made once for every backend."""
    facts = {}
    for model in args.models:
        folder = workdir / f"{model.replace(':', '_')}_{args.size}"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "model.json").exists():
            print(f"making {model} at {args.size} px in {folder}", flush=True)
            command = [sys.executable, __file__, "make", model, str(folder)]
            subprocess.run(
                [*command, "--size", str(args.size), "--samples", str(args.calibration_samples)],
                check=True,
            )
        facts[model] = {"folder": folder, **json.loads((folder / "model.json").read_text())}
    return facts


def run_matrix(args: argparse.Namespace, workdir: Path) -> dict:
    models = prepare_models(args, workdir)
    compileall.compile_dir(str(ROOT / "keras_bn"), quiet=1)
    compileall.compile_dir(str(ROOT / "converters"), quiet=1)
    result = {"environment": environment(), "arguments": vars(args), "rows": []}
    for backend in args.backends:
        for model in args.models:
            folder = models[model]["folder"] / backend
            folder.mkdir(exist_ok=True)
            env = {**os.environ, "KERAS_BACKEND": backend}
            plan = Plan(model, backend, folder, keras_bn_executable(), env, args.timeout)
            commands = [c for c in args.commands if c != KERAS_EXPORT]
            if KERAS_EXPORT in args.commands and model in args.keras_export_models:
                commands.append(KERAS_EXPORT)
            cells = measure(plan, commands, args.runs, args.warmup)
            row = {
                "model": model,
                "backend": backend,
                "parameters": models[model]["parameters"],
                "input": models[model]["input"],
                "cells": {command: cell.summary() for command, cell in cells.items()},
            }
            result["rows"].append(row)
            write_outputs(args, result)
    result["environment"]["load_average_at_end"] = os.getloadavg()
    return result


def write_outputs(args: argparse.Namespace, result: dict) -> None:
    """The files, rewritten after each model: a run stopped early keeps what it measured."""
    text = markdown_table(result["rows"], args.commands)
    bar = "\n".join(f"- {line}" for line in bar_lines(result["rows"]))
    if args.markdown:
        args.markdown.write_text(f"{text}\n\n{details_table(result['rows'])}\n\n{bar}\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["make"]:
        made = argparse.ArgumentParser(prog="command_matrix.py make")
        made.add_argument("model", choices=MODELS)
        made.add_argument("folder", type=Path)
        made.add_argument("--size", type=int, default=128)
        made.add_argument("--samples", type=int, default=64)
        given = made.parse_args(argv[1:])
        make_files(given.model, given.size, given.samples, given.folder)
        return 0
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="command_matrix_") as temporary:
        result = run_matrix(args, args.workdir or Path(temporary))
    write_outputs(args, result)
    print()
    print(markdown_table(result["rows"], args.commands))
    print()
    print("Issue 24's bar (ratios to `keras-bn export` float32 of the same file, same run):")
    for line in bar_lines(result["rows"]):
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

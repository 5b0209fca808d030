"""Whole-process cost of `keras-bn export --precision float16/int8` next to float32.

Issue 24's bar: on the same `.keras` file, `export --precision float16` within 2x and
`export --precision int8 --calibration <64 samples>` within 3x of `export` (float32),
each a fresh process, on each backend. Usage::

    python benchmarks/cli_vs_keras.py make /tmp/resnet.keras --size 128
    python benchmarks/precision_speed.py /tmp/resnet.keras --runs 3 --backend jax

It writes 64 calibration samples (uniform in [-1, 1], seed 0) beside the model, runs
the three commands in turn (float32, float16, int8, repeated ``--runs`` times: each
pair is measured under the same machine load), and prints each command's median wall
time, its ratio to float32's, and the step table of the last int8 run (where the time
went). Timings on a shared machine are noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _calibration(model_path: Path, work: Path) -> Path:
    """64 samples in the model's input shape, keyed by its input name."""
    code = (
        "import sys, keras, numpy as np\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "x = np.random.default_rng(0).uniform(-1, 1, (64, *m.input_shape[1:]))\n"
        "np.savez(sys.argv[2], **{m.inputs[0].name: x.astype('float32')})\n"
    )
    path = work / "calibration.npz"
    subprocess.run([sys.executable, "-c", code, str(model_path), str(path)], check=True)
    return path


def _command(model: Path, work: Path, precision: str, calibration: Path) -> list[str]:
    # The installed CLI, run by this interpreter (its venv's bin need not be on PATH).
    command = [
        sys.executable,
        "-m",
        "keras_bn.converters.cli",
        "export",
        str(model),
        "-o",
        str(work / f"{precision}.onnx"),
        "--force",
    ]
    if precision != "float32":
        command += ["--precision", precision]
    if precision == "int8":
        command += ["--calibration", str(calibration)]
    return command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "jax"))
    args = parser.parse_args(argv)
    env = {**os.environ, "KERAS_BACKEND": args.backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    precisions = ("float32", "float16", "int8")
    seconds: dict[str, list[float]] = {p: [] for p in precisions}
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        calibration = _calibration(args.model, work)
        last = ""
        for _ in range(args.runs):
            for precision in precisions:
                start = time.perf_counter()
                done = subprocess.run(
                    _command(args.model, work, precision, calibration),
                    env=env,
                    capture_output=True,
                    text=True,
                )
                seconds[precision].append(time.perf_counter() - start)
                if done.returncode:
                    print(done.stderr, file=sys.stderr)
                    return done.returncode
                last = done.stdout
    base = statistics.median(seconds["float32"])
    print(f"backend {args.backend}, {args.runs} run(s) each, whole processes (wall, median)")
    for precision in precisions:
        median = statistics.median(seconds[precision])
        print(f"  {precision:<8} {median:7.1f} s  {median / base:4.2f}x float32")
    print("\nlast int8 run's output (its step table at the end):")
    print("\n".join(last.splitlines()[-30:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

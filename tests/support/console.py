"""The installed console script, run as a user runs it: :data:`KERAS_BN`,
:func:`run_script`, :func:`run_many` (two at a time), :func:`assert_rejected` (the
one-line user-error contract), :func:`without_progress` (the program's progress lines
left out)."""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

KERAS_BN = Path(sys.executable).with_name("keras-bn")
if not KERAS_BN.exists():  # a virtualenv whose python is a symlink elsewhere
    KERAS_BN = Path(shutil.which("keras-bn") or "keras-bn")


# The program's line for a step still running after 2 s (converters/progress.py),
# on a stderr that is not a terminal.
PROGRESS_LINE = re.compile(r"keras-bn [a-z0-9-]+: .+\.\.\. \(running \d+\.\d s\)")


def without_progress(stderr: str) -> str:
    """``stderr`` without the program's progress lines."""
    return "".join(
        line
        for line in stderr.splitlines(keepends=True)
        if not PROGRESS_LINE.fullmatch(line.strip())
    )


def run_script(args, cwd: Path) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it on a fresh machine
    (``["python", ...]`` runs Python).

    TF_CPP_MIN_LOG_LEVEL is removed from the environment: the CLI must keep
    TensorFlow's start-up lines off the terminal by itself.
    """
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    command = [str(a) for a in args]
    if command[0] not in ("python",):
        command = [str(KERAS_BN), *command]
    else:
        command = [sys.executable, *command[1:]]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def run_many(jobs: dict[str, tuple[list, Path]]) -> dict[str, subprocess.CompletedProcess]:
    """Run console-script jobs two at a time (two cores, each pays a TensorFlow import)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_script, args, cwd) for name, (args, cwd) in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def assert_rejected(code: int, stderr: str, fragment: str, output_dir: Path | None = None):
    """Exit 2, exactly one line on stderr naming the problem, no traceback, no output."""
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in without_progress(stderr).splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("keras-bn ") and ": error: " in lines[0], lines[0]
    assert fragment in lines[0], lines[0]
    if output_dir is not None:
        assert sorted(p.name for p in output_dir.iterdir()) == [], "output left behind"

"""benchmarks/command_matrix.py's own logic, on stand-in processes (no Keras, no models).

The matrix itself takes an hour of quiet machine; what can be wrong without it is here:
the accounting of one process, the rounds (each command between two float32 exports,
a failure reported once and not retried, the outright export joining where the float32
export needed the float64 judgement), the ratios, the table and the bar lines.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import command_matrix as matrix  # noqa: E402

PYTHON = sys.executable


def test_run_process_accounts_for_the_whole_child(tmp_path):
    """Peak memory and CPU come from the finished process: 300 MiB touched, a busy loop."""
    code = "import time; b = bytearray(300 << 20); t = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    run = matrix.run_process([PYTHON, "-c", code], {}, tmp_path / "log", limit_s=60)
    assert run.ok and run.exit_code == 0 and run.message == ""
    assert run.peak_mib >= 300
    assert run.cpu_s >= 0.3
    assert run.wall_s >= run.cpu_s * 0.5


def test_run_process_keeps_a_failures_last_line_and_kills_at_the_limit(tmp_path):
    code = "import sys; print('working'); sys.exit('Error: bad input, one line')"
    failed = matrix.run_process([PYTHON, "-c", code], {}, tmp_path / "log", limit_s=60)
    assert failed.exit_code == 1 and not failed.ok
    assert failed.message == "Error: bad input, one line"
    slow = matrix.run_process([PYTHON, "-c", "import time; time.sleep(60)"], {}, tmp_path / "l", 1)
    assert slow.exit_code == -1 and slow.wall_s < 30
    assert "limit" in slow.message


def run(wall: float, code: int = 0) -> matrix.Run:
    return matrix.Run(wall_s=wall, cpu_s=wall, peak_mib=1.0, exit_code=code)


def test_each_ratio_is_over_the_exports_beside_it():
    E = matrix.BASELINE
    sequence = [
        (E, run(10)),
        ("inspect", run(5)),
        (E, run(12)),
        ("fold", run(30)),
        (E, run(8, code=1)),  # a failed export does not count
        ("validate", run(4)),
        (E, run(16)),
        ("bench", run(9, code=3)),  # a failed command gets no ratio
        (E, run(20)),
    ]
    ratios = matrix.flanked_ratios(sequence)
    assert ratios == {
        "inspect": [pytest.approx(5 / 11)],
        "fold": [pytest.approx(30 / 12)],
        "validate": [pytest.approx(4 / 16)],
    }
    sequence[1] = ("inspect", matrix.Run(wall_s=5, cpu_s=2, peak_mib=1, exit_code=0))
    assert matrix.flanked_ratios(sequence, "cpu_s")["inspect"] == [pytest.approx(2 / 11)]


class StandIn(matrix.Plan):
    """Each command a short Python process: the export sleeps 0.2 s and writes a report
    saying it needed the float64 judgement, fold fails with a one-line error, the
    rest sleep 0.1 s."""

    def argv(self, command: str) -> list[str]:
        report = self.folder / f"{command}.json"
        if command == "fold":
            return [PYTHON, "-c", "import sys; sys.exit('Error: cannot fold')"]
        verdict = matrix.VERDICT_FLOAT64 if command == matrix.BASELINE else "elementwise"
        body = {"steps": [{"step": "Exporting", "seconds": 0.1}], "backend": "jax"}
        body["validation"] = {"comparisons": [{"verdict": verdict}]}
        pause = 0.2 if command == matrix.BASELINE else 0.1
        code = f"import time, pathlib; time.sleep({pause}); pathlib.Path({str(report)!r}).write_text({json.dumps(body)!r})"
        return [PYTHON, "-c", code]


def test_rounds_alternate_report_failures_once_and_add_the_outright_export(tmp_path):
    plan = StandIn("M", "jax", tmp_path, [], {}, limit_s=60)
    cells = matrix.measure(plan, [matrix.BASELINE, "inspect", "fold"], runs=2, warmup=1)
    assert sorted(cells) == sorted([matrix.BASELINE, "inspect", "fold", "export-outright"])
    assert len(cells["inspect"].runs) == 2 and len(cells["export-outright"].runs) == 2
    assert len(cells["fold"].runs) == 1  # failed in round 1, not retried
    assert cells["fold"].failure.message == "Error: cannot fold"
    # Round 1: E i E f E o E; round 2: E i E o E (the warm-up export is not counted).
    assert len(cells[matrix.BASELINE].runs) == 4 + 3
    assert len(cells["inspect"].ratios) == 2
    assert cells[matrix.BASELINE].report["float64_judgement"] is True
    assert cells["inspect"].report["float64_judgement"] is False
    summary = cells["inspect"].summary()
    walls = [r.wall_s for r in cells["inspect"].runs]
    assert summary["wall_s"] == round(statistics.median(walls), 2)
    assert summary["ratio"] == round(statistics.median(cells["inspect"].ratios), 3)
    assert cells["fold"].summary()["failed"]["exit_code"] == 1
    details = matrix.details_table(
        [{"model": "M", "backend": "jax", "cells": {"inspect": summary}}]
    )
    assert f"| M | jax | inspect | {summary['wall_s']:.2f} (" in details
    assert f"x) | {summary['peak_mib']:.0f} | Exporting 0.1 |" in details


def test_a_missing_keras_exporter_is_said_not_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(matrix.importlib.util, "find_spec", lambda name: None)
    plan = StandIn("M", "tensorflow", tmp_path, [], {}, limit_s=60)
    cells = matrix.measure(plan, [matrix.BASELINE, matrix.KERAS_EXPORT], runs=1, warmup=0)
    skipped = cells[matrix.KERAS_EXPORT].summary()["skipped"]
    assert "tf2onnx is not installed" in skipped and "pip install tf2onnx" in skipped
    assert cells[matrix.KERAS_EXPORT].runs == []


def row(backend: str, **ratios: float) -> dict:
    cells = {matrix.BASELINE: {"command": matrix.BASELINE, "runs": 1, "wall_s": 4.0}}
    for command, ratio in ratios.items():
        name = command.replace("_", "-")
        cells[name] = {"command": name, "runs": 1, "wall_s": 4.0 * ratio, "ratio": ratio}
    return {"model": "ResNet50", "backend": backend, "cells": cells}


def test_table_and_bar_lines_show_the_measured_ratios():
    rows = [
        row("jax", export_float16=1.5, export_int8=3.5, fold=1.2, keras_export=12.0),
        row("tensorflow", export_float16=2.5, fold=1.0, export_outright=0.4),
    ]
    rows[1]["cells"]["inspect"] = {
        "command": "inspect",
        "failed": {"exit_code": 3, "message": "Boom"},
    }
    table = matrix.markdown_table(rows, matrix.DEFAULT_COMMANDS)
    assert "| ResNet50 | jax | 4.00 s | " in table
    assert "6.00 s (1.50x)" in table and "10.00 s (2.50x)" in table
    assert (
        "**failed** (exit 3)" in table and "- ResNet50, tensorflow, inspect: exit 3: Boom" in table
    )
    assert "outright contract" in table  # the column appears where it was measured
    lines = matrix.bar_lines(rows)
    assert lines[0].endswith(
        "ResNet50/jax 1.50x, ResNet50/tensorflow 2.50x: missed on ResNet50/tensorflow"
    )
    assert lines[1].endswith("ResNet50/jax 3.50x: missed on ResNet50/jax")
    assert lines[2].endswith("met everywhere")
    assert lines[3].endswith("ResNet50/tensorflow 2.50x: missed on ResNet50/tensorflow")  # 1 / 0.4
    assert lines[4].endswith("ResNet50/jax 12.00x: met everywhere")

"""Progress on stderr for slow CLI steps, and plain-text tables for summaries.

:class:`Progress` shows a spinner with the elapsed time while a step runs and a
check mark with its duration when it ends, on stderr and only when stderr is a
terminal (never with ``--json``). It also records every step's duration for the
summary table the CLI prints at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TextIO

__all__ = ["Progress", "Step", "format_table"]

_SPINNER = "|/-\\"


@dataclasses.dataclass
class Step:
    label: str
    seconds: float = 0.0
    status: str = "running"  # "ok", "failed"


class Progress:
    """Records CLI steps; draws them on ``stream`` when ``enabled``."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.steps: list[Step] = []
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since this progress was made (the command's start): the total,
        which is less than the sum of the steps when a background step overlaps."""
        return time.perf_counter() - self.started

    @classmethod
    def for_terminal(cls, quiet: bool) -> Progress:
        """Enabled only when not ``quiet`` and stderr and stdout are terminals.

        It draws on its own duplicate of the terminal's descriptor, so the spinner
        stays visible while the CLI hides framework output on descriptor 2.
        """
        interactive = _isatty(sys.stderr) and _isatty(sys.stdout)
        if quiet or not interactive:
            return cls(enabled=False)
        stream: TextIO
        try:
            stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", closefd=True)
        except (AttributeError, OSError, ValueError):
            stream = sys.stderr
        return cls(enabled=True, stream=stream)

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[Step]:
        step = Step(label)
        self.steps.append(step)
        stop = threading.Event()
        spinner = None
        if self.enabled:
            spinner = threading.Thread(
                target=self._spin, args=(step, time.perf_counter(), stop), daemon=True
            )
            spinner.start()
        try:
            with self._timed(step):
                yield step
        finally:
            stop.set()
            if spinner is not None:
                spinner.join()
                mark = "ok" if step.status == "ok" else "FAILED"
                self._write(f"\r\033[K{mark:>6}  {step.label} ({step.seconds:.1f} s)\n")

    def background(self, label: str) -> contextlib.AbstractContextManager[Step]:
        """A step that runs in another thread, beside the ones that follow it: listed
        (and timed) where it started, never drawn (the foreground step's spinner is)."""
        step = Step(label)
        self.steps.append(step)
        return self._timed(step)

    @staticmethod
    @contextlib.contextmanager
    def _timed(step: Step) -> Iterator[Step]:
        start = time.perf_counter()
        try:
            yield step
            step.status = "ok"
        except BaseException:
            step.status = "failed"
            raise
        finally:
            step.seconds = time.perf_counter() - start

    def _spin(self, step: Step, start: float, stop: threading.Event) -> None:
        frame = 0
        while not stop.wait(0.1):
            elapsed = time.perf_counter() - start
            self._write(f"\r\033[K{_SPINNER[frame % 4]:>6}  {step.label} ({elapsed:.1f} s)")
            frame += 1

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(text)
            self.stream.flush()

    def table(self) -> list[list[str]]:
        rows = [["step", "seconds", "status"]]
        rows += [[s.label, f"{s.seconds:.2f}", s.status] for s in self.steps]
        return rows


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def format_table(rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns; the first row is the header, underlined with dashes."""
    if not rows:
        return ""
    text_rows = [[str(cell) for cell in row] for row in rows]
    widths = [
        max(len(row[i]) for row in text_rows if i < len(row))
        for i in range(max(len(row) for row in text_rows))
    ]

    def line(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()

    out = [line(text_rows[0]), line(["-" * w for w in widths])]
    out += [line(row) for row in text_rows[1:]]
    return "\n".join(out)

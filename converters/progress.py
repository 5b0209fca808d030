"""Progress on stderr for slow CLI steps, and plain-text tables for summaries.

:class:`Progress` records every step's duration for the summary table the CLI
prints at the end, and shows the steps as they run, in one of two ways:

* on a terminal (``enabled``): a live line with a spinner, the step, its counts
  where it has them (``Folding BatchNormalization: 40/176 layers``) and the
  elapsed time, then a check mark with the step's duration when it ends;
* elsewhere (``lines``, a log): nothing for a step that ends within
  :data:`SLOW_STEP` seconds; a step still running then gets one plain line, and a
  step with counts one more line every :data:`LINE_EVERY` seconds while they move.

A step's counts come from :meth:`Step.update`, which the work calls as it goes
(``progress=step.update`` where a function takes a ``progress(done, total)``
callback). Steps running in the background (:meth:`Progress.background`) are timed,
never drawn: the foreground step waiting on them is.
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

__all__ = ["LINE_EVERY", "SLOW_STEP", "Progress", "Step", "format_table"]

_SPINNER = "|/-\\"
# A step shows in a log once it has run this long (seconds)...
SLOW_STEP = 2.0
# ...and, while its counts move, again at most this often.
LINE_EVERY = 10.0


@dataclasses.dataclass
class Step:
    label: str
    seconds: float = 0.0
    status: str = "running"  # "ok", "failed"
    unit: str = ""  # what the counts count ("layers", "samples")
    done: int | None = None
    total: int | None = None

    def update(self, done: int, total: int | None = None) -> None:
        """``done`` of ``total`` (None: unknown) things are done; shown with the step."""
        self.done, self.total = int(done), None if total is None else int(total)

    def shown(self) -> str:
        """The label with the counts so far: ``Validating: 5/16 samples``."""
        if self.done is None:
            return self.label
        counts = str(self.done) if self.total is None else f"{self.done}/{self.total}"
        return f"{self.label}: {counts}" + (f" {self.unit}" if self.unit else "")


class Progress:
    """Records CLI steps; draws them live on ``stream`` when ``enabled`` (a terminal),
    or writes a plain line per slow step when ``lines`` (a log), each line starting
    with ``prefix``."""

    def __init__(
        self,
        enabled: bool,
        stream: TextIO | None = None,
        *,
        lines: bool = False,
        prefix: str = "",
        slow: float = SLOW_STEP,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.lines = lines and not enabled
        self.prefix = prefix
        self.slow = slow
        self.steps: list[Step] = []
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since this progress was made (the command's start): the total,
        which is less than the sum of the steps when a background step overlaps."""
        return time.perf_counter() - self.started

    @classmethod
    def for_terminal(cls, quiet: bool, *, lines: bool = False, prefix: str = "") -> Progress:
        """Live drawing when not ``quiet`` and stderr and stdout are terminals; else,
        when not ``quiet`` and ``lines``, plain lines on stderr; else nothing shown.

        It writes on its own duplicate of descriptor 2, so the spinner and the lines
        stay visible while the CLI hides framework output there.
        """
        interactive = _isatty(sys.stderr) and _isatty(sys.stdout)
        if quiet or not (interactive or lines):
            return cls(enabled=False)
        stream: TextIO
        try:
            stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", closefd=True)
        except (AttributeError, OSError, ValueError):
            stream = sys.stderr
        if interactive:
            return cls(enabled=True, stream=stream)
        return cls(enabled=False, stream=stream, lines=True, prefix=prefix)

    @contextlib.contextmanager
    def step(self, label: str, unit: str = "") -> Iterator[Step]:
        """Time (and show) the block as one step; ``unit`` names what its counts count."""
        step = Step(label, unit=unit)
        self.steps.append(step)
        stop = threading.Event()
        watcher = None
        if self.enabled or self.lines:
            target = self._spin if self.enabled else self._log
            watcher = threading.Thread(
                target=target, args=(step, time.perf_counter(), stop), daemon=True
            )
            watcher.start()
        try:
            with self._timed(step):
                yield step
        finally:
            stop.set()
            if watcher is not None:
                watcher.join()
            if self.enabled:
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
            self._write(f"\r\033[K{_SPINNER[frame % 4]:>6}  {step.shown()} ({elapsed:.1f} s)")
            frame += 1

    def _log(self, step: Step, start: float, stop: threading.Event) -> None:
        """A plain line once the step has run ``slow`` seconds; then one when its
        counts have moved and ``LINE_EVERY`` seconds have passed since the last."""
        if stop.wait(self.slow):
            return
        shown = step.shown()
        self._line(shown, time.perf_counter() - start)
        last = time.perf_counter()
        while not stop.wait(0.5):
            now = time.perf_counter()
            if now - last >= LINE_EVERY and step.shown() != shown:
                shown = step.shown()
                self._line(shown, now - start)
                last = now

    def _line(self, shown: str, elapsed: float) -> None:
        self._write(f"{self.prefix}{shown}... (running {elapsed:.1f} s)\n")

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

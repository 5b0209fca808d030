"""The stale-statistics step ``inspect`` and ``export`` share (``--data``).

With data, every BatchNormalization layer's moving statistics are compared with
the data's population statistics at that layer
(:func:`keras_bn.converters.statistics_check.check_statistics`; the model is left
as it was) and stale layers are named with the fix; without data, the report says
the statistics were not checked.
"""

from __future__ import annotations

from typing import Any

from keras_bn.converters.cli.run import Run

__all__ = ["StatisticsStep", "check_batch_norm_statistics"]


def check_batch_norm_statistics(
    model: Any, run: Run, data: str | None, *, what: str, skip: bool = False
) -> Any:
    """Report (and warn about) stale BN statistics over ``data`` (a ``--data`` spec).

    ``what`` ends the warning: what the stale statistics mean for this command;
    ``skip`` (``--no-statistics-check``) reports the check as skipped. Returns the
    :class:`~keras_bn.converters.statistics_check.StatisticsCheck` (its
    ``moving_outputs`` are Keras's run of the data), or None when none ran.
    """
    return StatisticsStep(model, run, data, what=what, skip=skip).start().result()


class StatisticsStep:
    """:func:`check_batch_norm_statistics` in two halves, so that the check can run in
    a background thread while the caller works on something that does not read the
    model (the check writes population statistics into the layers while it runs, and
    puts the moving ones back before it ends): :meth:`start`, then :meth:`result`,
    which reports in the caller's thread. :attr:`runs` says whether a check will run
    (else the report already says why not)."""

    def __init__(
        self, model: Any, run: Run, data: str | None, *, what: str, skip: bool = False
    ) -> None:
        from keras_bn._batch_norm_state import batch_norm_layers
        from keras_bn.converters import statistics_check
        from keras_bn.converters.prepared import prepare

        self.run, self.data, self.what = run, data, what
        self.prepared = prepare(model)  # the run's own when it is given one
        self.runs = False
        self._future: Any = None
        self._failed = ""  # the error's class name when the model did not run on the data
        if not batch_norm_layers(self.prepared.model):
            return
        if skip:
            run.report["statistics"] = {"checked": False, "skipped": True}
            run.summary.append(["BN statistics", "not checked (--no-statistics-check)"])
            return
        if data is None:
            # One summary row says so (the full sentence is in the JSON report).
            run.report["statistics"] = {"checked": False, "note": statistics_check.NOT_CHECKED}
            run.summary.append(["BN statistics", "not checked (no data: --data FILE)"])
            return
        self.runs = True

    def start(self, *, background: bool = False, gate: Any = None) -> StatisticsStep:
        """Begin the check (in this thread unless ``background``); a no-op when none
        runs or it has begun. With a ``gate`` (a ``threading.Event``), a background
        check waits for it before it writes any statistic into the layers: the caller
        may read the model's weights until it sets the gate, and must set it."""
        import concurrent.futures

        if not self.runs or self._future is not None:
            return self
        label = "Checking BatchNormalization statistics against the data"
        if not background:
            self._future = concurrent.futures.Future()
            try:
                with self.run.progress.step(label):
                    self._future.set_result(self._check())
            except Exception as error:
                self._future.set_exception(error)
            return self
        step = self.run.progress.background(label)

        def checked() -> Any:
            with step:
                return self._check(gate)

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._future = pool.submit(checked)
        pool.shutdown(wait=False)
        return self

    def _check(self, gate: Any = None) -> Any:
        """The check, or None when the model does not run on the data."""
        from keras_bn.converters import statistics_check
        from keras_bn.converters.data_sources import open_data

        model = self.prepared.model
        assert self.data is not None  # self.runs
        # Batches of EFFECT_SAMPLES: the second pass (the output-effect lines) runs on the
        # first batch with the program the first pass compiled for that batch size.
        source = open_data(
            self.data,
            [(spec.name, spec.shape) for spec in self.prepared.inputs],
            batch_size=statistics_check.EFFECT_SAMPLES,
        )
        try:
            return statistics_check.check_statistics(
                model, source, before_writing=None if gate is None else gate.wait
            )
        except Exception as error:
            if _model_runs(model, source):
                raise  # the model runs: the check itself failed (a bug)
            # The model does not run on the data: the Keras pass that follows reports
            # that with its own message (a user error or a bug).
            self._failed = type(error).__name__
            return None

    def checked(self) -> Any:
        """The check (waited for, not reported), or None when none ran or the model did
        not run on the data."""
        return None if self._future is None else self._future.result()

    def result(self) -> Any:
        """The :class:`~keras_bn.converters.statistics_check.StatisticsCheck`, reported
        (and warned about) here; None when none ran. Waits for a background check."""
        if self._future is None:
            return None
        check, self._future = self._future.result(), None
        run, data = self.run, self.data
        if check is None:
            run.report["statistics"] = {"checked": False, "error": self._failed}
            run.summary.append(["BN statistics", "not checked (the model did not run)"])
            return None
        run.report["statistics"] = {"checked": True, **check.to_dict()}
        run.text.append(str(check))
        run.summary.append(["stale BN statistics", f"{len(check.stale)} of {len(check.layers)}"])
        if check.stale:
            shown = ", ".join(check.stale[:5]) + (", ..." if len(check.stale) > 5 else "")
            effect = "; ".join(
                output.describe(check.before_name, check.after_name) for output in check.outputs
            )
            run.warn(
                f"{len(check.stale)} BatchNormalization layer(s) have stale moving statistics "
                f"for {data}: {shown} ({effect}); {self.what}. Fix: keras-bn recalibrate "
                f"{run.report.get('model', {}).get('path', 'MODEL.keras')} --data {data} "
                "-o RECALIBRATED.keras"
            )
        return check


def _model_runs(model: Any, source: Any) -> bool:
    """Whether the model runs, in inference, on the first batch of ``source``."""
    try:
        model(next(iter(source.inputs())), training=False)
    except Exception:
        return False
    return True

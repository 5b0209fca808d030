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

__all__ = ["check_batch_norm_statistics"]


def check_batch_norm_statistics(
    model: Any, run: Run, data: str | None, *, what: str, skip: bool = False
) -> Any:
    """Report (and warn about) stale BN statistics over ``data`` (a ``--data`` spec).

    ``what`` ends the warning: what the stale statistics mean for this command;
    ``skip`` (``--no-statistics-check``) reports the check as skipped. Returns the
    :class:`~keras_bn.converters.statistics_check.StatisticsCheck` (its
    ``moving_outputs`` are Keras's run of the data), or None when none ran.
    """
    from keras_bn._batch_norm_state import batch_norm_layers
    from keras_bn.converters import statistics_check
    from keras_bn.converters.prepared import prepare

    prepared = prepare(model)  # the run's own when it is given one: not flattened again
    model = prepared.model

    if not batch_norm_layers(model):
        return None
    if skip:
        run.report["statistics"] = {"checked": False, "skipped": True}
        run.summary.append(["BN statistics", "not checked (--no-statistics-check)"])
        return None
    if data is None:
        # One summary row says so (the full sentence is in the JSON report).
        run.report["statistics"] = {"checked": False, "note": statistics_check.NOT_CHECKED}
        run.summary.append(["BN statistics", "not checked (no data: --data FILE)"])
        return None
    from keras_bn.converters.data_sources import open_data

    # Batches of EFFECT_SAMPLES: the second pass (the output-effect lines) runs on the
    # first batch with the program the first pass compiled for that batch size.
    source = open_data(
        data,
        [(spec.name, spec.shape) for spec in prepared.inputs],
        batch_size=statistics_check.EFFECT_SAMPLES,
    )
    with run.progress.step("Checking BatchNormalization statistics against the data"):
        try:
            check = statistics_check.check_statistics(model, source)
        except Exception as error:
            if _model_runs(model, source):
                raise  # the model runs: the check itself failed (a bug)
            # The model does not run on the data: the Keras pass that follows reports
            # that with its own message (a user error or a bug).
            run.report["statistics"] = {"checked": False, "error": type(error).__name__}
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
            f"for {data}: {shown} ({effect}); {what}. Fix: keras-bn recalibrate "
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

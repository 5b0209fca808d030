"""Fold trained BatchNormalization layers into neighbouring Dense/Conv layers.

:func:`fold_batch_norms` returns a new Keras model in which every BatchNormalization
call that can be folded exactly is gone, its inference affine
``x * scale + offset`` absorbed into the kernel and bias of the linear layer before
it (**forward**) or, failing that, after it (**backward**), plus a
:class:`FoldReport` saying, for each BN call, what happened and why. A fold that
cannot apply is not an error: it is recorded with the names of the preconditions
that blocked it (:data:`PRECONDITIONS`) and the BN stays. :func:`fold_graph` gives
the same folds as a rewritten graph, for the exporter.

One module per step: :mod:`.maths` (pure NumPy, float64, rounded once to each
layer's dtype; no Keras import), :mod:`.rules` (the table :data:`FOLD_RULES` and
the thin per-layer adapters), :mod:`.plan` (the decisions and refusal reasons),
:mod:`.report` (what was decided), :mod:`.rewrite` (the folded graph and the
folded Keras model). The input model is never mutated: every layer of the folded
model is a fresh copy.
"""

from keras_bn.converters.folding.plan import check_batch_norm_statistics, plan_folds
from keras_bn.converters.folding.report import PRECONDITIONS, FoldEntry, FoldReport, Fp16Risk
from keras_bn.converters.folding.rewrite import fold_batch_norms, fold_graph
from keras_bn.converters.folding.rules import BATCH_NORM_CLASSES, FOLD_RULES, FoldRule

__all__ = [
    "BATCH_NORM_CLASSES",
    "FOLD_RULES",
    "PRECONDITIONS",
    "FoldEntry",
    "FoldReport",
    "FoldRule",
    "Fp16Risk",
    "check_batch_norm_statistics",
    "fold_batch_norms",
    "fold_graph",
    "plan_folds",
]

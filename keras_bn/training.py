"""Training-side utilities for batch normalization (compatibility module).

Each utility lives in its own module; this one re-exports them under the names
``keras_bn.training`` has always offered:

- :func:`~keras_bn.recalibration.recalibrate_batch_norm` (``keras_bn.recalibration``)
  recomputes every BatchNormalization layer's moving statistics as exact population
  statistics over a dataset ("precise BN"); its float64 maths is
  :class:`~keras_bn.running_moments.RunningMoments` (``keras_bn.running_moments``).
- :class:`~keras_bn.monitor.BatchNormMonitor` (``keras_bn.monitor``) watches the
  moving statistics during ``fit``.
- :func:`~keras_bn.replacement.replace_batch_norm` (``keras_bn.replacement``) clones
  a model with every stock BatchNormalization swapped for ours, weights kept.
- :func:`~keras_bn.torch_interop.load_torch_batch_norm` and
  :func:`~keras_bn.torch_interop.torch_batch_norm_kwargs` (``keras_bn.torch_interop``)
  load PyTorch BatchNorm states and translate its hyperparameters.
"""

from keras_bn.monitor import BatchNormMonitor
from keras_bn.recalibration import recalibrate_batch_norm
from keras_bn.replacement import replace_batch_norm
from keras_bn.running_moments import RunningMoments
from keras_bn.torch_interop import load_torch_batch_norm, torch_batch_norm_kwargs

__all__ = [
    "RunningMoments",
    "recalibrate_batch_norm",
    "BatchNormMonitor",
    "replace_batch_norm",
    "load_torch_batch_norm",
    "torch_batch_norm_kwargs",
]

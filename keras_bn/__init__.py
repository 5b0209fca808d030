"""keras-bn: batch normalization for Keras 3 that ships to edge runtimes."""

__version__ = "0.1.0"

from keras_bn.layers import BatchNormalization  # noqa: E402, F401 (re-export)
from keras_bn.training import (  # noqa: E402, F401 (re-exports)
    BatchNormMonitor,
    load_torch_batch_norm,
    recalibrate_batch_norm,
    replace_batch_norm,
    torch_batch_norm_kwargs,
)

"""ONNX rules, one small function per Keras layer class or ``keras.ops`` operation.

Two tables: :data:`RULES` (in :mod:`.table`) maps each exported layer class to its
rule, :data:`OPS` (in :mod:`.ops.table`) each ``keras.ops`` operation class (an
operation in functional code, ``x + 3.0``, or one recorded by tracing a layer's
``call()``); :func:`find_rule` looks up both, the layer table first.
:data:`ACTIVATIONS` (in :mod:`.activations`) maps each activation function to its
emitter. Layer families: :mod:`.core` (Dense, Embedding, activations, merges),
:mod:`.convolution` (convolutions, pooling), :mod:`.reshaping`,
:mod:`.normalization`, :mod:`.recurrent` (SimpleRNN/GRU/LSTM, Bidirectional,
Masking), :mod:`.attention` (EinsumDense, MultiHeadAttention),
:mod:`.applications` (Keras Applications' own layers). Operation families: the
package :mod:`.ops`. :mod:`.coverage` says, for every public ``keras.ops``
function and ``keras.layers`` class, how it exports or why it does not.
"""

from keras_bn.converters.onnx.rules.activations import ACTIVATIONS
from keras_bn.converters.onnx.rules.common import Rule
from keras_bn.converters.onnx.rules.ops import OPS, READS_UNKNOWN_SIZES
from keras_bn.converters.onnx.rules.table import RULES, SHADOWED_OPS, find_rule, needs_tracing

__all__ = [
    "ACTIVATIONS",
    "OPS",
    "READS_UNKNOWN_SIZES",
    "RULES",
    "SHADOWED_OPS",
    "Rule",
    "find_rule",
    "needs_tracing",
]

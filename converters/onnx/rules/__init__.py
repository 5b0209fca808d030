"""ONNX rules, one small function per Keras layer class, split by family.

:data:`RULES` (in :mod:`.table`) maps each exported class to its rule;
:data:`ACTIVATIONS` (in :mod:`.activations`) each activation function to its
emitter. Families: :mod:`.core` (Dense, Embedding, activations, merges),
:mod:`.convolution` (convolutions, pooling), :mod:`.reshaping`,
:mod:`.normalization`, :mod:`.recurrent` (SimpleRNN/GRU/LSTM, Bidirectional,
Masking), :mod:`.attention` (EinsumDense, MultiHeadAttention), :mod:`.keras_ops` (``keras.ops`` operations and Keras
Applications' layers: the exporter's only private Keras imports).
"""

from keras_bn.converters.onnx.rules import operations, text_ops
from keras_bn.converters.onnx.rules.activations import ACTIVATIONS
from keras_bn.converters.onnx.rules.common import Rule
from keras_bn.converters.onnx.rules.table import RULES, find_rule, needs_tracing

READS_UNKNOWN_SIZES = operations.READS_UNKNOWN_SIZES | text_ops.READS_UNKNOWN_SIZES

__all__ = ["ACTIVATIONS", "READS_UNKNOWN_SIZES", "RULES", "Rule", "find_rule", "needs_tracing"]

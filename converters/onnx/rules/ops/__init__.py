"""``keras.ops`` rules, one small function per operation, split by family.

:data:`OPS` (in :mod:`.table`) maps each ``keras.ops`` operation class to its
rule. Families: :mod:`.elementwise` (arithmetic, comparisons, the one map of
binary operations, activations), :mod:`.reductions` (reductions, scans, sorting),
:mod:`.shapes` (shapes, indexing, gathering, resampling), :mod:`.nn` (linear
algebra, attention, normalizations, convolution, pooling), :mod:`.control_flow`
(``ops.map``); :mod:`.common` holds their shared helpers.
"""

from keras_bn.converters.onnx.rules.ops.table import OPS, READS_UNKNOWN_SIZES

__all__ = ["OPS", "READS_UNKNOWN_SIZES"]

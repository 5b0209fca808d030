"""The ``keras.ops`` rule table: operation class -> rule.

``x + 3.0`` in a Functional model, and every ``keras.ops`` call recorded by tracing
a layer's ``call()``, is a node whose "layer" is a ``keras.ops`` operation
instance: its attributes on the instance (``node.layer``: ``Reshape.newshape``,
``Pad.pad_width``...), its arguments in ``node.args``, where symbolic tensors are
graph :class:`~keras_bn.converters.graph.Tensor` and everything else (weights
read in ``call()``, Python numbers, tensors computed from constants) is a
constant. Adding an operation is adding one function in its family's module and
one entry here (a binary operation: one entry in
:data:`.elementwise.BINARY_OPS` and one here). Layer rules live in
:data:`keras_bn.converters.onnx.rules.RULES`; a class in both tables needs a
reason in :data:`keras_bn.converters.onnx.rules.table.SHADOWED_OPS`
(``tests/test_onnx_rules.py`` checks both tables, and that no class is
registered twice).
"""

from __future__ import annotations

from keras import activations

from keras_bn._keras_internals import (
    ActivationReLU,
    core_ops,
    image_ops,
    math_ops,
    nn_ops,
    numpy_ops,
)
from keras_bn.converters.onnx.rules.common import Rule
from keras_bn.converters.onnx.rules.ops import control_flow as flow
from keras_bn.converters.onnx.rules.ops import elementwise as ew
from keras_bn.converters.onnx.rules.ops import nn, shapes
from keras_bn.converters.onnx.rules.ops import reductions as red
from keras_bn.converters.onnx.rules.ops import sequence as seq
from keras_bn.converters.tracing import (
    AlignedResize,
    AnchoredConstant,
    Constant,
    GridSample,
    Range,
)

__all__ = ["OPS", "READS_UNKNOWN_SIZES"]

_binary = ew.binary
_activation = ew.unary_activation
_unary = ew.unary

OPS: dict[type, Rule] = {
    Constant: ew.constant,
    # elementwise: binary operations (the one map: elementwise.BINARY_OPS)
    numpy_ops.Add: _binary,
    numpy_ops.Subtract: _binary,
    numpy_ops.Multiply: _binary,
    numpy_ops.Divide: _binary,
    numpy_ops.TrueDivide: _binary,
    numpy_ops.Maximum: _binary,
    numpy_ops.Minimum: _binary,
    numpy_ops.Power: _binary,
    numpy_ops.Mod: _binary,
    numpy_ops.Greater: _binary,
    numpy_ops.GreaterEqual: _binary,
    numpy_ops.Less: _binary,
    numpy_ops.LessEqual: _binary,
    numpy_ops.Equal: _binary,
    numpy_ops.NotEqual: _binary,
    numpy_ops.LogicalAnd: _binary,
    numpy_ops.LogicalOr: _binary,
    # elementwise: one input
    numpy_ops.Negative: ew.negative,
    numpy_ops.Sqrt: _unary("Sqrt"),
    numpy_ops.Exp: _unary("Exp"),
    numpy_ops.Log: _unary("Log"),
    numpy_ops.Abs: _unary("Abs"),
    numpy_ops.Absolute: _unary("Abs"),
    numpy_ops.Reciprocal: _unary("Reciprocal"),
    numpy_ops.Sign: _unary("Sign"),
    numpy_ops.Floor: _unary("Floor"),
    numpy_ops.Ceil: _unary("Ceil"),
    numpy_ops.Sin: _unary("Sin"),
    numpy_ops.Cos: _unary("Cos"),
    numpy_ops.Tan: _unary("Tan"),
    numpy_ops.Arcsin: _unary("Asin"),
    numpy_ops.Arccos: _unary("Acos"),
    numpy_ops.Arctan: _unary("Atan"),
    numpy_ops.Sinh: _unary("Sinh"),
    numpy_ops.Cosh: _unary("Cosh"),
    numpy_ops.Arcsinh: _unary("Asinh"),
    numpy_ops.Arccosh: _unary("Acosh"),
    numpy_ops.Arctanh: _unary("Atanh"),
    numpy_ops.Isnan: _unary("IsNaN"),
    numpy_ops.Round: ew.round_op,
    numpy_ops.Square: ew.square,
    numpy_ops.Clip: ew.clip,
    numpy_ops.LogicalNot: ew.logical_not,
    numpy_ops.Where: ew.where,
    numpy_ops.ZerosLike: ew.zeros_like,
    core_ops.StopGradient: ew.identity,
    core_ops.ConvertToTensor: ew.identity,
    core_ops.Cast: ew.cast,
    math_ops.Rsqrt: ew.rsqrt,
    math_ops.Erf: ew.erf,
    # activations
    numpy_ops.Tanh: _activation(activations.tanh),
    nn_ops.Relu: _activation(activations.relu),
    ActivationReLU: ew.activation_relu_op,
    nn_ops.Relu6: _activation(activations.relu6),
    nn_ops.Sigmoid: _activation(activations.sigmoid),
    nn_ops.Silu: _activation(activations.silu),
    nn_ops.HardSigmoid: _activation(activations.hard_sigmoid),
    nn_ops.HardSilu: _activation(activations.hard_silu),
    nn_ops.Gelu: ew.gelu_op,
    nn_ops.Softplus: _unary("Softplus"),
    nn_ops.Softsign: _unary("Softsign"),
    nn_ops.Softmax: ew.softmax_op,
    nn_ops.LogSoftmax: ew.log_softmax,
    # reductions, scans, arg-reductions, sorting
    numpy_ops.Mean: red.reduction("ReduceMean"),
    numpy_ops.Sum: red.reduction("ReduceSum"),
    numpy_ops.Prod: red.reduction("ReduceProd"),
    numpy_ops.Max: red.reduction("ReduceMax"),
    numpy_ops.Min: red.reduction("ReduceMin"),
    numpy_ops.Amax: red.reduction("ReduceMax"),
    numpy_ops.Amin: red.reduction("ReduceMin"),
    numpy_ops.Any: red.any_op,
    numpy_ops.Size: red.size,
    numpy_ops.Cumsum: red.cumsum,
    numpy_ops.Cumprod: red.cumprod,
    numpy_ops.Argmax: red.arg_reduction("ArgMax"),
    numpy_ops.Argmin: red.arg_reduction("ArgMin"),
    numpy_ops.Sort: red.sort,
    math_ops.TopK: red.top_k,
    # shapes, indexing, gathering, resampling
    numpy_ops.Reshape: seq.reshape,
    numpy_ops.Transpose: shapes.transpose,
    numpy_ops.Swapaxes: shapes.swapaxes,
    numpy_ops.ExpandDims: shapes.expand_dims,
    numpy_ops.Squeeze: shapes.squeeze,
    numpy_ops.Concatenate: shapes.concatenate,
    numpy_ops.Stack: shapes.stack,
    numpy_ops.Split: shapes.split,
    core_ops.Unstack: shapes.unstack,
    numpy_ops.Tile: shapes.tile,
    numpy_ops.BroadcastTo: shapes.broadcast_to,
    numpy_ops.Pad: shapes.pad,
    numpy_ops.GetItem: shapes.get_item,
    core_ops.Slice: seq.slice_op,
    numpy_ops.Take: shapes.take,
    numpy_ops.TakeAlongAxis: shapes.take_along_axis,
    nn_ops.OneHot: shapes.one_hot,
    image_ops.Resize: shapes.image_resize,
    AlignedResize: shapes.aligned_resize,
    GridSample: shapes.grid_sample,
    # linear algebra, attention, normalization, convolution, pooling
    numpy_ops.Matmul: nn.matmul,
    numpy_ops.Einsum: nn.einsum,
    nn_ops.DotProductAttention: nn.dot_product_attention,
    nn_ops.LayerNorm: nn.layer_norm,
    nn_ops.RMSNorm: nn.rms_norm,
    nn_ops.Normalize: nn.normalize,
    nn_ops.Conv: nn.conv_op,
    nn_ops.DepthwiseConv: nn.depthwise_conv_op,
    nn_ops.MaxPool: nn.pool_op("MaxPool"),
    nn_ops.AveragePool: nn.pool_op("AveragePool"),
    # control flow
    core_ops.Map: flow.map_op,
    # what sequence models record (sizes read from the runtime sequence length)
    numpy_ops.Repeat: seq.repeat,
    numpy_ops.Moveaxis: seq.moveaxis,
    numpy_ops.All: seq.all_op,
    math_ops.FFT2: seq.fft2,
    Range: seq.range_op,
    AnchoredConstant: seq.anchored_constant,
}

# The rules that compute the unknown input sizes a traced operation's arguments hold
# at runtime; any other rule refuses such a node (it would bake a marker size in).
READS_UNKNOWN_SIZES: frozenset[Rule] = frozenset(
    {shapes.reshape, shapes.tile, shapes.broadcast_to, *seq.READS_UNKNOWN_SIZES}
)

"""The exporter's layer table: Keras layer class -> rule; and the lookup of both tables.

A rule ``rule(builder, node)`` reads the layer's config and weights (through
``node.weight``), emits ONNX nodes through the :class:`~..builder.Builder` and
publishes the node's outputs with ``builder.set``. Adding a layer is adding one
entry here and one function in its family's module. ``keras.ops`` operations
have their own table, :data:`.ops.OPS`; :func:`find_rule` looks in this one
first (a layer rule gives the better graph), so a class in both needs a reason
in :data:`SHADOWED_OPS`. A rule that cannot export a configuration raises
:class:`~..builder.Unsupported` with the reason; the exporter collects every such
layer into one error message.
"""

from __future__ import annotations

from typing import Any

from keras import layers as L

from keras_bn.converters.graph import Node
from keras_bn.converters.onnx.builder import Builder
from keras_bn.converters.onnx.rules import wrappers
from keras_bn.converters.onnx.rules.activations import ACTIVATIONS
from keras_bn.converters.onnx.rules.applications import (
    CustomScaleLayer,
    LayerScale,
    custom_scale,
    layer_scale,
)
from keras_bn.converters.onnx.rules.attention import einsum_dense, multi_head_attention
from keras_bn.converters.onnx.rules.common import Rule
from keras_bn.converters.onnx.rules.convolution import (
    average_pooling,
    conv,
    conv_transpose,
    depthwise_conv,
    global_average_pooling,
    global_max_pooling,
    max_pooling,
    separable_conv,
)
from keras_bn.converters.onnx.rules.core import (
    activation,
    add,
    average,
    concatenate,
    dense,
    elu,
    embedding,
    identity,
    leaky_relu,
    maximum,
    minimum,
    multiply,
    prelu,
    relu,
    softmax,
    subtract,
)
from keras_bn.converters.onnx.rules.normalization import (
    batch_normalization,
    group_normalization,
    layer_normalization,
    normalization,
    rescaling,
    unit_normalization,
)
from keras_bn.converters.onnx.rules.ops import OPS
from keras_bn.converters.onnx.rules.recurrent import bidirectional, masking, recurrent
from keras_bn.converters.onnx.rules.reshaping import (
    cropping,
    flatten,
    permute,
    repeat_vector,
    reshape,
    resizing,
    upsampling,
    zero_padding,
)
from keras_bn.layers import BatchNormalization as KerasBnBatchNormalization

__all__ = ["RULES", "SHADOWED_OPS", "find_rule", "needs_tracing"]


def time_distributed(b: Builder, node: Node) -> None:
    """TimeDistributed: :func:`.wrappers.time_distributed` with this table's lookup."""
    wrappers.time_distributed(b, node, find_rule)


RULES: dict[type, Rule] = {
    # Core
    L.Dense: dense,
    L.EinsumDense: einsum_dense,
    L.Embedding: embedding,
    L.Activation: activation,
    L.ReLU: relu,
    L.LeakyReLU: leaky_relu,
    L.PReLU: prelu,
    L.ELU: elu,
    L.Softmax: softmax,
    # Convolution and pooling
    L.Conv1D: conv,
    L.Conv2D: conv,
    L.Conv3D: conv,
    L.DepthwiseConv1D: depthwise_conv,
    L.DepthwiseConv2D: depthwise_conv,
    L.SeparableConv1D: separable_conv,
    L.SeparableConv2D: separable_conv,
    L.Conv1DTranspose: conv_transpose,
    L.Conv2DTranspose: conv_transpose,
    L.Conv3DTranspose: conv_transpose,
    L.MaxPooling1D: max_pooling,
    L.MaxPooling2D: max_pooling,
    L.MaxPooling3D: max_pooling,
    L.AveragePooling1D: average_pooling,
    L.AveragePooling2D: average_pooling,
    L.AveragePooling3D: average_pooling,
    L.GlobalAveragePooling1D: global_average_pooling,
    L.GlobalAveragePooling2D: global_average_pooling,
    L.GlobalAveragePooling3D: global_average_pooling,
    L.GlobalMaxPooling1D: global_max_pooling,
    L.GlobalMaxPooling2D: global_max_pooling,
    L.GlobalMaxPooling3D: global_max_pooling,
    # Merging
    L.Add: add,
    L.Subtract: subtract,
    L.Multiply: multiply,
    L.Average: average,
    L.Maximum: maximum,
    L.Minimum: minimum,
    L.Concatenate: concatenate,
    # Reshaping
    L.Reshape: reshape,
    L.Flatten: flatten,
    L.Permute: permute,
    L.RepeatVector: repeat_vector,
    L.ZeroPadding1D: zero_padding,
    L.ZeroPadding2D: zero_padding,
    L.ZeroPadding3D: zero_padding,
    L.Cropping1D: cropping,
    L.Cropping2D: cropping,
    L.Cropping3D: cropping,
    L.UpSampling1D: upsampling,
    L.UpSampling2D: upsampling,
    L.UpSampling3D: upsampling,
    L.Resizing: resizing,
    # Identity at inference
    L.Dropout: identity,
    L.SpatialDropout1D: identity,
    L.SpatialDropout2D: identity,
    L.SpatialDropout3D: identity,
    L.GaussianDropout: identity,
    L.GaussianNoise: identity,
    L.AlphaDropout: identity,
    L.ActivityRegularization: identity,
    L.Identity: identity,
    # Preprocessing and normalization
    L.Rescaling: rescaling,
    L.Normalization: normalization,
    L.LayerNormalization: layer_normalization,
    L.GroupNormalization: group_normalization,
    L.UnitNormalization: unit_normalization,
    L.BatchNormalization: batch_normalization,
    KerasBnBatchNormalization: batch_normalization,
    # Recurrent and attention layers, and the masks they read
    L.SimpleRNN: recurrent,
    L.GRU: recurrent,
    L.LSTM: recurrent,
    L.RNN: recurrent,
    L.Bidirectional: bidirectional,
    L.TimeDistributed: time_distributed,
    L.MultiHeadAttention: multi_head_attention,
    L.Masking: masking,
    # Keras Applications' own layers
    LayerScale: layer_scale,
    CustomScaleLayer: custom_scale,
}


# keras.ops operation classes that also have a layer rule, which wins (find_rule),
# each with the reason. Empty: a class in both tables by accident fails a test.
SHADOWED_OPS: dict[type, str] = {}


def find_rule(layer: Any) -> Rule | None:
    """The rule for ``layer``'s exact class (a subclass may compute something else):
    its layer rule, else its ``keras.ops`` operation rule."""
    rule = RULES.get(type(layer))
    return rule if rule is not None else OPS.get(type(layer))


def needs_tracing(layer: Any) -> bool:
    """Whether export traces ``layer``'s call (no rule for it): a rule, where one
    exists, gives the better graph (layouts, Conv+BN), so it wins over tracing. An
    Activation or Dense layer of a function the activation table lacks (KerasHub's
    ``Activation(lambda x: keras.activations.gelu(x, approximate=False))``, SigLIP's
    ``Dense(activation=gelu_approximate)``) is traced through that function."""
    if find_rule(layer) is None:
        return True
    if type(layer) is L.TimeDistributed:  # the wrapped layer's rule, or a trace of both
        return not wrappers.time_distributed_has_rule(layer, needs_tracing)
    return type(layer) in (L.Activation, L.Dense) and layer.activation not in ACTIVATIONS

"""Rules: Keras Applications' own layers (ConvNeXt's LayerScale, InceptionResNetV2's
CustomScaleLayer), reachable only through Keras's private modules, which
``keras_bn._keras_internals`` (the project's one module of private Keras access)
imports for us.
"""

from __future__ import annotations

from keras_bn._keras_internals import CustomScaleLayer, LayerScale
from keras_bn.converters.graph import Node, to_numpy
from keras_bn.converters.onnx.builder import Builder
from keras_bn.converters.onnx.rules.common import common_layout

__all__ = ["CustomScaleLayer", "LayerScale", "custom_scale", "layer_scale"]


def layer_scale(b: Builder, node: Node) -> None:
    """ConvNeXt's LayerScale: ``x * gamma`` on the last axis."""
    tensor = node.inputs[0]
    value = b.value(tensor)
    gamma = b.broadcast_const(
        to_numpy(node.layer.gamma),
        tensor.rank,
        value.perm,
        "gamma",
        key=(id(node.layer), value.perm),
    )
    b.set(node.outputs[0], b.op("Mul", [b.get(tensor, value.perm), gamma]), value.perm)


def custom_scale(b: Builder, node: Node) -> None:
    """InceptionResNetV2's CustomScaleLayer: ``inputs[0] + inputs[1] * scale``."""
    names, perm = common_layout(b, node.inputs, expand=False)
    scaled = b.op("Mul", [names[1], b.scalar(float(node.layer.scale), "scale")])
    b.set(node.outputs[0], b.op("Add", [names[0], scaled]), perm)

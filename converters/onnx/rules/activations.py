"""Activation functions (the ``activation`` argument of Dense/Conv layers, the
Activation layer): :data:`ACTIVATIONS`, a literal table from Keras function to a
small emitter ``emit(builder, name, perm) -> name``.

TensorFlow's own activation functions (``Dense(activation=tf.nn.relu)``) compute
what a Keras one does: :data:`TENSORFLOW_ACTIVATIONS` names each with the Keras
function whose emitter it shares, and on the TensorFlow backend they are entries
of :data:`ACTIVATIONS` too. Any other function
is recorded as a TensorFlow graph on the TensorFlow backend
(:func:`~.tensorflow.activation_from_tensorflow`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import keras
from keras import activations

from keras_bn.converters.onnx.builder import Builder
from keras_bn.converters.onnx.layout import Perm

__all__ = ["ACTIVATIONS", "Activation", "apply_activation", "gelu"]

Activation = Callable[[Builder, str, Perm], str]


def apply_activation(b: Builder, function: Any, name: str, perm: Perm) -> str:
    emit = ACTIVATIONS.get(function)
    if emit is None:  # TensorFlow code on the TensorFlow backend, or Unsupported
        from keras_bn.converters.onnx.rules.tensorflow import activation_from_tensorflow

        return activation_from_tensorflow(b, function, name, perm)
    return emit(b, name, perm)


def _last_axis(perm: Perm) -> int:
    return perm.index(len(perm) - 1)


def _act_linear(b: Builder, x: str, perm: Perm) -> str:
    return x


def _act_relu(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Relu", [x])


def _act_relu6(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Clip", [x, b.scalar(0.0, "zero"), b.scalar(6.0, "six")])


def _act_leaky_relu(b: Builder, x: str, perm: Perm) -> str:
    return b.op("LeakyRelu", [x], alpha=0.2)


def _act_elu(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Elu", [x], alpha=1.0)


def _act_selu(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Selu", [x])  # ONNX's default alpha and gamma are Keras's constants


def _act_celu(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Celu", [x], alpha=1.0)


def _act_sigmoid(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Sigmoid", [x])


def _act_hard_sigmoid(b: Builder, x: str, perm: Perm) -> str:
    return b.op("HardSigmoid", [x], alpha=1.0 / 6.0, beta=0.5)


def _act_hard_silu(b: Builder, x: str, perm: Perm) -> str:
    if b.opset >= 14:
        return b.op("HardSwish", [x])
    return b.op("Mul", [x, _act_hard_sigmoid(b, x, perm)])


def _act_silu(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Mul", [x, b.op("Sigmoid", [x])])


def _act_tanh(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Tanh", [x])


def _act_hard_tanh(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Clip", [x, b.scalar(-1.0, "minus_one"), b.scalar(1.0, "one")])


def _act_softmax(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Softmax", [x], axis=_last_axis(perm))


def _act_log_softmax(b: Builder, x: str, perm: Perm) -> str:
    return b.op("LogSoftmax", [x], axis=_last_axis(perm))


def _act_softplus(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Softplus", [x])


def _act_softsign(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Softsign", [x])


def _act_exponential(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Exp", [x])


def _act_log_sigmoid(b: Builder, x: str, perm: Perm) -> str:
    # log(sigmoid(x)) = -softplus(-x), exact for large |x| (as Keras computes it).
    return b.op("Neg", [b.op("Softplus", [b.op("Neg", [x])])])


def _act_mish(b: Builder, x: str, perm: Perm) -> str:
    if b.opset >= 18:
        return b.op("Mish", [x])
    return b.op("Mul", [x, b.op("Tanh", [b.op("Softplus", [x])])])


def _act_tanh_shrink(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Sub", [x, b.op("Tanh", [x])])


def _act_hard_shrink(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Shrink", [x], lambd=0.5, bias=0.0)


def _act_soft_shrink(b: Builder, x: str, perm: Perm) -> str:
    return b.op("Shrink", [x], lambd=0.5, bias=0.5)


def _act_sparse_sigmoid(b: Builder, x: str, perm: Perm) -> str:
    return b.op("HardSigmoid", [x], alpha=0.5, beta=0.5)


def gelu(b: Builder, x: str, approximate: bool) -> str:
    if b.opset >= 20:
        return b.op("Gelu", [x], approximate="tanh" if approximate else "none")
    if approximate:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = b.op("Mul", [b.op("Mul", [x, x]), x])
        inner = b.op("Add", [x, b.op("Mul", [cube, b.scalar(0.044715, "gelu_coefficient")])])
        scaled = b.op("Mul", [inner, b.scalar(math.sqrt(2.0 / math.pi), "sqrt_2_over_pi")])
        one_plus = b.op("Add", [b.op("Tanh", [scaled]), b.scalar(1.0, "one")])
    else:  # 0.5 x (1 + erf(x / sqrt(2)))
        erf = b.op("Erf", [b.op("Div", [x, b.scalar(math.sqrt(2.0), "sqrt_2")])])
        one_plus = b.op("Add", [erf, b.scalar(1.0, "one")])
    return b.op("Mul", [b.op("Mul", [x, one_plus]), b.scalar(0.5, "half")])


def _act_gelu(b: Builder, x: str, perm: Perm) -> str:
    return gelu(b, x, approximate=False)  # keras.activations.gelu defaults to exact


ACTIVATIONS: dict[Any, Activation] = {
    activations.linear: _act_linear,
    activations.relu: _act_relu,
    activations.relu6: _act_relu6,
    activations.leaky_relu: _act_leaky_relu,
    activations.elu: _act_elu,
    activations.selu: _act_selu,
    activations.celu: _act_celu,
    activations.sigmoid: _act_sigmoid,
    activations.hard_sigmoid: _act_hard_sigmoid,
    activations.hard_silu: _act_hard_silu,  # also "hard_swish"
    activations.silu: _act_silu,  # also "swish"
    activations.gelu: _act_gelu,
    activations.tanh: _act_tanh,
    activations.hard_tanh: _act_hard_tanh,
    activations.softmax: _act_softmax,
    activations.log_softmax: _act_log_softmax,
    activations.softplus: _act_softplus,
    activations.softsign: _act_softsign,
    activations.exponential: _act_exponential,
    activations.log_sigmoid: _act_log_sigmoid,
    activations.mish: _act_mish,
    activations.tanh_shrink: _act_tanh_shrink,
    activations.hard_shrink: _act_hard_shrink,
    activations.soft_shrink: _act_soft_shrink,
    activations.sparse_sigmoid: _act_sparse_sigmoid,
}

# TensorFlow's activation functions (by attribute path under ``tensorflow``) -> the
# Keras function that computes the same with the same defaults (tf.nn.leaky_relu's
# alpha=0.2, tf.nn.gelu's approximate=False, tf.nn.softmax's axis=-1).
TENSORFLOW_ACTIVATIONS: dict[str, Any] = {
    "identity": activations.linear,
    "nn.relu": activations.relu,
    "nn.relu6": activations.relu6,
    "nn.leaky_relu": activations.leaky_relu,
    "nn.elu": activations.elu,
    "nn.selu": activations.selu,
    "nn.gelu": activations.gelu,
    "nn.silu": activations.silu,
    "nn.swish": activations.silu,
    "nn.sigmoid": activations.sigmoid,
    "sigmoid": activations.sigmoid,
    "math.sigmoid": activations.sigmoid,
    "nn.tanh": activations.tanh,
    "tanh": activations.tanh,
    "math.tanh": activations.tanh,
    "nn.softplus": activations.softplus,
    "math.softplus": activations.softplus,
    "nn.softsign": activations.softsign,
    "math.softsign": activations.softsign,
    "nn.softmax": activations.softmax,
    "math.softmax": activations.softmax,
    "nn.log_softmax": activations.log_softmax,
    "math.log_softmax": activations.log_softmax,
    "exp": activations.exponential,
    "math.exp": activations.exponential,
}


def _tensorflow_functions() -> dict[Any, Activation]:
    """:data:`TENSORFLOW_ACTIVATIONS` as ``{tf function: emitter}`` on the TensorFlow
    backend (which has imported TensorFlow; it is never imported here). On another
    backend TensorFlow functions cannot run on the model's tensors: none is added."""
    tensorflow = sys.modules.get("tensorflow")
    found: dict[Any, Activation] = {}
    if tensorflow is None or keras.backend.backend() != "tensorflow":
        return found
    for path, keras_function in TENSORFLOW_ACTIVATIONS.items():
        function: Any = tensorflow
        for attribute in path.split("."):
            function = getattr(function, attribute, None)
        if callable(function) and function not in ACTIVATIONS:
            found[function] = ACTIVATIONS[keras_function]
    return found


ACTIVATIONS.update(_tensorflow_functions())

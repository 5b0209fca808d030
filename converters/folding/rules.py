"""Which layers BatchNormalization folds into, and the thin per-layer adapters.

:data:`FOLD_RULES` is the table: a literal dict from Keras layer class to a
:class:`FoldRule` saying which kernel holds the output channels (forward folding is
the same maths for every class, :func:`.maths.fold_forward`) and which function
folds a BN into the layer's input (backward). :func:`layer_affine` reads a BN
layer's inference affine. The maths itself is :mod:`.maths` (pure NumPy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from keras_bn.converters.folding import maths
from keras_bn.converters.folding.report import Blocked
from keras_bn.converters.graph import to_numpy
from keras_bn.layers import BatchNormalization as KerasBnBatchNormalization

__all__ = [
    "BATCH_NORM_CLASSES",
    "FOLD_RULES",
    "FoldRule",
    "Weights",
    "layer_affine",
    "variables_by_name",
]

# By Keras variable name: float64, float32 as loaded, or a kernel times a scale.
Weights = dict[str, "np.ndarray | maths.ScaledKernel"]


def _require_no_padding(layer: Any) -> None:
    """Backward folding into a conv is exact only where it pads nothing."""
    if layer.padding == "valid" or all(size == 1 for size in layer.kernel_size):
        return
    raise Blocked(
        "consumer-padding",
        f"{layer.name!r} has padding={layer.padding!r} with "
        f"kernel_size={tuple(layer.kernel_size)}: border outputs would see unshifted zeros",
    )


def _fold_into_dense_input(layer: Any, weights: Weights, scale, offset) -> Weights:
    kernel, bias = maths.fold_backward(weights["kernel"], weights.get("bias"), scale, offset)
    return {**weights, "kernel": kernel, "bias": bias}


def _fold_into_conv_input(layer: Any, weights: Weights, scale, offset) -> Weights:
    _require_no_padding(layer)
    kernel, bias = maths.fold_backward(
        weights["kernel"], weights.get("bias"), scale, offset, groups=layer.groups
    )
    return {**weights, "kernel": kernel, "bias": bias}


def _fold_into_depthwise_input(layer: Any, weights: Weights, scale, offset) -> Weights:
    _require_no_padding(layer)
    grouped, channels = maths.depthwise_as_grouped(weights["kernel"])
    kernel, bias = maths.fold_backward(grouped, weights.get("bias"), scale, offset, groups=channels)
    return {**weights, "kernel": maths.grouped_as_depthwise(kernel, channels), "bias": bias}


BackwardRule = Callable[[Any, Weights, np.ndarray, np.ndarray], Weights]


@dataclasses.dataclass(frozen=True)
class FoldRule:
    """How BatchNormalization folds into one layer class.

    Forward folding is the same maths for every class, told apart by data: which
    kernel holds the output channels and on which axis (``maths.fold_forward``).
    Backward folding needs a function, which also checks its own preconditions;
    ``None`` means the class takes no backward fold.
    """

    kernel: str  # the variable that holds the output channels
    output_axis: int | tuple[int, int]  # its output-channel axis
    backward: BackwardRule | None
    weights: tuple[str, ...] = ("kernel", "bias")  # every variable the layer may have


_SEPARABLE_WEIGHTS = ("depthwise_kernel", "pointwise_kernel", "bias")

# Keras 3 kernel layouts: Dense (in, out); Conv (*k, in/groups, out); DepthwiseConv
# (*k, in, depth_multiplier); SeparableConv pointwise (1.., in*dm, out); ConvTranspose
# (*k, out, in). Transposed and separable convolutions take no backward fold: a
# transposed conv sums a varying number of kernel taps per output position (the
# BN offset term is not per channel), and separable is left out of scope.
FOLD_RULES: dict[type, FoldRule] = {
    keras.layers.Dense: FoldRule("kernel", -1, _fold_into_dense_input),
    keras.layers.Conv1D: FoldRule("kernel", -1, _fold_into_conv_input),
    keras.layers.Conv2D: FoldRule("kernel", -1, _fold_into_conv_input),
    keras.layers.Conv3D: FoldRule("kernel", -1, _fold_into_conv_input),
    keras.layers.DepthwiseConv1D: FoldRule("kernel", (-2, -1), _fold_into_depthwise_input),
    keras.layers.DepthwiseConv2D: FoldRule("kernel", (-2, -1), _fold_into_depthwise_input),
    keras.layers.SeparableConv1D: FoldRule("pointwise_kernel", -1, None, _SEPARABLE_WEIGHTS),
    keras.layers.SeparableConv2D: FoldRule("pointwise_kernel", -1, None, _SEPARABLE_WEIGHTS),
    keras.layers.Conv1DTranspose: FoldRule("kernel", -2, None),
    keras.layers.Conv2DTranspose: FoldRule("kernel", -2, None),
    keras.layers.Conv3DTranspose: FoldRule("kernel", -2, None),
}


# BatchNormalization classes whose inference maths is known: exact classes, since a
# third-party subclass may change what `call` computes.
BATCH_NORM_CLASSES: tuple[type, ...] = (keras.layers.BatchNormalization, KerasBnBatchNormalization)


def variables_by_name(layer: Any) -> dict[str, np.ndarray]:
    return {variable.name: to_numpy(variable) for variable in layer.weights}


def layer_affine(
    layer: Any, variables: dict[str, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, offset)`` of a BN layer's inference affine, float64.

    ``variables``: the layer's variables by name, if already read. The formula is
    :func:`.maths.batch_norm_affine`'s (keras_bn layers compute it themselves).
    """
    if hasattr(layer, "inference_affine"):  # keras_bn.BatchNormalization
        scale, offset = layer.inference_affine()
        return np.asarray(scale, np.float64), np.asarray(offset, np.float64)
    if variables is None:
        variables = variables_by_name(layer)
    return maths.batch_norm_affine(
        variables["moving_mean"],
        variables["moving_variance"],
        layer.epsilon,
        gamma=variables.get("gamma") if layer.scale else None,
        beta=variables.get("beta") if layer.center else None,
    )

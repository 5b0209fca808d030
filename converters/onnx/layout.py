"""Layouts: which Keras axis each ONNX axis holds (no onnx import).

Keras tensors are channels-last, ONNX convolutions channels-first. Every exported
tensor carries a *layout*: a permutation ``perm`` such that ONNX axis ``i`` holds
Keras axis ``perm[i]`` (``(0, 3, 1, 2)`` is NCHW for an NHWC Keras tensor).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TypeAlias

from keras_bn.converters.errors import UserInputError
from keras_bn.converters.options import INPUT_LAYOUTS

__all__ = [
    "InputLayout",
    "Perm",
    "identity_perm",
    "channels_first_perm",
    "inverse_perm",
    "same_memory_order",
    "layout_of",
    "check_input_layout",
    "resolve_input_layouts",
    "encode_input_layout",
    "decode_input_layout",
]

Perm = tuple[int, ...]

# The exported model's input layout: one for every input of rank >= 3
# (``"channels_first"``), or one per input name (``{"image": "channels_first"}``,
# inputs not named keep ``"channels_last"``).
InputLayout: TypeAlias = "str | Mapping[str, str]"


def layout_of(input_layout: InputLayout, name: str) -> str:
    """The layout ``input_layout`` gives the input ``name``."""
    if isinstance(input_layout, str):
        return input_layout
    return input_layout.get(name, "channels_last")


def check_input_layout(input_layout: object) -> None:
    """Raise UserInputError unless ``input_layout`` is a layout or a name -> layout mapping."""
    values = input_layout.values() if isinstance(input_layout, Mapping) else [input_layout]
    for value in values:
        if value not in INPUT_LAYOUTS:
            raise UserInputError(
                "input_layout must be 'channels_last' or 'channels_first', or a dict of "
                f"them by input name; received {input_layout!r}."
            )


def resolve_input_layouts(
    input_layout: InputLayout,
    inputs: Sequence[tuple[str, tuple[int | None, ...]]],
    channels_first_inputs: Sequence[str] = (),
    model_name: str = "model",
) -> dict[str, str]:
    """Each input's layout (``inputs``: ``(name, shape)``), refusing a change that does
    not apply: a named input of rank < 3, no input of rank >= 3 for the all-inputs
    form, an input the model already reads channels_first (``channels_first_inputs``:
    a ``data_format="channels_first"`` layer reads it).

    Raises:
        UserInputError: one line naming the input, what was asked and why it cannot be.
    """
    check_input_layout(input_layout)
    ranks = {name: len(shape) for name, shape in inputs}
    shapes = dict(inputs)
    if isinstance(input_layout, str):
        asked = {name: input_layout for name, rank in ranks.items() if rank >= 3}
        if input_layout == "channels_first" and not asked:
            raise UserInputError(
                f"input_layout 'channels_first' moves the channel axis of inputs of rank >= "
                f"3, and {model_name!r} has none ({', '.join(f'{n} {shapes[n]}' for n in shapes)}); "
                "expected channels_last (the default)."
            )
    else:
        unknown = sorted(set(input_layout) - set(ranks))
        if unknown:
            raise UserInputError(
                f"input_layout names {unknown}, which are not inputs of {model_name!r}; "
                f"expected some of {list(ranks)}."
            )
        asked = dict(input_layout)
        for name, layout in asked.items():
            if layout == "channels_first" and ranks[name] < 3:
                raise UserInputError(
                    f"input_layout channels_first for input {name!r} of shape {shapes[name]}: "
                    "expected an input of rank >= 3 (batch, ..., channels); it has no "
                    "channel axis to move."
                )
    for name in channels_first_inputs:
        if asked.get(name) == "channels_first":
            raise UserInputError(
                f"input {name!r} of shape {shapes[name]} is already channels_first (the model "
                "reads it with data_format='channels_first'): input_layout channels_first "
                "would move its last spatial axis to axis 1; expected channels_last for it."
            )
    return {name: asked.get(name, "channels_last") for name in ranks}


def encode_input_layout(layouts: Mapping[str, str], ranks: Mapping[str, int]) -> str:
    """The metadata text of resolved layouts: the one layout every input of rank >= 3
    has (lower ranks have none), else JSON by input name."""
    distinct = {layout for name, layout in layouts.items() if ranks[name] >= 3}
    if len(distinct) <= 1:
        return next(iter(distinct), "channels_last")
    return json.dumps(dict(layouts), sort_keys=True)


def decode_input_layout(text: str | None) -> InputLayout | None:
    """:func:`encode_input_layout`'s text back; None when it is not one."""
    if text in INPUT_LAYOUTS:
        return text
    try:
        decoded = json.loads(text or "")
    except ValueError:
        return None
    if isinstance(decoded, dict) and all(
        isinstance(k, str) and v in INPUT_LAYOUTS for k, v in decoded.items()
    ):
        return decoded
    return None


def identity_perm(rank: int) -> Perm:
    return tuple(range(rank))


def channels_first_perm(rank: int, channel_axis: int = -1) -> Perm:
    """The layout that moves Keras axis ``channel_axis`` to ONNX axis 1."""
    channel_axis %= rank
    if rank < 3:
        return identity_perm(rank)
    return (0, channel_axis, *(a for a in range(1, rank) if a != channel_axis))


def inverse_perm(perm: Sequence[int]) -> Perm:
    inverse = [0] * len(perm)
    for onnx_axis, keras_axis in enumerate(perm):
        inverse[keras_axis] = onnx_axis
    return tuple(inverse)


def same_memory_order(perm_a: Sequence[int], perm_b: Sequence[int], shape: Sequence) -> bool:
    """True if both layouts list the axes of size other than 1 in the same order.

    Two such layouts hold the same elements in the same row-major order, so a
    Reshape/Flatten of one equals the other's.
    """

    def big(perm):
        return [axis for axis in perm if shape[axis] != 1]

    return big(perm_a) == big(perm_b)

"""Faults to inject into exported ONNX files: the classic converter bugs a validation
must catch, as edits of a loaded model.

- :data:`INJECTED_BUGS` and :func:`inject_bug`: float32 (and float16) files.
- :data:`QUANTIZED_BUGS` and :func:`inject_quantized_bug`: the same bugs on the integer
  weights and scales of a QDQ int8 file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _initializers(model) -> dict:
    return {init.name: init for init in model.graph.initializer}


def _conv_nodes(model, kernel_size=None, grouped=False):
    """Conv nodes with a constant weight (``kernel_size``: e.g. 3 for 3x3 only)."""
    inits = _initializers(model)
    nodes = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in inits:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        shape = tuple(inits[node.input[1]].dims)
        if (group > 1) != grouped:
            continue
        if kernel_size is not None and shape[2:] != (kernel_size,) * (len(shape) - 2):
            continue
        nodes.append(node)
    return nodes


def _edit_initializer(model, name, change):
    import onnx.numpy_helper

    init = _initializers(model)[name]
    array = onnx.numpy_helper.to_array(init).copy()
    init.CopyFrom(onnx.numpy_helper.from_array(change(array).astype(array.dtype), name))


def _pads_off_by_one(model):
    for node in _conv_nodes(model, 3) + _conv_nodes(model, 3, grouped=True):
        for attribute in node.attribute:
            if attribute.name == "pads" and any(attribute.ints):
                half = len(attribute.ints) // 2
                pads = list(attribute.ints)
                if pads[half] >= 1:  # shift the window by one: same output size
                    pads[0], pads[half] = pads[0] + 1, pads[half] - 1
                else:
                    pads[0], pads[half] = pads[0] - 1, pads[half] + 1
                del attribute.ints[:]
                attribute.ints.extend(pads)
                return
    raise ValueError("no padded 3x3 convolution")


def _middle(nodes):
    return nodes[len(nodes) // 2]


def _dense_weight(model):
    inits = _initializers(model)
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in inits:
            return node.input[1]
    raise ValueError("no Dense layer")


def _transposed(array):
    """The kernel read in the other order (a transposed copy in the same shape)."""
    return array.T.reshape(array.shape)


# name -> how to break an exported model in place (the classic converter bugs).
INJECTED_BUGS = {
    "flipped 3x3 kernel": lambda m: _edit_initializer(
        m, _middle(_conv_nodes(m, 3)).input[1], lambda w: w[..., ::-1, ::-1]
    ),
    "two output channels swapped": lambda m: _edit_initializer(
        m, _conv_nodes(m)[0].input[1], lambda w: w[[1, 0, *range(2, len(w))]]
    ),
    "epsilon dropped (x1.02)": lambda m: [
        _edit_initializer(m, name, lambda w: w * 1.02)
        for name in _middle(_conv_nodes(m)).input[1:3]
    ],
    "bias shifted by 1% of its range": lambda m: _edit_initializer(
        m, _middle(_conv_nodes(m)).input[2], lambda b: b + 0.01 * (b.max() - b.min())
    ),
    "transposed Dense kernel": lambda m: _edit_initializer(m, _dense_weight(m), _transposed),
    "padding off by one": _pads_off_by_one,
}


def inject_bug(source: Path, target: Path, bug: str) -> Path:
    """Write a copy of the ONNX file ``source`` with ``INJECTED_BUGS[bug]`` applied."""
    return _apply_bug(INJECTED_BUGS[bug], source, target)


def _apply_bug(edit, source: Path, target: Path) -> Path:
    import onnx

    model = onnx.load(str(source))
    edit(model)
    onnx.save(model, str(target))
    return target


# --------------------------------------------------------------------------------------
# Bugs in quantized (QDQ int8) files: the same classic bugs, on the integer weights.


def _dequantized_weight(model, conv):
    """``(weight initializer, scale initializer)`` behind a QDQ convolution's kernel."""
    producers = {out: node for node in model.graph.node for out in node.output}
    dequantize = producers[conv.input[1]]
    if dequantize.op_type != "DequantizeLinear":
        raise ValueError(f"{conv.name}: kernel is not dequantized")
    return dequantize.input[0], dequantize.input[1]


def _qdq_convs(model, kernel_size=None):
    """QDQ Conv nodes (kernel behind a DequantizeLinear of an int8 initializer)."""
    inits = _initializers(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    nodes = []
    for node in model.graph.node:
        producer = producers.get(node.input[1]) if node.op_type == "Conv" else None
        if producer is None or producer.op_type != "DequantizeLinear":
            continue
        if producer.input[0] not in inits:
            continue
        shape = tuple(inits[producer.input[0]].dims)
        if kernel_size is not None and shape[2:] != (kernel_size,) * (len(shape) - 2):
            continue
        nodes.append(node)
    return nodes


def _swap_quantized_channels(model):
    weight, scale = _dequantized_weight(model, _qdq_convs(model)[0])
    _edit_initializer(model, weight, lambda w: w[[1, 0, *range(2, len(w))]])
    _edit_initializer(
        model, scale, lambda s: s[[1, 0, *range(2, len(s))]] if np.ndim(s) and len(s) > 1 else s
    )


def _shift_quantized_bias(model):
    conv = _middle(_qdq_convs(model))
    inits = _initializers(model)
    if conv.input[2] in inits:  # a float bias
        _edit_initializer(model, conv.input[2], lambda b: b + 0.01 * (b.max() - b.min()))
        return
    producers = {out: node for node in model.graph.node for out in node.output}
    dequantize = producers[conv.input[2]]
    import onnx.numpy_helper

    scale = onnx.numpy_helper.to_array(inits[dequantize.input[1]]).astype(np.float64)

    def shift(q):
        b = q * scale
        return np.round((b + 0.01 * (b.max() - b.min())) / scale)

    _edit_initializer(model, dequantize.input[0], shift)


# name -> how to break a quantized (QDQ) file in place.
QUANTIZED_BUGS = {
    "flipped 3x3 kernel": lambda m: _edit_initializer(
        m, _dequantized_weight(m, _middle(_qdq_convs(m, 3)))[0], lambda w: w[..., ::-1, ::-1]
    ),
    "two output channels swapped": _swap_quantized_channels,
    "weight scale x2 on one layer": lambda m: _edit_initializer(
        m, _dequantized_weight(m, _middle(_qdq_convs(m)))[1], lambda s: s * 2
    ),
    "weight scale x1.02 on one layer": lambda m: _edit_initializer(
        m, _dequantized_weight(m, _middle(_qdq_convs(m)))[1], lambda s: s * 1.02
    ),
    "bias shifted by 1% of its range": _shift_quantized_bias,
}


def inject_quantized_bug(source: Path, target: Path, bug: str) -> Path:
    """Write a copy of the QDQ ONNX file ``source`` with ``QUANTIZED_BUGS[bug]`` applied."""
    return _apply_bug(QUANTIZED_BUGS[bug], source, target)

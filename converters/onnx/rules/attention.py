"""Rules: EinsumDense and MultiHeadAttention.

An EinsumDense whose equation is a plain projection (``abc,cd->abd``,
``abc,cde->abde``, ``abcd,cde->abe``: the input's trailing axes contracted with the
kernel's leading ones) is a MatMul on the flattened contracted axes, reshaped to
the output; any other equation is one ONNX ``Einsum``. MultiHeadAttention is its
four projections (EinsumDense, above) around ``softmax(q k^T / sqrt(key_dim))
v`` per head, as Keras computes it: the query is scaled before the product, a
mask puts -1e9 at masked positions before the softmax (Keras's Softmax), and
dropout is off at inference.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
from keras import layers as L

from keras_bn.converters.graph import Node, Tensor, to_numpy
from keras_bn.converters.onnx.builder import Builder, Unsupported
from keras_bn.converters.onnx.rules.activations import apply_activation
from keras_bn.converters.onnx.rules.common import check_not_quantized, constant_input

__all__ = ["einsum_dense", "multi_head_attention", "projection_plan"]


def _expand_ellipsis(equation: str, input_rank: int) -> tuple[str, str, str]:
    """``equation``'s input, kernel and output subscripts with ``...`` spelled out."""
    inputs, output = equation.replace(" ", "").split("->")
    source, kernel = inputs.split(",")
    if "..." in source:
        used = set(equation)
        spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used]
        fill = "".join(spare[: input_rank - (len(source) - 3)])
        source, output = source.replace("...", fill), output.replace("...", fill)
    if "..." in kernel or "..." in output:
        raise Unsupported(f"equation {equation!r}: an ellipsis outside the input")
    return source, kernel, output


def projection_plan(equation: str, input_rank: int) -> tuple[int, int] | None:
    """``(contracted, new)`` axis counts when ``equation`` is a plain projection, else None.

    Plain: input = kept axes + contracted axes, kernel = contracted + new axes (the
    contracted ones in the input's order), output = kept + new.
    """
    source, kernel, output = _expand_ellipsis(equation, input_rank)
    contracted = [c for c in source if c in kernel and c not in output]
    kept = [c for c in source if c not in kernel]
    new = [c for c in kernel if c not in source]
    if (
        len(source) != input_rank
        or not contracted
        or source != "".join(kept + contracted)
        or kernel != "".join(contracted + new)
        or output != "".join(kept + new)
    ):
        return None
    return len(contracted), len(new)


def einsum_dense_nodes(b: Builder, layer: Any, x: str, input_rank: int, key: tuple) -> str:
    """ONNX nodes computing EinsumDense ``layer`` on ``x`` (Keras order); output in Keras order."""
    check_not_quantized(layer)
    kernel = to_numpy(layer.kernel)
    plan = projection_plan(layer.equation, input_rank)
    if plan is None:
        source, kernel_subscripts, output = _expand_ellipsis(layer.equation, input_rank)
        kernel_name = b.const(kernel, "kernel", key=(*key, "kernel"))
        out = b.op("Einsum", [x, kernel_name], equation=f"{source},{kernel_subscripts}->{output}")
    else:
        contracted, new = plan
        inner = int(np.prod(kernel.shape[:contracted]))
        new_shape = [int(size) for size in kernel.shape[contracted:]]
        matrix = kernel.reshape(inner, int(np.prod(new_shape)))
        kept = input_rank - contracted
        if contracted > 1:
            x = b.op("Reshape", [x, b.ints([0] * kept + [inner], "flat_shape")])
        out = b.op("MatMul", [x, b.const(matrix, "kernel", key=(*key, "matrix"))])
        bias = None
        if layer.bias is not None:
            bias = to_numpy(layer.bias)
            if new > 1 and bias.shape == tuple(new_shape):  # add it before the reshape
                out = b.op("Add", [out, b.const(bias.reshape(-1), "bias", key=(*key, "flat"))])
                bias = None
        if new > 1:
            out = b.op("Reshape", [out, b.ints([0] * kept + new_shape, "output_shape")])
        if bias is not None:
            out = b.op("Add", [out, b.const(bias, "bias", key=(*key, "bias"))])
        return apply_activation(b, layer.activation, out, tuple(range(kept + new)))
    if layer.bias is not None:
        out = b.op("Add", [out, b.const(to_numpy(layer.bias), "bias", key=(*key, "bias"))])
    output_rank = len(_expand_ellipsis(layer.equation, input_rank)[2])
    return apply_activation(b, layer.activation, out, tuple(range(output_rank)))


def einsum_dense(b: Builder, node: Node) -> None:
    tensor = node.inputs[0]
    out = einsum_dense_nodes(b, node.layer, b.get(tensor), tensor.rank, (id(node.layer),))
    b.set(node.outputs[0], out)


# --------------------------------------------------------------------------------------
# Keras masks that travel with a tensor (not through the graph).


def _mask_source(tensor: Tensor) -> str | None:
    """The layer whose Keras mask ``tensor`` carries, None when it carries none.

    Keras attaches masks to tensors: Embedding(mask_zero=True) and Masking create
    one, layers that support masking pass it on (the default ``compute_mask``),
    and a layer that reads it (MultiHeadAttention's query/value masks) never sees
    it as a graph input. Whether there is one is what Keras's symbolic tensor says
    (``Tensor.carries_mask``); the walk up the producers only names where it came
    from (a layer with mask logic of its own where the walk cannot see further).
    """
    if not tensor.carries_mask:
        return None
    return _mask_origin(tensor) or "a layer's compute_mask"


def _mask_origin(tensor: Tensor, depth: int = 0) -> str | None:
    """The name of the layer where ``tensor``'s Keras mask starts, as far as known."""
    node = tensor.producer
    if node is None or depth > 200:
        return None
    layer = node.layer
    if isinstance(layer, L.Embedding):
        return layer.name if layer.mask_zero else None
    if isinstance(layer, L.Masking):
        return layer.name
    if not isinstance(layer, L.Layer) or not layer.supports_masking:
        return None
    if isinstance(layer, L.RNN | L.Bidirectional):
        index = node.outputs.index(tensor)
        if index > 0 or not layer.return_sequences:
            return None
    elif type(layer).compute_mask is not L.Layer.compute_mask and not isinstance(
        layer, L.MultiHeadAttention
    ):
        return f"{layer.name} (its own compute_mask)"
    if not node.inputs:
        return None
    return _mask_origin(node.inputs[0], depth + 1)


# --------------------------------------------------------------------------------------
# MultiHeadAttention.

_LARGE_NEGATIVE = -1e9  # Keras's Softmax fills masked positions with it (float32)


def _mha_arguments(node: Node) -> dict[str, Any]:
    signature = inspect.signature(node.layer.call)
    try:
        return dict(signature.bind(*node.args, **node.kwargs).arguments)
    except TypeError as error:
        raise Unsupported(f"call arguments not understood ({error})") from error


def _rank(tensor: Any) -> int:
    """A graph tensor's rank, or a constant argument's (None: no tensor at all)."""
    if isinstance(tensor, Tensor):
        return tensor.rank
    return -1 if tensor is None else np.ndim(to_numpy(tensor))


def _causal_mask(b: Builder, query: Tensor, value: Tensor, scores: str) -> str:
    """Keras's causal mask: position i attends to j <= i, as a (T, S) boolean."""
    t, s = query.shape[1], value.shape[1]
    if t is not None and s is not None:
        return b.const(np.tril(np.ones((t, s), dtype=bool)), "causal_mask")
    shape = b.op("Shape", [scores], start=2)  # (T, S)
    ones = b.op("ConstantOfShape", [shape], value=_float_tensor(1.0))
    return b.op("Cast", [b.op("Trilu", [ones], upper=0)], to=9)


def _float_tensor(number: float) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray([number], dtype=np.float32))


def multi_head_attention(b: Builder, node: Node) -> None:
    layer = node.layer
    config = layer.get_config()
    if config.get("use_gate"):
        raise Unsupported("use_gate=True is not exported")
    if config.get("sliding_window") is not None:
        raise Unsupported("sliding_window is not exported")
    arguments = _mha_arguments(node)
    query, value = arguments["query"], arguments["value"]
    key = arguments.get("key")
    key = value if key is None else key
    # A query computed from weights is a constant: SigLIP's pooling head attends from
    # ``ops.repeat(probe, batch_size, axis=0)`` (rows tiled to the batch at runtime).
    if not all(_rank(t) == 3 for t in (query, value, key)) or not isinstance(value, Tensor):
        raise Unsupported("only (batch, time, features) query, key and value are exported")
    axes = layer.attention_axes
    if axes is not None and tuple(int(a) % 3 for a in axes) != (1,):
        raise Unsupported(f"attention_axes={axes!r}")
    for name in ("query_mask", "value_mask", "key_mask"):
        if arguments.get(name) is not None:
            raise Unsupported(f"{name} is not exported; pass attention_mask instead")
    for name, tensor in (("query", query), ("value", value), ("key", key)):
        source = _mask_source(tensor) if isinstance(tensor, Tensor) else None
        if source is not None:
            raise Unsupported(
                f"the {name} carries a Keras mask (from {source}) that ONNX would ignore; "
                "pass attention_mask instead"
            )
    key_dim = int(layer.key_dim)

    def project(dense: Any, tensor: Any, order: list[int]) -> str:
        source = b.get(tensor) if isinstance(tensor, Tensor) else constant_input(b, tensor, value)
        projected = einsum_dense_nodes(b, dense, source, 3, (id(dense),))
        return b.op("Transpose", [projected], perm=order)  # heads before time

    q = project(layer.query_dense, query, [0, 2, 1, 3])  # (B, N, T, K)
    k = project(layer.key_dense, key, [0, 2, 3, 1])  # (B, N, K, S)
    v = project(layer.value_dense, value, [0, 2, 1, 3])  # (B, N, S, V)
    q = b.op("Mul", [q, b.scalar(1.0 / math.sqrt(float(key_dim)), "inverse_sqrt_key_dim")])
    scores = b.op("MatMul", [q, k])  # (B, N, T, S)
    mask = None
    attention_mask = arguments.get("attention_mask")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise Unsupported("a constant attention_mask is not exported")
        mask = b.get(attention_mask, cast=False)
        if np.dtype(attention_mask.dtype) != np.bool_:
            mask = b.op("Cast", [mask], to=9)
        if attention_mask.rank == 3:
            mask = b.op("Unsqueeze", [mask, b.ints([1], "heads_axis")])  # (B, 1, T, S)
    if arguments.get("use_causal_mask"):
        causal = _causal_mask(b, query, value, scores)
        mask = causal if mask is None else b.op("And", [mask, causal])
    if mask is not None:
        scores = b.op("Where", [mask, scores, b.scalar(_LARGE_NEGATIVE, "large_negative")])
    probabilities = b.op("Softmax", [scores], axis=-1)
    attended = b.op("MatMul", [probabilities, v])  # (B, N, T, V)
    attended = b.op("Transpose", [attended], perm=[0, 2, 1, 3])  # (B, T, N, V)
    out = einsum_dense_nodes(b, layer.output_dense, attended, 4, (id(layer.output_dense),))
    b.set(node.outputs[0], out)
    if len(node.outputs) > 1:
        b.set(node.outputs[1], probabilities)

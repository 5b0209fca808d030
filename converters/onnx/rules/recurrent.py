"""Rules: recurrent layers (SimpleRNN, GRU, LSTM, RNN of their cells, Bidirectional).

Each maps to one ONNX ``RNN``/``GRU``/``LSTM`` node (ONNX operator spec):

* weights: Keras's ``kernel`` (input, gates * units) becomes ``W`` (gates * units,
  input) with the gates reordered (LSTM: Keras i, f, c, o; ONNX i, o, f, c; GRU:
  z, r, h in both), ``recurrent_kernel`` becomes ``R``, the bias ``B = [Wb, Rb]``
  (GRU with ``reset_after=True`` keeps two bias rows: input and recurrent, the
  ONNX ``linear_before_reset=1`` form; without it ``Rb`` is 0);
* activations: LSTM ``[recurrent_activation, activation, activation]``, GRU
  ``[recurrent_activation, activation]``, SimpleRNN ``[activation]``;
* ``go_backwards`` is ``direction="reverse"`` (its output sequence is then flipped,
  since Keras returns it in processing order), Bidirectional one
  ``direction="bidirectional"`` node when both halves agree;
* sequences are time-major (onnxruntime supports no ``layout=1``): the input is
  transposed once and a stacked RNN reads the previous one's output as it is;
* a mask (the ``mask`` a Masking layer or ``Embedding(mask_zero=True)`` passes on,
  or one given explicitly) is exact for any pattern, left padding and gaps
  included. Keras skips a masked step: the state carries over unchanged, and the
  step's output is zero (``zero_output_for_mask``, forced by Bidirectional when it
  returns sequences) or the last kept step's output (zero before any). ONNX
  recurrences only skip the steps after ``sequence_lens``, so each sequence's kept
  steps are first moved to its front, in order (a stable sort of the time axis by
  the mask: TopK of ``t + T * masked``), the recurrence runs with ``sequence_lens
  = sum(mask)``, and each output step is gathered back from the run at the
  position of the last kept step up to it (``cumsum(mask)``). Processing only the
  kept steps in order is what Keras's skipping amounts to, so final states and
  outputs are those of Keras; for right-padded masks the sort is the identity.
  ``go_backwards`` with a mask flips the sequence and the mask first, as Keras does.
* ``stateful`` layers keep state between calls, which ONNX cannot.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import numpy as np
from keras import activations
from keras import layers as L

from keras_bn.converters.graph import Node, Tensor, to_numpy
from keras_bn.converters.onnx.builder import Builder, Unsupported
from keras_bn.converters.onnx.rules.common import any_along, check_not_quantized

__all__ = ["bidirectional", "masking", "recurrent"]

TIME_MAJOR = (1, 0, 2)  # layout of a (batch, time, features) tensor stored (time, batch, ...)

# ONNX op, and the Keras gate blocks in ONNX order.
_CELLS: dict[type, tuple[str, tuple[int, ...]]] = {
    L.SimpleRNNCell: ("RNN", (0,)),
    L.GRUCell: ("GRU", (0, 1, 2)),
    L.LSTMCell: ("LSTM", (0, 3, 1, 2)),  # Keras i, f, c, o -> ONNX i, o, f, c
}

# Keras activation -> ONNX recurrent activation (name, alpha, beta); alpha/beta None
# where the ONNX default is Keras's function.
_ACTIVATIONS: dict[Any, tuple[str, float | None, float | None]] = {
    activations.tanh: ("Tanh", None, None),
    activations.sigmoid: ("Sigmoid", None, None),
    activations.relu: ("Relu", None, None),
    activations.linear: ("Affine", 1.0, 0.0),
    activations.hard_sigmoid: ("HardSigmoid", 1.0 / 6.0, 0.5),  # relu6(x + 3) / 6
    activations.elu: ("Elu", 1.0, None),
    activations.softsign: ("Softsign", None, None),
}
# Not mapped: softplus (onnxruntime's recurrent Softplus is log(1 + exp(x)), which
# overflows to inf for x > 88 where Keras's stays finite).
_TAKES_ALPHA = {"Affine", "HardSigmoid", "Elu", "LeakyRelu", "ThresholdedRelu", "ScaledTanh"}
_TAKES_BETA = {"Affine", "HardSigmoid", "ScaledTanh"}


@dataclasses.dataclass
class _Direction:
    """One direction of an ONNX recurrence: weights in ONNX order and attributes."""

    op_type: str
    units: int
    w: np.ndarray  # (gates * units, input)
    r: np.ndarray  # (gates * units, units)
    b: np.ndarray | None  # (2 * gates * units,)
    activations: list[str]
    alphas: list[float]
    betas: list[float]
    linear_before_reset: int | None  # GRU only
    key: tuple  # shares the initializers of a layer called twice

    def attributes(self) -> tuple:
        return (self.op_type, self.units, tuple(self.activations), self.linear_before_reset)


def _cell_of(layer: Any) -> Any:
    if getattr(layer, "stateful", False):
        raise Unsupported("stateful=True: the state carried between calls has no ONNX form")
    cell = layer.cell
    if type(cell) not in _CELLS:
        raise Unsupported(f"the cell {type(cell).__name__} has no ONNX recurrence")
    check_not_quantized(cell)
    return cell


def _onnx_activation(function: Any, argument: str) -> tuple[str, float | None, float | None]:
    found = _ACTIVATIONS.get(function)
    if found is None:
        label = getattr(function, "__name__", repr(function))
        raise Unsupported(f"{argument}={label!r} has no ONNX recurrent activation")
    return found


def _direction(layer: Any) -> _Direction:
    """ONNX weights and attributes of a SimpleRNN/GRU/LSTM (or RNN of their cell)."""
    cell = _cell_of(layer)
    op_type, order = _CELLS[type(cell)]
    units = int(cell.units)
    gates = len(order)

    def reorder(matrix: np.ndarray) -> np.ndarray:  # (..., gates * units) -> ONNX rows
        blocks = np.split(matrix, gates, axis=-1)
        return np.concatenate([blocks[i] for i in order], axis=-1)

    w = reorder(to_numpy(cell.kernel)).T
    r = reorder(to_numpy(cell.recurrent_kernel)).T
    b = None
    linear_before_reset = None
    if op_type == "GRU":
        linear_before_reset = int(bool(cell.reset_after))
    if cell.use_bias:
        bias = to_numpy(cell.bias)
        if bias.ndim == 2:  # GRU reset_after: input and recurrent bias rows
            b = np.concatenate([reorder(bias[0]), reorder(bias[1])])
        else:
            b = np.concatenate([reorder(bias), np.zeros_like(bias)])
    functions = [(cell.activation, "activation")]
    if op_type != "RNN":
        functions.insert(0, (cell.recurrent_activation, "recurrent_activation"))
    if op_type == "LSTM":
        functions.append((cell.activation, "activation"))
    names, alphas, betas = [], [], []
    for function, argument in functions:
        name, alpha, beta = _onnx_activation(function, argument)
        names.append(name)
        # onnxruntime reads activation_alpha/beta in order, one per activation that
        # takes the parameter; every such activation gets its value explicitly.
        if name in _TAKES_ALPHA:
            alphas.append(1.0 if alpha is None else alpha)
        if name in _TAKES_BETA:
            betas.append(0.0 if beta is None else beta)
    return _Direction(
        op_type, units, w, r, b, names, alphas, betas, linear_before_reset, (id(cell),)
    )


def _arguments(node: Node) -> dict[str, Any]:
    """The call's arguments by name (``sequences``, ``initial_state``, ``mask``...)."""
    signature = inspect.signature(node.layer.call)
    try:
        bound = signature.bind(*node.args, **node.kwargs)
    except TypeError as error:
        raise Unsupported(f"call arguments not understood ({error})") from error
    return dict(bound.arguments)


# --------------------------------------------------------------------------------------
# Emitting the recurrence.


@dataclasses.dataclass
class _Compacted:
    """A masked batch of sequences with each sequence's kept steps moved to its front."""

    x: str  # (time, batch, features): the recurrence's input
    lengths: str  # (batch,) int32: kept steps per sequence (``sequence_lens``)
    positions: str  # (batch, time) int64: kept steps up to and including each step
    mask: str  # (batch, time) bool, in the order the recurrence reads the steps


def _flip_batch_major_time(b: Builder, name: str) -> str:
    """Reverse axis 1 (time) of a batch-major tensor."""
    big = np.iinfo(np.int64).max
    return b.op(
        "Slice",
        [name, b.ints([-1], "minus_one"), b.ints([-big], "before_start"), b.ints([1], "axis1")]
        + [b.ints([-1], "minus_one")],
    )


def _int(b: Builder, number: int) -> str:
    """A scalar int64 (Range takes scalars; initializers here are at least 1-D)."""
    return b.op("Squeeze", [b.ints([number], "int"), b.ints([0], "axis0")])


def _compact(b: Builder, sequences: Tensor, mask: Tensor, flip: bool) -> _Compacted:
    """The sequences' kept steps first, in order (see the module docstring)."""
    x = b.get(sequences)  # (batch, time, features)
    kept = b.get(mask, cast=False)
    if np.dtype(mask.dtype) != np.bool_:
        kept = b.op("Cast", [kept], to=9)  # BOOL
    if flip:  # go_backwards: Keras reverses the sequence and its mask
        x, kept = _flip_batch_major_time(b, x), _flip_batch_major_time(b, kept)
    ones = b.op("Cast", [kept], to=7)  # INT64
    time = b.op("Slice", [b.op("Shape", [kept]), b.ints([1], "one"), b.ints([2], "two")])
    steps = b.op(
        "Range",
        [_int(b, 0), b.op("Squeeze", [time, b.ints([0], "axis0")]), _int(b, 1)],
    )
    masked = b.op("Sub", [b.ints([1], "one"), ones])
    keys = b.op("Cast", [b.op("Add", [steps, b.op("Mul", [masked, time])])], to=1)  # FLOAT
    _, order = b.op("TopK", [keys, time], axis=1, largest=0, sorted=1, outputs=2)
    gathered = b.op("GatherND", [x, b.op("Unsqueeze", [order, b.ints([2], "axis2")])], batch_dims=1)
    lengths = b.op("Cast", [b.op("ReduceSum", [ones, b.ints([1], "axis1")], keepdims=0)], to=6)
    positions = b.op("CumSum", [ones, b.ints([1], "axis1")])
    x_time_major = b.op("Transpose", [gathered], perm=[1, 0, 2])
    return _Compacted(x_time_major, lengths, positions, kept)


def _expand(b: Builder, compacted: _Compacted, y: str, rank: int, zero_for_mask: bool) -> str:
    """Put the outputs of a compacted run back at their steps.

    ``y`` is the run's output sequence, batch-major, of rank ``rank`` (batch, time,
    [directions,] units). A masked step gets zeros (``zero_for_mask``), else the
    output of the last kept step before it (zeros before any kept step).
    """

    def gather(data: str, index: str) -> str:
        where = b.op("Unsqueeze", [index, b.ints([2], "axis2")])
        return b.op("GatherND", [data, where], batch_dims=1)

    if zero_for_mask:
        step = b.op("Max", [b.op("Sub", [compacted.positions, b.ints([1], "one")]), b.ints([0])])
        condition = b.op("Unsqueeze", [compacted.mask, b.ints(list(range(2, rank)), "axes")])
        return b.op("Where", [condition, gather(y, step), b.scalar(0.0, "zero")])
    # Step 0 of the padded run is the zero output before the first kept step.
    pads = [0, 1] + [0] * (rank - 2) + [0] * rank
    padded = b.op("Pad", [y, b.ints(pads, "pads")])
    return gather(padded, compacted.positions)


def _initial_states(b: Builder, states: list[Tensor], per_direction: int) -> list[str]:
    """ONNX initial_h (and initial_c) from Keras initial states, directions stacked."""
    if not states:
        return []
    directions = len(states) // per_direction
    result = []
    for index in range(per_direction):
        parts = [
            b.op("Unsqueeze", [b.get(states[d * per_direction + index]), b.ints([0], "axis0")])
            for d in range(directions)
        ]
        result.append(parts[0] if len(parts) == 1 else b.op("Concat", parts, axis=0))
    return result


def _recurrence(
    b: Builder,
    directions: list[_Direction],
    direction: str,
    x: str,
    sequence_lens: str | None,
    initial: list[str],
) -> list[str]:
    """One ONNX recurrence node over time-major ``x``; returns [Y, Y_h(, Y_c)]."""
    first = directions[0]

    def stacked(attribute: str) -> str:
        arrays = [getattr(d, attribute) for d in directions]
        key = (*[d.key for d in directions], attribute, b.dtype.str)
        return b.const(np.stack(arrays), attribute.upper(), key=key)

    inputs = [x, stacked("w"), stacked("r")]
    inputs.append(stacked("b") if first.b is not None else "")
    inputs.append(sequence_lens or "")
    inputs += initial
    while inputs and inputs[-1] == "":
        inputs.pop()
    outputs = 3 if first.op_type == "LSTM" else 2
    return b.op(
        first.op_type,
        inputs,
        outputs=outputs,
        hidden_size=first.units,
        direction=direction,
        activations=[name for d in directions for name in d.activations],
        activation_alpha=[v for d in directions for v in d.alphas] or None,
        activation_beta=[v for d in directions for v in d.betas] or None,
        linear_before_reset=first.linear_before_reset,
    )


def _flip_time(b: Builder, name: str) -> str:
    """Reverse axis 0 (time) of a time-major tensor."""
    big = np.iinfo(np.int64).max
    return b.op(
        "Slice",
        [
            name,
            b.ints([-1], "minus_one"),
            b.ints([-big], "before_start"),
            b.ints([0], "axis0"),
            b.ints([-1], "minus_one"),
        ],
    )


def _state(b: Builder, state: str, index: int) -> str:
    """Direction ``index`` of a (directions, batch, units) state."""
    return b.op("Squeeze", [_pick(b, state, index, axis=0), b.ints([0], "axis0")])


def _pick(b: Builder, name: str, index: int, axis: int) -> str:
    return b.op("Slice", [name, b.ints([index]), b.ints([index + 1]), b.ints([axis])])


def _check_mask_and_sequences(layer: Any, mask: Any) -> None:
    if isinstance(mask, list | tuple):
        raise Unsupported("a mask per input is not exported")
    if mask is not None and not isinstance(mask, Tensor):
        raise Unsupported("a constant mask is not exported")


def recurrent(b: Builder, node: Node) -> None:
    """SimpleRNN, GRU, LSTM, and RNN of a SimpleRNNCell/GRUCell/LSTMCell."""
    layer = node.layer
    spec = _direction(layer)
    arguments = _arguments(node)
    sequences = arguments.get("sequences", arguments.get("inputs"))
    mask = arguments.get("mask")
    _check_mask_and_sequences(layer, mask)
    if not isinstance(sequences, Tensor) or sequences.rank != 3:
        raise Unsupported("only a (batch, time, features) sequence input is exported")
    states = arguments.get("initial_state")
    states = (
        [] if states is None else list(states if isinstance(states, list | tuple) else [states])
    )
    if any(not isinstance(s, Tensor) for s in states):
        raise Unsupported("a constant initial_state is not exported")
    per_direction = 2 if spec.op_type == "LSTM" else 1
    direction = "reverse" if layer.go_backwards else "forward"
    compacted = None
    if mask is None:
        x, lens = b.get(sequences, TIME_MAJOR), None
    else:  # go_backwards: flipped first, then read forward, as Keras does
        compacted = _compact(b, sequences, mask, flip=layer.go_backwards)
        x, lens, direction = compacted.x, compacted.lengths, "forward"
    results = _recurrence(b, [spec], direction, x, lens, _initial_states(b, states, per_direction))
    y, y_h = results[0], results[1]
    outputs = list(node.outputs)
    if layer.return_sequences:
        sequence = b.op("Squeeze", [y, b.ints([1], "axis1")])  # (time, batch, units)
        if compacted is not None:
            batch_major = b.op("Transpose", [sequence], perm=[1, 0, 2])
            zero = bool(layer.zero_output_for_mask)
            b.set(outputs[0], _expand(b, compacted, batch_major, 3, zero))
        else:
            if layer.go_backwards:
                sequence = _flip_time(b, sequence)  # Keras: in processing order
            b.set(outputs[0], sequence, TIME_MAJOR)
    else:
        b.set(outputs[0], _state(b, y_h, 0))
    if layer.return_state:
        b.set(outputs[1], _state(b, y_h, 0))
        if spec.op_type == "LSTM":
            b.set(outputs[2], _state(b, results[2], 0))


_MERGES = ("concat", "sum", "mul", "ave", None)


def bidirectional(b: Builder, node: Node) -> None:
    """Bidirectional: one ``direction="bidirectional"`` node when both halves match
    (same cell class, units and activations), else a forward and a reverse node."""
    layer = node.layer
    forward_layer, backward_layer = layer.forward_layer, layer.backward_layer
    if forward_layer.go_backwards or not backward_layer.go_backwards:
        raise Unsupported("only a forward layer with a go_backwards backward layer is exported")
    if layer.merge_mode not in _MERGES:
        raise Unsupported(f"merge_mode={layer.merge_mode!r}")
    forward, backward = _direction(forward_layer), _direction(backward_layer)
    arguments = _arguments(node)
    sequences = arguments.get("sequences")
    mask = arguments.get("mask")
    _check_mask_and_sequences(layer, mask)
    if not isinstance(sequences, Tensor) or sequences.rank != 3:
        raise Unsupported("only a (batch, time, features) sequence input is exported")
    states = arguments.get("initial_state")
    states = [] if states is None else list(states)
    if any(not isinstance(s, Tensor) for s in states):
        raise Unsupported("a constant initial_state is not exported")
    compacted = None
    if mask is None:
        x, lens = b.get(sequences, TIME_MAJOR), None
    else:  # both directions read the kept steps, forward and in reverse
        if layer.return_sequences and not (
            forward_layer.zero_output_for_mask and backward_layer.zero_output_for_mask
        ):
            raise Unsupported("masked halves that repeat outputs (zero_output_for_mask=False)")
        compacted = _compact(b, sequences, mask, flip=False)
        x, lens = compacted.x, compacted.lengths
    counts = [2 if spec.op_type == "LSTM" else 1 for spec in (forward, backward)]
    if counts[0] != counts[1] and (states or layer.return_state):
        # Keras itself splits the states in equal halves (and declares as many outputs).
        raise Unsupported("states of halves with different state counts (LSTM with GRU/RNN)")
    results, finals = _both_directions(b, (forward, backward), x, lens, states, counts)
    y, y_h = results[0], results[1]
    if compacted is not None and layer.return_sequences:  # (time, 2, batch, units)
        batch_major = b.op("Transpose", [y], perm=[2, 0, 1, 3])
        expanded = _expand(b, compacted, batch_major, 4, zero_for_mask=True)
        y = b.op("Transpose", [expanded], perm=[1, 2, 0, 3])
    outputs = list(node.outputs)
    count = _merge_directions(b, layer, outputs, y, y_h)
    if layer.return_state:
        state_outputs = iter(outputs[count:])
        for direction_finals in finals:
            for onnx_outputs, k, index in direction_finals:
                b.set(next(state_outputs), _state(b, onnx_outputs[k], index))


# Each direction's final states (its h, and c for an LSTM): (the recurrence's ONNX
# outputs, output index, index along the direction axis).
_Finals = list[list[tuple[list[str], int, int]]]


def _both_directions(
    b: Builder,
    specs: tuple[_Direction, _Direction],
    x: str,
    lens: str | None,
    states: list[Tensor],
    counts: list[int],
) -> tuple[list[str], _Finals]:
    """Both halves of a Bidirectional: one bidirectional node when their attributes
    match, else a forward and a reverse node concatenated along the direction axis.
    Returns [Y, Y_h] with the direction axis, and each direction's final states."""
    forward, backward = specs
    if forward.attributes() == backward.attributes():
        initial = _initial_states(b, states, counts[0])
        results = _recurrence(b, [forward, backward], "bidirectional", x, lens, initial)
        return results, [[(results, k, d) for k in range(1, 1 + counts[d])] for d in (0, 1)]
    own_states = [states[: counts[0]], states[counts[0] :]] if states else [[], []]
    halves = [
        _recurrence(b, [spec], direction, x, lens, _initial_states(b, own, count))
        for spec, direction, own, count in zip(
            specs, ("forward", "reverse"), own_states, counts, strict=True
        )
    ]
    results = [
        b.op("Concat", [halves[0][k], halves[1][k]], axis=1 if k == 0 else 0) for k in (0, 1)
    ]
    return results, [[(halves[d], k, 0) for k in range(1, 1 + counts[d])] for d in (0, 1)]


def _merge_directions(b: Builder, layer: Any, outputs: list[Tensor], y: str, y_h: str) -> int:
    """Publish the Bidirectional's merged output(s) (``merge_mode``) from the
    sequences ``y`` (time, 2, batch, units) or final states ``y_h`` (2, batch,
    units); returns how many outputs that took (the states follow)."""
    sequences_out = layer.return_sequences
    both, axis = (y, 1) if sequences_out else (y_h, 0)  # the direction axis
    perm = TIME_MAJOR if sequences_out else (0, 1)
    if layer.merge_mode == "concat":
        order = [0, 2, 1, 3] if sequences_out else [1, 0, 2]
        swapped = b.op("Transpose", [both], perm=order)
        merged = b.op(
            "Reshape",
            [swapped, b.ints([0, 0, -1] if sequences_out else [0, -1], "merged_shape")],
        )
        b.set(outputs[0], merged, perm)
        return 1
    directions_out: list[str] = [
        b.op("Squeeze", [_pick(b, both, i, axis), b.ints([axis], "direction_axis")]) for i in (0, 1)
    ]
    if layer.merge_mode is None:
        b.set(outputs[0], directions_out[0], perm)
        b.set(outputs[1], directions_out[1], perm)
        return 2
    if layer.merge_mode == "mul":
        merged = b.op("Mul", directions_out)
    else:
        merged = b.op("Add", directions_out)
        if layer.merge_mode == "ave":
            merged = b.op("Div", [merged, b.scalar(2.0, "two")])
    b.set(outputs[0], merged, perm)
    return 1


# --------------------------------------------------------------------------------------
# Masks: the Masking layer (the keras.ops operations its mask is computed with,
# not_equal and any, are in .ops).


def masking(b: Builder, node: Node) -> None:
    """Masking: zero the steps whose features all equal ``mask_value``."""
    tensor = node.inputs[0]
    x = b.get(tensor)
    value = b.scalar(float(node.layer.mask_value), "mask_value")
    kept = any_along(b, b.op("Not", [b.op("Equal", [x, value])]), [-1], keepdims=True)
    out = b.op("Where", [kept, x, b.scalar(0.0, "zero")])
    b.set(node.outputs[0], out)

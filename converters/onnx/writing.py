"""Check and write an ONNX model whose weights stay NumPy arrays until they hit the disk.

``onnx.save_model`` encodes the whole ``ModelProto`` into one bytes object, weights
included, and ``onnx.checker`` then parses the written file again: for ResNet50
(100 MB of weights) that is C++ holding the GIL (BENCHMARKS.md appendix), while the CLI's
Keras reference pass waits for it in another thread. Here the model is assembled
without the bytes of its large initializers (:data:`INLINE_LIMIT`); they travel
beside it as arrays (:class:`Weights`):

* :func:`check_model` runs ``onnx.checker`` with ``full_check=True`` on the model
  with each weight declared as a graph input of its type and shape (shape inference
  reads small constants - Reshape shapes, Pad widths - never weight values), after
  checking each weight's array against its declared type and shape;
* :func:`write_model` encodes the small model and splices each weight into the file
  as it is written: the bytes are exactly ``model.SerializeToString()`` of the model
  with the weights filled in (:func:`fill`), as ``onnx.save_model`` would write;
* :func:`write_weights` stores the weights in a data file beside the model instead
  (for models over the 2 GiB protobuf limit, or when asked).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = [
    "INLINE_LIMIT",
    "Weights",
    "add_initializer",
    "check_model",
    "fill",
    "write_model",
    "write_weights",
]

INLINE_LIMIT = 1024  # bytes: larger initializers are weights (and external data)

Weights = dict[str, np.ndarray]  # initializer name -> C-contiguous array

# Protobuf field numbers and wire type of the fields the writer splices.
_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_RAW_DATA = 9  # TensorProto.raw_data
_LENGTH_DELIMITED = 2


def add_initializer(model: onnx.ModelProto, name: str, array: np.ndarray, weights: Weights) -> None:
    """Declare ``array`` as an initializer of ``model``: its bytes go into the proto
    when it is small, into ``weights`` (by name) otherwise. ONNX stores little-endian
    bytes in C order."""
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    tensor = model.graph.initializer.add()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.dims.extend(array.shape)
    if array.nbytes > INLINE_LIMIT:
        weights[name] = array
    else:
        tensor.raw_data = array.tobytes()


def fill(model: onnx.ModelProto, weights: Weights) -> onnx.ModelProto:
    """``model`` with every weight's bytes in its initializer (a complete ModelProto)."""
    for tensor in model.graph.initializer:
        if tensor.name in weights:
            tensor.raw_data = weights[tensor.name].tobytes()
    return model


def check_model(model: onnx.ModelProto, weights: Weights) -> None:
    """``onnx.checker`` (full check) on ``model`` with ``weights`` declared as inputs.

    Raises ``onnx.checker.ValidationError`` or ``onnx.shape_inference.InferenceError``
    as the checker does, and ``ValueError`` when a weight's array does not match its
    initializer's type and shape.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)  # small: the weights are not in it
    initializers = list(probe.graph.initializer)
    del probe.graph.initializer[:]
    for tensor in initializers:
        array = weights.get(tensor.name)
        if array is None:
            probe.graph.initializer.append(tensor)
            continue
        if (
            tuple(tensor.dims) != array.shape
            or tensor.data_type != helper.np_dtype_to_tensor_dtype(array.dtype)
            or tensor.HasField("raw_data")
        ):
            raise ValueError(
                f"initializer {tensor.name!r} is declared {tuple(tensor.dims)} of type "
                f"{tensor.data_type} but its weight is {array.shape} {array.dtype}"
            )
        probe.graph.input.append(
            helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
        )
    onnx.checker.check_model(probe, full_check=True)


def write_model(model: onnx.ModelProto, weights: Weights, path: str | os.PathLike) -> None:
    """Write ``model`` with ``weights`` filled in to ``path`` (one protobuf file)."""
    encoded = memoryview(model.SerializeToString())
    with open(path, "wb") as stream:
        for chunk in _spliced(encoded, model, weights):
            stream.write(chunk)


def write_weights(
    model: onnx.ModelProto, weights: Weights, data_path: str | os.PathLike, location: str
) -> None:
    """Write the weights to ``data_path`` (page-aligned, as onnx's own writer does) and
    point their initializers in ``model`` at it, as the file ``location`` beside it."""
    offset = 0
    with open(data_path, "wb") as stream:
        for tensor in model.graph.initializer:
            array = weights.get(tensor.name)
            if array is None:
                continue
            padding = (-offset) % 4096
            stream.write(b"\0" * padding)
            offset += padding
            stream.write(_raw(array))
            del tensor.external_data[:]
            for key, value in (
                ("location", location),
                ("offset", str(offset)),
                ("length", str(array.nbytes)),
            ):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = TensorProto.EXTERNAL
            offset += array.nbytes


def _raw(array: np.ndarray) -> memoryview:
    """The bytes of a weight (C-contiguous, little-endian), uncopied."""
    return array.data.cast("B")


def _spliced(
    encoded: memoryview, model: onnx.ModelProto, weights: Weights
) -> Iterator[bytes | memoryview]:
    """The chunks of ``encoded`` (``model`` serialized without the weights) with each
    weight's ``raw_data`` field appended to its initializer, lengths fixed up.

    Protobuf encodes a message field by field, each a key and, for a message or
    bytes field, its length then its bytes; fields may come in any order, and
    ``raw_data`` (field 9) comes after the name, type and dims (fields 1, 2, 8)
    that the initializers have, where the encoder itself would put it.
    """
    raw = [
        _raw(weights[tensor.name]) if tensor.name in weights else None
        for tensor in model.graph.initializer
    ]
    for number, field, payload in _fields(encoded):
        if number != _MODEL_GRAPH or payload is None:
            yield field
            continue
        graph: list[bytes | memoryview] = []
        index = 0
        for inner_number, inner_field, tensor in _fields(payload):
            if inner_number != _GRAPH_INITIALIZER or tensor is None:
                graph.append(inner_field)
                continue
            data = raw[index]
            index += 1
            if data is None:
                graph.append(inner_field)
                continue
            data_key = _key(_TENSOR_RAW_DATA) + _varint(len(data))
            body = len(tensor) + len(data_key) + len(data)
            graph += [_key(_GRAPH_INITIALIZER) + _varint(body), tensor, data_key, data]
        yield _key(_MODEL_GRAPH) + _varint(sum(len(chunk) for chunk in graph))
        yield from graph


def _key(number: int) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buffer: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, position


def _fields(buffer: memoryview) -> Iterator[tuple[int, memoryview, memoryview | None]]:
    """``(field number, the whole encoded field, its payload if length-delimited)``."""
    position = 0
    while position < len(buffer):
        start = position
        key, position = _read_varint(buffer, position)
        wire = key & 7
        payload = None
        if wire == 0:  # varint
            _, position = _read_varint(buffer, position)
        elif wire == 1:  # 64-bit
            position += 8
        elif wire == _LENGTH_DELIMITED:
            length, position = _read_varint(buffer, position)
            payload = buffer[position : position + length]
            position += length
        elif wire == 5:  # 32-bit
            position += 4
        else:  # groups (wire types 3, 4): not in ONNX's schema
            raise ValueError(f"unexpected protobuf wire type {wire} in an encoded ONNX model")
        yield key >> 3, buffer[start:position], payload

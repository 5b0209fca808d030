"""What keras-bn records in an exported ONNX file's metadata (no onnx import).

The exporter writes, and validation reads:

- :data:`METADATA_INPUT_LAYOUT`: ``"channels_last"`` or ``"channels_first"``, how
  the ONNX inputs are ordered;
- :data:`METADATA_LAYER_OUTPUTS`: the layer map, JSON ``{node key: [entry per
  output]}`` where an entry is ``[ONNX value name, layout perm]``, or ``null`` when
  no ONNX value holds that Keras output on its own. Node keys are
  :attr:`keras_bn.converters.graph.Node.key`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = [
    "METADATA_INPUT_LAYOUT",
    "METADATA_LAYER_OUTPUTS",
    "LayerMap",
    "decode_layer_map",
    "encode_layer_map",
]

METADATA_LAYER_OUTPUTS = "keras_bn.layer_outputs"
METADATA_INPUT_LAYOUT = "keras_bn.input_layout"

# Node key -> per output: [ONNX value name, perm] or None.
LayerMap = dict[str, list[Any]]


def encode_layer_map(layer_map: LayerMap) -> str:
    return json.dumps(layer_map, separators=(",", ":"))


def decode_layer_map(metadata: Mapping[str, str]) -> LayerMap | None:
    """The layer map of a file's metadata properties, None when it has none."""
    if METADATA_LAYER_OUTPUTS not in metadata:
        return None
    return json.loads(metadata[METADATA_LAYER_OUTPUTS])

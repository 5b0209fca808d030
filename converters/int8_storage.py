"""int8 values stored as uint8: the same numbers, kernels that cannot saturate.

onnxruntime's x86 kernels multiply 8-bit activations by signed 8-bit weights with
``VPMADDUBSW`` on CPUs without VNNI (AVX2 and early AVX-512: Intel before Cascade
Lake, AMD before Zen 4). That instruction adds each pair of ``uint8 x int8``
products into a saturating int16: ``255 x 127 x 2`` does not fit, and per-channel
weights put every channel's largest weight at +-127. The result is wrong, silently,
on those CPUs only: EfficientNet-Lite0's signed per-channel file is 20.1 dB from the
float model in exact QDQ arithmetic and 6.4 dB on an AVX2-only CPU (top-1 on all crops
91% against 56%; BENCHMARKS.md section 31a). OpenVINO and onnxruntime document the
problem; their workaround, 7-bit weights (``reduce_range``), costs that file 11 dB.

With both operands ``uint8``, onnxruntime's kernels widen to int16 and multiply with
``VPMADDWD`` into int32: nothing saturates. Adding 128 to every stored value and to
its zero point changes no number the file computes: ``(q - z) * s == ((q + 128) -
(z + 128)) * s`` for activations and weights alike. So :func:`store_unsigned`
rewrites a signed QDQ model (onnxruntime's S8S8) into that U8U8 form, the same
values on the same grid; exact QDQ arithmetic gives bit-identical outputs.

Runtimes that require signed symmetric int8 (TensorRT, TFLite-style NPU compilers)
keep the signed file: ``quantize_int8(signed=True)``, ``--signed-int8``. On a CPU whose
onnxruntime kernels saturate (:func:`kernels_saturate`), such a file is run in exact
QDQ arithmetic wherever keras-bn judges it (``runtime.validation_optimization``): the
kernels would judge this CPU, not the file, which those runtimes compute with int32
sums.
"""

from __future__ import annotations

import functools
import platform
from typing import Any

import numpy as np

__all__ = ["kernels_saturate", "signed_activations", "store_unsigned", "x86_without_vnni"]

# The inputs of each quantization node that hold stored integers: a QuantizeLinear's
# zero point; a DequantizeLinear's data and zero point.
_STORED_INPUTS = {"QuantizeLinear": (2,), "DequantizeLinear": (0, 2)}


def store_unsigned(model: Any) -> int:
    """Rewrite ``model`` (an onnx ``ModelProto``, in place) so that every int8 tensor
    of its QDQ nodes is uint8 holding the same values plus 128; returns how many
    initializers changed.

    Only int8 initializers that quantization nodes alone read as stored integers are
    rewritten, with the outputs of the QuantizeLinear nodes reading them. A model in
    which an int8 value reaches anything else (a graph input or output, another
    operator, a subgraph) is left as it is and the count is 0: its integers mean
    something to more than the quantization nodes."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    int8 = {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.INT8}
    if not int8:
        return 0
    quantized = {
        node.output[0]
        for node in graph.node
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in int8
    }
    if not _only_stored_integers(graph, int8 | quantized):
        return 0
    for init in graph.initializer:
        if init.name in int8:
            values = numpy_helper.to_array(init).astype(np.int16) + 128
            init.CopyFrom(numpy_helper.from_array(values.astype(np.uint8), init.name))
    for info in graph.value_info:
        if info.name in quantized and info.type.tensor_type.elem_type == onnx.TensorProto.INT8:
            info.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    return len(int8)


@functools.cache
def kernels_saturate() -> bool:
    """Whether onnxruntime's x86 integer kernels saturate on signed int8 activations on
    this CPU: an x86-64 CPU without VNNI (neither ``avx512_vnni`` nor ``avx_vnni`` among
    the flags Linux reports). False where the flags cannot be read (another system)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            return x86_without_vnni(cpuinfo.read())
    except OSError:
        return False


def x86_without_vnni(cpuinfo: str) -> bool:
    """Whether the first ``flags`` line of an x86 ``/proc/cpuinfo`` text names no VNNI
    extension (``avx512_vnni``: Intel from Cascade Lake, AMD from Zen 4; ``avx_vnni``:
    Intel from Alder Lake); False where no line lists flags."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return not set(line.partition(":")[2].split()) & {"avx512_vnni", "avx_vnni"}
    return False


def signed_activations(model: Any) -> bool:
    """Whether ``model`` (an onnx ``ModelProto``) quantizes an activation to int8 (a
    QuantizeLinear with an int8 zero point): onnxruntime's S8S8 form."""
    import onnx

    int8 = {
        init.name for init in model.graph.initializer if init.data_type == onnx.TensorProto.INT8
    }
    return any(
        node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in int8
        for node in model.graph.node
    )


def _only_stored_integers(graph: Any, names: set[str]) -> bool:
    """Whether quantization nodes' stored-integer inputs are the only readers of
    ``names`` (no graph output, no other operator, no subgraph reads one), and each
    DequantizeLinear's data and zero point are both in ``names`` or neither."""
    import onnx

    if any(output.name in names for output in graph.output):
        return False
    subgraphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    for node in graph.node:
        stored = _STORED_INPUTS.get(node.op_type, ())
        for position, name in enumerate(node.input):
            if name in names and position not in stored:
                return False
        if node.op_type == "DequantizeLinear":
            zero_point = node.input[2] if len(node.input) > 2 else ""
            if (zero_point in names) != (node.input[0] in names):
                return False  # data and zero point must change together
        if any(attribute.type in subgraphs for attribute in node.attribute):
            return False  # a subgraph may read an outer int8 value by name
    return True

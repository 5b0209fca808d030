"""Everything keras-bn asks of onnxruntime: sessions, input specs, feeds and runs.

Validation, precision conversion and benchmarking all open models here
(:func:`open_session`), read their inputs' names, shapes and dtypes
(:func:`input_specs`, :func:`fixed_batch_size`), match user arrays to them
(:func:`match_inputs`) and run them in batches the model accepts (:func:`run`).
onnxruntime is imported on first use.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from keras_bn.converters.errors import UserInputError
from keras_bn.converters.onnx.layout import channels_first_perm, layout_of

__all__ = [
    "InputSpec",
    "MissingKernel",
    "UnreadableModel",
    "batches",
    "files_we_wrote",
    "first_samples",
    "fixed_batch_size",
    "input_specs",
    "match_inputs",
    "onnx_input_specs",
    "open_session",
    "run",
]

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


# onnxruntime's graph optimization level at which keras-bn runs a file it validates
# (validation's module docstring): the extended level, and for an int8 file
# onnxruntime's default, ORT_ENABLE_ALL, the level its deployment gets by default.
VALIDATION_OPTIMIZATION = "ORT_ENABLE_EXTENDED"
INT8_VALIDATION_OPTIMIZATION = "ORT_ENABLE_ALL"
# Every Quantize/DequantizeLinear run as written: the file's exact QDQ arithmetic.
EXACT_QDQ_OPTIMIZATION = "ORT_DISABLE_ALL"


def validation_optimization(precision: str, signed: bool = False) -> str:
    """The level for a file judged by ``precision``'s criterion (see above).

    ``signed``: the int8 file quantizes activations to int8 (``--signed-int8``). On a
    CPU where onnxruntime's integer kernels saturate on those
    (:func:`.int8_storage.kernels_saturate`) it is run with no graph optimization,
    in the exact QDQ arithmetic the file describes and int32-accumulating runtimes
    compute, not in kernels that would judge the CPU instead of the file.
    """
    if precision != "int8":
        return VALIDATION_OPTIMIZATION
    from keras_bn.converters.int8_storage import kernels_saturate

    return EXACT_QDQ_OPTIMIZATION if signed and kernels_saturate() else INT8_VALIDATION_OPTIMIZATION


class InputSpec(NamedTuple):
    """One graph input: its name, shape (None for a dynamic size) and NumPy dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str


def open_session(
    model: str | os.PathLike | bytes,
    *,
    optimization: str | None = None,
    threads: int | None = None,
    spinning: bool = True,
    arena: bool = True,
) -> Any:
    """An onnxruntime CPU session for a model file (or serialized model).

    ``optimization``: a ``GraphOptimizationLevel`` member name (None: onnxruntime's
    default); ``threads``: ``intra_op_num_threads`` (None: onnxruntime's default);
    ``spinning=False``: idle worker threads sleep instead of busy-waiting for the
    next operation (onnxruntime's default spins: lower latency, but the spinning takes
    CPU from whatever else the process runs meanwhile; the outputs are the same);
    ``arena=False``: no CPU memory arena (for a session asked for other outputs on each
    run, whose arena would keep growing to the sum of their patterns).
    Raises :class:`UnreadableModel` (a UserInputError) when onnxruntime cannot load
    the file, RuntimeError when it cannot load ``model`` bytes (keras-bn's own copies).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Fatal only: onnxruntime also logs a failed run's error on stderr as it raises it,
    # a line of its own beside keras-bn's one-line message for the same error.
    options.log_severity_level = 4
    if optimization is not None:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = arena
    source = model if isinstance(model, bytes) else str(model)
    try:
        # Without its fallback, onnxruntime raises when a model fails to load instead of
        # printing "EP Error ... retrying" to stdout (a --json report must stay pure
        # JSON) and retrying on the same CPU provider. Not contextlib.redirect_stdout:
        # it swaps sys.stdout for the whole process, and sessions open in several
        # threads at once (two overlapping swaps can leave it swapped for good).
        return ort.InferenceSession(
            source, options, providers=["CPUExecutionProvider"], enable_fallback=0
        )
    except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph types
        reason = " ".join(str(error).split())[:300]
        missing = _MISSING_KERNEL.search(reason)
        if missing and _reads_float64(model, missing.group(3)):  # the model's own arithmetic
            op, version, node = missing.groups()
            raise MissingKernel(op, version, node) from error
        if isinstance(model, bytes):  # a copy keras-bn serialized itself: its own bug
            raise RuntimeError(
                f"onnxruntime cannot load a model keras-bn serialized ({reason})"
            ) from error
        raise UnreadableModel(
            f"{str(model)!r} is not a readable ONNX file: it cannot be loaded by "
            f"onnxruntime ({reason}); expected a valid .onnx file.",
            str(model),
        ) from error


# onnxruntime's NOT_IMPLEMENTED when no kernel takes a node's types.
_MISSING_KERNEL = re.compile(
    r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'"
)


class MissingKernel(UserInputError):
    """onnxruntime's CPU provider has no kernel for a node that reads float64 (a float64
    Conv: the exporter writes the arithmetic the model does, which onnxruntime runs
    for few operators). The file is valid ONNX; nothing here can run or validate it.
    A missing kernel for other types stays the error it was (keras-bn's bug where
    keras-bn wrote the file)."""

    def __init__(self, op: str, version: str, node: str) -> None:
        super().__init__(
            f"onnxruntime has no CPU kernel for {op} (opset {version}) in float64 (node "
            f"{node!r}), so the exported file cannot be run or validated here: the model "
            "computes in float64; give its layers dtype='float32' to export a model "
            "onnxruntime runs (export --no-validate writes the file unvalidated)."
        )


def _reads_float64(model: str | os.PathLike | bytes, node: str) -> bool:
    """Whether ``node`` of the ONNX ``model`` reads a float64 tensor (a graph input, an
    initializer or a typed value)."""
    import onnx

    try:
        proto = (
            onnx.load_from_string(model)
            if isinstance(model, bytes)
            else onnx.load(str(model), load_external_data=False)
        )
    except Exception:  # noqa: BLE001  (unparsable here: not a float64 model's missing kernel)
        return False
    graph, double = proto.graph, onnx.TensorProto.DOUBLE
    types = {i.name: i.type.tensor_type.elem_type for i in [*graph.input, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return any(types.get(name) == double for n in graph.node if n.name == node for name in n.input)


class UnreadableModel(UserInputError):
    """onnxruntime cannot load the model file at :attr:`path`: a user error, unless
    keras-bn wrote the file (the caller knows, and says so: :func:`files_we_wrote`)."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


@contextlib.contextmanager
def files_we_wrote(directory: os.PathLike) -> Iterator[None]:
    """Make an :class:`UnreadableModel` under ``directory`` (where keras-bn writes its
    own files) the internal error it is, instead of an error in the user's input."""
    try:
        yield
    except UnreadableModel as error:
        if Path(error.path).resolve().is_relative_to(Path(directory).resolve()):
            raise RuntimeError(f"keras-bn wrote an ONNX file that {error}") from error
        raise


def input_specs(session: Any) -> list[InputSpec]:
    """The session's graph inputs, in order."""
    return [
        InputSpec(
            node_arg.name,
            tuple(d if isinstance(d, int) else None for d in node_arg.shape),
            _ORT_TYPES.get(node_arg.type, "float32"),
        )
        for node_arg in session.get_inputs()
    ]


def onnx_input_specs(path: str | os.PathLike) -> list[InputSpec]:
    """The graph inputs of the ONNX file at ``path``."""
    return input_specs(open_session(path))


def fixed_batch_size(specs: Sequence[InputSpec]) -> int | None:
    """The inputs' fixed batch size, or None when the batch dimension is dynamic.

    Raises UserInputError when the inputs disagree (two fixed sizes, or fixed and
    dynamic): onnxruntime could not run such a model on one batch.
    """
    sizes = {spec.shape[0] for spec in specs if spec.shape}
    fixed = {size for size in sizes if size is not None and size > 0}
    if len(fixed) > 1 or (fixed and len(sizes) > 1):
        raise UserInputError(
            f"the ONNX model's inputs have batch sizes {sorted(map(str, sizes))}; expected one "
            "batch size shared by every input. Export it again with one --batch-size."
        )
    return fixed.pop() if fixed else None


def match_inputs(
    specs: Sequence[InputSpec],
    inputs: Mapping[str, np.ndarray],
    what: str,
    *,
    input_layout: str | Mapping[str, str] = "channels_last",
    check_shapes: bool = True,
) -> dict[str, np.ndarray]:
    """Key ``inputs`` by the ONNX input names, check their shapes, cast to their dtypes.

    With ``input_layout="channels_first"`` (or that layout for an input name) the
    arrays are in Keras order and are transposed first (inputs of rank >= 3). Arrays named otherwise than the ONNX
    inputs (another exporter's names, or any key for a single input) are matched
    by position when their count and ranks agree. ``what`` names the arrays in
    error messages. ``check_shapes=False`` leaves non-batch sizes to onnxruntime
    (validation reports its error as a failed comparison).
    """
    arrays = {
        name: np.transpose(array, channels_first_perm(np.ndim(array)))
        if layout_of(input_layout, name) == "channels_first" and np.ndim(array) >= 3
        else np.asarray(array)
        for name, array in inputs.items()
    }
    names = [spec.name for spec in specs]
    if set(arrays) != set(names) and len(arrays) == len(specs):
        if all(a.ndim == len(s.shape) for a, s in zip(arrays.values(), specs, strict=True)):
            arrays = dict(zip(names, arrays.values(), strict=True))
    if set(arrays) != set(names):
        raise UserInputError(
            f"{what} has arrays {sorted(arrays)!r}; expected the ONNX model inputs {names!r}. "
            "Was the ONNX file exported from this model?"
        )
    matched = {}
    batch_sizes = set()
    for spec in specs:
        array = arrays[spec.name]
        if check_shapes and (
            array.ndim != len(spec.shape)
            or any(
                want is not None and got != want
                for got, want in zip(array.shape[1:], spec.shape[1:], strict=False)
            )
        ):
            raise UserInputError(
                f"{what}: array {spec.name!r} has shape {array.shape}; the ONNX model expects "
                f"({', '.join('N' if d is None else str(d) for d in spec.shape)}) (batch first)."
            )
        if array.shape[0] == 0:
            raise UserInputError(f"{what}: array {spec.name!r} is empty; give at least one sample.")
        batch_sizes.add(array.shape[0])
        matched[spec.name] = np.ascontiguousarray(array.astype(spec.dtype, copy=False))
    if len(batch_sizes) != 1:
        raise UserInputError(
            f"{what}: arrays have different batch sizes {sorted(batch_sizes)}; "
            "give every input the same number of samples."
        )
    return matched


def batches(
    inputs: Mapping[str, np.ndarray], fixed_batch: int | None, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Split ``inputs`` into batches the model accepts (its fixed batch size, if any)."""
    total = len(next(iter(inputs.values())))
    step = fixed_batch or batch_size
    if fixed_batch is not None and total % fixed_batch:
        raise UserInputError(
            f"The ONNX model has a fixed batch size of {fixed_batch} but the data has "
            f"{total} sample(s); give a multiple of {fixed_batch} or export with a "
            "dynamic batch size."
        )
    for start in range(0, total, step):
        yield {name: array[start : start + step] for name, array in inputs.items()}


def first_samples(
    feeds: Iterable[Mapping[str, np.ndarray]], samples: int, chunk: int | None
) -> list[dict[str, np.ndarray]]:
    """The first ``samples`` samples of ``feeds`` (batches, input name -> array), as
    views in feeds of ``chunk`` samples at most; ``chunk`` None: whole batches, perhaps a
    few samples more (a model with a fixed batch size takes no other)."""
    kept: list[dict[str, np.ndarray]] = []
    count = 0
    for batch in feeds:
        arrays = {name: np.asarray(value) for name, value in batch.items()}
        size = len(next(iter(arrays.values())))
        for start in range(0, size, chunk or size):
            if count >= samples:
                return kept
            stop = size if chunk is None else min(start + chunk, size, start + samples - count)
            kept.append({name: value[start:stop] for name, value in arrays.items()})
            count += stop - start
    return kept


def run(
    session: Any, inputs: Mapping[str, np.ndarray], what: str = "Inputs", batch_size: int = 64
) -> list[np.ndarray]:
    """The session's outputs on all of ``inputs`` (matched, run in batches), in float64."""
    specs = input_specs(session)
    matched = match_inputs(specs, inputs, what)
    outputs: list[list[np.ndarray]] = []
    for batch in batches(matched, fixed_batch_size(specs), batch_size):
        results = session.run(None, batch)
        if not outputs:
            outputs = [[] for _ in results]
        for collected, result in zip(outputs, results, strict=True):
            collected.append(np.asarray(result))
    return [np.concatenate(parts).astype(np.float64) for parts in outputs]

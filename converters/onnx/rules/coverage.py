"""What exports, for every public ``keras.ops`` function and ``keras.layers`` class.

Each is in one of three categories:

* **rule**: its operation class is in :data:`~.ops.OPS`, or its layer class in
  :data:`~.table.RULES` (an op function's class is the operation its symbolic
  call records, :func:`operation_class`);
* **traced**: it has no rule of its own, and what it records is exported: a
  layer whose ``call()`` decomposes into layers and ops with rules, an op that
  is an alias of one with a rule, or one computed while tracing (a constant);
  :data:`TRACED_OPS` / :data:`TRACED_LAYERS`, each with what it becomes;
* **refused**: :data:`REFUSED_OPS` / :data:`REFUSED_LAYERS`, each with the reason.

``tests/test_coverage.py`` fails when Keras adds a public op or layer that is in
none of them, or when an entry here goes stale (gets a rule, or leaves Keras),
and exports each traced layer; ``docs/COVERAGE.md`` is :func:`markdown`'s text.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator

import keras

from keras_bn.converters.onnx.rules.ops import OPS
from keras_bn.converters.onnx.rules.table import RULES

__all__ = [
    "REFUSED_LAYERS",
    "REFUSED_OPS",
    "TRACED_LAYERS",
    "TRACED_OPS",
    "layer_status",
    "markdown",
    "op_status",
    "operation_class",
    "public_layers",
    "public_ops",
]


def _each(reason: str, names: str) -> dict[str, str]:
    return dict.fromkeys(names.split(), reason)


_CONSTANT = "computed while tracing from Python arguments: a constant"

TRACED_OPS: dict[str, str] = {
    **_each(
        _CONSTANT,
        "arange array bartlett blackman empty eye full hamming hanning identity kaiser "
        "linspace logspace geomspace ones tri zeros",
    ),
    **_each(
        "read while tracing (static facts, not graph operations)",
        "convert_to_numpy dtype is_tensor ndim shape",
    ),
    "cond": "the branch its predicate selects while tracing (a predicate known then)",
    "abs": "ops.absolute (its rule)",
}

_COMPLEX = "complex numbers: the exporter's tensors are real"
_LINALG = "matrix decompositions, inverses and solvers: no ONNX operator"
_VALUES_SHAPE = "an output shape that depends on the values"
_TRAINING = "training-time computation (losses, gradients), not inference"
_LOOPS = "loops other than ops.map (ONNX Loop): no rule yet"
_SCATTER = "updates at computed indices (ScatterND/segments): no rule yet"
_BITS = "integer bit operations: no rule yet"
_NAN = "NaN-ignoring variants: no rule yet"
_STATISTICS = "sorting-based statistics (median, quantiles): no rule yet"
_IMAGE = "image processing beyond resize: no rule yet"
_NOT_YET = "no rule yet (composable from ONNX operators)"

REFUSED_OPS: dict[str, str] = {
    **_each(
        _COMPLEX,
        "angle conj conjugate fft ifft2 imag irfft isreal istft polar real rfft stft "
        "view_as_complex view_as_real",
    ),
    **_each(
        _LINALG,
        "cholesky cholesky_inverse det eig eigh inv logdet lstsq lu_factor matrix_rank pinv qr "
        "slogdet solve solve_triangular svd",
    ),
    **_each(_VALUES_SHAPE, "ctc_decode nonzero unique"),
    **_each(
        _TRAINING,
        "binary_crossentropy categorical_crossentropy "
        "ctc_loss custom_gradient jvp sparse_categorical_crossentropy",
    ),
    **_each(_LOOPS, "associative_scan fori_loop scan switch vectorize vectorized_map while_loop"),
    **_each(
        _SCATTER,
        "scatter scatter_update segment_max segment_min segment_prod segment_sum slice_update",
    ),
    **_each(
        _BITS,
        "bitwise_and bitwise_invert bitwise_left_shift bitwise_not bitwise_or "
        "bitwise_right_shift bitwise_xor gcd lcm left_shift right_shift",
    ),
    **_each(
        _NAN,
        "nan_to_num nanargmax nanargmin nancumprod nancumsum nanmax nanmean nanmedian nanmin "
        "nanpercentile nanprod nanquantile nanstd nansum nanvar",
    ),
    **_each(_STATISTICS, "argpartition argsort median percentile quantile"),
    **_each(
        _IMAGE,
        "image.affine_transform image.crop_images image.elastic_transform "
        "image.extract_patches image.extract_patches_3d image.gaussian_blur "
        "image.hsv_to_rgb image.map_coordinates image.pad_images "
        "image.perspective_transform image.rgb_to_grayscale image.rgb_to_hsv "
        "image.scale_and_translate image.sobel_edges image.ssim",
    ),
    **_each(
        _NOT_YET,
        "adaptive_average_pool adaptive_max_pool allclose append arctan2 array_split "
        "average batch_normalization bincount cbrt cdist celu conv_transpose copy corrcoef "
        "correlate count_nonzero cross deg2rad depth_to_space diag diagflat diagonal diff "
        "digitize divide_no_nan dot dsplit dstack elu empty_like erfc erfinv exp2 expm1 "
        "extract_sequences fabs flip fliplr flipud floor_divide fmax fmin fmod fold full_like "
        "glu hard_shrink hard_tanh heaviside histogram hsplit hstack hypot i0 in_top_k inner "
        "isclose isfinite isin isinf isneginf isposinf kron ldexp leaky_relu log10 log1p log2 "
        "log_sigmoid logaddexp logaddexp2 logical_xor logsumexp meshgrid moments "
        "multi_hot nextafter norm ones_like outer psnr ptp rad2deg ravel rearrange "
        "roll rot90 saturate_cast searchsorted select selu separable_conv signbit sinc "
        "soft_shrink space_to_depth sparse_plus sparse_sigmoid sparsemax squareplus std "
        "tanh_shrink tensordot threshold trace trapezoid tril triu trunc unfold unravel_index "
        "vander var vdot view vsplit vstack",
    ),
}

TRACED_LAYERS: dict[str, str] = {
    "Dot": "ops.normalize, then batch_dot's matmul, transposes and reshapes",
    "RMSNormalization": "ops.rms_normalization",
    "Lambda": "its function's keras.ops calls",
    "CenterCrop": "a slice of the image (ops indexing)",
    "Attention": "matmul, softmax and matmul",
    "AdditiveAttention": "broadcast sum, tanh, reductions, softmax, matmul",
    "GroupQueryAttention": "einsums, ops.repeat of the key/value heads, softmax",
    "CategoryEncoding": "ops.one_hot (output_mode='one_hot')",
    "SpectralNormalization": "the wrapped layer with its normalized kernel (a constant)",
    "ReversibleEmbedding": "ops.take (an Embedding)",
    "InputLayer": "the graph's input (no node)",
    **_each(
        "data augmentation: the identity at inference (training=False)",
        "AugMix AutoContrast CutMix MixUp RandAugment RandomBrightness RandomColorDegeneration "
        "RandomColorJitter RandomContrast RandomCrop RandomElasticTransform RandomErasing "
        "RandomFlip RandomGaussianBlur RandomGrayscale RandomHue RandomInvert "
        "RandomPerspective RandomPosterization RandomRotation RandomSaturation "
        "RandomSharpness RandomShear RandomTranslation RandomZoom",
    ),
}

REFUSED_LAYERS: dict[str, str] = {
    **_each(
        "string and lookup preprocessing: ONNX tensors of strings and hash tables",
        "HashedCrossing Hashing IntegerLookup StringLookup TextVectorization",
    ),
    **_each(
        "image preprocessing beyond resize: no rule yet",
        "ContrastLimitedAdaptiveHistogramEqualization Equalization MaxNumBoundingBoxes "
        "Solarization",
    ),
    **_each(
        "audio front ends (FFT): complex numbers",
        "MelSpectrogram STFTSpectrogram",
    ),
    **_each(
        "adaptive pooling: no rule yet",
        "AdaptiveAveragePooling1D AdaptiveAveragePooling2D AdaptiveAveragePooling3D "
        "AdaptiveMaxPooling1D AdaptiveMaxPooling2D AdaptiveMaxPooling3D",
    ),
    "Discretization": "ops.digitize: no rule yet",
    **_each(
        "convolutional recurrences (a Conv per step): no ONNX recurrence",
        "ConvLSTM1D ConvLSTM2D ConvLSTM3D",
    ),
    **_each(
        "recurrent cells outside an RNN layer (the RNN layer has a rule)",
        "GRUCell LSTMCell SimpleRNNCell StackedRNNCells",
    ),
    **_each(
        "another framework's module (JAX, Flax, PyTorch, a TensorFlow SavedModel)",
        "FlaxLayer JaxLayer TFSMLayer TorchModuleWrapper",
    ),
    **_each(
        "base classes, not layers that compute anything themselves",
        "InputSpec Layer Pipeline Wrapper",
    ),
}

# An op function's operation: the class whose instance it calls (symbolic_call).
_OPERATION_CALL = re.compile(r"\b([A-Z]\w*)\((?:[^()]|\([^()]*\))*\)\s*(?:\.symbolic_call)?\(")


def operation_class(function: Callable) -> type | None:
    """The ``keras.ops`` operation class ``function`` records on symbolic tensors
    (read from its source: Keras writes ``Add().symbolic_call(x1, x2)``), None if
    it records none of its own."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return None
    for name in _OPERATION_CALL.findall(source):
        found = function.__globals__.get(name)
        if isinstance(found, type) and issubclass(found, keras.Operation):
            return found
    return None


def public_ops() -> Iterator[tuple[str, Callable]]:
    """Every public ``keras.ops`` function (``image.*`` for those only there)."""
    top = {n for n in dir(keras.ops) if not n.startswith("_")}
    for name in sorted(top):
        value = getattr(keras.ops, name)
        if callable(value) and not inspect.ismodule(value):
            yield name, value
    for module in ("image", "linalg", "nn", "numpy"):
        namespace = getattr(keras.ops, module)
        for name in sorted(n for n in dir(namespace) if not n.startswith("_") and n not in top):
            yield f"{module}.{name}", getattr(namespace, name)


def public_layers() -> Iterator[tuple[str, type]]:
    """Every public ``keras.layers`` class."""
    for name in sorted(dir(keras.layers)):
        value = getattr(keras.layers, name)
        if inspect.isclass(value):
            yield name, value


def op_status(name: str, function: Callable) -> tuple[str, str] | None:
    """(category, note) of a public op function, None when it is in no category."""
    operation = operation_class(function)
    if operation in OPS:
        return "rule", operation.__name__
    if name in TRACED_OPS:
        return "traced", TRACED_OPS[name]
    if name in REFUSED_OPS:
        return "refused", REFUSED_OPS[name]
    return None


def layer_status(name: str, cls: type) -> tuple[str, str] | None:
    """(category, note) of a public layer class, None when it is in no category."""
    if cls in RULES:
        return "rule", RULES[cls].__name__
    if name in TRACED_LAYERS:
        return "traced", TRACED_LAYERS[name]
    if name in REFUSED_LAYERS:
        return "refused", REFUSED_LAYERS[name]
    return None


def _table(rows: list[tuple[str, tuple[str, str] | None]], what: str) -> list[str]:
    counts = {
        category: sum(1 for _, s in rows if s and s[0] == category)
        for category in ("rule", "traced", "refused")
    }
    lines = [
        f"{len(rows)} {what}: {counts['rule']} with a rule, {counts['traced']} traced, "
        f"{counts['refused']} refused.",
        "",
        "| name | exports | how, or why not |",
        "|---|---|---|",
    ]
    for name, status in rows:
        category, note = status or ("missing", "in no category")
        lines.append(f"| `{name}` | {category} | {note} |")
    return lines


def markdown() -> str:
    """The coverage tables as Markdown (``docs/COVERAGE.md``)."""
    ops_rows = [(name, op_status(name, function)) for name, function in public_ops()]
    layer_rows = [(name, layer_status(name, cls)) for name, cls in public_layers()]
    lines = [
        "# What exports to ONNX natively",
        "",
        "Generated from `converters/onnx/rules/coverage.py` for Keras "
        f"{keras.__version__} (`tests/test_coverage.py` checks this file is current). "
        "*rule*: the exporter has an ONNX rule for it; *traced*: what it records is "
        "exported; *refused*: export stops with the reason.",
        "",
        "## keras.layers",
        "",
        *_table(layer_rows, "public layer classes"),
        "",
        "## keras.ops",
        "",
        *_table(ops_rows, "public functions"),
        "",
    ]
    return "\n".join(lines)

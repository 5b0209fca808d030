"""Helpers shared by the test modules (and, by path, by benchmarks/).

Test modules import from here, never from each other: ``from helpers import ...``
(pytest puts ``tests/`` on ``sys.path``: the folder has no ``__init__.py``). The
subprocess scripts of test_folding.py and test_onnx_export.py insert ``tests/``
themselves. No pytest import, so the benchmarks can use these helpers too.

- Walking models: :func:`walk_layers`, :func:`batch_norm_layers`.
- BatchNormalization statistics: :func:`randomize_batch_norms` (random),
  :func:`calibrate_batch_norms` (measured on data, then perturbed).
- Running models: :func:`inputs_for`, :func:`outputs_of`, :func:`assert_same_outputs`,
  :func:`float64_twin`.
- Native export judged against float64: :func:`export_and_judge`.
- Folding: :func:`fold_and_check`, :func:`conv_bn_stack`, the channels_first models
  that test_folding.py folds in a JAX subprocess.
- Small models: :func:`conv_bn_classifier`, :func:`tiny_model`.
- Files: :func:`sha256`, :func:`zip_members`, :func:`make_zip`.
- The console script: :data:`KERAS_BN`, :func:`run_script`, :func:`run_many`,
  :func:`assert_rejected`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np

from keras_bn.converters.folding import fold_batch_norms

L = keras.layers

# ------------------------------------------------------------------------------------
# Walking models.


def walk_layers(model):
    """Every layer of ``model`` that is not itself a model, nested models walked, once each."""
    seen = set()

    def walk(parent):
        for layer in parent.layers:
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            if isinstance(layer, keras.Model):
                yield from walk(layer)
            else:
                yield layer

    yield from walk(model)


def batch_norm_layers(model) -> list:
    """Every BatchNormalization layer (keras_bn's subclass included) inside ``model``."""
    return [layer for layer in walk_layers(model) if isinstance(layer, L.BatchNormalization)]


# ------------------------------------------------------------------------------------
# BatchNormalization statistics.


def weights_by_name(layer) -> dict:
    """A layer's variables keyed by name (``gamma``, ``moving_mean``, ...)."""
    return {weight.name: weight for weight in layer.weights}


def randomize_weights(layer, rng, *, variance_decades=2.0, stddev_decades=1.0):
    """Non-trivial BN weights, renorm ones too: gamma != 1 (some negative), beta and
    means != 0, variances over +-``variance_decades`` decades (renorm stddevs over
    +-``stddev_decades``)."""
    for name, weight in weights_by_name(layer).items():
        shape = tuple(weight.shape)
        if name == "gamma":
            value = rng.uniform(0.5, 2.0, shape) * rng.choice([-1, 1], shape)
        elif name in ("beta", "moving_mean", "renorm_mean"):
            value = rng.uniform(-3.0, 3.0, shape)
        elif name == "moving_variance":
            value = 10.0 ** rng.uniform(-variance_decades, variance_decades, shape)
        elif name in ("moving_stddev", "renorm_stddev"):
            value = 10.0 ** rng.uniform(-stddev_decades, stddev_decades, shape)
        else:
            continue
        weight.assign(value.astype(weight.dtype))


def randomize_batch_norms(
    model,
    seed=0,
    *,
    variance_decades: tuple[float, float] | None = None,
    gain: tuple[float, float] | None = None,
):
    """Give every BatchNormalization in ``model`` non-trivial statistics; return ``model``.

    Default-initialized BN folds to the identity and proves nothing, so per channel:
    moving_mean ~ N(0, 2) (not 0), moving_variance = 10 ** U(-3, 1) (orders of
    magnitude apart), |gamma| ~ U(0.3, 2) with a random sign (not 1;
    trained networks have negative ones too), beta ~ N(0, 1). A layer built with
    ``scale=False`` / ``center=False`` has no gamma / beta and keeps none; any
    ``axis`` works (the shapes come from the weights). Weights are read and written
    by name, never by ``get_weights()`` position.

    Args:
        model: a model (nested models are walked) or one BatchNormalization layer.
        seed: an int, or a ``np.random.Generator`` whose stream continues.
        variance_decades: the range of ``log10(moving_variance)``: (-3, 1) by
            default, (-2, 1.5) with ``gain``; widen it to put folded weights near
            float16's limits.
        gain: for deep networks (Keras Applications): ``(low, high)`` sets
            ``gamma = sqrt(moving_variance + epsilon) * U(low, high)``, so each BN
            scales its input by a factor in that range and 50 of them neither blow
            up nor vanish. Layers without gamma then get variances within half a
            decade of 1 (their factor is ``1 / sqrt(variance)``), gamma stays
            positive, and offsets are drawn narrower (mean ~ N(0.2, 0.5),
            beta ~ N(0, 0.2)): deep networks add them up.
    """
    if variance_decades is None:
        variance_decades = (-3.0, 1.0) if gain is None else (-2.0, 1.5)
    rng = np.random.default_rng(seed)
    layers = [model] if isinstance(model, L.BatchNormalization) else batch_norm_layers(model)
    # Each branch keeps the draw order of the copy it replaced, so the figures
    # recorded with those copies (BENCHMARKS.md) reproduce.
    for layer in layers:
        shape = tuple(layer.moving_mean.shape)
        if gain is None:
            layer.moving_mean.assign(rng.normal(0.0, 2.0, shape))
            layer.moving_variance.assign(10.0 ** rng.uniform(*variance_decades, shape))
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.3, 2.0, shape) * rng.choice([-1.0, 1.0], shape))
            if layer.beta is not None:
                layer.beta.assign(rng.normal(0.0, 1.0, shape))
            continue
        decades = variance_decades if layer.gamma is not None else (-0.5, 0.5)
        variance = 10.0 ** rng.uniform(*decades, shape)
        layer.moving_mean.assign(rng.normal(0.2, 0.5, shape))
        layer.moving_variance.assign(variance)
        if layer.gamma is not None:
            layer.gamma.assign(np.sqrt(variance + layer.epsilon) * rng.uniform(*gain, shape))
        if layer.beta is not None:
            layer.beta.assign(rng.normal(0.0, 0.2, shape))
    return model


def calibrate_batch_norms(
    model, data, seed=0, *, variance_decades=0.5, gamma=(0.5, 2.0), beta_std=0.5
):
    """Moving statistics measured on ``data`` (as training leaves them), then perturbed.

    Sets every BN's momentum to 0, runs ``model(data, training=True)``, then per
    channel multiplies moving_variance by 10 ** U(-variance_decades,
    variance_decades) and draws gamma ~ U(*gamma) and beta ~ N(0, beta_std).
    Returns ``model``.
    """
    rng = np.random.default_rng(seed)
    layers = batch_norm_layers(model)
    for layer in layers:
        layer.momentum = 0.0
    model(data, training=True)
    for layer in layers:
        shape = tuple(layer.moving_mean.shape)
        variance = keras.ops.convert_to_numpy(layer.moving_variance)
        spread = 10.0 ** rng.uniform(-variance_decades, variance_decades, shape)
        layer.moving_variance.assign(variance * spread)
        if layer.gamma is not None:
            layer.gamma.assign(rng.uniform(*gamma, shape))
        if layer.beta is not None:
            layer.beta.assign(rng.normal(0.0, beta_std, shape))
    return model


def inputs_for(model, seed=1, batch_size=2):
    """Random float32 inputs (mean 0.5, std 2) for every input of ``model``."""
    rng = np.random.default_rng(seed)
    arrays = [
        (rng.normal(0.5, 2.0, (batch_size, *tensor.shape[1:]))).astype("float32")
        for tensor in model.inputs
    ]
    return arrays if len(arrays) > 1 else arrays[0]


def outputs_of(model, x) -> list[np.ndarray]:
    """Every output of ``model(x, training=False)`` as a NumPy array."""
    return [
        np.asarray(keras.ops.convert_to_numpy(y))
        for y in keras.tree.flatten(model(x, training=False))
    ]


def assert_same_outputs(original, folded, x, rtol=2e-5):
    """Outputs equal within float32 rounding, relative to each output's magnitude."""
    for expected, received in zip(outputs_of(original, x), outputs_of(folded, x), strict=True):
        assert received.shape == expected.shape
        scale = max(float(np.max(np.abs(expected))), 1e-6)
        error = float(np.max(np.abs(received - expected)))
        assert error <= rtol * scale, f"max abs error {error:.3g} vs output scale {scale:.3g}"


def float64_twin(model):
    """The same single-input model in float64, with the same weights."""

    def clone(layer):
        config = layer.get_config()
        config["dtype"] = "float64"
        return type(layer).from_config(config)

    twin = keras.models.clone_model(
        model,
        clone_function=clone,
        input_tensors=keras.Input(model.input_shape[1:], dtype="float64"),
    )
    twin.set_weights([weight.astype(np.float64) for weight in model.get_weights()])
    return twin


# ------------------------------------------------------------------------------------
# Folding.


def fold_and_check(model, x=None, *, expected_remaining=0, backward=True, rtol=2e-5):
    """Randomize the BNs, fold, check the BNs left and the outputs; return (folded, report)."""
    randomize_batch_norms(model)
    x = inputs_for(model) if x is None else x
    folded, report = fold_batch_norms(model, backward=backward, sample_inputs=x)
    assert len(batch_norm_layers(folded)) == expected_remaining, str(report)
    assert report.not_folded_count == expected_remaining
    assert_same_outputs(model, folded, x, rtol=rtol)
    return folded, report


def conv_bn_stack(blocks, channels, dtype, seed):
    """``blocks`` x (Conv2D 3x3 -> BN(epsilon=1e-10) -> ReLU) on (12, 12, channels)."""
    rng = np.random.default_rng(seed)
    x = keras.Input((12, 12, channels), dtype=dtype)
    y = x
    for i in range(blocks):
        conv = L.Conv2D(channels, 3, padding="same", dtype=dtype, name=f"conv_{i}")
        y = conv(y)
        # Channel gains over 8 decades, as trained networks have: the BN undoes them.
        kernel = rng.normal(0, 1 / np.sqrt(9 * channels), (3, 3, channels, channels))
        conv.kernel.assign(kernel * 10.0 ** rng.uniform(-4, 4, channels))
        conv.bias.assign(rng.normal(0, 0.1, channels))
        y = L.BatchNormalization(epsilon=1e-10, dtype=dtype, name=f"bn_{i}")(y)
        y = L.ReLU(dtype=dtype)(y)
    return keras.Model(x, y)


def _channels_first_bn(name):
    return L.BatchNormalization(axis=1, name=name)


def channels_first_models():
    """channels_first models covering every rule in both directions: (model, BNs kept)."""
    cf = {"data_format": "channels_first"}
    bn = _channels_first_bn
    x = keras.Input((4, 9, 9))
    y = bn("bn_conv")(L.Conv2D(4, 3, groups=2, use_bias=False, **cf)(x))
    y = bn("bn_dw")(L.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, **cf)(y))
    y = bn("bn_sep")(L.SeparableConv2D(6, 3, depth_multiplier=2, padding="same", **cf)(y))
    y = L.Conv2D(6, 3, groups=3, activation="relu", **cf)(bn("bn_back_conv")(L.ReLU()(y)))
    y = L.Conv2DTranspose(4, 3, strides=2, output_padding=1, **cf)(y)
    y = bn("bn_back_dw")(L.ReLU()(bn("bn_deconv")(y)))
    y = L.DepthwiseConv2D(1, padding="same", depth_multiplier=2, **cf)(y)
    model_2d = keras.Model(x, y)

    x = keras.Input((3, 12))
    y = bn("bn_conv")(L.Conv1D(4, 3, dilation_rate=2, **cf)(x))
    y = bn("bn_dw")(L.DepthwiseConv1D(3, depth_multiplier=2, **cf)(y))
    y = bn("bn_sep")(L.SeparableConv1D(4, 2, depth_multiplier=2, **cf)(y))
    y = bn("bn_deconv")(L.Conv1DTranspose(3, 3, dilation_rate=2, **cf)(L.ReLU()(y)))
    y = L.Conv1D(2, 3, padding="same", **cf)(bn("bn_kept_padding")(L.ReLU()(y)))
    model_1d = keras.Model(x, y)

    x = keras.Input((2, 5, 5, 5))
    y = bn("bn_conv")(L.Conv3D(4, 2, groups=2, **cf)(x))
    y = L.Conv3D(4, 2, **cf)(bn("bn_back_conv")(L.ReLU()(y)))
    y = bn("bn_deconv")(L.Conv3DTranspose(3, 2, strides=2, **cf)(y))
    model_3d = keras.Model(x, y)
    return [(model_2d, 0), (model_1d, 1), (model_3d, 0)]


def check_channels_first_models():
    """Run in test_folding.py's JAX subprocess: fold the channels_first models, compare."""
    assert keras.backend.backend() == "jax", keras.backend.backend()
    for model, kept in channels_first_models():
        fold_and_check(model, expected_remaining=kept)
    print("channels_first models passed")


# ------------------------------------------------------------------------------------
# Small models.


def conv_bn_classifier(seed: int = 0) -> keras.Model:
    """Conv-BN-ReLU-Conv-BN-ReLU-GlobalAveragePooling-Dense(softmax), input (8, 8, 3).

    Its BNs get ``randomize_batch_norms(gain=(0.6, 1.4))``: the default statistics
    scale activations up to ~60x per BN and saturate the softmax, so that two seeds'
    models give the same outputs and int8 flips near-ties.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(4, 3, padding="same")(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.Conv2D(6, 3, padding="same", use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(3, activation="softmax")(x)
    model = keras.Model(inputs, outputs, name="classifier")
    return randomize_batch_norms(model, seed, gain=(0.6, 1.4))


def tiny_model() -> keras.Model:
    """Pad-Conv-BN-ReLU-GlobalAveragePooling-Dense, input (6, 6, 3) named "image"."""
    x = keras.Input((6, 6, 3), name="image")
    h = L.ZeroPadding2D(1, name="pad")(x)
    h = L.Conv2D(4, 3, strides=2, name="conv")(h)
    h = L.BatchNormalization(name="bn")(h)
    h = L.GlobalAveragePooling2D(name="gap")(L.ReLU(name="relu")(h))
    return keras.Model(x, L.Dense(3, name="logits")(h), name="tiny")


# ------------------------------------------------------------------------------------
# Files.


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def zip_members(source: Path | bytes) -> dict[str, bytes]:
    """The members of a zip archive (a ``.keras`` file), from its path or its bytes."""
    with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def make_zip(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    """A zip archive holding ``members``, as bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------
# The console script.

KERAS_BN = Path(sys.executable).with_name("keras-bn")
if not KERAS_BN.exists():  # a virtualenv whose python is a symlink elsewhere
    KERAS_BN = Path(shutil.which("keras-bn") or "keras-bn")


def run_script(args, cwd: Path) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it on a fresh machine
    (``["python", ...]`` runs Python).

    TF_CPP_MIN_LOG_LEVEL is removed from the environment: the CLI must keep
    TensorFlow's start-up lines off the terminal by itself.
    """
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    command = [str(a) for a in args]
    if command[0] not in ("python",):
        command = [str(KERAS_BN), *command]
    else:
        command = [sys.executable, *command[1:]]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def run_many(jobs: dict[str, tuple[list, Path]]) -> dict[str, subprocess.CompletedProcess]:
    """Run console-script jobs two at a time (two cores, each pays a TensorFlow import)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_script, args, cwd) for name, (args, cwd) in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def assert_rejected(code: int, stderr: str, fragment: str, output_dir: Path | None = None):
    """Exit 2, exactly one line on stderr naming the problem, no traceback, no output."""
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("keras-bn ") and ": error: " in lines[0], lines[0]
    assert fragment in lines[0], lines[0]
    if output_dir is not None:
        assert sorted(p.name for p in output_dir.iterdir()) == [], "output left behind"


# ------------------------------------------------------------------------------------
# Statistics for validation studies, and classic converter bugs to inject.


def settle_batch_norms(model, data, seed=0, spread=0.05):
    """Trained-looking statistics that keep a deep network well conditioned.

    ``calibrate_batch_norms`` perturbing a little: moving_variance times
    10 ** U(-spread, spread), gamma ~ U(1 - 2 spread, 1 + 2 spread), beta ~
    N(0, spread). (Its default perturbation is far larger, which saturates the
    softmax of a deep classifier and leaves nothing to compare.)
    """
    return calibrate_batch_norms(
        model,
        data,
        seed,
        variance_decades=spread,
        gamma=(1 - 2 * spread, 1 + 2 * spread),
        beta_std=spread,
    )


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


# ------------------------------------------------------------------------------------
# Native ONNX export judged against the exact answer.


def export_and_judge(model, make_inputs, path, *, batch_sizes=(1, 3), fold=False):
    """Export ``model`` natively (dynamic batch) and judge onnxruntime's outputs at each
    batch size by their error against a float64 run of the model, next to Keras
    float32's own (``comparison.judge_against_exact``). ``make_inputs(batch)`` returns
    one array per model input. Returns (export result, [judged comparisons]).
    """
    import onnxruntime as ort

    from keras_bn.converters.comparison import compare_arrays, judge_against_exact
    from keras_bn.converters.onnx.export import export_onnx
    from keras_bn.converters.reference import float64_twin

    result = export_onnx(model, path, fold=fold)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    twin = None
    judged = []
    for batch in batch_sizes:
        arrays = list(make_inputs(batch))
        twin = twin or float64_twin(model, arrays)
        assert twin.exact, twin.float32_classes
        exact = twin(arrays)
        keras_outputs = outputs_of(model, arrays if len(arrays) > 1 else arrays[0])
        feed = {i.name: a for i, a in zip(session.get_inputs(), arrays, strict=True)}
        onnx_outputs = session.run(None, feed)
        assert len(onnx_outputs) == len(keras_outputs) == len(exact)
        for index, (candidate, reference, truth) in enumerate(
            zip(onnx_outputs, keras_outputs, exact, strict=True)
        ):
            comparison = compare_arrays(
                candidate, reference, name=f"output {index}", batch_size=batch
            )
            verdict = judge_against_exact(comparison, candidate, reference, truth)
            assert verdict.passed, (
                f"batch {batch}, output {index}: error {verdict.exact_error} against float64, "
                f"Keras float32's {verdict.keras_exact_error}; shape {verdict.shape}"
            )
            judged.append(verdict)
    return result, judged


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


# ------------------------------------------------------------------------------------
# Traced export (custom layers, KerasHub models).


def nested_batch_norms(model) -> list:
    """Every BatchNormalization inside ``model``, in custom layers' sublayers too."""
    from keras_bn import _keras_internals as internals

    found, seen = [], set()
    for layer in internals.flatten_layers(model):
        if isinstance(layer, L.BatchNormalization) and id(layer) not in seen:
            seen.add(id(layer))
            found.append(layer)
    return found


def float64_build(build, model):
    """``build()`` run again under the float64 dtype policy, with ``model``'s weights:
    the float64 run of a model whose layers do not clone from their configs
    (KerasHub's), built the way the original was."""
    from keras_bn.converters.reference import float64_enabled

    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        with float64_enabled():  # on JAX, float64 is float32 without it
            twin = build()
            for source, target in zip(model.weights, twin.weights, strict=True):
                value = np.asarray(keras.ops.convert_to_numpy(source))
                target.assign(value.astype(np.float64) if value.dtype.kind == "f" else value)
    finally:
        keras.config.set_dtype_policy(policy)

    def run(arrays):
        def widen(a):
            return a.astype(np.float64) if a.dtype.kind == "f" else a

        if isinstance(arrays, dict):  # by input name (a model of named inputs)
            feed = {name: widen(a) for name, a in arrays.items()}
        else:
            feed = [widen(a) for a in arrays]
            feed = feed if len(feed) > 1 else feed[0]
        with float64_enabled():
            outputs = twin(feed, training=False)
            outputs = [keras.ops.convert_to_numpy(y) for y in keras.tree.flatten(outputs)]
        assert all(y.dtype == np.float64 for y in outputs if y.dtype.kind == "f"), "not float64"
        return [np.asarray(y) for y in outputs]

    return run


def assert_exports_exactly(model, path, inputs_for_batch, *, batch_sizes=(1, 3), twin=None):
    """Export ``model`` natively with ``fold=True`` and judge onnxruntime's outputs at
    each batch size against a float64 run of the same model (the project's judge:
    the export's error at most a few times Keras float32's own, plus a floor).

    ``inputs_for_batch(n)`` gives the model's input arrays (a list, or a dict by
    input name) for batch ``n`` (called once, for the largest batch);
    ``twin(arrays)`` the float64 outputs (default: keras_bn's float64 clone).
    Returns the ExportResult.
    """
    import onnxruntime as ort

    from keras_bn.converters.comparison import compare_arrays, judge_against_exact
    from keras_bn.converters.onnx.export import export_onnx
    from keras_bn.converters.reference import float64_twin as twin_of

    result = export_onnx(model, path, fold=True)
    assert not result.used_fallback
    assert "BatchNormalization" not in result.op_counts, result.op_counts
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Keras and its float64 twin run once, on the largest batch; each smaller batch
    # is its first samples (inference is per sample), so onnxruntime still sees
    # every batch size while Keras (slow to compile shapes on JAX) runs twice only.
    arrays = inputs_for_batch(max(batch_sizes))
    if twin is None:
        twin = twin_of(model, arrays)
    named = isinstance(arrays, dict)
    structure = arrays if named or len(arrays) > 1 else arrays[0]
    expected_all = [
        np.asarray(keras.ops.convert_to_numpy(y))
        for y in keras.tree.flatten(model(structure, training=False))
    ]
    exact_all = twin(arrays)
    assert all(np.isfinite(a).all() for a in exact_all)
    for batch in batch_sizes:
        if named:
            feed = {item.name: arrays[item.name][:batch] for item in session.get_inputs()}
        else:
            feed = {
                item.name: array[:batch]
                for item, array in zip(session.get_inputs(), arrays, strict=True)
            }
        actual = session.run(None, feed)
        expected = [y[:batch] for y in expected_all]
        exact = [y[:batch] for y in exact_all]
        assert len(actual) == len(expected) == len(exact)
        for onnx_out, keras_out, exact_out in zip(actual, expected, exact, strict=True):
            assert onnx_out.shape == keras_out.shape, (onnx_out.shape, keras_out.shape)
            verdict = judge_against_exact(
                compare_arrays(onnx_out, keras_out), onnx_out, keras_out, exact_out
            )
            assert verdict.passed, (batch, verdict)
    return result


# ------------------------------------------------------------------------------------
# KerasHub models, built offline from constructor arguments (tests and benchmarks).

KERAS_HUB_IMAGE_SHAPE = (32, 32, 3)


# A small KerasHub ViTDet for KERAS_HUB_IMAGE_SHAPE images: a backbone on its own and
# SAM's image encoder.
_VIT_DET_ARGUMENTS = dict(
    image_shape=KERAS_HUB_IMAGE_SHAPE,
    patch_size=4,
    hidden_size=8,
    num_layers=2,
    global_attention_layer_indices=[1],
    intermediate_dim=16,
    num_heads=2,
    num_output_channels=8,
    window_size=4,
)


def keras_hub_models() -> dict:
    """Small KerasHub vision backbones and classifiers by name: each value builds a
    fresh model with random weights for (32, 32, 3) images (no preset download)."""
    import keras_hub

    M = keras_hub.models
    S = KERAS_HUB_IMAGE_SHAPE

    def resnet_v1():
        return M.ResNetBackbone(
            input_conv_filters=[8],
            input_conv_kernel_sizes=[3],
            stackwise_num_filters=[64, 8],
            stackwise_num_blocks=[1, 1],
            stackwise_num_strides=[1, 2],
            block_type="bottleneck_block",
            image_shape=S,
        )

    def resnet_v2_basic():
        return M.ResNetBackbone(
            input_conv_filters=[64],
            input_conv_kernel_sizes=[3],
            stackwise_num_filters=[64, 8],
            stackwise_num_blocks=[1, 1],
            stackwise_num_strides=[1, 2],
            block_type="basic_block",
            use_pre_activation=True,
            image_shape=S,
        )

    def resnet_vd():
        return M.ResNetBackbone(
            input_conv_filters=[8, 8, 8],
            input_conv_kernel_sizes=[3, 3, 3],
            stackwise_num_filters=[64, 8],
            stackwise_num_blocks=[1, 1],
            stackwise_num_strides=[1, 2],
            block_type="bottleneck_block_vd",
            image_shape=S,
        )

    def mobilenet_v3():
        return M.MobileNetBackbone(
            stackwise_expansion=[[16], [32, 24]],
            stackwise_num_blocks=[1, 2],
            stackwise_num_filters=[[8], [16, 16]],
            stackwise_kernel_size=[[3], [5, 3]],
            stackwise_num_strides=[[2], [2, 1]],
            stackwise_se_ratio=[[0.25], [None, 0.25]],
            stackwise_activation=[["relu"], ["hard_swish", "hard_swish"]],
            stackwise_padding=[[1], [2, 1]],
            output_num_filters=32,
            depthwise_filters=8,
            depthwise_stride=2,
            depthwise_residual=False,
            last_layer_filter=32,
            squeeze_and_excite=0.5,
            image_shape=S,
            input_num_filters=8,
        )

    def efficientnet():
        return M.EfficientNetBackbone(
            stackwise_width_coefficients=[1.0] * 3,
            stackwise_depth_coefficients=[1.0] * 3,
            stackwise_kernel_sizes=[3, 3, 3],
            stackwise_num_repeats=[1, 1, 1],
            stackwise_input_filters=[8, 8, 16],
            stackwise_output_filters=[8, 16, 16],
            stackwise_expansion_ratios=[1, 2, 2],
            stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0.25],
            stackwise_strides=[1, 2, 2],
            stackwise_block_types=["fused", "fused", "unfused"],
            stackwise_force_input_filters=[0] * 3,
            stackwise_nores_option=[False] * 3,
            input_shape=S,
            num_features=32,
            min_depth=4,
            depth_divisor=4,
        )

    def cspnet():
        return M.CSPNetBackbone(
            stem_filters=8,
            stem_kernel_size=3,
            stem_strides=2,
            stackwise_depth=[1, 1],
            stackwise_strides=[1, 2],
            stackwise_num_filters=[16, 32],
            block_type="dark_block",
            stage_type="csp",
            bottle_ratio=[0.5],
            block_ratio=[1.0],
            expand_ratio=[2.0],
            image_shape=S,
        )

    def densenet():
        return M.DenseNetBackbone(stackwise_num_repeats=[1, 1], image_shape=S, growth_rate=4)

    hgnetv2_arguments = dict(
        depths=[1, 1],
        embedding_size=8,
        hidden_sizes=[16, 32],
        stem_channels=[3, 8, 8],
        hidden_act="relu",
        use_learnable_affine_block=True,
        stackwise_stage_filters=[[8, 8, 16, 1, 2, 3], [16, 8, 32, 1, 2, 3]],
        apply_downsample=[False, True],
        use_lightweight_conv_block=[False, True],
        image_shape=S,
    )

    def hgnetv2():
        return M.HGNetV2Backbone(**hgnetv2_arguments)

    def vgg():
        return M.VGGBackbone(
            stackwise_num_repeats=[1, 1], stackwise_num_filters=[8, 16], image_shape=S
        )

    def vit():
        return M.ViTBackbone(
            image_shape=(32, 32, 3),
            patch_size=8,
            num_layers=2,
            num_heads=2,
            hidden_dim=16,
            mlp_dim=32,
        )

    def mit():
        return M.MiTBackbone(
            layerwise_depths=[1, 1],
            num_layers=2,
            layerwise_num_heads=[1, 2],
            layerwise_sr_ratios=[2, 1],
            max_drop_path_rate=0.0,
            layerwise_patch_sizes=[7, 3],
            layerwise_strides=[4, 2],
            image_shape=S,
            hidden_dims=[8, 16],
        )

    def deit():
        return M.DeiTBackbone(
            image_shape=(32, 32, 3),
            patch_size=8,
            num_layers=2,
            num_heads=2,
            hidden_dim=16,
            intermediate_dim=32,
        )

    def swin():
        return M.SwinTransformerBackbone(
            image_shape=(32, 32, 3),
            embed_dim=8,
            depths=[1, 1],
            num_heads=[1, 2],
            window_size=4,
            patch_size=4,
            drop_path=0.0,
        )

    def xception():
        return M.XceptionBackbone(
            stackwise_conv_filters=[[8, 16], [16, 32], [32, 32]],
            stackwise_pooling=[True, True, False],
            image_shape=S,
        )

    def dinov2():
        return M.DINOV2Backbone(
            patch_size=8,
            num_layers=2,
            hidden_dim=16,
            num_heads=2,
            intermediate_dim=32,
            image_shape=S,
            position_embedding_shape=(32, 32),
        )

    def dinov3():
        return M.DINOV3Backbone(
            patch_size=8,
            num_layers=2,
            hidden_dim=16,
            num_heads=2,
            intermediate_dim=32,
            image_shape=S,
        )

    def depth_anything():  # DINOv2 tokens to images, fused upward, resized (aligned corners)
        return M.DepthAnythingBackbone(
            image_encoder=dinov2(),
            reassemble_factors=[2, 1],
            neck_hidden_dims=[8, 16],
            fusion_hidden_dim=8,
            head_hidden_dim=8,
            head_in_index=-1,
            feature_keys=["stage1", "stage2"],
        )

    # CLIP, MetaCLIP 2 and SigLIP vision encoders take the same arguments.
    vision_encoder = dict(
        patch_size=8, hidden_dim=16, num_layers=2, num_heads=2, intermediate_dim=32, image_shape=S
    )

    def clip_vision():
        return M.CLIPVisionEncoder(**vision_encoder)

    def metaclip2_vision():
        return M.MetaCLIP2VisionEncoder(**vision_encoder)

    def siglip_vision():  # gelu_approximate Dense layers, a pooling head attending from a probe
        return M.SigLIPVisionEncoder(**vision_encoder)

    def blip2_vision():
        return M.BLIP2VisionEncoder(
            image_size=32,
            patch_size=8,
            num_layers=2,
            num_heads=2,
            hidden_dim=16,
            intermediate_dim=32,
            use_patch_bias=True,
            use_class_token=True,
            use_mha_bias=True,
            use_mlp_bias=True,
            dropout_rate=0.0,
            layer_norm_epsilon=1e-6,
            initializer_range=0.02,
        )

    def vit_det():
        return M.ViTDetBackbone(**_VIT_DET_ARGUMENTS)

    def mobilenet_v5():
        def per_block(first, second):
            return [[first], [second, second]]

        return M.MobileNetV5Backbone(
            stackwise_block_types=[["er"], ["uir", "uir"]],
            stackwise_num_blocks=[1, 2],
            stackwise_num_filters=[[8], [16, 16]],
            stackwise_strides=[[2], [2, 1]],
            stackwise_act_layers=per_block("relu", "relu"),
            stackwise_exp_ratios=per_block(2.0, 2.0),
            stackwise_se_ratios=per_block(0.0, 0.0),
            stackwise_dw_kernel_sizes=per_block(0, 3),
            stackwise_dw_start_kernel_sizes=per_block(0, 0),
            stackwise_dw_end_kernel_sizes=per_block(0, 0),
            stackwise_exp_kernel_sizes=per_block(3, 0),
            stackwise_pw_kernel_sizes=per_block(1, 0),
            stackwise_num_heads=per_block(0, 0),
            stackwise_key_dims=per_block(0, 0),
            stackwise_value_dims=per_block(0, 0),
            stackwise_kv_strides=per_block(0, 0),
            stackwise_use_cpe=per_block(False, False),
            use_msfa=False,
            num_features=32,
            norm_layer="batch_norm",
            image_shape=S,
        )

    def segformer():
        return M.SegFormerBackbone(image_encoder=mit(), projection_filters=8)

    def deeplab_v3():
        return M.DeepLabV3Backbone(
            image_encoder=resnet_v1(),
            spatial_pyramid_pooling_key="P3",
            upsampling_size=2,
            dilation_rates=[1, 2],
            low_level_feature_key="P2",
            projection_filters=8,
            image_shape=S,
        )

    def retinanet():
        encoder = M.ResNetBackbone(
            input_conv_filters=[64],
            input_conv_kernel_sizes=[3],
            stackwise_num_filters=[64, 128, 256, 512],
            stackwise_num_blocks=[1, 1, 1, 1],
            stackwise_num_strides=[1, 2, 2, 2],
            block_type="basic_block",
            image_shape=S,
        )
        return M.RetinaNetBackbone(
            image_encoder=encoder, min_level=3, max_level=5, use_p5=False, image_shape=S
        )

    def resnet_classifier():
        return M.ResNetImageClassifier(backbone=resnet_vd(), num_classes=5)

    def mobilenet_classifier():
        return M.MobileNetImageClassifier(backbone=mobilenet_v3(), num_classes=5)

    def depth_estimator():  # metric: sigmoid, then KerasHub's Multiplier layer
        return M.DepthAnythingDepthEstimator(
            backbone=depth_anything(), depth_estimation_type="metric", max_depth=10.0
        )

    def vit_classifier():
        return M.ViTImageClassifier(backbone=vit(), num_classes=5)

    def d_fine():  # HGNetV2 features, hybrid encoder, top-k query selection, deformable decoder
        features = M.HGNetV2Backbone(**{**hgnetv2_arguments, "out_features": ["stage1", "stage2"]})
        model = M.DFineBackbone(
            backbone=features,
            decoder_in_channels=[16, 16],
            encoder_hidden_dim=16,
            num_denoising=0,
            num_labels=4,
            hidden_dim=16,
            learn_initial_query=False,
            num_queries=8,
            anchor_image_size=S[:2],
            feat_strides=[4, 8],
            num_feature_levels=2,
            encoder_in_channels=[16, 32],
            encode_proj_layers=[1],
            num_attention_heads=2,
            encoder_ffn_dim=32,
            num_encoder_layers=1,
            hidden_expansion=0.5,
            depth_multiplier=0.5,
            eval_idx=-1,
            num_decoder_layers=2,
            decoder_attention_heads=2,
            decoder_ffn_dim=32,
            decoder_n_points=[2, 2],
            lqe_hidden_dim=8,
            num_lqe_layers=2,
            out_features=["stage1", "stage2"],
            image_shape=S,
            seed=0,
        )
        # D-FINE's kernels start at N(0, 0.01^2): its anchors' scores then differ by less
        # than float32 rounding, and which 8 the top-k selects is float32 noise (the
        # float64 run picks others). He-scaled kernels make the selection well separated.
        rng = np.random.default_rng(7)
        for variable in model.weights:
            if variable.path.endswith("kernel") and len(variable.shape) >= 2:
                fan_in = int(np.prod(variable.shape[:-1]))
                values = rng.standard_normal(variable.shape) / np.sqrt(fan_in)
                variable.assign(values.astype(variable.dtype))
        return model

    def d_fine_detector():  # the detector's forward pass (its box decoding is not in it)
        return M.DFineObjectDetector(backbone=d_fine(), num_classes=4)

    def vae():  # images of unknown height and width; "mode": no random sampling
        from keras_hub.src.models.vae.vae_backbone import VAEBackbone

        return VAEBackbone(  # GroupNormalization's 32 groups: 32 filters at least
            encoder_num_filters=[32, 32],
            encoder_num_blocks=[1, 1],
            decoder_num_filters=[32, 32],
            decoder_num_blocks=[1, 1],
            sampler_method="mode",
            sample_channels=8,
        )

    return {
        "resnet_v1": resnet_v1,
        "resnet_v2_basic": resnet_v2_basic,
        "resnet_vd": resnet_vd,
        "mobilenet_v3": mobilenet_v3,
        "efficientnet": efficientnet,
        "cspnet": cspnet,
        "densenet": densenet,
        "hgnetv2": hgnetv2,
        "vgg": vgg,
        "vit": vit,
        "mit": mit,
        "deit": deit,
        "swin": swin,
        "xception": xception,
        "dinov2": dinov2,
        "dinov3": dinov3,
        "depth_anything": depth_anything,
        "clip_vision": clip_vision,
        "metaclip2_vision": metaclip2_vision,
        "siglip_vision": siglip_vision,
        "blip2_vision": blip2_vision,
        "vit_det": vit_det,
        "mobilenet_v5": mobilenet_v5,
        "segformer": segformer,
        "deeplab_v3": deeplab_v3,
        "retinanet": retinanet,
        "resnet_classifier": resnet_classifier,
        "mobilenet_classifier": mobilenet_classifier,
        "vit_classifier": vit_classifier,
        "depth_estimator": depth_estimator,
        "d_fine": d_fine,
        "d_fine_detector": d_fine_detector,
        "vae": vae,
    }


def keras_hub_sam_models() -> dict:
    """Small KerasHub SAM models by name: the backbone (image embeddings and prompt
    embeddings) and the image segmenter (masks and IoU predictions), for (32, 32, 3)
    images and 32x32 mask prompts; random weights (no preset download)."""
    import keras_hub

    M = keras_hub.models
    size = KERAS_HUB_IMAGE_SHAPE[0]

    def backbone():
        return M.SAMBackbone(
            image_encoder=M.ViTDetBackbone(**_VIT_DET_ARGUMENTS),
            prompt_encoder=keras_hub.layers.SAMPromptEncoder(
                hidden_size=8,
                image_embedding_size=(size // 4, size // 4),
                input_image_size=(size, size),
                mask_in_channels=8,
            ),
            mask_decoder=keras_hub.layers.SAMMaskDecoder(
                num_layers=1,
                hidden_size=8,
                intermediate_dim=16,
                num_heads=2,
                embedding_dim=8,
                num_multimask_outputs=3,
                iou_head_depth=2,
                iou_head_hidden_dim=8,
            ),
        )

    def segmenter():
        return M.SAMImageSegmenter(backbone=backbone())

    return {"sam_backbone": backbone, "sam_segmenter": segmenter}


def sam_prompts(batch: int, points: int = 3, boxes: int = 2, seed: int = 0) -> dict:
    """Inputs of a :func:`keras_hub_sam_models` model by name: images, ``points``
    point prompts labelled -1 (padding), 0 or 1, ``boxes`` box prompts, one mask."""
    rng = np.random.default_rng(seed)
    size = KERAS_HUB_IMAGE_SHAPE[0]
    return {
        "images": rng.standard_normal((batch, *KERAS_HUB_IMAGE_SHAPE)).astype("float32"),
        "points": rng.uniform(0, size, (batch, points, 2)).astype("float32"),
        "labels": rng.integers(-1, 2, (batch, points)).astype("float32"),
        "boxes": rng.uniform(0, size, (batch, boxes, 2, 2)).astype("float32"),
        "masks": rng.standard_normal((batch, 1, size, size, 1)).astype("float32"),
    }

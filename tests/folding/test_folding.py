"""Folding BatchNormalization in Keras models, end to end, against the original model.

Every test folds a model with non-trivial BN statistics and compares the folded
model's outputs with the original's (``model(x, training=False)``), counting the
BatchNormalization layers left. TensorFlow on CPU cannot run channels_first
convolutions: the channels_first property cases run as channels_last twins of
the models (same weights), and a few channels_first models run for real in a
JAX-backend subprocess.
"""

import json
import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.checks import assert_same_outputs, fold_and_check, inputs_for, outputs_of
from support.models import (
    batch_norm_layers,
    calibrate_batch_norms,
    conv_bn_stack,
    randomize_batch_norms,
)

from keras_bn.converters import folding
from keras_bn.converters.errors import UserInputError
from keras_bn.converters.folding import (
    check_batch_norm_statistics,
    fold_batch_norms,
    plan_folds,
)
from keras_bn.converters.folding import maths as folding_math
from keras_bn.converters.folding.rules import layer_affine
from keras_bn.layers import BatchNormalization as KerasBnBatchNormalization

L = keras.layers


# ---------------------------------------------------------------------------
# Helpers.


def entry(report, name):
    (found,) = [e for e in report.entries if e.batch_norm == name]
    return found


# ---------------------------------------------------------------------------
# Property test over random layer configurations.


@st.composite
def layer_cases(draw, data_formats=("channels_last",), transpose_dilation=False):
    kind = draw(st.sampled_from(["dense", "conv", "depthwise", "separable", "transpose"]))
    data_format = draw(st.sampled_from(data_formats))
    rank = {"dense": 1, "depthwise": 2, "separable": 2}.get(kind, 3)
    rank = draw(st.integers(1, rank))
    in_channels = draw(st.integers(1, 4))
    case = {
        "kind": kind,
        "rank": rank,
        "data_format": data_format,
        "direction": draw(st.sampled_from(["forward", "backward"])),
        "activation": draw(st.sampled_from([None, None, None, "relu"])),
        "use_bias": draw(st.booleans()),
        "center": draw(st.booleans()),
        "scale": draw(st.booleans()),
        "epsilon": draw(st.sampled_from([1e-3, 1e-5, 1e-9])),
        "seed": draw(st.integers(0, 2**31)),
    }
    if kind == "dense":
        case["input_shape"] = (*([3] * draw(st.integers(0, 1))), in_channels)
        case["layer"] = {"units": draw(st.integers(1, 5))}
        return case
    ksize = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    # One stride and one dilation for every spatial axis (TensorFlow's depthwise
    # kernel takes no other), never both above 1 (Keras rejects that).
    stride = draw(st.integers(1, 3))
    dilated = stride == 1 and (kind != "transpose" or transpose_dilation)
    strides = (stride,) * rank
    dilation = (draw(st.integers(1, 2)) if dilated else 1,) * rank
    paddings = ["valid", "same"] + (["causal"] if kind == "conv" and rank == 1 else [])
    config = {
        "kernel_size": ksize,
        "strides": strides,
        "dilation_rate": dilation,
        "padding": draw(st.sampled_from(paddings)),
        "data_format": data_format,
    }
    if kind == "conv":
        groups = draw(st.sampled_from([1, 1, 2, 3]))  # grouped convs compile with XLA on TF: slow
        in_channels = groups * draw(st.integers(1, 2))
        config.update(filters=groups * draw(st.integers(1, 2)), groups=groups)
    elif kind == "depthwise":
        config["depth_multiplier"] = draw(st.integers(1, 3))
    elif kind == "separable":
        config.update(filters=draw(st.integers(1, 4)), depth_multiplier=draw(st.integers(1, 3)))
    else:
        config["filters"] = draw(st.integers(1, 4))
        # Keras miscomputes some padding="same" output_padding shapes (kernel 2,
        # stride 2, output_padding 0 fails in TensorFlow): vary it with "valid".
        if max(strides) > 1 and config["padding"] == "valid" and draw(st.booleans()):
            config["output_padding"] = tuple(draw(st.integers(0, s - 1)) for s in strides)
    spatial = tuple(
        draw(st.integers((k - 1) * d + 1, (k - 1) * d + 4))
        for k, d in zip(ksize, dilation, strict=True)
    )
    if rank == 3:
        spatial = tuple(
            min(s, max(3, (k - 1) * d + 1))
            for s, k, d in zip(spatial, ksize, dilation, strict=True)
        )
    case["input_shape"] = (
        (in_channels, *spatial) if data_format == "channels_first" else (*spatial, in_channels)
    )
    case["layer"] = config
    return case


_LAYER_CLASSES = {
    "dense": {1: L.Dense},
    "conv": {1: L.Conv1D, 2: L.Conv2D, 3: L.Conv3D},
    "depthwise": {1: L.DepthwiseConv1D, 2: L.DepthwiseConv2D},
    "separable": {1: L.SeparableConv1D, 2: L.SeparableConv2D},
    "transpose": {1: L.Conv1DTranspose, 2: L.Conv2DTranspose, 3: L.Conv3DTranspose},
}


def build_case(case):
    layer_class = _LAYER_CLASSES[case["kind"]][case["rank"]]
    layer = layer_class(
        **case["layer"], activation=case["activation"], use_bias=case["use_bias"], name="linear"
    )
    axis = 1 if case["data_format"] == "channels_first" and case["kind"] != "dense" else -1
    bn = L.BatchNormalization(
        axis=axis, center=case["center"], scale=case["scale"], epsilon=case["epsilon"], name="bn"
    )
    x = keras.Input(case["input_shape"])
    y = layer(bn(x)) if case["direction"] == "backward" else bn(layer(x))
    return keras.Model(x, y)


def expected_outcome(case):
    """(folded, blocked_by) for a case, from the rules of the issue."""
    if case["direction"] == "forward":
        if case["activation"] == "relu":
            return False, ("producer-activation", "consumer-missing")
        return True, ()
    if case["kind"] in ("separable", "transpose"):
        return False, ("producer-missing", "consumer-rule")
    config = case["layer"]
    if case["kind"] == "dense" or config["padding"] == "valid" or set(config["kernel_size"]) == {1}:
        return True, ()
    return False, ("producer-missing", "consumer-padding")


def _far_from_zero(bn):
    """Whether ``bn``'s statistics put its input more than the limit's spreads from 0
    (the random statistics do: means ~ N(0, 2), spreads down to 0.03), where a
    backward fold is declined (``consumer-precision``)."""
    mean, variance = (keras.ops.convert_to_numpy(v) for v in (bn.moving_mean, bn.moving_variance))
    scale, offset = layer_affine(bn)
    ratio = folding_math.backward_cancellation(scale, offset, mean, variance)
    return ratio > folding_math.BACKWARD_CANCELLATION_LIMIT


def channels_last_outputs(model, x):
    """Run a channels_first model as its channels_last twin (TensorFlow's CPU
    kernels only take channels_last). Keras 3 kernels have one layout whatever the
    data format, so the twin takes the same weights."""

    def clone(layer):
        config = layer.get_config()
        if config.get("data_format") == "channels_first":
            config["data_format"] = "channels_last"
        if isinstance(layer, L.BatchNormalization) and config["axis"] in (1, [1]):
            config["axis"] = -1
        return type(layer).from_config(config)

    moved = np.moveaxis(x, 1, -1)
    twin = keras.models.clone_model(
        model, input_tensors=keras.Input(batch_shape=(None, *moved.shape[1:])), clone_function=clone
    )
    twin.set_weights(model.get_weights())
    return [np.moveaxis(y, -1, 1) for y in outputs_of(twin, moved)]


def check_case(case):
    model = randomize_batch_norms(build_case(case), seed=case["seed"])
    x = inputs_for(model, seed=case["seed"])
    through_twin = (
        case["data_format"] == "channels_first"
        and case["kind"] != "dense"
        and keras.backend.backend() == "tensorflow"
    )
    # On TensorFlow a channels_first model cannot run: the report says it was not measured.
    folded, report = fold_batch_norms(model, sample_inputs=None if through_twin else x)
    should_fold, blocked_by = expected_outcome(case)
    if should_fold and case["direction"] == "backward" and _far_from_zero(model.get_layer("bn")):
        should_fold, blocked_by = False, ("producer-missing", "consumer-precision")
    (bn_entry,) = report.entries
    assert bn_entry.folded == should_fold, (case, str(report))
    assert bn_entry.blocked_by == blocked_by, (case, str(report))
    if should_fold:
        assert (bn_entry.target, bn_entry.direction) == ("linear", case["direction"])
    assert len(batch_norm_layers(folded)) == (0 if should_fold else 1)
    run = channels_last_outputs if through_twin else outputs_of
    (expected,), (received,) = run(model, x), run(folded, x)
    error = float(np.max(np.abs(received - expected)))
    assert error <= 2e-5 * max(float(np.max(np.abs(expected))), 1e-6), (case, error)
    if not through_twin:
        assert report.max_abs_diff == pytest.approx(error, abs=1e-12)
    elif report.max_abs_diff is None:  # a TensorFlow CPU kernel refused channels_first
        assert report.measured_on.startswith("not measured"), str(report)


@given(layer_cases(("channels_last", "channels_first")))
@settings(max_examples=90, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_layer_configurations_fold_exactly(case):
    check_case(case)


def run_in_subprocess(args, backend="jax"):
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "JAX_PLATFORMS": "cpu",
    }
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )


# ---------------------------------------------------------------------------
# ---------------------------------------------------------------------------
# Every rule, with bias and BN options off.


_EVERY_RULE = [
    ("Dense", lambda: L.Dense(5, use_bias=False), (4,)),
    ("Conv1D", lambda: L.Conv1D(4, 3, use_bias=False), (7, 3)),
    ("Conv2D-groups", lambda: L.Conv2D(6, 3, groups=3, use_bias=False), (7, 7, 3)),
    ("Conv3D", lambda: L.Conv3D(4, 2, use_bias=False), (4, 4, 4, 2)),
    ("DepthwiseConv1D", lambda: L.DepthwiseConv1D(3, depth_multiplier=2, use_bias=False), (7, 3)),
    (
        "DepthwiseConv2D",
        lambda: L.DepthwiseConv2D(3, depth_multiplier=3, use_bias=False),
        (7, 7, 2),
    ),
    (
        "SeparableConv1D",
        lambda: L.SeparableConv1D(4, 3, depth_multiplier=2, use_bias=False),
        (7, 3),
    ),
    (
        "SeparableConv2D",
        lambda: L.SeparableConv2D(4, 3, depth_multiplier=2, use_bias=False),
        (7, 7, 3),
    ),
    (
        "Conv1DTranspose",
        lambda: L.Conv1DTranspose(4, 3, strides=2, output_padding=1, use_bias=False),
        (5, 3),
    ),
    (
        "Conv2DTranspose",
        lambda: L.Conv2DTranspose(
            4, 3, strides=2, padding="same", output_padding=1, use_bias=False
        ),
        (5, 5, 3),
    ),
    ("Conv3DTranspose", lambda: L.Conv3DTranspose(3, 2, strides=2, use_bias=False), (3, 3, 3, 2)),
]


@pytest.mark.parametrize(
    "center,scale", [(True, True), (False, True), (True, False), (False, False)]
)
@pytest.mark.parametrize(
    "make_layer,shape", [r[1:] for r in _EVERY_RULE], ids=[r[0] for r in _EVERY_RULE]
)
def test_forward_fold_into_every_rule_adds_a_bias(make_layer, shape, center, scale):
    x = keras.Input(shape)
    y = L.BatchNormalization(center=center, scale=scale, name="bn")(make_layer()(x))
    model = keras.Model(x, y)
    folded, report = fold_and_check(model)
    (target,) = [layer for layer in folded.layers if layer.name == entry(report, "bn").target]
    assert target.use_bias and target.bias is not None
    assert not model.get_layer(target.name).use_bias  # the input model is untouched


def test_backward_folds_into_dense_conv_and_depthwise():
    x = keras.Input((9, 9, 4))
    y = L.BatchNormalization(name="bn_conv")(x)
    y = L.Conv2D(6, 3, strides=2, groups=2, activation="relu", name="conv")(y)  # valid
    y = L.BatchNormalization(name="bn_depthwise")(y)
    y = L.DepthwiseConv2D(1, depth_multiplier=2, padding="same", name="depthwise")(y)  # 1x1
    y = L.ReLU()(y)
    y = L.BatchNormalization(name="bn_dense")(y)
    y = L.Dense(3, activation="tanh", name="dense")(y)
    model = keras.Model(x, y)
    folded, report = fold_and_check(model)
    assert [(e.batch_norm, e.target, e.direction) for e in report.entries] == [
        ("bn_conv", "conv", "backward"),
        ("bn_depthwise", "depthwise", "backward"),
        ("bn_dense", "dense", "backward"),
    ]


def test_backward_folding_can_be_turned_off():
    model = keras.Sequential([keras.Input((4,)), L.BatchNormalization(name="bn"), L.Dense(3)])
    _, report = fold_and_check(model, backward=False, expected_remaining=1)
    assert entry(report, "bn").blocked_by == ("producer-missing",)


# ---------------------------------------------------------------------------
# Chains, model structures, shared layers.


def test_chains_fold_into_one_layer_from_both_sides():
    x = keras.Input((8, 8, 3))
    y = L.BatchNormalization(name="bn_in_1")(x)
    y = L.BatchNormalization(name="bn_in_2")(y)
    y = L.Conv2D(4, 3, use_bias=False, name="conv")(y)
    y = L.BatchNormalization(name="bn_out_1")(y)
    y = L.BatchNormalization(name="bn_out_2")(y)
    model = keras.Model(x, y)
    folded, report = fold_and_check(model)
    assert {e.batch_norm: (e.target, e.direction) for e in report.entries} == {
        "bn_in_1": ("conv", "backward"),
        "bn_in_2": ("conv", "backward"),
        "bn_out_1": ("conv", "forward"),
        "bn_out_2": ("conv", "forward"),
    }
    assert [layer.name for layer in folded.layers[1:]] == ["conv"]


def test_sequential_model():
    model = keras.Sequential(
        [
            keras.Input((10, 10, 3)),
            L.Conv2D(8, 3, name="conv"),
            L.BatchNormalization(),
            L.ReLU(),
            L.MaxPooling2D(),
            L.SeparableConv2D(8, 3, depth_multiplier=2, name="separable"),
            L.BatchNormalization(),
            L.Activation("relu"),
            L.GlobalAveragePooling2D(),
            L.Dense(4),
            L.BatchNormalization(),
        ]
    )
    folded, report = fold_and_check(model)
    assert report.folded_count == 3
    assert isinstance(folded, keras.Model)


def test_residual_and_concatenate_branches():
    x = keras.Input((8, 8, 4))
    a = L.BatchNormalization(name="bn_a")(L.Conv2D(4, 3, padding="same", name="conv_a")(x))
    b = L.BatchNormalization(name="bn_b")(L.Conv2D(4, 1, name="conv_b")(x))
    added = L.Add()([a, b])
    c = L.BatchNormalization(name="bn_c")(L.DepthwiseConv2D(3, padding="same", name="dw")(added))
    concat = L.Concatenate()([added, c])
    after_merge = L.BatchNormalization(name="bn_after_concat")(concat)
    out = L.Conv2D(2, 3, padding="same", name="conv_out")(L.ReLU()(after_merge))
    model = keras.Model(x, out)
    folded, report = fold_and_check(model, expected_remaining=1)
    assert entry(report, "bn_after_concat").blocked_by == ("producer-rule", "consumer-rule")
    assert "Concatenate" in entry(report, "bn_after_concat").reason


def test_nested_models_are_inlined_and_names_stay_unique():
    def block(name):
        x = keras.Input((6, 6, 3))
        y = L.BatchNormalization(name="bn")(L.Conv2D(3, 3, padding="same", name="conv")(x))
        return keras.Model(x, L.ReLU(name="relu")(y), name=name)

    x = keras.Input((6, 6, 3))
    y = block("first")(x)
    y = block("second")(y)
    model = keras.Model(x, y)
    folded, report = fold_and_check(model)
    assert [e.batch_norm for e in report.entries] == ["first/bn", "second/bn"]
    assert [e.target for e in report.entries] == ["first/conv", "second/conv"]
    names = [layer.name for layer in folded.layers]
    assert len(set(names)) == len(names)
    assert not any(isinstance(layer, keras.Model) for layer in folded.layers)


def test_lambda_layers_and_keras_ops_calls_are_kept():
    x = keras.Input((4, 5))
    y = L.Lambda(lambda t: t * 2.0, name="double")(x)  # cannot be rebuilt in safe mode
    y = L.BatchNormalization(name="bn")(L.Dense(3, name="dense")(y))
    y = keras.ops.transpose(keras.ops.add(y, 1.0), (0, 2, 1))
    model = keras.Model(x, y)
    folded, report = fold_and_check(model)
    assert entry(report, "bn").target == "dense"
    assert [layer.name for layer in folded.layers][1:] == ["double", "dense"]


def test_shared_producer_blocks_but_shared_batch_norm_folds_at_each_call():
    x1, x2 = keras.Input((5,)), keras.Input((5,))
    shared_dense = L.Dense(4, name="shared_dense")
    bn_after_shared = L.BatchNormalization(name="bn_after_shared")
    shared_bn = L.BatchNormalization(name="shared_bn")
    a = bn_after_shared(shared_dense(x1))
    b = shared_dense(x2)
    c = shared_bn(L.Dense(4, name="dense_1")(a))
    d = shared_bn(L.Dense(4, name="dense_2")(b))
    model = keras.Model([x1, x2], [c, d])
    folded, report = fold_and_check(model)
    assert sorted((e.batch_norm, e.target, e.direction) for e in report.entries) == [
        ("bn_after_shared", "dense_1", "backward"),
        ("shared_bn", "dense_1", "forward"),
        ("shared_bn", "dense_2", "forward"),
    ]
    # The shared layer stays shared (one layer, two calls) in the folded model.
    assert [layer.name for layer in folded.layers].count("shared_dense") == 1


# ---------------------------------------------------------------------------
# Every precondition blocks its fold, and the report names it.


def _functional(build, shape=(6, 6, 3)):
    x = keras.Input(shape)
    return keras.Model(x, build(x))


class _CustomBatchNormalization(L.BatchNormalization):
    pass


def _fanout(x):
    y = L.Conv2D(3, 3, name="conv")(x)
    return L.Add()([L.BatchNormalization(name="bn")(y), L.ReLU()(y)])


def _model_output_fanout():
    x = keras.Input((6, 6, 3))
    y = L.Conv2D(3, 3, name="conv")(x)
    return keras.Model(x, [y, L.BatchNormalization(name="bn")(y)])


def _shared_producer():
    x1, x2 = keras.Input((5,)), keras.Input((5,))
    dense = L.Dense(4, name="dense")
    y = L.ReLU()(L.BatchNormalization(name="bn")(dense(x1)))
    return keras.Model([x1, x2], [y, dense(x2)])


def _lora_dense():
    dense = L.Dense(3, name="dense")
    x = keras.Input((4,))
    y = L.BatchNormalization(name="bn")(dense(x))
    dense.enable_lora(2)
    return keras.Model(x, y)


_PRECONDITIONS = [
    (
        "batch-norm-class",
        lambda: _functional(lambda x: _CustomBatchNormalization(name="bn")(L.Conv2D(3, 3)(x))),
        ("batch-norm-class",),
        "_CustomBatchNormalization",
    ),
    (
        "batch-norm-training",
        lambda: _functional(
            lambda x: L.BatchNormalization(name="bn")(L.Conv2D(3, 3)(x), training=True)
        ),
        ("batch-norm-training",),
        "training=True",
    ),
    (
        "batch-norm-axis conv",
        lambda: _functional(
            lambda x: L.BatchNormalization(axis=1, name="bn")(L.Conv2D(3, 3, name="conv")(x))
        ),
        ("batch-norm-axis", "consumer-missing"),
        "not the channel axis 3 of 'conv'",
    ),
    (
        "batch-norm-axis dense rank 3",
        lambda: _functional(
            lambda x: L.BatchNormalization(axis=1, name="bn")(L.Dense(3)(x)), (4, 5)
        ),
        ("batch-norm-axis", "consumer-missing"),
        "BN axes (1,)",
    ),
    (
        "batch-norm-axis multi-axis keras_bn",
        lambda: _functional(
            lambda x: KerasBnBatchNormalization(axis=(2, 3), name="bn")(L.Conv2D(3, 3)(x))
        ),
        ("batch-norm-axis", "consumer-missing"),
        "BN axes (2, 3)",
    ),
    (
        "producer-activation conv-transpose strides output_padding",
        lambda: _functional(
            lambda x: L.BatchNormalization(name="bn")(
                L.Conv2DTranspose(
                    3, 3, strides=2, output_padding=1, activation="relu", name="deconv"
                )(x)
            )
        ),
        ("producer-activation", "consumer-missing"),
        "'deconv' has activation 'relu'",
    ),
    (
        "producer-activation grouped conv",
        lambda: _functional(
            lambda x: L.BatchNormalization(name="bn")(
                L.Conv2D(6, 3, groups=3, activation="relu6", name="conv")(x)
            )
        ),
        ("producer-activation", "consumer-missing"),
        "activation 'relu6'",
    ),
    (
        "producer-rule",
        lambda: _functional(lambda x: L.BatchNormalization(name="bn")(L.MaxPooling2D()(x))),
        ("producer-rule", "consumer-missing"),
        "MaxPooling2D",
    ),
    (
        "producer-weights lora",
        _lora_dense,
        ("producer-weights", "consumer-missing"),
        "lora_kernel_a",
    ),
    (
        "producer-shared",
        _shared_producer,
        ("producer-shared", "consumer-rule"),
        "'dense' is called at 2 places",
    ),
    (
        "producer-fanout",
        lambda: _functional(_fanout),
        ("producer-fanout", "consumer-rule"),
        "feeds 2 layers",
    ),
    (
        "producer-fanout model output",
        _model_output_fanout,
        ("producer-fanout", "consumer-missing"),
        "is a model output",
    ),
    (
        "consumer-fanout",
        lambda: _functional(
            lambda x: L.Add()(
                [L.Conv2D(3, 1)(y := L.BatchNormalization(name="bn")(x)), L.Conv2D(3, 1)(y)]
            )
        ),
        ("producer-missing", "consumer-fanout"),
        "feeds 2 layers",
    ),
    (
        "consumer-padding grouped conv",
        lambda: _functional(
            lambda x: L.Conv2D(6, 3, padding="same", groups=3)(L.BatchNormalization(name="bn")(x))
        ),
        ("producer-missing", "consumer-padding"),
        "padding='same' with kernel_size=(3, 3)",
    ),
    (
        "consumer-padding causal",
        lambda: _functional(
            lambda x: L.Conv1D(2, 2, padding="causal")(L.BatchNormalization(name="bn")(x)), (5, 3)
        ),
        ("producer-missing", "consumer-padding"),
        "padding='causal'",
    ),
    (
        "consumer-padding depthwise",
        lambda: _functional(
            lambda x: L.DepthwiseConv2D(3, padding="same")(L.BatchNormalization(name="bn")(x))
        ),
        ("producer-missing", "consumer-padding"),
        "padding='same'",
    ),
    (
        "consumer-rule separable depth_multiplier",
        lambda: _functional(
            lambda x: L.SeparableConv2D(4, 3, depth_multiplier=2, name="sep")(
                L.BatchNormalization(name="bn")(x)
            )
        ),
        ("producer-missing", "consumer-rule"),
        "SeparableConv2D 'sep' has no backward fold rule",
    ),
    (
        "consumer-rule conv-transpose strides output_padding",
        lambda: _functional(
            lambda x: L.Conv2DTranspose(3, 3, strides=2, output_padding=1)(
                L.BatchNormalization(name="bn")(x)
            )
        ),
        ("producer-missing", "consumer-rule"),
        "Conv2DTranspose",
    ),
    (
        "batch-norm-axis backward conv",
        lambda: _functional(lambda x: L.Conv2D(3, 1)(L.BatchNormalization(axis=2, name="bn")(x))),
        ("producer-missing", "batch-norm-axis"),
        "BN axes (2,)",
    ),
    (
        "consumer-missing",
        lambda: _functional(lambda x: L.BatchNormalization(name="bn")(L.ReLU()(x))),
        ("producer-rule", "consumer-missing"),
        "model output only",
    ),
]


@pytest.mark.parametrize(
    "make_model,blocked_by,reason",
    [p[1:] for p in _PRECONDITIONS],
    ids=[p[0] for p in _PRECONDITIONS],
)
def test_precondition_blocks_fold_and_is_reported(make_model, blocked_by, reason):
    model = make_model()
    folded, report = fold_and_check(model, expected_remaining=1)
    bn_entry = entry(report, "bn")
    assert not bn_entry.folded and bn_entry.target is None and bn_entry.direction is None
    assert bn_entry.blocked_by == blocked_by
    assert reason in bn_entry.reason
    assert all(name in folding.PRECONDITIONS for name in blocked_by)
    assert plan_folds(model).entries == report.entries


def test_shared_consumer_is_reported_as_shared():
    x = keras.Input((6, 6, 3))
    conv = L.Conv2D(3, 1, name="conv")
    y = L.BatchNormalization(name="bn")(x)
    model = keras.Model(x, L.Add()([conv(y), conv(x)]))
    _, report = fold_and_check(model, expected_remaining=1)
    assert entry(report, "bn").blocked_by == ("producer-missing", "consumer-shared")
    assert "'conv' is called at 2 places" in entry(report, "bn").reason


def test_consumer_lora_weights_block_backward_fold():
    dense = L.Dense(3, name="dense")
    x = keras.Input((4,))
    model = keras.Model(x, dense(L.BatchNormalization(name="bn")(x)))
    dense.enable_lora(2)
    _, report = fold_and_check(model, expected_remaining=1)
    assert entry(report, "bn").blocked_by == ("producer-missing", "consumer-weights")


def test_training_true_folds_when_layer_is_frozen():
    x = keras.Input((4,))
    frozen = L.BatchNormalization(name="frozen")
    frozen.trainable = False
    stats_frozen = KerasBnBatchNormalization(freeze_statistics=True, name="stats_frozen")
    y = stats_frozen(frozen(L.Dense(3)(x), training=True), training=True)
    fold_and_check(keras.Model(x, y))


# ---------------------------------------------------------------------------
# keras_bn.BatchNormalization.


def test_keras_bn_layer_folds_including_single_entry_axis_tuple():
    x = keras.Input((6, 6, 3))
    y = KerasBnBatchNormalization(axis=[3], name="ours_list_axis")(L.Conv2D(4, 3)(x))
    y = KerasBnBatchNormalization(momentum=None, scale=False, name="ours_cumulative")(
        L.Conv2D(4, 1)(y)
    )
    y = L.Dense(2)(KerasBnBatchNormalization(axis=-1, unbiased_moving_variance=True)(y))
    folded, report = fold_and_check(keras.Model(x, y))
    assert report.folded_count == 3


# ---------------------------------------------------------------------------
# The input model is untouched; the folded model is independent, saves and reloads.


def test_input_model_is_not_mutated_and_folded_model_is_independent():
    x = keras.Input((6, 6, 3))
    y = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, use_bias=False, name="conv")(x))
    y = L.Dense(2, name="dense")(L.ReLU(name="relu")(y))
    model = randomize_batch_norms(keras.Model(x, y))
    before = [np.copy(w) for w in model.get_weights()]
    config = model.get_config()
    folded, _ = fold_batch_norms(model)
    assert model.get_config() == config
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    for name in ("conv", "relu", "dense"):
        assert model.get_layer(name) is not folded.get_layer(name)
        assert model.get_layer(name).output is not None  # still one inbound node
    folded.get_layer("dense").kernel.assign(np.zeros((4, 2)))
    assert np.any(keras.ops.convert_to_numpy(model.get_layer("dense").kernel) != 0)


_JAX_SCRIPT = """
import sys

class BlockKerasBn:
    def find_spec(self, name, path=None, target=None):
        if name == "keras_bn" or name.startswith("keras_bn."):
            raise ImportError("keras_bn is blocked in this test")

blocker = BlockKerasBn()
sys.meta_path.insert(0, blocker)
import keras
import numpy as np

try:
    model = keras.saving.load_model(sys.argv[1])
    x, expected = np.load(sys.argv[2]), np.load(sys.argv[3])
    received = np.asarray(model(x, training=False))
    error = np.max(np.abs(received - expected)) / np.max(np.abs(expected))
    assert error < 1e-5, error
    print("loaded without keras_bn")
except Exception as error:
    print("load failed:", repr(error))
sys.meta_path.remove(blocker)
sys.path.insert(0, sys.argv[4])
from support.checks import check_channels_first_models

check_channels_first_models()
"""


def _all_folded_keras_bn_model():
    x = keras.Input((6, 6, 3))
    y = KerasBnBatchNormalization(name="ours")(L.Conv2D(4, 3)(x))
    y = L.Dense(2)(KerasBnBatchNormalization(name="ours_backward")(L.ReLU()(y)))
    return randomize_batch_norms(keras.Model(x, y))


@pytest.fixture(scope="module")
def saved_and_jax_checks(tmp_path_factory):
    """Save a folded keras_bn model; one JAX subprocess (one startup) then loads it
    with keras_bn blocked, and runs the channels_first models."""
    directory = tmp_path_factory.mktemp("folding")
    model = _all_folded_keras_bn_model()
    folded, report = fold_batch_norms(model)
    path = directory / "folded.keras"
    folded.save(path)
    data = inputs_for(model)
    np.save(directory / "x.npy", data)
    np.save(directory / "y.npy", outputs_of(folded, data)[0])
    result = run_in_subprocess(
        [
            "-c",
            _JAX_SCRIPT,
            str(path),
            str(directory / "x.npy"),
            str(directory / "y.npy"),
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # tests/
        ]
    )
    return model, folded, report, path, result


def test_folded_model_saves_reloads_and_needs_no_keras_bn(saved_and_jax_checks):
    model, folded, report, path, result = saved_and_jax_checks
    assert report.not_folded_count == 0
    with zipfile.ZipFile(path) as archive:
        assert "keras_bn" not in archive.read("config.json").decode()
    data = inputs_for(model)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(outputs_of(reloaded, data)[0], outputs_of(folded, data)[0])
    assert "loaded without keras_bn" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def test_channels_first_models_fold_exactly_on_jax(saved_and_jax_checks):
    result = saved_and_jax_checks[-1]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "channels_first models passed" in result.stdout


def test_folded_model_keeping_a_keras_bn_layer_reloads_with_it(tmp_path):
    x = keras.Input((5,))
    y = KerasBnBatchNormalization(momentum=None, name="kept")(L.Dense(3, activation="relu")(x))
    model = randomize_batch_norms(keras.Model(x, y))
    folded, report = fold_batch_norms(model)
    assert report.not_folded_count == 1
    path = tmp_path / "kept.keras"
    folded.save(path)
    reloaded = keras.saving.load_model(path)
    assert type(reloaded.get_layer("kept")) is KerasBnBatchNormalization
    data = inputs_for(model)
    np.testing.assert_allclose(
        outputs_of(reloaded, data)[0], outputs_of(model, data)[0], rtol=1e-6, atol=1e-6
    )


# ---------------------------------------------------------------------------
# Statistics check.


@pytest.mark.parametrize(
    "weight,value,message",
    [
        ("moving_mean", np.nan, "moving_mean=nan in channel 2"),
        ("gamma", np.inf, "gamma=inf in channel 2"),
        ("moving_variance", -0.5, "moving_variance=-0.5 in channel 2; expected a variance >= 0"),
    ],
    ids=["nan-mean", "inf-gamma", "negative-variance"],
)
def test_bad_statistics_raise_user_input_error_naming_layer_and_channel(weight, value, message):
    inner = keras.Sequential(
        [keras.Input((4,)), L.Dense(4), L.BatchNormalization(name="bn")], name="inner"
    )
    x = keras.Input((4,))
    model = keras.Model(x, inner(x))
    values = keras.ops.convert_to_numpy(getattr(inner.get_layer("bn"), weight)).copy()
    values[2] = value
    getattr(inner.get_layer("bn"), weight).assign(values)
    with pytest.raises(UserInputError, match="'inner/bn'") as error:
        check_batch_norm_statistics(model)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    with pytest.raises(UserInputError):
        fold_batch_norms(model)


def test_zero_variance_with_zero_epsilon_is_rejected():
    model = keras.Sequential(
        [keras.Input((3,)), L.Dense(3), L.BatchNormalization(epsilon=0.0, name="bn")]
    )
    model.get_layer("bn").moving_variance.assign(np.array([1.0, 0.0, 1.0]))
    with pytest.raises(UserInputError, match="moving_variance \\+ epsilon = 0 in channel 1"):
        check_batch_norm_statistics(model)


def test_good_statistics_pass():
    check_batch_norm_statistics(randomize_batch_norms(_model_output_fanout()))


# ---------------------------------------------------------------------------
# The report.


def test_report_counts_table_json_and_measurement():
    x = keras.Input((6, 6, 3))
    y = L.BatchNormalization(name="bn_folded")(L.Conv2D(4, 3, name="conv")(x))
    y = L.BatchNormalization(name="bn_kept")(L.ReLU()(y))
    model = randomize_batch_norms(keras.Model(x, y))
    folded, report = fold_batch_norms(model)
    assert (report.folded_count, report.not_folded_count) == (1, 1)
    # Measured by default on generated inputs; the value is the real difference.
    assert report.measured_on.startswith("generated inputs")
    generated = np.random.default_rng(0).standard_normal((2, 6, 6, 3)).astype("float32")
    difference = np.max(np.abs(outputs_of(model, generated)[0] - outputs_of(folded, generated)[0]))
    assert report.max_abs_diff == pytest.approx(float(difference), abs=1e-12)
    data = json.loads(report.to_json())
    assert data["folded_count"] == 1 and data["not_folded_count"] == 1
    assert data["entries"][0] == {
        "batch_norm": "bn_folded",
        "folded": True,
        "target": "conv",
        "direction": "forward",
        "reason": None,
        "blocked_by": [],
    }
    assert data["entries"][1]["blocked_by"] == ["producer-rule", "consumer-missing"]
    text = str(report)
    assert "1 folded, 1 not folded" in text
    assert "bn_folded" in text and "forward" in text and "conv" in text
    assert "producer-rule: ReLU" in text
    assert "max abs output difference" in text


def test_unknown_input_shape_is_not_measured_unless_sample_inputs_given():
    x = keras.Input((None, 3))
    model = randomize_batch_norms(keras.Model(x, L.BatchNormalization()(L.Conv1D(2, 3)(x))))
    _, report = fold_batch_norms(model)
    assert report.max_abs_diff is None and report.measured_on is None
    assert "max abs" not in str(report)
    _, report = fold_batch_norms(model, sample_inputs=np.ones((1, 7, 3), "float32"))
    assert report.measured_on == "sample_inputs" and report.max_abs_diff < 1e-4


def test_fp16_risks_name_layer_channel_and_value():
    x = keras.Input((6, 6, 2))
    y = L.BatchNormalization(epsilon=1e-12, name="bn")(L.Conv2D(3, 3, name="conv")(x))
    model = keras.Model(x, y)
    bn = model.get_layer("bn")
    bn.moving_variance.assign(np.array([1.0, 1e-12, 1.0]))  # channel 1: scale ~ 7e5
    bn.gamma.assign(np.array([1.0, 1.0, 1e-7]))  # channel 2: weights ~ 1e-8
    folded, report = fold_batch_norms(model)
    assert [(r.layer, r.channel, r.kind) for r in report.fp16_risks] == [
        ("conv", 1, "overflow"),
        ("conv", 2, "underflow"),
    ]
    kernel = keras.ops.convert_to_numpy(folded.get_layer("conv").kernel)
    assert report.fp16_risks[0].value == pytest.approx(np.max(np.abs(kernel[..., 1])), rel=1e-6)
    with np.errstate(over="ignore"):
        assert np.isinf(kernel[..., 1].astype(np.float16)).any()
    assert plan_folds(model).fp16_risks == report.fp16_risks
    assert "conv channel 1: overflow" in str(report)


def test_plan_folds_matches_fold_without_building():
    model = keras.Sequential(
        [keras.Input((4,)), L.Dense(3), L.BatchNormalization(), L.ReLU(), L.BatchNormalization()]
    )
    randomize_batch_norms(model)
    plan = plan_folds(model)
    _, report = fold_batch_norms(model)
    assert plan.entries == report.entries
    assert plan.max_abs_diff is None


# ---------------------------------------------------------------------------
# Numerics: float64 folding, rounded once.


def test_float64_model_folds_to_float64_precision():
    x = keras.Input((6, 6, 3), dtype="float64")
    y = L.Conv2D(4, 3, dtype="float64", name="conv")(x)
    y = L.BatchNormalization(dtype="float64", epsilon=1e-12)(y)
    model = keras.Model(x, y)
    data = inputs_for(model).astype("float64")
    folded, _ = fold_and_check(model, data, rtol=1e-12)
    assert folded.get_layer("conv").kernel.dtype == "float64"


def test_twenty_conv_bn_blocks_fold_within_float32_rounding():
    """20 x (Conv2D 3x3 -> BN(epsilon=1e-10) -> ReLU), 8 channels, conv output
    channels scaled over 8 decades so the moving variances span 4e-9 .. 6e7.

    Measured on this seed (BENCHMARKS.md, section 2, has seeds 0-3): max abs
    error / max abs output against a float64 run of the same model is 4.9e-6 for
    the unfolded float32 model and 7.7e-7 for the folded one; folded vs unfolded
    differ by 5.2e-6. Folding in float64 and rounding once leaves the folded model
    at least as accurate as the original (the original loses bits in BN's
    ``x - moving_mean`` where a channel's mean dwarfs its spread).
    """
    data = np.random.default_rng(3).normal(size=(4, 12, 12, 8))
    model = conv_bn_stack(20, 8, "float32", seed=0)
    calibrate_batch_norms(model, data.astype("float32"), seed=1)
    variances = np.concatenate(
        [keras.ops.convert_to_numpy(bn.moving_variance) for bn in batch_norm_layers(model)]
    )
    assert variances.max() / variances.min() > 1e15
    reference = conv_bn_stack(20, 8, "float64", seed=0)
    reference.set_weights([w.astype("float64") for w in model.get_weights()])
    expected = outputs_of(reference, data)[0]
    folded, report = fold_batch_norms(model, sample_inputs=data.astype("float32"))
    assert report.folded_count == 20 and not batch_norm_layers(folded)
    # The BN undoes each conv channel's gain, so folded weights are O(1): no fp16 risk.
    assert report.fp16_risks == []
    magnitude = np.max(np.abs(expected))
    original_error = (
        np.max(np.abs(outputs_of(model, data.astype("float32"))[0] - expected)) / magnitude
    )
    folded_error = (
        np.max(np.abs(outputs_of(folded, data.astype("float32"))[0] - expected)) / magnitude
    )
    assert original_error < 1e-5  # float32 rounding through 20 blocks, no blow-up
    assert folded_error <= original_error
    assert report.max_abs_diff / magnitude < 1e-5


def test_folded_weights_are_float64_folds_rounded_once():
    x = keras.Input((5, 5, 3))
    model = keras.Model(
        x, L.BatchNormalization(epsilon=1e-9, name="bn")(L.Conv2D(4, 3, name="conv")(x))
    )
    randomize_batch_norms(model, variance_decades=(-8.0, 4.0))
    folded, _ = fold_batch_norms(model)
    bn = model.get_layer("bn")
    stats = [
        keras.ops.convert_to_numpy(v).astype(np.float64)
        for v in (bn.moving_mean, bn.moving_variance, bn.gamma, bn.beta)
    ]
    scale = stats[2] / np.sqrt(stats[1] + 1e-9)
    offset = stats[3] - stats[0] * scale
    conv = model.get_layer("conv")
    kernel = keras.ops.convert_to_numpy(conv.kernel).astype(np.float64) * scale
    bias = keras.ops.convert_to_numpy(conv.bias).astype(np.float64) * scale + offset
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(folded.get_layer("conv").kernel), kernel.astype(np.float32)
    )
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(folded.get_layer("conv").bias), bias.astype(np.float32)
    )


def test_measure_false_skips_the_comparison_and_folds_the_same():
    x = keras.Input((6, 6, 3))
    y = L.BatchNormalization()(L.Conv2D(4, 3, use_bias=False)(x))
    y = L.BatchNormalization()(L.Dense(5)(L.ReLU()(y)))
    model = randomize_batch_norms(keras.Model(x, y))
    folded, report = fold_batch_norms(model, measure=False)
    assert report.max_abs_diff is None and report.folded_count == 2
    assert report.measured_on.startswith("not measured")
    assert "max abs output difference: not measured" in str(report)
    assert batch_norm_layers(folded) == []
    assert_same_outputs(model, folded, inputs_for(model))
    with pytest.raises(ValueError, match="measure=False and sample_inputs"):
        fold_batch_norms(model, measure=False, sample_inputs=inputs_for(model))


def test_progress_is_told_each_layer_call_of_the_folded_model():
    x = keras.Input((6, 6, 3))
    y = L.BatchNormalization()(L.Conv2D(4, 3, use_bias=False)(x))
    y = L.BatchNormalization()(L.Dense(5)(L.ReLU()(y)))
    model = randomize_batch_norms(keras.Model(x, y))
    calls = []
    folded, _ = fold_batch_norms(model, measure=False, progress=lambda *c: calls.append(c))
    layers = [layer for layer in folded.layers if not isinstance(layer, L.InputLayer)]
    assert len(layers) == 3  # Conv2D, ReLU, Dense: both BN folded
    assert calls == [(done, 3) for done in (1, 2, 3)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_clones_of_any_float_dtype_get_their_folded_weights(dtype):
    """The clones start from NumPy zeros of their variables' dtype (bfloat16 from
    ml_dtypes), then take the folded weights rounded to it."""
    x = keras.Input((6, 6, 3), dtype=dtype)
    y = L.Conv2D(4, 3, use_bias=False, dtype=dtype, name="conv")(x)
    y = L.BatchNormalization(dtype=dtype)(y)
    model = randomize_batch_norms(keras.Model(x, y))
    folded, report = fold_batch_norms(model, measure=False)
    assert report.folded_count == 1 and batch_norm_layers(folded) == []
    conv = folded.get_layer("conv")
    assert {keras.backend.standardize_dtype(w.dtype) for w in conv.weights} == {dtype}
    scale, offset = _affine(model.layers[-1])
    kernel = keras.ops.convert_to_numpy(model.get_layer("conv").kernel).astype(np.float64)
    expected = folding_math.round_to_dtype(kernel * scale, dtype)
    got = keras.ops.convert_to_numpy(conv.kernel)
    np.testing.assert_array_equal(got.astype(np.float64), expected.astype(np.float64))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(conv.bias).astype(np.float64),
        folding_math.round_to_dtype(offset, dtype).astype(np.float64),
    )


def _affine(bn) -> tuple[np.ndarray, np.ndarray]:
    """The stock BN's inference map in float64: x * scale + offset."""
    values = {v.name: keras.ops.convert_to_numpy(v).astype(np.float64) for v in bn.weights}
    scale = values["gamma"] / np.sqrt(values["moving_variance"] + bn.epsilon)
    return scale, values["beta"] - values["moving_mean"] * scale


@pytest.mark.parametrize(
    "initializers",
    [
        {"kernel_initializer": "he_normal", "bias_initializer": "ones"},
        {"kernel_initializer": keras.initializers.RandomUniform(-0.3, 0.2, seed=7)},
    ],
    ids=["by-name", "seeded-object"],
)
def test_folded_layers_keep_the_original_initializer_configs(initializers):
    # Clones are built with zeros initializers (their weights are overwritten at
    # once); the configs, and so a saved .keras file, must not show it.
    x = keras.Input((6, 6, 3))
    y = L.BatchNormalization(gamma_initializer="random_normal")(
        L.Conv2D(4, 3, name="conv", **initializers)(x)
    )
    y = L.DepthwiseConv2D(3, depthwise_initializer="lecun_uniform", name="depthwise")(y)
    y = L.Dense(3, name="dense", **initializers)(L.ReLU()(y))
    y = L.BatchNormalization(gamma_initializer="random_normal", name="bn_kept")(L.ReLU()(y))
    model = randomize_batch_norms(keras.Model(x, y))
    folded, _ = fold_batch_norms(model, measure=False)
    assert batch_norm_layers(folded) == [folded.get_layer("bn_kept")]
    for name in ("conv", "depthwise", "dense"):
        original, copy = model.get_layer(name).get_config(), folded.get_layer(name).get_config()
        keys = [key for key in original if key.endswith("_initializer")]
        assert keys and all(copy[key] == original[key] for key in keys), name
    assert folded.get_layer("bn_kept").get_config() == model.get_layer("bn_kept").get_config()
    assert_same_outputs(model, folded, inputs_for(model))


def test_backward_fold_of_readings_far_from_zero_is_declined(tmp_path):
    """A BN on raw sensor readings (1000 +- 1) folded into the Dense after it made the
    Dense sum terms 1000x its output in float32: the export failed validation against
    float64 (error 8x Keras float32's own). The plan now declines that fold, names why,
    and the export with the BN kept validates; a centred BN still folds backward."""
    from keras_bn.converters.onnx.export import export_onnx
    from keras_bn.converters.validation import validate_onnx

    rng = np.random.default_rng(0)

    def sensors(center):
        inputs = keras.Input((64,), name="sensors")
        bn = L.BatchNormalization(name="bn")
        x = L.Dense(32, activation="relu", name="d1")(bn(inputs))
        model = keras.Model(inputs, L.Dense(4, name="d2")(x))
        mean = center * (1 + rng.uniform(-0.2, 0.2, 64))
        std = rng.uniform(0.5, 2.0, 64)
        bn.moving_mean.assign(mean.astype("float32"))
        bn.moving_variance.assign((std**2).astype("float32"))
        return model, (mean + std * rng.standard_normal((64, 64))).astype("float32")

    raw, readings = sensors(1000.0)
    folded, report = fold_batch_norms(raw)
    assert entry(report, "bn").blocked_by == ("producer-missing", "consumer-precision")
    assert "lose float32 precision" in entry(report, "bn").reason
    assert len(batch_norm_layers(folded)) == 1
    export_onnx(raw, tmp_path / "raw.onnx", fold=True)
    assert validate_onnx(raw, tmp_path / "raw.onnx", inputs=readings), "kept BN judged exact"
    centred, _ = sensors(0.5)
    _, report = fold_batch_norms(centred)
    assert (entry(report, "bn").target, entry(report, "bn").direction) == ("d1", "backward")

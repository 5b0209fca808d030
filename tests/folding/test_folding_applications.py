"""Folding real architectures: Keras Applications built with ``weights=None``.

Each model gets non-trivial BatchNormalization statistics (random gamma and beta,
moving statistics measured on data as training leaves them, then variances
rescaled over four decades with gamma compensating), is folded, and is checked
three ways: every BN that follows a linear-activation convolution is folded into
that convolution, the others are reported with their reasons, and the folded
model's outputs are as close to a float64 run of the original as the original's
own float32 outputs are.
"""

import keras
import numpy as np
import pytest
from support.checks import float64_twin

from keras_bn.converters import graph as graph_lib
from keras_bn.converters.folding import fold_batch_norms

L = keras.layers
CONVOLUTIONS = (L.Conv2D, L.DepthwiseConv2D, L.SeparableConv2D)

pytestmark = pytest.mark.slow


def _set_statistics(model, data, seed):
    rng = np.random.default_rng(seed)
    batch_norms = [layer for layer in model.layers if isinstance(layer, L.BatchNormalization)]
    for layer in batch_norms:
        shape = tuple(layer.gamma.shape)
        layer.gamma.assign(rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape))
        layer.beta.assign(rng.normal(0.0, 0.5, shape))
        layer.momentum = 0.0
    model(data, training=True)  # moving statistics := this batch's statistics
    for layer in batch_norms:
        variance = keras.ops.convert_to_numpy(layer.moving_variance).astype(np.float64)
        factor = 10.0 ** rng.uniform(-2.0, 2.0, variance.shape)
        gamma = keras.ops.convert_to_numpy(layer.gamma).astype(np.float64)
        epsilon = layer.epsilon
        # Same inference affine, statistics spread over four more decades.
        layer.gamma.assign(gamma * np.sqrt((variance * factor + epsilon) / (variance + epsilon)))
        layer.moving_variance.assign(variance * factor)
    return batch_norms


def _expected_targets(model):
    """BN call -> the convolution it should fold into (None: should stay).

    The issue's criterion, read off the graph: the BN's input comes from a
    convolution with a linear activation whose output feeds nothing else.
    """
    graph = graph_lib.flatten(model)
    expected = {}
    for node in graph.nodes:
        if not isinstance(node.layer, L.BatchNormalization):
            continue
        tensor = node.inputs[0]
        producer = tensor.producer
        follows_linear_conv = (
            producer is not None
            and isinstance(producer.layer, CONVOLUTIONS)
            and producer.layer.activation is keras.activations.linear
            and len(tensor.consumers) == 1
        )
        expected[node.name] = producer.name if follows_linear_conv else None
    return expected


ARCHITECTURES = [
    # (constructor, input size, BN count, expected not folded)
    (keras.applications.ResNet50, 64, 53, 0),
    (keras.applications.MobileNetV2, 64, 52, 0),
    # 58 dense-block input BNs (after a concatenation, before ReLU), 3 transition BNs
    # (same) and the final "bn" stay; the stem and the 58 BNs after 1x1 convs fold.
    (keras.applications.DenseNet121, 64, 121, 62),
    (keras.applications.Xception, 71, 40, 0),
]


@pytest.mark.parametrize(
    "constructor,size,batch_norm_count,not_folded",
    ARCHITECTURES,
    ids=[architecture[0].__name__ for architecture in ARCHITECTURES],
)
def test_application_folds_every_batch_norm_after_a_linear_conv(
    constructor, size, batch_norm_count, not_folded
):
    model = constructor(weights=None, include_top=False, input_shape=(size, size, 3), pooling="avg")
    rng = np.random.default_rng(0)
    calibration = rng.normal(size=(4, size, size, 3)).astype("float32")
    batch_norms = _set_statistics(model, calibration, seed=1)
    assert len(batch_norms) == batch_norm_count
    variances = np.concatenate(
        [keras.ops.convert_to_numpy(bn.moving_variance) for bn in batch_norms]
    )
    assert np.percentile(variances, 99) / np.percentile(variances, 1) > 1e3

    data = rng.normal(size=(2, size, size, 3)).astype("float32")
    folded, report = fold_batch_norms(model, sample_inputs=data)

    expected = _expected_targets(model)
    received = {entry.batch_norm: entry.target for entry in report.entries}
    assert received == expected
    assert report.not_folded_count == not_folded
    assert all(e.direction == "forward" for e in report.entries if e.folded)
    for entry in report.entries:
        if not entry.folded:
            assert entry.blocked_by[0] in ("producer-rule", "producer-fanout"), entry
            assert entry.blocked_by[1] == "consumer-rule", entry  # a ReLU follows
    remaining = [layer for layer in folded.layers if isinstance(layer, L.BatchNormalization)]
    assert len(remaining) == not_folded

    reference = np.asarray(float64_twin(model)(data.astype(np.float64), training=False))
    magnitude = np.max(np.abs(reference))
    original = np.asarray(model(data, training=False))
    original_error = np.max(np.abs(original - reference)) / magnitude
    folded_error = np.max(np.abs(np.asarray(folded(data, training=False)) - reference)) / magnitude
    print(
        f"{constructor.__name__}: relative error vs float64 original {original_error:.2g}, folded {folded_error:.2g}"
    )
    assert original_error < 1e-4
    assert folded_error <= 3 * original_error

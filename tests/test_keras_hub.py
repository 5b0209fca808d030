"""KerasHub vision backbones and classifiers, built offline from constructor arguments.

Each exports natively with ``fold=True`` (their custom blocks traced to layers and
keras.ops), with no BatchNormalization left, agreeing with a float64 run of the
same model at batch 1 and 3. Random weights; non-trivial BN statistics. The models
whose blocks are traced (MobileNetV3/V5, HGNetV2, ViT, ViTDet, DeiT, DINOv2/v3, Swin,
DepthAnything, whose resize holds backend code the trace records as one operation) rerun
on JAX in one subprocess with tests/test_tracing.py (``test_tracing_on_jax``):
building a model on JAX compiles every initializer shape, ~10 s a model on 2
cores, so the plain-Functional ones stay on TensorFlow only.
"""

import keras
import numpy as np
import pytest
from helpers import (
    KERAS_HUB_IMAGE_SHAPE,
    assert_exports_exactly,
    float64_build,
    keras_hub_models,
    nested_batch_norms,
    randomize_batch_norms,
)

S = KERAS_HUB_IMAGE_SHAPE


MODELS = keras_hub_models()


NOT_AFTER_LINEAR = {"producer-rule", "producer-missing", "producer-fanout"}
# Blocks whose BN follows a Conv inside a traced layer: the fold report names them by path.
NESTED_FOLDS = {
    "mobilenet_v3": "/",
    "efficientnet": "/",
    "hgnetv2": "/",
    "mobilenet_v5": "/",
}


def _images(batch):
    return [np.random.default_rng(batch).standard_normal((batch, *S)).astype("float32")]


@pytest.mark.parametrize("name", list(MODELS))
def test_keras_hub_model_exports_natively_and_exactly(name, tmp_path):
    keras.utils.set_random_seed(0)
    model = MODELS[name]()
    rng = np.random.default_rng(0)
    for layer in nested_batch_norms(model):
        randomize_batch_norms(layer, rng, gain=(0.5, 1.5))
    twin = float64_build(MODELS[name], model)
    result = assert_exports_exactly(model, tmp_path / f"{name}.onnx", _images, twin=twin)
    report = result.fold_report
    # A BN that stays (exported as Mul+Add) does not follow a linear layer: it is a
    # pre-activation BN (ResNet v2, DenseNet) or its producer's output is used twice.
    for entry in report.entries:
        assert entry.folded or entry.blocked_by[0] in NOT_AFTER_LINEAR, entry
    if name in NESTED_FOLDS:
        assert any("/" in entry.batch_norm for entry in report.entries if entry.folded), report

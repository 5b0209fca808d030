"""KerasHub vision backbones and classifiers, built offline from constructor arguments.

Each exports natively with ``fold=True`` (their custom blocks traced to layers and
keras.ops), with no BatchNormalization left, agreeing with a float64 run of the
same model at batch 1 and 3. Random weights; non-trivial BN statistics. The models
whose blocks are traced (MobileNetV3/V5, HGNetV2, ViT, ViTDet, DeiT, DINOv2/v3, Swin,
DepthAnything, whose resize holds backend code the trace records as one operation) rerun
on JAX in one subprocess with tests/test_tracing.py (``test_tracing_on_jax``):
building a model on JAX compiles every initializer shape, ~10 s a model on 2
cores, so the plain-Functional ones stay on TensorFlow only. D-FINE and its detector
(traced hybrid encoder and decoder, ops.map query selection, grid sampling) take ~70 s
together on JAX (every op of the float32 and float64 builds compiled once), so they
run on JAX on demand:
``KERAS_BACKEND=jax pytest tests/test_keras_hub.py -k d_fine``; the JAX-specific
paths it needs are in the default JAX rerun (test_tracing's custom layers and op
rules, test_reference's float64 slice).
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
    "d_fine": "/",
    "d_fine_detector": "/",
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
    if name == "d_fine":
        _check_query_selection(model, tmp_path / f"{name}.onnx", twin)


def _check_query_selection(model, path, twin):
    """D-FINE's top-k picks its queries: the outputs above agree only if onnxruntime,
    Keras float32 and float64 select the same anchors. Checked directly: the float64
    scores separate the 8th from the 9th best by far more than float32 rounding, and
    onnxruntime's selected logits are its own scores at float64's top 8, in order."""
    import onnxruntime as ort

    x = _images(3)[0]
    names = sorted(model.output)  # ONNX outputs follow the flattened (sorted) output dict
    position = {
        key: sum(len(keras.tree.flatten(model.output[k])) for k in names[:i])
        for i, key in enumerate(names)
    }
    exact = twin([x])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x})
    exact_scores = exact[position["enc_outputs_class"]].max(axis=-1)  # (batch, anchors)
    ranked = np.sort(exact_scores, axis=-1)[:, ::-1]
    k = model.num_queries
    assert np.all(ranked[:, k - 1] - ranked[:, k] > 1e-4 * np.abs(ranked).max())
    chosen = np.argsort(-exact_scores, axis=-1, kind="stable")[:, :k]
    scores = onnx_out[position["enc_outputs_class"]]
    expected = np.take_along_axis(scores, chosen[..., None], axis=1)
    np.testing.assert_array_equal(onnx_out[position["enc_topk_logits"]], expected)

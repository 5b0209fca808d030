"""KerasHub vision backbones and classifiers, built offline from constructor arguments.

Each exports natively with ``fold=True`` (their custom blocks traced to layers and
keras.ops), with no BatchNormalization left, agreeing with a float64 run of the
same model at batch 1 and 3. Random weights; non-trivial BN statistics. The VAE takes
images of unknown height and width, SAM five inputs with unknown prompt counts: one
file of each also runs at a second image size or prompt count. The models whose
blocks are traced (MobileNetV3/V5, HGNetV2, ViT, ViTDet, DeiT, DINOv2/v3, Swin,
DepthAnything, whose resize holds backend code the trace records as one operation,
VAE, SAM) rerun on JAX in one subprocess with tests/graph/test_tracing.py (``test_tracing_on_jax``);
the plain-Functional ones stay on TensorFlow only. On JAX the initializers draw with
NumPy and the Keras reference passes run compiled whole (tests/support/jax_speed.py).
D-FINE and its detector (traced hybrid encoder and decoder, ops.map query selection,
grid sampling) are the largest: they rerun on JAX in a subprocess of their own
(``test_d_fine_on_jax``), which runs beside the other rerun under xdist.
"""

import keras
import numpy as np
import pytest
from support.checks import assert_exports_exactly, float64_build
from support.keras_hub_zoo import (
    KERAS_HUB_IMAGE_SHAPE,
    keras_hub_models,
    keras_hub_sam_models,
    sam_prompts,
)
from support.models import nested_batch_norms, randomize_batch_norms

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


def test_vae_exports_at_image_sizes_it_was_not_traced_at(tmp_path):
    """The VAE's image input has unknown height and width, and its mid-block attention
    reshapes back to ``ops.shape(inputs)`` (two unknown sizes): the export computes
    them from the input's shape, so another, non-square size runs exactly too."""
    import onnx

    keras.utils.set_random_seed(0)
    model = MODELS["vae"]()
    twin = float64_build(MODELS["vae"], model)

    def images(batch):
        return [np.random.default_rng(batch).standard_normal((batch, 16, 24, 3)).astype("float32")]

    result = assert_exports_exactly(model, tmp_path / "vae.onnx", images, twin=twin)
    assert result.op_counts["Shape"] >= 1
    dims = onnx.load(str(tmp_path / "vae.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, True, True, False]


def _randomize_zero_weights(model, rng):
    """KerasHub initializes biases, LayerNorm betas and position tables to zero: make
    them non-trivial, so that a wrong sign or axis in their export shows."""
    for weight in model.weights:
        value = keras.ops.convert_to_numpy(weight)
        if value.dtype.kind == "f" and not value.any():
            weight.assign(rng.normal(0.0, 0.1, value.shape).astype(value.dtype))


SAM_MODELS = keras_hub_sam_models()


@pytest.mark.parametrize("name", list(SAM_MODELS))
def test_sam_exports_with_prompts_of_any_count(name, tmp_path):
    """SAM's five inputs: points and labels share their unknown count (the trace
    shares it), boxes and masks have their own. Exported once, run with 3 points and
    2 boxes, then 1 point and 4 boxes, each against a float64 build."""
    keras.utils.set_random_seed(0)
    model = SAM_MODELS[name]()
    _randomize_zero_weights(model, np.random.default_rng(0))
    twin = float64_build(SAM_MODELS[name], model)
    path = tmp_path / f"{name}.onnx"
    result = assert_exports_exactly(model, path, sam_prompts, twin=twin)
    assert sorted(result.input_names) == ["boxes", "images", "labels", "masks", "points"]

    def other_counts(batch):
        return sam_prompts(batch, points=1, boxes=4, seed=1)

    assert_exports_exactly(model, path, other_counts, twin=twin, exported=result)

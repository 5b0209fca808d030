"""KerasHub vision backbones and classifiers, built offline from constructor arguments.

Each exports natively with ``fold=True`` (their custom blocks traced to layers and
keras.ops), with no BatchNormalization left, agreeing with a float64 run of the
same model at batch 1 and 3. Random weights; non-trivial BN statistics. The models
whose blocks are traced (MobileNetV3, HGNetV2, ViT, Swin, the DeiT refusal) rerun
on JAX in one subprocess with tests/test_tracing.py (``test_tracing_on_jax``):
building a model on JAX compiles every initializer shape, ~10 s a model on 2
cores, so the plain-Functional ones stay on TensorFlow only.
"""

import keras
import keras_hub
import numpy as np
import pytest
from helpers import (
    assert_exports_exactly,
    float64_build,
    nested_batch_norms,
    randomize_batch_norms,
)

M = keras_hub.models
S = (32, 32, 3)


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


def hgnetv2():
    return M.HGNetV2Backbone(
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


def vgg():
    return M.VGGBackbone(stackwise_num_repeats=[1, 1], stackwise_num_filters=[8, 16], image_shape=S)


def vit():
    return M.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
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


def resnet_classifier():
    return M.ResNetImageClassifier(backbone=resnet_vd(), num_classes=5)


def mobilenet_classifier():
    return M.MobileNetImageClassifier(backbone=mobilenet_v3(), num_classes=5)


def vit_classifier():
    return M.ViTImageClassifier(backbone=vit(), num_classes=5)


MODELS = {
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
    "swin": swin,
    "resnet_classifier": resnet_classifier,
    "mobilenet_classifier": mobilenet_classifier,
    "vit_classifier": vit_classifier,
}
NOT_AFTER_LINEAR = {"producer-rule", "producer-missing", "producer-fanout"}
# Blocks whose BN follows a Conv inside a traced layer: the fold report names them by path.
NESTED_FOLDS = {
    "mobilenet_v3": "/",
    "efficientnet": "/",
    "hgnetv2": "/",
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


def test_deit_encoder_is_refused_with_its_reason(tmp_path):
    """DeiT's encoder calls blocks that return None next to a tensor, which Keras cannot
    record symbolically: one clear error naming the layer and the source line."""
    from keras_bn.converters.onnx.export import UnsupportedLayersError, export_onnx

    model = M.DeiTBackbone(
        image_shape=S, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32
    )
    with pytest.raises(UnsupportedLayersError) as error:
        export_onnx(model, tmp_path / "deit.onnx", fold=True)
    message = str(error.value)
    assert "DeiTEncoder.call() failed at deit_layers.py:" in message and "\n" not in message
    assert not (tmp_path / "deit.onnx").exists()

"""Small KerasHub models, built offline from constructor arguments (tests and benchmarks).

:data:`ZOO` is the table: name -> :class:`HubModel` (the class's path in ``keras_hub``,
its keyword arguments, the inputs it takes). An argument that is itself a
:class:`HubModel` (an image encoder, a backbone, SAM's prompt encoder) is built first,
fresh each time, so a float64 rebuild (``checks.float64_build``) builds every part
under the float64 policy. :func:`build` is the one builder; :func:`keras_hub_models`
and :func:`keras_hub_sam_models` give zero-argument builders by name, for image models
and SAM (whose inputs are :func:`sam_prompts`). Random weights, no preset download.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KERAS_HUB_IMAGE_SHAPE = (32, 32, 3)
S = KERAS_HUB_IMAGE_SHAPE


@dataclass(frozen=True)
class HubModel:
    """One KerasHub constructor call: ``keras_hub.<path>(**arguments)``, then ``after``."""

    path: str  # below keras_hub: "models.ResNetBackbone", "layers.SAMPromptEncoder"
    arguments: dict[str, Any] = field(default_factory=dict)
    inputs: str = "images"  # "images": KERAS_HUB_IMAGE_SHAPE; "sam_prompts": sam_prompts()
    after: Callable[[Any], None] | None = None  # edits the built model in place


def build(entry: HubModel):
    """A fresh model with random weights: parts first (in argument order), then ``entry``."""
    module, _, name = f"keras_hub.{entry.path}".rpartition(".")
    constructor = getattr(importlib.import_module(module), name)
    arguments = {
        key: build(value) if isinstance(value, HubModel) else value
        for key, value in entry.arguments.items()
    }
    model = constructor(**arguments)
    if entry.after is not None:
        entry.after(model)
    return model


def he_scaled_kernels(model) -> None:
    """D-FINE's kernels start at N(0, 0.01^2): its anchors' scores then differ by less
    than float32 rounding, and which 8 the top-k selects is float32 noise (the float64
    run picks others). He-scaled kernels make the selection well separated."""
    rng = np.random.default_rng(7)
    for variable in model.weights:
        if variable.path.endswith("kernel") and len(variable.shape) >= 2:
            fan_in = int(np.prod(variable.shape[:-1]))
            values = rng.standard_normal(variable.shape) / np.sqrt(fan_in)
            variable.assign(values.astype(variable.dtype))


# ------------------------------------------------------------------------------------
# Arguments shared by several entries.

RESNET_STAGES = dict(
    stackwise_num_filters=[64, 8],
    stackwise_num_blocks=[1, 1],
    stackwise_num_strides=[1, 2],
    image_shape=S,
)
HGNETV2 = dict(
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
# CLIP, MetaCLIP 2 and SigLIP vision encoders take the same arguments.
VISION_ENCODER = dict(
    patch_size=8, hidden_dim=16, num_layers=2, num_heads=2, intermediate_dim=32, image_shape=S
)
# A small ViTDet for KERAS_HUB_IMAGE_SHAPE images: a backbone on its own and SAM's encoder.
VIT_DET = HubModel(
    "models.ViTDetBackbone",
    dict(
        image_shape=S,
        patch_size=4,
        hidden_size=8,
        num_layers=2,
        global_attention_layer_indices=[1],
        intermediate_dim=16,
        num_heads=2,
        num_output_channels=8,
        window_size=4,
    ),
)


def _per_block(first, second):
    """MobileNetV5's per-block arguments: one block in stage 1, two alike in stage 2."""
    return [[first], [second, second]]


# ------------------------------------------------------------------------------------
# Backbones that other entries use as parts.

RESNET_V1 = HubModel(
    "models.ResNetBackbone",
    dict(
        input_conv_filters=[8],
        input_conv_kernel_sizes=[3],
        block_type="bottleneck_block",
        **RESNET_STAGES,
    ),
)
RESNET_VD = HubModel(
    "models.ResNetBackbone",
    dict(
        input_conv_filters=[8, 8, 8],
        input_conv_kernel_sizes=[3, 3, 3],
        block_type="bottleneck_block_vd",
        **RESNET_STAGES,
    ),
)
MOBILENET_V3 = HubModel(
    "models.MobileNetBackbone",
    dict(
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
    ),
)
VIT = HubModel(
    "models.ViTBackbone",
    dict(image_shape=S, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32),
)
MIT = HubModel(
    "models.MiTBackbone",
    dict(
        layerwise_depths=[1, 1],
        num_layers=2,
        layerwise_num_heads=[1, 2],
        layerwise_sr_ratios=[2, 1],
        max_drop_path_rate=0.0,
        layerwise_patch_sizes=[7, 3],
        layerwise_strides=[4, 2],
        image_shape=S,
        hidden_dims=[8, 16],
    ),
)
DINOV2 = HubModel(
    "models.DINOV2Backbone",
    dict(
        patch_size=8,
        num_layers=2,
        hidden_dim=16,
        num_heads=2,
        intermediate_dim=32,
        image_shape=S,
        position_embedding_shape=(32, 32),
    ),
)
# DINOv2 tokens to images, fused upward, resized (aligned corners).
DEPTH_ANYTHING = HubModel(
    "models.DepthAnythingBackbone",
    dict(
        image_encoder=DINOV2,
        reassemble_factors=[2, 1],
        neck_hidden_dims=[8, 16],
        fusion_hidden_dim=8,
        head_hidden_dim=8,
        head_in_index=-1,
        feature_keys=["stage1", "stage2"],
    ),
)
# HGNetV2 features, hybrid encoder, top-k query selection, deformable decoder.
D_FINE = HubModel(
    "models.DFineBackbone",
    dict(
        backbone=HubModel(
            "models.HGNetV2Backbone", {**HGNETV2, "out_features": ["stage1", "stage2"]}
        ),
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
    ),
    after=he_scaled_kernels,
)
SAM_BACKBONE = HubModel(
    "models.SAMBackbone",
    dict(
        image_encoder=VIT_DET,
        prompt_encoder=HubModel(
            "layers.SAMPromptEncoder",
            dict(
                hidden_size=8,
                image_embedding_size=(S[0] // 4, S[0] // 4),
                input_image_size=(S[0], S[0]),
                mask_in_channels=8,
            ),
        ),
        mask_decoder=HubModel(
            "layers.SAMMaskDecoder",
            dict(
                num_layers=1,
                hidden_size=8,
                intermediate_dim=16,
                num_heads=2,
                embedding_dim=8,
                num_multimask_outputs=3,
                iou_head_depth=2,
                iou_head_hidden_dim=8,
            ),
        ),
    ),
    inputs="sam_prompts",
)


# ------------------------------------------------------------------------------------
# The table: every model the tests export, by name (test ids; order kept).

ZOO: dict[str, HubModel] = {
    "resnet_v1": RESNET_V1,
    "resnet_v2_basic": HubModel(
        "models.ResNetBackbone",
        dict(
            input_conv_filters=[64],
            input_conv_kernel_sizes=[3],
            block_type="basic_block",
            use_pre_activation=True,
            **RESNET_STAGES,
        ),
    ),
    "resnet_vd": RESNET_VD,
    "mobilenet_v3": MOBILENET_V3,
    "efficientnet": HubModel(
        "models.EfficientNetBackbone",
        dict(
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
        ),
    ),
    "cspnet": HubModel(
        "models.CSPNetBackbone",
        dict(
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
        ),
    ),
    "densenet": HubModel(
        "models.DenseNetBackbone", dict(stackwise_num_repeats=[1, 1], image_shape=S, growth_rate=4)
    ),
    "hgnetv2": HubModel("models.HGNetV2Backbone", HGNETV2),
    "vgg": HubModel(
        "models.VGGBackbone",
        dict(stackwise_num_repeats=[1, 1], stackwise_num_filters=[8, 16], image_shape=S),
    ),
    "vit": VIT,
    "mit": MIT,
    "deit": HubModel(
        "models.DeiTBackbone",
        dict(
            image_shape=S,
            patch_size=8,
            num_layers=2,
            num_heads=2,
            hidden_dim=16,
            intermediate_dim=32,
        ),
    ),
    "swin": HubModel(
        "models.SwinTransformerBackbone",
        dict(
            image_shape=S,
            embed_dim=8,
            depths=[1, 1],
            num_heads=[1, 2],
            window_size=4,
            patch_size=4,
            drop_path=0.0,
        ),
    ),
    "xception": HubModel(
        "models.XceptionBackbone",
        dict(
            stackwise_conv_filters=[[8, 16], [16, 32], [32, 32]],
            stackwise_pooling=[True, True, False],
            image_shape=S,
        ),
    ),
    "dinov2": DINOV2,
    "dinov3": HubModel(
        "models.DINOV3Backbone",
        dict(
            patch_size=8,
            num_layers=2,
            hidden_dim=16,
            num_heads=2,
            intermediate_dim=32,
            image_shape=S,
        ),
    ),
    "depth_anything": DEPTH_ANYTHING,
    "clip_vision": HubModel("models.CLIPVisionEncoder", VISION_ENCODER),
    "metaclip2_vision": HubModel("models.MetaCLIP2VisionEncoder", VISION_ENCODER),
    # gelu_approximate Dense layers, a pooling head attending from a probe
    "siglip_vision": HubModel("models.SigLIPVisionEncoder", VISION_ENCODER),
    "blip2_vision": HubModel(
        "models.BLIP2VisionEncoder",
        dict(
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
        ),
    ),
    "vit_det": VIT_DET,
    "mobilenet_v5": HubModel(
        "models.MobileNetV5Backbone",
        dict(
            stackwise_block_types=[["er"], ["uir", "uir"]],
            stackwise_num_blocks=[1, 2],
            stackwise_num_filters=[[8], [16, 16]],
            stackwise_strides=[[2], [2, 1]],
            stackwise_act_layers=_per_block("relu", "relu"),
            stackwise_exp_ratios=_per_block(2.0, 2.0),
            stackwise_se_ratios=_per_block(0.0, 0.0),
            stackwise_dw_kernel_sizes=_per_block(0, 3),
            stackwise_dw_start_kernel_sizes=_per_block(0, 0),
            stackwise_dw_end_kernel_sizes=_per_block(0, 0),
            stackwise_exp_kernel_sizes=_per_block(3, 0),
            stackwise_pw_kernel_sizes=_per_block(1, 0),
            stackwise_num_heads=_per_block(0, 0),
            stackwise_key_dims=_per_block(0, 0),
            stackwise_value_dims=_per_block(0, 0),
            stackwise_kv_strides=_per_block(0, 0),
            stackwise_use_cpe=_per_block(False, False),
            use_msfa=False,
            num_features=32,
            norm_layer="batch_norm",
            image_shape=S,
        ),
    ),
    "segformer": HubModel(
        "models.SegFormerBackbone", dict(image_encoder=MIT, projection_filters=8)
    ),
    "deeplab_v3": HubModel(
        "models.DeepLabV3Backbone",
        dict(
            image_encoder=RESNET_V1,
            spatial_pyramid_pooling_key="P3",
            upsampling_size=2,
            dilation_rates=[1, 2],
            low_level_feature_key="P2",
            projection_filters=8,
            image_shape=S,
        ),
    ),
    "retinanet": HubModel(
        "models.RetinaNetBackbone",
        dict(
            image_encoder=HubModel(
                "models.ResNetBackbone",
                dict(
                    input_conv_filters=[64],
                    input_conv_kernel_sizes=[3],
                    stackwise_num_filters=[64, 128, 256, 512],
                    stackwise_num_blocks=[1, 1, 1, 1],
                    stackwise_num_strides=[1, 2, 2, 2],
                    block_type="basic_block",
                    image_shape=S,
                ),
            ),
            min_level=3,
            max_level=5,
            use_p5=False,
            image_shape=S,
        ),
    ),
    "resnet_classifier": HubModel(
        "models.ResNetImageClassifier", dict(backbone=RESNET_VD, num_classes=5)
    ),
    "mobilenet_classifier": HubModel(
        "models.MobileNetImageClassifier", dict(backbone=MOBILENET_V3, num_classes=5)
    ),
    "vit_classifier": HubModel("models.ViTImageClassifier", dict(backbone=VIT, num_classes=5)),
    # metric: sigmoid, then KerasHub's Multiplier layer
    "depth_estimator": HubModel(
        "models.DepthAnythingDepthEstimator",
        dict(backbone=DEPTH_ANYTHING, depth_estimation_type="metric", max_depth=10.0),
    ),
    "d_fine": D_FINE,
    # the detector's forward pass (its box decoding is not in it)
    "d_fine_detector": HubModel("models.DFineObjectDetector", dict(backbone=D_FINE, num_classes=4)),
    # images of unknown height and width; "mode": no random sampling; GroupNormalization's
    # 32 groups: 32 filters at least
    "vae": HubModel(
        "src.models.vae.vae_backbone.VAEBackbone",
        dict(
            encoder_num_filters=[32, 32],
            encoder_num_blocks=[1, 1],
            decoder_num_filters=[32, 32],
            decoder_num_blocks=[1, 1],
            sampler_method="mode",
            sample_channels=8,
        ),
    ),
    "sam_backbone": SAM_BACKBONE,
    "sam_segmenter": HubModel(
        "models.SAMImageSegmenter", dict(backbone=SAM_BACKBONE), inputs="sam_prompts"
    ),
}


def builders(inputs: str) -> dict[str, Callable[[], Any]]:
    """Zero-argument builders of the :data:`ZOO` entries that take ``inputs``, by name."""
    return {
        name: (lambda entry=entry: build(entry))
        for name, entry in ZOO.items()
        if entry.inputs == inputs
    }


def keras_hub_models() -> dict:
    """Vision backbones and classifiers by name, for (32, 32, 3) images."""
    return builders("images")


def keras_hub_sam_models() -> dict:
    """SAM by name: the backbone (image and prompt embeddings) and the image segmenter
    (masks and IoU predictions), for (32, 32, 3) images and 32x32 mask prompts."""
    return builders("sam_prompts")


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

"""The bar: every Keras Applications family folds, exports and validates.

One model per family, ``weights=None`` with randomized non-trivial BatchNormalization
statistics, logits output (``classifier_activation=None``), at the smallest input
size the family accepts. Each is folded with ``fold_batch_norms``, exported, loaded
in onnxruntime and compared with the ORIGINAL (unfolded) Keras model at batch sizes
1 and 2.

The bar's "relative error" is ``max |onnx - keras| / max |keras|`` per output
(``OutputComparison.relative_to_max``): the error relative to the output's range,
which, unlike elementwise ``|a - b| / |b|``, stays meaningful for logits near 0.
It must be at most 1e-4; the default elementwise tolerances must pass too.
"""

import warnings

import keras
import numpy as np
import pytest

from keras_bn.converters.folding import fold_batch_norms
from keras_bn.converters.onnx.export import export_onnx
from keras_bn.converters.validation import validate_onnx

BAR = 1e-4

# family: (constructor, input size, Transpose nodes expected in the export)
FAMILIES = {
    "ResNet": ("ResNet50", 32, 1),
    "ResNetV2": ("ResNet50V2", 32, 1),
    "MobileNet": ("MobileNet", 32, 1),
    "MobileNetV2": ("MobileNetV2", 32, 1),
    "MobileNetV3": ("MobileNetV3Small", 32, 1),
    "EfficientNet": ("EfficientNetB0", 32, 1),
    "EfficientNetV2": ("EfficientNetV2B0", 32, 1),
    "DenseNet": ("DenseNet121", 32, 1),
    "InceptionV3": ("InceptionV3", 75, 1),
    "Xception": ("Xception", 71, 1),
    "NASNet": ("NASNetMobile", 32, 1),
    # LayerNormalization over channels needs channels-last: one Transpose into and one
    # out of each of its 23 normalizations' blocks, plus the input's.
    "ConvNeXt": ("ConvNeXtTiny", 32, 43),
    "VGG": ("VGG16", 32, 1),
}


def randomize_batch_norms(model: keras.Model, seed: int = 0) -> int:
    """Non-trivial inference statistics for every BatchNormalization; returns their count.

    moving_mean ~ N(0.2, 0.5) (not 0), moving_variance spread over 3.5 orders of
    magnitude (1e-2 .. 3e1), gamma != 1 scaled with sqrt(variance) so that each
    BN's per-channel gain stays in [0.6, 1.4] and 50-layer networks neither blow up
    nor vanish, beta ~ N(0, 0.2). BNs without gamma get variances in [0.3, 3].
    """
    rng = np.random.default_rng(seed)
    count = 0
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        shape = tuple(layer.moving_mean.shape)
        # Without gamma (InceptionV3's scale=False) the gain is 1/sqrt(variance): keep
        # it within [0.56, 1.8] so that 94 such layers stay finite.
        spread = (-2.0, 1.5) if layer.scale else (-0.5, 0.5)
        variance = 10.0 ** rng.uniform(*spread, shape)
        layer.moving_mean.assign(rng.normal(0.2, 0.5, shape))
        layer.moving_variance.assign(variance)
        if layer.scale:
            layer.gamma.assign(np.sqrt(variance + layer.epsilon) * rng.uniform(0.6, 1.4, shape))
        if layer.center:
            layer.beta.assign(rng.normal(0.0, 0.2, shape))
        count += 1
    return count


@pytest.mark.slow
@pytest.mark.parametrize(
    ("constructor", "size", "transposes"), FAMILIES.values(), ids=FAMILIES.keys()
)
def test_application_folds_exports_and_validates(constructor, size, transposes, tmp_path):
    model = getattr(keras.applications, constructor)(
        weights=None, input_shape=(size, size, 3), classifier_activation=None
    )
    batch_norms = randomize_batch_norms(model)
    folded, report = fold_batch_norms(model)
    assert report.folded_count + report.not_folded_count == batch_norms

    path = tmp_path / f"{constructor}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unfolded BN after a conv would warn
        result = export_onnx(folded, path)
    assert result.warnings == []
    assert "BatchNormalization" not in result.op_counts
    assert result.op_counts.get("Transpose", 0) == transposes
    assert result.input_names == [model.layers[0].name]  # the InputLayer's name
    assert result.output_names == [model.layers[-1].name]  # "predictions" and the like

    validation = validate_onnx(model, path)  # the original, unfolded model
    assert [c.batch_size for c in validation.comparisons] == [1, 2]
    worst = max(c.relative_to_max for c in validation.comparisons)
    assert worst <= BAR, str(validation)
    assert validation, str(validation)

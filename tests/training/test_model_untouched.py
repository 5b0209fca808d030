"""The model a user hands us is never changed: not by replacement, folding or export.

Each test trains and runs the copy the function returns (or exports the model),
then checks every variable of the original and its outputs bit for bit. On JAX,
a copy whose variables hold the original's arrays would have them donated by its
compiled ``fit``/``predict`` ("Array has been deleted"), so the module reruns on
JAX in a subprocess (the last test).
"""

import re

import keras
import numpy as np
import pytest
from support.models import randomize_batch_norms

from keras_bn.converters import export_onnx, fold_batch_norms
from keras_bn.layers import BatchNormalization
from keras_bn.replacement import replace_batch_norm


def _model() -> keras.Model:
    """A compiled classifier: a BN that cannot fold (on the input), one that folds."""
    inputs = keras.Input((8, 8, 2))
    h = keras.layers.BatchNormalization(name="input_bn")(inputs)  # padded conv next: stays
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv")(h)
    h = BatchNormalization(name="conv_bn")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(3, name="head")(h)  # logits: see _LOSS
    model = randomize_batch_norms(keras.Model(inputs, outputs), seed=3)
    model.compile("sgd", _LOSS)
    return model


# From logits: a softmax output saturates on some random draws (its loss clips the
# probability, and the clipped gradient is exactly zero), so the copy would not move.
_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(16, 8, 8, 2)).astype("float32")
    return x, rng.integers(0, 3, size=16)


class _Snapshot:
    """Every variable of a model and its outputs, copied out."""

    def __init__(self, model, x):
        self.values = [np.array(v.numpy(), copy=True) for v in model.variables]
        self.predicted = np.array(model.predict(x, verbose=0), copy=True)
        self.called = np.array(keras.ops.convert_to_numpy(model(x, training=False)), copy=True)

    def assert_equal(self, other: "_Snapshot") -> None:
        assert len(self.values) == len(other.values)
        for before, after in zip(self.values, other.values, strict=True):
            np.testing.assert_array_equal(after, before)
        np.testing.assert_array_equal(other.predicted, self.predicted)
        np.testing.assert_array_equal(other.called, self.called)


def _train(copy, x, y) -> None:
    """Uses the copy the way a user would: fit (changes it), predict, evaluate."""
    before = [np.array(v.numpy(), copy=True) for v in copy.trainable_variables]
    copy.compile("sgd", _LOSS)
    copy.fit(x, y, epochs=2, batch_size=8, verbose=0)
    copy.predict(x, verbose=0)
    copy.evaluate(x, y, verbose=0)
    after = [v.numpy() for v in copy.trainable_variables]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_replace_batch_norm_never_touches_the_original():
    model, (x, y) = _model(), _data()
    snapshot = _Snapshot(model, x)
    copy = replace_batch_norm(model, momentum=None)
    _train(copy, x, y)
    snapshot.assert_equal(_Snapshot(model, x))
    # The original still trains (its arrays are alive), and its copy did not move with it.
    copied = np.array(copy.get_layer("conv").kernel.numpy(), copy=True)
    model.fit(x, y, epochs=1, verbose=0)
    np.testing.assert_array_equal(copy.get_layer("conv").kernel.numpy(), copied)


def test_fold_batch_norms_never_touches_the_original():
    model, (x, y) = _model(), _data()
    snapshot = _Snapshot(model, x)
    folded, report = fold_batch_norms(model, sample_inputs=x)
    assert [type(layer) for layer in folded.layers].count(keras.layers.BatchNormalization) == 1
    _train(folded, x, y)
    snapshot.assert_equal(_Snapshot(model, x))


def test_export_with_fold_never_touches_the_original(tmp_path):
    model, (x, y) = _model(), _data()
    snapshot = _Snapshot(model, x)
    export_onnx(model, tmp_path / "model.onnx", fold=True)
    snapshot.assert_equal(_Snapshot(model, x))
    # and a copy made afterwards, trained, still leaves it alone
    _train(replace_batch_norm(model), x, y)
    snapshot.assert_equal(_Snapshot(model, x))


@pytest.mark.first
def test_original_is_never_touched_on_jax(run_python):
    args = ["-m", "pytest", __file__, "-k", "not on_jax", "-p", "no:cacheprovider"]
    result = run_python([*args, "-p", "no:xdist"], env={"KERAS_BACKEND": "jax"}, timeout=600)
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(r"\b3 passed", summary) and "failed" not in summary, summary
    assert "backend jax" in result.stdout

"""keras_bn.torch_interop: PyTorch BatchNorm states loaded and hyperparameters
translated, against torch's formulas in NumPy."""

import keras
import numpy as np
import pytest
from support.checks import as_float64, assert_moving_statistics

from keras_bn.layers import BatchNormalization
from keras_bn.torch_interop import load_torch_batch_norm, torch_batch_norm_kwargs

StockBN = keras.layers.BatchNormalization


class _FakeTorchTensor:
    """Duck-typed torch.Tensor: only .detach().cpu().numpy()."""

    def __init__(self, value):
        self._value = np.asarray(value)

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self._value


def _torch_state(rng, channels, affine=True, tensors=True, prefix=""):
    state = {
        "running_mean": rng.normal(2.0, 3.0, channels).astype("float32"),
        "running_var": np.logspace(-3, 2, channels).astype("float32"),
        "num_batches_tracked": np.array(17, "int64"),
    }
    if affine:
        state["weight"] = rng.uniform(0.5, 2.0, channels).astype("float32")
        state["bias"] = rng.normal(size=channels).astype("float32")
    wrap = _FakeTorchTensor if tensors else np.asarray
    return {prefix + key: wrap(value) for key, value in state.items()}


def _torch_eval_nchw(x, state, eps, prefix=""):
    """torch.nn.functional.batch_norm(training=False) in NumPy, channels at axis 1."""

    def get(key, default):
        value = state.get(prefix + key)
        if value is None:
            return default
        value = value.numpy() if hasattr(value, "numpy") else value
        return as_float64(value).reshape(1, -1, 1, 1)

    mean, var = get("running_mean", None), get("running_var", None)
    return (x - mean) / np.sqrt(var + eps) * get("weight", 1.0) + get("bias", 0.0)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("layer_class", [BatchNormalization, StockBN], ids=["ours", "stock"])
def test_load_torch_batch_norm_matches_torch_eval(affine, layout, layer_class):
    rng = np.random.default_rng(40)
    state = _torch_state(rng, 5, affine=affine, prefix="features.1.")
    state["features.0.weight"] = _FakeTorchTensor(np.ones((5, 3, 3, 3)))  # ignored
    x = rng.normal(1.0, 4.0, size=(2, 5, 4, 3))
    expected = _torch_eval_nchw(x, state, 1e-5, prefix="features.1.")

    kwargs = torch_batch_norm_kwargs(
        momentum=0.1, eps=1e-5, affine=affine, channels_first=layout == "channels_first"
    )
    if layer_class is StockBN:
        kwargs.pop("unbiased_moving_variance")
    if layer_class is StockBN and not affine:
        kwargs.update(center=True, scale=True)  # loads the identity into gamma/beta
    layer = layer_class(**kwargs)
    inputs = x if layout == "channels_first" else np.moveaxis(x, 1, -1)
    layer.build(inputs.shape)
    assert load_torch_batch_norm(layer, state, prefix="features.1.", eps=1e-5) is layer
    outputs = as_float64(layer(inputs.astype("float32"), training=False))
    if layout == "channels_last":
        outputs = np.moveaxis(outputs, -1, 1)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


def test_torch_kwargs_reproduce_torch_training_update():
    """Momentum 1 - m and the unbiased running variance, as torch updates them."""
    rng = np.random.default_rng(41)
    state = _torch_state(rng, 3, tensors=False)
    layer = BatchNormalization(**torch_batch_norm_kwargs(momentum=0.3, eps=1e-5))
    layer.build((None, 3, 4))
    load_torch_batch_norm(layer, state)
    x = rng.normal(4.0, 2.0, size=(6, 3, 4))
    layer(x.astype("float32"), training=True)
    batch_mean = x.mean(axis=(0, 2))
    batch_var = x.var(axis=(0, 2), ddof=1)  # torch: unbiased
    expected_mean = 0.7 * state["running_mean"] + 0.3 * batch_mean
    expected_var = 0.7 * state["running_var"] + 0.3 * batch_var
    assert_moving_statistics(layer, expected_mean, expected_var)


def test_load_torch_batch_norm_num_batches_tracked_into_cumulative_layer():
    layer = BatchNormalization(**torch_batch_norm_kwargs(momentum=None))
    layer.build((None, 4, 2, 2))
    load_torch_batch_norm(layer, _torch_state(np.random.default_rng(42), 4))
    assert int(as_float64(layer.num_batches_tracked)) == 17


def test_torch_batch_norm_kwargs_mapping():
    assert torch_batch_norm_kwargs() == {
        "axis": 1,
        "momentum": pytest.approx(0.9),
        "epsilon": 1e-5,
        "center": True,
        "scale": True,
        "unbiased_moving_variance": True,
    }
    assert torch_batch_norm_kwargs(momentum=None, affine=False, channels_first=False) == {
        "axis": -1,
        "momentum": None,
        "epsilon": 1e-5,
        "center": False,
        "scale": False,
        "unbiased_moving_variance": True,
    }
    with pytest.raises(ValueError, match="track_running_stats=False"):
        torch_batch_norm_kwargs(track_running_stats=False)
    with pytest.raises(ValueError, match="momentum=1.5"):
        torch_batch_norm_kwargs(momentum=1.5)


def test_load_torch_batch_norm_errors():
    rng = np.random.default_rng(43)
    layer = BatchNormalization(axis=1, epsilon=1e-5)
    with pytest.raises(ValueError, match="built layer"):
        load_torch_batch_norm(layer, _torch_state(rng, 4))
    layer.build((None, 4, 3))
    with pytest.raises(ValueError, match="missing"):
        load_torch_batch_norm(layer, _torch_state(rng, 4), prefix="bn1.")
    with pytest.raises(ValueError, match="expects 4 channels"):
        load_torch_batch_norm(layer, _torch_state(rng, 5))
    with pytest.raises(ValueError, match="epsilon=0.001"):
        load_torch_batch_norm(layer, _torch_state(rng, 4), eps=1e-3)
    bad = _torch_state(rng, 4, tensors=False)
    bad["running_var"][0] = -1.0
    with pytest.raises(ValueError, match="negative or non-finite"):
        load_torch_batch_norm(layer, bad)
    no_scale = BatchNormalization(axis=1, scale=False)
    no_scale.build((None, 4, 3))
    with pytest.raises(ValueError, match="scale=True"):
        load_torch_batch_norm(no_scale, _torch_state(rng, 4))
    # A failed load changes nothing.
    np.testing.assert_array_equal(as_float64(no_scale.moving_mean), 0.0)

"""TimeDistributed: the wrapped layer's rule on the merged batch and time axes.

The reference is a float64 run of the same Keras model (``assert_exports_exactly``);
the ONNX file must compute each layer once, not once per timestep.
"""

import keras
import numpy as np
import pytest
from keras import layers
from support.checks import assert_exports_exactly
from support.models import randomize_batch_norms

from keras_bn.converters.onnx.export import UnsupportedLayersError, export_onnx
from keras_bn.converters.onnx.rules import wrappers
from keras_bn.converters.onnx.rules.table import needs_tracing


def _frames_model(steps):
    """A per-frame CNN over a clip, written the way video models wrap their layers."""
    frames = keras.Input((steps, 8, 8, 3), name="frames")
    x = layers.TimeDistributed(layers.Conv2D(4, 3, padding="same"), name="conv")(frames)
    x = layers.TimeDistributed(layers.BatchNormalization(), name="bn")(x)
    x = layers.TimeDistributed(layers.ReLU(), name="relu")(x)
    x = layers.TimeDistributed(layers.GlobalAveragePooling2D(), name="pool")(x)
    x = layers.TimeDistributed(layers.Dense(6, activation="relu"), name="dense")(x)
    model = keras.Model(frames, layers.GRU(5, name="gru")(x))
    randomize_batch_norms(model.get_layer("bn").layer, 0)
    return model


@pytest.mark.parametrize("steps", [5, None], ids=["five-steps", "any-steps"])
def test_time_distributed_layers_export_once_and_exactly(steps, tmp_path):
    """Keras's TimeDistributed loops over the timesteps; traced, the file held one copy
    of each layer per step, and a BatchNormalization inside it could not be exported
    at all (its ops.batch_normalization has no rule). Each wrapped layer is now one
    node on the merged batch and time axes, exact against float64, at any number of
    steps when the model leaves it unknown."""
    model = _frames_model(steps)
    wrapped = [layer for layer in model.layers if isinstance(layer, layers.TimeDistributed)]
    assert all(wrappers.time_distributed_has_rule(w, needs_tracing) for w in wrapped)
    assert not any(needs_tracing(layer) for layer in wrapped)

    def clips(batch):
        rng = np.random.default_rng(batch)
        return [rng.standard_normal((batch, steps or 4, 8, 8, 3)).astype("float32")]

    result = assert_exports_exactly(model, tmp_path / "clip.onnx", clips)
    assert result.op_counts["Conv"] == 1 and result.op_counts["Gemm"] == 1
    assert "Gather" not in result.op_counts  # no timestep taken apart


def test_time_distributed_at_another_clip_length(tmp_path):
    """The file of a model with an unknown number of steps runs clips of other lengths
    than the one it was exported with, as Keras does."""
    import onnxruntime as ort

    model = _frames_model(None)
    export_onnx(model, tmp_path / "clip.onnx", fold=True)
    session = ort.InferenceSession(str(tmp_path / "clip.onnx"), providers=["CPUExecutionProvider"])
    for steps in (1, 7):
        clip = np.random.default_rng(steps).standard_normal((2, steps, 8, 8, 3)).astype("float32")
        (got,) = session.run(None, {"frames": clip})
        expected = keras.ops.convert_to_numpy(model(clip, training=False))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_time_distributed_of_a_layer_without_a_rule_is_traced(tmp_path):
    """A wrapped layer that has no rule of its own keeps the trace (each step through
    the layer's operations), and one whose operation is refused is named."""

    def leaky(x):
        return keras.activations.relu(x, negative_slope=0.1)

    wrapper = layers.TimeDistributed(layers.Dense(3, activation=leaky))
    inputs = keras.Input((4, 6))
    model = keras.Model(inputs, wrapper(inputs))
    assert needs_tracing(wrapper)
    with pytest.raises(UnsupportedLayersError, match="negative_slope"):
        export_onnx(model, tmp_path / "m.onnx")


def test_a_wrapped_batch_norm_is_reported_as_kept_with_the_reason(tmp_path):
    """The fold report said a BN inside TimeDistributed would be traced and folded by
    the export, which it never was; it now says what the export does with it."""
    result = export_onnx(_frames_model(5), tmp_path / "clip.onnx", fold=True)
    (entry,) = result.fold_report.entries
    assert not entry.folded and entry.blocked_by == ("inside-wrapper",)
    assert "per-channel Mul and Add" in entry.reason

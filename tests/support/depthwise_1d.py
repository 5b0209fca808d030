"""A trained depthwise 1-D network, as edge users write them, for the int8 checks.

scikit-learn's digits read as sequences: each 8x8 image is 8 time steps of 8 features
(its rows), nothing downloaded. The network is the MobileNet pattern in 1-D: a Conv1D
stem, a DepthwiseConv1D + pointwise Conv1D block and a SeparableConv1D, each followed
by ``keras_bn.BatchNormalization`` and ReLU6 or ReLU, global average pooling and a
Dense head giving logits. Training takes a few seconds on two cores; the seed fixes the
split and the weights. ``tests/validation/test_int8_per_channel.py`` and
``benchmarks/int8_depthwise_1d.py`` use the same model.
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 10
STEPS = FEATURES = 8
HELD_OUT_SIZE = 400
CALIBRATION_SIZE = 200


def load_sequences(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Digits as (N, 8 steps, 8 features) float32 in [0, 1], split train / calibration /
    held-out (stratified, like examples/edge_pipeline.py's images)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    sequences = (digits.images / 16.0).astype("float32")  # (N, rows, columns)
    labels = digits.target.astype("int64")
    x_rest, x_held, y_rest, y_held = train_test_split(
        sequences, labels, test_size=HELD_OUT_SIZE, stratify=labels, random_state=seed
    )
    x_train, x_calib, y_train, y_calib = train_test_split(
        x_rest, y_rest, test_size=CALIBRATION_SIZE, stratify=y_rest, random_state=seed
    )
    return {
        "train": (x_train, y_train),
        "calibration": (x_calib, y_calib),
        "held_out": (x_held, y_held),
    }


def build_model():
    """Conv1D(24, 3) stem; DepthwiseConv1D(3) x2 + Conv1D(48, 1); SeparableConv1D(48, 3);
    each with BN and ReLU6 (ReLU after the separable one); GAP; Dense(10) logits."""
    import keras

    from keras_bn import BatchNormalization

    layers = keras.layers
    inputs = keras.Input((STEPS, FEATURES), name="sequence")
    x = layers.Conv1D(24, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.ReLU(6.0, name="stem_relu6")(BatchNormalization(name="stem_bn")(x))
    x = layers.DepthwiseConv1D(
        3, padding="same", depth_multiplier=2, use_bias=False, name="depthwise"
    )(x)
    x = layers.ReLU(6.0, name="depthwise_relu6")(BatchNormalization(name="depthwise_bn")(x))
    x = layers.Conv1D(48, 1, use_bias=False, name="pointwise")(x)
    x = layers.ReLU(6.0, name="pointwise_relu6")(BatchNormalization(name="pointwise_bn")(x))
    x = layers.SeparableConv1D(48, 3, padding="same", use_bias=False, name="separable")(x)
    x = layers.ReLU(name="separable_relu")(BatchNormalization(name="separable_bn")(x))
    x = layers.GlobalAveragePooling1D(name="gap")(x)
    outputs = layers.Dense(NUM_CLASSES, name="logits")(x)
    return keras.Model(inputs, outputs, name="depthwise_1d")


def trained_model(seed: int = 0, epochs: int = 8):
    """The network trained ``epochs`` epochs on the training split, its BN moving
    statistics then recalibrated on it (as the README pipeline does), and the data."""
    import keras

    import keras_bn

    data = load_sequences(seed)
    keras.utils.set_random_seed(seed)
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(*data["train"], batch_size=32, epochs=epochs, verbose=0)
    keras_bn.recalibrate_batch_norm(model, data["train"][0], batch_size=200)
    return model, data

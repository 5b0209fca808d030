"""Folding never breaks on the layers it does not touch: a sweep over ``keras.layers``.

Every public ``keras.layers`` class that can be built with simple arguments is put in
a small model right after a linear layer + BatchNormalization pair (or, for layers
that take raw tokens, strings or audio, right before one). Folding must not raise;
every BN must be folded or reported with a reason; the folded model must match the
original. The models run in float64, so the fold itself is exact to ~1e-15 and any
difference above float64 noise is a folding bug, not rounding.

``test_every_public_layer_is_covered`` fails when a Keras release adds a layer class
that is neither in ``CASES`` nor in ``NOT_BUILDABLE``, so the sweep keeps up.
"""

import inspect

import keras
import numpy as np
import pytest

from keras_bn.converters.folding import fold_batch_norms

L = keras.layers
# The sweep runs in float64; layers without float64 kernels on TensorFlow's CPU (3-D
# pooling, MelSpectrogram's float32 constants) compute in float32.
F32 = "float32"

# Keras layer classes that cannot go into a small model with simple arguments.
NOT_BUILDABLE = {
    "Layer": "the abstract base class (call() is not implemented)",
    "Wrapper": "an abstract base for wrappers (Bidirectional, TimeDistributed are swept)",
    "InputLayer": "created by keras.Input, not called on a tensor",
    "FlaxLayer": "wraps a Flax module; JAX backend only",
    "JaxLayer": "wraps a JAX function; JAX backend only",
    "TorchModuleWrapper": "wraps a torch.nn.Module; torch backend only",
    "TFSMLayer": "needs a TensorFlow SavedModel on disk",
    "MaxNumBoundingBoxes": "transforms bounding-box dictionaries, not tensors",
    "GRUCell": "a cell, swept inside RNN(...)",
    "LSTMCell": "a cell, swept inside RNN(...)",
    "SimpleRNNCell": "a cell, swept inside RNN(...)",
    "StackedRNNCells": "a cell, swept inside RNN(...)",
    "Equalization": "Keras 3.15 cannot build a Functional model with it ('part of a cycle')",
}


def _seeded(seed, low, high):
    return keras.initializers.RandomUniform(low, high, seed=seed)


def batch_norm(seed=0):
    """A BN with non-trivial statistics: mean != 0, variance spread, gamma != 1, beta != 0."""
    return L.BatchNormalization(
        gamma_initializer=_seeded(seed, 0.3, 2.0),
        beta_initializer=_seeded(seed + 1, -1.0, 1.0),
        moving_mean_initializer=_seeded(seed + 2, -2.0, 2.0),
        moving_variance_initializer=_seeded(seed + 3, 0.01, 5.0),
    )


# Contexts: (input shape, input dtype, how a linear layer + BN is applied to it).
def _dense_bn(x, units=6, seed=0):
    return batch_norm(seed)(L.Dense(units)(x))


def _conv2d_bn(x, seed=0):
    return batch_norm(seed)(L.Conv2D(3, 3, padding="same")(x))


def _conv3d_bn(x, seed=0):
    return batch_norm(seed)(L.Conv3D(2, 1)(x))


AFTER = {  # the layer under test follows Linear -> BN
    "vector": ((8,), lambda x, s=0: _dense_bn(x, 6, s)),
    "sequence": ((5, 4), lambda x, s=0: _dense_bn(x, 6, s)),
    "image": ((8, 8, 3), _conv2d_bn),
    "volume": ((4, 4, 4, 2), _conv3d_bn),
    "rank6": ((2, 3, 3, 3, 2), lambda x, s=0: _dense_bn(x, 2, s)),
}

# class name -> (context, factory). "pair:<ctx>" calls the layer on two BN branches;
# "before:<shape>:<dtype>" feeds the model input to the layer and folds after it.
CASES = {
    # Core, activations, regularization.
    "Activation": ("vector", lambda: L.Activation("tanh")),
    "ActivityRegularization": ("vector", lambda: L.ActivityRegularization(l1=0.01)),
    "Dense": ("vector", lambda: L.Dense(3)),
    "EinsumDense": ("vector", lambda: L.EinsumDense("ab,bc->ac", output_shape=3, bias_axes="c")),
    "Identity": ("vector", L.Identity),
    "Lambda": ("vector", lambda: L.Lambda(lambda t: 2.0 * t + 1.0)),
    "Masking": ("sequence", lambda: L.Masking(mask_value=0.0)),
    "ELU": ("vector", L.ELU),
    "LeakyReLU": ("vector", L.LeakyReLU),
    "PReLU": ("vector", L.PReLU),
    "ReLU": ("vector", L.ReLU),
    "Softmax": ("vector", L.Softmax),
    "AlphaDropout": ("vector", lambda: L.AlphaDropout(0.5)),
    "Dropout": ("vector", lambda: L.Dropout(0.5)),
    "GaussianDropout": ("vector", lambda: L.GaussianDropout(0.5)),
    "GaussianNoise": ("vector", lambda: L.GaussianNoise(0.5)),
    "SpatialDropout1D": ("sequence", lambda: L.SpatialDropout1D(0.5)),
    "SpatialDropout2D": ("image", lambda: L.SpatialDropout2D(0.5)),
    "SpatialDropout3D": ("volume", lambda: L.SpatialDropout3D(0.5)),
    "SpectralNormalization": ("vector", lambda: L.SpectralNormalization(L.Dense(3))),
    # Convolutions (a BN after them folds backward where exact).
    "Conv1D": ("sequence", lambda: L.Conv1D(3, 2)),
    "Conv1DTranspose": ("sequence", lambda: L.Conv1DTranspose(3, 2)),
    "Conv2D": ("image", lambda: L.Conv2D(3, 3, padding="same")),
    "Conv2DTranspose": ("image", lambda: L.Conv2DTranspose(3, 2)),
    "Conv3D": ("volume", lambda: L.Conv3D(2, 1)),
    "Conv3DTranspose": ("volume", lambda: L.Conv3DTranspose(2, 2)),
    "DepthwiseConv1D": ("sequence", lambda: L.DepthwiseConv1D(2)),
    "DepthwiseConv2D": ("image", lambda: L.DepthwiseConv2D(3)),
    "SeparableConv1D": ("sequence", lambda: L.SeparableConv1D(3, 2)),
    "SeparableConv2D": ("image", lambda: L.SeparableConv2D(3, 3)),
    "ConvLSTM1D": ("image", lambda: L.ConvLSTM1D(2, 3)),
    "ConvLSTM2D": ("volume", lambda: L.ConvLSTM2D(2, 3)),
    "ConvLSTM3D": ("rank6", lambda: L.ConvLSTM3D(2, 2)),
    # Pooling.
    "AdaptiveAveragePooling1D": ("sequence", lambda: L.AdaptiveAveragePooling1D(2)),
    "AdaptiveAveragePooling2D": ("image", lambda: L.AdaptiveAveragePooling2D(2)),
    "AdaptiveAveragePooling3D": ("volume", lambda: L.AdaptiveAveragePooling3D(2, dtype=F32)),
    "AdaptiveMaxPooling1D": ("sequence", lambda: L.AdaptiveMaxPooling1D(2)),
    "AdaptiveMaxPooling2D": ("image", lambda: L.AdaptiveMaxPooling2D(2)),
    "AdaptiveMaxPooling3D": ("volume", lambda: L.AdaptiveMaxPooling3D(2, dtype=F32)),
    "AveragePooling1D": ("sequence", lambda: L.AveragePooling1D(2)),
    "AveragePooling2D": ("image", lambda: L.AveragePooling2D(2)),
    "AveragePooling3D": ("volume", lambda: L.AveragePooling3D(2, dtype=F32)),
    "MaxPooling1D": ("sequence", L.MaxPooling1D),
    "MaxPooling2D": ("image", L.MaxPooling2D),
    "MaxPooling3D": ("volume", lambda: L.MaxPooling3D(dtype=F32)),
    "GlobalAveragePooling1D": ("sequence", L.GlobalAveragePooling1D),
    "GlobalAveragePooling2D": ("image", L.GlobalAveragePooling2D),
    "GlobalAveragePooling3D": ("volume", L.GlobalAveragePooling3D),
    "GlobalMaxPooling1D": ("sequence", L.GlobalMaxPooling1D),
    "GlobalMaxPooling2D": ("image", L.GlobalMaxPooling2D),
    "GlobalMaxPooling3D": ("volume", L.GlobalMaxPooling3D),
    # Reshaping.
    "Cropping1D": ("sequence", lambda: L.Cropping1D(1)),
    "Cropping2D": ("image", lambda: L.Cropping2D(1)),
    "Cropping3D": ("volume", lambda: L.Cropping3D(1)),
    "Flatten": ("image", L.Flatten),
    "Permute": ("sequence", lambda: L.Permute((2, 1))),
    "RepeatVector": ("vector", lambda: L.RepeatVector(2)),
    "Reshape": ("vector", lambda: L.Reshape((3, 2))),
    "UpSampling1D": ("sequence", L.UpSampling1D),
    "UpSampling2D": ("image", L.UpSampling2D),
    "UpSampling3D": ("volume", L.UpSampling3D),
    "ZeroPadding1D": ("sequence", L.ZeroPadding1D),
    "ZeroPadding2D": ("image", L.ZeroPadding2D),
    "ZeroPadding3D": ("volume", L.ZeroPadding3D),
    # Normalization.
    "BatchNormalization": ("vector", batch_norm),
    "GroupNormalization": ("sequence", lambda: L.GroupNormalization(groups=2)),
    "LayerNormalization": ("sequence", L.LayerNormalization),
    "RMSNormalization": ("sequence", L.RMSNormalization),
    "UnitNormalization": ("sequence", L.UnitNormalization),
    # Recurrent.
    "GRU": ("sequence", lambda: L.GRU(3)),
    "LSTM": ("sequence", lambda: L.LSTM(3, return_sequences=True)),
    "SimpleRNN": ("sequence", lambda: L.SimpleRNN(3)),
    "RNN": ("sequence", lambda: L.RNN(L.StackedRNNCells([L.LSTMCell(3), L.GRUCell(2)]))),
    "Bidirectional": ("sequence", lambda: L.Bidirectional(L.LSTM(3))),
    "TimeDistributed": ("sequence", lambda: L.TimeDistributed(L.Dense(3))),
    # Attention and merging (two BN branches).
    "Attention": ("pair:sequence", L.Attention),
    "AdditiveAttention": ("pair:sequence", L.AdditiveAttention),
    "MultiHeadAttention": ("pair:sequence", lambda: L.MultiHeadAttention(2, 3)),
    "GroupQueryAttention": (
        "pair:sequence",
        lambda: L.GroupQueryAttention(head_dim=3, num_query_heads=2, num_key_value_heads=1),
    ),
    "Add": ("pair:sequence", L.Add),
    "Average": ("pair:sequence", L.Average),
    "Concatenate": ("pair:sequence", L.Concatenate),
    "Dot": ("pair:sequence", lambda: L.Dot(axes=-1)),
    "Maximum": ("pair:sequence", L.Maximum),
    "Minimum": ("pair:sequence", L.Minimum),
    "Multiply": ("pair:sequence", L.Multiply),
    "Subtract": ("pair:sequence", L.Subtract),
    # Preprocessing on float tensors.
    "Discretization": ("vector", lambda: L.Discretization(bin_boundaries=[-0.5, 0.0, 0.5])),
    "Normalization": ("vector", lambda: L.Normalization(mean=0.5, variance=4.0)),
    "Rescaling": ("vector", lambda: L.Rescaling(2.0, offset=-1.0)),
    # Preprocessing of raw inputs (tokens, strings, audio): the BN pair comes after.
    "CategoryEncoding": ("before:(3,):int32", lambda: L.CategoryEncoding(8, "multi_hot")),
    "Embedding": ("before:(5,):int32", lambda: L.Embedding(8, 4)),
    "ReversibleEmbedding": ("before:(5,):int32", lambda: L.ReversibleEmbedding(8, 4)),
    "Hashing": ("before:(5,):int32", lambda: L.Hashing(8)),
    "IntegerLookup": ("before:(5,):int32", lambda: L.IntegerLookup(vocabulary=[1, 2, 3])),
    "StringLookup": ("before:(5,):string", lambda: L.StringLookup(vocabulary=["a", "b"])),
    "TextVectorization": (
        "before:(1,):string",
        lambda: L.TextVectorization(vocabulary=["a", "b"], output_sequence_length=4),
    ),
    "HashedCrossing": ("before:hashed", lambda: L.HashedCrossing(8)),
    "MelSpectrogram": (
        "before:(256,):float32",
        lambda: L.MelSpectrogram(fft_length=64, dtype=F32),
    ),
    "STFTSpectrogram": ("before:(256, 1):float64", lambda: L.STFTSpectrogram(frame_length=32)),
    # Image preprocessing and augmentation (identity or deterministic at inference).
    "CenterCrop": ("image", lambda: L.CenterCrop(4, 4)),
    "Resizing": ("image", lambda: L.Resizing(4, 4)),
    "Pipeline": ("image", lambda: L.Pipeline([L.RandomFlip(), L.Rescaling(0.5)])),
    "AugMix": ("image", lambda: L.AugMix(value_range=(-3, 3))),
    "AutoContrast": ("image", lambda: L.AutoContrast(value_range=(-3, 3))),
    "ContrastLimitedAdaptiveHistogramEqualization": (
        "image",
        lambda: L.ContrastLimitedAdaptiveHistogramEqualization(value_range=(-3, 3)),
    ),
    "CutMix": ("image", L.CutMix),
    "MixUp": ("image", L.MixUp),
    "RandAugment": ("image", lambda: L.RandAugment(value_range=(-3, 3))),
    "RandomBrightness": ("image", lambda: L.RandomBrightness(0.1)),
    "RandomColorDegeneration": ("image", lambda: L.RandomColorDegeneration(0.1)),
    "RandomColorJitter": ("image", lambda: L.RandomColorJitter(value_range=(-3, 3))),
    "RandomContrast": ("image", lambda: L.RandomContrast(0.1)),
    "RandomCrop": ("image", lambda: L.RandomCrop(4, 4)),
    "RandomElasticTransform": ("image", L.RandomElasticTransform),
    "RandomErasing": ("image", L.RandomErasing),
    "RandomFlip": ("image", L.RandomFlip),
    "RandomGaussianBlur": ("image", L.RandomGaussianBlur),
    "RandomGrayscale": ("image", L.RandomGrayscale),
    "RandomHue": ("image", lambda: L.RandomHue(0.1, value_range=(-3, 3))),
    "RandomInvert": ("image", lambda: L.RandomInvert(value_range=(-3, 3))),
    "RandomPerspective": ("image", L.RandomPerspective),
    "RandomPosterization": ("image", lambda: L.RandomPosterization(4, value_range=(0, 255))),
    "RandomRotation": ("image", lambda: L.RandomRotation(0.1)),
    "RandomSaturation": ("image", lambda: L.RandomSaturation(0.1)),
    "RandomSharpness": ("image", lambda: L.RandomSharpness(0.1)),
    "RandomShear": ("image", lambda: L.RandomShear(0.1)),
    "RandomTranslation": ("image", lambda: L.RandomTranslation(0.1, 0.1)),
    "RandomZoom": ("image", lambda: L.RandomZoom(0.1)),
    "Solarization": ("image", lambda: L.Solarization(value_range=(-3, 3))),
}


def _public_layer_classes():
    """Distinct public layer classes of keras.layers, each under its own class name."""
    classes = {}
    for name in dir(L):
        value = getattr(L, name)
        if inspect.isclass(value) and issubclass(value, keras.layers.Layer):
            canonical = value.__name__ if getattr(L, value.__name__, None) is value else name
            classes[canonical] = value
    return classes


def test_every_public_layer_is_covered():
    public = set(_public_layer_classes())
    missing = sorted(public - set(CASES) - set(NOT_BUILDABLE))
    assert not missing, f"keras.layers classes not in the sweep: {missing}"
    stale = sorted((set(CASES) | set(NOT_BUILDABLE)) - public)
    assert not stale, f"names in the sweep that keras.layers no longer has: {stale}"


def _inputs(model, rng):
    arrays = []
    for tensor in model.inputs:
        shape = (3, *tensor.shape[1:])
        dtype = str(tensor.dtype)
        if dtype == "string":
            arrays.append(np.array(rng.choice(["a", "b", "c"], shape), dtype=object))
        elif "int" in dtype:
            arrays.append(rng.integers(0, 8, shape).astype(dtype))
        else:
            arrays.append(rng.normal(0.3, 1.5, shape).astype(dtype))
    return arrays if len(arrays) > 1 else arrays[0]


def build_model(name):
    """``CASES[name]``'s model. The global seed is set first, so the linear layers'
    unseeded weights do not depend on which tests ran before in the worker, and a
    failure reproduces alone (CLAHE's case once failed in one element, by 0.023, in a
    full run and never alone)."""
    keras.utils.set_random_seed(0)
    context, factory = CASES[name]
    layer = factory()
    if context.startswith("pair:"):
        shape, linear_bn = AFTER[context.split(":")[1]]
        inputs = [keras.Input(shape), keras.Input(shape)]
        a, b = linear_bn(inputs[0], 0), linear_bn(inputs[1], 10)
        if isinstance(layer, L.MultiHeadAttention | L.GroupQueryAttention):
            outputs = layer(a, b)
        else:
            outputs = layer([a, b])
    elif context.startswith("before:"):
        spec = context.split(":", 1)[1]
        if spec == "hashed":
            inputs = [keras.Input((1,), dtype="int32"), keras.Input((1,), dtype="int32")]
            x = layer(tuple(inputs))
        else:
            shape_text, dtype = spec.rsplit(":", 1)
            inputs = keras.Input(eval(shape_text), dtype=dtype)  # a literal from CASES
            x = layer(inputs)
        x = L.Flatten()(keras.ops.cast(x, "float64")) if x.ndim > 2 else x
        outputs = _dense_bn(keras.ops.cast(x, "float64"), 4)
    else:
        shape, linear_bn = AFTER[context]
        inputs = keras.Input(shape)
        outputs = layer(linear_bn(inputs))
    return keras.Model(inputs, outputs)


def _outputs(model, x):
    return [
        np.asarray(keras.ops.convert_to_numpy(y), np.float64)
        for y in keras.tree.flatten(model(x, training=False))
    ]


def _batch_norm_count(model):
    count = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            count += _batch_norm_count(layer)
        elif isinstance(layer, L.BatchNormalization):
            count += 1
    return count


@pytest.fixture(autouse=True)
def _float64():
    # The global dtype policy too: Keras makes it from floatx the first time it is
    # read and keeps it, so a first read under float64 left every later model of the
    # worker float64 (other modules' tests failed when they ran after these).
    previous, previous_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(previous)
    keras.config.set_dtype_policy(previous_policy)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fold_leaves_other_layers_working(name):
    model = build_model(name)
    x = _inputs(model, np.random.default_rng(0))
    folded, report = fold_batch_norms(model, sample_inputs=x)

    # Every BN is accounted for: folded into a named layer, or kept with a reason.
    assert len(report.entries) == _batch_norm_count(model) >= 1
    for entry in report.entries:
        assert entry.folded or entry.reason, entry
    assert _batch_norm_count(folded) == report.not_folded_count

    # Same outputs. The models run in float64, where the fold is exact to ~1e-15, so
    # a difference above a few float64 roundings (float32 ones for the float32 layers)
    # is a bug, not noise.
    expected, received = _outputs(model, x), _outputs(folded, x)
    assert len(expected) == len(received)
    noise = 1e-9 if all(layer.dtype == "float64" for layer in model.layers[1:]) else 1e-6
    for want, got in zip(expected, received, strict=True):
        assert want.shape == got.shape
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        np.testing.assert_allclose(got, want, rtol=0, atol=noise * scale)

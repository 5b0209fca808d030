"""keras_bn.recalibration.recalibrate_batch_norm: moving statistics recomputed as
population statistics over a dataset, against NumPy."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from support.checks import as_float64, assert_moving_statistics, moving_statistics, spread_features
from support.models import randomize_batch_norms

from keras_bn.layers import BatchNormalization
from keras_bn.recalibration import recalibrate_batch_norm

StockBN = keras.layers.BatchNormalization


def _np_bn_inference(x, layer):
    """NumPy BN inference along the last axis with the layer's weights."""
    mean = as_float64(layer.moving_mean)
    var = as_float64(layer.moving_variance)
    gamma = as_float64(layer.gamma) if layer.gamma is not None else 1.0
    beta = as_float64(layer.beta) if layer.beta is not None else 0.0
    return (x - mean) / np.sqrt(var + layer.epsilon) * gamma + beta


def _dense(x, layer):
    kernel, bias = (as_float64(w) for w in layer.get_weights())
    return x @ kernel + bias


def _chain_model(bn_second, dropout=0.0):
    """x -> Dense -> stock BN -> Dense -> [Dropout] -> nested(BN) -> Dense."""
    inputs = keras.Input((5,))
    h = keras.layers.Dense(4, name="dense0")(inputs)
    h = StockBN(name="bn0")(h)
    h = keras.layers.Dense(3, name="dense1")(h)
    if dropout:
        h = keras.layers.Dropout(dropout, name="dropout")(h)
    nested = keras.Sequential([keras.Input((3,)), bn_second], name="nested")
    h = nested(h)
    outputs = keras.layers.Dense(2, name="dense2")(h)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(2)
    for layer in (model.get_layer("bn0"), bn_second):
        randomize_batch_norms(layer, rng)
    return model


@pytest.mark.parametrize("second", ["stock", "ours"])
def test_recalibrate_inference_mode_equals_numpy_population_statistics(second):
    bn1 = StockBN(name="bn1") if second == "stock" else BatchNormalization(name="bn1")
    model = _chain_model(bn1, dropout=0.5)
    x = spread_features(np.random.default_rng(3), 203, 5)  # 203 = 6 * 32 + 11: unequal last batch
    counts = recalibrate_batch_norm(model, x, batch_size=32)
    assert counts == {"bn0": 203, "bn1": 203}

    # NumPy reference: sequential, inference mode, Dropout off.
    bn0 = model.get_layer("bn0")
    h0 = _dense(x.astype(np.float64), model.get_layer("dense0"))
    assert_moving_statistics(bn0, h0.mean(axis=0), h0.var(axis=0))
    h1 = _dense(_np_bn_inference(h0, bn0), model.get_layer("dense1"))
    assert_moving_statistics(bn1, h1.mean(axis=0), h1.var(axis=0))


def test_recalibrated_statistics_are_a_fixed_point_of_inference():
    """Afterwards each BN's inference-mode input has exactly its moving statistics."""
    model = _chain_model(BatchNormalization(name="bn1"))
    x = spread_features(np.random.default_rng(4), 100, 5)
    recalibrate_batch_norm(model, x, batch_size=7)
    probe = keras.Model(
        model.input,
        [model.get_layer("bn0").input, model.get_layer("dense1").output],
    )
    for layer, values in zip(
        (model.get_layer("bn0"), model.get_layer("nested").get_layer("bn1")),
        probe(x, training=False),
        strict=True,
    ):
        values = as_float64(values)
        assert_moving_statistics(layer, values.mean(axis=0), values.var(axis=0))


def test_recalibrate_training_mode_uses_batch_statistics_upstream():
    model = _chain_model(StockBN(name="bn1"))
    bn0, bn1 = model.get_layer("bn0"), model.get_layer("nested").get_layer("bn1")
    x = spread_features(np.random.default_rng(5), 90, 5)
    weights_before = [w.copy() for w in model.get_weights()]
    counts = recalibrate_batch_norm(model, (x, np.zeros(90)), batch_size=40, mode="training")
    assert counts == {"bn0": 90, "bn1": 90}

    h0 = _dense(x.astype(np.float64), model.get_layer("dense0"))
    assert_moving_statistics(bn0, h0.mean(axis=0), h0.var(axis=0))
    # bn0 in training mode: each batch (40, 40, 10) normalized by its own stats.
    gamma, beta = (as_float64(w) for w in (bn0.gamma, bn0.beta))
    h1 = []
    for batch in np.split(h0, [40, 80]):
        normalized = (batch - batch.mean(0)) / np.sqrt(batch.var(0) + bn0.epsilon)
        h1.append(_dense(normalized * gamma + beta, model.get_layer("dense1")))
    h1 = np.concatenate(h1)
    assert_moving_statistics(bn1, h1.mean(axis=0), h1.var(axis=0))
    # Only the moving statistics changed.
    for before, after, variable in zip(
        weights_before, model.get_weights(), model.weights, strict=True
    ):
        if "moving" not in variable.path:
            np.testing.assert_array_equal(before, after)


def test_recalibrate_unbiased_option_and_batch_count():
    layer = BatchNormalization(momentum=None, unbiased_moving_variance=True, name="bn")
    model = keras.Sequential([keras.Input((3,)), layer])
    x = spread_features(np.random.default_rng(6), 13, 3)
    recalibrate_batch_norm(model, x, batch_size=4)  # 4 batches
    reference = x.astype(np.float64)
    assert_moving_statistics(layer, reference.mean(0), reference.var(0, ddof=1))
    assert int(as_float64(layer.num_batches_tracked)) == 4


def test_recalibrate_multi_axis_statistics():
    layer = BatchNormalization(axis=(1, -1), name="bn")
    model = keras.Sequential([keras.Input((3, 4, 2)), layer])
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(21, 3, 4, 2)) * rng.uniform(0.1, 10, (3, 1, 2)) + 7).astype("float32")
    recalibrate_batch_norm(model, x, batch_size=8)
    reference = x.astype(np.float64)
    assert_moving_statistics(layer, reference.mean(axis=(0, 2)), reference.var(axis=(0, 2)))


class _ChannelsFirst(keras.layers.Layer):
    """(B, T, C) -> (B, C, T), passing the (B, T) mask on."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, x):
        return keras.ops.transpose(x, (0, 2, 1))

    def compute_mask(self, inputs, mask=None):
        return mask


@pytest.mark.parametrize("layout", ["stock", "ours", "ours_channels_first"])
def test_recalibrate_uses_only_unmasked_positions(layout):
    rng = np.random.default_rng(8)
    tokens = rng.integers(1, 20, size=(30, 7))
    lengths = rng.integers(1, 8, size=30)
    tokens[np.arange(7) >= lengths[:, None]] = 0  # padding, masked by Embedding
    embedding = keras.layers.Embedding(20, 4, mask_zero=True, name="embedding")
    layers = [keras.Input((7,), dtype="int32"), embedding]
    if layout == "stock":
        bn = StockBN(name="bn")
    elif layout == "ours":
        bn = BatchNormalization(name="bn")
    else:  # (B, C, T) with the (B, T) mask: ours accepts masks for any axis
        layers.append(_ChannelsFirst())
        bn = BatchNormalization(axis=1, name="bn")
    model = keras.Sequential([*layers, bn])
    embedding.embeddings.assign(rng.normal(2.0, 3.0, (20, 4)).astype("float32"))
    recalibrate_batch_norm(model, tokens, batch_size=8)
    values = as_float64(embedding.embeddings)[tokens[tokens != 0]]
    assert_moving_statistics(bn, values.mean(axis=0), values.var(axis=0))


@pytest.mark.parametrize("cls", [StockBN, BatchNormalization], ids=["stock", "ours"])
def test_recalibrate_reads_masks_as_the_layer_does(cls):
    """A (B, T) mask on (B, T, C) with axis=1 covers the leading axes (Keras's convention)."""
    rng = np.random.default_rng(30)
    tokens = rng.integers(1, 20, size=(30, 7))
    tokens[np.arange(7) >= rng.integers(3, 8, size=30)[:, None]] = 0
    embedding = keras.layers.Embedding(20, 4, mask_zero=True)
    bn = cls(axis=1)
    model = keras.Sequential([keras.Input((7,), dtype="int32"), embedding, bn])
    embedding.embeddings.assign(rng.normal(2.0, 3.0, (20, 4)).astype("float32"))
    recalibrate_batch_norm(model, tokens, batch_size=8)
    vectors = keras.ops.convert_to_numpy(embedding.embeddings).astype(np.float64)
    steps = [vectors[tokens[:, t][tokens[:, t] != 0]] for t in range(7)]
    for name, expected in (
        ("moving_mean", [step.mean() for step in steps]),
        ("moving_variance", [step.var() for step in steps]),
    ):
        actual = keras.ops.convert_to_numpy(getattr(bn, name))
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_recalibrate_shared_layer_collects_every_call():
    shared = StockBN(name="shared_bn")
    a, b = keras.Input((3,)), keras.Input((3,))
    outputs = keras.layers.Add()([shared(a), shared(keras.layers.Dense(3, name="dense")(b))])
    model = keras.Model([a, b], outputs)
    randomize_batch_norms(shared, np.random.default_rng(9))
    xa, xb = (
        spread_features(np.random.default_rng(10), 50, 3),
        spread_features(np.random.default_rng(11), 50, 3),
    )
    recalibrate_batch_norm(model, [xa, xb])
    values = np.concatenate([xa, _dense(xb.astype(np.float64), model.get_layer("dense"))])
    assert_moving_statistics(shared, values.mean(0), values.var(0))


def _two_bn_model():
    inputs = keras.Input((4,), name="features")
    h = BatchNormalization(name="bn0")(inputs)
    h = keras.layers.Dense(3, name="dense")(h)
    outputs = StockBN(name="bn1")(h)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(12)
    model.get_layer("dense").set_weights([rng.normal(size=(4, 3)), rng.normal(size=3)])
    randomize_batch_norms(model.get_layer("bn0"), rng)
    randomize_batch_norms(model.get_layer("bn1"), rng)
    return model


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index):
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[rows], self.y[rows]


@pytest.mark.parametrize(
    "source", ["tuple", "x_only_tuple", "tf.data", "generator", "pydataset", "steps"]
)
def test_recalibrate_accepts_every_data_source(source):
    x = spread_features(np.random.default_rng(13), 70, 4)
    y = np.zeros((70, 1), "float32")
    expected = _two_bn_model()
    recalibrate_batch_norm(expected, x[:60] if source == "steps" else x, batch_size=20)

    model = _two_bn_model()
    data = {
        "tuple": (x, y),
        "x_only_tuple": (x,),
        "tf.data": tf.data.Dataset.from_tensor_slices((x, y)).batch(16),
        "generator": ((x[i : i + 9], y[i : i + 9]) for i in range(0, 70, 9)),
        "pydataset": _Batches(x, y, 11),
        "steps": x,
    }[source]
    counts = recalibrate_batch_norm(
        model, data, batch_size=20, steps=3 if source == "steps" else None
    )
    assert counts == {"bn0": 60 if source == "steps" else 70, "bn1": counts["bn0"]}
    for name in ("bn0", "bn1"):
        np.testing.assert_allclose(
            moving_statistics(model.get_layer(name)),
            moving_statistics(expected.get_layer(name)),
            rtol=1e-5,
            atol=1e-6,
        )


def test_recalibrate_renorm_layer_keeps_moving_stddev_consistent():
    layer = StockBN(renorm=True, name="bn")
    model = keras.Sequential([keras.Input((3,)), layer])
    x = spread_features(np.random.default_rng(14), 40, 3)
    recalibrate_batch_norm(model, x)
    reference = x.astype(np.float64)
    assert_moving_statistics(layer, reference.mean(0), reference.var(0))
    np.testing.assert_allclose(
        as_float64(layer.moving_stddev) ** 2 - layer.epsilon, reference.var(0), rtol=1e-5
    )


class _Block(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3)
        self.bn = BatchNormalization()

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)


def test_recalibrate_finds_batch_norm_inside_custom_layers():
    block = _Block()
    model = keras.Sequential([keras.Input((4,)), block])
    x = spread_features(np.random.default_rng(15), 33, 4)
    recalibrate_batch_norm(model, x, batch_size=10)
    values = _dense(x.astype(np.float64), block.dense)
    assert_moving_statistics(block.bn, values.mean(0), values.var(0))


def test_recalibrate_failure_leaves_statistics_unchanged():
    model = _two_bn_model()
    before = [moving_statistics(model.get_layer(name)) for name in ("bn0", "bn1")]
    x = spread_features(np.random.default_rng(16), 30, 4)

    def batches():
        yield x[:10]
        yield x[10:20]
        raise RuntimeError("data pipeline failed")

    with pytest.raises(RuntimeError, match="data pipeline failed"):
        recalibrate_batch_norm(model, batches())
    for name, (mean, variance) in zip(("bn0", "bn1"), before, strict=True):
        np.testing.assert_array_equal(moving_statistics(model.get_layer(name))[0], mean)
        np.testing.assert_array_equal(moving_statistics(model.get_layer(name))[1], variance)
    # and the model still runs normally (no patched calls left behind)
    assert all("call" not in vars(layer) for layer in model.layers)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "train"}, "Received: mode='train'"),
        ({"steps": 0}, "Received: steps=0"),
        ({"batch_size": 2.5}, "Received: batch_size=2.5"),
    ],
    ids=["mode", "steps", "batch_size"],
)
def test_recalibrate_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        recalibrate_batch_norm(_two_bn_model(), np.zeros((4, 4), "float32"), **kwargs)


def test_recalibrate_rejects_bad_data_and_unbuilt_models():
    with pytest.raises(ValueError, match="Received: data of type int"):
        recalibrate_batch_norm(_two_bn_model(), 3)
    with pytest.raises(ValueError, match="lengths"):
        recalibrate_batch_norm(_two_bn_model(), [np.zeros((4, 4)), np.zeros((5, 4))])
    with pytest.raises(ValueError, match="built model"):
        recalibrate_batch_norm(keras.Sequential([StockBN()]), np.zeros((4, 4)))


def test_recalibrate_warns_about_layers_without_data():
    model = _two_bn_model()
    before = moving_statistics(model.get_layer("bn0"))
    with pytest.warns(UserWarning, match="received no data"):
        counts = recalibrate_batch_norm(model, iter([]))
    assert counts == {"bn0": 0, "bn1": 0}
    np.testing.assert_array_equal(moving_statistics(model.get_layer("bn0"))[0], before[0])


# ------------------------------------------------ one pass through a Functional graph


def _branching_model():
    """A user's Functional model: a BN whose output feeds two branches (one with
    Dropout), a residual Add, a Concatenate, and a head after the last BN."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((6, 6, 3), name="image")
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv0")(inputs)
    h = BatchNormalization(name="bn0")(h)
    a = keras.layers.Conv2D(4, 1, name="conv_a")(keras.layers.Dropout(0.5)(h))
    a = StockBN(name="bn_a")(keras.layers.ReLU()(a))
    b = StockBN(name="bn_b")(keras.layers.Conv2D(4, 3, padding="same", name="conv_b")(h))
    h = keras.layers.Concatenate()([keras.layers.Add()([h, a]), b])
    h = StockBN(name="bn_last")(keras.layers.Conv2D(5, 1, name="conv_last")(h))
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h))
    return randomize_batch_norms(keras.Model(inputs, outputs), 21)


def _mobilenet():
    """Keras's MobileNetV2 up to its first residual Add (9 BN layers: the whole model's
    51 cost the partial passes 14 s here)."""
    keras.utils.set_random_seed(3)
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), alpha=0.35, include_top=False
    )
    model = keras.Model(model.input, model.get_layer("block_2_add").output)
    return randomize_batch_norms(model, 22, gain=(0.6, 1.4))


def _recalibrated(build, x, monkeypatch, sequential):
    """``build()``'s model recalibrated on ``x``, and whether the one graph pass ran."""
    from keras_bn import recalibration

    passes = []
    real = recalibration._measure_through_graph

    def graph_pass(*args):
        passes.append(None if sequential else real(*args))
        return passes[-1]

    monkeypatch.setattr(recalibration, "_measure_through_graph", graph_pass)
    model = build()
    counts = recalibrate_batch_norm(model, x, batch_size=16)
    return model, counts, bool(passes) and passes[-1] is not None


@pytest.mark.parametrize("build", [_branching_model, _mobilenet], ids=["branches", "mobilenet"])
def test_one_pass_through_the_graph_gives_the_sequential_statistics_bit_for_bit(build, monkeypatch):
    """Functional models are recalibrated in one pass, layer by layer over every batch
    (each tensor held until its last reader ran): the same statistics, bit for bit,
    as one partial pass per BN layer; an unequal last batch included."""
    shape = build().input_shape[1:]
    x = np.random.default_rng(23).uniform(-1.0, 1.0, (40, *shape)).astype("float32")
    graph, counts, ran = _recalibrated(build, x, monkeypatch, sequential=False)
    reference, reference_counts, _ = _recalibrated(build, x, monkeypatch, sequential=True)
    assert ran and counts == reference_counts and max(counts.values()) > 0
    for layer, twin in zip(graph.layers, reference.layers, strict=True):
        for got, expected in zip(layer.get_weights(), twin.get_weights(), strict=True):
            np.testing.assert_array_equal(got, expected, err_msg=layer.name)
    # and the property that defines them: inference over x gives each BN input its
    # moving statistics (float32 noise), here at the last BN of the branching model
    if build is _branching_model:
        probe = keras.Model(graph.input, graph.get_layer("conv_last").output)
        values = np.asarray(probe(x), np.float64).reshape(-1, 5)
        assert_moving_statistics(graph.get_layer("bn_last"), values.mean(0), values.var(0))


def test_the_graph_pass_steps_aside_over_its_memory_budget(monkeypatch):
    """Past GRAPH_PASS_BYTES of live tensors the sequential passes run instead, from the
    statistics as they were (nothing the abandoned pass wrote is kept)."""
    from keras_bn import recalibration

    x = np.random.default_rng(24).uniform(-1.0, 1.0, (40, 6, 6, 3)).astype("float32")
    reference, _, _ = _recalibrated(_branching_model, x, monkeypatch, sequential=True)
    monkeypatch.setattr(recalibration, "GRAPH_PASS_BYTES", 6 * 6 * 4 * 4 * 40)
    model, _, ran = _recalibrated(_branching_model, x, monkeypatch, sequential=False)
    assert not ran
    for got, expected in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(got, expected)


def _transfer_model():
    """The transfer-learning pattern: Keras's MobileNetV2 (to its first residual Add)
    called as a layer of the user's model, a Sequential block and a head after it."""
    base = _mobilenet()
    inputs = keras.Input((32, 32, 3), name="image")
    block = keras.Sequential([keras.Input(base.output_shape[1:]), StockBN(name="block_bn")])
    h = block(base(inputs))
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(h))
    return randomize_batch_norms(keras.Model(inputs, outputs), 26)


def test_nested_models_are_expanded_into_the_graph_pass(monkeypatch):
    """A Functional or Sequential model called as a layer is run call by call inside
    the pass: the statistics are the partial passes', bit for bit."""
    x = np.random.default_rng(27).uniform(-1.0, 1.0, (24, 32, 32, 3)).astype("float32")
    graph, counts, ran = _recalibrated(_transfer_model, x, monkeypatch, sequential=False)
    reference, reference_counts, _ = _recalibrated(_transfer_model, x, monkeypatch, True)
    assert ran and counts == reference_counts and len(counts) == 10
    for got, expected in zip(graph.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(got, expected)


def _classifier_on_its_backbones_input():
    """KerasHub's ImageClassifier: the outer model calls its backbone on
    ``backbone.input``, the backbone's own Input tensor."""
    keras.utils.set_random_seed(28)
    image = keras.Input((8, 8, 3), name="images")
    h = keras.layers.Conv2D(4, 3, use_bias=False)(image)
    backbone = keras.Model(image, keras.layers.ReLU()(StockBN(name="bn")(h)), name="backbone")
    h = keras.layers.GlobalAveragePooling2D()(backbone(backbone.input))
    return randomize_batch_norms(keras.Model(backbone.input, keras.layers.Dense(3)(h)), 28)


def test_a_model_calling_its_backbone_on_the_backbones_own_input(monkeypatch):
    """The graph pass recorded the backbone's Input as an alias of itself and looked it
    up forever (``keras-bn recalibrate`` of an ImageClassifier never ended). It takes
    the pass, and its statistics are the partial passes', bit for bit."""
    import threading

    x = np.random.default_rng(28).uniform(-1.0, 1.0, (24, 8, 8, 3)).astype("float32")
    result = []
    worker = threading.Thread(
        target=lambda: result.append(
            _recalibrated(_classifier_on_its_backbones_input, x, monkeypatch, sequential=False)
        ),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=120)
    assert result, "the recalibration did not end"
    graph, counts, ran = result[0]
    reference, reference_counts, _ = _recalibrated(
        _classifier_on_its_backbones_input, x, monkeypatch, sequential=True
    )
    assert ran and counts == reference_counts and len(counts) == 1
    for got, expected in zip(graph.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_the_graph_pass_leaves_shared_and_custom_layer_batch_norms_to_the_sequential_passes(
    monkeypatch,
):
    """A BN called twice, or held by a custom layer, is not one call of the graph: the
    sequential passes measure it (their results are checked against NumPy above)."""
    x = spread_features(np.random.default_rng(25), 40, 5)
    shared = StockBN(name="shared")
    inputs = keras.Input((5,))
    twice = keras.Model(inputs, shared(keras.layers.Dense(5)(shared(inputs))))
    _, _, ran = _recalibrated(lambda: twice, x, monkeypatch, sequential=False)
    assert not ran
    custom = keras.Sequential([keras.Input((4,)), _Block()])
    _, _, ran = _recalibrated(lambda: custom, x[:, :4], monkeypatch, sequential=False)
    assert not ran
    # a nested model without BN layers called twice (a siamese encoder): one set of
    # tensors for two calls, so the partial passes measure the BN after it
    keras.utils.set_random_seed(5)
    encoder = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="tanh")])
    a, b = keras.Input((5,)), keras.Input((5,))
    merged = keras.layers.Concatenate()([encoder(a), encoder(b)])
    siamese = keras.Model([a, b], StockBN(name="after")(merged))
    u, v = (np.random.default_rng(seed).normal(0.3, 1.0, (40, 5)).astype("float32") for seed in (28, 29))  # fmt: skip
    _, _, ran = _recalibrated(lambda: siamese, [u, v], monkeypatch, sequential=False)
    assert not ran
    left, right = (np.tanh(_dense(w.astype(np.float64), encoder.layers[0])) for w in (u, v))
    values = np.concatenate([left, right], axis=1)
    assert_moving_statistics(siamese.get_layer("after"), values.mean(0), values.var(0))
    # the nested chain model takes the pass, and its statistics are NumPy's (above)
    _, _, ran = _recalibrated(lambda: _chain_model(StockBN(name="bn1")), x, monkeypatch, False)
    assert ran


class _Doubling(keras.Model):
    """A Functional model whose class overrides call (doubling its input first)."""

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs * 2.0, training=training, mask=mask)


def test_a_functional_model_that_overrides_call_keeps_the_partial_passes(monkeypatch):
    """The graph pass would skip what the overriding call does: the BN layer's input
    is twice the data, as the partial passes measure it."""
    inputs = keras.Input((5,))
    x = spread_features(np.random.default_rng(30), 40, 5)
    build = lambda: _Doubling(inputs, StockBN(name="bn")(inputs))  # noqa: E731
    model, _, ran = _recalibrated(build, x, monkeypatch, sequential=False)
    assert not ran
    doubled = 2.0 * x.astype(np.float64)
    assert_moving_statistics(model.get_layer("bn"), doubled.mean(0), doubled.var(0))

"""Stale BatchNormalization statistics: found by ``inspect``/``export``, fixed by ``recalibrate``.

The scenario of issue 25: a small CNN trained 2 epochs with momentum 0.999 on
scikit-learn's digits scores ~10% in inference mode (its moving statistics are
still near their initial values) while every export of it validates.
``keras-bn recalibrate`` must give the statistics (and the held-out accuracy) of
the Python ``keras_bn.recalibrate_batch_norm``; ``inspect --data`` must name every
stale BN and ``export`` warn, and a healthy model must not be flagged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_bn.converters import cli
from keras_bn.converters.data_sources import open_data
from keras_bn.converters.model_io import model_input_specs
from keras_bn.converters.statistics_check import (
    SHIFT_LIMIT,
    VARIANCE_FACTOR_LIMIT,
    check_statistics,
    statistic_change,
)
from keras_bn.layers import BatchNormalization
from keras_bn.recalibration import recalibrate_batch_norm

BATCH_NORMS = ["bn1", "bn2", "bn3"]


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * 15).astype("float32")[..., None]  # integer pixels 0..240
    return images, digits.target.astype("int64")


def _stale_model(x, y) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Rescaling(1 / 240)(inputs)
    for index, filters in enumerate([16, 32, 32], 1):
        h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{index}")(h)
        h = BatchNormalization(momentum=0.999, name=f"bn{index}")(h)
        h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(10, activation="softmax", name="probs")(h)
    model = keras.Model(inputs, outputs)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    work = tmp_path_factory.mktemp("stale")
    x, y = _digits()
    train, held = slice(0, 1400), slice(1400, None)
    model = _stale_model(x[train], y[train])
    model.save(work / "stale.keras")
    np.savez(work / "train.npz", image=x[train], y=y[train])
    np.savez(work / "held.npz", image=x[held])
    # The Python reference: the same file, recalibrated by the library.
    reference = keras.saving.load_model(work / "stale.keras")
    recalibrate_batch_norm(reference, x[train], batch_size=64)
    return {
        "work": work,
        "x": x,
        "y": y,
        "train": train,
        "held": held,
        "stale_accuracy": _accuracy(model, x[held], y[held]),
        "reference": reference,
        "reference_accuracy": _accuracy(reference, x[held], y[held]),
    }


def _accuracy(model, x, y) -> float:
    return float(np.mean(model.predict(x, verbose=0).argmax(-1) == y))


def _statistics(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        name: (
            model.get_layer(name).moving_mean.numpy(),
            model.get_layer(name).moving_variance.numpy(),
        )
        for name in BATCH_NORMS
    }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_main(args, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_same_statistics(model, reference) -> None:
    for name, (mean, variance) in _statistics(reference).items():
        got_mean, got_variance = _statistics(model)[name]
        np.testing.assert_allclose(got_mean, mean, rtol=1e-6, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(got_variance, variance, rtol=1e-6, err_msg=name)


# ------------------------------------------------------------------------------ recalibrate


def test_recalibrate_restores_the_python_result(scenario, capsys):
    work, held = scenario["work"], scenario["held"]
    assert scenario["stale_accuracy"] < 0.3 < 0.85 < scenario["reference_accuracy"]
    before = _sha(work / "stale.keras")
    out = work / "recalibrated.keras"
    code, stdout, _ = run_main(
        ["recalibrate", work / "stale.keras", "--data", work / "train.npz", "-o", out, "--json"],
        capsys,
    )
    assert code == 0
    assert _sha(work / "stale.keras") == before  # the input is never modified
    recalibrated = keras.saving.load_model(out)
    _assert_same_statistics(recalibrated, scenario["reference"])
    accuracy = _accuracy(recalibrated, scenario["x"][held], scenario["y"][held])
    assert accuracy == scenario["reference_accuracy"]
    report = json.loads(stdout)["recalibration"]
    assert report["stale"] == BATCH_NORMS
    x, y = scenario["x"][scenario["train"]], scenario["y"][scenario["train"]]
    stale = keras.saving.load_model(work / "stale.keras")
    assert report["accuracy_before"] == pytest.approx(_accuracy(stale, x, y))
    assert report["accuracy_after"] == pytest.approx(_accuracy(recalibrated, x, y))
    # Recalibrating again changes nothing: the statistics are a fixed point.
    code, stdout, _ = run_main(
        ["recalibrate", out, "--data", work / "train.npz", "-o", work / "again.keras", "--json"],
        capsys,
    )
    report = json.loads(stdout)["recalibration"]
    assert code == 0 and report["stale"] == []
    assert max(layer["mean_shift"] for layer in report["layers"]) < 1e-5
    assert report["outputs"][0]["value"] == 1.0


def _write_images(directory: Path, x, y) -> None:
    from PIL import Image

    for index, (image, label) in enumerate(zip(x, y, strict=True)):
        folder = directory / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0].astype(np.uint8), mode="L").save(folder / f"{index:04}.png")


LOADER = """
import numpy as np
import tensorflow as tf

_data = np.load({path!r})

def dataset():
    return tf.data.Dataset.from_tensor_slices((_data["image"], _data["y"])).batch(50)

def generator():
    return ((_data["image"][i : i + 70], _data["y"][i : i + 70]) for i in range(0, 1400, 70))
"""


@pytest.mark.parametrize("kind", ["images", "dataset", "generator"])
def test_recalibrate_reads_every_kind_of_data(scenario, capsys, kind):
    work = scenario["work"]
    x, y = scenario["x"][scenario["train"]], scenario["y"][scenario["train"]]
    if kind == "images":
        data = work / "images"
        _write_images(data, x, y)
    else:
        (work / "my_loader.py").write_text(LOADER.format(path=str(work / "train.npz")))
        data = f"{work / 'my_loader.py'}:{kind}"
    out = work / f"from_{kind}.keras"
    code, stdout, err = run_main(
        ["recalibrate", work / "stale.keras", "--data", data, "-o", out, "--json"], capsys
    )
    assert code == 0, err
    _assert_same_statistics(keras.saving.load_model(out), scenario["reference"])
    report = json.loads(stdout)["recalibration"]
    assert report["accuracy_after"] > 0.85  # labels came from the folders / the tuples


@pytest.mark.parametrize(
    "data, fragment",
    [
        ("missing.npz", "does not exist"),
        ("wrong_names.npz", "expected the model inputs ['image']"),
        ("wrong_shape.npz", "has shape (4, 8, 7, 1)"),
        ("broken.py:dataset", "failed while importing (ZeroDivisionError"),
        ("raising.py:dataset", "failed (RuntimeError: no data here)"),
        ("nothing:at_all", "No module named 'nothing'"),
    ],
)
def test_recalibrate_bad_data_is_one_line_and_writes_nothing(scenario, capsys, data, fragment):
    work = scenario["work"] / "bad"
    work.mkdir(exist_ok=True)
    np.savez(work / "wrong_names.npz", pixels=np.zeros((4, 8, 8, 1)), other=np.zeros((4, 8, 8, 1)))
    np.savez(work / "wrong_shape.npz", image=np.zeros((4, 8, 7, 1)))
    (work / "broken.py").write_text("1 / 0\n")
    (work / "raising.py").write_text("def dataset():\n    raise RuntimeError('no data here')\n")
    spec = str(work / data) if data != "nothing:at_all" else data
    out = work / "out.keras"
    code, _, err = run_main(
        ["recalibrate", scenario["work"] / "stale.keras", "--data", spec, "-o", out], capsys
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not out.exists() and not list(work.glob(".out.keras*"))


# ------------------------------------------------------------------ finding stale statistics


def test_inspect_with_data_names_every_stale_layer(scenario, capsys):
    work = scenario["work"]
    code, stdout, err = run_main(
        ["inspect", work / "stale.keras", "--data", work / "train.npz", "--json"], capsys
    )
    assert code == 0
    statistics = json.loads(stdout)["statistics"]
    assert statistics["checked"] and statistics["stale"] == BATCH_NORMS
    assert statistics["outputs"][0]["kind"] == "top-1 agreement"
    assert statistics["outputs"][0]["value"] < 0.3
    assert "keras-bn recalibrate" in err


def test_export_warns_about_stale_statistics_and_names_the_fix(scenario, capsys):
    work = scenario["work"]
    args = [
        "export",
        work / "stale.keras",
        "-o",
        work / "stale.onnx",
        "--inputs",
        work / "held.npz",
    ]
    code, stdout, err = run_main(args, capsys)
    assert code == 0  # the file is faithful to the model: validation passes
    assert "Validation PASSED" in stdout
    warning = [line for line in err.splitlines() if "stale moving statistics" in line]
    assert len(warning) == 1 and "bn1, bn2, bn3" in warning[0]
    assert "keras-bn recalibrate" in warning[0]


def test_int8_export_checks_statistics_beside_quantizing_and_stays_faithful(scenario, capsys):
    # With --calibration the check runs in the background while onnxruntime calibrates
    # (it writes population statistics into the layers meanwhile): the int8 file must
    # still be the stale model's, its comparison Keras's run of the calibration data.
    import onnxruntime

    work = scenario["work"]
    x = scenario["x"][scenario["train"]][:256]
    np.savez(work / "calibration256.npz", image=x)
    before = _sha(work / "stale.keras")
    out = work / "stale_int8.onnx"
    code, stdout, err = run_main(
        [
            "export",
            work / "stale.keras",
            "-o",
            out,
            "--precision",
            "int8",
            "--calibration",
            work / "calibration256.npz",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads(stdout)
    steps = [step["step"] for step in report["steps"]]
    # Its first pass (it only reads the layers) starts beside the export; it writes
    # population statistics once the export has read the weights (the file below).
    assert steps.index("Checking BatchNormalization statistics against the data") < steps.index(
        "Folding BatchNormalization, exporting"
    )
    assert report["statistics"]["checked"] and report["statistics"]["stale"] == BATCH_NORMS
    assert any("stale moving statistics" in line for line in err.splitlines())
    assert _sha(work / "stale.keras") == before
    stale = keras.saving.load_model(work / "stale.keras")
    expected = stale.predict(x, verbose=0)
    got = onnxruntime.InferenceSession(str(out)).run(None, {"image": x})[0]
    recalibrated = scenario["reference"].predict(x, verbose=0)
    # The file is the stale model's (int8 noise), not the recalibrated one's.
    assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.95
    assert np.mean(recalibrated.argmax(-1) == expected.argmax(-1)) < 0.5
    comparison = report["precision"]["comparison"]
    assert comparison["samples"] == 256
    assert comparison["max_abs_diff"] == pytest.approx(np.abs(got - expected).max(), abs=1e-5)


def test_healthy_model_is_not_flagged_and_no_data_says_not_checked(scenario, capsys):
    work = scenario["work"]
    healthy = work / "healthy.keras"
    scenario["reference"].save(healthy)
    code, stdout, err = run_main(
        ["export", healthy, "-o", work / "healthy.onnx", "--inputs", work / "held.npz"], capsys
    )
    assert code == 0 and "stale" not in err
    assert "0 of 3 layer(s) stale" in stdout
    code, stdout, _ = run_main(["inspect", healthy], capsys)
    assert code == 0 and "BN statistics" in stdout and "not checked (no data" in stdout


# ------------------------------------------------------------------------------- the maths


def test_statistic_change_follows_its_formulas():
    rng = np.random.default_rng(0)
    moving_mean, mean = rng.normal(size=5), rng.normal(size=5)
    moving_variance, variance = 10 ** rng.uniform(-2, 1, size=(2, 5))
    epsilon = 1e-3
    shift, factor = statistic_change(moving_mean, moving_variance, mean, variance, epsilon)
    z = [
        abs(m - n) / (v + epsilon) ** 0.5
        for m, n, v in zip(mean, moving_mean, moving_variance, strict=True)
    ]
    ratios = [(p + epsilon) / (v + epsilon) for p, v in zip(variance, moving_variance, strict=True)]
    assert shift == pytest.approx(float(np.sqrt(np.mean(np.square(z)))), rel=1e-12)
    assert factor == pytest.approx(float(np.prod([max(r, 1 / r) for r in ratios]) ** 0.2))
    assert statistic_change(mean, variance, mean, variance, epsilon) == (0.0, 1.0)
    # Symmetric in the variance: twice or half the variance is the same factor.
    assert statistic_change(0, 1.0, 0, 2.0, 0)[1] == pytest.approx(2.0)
    assert statistic_change(0, 2.0, 0, 1.0, 0)[1] == pytest.approx(2.0)
    assert SHIFT_LIMIT == 0.25 and VARIANCE_FACTOR_LIMIT == 1.5


def test_check_statistics_leaves_the_model_bit_for_bit(scenario):
    model = keras.saving.load_model(scenario["work"] / "stale.keras")
    before = [v.numpy().copy() for v in model.variables]
    source = open_data(str(scenario["work"] / "held.npz"), model_input_specs(model))
    # before_writing is called once, after the first pass, before anything is written:
    # the export reads the weights until then (from another thread).
    seen = []

    def before_writing():
        seen.append([v.numpy().copy() for v in model.variables])

    check = check_statistics(model, source, before_writing=before_writing)
    assert check.stale == BATCH_NORMS and not check
    assert len(seen) == 1
    for value, at_call, variable in zip(before, seen[0], model.variables, strict=True):
        np.testing.assert_array_equal(at_call, value)
        np.testing.assert_array_equal(variable.numpy(), value)


def test_recalibrate_a_model_with_two_inputs(tmp_path, capsys):
    """A Functional model of two inputs, their Dense layers concatenated into a BN:
    ``--data`` holds one array per input. The data source's list of arrays reached
    ``recalibrate_batch_norm`` as a bare list, which Keras reads as ``(x, y)``, and
    the command ended in an internal error. The BN's new statistics are the NumPy
    population moments of its input over the data."""
    rng = np.random.default_rng(3)
    a, b = keras.Input((6,), name="a"), keras.Input((4,), name="b")
    dense_a, dense_b = keras.layers.Dense(5, name="dense_a"), keras.layers.Dense(3, name="dense_b")
    joined = keras.layers.Concatenate()([dense_a(a), dense_b(b)])
    model = keras.Model([a, b], keras.layers.Dense(2)(BatchNormalization(name="bn")(joined)))
    model.save(tmp_path / "two.keras")
    data = {"a": rng.normal(size=(70, 6)), "b": 3 + 2 * rng.normal(size=(70, 4))}
    data = {name: array.astype("float32") for name, array in data.items()}
    np.savez(tmp_path / "data.npz", **data)
    out = tmp_path / "recalibrated.keras"
    code, _, err = run_main(
        ["recalibrate", tmp_path / "two.keras", "--data", tmp_path / "data.npz", "-o", out],
        capsys,
    )
    assert code == 0, err
    joined_values = np.concatenate(
        [
            data[name].astype(np.float64) @ layer.kernel.numpy() + layer.bias.numpy()
            for name, layer in (("a", dense_a), ("b", dense_b))
        ],
        axis=1,
    )
    bn = keras.saving.load_model(out).get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), joined_values.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), joined_values.var(0), rtol=1e-5)


def test_recalibrate_refuses_statistics_that_overflow_float32(tmp_path, capsys):
    """Finite inputs of about 1e30: the BN input's square overflows float32 and the
    recalibrated variance is inf. The command wrote that model and exited 0 (no later
    command can use it); it now says which layer overflowed, in one line, exit 2,
    and writes nothing."""
    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, BatchNormalization(name="bn")(keras.layers.Dense(3)(inputs)))
    model.save(tmp_path / "m.keras")
    huge = np.random.default_rng(0).normal(size=(8, 4)) * 1e30
    np.savez(tmp_path / "huge.npz", x=huge.astype(np.float32))
    out = tmp_path / "out.keras"
    code, _, err = run_main(
        ["recalibrate", tmp_path / "m.keras", "--data", tmp_path / "huge.npz", "-o", out], capsys
    )
    assert code == 2, err
    assert err.strip().splitlines() == [
        line for line in err.strip().splitlines() if "error" in line
    ]
    assert "'bn''s moving_variance over this data is not finite" in err
    assert not out.exists()

"""The examples, run the way a user runs them (shortened), so they cannot rot.

Each example runs once per module in a subprocess (``python examples/...py --epochs
1 ...``); the tests then check the exit status, the printed table and the files it
wrote, and re-measure what the edge pipeline claims - Keras versus folded ONNX
accuracy on the held-out images - independently with Keras and onnxruntime.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_example(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def load_example(script: str):
    """Import an example script as a module (it only runs main() under __main__)."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def failure_message(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"


# --------------------------------------------------------------------------- edge pipeline


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("edge_pipeline")
    result = run_example(
        "edge_pipeline.py", "--epochs", "1", "--bench-runs", "10", "--output-dir", str(output_dir)
    )
    assert result.returncode == 0, failure_message(result)
    summary = json.loads((output_dir / "summary.json").read_text())
    stages = {row["stage"]: row for row in summary["stages"]}
    return result, output_dir, summary, stages


KERAS = "Keras, recalibrated (reference)"
FOLDED = "ONNX float32, BN folded"
UNFOLDED = "ONNX float32, BN not folded"
INT8 = "ONNX int8, BN folded"


def test_pipeline_prints_progress_and_summary(pipeline):
    result, output_dir, _, stages = pipeline
    out = result.stdout
    for number in range(1, 8):
        assert f"[{number}/7]" in out
    # Training progress is visible: Keras's per-epoch line (steps, accuracy, loss).
    assert re.search(r"\d+/\d+ - .*accuracy: [\d.]+ - loss: [\d.]+", out)
    assert str(output_dir.resolve()) in out  # the output directory is printed
    summary_table = out[out.index("Summary") :]
    for stage in ("Keras, as trained", KERAS, UNFOLDED, FOLDED, INT8):
        assert stage in stages
        assert stage in summary_table


def test_pipeline_writes_artifacts_atomically(pipeline):
    _, output_dir, _, stages = pipeline
    names = {path.name for path in output_dir.iterdir()}
    assert {
        "model.keras",
        "model_unfolded.onnx",
        "model_folded.onnx",
        "model_folded_int8.onnx",
        "summary.json",
        "validation.json",
    } <= names
    assert not [name for name in names if name.startswith(".")], names  # no temp leftovers
    for stage in (KERAS, UNFOLDED, FOLDED, INT8):
        assert stages[stage]["size_bytes"] == Path(stages[stage]["path"]).stat().st_size > 0


def test_pipeline_folds_every_batch_norm_and_validates(pipeline):
    _, output_dir, summary, stages = pipeline
    assert summary["fold"] == {"folded": 3, "not_folded": 0}
    assert summary["validation_passed"] is True
    # Folding removes the three BN computations from the ONNX graph.
    assert stages[FOLDED]["nodes"] < stages[UNFOLDED]["nodes"]
    import onnx

    folded_ops = {node.op_type for node in onnx.load(output_dir / "model_folded.onnx").graph.node}
    assert "BatchNormalization" not in folded_ops
    assert (
        sum(
            node.op_type == "Conv"
            for node in onnx.load(output_dir / "model_folded.onnx").graph.node
        )
        == 3
    )


def test_pipeline_accuracies_remeasured_independently(pipeline):
    """Keras vs folded ONNX vs int8 on the held-out images, measured here, not read back."""
    import keras
    import onnxruntime

    import keras_bn  # noqa: F401  (registers keras_bn>BatchNormalization for loading)

    _, output_dir, _, stages = pipeline
    data = load_example("edge_pipeline.py").load_data(seed=0)
    images, labels = data["held_out"]

    model = keras.saving.load_model(output_dir / "model.keras")
    keras_logits = np.asarray(model(images, training=False), dtype=np.float64)

    def onnx_logits(name: str) -> np.ndarray:
        session = onnxruntime.InferenceSession(
            str(output_dir / name), providers=["CPUExecutionProvider"]
        )
        feed = {session.get_inputs()[0].name: images}
        return session.run(None, feed)[0].astype(np.float64)

    folded_logits = onnx_logits("model_folded.onnx")
    int8_logits = onnx_logits("model_folded_int8.onnx")

    def correct(logits: np.ndarray) -> int:
        return int(np.sum(np.argmax(logits, axis=1) == labels))

    keras_correct, folded_correct, int8_correct = map(
        correct, (keras_logits, folded_logits, int8_logits)
    )
    # The script reports what we measure.
    assert stages[KERAS]["correct"] == keras_correct
    assert stages[FOLDED]["correct"] == folded_correct
    assert stages[INT8]["correct"] == int8_correct
    # Even after one epoch, the recalibrated model is far above chance (10%).
    assert keras_correct > 0.5 * len(labels)
    # Folding + export keeps the predictions: within one image of Keras.
    assert abs(folded_correct - keras_correct) <= 1
    np.testing.assert_allclose(folded_logits, keras_logits, atol=1e-3, rtol=1e-3)
    assert stages[FOLDED]["max_abs_diff"] == pytest.approx(
        np.max(np.abs(folded_logits - keras_logits)), rel=1e-3, abs=1e-6
    )
    # int8 changes the logits but barely the decisions.
    assert abs(int8_correct - keras_correct) <= 0.05 * len(labels)
    assert np.mean(np.argmax(int8_logits, 1) == np.argmax(keras_logits, 1)) >= 0.9


def test_pipeline_int8_per_channel_not_below_per_tensor(pipeline, tmp_path):
    """Issue 23's bar: the pipeline's int8 file (per-channel weights, the default scheme)
    not below the same model quantized per-tensor, both against the folded float model.

    The bar was set against a 10 dB loss (ORT's saturating kernels). Today both schemes
    sit near 38 dB, where activations' rounding rules and the trained weights decide
    the order: on the earlier CI machines per-channel led; on an AVX512-FP16/AMX one
    (where TensorFlow trains a slightly different model) per-tensor leads by 0.5 dB
    after one epoch and by 0.01 dB after the default five. So "not below" allows the 1 dB the same issue counts as
    equal for per-tensor against per-channel on its testbeds."""
    from keras_bn.converters import runtime
    from keras_bn.converters.comparison import sqnr_db
    from keras_bn.converters.precision import quantize_int8

    _, output_dir, _, _ = pipeline
    data = load_example("edge_pipeline.py").load_data(seed=0)
    folded = output_dir / "model_folded.onnx"
    per_tensor = tmp_path / "per_tensor.onnx"
    calibration = {"image": data["calibration"][0]}
    quantize_int8(folded, per_tensor, calibration, per_channel=False, layer_report=False)

    def logits(path: Path) -> np.ndarray:
        session = runtime.open_session(path, optimization="ORT_DISABLE_ALL")  # exact QDQ
        return runtime.run(session, {"image": data["held_out"][0]})[0]

    reference = logits(folded)
    per_channel_db = sqnr_db(logits(output_dir / "model_folded_int8.onnx"), reference)
    assert per_channel_db >= sqnr_db(logits(per_tensor), reference) - 1.0
    assert per_channel_db >= 30  # measured 38 dB


def test_pipeline_exits_nonzero_when_validation_fails(tmp_path):
    """Zero tolerance cannot pass (folding reorders float32 arithmetic): exit status 1."""
    result = run_example(
        "edge_pipeline.py",
        "--epochs",
        "1",
        "--atol",
        "0",
        "--rtol",
        "0",
        "--output-dir",
        str(tmp_path),
    )
    assert result.returncode == 1, failure_message(result)
    assert "does not match" in result.stderr
    assert not (tmp_path / "model_folded_int8.onnx").exists()  # stopped before int8
    assert json.loads((tmp_path / "validation.json").read_text())


def test_pipeline_rejects_bad_arguments():
    result = run_example("edge_pipeline.py", "--epochs", "0")
    assert result.returncode == 2
    assert "--epochs must be at least 1, received 0" in result.stderr


# --------------------------------------------------------------------------- why batch norm


def read_png_size(path: Path) -> tuple[int, int]:
    """Check a PNG's structure (signature, chunk CRCs, IEND) and return (width, height)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    offset, chunks = 8, []
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks.append((kind, body))
        offset += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    assert any(kind == b"IDAT" for kind, _ in chunks)
    return struct.unpack(">II", chunks[0][1][:8])


@pytest.fixture(scope="module")
def why(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("why_batch_norm")
    result = run_example(
        "why_batch_norm.py",
        "--epochs",
        "2",
        "--learning-rates",
        "0.1",
        "--init-scales",
        "1",
        "--output-dir",
        str(output_dir),
    )
    assert result.returncode == 0, failure_message(result)
    return result, output_dir, json.loads((output_dir / "results.json").read_text())


def test_why_batch_norm_writes_a_valid_figure(why):
    result, output_dir, _ = why
    figure = output_dir / "why_batch_norm.png"
    assert str(figure.resolve()) in result.stdout  # the command prints the path
    width, height = read_png_size(figure)
    assert width > 400 and height > 300
    import matplotlib.image

    pixels = matplotlib.image.imread(figure)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0  # something was drawn


def test_why_batch_norm_table_matches_results(why):
    result, _, results = why
    runs = results["runs"]
    assert [(run["batch_norm"], run["learning_rate"], run["init_scale"]) for run in runs] == [
        (True, 0.1, 1.0),
        (False, 0.1, 1.0),
    ]
    table = result.stdout[result.stdout.index("final acc") :]
    for run in runs:
        assert len(run["train_loss"]) == len(run["held_out_accuracy"]) == 2
        accuracies = [a for a in run["held_out_accuracy"] if a is not None]
        assert run["final_accuracy"] == run["held_out_accuracy"][-1]
        if accuracies:
            assert run["best_accuracy"] == max(accuracies)
        assert run["outcome"] in table
        final = run["final_accuracy"]
        assert (f"{final:.1%}" if final is not None else "nan") in table
    # The BN run at lr 0.1 learns within two epochs (measured: about 90%).
    assert runs[0]["final_accuracy"] > 0.5


def test_why_batch_norm_models_differ_only_in_batch_norm():
    import keras

    import keras_bn

    module = load_example("why_batch_norm.py")
    with_bn = module.build_model(batch_norm=True, init_scale=1.0, bn_momentum=0.9)
    without_bn = module.build_model(batch_norm=False, init_scale=1.0, bn_momentum=0.9)
    bn_layers = [
        layer for layer in with_bn.layers if isinstance(layer, keras_bn.BatchNormalization)
    ]
    assert len(bn_layers) == 3 and all(layer.momentum == 0.9 for layer in bn_layers)
    assert not any(
        isinstance(layer, keras.layers.BatchNormalization) for layer in without_bn.layers
    )
    convs = [layer for layer in with_bn.layers if isinstance(layer, keras.layers.Conv2D)]
    plain_convs = [layer for layer in without_bn.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [conv.use_bias for conv in convs] == [False] * 3
    assert [conv.use_bias for conv in plain_convs] == [True] * 3
    # init_scale multiplies the kernels' standard deviation.
    keras.utils.set_random_seed(0)
    small = module.build_model(batch_norm=False, init_scale=0.1, bn_momentum=0.9)
    keras.utils.set_random_seed(0)
    large = module.build_model(batch_norm=False, init_scale=10.0, bn_momentum=0.9)
    ratio = np.std(large.get_layer("conv2").kernel) / np.std(small.get_layer("conv2").kernel)
    assert ratio == pytest.approx(100.0, rel=0.05)


def test_why_batch_norm_rejects_bad_arguments():
    result = run_example("why_batch_norm.py", "--learning-rates", "0.1,-1")
    assert result.returncode == 2
    assert "positive finite numbers" in result.stderr

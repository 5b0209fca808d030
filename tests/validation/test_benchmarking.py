"""Tests for keras_bn.converters.benchmarking.bench_onnx."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from keras_bn.converters.benchmarking import OPTIMIZATION_LEVELS, bench_onnx, random_inputs
from keras_bn.converters.errors import UserInputError


def matmul_onnx(path: Path, width: int, *, batch: int | str = "N", dtype=np.float32) -> Path:
    """y = relu(x @ W + b), x of shape (batch, width): cost grows with width**2."""
    rng = np.random.default_rng(0)
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["a"]),
            helper.make_node("Relu", ["a"], ["y"]),
        ],
        "matmul",
        [helper.make_tensor_value_info("x", elem, [batch, width])],
        [helper.make_tensor_value_info("y", elem, [batch, width])],
        [
            numpy_helper.from_array(rng.normal(size=(width, width)).astype(dtype), "w"),
            numpy_helper.from_array(rng.normal(size=width).astype(dtype), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_bench_one_model(tmp_path):
    path = matmul_onnx(tmp_path / "small.onnx", 8)
    report = bench_onnx(path, runs=7, warmup=1, batch_size=3, threads=1)
    assert report.models == [str(path)]
    assert [r.optimization for r in report.results] == list(OPTIMIZATION_LEVELS)
    for result in report.results:
        assert result.runs == 7 and result.batch_size == 3
        assert 0 < result.min_ms <= result.median_ms <= result.p90_ms
        assert result.min_ms <= result.mean_ms
    text = str(report)
    assert "batch size 3, 7 runs, 1 thread(s)" in text
    assert "[2]/[1]" not in text
    assert report.to_dict()["results"][0]["model"] == str(path)


def test_bench_side_by_side_orders_models_by_cost(tmp_path):
    small = matmul_onnx(tmp_path / "small.onnx", 8)
    large = matmul_onnx(tmp_path / "large.onnx", 768)
    middle = matmul_onnx(tmp_path / "middle.onnx", 256)
    report = bench_onnx([small, large, middle], runs=15, warmup=2, batch_size=64, threads=1)
    # ~75 MFLOP against ~8 kFLOP per run: the large model is slower by far more
    # than any scheduling noise on a shared machine.
    for level in OPTIMIZATION_LEVELS:
        assert report.get(str(large), level).median_ms > 3 * report.get(str(small), level).median_ms
    rows = report.table()
    assert rows[0][:2] == ["model", "size"] and rows[0].count("speed-up") == 2
    assert [row[0] for row in rows[1:]] == ["[1] small.onnx", "[2] large.onnx", "[3] middle.onnx"]
    # Sizes on disk, and speed-ups against the first model: its median / theirs.
    assert report.sizes == [p.stat().st_size for p in (small, large, middle)]
    assert rows[2][1] == f"{large.stat().st_size / 1024**2:.1f} MiB"
    off_column = rows[0].index("speed-up")
    for row, path in zip(rows[1:], (small, large, middle), strict=True):
        off = [report.get(str(p), "off").median_ms for p in (small, path)]
        assert float(row[off_column].rstrip("x")) == pytest.approx(off[0] / off[1], rel=0.05)
    assert rows[1][off_column] == "1.00x"
    speedups = report.to_dict()["speedup_vs_first"]
    assert speedups[str(large)]["on"] < 1 / 3 < speedups[str(small)]["on"] == 1.0


def test_bench_sizes_count_external_data(tmp_path):
    path = matmul_onnx(tmp_path / "m.onnx", 64)
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)  # fmt: skip
    report = bench_onnx(path, runs=1, warmup=0)
    data = (tmp_path / "m.onnx.data").stat().st_size
    assert data > 64 * 64 * 4 - 1
    assert report.sizes == [path.stat().st_size + data]


def test_bench_given_inputs_are_cast_to_each_model(tmp_path):
    single = matmul_onnx(tmp_path / "f32.onnx", 16, batch=5)
    half = matmul_onnx(tmp_path / "f16.onnx", 16, batch=5, dtype=np.float16)
    inputs = {"x": np.ones((5, 16), np.float64)}
    report = bench_onnx([single, half], runs=2, warmup=0, inputs=inputs)
    assert {r.batch_size for r in report.results} == {5}


def test_random_inputs_follow_the_specs():
    inputs = random_inputs([("x", (None, 3, 4), "float32"), ("n", (2, 2), "int64")], 6)
    assert inputs["x"].shape == (6, 3, 4) and inputs["x"].dtype == np.float32
    assert inputs["n"].shape == (2, 2) and inputs["n"].dtype == np.int64
    with pytest.raises(UserInputError, match="dynamic dimensions"):
        random_inputs([("x", (None, None, 4), "float32")], 1)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"runs": 0}, "runs >= 1"),
        ({"warmup": -1}, "warmup >= 0"),
        ({"batch_size": 0}, "batch_size >= 1"),
        ({"inputs": {"x": np.ones((2, 9))}}, "has shape (2, 9)"),
        ({"inputs": {"x": np.ones((2, 8)), "z": np.ones(2)}}, "expected the ONNX model inputs"),
    ],
    ids=["runs", "warmup", "batch", "input-shape", "input-names"],
)
def test_bench_rejects_bad_settings(tmp_path, kwargs, fragment):
    path = matmul_onnx(tmp_path / "small.onnx", 8)
    with pytest.raises(UserInputError) as caught:
        bench_onnx(path, **kwargs)
    assert fragment in str(caught.value)


def test_bench_rejects_bad_files(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        bench_onnx(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(UserInputError, match="cannot be loaded by onnxruntime"):
        bench_onnx(garbage)

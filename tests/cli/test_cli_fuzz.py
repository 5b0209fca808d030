"""Fuzz the CLI with corrupted and truncated ``.keras`` files.

Every broken file must give exit status 2, one line on stderr, no traceback and
no file written. A few byte flips land where zip does not look (a timestamp, the
archive comment): those files still load, and then the command must succeed and
write a correct model. Most cases run in-process through ``main([...])``; a handful
run through the installed console script.
"""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.console import assert_rejected, run_many
from support.files import make_zip, zip_members
from support.models import conv_bn_classifier

from keras_bn.converters import cli
from keras_bn.converters.model_io import load_model


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[bytes, keras.Model, list[tuple[int, int]]]:
    """The good file's bytes, its model, and the byte ranges of its members' data."""
    path = tmp_path_factory.mktemp("fuzz_source") / "model.keras"
    model = conv_bn_classifier()
    model.save(path)
    data = path.read_bytes()
    ranges = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            # Local header: 30 bytes + name + extra field, then the (stored) data.
            start = info.header_offset + 30
            name_length = int.from_bytes(data[start - 4 : start - 2], "little")
            extra_length = int.from_bytes(data[start - 2 : start], "little")
            begin = start + name_length + extra_length
            ranges.append((begin, begin + info.compress_size))
    return data, model, ranges


def run_fold(path: Path, output: Path) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["fold", str(path), "-o", str(output), "--json"])
    return code, stdout.getvalue(), stderr.getvalue()


def check_outcome(data: bytes, workdir: Path, model: keras.Model, *, must_fail: bool) -> int:
    """Run ``fold`` on ``data``; exit 2 cleanly, or (if allowed) succeed correctly."""
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "input.keras"
    source.write_bytes(data)
    out_dir = workdir / "out"
    out_dir.mkdir(exist_ok=True)
    output = out_dir / "folded.keras"
    code, stdout, stderr = run_fold(source, output)
    assert "Traceback" not in stderr
    assert source.read_bytes() == data  # the input is never touched
    if code == 2 or must_fail:
        assert_rejected(code, stderr, "", out_dir)
        assert json.loads(stdout)["status"] == "error"
        return code
    assert code == 0, stderr
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype("float32")
    folded = load_model(output)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(folded(x, training=False)),
        keras.ops.convert_to_numpy(model(x, training=False)),
        rtol=1e-4,
        atol=1e-6,
    )
    output.unlink()
    return code


def test_truncated_files_are_rejected(original, tmp_path):
    data, model, _ = original
    offsets = sorted(
        {*np.linspace(0, len(data) - 1, 40).astype(int).tolist(), len(data) - 1, len(data) - 22}
    )
    for offset in offsets:
        check_outcome(data[:offset], tmp_path / f"t{offset}", model, must_fail=True)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(position=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_flipped_bytes_are_rejected_or_harmless(original, tmp_path, position, mask):
    data, model, ranges = original
    offset = int(position * len(data))
    flipped = bytearray(data)
    flipped[offset] ^= mask
    in_member_data = any(begin <= offset < end for begin, end in ranges)
    workdir = tmp_path / f"flip{offset}_{mask}"
    check_outcome(bytes(flipped), workdir, model, must_fail=in_member_data)


def structured_variants(data: bytes) -> dict[str, bytes]:
    """Archives that are valid zips but not valid models."""
    members = zip_members(data)
    config = members["config.json"]
    weights = members["model.weights.h5"]
    parsed = json.loads(config)
    variants = {
        "empty-zip": make_zip({}),
        "no-config": make_zip({k: v for k, v in members.items() if k != "config.json"}),
        "no-weights": make_zip({k: v for k, v in members.items() if k != "model.weights.h5"}),
        "config-empty": make_zip({**members, "config.json": b""}),
        "config-truncated": make_zip({**members, "config.json": config[: len(config) // 2]}),
        "config-binary": make_zip({**members, "config.json": bytes(range(256))}),
        "config-list": make_zip({**members, "config.json": b"[1, 2, 3]"}),
        "config-number-class": make_zip(
            {**members, "config.json": json.dumps({"class_name": 5, "config": {}}).encode()}
        ),
        "config-no-layers": make_zip(
            {
                **members,
                "config.json": json.dumps(
                    {**parsed, "config": {**parsed["config"], "layers": []}}
                ).encode(),
            }
        ),
        "config-layers-garbage": make_zip(
            {
                **members,
                "config.json": json.dumps(
                    {**parsed, "config": {**parsed["config"], "layers": [1, "two", None]}}
                ).encode(),
            }
        ),
        "config-unknown-module": make_zip(
            {**members, "config.json": config.replace(b'"keras.layers"', b'"evil.module"', 1)}
        ),
        "config-unknown-class": make_zip(
            {**members, "config.json": config.replace(b'"Conv2D"', b'"Conv9D"')}
        ),
        "config-wrong-shape": make_zip(
            {**members, "config.json": config.replace(b'"filters": 4', b'"filters": 5')}
        ),
        "config-bad-activation": make_zip(
            {**members, "config.json": config.replace(b'"softmax"', b'"no_such_activation"')}
        ),
        "weights-empty": make_zip({**members, "model.weights.h5": b""}),
        "weights-garbage": make_zip({**members, "model.weights.h5": b"\x89HDF\r\n\x1a\n" * 64}),
        "weights-truncated": make_zip(
            {**members, "model.weights.h5": weights[: len(weights) // 3]}
        ),
        "weights-zeroed-tail": make_zip(
            {**members, "model.weights.h5": weights[:-2000] + bytes(2000)}
        ),
        "deflated-and-truncated": make_zip(members, zipfile.ZIP_DEFLATED)[:-100],
        "nested-zip": make_zip({"model.keras": data}),
    }
    return variants


def test_structured_corruptions_are_rejected(original, tmp_path):
    data, model, _ = original
    for name, variant in structured_variants(data).items():
        check_outcome(variant, tmp_path / name, model, must_fail=True)


def test_a_few_through_the_console_script(original, tmp_path):
    data, _, ranges = original
    begin, end = ranges[-1]
    flipped = bytearray(data)
    flipped[(begin + end) // 2] ^= 0xFF
    variants = structured_variants(data)
    cases = {
        "flipped": bytes(flipped),
        "garbled-config": variants["config-binary"],
        "garbage-weights": variants["weights-garbage"],
    }
    jobs = {}
    for name, content in cases.items():
        workdir = tmp_path / name
        (workdir / "out").mkdir(parents=True)
        (workdir / "input.keras").write_bytes(content)
        jobs[name] = (["fold", workdir / "input.keras", "-o", workdir / "out" / "f.keras"], workdir)
    for name, result in run_many(jobs).items():
        assert_rejected(result.returncode, result.stderr, "input.keras", tmp_path / name / "out")
        assert (tmp_path / name / "input.keras").read_bytes() == cases[name]

"""The allocator thresholds the ``keras-bn`` program sets (converters/cli/allocator.py)."""

from __future__ import annotations

import sys

import pytest

from keras_bn.converters.cli import allocator, app


class _FakeLibc:
    def __init__(self, accepts: bool = True) -> None:
        self.calls: list[tuple[int, int]] = []
        self.accepts = accepts

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return int(self.accepts)


def test_both_thresholds_are_raised_through_mallopt():
    libc = _FakeLibc()
    assert allocator.tune_allocator(libc) is True
    # glibc's <malloc.h>: M_MMAP_THRESHOLD -3, M_TRIM_THRESHOLD -1
    assert libc.calls == [(-3, 256 << 20), (-1, 256 << 20)]
    libc = _FakeLibc()
    assert allocator.tune_allocator(libc, arenas=1) is True
    assert libc.calls == [(-3, 256 << 20), (-1, 256 << 20), (-8, 1)]  # M_ARENA_MAX -8
    assert allocator.tune_allocator(_FakeLibc(accepts=False)) is False
    assert allocator.tune_allocator(object()) is False  # no mallopt: nothing changes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_takes_the_thresholds():
    assert allocator.tune_allocator() is True


@pytest.mark.parametrize("owns_process", [True, False])
def test_only_the_program_tunes_the_allocator(tmp_path, monkeypatch, capsys, owns_process):
    """Process-wide: the keras-bn program sets it, a caller's main() does not."""
    called = []
    monkeypatch.setattr(app, "tune_allocator", lambda **options: called.append(options))
    code = app.main(["inspect", str(tmp_path / "missing.keras")], owns_process=owns_process)
    assert code == 2 and "missing.keras" in capsys.readouterr().err
    assert called == ([{"arenas": None}] if owns_process else [])


def test_recalibrate_alone_gets_one_arena(tmp_path, monkeypatch, capsys):
    """Keras's eager layers (recalibrate) allocate from other threads: one arena; the
    exports keep glibc's arena per thread (allocator.py)."""
    called = []
    monkeypatch.setattr(app, "tune_allocator", lambda **options: called.append(options))
    missing = str(tmp_path / "missing.keras")
    for argv in (
        ["recalibrate", missing, "--data", missing, "-o", str(tmp_path / "out.keras")],
        ["export", missing, "-o", str(tmp_path / "out.onnx")],
    ):
        assert app.main(argv, owns_process=True) == 2
    assert called == [{"arenas": 1}, {"arenas": None}]
    capsys.readouterr()

"""The C allocator's thresholds for the ``keras-bn`` program (glibc only).

An int8 export copies and frees buffers of tens to hundreds of megabytes over and
over: the serialized float model for each onnxruntime session (100 MB for ResNet50),
its augmented copies, shape inference's round trip, the quantizer's copy. glibc
serves any block over its mmap threshold (at most 32 MiB, however it adapts) with a
fresh ``mmap`` and gives it back on ``free``; every page of the next one is faulted
in and zeroed again by the kernel, and memory freed at the top of the heap is
returned likewise past the trim threshold. On ResNet50 at 128 px that was 3.5 CPU
seconds of system time in an 11.5 s int8 export (BENCHMARKS.md section 28).

:func:`tune_allocator` raises both thresholds to :data:`THRESHOLD` (``mallopt``), so
those blocks come from the heap and freed ones are reused: the same export spends
1.9 s in the kernel and finishes about 1.2 s sooner, for about 0.2 GB more peak
memory. The float32 export is unchanged. Only the program calls it
(``main(owns_process=True)``): it is process-wide, not a library's to set. Elsewhere
(macOS, musl, Windows) there is no ``mallopt`` and nothing changes.

Threads other than the main one allocate from arenas of their own, whose heaps hold
at most 64 MiB: a larger block from such a thread is a fresh ``mmap`` whatever the
threshold, faulted in on every use. ``keras-bn recalibrate`` runs Keras layer by layer
(eagerly), and on JAX its whole-batch tensors come from threads other than the main
one: MobileNetV2 at 128 px in batches of 64 faulted 8.9 million pages and spent 19.6 s
of its 36.5 s in the kernel. A command that declares ``MALLOC_ARENAS`` (its module)
gets that many arenas (``arenas``), one: every thread allocates from the main heap,
and freed blocks are reused (BENCHMARKS.md section 43). The exports keep glibc's
arena per thread: with one, MobileNetV2's int8 and float32 exports took 1.05x and
1.07x the time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["THRESHOLD", "tune_allocator"]

THRESHOLD = 256 << 20  # bytes: above the largest buffer an export recycles
_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_allocator(libc: object | None = None, *, arenas: int | None = None) -> bool:
    """Raise glibc's mmap and trim thresholds to :data:`THRESHOLD`, and with ``arenas``
    cap the number of arenas; whether it did (False where the C library has no
    ``mallopt``). Before the program starts threads: a thread keeps the arena it
    has. ``libc``: the C library (tests)."""
    if libc is None:
        if not sys.platform.startswith("linux"):
            return False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    options = [(_M_MMAP_THRESHOLD, THRESHOLD), (_M_TRIM_THRESHOLD, THRESHOLD)]
    if arenas is not None:
        options.append((_M_ARENA_MAX, arenas))
    return all([bool(mallopt(option, value)) for option, value in options])  # each tried

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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["THRESHOLD", "tune_allocator"]

THRESHOLD = 256 << 20  # bytes: above the largest buffer an export recycles
_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3


def tune_allocator(libc: object | None = None) -> bool:
    """Raise glibc's mmap and trim thresholds to :data:`THRESHOLD`; whether it did
    (False where the C library has no ``mallopt``). ``libc``: the C library (tests)."""
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
    return bool(mallopt(_M_MMAP_THRESHOLD, THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, THRESHOLD)
    )

"""Keep a long job's heap from holding on to freed large buffers.

glibc serves an allocation from its heap unless it is at least the mmap threshold, and it raises that threshold
to the size of every large block that is freed (up to 32 MiB on 64-bit). A training step allocates and frees
batches of several MiB (pixels, their float copies, activations): after the first one is freed they all come from
the heap, whose free space glibc keeps (fragmented, so it is not trimmed) — over tens of thousands of images this
grew `add-task`'s peak by about a gigabyte. Fixing the threshold (`mallopt(M_MMAP_THRESHOLD)`, which also stops
the dynamic adjustment) gives every block of 1 MiB or more its own mapping, returned to the system when freed.

A user's own `MALLOC_MMAP_THRESHOLD_` (glibc's environment variable) is left alone; on another C library (musl,
macOS) nothing is changed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 20


def map_large_blocks(threshold: int = DEFAULT_THRESHOLD) -> str:
    """Fix glibc's mmap threshold at `threshold` bytes for this process; says what was done (for the manifest)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']} (environment)"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
        return "unchanged (not glibc)"
    if mallopt(M_MMAP_THRESHOLD, int(threshold)) != 1:
        return "unchanged (mallopt refused)"
    return f"mmap threshold {threshold} bytes"

"""Keep a long job's heap from holding on to what it freed.

glibc serves allocations below its mmap threshold from the heap, and raises that threshold to the size of every
large block that is freed (up to 32 MiB on 64-bit). A training step allocates and frees batches of several MiB
(pixels, their float copies, activations): after the first one is freed they all come from the heap, and glibc
keeps the freed space, fragmented, so that its automatic trim (only at the heap's top) does not return it — over
50,000 images this grew `add-task`'s peak by about a gigabyte. `HeapTrimmer` returns the free pages of every arena
(`malloc_trim(0)`, which also releases whole free pages inside the heap) every few seconds while a job runs, from a
background thread, and at each stage boundary (`trim()`): the heap keeps serving each step's buffers (fast), and
what it holds unused is bounded by what is freed between two trims. The alternative, a fixed mmap threshold
(`MALLOC_MMAP_THRESHOLD_=1048576`), bounds the peak as well but gives every block of 1 MiB or more a fresh,
kernel-zeroed mapping: measured 1.5x slower training.

On a C library without `malloc_trim` (musl, macOS) nothing is done.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Callable, Optional


def malloc_trim_function() -> Optional[Callable[[int], int]]:
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class HeapTrimmer:
    """`with HeapTrimmer(interval_s):` returns the heap's free pages to the system every `interval_s` seconds
    (and once on exit). `describe()` says what was done, for the manifest."""

    def __init__(self, interval_s: float = 2.0):
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.interval_s = float(interval_s)
        self.trims = 0
        self._trim = malloc_trim_function()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def trim(self) -> None:
        if self._trim is not None:
            self._trim(0)
            self.trims += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.trim()

    def __enter__(self) -> "HeapTrimmer":
        if self._trim is not None:
            self._thread = threading.Thread(target=self._run, name="cl-serve-heap-trim", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.trim()

    def describe(self) -> str:
        if self._trim is None:
            return "unchanged (no malloc_trim)"
        return f"malloc_trim every {self.interval_s:g} s ({self.trims} so far)"

"""Give memory back to the operating system after a request that grew the replica.

glibc's allocator keeps freed heap pages (and per-thread arenas) for reuse, so after one large decode or JSON
body a replica's resident size stays at its high-water mark: over a run of hostile requests it only climbs. When
no request is in flight and the resident size has grown by more than `slack_mib` over the smallest size seen,
`malloc_trim(0)` returns the free pages at the top of every arena. On a libc without `malloc_trim` (musl, macOS)
this does nothing. Reading the resident size costs one small read of /proc/self/statm.
"""
from __future__ import annotations

import os

from cl_serve.base.heap import malloc_trim_function


def resident_mib() -> float | None:
    """This process's resident set size in MiB (None where /proc is not available)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


class MemoryReturn:
    def __init__(self, slack_mib: float = 64.0):
        self.slack_mib = slack_mib
        self.baseline = resident_mib()
        self.trims = 0
        self._trim = malloc_trim_function()

    def grown(self) -> bool:
        """Whether the process grew past baseline + slack (a read of /proc/self/statm: cheap enough for an event
        loop); a smaller size than the baseline becomes the baseline."""
        now = resident_mib()
        if now is None or self._trim is None:
            return False
        if self.baseline is None or now < self.baseline:
            self.baseline = now
        return now - self.baseline > self.slack_mib

    def give_back(self) -> None:
        """malloc_trim(0) (blocking for as long as the allocator walks its arenas: run it off the event loop)."""
        self._trim(0)
        self.trims += 1
        after = resident_mib()
        if after is not None:
            self.baseline = min(self.baseline, after)

    def give_back_if_grown(self) -> bool:
        """Trim when the process grew past baseline + slack; returns whether it trimmed."""
        if not self.grown():
            return False
        self.give_back()
        return True

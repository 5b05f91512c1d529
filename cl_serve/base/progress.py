"""Progress that fits where it runs: a bar on a terminal, plain log lines everywhere else.

On a terminal (stderr is a TTY) `progress()` is a tqdm bar. Off one — a RayJob pod's log, CI, a pipe, a file — a
bar's every refresh would be written as a `\\r` frame, so instead one line is printed when the stage starts, then
one every `every_percent` of the work or every `every_seconds` (whichever comes first; never more often than every
`min_seconds`), each with the count, the rate and the stage's estimated time left, and one when it ends.
`CL_SERVE_PROGRESS=bar|lines|off` overrides the choice.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO


def _mode(stream: TextIO) -> str:
    forced = os.environ.get("CL_SERVE_PROGRESS", "").strip().lower()
    if forced in ("bar", "lines", "off"):
        return forced
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):
        return "lines"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class LogLines:
    """tqdm's small interface (update, set_postfix, close, context manager) written as occasional plain lines."""

    def __init__(self, total: int | None, desc: str, unit: str, stream: TextIO, every_percent: float = 10.0,
                 every_seconds: float = 30.0, min_seconds: float = 2.0, clock=time.monotonic):
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.every_percent, self.every_seconds, self.min_seconds = every_percent, every_seconds, min_seconds
        self.clock = clock
        self.n = 0
        self.postfix = ""
        self.t0 = self.last_t = clock()
        self.last_n = 0
        self.closed = False
        self._write(f"started ({total} {unit})" if total else "started")

    def _write(self, what: str) -> None:
        print(f"[cl-serve] {self.desc}: {what}", file=self.stream, flush=True)

    def _status(self) -> str:
        elapsed = max(self.clock() - self.t0, 1e-9)
        rate = self.n / elapsed
        done = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total else \
            f"{self.n} {self.unit}"
        left = f", ~{_duration((self.total - self.n) / rate)} left" if self.total and rate > 0 else ""
        return f"{done}, {rate:.1f} {self.unit}/s{left}" + (f", {self.postfix}" if self.postfix else "")

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        since = now - self.last_t
        step = self.total * self.every_percent / 100 if self.total else None
        due = since >= self.every_seconds or (step is not None and self.n - self.last_n >= step)
        if due and since >= self.min_seconds and not (self.total and self.n >= self.total):
            self._write(self._status())
            self.last_t, self.last_n = now, self.n

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._write(f"done: {self._status()} in {_duration(self.clock() - self.t0)}")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress(total: int | None, desc: str, unit: str = "it", enabled: bool = True, stream: TextIO | None = None,
             **lines: Any):
    """A progress reporter for `total` units of work: tqdm on a terminal, LogLines elsewhere, nothing when not
    `enabled` (or CL_SERVE_PROGRESS=off)."""
    stream = stream or sys.stderr
    mode = _mode(stream) if enabled else "off"
    if mode == "off":
        return _Silent()
    if mode == "bar":
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=1.0, file=stream)
    return LogLines(total, desc, unit, stream, **lines)

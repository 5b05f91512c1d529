"""A model's own speed, the yardstick the serving benchmarks compare against: images/s at batch 32 over a number
of batches after one warm-up, and the latencies of single-image runs. Bounded by counts, never by seconds."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def model_speed(run: Callable[[np.ndarray], object], size: int, batches: int,
                singles: int) -> tuple[float, list[float]]:
    """(images/s at batch 32, batch-1 latencies in ms) of `run` on random (N, 3, size, size) float32 input."""
    x = np.random.default_rng(1).standard_normal((32, 3, size, size)).astype(np.float32)
    run(x)
    t0 = time.perf_counter()
    for _ in range(batches):
        run(x)
    per_second = batches * 32 / (time.perf_counter() - t0)
    latencies = []
    for i in range(singles):
        t = time.perf_counter()
        run(x[i % 32:i % 32 + 1])
        latencies.append(1000 * (time.perf_counter() - t))
    return per_second, latencies

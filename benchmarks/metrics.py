"""Continual-learning metrics (DESIGN.md): R[i][j] = accuracy on task j's test classes after learning task i.

A_i = accuracy over all test images of the classes seen after task i; A_T = A_{T-1}; A_avg = mean_i A_i;
forgetting = mean over j < T-1 of max_{l < T-1} R[l][j] - R[T-1][j].
"""
from __future__ import annotations

METRIC_DEFINITIONS = {
    "R[i][j]": "accuracy on task j's test images after learning task i (prediction over all classes seen so far)",
    "A_i": "accuracy over all test images of the classes seen after task i",
    "A_T": "A_i after the last task",
    "A_avg": "mean over i of A_i",
    "forgetting": "mean over j < T-1 of (max over l < T-1 of R[l][j]) - R[T-1][j]",
}


def weighted_accuracy(row: list[float], counts: list[int]) -> float:
    """Accuracy over the union of test sets, from per-set accuracies and the sets' image counts."""
    n = counts[: len(row)]
    return sum(r * c for r, c in zip(row, n)) / sum(n)


def summarize(R: list[list[float]], counts: list[int]) -> dict[str, float | list[float]]:
    T = len(R)
    A = [weighted_accuracy(R[i], counts) for i in range(T)]
    forgetting = 0.0
    if T > 1:
        forgetting = sum(max(R[l][j] for l in range(j, T - 1)) - R[T - 1][j] for j in range(T - 1)) / (T - 1)
    return {"A": A, "A_T": A[-1], "A_avg": sum(A) / T, "forgetting": forgetting}


def is_joint(run: str) -> bool:
    """Whether a benchmark run learns every task at once (the upper bound: `joint`, `joint-<variant>`)."""
    return run == "joint" or run.startswith("joint-")

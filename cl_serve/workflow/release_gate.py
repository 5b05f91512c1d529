"""The release gate: may a newly trained version go live by itself?

A store's `ReleasePolicy` names gate data (held-out images of old and new classes). After `add-task` trains a
version, the pipeline measures per-task accuracy on the gate data for the new version and for its parent (the
live version it was trained from); `decide` refuses the version when any earlier task lost more than `max_drop`
or when the new task is under `min_new_accuracy`. A refused version is still published, as a *candidate*
(immutable, listed, servable with `?version=N`, not live); `cl-serve promote N` makes it live by hand.
Pure Python: the decision, its reasons and the numbers all go into the version's manifest.
"""
from __future__ import annotations

from typing import Any

GATE_REFUSED_EXIT = 3  # `cl-serve add-task` exit code when the version was published as a candidate


def decide(parent_acc: dict[int, float], new_acc: dict[int, float], new_task: int, *, max_drop: float,
           min_new_accuracy: float, gate_images: dict[int, int]) -> dict[str, Any]:
    """Per-task accuracies (task index -> accuracy on the gate data) -> {passed, reasons, tasks: [...]}.

    Tasks without gate images are reported and not judged; the new task without gate images fails only when a
    floor is set (a floor nobody measured is not met).
    """
    reasons, rows = [], []
    for task in sorted(set(parent_acc) | set(new_acc) | {new_task}):
        row: dict[str, Any] = {"task": task, "images": gate_images.get(task, 0), "accuracy": new_acc.get(task)}
        if task == new_task:
            row["floor"] = min_new_accuracy
            if task not in new_acc:
                if min_new_accuracy > 0:
                    reasons.append(f"task {task} (new) has no gate images, so the floor "
                                   f"{min_new_accuracy:.3f} cannot be checked")
            elif new_acc[task] < min_new_accuracy:
                reasons.append(f"task {task} (new) reached {new_acc[task]:.3f}, under the floor {min_new_accuracy:.3f}")
        elif task in parent_acc and task in new_acc:
            drop = parent_acc[task] - new_acc[task]
            row.update({"parent_accuracy": parent_acc[task], "drop": drop})
            if drop > max_drop:
                reasons.append(f"task {task} dropped from {parent_acc[task]:.3f} to {new_acc[task]:.3f} "
                               f"({drop:+.3f} > max-drop {max_drop:.3f})")
        rows.append(row)
    return {"passed": not reasons, "reasons": reasons, "max_drop": max_drop,
            "min_new_accuracy": min_new_accuracy, "tasks": rows}

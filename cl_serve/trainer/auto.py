"""`--method auto`: on a store's first task, measure whether adaptation pays for this data, and which analytic head
width suits it, instead of guessing.

The task's images are split per class into a fit part and a held-out part (seeded; `AutoConfig.holdout`). The frozen
backbone and the candidate adapter each learn the fit part with the user's training recipe; for each, heads of every
allowed width are fitted on the fit part's features and scored on the held-out part. The adapter wins only if its
best held-out accuracy beats the frozen backbone's best by `margin`. The winner (method and head settings) is then
trained on the whole task by the normal path, and the evidence goes into the version's manifest. Nothing here runs
after the first task: later tasks load the winner from the parent version.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from cl_serve.contract.preprocessing import Preprocessing
from cl_serve.trainer.data import TaskData
from cl_serve.trainer.heads import build_head
from cl_serve.trainer.learner import Learner
from cl_serve.contract.method_settings import AutoConfig, NoneConfig
from cl_serve.trainer.train import TrainConfig, eval_batches, resolve_device, train_adapter


def split_task(data: TaskData, holdout: float, seed: int) -> tuple[TaskData, TaskData]:
    """(fit, held-out) with every class on both sides (a class of one image stays in fit only)."""
    gen = torch.Generator().manual_seed(seed)
    fit_idx, held_idx = [], []
    for c in range(len(data.class_names)):
        idx = torch.nonzero(data.labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = min(len(idx) - 1, max(1, math.ceil(holdout * len(idx)))) if len(idx) > 1 else 0
        held_idx.append(idx[:k])
        fit_idx.append(idx[k:])

    def take(parts: list[torch.Tensor]) -> TaskData:
        i = torch.cat(parts).sort().values
        return data.subset(i)  # views of the same decoded cache

    return take(fit_idx), take(held_idx)


def _head_candidates(head_cfg, auto: AutoConfig) -> list:
    if head_cfg.name != "analytic":
        return [head_cfg]
    fits = [m for m in auto.projections if 8 * m * m <= auto.max_head_mib * 2**20]
    if not fits:
        raise ValueError(f"no projection of {auto.projections} fits max_head_mib {auto.max_head_mib:g} "
                         f"(G takes 8 M^2 bytes)")
    return [head_cfg.model_copy(update={"projection": m}) for m in fits]


@torch.no_grad()
def _score_heads(learner: Learner, f_fit: torch.Tensor, fit: TaskData, held: TaskData, heads: list,
                 prep: Preprocessing, batch_size: int) -> list[tuple[Any, float]]:
    """Held-out accuracy of each head fitted on `f_fit` (the fit images' features from training)."""
    f_held = learner.feature_pass(eval_batches(held.eval_u8, prep, batch_size, learner.device))[0]
    out = []
    for hcfg in heads:
        head = build_head(hcfg, f_fit.shape[1])
        head.end_task(f_fit, fit.labels, nn.Linear(f_fit.shape[1], len(fit.class_names)))
        out.append((hcfg, float((head(f_held).argmax(1) == held.labels).float().mean())))
    return out


def choose_method(spec, weights: dict[str, torch.Tensor], auto: AutoConfig, head_cfg, data: TaskData,
                  prep: Preprocessing, train: TrainConfig, *, progress: bool = True,
                  log: Callable[[str], None] = lambda s: None) -> tuple[Any, Any, dict[str, Any]]:
    """(method config, head config, evidence) for the store's first task."""
    fit, held = split_task(data, auto.holdout, auto.seed)
    if len(held) == 0:
        raise ValueError("method auto needs at least 2 images in some class to hold one out")
    heads = _head_candidates(head_cfg, auto)
    device = resolve_device(train.device)
    rows, best = [], {}
    for mcfg in (NoneConfig(), auto.candidate):
        learner = Learner(spec, weights, mcfg, head_cfg).to_device(device)
        # the adapter step alone: its features of the fit images are what every candidate head is fitted on
        summary, f_fit = train_adapter(learner, fit, prep, train, progress=progress, desc=f"auto: {mcfg.name}")
        for hcfg, acc in _score_heads(learner, f_fit, fit, held, heads, prep, train.eval_batch_size):
            row = {"method": mcfg.name, "adapted": mcfg.name != "none",
                   "projection": getattr(hcfg, "projection", None), "held_out_accuracy": round(acc, 4),
                   "train_seconds": round(summary["seconds"], 2)}
            rows.append(row)
            if acc > best.get(row["adapted"], (None, None, -1.0))[2]:
                best[row["adapted"]] = (mcfg, hcfg, acc)
            log(f"auto: {mcfg.name}" + (f", M = {row['projection']}" if row["projection"] is not None else "")
                + f": held-out accuracy {acc:.3f}")
        del learner
    frozen, adapter = best[False], best[True]
    adapt = adapter[2] >= frozen[2] + auto.margin
    method_cfg, chosen_head, _ = adapter if adapt else frozen
    evidence = {"fit_images": len(fit), "held_out_images": len(held), "margin": auto.margin,
                "candidate": auto.candidate.model_dump(), "rows": rows,
                "chosen": {"method": method_cfg.name, "projection": getattr(chosen_head, "projection", None),
                           "held_out_accuracy": round((adapter if adapt else frozen)[2], 4),
                           "frozen_held_out_accuracy": round(frozen[2], 4),
                           "adapter_held_out_accuracy": round(adapter[2], 4)}}
    return method_cfg, chosen_head, evidence

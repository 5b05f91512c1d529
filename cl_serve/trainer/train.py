"""Learn one task: design (begin_task), train the method's parameters and the task's head block, finish
(end_task). Augmentation (random resized crop + horizontal flip) runs batched on the training device from the
decoded uint8 images, so the same loop is fast on a GPU and usable on a laptop CPU.
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from cl_serve.base.progress import progress as progress_reporter
from cl_serve.contract.preprocessing import Preprocessing
from cl_serve.contract.train_settings import TrainConfig
from cl_serve.trainer.collective import Local
from cl_serve.trainer.data import TaskData
from cl_serve.trainer.learner import Learner
from cl_serve.trainer.heads.drift import fit_drift


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def normalize(x01: torch.Tensor, p: Preprocessing) -> torch.Tensor:
    mean = torch.tensor(p.mean, dtype=torch.float32, device=x01.device).view(1, 3, 1, 1)
    std = torch.tensor(p.std, dtype=torch.float32, device=x01.device).view(1, 3, 1, 1)
    return (x01 - mean) / std


def eval_batches(images_u8, p: Preprocessing, batch_size: int, device) -> Iterator[torch.Tensor]:
    """Normalised evaluation views (a uint8 tensor or DecodedImages, read a batch at a time), batch by batch, on
    `device` (same arithmetic as cl_serve.contract.preprocessing)."""
    for i in range(0, len(images_u8), batch_size):
        yield normalize(images_u8[i:i + batch_size].to(device).float() / 255.0, p)


def augment(images_u8: torch.Tensor, size: int, min_scale: float, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop (area in [min_scale, 1], aspect in [3/4, 4/3]) + horizontal flip -> float in [0, 1]."""
    n, dev = images_u8.shape[0], images_u8.device
    u = torch.rand(n, 5, generator=gen, device="cpu").to(dev)
    area = min_scale + (1 - min_scale) * u[:, 0]
    log_ratio = (u[:, 1] * 2 - 1) * math.log(4 / 3)
    w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    cx, cy = (u[:, 2] * 2 - 1) * (1 - w), (u[:, 3] * 2 - 1) * (1 - h)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, (n, 3, size, size), align_corners=False)
    x = images_u8.float() / 255.0
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@torch.no_grad()
def predict(model, images_u8, p: Preprocessing, batch_size: int, device) -> torch.Tensor:
    """Arg-max class index of every image (model: learner or plain merged model)."""
    return torch.cat([model(x).argmax(1).cpu() for x in eval_batches(images_u8, p, batch_size, device)])


def make_optimizer(params, cfg: TrainConfig, total_steps: int):
    """The recipe's optimiser and its per-step schedule."""
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.schedule == "constant":
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))


class TokenCache:
    """Outputs of the frozen leading blocks (`Learner.split`) for the task's images, computed once per view, within
    `cfg.cache_max_gib` all told.

    `eval` holds the evaluation view in fp32 (moments and head features from it equal a full forward's) when it
    fits the budget, else None (those passes then run from pixels); `train` holds as many augmented views per
    image (random resized crop + flip, drawn once; up to `cfg.views`, and none unless fewer than the epochs) as
    fit in what is left, in the training precision: each step draws one of them per image, so augmentation
    survives the cache. With no view cached (as many views as epochs, or no room), training runs the whole
    backbone from the decoded pixels."""

    def __init__(self, learner: Learner, data: TaskData, eval_u8, p: Preprocessing, cfg: TrainConfig,
                 gen: torch.Generator, progress: bool, desc: str):
        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        n, n_eval, bs, t0 = len(data), len(eval_u8), cfg.eval_batch_size, time.time()  # eval: this worker's share
        with torch.no_grad():
            probe = learner.prefix(next(eval_batches(eval_u8[:1], p, 1, learner.device)))
        per_image = probe[0].numel()
        view_bytes = n * per_image * (2 if dtype == torch.bfloat16 else 4)
        budget = cfg.cache_max_gib * 2**30
        eval_bytes = n_eval * per_image * 4
        keep_eval = eval_bytes <= budget
        left = budget - (eval_bytes if keep_eval else 0)
        # Each epoch draws every image once: V cached views cost V passes over the frozen blocks where training from
        # pixels costs one per epoch. Views pay only when fewer than the epochs; else none (no memory, same passes).
        fit = max(0, min(cfg.views, int(left // max(view_bytes, 1))))
        self.views = fit if fit < cfg.epochs else 0
        self.bytes = (eval_bytes if keep_eval else 0) + self.views * view_bytes
        train_u8 = data.train_u8
        with progress_reporter(n_eval * int(keep_eval) + n * self.views, f"{desc} caching frozen blocks", "img",
                               enabled=progress and (keep_eval or self.views > 0)) as bar:
            shape = tuple(probe.shape[1:])
            self.eval = self._fill(torch.empty((n_eval, *shape), dtype=torch.float32, device=learner.device), learner,
                                   eval_batches(eval_u8, p, bs, learner.device), False, bar) if keep_eval else None
            self.train = torch.empty((self.views, n, *shape), dtype=dtype, device=learner.device) if self.views else None
            for v in range(self.views):
                self._fill(self.train[v], learner, (normalize(augment(train_u8[i:i + bs].to(learner.device),
                                                                      p.input_size, cfg.min_crop_scale, gen), p)
                                                    for i in range(0, n, bs)), cfg.precision == "bf16", bar)
        self.seconds = time.time() - t0

    @staticmethod
    @torch.no_grad()
    def _fill(out: torch.Tensor, learner: Learner, batches, bf16: bool, bar) -> torch.Tensor:
        """Prefix tokens of normalised input batches, written in order into the preallocated `out`."""
        i = 0
        for x in batches:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                out[i:i + len(x)] = learner.prefix(x).to(out.dtype)
            i += len(x)
            bar.update(len(x))
        return out

    def batch(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Tokens of images `idx`, each from one of its cached views drawn at random."""
        v = torch.randint(self.views, (len(idx),), generator=gen).to(idx.device)
        return self.train[v, idx]


def _optimise(logits_of, trainable: list[torch.Tensor], labels: torch.Tensor, cfg: TrainConfig, coll: Local,
              gen: torch.Generator, progress: bool, desc: str) -> tuple[float, float, float]:
    """`cfg.epochs` epochs of shuffled batches: cross-entropy of `logits_of(indices)` against `labels`, gradients
    summed over the workers of `coll`; returns the last epoch's mean loss and accuracy, and the seconds it took."""
    n, device = len(labels), labels.device
    total = cfg.epochs * math.ceil(n / cfg.batch_size)
    opt, sched = make_optimizer(trainable, cfg, total)
    bar = progress_reporter(total, desc, "step", enabled=progress)
    loss_sum, correct, seen = 0.0, 0, 0
    t0 = time.time()
    try:
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen).to(device)
            loss_sum, correct, seen = 0.0, 0, 0
            for i in range(0, n, cfg.batch_size):
                batch = order[i:i + cfg.batch_size]
                idx = batch[coll.rank::coll.world]  # this worker's share of the global batch
                y = labels[idx]
                opt.zero_grad(set_to_none=True)
                if len(idx):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                        logits = logits_of(idx)
                    loss = F.cross_entropy(logits, y)
                    loss.backward()
                coll.sync_gradients(trainable, len(idx), len(batch))
                opt.step()  # every worker steps with the same summed gradients: parameters stay identical
                sched.step()
                if len(idx):
                    loss_sum += float(loss.detach()) * len(idx)
                    correct += int((logits.argmax(1) == y).sum())
                    seen += len(idx)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.3f}", acc=f"{correct / max(seen, 1):.3f}")
    finally:
        bar.close()
    return loss_sum / max(seen, 1), correct / max(seen, 1), time.time() - t0


class _TaskPasses:
    """No-grad passes over one task's evaluation views on this worker's share of the images, gathered from every
    worker: through the cached prefix tokens when the first blocks are frozen (`TokenCache`), else from pixels.
    `moments` is what a method's begin_task/end_task call; its last features (the final model's) are kept."""

    def __init__(self, learner: Learner, data: TaskData, p: Preprocessing, cfg: TrainConfig, coll: Local,
                 cache_gen: torch.Generator | None, progress: bool, desc: str):
        self.learner, self.p, self.cfg, self.coll, self.n = learner, p, cfg, coll, len(data)
        self.mine = coll.shard(len(data))
        self.eval_u8 = data.eval_u8.subset(self.mine) if coll.world > 1 else data.eval_u8
        self.cache = TokenCache(learner, data, self.eval_u8, p, cfg, cache_gen, progress, desc) \
            if cache_gen is not None else None
        self.last: torch.Tensor | None = None
        self.progress, self.desc = progress, desc

    @property
    def _cached(self) -> bool:
        return self.cache is not None and self.cache.eval is not None

    def _views(self, what: str):
        """The batches of one pass, reported as they go (a long pass is never silent)."""
        batches = iter(self.cache.eval.split(self.cfg.eval_batch_size)) if self._cached else \
            eval_batches(self.eval_u8, self.p, self.cfg.eval_batch_size, self.learner.device)
        with progress_reporter(len(self.eval_u8), f"{self.desc} {what}", "img", enabled=self.progress) as bar:
            for x in batches:
                yield x
                bar.update(len(x))

    def features(self) -> torch.Tensor:
        feats = self.learner.feature_pass(self._views("features"), tokens=self._cached)[0]
        return self.coll.gather_rows(feats, self.n)

    def moments(self) -> dict[str, torch.Tensor]:
        feats, cs = self.learner.feature_pass(self._views("input moments"), moments=True, tokens=self._cached)
        self.last = self.coll.gather_rows(feats, self.n)
        return self.coll.mean_moments(cs, len(self.mine))


def train_adapter(learner: Learner, data: TaskData, p: Preprocessing, cfg: TrainConfig, *,
                  progress: bool = True, desc: str = "", collective: Local | None = None
                  ) -> tuple[dict[str, Any], torch.Tensor]:
    """Learn one task's branches and training block in place (begin_task, training, end_task); returns the
    summary and the features of the task's training images (eval view, final model) for the head.
    `collective`: the other workers of a multi-worker run (cl_serve.trainer.collective); None is one process.

    When the method adapts only the last blocks (`blocks`), the frozen blocks before them run once per image view
    (`TokenCache`) and every step runs only the adapted blocks. A task past the method's `adapt_tasks` learns no
    branch: the backbone stays as it is and only the training block (and then the head) learns."""
    coll = collective or Local()
    task, t0 = learner.num_tasks, time.time()
    torch.manual_seed(cfg.seed * 100_003 + task)
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + task)  # batch order: the same on every worker
    aug_gen = gen if coll.world == 1 else torch.Generator().manual_seed(cfg.seed * 100_003 + task + 7919 * coll.rank)
    adapting = learner.adapts(task)
    passes = _TaskPasses(learner, data, p, cfg, coll, aug_gen if adapting and learner.split > 0 else None, progress,
                         desc or f"task {task}")
    cache = passes.cache
    # Features of this task's images on the backbone as it was: with those after the update they fit the map that
    # moves the head's statistics of earlier classes (cl_serve.trainer.heads.drift)
    before = passes.features() if adapting and learner.head.num_classes and learner.head.tracks_drift else None
    if adapting:
        learner.method.begin_task(task, passes.moments)
    passes.last = None
    block = learner.add_block(data.class_names)
    method_params = learner.method.trainable_parameters() if adapting else []
    frozen = not method_params  # a frozen backbone: the features never change, so compute them once
    if frozen:
        passes.last = passes.features()
        cached = passes.last.to(learner.device)
    train_u8 = data.train_u8  # read a batch at a time from the decoded cache
    learner.eval()  # frozen backbone: no dropout / drop-path while adapting

    def logits_of(idx: torch.Tensor) -> torch.Tensor:  # a task trains only its own logits
        if frozen:
            return block(cached[idx]).float()
        if cache is not None and cache.views > 0:
            return block(learner.suffix(cache.batch(idx, aug_gen))).float()
        return learner.block_logits(normalize(augment(train_u8[idx].to(learner.device), p.input_size,
                                                      cfg.min_crop_scale, aug_gen), p)).float()

    final_loss, train_accuracy, t_train = _optimise(logits_of, method_params + list(block.parameters()),
                                                    data.labels.to(learner.device), cfg, coll, gen, progress,
                                                    desc or f"task {task}")
    block.requires_grad_(False)
    summary = learner.method.end_task(task, passes.moments) if adapting else learner.method.skip_task(task)
    features = passes.last if passes.last is not None else passes.features()
    drift = learner.head.transport(fit_drift(before, features, seed=task)) if before is not None else None
    out = {"task": task, "classes": data.class_names, "train_images": len(data), "epochs": cfg.epochs,
           "final_loss": final_loss, "train_accuracy": train_accuracy, "seconds": time.time() - t0,
           "method": summary, "adapted": adapting, "train_steps_seconds": t_train, "drift": drift,
           "train_images_per_second": cfg.epochs * len(data) / max(time.time() - t0, 1e-9)}
    if cache is not None:
        out["cache"] = {"frozen_blocks": learner.split, "views": cache.views, "seconds": cache.seconds,
                        "eval_view_cached": cache.eval is not None, "bytes": cache.bytes}
    return out, features


def train_task(learner: Learner, data: TaskData, p: Preprocessing, cfg: TrainConfig, *,
               progress: bool = True, desc: str = "", collective: Local | None = None) -> dict[str, Any]:
    """Learn one task in place on `learner` (already on its device): branches, then the head; returns the summary.
    With a `collective`, every worker ends with the same learner (the head sees the gathered features)."""
    out, features = train_adapter(learner, data, p, cfg, progress=progress, desc=desc, collective=collective)
    t0 = time.time()
    with progress_reporter(len(data.labels), f"{desc or 'task'} fitting the head", "img", enabled=progress) as bar:
        out["head"] = learner.finish_head(features, data.labels)
        bar.update(len(data.labels))
    out["head_seconds"] = time.time() - t0
    out["seconds"] += out["head_seconds"]
    learner.task_summaries.append({k: v for k, v in out.items() if k != "classes"})
    return out

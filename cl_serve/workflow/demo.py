"""`cl-serve demo`: the whole product offline on a CPU in a few minutes, with no download.

1. Backbone: public pretrained weights cannot be fetched offline, so the demo pretrains its own tiny ViT
   (4 blocks, width 96, 32x32 input) for a fixed number of optimiser steps (never a time budget: the result must
   not depend on how busy the machine is) on 24 generated "pretext" classes of filled coloured shapes, and
   saves it as a local checkpoint with a card (cached in the work directory).
2. Three tasks of four classes each, from a domain the backbone never saw: line drawings (dark outlines on light
   paper, no colour; `cl_serve.trainer.synthetic.render_drawing`). They go through the same store and code path as
   `cl-serve init` + `cl-serve add-task` twice: with InfLoRA branches learned on the first task and the backbone
   kept after it (`--method inflora --adapt-tasks 1`: first-session adaptation), and on the frozen backbone
   (`--method none`), both under the analytic head.
3. After each task it prints accuracy on the test images of every task so far (the R matrix) for both, then a
   summary row each (final mean accuracy, the largest drop of any task), then, unless --no-serve, serves the
   adapted store's live version with Ray Serve and classifies a few images over HTTP.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

DEMO_VIT = {"timm_model": "vit_small_patch16_224",
            "timm_kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}}
PRETEXT_CLASSES, TASKS, CLASSES_PER_TASK = 24, 3, 4
PRETRAIN_STEPS = 150


def pretrain_backbone(out_dir: Path, steps: int, seed: int = 0) -> Path:
    """Supervised pretraining of the demo ViT on generated pretext classes; returns the checkpoint path."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from cl_serve.base.progress import progress
    from cl_serve.trainer.backbone import BackboneSpec, create_model
    from cl_serve.trainer.synthetic import class_names, render
    from cl_serve.trainer.train import augment

    ckpt, card_path = out_dir / "model.safetensors", out_dir / "card.json"
    if ckpt.is_file() and card_path.is_file() and json.loads(card_path.read_text()).get("steps") == steps:
        print(f"[demo] reusing the pretrained demo backbone in {out_dir}")
        return ckpt
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    names = class_names(PRETEXT_CLASSES)
    rng = np.random.default_rng(seed)
    per = 160
    x = torch.from_numpy(np.stack([np.asarray(render(n, 32, rng)).transpose(2, 0, 1) for n in names for _ in range(per)]))
    y = torch.arange(len(names)).repeat_interleave(per)
    model = create_model(BackboneSpec(**DEMO_VIT), num_classes=len(names))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    t0, bs = time.time(), 128
    model.train()
    bar = progress(steps, "[demo] pretraining backbone", "step")
    for step in range(steps):
        bar.update(1)
        lr = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(y), (bs,), generator=gen)
        xb = (augment(x[idx], 32, 0.5, gen) - 0.5) / 0.5
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    bar.close()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(ckpt), metadata={"timm_model": DEMO_VIT["timm_model"],
                                          "timm_kwargs": json.dumps(DEMO_VIT["timm_kwargs"])})
    card = {**DEMO_VIT, "mean": [0.5] * 3, "std": [0.5] * 3, "input_size": [3, 32, 32], "crop_pct": 1.0,
            "steps": steps, "pretraining": f"{steps} steps (batch {bs}) on {PRETEXT_CLASSES} generated pretext classes",
            "final_loss": float(loss.detach())}
    (out_dir / "card.json").write_text(json.dumps(card, indent=2))
    print(f"[demo] pretrained the demo backbone: {steps} steps in {time.time() - t0:.0f}s, final loss {float(loss.detach()):.3f}")
    return ckpt


def make_tasks(root: Path) -> list[tuple[Path, Path]]:
    """Three tasks of line-drawing classes (a domain the pretext classes do not cover): (train dir, test dir) each."""
    from cl_serve.trainer.synthetic import class_names, write_image_folder

    shapes = [n.split("-", 1)[1] for n in class_names(TASKS * CLASSES_PER_TASK, offset=PRETEXT_CLASSES)]
    names = [f"drawing-{shape}" for shape in shapes]  # no colour in this domain: the shape is the class
    out = []
    for t in range(TASKS):
        cls = names[t * CLASSES_PER_TASK:(t + 1) * CLASSES_PER_TASK]
        out.append((write_image_folder(root / f"task-{t}" / "train", cls, 80, seed=10 + t, style="drawing"),
                    write_image_folder(root / f"task-{t}" / "test", cls, 25, seed=100 + t, style="drawing")))
    return out


DEMO_TRAIN = {"epochs": 16, "lr": 2e-2, "batch_size": 32}


def learn_tasks(store: Path, method: dict, head: str, ckpt: Path, tasks: list[tuple[Path, Path]],
                gate: Path | None, max_drop: float, seed: int = 0) -> list[list[float]]:
    """A fresh store learning every task in turn; returns the R matrix (accuracy per task after each task)."""
    from cl_serve.workflow import pipeline
    from cl_serve.trainer.train import TrainConfig

    shutil.rmtree(store, ignore_errors=True)
    pipeline.init_store(store, method=method, head={"name": head}, checkpoint=ckpt)
    if gate is not None:
        pipeline.set_policy(store, gate_data=gate, max_drop=max_drop)
    label = describe(method)
    print(f"[demo] {label}: store {store}" + (f", release gate on the test images (max drop {max_drop:.2f} per "
                                               "earlier task)" if gate is not None else ", no release gate"))
    cfg = TrainConfig(**DEMO_TRAIN, device="cpu", seed=seed)
    matrix = []
    for t, (train_dir, _) in enumerate(tasks):
        r = pipeline.add_task(store, train_dir, cfg, progress=True)
        row = [pipeline.evaluate(store, tasks[j][1], r.version)["accuracy"] for j in range(t + 1)]
        matrix.append(row)
        g = r.gate
        print(f"[demo]   {label}: version {r.version} learned task {t} in {r.train_seconds:.1f}s; accuracy per "
              "task so far: " + ", ".join(f"{a:.2f}" for a in row)
              + ("" if g is None else "; gate " + ("passed: live" if g.passed
                                                   else "REFUSED (" + "; ".join(g.reasons) + ")")))
        if not r.live:  # a refused version is a candidate; the next task would build on its parent instead
            pipeline.promote(store, r.version)
            print(f"[demo]   (the demo promotes version {r.version} by hand to go on: `cl-serve promote "
                  f"{r.version}`)")
    return matrix


def describe(method: dict) -> str:
    if method["name"] == "none":
        return "frozen backbone"
    return method["name"] + (f" (first {method['adapt_tasks']} task)" if method.get("adapt_tasks") else "")


def run_demo(workdir: str, method: str = "inflora", head: str = "analytic", pretrain_steps: int = PRETRAIN_STEPS,
             serve: bool = True, screenshot: str | None = None, max_drop: float = 0.10, seed: int = 0) -> dict:
    t_start = time.time()
    work = Path(workdir)
    ckpt = pretrain_backbone(work / "backbone", pretrain_steps)
    data_root = work / "data-drawings"
    if not data_root.is_dir():
        make_tasks(data_root)
    tasks = [(data_root / f"task-{t}" / "train", data_root / f"task-{t}" / "test") for t in range(TASKS)]
    gate = _gate_folder(work / "gate", [d for _, d in tasks])
    print(f"[demo] {TASKS} tasks x {CLASSES_PER_TASK} classes of line drawings (the backbone saw only filled "
          f"coloured shapes); every task trains {DEMO_TRAIN['epochs']} epochs, Adam lr {DEMO_TRAIN['lr']:g}")
    runs = [({"name": method, "adapt_tasks": 1} if method != "none" else {"name": "none"}, work / f"store-{method}-{head}")]
    if method != "none":
        runs.append(({"name": "none"}, work / f"store-none-{head}"))
    results = []
    for i, (m, store) in enumerate(runs):
        matrix = learn_tasks(store, m, head, ckpt, tasks, gate if i == 0 else None, max_drop, seed)
        final = matrix[-1]
        drop = max(max(matrix[k][j] for k in range(j, TASKS)) - final[j] for j in range(TASKS))
        results.append({"run": describe(m), "method": m, "R": matrix, "final_mean": sum(final) / len(final),
                        "max_drop": drop, "store": str(store)})
    print(f"\n[demo] accuracy on each task's test images after the last task, {head} head:")
    print(f"  {'':34s}" + "".join(f"task {j:<4d}" for j in range(TASKS)) + "mean     largest drop")
    for r in results:
        print(f"  {r['run']:34s}" + "".join(f"{a:<9.2f}" for a in r["R"][-1])
              + f"{r['final_mean']:<9.3f}{r['max_drop']:.2f}")
    result = {"runs": results, "store": results[0]["store"], "head": head}
    if serve:
        from cl_serve.workflow.demo_serving import serve_and_classify

        result["serving"] = serve_and_classify(Path(results[0]["store"]), [d for _, d in tasks],
                                               Path(screenshot) if screenshot else None)
    print(f"[demo] done in {time.time() - t_start:.0f}s")
    return result


def _gate_folder(root: Path, test_dirs: list[Path]) -> Path:
    """One ImageFolder of every task's held-out images (links), the demo's release-gate data."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for test_dir in test_dirs:
        for cls in test_dir.iterdir():
            (root / cls.name).symlink_to(cls.resolve())
    return root

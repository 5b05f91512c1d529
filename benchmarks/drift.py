"""Does moving the analytic head's statistics make up for a backbone that moves every task? (the demo's data)

Runs the demo's setting (its 150-step backbone, three tasks of four line-drawing classes, 80 training and 25 test
images per class) with InfLoRA branches on every task, the analytic head with `drift` ignore and transport, at
M = 0 and M = 2048, and prints per-task test accuracy after each task beside an oracle that re-fits a fresh head on
every task's training images with the final backbone (it keeps images; the product never does).

    python -m benchmarks.drift [--workdir demo-run] [--out benchmarks/results/drift-demo-cpu.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn


def run(workdir: Path, projection: int, drift: str, lr: float, epochs: int) -> list[dict]:
    from cl_serve.workflow.demo import TASKS, make_tasks, pretrain_backbone, PRETRAIN_STEPS
    from cl_serve.trainer import backbone as bb
    from cl_serve.trainer.data import load_task_data, scan_image_folder
    from cl_serve.trainer.heads import build_head, head_config_from_dict
    from cl_serve.trainer.learner import Learner
    from cl_serve.trainer.methods import method_config_from_dict
    from cl_serve.trainer.train import TrainConfig, eval_batches, train_task

    ckpt = pretrain_backbone(workdir / "backbone", PRETRAIN_STEPS)
    root = workdir / "data-drawings"
    if not root.is_dir():
        make_tasks(root)
    spec, weights, prep, _ = bb.from_checkpoint(ckpt)
    hcfg = head_config_from_dict({"name": "analytic", "projection": projection, "drift": drift})
    learner = Learner(spec, weights, method_config_from_dict({"name": "inflora"}), hcfg)
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=32, device="cpu")
    trains, tests, rows = [], [], []

    def accuracy(head, data) -> float:
        f = learner.feature_pass(eval_batches(data.eval_u8, prep, 256, "cpu"))[0]
        return round(float((head(f).argmax(1) == data.labels).float().mean()), 3)

    for t in range(TASKS):
        trains.append(load_task_data(scan_image_folder(root / f"task-{t}" / "train"), prep))
        summary = train_task(learner, trains[-1], prep, cfg, progress=False)
        tests.append(load_task_data(scan_image_folder(root / f"task-{t}" / "test"), prep, train_view=False,
                                    class_names=learner.labels))
        oracle = build_head(hcfg, learner.backbone.num_features)
        for d in trains:
            f = learner.feature_pass(eval_batches(d.eval_u8, prep, 256, "cpu"))[0]
            oracle.end_task(f, d.labels, nn.Linear(f.shape[1], len(d.class_names)))
        rows.append({"after_task": t, "accuracy": [accuracy(learner.head, d) for d in tests],
                     "oracle_refit": [accuracy(oracle, d) for d in tests], "drift": summary.get("drift")})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="demo-run")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/drift-demo-cpu.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = {"setting": f"demo backbone and line-drawing tasks, InfLoRA on every task, {a.epochs} epochs, Adam lr {a.lr:g}",
           "runs": []}
    for projection in (0, 2048):
        for drift in ("ignore", "transport"):
            torch.manual_seed(0)
            rows = run(Path(a.workdir), projection, drift, a.lr, a.epochs)
            out["runs"].append({"projection": projection, "drift": drift, "rows": rows})
            for r in rows:
                print(f"M={projection:<5d} {drift:9s} after task {r['after_task']}: accuracy {r['accuracy']}, "
                      f"oracle re-fit {r['oracle_refit']}" + (f", map {r['drift']}" if r["drift"] else ""), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

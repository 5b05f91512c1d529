"""Class-incremental accuracy benchmark, through the product's own path (pipeline.init_store + add_task,
the store included) for every method, plus the `joint` upper bound and the `simplecil` reference.

    python -m benchmarks.cil --tasks-root c100-tasks --checkpoint model.safetensors --seeds 0 1 2 --name c100-10t

`--tasks-root` is what ../shared/tools/to_imagefolder.py writes: train/task-NN/<class>/ and test/task-NN/<class>/.
After each task every seen task's test set is evaluated with the version's merged model (what the server runs).
Results: benchmarks/results/<name>.json (R matrices, A_T, A_avg, forgetting, seconds per task, peak memory),
then `python -m benchmarks.report <name>` draws the plots and the markdown table.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.metrics import METRIC_DEFINITIONS, summarize, weighted_accuracy

HERE = Path(__file__).parent
TRAINED = ("inflora", "sdlora", "sdlora-rr", "sdlora-kd", "seq-lora")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def task_dirs(root: Path, split: str, n: int | None) -> list[Path]:
    dirs = sorted(p for p in (root / split).iterdir() if p.is_dir())
    return dirs[:n] if n else dirs


def load_tests(test_dirs: list[Path], prep, classes_per_task: int | None, images: int | None = None):
    from trainer.data import load_task_data, scan_image_folder

    out = []
    for d in test_dirs:
        found = scan_image_folder(d)
        if classes_per_task:
            found = {c: found[c] for c in sorted(found)[:classes_per_task]}
        if images:
            found = {c: sorted(files)[:images] for c, files in found.items()}
        out.append(load_task_data(found, prep, train_view=False))
    return out


def limited_dir(src: Path, dst: Path, classes: int | None, images: int | None) -> Path:
    """A symlinked copy of an ImageFolder with at most `classes` classes and `images` images per class."""
    if not classes and not images:
        return src
    shutil.rmtree(dst, ignore_errors=True)
    for c in sorted(p for p in src.iterdir() if p.is_dir())[: classes or None]:
        (dst / c.name).mkdir(parents=True)
        for f in sorted(c.iterdir())[: images or None]:
            (dst / c.name / f.name).symlink_to(f.resolve())
    return dst


def evaluate_row(predict_fn, tests, labels: list[str]) -> list[float]:
    """Accuracy on each test set in `tests`; predict_fn maps uint8 images to indices into `labels`."""
    row = []
    for t in tests:
        target = torch.tensor([labels.index(t.class_names[int(y)]) for y in t.labels])
        row.append(float((predict_fn(t.eval_u8) == target).float().mean()))
    return row


def run_trained(name: str, mcfg: dict, train_dirs, tests, checkpoint, tcfg, work: Path, device,
                all_tests: bool = False) -> dict:
    """`cl-serve init` + one `add-task` per directory; after task i, evaluate test sets 0..i (all with all_tests)."""
    from cl_serve import pipeline
    from cl_serve.store import Store
    from trainer.train import TrainConfig, predict

    store = work / f"store-{name}"
    shutil.rmtree(store, ignore_errors=True)
    pipeline.init_store(store, method=mcfg, checkpoint=checkpoint)
    prep = Store(store).config().preprocessing
    R, seconds, phases, summaries = [], [], [], []
    for i, d in enumerate(train_dirs):
        t0 = time.time()
        r = pipeline.add_task(store, d, TrainConfig(**tcfg), export=False, progress=False)
        seconds.append(time.time() - t0)
        phases.append({"decode": r["decode_seconds"], "train": r["train_seconds"]})
        summaries.append(r["method_summary"])
        model = pipeline.load_merged_model(Store(store), r["version"]).to(device)
        labels = Store(store).manifest(r["version"]).labels
        seen = tests if all_tests else tests[: i + 1]
        R.append(evaluate_row(lambda u8: predict(model, u8, prep, 512, device), seen, labels))
        print(f"  {name} task {i}: {seconds[-1]:.1f}s ({r['decode_seconds']:.1f}s decode, "
              f"{r['train_seconds']:.1f}s train), R row {[round(x, 3) for x in R[-1]]}", flush=True)
    return {"R": R, "seconds_per_task": seconds, "seconds_by_phase": phases, "method_summaries": summaries}


def run_joint(mcfg, train_dirs, tests, checkpoint, tcfg, work: Path, device) -> dict:
    """Upper bound: one task holding every class (same epochs over the union), evaluated on every test set."""
    union = work / "joint-data"
    shutil.rmtree(union, ignore_errors=True)
    union.mkdir()
    for d in train_dirs:
        for c in d.iterdir():
            (union / c.name).symlink_to(c.resolve())
    return run_trained("joint", mcfg, [union], tests, checkpoint, tcfg, work, device, all_tests=True)


@torch.no_grad()
def run_simplecil(train_dirs, tests, checkpoint, device, batch: int = 512) -> dict:
    """Nearest class mean (cosine) on frozen backbone features; no training."""
    from trainer import backbone as bb
    from trainer.data import load_task_data, scan_image_folder
    from trainer.train import eval_batches

    spec, weights, prep, _ = bb.from_checkpoint(checkpoint)
    model = bb.load_backbone(spec, weights).to(device)

    def feats(u8):
        f = torch.cat([model(x) for x in eval_batches(u8, prep, batch, device)])
        return torch.nn.functional.normalize(f, dim=1)

    means, labels, R, seconds = [], [], [], []
    for i, d in enumerate(train_dirs):
        t0 = time.time()
        data = load_task_data(scan_image_folder(d), prep, train_view=False)
        f = feats(data.eval_u8)
        for c in range(len(data.class_names)):
            means.append(torch.nn.functional.normalize(f[data.labels.to(device) == c].mean(0), dim=0))
            labels.append(data.class_names[c])
        proto = torch.stack(means)
        R.append(evaluate_row(lambda u8: (feats(u8) @ proto.T).argmax(1).cpu(), tests[: i + 1], labels))
        seconds.append(time.time() - t0)
    print(f"  simplecil: final row {[round(x, 3) for x in R[-1]]}", flush=True)
    return {"R": R, "seconds_per_task": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks-root", required=True, type=Path)
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--methods", nargs="+", default=[*TRAINED, "joint", "simplecil"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--tasks", type=int, default=None, help="use only the first N tasks")
    ap.add_argument("--classes-per-task", type=int, default=None, help="reduced runs: first N classes per task")
    ap.add_argument("--train-images", type=int, default=None, help="reduced runs: first N train images per class")
    ap.add_argument("--test-images", type=int, default=None, help="reduced runs: first N test images per class")
    ap.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    ap.add_argument("--batch-size", type=int, default=None, help="override the config's batch size")
    ap.add_argument("--config", type=Path, default=HERE / "cil_config.json")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--name", default="cil")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (set it when several benchmark processes share one machine)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from trainer.backbone import from_checkpoint
    from trainer.train import resolve_device

    cfg = json.loads(a.config.read_text())
    tcfg = {**cfg["train"], "device": a.device}
    if a.epochs:
        tcfg["epochs"] = a.epochs
    if a.batch_size:
        tcfg["batch_size"] = a.batch_size
    device = resolve_device(a.device)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="cl-bench-"))
    prep = from_checkpoint(a.checkpoint)[2]
    train_src = task_dirs(a.tasks_root, "train", a.tasks)
    train_dirs = [limited_dir(d, work / "train" / d.name, a.classes_per_task, a.train_images) for d in train_src]
    tests = load_tests(task_dirs(a.tasks_root, "test", a.tasks), prep, a.classes_per_task, a.test_images)
    for m in cfg["methods"].values():  # InfLoRA's eps schedule runs over the tasks actually learned
        if "expected_tasks" in m:
            m["expected_tasks"] = len(train_dirs)
    counts = [len(t) for t in tests]
    a.out_dir.mkdir(parents=True, exist_ok=True)
    out_path = a.out_dir / f"{a.name}.json"
    result = {"name": a.name, "device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
              "tasks": len(train_dirs), "classes_per_task": [len(t.class_names) for t in tests], "test_images": counts,
              "train_images_per_class": a.train_images, "train": tcfg, "methods": cfg["methods"],
              "config_source": cfg.get("_source"), "seeds": a.seeds,
              "metric_definitions": METRIC_DEFINITIONS, "runs": {}}
    if out_path.exists():  # resume / merge runs of other seeds
        old = json.loads(out_path.read_text())
        if old.get("tasks") == result["tasks"]:
            result["runs"] = old.get("runs", {})
    for seed in a.seeds:
        for method in a.methods:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            print(f"[cil] {method} seed {seed}", flush=True)
            t0 = time.time()
            if method == "simplecil":
                run = run_simplecil(train_dirs, tests, a.checkpoint, device)
            elif method == "joint":
                run = run_joint(cfg["methods"]["joint"], train_dirs, tests, a.checkpoint, {**tcfg, "seed": seed}, work, device)
            else:
                run = run_trained(method, cfg["methods"][method], train_dirs, tests, a.checkpoint,
                                  {**tcfg, "seed": seed}, work, device)
            run.update({"seed": seed, "seconds": time.time() - t0, "peak_memory_mb": peak_memory_mb(device)})
            if method == "joint":
                run["A_T"] = weighted_accuracy(run["R"][0], counts)
            else:
                run.update(summarize(run["R"], counts))
            result["runs"].setdefault(method, {})[str(seed)] = run
            out_path.write_text(json.dumps(result, indent=1))  # after every run: nothing lost if cut off
            print(f"[cil] {method} seed {seed}: A_T {run['A_T']:.4f}" + (
                f" A_avg {run['A_avg']:.4f} forgetting {run['forgetting']:.4f}" if "A_avg" in run else "")
                + f" ({run['seconds']:.0f}s)", flush=True)
    print(f"[cil] wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

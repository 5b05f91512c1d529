"""Class-incremental accuracy benchmark: every adapter method x every head, plus joint training and SimpleCIL.

    python -m benchmarks.cil --profile cpu --tasks-root c100-tasks \\
        --checkpoint ../shared/backbones/vit-s4-32-tin100/model.safetensors --name c100-cpu

`--tasks-root` is what ../shared/tools/to_imagefolder.py writes: train/task-NN/<class>/ and test/task-NN/<class>/.
Each adapter run trains its branches once, with the product's own trainer (`cl_serve.trainer.train.train_adapter`: the
same code `cl-serve add-task` runs); the heads do not change the adapter's training (they are computed after each
task from the task's features), so every head is fitted on that one run from the same features, exactly as
`train_task` fits the store's head. After each task the merged body (branches folded in: what the server runs)
computes the features of every seen task's test images once, and every head is scored on them. SimpleCIL
(cosine nearest class mean) and extra head variants are scored on the frozen run (`none`). `joint` learns one
task holding every class (same epochs over the union): the upper bound, scored with every head.
Results: benchmarks/results/<name>.json (R per run and head, A_T, A_avg, forgetting, seconds), saved after every
run; a re-run with the same --name resumes, skipping finished runs. Then `python -m benchmarks.report <name>`.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from benchmarks.metrics import METRIC_DEFINITIONS, is_joint, summarize, weighted_accuracy

HERE = Path(__file__).parent


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def task_dirs(root: Path, split: str, n: int | None) -> list[Path]:
    dirs = sorted(p for p in (root / split).iterdir() if p.is_dir())
    return dirs[:n] if n else dirs


def load_split(dirs: list[Path], prep, classes_per_task: int | None, images: int | None, train_view: bool):
    """Decode each task directory once (at most `classes_per_task` classes and `images` images per class)."""
    from cl_serve.trainer.data import load_task_data, scan_image_folder

    out = []
    for d in dirs:
        found = scan_image_folder(d)
        if classes_per_task:
            found = {c: found[c] for c in sorted(found)[:classes_per_task]}
        if images:
            found = {c: sorted(files)[:images] for c, files in found.items()}
        out.append(load_task_data(found, prep, train_view=train_view))
    return out


def union(datasets):
    """One TaskData holding every class of `datasets` (joint training)."""
    from cl_serve.trainer.data import DecodedImages, TaskData

    names, offset, labels = [], 0, []
    for d in datasets:
        names += d.class_names
        labels.append(d.labels + offset)
        offset += len(d.class_names)
    return TaskData(class_names=names, train_u8=DecodedImages.concat([d.train_u8 for d in datasets]),
                    eval_u8=DecodedImages.concat([d.eval_u8 for d in datasets]), labels=torch.cat(labels))


@torch.no_grad()
def body_features(body, u8, prep, device, batch: int = 256) -> torch.Tensor:
    from cl_serve.trainer.train import eval_batches

    return torch.cat([body(x).float().cpu().clone() for x in eval_batches(u8, prep, batch, device)])


class TestTokens:
    """Test images' tokens after the blocks no run adapts (computed once), so each evaluation of the merged body
    runs only its adapted blocks: the same numbers as `body_features`, a fraction of the time."""

    def __init__(self, split: int, prep, device):
        self.split, self.prep, self.device, self.tokens = split, prep, device, {}

    @torch.no_grad()
    def features(self, body, j: int, u8: torch.Tensor, batch: int = 256) -> torch.Tensor:
        from cl_serve.trainer.token_path import prefix_tokens, suffix_features
        from cl_serve.trainer.train import eval_batches

        if not self.split:
            return body_features(body, u8, self.prep, self.device, batch)
        if j not in self.tokens:
            self.tokens[j] = torch.cat([prefix_tokens(body, x, self.split)
                                        for x in eval_batches(u8, self.prep, batch, self.device)])
        return torch.cat([suffix_features(body, t, self.split).float().cpu().clone() for t in self.tokens[j].split(batch)])


def accuracies(logits_fn, feats: list[torch.Tensor], tests, offsets: list[int]) -> list[float]:
    """Accuracy on each test set: its images' argmax over all seen classes against the class's global index."""
    return [float((logits_fn(f).argmax(1) == t.labels + off).float().mean()) for f, t, off in zip(feats, tests, offsets)]


def ncm_logits(means: list[torch.Tensor]):
    """SimpleCIL: cosine similarity to each class's mean feature."""
    proto = torch.nn.functional.normalize(torch.stack(means), dim=1)
    return lambda f: torch.nn.functional.normalize(f, dim=1) @ proto.T


def test_features(body, seen: list, test_tokens, cache: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """Features of every seen test split under `body`, reusing (and filling) `cache` by split index."""
    feats = []
    for j, t in enumerate(seen):
        if j not in cache:
            cache[j] = test_tokens.features(body, j, t.eval_u8)
        feats.append(cache[j])
    return feats


def run_adapter(name: str, mcfg: dict, heads_cfg: dict, trains, tests, spec, weights, prep, tcfg, device,
                simplecil: bool = False, refit: bool = False, all_tests: bool = False) -> dict:
    """One adapter run over `trains` with every head of `heads_cfg` fitted on it (see the module docstring)."""
    from cl_serve.trainer.backbone import load_backbone
    from cl_serve.trainer.heads import build_head, head_config_from_dict
    from cl_serve.trainer.learner import Learner
    from cl_serve.trainer.merge import merged_body_state
    from cl_serve.trainer.methods import method_config_from_dict
    from cl_serve.trainer.train import TrainConfig, train_adapter

    learner = Learner(spec, weights, method_config_from_dict(mcfg),
                      head_config_from_dict(heads_cfg.get("task-local"))).to_device(device)
    dim = learner.backbone.num_features
    heads = {h: (learner.head if h == "task-local" else build_head(head_config_from_dict(c), dim))
             for h, c in heads_cfg.items()}
    R = {h: [] for h in heads}
    if simplecil:
        R["simplecil"], means = [], []
    frozen = not learner.sites
    offsets, seconds, phases, summaries, train_feats = [], [], [], [], []
    test_cache: dict[int, torch.Tensor] = {}  # a frozen backbone's test features do not change between tasks
    test_tokens = TestTokens(learner.split, prep, device)
    for i, data in enumerate(trains):
        t0 = time.time()
        summary, feats = train_adapter(learner, data, prep, TrainConfig(**tcfg), progress=False, desc=f"{name} {i}")
        t_train = time.time() - t0
        block = learner.block
        for h, head in heads.items():
            if h != "task-local":
                head.end_task(feats, data.labels, block)
        learner.finish_head(feats, data.labels)
        if simplecil:
            means += [feats[data.labels == c].mean(0) for c in range(len(data.class_names))]
        if refit:
            train_feats.append((feats, data.labels))
        t_heads = time.time() - t0 - t_train
        offsets.append(sum(len(d.class_names) for d in trains[:i]))
        seen = tests if all_tests else tests[: i + 1]
        offs = offsets if not all_tests else [sum(len(t.class_names) for t in tests[:j]) for j in range(len(tests))]
        body = load_backbone(spec, merged_body_state(learner)).to(device)
        feats_t = test_features(body, seen, test_tokens, test_cache if frozen else {})
        for h, head in heads.items():
            R[h].append(accuracies(head.cpu(), feats_t, seen, offs))
        if simplecil:
            R["simplecil"].append(accuracies(ncm_logits(means), feats_t, seen, offs))
        seconds.append(time.time() - t0)
        phases.append({"train": t_train, "heads": t_heads, "evaluate": seconds[-1] - t_train - t_heads})
        summaries.append({**summary["method"], "adapted": summary["adapted"], "train_accuracy": summary["train_accuracy"],
                          "train_images_per_second": summary["train_images_per_second"],
                          **({"cache": summary["cache"]} if "cache" in summary else {})})
        print(f"  {name} task {i}: {seconds[-1]:.1f}s (train {t_train:.1f}s, heads {t_heads:.1f}s), A_i "
              + " ".join(f"{h} {weighted_accuracy(r[-1], [len(t) for t in seen]):.3f}" for h, r in R.items()),
              flush=True)
    out = {"R": R, "seconds_per_task": seconds, "seconds_by_phase": phases, "method_summaries": summaries,
           "state_bytes": {h: heads[h].state_bytes() for h in heads}}
    if refit:  # statistics of every task recomputed with the final model (needs the old images: an oracle)
        out["refit_A_T"] = refit_final(learner, heads_cfg, trains, tests, spec, prep, device)
    return out


def refit_final(learner, heads_cfg, trains, tests, spec, prep, device) -> dict:
    """A_T of the statistics-based heads refitted on every task's training features under the *final* model: what
    the stored, older-feature statistics cost. Uses the old images, which the product never keeps: a measurement.
    The aligned head starts from the run's own learned task blocks (the learner's head is task-local)."""
    from cl_serve.trainer.backbone import load_backbone
    from cl_serve.trainer.heads import build_head, head_config_from_dict
    from cl_serve.trainer.heads.base import linear
    from cl_serve.trainer.merge import merged_body_state

    body = load_backbone(spec, merged_body_state(learner)).to(device)
    feats = [body_features(body, d.eval_u8, prep, device) for d in trains]
    test_f = [body_features(body, t.eval_u8, prep, device) for t in tests]
    offs = [sum(len(t.class_names) for t in tests[:j]) for j in range(len(tests))]
    w, b = learner.head.weight.cpu(), learner.head.bias.cpu()
    out = {}
    for h, c in heads_cfg.items():
        if c["name"] == "task-local":
            continue
        head = build_head(head_config_from_dict(c), feats[0].shape[1])
        for d, f in zip(trains, feats):
            s, n = head.num_classes, len(d.class_names)
            head.end_task(f, d.labels, linear(w[s:s + n], b[s:s + n]))
        out[h] = weighted_accuracy(accuracies(head, test_f, tests, offs), [len(t) for t in tests])
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks-root", required=True, type=Path)
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--profile", choices=("cpu", "cpu-sketch"),
                    help="a preset sized for the machine (see cil_config.json)")
    ap.add_argument("--runs", nargs="+", help="adapter runs (keys of 'methods' in the config) and/or joint")
    ap.add_argument("--heads", nargs="+", help="heads to fit on every run (keys of 'heads'); default all")
    ap.add_argument("--recipe", choices=("equal", "official"), default="equal",
                    help="equal: one optimiser budget for every method; official: each method's own recipe")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--tasks", type=int, default=None, help="use only the first N tasks")
    ap.add_argument("--classes-per-task", type=int, default=None, help="reduced runs: first N classes per task")
    ap.add_argument("--train-images", type=int, default=None, help="first N train images per class")
    ap.add_argument("--test-images", type=int, default=None, help="first N test images per class")
    ap.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    ap.add_argument("--batch-size", type=int, default=None, help="override the config's batch size")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default=None)
    ap.add_argument("--refit", nargs="*", default=None,
                    help="runs whose heads are also refitted at the end with the final model (drift cost)")
    ap.add_argument("--config", type=Path, default=HERE / "cil_config.json")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--name", default="cil")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (set it when several benchmark processes share one machine)")
    return ap


def one_run(run: str, seed: int, a, cfg: dict, prof: dict, tcfg: dict, heads_cfg: dict, data: tuple,
            backbone: tuple, counts: list[int], refit: set[str], device) -> dict:
    """One adapter run (or joint run) with one seed: its accuracy matrices, metrics, time and peak memory."""
    from cl_serve.trainer.methods import method_config_from_dict

    trains, tests = data
    spec, weights, prep = backbone
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    mcfg = cfg["methods"][run]
    run_tcfg = {**tcfg, "seed": seed, **prof.get("run_train", {}).get(run, {})}
    if a.recipe == "official":
        run_tcfg.update(cfg["recipes"]["official"].get(method_config_from_dict(mcfg).family, {}))
    print(f"[cil] {run} seed {seed}", flush=True)
    t0 = time.time()
    frozen = mcfg["name"] == "none"
    heads = {**heads_cfg, **(cfg.get("frozen_heads", {}) if frozen else {})}
    if is_joint(run):
        res = run_adapter(run, mcfg, heads, [union(trains)], tests, spec, weights, prep, run_tcfg, device,
                          all_tests=True)
    else:
        res = run_adapter(run, mcfg, heads, trains, tests, spec, weights, prep, run_tcfg, device,
                          simplecil=frozen, refit=run in refit)
    res.update({"seed": seed, "seconds": time.time() - t0, "peak_memory_mb": peak_memory_mb(device),
                "train": run_tcfg})
    res["metrics"] = {h: ({"A_T": weighted_accuracy(R[0], counts)} if is_joint(run) else summarize(R, counts))
                      for h, R in res["R"].items()}
    print(f"[cil] {run} seed {seed} ({res['seconds']:.0f}s): " + "; ".join(
        f"{h} A_T {m['A_T']:.4f}" + (f" A_avg {m['A_avg']:.4f} F {m['forgetting']:.4f}" if "A_avg" in m else "")
        for h, m in res["metrics"].items()), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from cl_serve.trainer.backbone import from_checkpoint
    from cl_serve.trainer.train import resolve_device

    cfg = json.loads(a.config.read_text())
    prof = cfg["profiles"][a.profile] if a.profile else {}
    pick = lambda key, default=None: getattr(a, key) if getattr(a, key, None) is not None else prof.get(key, default)
    tcfg = {**cfg["train"], "device": a.device}
    for key in ("epochs", "batch_size", "lr", "precision"):
        if pick(key) is not None:
            tcfg[key] = pick(key)
    n_tasks, train_images, test_images = pick("tasks"), pick("train_images"), pick("test_images")
    run_names = a.runs or prof.get("runs") or list(cfg["methods"])
    heads_cfg = {h: cfg["heads"][h] for h in (a.heads or list(cfg["heads"]))}
    refit = set(a.refit if a.refit is not None else prof.get("refit", []))
    device = resolve_device(a.device)
    spec, weights, prep, _ = from_checkpoint(a.checkpoint)
    t_decode = time.time()
    trains = load_split(task_dirs(a.tasks_root, "train", n_tasks), prep, a.classes_per_task, train_images, True)
    tests = load_split(task_dirs(a.tasks_root, "test", n_tasks), prep, a.classes_per_task, test_images, False)
    t_decode = time.time() - t_decode
    for m in cfg["methods"].values():  # InfLoRA's eps schedule runs over the tasks actually learned
        if "expected_tasks" in m:
            m["expected_tasks"] = len(trains)
    counts = [len(t) for t in tests]
    a.out_dir.mkdir(parents=True, exist_ok=True)
    out_path = a.out_dir / f"{a.name}.json"
    result = {"name": a.name, "profile": a.profile, "profile_settings": prof, "recipe": a.recipe,
              "device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
              "threads": torch.get_num_threads(), "tasks": len(trains),
              "classes_per_task": [len(t.class_names) for t in tests], "test_images": counts,
              "train_images_per_class": train_images, "train": tcfg, "methods": cfg["methods"], "heads": heads_cfg,
              "config_source": cfg.get("_source"), "seeds": a.seeds, "decode_seconds": t_decode,
              "metric_definitions": METRIC_DEFINITIONS, "runs": {}}
    if out_path.exists():  # resume: keep finished runs of the same setting
        old = json.loads(out_path.read_text())
        if old.get("tasks") == result["tasks"] and old.get("train") == tcfg and old.get("heads") == heads_cfg:
            result["runs"] = old.get("runs", {})
    t_all = time.time()
    for seed in a.seeds:
        for run in run_names:
            if str(seed) in result["runs"].get(run, {}):
                print(f"[cil] {run} seed {seed}: done already (resumed)", flush=True)
                continue
            res = one_run(run, seed, a, cfg, prof, tcfg, heads_cfg, (trains, tests), (spec, weights, prep), counts,
                          refit, device)
            result["runs"].setdefault(run, {})[str(seed)] = res
            result["seconds_all_runs"] = sum(r["seconds"] for rr in result["runs"].values() for r in rr.values())
            out_path.write_text(json.dumps(result, indent=1))  # after every run: nothing lost if cut off
    print(f"[cil] wrote {out_path} ({time.time() - t_all:.0f}s this invocation)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

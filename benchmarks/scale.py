"""Task size at 224 px: peak memory and the speed of each stage of `cl-serve add-task` as a task grows.

Writes `--images` generated camera-sized JPEGs (640 x 480, quality 90, `--classes` classes of filled shapes on a
noisy background), then runs `cl-serve init` and one `cl-serve add-task` per (model, method, task size) in a fresh
process, and reads that process's peak resident memory from the kernel (wait4's ru_maxrss, what /usr/bin/time -v
reports) and the stage timings from the version's manifest (decode, training with its feature passes, export).

    python -m benchmarks.scale --sizes 1000 10000 50000 --name scale-224-cpu
    python -m benchmarks.scale --model vit-s16 --sizes 1000 --name scale-224-vits16-cpu

Models (random weights: the speed and memory of the real sizes, no download): `tiny224` is a 224-px ViT with
patch 16, width 64, depth 4 (cheap enough for 50k images on 2 cores); `vit-s16` is ViT-S/16 (22 M parameters),
`vit-b16` ViT-B/16 (86 M). Methods: `none` (frozen backbone + analytic head, M = 2048) and `inflora-last2` (InfLoRA on
the last 2 blocks with the frozen-prefix cache, 1 epoch). Results: benchmarks/results/NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cl_serve.export.external_data import onnx_bytes

HERE = Path(__file__).parent
MODELS = {
    "tiny224": ("vit_small_patch16_224", {"embed_dim": 64, "depth": 4, "num_heads": 2}),
    "vit-s16": ("vit_small_patch16_224", {}),
    "vit-b16": ("vit_base_patch16_224", {}),
}
METHODS = {
    "none": ["--method", "none", "--head", "analytic", "--projection", "2048"],
    "inflora-last2": ["--method", "inflora", "--blocks", "2", "--rank", "8", "--head", "analytic", "--projection", "2048"],
}


def write_jpegs(root: Path, images: int, classes: int, seed: int = 0) -> Path:
    """root/c000/00000.jpg ...: `images` 640x480 JPEGs spread evenly over `classes` (kept between runs)."""
    from PIL import Image, ImageDraw

    marker = root / f".complete-{images}-{classes}"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 60, (480, 640, 3), dtype=np.uint8)
    t0 = time.time()
    for i in range(images):
        c = i % classes
        path = root / f"c{c:03d}" / f"{i:06d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(np.roll(noise, i * 7, axis=1))
        draw = ImageDraw.Draw(img)
        x, y = rng.integers(40, 400), rng.integers(40, 240)
        colour = tuple(int(v) for v in ((c * 37) % 256, (c * 91) % 256, (c * 53) % 256))
        (draw.ellipse if c % 2 else draw.rectangle)((x, y, x + 200, y + 200), fill=colour)
        img.save(path, quality=90)
        if i and i % 5000 == 0:
            print(f"[scale] wrote {i} JPEGs ({time.time() - t0:.0f}s)", flush=True)
    marker.touch()
    return root


def subset(root: Path, out: Path, images: int, classes: int) -> Path:
    """A folder of links to the first `images` JPEGs (the same files for every size: the stages compare)."""
    if out.exists():
        return out
    for i in range(images):
        c = i % classes
        (out / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
        os.symlink(root / f"c{c:03d}" / f"{i:06d}.jpg", out / f"c{c:03d}" / f"{i:06d}.jpg")
    return out


def run_measured(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """(exit code, seconds, peak RSS MiB) of `cmd` run as a child, its output appended to `log`."""
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "CL_SERVE_PROGRESS": "lines"})
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.time() - t0, usage.ru_maxrss / 1024


def one_row(work: Path, jpegs: Path, model: str, method: str, images: int, classes: int, epochs: int) -> dict:
    name, kw = MODELS[model]
    store = work / f"store-{model}-{method}-{images}"
    data = subset(jpegs, work / f"task-{images}", images, classes)
    cli = [sys.executable, "-m", "cl_serve.cli"]
    log = work / f"{store.name}.log"
    if not (store / "store.json").exists():
        rc, _, _ = run_measured(cli + ["init", "--store", str(store), "--backbone", name, "--timm-kwargs",
                                       json.dumps(kw)] + METHODS[method], log)
        assert rc == 0, log.read_text()[-2000:]
    rc, seconds, peak = run_measured(cli + ["add-task", "--store", str(store), "--data", str(data), "--epochs",
                                            str(epochs), "--batch-size", "64", "--device", "cpu"], log)
    row = {"model": model, "method": method, "images": images, "classes": classes, "exit_code": rc,
           "seconds": round(seconds, 1), "peak_rss_mib": round(peak, 1)}
    if rc != 0:
        row["error"] = log.read_text()[-1500:]
        return row
    manifest = json.loads(sorted(store.glob("versions/*/manifest.json"))[-1].read_text())
    tr = manifest["training"]
    decode, train, export = tr.get("decode_seconds"), tr.get("seconds"), tr.get("export_seconds")
    row.update({"decode_seconds": round(decode, 1), "decode_images_per_s": round(images / decode, 1),
                "train_seconds": round(train, 1), "train_images_per_s": round(images * max(epochs, 1) / train, 1),
                "export_seconds": round(export, 1) if export else None,
                "head_seconds": tr.get("head_seconds"), "train_steps_seconds": tr.get("train_steps_seconds"),
                "peak_rss_in_manifest_mib": tr.get("peak_rss_mib"), "heap": tr.get("heap"),
                "cache": tr.get("cache"),
                "onnx_mib": round(onnx_bytes(store / "versions" / f"{manifest['version']:04d}" / "model.onnx")
                                  / 2**20, 1)})
    return row


def to_markdown(result: dict) -> str:
    lines = [f"# {result['name']}", "", result["command"], "",
             "| model | method | images | peak RSS MiB | add-task s | decode img/s | train img/s | export s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["exit_code"]:
            lines.append(f"| {r['model']} | {r['method']} | {r['images']} | {r['peak_rss_mib']} | failed | | | |")
            continue
        lines.append(f"| {r['model']} | {r['method']} | {r['images']} | {r['peak_rss_mib']} | {r['seconds']} | "
                     f"{r['decode_images_per_s']} | {r['train_images_per_s']} | {r['export_seconds']} |")
    for k, v in result.get("peak_ratio", {}).items():
        lines.append(f"\npeak RSS at the largest size over the smallest, {k}: {v}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=list(MODELS), default="tiny224")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--sizes", nargs="+", type=int, default=[1000, 10000, 50000])
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cl-serve-scale"))
    ap.add_argument("--name", default="scale-224-cpu")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    jpegs = write_jpegs(a.work / "jpegs", max(a.sizes), a.classes)
    result = {"name": a.name, "command": "python -m benchmarks.scale " + " ".join(argv or sys.argv[1:]),
              "cpu_count": os.cpu_count(), "rows": []}
    a.out.mkdir(parents=True, exist_ok=True)
    for method in a.methods:
        for n in sorted(a.sizes):
            row = one_row(a.work, jpegs, a.model, method, n, a.classes, a.epochs)
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
            (a.out / f"{a.name}.json").write_text(json.dumps(result, indent=1))  # nothing lost if cut off
        done = [r for r in result["rows"] if r["method"] == method and not r["exit_code"]]
        if len(done) > 1:
            result.setdefault("peak_ratio", {})[method] = round(done[-1]["peak_rss_mib"] / done[0]["peak_rss_mib"], 3)
    (a.out / f"{a.name}.json").write_text(json.dumps(result, indent=1))
    (a.out / f"{a.name}.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0 if all(r["exit_code"] == 0 for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

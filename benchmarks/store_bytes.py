"""Bytes a version adds to the store: `cl-serve init` and two `cl-serve add-task` runs on generated 224-px JPEGs
(random backbone weights at the real size, no download). Per version: the growth of the store on disk (each file
counted once however many versions link it: shared content), the logical size of its files, and what the same
version weighed as a full copy that also stored its plain weights (`merged.safetensors`, now written on demand by
`cl-serve export --safetensors`: its size is measured by writing it).

    python -m benchmarks.store_bytes --models vit-s16 --methods none inflora-last2 --name store-bytes-cpu

Models and methods as `benchmarks.scale`. Results: benchmarks/results/NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.results_io import command_line, save
from benchmarks.scale import METHODS, MODELS, write_jpegs

HERE = Path(__file__).parent


def _cli(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "cl_serve.cli", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cl-serve {args[0]} failed: {r.stderr[-1500:]}")


def disk_bytes(*roots: Path) -> int:
    """Bytes on disk under the directories, each file (inode) once however many names it has."""
    seen = {}
    for p in (p for r in roots if r.is_dir() for p in r.rglob("*")):
        st = p.lstat()
        if p.is_file() and not p.is_symlink():
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def one_store(work: Path, tasks: list[Path], model: str, method: str) -> dict:
    name, kw = MODELS[model]
    store = work / f"store-{model}-{method}"
    _cli("init", "--store", str(store), "--backbone", name, "--timm-kwargs", json.dumps(kw), *METHODS[method])
    rows = []
    for t, data in enumerate(tasks, 1):
        held = disk_bytes(store / "versions", store / "blobs")
        _cli("add-task", "--store", str(store), "--data", str(data), "--epochs", "1", "--batch-size", "16",
             "--device", "cpu")
        added = disk_bytes(store / "versions", store / "blobs") - held
        d = store / "versions" / f"{t:04d}"
        m = json.loads((d / "manifest.json").read_text())
        weights = set(m["onnx"]["data"])
        size = {n: (d / n).stat().st_size for n in [*m["files"], "manifest.json"]}
        files = {"learner.safetensors": size["learner.safetensors"], "model.onnx (graph)": size["model.onnx"],
                 f"ONNX weights ({len(weights)} files)": sum(size[n] for n in weights),
                 "manifest.json": size["manifest.json"]}
        plain = work / f"plain-{model}-{method}-{t}.safetensors"
        _cli("export", "--store", str(store), "--version", str(t), "--safetensors", str(plain))
        before = sum(size.values()) + plain.stat().st_size  # every file its own copy, and merged.safetensors
        rows.append({"model": model, "method": method, "version": t, "files": files, "bytes_added": added,
                     "bytes_with_merged": before, "of_before": round(added / before, 3)})
        plain.unlink()
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


def _markdown(r: dict) -> str:
    lines = [f"# {r['name']}", "", f"`{r['command']}`", "",
             "| model | method | version | files (MiB, logical) | MiB added on disk | MiB as a full copy with "
             "merged.safetensors | of that |", "|---" * 7 + "|"]
    for x in r["rows"]:
        files = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in x["files"].items())
        lines.append(f"| {x['model']} | {x['method']} | {x['version']} | {files} | {x['bytes_added'] / 2**20:.1f} | "
                     f"{x['bytes_with_merged'] / 2**20:.1f} | {x['of_before']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["vit-s16"])
    ap.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["none"])
    ap.add_argument("--images", type=int, default=24, help="images per task (default 24: 3 classes x 8)")
    ap.add_argument("--name", default="store-bytes-cpu")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    result = {"name": a.name, "command": command_line("benchmarks.store_bytes", argv), "rows": []}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        tasks = [write_jpegs(work / f"task{t}", a.images, 3, seed=t) for t in (1, 2)]
        for t, task in enumerate(tasks):  # each task its own classes
            for c in sorted(task.iterdir()):
                c.rename(task / f"t{t}-{c.name}")
        for model in a.models:
            for method in a.methods:
                result["rows"] += one_store(work, tasks, model, method)["rows"]
    save(a.out, a.name, result, _markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Classes at catalogue scale: one task of `--classes` classes of `--per-class` thumbnails on a backbone checkpoint
(frozen + analytic head), then the store served: what each stage costs and what the routes answer.

    python -m benchmarks.classes --checkpoint ../shared/backbones/vit-s4-32-tin100/model.safetensors \
        --classes 10000 --per-class 3 --name classes-10000-cpu

The thumbnails are generated (32 px PNGs: a filled shape whose colour, position and kind encode the class, on
noise), so the number of classes is not limited by a dataset. `cl-serve add-task` runs in a fresh process (its
peak RSS from wait4, as /usr/bin/time -v reports it; stage seconds from the manifest; the head's own seconds from
its summary); then `cl-serve serve` runs the store and the benchmark times one-image `/classify` requests and reads
`/v1/versions`, `/v1/model` and the page, with the bytes of each answer. Results: benchmarks/results/NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.scale import run_measured

HERE = Path(__file__).parent


def write_thumbnails(root: Path, classes: int, per_class: int, seed: int = 0) -> Path:
    from PIL import Image, ImageDraw

    marker = root / f".complete-{classes}-{per_class}"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = tuple(int(v) for v in ((c * 37) % 256, (c * 91) % 256, (c * 53) % 256))
        x, y = (c // 7) % 16, (c // 112) % 16
        for i in range(per_class):
            img = Image.fromarray(rng.integers(0, 50, (32, 32, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(img)
            box = (x + i, y, x + 14 + i, y + 14)
            (draw.ellipse if c % 2 else draw.rectangle)(box, fill=colour)
            img.save(folder / f"{i}.png")
    marker.touch()
    return root


def serve_and_probe(store: Path, image: bytes, requests: int) -> dict:
    import httpx

    from cl_serve.serving import launch

    port = launch.free_port()
    launch.start(str(store), port=port, num_cpus=2)
    url = f"http://127.0.0.1:{port}"
    try:
        launch.wait_until_healthy(url)
        with httpx.Client(base_url=url, timeout=120) as c:
            for _ in range(3):
                c.post("/classify", files=[("file", ("a.png", image, "image/png"))])
            lat = []
            for _ in range(requests):
                t0 = time.perf_counter()
                r = c.post("/classify", files=[("file", ("a.png", image, "image/png"))])
                lat.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text[:300]
            routes = {}
            for path in ("/v1/versions", "/v1/model", "/"):
                t0 = time.perf_counter()
                r = c.get(path)
                routes[path] = {"status": r.status_code, "bytes": len(r.content),
                                "seconds": round(time.perf_counter() - t0, 3)}
        lat.sort()
        return {"classify_one_image_ms": {"p50": round(1e3 * statistics.median(lat), 1),
                                          "p99": round(1e3 * lat[int(0.99 * (len(lat) - 1))], 1)},
                "routes": routes}
    finally:
        launch.stop()


def task_folders(data: Path, work: Path, tasks: int) -> list[Path]:
    """The classes split into `tasks` folders of links (one folder, the data itself, for one task)."""
    if tasks == 1:
        return [data]
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    out = []
    for t in range(tasks):
        folder = work / f"tasks-{tasks}" / f"task{t:02d}"
        if not folder.exists():
            folder.mkdir(parents=True)
            for c in classes[t * len(classes) // tasks:(t + 1) * len(classes) // tasks]:
                (folder / c).symlink_to(data / c)
        out.append(folder)
    return out


def one_add_task(cli: list[str], store: Path, folder: Path, log: Path) -> dict:
    """One measured `cl-serve add-task`: its seconds, peak RSS and the stages its manifest records."""
    rc, seconds, peak = run_measured(cli + ["add-task", "--store", str(store), "--data", str(folder), "--epochs", "1",
                                            "--device", "cpu"], log)
    assert rc == 0, log.read_text()[-3000:]
    version = max(int(p.name) for p in (store / "versions").iterdir() if p.name.isdigit())
    vdir = store / "versions" / f"{version:04d}"
    manifest = json.loads((vdir / "manifest.json").read_text())
    tr = manifest["training"]
    return {"version": version, "classes": len(manifest["labels"]), "images": tr["train_images"],
            "add_task_seconds": round(seconds, 1), "peak_rss_mib": round(peak, 1),
            "decode_seconds": tr.get("decode_seconds"), "train_seconds": tr.get("seconds"),
            "head_seconds": tr.get("head_seconds"), "head_summary": tr.get("head_summary"),
            "train_steps_seconds": tr.get("train_steps_seconds"),
            "feature_pass_seconds": round(tr["seconds"] - tr["head_seconds"] - tr["train_steps_seconds"], 1),
            "export_seconds": tr.get("export_seconds"),
            "files_mib": {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(vdir.iterdir()) if p.is_file()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--classes", type=int, default=10_000)
    ap.add_argument("--per-class", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=1, help="split the classes over this many add-tasks")
    ap.add_argument("--projection", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cl-serve-classes"))
    ap.add_argument("--name", default="classes-10000-cpu")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    data = write_thumbnails(a.work / f"data-{a.classes}-{a.per_class}", a.classes, a.per_class)
    store = a.work / f"store-{a.classes}-{a.tasks}"
    log = a.work / f"{a.name}.log"
    cli = [sys.executable, "-m", "cl_serve.cli"]
    if not (store / "store.json").exists():
        rc, _, _ = run_measured(cli + ["init", "--store", str(store), "--checkpoint", str(a.checkpoint), "--method",
                                       "none", "--head", "analytic", "--projection", str(a.projection)], log)
        assert rc == 0, log.read_text()[-2000:]
    result = {"name": a.name, "command": "python -m benchmarks.classes " + " ".join(argv or sys.argv[1:]),
              "classes": a.classes, "images": a.classes * a.per_class, "tasks": a.tasks, "projection": a.projection,
              "add_tasks": []}
    a.out.mkdir(parents=True, exist_ok=True)
    for folder in task_folders(data, a.work, a.tasks):
        result["add_tasks"].append(one_add_task(cli, store, folder, log))
        print(json.dumps(result["add_tasks"][-1]), flush=True)
        (a.out / f"{a.name}.json").write_text(json.dumps(result, indent=1))
    image = next((data / "class00000").iterdir()).read_bytes()
    result["serving"] = serve_and_probe(store, image, a.requests)
    (a.out / f"{a.name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

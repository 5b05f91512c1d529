"""Serving-cost benchmark: merged ONNX vs unmerged learner as tasks accumulate, end-to-end HTTP load, hot swap.

    python -m benchmarks.serving --name serving-cpu            # ViT-tiny, ViT-S/4 and ViT-B/16 rows; ViT-S/4 over HTTP
    python -m benchmarks.serving --quick --name smoke          # seconds, for the test suite

1. Inference cost against the number of learned tasks (1, 5, 10, 20): SD-LoRA branches (rank 10, q/v) are added
   with random values (speed does not depend on the values); the unmerged torch forward grows with branches, the
   merged ONNX model must stay flat. Latency at batch 1 (median) and throughput at batch 64.
2. End-to-end POST /classify against a local `cl-serve serve` (Ray Serve + ONNX Runtime): a bounded load
   (fixed request count) at concurrency 1, 8, 32: requests/s, p50/p95/p99, errors; beside the raw in-process
   ONNX Runtime throughput on the same images (the ratio is the serving overhead).
3. Hot swap: publish -> first response with the new version, and errors, over 5 swaps.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
MODELS = {
    "vit-tiny-32": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2}),
    "vit-s4-32": ("vit_small_patch16_224", {"img_size": 32, "patch_size": 4}),
    "vit-b16-224": ("vit_base_patch16_224", {}),
}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return ""


def _time(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def cost_vs_tasks(model_key: str, task_counts, repeats: int, big_batch: int) -> list[dict]:
    from cl_serve.export.onnx_export import export_onnx
    from cl_serve.contract.preprocessing import Preprocessing
    from cl_serve.trainer.backbone import from_timm
    from cl_serve.trainer.learner import Learner
    from cl_serve.trainer.merge import build_plain_model, merged_state_dict
    from cl_serve.trainer.methods import method_config_from_dict
    import onnxruntime as ort

    name, kw = MODELS[model_key]
    spec, weights, _, _ = from_timm(name, False, kw)
    side = int(kw.get("img_size", 224))
    prep = Preprocessing(input_size=side, scale_size=side, mean=(0.5,) * 3, std=(0.5,) * 3)
    learner = Learner(spec, weights, method_config_from_dict({"name": "sdlora", "rank": 10}))
    rows, done = [], 0
    for n in task_counts:
        while done < n:
            learner.method.begin_task(done, lambda: {})
            learner.add_block([f"c{done}-{i}" for i in range(10)])
            with torch.no_grad():
                for layer in learner.method.layers.values():
                    for branch in layer.current.values():
                        branch.B.normal_(0, 0.01)
            learner.method.end_task(done, lambda: {})
            learner.finish_head(torch.randn(20, learner.backbone.num_features), torch.arange(20) % 10)
            done += 1
        learner.eval()
        merged = build_plain_model(spec, merged_state_dict(learner))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            export_onnx(merged, path, preprocessing=prep, labels=list(learner.labels))
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            x1 = np.random.randn(1, 3, side, side).astype(np.float32)
            xb = np.random.randn(big_batch, 3, side, side).astype(np.float32)
            with torch.no_grad():
                un1 = _time(lambda: learner(torch.from_numpy(x1)), repeats)
                unb = _time(lambda: learner(torch.from_numpy(xb)), max(2, repeats // 5))
            on1 = _time(lambda: sess.run(None, {"input": x1}), repeats)
            onb = _time(lambda: sess.run(None, {"input": xb}), max(2, repeats // 5))
        row = {"model": model_key, "tasks": n, "classes": len(learner.labels),
               "unmerged_torch_b1_ms": 1e3 * statistics.median(un1), "merged_onnx_b1_ms": 1e3 * statistics.median(on1),
               f"unmerged_torch_b{big_batch}_img_s": big_batch / statistics.median(unb),
               f"merged_onnx_b{big_batch}_img_s": big_batch / statistics.median(onb)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


COMPONENTS = {"proxy": "ray::ProxyActor", "replica": "ray::ServeReplica", "controller": "ray::ServeController",
              "raylet": "raylet", "gcs": "gcs_server"}


def cpu_seconds_by_component() -> dict[str, float]:
    """CPU seconds (user + system) used so far by Ray Serve's processes on this machine and by this client process,
    read from /proc (Linux; {} elsewhere): where the time of a request goes, by process."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out = {k: 0.0 for k in (*COMPONENTS, "client")}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        used = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        if int(entry.name) == os.getpid():
            out["client"] += used
            continue
        for name, marker in COMPONENTS.items():
            if marker in cmd:
                out[name] += used
                break
    return out if Path("/proc/self/stat").exists() else {}


def http_load(url: str, payload: bytes, concurrency: int, requests: int, images: int = 1) -> dict:
    import httpx

    lat, errors, lock = [], [0], threading.Lock()
    def worker(count: int):
        with httpx.Client(timeout=60) as c:
            for _ in range(count):
                t = time.perf_counter()
                try:
                    r = c.post(url + "/classify", content=payload, headers={"content-type": "application/json"})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    lat.append(time.perf_counter() - t)
                    errors[0] += 0 if ok else 1

    cpu0 = cpu_seconds_by_component()
    t0 = time.perf_counter()
    counts = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]  # exactly `requests`
    threads = [threading.Thread(target=worker, args=(n,)) for n in counts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu1 = cpu_seconds_by_component()
    cpu_ms = {k: 1e3 * (cpu1[k] - cpu0[k]) / max(len(lat), 1) for k in cpu1}
    return {"concurrency": concurrency, "images_per_request": images, "requests": len(lat), "errors": errors[0],
            "req_s": len(lat) / wall, "img_s": images * len(lat) / wall,
            "p50_ms": 1e3 * _percentile(lat, 50), "p95_ms": 1e3 * _percentile(lat, 95), "p99_ms": 1e3 * _percentile(lat, 99),
            "cpu_ms_per_request": cpu_ms}


def two_task_store(work: Path, model_key: str) -> tuple[Path, bytes]:
    """A store of two SD-LoRA versions of `model_key` on generated shapes: (store, one PNG)."""
    from cl_serve.trainer.synthetic import class_names, write_image_folder
    from cl_serve.trainer.train import TrainConfig
    from cl_serve.workflow import pipeline

    name, kw = MODELS[model_key]
    store = work / "store"
    pipeline.init_store(store, method={"name": "sdlora"}, backbone=name, timm_kwargs=kw)
    names = class_names(12)
    dirs = [write_image_folder(work / f"t{i}", names[3 * i:3 * i + 3], 8, seed=i) for i in range(2)]
    for d in dirs:
        pipeline.add_task(store, d, TrainConfig(epochs=1, batch_size=16, device="cpu"), progress=False)
    return store, next(dirs[0].rglob("*.png")).read_bytes()


def raw_onnx(store: Path, image: bytes) -> tuple[dict[int, float], float]:
    """Raw ONNX Runtime images/s of the live version at batch 1, 16, 32, and decode+preprocess seconds per image."""
    import io

    from PIL import Image

    from cl_serve.contract.preprocessing import preprocess_image
    from cl_serve.serving.model import load_version
    from cl_serve.store.model_store import Store

    m = load_version(Store(store), Store(store).current())
    one = preprocess_image(Image.open(io.BytesIO(image)), m.preprocessing)
    raw = {b: b / statistics.median(_time(lambda: m.run(np.stack([one] * b)), 10)) for b in (1, 16, 32)}
    pre = statistics.median(_time(lambda: preprocess_image(Image.open(io.BytesIO(image)), m.preprocessing), 50))
    return raw, pre


def swap_delays(url: str, store: Path, body: bytes, swaps: int) -> tuple[list[float], int]:
    """Roll back and forth between the two versions; per swap, the seconds until a request is answered by the new
    one, and every non-200 answer on the way."""
    import httpx

    from cl_serve.store.model_store import Store
    from cl_serve.workflow import pipeline

    delays, errors = [], 0
    versions = Store(store).versions()
    for i in range(swaps):
        target = versions[i % 2]
        if Store(store).current() == target:
            target = versions[(i + 1) % 2]
        t = time.perf_counter()
        pipeline.rollback(store, target)
        while True:
            r = httpx.post(url + "/classify", content=body, headers={"content-type": "application/json"})
            errors += r.status_code != 200
            if r.status_code == 200 and r.json()["model_version"] == target:
                break
        delays.append(time.perf_counter() - t)
    return delays, errors


def end_to_end(quick: bool, requests: int, model_key: str, sizes: tuple[int, ...] = (1, 16)) -> dict:
    from cl_serve.serving import launch as serve_cli

    store, image = two_task_store(Path(tempfile.mkdtemp(prefix="cl-serving-")), model_key)

    def payload(n: int) -> bytes:
        return json.dumps({"images": [base64.b64encode(image).decode()] * n}).encode()

    port = serve_cli.free_port()
    serve_cli.start(str(store), port=port, num_cpus=2, poll_interval_s=0.2)
    url = f"http://127.0.0.1:{port}"
    try:
        serve_cli.wait_until_healthy(url)
        loads = []
        for n in sizes:
            for c in ((1, 8) if quick else (1, 8, 32)):
                loads.append(http_load(url, payload(n), c, max(c, requests // n), n))
                print(json.dumps(loads[-1]), flush=True)
        raw, pre = raw_onnx(store, image)
        raw_ips = raw[32]
        swaps, swap_errors = swap_delays(url, store, payload(1), 2 if quick else 5)
        best = {n: max(r["img_s"] for r in loads if r["images_per_request"] == n) for n in sizes}
        out = {"model": model_key, "loads": loads, "raw_onnx_img_s_batch32": raw_ips,
               "raw_onnx_img_s": raw, "decode_preprocess_ms_per_image": 1e3 * pre,
               "http_over_raw_ort": {n: best[n] / raw_ips for n in sizes},
               "serving_overhead_ratio_at_max_concurrency": raw_ips / max(best[sizes[0]], 1e-9),
               "swap_delays_s": swaps, "swap_errors": swap_errors, "poll_interval_s": 0.2}
        print(json.dumps({k: v for k, v in out.items() if k != "loads"}), flush=True)
        return out
    finally:
        serve_cli.stop()


def to_markdown(result: dict) -> str:
    """The serving result as the markdown tables the README links to."""
    lines = [f"**{result['name']}** — device {result['device']}" + (f" ({result['cpu']})" if result.get("cpu") else "")]
    rows = result["cost_vs_tasks"]
    if rows:
        big = next(k for k in rows[0] if k.startswith("merged_onnx_b") and k.endswith("_img_s"))
        bb = big[len("merged_onnx_b"):-len("_img_s")]
        lines += ["", "Inference cost against learned tasks (SD-LoRA rank 10 on q/v per task; 10 classes per task):", "",
                  f"| model | tasks | unmerged torch b1 ms | merged ONNX b1 ms | unmerged torch b{bb} img/s | "
                  f"merged ONNX b{bb} img/s |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['tasks']} | {r['unmerged_torch_b1_ms']:.2f} | "
                         f"{r['merged_onnx_b1_ms']:.2f} | {r[f'unmerged_torch_b{bb}_img_s']:.1f} | {r[big]:.1f} |")
    return "\n".join(lines + http_markdown(result.get("http")))


def http_markdown(h: dict | None) -> list[str]:
    """The end-to-end HTTP part of the serving result (none without it)."""
    lines: list[str] = []
    if h:
        comps = list(h["loads"][0].get("cpu_ms_per_request", {}))
        lines += ["", f"End-to-end `POST /classify` (model {h.get('model', 'vit-tiny-32')}, one replica, local Ray Serve; "
                      "CPU ms per request by process, read from /proc):", "",
                  "| images/request | concurrency | requests | errors | req/s | img/s | p50 ms | p95 ms | p99 ms | "
                  + " | ".join(f"CPU {c}" for c in comps) + " |", "|---" * (9 + len(comps)) + "|"]
        for r in h["loads"]:
            cpu = r.get("cpu_ms_per_request", {})
            lines.append(f"| {r.get('images_per_request', 1)} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
                         f"{r['req_s']:.1f} | {r.get('img_s', r['req_s']):.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                         f"{r['p99_ms']:.1f} | " + " | ".join(f"{cpu.get(c, 0):.1f}" for c in comps) + " |")
        sw = h["swap_delays_s"]
        raw = h.get("raw_onnx_img_s", {})
        lines += ["", "Raw ONNX Runtime in-process: " + ", ".join(f"batch {b} {v:.1f} img/s" for b, v in raw.items())
                  + f" (decode + preprocess {h.get('decode_preprocess_ms_per_image', 0):.1f} ms per image, not in these); "
                  "best HTTP img/s over raw batch-32 img/s: " + ", ".join(
                      f"{n} image(s)/request {v:.2f}" for n, v in h.get("http_over_raw_ort", {}).items()) + ".",
                  f"Hot swap over {len(sw)} swaps (store poll {h['poll_interval_s']} s): delay publish -> first answer "
                  f"from the new version median {statistics.median(sw):.2f} s, max {max(sw):.2f} s; "
                  f"{h['swap_errors']} failed requests."]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="serving")
    ap.add_argument("--quick", action="store_true", help="tiny model, tasks 1 and 2, few requests (test smoke run)")
    ap.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS))
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    ap.add_argument("--no-http", action="store_true", help="skip the end-to-end HTTP part (no Ray needed)")
    ap.add_argument("--http-only", action="store_true", help="only the end-to-end HTTP part (no cost-vs-tasks table)")
    ap.add_argument("--http-model", default=None, choices=sorted(MODELS),
                    help="model behind the HTTP server (default vit-s4-32; vit-tiny-32 with --quick)")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    models = a.models or (["vit-tiny-32"] if a.quick else ["vit-tiny-32", "vit-s4-32", "vit-b16-224"])
    counts = (1, 2) if a.quick else (1, 5, 10, 20)
    result = {"name": a.name, "device": "cuda" if torch.cuda.is_available() else "cpu", "cpu": _cpu_name(),
              "torch_threads": torch.get_num_threads(), "cost_vs_tasks": []}
    for mk in ([] if a.http_only else models):
        tc = counts if mk != "vit-b16-224" or a.quick else (1, 20)  # ViT-B: the two ends only (CPU time)
        result["cost_vs_tasks"] += cost_vs_tasks(mk, tc, 3 if a.quick else 20, 8 if a.quick else 64)
    if not a.no_http:
        http_model = a.http_model or ("vit-tiny-32" if a.quick else "vit-s4-32")
        result["http"] = end_to_end(a.quick, 40 if a.quick else a.requests, http_model)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / f"{a.name}.json").write_text(json.dumps(result, indent=1))
    (a.out_dir / f"{a.name}.md").write_text(to_markdown(result) + "\n")
    print(f"[serving] wrote {a.out_dir / (a.name + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""int8 against fp32 on CPUs: ONNX Runtime's dynamic int8 quantization (cl_serve.export.quantize, what `cl-serve
export --int8` attaches) beside the fp32 file it is made from, on this machine's cores.

    python -m benchmarks.int8 --models vit-s16 vit-b16 --name int8-224-cpu
    python -m benchmarks.int8 --store STORE --gate-data DIR --name int8-vits4-cifar

Speed (`--models`): timm ViTs at 224 px with random weights (the real sizes' cost, no download), exported to ONNX
the way every version is, quantized; images/s at batch 32 (`--batches` batches after one warm-up) and at batch 1
(`--singles` requests), file sizes, and top-1 agreement and the largest logit difference on `--agree` random inputs
(random weights: agreement says how far int8 moves the logits, not accuracy). Accuracy (`--store`): a trained
store's live version, int8 judged against fp32 on the gate data exactly as `export --int8` does (the file is
attached when it passes). Work is bounded by counts, never by seconds. Results: benchmarks/results/NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.model_speed import model_speed
from benchmarks.results_io import command_line, save

HERE = Path(__file__).parent
MODELS = {"vit-s16": "vit_small_patch16_224", "vit-b16": "vit_base_patch16_224"}


def _export(name: str, path: Path) -> None:
    import timm
    import torch

    from cl_serve.contract.preprocessing import Preprocessing
    from cl_serve.export.onnx_export import export_onnx

    torch.manual_seed(0)
    model = timm.create_model(MODELS[name], pretrained=False, num_classes=100).eval()
    prep = Preprocessing(input_size=224, scale_size=256, mean=(0.5,) * 3, std=(0.5,) * 3)
    export_onnx(model, path, preprocessing=prep, labels=[f"c{i}" for i in range(100)])


def _speed(path: Path, size: int, batches: int, singles: int) -> dict:
    import onnxruntime as ort

    from cl_serve.export.external_data import onnx_bytes

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    b32, lat = model_speed(lambda x: sess.run(None, {name: x}), size, batches, singles)
    return {"images_per_s_b32": round(b32, 2), "batch1_ms_p50": round(float(np.median(lat)), 1),
            "bytes": onnx_bytes(path)}


def _agreement(fp32: Path, int8: Path, size: int, n: int) -> dict:
    from cl_serve.export.quantize import compare

    rng = np.random.default_rng(2)
    batches = [(rng.standard_normal((16, 3, size, size)).astype(np.float32), np.zeros(16, np.int64))
               for _ in range(max(1, n // 16))]
    r = compare(fp32, int8, batches)
    return {"random_inputs": r["images"], "agreement": round(r["agreement"], 4),
            "max_abs_logit_diff": round(r["max_abs_logit_diff"], 4)}


def speed_rows(models: list[str], batches: int, singles: int, agree: int) -> list[dict]:
    from cl_serve.export.quantize import quantize_int8

    rows = []
    for name in models:
        with tempfile.TemporaryDirectory() as d:
            fp32, int8 = Path(d) / "model.onnx", Path(d) / "model.int8.onnx"
            t0 = time.perf_counter()
            _export(name, fp32)
            t1 = time.perf_counter()
            quantize_int8(fp32, int8)
            t2 = time.perf_counter()
            a, b = _speed(fp32, 224, batches, singles), _speed(int8, 224, batches, singles)
            row = {"model": name, "export_s": round(t1 - t0, 1), "quantize_s": round(t2 - t1, 1), "fp32": a,
                   "int8": b, "speedup_b32": round(b["images_per_s_b32"] / a["images_per_s_b32"], 2),
                   "size_ratio": round(b["bytes"] / a["bytes"], 3), **_agreement(fp32, int8, 224, agree)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def accuracy_row(store: str, gate_data: str, batches: int, singles: int) -> dict:
    from cl_serve.store.model_store import Store
    from cl_serve.workflow.quantization import quantize_version

    r = quantize_version(store, gate_data=gate_data, min_agreement=0.0, max_drop=1.0)
    s = Store(store)
    m = s.manifest(r["version"])
    size = m.preprocessing.input_size
    row = {"store": store, "version": r["version"], "gate_data": gate_data, "images": r["images"],
           "agreement": round(r["agreement"], 4), "accuracy_fp32": round(r["accuracy_fp32"], 4),
           "accuracy_int8": round(r["accuracy_int8"], 4),
           "fp32": _speed(s.version_dir(r["version"]) / m.onnx_file(), size, batches, singles),
           "int8": _speed(Path(r["file"]), size, batches, singles)}
    row["speedup_b32"] = round(row["int8"]["images_per_s_b32"] / row["fp32"]["images_per_s_b32"], 2)
    print(json.dumps(row), flush=True)
    return row


def _markdown(result: dict) -> str:
    lines = [f"# {result['name']}", "", f"`{result['command']}`", ""]
    if result["speed"]:
        lines += ["| model (224 px, random weights) | fp32 img/s b32 | int8 img/s b32 | speed-up | fp32 b1 ms | "
                  "int8 b1 ms | fp32 MiB | int8 MiB | top-1 agreement (random inputs) |", "|---" * 9 + "|"]
        for r in result["speed"]:
            lines.append(f"| {r['model']} | {r['fp32']['images_per_s_b32']} | {r['int8']['images_per_s_b32']} | "
                         f"{r['speedup_b32']}x | {r['fp32']['batch1_ms_p50']} | {r['int8']['batch1_ms_p50']} | "
                         f"{r['fp32']['bytes'] / 2**20:.0f} | {r['int8']['bytes'] / 2**20:.0f} | {r['agreement']} |")
    if result["accuracy"]:
        r = result["accuracy"]
        lines += ["", f"Trained store ({r['gate_data']}, {r['images']} images): top-1 agreement {r['agreement']}, "
                      f"accuracy fp32 {r['accuracy_fp32']} / int8 {r['accuracy_int8']}; b32 "
                      f"{r['fp32']['images_per_s_b32']} vs {r['int8']['images_per_s_b32']} img/s "
                      f"({r['speedup_b32']}x)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=[], choices=sorted(MODELS))
    ap.add_argument("--store", help="a trained store: int8 accuracy against fp32 on --gate-data")
    ap.add_argument("--gate-data")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--singles", type=int, default=20)
    ap.add_argument("--agree", type=int, default=64)
    ap.add_argument("--name", default="int8-cpu")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    if a.store and not a.gate_data:
        ap.error("--store needs --gate-data")
    result = {"name": a.name, "command": command_line("benchmarks.int8", argv),
              "speed": speed_rows(a.models, a.batches, a.singles, a.agree),
              "accuracy": accuracy_row(a.store, a.gate_data, a.batches, a.singles) if a.store else None}
    save(a.out, a.name, result, _markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

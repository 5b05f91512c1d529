"""Every supported timm family at its real size, as a new user tries it: `cl-serve init --backbone NAME --method
inflora --blocks 2`, two `add-task` of 640 x 480 JPEGs, `evaluate` — each command a fresh process.

    python -m benchmarks.families --name families-full-size-cpu

Random weights (no download; what is measured is that each family trains, merges, exports with ONNX parity and
evaluates, and what it costs on this machine, not accuracy). Two tasks of `--classes` classes x `--per-class`
images each, one epoch. Per family: each command's exit code, seconds and peak RSS (from the kernel), the ONNX
parity of the second version and the evaluation's image count. Results: benchmarks/results/NAME.{json,md}; with
`--families`, the other families' rows of an earlier run under the same name are kept (each with its command).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from benchmarks.results_io import command_line, save
from benchmarks.scale import run_measured, write_jpegs

HERE = Path(__file__).parent
FAMILIES = {  # the families of tests/test_families.py, at their real size
    "augreg": "vit_small_patch16_224",
    "deit3": "deit3_small_patch16_224",
    "dinov2": "vit_small_patch14_dinov2",
    "dinov2-reg": "vit_small_patch14_reg4_dinov2",
    "clip": "vit_base_patch16_clip_224",
    "siglip": "vit_base_patch16_siglip_224",
    "gap": "vit_medium_patch16_gap_256",
    "eva02": "eva02_small_patch14_224",
    "beit": "beit_base_patch16_224",
}


def task_dirs(work: Path, classes: int, per_class: int) -> tuple[Path, Path, Path]:
    """Two tasks of disjoint classes and a folder of both (links into one set of generated JPEGs)."""
    jpegs = write_jpegs(work / "jpegs", 2 * classes * per_class, 2 * classes)
    dirs = [work / "task-a", work / "task-b", work / "seen"]
    for i in range(2 * classes):
        name = f"c{i:03d}"
        for d in (dirs[i // classes], dirs[2]):
            d.mkdir(parents=True, exist_ok=True)
            if not (d / name).exists():
                (d / name).symlink_to(jpegs / name)
    return dirs[0], dirs[1], dirs[2]


def one_family(work: Path, family: str, tasks: tuple[Path, Path, Path]) -> dict:
    store, log = work / f"store-{family}", work / f"{family}.log"
    shutil.rmtree(store, ignore_errors=True)  # each run starts from init
    log.unlink(missing_ok=True)
    cli = [sys.executable, "-m", "cl_serve.cli"]
    steps = {"init": ["init", "--store", str(store), "--backbone", FAMILIES[family], "--method", "inflora",
                      "--blocks", "2"],
             "add-task 1": ["add-task", "--store", str(store), "--data", str(tasks[0]), "--epochs", "1",
                            "--device", "cpu"],
             "add-task 2": ["add-task", "--store", str(store), "--data", str(tasks[1]), "--epochs", "1",
                            "--device", "cpu"],
             "evaluate": ["evaluate", "--store", str(store), "--data", str(tasks[2]), "--json"]}
    row: dict = {"family": family, "model": FAMILIES[family], "steps": {}}
    for step, args in steps.items():
        rc, seconds, peak = run_measured(cli + args, log)
        row["steps"][step] = {"exit_code": rc, "seconds": round(seconds, 1), "peak_rss_mib": round(peak, 1)}
        if rc != 0:
            row["error"] = log.read_text()[-1500:]
            return row
    manifest = json.loads(sorted(store.glob("versions/*/manifest.json"))[-1].read_text())
    row["parity_max_abs_diff"] = manifest["onnx"]["parity_max_abs_diff"]
    row["parity_bound"] = manifest["onnx"].get("parity_bound")
    row["parity_float64"] = {k: manifest["onnx"][k] for k in ("parity_torch_fp32_error", "parity_onnx_fp64_error")
                             if manifest["onnx"].get(k) is not None} or None
    row["input_size"] = manifest["preprocessing"]["input_size"]
    return row


def kept_rows(saved: Path, families: list[str]) -> list[dict]:
    """Rows of the families not run this time, from an earlier run under the same name (each row carries the
    command that measured it), so families can be measured a few at a time."""
    if not saved.exists():
        return []
    earlier = json.loads(saved.read_text())
    return [r | {"command": r.get("command", earlier["command"])} for r in earlier["rows"]
            if r["family"] not in families]


def parity_cell(row: dict) -> str:
    """The largest |ONNX - torch| logit, its bound, and the float64 comparison when it was needed."""
    if "parity_max_abs_diff" not in row:
        return "-"
    cell = f"{row['parity_max_abs_diff']:.2g}" + (f" (bound {row['parity_bound']:.2g})" if row.get("parity_bound")
                                                  else "")
    f64 = row.get("parity_float64")
    if f64:
        cell += (f"; vs float64: ONNX {f64['parity_onnx_fp64_error']:.2g}, "
                 f"torch fp32 {f64['parity_torch_fp32_error']:.2g}")
    return cell


def to_markdown(result: dict) -> str:
    commands = sorted({r["command"] for r in result["rows"]})
    lines = [f"# {result['name']}", "", *(f"`{c}`" for c in commands), "",
             "| family | timm model | input px | init / add-task 1 / add-task 2 / evaluate (s) | peak RSS MiB | "
             "ONNX parity | result |", "|---" * 7 + "|"]
    for r in result["rows"]:
        s = r["steps"]
        secs = " / ".join(str(s[k]["seconds"]) if k in s else "-" for k in ("init", "add-task 1", "add-task 2",
                                                                              "evaluate"))
        ok = "ok" if "error" not in r else "failed: " + r["error"].strip().splitlines()[-1][:120]
        lines.append(f"| {r['family']} | `{r['model']}` | {r.get('input_size', '-')} | {secs} | "
                     f"{max(v['peak_rss_mib'] for v in s.values())} | {parity_cell(r)} | {ok} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    ap.add_argument("--classes", type=int, default=3, help="classes per task")
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cl-serve-families"))
    ap.add_argument("--name", default="families-full-size-cpu")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    tasks = task_dirs(a.work, a.classes, a.per_class)
    command = command_line("benchmarks.families", argv)
    result = {"name": a.name, "command": command, "rows": kept_rows(a.out / f"{a.name}.json", a.families)}
    for family in a.families:
        row = one_family(a.work, family, tasks) | {"command": command}
        print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
        result["rows"] = sorted(result["rows"] + [row], key=lambda r: list(FAMILIES).index(r["family"]))
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"{a.name}.json").write_text(json.dumps(result, indent=2))  # nothing lost if cut off
    save(a.out, a.name, result, to_markdown(result))
    return 0 if all("error" not in r for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Plots and a markdown table from benchmarks/results/<name>.json (or several per-seed files merged).

    python -m benchmarks.report c100-reduced-cpu-5t5c40i3e
writes <name>-accuracy.png (A_i after each task, mean over seeds), <name>-R.png (R matrices) and <name>.md.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent / "results"


def _mean_sd(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table(result: dict) -> str:
    lines = [f"**{result['name']}** — device {result['device']}{' (' + result['gpu'] + ')' if result.get('gpu') else ''}, "
             f"{result['tasks']} tasks, classes per task {result['classes_per_task']}, "
             f"train images per class {result.get('train_images_per_class') or 'all'}, test images per task "
             f"{result['test_images']}, train budget "
             f"{result['train']['epochs']} epochs, batch {result['train']['batch_size']}, lr {result['train']['lr']}",
             "", "| method | seeds | A_T (final) | A_avg | forgetting | s / task | peak MB |", "|---|---|---|---|---|---|---|"]
    for method, runs in result["runs"].items():
        rs = list(runs.values())
        at = _mean_sd([r["A_T"] for r in rs])
        aa = _mean_sd([r["A_avg"] for r in rs]) if "A_avg" in rs[0] else None
        fg = _mean_sd([r["forgetting"] for r in rs]) if "forgetting" in rs[0] else None
        spt = statistics.mean(s for r in rs for s in r["seconds_per_task"])
        fmt = lambda m: f"{100 * m[0]:.2f} ± {100 * m[1]:.2f}" if m else "—"
        lines.append(f"| {method} | {len(rs)} | {fmt(at)} | {fmt(aa)} | {fmt(fg)} | {spt:.1f} | "
                     f"{max(r['peak_memory_mb'] for r in rs):.0f} |")
    lines += ["", "A_T: accuracy on all seen classes after the last task; A_avg: mean of A_i over tasks; forgetting: "
              "mean over old tasks of (best earlier accuracy − final accuracy); all in %. `joint` trains one task "
              "holding every class (upper bound, final only); `simplecil` is nearest class mean on frozen features. "
              + ("peak MB: CUDA memory allocated at most during the method's run." if result["device"].startswith("cuda")
                 else "peak MB: the benchmark process's peak resident memory so far (on CPU it cannot be reset "
                      "between methods, so it is an upper bound for each).")]
    return "\n".join(lines)


def plots(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, runs in result["runs"].items():
        rs = list(runs.values())
        if "A" not in rs[0]:
            ax.axhline(100 * statistics.mean(r["A_T"] for r in rs), ls="--", color="gray", label=f"{method} (final)")
            continue
        curve = [100 * statistics.mean(r["A"][i] for r in rs) for i in range(len(rs[0]["A"]))]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=method)
    ax.set(xlabel="tasks learned", ylabel="accuracy on all seen classes (%)", title=result["name"])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    p = out / f"{result['name']}-accuracy.png"
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    methods = [m for m, runs in result["runs"].items() if "A" in next(iter(runs.values()))]
    if methods:
        fig, axes = plt.subplots(1, len(methods), figsize=(3 * len(methods), 3), squeeze=False)
        for ax, m in zip(axes[0], methods):
            Rs = [r["R"] for r in result["runs"][m].values()]
            T = len(Rs[0])
            grid = [[100 * statistics.mean(R[i][j] for R in Rs) if j <= i else float("nan") for j in range(T)]
                    for i in range(T)]
            ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
            if T <= 10:
                for i in range(T):
                    for j in range(i + 1):
                        ax.text(j, i, f"{grid[i][j]:.0f}", ha="center", va="center", fontsize=7,
                                color="white" if grid[i][j] < 60 else "black")
            ax.set(title=f"{m} (mean of {len(Rs)} seeds)" if len(Rs) > 1 else m, xlabel="task j", ylabel="after task i",
                   xticks=range(T), yticks=range(T))
        p = out / f"{result['name']}-R.png"
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def merge(paths: list[Path]) -> dict:
    results = [json.loads(p.read_text()) for p in paths]
    merged = dict(results[0])
    merged["runs"] = {}
    for r in results:
        for m, runs in r["runs"].items():
            merged["runs"].setdefault(m, {}).update(runs)
    merged["seeds"] = sorted({int(s) for r in merged["runs"].values() for s in r})
    return merged


def main(argv: list[str] | None = None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    name, out = argv[0], Path(argv[1]) if len(argv) > 1 else HERE
    paths = sorted(out.glob(f"{name}*.json")) if not (out / f"{name}.json").exists() else [out / f"{name}.json"]
    result = merge(paths)
    result["name"] = name
    plots(result, out)
    md = table(result)
    (out / f"{name}.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

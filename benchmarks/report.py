"""Plots and a markdown table from benchmarks/results/<name>.json (or several per-seed files merged).

    python -m benchmarks.report c100-cpu
writes <name>-accuracy.png (A_i after each task per head, mean over seeds), <name>-R.png (R matrices of every run
with the best head) and <name>.md (one row per run and head).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from benchmarks.metrics import is_joint

HERE = Path(__file__).parent / "results"


def _mean_sd(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(m) -> str:
    return "—" if m is None else (f"{100 * m[0]:.2f} ± {100 * m[1]:.2f}" if m[1] else f"{100 * m[0]:.2f}")


def _heads(result: dict) -> list[str]:
    out: list[str] = []
    for runs in result["runs"].values():
        for r in runs.values():
            out += [h for h in r["metrics"] if h not in out]
    return out


def best_head(result: dict) -> str:
    """The head with the highest mean final accuracy over the incremental runs."""
    scores = {}
    for run, runs in result["runs"].items():
        if is_joint(run):
            continue
        for r in runs.values():
            for h, m in r["metrics"].items():
                if h != "simplecil" and h in result.get("heads", {}):
                    scores.setdefault(h, []).append(m["A_T"])
    if not scores:  # only joint runs: their heads
        scores = {h: [m["A_T"]] for runs in result["runs"].values() for r in runs.values()
                  for h, m in r["metrics"].items()}
    return max(scores, key=lambda h: statistics.mean(scores[h]))


def table(result: dict) -> str:
    t = result["train"]
    lines = [f"**{result['name']}** — profile {result.get('profile') or 'custom'}, recipe {result.get('recipe', 'equal')}, "
             f"device {result['device']}{' (' + result['gpu'] + ')' if result.get('gpu') else ''}, "
             f"{result['tasks']} tasks × {result['classes_per_task'][0]} classes, "
             f"{result.get('train_images_per_class') or 'all'} train images per class, "
             f"{result['test_images'][0] // result['classes_per_task'][0]} test images per class, "
             f"{t['epochs']} epochs at batch {t['batch_size']}, {t['optimizer']} lr {t['lr']} ({t['schedule']}), "
             f"training forward in {t['precision']}; all runs took {result.get('seconds_all_runs', 0) / 60:.1f} min "
             f"(+{result.get('decode_seconds', 0):.0f} s decoding) with {result.get('threads', '?')} threads",
             "", "| run | head | seeds | A_T (final) | A_avg | forgetting | A_T, heads refitted on final features | "
                 "s / task | head state per class |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run, runs in result["runs"].items():
        rs = list(runs.values())
        spt = statistics.mean(s for r in rs for s in r["seconds_per_task"])
        for h in rs[0]["metrics"]:
            ms = [r["metrics"][h] for r in rs]
            at = _mean_sd([m["A_T"] for m in ms])
            aa = _mean_sd([m["A_avg"] for m in ms]) if "A_avg" in ms[0] else None
            fg = _mean_sd([m["forgetting"] for m in ms]) if "forgetting" in ms[0] else None
            refit = [r["refit_A_T"][h] for r in rs if h in r.get("refit_A_T", {})]
            sb = rs[0].get("state_bytes", {}).get(h)
            size = f"{sb['per_class'] / 1024:.1f} KB" if sb else "—"
            lines.append(f"| {run} | {h} | {len(rs)} | {_fmt(at)} | {_fmt(aa)} | {_fmt(fg)} | "
                         f"{_fmt(_mean_sd(refit)) if refit else '—'} | {spt:.1f} | {size} |")
    lines += ["", "A_T: accuracy on all seen classes after the last task; A_avg: mean of A_i over tasks; forgetting: "
              "mean over old tasks of (best earlier accuracy − final accuracy); all in %. `joint` learns one task "
              "holding every class (upper bound, final only); `simplecil` is cosine nearest class mean on the frozen "
              "run's features. The refitted column recomputes the statistics heads from every task's training images "
              "with the final model (an oracle that keeps old images) to show what older-feature statistics cost. "
              "s / task: one adapter run's training + all its heads + evaluation, per task."]
    return "\n".join(lines)


def plots(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    heads = [h for h in _heads(result) if h in result.get("heads", {})]
    fig, axes = plt.subplots(1, len(heads), figsize=(4.5 * len(heads), 4), squeeze=False, sharey=True)
    for ax, h in zip(axes[0], heads):
        for run, runs in result["runs"].items():
            rs = [r for r in runs.values() if h in r["metrics"]]
            if not rs:
                continue
            if "A" not in rs[0]["metrics"][h]:
                ax.axhline(100 * statistics.mean(r["metrics"][h]["A_T"] for r in rs), ls="--", color="gray",
                           label=f"{run} (final)")
                continue
            curve = [100 * statistics.mean(r["metrics"][h]["A"][i] for r in rs) for i in range(len(rs[0]["metrics"][h]["A"]))]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", ms=3, label=run)
        simple = [r["metrics"]["simplecil"]["A"] for runs in result["runs"].values() for r in runs.values()
                  if "simplecil" in r["metrics"]]
        if simple:
            ax.plot(range(1, len(simple[0]) + 1), [100 * statistics.mean(c[i] for c in simple) for i in range(len(simple[0]))],
                    ls=":", color="black", label="simplecil")
        ax.set(xlabel="tasks learned", title=f"head: {h}")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy on all seen classes (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(result["name"])
    p = out / f"{result['name']}-accuracy.png"
    fig.tight_layout()
    fig.savefig(p, dpi=100)
    plt.close(fig)
    paths.append(p)
    h = best_head(result)
    runs = [m for m, rr in result["runs"].items() if "A" in next(iter(rr.values()))["metrics"].get(h, {})]
    if runs:
        fig, axes = plt.subplots(1, len(runs), figsize=(3 * len(runs), 3.2), squeeze=False)
        for ax, m in zip(axes[0], runs):
            Rs = [r["R"][h] for r in result["runs"][m].values()]
            T = len(Rs[0])
            grid = [[100 * statistics.mean(R[i][j] for R in Rs) if j <= i else float("nan") for j in range(T)]
                    for i in range(T)]
            ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
            if T <= 10:
                for i in range(T):
                    for j in range(i + 1):
                        ax.text(j, i, f"{grid[i][j]:.0f}", ha="center", va="center", fontsize=6,
                                color="white" if grid[i][j] < 60 else "black")
            ax.set(title=f"{m} + {h}", xlabel="task j", ylabel="after task i", xticks=range(T), yticks=range(T))
        p = out / f"{result['name']}-R.png"
        fig.tight_layout()
        fig.savefig(p, dpi=90)
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

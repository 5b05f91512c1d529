"""What one training step costs on this machine: img/s of the adapter training step (forward + backward +
optimiser) for batch sizes, fp32 vs bf16 autocast, eager vs torch.compile, and thread counts; plus the no-grad
feature pass the heads and InfLoRA's moments use.

    python -m benchmarks.train_step --checkpoint ../shared/backbones/vit-s4-32-tin100/model.safetensors --name step-cpu

Steps are bounded by count (warm-up, then timed steps), never by time. Writes benchmarks/results/<name>.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).parent


def measure(learner, x, y, precision: str, steps: int, compiled: bool, cached: bool = False) -> float:
    """Training images/s of one step. `cached`: x holds the frozen blocks' output tokens (TokenCache) and the step
    runs only the adapted blocks, as the trainer does with a method's `blocks`."""
    params = learner.method.trainable_parameters() + list(learner.block.parameters())
    opt = torch.optim.Adam(params, lr=1e-4)
    step = (lambda t: learner.block(learner.suffix(t))) if cached else learner.block_logits
    fwd = torch.compile(step) if compiled else step
    t0 = None
    for i in range(steps + 2):  # two warm-up steps (compilation happens there)
        if i == 2:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(fwd(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return x.shape[0] * steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--method", default="inflora")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 32, 64])
    ap.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()])
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to warm up)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--blocks", type=int, nargs="+", default=[0],
                    help="adapt only the last N blocks (0: all); N > 0 times the cached-prefix step and the prefix "
                         "pass, and the amortised rate for --epochs and --views")
    ap.add_argument("--targets", default=None, help="comma-separated adapted projections (default: the method's)")
    ap.add_argument("--epochs", type=int, default=10, help="epochs per task for the amortised rate")
    ap.add_argument("--views", type=int, default=4, help="cached views per image for the amortised rate")
    ap.add_argument("--name", default="train-step")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)

    from cl_serve.trainer.backbone import from_checkpoint
    from cl_serve.trainer.learner import Learner
    from cl_serve.trainer.methods import method_config_from_dict

    spec, weights, _, _ = from_checkpoint(a.checkpoint)
    rows = []
    for blocks in a.blocks:
        mcfg = {"name": a.method, **({"blocks": blocks} if blocks else {}),
                **({"targets": a.targets.split(",")} if a.targets else {})}
        learner = Learner(spec, weights, method_config_from_dict(mcfg))
        learner.method.begin_task(0, lambda: {k: torch.eye(s.d_in) for k, s in learner.method.sites.items()})
        learner.add_block([str(i) for i in range(10)])
        side = learner.backbone.patch_embed.img_size[0]
        for threads in a.threads:
            torch.set_num_threads(threads)
            for bs in a.batch_sizes:
                x, y = torch.randn(bs, 3, side, side), torch.randint(0, 10, (bs,))
                for precision in ("fp32", "bf16"):
                    prefix_ips = None
                    if blocks:
                        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                            learner.prefix(x)
                            t0 = time.perf_counter()
                            tokens = learner.prefix(x)
                            prefix_ips = bs / (time.perf_counter() - t0)
                    for compiled in ([False, True] if a.compile else [False]):
                        ips = measure(learner, tokens if blocks else x, y, precision, a.steps, compiled, bool(blocks))
                        row = {"blocks": blocks or "all", "threads": threads, "batch": bs, "precision": precision,
                               "compiled": compiled, "train_img_per_s": ips, "step_seconds": bs / ips}
                        if blocks:  # per image and epoch: one step, plus views/epochs of a prefix pass
                            row.update(prefix_img_per_s=prefix_ips, epochs=a.epochs, views=a.views,
                                       amortised_img_per_s=1 / (1 / ips + (a.views + 1) / (a.epochs * prefix_ips)))
                        rows.append(row)
                        print(json.dumps(rows[-1]), flush=True)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / f"{a.name}.json").write_text(json.dumps({"method": a.method, "checkpoint": str(a.checkpoint),
                                                          "targets": a.targets, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
